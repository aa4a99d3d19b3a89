/*
 * bc_engine.c — the volume: any byte range over whole encrypted sectors.
 *
 * A request is: enter the gate (a read lock on a writer-preferring rwlock; revoke,
 * set_layers and resize take it for writing, so they wait for requests in flight and
 * new requests wait for them), take the range lock over the touched sectors, then
 * one storage read or write of the whole span (plus one of its metadata range when
 * the layers have metadata) and one call per layer for the whole span. A span of
 * 256 KiB or more is cut into parts of whole sectors that helper threads serve beside
 * the serving thread (bc_parallel.c; a read's parts are 128 KiB, taken in turn, a
 * write's one per thread, see split_span), each part its own storage I/O and crypto: a
 * queue-depth-1 stream of 1 MiB requests then uses more than one core, and one part's
 * copy to or from the backing file overlaps another part's crypto. Unaligned
 * writes first load (read + decrypt) their partial first and last sectors. Requests
 * larger than BC_MAX_REQUEST loop over chunks under one range lock.
 *
 * Holes: a stored sector that is all zero, with all-zero metadata, is not decrypted
 * and reads as zeros. Runs of non-hole sectors go to the layers in one call each.
 *
 * Memory: nothing is allocated on the request path. Each thread owns a scratch
 * buffer (BC_MAX_REQUEST + 2 sectors of data, page-aligned for O_DIRECT, and the
 * metadata of as many 512-byte sectors) made on its first request and wiped and
 * freed at thread exit (its data part, which holds plaintext, is mlock'ed, best effort
 * under RLIMIT_MEMLOCK, and left out of core dumps, so it never reaches swap or a
 * core file); the metadata part grows only if a volume with more
 * metadata per sector shows up on that thread. Range-lock nodes live on the stack.
 * Aligned reads decrypt in the caller's buffer, with no copy.
 *
 * Caveats: a failed read wipes the caller's buffer (no partial plaintext is left
 * behind). Shrinking punches the dropped sectors so that growing again reads zeros.
 * Storage errors pass through as they are (EDQUOT becomes ENOSPC).
 */
#define _GNU_SOURCE
#include "bc_engine.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define SCRATCH_ALIGN 4096u
#define SCRATCH_DATA (BC_MAX_REQUEST + 2u * 4096u)
#define SCRATCH_META_SECTORS (BC_MAX_REQUEST / 512u + 2u)

struct range_node {
    uint64_t s, e;                 /* [s, e) in sectors */
    struct range_node *prev, *next;
};

struct bc_volume {
    atomic_uint refs;
    uint32_t sector_size;
    uint64_t data_off, meta_off;
    int read_only;
    _Atomic uint64_t size;
    const struct bc_storage_ops *sops;
    void *sctx;

    /* the layer stack: read under the gate's read lock, changed under its write lock */
    struct bc_layer layers[BC_MAX_LAYERS];
    size_t nlayers;
    size_t meta_bytes;                   /* per sector, fixed at open */
    size_t meta_slice[BC_MAX_LAYERS];    /* offset of each layer's slice */
    int zero_data_hole;                  /* a layer set BC_LAYER_ZERO_DATA_IS_HOLE */

    pthread_rwlock_t gate;
    pthread_mutex_t gate_mu;             /* err and reason, for bc_volume_gate without waiting */
    int gate_err;
    char reason[BC_REASON_MAX];

    pthread_mutex_t rl_mu;
    pthread_cond_t rl_cv;
    struct range_node *held;
    unsigned rl_waiters;

    _Atomic uint64_t n_reads, n_writes, n_discards, n_flushes, n_errors, n_bytes_read, n_bytes_written;
    _Atomic uint64_t n_integrity;
    _Atomic uint64_t last_bad_sector;
    _Atomic uint64_t hist[32];
    _Atomic int flush_err;               /* the first failed flush, sticky (fsyncgate) */
};

/* ---- per-thread scratch ----------------------------------------------------------- */

struct scratch {
    uint8_t *data;        /* SCRATCH_DATA bytes, SCRATCH_ALIGN-aligned */
    uint8_t *old;         /* the same, made on first need: stored bytes before a write */
    uint8_t *meta;
    size_t meta_cap;
    int locked;           /* data is mlock'ed */
};

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;
static __thread struct scratch *tls_scratch;

static void scratch_free(void *p)
{
    struct scratch *sc = p;
    if (sc == NULL)
        return;
    if (sc->data != NULL) {
        explicit_bzero(sc->data, SCRATCH_DATA);   /* it held plaintext */
        if (sc->locked)
            munlock(sc->data, SCRATCH_DATA);
        free(sc->data);
    }
    free(sc->old);        /* ciphertext only */
    if (sc->meta != NULL) {
        explicit_bzero(sc->meta, sc->meta_cap);
        free(sc->meta);
    }
    free(sc);
}

static void scratch_key_make(void)
{
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* This thread's scratch with room for meta_per_sector bytes of metadata per sector. */
static struct scratch *scratch_get(size_t meta_per_sector)
{
    struct scratch *sc = tls_scratch;
    size_t meta_need = meta_per_sector * SCRATCH_META_SECTORS;
    if (meta_need < 64)
        meta_need = 64;
    if (sc != NULL && sc->meta_cap >= meta_need)
        return sc;
    if (sc == NULL) {
        pthread_once(&scratch_once, scratch_key_make);
        if (!scratch_key_ok)
            return NULL;
        sc = calloc(1, sizeof *sc);
        if (sc == NULL)
            return NULL;
        void *d = NULL;
        if (posix_memalign(&d, SCRATCH_ALIGN, SCRATCH_DATA) != 0) {
            free(sc);
            return NULL;
        }
        sc->data = d;
        sc->locked = mlock(d, SCRATCH_DATA) == 0;   /* plaintext: keep it off swap */
        madvise(d, SCRATCH_DATA, MADV_DONTDUMP);    /* and out of core dumps */
        if (pthread_setspecific(scratch_key, sc) != 0) {
            free(sc->data);
            free(sc);
            return NULL;
        }
        tls_scratch = sc;
    }
    if (sc->meta_cap < meta_need) {
        uint8_t *m = malloc(meta_need);
        if (m == NULL)
            return NULL;
        if (sc->meta != NULL) {
            explicit_bzero(sc->meta, sc->meta_cap);
            free(sc->meta);
        }
        sc->meta = m;
        sc->meta_cap = meta_need;
    }
    return sc;
}

/* ---- helpers ------------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

enum kind { K_READ, K_WRITE, K_DISCARD, K_FLUSH };

static void account(struct bc_volume *v, enum kind k, uint64_t t0, long long rc)
{
    _Atomic uint64_t *ctr = k == K_READ ? &v->n_reads : k == K_WRITE ? &v->n_writes
                            : k == K_DISCARD ? &v->n_discards : &v->n_flushes;
    atomic_fetch_add_explicit(ctr, 1, memory_order_relaxed);
    if (rc < 0)
        atomic_fetch_add_explicit(&v->n_errors, 1, memory_order_relaxed);
    if (rc == -EBADMSG)
        atomic_fetch_add_explicit(&v->n_integrity, 1, memory_order_relaxed);
    else if (k == K_READ && rc > 0)
        atomic_fetch_add_explicit(&v->n_bytes_read, (uint64_t)rc, memory_order_relaxed);
    else if (k == K_WRITE && rc > 0)
        atomic_fetch_add_explicit(&v->n_bytes_written, (uint64_t)rc, memory_order_relaxed);
    uint64_t us = (now_ns() - t0 + 999) / 1000;
    unsigned b = us <= 1 ? 0 : (unsigned)(64 - __builtin_clzll(us - 1));
    if (b > 31)
        b = 31;
    atomic_fetch_add_explicit(&v->hist[b], 1, memory_order_relaxed);
}

static int storage_err(int rc)
{
    return rc == -EDQUOT ? -ENOSPC : rc;
}

/* Is this a zero stored sector? The first 16 bytes decide for ciphertext (all zero
 * with probability 2^-128), so only holes pay for the full scan. */
static int all_zero(const uint8_t *p, size_t n)
{
    if (n >= 16) {
        uint64_t h[2];
        memcpy(h, p, sizeof h);
        if (h[0] | h[1])
            return 0;
    }
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
        if ((i & 511) == 504 && acc)
            return 0;
    }
    for (; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

static int gate_enter(struct bc_volume *v)
{
    pthread_rwlock_rdlock(&v->gate);
    int err = v->gate_err;
    if (err != 0) {
        pthread_rwlock_unlock(&v->gate);
        return -err;
    }
    return 0;
}

static void gate_exit(struct bc_volume *v)
{
    pthread_rwlock_unlock(&v->gate);
}

static void rl_acquire(struct bc_volume *v, struct range_node *n, uint64_t s, uint64_t e)
{
    n->s = s;
    n->e = e;
    pthread_mutex_lock(&v->rl_mu);
    for (;;) {
        struct range_node *h = v->held;
        while (h != NULL && !(h->s < e && s < h->e))
            h = h->next;
        if (h == NULL)
            break;
        v->rl_waiters++;
        pthread_cond_wait(&v->rl_cv, &v->rl_mu);
        v->rl_waiters--;
    }
    n->prev = NULL;
    n->next = v->held;
    if (v->held != NULL)
        v->held->prev = n;
    v->held = n;
    pthread_mutex_unlock(&v->rl_mu);
}

static void rl_release(struct bc_volume *v, struct range_node *n)
{
    pthread_mutex_lock(&v->rl_mu);
    if (n->prev != NULL)
        n->prev->next = n->next;
    else
        v->held = n->next;
    if (n->next != NULL)
        n->next->prev = n->prev;
    if (v->rl_waiters)
        pthread_cond_broadcast(&v->rl_cv);
    pthread_mutex_unlock(&v->rl_mu);
}

static void destroy_layers(struct bc_layer *layers, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (layers[i].ops != NULL && layers[i].ops->destroy != NULL)
            layers[i].ops->destroy(layers[i].ctx);
}

/* 0 and the total metadata per sector, or -EINVAL. */
static int check_layers(const struct bc_layer *layers, size_t n, size_t *meta_total)
{
    if (n > BC_MAX_LAYERS || (n > 0 && layers == NULL))
        return -EINVAL;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        const struct bc_layer_ops *o = layers[i].ops;
        if (o == NULL || o->encrypt == NULL || o->decrypt == NULL || o->meta_bytes > 4096)
            return -EINVAL;
        if (o->resolve != NULL && i + 1 != n)
            return -EINVAL;   /* the stored bytes are the innermost layer's ciphertext */
        m += o->meta_bytes;
    }
    *meta_total = m;
    return 0;
}

static void install_layers(struct bc_volume *v, const struct bc_layer *layers, size_t n)
{
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        v->layers[i] = layers[i];
        v->meta_slice[i] = off;
        off += layers[i].ops->meta_bytes;
    }
    v->nlayers = n;
    v->zero_data_hole = 0;
    for (size_t i = 0; i < n; i++)
        if (layers[i].ops->flags & BC_LAYER_ZERO_DATA_IS_HOLE)
            v->zero_data_hole = 1;
}

/* ---- sector spans (gate and range lock held) ------------------------------------ */

static int is_hole(const struct bc_volume *v, const uint8_t *data, const uint8_t *meta)
{
    return all_zero(data, v->sector_size) &&
           (v->meta_bytes == 0 || v->zero_data_hole || all_zero(meta, v->meta_bytes));
}

static int decrypt_run(struct bc_volume *v, uint8_t *buf, uint8_t *meta, uint64_t s, size_t n)
{
    size_t M = v->meta_bytes;
    for (size_t L = v->nlayers; L-- > 0;) {
        const struct bc_layer *l = &v->layers[L];
        const uint8_t *m = M ? meta + v->meta_slice[L] : NULL;
        int rc = l->ops->decrypt(l->ctx, buf, n, s, m, M);
        if (rc == -EBADMSG)   /* the request is counted in account(); this says where */
            atomic_store_explicit(&v->last_bad_sector,
                                  l->ops->failed_sector != NULL ? l->ops->failed_sector(l->ctx) : s,
                                  memory_order_relaxed);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
    }
    return 0;
}

/* Decrypt n stored sectors in place, skipping holes; runs of non-holes in one call. */
static int decrypt_serial(struct bc_volume *v, uint8_t *buf, uint8_t *meta, uint64_t s, size_t n)
{
    if (v->nlayers == 0)
        return 0;
    size_t ss = v->sector_size, M = v->meta_bytes;
    size_t run = 0;   /* first sector of the current run of non-holes */
    for (size_t i = 0; i < n; i++) {
        if (is_hole(v, buf + i * ss, M ? meta + i * M : NULL)) {
            if (run < i) {
                int rc = decrypt_run(v, buf + run * ss, M ? meta + run * M : NULL, s + run, i - run);
                if (rc != 0)
                    return rc;
            }
            run = i + 1;
        }
    }
    if (run < n)
        return decrypt_run(v, buf + run * ss, M ? meta + run * M : NULL, s + run, n - run);
    return 0;
}

/* ---- one span's crypto on several threads (bc_parallel.c) ---------------------- */

#define PAR_MIN_BYTES (256u << 10)   /* a span smaller than this stays on one thread */
#define PAR_PART_MIN (128u << 10)    /* and no part is smaller than this */
#define PAR_MAX_PARTS 16u
#define PAR_MAX_RUNNERS 4u           /* threads on one span: the caller and helpers */

struct part {
    struct bc_volume *v;
    uint8_t *buf, *meta;
    const uint8_t *src;   /* store: the plaintext of whole sectors, if not in buf yet */
    uint64_t s;
    size_t n;
    int rc;
    int wrote;   /* store: a storage write was attempted after the encryption */
};

/* Every layer's encryption of n plaintext sectors, layer 0 first, into buf: in place, or
 * from src (n whole sectors of plaintext) when it is given: layer 0 then encrypts out of
 * place if it can, else src is copied first. */
static int encrypt_serial(struct bc_volume *v, uint8_t *buf, const uint8_t *src, uint8_t *meta, uint64_t s,
                          size_t n)
{
    size_t M = v->meta_bytes;
    if (src != NULL && (v->nlayers == 0 || v->layers[0].ops->encrypt_from == NULL))
        memcpy(buf, src, n * v->sector_size);
    for (size_t L = 0; L < v->nlayers; L++) {
        const struct bc_layer *l = &v->layers[L];
        uint8_t *m = M ? meta + v->meta_slice[L] : NULL;
        int rc = L == 0 && src != NULL && l->ops->encrypt_from != NULL
                     ? l->ops->encrypt_from(l->ctx, buf, src, n, s, m, M)
                     : l->ops->encrypt(l->ctx, buf, n, s, m, M);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
    }
    return 0;
}

/* Read n sectors (data, and metadata into meta) and decrypt them. */
static int load_serial(struct bc_volume *v, uint8_t *buf, uint8_t *meta, uint64_t s, size_t n)
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    int rc = v->sops->read_at(v->sctx, buf, n * ss, v->data_off + s * ss);
    if (rc == 0 && M)
        rc = v->sops->read_at(v->sctx, meta, n * M, v->meta_off + s * M);
    if (rc != 0)
        return storage_err(rc);
    return decrypt_serial(v, buf, meta, s, n);
}

/* Encrypt n sectors and store them: the metadata first, then the data (a kill in
 * between leaves the old data beside metadata that still holds its slot). */
static int store_serial(struct bc_volume *v, uint8_t *buf, const uint8_t *src, uint8_t *meta, uint64_t s,
                        size_t n, int *wrote)
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    int rc = encrypt_serial(v, buf, src, meta, s, n);
    if (rc != 0)
        return rc;
    *wrote = 1;
    if (M)
        rc = v->sops->write_at(v->sctx, meta, n * M, v->meta_off + s * M);
    if (rc == 0)
        rc = v->sops->write_at(v->sctx, buf, n * ss, v->data_off + s * ss);
    return storage_err(rc);
}

static void load_part(void *p)
{
    struct part *x = p;
    x->rc = load_serial(x->v, x->buf, x->meta, x->s, x->n);
}

static void store_part(void *p)
{
    struct part *x = p;
    x->rc = store_serial(x->v, x->buf, x->src, x->meta, x->s, x->n, &x->wrote);
}

/* The parts of one span and the next one nobody has taken yet: every thread on the
 * span (the caller, and each helper once it wakes) takes parts one by one until none is
 * left. */
struct span_work {
    void (*fn)(void *);
    struct part *parts;
    size_t n;
    atomic_size_t next;
};

static void span_worker(void *p)
{
    struct span_work *w = p;
    for (size_t i; (i = atomic_fetch_add_explicit(&w->next, 1, memory_order_relaxed)) < w->n;)
        w->fn(&w->parts[i]);
}

/* fn over n sectors, cut into parts of whole sectors when the span is large enough, the
 * volume has layers and the process has helper threads. A part is its storage I/O and
 * its crypto together, so one part's copy to or from the backing file overlaps another's
 * crypto. The threads on the span take its parts in turn.
 *
 * fine (reads): parts of PAR_PART_MIN, up to PAR_MAX_PARTS. A helper that wakes late (on
 * a busy or preempted CPU) then costs at most the part it is running, where an equal
 * share left the caller waiting for half the span, or running it after its own. 1 MiB
 * O_DIRECT reads through a mount, warm backing cache: the caller's wait after its own
 * share 53 -> 27 us a request (10-13 with bc_parallel.c's spin).
 * Not fine (writes): one part per thread, at least PAR_PART_MIN each. Four 256 KiB
 * writes to the backing file where two 512 KiB ones did cost 2.2-3.5 CPU s/GiB against
 * 1.7-2.1 (they contend for its inode lock), and parts under a journal record's worth
 * of metadata (bc_storage_journal.c) would go to the log instead of in place.
 * Returns the number of parts (filled in parts[]). */
static size_t split_span(struct bc_volume *v, void (*fn)(void *), int fine, uint8_t *buf, const uint8_t *src,
                         uint8_t *meta, uint64_t s, size_t n, struct part parts[PAR_MAX_PARTS])
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    size_t bytes = n * ss, k = 1, runners = 1;
    if (bytes >= PAR_MIN_BYTES && v->nlayers > 0) {
        runners = bc_parallel_width();
        if (runners > PAR_MAX_RUNNERS)
            runners = PAR_MAX_RUNNERS;
        if (runners > 1) {
            k = fine ? PAR_MAX_PARTS : runners;   /* >= 2 parts: bytes >= 2 PAR_PART_MIN */
            if (k > bytes / PAR_PART_MIN)
                k = bytes / PAR_PART_MIN;
        }
    }
    size_t per = (n + k - 1) / k, at = 0, used = 0;
    for (; used < k && at < n; used++) {
        size_t m = n - at < per ? n - at : per;
        parts[used] = (struct part){.v = v, .buf = buf + at * ss, .meta = M ? meta + at * M : NULL,
                                    .src = src != NULL ? src + at * ss : NULL, .s = s + at, .n = m,
                                    .rc = 0, .wrote = 0};
        at += m;
    }
    if (used == 1) {
        fn(&parts[0]);
        return used;
    }
    struct span_work w = {.fn = fn, .parts = parts, .n = used};
    atomic_init(&w.next, 0);
    void *args[PAR_MAX_RUNNERS];
    if (runners > used)
        runners = used;
    for (size_t i = 0; i < runners; i++)
        args[i] = &w;
    bc_parallel_run(span_worker, args, runners);
    return used;
}

static int first_error(const struct part *parts, size_t used)
{
    for (size_t i = 0; i < used; i++)
        if (parts[i].rc != 0)
            return parts[i].rc;
    return 0;
}

/* Read n sectors from sector s (data, and metadata into meta) and decrypt them. */
static int load_sectors(struct bc_volume *v, uint8_t *buf, uint8_t *meta, uint64_t s, size_t n)
{
    struct part parts[PAR_MAX_PARTS];
    size_t used = split_span(v, load_part, 1, buf, NULL, meta, s, n, parts);
    return first_error(parts, used);
}

/* Metadata volumes: read the current metadata of n sectors into meta and let the
 * layers resolve it (reading the stored data when one asks). */
static int prepare_meta(struct bc_volume *v, struct scratch *sc, uint8_t *meta, uint64_t s, size_t n)
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    int rc = v->sops->read_at(v->sctx, meta, n * M, v->meta_off + s * M);
    if (rc != 0)
        return storage_err(rc);
    int have_old = 0;
    for (size_t L = 0; L < v->nlayers; L++) {
        const struct bc_layer *l = &v->layers[L];
        if (l->ops->resolve == NULL)
            continue;
        uint8_t *m = meta + v->meta_slice[L];
        rc = l->ops->resolve(l->ctx, NULL, n, s, m, M);
        if (rc == 1) {
            if (!have_old) {
                if (sc->old == NULL) {
                    void *p = NULL;
                    if (posix_memalign(&p, SCRATCH_ALIGN, SCRATCH_DATA) != 0)
                        return -ENOMEM;
                    sc->old = p;
                }
                rc = v->sops->read_at(v->sctx, sc->old, n * ss, v->data_off + s * ss);
                if (rc != 0)
                    return storage_err(rc);
                have_old = 1;
            }
            rc = l->ops->resolve(l->ctx, sc->old, n, s, m, M);
        }
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
    }
    return 0;
}

/* Encrypt n plaintext sectors in place (layer 0 first) and store them with their
 * metadata, each part metadata first, then data (store_serial). A storage write that
 * failed after its metadata was made (the metadata write or the data write) may have
 * left a new slot beside old data, so the layers are told (write_failed: the AEAD
 * layer stops trusting its own slots) before the error is answered. */
static int store_sectors(struct bc_volume *v, uint8_t *buf, const uint8_t *src, uint8_t *meta, uint64_t s,
                         size_t n)
{
    struct part parts[PAR_MAX_PARTS];
    size_t used = split_span(v, store_part, 0, buf, src, meta, s, n, parts);
    int rc = first_error(parts, used), failed_write = 0;
    for (size_t i = 0; i < used; i++)
        failed_write |= parts[i].rc != 0 && parts[i].wrote;
    if (failed_write && v->meta_bytes)
        for (size_t L = 0; L < v->nlayers; L++)
            if (v->layers[L].ops->write_failed != NULL)
                v->layers[L].ops->write_failed(v->layers[L].ctx);
    return rc;
}

/* len bytes at off within one chunk (at most BC_MAX_REQUEST + the head offset). */
static int read_chunk(struct bc_volume *v, struct scratch *sc, uint8_t *dst, size_t len, uint64_t off)
{
    size_t ss = v->sector_size;
    uint64_t s0 = off / ss, s1 = (off + len + ss - 1) / ss;
    size_t head = (size_t)(off % ss);
    size_t n = (size_t)(s1 - s0);
    uint8_t *buf = (head == 0 && len % ss == 0) ? dst : sc->data;   /* aligned: in place */
    int rc = load_sectors(v, buf, sc->meta, s0, n);
    if (rc == 0 && buf != dst)
        memcpy(dst, buf + head, len);
    return rc;
}

/* src NULL writes zeros. */
static int write_chunk(struct bc_volume *v, struct scratch *sc, const uint8_t *src, size_t len, uint64_t off)
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    uint64_t end = off + len;
    uint64_t s0 = off / ss, s1 = (end + ss - 1) / ss;
    size_t n = (size_t)(s1 - s0);
    size_t head = (size_t)(off % ss), tail = (size_t)(end % ss);
    uint8_t *buf = sc->data, *meta = sc->meta;
    int rc = 0;
    if (head != 0)
        rc = load_sectors(v, buf, meta, s0, 1);
    if (rc == 0 && tail != 0 && (n > 1 || head == 0))
        rc = load_sectors(v, buf + (n - 1) * ss, M ? meta + (n - 1) * M : NULL, s1 - 1, 1);
    if (rc == 0 && M)
        rc = prepare_meta(v, sc, meta, s0, n);
    if (rc != 0)
        return rc;
    if (src != NULL && head == 0 && tail == 0)   /* whole sectors: encrypted straight from src */
        return store_sectors(v, buf, src, meta, s0, n);
    if (src != NULL)
        memcpy(buf + head, src, len);
    else
        memset(buf + head, 0, len);
    return store_sectors(v, buf, NULL, meta, s0, n);
}

/* Raw zeros over a backing range (the fallback of a punch the store cannot do). */
static int zero_fill(struct bc_volume *v, struct scratch *sc, uint64_t off, uint64_t len)
{
    memset(sc->data, 0, SCRATCH_DATA);
    while (len > 0) {
        size_t n = len < SCRATCH_DATA ? (size_t)len : SCRATCH_DATA;
        int rc = v->sops->write_at(v->sctx, sc->data, n, off);
        if (rc != 0)
            return storage_err(rc);
        off += n;
        len -= n;
    }
    return 0;
}

static int punch_or_zero(struct bc_volume *v, struct scratch *sc, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    int rc = v->sops->punch != NULL ? v->sops->punch(v->sctx, off, len) : -EOPNOTSUPP;
    if (rc == -EOPNOTSUPP)
        rc = zero_fill(v, sc, off, len);
    return storage_err(rc);
}

/* Whole sectors [f0, f1) become holes: data and metadata. */
static int punch_sectors(struct bc_volume *v, struct scratch *sc, uint64_t f0, uint64_t f1)
{
    size_t ss = v->sector_size, M = v->meta_bytes;
    int rc = punch_or_zero(v, sc, v->data_off + f0 * ss, (f1 - f0) * ss);
    if (rc == 0 && M)
        rc = punch_or_zero(v, sc, v->meta_off + f0 * M, (f1 - f0) * M);
    return rc;
}

/* Discard [off, off+len) (inside the volume): whole sectors punched, partial edges zeroed. */
static int discard_locked(struct bc_volume *v, struct scratch *sc, uint64_t off, uint64_t len)
{
    size_t ss = v->sector_size;
    uint64_t end = off + len;
    uint64_t f0 = (off + ss - 1) / ss, f1 = end / ss;
    if (f0 > f1)   /* inside one sector */
        return write_chunk(v, sc, NULL, (size_t)len, off);
    int rc = 0;
    if (off % ss != 0)
        rc = write_chunk(v, sc, NULL, (size_t)(f0 * ss - off), off);
    if (rc == 0 && f1 > f0)
        rc = punch_sectors(v, sc, f0, f1);
    if (rc == 0 && end % ss != 0)
        rc = write_chunk(v, sc, NULL, (size_t)(end - f1 * ss), f1 * ss);
    return rc;
}

/* ---- the API ---------------------------------------------------------------------- */

int bc_volume_open(const struct bc_volume_params *p, const struct bc_storage_ops *sops, void *sctx,
                   const struct bc_layer *layers, size_t nlayers, struct bc_volume **out)
{
    if (p == NULL || sops == NULL || out == NULL || sops->read_at == NULL || sops->write_at == NULL ||
        sops->flush == NULL)
        return -EINVAL;
    if ((p->sector_size != 512 && p->sector_size != 4096) || p->size_bytes % p->sector_size != 0 ||
        p->size_bytes > UINT64_MAX - p->data_off || p->size_bytes > (uint64_t)INT64_MAX)
        return -EINVAL;
    size_t meta = 0;
    if (check_layers(layers, nlayers, &meta) != 0)
        return -EINVAL;
    if (meta > 0 && p->size_bytes / p->sector_size > (UINT64_MAX - p->meta_off) / meta)
        return -EINVAL;
    struct bc_volume *v = calloc(1, sizeof *v);
    if (v == NULL)
        return -ENOMEM;
    atomic_init(&v->refs, 1);
    v->sector_size = p->sector_size;
    v->data_off = p->data_off;
    v->meta_off = p->meta_off;
    v->read_only = p->read_only ? 1 : 0;
    atomic_init(&v->size, p->size_bytes);
    v->sops = sops;
    v->sctx = sctx;
    v->meta_bytes = meta;
    install_layers(v, layers, nlayers);
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* a revoke must not wait behind an endless stream of new requests */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&v->gate, &a);
    pthread_rwlockattr_destroy(&a);
    pthread_mutex_init(&v->gate_mu, NULL);
    pthread_mutex_init(&v->rl_mu, NULL);
    pthread_cond_init(&v->rl_cv, NULL);
    if (meta > 0 && sops->prefetch != NULL) {
        uint64_t span = p->size_bytes / p->sector_size * meta;
        sops->prefetch(sctx, p->meta_off, span < BC_META_PREFETCH_MAX ? span : BC_META_PREFETCH_MAX);
    }
    *out = v;
    return 0;
}

void bc_volume_ref(struct bc_volume *v)
{
    atomic_fetch_add_explicit(&v->refs, 1, memory_order_relaxed);
}

void bc_volume_unref(struct bc_volume *v)
{
    if (v == NULL || atomic_fetch_sub_explicit(&v->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (!v->read_only)
        v->sops->flush(v->sctx);
    destroy_layers(v->layers, v->nlayers);
    v->nlayers = 0;
    if (v->sops->close != NULL)
        v->sops->close(v->sctx);
    pthread_cond_destroy(&v->rl_cv);
    pthread_mutex_destroy(&v->rl_mu);
    pthread_mutex_destroy(&v->gate_mu);
    pthread_rwlock_destroy(&v->gate);
    explicit_bzero(v, sizeof *v);
    free(v);
}

ssize_t bc_volume_read(struct bc_volume *v, void *buf, size_t len, uint64_t off)
{
    uint64_t t0 = now_ns();
    ssize_t rc = gate_enter(v);
    if (rc != 0)
        goto out;
    uint64_t size = atomic_load_explicit(&v->size, memory_order_relaxed);
    if (off >= size || len == 0)
        goto out_gate;                   /* rc == 0: end of the volume */
    if (len > size - off)
        len = (size_t)(size - off);
    if (len > (size_t)SSIZE_MAX)
        len = (size_t)SSIZE_MAX;
    struct scratch *sc = scratch_get(v->meta_bytes);
    if (sc == NULL) {
        rc = -ENOMEM;
        goto out_gate;
    }
    size_t ss = v->sector_size;
    struct range_node node;
    rl_acquire(v, &node, off / ss, (off + len + ss - 1) / ss);
    size_t done = 0;
    int err = 0;
    while (done < len && err == 0) {
        uint64_t pos = off + done;
        size_t chunk = BC_MAX_REQUEST - (size_t)(pos % ss);   /* later chunks start aligned */
        if (chunk > len - done)
            chunk = len - done;
        err = read_chunk(v, sc, (uint8_t *)buf + done, chunk, pos);
        done += chunk;
    }
    rl_release(v, &node);
    if (err != 0) {
        explicit_bzero(buf, len);   /* no partial plaintext behind a failure */
        rc = err;
    } else {
        rc = (ssize_t)len;
    }
out_gate:
    gate_exit(v);
out:
    account(v, K_READ, t0, rc);
    return rc;
}

ssize_t bc_volume_write(struct bc_volume *v, const void *buf, size_t len, uint64_t off)
{
    uint64_t t0 = now_ns();
    ssize_t rc = gate_enter(v);
    if (rc != 0)
        goto out;
    if (v->read_only) {
        rc = -EROFS;
        goto out_gate;
    }
    if (len == 0)
        goto out_gate;
    uint64_t size = atomic_load_explicit(&v->size, memory_order_relaxed);
    if (off >= size) {
        rc = -EFBIG;
        goto out_gate;
    }
    if (len > size - off)
        len = (size_t)(size - off);
    if (len > (size_t)SSIZE_MAX)
        len = (size_t)SSIZE_MAX;
    struct scratch *sc = scratch_get(v->meta_bytes);
    if (sc == NULL) {
        rc = -ENOMEM;
        goto out_gate;
    }
    size_t ss = v->sector_size;
    struct range_node node;
    rl_acquire(v, &node, off / ss, (off + len + ss - 1) / ss);
    size_t done = 0;
    int err = 0;
    while (done < len && err == 0) {
        uint64_t pos = off + done;
        size_t chunk = BC_MAX_REQUEST - (size_t)(pos % ss);
        if (chunk > len - done)
            chunk = len - done;
        err = write_chunk(v, sc, (const uint8_t *)buf + done, chunk, pos);
        done += chunk;
    }
    rl_release(v, &node);
    rc = err != 0 ? err : (ssize_t)len;
out_gate:
    gate_exit(v);
out:
    account(v, K_WRITE, t0, rc);
    return rc;
}

static int discard_common(struct bc_volume *v, uint64_t off, uint64_t len)
{
    uint64_t t0 = now_ns();
    int rc = gate_enter(v);
    if (rc != 0)
        goto out;
    if (v->read_only) {
        rc = -EROFS;
        goto out_gate;
    }
    uint64_t size = atomic_load_explicit(&v->size, memory_order_relaxed);
    if (off >= size || len == 0)
        goto out_gate;
    if (len > size - off)
        len = size - off;
    struct scratch *sc = scratch_get(v->meta_bytes);
    if (sc == NULL) {
        rc = -ENOMEM;
        goto out_gate;
    }
    size_t ss = v->sector_size;
    struct range_node node;
    rl_acquire(v, &node, off / ss, (off + len + ss - 1) / ss);
    rc = discard_locked(v, sc, off, len);
    rl_release(v, &node);
out_gate:
    gate_exit(v);
out:
    account(v, K_DISCARD, t0, rc);
    return rc;
}

int bc_volume_discard(struct bc_volume *v, uint64_t off, uint64_t len)
{
    return discard_common(v, off, len);
}

/* The same as discard: a zeroed range is a hole, which reads as zeros. */
int bc_volume_zero_range(struct bc_volume *v, uint64_t off, uint64_t len)
{
    return discard_common(v, off, len);
}

int bc_volume_flush(struct bc_volume *v)
{
    uint64_t t0 = now_ns();
    int rc = gate_enter(v);
    if (rc == 0) {
        /* A failed flush is never followed by a successful one: the kernel may have dropped
         * the dirty pages it could not write and report success on the next fsync
         * (PostgreSQL's "fsyncgate"), so the volume keeps answering the first error until
         * it is closed and opened again. */
        rc = atomic_load(&v->flush_err);
        if (rc == 0) {
            rc = storage_err(v->sops->flush(v->sctx));
            if (rc != 0) {
                int zero = 0;
                atomic_compare_exchange_strong(&v->flush_err, &zero, rc);
            }
        }
        gate_exit(v);
    }
    account(v, K_FLUSH, t0, rc);
    return rc;
}

int bc_volume_resize(struct bc_volume *v, uint64_t new_size)
{
    if (new_size % v->sector_size != 0 || new_size > UINT64_MAX - v->data_off ||
        new_size > (uint64_t)INT64_MAX)
        return -EINVAL;
    size_t M = v->meta_bytes;
    if (M > 0 && new_size / v->sector_size > (UINT64_MAX - v->meta_off) / M)
        return -EINVAL;
    struct scratch *sc = scratch_get(M);
    if (sc == NULL)
        return -ENOMEM;
    pthread_rwlock_wrlock(&v->gate);   /* no request in flight sees the size change */
    uint64_t old = atomic_load_explicit(&v->size, memory_order_relaxed);
    int rc = 0;
    if (new_size < old && !v->read_only)   /* growing again must read zeros */
        rc = punch_sectors(v, sc, new_size / v->sector_size, old / v->sector_size);
    if (rc == 0)
        atomic_store_explicit(&v->size, new_size, memory_order_relaxed);
    pthread_rwlock_unlock(&v->gate);
    return rc;
}

uint64_t bc_volume_size(const struct bc_volume *v)
{
    return atomic_load_explicit(&((struct bc_volume *)v)->size, memory_order_relaxed);
}

uint32_t bc_volume_sector_size(const struct bc_volume *v)
{
    return v->sector_size;
}

int bc_volume_read_only(const struct bc_volume *v)
{
    return v->read_only;
}

int bc_volume_blocks_used(struct bc_volume *v, uint64_t *blocks_512)
{
    if (v->sops->blocks_used == NULL)
        return -EOPNOTSUPP;
    return v->sops->blocks_used(v->sctx, blocks_512);
}

int bc_volume_revoke(struct bc_volume *v, int err, const char *reason)
{
    if (err <= 0)
        return -EINVAL;
    pthread_rwlock_wrlock(&v->gate);   /* waits for every request in flight */
    destroy_layers(v->layers, v->nlayers);
    memset(v->layers, 0, sizeof v->layers);
    v->nlayers = 0;
    pthread_mutex_lock(&v->gate_mu);
    v->gate_err = err;
    snprintf(v->reason, sizeof v->reason, "%s", reason != NULL ? reason : "");
    pthread_mutex_unlock(&v->gate_mu);
    pthread_rwlock_unlock(&v->gate);
    return 0;
}

int bc_volume_gate(struct bc_volume *v, char *reason_buf, size_t reason_len)
{
    pthread_mutex_lock(&v->gate_mu);
    int err = v->gate_err;
    if (reason_buf != NULL && reason_len > 0)
        snprintf(reason_buf, reason_len, "%s", err != 0 ? v->reason : "");
    pthread_mutex_unlock(&v->gate_mu);
    return err;
}

int bc_volume_set_layers(struct bc_volume *v, const struct bc_layer *layers, size_t nlayers)
{
    size_t meta = 0;
    if (check_layers(layers, nlayers, &meta) != 0 || meta != v->meta_bytes)
        return -EINVAL;   /* the metadata layout is fixed by the disk's format */
    pthread_rwlock_wrlock(&v->gate);
    destroy_layers(v->layers, v->nlayers);
    memset(v->layers, 0, sizeof v->layers);
    install_layers(v, layers, nlayers);
    pthread_mutex_lock(&v->gate_mu);
    v->gate_err = 0;
    v->reason[0] = '\0';
    pthread_mutex_unlock(&v->gate_mu);
    pthread_rwlock_unlock(&v->gate);
    return 0;
}

struct given_storage {
    const struct bc_storage_ops *sops;
    void *sctx;
};

static int give_storage(void *arg, const struct bc_storage_ops **ops, void **ctx)
{
    const struct given_storage *g = arg;
    *ops = g->sops;
    *ctx = g->sctx;
    return 0;
}

int bc_volume_set_storage(struct bc_volume *v, const struct bc_storage_ops *sops, void *sctx)
{
    if (sops == NULL || sops->read_at == NULL || sops->write_at == NULL || sops->flush == NULL)
        return -EINVAL;
    struct given_storage g = {sops, sctx};
    return bc_volume_set_storage_with(v, give_storage, &g);
}

int bc_volume_set_storage_with(struct bc_volume *v,
                               int (*open_fn)(void *arg, const struct bc_storage_ops **ops, void **ctx),
                               void *arg)
{
    if (open_fn == NULL)
        return -EINVAL;
    pthread_rwlock_wrlock(&v->gate);   /* no request in flight on the old storage */
    int rc = v->read_only ? 0 : storage_err(v->sops->flush(v->sctx));
    const struct bc_storage_ops *sops = NULL;
    void *sctx = NULL;
    if (rc == 0)
        rc = open_fn(arg, &sops, &sctx);
    if (rc == 0 && (sops == NULL || sops->read_at == NULL || sops->write_at == NULL || sops->flush == NULL)) {
        if (sops != NULL && sops->close != NULL)
            sops->close(sctx);
        rc = -EINVAL;
    }
    if (rc == 0) {
        if (v->sops->close != NULL)
            v->sops->close(v->sctx);
        v->sops = sops;
        v->sctx = sctx;
    }
    pthread_rwlock_unlock(&v->gate);
    return rc;
}

void bc_volume_stats(struct bc_volume *v, struct bc_stats *out)
{
    out->reads = atomic_load_explicit(&v->n_reads, memory_order_relaxed);
    out->writes = atomic_load_explicit(&v->n_writes, memory_order_relaxed);
    out->discards = atomic_load_explicit(&v->n_discards, memory_order_relaxed);
    out->flushes = atomic_load_explicit(&v->n_flushes, memory_order_relaxed);
    out->errors = atomic_load_explicit(&v->n_errors, memory_order_relaxed);
    out->bytes_read = atomic_load_explicit(&v->n_bytes_read, memory_order_relaxed);
    out->bytes_written = atomic_load_explicit(&v->n_bytes_written, memory_order_relaxed);
    for (int i = 0; i < 32; i++)
        out->lat_us_hist[i] = atomic_load_explicit(&v->hist[i], memory_order_relaxed);
    out->integrity_errors = atomic_load_explicit(&v->n_integrity, memory_order_relaxed);
    out->integrity_last_sector = atomic_load_explicit(&v->last_bad_sector, memory_order_relaxed);
}
