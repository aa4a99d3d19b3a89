/*
 * passthrough_ll.c — the transport floor of the benchmarks: a bare libfuse 3
 * low-level server that exposes one existing file as MOUNTPOINT/disks/NAME.
 *
 *   passthrough_ll [--direct] [--threads N] BACKING_FILE NAME MOUNTPOINT
 *
 * It has the transport settings of blockcrypt's native session (see
 * native/session/bc_session.h): multi-threaded session loop, requests up to
 * 1 MiB (max_write, -o max_read, hence FUSE_MAX_PAGES = 256 pages),
 * FUSE_CAP_ASYNC_DIO, a 1 MiB read buffer per worker thread, writes served
 * from libfuse's receive buffer, pread/pwrite on the backing fd, fsync,
 * fallocate (punch hole, zero range), no xattrs. There is nothing else in the
 * request path: no locks, no crypto, no engine. The gap between it and
 * blockcrypt's null cipher is the engine; the gap between it and a raw file is
 * FUSE itself.
 *
 * --direct opens the backing file with O_DIRECT (the floor of
 * `blockcrypt mount --backing-cache none`). Requests that are not 512-byte
 * aligned in offset, length or memory go through a bounce buffer or, if the
 * offset or length is unaligned, through a second, buffered descriptor (the
 * kernel keeps the two coherent for this use: direct I/O writes back and
 * invalidates the cached range first).
 *
 * On exit it prints one line on stderr: the largest read and write request it
 * served, so a run can show that 1 MiB requests really arrived.
 *
 * Caveats: a benchmark tool, not a product: the size is the backing file's at
 * start and never changes; permissions are root's (default_permissions).
 */
#define FUSE_USE_VERSION 314
#define _GNU_SOURCE

#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define MAX_REQUEST (1u << 20)
#define DIO_ALIGN 512u
#define INO_ROOT 1
#define INO_DISKS 2
#define INO_FILE 3

static struct {
    int fd;              /* the descriptor requests use (O_DIRECT with --direct) */
    int fd_buffered;     /* == fd without --direct */
    int direct;
    off_t size;
    const char *name;
    uid_t uid;
    gid_t gid;
    _Atomic size_t max_read_seen, max_write_seen;
} g;

static pthread_key_t buf_key;

/* The calling worker's 1 MiB buffer (page aligned), made on its first request. */
static char *thread_buf(void)
{
    char *b = pthread_getspecific(buf_key);
    if (b == NULL) {
        if (posix_memalign((void **)&b, 4096, MAX_REQUEST) != 0)
            return NULL;
        pthread_setspecific(buf_key, b);
    }
    return b;
}

static void note_max(_Atomic size_t *slot, size_t n)
{
    size_t cur = atomic_load_explicit(slot, memory_order_relaxed);
    while (n > cur && !atomic_compare_exchange_weak_explicit(slot, &cur, n, memory_order_relaxed,
                                                             memory_order_relaxed))
        ;
}

static int aligned(uintptr_t v)
{
    return (v & (DIO_ALIGN - 1)) == 0;
}

static void fill_stat(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_uid = g.uid;
    st->st_gid = g.gid;
    if (ino == INO_FILE) {
        struct stat b;
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        st->st_size = g.size;
        st->st_blksize = 4096;
        if (fstat(g.fd_buffered, &b) == 0) {
            st->st_blocks = b.st_blocks;
            st->st_atim = b.st_atim;
            st->st_mtim = b.st_mtim;
            st->st_ctim = b.st_ctim;
        }
    } else {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    }
}

static void reply_entry(fuse_req_t req, fuse_ino_t ino)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = ino;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    fill_stat(ino, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->max_write = MAX_REQUEST;   /* libfuse derives max_pages from it */
    conn->max_read = MAX_REQUEST;    /* must match -o max_read */
    if (conn->capable & FUSE_CAP_ASYNC_DIO)
        conn->want |= FUSE_CAP_ASYNC_DIO;
    /* no splice: blockcrypt's session copies through its own buffers too */
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
    fprintf(stderr, "passthrough_ll: proto %u.%u, max_write %u, max_read %u, async_dio %s\n",
            conn->proto_major, conn->proto_minor, conn->max_write, conn->max_read,
            (conn->want & FUSE_CAP_ASYNC_DIO) ? "on" : "off");
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (parent == INO_ROOT && strcmp(name, "disks") == 0)
        reply_entry(req, INO_DISKS);
    else if (parent == INO_DISKS && strcmp(name, g.name) == 0)
        reply_entry(req, INO_FILE);
    else
        fuse_reply_err(req, ENOENT);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (ino < INO_ROOT || ino > INO_FILE) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_stat(ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if ((to_set & FUSE_SET_ATTR_SIZE) && (ino != INO_FILE || attr->st_size != g.size)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    fill_stat(ino, &st);   /* times: accepted, not stored */
    fuse_reply_attr(req, &st, 1.0);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != INO_FILE) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    char *buf = thread_buf();
    size_t done = 0;
    int fd = g.fd;
    (void)ino;
    (void)fi;
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (size > MAX_REQUEST)
        size = MAX_REQUEST;
    if (off >= g.size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if ((off_t)size > g.size - off)
        size = (size_t)(g.size - off);
    note_max(&g.max_read_seen, size);
    if (g.direct && !(aligned((uintptr_t)off) && aligned(size)))
        fd = g.fd_buffered;
    while (done < size) {
        ssize_t n = pread(fd, buf + done, size - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fuse_reply_err(req, errno);
            return;
        }
        if (n == 0) {   /* a hole past the end of a shorter backing file reads as zeros */
            memset(buf + done, 0, size - done);
            break;
        }
        done += (size_t)n;
    }
    fuse_reply_buf(req, buf, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    const char *src = data;
    size_t done = 0;
    int fd = g.fd;
    (void)ino;
    (void)fi;
    if (off >= g.size) {
        fuse_reply_err(req, EFBIG);
        return;
    }
    if ((off_t)size > g.size - off)
        size = (size_t)(g.size - off);
    note_max(&g.max_write_seen, size);
    if (g.direct) {
        if (!(aligned((uintptr_t)off) && aligned(size))) {
            fd = g.fd_buffered;
        } else if (!aligned((uintptr_t)data)) {
            char *buf = thread_buf();
            if (buf == NULL) {
                fuse_reply_err(req, ENOMEM);
                return;
            }
            memcpy(buf, data, size);
            src = buf;
        }
    }
    while (done < size) {
        ssize_t n = pwrite(fd, src + done, size - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fuse_reply_err(req, errno);
            return;
        }
        done += (size_t)n;
    }
    fuse_reply_write(req, size);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    int rc = datasync ? fdatasync(g.fd_buffered) : fsync(g.fd_buffered);
    fuse_reply_err(req, rc == 0 ? 0 : errno);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    (void)fi;
    if (ino != INO_FILE) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (off < 0 || len <= 0 || off > g.size || len > g.size - off) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (mode == 0) {   /* preallocation inside the disk: nothing to do */
        fuse_reply_err(req, 0);
        return;
    }
    if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) && mode != FALLOC_FL_ZERO_RANGE &&
        mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    int rc = fallocate(g.fd_buffered, mode | FALLOC_FL_KEEP_SIZE, off, len);
    fuse_reply_err(req, rc == 0 ? 0 : errno);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    char buf[1024];
    size_t used = 0;
    struct stat st;
    const char *names[3] = {".", "..", NULL};
    fuse_ino_t inos[3] = {ino, INO_ROOT, 0};
    int n = 2;
    (void)fi;
    if (ino == INO_ROOT) {
        names[2] = "disks";
        inos[2] = INO_DISKS;
        n = 3;
    } else if (ino == INO_DISKS) {
        names[2] = g.name;
        inos[2] = INO_FILE;
        n = 3;
    } else {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (size > sizeof buf)
        size = sizeof buf;
    for (int i = (int)off; i < n; i++) {
        memset(&st, 0, sizeof st);
        st.st_ino = inos[i];
        st.st_mode = (inos[i] == INO_FILE ? S_IFREG : S_IFDIR);
        size_t need = fuse_add_direntry(req, buf + used, size - used, names[i], &st, i + 1);
        if (need > size - used)
            break;
        used += need;
    }
    fuse_reply_buf(req, buf, used);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs sv;
    (void)ino;
    if (fstatvfs(g.fd_buffered, &sv) != 0) {
        fuse_reply_err(req, errno);
        return;
    }
    fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .fallocate = op_fallocate,
    .readdir = op_readdir,
    .statfs = op_statfs,
};

static int usage(void)
{
    fprintf(stderr, "usage: passthrough_ll [--direct] [--threads N] BACKING_FILE NAME MOUNTPOINT\n");
    return 2;
}

int main(int argc, char **argv)
{
    int threads = 0, i = 1, rc = 1;
    while (i < argc && strncmp(argv[i], "--", 2) == 0) {
        if (strcmp(argv[i], "--direct") == 0) {
            g.direct = 1;
            i++;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[i + 1]);
            i += 2;
        } else {
            return usage();
        }
    }
    if (argc - i != 3 || strchr(argv[i + 1], '/') != NULL || argv[i + 1][0] == '\0')
        return usage();
    const char *backing = argv[i], *mountpoint = argv[i + 2];
    g.name = argv[i + 1];

    g.fd_buffered = open(backing, O_RDWR | O_CLOEXEC);
    if (g.fd_buffered < 0) {
        fprintf(stderr, "passthrough_ll: %s: %s\n", backing, strerror(errno));
        return 1;
    }
    g.fd = g.fd_buffered;
    if (g.direct) {
        g.fd = open(backing, O_RDWR | O_CLOEXEC | O_DIRECT);
        if (g.fd < 0) {
            fprintf(stderr, "passthrough_ll: %s with O_DIRECT: %s\n", backing, strerror(errno));
            return 1;
        }
    }
    struct stat st;
    if (fstat(g.fd_buffered, &st) != 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "passthrough_ll: %s: not a regular file\n", backing);
        return 1;
    }
    g.size = st.st_size;
    g.uid = getuid();
    g.gid = getgid();
    if (pthread_key_create(&buf_key, free) != 0)
        return 1;

    char *fargv[] = {argv[0], "-o",
                     "fsname=bc-floor,subtype=bcfloor,default_permissions,max_read=1048576", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (se == NULL)
        return 1;
    if (fuse_set_signal_handlers(se) != 0)
        goto out_destroy;
    if (fuse_session_mount(se, mountpoint) != 0)
        goto out_signals;

    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg == NULL)
        goto out_unmount;
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    if (threads > 0)
        fuse_loop_cfg_set_max_threads(cfg, (unsigned)threads);
    rc = fuse_session_loop_mt(se, cfg) != 0;
    fuse_loop_cfg_destroy(cfg);
    fprintf(stderr, "passthrough_ll: largest read %zu, largest write %zu bytes\n",
            atomic_load(&g.max_read_seen), atomic_load(&g.max_write_seen));
out_unmount:
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_destroy:
    fuse_session_destroy(se);
    fuse_opt_free_args(&args);
    return rc;
}
