/*
 * bc_session.c — the FUSE session on libfuse 3's low-level API (see bc_session.h).
 *
 * Objects and their locks:
 *
 *   s->table_lock (rwlock)  the disk table: the array of disk objects, the name hash,
 *                           and each disk's table fields (present, size, mode, ...).
 *   d->open_mu (mutex)      per disk: serializes the open_disk hook and the last release
 *                           (so a disk is never being opened and closed at once); other
 *                           disks do not wait.
 *   d->mu (mutex)           per disk: d->open and the open instance's handle count.
 *   s->life_mu (mutex)      the lists of open instances and handles (for destroy).
 *
 *   Lock order: open_mu -> table_lock -> mu -> life_mu. No lock is held across a hook
 *   except open_mu (a hook may call bc_session_set_disk/remove_disk).
 *
 * Inodes: 1 the root, 2 .. 1 + ndirs the top-level directories (disks/, ...), a disk
 * object per path ("<dir>/<name>") ever seen, at INO_FIRST + its index in the array. Disk objects live as long as the session, so a name keeps its inode for
 * the session's life: a removed then re-added name gets its old inode back (its table
 * fields are replaced; an instance opened before the removal stays with its handles and
 * the next open asks open_disk again). forget has nothing to free.
 *
 * The data path (read, write, fsync, fallocate) takes no lock of the session: a file
 * handle points at a small struct holding its own reference on the volume.
 *
 * Stopping: libfuse 3.14's fuse_session_exit only sets a flag while the loop's main
 * thread sleeps until a worker finishes, and workers sleep in read(/dev/fuse). So
 * bc_session_exit also writes to an eventfd (async-signal-safe); a waker thread started
 * by bc_session_loop then lstat()s a name under the mount point until the loop returns:
 * the LOOKUP it causes wakes a worker, which answers ENOENT, sees the flag and ends the
 * loop. bc_session_loop unmounts before it returns (so a returned loop leaves no mount).
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312

#include "bc_session.h"
#include "bc_xattr.h"

#include <fuse3/fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define INO_ROOT 1
#define INO_DIR0 2
#define INO_FIRST (INO_DIR0 + BC_SESSION_MAX_DIRS)
/* "<dir>/<name>": a directory name and a disk name, both at most NAME_MAX_BYTES */
#define PATH_MAX_BYTES (2 * NAME_MAX_BYTES + 1)
#define TIMEOUT_S 1.0
#define NAME_MAX_BYTES 255
#define DEFAULT_MAX_THREADS 8
#define WAKE_NAME ".bc-session-wake"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

struct bc_open;

struct bc_disk {
    /* immutable */
    char *name;                    /* the path "<dir>/<leaf>": the table's key and the hooks' */
    const char *leaf;              /* the name inside its directory (points into name) */
    unsigned dir;                  /* index of its directory */
    fuse_ino_t ino;
    /* table fields, under s->table_lock */
    int present;
    uint64_t size_bytes;
    uint32_t mode, uid, gid;
    int read_only;
    char *backing_path;
    uint8_t *xattrs;               /* packed (bc_xattr.h), or NULL */
    size_t xattrs_len;
    /* open state */
    pthread_mutex_t open_mu;
    pthread_mutex_t mu;
    struct bc_open *open;          /* the instance new opens share, or NULL */
    _Atomic uint64_t errors;
    _Atomic int last_errno;
};

/* One volume opened through open_disk, shared by the handles opened while it is current. */
struct bc_open {
    struct bc_disk *disk;
    struct bc_volume *vol;         /* the reference open_disk gave us */
    uint32_t handles;              /* under disk->mu */
    struct bc_open *prev, *next;   /* under s->life_mu */
};

struct bc_handle {
    struct bc_volume *vol;         /* a reference of its own */
    struct bc_open *inst;
    struct bc_handle *prev, *next; /* under s->life_mu */
};

struct bc_session {
    struct fuse_session *se;
    struct bc_session_hooks hooks;
    char *mountpoint;
    char *statfs_path;
    char *wake_path;
    int max_threads;
    int xattrs;                    /* opts->xattrs: serve the xattr operations */
    uint32_t max_req;
    uid_t uid;
    gid_t gid;
    struct timespec t_start;
    char *dirs[BC_SESSION_MAX_DIRS];   /* top-level directory names; immutable */
    unsigned ndirs;

    pthread_rwlock_t table_lock;
    struct bc_disk **disks;
    size_t ndisks, cap;
    uint32_t *hash;                /* open addressing: index + 1, 0 = empty */
    size_t hash_cap;               /* a power of two */

    pthread_mutex_t life_mu;
    struct bc_open *opens;
    struct bc_handle *handles;

    pthread_key_t buf_key;         /* each worker thread's read buffer */
    int efd;                       /* exit requests (eventfd) */
    atomic_int exit_requested;
    atomic_int loop_done;

    pthread_mutex_t loop_mu;
    pthread_cond_t loop_cv;
    int looping;                   /* under loop_mu */
};

/* ---- the disk table ---------------------------------------------------------------- */

static uint32_t name_hash(const char *name)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 16777619u;
    }
    return h;
}

static int valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > NAME_MAX_BYTES || strchr(name, '/') != NULL)
        return 0;
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return 0;
    return 1;
}

static inline int is_dir_ino(const struct bc_session *s, fuse_ino_t ino)
{
    return ino >= INO_DIR0 && ino < INO_DIR0 + s->ndirs;
}

/* The canonical path "<dir>/<name>" of path into buf (PATH_MAX_BYTES + 1), and its
 * directory's index. A bare name means the first directory (disks/). 0 or -EINVAL. */
static int canon_path(const struct bc_session *s, const char *path, char *buf, unsigned *dir)
{
    const char *slash = strchr(path, '/');
    const char *leaf = path;
    unsigned i = 0;
    if (slash != NULL) {
        size_t dlen = (size_t)(slash - path);
        for (i = 0; i < s->ndirs; i++)
            if (strlen(s->dirs[i]) == dlen && memcmp(s->dirs[i], path, dlen) == 0)
                break;
        if (i == s->ndirs)
            return -EINVAL;
        leaf = slash + 1;
    }
    if (!valid_name(leaf))
        return -EINVAL;
    snprintf(buf, PATH_MAX_BYTES + 1, "%s/%s", s->dirs[i], leaf);
    *dir = i;
    return 0;
}

/* table_lock held (either way) */
static struct bc_disk *find_name(struct bc_session *s, const char *name)
{
    if (s->hash_cap == 0)
        return NULL;
    size_t mask = s->hash_cap - 1;
    for (size_t i = name_hash(name) & mask;; i = (i + 1) & mask) {
        uint32_t slot = s->hash[i];
        if (slot == 0)
            return NULL;
        struct bc_disk *d = s->disks[slot - 1];
        if (strcmp(d->name, name) == 0)
            return d;
    }
}

/* table_lock held (either way) */
static struct bc_disk *find_ino(struct bc_session *s, fuse_ino_t ino)
{
    if (ino < INO_FIRST || ino - INO_FIRST >= s->ndisks)
        return NULL;
    return s->disks[ino - INO_FIRST];
}

static void hash_put(uint32_t *hash, size_t cap, const char *name, uint32_t slot)
{
    size_t mask = cap - 1;
    size_t i = name_hash(name) & mask;
    while (hash[i] != 0)
        i = (i + 1) & mask;
    hash[i] = slot;
}

/* table_lock held for writing */
static struct bc_disk *add_disk(struct bc_session *s, const char *name, unsigned dir)
{
    if (s->ndisks >= (size_t)UINT32_MAX - 1)
        return NULL;
    if (s->ndisks == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        struct bc_disk **nd = realloc(s->disks, cap * sizeof(*nd));
        if (nd == NULL)
            return NULL;
        s->disks = nd;
        s->cap = cap;
    }
    if ((s->ndisks + 1) * 2 > s->hash_cap) {
        size_t cap = s->hash_cap ? s->hash_cap * 2 : 64;
        uint32_t *nh = calloc(cap, sizeof(*nh));
        if (nh == NULL)
            return NULL;
        for (size_t i = 0; i < s->ndisks; i++)
            hash_put(nh, cap, s->disks[i]->name, (uint32_t)(i + 1));
        free(s->hash);
        s->hash = nh;
        s->hash_cap = cap;
    }
    struct bc_disk *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return NULL;
    d->name = strdup(name);
    if (d->name == NULL) {
        free(d);
        return NULL;
    }
    d->leaf = strchr(d->name, '/') + 1;
    d->dir = dir;
    pthread_mutex_init(&d->open_mu, NULL);
    pthread_mutex_init(&d->mu, NULL);
    d->ino = INO_FIRST + s->ndisks;
    s->disks[s->ndisks++] = d;
    hash_put(s->hash, s->hash_cap, d->name, (uint32_t)s->ndisks);
    return d;
}

static void note_error(struct bc_disk *d, int err)
{
    /* every errno answered counts, EFBIG (a write at the end) too, as in the fusepy front end */
    atomic_fetch_add(&d->errors, 1);
    atomic_store(&d->last_errno, err);
}

/* An engine error as the kernel gets it: a sector that failed its tag (-EBADMSG) is an
 * I/O error for that request, as for a bad block; status keeps the precise errno. */
static int wire_errno(int err)
{
    return err == EBADMSG ? EIO : err;
}

/* The current instance's volume, ref'd, or NULL. */
static struct bc_volume *current_volume(struct bc_disk *d)
{
    struct bc_volume *v = NULL;
    pthread_mutex_lock(&d->mu);
    if (d->open != NULL) {
        v = d->open->vol;
        bc_volume_ref(v);
    }
    pthread_mutex_unlock(&d->mu);
    return v;
}

/* ---- attributes -------------------------------------------------------------------- */

static void dir_attr(struct bc_session *s, fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = ino == INO_ROOT ? 2 + s->ndirs : 2;
    st->st_uid = s->uid;
    st->st_gid = s->gid;
    st->st_blksize = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = s->t_start;
}

/* table_lock held for reading. vol: a volume to report size/blocks from, else the
 * disk's current instance, else the table and the backing file. */
static void disk_attr(struct bc_session *s, struct bc_disk *d, struct bc_volume *vol,
                      struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = d->ino;
    st->st_mode = S_IFREG | (d->mode & 07777);
    st->st_nlink = 1;
    st->st_uid = d->uid;
    st->st_gid = d->gid;
    st->st_blksize = 4096;
    st->st_size = (off_t)d->size_bytes;
    st->st_atim = st->st_mtim = st->st_ctim = s->t_start;

    struct stat bst;
    int have_bst = d->backing_path != NULL && stat(d->backing_path, &bst) == 0;
    if (have_bst) {
        st->st_atim = bst.st_atim;
        st->st_mtim = bst.st_mtim;
        st->st_ctim = bst.st_ctim;
        st->st_blocks = bst.st_blocks;
    }
    struct bc_volume *v = vol;
    if (v == NULL)
        v = current_volume(d);
    else
        bc_volume_ref(v);
    if (v != NULL) {
        uint64_t blocks = 0;
        st->st_size = (off_t)bc_volume_size(v);
        if (bc_volume_blocks_used(v, &blocks) == 0)
            st->st_blocks = (blkcnt_t)blocks;
        bc_volume_unref(v);
    }
}

static void fill_entry(struct fuse_entry_param *e, const struct stat *st)
{
    memset(e, 0, sizeof(*e));
    e->ino = st->st_ino;
    e->attr = *st;
    e->attr_timeout = TIMEOUT_S;
    e->entry_timeout = TIMEOUT_S;
}

/* ---- per-thread read buffer -------------------------------------------------------- */

static void *thread_buffer(struct bc_session *s)
{
    void *buf = pthread_getspecific(s->buf_key);
    if (buf != NULL)
        return buf;
    if (posix_memalign(&buf, 4096, s->max_req) != 0)
        return NULL;
    if (pthread_setspecific(s->buf_key, buf) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static inline struct bc_handle *fh_of(struct fuse_file_info *fi)
{
    return (struct bc_handle *)(uintptr_t)fi->fh;
}

/* ---- operations -------------------------------------------------------------------- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    struct bc_session *s = userdata;
    if (conn->capable & FUSE_CAP_ASYNC_DIO)
        conn->want |= FUSE_CAP_ASYNC_DIO;
    /* writes must reach the engine as they come (no page-cache write-back), and replies
     * are served from our buffers (splice would only add pipe round trips) */
    conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                    FUSE_CAP_SPLICE_MOVE);
    /* libfuse clipped conn->max_write to its buffer (max_pages or 32 pages) before */
    if (conn->max_write > s->max_req)
        conn->max_write = s->max_req;
    conn->max_read = s->max_req;   /* equals the max_read mount option */
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct fuse_entry_param e;
    struct stat st;

    if (parent == INO_ROOT) {
        for (unsigned i = 0; i < s->ndirs; i++) {
            if (strcmp(name, s->dirs[i]) == 0) {
                dir_attr(s, INO_DIR0 + i, &st);
                fill_entry(&e, &st);
                fuse_reply_entry(req, &e);
                return;
            }
        }
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (!is_dir_ino(s, parent)) {
        int known;
        pthread_rwlock_rdlock(&s->table_lock);
        known = find_ino(s, parent) != NULL;
        pthread_rwlock_unlock(&s->table_lock);
        fuse_reply_err(req, known ? ENOTDIR : ENOENT);
        return;
    }
    char path[PATH_MAX_BYTES + 1];
    if (!valid_name(name)) {
        fuse_reply_err(req, strlen(name) > NAME_MAX_BYTES ? ENAMETOOLONG : ENOENT);
        return;
    }
    snprintf(path, sizeof(path), "%s/%s", s->dirs[parent - INO_DIR0], name);
    for (int attempt = 0; attempt < 2; attempt++) {
        pthread_rwlock_rdlock(&s->table_lock);
        struct bc_disk *d = find_name(s, path);
        if (d != NULL && d->present) {
            disk_attr(s, d, NULL, &st);
            pthread_rwlock_unlock(&s->table_lock);
            fill_entry(&e, &st);
            fuse_reply_entry(req, &e);
            return;
        }
        pthread_rwlock_unlock(&s->table_lock);
        if (attempt > 0 || s->hooks.lookup_miss == NULL)
            break;
        s->hooks.lookup_miss(s->hooks.arg, path);
    }
    fuse_reply_err(req, ENOENT);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    (void)ino;
    (void)nlookup;
    fuse_reply_none(req);   /* inodes live as long as the session */
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    (void)count;
    (void)forgets;
    fuse_reply_none(req);
}

/* A volume (ref'd) of any instance of d still open, or NULL: a disk removed from the
 * table keeps answering getattr by inode while handles are open (rare: walks the list). */
static struct bc_volume *live_volume(struct bc_session *s, struct bc_disk *d)
{
    struct bc_volume *v = NULL;
    pthread_mutex_lock(&s->life_mu);
    for (struct bc_open *o = s->opens; o != NULL; o = o->next) {
        if (o->disk == d) {
            v = o->vol;
            bc_volume_ref(v);
            break;
        }
    }
    pthread_mutex_unlock(&s->life_mu);
    return v;
}

/* Attributes of ino (through the handle's volume when fi is given). 0 or an errno. */
static int attr_of(struct bc_session *s, fuse_ino_t ino, struct fuse_file_info *fi, struct stat *st)
{
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        dir_attr(s, ino, st);
        return 0;
    }
    struct bc_handle *h = fi != NULL ? fh_of(fi) : NULL;
    struct bc_volume *v = NULL;
    int err = 0;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_ino(s, ino);
    if (d != NULL && !d->present && h == NULL)
        v = live_volume(s, d);   /* fstat reaches us without its handle */
    if (d == NULL || (!d->present && h == NULL && v == NULL))
        err = ENOENT;
    else
        disk_attr(s, d, h != NULL ? h->vol : v, st);
    pthread_rwlock_unlock(&s->table_lock);
    if (v != NULL)
        bc_volume_unref(v);
    return err;
}

/* Dropping the kernel's pages of an inode from inside its setattr: the kernel holds no page
 * lock then, but it holds the inode's write-back off (fuse_set_nowrite) until we reply, so a
 * dirty page of a shared writable mmap would make the invalidation wait for our reply. The
 * invalidation runs in a thread of its own and the request waits for it at most
 * INVAL_WAIT_MS: the usual case (no dirty page) drops everything before the reply; the
 * pathological one finishes right after it (the page's write-back then reaches us).
 * Caveat: such a late invalidation thread is detached; a session destroyed within that
 * second after an ftruncate(fd, 0) of a disk with dirty mmap pages could outlive it. */
#define INVAL_WAIT_MS 1000

struct inval_job {
    struct fuse_session *se;
    fuse_ino_t ino;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, refs;
};

static void inval_job_put(struct inval_job *j)
{
    pthread_mutex_lock(&j->mu);
    int last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (last) {
        pthread_mutex_destroy(&j->mu);
        pthread_cond_destroy(&j->cv);
        free(j);
    }
}

static void *inval_main(void *arg)
{
    struct inval_job *j = arg;
    (void)fuse_lowlevel_notify_inval_inode(j->se, j->ino, 0, 0);
    pthread_mutex_lock(&j->mu);
    j->done = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    inval_job_put(j);
    return NULL;
}

static void drop_pages_before_reply(struct bc_session *s, fuse_ino_t ino)
{
    if (s->se == NULL || atomic_load(&s->loop_done))
        return;
    struct inval_job *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return;
    j->se = s->se;
    j->ino = ino;
    j->refs = 2;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, inval_main, j) != 0) {
        pthread_attr_destroy(&attr);
        j->refs = 1;
        (void)fuse_lowlevel_notify_inval_inode(s->se, ino, -1, 0);   /* attributes only */
        inval_job_put(j);
        return;
    }
    pthread_attr_destroy(&attr);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += INVAL_WAIT_MS / 1000;
    deadline.tv_nsec += (long)(INVAL_WAIT_MS % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&j->mu);
    while (!j->done)
        if (pthread_cond_timedwait(&j->cv, &j->mu, &deadline) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&j->mu);
    inval_job_put(j);
}

int bc_session_truncate_plan(uint64_t size_bytes, uint64_t new_size_bytes, int through_handle)
{
    if (new_size_bytes == size_bytes)
        return BC_TRUNCATE_NOOP;
    if (new_size_bytes == 0 && through_handle)
        return BC_TRUNCATE_WIPE;
    return -EPERM;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct stat st;
    int err = attr_of(s, ino, fi, &st);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, &st, TIMEOUT_S);
}

/* The path of disk ino into buf (PATH_MAX_BYTES + 1), or -ENOENT. */
static int path_of(struct bc_session *s, fuse_ino_t ino, char *buf)
{
    int err = -ENOENT;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_ino(s, ino);
    if (d != NULL && d->present) {
        snprintf(buf, PATH_MAX_BYTES + 1, "%s", d->name);
        err = 0;
    }
    pthread_rwlock_unlock(&s->table_lock);
    return err;
}

/* chmod/chown of ino through the set_attr hook: 0 or an errno. Directories are fixed. */
static int set_owner(struct bc_session *s, fuse_ino_t ino, mode_t cur_mode, int to_set,
                     const struct stat *attr)
{
    if (S_ISDIR(cur_mode) || s->hooks.set_attr == NULL)
        return EPERM;
    char path[PATH_MAX_BYTES + 1];
    if (path_of(s, ino, path) < 0)
        return ENOENT;
    int what = (to_set & FUSE_SET_ATTR_MODE ? BC_SET_MODE : 0) |
               (to_set & FUSE_SET_ATTR_UID ? BC_SET_UID : 0) |
               (to_set & FUSE_SET_ATTR_GID ? BC_SET_GID : 0);
    int rc = s->hooks.set_attr(s->hooks.arg, path, what, (uint32_t)attr->st_mode & 07777,
                               (uint32_t)attr->st_uid, (uint32_t)attr->st_gid);
    return rc < 0 ? -rc : 0;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct stat st;
    int err = attr_of(s, ino, fi, &st);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        err = set_owner(s, ino, st.st_mode, to_set, attr);
        if (err == 0)
            err = attr_of(s, ino, fi, &st);   /* what the control plane pushed back */
        if (err) {
            fuse_reply_err(req, err);
            return;
        }
    }
    int wiped = 0;
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (S_ISDIR(st.st_mode)) {
            fuse_reply_err(req, EISDIR);
            return;
        }
        int plan = bc_session_truncate_plan((uint64_t)st.st_size, (uint64_t)attr->st_size,
                                            fi != NULL);
        if (plan < 0) {   /* resizing is the control plane's job */
            fuse_reply_err(req, -plan);
            return;
        }
        if (plan == BC_TRUNCATE_WIPE) {
            struct bc_handle *h = fh_of(fi);
            if (bc_volume_read_only(h->vol)) {
                fuse_reply_err(req, EROFS);
                return;
            }
            int rc = bc_volume_discard(h->vol, 0, bc_volume_size(h->vol));
            if (rc < 0) {
                note_error(h->inst->disk, -rc);
                fuse_reply_err(req, -rc);
                return;
            }
            wiped = 1;
        }
    }
    /* A wipe answers the disk's own size, so the kernel keeps it (and its cached pages: they
     * hold the old data, so they are dropped first) and a following ftruncate to that size
     * (what qemu-img does after truncating to 0) is the no-op it expects. */
    if (wiped)
        drop_pages_before_reply(s, ino);
    /* atime/mtime/ctime: accepted and ignored (times come from the backing file) */
    fuse_reply_attr(req, &st, TIMEOUT_S);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        fi->fh = ino;
        fuse_reply_open(req, fi);
        return;
    }
    int known;
    pthread_rwlock_rdlock(&s->table_lock);
    known = find_ino(s, ino) != NULL;
    pthread_rwlock_unlock(&s->table_lock);
    fuse_reply_err(req, known ? ENOTDIR : ENOENT);
}

/* Entries: 0 ".", 1 "..", then (root) 2 + i for directory i, or (a directory) 2 + i for
 * disk object i when it is in that directory. The offset of an entry is its index + 1,
 * stable since the disk array only grows. */
static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
    struct bc_session *s = fuse_req_userdata(req);
    if (ino != INO_ROOT && !is_dir_ino(s, ino)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    char *buf = malloc(size ? size : 1);
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t pos = 0;
    struct stat st;
    struct fuse_entry_param e;

    pthread_rwlock_rdlock(&s->table_lock);
    size_t n = 2 + (ino == INO_ROOT ? s->ndirs : s->ndisks);
    for (size_t idx = off < 0 ? 0 : (size_t)off; idx < n; idx++) {
        const char *name;
        if (idx == 0) {
            name = ".";
            dir_attr(s, ino, &st);
        } else if (idx == 1) {
            name = "..";
            dir_attr(s, INO_ROOT, &st);   /* the parent of both is the root */
        } else if (ino == INO_ROOT) {
            name = s->dirs[idx - 2];
            dir_attr(s, INO_DIR0 + (idx - 2), &st);
        } else {
            struct bc_disk *d = s->disks[idx - 2];
            if (!d->present || INO_DIR0 + d->dir != ino)
                continue;
            name = d->leaf;
            if (plus) {
                disk_attr(s, d, NULL, &st);
            } else {
                memset(&st, 0, sizeof(st));
                st.st_ino = d->ino;
                st.st_mode = S_IFREG;
            }
        }
        size_t len;
        if (plus) {
            fill_entry(&e, &st);
            if (idx < 2)
                e.ino = 0;   /* the kernel takes no entry for "." and ".." */
            len = fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, (off_t)(idx + 1));
        } else {
            len = fuse_add_direntry(req, buf + pos, size - pos, name, &st, (off_t)(idx + 1));
        }
        if (len > size - pos)
            break;
        pos += len;
    }
    pthread_rwlock_unlock(&s->table_lock);
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    (void)fi;
    do_readdir(req, ino, size, off, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi)
{
    (void)fi;
    do_readdir(req, ino, size, off, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino;
    (void)datasync;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void link_handle(struct bc_session *s, struct bc_handle *h)
{
    pthread_mutex_lock(&s->life_mu);
    h->prev = NULL;
    h->next = s->handles;
    if (s->handles)
        s->handles->prev = h;
    s->handles = h;
    pthread_mutex_unlock(&s->life_mu);
}

static void unlink_handle(struct bc_session *s, struct bc_handle *h)
{
    pthread_mutex_lock(&s->life_mu);
    if (h->prev)
        h->prev->next = h->next;
    else
        s->handles = h->next;
    if (h->next)
        h->next->prev = h->prev;
    pthread_mutex_unlock(&s->life_mu);
}

static void link_open(struct bc_session *s, struct bc_open *o)
{
    pthread_mutex_lock(&s->life_mu);
    o->prev = NULL;
    o->next = s->opens;
    if (s->opens)
        s->opens->prev = o;
    s->opens = o;
    pthread_mutex_unlock(&s->life_mu);
}

static void unlink_open(struct bc_session *s, struct bc_open *o)
{
    pthread_mutex_lock(&s->life_mu);
    if (o->prev)
        o->prev->next = o->next;
    else
        s->opens = o->next;
    if (o->next)
        o->next->prev = o->prev;
    pthread_mutex_unlock(&s->life_mu);
}

/* d->open_mu held. A new instance from open_disk with one handle, or -errno. */
static int open_instance(struct bc_session *s, struct bc_disk *d, struct bc_open **out)
{
    struct bc_volume *vol = NULL;
    int rc = -EIO;
    if (s->hooks.open_disk != NULL)
        rc = s->hooks.open_disk(s->hooks.arg, d->name, &vol);
    if (rc >= 0 && vol == NULL)
        rc = -EIO;
    if (rc < 0)
        return rc;
    struct bc_open *o = calloc(1, sizeof(*o));
    if (o == NULL) {
        bc_volume_unref(vol);
        return -ENOMEM;
    }
    o->disk = d;
    o->vol = vol;
    o->handles = 1;
    link_open(s, o);
    pthread_rwlock_rdlock(&s->table_lock);
    int present = d->present;   /* removed while the hook ran: the instance stays detached */
    pthread_mutex_lock(&d->mu);
    if (present)
        d->open = o;
    pthread_mutex_unlock(&d->mu);
    pthread_rwlock_unlock(&s->table_lock);
    *out = o;
    return 0;
}

/* Give back one handle count of o; the last one (under open_mu, so no open_disk of this
 * disk runs while it closes) flushes, unrefs the volume and calls the closed hook. */
static void put_instance(struct bc_session *s, struct bc_open *o)
{
    struct bc_disk *d = o->disk;
    pthread_mutex_lock(&d->mu);
    if (o->handles > 1) {
        o->handles--;
        pthread_mutex_unlock(&d->mu);
        return;
    }
    pthread_mutex_unlock(&d->mu);

    pthread_mutex_lock(&d->open_mu);
    pthread_mutex_lock(&d->mu);
    int last = --o->handles == 0;
    if (last && d->open == o)
        d->open = NULL;
    pthread_mutex_unlock(&d->mu);
    if (last) {
        unlink_open(s, o);
        if (!bc_volume_read_only(o->vol)) {
            int rc = bc_volume_flush(o->vol);
            if (rc < 0)
                note_error(d, -rc);
        }
        bc_volume_unref(o->vol);
        if (s->hooks.closed)
            s->hooks.closed(s->hooks.arg, d->name);
        free(o);
    }
    pthread_mutex_unlock(&d->open_mu);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    int writable = (fi->flags & O_ACCMODE) != O_RDONLY;
    struct bc_open *o = NULL;

    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_ino(s, ino);
    int err = 0;
    if (d == NULL || !d->present)
        err = ENOENT;
    else if (writable && d->read_only)
        err = EROFS;
    else if ((fi->flags & O_TRUNC) && d->size_bytes != 0)
        err = EPERM;
    if (!err) {
        pthread_mutex_lock(&d->mu);
        o = d->open;
        if (o != NULL)
            o->handles++;
        pthread_mutex_unlock(&d->mu);
    }
    pthread_rwlock_unlock(&s->table_lock);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    if (o == NULL) {
        pthread_mutex_lock(&d->open_mu);   /* one open_disk per disk at a time */
        pthread_mutex_lock(&d->mu);
        o = d->open;
        if (o != NULL)
            o->handles++;
        pthread_mutex_unlock(&d->mu);
        int rc = 0;
        if (o == NULL)
            rc = open_instance(s, d, &o);
        pthread_mutex_unlock(&d->open_mu);
        if (rc < 0) {
            note_error(d, -rc);
            fuse_reply_err(req, -rc);
            return;
        }
    }
    struct bc_handle *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        put_instance(s, o);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    h->inst = o;
    h->vol = o->vol;
    bc_volume_ref(h->vol);
    link_handle(s, h);
    fi->fh = (uintptr_t)h;
    fi->direct_io = 0;    /* buffered I/O goes through the page cache; O_DIRECT bypasses it */
    fi->keep_cache = 0;   /* the page cache is dropped on open (the volume may change behind it) */
    fuse_reply_open(req, fi);   /* on an interrupted open libfuse calls release itself */
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct bc_handle *h = fh_of(fi);
    (void)ino;
    if (h == NULL) {
        fuse_reply_err(req, 0);
        return;
    }
    struct bc_open *o = h->inst;
    unlink_handle(s, h);
    bc_volume_unref(h->vol);
    free(h);

    put_instance(s, o);
    fuse_reply_err(req, 0);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct bc_handle *h = fh_of(fi);
    (void)ino;
    void *buf = thread_buffer(s);
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (size > s->max_req)
        size = s->max_req;
    ssize_t n = bc_volume_read(h->vol, buf, size, (uint64_t)off);
    if (n < 0) {
        note_error(h->inst->disk, (int)-n);
        fuse_reply_err(req, wire_errno((int)-n));
        return;
    }
    fuse_reply_buf(req, buf, (size_t)n);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct bc_handle *h = fh_of(fi);
    (void)ino;
    /* buf points into libfuse's receive buffer (no splice): no copy here */
    ssize_t n = bc_volume_write(h->vol, buf, size, (uint64_t)off);
    if (n < 0) {
        note_error(h->inst->disk, (int)-n);
        fuse_reply_err(req, wire_errno((int)-n));
        return;
    }
    fuse_reply_write(req, (size_t)n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);   /* writes are synchronous; durability is fsync's job */
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct bc_handle *h = fh_of(fi);
    (void)ino;
    (void)datasync;
    int rc = bc_volume_flush(h->vol);
    if (rc < 0)
        note_error(h->inst->disk, -rc);
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    struct bc_handle *h = fh_of(fi);
    (void)ino;
    if (off < 0 || len <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    uint64_t size = bc_volume_size(h->vol);
    uint64_t uoff = (uint64_t)off, ulen = (uint64_t)len;
    int past_end = uoff + ulen > size || uoff + ulen < uoff;
    int rc = 0;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        if (mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
            fuse_reply_err(req, EOPNOTSUPP);
            return;
        }
        if (past_end && !(mode & FALLOC_FL_KEEP_SIZE)) {
            fuse_reply_err(req, EPERM);   /* would grow the disk */
            return;
        }
        if (uoff >= size) {
            fuse_reply_err(req, 0);
            return;
        }
        if (past_end)
            ulen = size - uoff;
        if (mode & FALLOC_FL_PUNCH_HOLE)
            rc = bc_volume_discard(h->vol, uoff, ulen);
        else
            rc = bc_volume_zero_range(h->vol, uoff, ulen);
        if (rc < 0)
            note_error(h->inst->disk, -rc);
        fuse_reply_err(req, rc < 0 ? -rc : 0);
        return;
    }
    if (mode & ~FALLOC_FL_KEEP_SIZE) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (past_end && !(mode & FALLOC_FL_KEEP_SIZE)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    fuse_reply_err(req, 0);   /* a disk file is fixed-size: allocation inside it is a no-op */
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct bc_session *s = fuse_req_userdata(req);
    struct statvfs sv;
    (void)ino;
    if (statvfs(s->statfs_path, &sv) != 0) {
        fuse_reply_err(req, errno ? errno : EIO);
        return;
    }
    fuse_reply_statfs(req, &sv);
}

/* The tree is the control plane's: nothing is created, removed or renamed through it. */
static void op_mknod(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, dev_t r)
{
    (void)p; (void)n; (void)m; (void)r;
    fuse_reply_err(req, EPERM);
}
static void op_mkdir(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m)
{
    (void)p; (void)n; (void)m;
    fuse_reply_err(req, EPERM);
}
static void op_unlink(fuse_req_t req, fuse_ino_t p, const char *n)
{
    (void)p; (void)n;
    fuse_reply_err(req, EPERM);
}
static void op_symlink(fuse_req_t req, const char *l, fuse_ino_t p, const char *n)
{
    (void)l; (void)p; (void)n;
    fuse_reply_err(req, EPERM);
}
static void op_rename(fuse_req_t req, fuse_ino_t p, const char *n, fuse_ino_t np, const char *nn,
                      unsigned int flags)
{
    (void)p; (void)n; (void)np; (void)nn; (void)flags;
    fuse_reply_err(req, EPERM);
}
static void op_link(fuse_req_t req, fuse_ino_t i, fuse_ino_t np, const char *nn)
{
    (void)i; (void)np; (void)nn;
    fuse_reply_err(req, EPERM);
}
static void op_create(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, struct fuse_file_info *fi)
{
    (void)p; (void)n; (void)m; (void)fi;
    fuse_reply_err(req, EPERM);
}

/* ---- extended attributes -------------------------------------------------------------- */

/* getxattr: from the disk's blob (directories have none). */
static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (!((struct bc_session *)fuse_req_userdata(req))->xattrs) {
        fuse_reply_err(req, ENOSYS);   /* the kernel stops asking, security.capability too */
        return;
    }
    struct bc_session *s = fuse_req_userdata(req);
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    uint8_t small[256];
    uint8_t *copy = NULL;
    size_t len = 0;
    int err = 0;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_ino(s, ino);
    const uint8_t *v = NULL;
    if (d == NULL)
        err = ENOENT;
    else if (bc_xattr_get(d->xattrs, d->xattrs_len, name, &v, &len) < 0)
        err = ENODATA;
    else if (size != 0 && len > size)
        err = ERANGE;
    else if (size != 0) {
        copy = len <= sizeof(small) ? small : malloc(len);
        if (copy == NULL)
            err = ENOMEM;
        else if (len > 0)
            memcpy(copy, v, len);
    }
    pthread_rwlock_unlock(&s->table_lock);
    if (err)
        fuse_reply_err(req, err);
    else if (size == 0)
        fuse_reply_xattr(req, len);
    else
        fuse_reply_buf(req, (const char *)copy, len);
    if (copy != NULL && copy != small)
        free(copy);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    if (!((struct bc_session *)fuse_req_userdata(req))->xattrs) {
        fuse_reply_err(req, ENOSYS);
        return;
    }
    struct bc_session *s = fuse_req_userdata(req);
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        if (size == 0)
            fuse_reply_xattr(req, 0);
        else
            fuse_reply_buf(req, NULL, 0);
        return;
    }
    /* trusted.* is for privileged callers, as on ext4 (the kernel checks get and set) */
    int with_trusted = fuse_req_ctx(req)->uid == 0;
    char *buf = NULL;
    size_t need = 0;
    int err = 0;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_ino(s, ino);
    if (d == NULL) {
        err = ENOENT;
    } else {
        need = bc_xattr_list(d->xattrs, d->xattrs_len, with_trusted, NULL, 0);
        if (size != 0 && need > size)
            err = ERANGE;
        else if (size != 0 && need > 0) {
            if ((buf = malloc(need)) == NULL)
                err = ENOMEM;
            else
                (void)bc_xattr_list(d->xattrs, d->xattrs_len, with_trusted, buf, need);
        }
    }
    pthread_rwlock_unlock(&s->table_lock);
    if (err)
        fuse_reply_err(req, err);
    else if (size == 0)
        fuse_reply_xattr(req, need);
    else
        fuse_reply_buf(req, buf, need);
    free(buf);
}

/* setxattr/removexattr: validated here (namespace), stored by the control plane. */
static void change_xattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                         size_t size, int flags)
{
    struct bc_session *s = fuse_req_userdata(req);
    if (!s->xattrs) {
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (ino == INO_ROOT || is_dir_ino(s, ino)) {
        fuse_reply_err(req, EPERM);   /* the tree is the control plane's */
        return;
    }
    int rc = bc_xattr_name_ok(name);
    if (rc == 0 && s->hooks.set_xattr == NULL)
        rc = -EOPNOTSUPP;
    char path[PATH_MAX_BYTES + 1];
    if (rc == 0)
        rc = path_of(s, ino, path);
    if (rc == 0)
        rc = s->hooks.set_xattr(s->hooks.arg, path, name, value, size, flags);
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    change_xattr(req, ino, name, value != NULL ? value : "", size, flags);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    change_xattr(req, ino, name, NULL, 0, 0);
}

static const struct fuse_lowlevel_ops bc_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_unlink,
    .symlink = op_symlink,
    .rename = op_rename,
    .link = op_link,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .create = op_create,
    .fallocate = op_fallocate,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .setxattr = op_setxattr,
    .removexattr = op_removexattr,
};

/* ---- life cycle ------------------------------------------------------------------- */

static void free_session(struct bc_session *s)
{
    struct bc_handle *h = s->handles;
    while (h != NULL) {
        struct bc_handle *next = h->next;
        bc_volume_unref(h->vol);
        free(h);
        h = next;
    }
    struct bc_open *o = s->opens;
    while (o != NULL) {
        struct bc_open *next = o->next;
        bc_volume_unref(o->vol);
        free(o);
        o = next;
    }
    for (size_t i = 0; i < s->ndisks; i++) {
        struct bc_disk *d = s->disks[i];
        pthread_mutex_destroy(&d->open_mu);
        pthread_mutex_destroy(&d->mu);
        free(d->name);
        free(d->backing_path);
        free(d->xattrs);
        free(d);
    }
    free(s->disks);
    free(s->hash);
    if (s->efd >= 0)
        close(s->efd);
    pthread_key_delete(s->buf_key);
    pthread_rwlock_destroy(&s->table_lock);
    pthread_mutex_destroy(&s->life_mu);
    pthread_mutex_destroy(&s->loop_mu);
    pthread_cond_destroy(&s->loop_cv);
    for (unsigned i = 0; i < s->ndirs; i++)
        free(s->dirs[i]);
    free(s->mountpoint);
    free(s->statfs_path);
    free(s->wake_path);
    free(s);
}

int bc_session_new(const struct bc_session_opts *opts, const struct bc_session_hooks *hooks,
                   struct bc_session **out)
{
    *out = NULL;
    if (opts == NULL || opts->mountpoint == NULL || opts->mountpoint[0] == '\0') {
        fprintf(stderr, "blockcrypt: session: no mount point\n");
        return -EINVAL;
    }
    struct stat mst;
    if (stat(opts->mountpoint, &mst) != 0) {
        int e = errno;
        fprintf(stderr, "blockcrypt: cannot mount %s: %s\n", opts->mountpoint, strerror(e));
        return -e;
    }
    if (!S_ISDIR(mst.st_mode)) {
        fprintf(stderr, "blockcrypt: cannot mount %s: not a directory\n", opts->mountpoint);
        return -ENOTDIR;
    }
    unsigned ndirs = opts->dirs != NULL ? opts->ndirs : 1;
    if (ndirs == 0 || ndirs > BC_SESSION_MAX_DIRS) {
        fprintf(stderr, "blockcrypt: session: %u top-level directories (1 to %d)\n", ndirs,
                BC_SESSION_MAX_DIRS);
        return -EINVAL;
    }
    for (unsigned i = 0; opts->dirs != NULL && i < ndirs; i++) {
        if (opts->dirs[i] == NULL || !valid_name(opts->dirs[i]) ||
            strcmp(opts->dirs[i], WAKE_NAME) == 0) {
            fprintf(stderr, "blockcrypt: session: invalid directory name\n");
            return -EINVAL;
        }
        for (unsigned j = 0; j < i; j++)
            if (strcmp(opts->dirs[i], opts->dirs[j]) == 0) {
                fprintf(stderr, "blockcrypt: session: directory %s given twice\n", opts->dirs[i]);
                return -EINVAL;
            }
    }
    struct bc_session *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->efd = -1;
    pthread_rwlock_init(&s->table_lock, NULL);
    pthread_mutex_init(&s->life_mu, NULL);
    pthread_mutex_init(&s->loop_mu, NULL);
    pthread_cond_init(&s->loop_cv, NULL);
    if (pthread_key_create(&s->buf_key, free) != 0) {
        pthread_rwlock_destroy(&s->table_lock);
        pthread_mutex_destroy(&s->life_mu);
        pthread_mutex_destroy(&s->loop_mu);
        pthread_cond_destroy(&s->loop_cv);
        free(s);
        return -EAGAIN;
    }
    if (hooks != NULL)
        s->hooks = *hooks;
    s->uid = getuid();
    s->gid = getgid();
    clock_gettime(CLOCK_REALTIME, &s->t_start);
    s->max_threads = opts->max_threads > 0 ? opts->max_threads : DEFAULT_MAX_THREADS;
    s->xattrs = opts->xattrs != 0;
    uint32_t req = opts->max_request_bytes ? opts->max_request_bytes : BC_MAX_REQUEST;
    if (req > BC_MAX_REQUEST)
        req = BC_MAX_REQUEST;
    if (req < 65536)
        req = 65536;
    s->max_req = req & ~4095u;
    s->mountpoint = realpath(opts->mountpoint, NULL);   /* the waker may run after a chdir */
    s->statfs_path = strdup(opts->statfs_path ? opts->statfs_path : "/");
    s->efd = eventfd(0, EFD_CLOEXEC);
    int dirs_ok = 1;
    for (unsigned i = 0; i < ndirs; i++) {
        s->dirs[i] = strdup(opts->dirs != NULL ? opts->dirs[i] : "disks");
        dirs_ok = dirs_ok && s->dirs[i] != NULL;
        s->ndirs = i + 1;
    }
    if (!dirs_ok || s->mountpoint == NULL || s->statfs_path == NULL || s->efd < 0 ||
        asprintf(&s->wake_path, "%s/%s", s->mountpoint, WAKE_NAME) < 0) {
        s->wake_path = NULL;
        free_session(s);
        return -ENOMEM;
    }

    char optstr[256];
    snprintf(optstr, sizeof(optstr),
             "fsname=blockcrypt,subtype=blockcrypt,default_permissions,max_read=%u%s",
             s->max_req, opts->allow_other ? ",allow_other" : "");
    char *argv[] = {"blockcrypt", "-o", optstr, opts->debug ? "-d" : NULL, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(opts->debug ? 4 : 3, argv);
    s->se = fuse_session_new(&args, &bc_ops, sizeof(bc_ops), s);
    fuse_opt_free_args(&args);
    if (s->se == NULL) {
        fprintf(stderr, "blockcrypt: cannot mount %s: libfuse refused the session options\n",
                opts->mountpoint);
        free_session(s);
        return -EINVAL;
    }
    errno = 0;
    if (fuse_session_mount(s->se, s->mountpoint) != 0) {
        int e = errno && errno != ENOENT ? errno : EIO;
        fprintf(stderr, "blockcrypt: cannot mount %s: %s\n", opts->mountpoint, strerror(e));
        fuse_session_destroy(s->se);
        s->se = NULL;
        free_session(s);
        return -e;
    }
    *out = s;
    return 0;
}

static void *waker_main(void *arg)
{
    struct bc_session *s = arg;
    for (;;) {
        uint64_t v;
        ssize_t n = read(s->efd, &v, sizeof(v));
        if (n < 0 && errno == EINTR)
            continue;
        if (atomic_load(&s->loop_done) || n < 0)
            return NULL;
        /* a LOOKUP wakes one worker, which answers and sees the exit flag */
        while (!atomic_load(&s->loop_done)) {
            struct stat st;
            (void)lstat(s->wake_path, &st);
            struct pollfd pfd = {.fd = s->efd, .events = POLLIN};
            (void)poll(&pfd, 1, 100);
        }
    }
}

int bc_session_loop(struct bc_session *s)
{
    pthread_mutex_lock(&s->loop_mu);
    if (s->looping || atomic_load(&s->loop_done)) {
        pthread_mutex_unlock(&s->loop_mu);
        return -EALREADY;
    }
    s->looping = 1;
    pthread_mutex_unlock(&s->loop_mu);

    int rc = 0;
    pthread_t waker;
    int have_waker = pthread_create(&waker, NULL, waker_main, s) == 0;
    if (!atomic_load(&s->exit_requested)) {
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        if (cfg == NULL) {
            rc = -ENOMEM;
        } else {
            fuse_loop_cfg_set_clone_fd(cfg, 1);
            fuse_loop_cfg_set_max_threads(cfg, (unsigned)s->max_threads);
            /* never end idle workers (libfuse's advice): each keeps its buffers, and the
             * pool is bounded by max_threads (2 cores: requests wait on CPU, not threads) */
            fuse_loop_cfg_set_idle_threads(cfg, (unsigned)s->max_threads);
            rc = fuse_session_loop_mt(s->se, cfg);
            fuse_loop_cfg_destroy(cfg);
            if (rc > 0)
                rc = 0;   /* a signal value: we install no handlers */
        }
    }
    atomic_store(&s->loop_done, 1);
    /* closing the device aborts the connection (a pending wake lookup returns), then the
     * mount point is detached */
    fuse_session_unmount(s->se);
    uint64_t one = 1;
    (void)!write(s->efd, &one, sizeof(one));
    if (have_waker)
        pthread_join(waker, NULL);

    pthread_mutex_lock(&s->loop_mu);
    s->looping = 0;
    pthread_cond_broadcast(&s->loop_cv);
    pthread_mutex_unlock(&s->loop_mu);
    return rc;
}

void bc_session_exit(struct bc_session *s)
{
    if (s == NULL)
        return;
    atomic_store(&s->exit_requested, 1);
    if (s->se != NULL)
        fuse_session_exit(s->se);
    uint64_t one = 1;
    (void)!write(s->efd, &one, sizeof(one));
}

void bc_session_destroy(struct bc_session *s)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->loop_mu);
    if (s->looping) {
        pthread_mutex_unlock(&s->loop_mu);
        bc_session_exit(s);
        pthread_mutex_lock(&s->loop_mu);
        while (s->looping)
            pthread_cond_wait(&s->loop_cv, &s->loop_mu);
    }
    pthread_mutex_unlock(&s->loop_mu);
    if (s->se != NULL) {
        fuse_session_unmount(s->se);
        fuse_session_destroy(s->se);
        s->se = NULL;
    }
    free_session(s);
}

/* ---- the table, from the control plane ---------------------------------------------- */

int bc_session_set_disk(struct bc_session *s, const struct bc_disk_entry *e)
{
    char key[PATH_MAX_BYTES + 1];
    unsigned dir;
    if (e == NULL || e->name == NULL || canon_path(s, e->name, key, &dir) < 0)
        return -EINVAL;
    if (bc_xattr_valid(e->xattrs, e->xattrs_len) < 0)
        return -EINVAL;
    uint8_t *xa = NULL;
    if (e->xattrs_len > 0) {
        if ((xa = malloc(e->xattrs_len)) == NULL)
            return -ENOMEM;
        memcpy(xa, e->xattrs, e->xattrs_len);
    }
    char *path = NULL;
    if (e->backing_path != NULL && (path = strdup(e->backing_path)) == NULL) {
        free(xa);
        return -ENOMEM;
    }
    int rc = 0, notify = 0;
    fuse_ino_t ino = 0;
    pthread_rwlock_wrlock(&s->table_lock);
    struct bc_disk *d = find_name(s, key);
    if (d == NULL && (d = add_disk(s, key, dir)) == NULL) {
        pthread_rwlock_unlock(&s->table_lock);
        free(path);
        free(xa);
        return -ENOMEM;
    }
    uint64_t size = e->size_bytes;
    if (d->present && (d->size_bytes != size || d->mode != (e->mode & 07777) ||
                       d->uid != e->uid || d->gid != e->gid))
        notify = 1;   /* the kernel caches attributes (and checks permissions on them) */
    struct bc_volume *v = current_volume(d);
    if (v != NULL) {
        if (bc_volume_size(v) != size) {
            rc = bc_volume_resize(v, size);
            notify = 1;
        }
        bc_volume_unref(v);
    }
    if (rc == 0)
        d->size_bytes = size;
    d->mode = e->mode & 07777;
    d->uid = e->uid;
    d->gid = e->gid;
    d->read_only = e->read_only != 0;
    free(d->backing_path);
    d->backing_path = path;
    free(d->xattrs);
    d->xattrs = xa;
    d->xattrs_len = e->xattrs_len;
    d->present = 1;
    ino = d->ino;
    pthread_rwlock_unlock(&s->table_lock);
    /* the kernel drops the cached attributes (only: no page lock is taken); before init
     * or after the loop this fails harmlessly */
    if (notify && s->se != NULL && !atomic_load(&s->loop_done))
        (void)fuse_lowlevel_notify_inval_inode(s->se, ino, -1, 0);
    return rc;
}

int bc_session_remove_disk(struct bc_session *s, const char *name)
{
    char key[PATH_MAX_BYTES + 1];
    unsigned dir;
    if (name == NULL || canon_path(s, name, key, &dir) < 0)
        return -EINVAL;
    int rc = 0;
    pthread_rwlock_wrlock(&s->table_lock);
    struct bc_disk *d = find_name(s, key);
    if (d == NULL || !d->present) {
        rc = -ENOENT;
    } else {
        d->present = 0;
        pthread_mutex_lock(&d->mu);
        d->open = NULL;   /* its handles keep the instance; a new open asks open_disk */
        pthread_mutex_unlock(&d->mu);
    }
    pthread_rwlock_unlock(&s->table_lock);
    /* no notify_inval_entry: it takes the directory's lock in the kernel, and this may be
     * called from a lookup hook that holds it; the 1 s entry timeout does the job */
    return rc;
}

int bc_session_disk_state(struct bc_session *s, const char *name, struct bc_disk_state *out)
{
    memset(out, 0, sizeof(*out));
    char key[PATH_MAX_BYTES + 1];
    unsigned dir;
    if (name == NULL || canon_path(s, name, key, &dir) < 0)
        return -EINVAL;
    int rc = 0;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_name(s, key);
    if (d == NULL || !d->present) {
        rc = -ENOENT;
    } else {
        out->errors = atomic_load(&d->errors);
        out->last_errno = atomic_load(&d->last_errno);
        pthread_mutex_lock(&d->mu);
        if (d->open != NULL) {
            out->handles = d->open->handles;
            out->volume = d->open->vol;
            bc_volume_ref(out->volume);
        }
        pthread_mutex_unlock(&d->mu);
    }
    pthread_rwlock_unlock(&s->table_lock);
    return rc;
}

int bc_session_drop_cache(struct bc_session *s, const char *name)
{
    char key[PATH_MAX_BYTES + 1];
    unsigned dir;
    if (name == NULL || canon_path(s, name, key, &dir) < 0)
        return -EINVAL;
    pthread_rwlock_rdlock(&s->table_lock);
    struct bc_disk *d = find_name(s, key);
    fuse_ino_t ino = (d != NULL && d->present) ? d->ino : 0;
    pthread_rwlock_unlock(&s->table_lock);
    if (ino == 0)
        return -ENOENT;
    if (s->se == NULL || atomic_load(&s->loop_done))
        return 0;
    /* offset 0, length 0: the whole file's cached pages (mmaps too) and its attributes. The
     * kernel locks the pages it drops, so this is never called from inside a request. */
    int rc = fuse_lowlevel_notify_inval_inode(s->se, ino, 0, 0);
    return rc == -ENOENT ? 0 : rc;   /* the kernel never looked the inode up: nothing cached */
}
