/*
 * bc_storage_local.c — the local sparse file behind the storage seam (bc_engine.h).
 *
 * pread/pwrite loops (EINTR, short counts), bytes past the end of the file read as
 * zeros, punch = fallocate(PUNCH_HOLE|KEEP_SIZE), flush = fdatasync (fsync where the
 * file system has no fdatasync), blocks_used = st_blocks.
 *
 * BC_CACHE_NONE opens a second descriptor with O_DIRECT and uses it for every call
 * whose offset, length and buffer meet the file's direct-I/O alignment (statx
 * STATX_DIOALIGN, else 4096); anything else (metadata ranges, an unaligned caller
 * buffer) goes through the buffered descriptor, and the kernel keeps the two
 * coherent. A direct call the kernel refuses with EINVAL is retried buffered.
 *
 * A writable open takes an exclusive open-file-description lock (F_OFD_SETLK, F_WRLCK)
 * on the whole file and keeps it until close: a second writer (another mount, another
 * state directory holding the same file, another host on a shared file system) gets
 * -EBUSY instead of interleaving its writes. Readers take no lock. OFD locks are
 * independent of the flock() that header updates take, so a header rewrite (key
 * rotation) still runs while a mount has the disk open.
 *
 * The open is non-blocking (a FIFO or device in place of the disk file gets -EINVAL
 * at once instead of hanging); anything but a regular file is refused.
 *
 * bc_storage_faulty_wrap wraps any backend and injects errors (EIO, ENOSPC, short writes)
 * at random points of a seeded run: the fault-injection tests of the engine use it.
 *
 * Caveats: a file system without O_DIRECT (tmpfs before Linux 6.6) makes the
 * BC_CACHE_NONE open fail with its errno; the caller chooses what to do.
 */
#define _GNU_SOURCE
#include "bc_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct local {
    int fd;          /* buffered */
    int dfd;         /* O_DIRECT, or -1 */
    int writable;
    uint32_t mem_align, off_align;  /* direct I/O alignment */
};

static int direct_ok(const struct local *l, const void *buf, size_t len, uint64_t off)
{
    return l->dfd >= 0 && ((uintptr_t)buf % l->mem_align) == 0 && (off % l->off_align) == 0 &&
           (len % l->off_align) == 0;
}

static int do_read(int fd, uint8_t *p, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) {            /* end of file: the rest is a hole */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int do_write(int fd, const uint8_t *p, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int local_read_at(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct local *l = ctx;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off) {
        memset(buf, 0, len);     /* beyond any file: a hole */
        return 0;
    }
    if (direct_ok(l, buf, len, off)) {
        int rc = do_read(l->dfd, buf, len, off);
        if (rc != -EINVAL)
            return rc;
    }
    return do_read(l->fd, buf, len, off);
}

static int local_write_at(void *ctx, const void *buf, size_t len, uint64_t off)
{
    struct local *l = ctx;
    if (!l->writable)
        return -EBADF;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
        return -EFBIG;
    if (direct_ok(l, buf, len, off)) {
        int rc = do_write(l->dfd, buf, len, off);
        if (rc != -EINVAL)
            return rc;
    }
    return do_write(l->fd, buf, len, off);
}

static int local_punch(void *ctx, uint64_t off, uint64_t len)
{
    struct local *l = ctx;
    if (!l->writable)
        return -EBADF;
    if (len == 0)
        return 0;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
        return -EFBIG;
    for (;;) {
        if (fallocate(l->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
            return 0;
        if (errno != EINTR)
            return errno == ENOSYS ? -EOPNOTSUPP : -errno;
    }
}

static int local_flush(void *ctx)
{
    struct local *l = ctx;
    if (fdatasync(l->fd) == 0)
        return 0;
    if (errno == EINVAL || errno == EROFS)   /* no fdatasync here: try the full one */
        return fsync(l->fd) == 0 ? 0 : -errno;
    return -errno;
}

static int local_get_size(void *ctx, uint64_t *size_bytes)
{
    struct local *l = ctx;
    struct stat st;
    if (fstat(l->fd, &st) != 0)
        return -errno;
    *size_bytes = (uint64_t)st.st_size;
    return 0;
}

static int local_set_size(void *ctx, uint64_t size_bytes)
{
    struct local *l = ctx;
    if (!l->writable)
        return -EBADF;
    if (size_bytes > (uint64_t)INT64_MAX)
        return -EFBIG;
    while (ftruncate(l->fd, (off_t)size_bytes) != 0)
        if (errno != EINTR)
            return -errno;
    return 0;
}

static int local_blocks_used(void *ctx, uint64_t *blocks_512)
{
    struct local *l = ctx;
    struct stat st;
    if (fstat(l->fd, &st) != 0)
        return -errno;
    *blocks_512 = (uint64_t)st.st_blocks;
    return 0;
}

static void local_close(void *ctx)
{
    struct local *l = ctx;
    if (l == NULL)
        return;
    if (l->dfd >= 0)
        close(l->dfd);
    if (l->fd >= 0)
        close(l->fd);
    free(l);
}

/* Buffered: the kernel's readahead into the page cache (the metadata is always read
 * through the page cache, even with BC_CACHE_NONE: its requests are not page-aligned). */
static void local_prefetch(void *ctx, uint64_t off, uint64_t len)
{
    struct local *l = ctx;
    if (off <= (uint64_t)INT64_MAX && len <= (uint64_t)INT64_MAX - off)
        (void)posix_fadvise(l->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
}

static const struct bc_storage_ops local_ops = {
    .name = "local",
    .read_at = local_read_at,
    .write_at = local_write_at,
    .punch = local_punch,
    .flush = local_flush,
    .get_size = local_get_size,
    .set_size = local_set_size,
    .blocks_used = local_blocks_used,
    .close = local_close,
    .prefetch = local_prefetch,
};

static void dio_alignment(struct local *l)
{
    l->mem_align = 4096;
    l->off_align = 4096;
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (statx(l->dfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
        stx.stx_dio_mem_align > 0 && stx.stx_dio_offset_align > 0 && stx.stx_dio_mem_align <= 4096 &&
        stx.stx_dio_offset_align <= 4096) {
        l->mem_align = stx.stx_dio_mem_align;
        l->off_align = stx.stx_dio_offset_align;
    }
#endif
}

int bc_storage_local_open(const char *path, int writable, int cache, const struct bc_storage_ops **ops,
                          void **ctx)
{
    if (path == NULL || ops == NULL || ctx == NULL || (cache != BC_CACHE_BUFFERED && cache != BC_CACHE_NONE))
        return -EINVAL;
    struct local *l = calloc(1, sizeof *l);
    if (l == NULL)
        return -ENOMEM;
    l->fd = l->dfd = -1;
    l->writable = writable ? 1 : 0;
    int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    l->fd = open(path, flags | O_NONBLOCK | O_NOCTTY);
    if (l->fd < 0) {
        int e = errno;
        free(l);
        return -e;
    }
    struct stat st;
    int e = 0;
    if (fstat(l->fd, &st) != 0)
        e = errno;
    else if (!S_ISREG(st.st_mode))
        e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    else if (fcntl(l->fd, F_SETFL, fcntl(l->fd, F_GETFL) & ~O_NONBLOCK) != 0)
        e = errno;
    else if (writable) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        if (fcntl(l->fd, F_OFD_SETLK, &fl) != 0 && (errno == EAGAIN || errno == EACCES))
            e = EBUSY;  /* another writer holds it; file systems without locks are not refused */
    }
    if (e != 0) {
        local_close(l);
        return -e;
    }
    if (cache == BC_CACHE_NONE) {
        l->dfd = open(path, flags | O_DIRECT);
        if (l->dfd < 0) {
            e = errno;
            local_close(l);
            return -e;
        }
        dio_alignment(l);
    }
    *ops = &local_ops;
    *ctx = l;
    return 0;
}

/* ---- the fault-injecting wrapper (bc_engine.h) ------------------------------------------ */

struct faulty {
    const struct bc_storage_ops *in;
    void *ictx;
    struct bc_fault_plan plan;
    struct bc_fault_counts *counts;
    pthread_mutex_t mu;
    uint64_t rng;
};

static uint64_t faulty_next(struct faulty *f)
{
    pthread_mutex_lock(&f->mu);
    uint64_t z = (f->rng += 0x9E3779B97F4A7C15ull);
    pthread_mutex_unlock(&f->mu);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 0, or the -errno to inject now */
static int faulty_pick(struct faulty *f, uint32_t one_in)
{
    if (one_in == 0 || faulty_next(f) % one_in != 0)
        return 0;
    int n = 0;
    while (n < 4 && f->plan.errs[n] > 0)
        n++;
    return n == 0 ? -EIO : -f->plan.errs[faulty_next(f) % (uint64_t)n];
}

static int faulty_read(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct faulty *f = ctx;
    int rc = faulty_pick(f, f->plan.read_one_in);
    if (rc != 0) {
        if (f->counts)
            atomic_fetch_add(&f->counts->reads, 1);
        memset(buf, 0xA5, len);   /* a failed read leaves garbage: the caller must not use it */
        return rc;
    }
    return f->in->read_at(f->ictx, buf, len, off);
}

static int faulty_write(void *ctx, const void *buf, size_t len, uint64_t off)
{
    struct faulty *f = ctx;
    int rc = faulty_pick(f, f->plan.write_one_in);
    if (rc == 0)
        return f->in->write_at(f->ictx, buf, len, off);
    if (f->counts)
        atomic_fetch_add(&f->counts->writes, 1);
    if (f->plan.short_writes && len > 1) {
        size_t part = (size_t)(faulty_next(f) % len);
        if (part > 0 && f->in->write_at(f->ictx, buf, part, off) == 0 && f->counts)
            atomic_fetch_add(&f->counts->short_writes, 1);
    }
    return rc;
}

static int faulty_flush(void *ctx)
{
    struct faulty *f = ctx;
    int rc = faulty_pick(f, f->plan.flush_one_in);
    if (rc != 0) {
        if (f->counts)
            atomic_fetch_add(&f->counts->flushes, 1);
        return rc;
    }
    return f->in->flush(f->ictx);
}

static int faulty_punch(void *c, uint64_t off, uint64_t len) { struct faulty *f = c; return f->in->punch(f->ictx, off, len); }
static int faulty_get_size(void *c, uint64_t *v) { struct faulty *f = c; return f->in->get_size(f->ictx, v); }
static int faulty_set_size(void *c, uint64_t v) { struct faulty *f = c; return f->in->set_size(f->ictx, v); }
static int faulty_blocks(void *c, uint64_t *v) { struct faulty *f = c; return f->in->blocks_used(f->ictx, v); }
static void faulty_close(void *c)
{
    struct faulty *f = c;
    f->in->close(f->ictx);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

static void faulty_prefetch(void *c, uint64_t off, uint64_t len)
{
    struct faulty *f = c;
    if (f->in->prefetch != NULL)
        f->in->prefetch(f->ictx, off, len);
}

static const struct bc_storage_ops faulty_ops = {
    .name = "faulty",
    .read_at = faulty_read,
    .write_at = faulty_write,
    .punch = faulty_punch,
    .flush = faulty_flush,
    .get_size = faulty_get_size,
    .set_size = faulty_set_size,
    .blocks_used = faulty_blocks,
    .close = faulty_close,
    .prefetch = faulty_prefetch,
};

int bc_storage_faulty_wrap(const struct bc_storage_ops *inner, void *inner_ctx, const struct bc_fault_plan *plan,
                           struct bc_fault_counts *counts, const struct bc_storage_ops **ops, void **ctx)
{
    if (inner == NULL || plan == NULL || ops == NULL || ctx == NULL)
        return -EINVAL;
    struct faulty *f = calloc(1, sizeof *f);
    if (f == NULL)
        return -ENOMEM;
    f->in = inner;
    f->ictx = inner_ctx;
    f->plan = *plan;
    f->counts = counts;
    f->rng = plan->seed;
    pthread_mutex_init(&f->mu, NULL);
    *ops = &faulty_ops;
    *ctx = f;
    return 0;
}
