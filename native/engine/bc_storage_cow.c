/*
 * bc_storage_cow.c — copy-on-write overlay chains behind the storage seam (bc_engine.h).
 *
 * A member of a family (a disk with snapshots, a snapshot, an image, a disk made from
 * one) is a chain of backing files: its own top file, then its parent's file, and so
 * on down to the family's first file. Every file of a family is encrypted under the
 * same DEK lineage with the logical sector number as the XTS tweak (and the family id
 * in the AEAD layer's associated data), so a chunk of ciphertext means the same
 * plaintext in every file of the chain and is shared as it is, never re-encrypted.
 *
 * Chunks: the data area is cut into chunks of chunk_bytes (64 KiB by default); chunk c
 * is data [data_off + c*CB, +CB) and, when the layers keep per-sector metadata, the
 * metadata of the same sectors [meta_off + c*K*M, +K*M) (K sectors per chunk, M bytes
 * each). Each file has a bitmap of map_chunks bits at map_off: bit c set = the file
 * holds chunk c itself (data and metadata). map_chunks is the chunk count of the
 * parent when the file was made; chunks at or past it belong to the file implicitly
 * (nothing below has them), and a file without parent has map_chunks 0 (it holds all).
 *
 * Open: the bitmaps of the chain are merged into one index, one byte per chunk of the
 * top's map: the position in the chain (0 = top) of the file that holds the chunk, or
 * NONE (no file: zeros). A request then costs one lookup per chunk it touches and one
 * storage call per run of chunks with the same holder, whatever the chain's depth.
 *
 * Writes go to the top. A write into part of a chunk the top does not hold first copies
 * the chunk up (its data and metadata from the holder, or zeros: punched) under a
 * per-chunk lock, then sets the index; the write follows. A write that covers a chunk's
 * piece whole does not copy that piece (only the chunk's other piece, if any): it writes,
 * then sets the index (cow_write_at). Discard copies up, then punches in the
 * top. The map bit is made durable later, by the next flush: flush = flush the top
 * (the copied and written data durable), then write the bitmap pages of the chunks
 * copied up before that flush started, then flush again. So a bit never reaches the
 * disk before the data it vouches for (kill -9 or power loss): a lost bit makes the
 * chunk read its old content from below, which only loses writes no flush
 * acknowledged; a copy-up re-done after a restart overwrites whatever a lost one left.
 *
 * Caveats: the index costs one byte per chunk (16 MiB for a 1 TiB disk at 64 KiB);
 * chains are at most BC_COW_MAX_FILES deep. Lower files are opened read-only and must
 * never change while a chain is open (the control plane freezes a file before it
 * becomes a parent). A copy-up allocates its chunk buffer (it happens once per chunk).
 */
#define _GNU_SOURCE
#include "bc_engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define NONE 0xFFu
#define STRIPES 64u
#define MAP_IO (1u << 20)

struct cow {
    struct bc_cow_params p;
    uint64_t meta_chunk_bytes;        /* K * M */
    struct bc_cow_file files[BC_COW_MAX_FILES];
    size_t nfiles;
    int writable;
    uint64_t nchunks;                 /* map_chunks of the top: the index's length */
    _Atomic uint8_t *index;
    uint8_t *dur;                     /* the top's bitmap as it is (or will be, after the flush) on disk */
    pthread_mutex_t stripe[STRIPES];
    pthread_mutex_t dirty_mu;         /* the chunks copied up since the last flush began */
    uint64_t *dirty;
    size_t ndirty, dirty_cap;
    pthread_mutex_t flush_mu;
    _Atomic uint64_t copyups;
};

/* ---- geometry -------------------------------------------------------------------- */

enum { R_OTHER, R_DATA, R_META };

/* Which region off lies in; *c its chunk, *end the end of that chunk's region piece. */
static int region_of(const struct cow *w, uint64_t off, uint64_t *c, uint64_t *end)
{
    const struct bc_cow_params *p = &w->p;
    if (p->meta_bytes && off >= p->meta_off) {
        uint64_t r = off - p->meta_off;
        *c = r / w->meta_chunk_bytes;
        *end = p->meta_off + (*c + 1) * w->meta_chunk_bytes;
        return R_META;
    }
    if (off >= p->data_off && (!p->meta_bytes || off < p->meta_off)) {
        uint64_t r = off - p->data_off;
        *c = r / p->chunk_bytes;
        *end = p->data_off + (*c + 1) * p->chunk_bytes;
        if (p->meta_bytes && *end > p->meta_off)
            *end = p->meta_off;
        return R_DATA;
    }
    *c = 0;
    *end = p->data_off;   /* the header area: the top's own */
    return R_OTHER;
}

/* The holder of the piece at off: a chain position, NONE, or 0 for what is not shared. */
static unsigned holder(const struct cow *w, uint64_t off, uint64_t *end)
{
    uint64_t c;
    int r = region_of(w, off, &c, end);
    if (r == R_OTHER || c >= w->nchunks)
        return 0;
    return atomic_load_explicit(&w->index[c], memory_order_acquire);
}

/* ---- copy-up --------------------------------------------------------------------- */

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Make the top hold [off, off+len) of chunk c as the holder h has it: its bytes, or a
 * hole where they are zeros. */
static int copy_range(struct cow *w, uint8_t *buf, unsigned h, uint64_t off, size_t len)
{
    const struct bc_cow_file *top = &w->files[0];
    int rc = 0;
    if (h != NONE)
        rc = w->files[h].ops->read_at(w->files[h].ctx, buf, len, off);
    else
        memset(buf, 0, len);
    if (rc != 0)
        return rc;
    if (all_zero(buf, len)) {
        rc = top->ops->punch != NULL ? top->ops->punch(top->ctx, off, len) : -EOPNOTSUPP;
        if (rc != -EOPNOTSUPP)
            return rc;
    }
    return top->ops->write_at(top->ctx, buf, len, off);
}

/* dirty_mu held */
static int push_dirty(struct cow *w, uint64_t c)
{
    if (w->ndirty == w->dirty_cap) {
        size_t cap = w->dirty_cap ? w->dirty_cap * 2 : 256;
        uint64_t *d = realloc(w->dirty, cap * sizeof *d);
        if (d == NULL)
            return -ENOMEM;
        w->dirty = d;
        w->dirty_cap = cap;
    }
    w->dirty[w->ndirty++] = c;
    return 0;
}

/* Copy chunk c up, except the piece of region `skip` (R_DATA or R_META; R_OTHER copies
 * both) that the caller is about to overwrite whole. claim: set the index (the top holds
 * the chunk) now; without it the caller claims the chunk after its write (claim()). */
static int copy_up_part(struct cow *w, uint64_t c, int skip, int do_claim)
{
    pthread_mutex_t *mu = &w->stripe[c % STRIPES];
    pthread_mutex_lock(mu);
    unsigned h = atomic_load_explicit(&w->index[c], memory_order_acquire);
    int rc = 0;
    if (h != 0) {
        const struct bc_cow_params *p = &w->p;
        size_t cb = p->chunk_bytes;
        size_t need = cb > w->meta_chunk_bytes ? cb : (size_t)w->meta_chunk_bytes;
        int data = skip != R_DATA, meta = p->meta_bytes && skip != R_META;
        void *buf = NULL;
        if ((data || meta) && posix_memalign(&buf, 4096, need) != 0) {
            rc = -ENOMEM;
        } else {
            if (data)
                rc = copy_range(w, buf, h, p->data_off + c * cb, cb);
            if (rc == 0 && meta)
                rc = copy_range(w, buf, h, p->meta_off + c * w->meta_chunk_bytes, (size_t)w->meta_chunk_bytes);
            free(buf);   /* ciphertext only */
        }
        if (rc == 0 && do_claim) {
            pthread_mutex_lock(&w->dirty_mu);
            rc = push_dirty(w, c);
            pthread_mutex_unlock(&w->dirty_mu);
        }
        if (rc == 0 && do_claim) {
            atomic_store_explicit(&w->index[c], 0, memory_order_release);
            atomic_fetch_add_explicit(&w->copyups, 1, memory_order_relaxed);
        }
    }
    pthread_mutex_unlock(mu);
    return rc;
}

static int copy_up(struct cow *w, uint64_t c)
{
    return copy_up_part(w, c, R_OTHER, 1);
}

/* The top holds chunk c from now on (its pieces were copied up or written whole). */
static int claim(struct cow *w, uint64_t c)
{
    pthread_mutex_t *mu = &w->stripe[c % STRIPES];
    pthread_mutex_lock(mu);
    int rc = 0;
    if (atomic_load_explicit(&w->index[c], memory_order_acquire) != 0) {
        pthread_mutex_lock(&w->dirty_mu);
        rc = push_dirty(w, c);
        pthread_mutex_unlock(&w->dirty_mu);
        if (rc == 0) {
            atomic_store_explicit(&w->index[c], 0, memory_order_release);
            atomic_fetch_add_explicit(&w->copyups, 1, memory_order_relaxed);
        }
    }
    pthread_mutex_unlock(mu);
    return rc;
}

/* Every shared chunk that [off, off+len) touches is copied up. */
static int own_range(struct cow *w, uint64_t off, uint64_t len)
{
    while (len > 0) {
        uint64_t c, end;
        int r = region_of(w, off, &c, &end);
        if (r != R_OTHER && c < w->nchunks && atomic_load_explicit(&w->index[c], memory_order_acquire) != 0) {
            int rc = copy_up(w, c);
            if (rc != 0)
                return rc;
        }
        uint64_t step = end - off;
        if (step == 0 || step > len)
            step = len;
        off += step;
        len -= step;
    }
    return 0;
}

/* ---- the ops --------------------------------------------------------------------- */

static int cow_read_at(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct cow *w = ctx;
    uint8_t *p = buf;
    while (len > 0) {
        uint64_t end;
        unsigned h = holder(w, off, &end);
        size_t run = end - off < len ? (size_t)(end - off) : len;
        /* extend the run over the following pieces with the same holder */
        while (run < len) {
            uint64_t e2;
            if (holder(w, off + run, &e2) != h)
                break;
            run = e2 - off < len ? (size_t)(e2 - off) : len;
        }
        int rc;
        if (h == NONE) {
            memset(p, 0, run);
            rc = 0;
        } else {
            rc = w->files[h].ops->read_at(w->files[h].ctx, p, run, off);
        }
        if (rc != 0)
            return rc;
        p += run;
        off += run;
        len -= run;
    }
    return 0;
}

/* A write copies up the shared chunks it covers in part. A chunk whose piece it covers
 * whole (the usual case for requests of a chunk or more) is not read from below: only
 * its other piece is copied (the metadata of a data piece, or the data of a metadata
 * piece, when the layers keep metadata), the write goes to the top, and only then does
 * the top claim the chunk. A write that fails claims nothing, so the chunk still reads
 * from below (what the top got is overwritten by a later copy-up). Overlapping requests
 * are serialised by the engine's range locks, so nothing reads or copies the chunk
 * between the write and the claim. */
static int cow_write_at(void *ctx, const void *buf, size_t len, uint64_t off)
{
    struct cow *w = ctx;
    if (!w->writable)
        return -EBADF;
    uint64_t whole0 = 0, whole1 = 0;   /* the run of chunks [whole0, whole1) this write covers whole */
    int wregion = R_OTHER;
    uint64_t o = off, left = len;
    while (left > 0) {
        uint64_t c, end;
        int r = region_of(w, o, &c, &end);
        uint64_t step = end - o;
        if (step == 0 || step > left)
            step = left;
        if (r != R_OTHER && c < w->nchunks) {
            uint64_t piece = r == R_DATA ? w->p.chunk_bytes : w->meta_chunk_bytes;
            uint64_t start = r == R_DATA ? w->p.data_off + c * piece : w->p.meta_off + c * piece;
            int in_run = o == start && step == piece && (whole1 == whole0 || (wregion == r && c == whole1));
            if (in_run) {
                if (whole1 == whole0)
                    whole0 = c, wregion = r;
                whole1 = c + 1;
            }
            if (atomic_load_explicit(&w->index[c], memory_order_acquire) != 0) {
                int rc = in_run ? copy_up_part(w, c, r, 0) : copy_up(w, c);
                if (rc != 0)
                    return rc;
            }
        }
        o += step;
        left -= step;
    }
    int rc = w->files[0].ops->write_at(w->files[0].ctx, buf, len, off);
    for (uint64_t c = whole0; rc == 0 && c < whole1; c++)
        rc = claim(w, c);
    return rc;
}

static int cow_punch(void *ctx, uint64_t off, uint64_t len)
{
    struct cow *w = ctx;
    const struct bc_cow_file *top = &w->files[0];
    int rc = w->writable ? own_range(w, off, len) : -EBADF;
    if (rc == 0)
        rc = top->ops->punch != NULL ? top->ops->punch(top->ctx, off, len) : -EOPNOTSUPP;
    return rc;
}

/* Write the bitmap bytes [b0, b1) of dur. */
static int write_map(struct cow *w, uint64_t b0, uint64_t b1)
{
    const struct bc_cow_file *top = &w->files[0];
    return top->ops->write_at(top->ctx, w->dur + b0, (size_t)(b1 - b0), w->p.map_off + b0);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cow_flush(void *ctx)
{
    struct cow *w = ctx;
    const struct bc_cow_file *top = &w->files[0];
    if (!w->writable)
        return top->ops->flush(top->ctx);
    pthread_mutex_lock(&w->flush_mu);
    pthread_mutex_lock(&w->dirty_mu);
    uint64_t *mine = w->dirty;
    size_t n = w->ndirty;
    w->dirty = NULL;
    w->ndirty = w->dirty_cap = 0;
    pthread_mutex_unlock(&w->dirty_mu);
    int rc = top->ops->flush(top->ctx);         /* 1. the copied-up and written data */
    if (rc == 0 && n > 0) {
        qsort(mine, n, sizeof *mine, cmp_u64);
        for (size_t i = 0; i < n; i++)
            w->dur[mine[i] / 8] |= (uint8_t)(1u << (mine[i] % 8));
        /* 2. the bitmap pages those chunks are on, one write per run of pages */
        size_t i = 0;
        while (rc == 0 && i < n) {
            uint64_t pg0 = mine[i] / 8 / 4096, pg1 = pg0;
            while (i < n && mine[i] / 8 / 4096 <= pg1 + 1) {
                pg1 = mine[i] / 8 / 4096;
                i++;
            }
            uint64_t b0 = pg0 * 4096, b1 = (pg1 + 1) * 4096, nbytes = (w->nchunks + 7) / 8;
            if (b1 > nbytes)
                b1 = nbytes;
            rc = write_map(w, b0, b1);
        }
        if (rc == 0)
            rc = top->ops->flush(top->ctx);     /* 3. the bits */
    }
    if (rc != 0 && n > 0) {
        /* put them back: the next flush tries again */
        pthread_mutex_lock(&w->dirty_mu);
        for (size_t i = 0; i < n && push_dirty(w, mine[i]) == 0; i++)
            ;
        pthread_mutex_unlock(&w->dirty_mu);
    }
    free(mine);
    pthread_mutex_unlock(&w->flush_mu);
    return rc;
}

static int cow_get_size(void *ctx, uint64_t *v)
{
    struct cow *w = ctx;
    return w->files[0].ops->get_size(w->files[0].ctx, v);
}

static int cow_set_size(void *ctx, uint64_t v)
{
    struct cow *w = ctx;
    return w->files[0].ops->set_size(w->files[0].ctx, v);
}

static int cow_blocks_used(void *ctx, uint64_t *v)
{
    struct cow *w = ctx;   /* the space this member adds: its own file */
    if (w->files[0].ops->blocks_used == NULL)
        return -EOPNOTSUPP;
    return w->files[0].ops->blocks_used(w->files[0].ctx, v);
}

static void cow_free(struct cow *w, int close_files)
{
    if (close_files)
        for (size_t i = 0; i < w->nfiles; i++)
            if (w->files[i].ops->close != NULL)
                w->files[i].ops->close(w->files[i].ctx);
    for (unsigned i = 0; i < STRIPES; i++)
        pthread_mutex_destroy(&w->stripe[i]);
    pthread_mutex_destroy(&w->dirty_mu);
    pthread_mutex_destroy(&w->flush_mu);
    free((void *)w->index);
    free(w->dur);
    free(w->dirty);
    free(w);
}

static void cow_close(void *ctx)
{
    cow_free(ctx, 1);
}

/* Every file of the chain: a range may be held by any of them. */
static void cow_prefetch(void *ctx, uint64_t off, uint64_t len)
{
    struct cow *w = ctx;
    for (size_t i = 0; i < w->nfiles; i++)
        if (w->files[i].ops->prefetch != NULL)
            w->files[i].ops->prefetch(w->files[i].ctx, off, len);
}

static const struct bc_storage_ops cow_ops = {
    .name = "cow",
    .read_at = cow_read_at,
    .write_at = cow_write_at,
    .punch = cow_punch,
    .flush = cow_flush,
    .get_size = cow_get_size,
    .set_size = cow_set_size,
    .blocks_used = cow_blocks_used,
    .close = cow_close,
    .prefetch = cow_prefetch,
};

/* ---- open: merge the bitmaps ------------------------------------------------------ */

static int load_map(const struct bc_cow_file *f, uint64_t map_off, uint8_t *bits, uint64_t nbytes)
{
    for (uint64_t o = 0; o < nbytes; o += MAP_IO) {
        size_t n = nbytes - o < MAP_IO ? (size_t)(nbytes - o) : MAP_IO;
        int rc = f->ops->read_at(f->ctx, bits + o, n, map_off + o);
        if (rc != 0)
            return rc;
    }
    return 0;
}

int bc_storage_cow_open(const struct bc_cow_params *p, const struct bc_cow_file *files, size_t nfiles,
                        int writable, const struct bc_storage_ops **ops, void **ctx)
{
    if (p == NULL || files == NULL || ops == NULL || ctx == NULL || nfiles == 0 || nfiles > BC_COW_MAX_FILES)
        return -EINVAL;
    if ((p->sector_size != 512 && p->sector_size != 4096) || p->chunk_bytes < p->sector_size ||
        p->chunk_bytes % p->sector_size != 0 || p->chunk_bytes > BC_MAX_REQUEST ||
        (p->chunk_bytes & (p->chunk_bytes - 1)) != 0 || p->map_off < p->data_off ||
        (p->meta_bytes && p->meta_off <= p->data_off))
        return -EINVAL;
    for (size_t i = 0; i < nfiles; i++)
        if (files[i].ops == NULL || files[i].ops->read_at == NULL || files[i].map_chunks > (UINT64_C(1) << 40))
            return -EINVAL;
    struct cow *w = calloc(1, sizeof *w);
    if (w == NULL)
        return -ENOMEM;
    w->p = *p;
    w->meta_chunk_bytes = (uint64_t)(p->chunk_bytes / p->sector_size) * p->meta_bytes;
    if (p->meta_bytes == 0)
        w->meta_chunk_bytes = 1;   /* unused; keeps the divisions defined */
    memcpy(w->files, files, nfiles * sizeof *files);
    w->nfiles = nfiles;
    w->writable = writable ? 1 : 0;
    w->nchunks = files[0].map_chunks;
    for (unsigned i = 0; i < STRIPES; i++)
        pthread_mutex_init(&w->stripe[i], NULL);
    pthread_mutex_init(&w->dirty_mu, NULL);
    pthread_mutex_init(&w->flush_mu, NULL);
    int rc = 0;
    uint64_t nbytes = (w->nchunks + 7) / 8;
    w->index = malloc(w->nchunks ? w->nchunks : 1);
    w->dur = calloc(nbytes ? nbytes : 1, 1);
    uint8_t *bits = malloc(nbytes ? nbytes : 1);
    if (w->index == NULL || w->dur == NULL || bits == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    memset((void *)w->index, NONE, w->nchunks);
    /* top first: a chunk goes to the first file (from the top) that holds it */
    for (size_t i = 0; i < nfiles && rc == 0; i++) {
        uint64_t mc = files[i].map_chunks < w->nchunks ? files[i].map_chunks : w->nchunks;
        uint64_t mb = (mc + 7) / 8;
        if (mb > 0) {
            rc = load_map(&files[i], p->map_off, bits, mb);
            if (rc != 0)
                break;
            if (i == 0)
                memcpy(w->dur, bits, mb);
        }
        for (uint64_t c = 0; c < w->nchunks; c++) {
            if (w->index[c] != NONE)
                continue;
            if (c >= mc || (bits[c / 8] >> (c % 8)) & 1u)
                w->index[c] = (uint8_t)i;
        }
    }
    free(bits);
    bits = NULL;
    if (rc != 0)
        goto fail;
    *ops = &cow_ops;
    *ctx = w;
    return 0;
fail:
    free(bits);
    cow_free(w, 0);
    return rc;
}

uint64_t bc_storage_cow_copyups(void *ctx)
{
    return atomic_load_explicit(&((struct cow *)ctx)->copyups, memory_order_relaxed);
}
