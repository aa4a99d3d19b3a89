/*
 * bc_session.h — the FUSE session in C on libfuse 3's low-level API.
 *
 * Serves the same tree as the fusepy front end:
 *
 *   MOUNTPOINT/            0755 dir (inode 1)
 *     disks/               0755 dir (inode 2): the first of the top-level directories the
 *                          options name (default: disks/ alone); snapshots/, images/, temp/
 *                          come after it when the control plane asks for them
 *       <name>             regular file of the disk's size; mode from the disk table
 *
 * A table entry is named by its path "<dir>/<name>" (a bare "<name>" means the first
 * directory); the hooks get that path.
 *
 * The disk table is pushed by the control plane (Python) with bc_session_set_disk /
 * bc_session_remove_disk; it never calls into the control plane during a data
 * request (read, write, fsync, fallocate). Two hooks reach the control plane, both
 * outside data requests:
 *
 *   open_disk  on open() of a disk that has no open volume: returns a volume
 *              (bc_volume_ref'd for the session) or -errno (the open fails with it);
 *              at most one call per disk at a time, other disks do not wait.
 *   closed     after the last handle of a disk is released and its volume unref'd
 *              (the session flushed it first).
 *   lookup_miss on a lookup of an unknown name: the control plane may refresh the
 *              table (rate-limited by the caller) before the session answers ENOENT.
 *
 * Owners, modes and xattrs: chmod/chown go to the set_attr hook and xattr changes to
 * set_xattr (the control plane keeps them per disk and pushes them back with set_disk);
 * getxattr/listxattr are answered from the pushed blob without a hook (the kernel asks
 * security.capability before writes: ENODATA at once), trusted.* listed to uid 0 only;
 * names outside user.* and trusted.* EOPNOTSUPP to set, ENODATA to get.
 *
 * Semantics: truncate to the current size succeeds; ftruncate to 0 through a writable handle
 * wipes the disk (bc_volume_discard of all of it: it reads as zeros) and answers its unchanged
 * size, as qemu-img's create step needs (truncate to 0, then to the image size); truncate by
 * path to 0 (truncate(2), O_TRUNC) and to any other size EPERM;
 * create, unlink, rename, mkdir, mknod, symlink, link EPERM; utimens accepted;
 * fallocate PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE go to the volume, mode 0 inside the
 * disk is a no-op, past the end EPERM, other modes EOPNOTSUPP; fsync/fdatasync ->
 * bc_volume_flush; statfs of the state directory; st_blocks from
 * bc_volume_blocks_used (or the table's value when not open). Writes starting at or
 * past the end: EFBIG; a write straddling the end is clipped.
 *
 * Transport: multi-threaded session loop, requests up to 1 MiB (max_write/max_read,
 * FUSE_MAX_PAGES), FUSE_CAP_ASYNC_DIO, no per-request allocation (each worker thread
 * owns a 1 MiB read buffer), writes served from libfuse's buffer.
 *
 * Inodes: 1 root, 2 .. 1 + ndirs the directories, then one per path, given on its first set_disk and kept for
 * the session's life (a removed then re-added name gets its old inode back). A disk
 * removed while open keeps serving its handles (read, write, fstat, fsync) until released;
 * the next open of a re-added name calls open_disk again.
 *
 * Stopping: libfuse 3.14's fuse_session_exit alone does not wake the loop, so
 * bc_session_exit also makes a waker thread send the mount a lookup until the loop
 * returns. bc_session_loop unmounts before it returns (whatever stopped it), runs once,
 * and returns 0 or -errno. bc_session_destroy may be called while the loop runs: it
 * exits and waits for it. Hooks must not call bc_session_destroy (the loop waits for them).
 *
 * Caveats: one session per mount point; the caller runs bc_session_loop in a thread
 * of its own and stops it with bc_session_exit (or an unmount). Mount options:
 * fsname=blockcrypt, subtype=blockcrypt (fstype fuse.blockcrypt), default_permissions,
 * max_read, allow_other on request. No parallel direct writes to one file: libfuse 3.14
 * cannot set FOPEN_PARALLEL_DIRECT_WRITES, so the kernel serializes O_DIRECT writes per
 * inode (reads run in parallel).
 */
#ifndef BC_SESSION_H
#define BC_SESSION_H

#include <stdint.h>
#include <sys/types.h>
#include "../engine/bc_engine.h"

#ifdef __cplusplus
extern "C" {
#endif

struct bc_session;

#define BC_SESSION_MAX_DIRS 8

/* set_attr's to_set bits */
#define BC_SET_MODE 1
#define BC_SET_UID 2
#define BC_SET_GID 4

struct bc_session_hooks {
    void *arg;
    int (*open_disk)(void *arg, const char *name, struct bc_volume **out);
    void (*closed)(void *arg, const char *name);
    void (*lookup_miss)(void *arg, const char *name);
    /* chmod/chown of a disk (the kernel checked the caller's right: default_permissions):
     * the control plane stores what to_set names and pushes the entry again (set_disk);
     * 0 or -errno. NULL: EPERM. */
    int (*set_attr)(void *arg, const char *name, int to_set, uint32_t mode, uint32_t uid,
                    uint32_t gid);
    /* setxattr (value != NULL; flags XATTR_CREATE/XATTR_REPLACE) or removexattr (value
     * NULL) of a name bc_xattr_name_ok accepts: the control plane stores it and pushes the
     * entry's new blob; 0 or -errno (EEXIST, ENODATA, ENOSPC, ...). NULL: EOPNOTSUPP. */
    int (*set_xattr)(void *arg, const char *name, const char *xname, const void *value,
                     size_t size, int flags);
};

struct bc_session_opts {
    const char *mountpoint;
    const char *statfs_path;      /* statfs answers for this directory (the state directory) */
    int allow_other;              /* -o allow_other (and default_permissions) */
    int xattrs;                   /* serve getxattr/setxattr/listxattr/removexattr; 0: ENOSYS, so
                                   * the kernel stops asking (and stops its per-write
                                   * security.capability lookup) */
    int max_threads;              /* worker threads (0: libfuse default) */
    uint32_t max_request_bytes;   /* 0: 1 MiB */
    int debug;                    /* libfuse debug output on stderr */
    const char *const *dirs;      /* top-level directory names (NULL: "disks" alone) */
    unsigned ndirs;               /* 1 .. BC_SESSION_MAX_DIRS */
};

/* One disk as the tree shows it. volume may be NULL (not open yet). */
struct bc_disk_entry {
    const char *name;             /* "<dir>/<name>", or "<name>" in the first directory */
    uint64_t size_bytes;
    uint32_t mode;                /* 0600/0400/0660/0440 */
    uint32_t uid, gid;
    int read_only;
    const char *backing_path;     /* for st_blocks/times while not open */
    const void *xattrs;           /* its extended attributes, packed (bc_xattr.h), or NULL */
    size_t xattrs_len;
};

int bc_session_new(const struct bc_session_opts *opts, const struct bc_session_hooks *hooks,
                   struct bc_session **out);         /* mounts; -errno with a message on stderr */
int bc_session_loop(struct bc_session *s);          /* blocks until unmounted or exit */
void bc_session_exit(struct bc_session *s);         /* from any thread or a signal handler */
void bc_session_destroy(struct bc_session *s);      /* unmounts, unrefs every volume */

/* The disk table (any thread, while the loop runs). set_disk adds or updates (size,
 * mode); a size change of an open disk is applied to its volume too. remove_disk:
 * the name vanishes; open handles keep working until released. */
int bc_session_set_disk(struct bc_session *s, const struct bc_disk_entry *e);
int bc_session_remove_disk(struct bc_session *s, const char *name);
/* Drop the kernel's cached pages of disk name (a revoked key: no plaintext stays readable
 * from the page cache or an mmap); outside a request only. -ENOENT for an unknown name. */
int bc_session_drop_cache(struct bc_session *s, const char *name);

/* State of one disk for `status`: open handles, the volume (ref'd, or NULL), errors
 * answered and the last one. Returns -ENOENT for an unknown name. */
struct bc_disk_state {
    uint32_t handles;
    uint64_t errors;
    int last_errno;
    struct bc_volume *volume;     /* caller unrefs */
};
/* What a truncate of a disk of size_bytes to new_size_bytes does (pure, for op_setattr and
 * its C test): BC_TRUNCATE_NOOP, BC_TRUNCATE_WIPE (to 0 through an open handle), or -EPERM. */
#define BC_TRUNCATE_NOOP 0
#define BC_TRUNCATE_WIPE 1
int bc_session_truncate_plan(uint64_t size_bytes, uint64_t new_size_bytes, int through_handle);

int bc_session_disk_state(struct bc_session *s, const char *name, struct bc_disk_state *out);

#ifdef __cplusplus
}
#endif
#endif
