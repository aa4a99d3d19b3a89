/*
 * test_engine.c — the volume engine against OpenSSL and against plain in-memory models.
 *
 *   test_engine [DIR]          run every test on files in a fresh directory under DIR
 *                              (default $TMPDIR or /tmp); prints a summary; exit 0 iff all pass
 *   test_engine --bench [DIR]  MB/s of 4 KiB / 1 MiB reads and writes: raw pread/pwrite,
 *                              the engine with the null layer, the engine with XTS
 *
 * What is checked: XTS sectors equal OpenSSL's one-shot per-sector XTS (512 and 4096,
 * sector numbers up to 2^64-1, ranges past it refused); a new volume reads zeros;
 * unaligned read-modify-write at many offsets and random operations (writes, reads,
 * discard, zero_range, resize, requests larger than BC_MAX_REQUEST) against a byte-array
 * model, then the backing file sector by sector against OpenSSL; discard and zero_range
 * punch holes (st_blocks shrinks, the raw bytes are zero) and fall back to zeros when the
 * store cannot punch; resize; read-only; writes past the end; 8 threads of random
 * overlapping operations replayed in the order the engine serialised them (taken inside
 * the range lock by a storage wrapper) against a model; disjoint ranges proceed while an
 * overlapping one waits; revocation waits for requests in flight, and while 8 threads do
 * I/O no read that started after revoke returned gets data and no layer is called after
 * its destroy; per-sector metadata through a test layer (keyed XOR + checksum) stacked
 * with XTS: exact stored bytes and metadata slices, tampering, holes; O_DIRECT; counters.
 */
#define _GNU_SOURCE
#include "../bc_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>

/* ---- harness ---------------------------------------------------------------------- */

static atomic_int g_failures;
static int g_checks;
static char g_dir[4096];

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        g_checks++;                                                                          \
        if (!(cond)) {                                                                       \
            atomic_fetch_add(&g_failures, 1);                                                \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                  \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fputc('\n', stderr);                                                             \
        }                                                                                    \
    } while (0)
#define CHECK_RC(expr, want)                                                                 \
    do {                                                                                     \
        long long _rc = (long long)(expr);                                                   \
        CHECK(_rc == (long long)(want), "%s = %lld, want %lld", #expr, _rc, (long long)(want)); \
    } while (0)
/* stop the current test if a precondition fails */
#define REQUIRE(cond, ...)                                                                   \
    do {                                                                                     \
        int _f = atomic_load(&g_failures);                                                   \
        CHECK(cond, __VA_ARGS__);                                                            \
        if (atomic_load(&g_failures) != _f)                                                  \
            return;                                                                          \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

struct rng { uint64_t s; };
static uint64_t rnd(struct rng *r) { r->s = splitmix64(r->s); return r->s; }
static uint64_t rnd_below(struct rng *r, uint64_t n) { return n ? rnd(r) % n : 0; }
static void rnd_fill(struct rng *r, uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(rnd(r) >> 24);
}

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", g_dir, name);
}

static void make_empty(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0)
        close(fd);
}

static void make_key(uint8_t key[64], uint64_t seed)
{
    struct rng r = {seed};
    rnd_fill(&r, key, 64);
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int raw_pread(const char *path, void *buf, size_t len, uint64_t off)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -errno;
    memset(buf, 0, len);
    ssize_t n = pread(fd, buf, len, (off_t)off);
    close(fd);
    return n < 0 ? -errno : 0;
}

static int raw_pwrite(const char *path, const void *buf, size_t len, uint64_t off)
{
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return -errno;
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    close(fd);
    return n == (ssize_t)len ? 0 : -EIO;
}

/* OpenSSL one-shot XTS of one sector: the reference */
static void ref_xts(const uint8_t key[64], int enc, uint64_t sector, const uint8_t *in, uint8_t *out, size_t ss)
{
    uint8_t iv[16] = {0};
    for (int b = 0; b < 8; b++)
        iv[b] = (uint8_t)(sector >> (8 * b));
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int l = 0, l2 = 0;
    EVP_CipherInit_ex(c, EVP_aes_256_xts(), NULL, key, iv, enc);
    EVP_CipherUpdate(c, out, &l, in, (int)ss);
    EVP_CipherFinal_ex(c, out + l, &l2);
    EVP_CIPHER_CTX_free(c);
}

/* ---- a storage wrapper: seq numbers, blocking, no-punch, close flag ------------- */

struct op;
static __thread struct op *cur_op;
static atomic_uint_fast64_t g_seq;

struct spy {
    const struct bc_storage_ops *in;
    void *ictx;
    int no_punch;              /* answer -EOPNOTSUPP to punch */
    atomic_int closed;
    atomic_int punches;
    /* a read_at at exactly block_off waits until released */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t block_off;
    int blocking, blocked, released;
};

struct op {
    int type;                  /* 0 read, 1 write, 2 discard, 3 zero_range */
    uint64_t off;
    size_t len;
    uint64_t id;
    uint64_t seq;              /* first storage call, inside the range lock */
    long long rc;
    uint64_t hash;             /* of the bytes a read returned */
};

static void spy_seq(void)
{
    if (cur_op != NULL && cur_op->seq == UINT64_MAX)
        cur_op->seq = atomic_fetch_add(&g_seq, 1);
}

static int spy_read(void *c, void *buf, size_t len, uint64_t off)
{
    struct spy *s = c;
    spy_seq();
    pthread_mutex_lock(&s->mu);
    if (s->blocking && off == s->block_off) {
        s->blocked = 1;
        pthread_cond_broadcast(&s->cv);
        while (!s->released)
            pthread_cond_wait(&s->cv, &s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return s->in->read_at(s->ictx, buf, len, off);
}
static int spy_write(void *c, const void *buf, size_t len, uint64_t off)
{
    struct spy *s = c;
    spy_seq();
    return s->in->write_at(s->ictx, buf, len, off);
}
static int spy_punch(void *c, uint64_t off, uint64_t len)
{
    struct spy *s = c;
    spy_seq();
    if (s->no_punch)
        return -EOPNOTSUPP;
    atomic_fetch_add(&s->punches, 1);
    return s->in->punch(s->ictx, off, len);
}
static int spy_flush(void *c) { struct spy *s = c; return s->in->flush(s->ictx); }
static int spy_get_size(void *c, uint64_t *v) { struct spy *s = c; return s->in->get_size(s->ictx, v); }
static int spy_set_size(void *c, uint64_t v) { struct spy *s = c; return s->in->set_size(s->ictx, v); }
static int spy_blocks(void *c, uint64_t *v) { struct spy *s = c; return s->in->blocks_used(s->ictx, v); }
static void spy_close(void *c)
{
    struct spy *s = c;
    s->in->close(s->ictx);
    atomic_store(&s->closed, 1);   /* the spy itself is the test's; it outlives the volume */
}
static const struct bc_storage_ops spy_ops = {
    "spy", spy_read, spy_write, spy_punch, spy_flush, spy_get_size, spy_set_size, spy_blocks, spy_close, NULL,
};

static int spy_open(struct spy *s, const char *path, int writable, int cache)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    return bc_storage_local_open(path, writable, cache, &s->in, &s->ictx);
}

/* ---- test layers -------------------------------------------------------------------- */

/* xorsum: keyed XOR of the data and a checksum of the plaintext in its metadata slice
 * (8 bytes; with 16, the complement follows). -EBADMSG on a mismatch. */
struct xorsum { uint64_t key; size_t mb; atomic_int destroyed; };

static uint64_t xs_sum(const struct xorsum *x, const uint8_t *p, size_t n, uint64_t sector)
{
    uint64_t h = 0xcbf29ce484222325ull ^ x->key ^ splitmix64(sector);
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h ? h : 1;   /* never zero: a written sector's metadata is never a hole */
}
static void xs_xor(const struct xorsum *x, uint8_t *p, size_t n, uint64_t sector)
{
    for (size_t w = 0; w < n / 8; w++) {
        uint64_t k = splitmix64(x->key ^ (sector * 0x9E3779B97F4A7C15ull) ^ w), d;
        memcpy(&d, p + 8 * w, 8);
        d ^= k;
        memcpy(p + 8 * w, &d, 8);
    }
}
static uint32_t g_xs_ss;   /* the sector size of the current metadata test */
static int xs_encrypt(void *ctx, uint8_t *buf, size_t n, uint64_t s, uint8_t *meta, size_t stride)
{
    struct xorsum *x = ctx;
    for (size_t i = 0; i < n; i++) {
        uint8_t *p = buf + i * g_xs_ss, *m = meta + i * stride;
        uint64_t sum = xs_sum(x, p, g_xs_ss, s + i);
        memcpy(m, &sum, 8);
        if (x->mb == 16) {
            uint64_t c = ~sum;
            memcpy(m + 8, &c, 8);
        }
        xs_xor(x, p, g_xs_ss, s + i);
    }
    return 0;
}
static int xs_decrypt(void *ctx, uint8_t *buf, size_t n, uint64_t s, const uint8_t *meta, size_t stride)
{
    struct xorsum *x = ctx;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *p = buf + i * g_xs_ss;
        const uint8_t *m = meta + i * stride;
        xs_xor(x, p, g_xs_ss, s + i);
        uint64_t sum = xs_sum(x, p, g_xs_ss, s + i), got, c;
        memcpy(&got, m, 8);
        if (got != sum)
            rc = -EBADMSG;
        if (x->mb == 16) {
            memcpy(&c, m + 8, 8);
            if (c != ~sum)
                rc = -EBADMSG;
        }
    }
    return rc;
}
static void xs_destroy(void *ctx) { atomic_store(&((struct xorsum *)ctx)->destroyed, 1); }
static const struct bc_layer_ops xs8_ops = {.name = "xorsum8", .meta_bytes = 8, .encrypt = xs_encrypt,
                                            .decrypt = xs_decrypt, .destroy = xs_destroy};
static const struct bc_layer_ops xs16_ops = {.name = "xorsum16", .meta_bytes = 16, .encrypt = xs_encrypt,
                                             .decrypt = xs_decrypt, .destroy = xs_destroy};

/* canary: no transform; counts any call after its destroy */
struct canary { atomic_int destroyed; atomic_int late_calls; atomic_long calls; };
static int can_enc(void *ctx, uint8_t *b, size_t n, uint64_t s, uint8_t *m, size_t st)
{
    struct canary *c = ctx;
    (void)b, (void)n, (void)s, (void)m, (void)st;
    atomic_fetch_add(&c->calls, 1);
    if (atomic_load(&c->destroyed))
        atomic_fetch_add(&c->late_calls, 1);
    return 0;
}
static int can_dec(void *ctx, uint8_t *b, size_t n, uint64_t s, const uint8_t *m, size_t st)
{
    return can_enc(ctx, b, n, s, (uint8_t *)m, st);
}
static void can_destroy(void *ctx) { atomic_store(&((struct canary *)ctx)->destroyed, 1); }
static const struct bc_layer_ops canary_ops = {.name = "canary", .meta_bytes = 0, .encrypt = can_enc,
                                               .decrypt = can_dec, .destroy = can_destroy};

/* ---- building volumes ----------------------------------------------------------------- */

enum { STACK_XTS, STACK_NULL, STACK_META };
#define KEY_SEED 0x5eed

struct vol {
    struct bc_volume *v;
    struct spy *spy;            /* NULL: the plain local store */
    struct xorsum xa, xb;
    uint8_t key[64];
};

static int build_layers(struct vol *t, int stack, uint32_t ss, struct bc_layer *ls, size_t *n)
{
    make_key(t->key, KEY_SEED);
    int rc;
    switch (stack) {
    case STACK_NULL:
        *n = 1;
        return bc_layer_null_new(ss, &ls[0]);
    case STACK_META:
        g_xs_ss = ss;
        t->xa.key = 0xA11CE;
        t->xa.mb = 8;
        t->xb.key = 0xB0B;
        t->xb.mb = 16;
        ls[0] = (struct bc_layer){&xs8_ops, &t->xa};
        rc = bc_layer_xts_new(t->key, 64, ss, &ls[1]);
        ls[2] = (struct bc_layer){&xs16_ops, &t->xb};
        *n = 3;
        return rc;
    default:
        *n = 1;
        return bc_layer_xts_new(t->key, 64, ss, &ls[0]);
    }
}

static int vol_open(struct vol *t, const char *path, uint64_t size, uint32_t ss, int stack, int cache, int ro,
                    struct spy *spy)
{
    memset(t, 0, sizeof *t);
    const struct bc_storage_ops *ops;
    void *ctx;
    int rc;
    if (spy != NULL) {
        rc = spy_open(spy, path, !ro, cache);
        ops = &spy_ops;
        ctx = spy;
    } else {
        rc = bc_storage_local_open(path, !ro, cache, &ops, &ctx);
    }
    if (rc != 0)
        return rc;
    t->spy = spy;
    struct bc_layer ls[BC_MAX_LAYERS];
    size_t n = 0;
    rc = build_layers(t, stack, ss, ls, &n);
    if (rc != 0) {
        ops->close(ctx);
        return rc;
    }
    struct bc_volume_params p = {.size_bytes = size, .sector_size = ss, .data_off = 1u << 20,
                                 .meta_off = stack == STACK_META ? 64u * 1024 : 0, .read_only = ro};
    if (stack == STACK_META)
        p.data_off = 2u << 20;
    rc = bc_volume_open(&p, ops, ctx, ls, n, &t->v);
    if (rc != 0) {
        for (size_t i = 0; i < n; i++)
            ls[i].ops->destroy(ls[i].ctx);
        ops->close(ctx);
    }
    return rc;
}

/* ---- 1. XTS against OpenSSL ---------------------------------------------------------- */

static void test_xts_reference(void)
{
    uint8_t key[64];
    make_key(key, 77);
    static uint8_t pt[8 * 4096], ct[8 * 4096], want[4096];
    struct rng r = {1};
    rnd_fill(&r, pt, sizeof pt);
    const uint64_t starts[] = {0, 1, 255, 256, 0x123456789ull, (1ull << 32) - 3, UINT64_MAX - 7};
    for (int si = 0; si < 2; si++) {
        uint32_t ss = si ? 4096 : 512;
        struct bc_layer l;
        CHECK_RC(bc_layer_xts_new(key, 64, ss, &l), 0);
        CHECK(strcmp(l.ops->name, "aes-xts-plain64") == 0 && l.ops->meta_bytes == 0, "name/meta");
        for (size_t k = 0; k < sizeof starts / sizeof starts[0]; k++) {
            memcpy(ct, pt, 8 * ss);
            CHECK_RC(l.ops->encrypt(l.ctx, ct, 8, starts[k], NULL, 0), 0);
            for (int i = 0; i < 8; i++) {
                ref_xts(key, 1, starts[k] + (uint64_t)i, pt + i * ss, want, ss);
                CHECK(memcmp(ct + i * ss, want, ss) == 0, "ss %u sector %" PRIu64 " differs from OpenSSL", ss,
                      starts[k] + (uint64_t)i);
            }
            CHECK_RC(l.ops->decrypt(l.ctx, ct, 8, starts[k], NULL, 0), 0);
            CHECK(memcmp(ct, pt, 8 * ss) == 0, "round trip ss %u", ss);
        }
        /* the last sector number works; a range past it is refused */
        memcpy(ct, pt, ss);
        CHECK_RC(l.ops->encrypt(l.ctx, ct, 1, UINT64_MAX, NULL, 0), 0);
        ref_xts(key, 1, UINT64_MAX, pt, want, ss);
        CHECK(memcmp(ct, want, ss) == 0, "sector 2^64-1");
        CHECK_RC(l.ops->encrypt(l.ctx, ct, 2, UINT64_MAX, NULL, 0), -EINVAL);
        CHECK_RC(l.ops->decrypt(l.ctx, ct, 3, UINT64_MAX - 1, NULL, 0), -EINVAL);
        l.ops->destroy(l.ctx);
    }
    /* IEEE 1619-2007 vector 10: XTS-AES-256, data unit 0xff, 512 bytes of 00..ff twice */
    struct bc_layer l;
    static const char k1[] = "2718281828459045235360287471352662497757247093699959574966967627";
    static const char k2h[] = "3141592653589793238462643383279502884197169399375105820974944592";
    uint8_t k2[64];
    for (int i = 0; i < 32; i++) {
        unsigned hi, lo;
        sscanf(k1 + 2 * i, "%1x%1x", &hi, &lo);
        k2[i] = (uint8_t)(hi << 4 | lo);
        sscanf(k2h + 2 * i, "%1x%1x", &hi, &lo);
        k2[32 + i] = (uint8_t)(hi << 4 | lo);
    }
    static const uint8_t v10_ct_head[16] = {0x1c, 0x3b, 0x3a, 0x10, 0x2f, 0x77, 0x03, 0x86,
                                            0xe4, 0x83, 0x6c, 0x99, 0xe3, 0x70, 0xcf, 0x9b};
    CHECK_RC(bc_layer_xts_new(k2, 64, 512, &l), 0);
    for (int i = 0; i < 512; i++)
        ct[i] = (uint8_t)i;
    CHECK_RC(l.ops->encrypt(l.ctx, ct, 1, 0xff, NULL, 0), 0);
    CHECK(memcmp(ct, v10_ct_head, 16) == 0, "IEEE 1619 vector 10");
    l.ops->destroy(l.ctx);
    /* bad keys */
    uint8_t eq[64];
    memset(eq, 0x42, 64);
    CHECK_RC(bc_layer_xts_new(eq, 64, 4096, &l), -EINVAL);
    CHECK_RC(bc_layer_xts_new(key, 32, 4096, &l), -EINVAL);
    CHECK_RC(bc_layer_xts_new(key, 64, 1024, &l), -EINVAL);
    CHECK_RC(bc_layer_null_new(1000, &l), -EINVAL);
}

/* ---- 1b. ephemeral XTS keys (temp disks under encryption at host) ------------------ */

static void test_xts_ephemeral(void)
{
    static uint8_t pt[4 * 4096], a[4 * 4096], b[4 * 4096];
    struct rng r = {9};
    rnd_fill(&r, pt, sizeof pt);
    for (int si = 0; si < 2; si++) {
        uint32_t ss = si ? 4096 : 512;
        struct bc_layer la, lb;
        CHECK_RC(bc_layer_xts_new_ephemeral(ss, &la), 0);
        CHECK_RC(bc_layer_xts_new_ephemeral(ss, &lb), 0);
        CHECK(strcmp(la.ops->name, "aes-xts-plain64") == 0, "ephemeral name");
        memcpy(a, pt, 4 * ss);
        memcpy(b, pt, 4 * ss);
        CHECK_RC(la.ops->encrypt(la.ctx, a, 4, 7, NULL, 0), 0);
        CHECK_RC(lb.ops->encrypt(lb.ctx, b, 4, 7, NULL, 0), 0);
        CHECK(memcmp(a, pt, 4 * ss) != 0, "ephemeral ciphertext equals the plaintext");
        CHECK(memcmp(a, b, 4 * ss) != 0, "two ephemeral keys gave the same ciphertext");
        CHECK_RC(la.ops->decrypt(la.ctx, a, 4, 7, NULL, 0), 0);
        CHECK(memcmp(a, pt, 4 * ss) == 0, "ephemeral round trip ss %u", ss);
        CHECK_RC(lb.ops->decrypt(lb.ctx, a, 4, 7, NULL, 0), 0);   /* the other key: garbage */
        CHECK(memcmp(a, pt, 4 * ss) != 0, "another ephemeral key decrypted the data");
        la.ops->destroy(la.ctx);
        lb.ops->destroy(lb.ctx);
    }
    struct bc_layer l;
    CHECK_RC(bc_layer_xts_new_ephemeral(1024, &l), -EINVAL);
    CHECK_RC(bc_layer_xts_new_ephemeral(4096, NULL), -EINVAL);
}

/* ---- 2. a new volume reads zeros; geometry; bad parameters -------------------------- */

static void test_new_volume(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "new.img");
    make_empty(path);
    struct vol t;
    REQUIRE(vol_open(&t, path, 8u << 20, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    CHECK(bc_volume_size(t.v) == (8u << 20) && bc_volume_sector_size(t.v) == 4096 && !bc_volume_read_only(t.v),
          "geometry");
    static uint8_t buf[3 << 20];
    memset(buf, 0xEE, sizeof buf);
    CHECK_RC(bc_volume_read(t.v, buf, sizeof buf, 12345), sizeof buf);
    CHECK(all_zero(buf, sizeof buf), "new volume reads zeros");
    CHECK_RC(bc_volume_read(t.v, buf, 8192, (8u << 20) - 100), 100);   /* short at the end */
    CHECK_RC(bc_volume_read(t.v, buf, 10, 8u << 20), 0);
    CHECK_RC(bc_volume_read(t.v, buf, 10, UINT64_MAX - 3), 0);
    CHECK_RC(bc_volume_read(t.v, buf, 0, 0), 0);
    uint64_t blocks = 1;
    CHECK_RC(bc_volume_blocks_used(t.v, &blocks), 0);
    CHECK(blocks == 0, "reads allocate nothing (%" PRIu64 ")", blocks);
    bc_volume_unref(t.v);

    /* bad parameters; nothing is taken on failure */
    const struct bc_storage_ops *ops;
    void *ctx;
    REQUIRE(bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) == 0, "local open");
    struct bc_layer l;
    bc_layer_null_new(512, &l);
    struct bc_volume *v = NULL;
    struct bc_volume_params p = {.size_bytes = 1000, .sector_size = 512};
    CHECK_RC(bc_volume_open(&p, ops, ctx, &l, 1, &v), -EINVAL);
    p.size_bytes = 4096;
    p.sector_size = 1024;
    CHECK_RC(bc_volume_open(&p, ops, ctx, &l, 1, &v), -EINVAL);
    p.sector_size = 512;
    CHECK_RC(bc_volume_open(&p, ops, ctx, &l, BC_MAX_LAYERS + 1, &v), -EINVAL);
    ops->close(ctx);
    CHECK_RC(bc_storage_local_open(g_dir, 1, BC_CACHE_BUFFERED, &ops, &ctx), -EISDIR);
    char missing[4300];
    snprintf(missing, sizeof missing, "%s/missing", g_dir);
    CHECK_RC(bc_storage_local_open(missing, 1, BC_CACHE_BUFFERED, &ops, &ctx), -ENOENT);

    /* one writer at a time (an OFD lock on the file); readers are not locked out */
    REQUIRE(bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) == 0, "writer");
    const struct bc_storage_ops *ops2;
    void *ctx2;
    CHECK_RC(bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops2, &ctx2), -EBUSY);
    REQUIRE(bc_storage_local_open(path, 0, BC_CACHE_BUFFERED, &ops2, &ctx2) == 0, "reader beside a writer");
    ops2->close(ctx2);
    ops->close(ctx);
    REQUIRE(bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) == 0, "writer after close");
    ops->close(ctx);

    /* a FIFO in place of the disk file is refused at once, not waited on */
    char fifo[4300];
    snprintf(fifo, sizeof fifo, "%s/fifo", g_dir);
    REQUIRE(mkfifo(fifo, 0600) == 0, "mkfifo");
    CHECK_RC(bc_storage_local_open(fifo, 0, BC_CACHE_BUFFERED, &ops, &ctx), -EINVAL);
    CHECK_RC(bc_storage_local_open(fifo, 1, BC_CACHE_BUFFERED, &ops, &ctx), -EINVAL);
    unlink(fifo);
}

/* ---- 3. random operations against a byte-array model ------------------------------- */

/* every stored sector is a hole for a zero model sector, or decrypts (OpenSSL) to it */
static void verify_backing_xts(const char *path, const uint8_t *key, const uint8_t *model, uint64_t size,
                               uint32_t ss, uint64_t data_off)
{
    static uint8_t raw[4096], pt[4096];
    int bad = 0;
    for (uint64_t s = 0; s < size / ss && bad < 3; s++) {
        raw_pread(path, raw, ss, data_off + s * ss);
        if (all_zero(raw, ss)) {
            if (!all_zero(model + s * ss, ss)) {
                bad++;
                CHECK(0, "sector %" PRIu64 " is a hole but should hold data", s);
            }
            continue;
        }
        ref_xts(key, 0, s, raw, pt, ss);
        if (memcmp(pt, model + s * ss, ss) != 0) {
            bad++;
            CHECK(0, "stored sector %" PRIu64 " does not decrypt (OpenSSL) to the model", s);
        }
    }
    CHECK(bad == 0, "backing file is aes-xts-plain64 of the model");
}

static void run_model(const char *name, uint32_t ss, int stack, int cache, unsigned nops, uint64_t seed)
{
    char path[4200];
    path_in_dir(path, sizeof path, name);
    make_empty(path);
    const uint64_t max = 6u << 20;
    uint64_t size = 5u << 20;
    struct vol t;
    int rc = vol_open(&t, path, size, ss, stack, cache, 0, NULL);
    if (rc == -EINVAL && cache == BC_CACHE_NONE) {
        printf("  skip %s: no O_DIRECT here\n", name);
        return;
    }
    REQUIRE(rc == 0, "open %s: %d", name, rc);
    uint8_t *model = calloc(1, max), *buf = malloc(3u << 20), *got = malloc(3u << 20);
    struct rng r = {seed};
    int mismatches = 0;
    for (unsigned i = 0; i < nops && mismatches < 5; i++) {
        unsigned kind = (unsigned)rnd_below(&r, 100);
        uint64_t off = rnd_below(&r, size + ss);
        size_t len;
        unsigned lk = (unsigned)rnd_below(&r, 20);
        if (lk == 0)
            len = (size_t)(BC_MAX_REQUEST - 3 * ss + rnd_below(&r, 2u << 20));   /* > BC_MAX_REQUEST */
        else if (lk < 4)
            len = (size_t)rnd_below(&r, 64 * 1024) + 1;
        else
            len = (size_t)rnd_below(&r, 3 * ss) + 1;
        if (kind < 40) {                                        /* write */
            rnd_fill(&r, buf, len);
            long long want = off >= size ? -EFBIG : (long long)(len < size - off ? len : size - off);
            long long got_rc = bc_volume_write(t.v, buf, len, off);
            CHECK(got_rc == want, "write %zu@%" PRIu64 " = %lld, want %lld", len, off, got_rc, want);
            if (want > 0)
                memcpy(model + off, buf, (size_t)want);
        } else if (kind < 80) {                                 /* read */
            long long want = off >= size ? 0 : (long long)(len < size - off ? len : size - off);
            long long got_rc = bc_volume_read(t.v, got, len, off);
            CHECK(got_rc == want, "read %zu@%" PRIu64 " = %lld, want %lld", len, off, got_rc, want);
            if (want > 0 && memcmp(got, model + off, (size_t)want) != 0) {
                mismatches++;
                CHECK(0, "%s op %u: read %zu@%" PRIu64 " differs from the model", name, i, len, off);
            }
        } else if (kind < 95) {                                 /* discard / zero_range */
            rc = kind < 88 ? bc_volume_discard(t.v, off, len) : bc_volume_zero_range(t.v, off, len);
            CHECK_RC(rc, 0);
            if (off < size)
                memset(model + off, 0, (size_t)(len < size - off ? len : size - off));
        } else if (kind < 98) {                                 /* resize (metadata fits below data) */
            uint64_t ns = ((1u << 20) + rnd_below(&r, max - (1u << 20))) / ss * ss;
            CHECK_RC(bc_volume_resize(t.v, ns), 0);
            if (ns < size)
                memset(model + ns, 0, (size_t)(size - ns));
            size = ns;
            CHECK(bc_volume_size(t.v) == size, "size after resize");
        } else {
            CHECK_RC(bc_volume_flush(t.v), 0);
        }
    }
    /* the whole volume, then the stored bytes */
    for (uint64_t off = 0; off < size; off += 3u << 20) {
        size_t n = (size_t)(size - off < (3u << 20) ? size - off : (3u << 20));
        CHECK_RC(bc_volume_read(t.v, got, n, off), n);
        CHECK(memcmp(got, model + off, n) == 0, "%s: final content at %" PRIu64, name, off);
    }
    CHECK_RC(bc_volume_flush(t.v), 0);
    if (stack == STACK_XTS)
        verify_backing_xts(path, t.key, model, size, ss, 1u << 20);
    if (stack == STACK_NULL) {   /* the null layer stores plaintext */
        static uint8_t raw[4096];
        int bad = 0;
        for (uint64_t s = 0; s < size / ss; s++) {
            raw_pread(path, raw, ss, (1u << 20) + s * ss);
            bad += memcmp(raw, model + s * ss, ss) != 0;
        }
        CHECK(bad == 0, "null layer: %d stored sectors differ from the plaintext", bad);
    }
    bc_volume_unref(t.v);
    free(model);
    free(buf);
    free(got);
}

/* systematic unaligned writes: every small offset and length around sector edges */
static void test_unaligned_grid(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "grid.img");
    make_empty(path);
    const uint64_t size = 16 * ss;
    struct vol t;
    REQUIRE(vol_open(&t, path, size, ss, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    uint8_t *model = calloc(1, size), *buf = malloc(size), *got = malloc(size);
    struct rng r = {ss};
    const size_t lens[] = {1, 2, 15, 16, 17, 511, 512, 513, ss - 1, ss, ss + 1, 2 * ss - 1, 2 * ss + 3, 3 * ss};
    const uint64_t bases[] = {0, 1, 7, 16, 511, 512, 513, ss - 1, ss, ss + 1, 3 * ss - 17, 5 * ss + 100};
    int bad = 0;
    for (size_t b = 0; b < sizeof bases / sizeof bases[0]; b++)
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
            uint64_t off = bases[b];
            size_t len = lens[l];
            rnd_fill(&r, buf, len);
            CHECK_RC(bc_volume_write(t.v, buf, len, off), len);
            memcpy(model + off, buf, len);
            /* the touched sectors and one either side */
            uint64_t lo = off / ss ? (off / ss - 1) * ss : 0;
            uint64_t hi = ((off + len) / ss + 2) * ss;
            if (hi > size)
                hi = size;
            CHECK_RC(bc_volume_read(t.v, got, hi - lo, lo), hi - lo);
            if (memcmp(got, model + lo, hi - lo) != 0 && bad++ < 3)
                CHECK(0, "ss %u: write %zu@%" PRIu64 " then read back differs", ss, len, off);
            /* and an unaligned read of exactly the range */
            CHECK_RC(bc_volume_read(t.v, got, len, off), len);
            if (memcmp(got, buf, len) != 0 && bad++ < 3)
                CHECK(0, "ss %u: exact read %zu@%" PRIu64 " differs", ss, len, off);
        }
    CHECK(bad == 0, "unaligned grid ss %u", ss);
    verify_backing_xts(path, t.key, model, size, ss, 1u << 20);
    bc_volume_unref(t.v);
    free(model);
    free(buf);
    free(got);
}

/* ---- 4. discard and zero_range make holes ------------------------------------------- */

static void test_discard_holes(uint32_t ss, int zero_range, int no_punch)
{
    char path[4200];
    path_in_dir(path, sizeof path, "holes.img");
    make_empty(path);
    const uint64_t size = 8u << 20;
    struct spy spy;
    struct vol t;
    REQUIRE(vol_open(&t, path, size, ss, STACK_XTS, BC_CACHE_BUFFERED, 0, &spy) == 0, "open");
    spy.no_punch = no_punch;
    uint8_t *data = malloc(size), *got = malloc(size);
    struct rng r = {42};
    rnd_fill(&r, data, size);
    CHECK_RC(bc_volume_write(t.v, data, size, 0), size);   /* 8 MiB: 8 chunks */
    CHECK_RC(bc_volume_flush(t.v), 0);
    uint64_t b0 = 0, b1 = 0;
    CHECK_RC(bc_volume_blocks_used(t.v, &b0), 0);
    CHECK(b0 >= size / 512, "written volume uses its blocks (%" PRIu64 ")", b0);
    /* an unaligned range of ~5 MiB */
    uint64_t off = 1000 * 1000 + 7, len = 5u * 1000 * 1000 + 3;
    int rc = zero_range ? bc_volume_zero_range(t.v, off, len) : bc_volume_discard(t.v, off, len);
    CHECK_RC(rc, 0);
    memset(data + off, 0, len);
    CHECK_RC(bc_volume_blocks_used(t.v, &b1), 0);
    if (no_punch)
        CHECK(atomic_load(&spy.punches) == 0 && b1 >= b0, "no punch: zeros written instead");
    else
        CHECK(b1 + (len - 2 * ss) / 512 <= b0 + 64, "st_blocks shrink by the range: %" PRIu64 " -> %" PRIu64,
              b0, b1);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, data, size) == 0, "after discard: zeros inside, data outside");
    /* the whole sectors inside are zero in the backing file (holes, no decryption) */
    uint64_t f0 = (off + ss - 1) / ss, f1 = (off + len) / ss;
    uint8_t *raw = malloc((f1 - f0) * ss);
    raw_pread(path, raw, (f1 - f0) * ss, (1u << 20) + f0 * ss);
    CHECK(all_zero(raw, (f1 - f0) * ss), "punched sectors are zero in the backing file");
    free(raw);
    /* a discard inside one sector, at the end, and past the end */
    CHECK_RC(bc_volume_discard(t.v, 3 * ss + 5, 10), 0);
    memset(data + 3 * ss + 5, 0, 10);
    CHECK_RC(bc_volume_discard(t.v, size - 100, 1000), 0);
    memset(data + size - 100, 0, 100);
    CHECK_RC(bc_volume_discard(t.v, size, 1000), 0);
    CHECK_RC(bc_volume_discard(t.v, 10, UINT64_MAX), 0);   /* to the end, no overflow */
    memset(data + 10, 0, size - 10);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, data, size) == 0, "edge discards");
    verify_backing_xts(path, t.key, data, size, ss, 1u << 20);
    bc_volume_unref(t.v);
    CHECK(atomic_load(&spy.closed), "last unref closes the storage");
    free(data);
    free(got);
}

/* ---- 5. resize, read-only, past the end ----------------------------------------------- */

static void test_resize_ro_end(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "resize.img");
    make_empty(path);
    struct vol t;
    REQUIRE(vol_open(&t, path, 1u << 20, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    static uint8_t buf[1 << 20], got[1 << 20];
    memset(buf, 0x5A, sizeof buf);
    CHECK_RC(bc_volume_write(t.v, buf, 1 << 20, 0), 1 << 20);
    CHECK_RC(bc_volume_write(t.v, buf, 1, 1 << 20), -EFBIG);
    CHECK_RC(bc_volume_write(t.v, buf, 10, UINT64_MAX - 2), -EFBIG);
    CHECK_RC(bc_volume_write(t.v, buf, 100, (1 << 20) - 10), 10);        /* clipped */
    CHECK_RC(bc_volume_write(t.v, buf, 0, 5), 0);
    CHECK_RC(bc_volume_resize(t.v, 3u << 20), 0);
    CHECK(bc_volume_size(t.v) == (3u << 20), "grown");
    CHECK_RC(bc_volume_read(t.v, got, 1 << 20, 1 << 20), 1 << 20);
    CHECK(all_zero(got, 1 << 20), "grown area reads zeros");
    CHECK_RC(bc_volume_write(t.v, buf, 4096, (3u << 20) - 4096), 4096);
    CHECK_RC(bc_volume_resize(t.v, 12345), -EINVAL);
    CHECK_RC(bc_volume_resize(t.v, 512 * 1024), 0);                       /* shrink */
    CHECK_RC(bc_volume_read(t.v, got, 4096, 512 * 1024), 0);
    CHECK_RC(bc_volume_write(t.v, buf, 1, 512 * 1024), -EFBIG);
    CHECK_RC(bc_volume_resize(t.v, 3u << 20), 0);                         /* and back */
    CHECK_RC(bc_volume_read(t.v, got, 1 << 20, 512 * 1024), 1 << 20);
    CHECK(all_zero(got, 1 << 20), "dropped sectors read zeros after growing again");
    CHECK_RC(bc_volume_read(t.v, got, 512 * 1024, 0), 512 * 1024);
    CHECK(memcmp(got, buf, 512 * 1024) == 0, "kept sectors keep their data");
    bc_volume_unref(t.v);

    /* read-only: a read-only descriptor, every write refused with EROFS */
    REQUIRE(vol_open(&t, path, 3u << 20, 4096, STACK_XTS, BC_CACHE_BUFFERED, 1, NULL) == 0, "open ro");
    CHECK(bc_volume_read_only(t.v), "read_only");
    CHECK_RC(bc_volume_read(t.v, got, 4096, 0), 4096);
    CHECK(memcmp(got, buf, 4096) == 0, "read-only reads");
    CHECK_RC(bc_volume_write(t.v, buf, 4096, 0), -EROFS);
    CHECK_RC(bc_volume_discard(t.v, 0, 4096), -EROFS);
    CHECK_RC(bc_volume_zero_range(t.v, 0, 4096), -EROFS);
    CHECK_RC(bc_volume_flush(t.v), 0);
    CHECK_RC(bc_volume_read(t.v, got, 4096, 0), 4096);
    CHECK(memcmp(got, buf, 4096) == 0, "nothing changed");
    bc_volume_unref(t.v);
}

/* ---- 6. concurrency: 8 threads, replayed in the engine's order ------------------- */

#define CT_THREADS 8
#define CT_OPS 1500

struct ct_thread {
    struct bc_volume *v;
    struct op *ops;
    size_t n;
    uint32_t ss;
};

static uint8_t gen_byte(uint64_t id, uint64_t pos)
{
    return (uint8_t)(splitmix64(id * 0x100000001B3ull ^ pos) >> 32);
}

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void *ct_main(void *arg)
{
    struct ct_thread *th = arg;
    uint8_t *buf = malloc(4 * th->ss);
    for (size_t i = 0; i < th->n; i++) {
        struct op *o = &th->ops[i];
        cur_op = o;
        switch (o->type) {
        case 0:
            o->rc = bc_volume_read(th->v, buf, o->len, o->off);
            o->hash = o->rc > 0 ? fnv(buf, (size_t)o->rc) : 0;
            break;
        case 1:
            for (size_t k = 0; k < o->len; k++)
                buf[k] = gen_byte(o->id, o->off + k);
            o->rc = bc_volume_write(th->v, buf, o->len, o->off);
            break;
        case 2:
            o->rc = bc_volume_discard(th->v, o->off, o->len);
            break;
        default:
            o->rc = bc_volume_zero_range(th->v, o->off, o->len);
            break;
        }
        cur_op = NULL;
    }
    free(buf);
    return NULL;
}

static int cmp_seq(const void *a, const void *b)
{
    const struct op *x = *(const struct op *const *)a, *y = *(const struct op *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void test_concurrency(uint32_t ss, int stack)
{
    char path[4200];
    path_in_dir(path, sizeof path, "conc.img");
    make_empty(path);
    const uint64_t size = 48ull * ss;   /* small: threads collide all the time */
    struct spy spy;
    struct vol t;
    REQUIRE(vol_open(&t, path, size, ss, stack, BC_CACHE_BUFFERED, 0, &spy) == 0, "open");
    uint8_t *model = malloc(size);
    for (uint64_t p = 0; p < size; p++)
        model[p] = gen_byte(0, p);
    CHECK_RC(bc_volume_write(t.v, model, size, 0), size);
    static struct op ops[CT_THREADS][CT_OPS];
    static struct op *order[CT_THREADS * CT_OPS];
    struct ct_thread th[CT_THREADS];
    struct rng r = {ss * 31 + (uint64_t)stack};
    for (int k = 0; k < CT_THREADS; k++) {
        for (int i = 0; i < CT_OPS; i++) {
            struct op *o = &ops[k][i];
            unsigned kind = (unsigned)rnd_below(&r, 100);
            o->type = kind < 40 ? 1 : kind < 80 ? 0 : kind < 90 ? 2 : 3;
            o->off = rnd_below(&r, size - 1);
            o->len = (size_t)rnd_below(&r, 3 * ss) + 1;
            if (o->len > size - o->off)
                o->len = (size_t)(size - o->off);
            o->id = (uint64_t)k * CT_OPS + (uint64_t)i + 1;
            o->seq = UINT64_MAX;
            order[k * CT_OPS + i] = o;
        }
        th[k] = (struct ct_thread){t.v, ops[k], CT_OPS, ss};
    }
    pthread_t tids[CT_THREADS];
    for (int k = 0; k < CT_THREADS; k++)
        pthread_create(&tids[k], NULL, ct_main, &th[k]);
    for (int k = 0; k < CT_THREADS; k++)
        pthread_join(tids[k], NULL);
    /* replay in the order the engine serialised the operations */
    qsort(order, CT_THREADS * CT_OPS, sizeof order[0], cmp_seq);
    int bad_rc = 0, bad_read = 0, unseen = 0;
    for (size_t i = 0; i < CT_THREADS * CT_OPS; i++) {
        struct op *o = order[i];
        if (o->seq == UINT64_MAX)
            unseen++;
        long long want = o->type <= 1 ? (long long)o->len : 0;
        if (o->rc != want)
            bad_rc++;
        switch (o->type) {
        case 0:
            if (fnv(model + o->off, o->len) != o->hash)
                bad_read++;
            break;
        case 1:
            for (size_t k = 0; k < o->len; k++)
                model[o->off + k] = gen_byte(o->id, o->off + k);
            break;
        default:
            memset(model + o->off, 0, o->len);
        }
    }
    CHECK(unseen == 0, "%d operations never reached the store", unseen);
    CHECK(bad_rc == 0, "%d operations returned the wrong count", bad_rc);
    CHECK(bad_read == 0, "ss %u stack %d: %d of %d reads differ from the serial replay", ss, stack, bad_read,
          CT_THREADS * CT_OPS);
    uint8_t *got = malloc(size);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, model, size) == 0, "ss %u stack %d: final content differs from the serial replay", ss,
          stack);
    if (stack == STACK_XTS)
        verify_backing_xts(path, t.key, model, size, ss, 1u << 20);
    bc_volume_unref(t.v);
    free(got);
    free(model);
}

/* disjoint ranges proceed while a request is stuck in the store; overlapping ones wait */
struct bg_io { struct bc_volume *v; uint64_t off; size_t len; atomic_int done; long long rc; int write; };
/* ---- bc_parallel.c: parts of one request on helper threads ------------------------- */

struct ppart {
    uint64_t in, out;
    pthread_t ran_on;
    unsigned sleep_us;   /* a part that takes a while */
};

static void ppart_fn(void *p)
{
    struct ppart *x = p;
    x->out = splitmix64(x->in);
    x->ran_on = pthread_self();
    if (x->sleep_us)
        usleep(x->sleep_us);
}

static atomic_int g_par_bad, g_par_helped;

static void *par_main(void *arg)
{
    uint64_t base = (uint64_t)(uintptr_t)arg;
    for (unsigned r = 0; r < 3000; r++) {
        struct ppart parts[6];
        void *args[6];
        size_t n = 1 + r % 6;   /* 1 part up to more parts than helpers */
        for (size_t i = 0; i < n; i++) {
            parts[i] = (struct ppart){.in = base * 100000 + r * 10 + i};
            args[i] = &parts[i];
        }
        bc_parallel_run(ppart_fn, args, n);
        for (size_t i = 0; i < n; i++) {
            if (parts[i].out != splitmix64(parts[i].in))
                atomic_fetch_add(&g_par_bad, 1);
            if (!pthread_equal(parts[i].ran_on, pthread_self()))
                atomic_fetch_add(&g_par_helped, 1);
        }
    }
    return NULL;
}

/* Every part runs exactly once and is done when bc_parallel_run returns, from 4 calling
 * threads at once; helpers take parts (on a host with more than one CPU); a forked child
 * (no helper threads there) still gets every part done. */
static void test_parallel_parts(void)
{
    unsigned w = bc_parallel_width();
    CHECK(w >= 1 && w <= 4, "width %u", w);
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1 && getenv("BLOCKCRYPT_CRYPTO_THREADS") == NULL)
        CHECK(w >= 2, "helpers on %ld CPUs", sysconf(_SC_NPROCESSORS_ONLN));
    atomic_store(&g_par_bad, 0);
    atomic_store(&g_par_helped, 0);
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, par_main, (void *)(i + 1));
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    CHECK(atomic_load(&g_par_bad) == 0, "%d parts wrong", atomic_load(&g_par_bad));
    /* On a loaded host the quick parts above may all be taken back by their callers
     * before a helper is scheduled; parts that take a while give the helpers time. */
    for (int round = 0; w >= 2 && atomic_load(&g_par_helped) == 0 && round < 200; round++) {
        struct ppart parts[2] = {{.in = 1, .sleep_us = 10000}, {.in = 2, .sleep_us = 10000}};
        void *args[2] = {&parts[0], &parts[1]};
        bc_parallel_run(ppart_fn, args, 2);
        for (int i = 0; i < 2; i++)
            if (!pthread_equal(parts[i].ran_on, pthread_self()))
                atomic_fetch_add(&g_par_helped, 1);
    }
    if (w >= 2)
        CHECK(atomic_load(&g_par_helped) > 0, "no part ran on a helper");
    pid_t pid = fork();
    if (pid == 0) {
        atomic_store(&g_par_bad, 0);
        par_main((void *)(uintptr_t)9);
        _exit(atomic_load(&g_par_bad) == 0 ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "a forked child's parts (status %d)", status);
}

static void *bg_main(void *arg)
{
    struct bg_io *b = arg;
    uint8_t buf[8192];
    memset(buf, 0x11, sizeof buf);
    b->rc = b->write ? bc_volume_write(b->v, buf, b->len, b->off) : bc_volume_read(b->v, buf, b->len, b->off);
    atomic_store(&b->done, 1);
    return NULL;
}

static void test_range_lock_parallel(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "rl.img");
    make_empty(path);
    struct spy spy;
    struct vol t;
    REQUIRE(vol_open(&t, path, 1u << 20, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, &spy) == 0, "open");
    pthread_mutex_lock(&spy.mu);
    spy.blocking = 1;
    spy.block_off = (1u << 20) + 10 * 4096;   /* the read of sectors 10.. */
    pthread_mutex_unlock(&spy.mu);
    struct bg_io a = {t.v, 10 * 4096, 8192, 0, 0, 0};   /* sectors 10-11: blocks in the store */
    struct bg_io b = {t.v, 20 * 4096, 8192, 0, 0, 1};   /* disjoint */
    struct bg_io c = {t.v, 11 * 4096 + 100, 50, 0, 0, 1};   /* overlaps sector 11 */
    pthread_t ta, tb, tc;
    pthread_create(&ta, NULL, bg_main, &a);
    pthread_mutex_lock(&spy.mu);
    while (!spy.blocked)
        pthread_cond_wait(&spy.cv, &spy.mu);
    pthread_mutex_unlock(&spy.mu);
    pthread_create(&tb, NULL, bg_main, &b);
    pthread_create(&tc, NULL, bg_main, &c);
    pthread_join(tb, NULL);
    CHECK(atomic_load(&b.done) && b.rc == 8192, "a disjoint write completes while another request is held");
    sleep_ms(100);
    CHECK(!atomic_load(&c.done), "an overlapping write waits for the range");
    pthread_mutex_lock(&spy.mu);
    spy.released = 1;
    spy.blocking = 0;
    pthread_cond_broadcast(&spy.cv);
    pthread_mutex_unlock(&spy.mu);
    pthread_join(ta, NULL);
    pthread_join(tc, NULL);
    CHECK(a.rc == 8192 && c.rc == 50, "both complete after release (%lld, %lld)", a.rc, c.rc);
    bc_volume_unref(t.v);
}

/* ---- 7. the revocation gate ----------------------------------------------------------- */

struct rv_arg { struct bc_volume *v; atomic_int done; int rc; };
static void *revoke_main(void *arg)
{
    struct rv_arg *r = arg;
    r->rc = bc_volume_revoke(r->v, EKEYREVOKED, "key k1 disabled");
    atomic_store(&r->done, 1);
    return NULL;
}

/* a canary + XTS stack on an open volume's geometry */
static int canary_stack(struct canary *c, const uint8_t *key, uint32_t ss, struct bc_layer ls[2])
{
    memset(c, 0, sizeof *c);
    ls[0] = (struct bc_layer){&canary_ops, c};
    return bc_layer_xts_new(key, 64, ss, &ls[1]);
}

static void test_revoke_waits(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "gate.img");
    make_empty(path);
    struct spy spy;
    struct vol t;
    REQUIRE(vol_open(&t, path, 1u << 20, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, &spy) == 0, "open");
    struct canary can;
    struct bc_layer ls[2];
    REQUIRE(canary_stack(&can, t.key, 4096, ls) == 0, "layers");
    CHECK_RC(bc_volume_set_layers(t.v, ls, 2), 0);
    static uint8_t buf[8192];
    memset(buf, 0x77, sizeof buf);
    CHECK_RC(bc_volume_write(t.v, buf, sizeof buf, 10 * 4096), sizeof buf);
    char reason[BC_REASON_MAX];
    CHECK_RC(bc_volume_gate(t.v, reason, sizeof reason), 0);
    CHECK(reason[0] == 0, "no reason while serving");

    pthread_mutex_lock(&spy.mu);
    spy.blocking = 1;
    spy.block_off = (1u << 20) + 10 * 4096;
    pthread_mutex_unlock(&spy.mu);
    struct bg_io a = {t.v, 10 * 4096, 8192, 0, 0, 0};
    pthread_t ta, tr, td;
    pthread_create(&ta, NULL, bg_main, &a);
    pthread_mutex_lock(&spy.mu);
    while (!spy.blocked)
        pthread_cond_wait(&spy.cv, &spy.mu);
    pthread_mutex_unlock(&spy.mu);
    struct rv_arg r = {t.v, 0, 0};
    pthread_create(&tr, NULL, revoke_main, &r);
    sleep_ms(100);
    CHECK(!atomic_load(&r.done), "revoke waits for the request in flight");
    CHECK(!atomic_load(&can.destroyed), "layers intact while a request is in flight");
    struct bg_io d = {t.v, 30 * 4096, 4096, 0, 0, 0};   /* arrives while revoke waits */
    pthread_create(&td, NULL, bg_main, &d);
    sleep_ms(50);
    CHECK(!atomic_load(&d.done), "a new request waits behind a pending revoke");
    pthread_mutex_lock(&spy.mu);
    spy.released = 1;
    spy.blocking = 0;
    pthread_cond_broadcast(&spy.cv);
    pthread_mutex_unlock(&spy.mu);
    pthread_join(ta, NULL);
    pthread_join(tr, NULL);
    pthread_join(td, NULL);
    CHECK(a.rc == 8192, "the request in flight completes (%lld)", a.rc);
    CHECK_RC(r.rc, 0);
    CHECK(d.rc == -EKEYREVOKED, "the request behind the revoke fails (%lld)", d.rc);
    CHECK(atomic_load(&can.destroyed), "revoke destroyed the layers");
    CHECK_RC(bc_volume_gate(t.v, reason, sizeof reason), EKEYREVOKED);
    CHECK(strcmp(reason, "key k1 disabled") == 0, "reason '%s'", reason);
    CHECK_RC(bc_volume_read(t.v, buf, 10, 0), -EKEYREVOKED);
    CHECK_RC(bc_volume_write(t.v, buf, 10, 0), -EKEYREVOKED);
    CHECK_RC(bc_volume_discard(t.v, 0, 4096), -EKEYREVOKED);
    CHECK_RC(bc_volume_zero_range(t.v, 0, 4096), -EKEYREVOKED);
    CHECK_RC(bc_volume_flush(t.v), -EKEYREVOKED);
    CHECK(atomic_load(&can.late_calls) == 0, "no layer call after destroy");
    CHECK_RC(bc_volume_revoke(t.v, 0, "x"), -EINVAL);
    CHECK_RC(bc_volume_revoke(t.v, EACCES, "access removed"), 0);   /* a second revoke updates */
    CHECK_RC(bc_volume_gate(t.v, reason, sizeof reason), EACCES);
    CHECK(strcmp(reason, "access removed") == 0, "reason updated");
    /* a stack with another metadata size is refused and stays the caller's */
    struct xorsum xs = {1, 8, 0};
    struct bc_layer bad = {&xs8_ops, &xs};
    CHECK_RC(bc_volume_set_layers(t.v, &bad, 1), -EINVAL);
    CHECK(!atomic_load(&xs.destroyed), "refused layers are not destroyed");
    /* set_layers restores service */
    struct canary can2;
    REQUIRE(canary_stack(&can2, t.key, 4096, ls) == 0, "layers");
    CHECK_RC(bc_volume_set_layers(t.v, ls, 2), 0);
    CHECK_RC(bc_volume_gate(t.v, reason, sizeof reason), 0);
    memset(buf, 0, sizeof buf);
    CHECK_RC(bc_volume_read(t.v, buf, 8192, 10 * 4096), 8192);
    uint8_t want[8192];
    memset(want, 0x77, sizeof want);
    CHECK(memcmp(buf, want, sizeof want) == 0, "data back after set_layers");
    /* refcount: an extra ref keeps it; the last unref destroys layers and closes */
    bc_volume_ref(t.v);
    bc_volume_unref(t.v);
    CHECK(!atomic_load(&spy.closed) && !atomic_load(&can2.destroyed), "still open with a ref left");
    CHECK_RC(bc_volume_read(t.v, buf, 10, 0), 10);
    bc_volume_unref(t.v);
    CHECK(atomic_load(&spy.closed) && atomic_load(&can2.destroyed), "last unref destroys and closes");
}

/* the race: 8 threads of I/O over a known pattern; revoke in the middle */
#define RR_THREADS 8
static uint8_t pattern_byte(uint64_t pos)
{
    uint8_t b = (uint8_t)(splitmix64(pos / 8) >> (8 * (pos % 8)));
    return (b == 0 || b == 0xA5) ? 0x3C : b;   /* never 0 nor the fill byte 0xA5 */
}

struct rr_shared {
    struct bc_volume *v;
    uint64_t size;
    atomic_int stop;
    _Atomic uint64_t t_revoked;      /* taken after revoke returned; 0 before */
    atomic_long ok_before, ok_inflight, failed, violations, wrong_data, leaked, bad_errno, writes_after;
};
struct rr_thread { struct rr_shared *sh; uint64_t seed; };

static void *rr_main(void *arg)
{
    struct rr_thread *th = arg;
    struct rr_shared *sh = th->sh;
    struct rng r = {th->seed};
    size_t cap = 64 * 1024;
    uint8_t *buf = malloc(cap);
    while (!atomic_load(&sh->stop)) {
        uint64_t off = rnd_below(&r, sh->size - 1);
        size_t len = (size_t)rnd_below(&r, cap) + 1;
        if (len > sh->size - off)
            len = (size_t)(sh->size - off);
        int write = rnd_below(&r, 10) < 3;
        if (write)
            for (size_t i = 0; i < len; i++)
                buf[i] = pattern_byte(off + i);
        else
            memset(buf, 0xA5, len);
        uint64_t t_start = now_ns();
        long long rc = write ? bc_volume_write(sh->v, buf, len, off) : bc_volume_read(sh->v, buf, len, off);
        uint64_t t_end = now_ns();
        uint64_t t_rev = atomic_load(&sh->t_revoked);
        if (rc >= 0) {
            if (t_rev != 0 && t_start > t_rev) {
                atomic_fetch_add(&sh->violations, 1);   /* started after revoke returned */
                if (write)
                    atomic_fetch_add(&sh->writes_after, 1);
            } else if (t_rev != 0 && t_end > t_rev) {
                atomic_fetch_add(&sh->ok_inflight, 1);
            } else {
                atomic_fetch_add(&sh->ok_before, 1);
            }
            if (!write)
                for (size_t i = 0; i < (size_t)rc; i++)
                    if (buf[i] != pattern_byte(off + i)) {
                        atomic_fetch_add(&sh->wrong_data, 1);
                        break;
                    }
        } else {
            atomic_fetch_add(&sh->failed, 1);
            if (rc != -EKEYREVOKED)
                atomic_fetch_add(&sh->bad_errno, 1);
            if (!write)
                for (size_t i = 0; i < len; i++)
                    if (buf[i] == pattern_byte(off + i)) {
                        atomic_fetch_add(&sh->leaked, 1);   /* plaintext behind a failure */
                        break;
                    }
        }
    }
    free(buf);
    return NULL;
}

static void test_revoke_race(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "race.img");
    make_empty(path);
    const uint64_t size = 8u << 20;
    struct vol t;
    REQUIRE(vol_open(&t, path, size, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    uint8_t *pat = malloc(size), *got = malloc(size);
    for (uint64_t p = 0; p < size; p++)
        pat[p] = pattern_byte(p);
    CHECK_RC(bc_volume_write(t.v, pat, size, 0), size);
    long total_inflight = 0, total_fail = 0, total_before = 0;
    for (int round = 0; round < 6; round++) {
        struct canary can;
        struct bc_layer ls[2];
        REQUIRE(canary_stack(&can, t.key, 4096, ls) == 0, "layers");
        CHECK_RC(bc_volume_set_layers(t.v, ls, 2), 0);
        struct rr_shared sh;
        memset(&sh, 0, sizeof sh);
        sh.v = t.v;
        sh.size = size;
        struct rr_thread th[RR_THREADS];
        pthread_t tids[RR_THREADS];
        for (int k = 0; k < RR_THREADS; k++) {
            th[k] = (struct rr_thread){&sh, (uint64_t)round * 100 + (uint64_t)k};
            pthread_create(&tids[k], NULL, rr_main, &th[k]);
        }
        sleep_ms(20 + 10 * (unsigned)round);
        CHECK_RC(bc_volume_revoke(t.v, EKEYREVOKED, "key disabled"), 0);
        atomic_store(&sh.t_revoked, now_ns());
        CHECK(atomic_load(&can.destroyed), "layers destroyed by revoke");
        sleep_ms(30);
        atomic_store(&sh.stop, 1);
        for (int k = 0; k < RR_THREADS; k++)
            pthread_join(tids[k], NULL);
        CHECK(atomic_load(&sh.violations) == 0, "round %d: %ld requests that started after revoke succeeded",
              round, atomic_load(&sh.violations));
        CHECK(atomic_load(&sh.wrong_data) == 0, "round %d: wrong data", round);
        CHECK(atomic_load(&sh.leaked) == 0, "round %d: plaintext behind a failed read", round);
        CHECK(atomic_load(&sh.bad_errno) == 0, "round %d: failures with another errno", round);
        CHECK(atomic_load(&can.late_calls) == 0, "round %d: a layer was called after its destroy", round);
        CHECK(atomic_load(&sh.ok_before) > 0 && atomic_load(&sh.failed) > 0, "round %d: I/O on both sides", round);
        total_inflight += atomic_load(&sh.ok_inflight);
        total_fail += atomic_load(&sh.failed);
        total_before += atomic_load(&sh.ok_before);
    }
    printf("  revoke race: %ld ok before, %ld ok in flight across the revoke, %ld refused after\n", total_before,
           total_inflight, total_fail);
    struct canary can;
    struct bc_layer ls[2];
    REQUIRE(canary_stack(&can, t.key, 4096, ls) == 0, "layers");
    CHECK_RC(bc_volume_set_layers(t.v, ls, 2), 0);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, pat, size) == 0, "the disk still holds the pattern after the races");
    bc_volume_unref(t.v);
    free(pat);
    free(got);
}

/* ---- 8. per-sector metadata ----------------------------------------------------------- */

static void test_metadata(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "meta.img");
    make_empty(path);
    const uint64_t size = 64ull * ss, data_off = 2u << 20, meta_off = 64u * 1024, M = 24;
    struct vol t;
    REQUIRE(vol_open(&t, path, size, ss, STACK_META, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    uint8_t *buf = malloc(size), *got = malloc(size), *raw = malloc(ss), *c = malloc(ss);
    memset(got, 0xEE, size);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(all_zero(got, size), "new metadata volume reads zeros");
    struct rng r = {ss};
    rnd_fill(&r, buf, size);
    CHECK_RC(bc_volume_write(t.v, buf, size - 7, 3), size - 7);   /* unaligned both ends */
    uint8_t *model = calloc(1, size);
    memcpy(model + 3, buf, size - 7);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, model, size) == 0, "metadata stack round trip");
    CHECK_RC(bc_volume_flush(t.v), 0);
    /* the exact stored bytes and metadata slices, computed independently */
    int bad = 0;
    for (uint64_t s = 0; s < size / ss; s++) {
        uint8_t m[24], want_m[24];
        memcpy(c, model + s * ss, ss);
        uint64_t sa = xs_sum(&t.xa, c, ss, s);
        xs_xor(&t.xa, c, ss, s);
        ref_xts(t.key, 1, s, c, raw, ss);
        uint64_t sb = xs_sum(&t.xb, raw, ss, s), nb = ~sb;
        xs_xor(&t.xb, raw, ss, s);
        memcpy(want_m, &sa, 8);
        memcpy(want_m + 8, &sb, 8);
        memcpy(want_m + 16, &nb, 8);
        raw_pread(path, c, ss, data_off + s * ss);
        raw_pread(path, m, M, meta_off + s * M);
        bad += memcmp(c, raw, ss) != 0 || memcmp(m, want_m, M) != 0;
    }
    CHECK(bad == 0, "ss %u: %d sectors differ from layer0 -> XTS -> layer2 with slices 0/8 stride 24", ss, bad);
    /* tampering */
    uint8_t b;
    raw_pread(path, &b, 1, data_off + 3 * ss + 77);
    b ^= 1;
    raw_pwrite(path, &b, 1, data_off + 3 * ss + 77);
    memset(got, 0x5A, 5 * ss);
    CHECK_RC(bc_volume_read(t.v, got, 5 * ss, 1 * ss), -EBADMSG);
    CHECK(all_zero(got, 5 * ss), "a failed read leaves no plaintext behind");
    CHECK_RC(bc_volume_read(t.v, got, ss, 4 * ss), ss);
    CHECK_RC(bc_volume_write(t.v, buf, 10, 3 * ss + 1), -EBADMSG);   /* RMW of a tampered sector */
    b ^= 1;
    raw_pwrite(path, &b, 1, data_off + 3 * ss + 77);
    CHECK_RC(bc_volume_read(t.v, got, ss, 3 * ss), ss);
    for (int slice = 0; slice < 3; slice++) {   /* each layer's slice is checked */
        uint64_t mo = meta_off + 5 * M + (uint64_t)slice * 8 + 3;
        raw_pread(path, &b, 1, mo);
        b ^= 0x80;
        raw_pwrite(path, &b, 1, mo);
        CHECK_RC(bc_volume_read(t.v, got, 1, 5 * ss + 9), -EBADMSG);
        b ^= 0x80;
        raw_pwrite(path, &b, 1, mo);
        CHECK_RC(bc_volume_read(t.v, got, 1, 5 * ss + 9), 1);
    }
    uint8_t zeros[4096] = {0};
    raw_pwrite(path, zeros, M, meta_off + 6 * M);      /* metadata gone, data intact */
    CHECK_RC(bc_volume_read(t.v, got, ss, 6 * ss), -EBADMSG);
    raw_pwrite(path, zeros, ss, data_off + 7 * ss);    /* data gone, metadata intact */
    CHECK_RC(bc_volume_read(t.v, got, ss, 7 * ss), -EBADMSG);
    raw_pwrite(path, zeros, ss, data_off + 8 * ss);    /* both gone: a hole */
    raw_pwrite(path, zeros, M, meta_off + 8 * M);
    memset(got, 0xEE, ss);
    CHECK_RC(bc_volume_read(t.v, got, ss, 8 * ss), ss);
    CHECK(all_zero(got, ss), "zero data + zero metadata is a hole");
    /* rewrite the damaged sectors; discard makes holes of data and metadata */
    CHECK_RC(bc_volume_write(t.v, model + 6 * ss, 3 * ss, 6 * ss), 3 * ss);
    CHECK_RC(bc_volume_discard(t.v, 10 * ss + 1, 20 * ss), 0);
    memset(model + 10 * ss + 1, 0, 20 * ss);
    CHECK_RC(bc_volume_flush(t.v), 0);
    uint8_t *mraw = malloc(19 * M);
    raw_pread(path, mraw, 19 * M, meta_off + 11 * M);
    CHECK(all_zero(mraw, 19 * M), "discard punches the metadata of whole sectors");
    raw_pread(path, mraw, M, meta_off + 10 * M);
    CHECK(!all_zero(mraw, M), "the partial edge sector is rewritten (zeros, encrypted)");
    free(mraw);
    CHECK_RC(bc_volume_read(t.v, got, size, 0), size);
    CHECK(memcmp(got, model, size) == 0, "after tamper repair and discard");
    bc_volume_unref(t.v);
    CHECK(atomic_load(&t.xa.destroyed) && atomic_load(&t.xb.destroyed), "layers destroyed on close");
    free(buf);
    free(got);
    free(raw);
    free(c);
    free(model);
}

/* ---- 9. counters ---------------------------------------------------------------------- */

static void test_stats(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "stats.img");
    make_empty(path);
    struct vol t;
    REQUIRE(vol_open(&t, path, 1u << 20, 512, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) == 0, "open");
    static uint8_t buf[65536];
    for (int i = 0; i < 5; i++)
        bc_volume_write(t.v, buf, 1000, (uint64_t)i * 7000);
    for (int i = 0; i < 3; i++)
        bc_volume_read(t.v, buf, 65536, 100);
    bc_volume_read(t.v, buf, 10, 2u << 20);     /* past the end: 0 bytes, not an error */
    bc_volume_write(t.v, buf, 10, 2u << 20);    /* EFBIG: an error */
    bc_volume_discard(t.v, 0, 4096);
    bc_volume_zero_range(t.v, 0, 4096);
    bc_volume_flush(t.v);
    struct bc_stats st;
    bc_volume_stats(t.v, &st);
    CHECK(st.reads == 4 && st.writes == 6 && st.discards == 2 && st.flushes == 1 && st.errors == 1,
          "counts r%" PRIu64 " w%" PRIu64 " d%" PRIu64 " f%" PRIu64 " e%" PRIu64, st.reads, st.writes,
          st.discards, st.flushes, st.errors);
    CHECK(st.bytes_read == 3 * 65536 && st.bytes_written == 5000, "bytes %" PRIu64 "/%" PRIu64, st.bytes_read,
          st.bytes_written);
    uint64_t sum = 0;
    for (int i = 0; i < 32; i++)
        sum += st.lat_us_hist[i];
    CHECK(sum == 13, "histogram counts every request (%" PRIu64 ")", sum);
    bc_volume_unref(t.v);
}

/* ---- bench ------------------------------------------------------------------------------ */

static double mbps(uint64_t bytes, uint64_t ns) { return (double)bytes / 1e6 / ((double)ns / 1e9); }

static double bench_one(struct bc_volume *v, int fd, uint64_t size, size_t bs, int write)
{
    uint8_t *buf = aligned_alloc(4096, bs);
    memset(buf, 0x42, bs);
    struct rng r = {bs};
    uint64_t total = 0, t0 = now_ns();
    uint64_t budget = bs >= (1u << 20) ? 512ull << 20 : 128ull << 20;
    for (uint64_t i = 0; total < budget; i++) {
        uint64_t off = bs >= (1u << 20) ? (i * bs) % size : rnd_below(&r, size / bs) * bs;
        ssize_t n;
        if (v != NULL)
            n = write ? bc_volume_write(v, buf, bs, off) : bc_volume_read(v, buf, bs, off);
        else
            n = write ? pwrite(fd, buf, bs, (off_t)((1u << 20) + off)) : pread(fd, buf, bs, (off_t)((1u << 20) + off));
        if (n != (ssize_t)bs) {
            fprintf(stderr, "bench I/O failed: %zd\n", n);
            break;
        }
        total += bs;
    }
    free(buf);
    return mbps(total, now_ns() - t0);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* single thread; the file is fully written first (no page allocation in the runs);
 * the median of 3 passes, each pass running every configuration in turn */
static int bench(void)
{
    char path[4200];
    path_in_dir(path, sizeof path, "bench.img");
    make_empty(path);
    const uint64_t size = 256u << 20;
    int fd = open(path, O_RDWR);
    uint8_t *fill = malloc(1u << 20);
    memset(fill, 0x17, 1u << 20);
    for (uint64_t off = 0; off < size + (1u << 20); off += 1u << 20)
        if (pwrite(fd, fill, 1u << 20, (off_t)off) != (ssize_t)(1u << 20))
            return 1;
    free(fill);
    struct vol tx, tn;
    if (vol_open(&tx, path, size, 4096, STACK_XTS, BC_CACHE_BUFFERED, 0, NULL) != 0 ||
        vol_open(&tn, path, size, 4096, STACK_NULL, BC_CACHE_BUFFERED, 0, NULL) != 0)
        return 1;
    struct bc_volume *vols[3] = {NULL, tn.v, tx.v};
    const char *names[3] = {"raw pread/pwrite", "engine, null layer", "engine, aes-xts"};
    const size_t sizes[2] = {4096, 1u << 20};
    double res[3][2][2][3];   /* config, bs, write, pass */
    for (int pass = 0; pass < 3; pass++)
        for (int c = 0; c < 3; c++)
            for (int b = 0; b < 2; b++)
                for (int w = 1; w >= 0; w--)
                    res[c][b][w][pass] = bench_one(vols[c], fd, size, sizes[b], w);
    printf("single thread, %s, 256 MiB file, MB/s (median of 3)\n", g_dir);
    printf("  %-20s %10s %10s %10s %10s\n", "", "read 4K", "read 1M", "write 4K", "write 1M");
    for (int c = 0; c < 3; c++) {
        double m[2][2];
        for (int b = 0; b < 2; b++)
            for (int w = 0; w < 2; w++) {
                qsort(res[c][b][w], 3, sizeof(double), cmp_double);
                m[b][w] = res[c][b][w][1];
            }
        printf("  %-20s %10.0f %10.0f %10.0f %10.0f\n", names[c], m[0][0], m[1][0], m[0][1], m[1][1]);
    }
    /* the layer alone, in memory: compare with `openssl speed -evp aes-256-xts -bytes 4096` */
    uint8_t *mem = aligned_alloc(4096, 1u << 20);
    memset(mem, 0x33, 1u << 20);
    struct bc_layer *xl = NULL;
    struct bc_layer l;
    if (bc_layer_xts_new(tx.key, 64, 4096, &l) == 0)
        xl = &l;
    for (int enc = 1; xl != NULL && enc >= 0; enc--) {
        double r3[3];
        for (int pass = 0; pass < 3; pass++) {
            uint64_t t0 = now_ns();
            for (int i = 0; i < 512; i++)
                enc ? xl->ops->encrypt(xl->ctx, mem, 256, (uint64_t)i * 256, NULL, 0)
                    : xl->ops->decrypt(xl->ctx, mem, 256, (uint64_t)i * 256, NULL, 0);
            r3[pass] = mbps(512ull << 20, now_ns() - t0);
        }
        qsort(r3, 3, sizeof(double), cmp_double);
        printf("  xts layer in memory, %s 4096-byte sectors: %.0f MB/s\n", enc ? "encrypt" : "decrypt", r3[1]);
    }
    if (xl)
        xl->ops->destroy(xl->ctx);
    free(mem);
    bc_volume_unref(tx.v);
    bc_volume_unref(tn.v);
    close(fd);
    return 0;
}

/* ---- main -------------------------------------------------------------------------------- */

static void rm_dir(const char *dir)
{
    char cmd[4400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

#define RUN(call)                                                                            \
    do {                                                                                     \
        int _f0 = atomic_load(&g_failures);                                                  \
        uint64_t _t0 = now_ns();                                                             \
        call;                                                                                \
        printf("%-4s %-44s %6.0f ms\n", atomic_load(&g_failures) == _f0 ? "ok" : "FAIL", #call, \
               (double)(now_ns() - _t0) / 1e6);                                              \
        fflush(stdout);                                                                      \
    } while (0)

/* ---- fault injection at the storage seam ----------------------------------------------- */

/* Random unaligned reads, writes and flushes over a backend that fails 1 in a few calls with
 * EIO or ENOSPC and writes short prefixes: every error reaches the caller, a failed flush
 * stays failed (fsyncgate), every acknowledged write reads back (now and after reopening
 * without faults), and a second disk on another file keeps serving throughout. */
static struct bc_volume *fault_vol(const char *path, uint32_t ss, uint64_t size, const uint8_t *key,
                                   const struct bc_fault_plan *plan, struct bc_fault_counts *counts)
{
    const struct bc_storage_ops *ops, *fops;
    void *ctx, *fctx;
    if (bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) != 0)
        return NULL;
    if (plan != NULL) {
        if (bc_storage_faulty_wrap(ops, ctx, plan, counts, &fops, &fctx) != 0) {
            ops->close(ctx);
            return NULL;
        }
        ops = fops;
        ctx = fctx;
    }
    struct bc_layer l;
    if (bc_layer_xts_new(key, 64, ss, &l) != 0) {
        ops->close(ctx);
        return NULL;
    }
    struct bc_volume_params p = {.size_bytes = size, .sector_size = ss, .data_off = 1 << 20};
    struct bc_volume *v = NULL;
    if (bc_volume_open(&p, ops, ctx, &l, 1, &v) != 0) {
        l.ops->destroy(l.ctx);
        ops->close(ctx);
        return NULL;
    }
    return v;
}

static void test_faults(uint32_t ss, uint64_t seed)
{
    char path[4200], other[4200];
    path_in_dir(path, sizeof path, "faulty.img");
    path_in_dir(other, sizeof other, "healthy.img");
    make_empty(path);
    make_empty(other);
    const uint64_t size = 64 * (uint64_t)ss;
    uint8_t key[64], key2[64];
    make_key(key, seed);
    make_key(key2, seed + 1);
    struct bc_fault_plan plan = {.seed = seed, .read_one_in = 9, .write_one_in = 5, .flush_one_in = 4,
                                 .errs = {EIO, ENOSPC, 0}, .short_writes = 1};
    struct bc_fault_counts counts = {0};
    struct bc_volume *v = fault_vol(path, ss, size, key, &plan, &counts);
    struct bc_volume *w = fault_vol(other, ss, size, key2, NULL, NULL);
    REQUIRE(v != NULL && w != NULL, "open");
    uint8_t *model = calloc(size, 1), *known = malloc(size), *wmodel = calloc(size, 1);
    uint8_t *buf = malloc(3 * ss + 7), *got = malloc(size);
    memset(known, 1, size);   /* a new disk reads as zeros everywhere */
    struct rng r = {seed * 7 + 1};
    int flush_err = 0, errors = 0, ok_writes = 0, bad_reads = 0, healthy_bad = 0;
    for (int op = 0; op < 3000; op++) {
        uint64_t off = rnd_below(&r, size - 1);
        size_t len = 1 + (size_t)rnd_below(&r, 3 * ss + 6);
        if (off + len > size)
            len = (size_t)(size - off);
        int kind = (int)rnd_below(&r, 10);
        if (kind < 5) {                                   /* write */
            rnd_fill(&r, buf, len);
            ssize_t rc = bc_volume_write(v, buf, len, off);
            if (rc == (ssize_t)len) {
                memcpy(model + off, buf, len);
                memset(known + off, 1, len);
                ok_writes++;
            } else {
                CHECK(rc == -EIO || rc == -ENOSPC, "write error %zd is the injected one", rc);
                errors++;
                /* the touched sectors may hold old, new or torn data now: unknown */
                uint64_t s0 = off / ss * ss, s1 = (off + len + ss - 1) / ss * ss;
                memset(known + s0, 0, s1 - s0);
            }
            /* the healthy disk beside it takes the same write */
            CHECK_RC(bc_volume_write(w, buf, len, off), len);
            memcpy(wmodel + off, buf, len);
        } else if (kind < 9) {                            /* read */
            ssize_t rc = bc_volume_read(v, got, len, off);
            if (rc == (ssize_t)len) {
                for (size_t i = 0; i < len; i++)
                    if (known[off + i] && got[i] != model[off + i]) {
                        bad_reads++;
                        break;
                    }
            } else {
                CHECK(rc == -EIO || rc == -ENOSPC, "read error %zd is the injected one", rc);
                errors++;
            }
            if (bc_volume_read(w, got, len, off) != (ssize_t)len || memcmp(got, wmodel + off, len) != 0)
                healthy_bad++;
        } else {                                          /* flush */
            int rc = bc_volume_flush(v);
            if (flush_err != 0)
                CHECK(rc == flush_err, "a failed flush stays failed (%d, first %d)", rc, flush_err);
            else if (rc != 0) {
                CHECK(rc == -EIO || rc == -ENOSPC, "flush error %d is the injected one", rc);
                flush_err = rc;
            }
        }
    }
    CHECK(bad_reads == 0, "%d reads returned data that was never acknowledged", bad_reads);
    CHECK(healthy_bad == 0, "the healthy disk failed %d reads", healthy_bad);
    CHECK(errors > 100 && ok_writes > 500, "faults were injected (%d errors, %d good writes)", errors, ok_writes);
    CHECK(atomic_load(&counts.short_writes) > 0, "short writes were injected");
    CHECK(flush_err != 0, "a flush failed");
    bc_volume_unref(v);
    /* reopened without faults: every acknowledged byte is there */
    v = fault_vol(path, ss, size, key, NULL, NULL);
    REQUIRE(v != NULL, "reopen");
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    size_t lost = 0;
    for (uint64_t i = 0; i < size; i++)
        if (known[i] && got[i] != model[i])
            lost++;
    CHECK(lost == 0, "%zu acknowledged bytes differ after reopening", lost);
    CHECK_RC(bc_volume_flush(v), 0);   /* a new open starts with a clean flush state */
    bc_volume_unref(v);
    bc_volume_unref(w);
    free(model);
    free(known);
    free(wmodel);
    free(buf);
    free(got);
}

int main(int argc, char **argv)
{
    int do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
    const char *base = argc > 1 + do_bench ? argv[1 + do_bench] : getenv("TMPDIR");
    if (base == NULL || !*base)
        base = "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/bc-engine-test.XXXXXX", base);
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (do_bench) {
        int rc = bench();
        rm_dir(g_dir);
        return rc;
    }
    RUN(test_xts_reference());
    RUN(test_xts_ephemeral());
    RUN(test_new_volume());
    RUN(test_unaligned_grid(512));
    RUN(test_unaligned_grid(4096));
    RUN(run_model("m-xts-512", 512, STACK_XTS, BC_CACHE_BUFFERED, 1500, 1));
    RUN(run_model("m-xts-4096", 4096, STACK_XTS, BC_CACHE_BUFFERED, 1500, 2));
    RUN(run_model("m-null-4096", 4096, STACK_NULL, BC_CACHE_BUFFERED, 800, 3));
    RUN(run_model("m-meta-512", 512, STACK_META, BC_CACHE_BUFFERED, 800, 4));
    RUN(run_model("m-meta-4096", 4096, STACK_META, BC_CACHE_BUFFERED, 800, 5));
    RUN(run_model("m-direct-4096", 4096, STACK_XTS, BC_CACHE_NONE, 800, 6));
    RUN(run_model("m-direct-512", 512, STACK_XTS, BC_CACHE_NONE, 800, 7));
    RUN(test_discard_holes(4096, 0, 0));
    RUN(test_discard_holes(512, 1, 0));
    RUN(test_discard_holes(4096, 1, 1));
    RUN(test_resize_ro_end());
    RUN(test_concurrency(512, STACK_XTS));
    RUN(test_concurrency(4096, STACK_XTS));
    RUN(test_concurrency(4096, STACK_META));
    RUN(test_range_lock_parallel());
    RUN(test_parallel_parts());
    RUN(test_revoke_waits());
    RUN(test_revoke_race());
    RUN(test_metadata(512));
    RUN(test_metadata(4096));
    RUN(test_stats());
    RUN(test_faults(512, 11));
    RUN(test_faults(4096, 12));
    rm_dir(g_dir);
    int f = atomic_load(&g_failures);
    printf("%s: %d checks, %d failed\n", f ? "FAILED" : "PASSED", g_checks, f);
    return f ? 1 : 0;
}
