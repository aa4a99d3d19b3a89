/*
 * test_aead.c — the XChaCha20-Poly1305 sector layer (bc_layer_aead.c) alone and in the
 * volume engine, against libsodium's one-shot API and OpenSSL's XTS.
 *
 *   test_aead [DIR]          run every test on files in a fresh directory under DIR
 *   test_aead --bench [DIR]  MB/s of the layer at 4 KiB in memory (one thread) vs
 *                            libsodium's one-shot crypto_aead_xchacha20poly1305_ietf_*, then
 *                            the engine on a file in DIR (default /dev/shm): XTS alone vs
 *                            XTS over AEAD
 *   test_aead --speed [SECS] the layer's throughput in GB/s per CPU-second of this thread
 *                            (CLOCK_THREAD_CPUTIME_ID) on 4 KiB sectors: seal and open, one
 *                            sector per call and 256 per call, beside openssl's bulk loop and
 *                            libsodium's one-shot seal, in interleaved rounds (medians and
 *                            per-round ratios); one line of JSON (for bench/xts_speed.py
 *                            --engine-aead, which also runs `openssl speed` itself)
 *
 * What is checked: every stored sector opens with crypto_aead_xchacha20poly1305_ietf_
 * decrypt_detached under the documented associated data and slot layout, and the layer
 * opens what libsodium seals; a flipped bit in data, nonce or tag fails exactly that
 * sector (-EBADMSG) while its neighbours read; a sector moved, two sectors swapped, a
 * sector grafted from another disk (same number, other disk id) or read under another
 * role fail; simulated kills (a storage wrapper that drops every write after the k-th,
 * the last one possibly torn at a 4 KiB boundary, then a fresh open) at every point of
 * a request, twice in a row on the same sectors, leave every sector old or new, never
 * failing; a data write refused (ENOSPC) after its metadata was stored, then a kill on
 * the next write of that sector, still reads the old content (the instance stops trusting
 * its own slots); a discard cut between the data punch and the metadata punch reads zeros;
 * holes read as zeros and discard punches data and metadata; XTS over AEAD stores
 * AEAD(XTS(plaintext)); the stack's metadata size is fixed (set_layers refuses another).
 */
#define _GNU_SOURCE
#include "../bc_engine.h"
#include "../bc_chachapoly.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <sodium.h>

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
#define REQUIRE(cond, ...)                                                                   \
    do {                                                                                     \
        int _f = atomic_load(&g_failures);                                                   \
        CHECK(cond, __VA_ARGS__);                                                            \
        if (atomic_load(&g_failures) != _f)                                                  \
            return;                                                                          \
    } while (0)

#define M BC_AEAD_META_BYTES
#define SLOT 48u
#define DATA_OFF (1u << 20)
#define META_OFF (64ull << 20)
#define JLOG_OFF (256ull << 20)
static uint64_t g_jlog;          /* >0: volumes open with a metadata journal of this many bytes */
static void *g_jctx;             /* the last opened volume's journal */
struct crash;
static struct crash *g_crash;    /* the last opened volume's crash wrapper */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (uint8_t)(seed >> 56);
    }
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
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

static void raw_pread(const char *path, void *buf, size_t len, uint64_t off)
{
    int fd = open(path, O_RDONLY);
    memset(buf, 0, len);
    if (fd >= 0) {
        if (pread(fd, buf, len, (off_t)off) < 0)
            memset(buf, 0, len);
        close(fd);
    }
}

static void raw_pwrite(const char *path, const void *buf, size_t len, uint64_t off)
{
    int fd = open(path, O_RDWR);
    if (fd >= 0) {
        if (pwrite(fd, buf, len, (off_t)off) != (ssize_t)len)
            fprintf(stderr, "raw_pwrite failed\n");
        close(fd);
    }
}

static void flip(const char *path, uint64_t off, uint8_t mask)
{
    uint8_t b;
    raw_pread(path, &b, 1, off);
    b ^= mask;
    raw_pwrite(path, &b, 1, off);
}

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

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* the documented associated data, built independently of the layer */
static void doc_ad(uint8_t ad[33], const uint8_t id[16], uint64_t sector, uint8_t role, const uint8_t *slot)
{
    memcpy(ad, id, 16);
    for (int i = 0; i < 8; i++)
        ad[16 + i] = (uint8_t)(sector >> (8 * i));
    ad[24] = role;
    memcpy(ad + 25, slot, 8);
}

/* libsodium one-shot open of a stored sector: tries the newer slot then the other,
 * as FORMAT.md tells a user to. 0 and the plaintext in out, or -1. */
static int sodium_open(const uint8_t key[32], const uint8_t id[16], uint8_t role, uint64_t sector,
                       const uint8_t *c, const uint8_t *meta, uint8_t *out, size_t ss)
{
    int order[2] = {0, 1};
    if ((int32_t)(rd32(meta + SLOT) - rd32(meta)) > 0) {
        order[0] = 1;
        order[1] = 0;
    }
    for (int t = 0; t < 2; t++) {
        const uint8_t *slot = meta + order[t] * SLOT;
        if (all_zero(slot, SLOT))
            continue;
        uint8_t ad[33];
        doc_ad(ad, id, sector, role, slot);
        if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(out, NULL, c, ss, slot + 32, ad, 33, slot + 8,
                                                                key) == 0)
            return 0;
    }
    return -1;
}

/* ---- a storage wrapper that "kills the process" after k writes ------------------------ */

struct crash {
    const struct bc_storage_ops *in;
    void *ictx;
    long budget;          /* write/punch calls that still reach the file; <0: unlimited */
    int tear;             /* the last allowed write stops at its first 4 KiB file boundary */
    long calls;
    long fail_at;         /* >0: the write call with this number (1-based) fails with -ENOSPC */
    long eio_at;          /* >0: the write call with this number reaches the file, then says -EIO */
};

static uint64_t g_read_bytes;   /* bytes read through any crash wrapper */

static int cr_read(void *c, void *buf, size_t len, uint64_t off)
{
    struct crash *s = c;
    g_read_bytes += len;
    return s->in->read_at(s->ictx, buf, len, off);
}

static int cr_gate(struct crash *s)
{
    s->calls++;
    if (s->budget < 0)
        return 1;
    if (s->budget == 0)
        return 0;
    s->budget--;
    return s->budget == 0 && s->tear ? 2 : 1;
}

static int cr_write(void *c, const void *buf, size_t len, uint64_t off)
{
    struct crash *s = c;
    if (s->fail_at > 0 && s->calls + 1 == s->fail_at) {
        s->calls++;
        return -ENOSPC;
    }
    int eio = s->eio_at > 0 && s->calls + 1 == s->eio_at;
    int g = cr_gate(s);
    if (g == 0)
        return 0;   /* dead: nothing more reaches the file */
    if (g == 2) {
        uint64_t cut = (off / 4096 + 1) * 4096 - off;   /* up to the first page boundary */
        if (cut < len)
            len = (size_t)cut;
    }
    int rc = s->in->write_at(s->ictx, buf, len, off);
    return rc == 0 && eio ? -EIO : rc;
}

static int cr_punch(void *c, uint64_t off, uint64_t len)
{
    struct crash *s = c;
    if (cr_gate(s) == 0)
        return 0;
    return s->in->punch(s->ictx, off, len);
}

static int cr_flush(void *c) { struct crash *s = c; return s->in->flush(s->ictx); }
static int cr_get_size(void *c, uint64_t *v) { struct crash *s = c; return s->in->get_size(s->ictx, v); }
static int cr_set_size(void *c, uint64_t v) { struct crash *s = c; return s->in->set_size(s->ictx, v); }
static int cr_blocks(void *c, uint64_t *v) { struct crash *s = c; return s->in->blocks_used(s->ictx, v); }
static void cr_close(void *c)
{
    struct crash *s = c;
    s->in->close(s->ictx);
    free(s);
}

static uint64_t g_prefetch_off, g_prefetch_len;   /* the last prefetch through a crash wrapper */

static void cr_prefetch(void *c, uint64_t off, uint64_t len)
{
    struct crash *s = c;
    g_prefetch_off = off, g_prefetch_len = len;
    if (s->in->prefetch != NULL)
        s->in->prefetch(s->ictx, off, len);
}

static const struct bc_storage_ops crash_ops = {"crash", cr_read, cr_write, cr_punch, cr_flush,
                                                cr_get_size, cr_set_size, cr_blocks, cr_close, cr_prefetch};

/* ---- volumes ---------------------------------------------------------------------------- */

enum { ST_AEAD, ST_XTS_AEAD };

struct keys {
    uint8_t xts[64], aead[32], id[16];
};

static void make_keys(struct keys *k, uint64_t seed)
{
    fill(k->xts, 64, seed);
    fill(k->aead, 32, seed + 1);
    fill(k->id, 16, seed + 2);
}

static int make_stack(const struct keys *k, int stack, uint32_t ss, uint8_t role, struct bc_layer *ls, size_t *n)
{
    *n = 0;
    int rc;
    if (stack == ST_XTS_AEAD) {
        rc = bc_layer_xts_new(k->xts, 64, ss, &ls[0]);
        if (rc != 0)
            return rc;
        *n = 1;
    }
    rc = bc_layer_aead_new(k->aead, 32, ss, k->id, role, &ls[*n]);
    if (rc != 0) {
        for (size_t i = 0; i < *n; i++)
            ls[i].ops->destroy(ls[i].ctx);
        return rc;
    }
    (*n)++;
    return 0;
}

/* budget < 0: no crash wrapper limit */
/* Open as a process of its own would (no writer id left by an earlier instance in this
 * process): every test here that reopens after a simulated kill means a new process. */
static struct bc_volume *vopen_here(const char *path, const struct keys *k, int stack, uint32_t ss,
                                    uint64_t size, long budget, int tear, uint8_t role);

static struct bc_volume *vopen(const char *path, const struct keys *k, int stack, uint32_t ss, uint64_t size,
                               long budget, int tear, uint8_t role)
{
    bc_layer_aead_forget_ids();
    return vopen_here(path, k, stack, ss, size, budget, tear, role);
}

/* Open in this process: a destroyed instance of the same disk hands its writer id on. */
static struct bc_volume *vopen_here(const char *path, const struct keys *k, int stack, uint32_t ss,
                                    uint64_t size, long budget, int tear, uint8_t role)
{
    const struct bc_storage_ops *ops;
    void *ctx;
    if (bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) != 0)
        return NULL;
    struct crash *cr = calloc(1, sizeof *cr);
    cr->in = ops;
    cr->ictx = ctx;
    cr->budget = budget;
    cr->tear = tear;
    struct bc_layer ls[2];
    size_t n;
    if (make_stack(k, stack, ss, role, ls, &n) != 0) {
        cr_close(cr);
        return NULL;
    }
    struct bc_volume_params p = {.size_bytes = size, .sector_size = ss, .data_off = DATA_OFF, .meta_off = META_OFF};
    struct bc_volume *v = NULL;
    const struct bc_storage_ops *vops = &crash_ops;
    void *vctx = cr;
    g_jctx = NULL;
    if (g_jlog) {   /* the metadata journal over the crash wrapper: a kill drops its writes too */
        struct bc_journal_params jp = {.meta_off = META_OFF, .meta_bytes = M,
                                       .meta_sectors = (JLOG_OFF - META_OFF) / M, .log_off = JLOG_OFF,
                                       .log_bytes = g_jlog};
        if (bc_storage_journal_wrap(&jp, &crash_ops, cr, 1, &vops, &vctx) != 0) {
            for (size_t i = 0; i < n; i++)
                ls[i].ops->destroy(ls[i].ctx);
            cr_close(cr);
            return NULL;
        }
        g_jctx = vctx;
    }
    if (bc_volume_open(&p, vops, vctx, ls, n, &v) != 0) {
        for (size_t i = 0; i < n; i++)
            ls[i].ops->destroy(ls[i].ctx);
        vops->close(vctx);
        return NULL;
    }
    g_crash = cr;
    return v;
}

/* ---- 1. the layer against libsodium ------------------------------------------------------ */

static void test_layer_vs_sodium(uint32_t ss)
{
    struct keys k;
    make_keys(&k, 11 + ss);
    struct bc_layer l;
    REQUIRE(bc_layer_aead_new(k.aead, 32, ss, k.id, BC_ROLE_INFRA, &l) == 0, "new");
    CHECK(strcmp(l.ops->name, "xchacha20-poly1305") == 0 && l.ops->meta_bytes == M, "name/meta");
    CHECK(bc_layer_aead_new(k.aead, 31, ss, k.id, 2, &(struct bc_layer){0}) == -EINVAL, "31-byte key refused");
    CHECK(bc_layer_aead_new(k.aead, 32, 1024, k.id, 2, &(struct bc_layer){0}) == -EINVAL, "sector size");
    const size_t n = 8;
    const uint64_t s0 = UINT64_MAX - 7;   /* sector numbers up to 2^64-1 */
    uint8_t *pt = malloc(n * ss), *buf = malloc(n * ss), *out = malloc(ss), *meta = calloc(n, M);
    fill(pt, n * ss, ss);
    memcpy(buf, pt, n * ss);
    CHECK_RC(l.ops->encrypt(l.ctx, buf, n, s0, meta, M), 0);
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *m = meta + i * M;
        bad += rd32(m) != 1 || !all_zero(m + SLOT, SLOT);   /* a fresh sector: slot 0, seq 1 */
        bad += sodium_open(k.aead, k.id, BC_ROLE_INFRA, s0 + i, buf + i * ss, m, out, ss) != 0 ||
               memcmp(out, pt + i * ss, ss) != 0;
    }
    CHECK(bad == 0, "%d sectors differ from libsodium's open", bad);
    /* nonces are fresh per write */
    CHECK(memcmp(meta + 8, meta + M + 8, 24) != 0, "two sectors, two nonces");
    /* a second write goes to the other slot with seq 2; the first slot stays */
    uint8_t *meta2 = malloc(n * M), *buf2 = malloc(n * ss);
    memcpy(meta2, meta, n * M);
    memcpy(buf2, pt, n * ss);
    CHECK_RC(l.ops->encrypt(l.ctx, buf2, n, s0, meta2, M), 0);
    CHECK(memcmp(meta2, meta, SLOT) == 0 && rd32(meta2 + SLOT) == 2, "second write: slot 1, seq 2, slot 0 kept");
    CHECK(memcmp(buf2, buf, ss) != 0, "a new nonce, a new ciphertext");
    /* the layer opens what libsodium seals (slot 1 newer, slot 0 garbage-free but stale) */
    uint8_t slot[SLOT] = {0}, ad[33];
    slot[0] = 9;                      /* seq 9, writer 0x01020304 */
    slot[4] = 4, slot[5] = 3, slot[6] = 2, slot[7] = 1;
    randombytes_buf(slot + 8, 24);
    doc_ad(ad, k.id, 42, BC_ROLE_INFRA, slot);
    uint8_t *c = malloc(ss), *m1 = calloc(1, M);
    crypto_aead_xchacha20poly1305_ietf_encrypt_detached(c, slot + 32, NULL, pt, ss, ad, 33, NULL, slot + 8, k.aead);
    memcpy(m1 + SLOT, slot, SLOT);
    memcpy(m1, meta, SLOT);           /* an older slot (seq 1) that does not match */
    CHECK_RC(l.ops->decrypt(l.ctx, c, 1, 42, m1, M), 0);
    CHECK(memcmp(c, pt, ss) == 0, "layer opens libsodium's sealed sector");
    /* the layer's own decrypt over the whole run */
    CHECK_RC(l.ops->decrypt(l.ctx, buf2, n, s0, meta2, M), 0);
    CHECK(memcmp(buf2, pt, n * ss) == 0, "layer round trip");
    /* the older slot is tried when the newer does not authenticate */
    memcpy(buf2, buf, n * ss);        /* the first write's ciphertext beside meta2 (newer = 2nd write) */
    CHECK_RC(l.ops->decrypt(l.ctx, buf2, n, s0, meta2, M), 0);
    CHECK(memcmp(buf2, pt, n * ss) == 0, "older slot opens the older data");
    l.ops->destroy(l.ctx);
    free(pt), free(buf), free(out), free(meta), free(meta2), free(buf2), free(c), free(m1);
}

/* ---- 2. volumes: stored bytes, tampering, moves, grafts ------------------------------- */

static void test_volume(uint32_t ss, int stack)
{
    char path[4200], path2[4200];
    path_in_dir(path, sizeof path, "v.img");
    path_in_dir(path2, sizeof path2, "w.img");
    make_empty(path);
    make_empty(path2);
    const size_t ns = 32;
    const uint64_t size = ns * ss;
    struct keys k, k2;
    make_keys(&k, 100 + ss + (uint64_t)stack);
    k2 = k;
    fill(k2.id, 16, 999);   /* same keys, another disk id */
    struct bc_volume *v = vopen(path, &k, stack, ss, size, -1, 0, BC_ROLE_INFRA);
    struct bc_volume *w = vopen(path2, &k2, stack, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL && w != NULL, "open");
    uint8_t *pt = malloc(size), *got = malloc(size), *c = malloc(ss), *x = malloc(ss), *meta = malloc(M);
    memset(got, 0xEE, size);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(all_zero(got, size), "new volume reads zeros");
    fill(pt, size, 7 + ss);
    CHECK_RC(bc_volume_write(v, pt, size - 9, 5), size - 9);   /* unaligned: RMW of both edges */
    uint8_t *model = calloc(1, size);
    memcpy(model + 5, pt, size - 9);
    CHECK_RC(bc_volume_write(w, model, size, 0), size);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, model, size) == 0, "round trip");
    CHECK_RC(bc_volume_flush(v), 0);
    /* every stored sector opens with libsodium (then OpenSSL XTS for the stack) */
    int bad = 0;
    for (uint64_t s = 0; s < ns; s++) {
        raw_pread(path, c, ss, DATA_OFF + s * ss);
        raw_pread(path, meta, M, META_OFF + s * M);
        if (sodium_open(k.aead, k.id, BC_ROLE_INFRA, s, c, meta, x, ss) != 0) {
            bad++;
            continue;
        }
        if (stack == ST_XTS_AEAD)
            ref_xts(k.xts, 0, s, x, c, ss);
        else
            memcpy(c, x, ss);
        bad += memcmp(c, model + s * ss, ss) != 0;
    }
    CHECK(bad == 0, "%d stored sectors differ from AEAD(%s(plaintext))", bad, stack ? "XTS" : "id");
    /* tamper: data, nonce, tag -> exactly that sector fails */
    const uint64_t bits[3] = {DATA_OFF + 3 * ss + 100, META_OFF + 3 * M + 8 + 5, META_OFF + 3 * M + 32 + 15};
    for (int t = 0; t < 3; t++) {
        flip(path, bits[t], 0x10);
        memset(got, 0x5A, ss);
        CHECK_RC(bc_volume_read(v, got, ss, 3 * ss), -EBADMSG);
        CHECK(all_zero(got, ss), "no plaintext behind a failure");
        CHECK_RC(bc_volume_read(v, got, ss, 2 * ss), ss);
        CHECK_RC(bc_volume_read(v, got, ss, 4 * ss), ss);
        CHECK_RC(bc_volume_read(v, got, 3 * ss, 2 * ss), -EBADMSG);   /* a request over it fails */
        struct bc_stats stt;
        bc_volume_stats(v, &stt);
        CHECK(stt.integrity_errors == (uint64_t)(2 * (t + 1)), "integrity_errors %" PRIu64, stt.integrity_errors);
        CHECK(stt.integrity_last_sector == 3, "integrity_last_sector %" PRIu64, stt.integrity_last_sector);
        flip(path, bits[t], 0x10);
        CHECK_RC(bc_volume_read(v, got, ss, 3 * ss), ss);
        CHECK(memcmp(got, model + 3 * ss, ss) == 0, "repaired bit %d", t);
    }
    /* move: sector 5 (data + metadata) copied over sector 6 */
    uint8_t *save = malloc(ss), *msave = malloc(M);
    raw_pread(path, save, ss, DATA_OFF + 6 * ss);
    raw_pread(path, msave, M, META_OFF + 6 * M);
    raw_pread(path, c, ss, DATA_OFF + 5 * ss);
    raw_pread(path, meta, M, META_OFF + 5 * M);
    raw_pwrite(path, c, ss, DATA_OFF + 6 * ss);
    raw_pwrite(path, meta, M, META_OFF + 6 * M);
    CHECK_RC(bc_volume_read(v, got, 3 * ss, 4 * ss), -EBADMSG);   /* sectors 4..6: 6 fails */
    {
        struct bc_stats stt;
        bc_volume_stats(v, &stt);
        CHECK(stt.integrity_last_sector == 6, "integrity_last_sector %" PRIu64, stt.integrity_last_sector);
    }
    CHECK_RC(bc_volume_read(v, got, ss, 5 * ss), ss);
    /* swap 5 and 6 */
    raw_pwrite(path, save, ss, DATA_OFF + 5 * ss);
    raw_pwrite(path, msave, M, META_OFF + 5 * M);
    CHECK_RC(bc_volume_read(v, got, ss, 5 * ss), -EBADMSG);
    CHECK_RC(bc_volume_read(v, got, ss, 6 * ss), -EBADMSG);
    raw_pwrite(path, c, ss, DATA_OFF + 5 * ss);
    raw_pwrite(path, meta, M, META_OFF + 5 * M);
    raw_pwrite(path, save, ss, DATA_OFF + 6 * ss);
    raw_pwrite(path, msave, M, META_OFF + 6 * M);
    CHECK_RC(bc_volume_read(v, got, 2 * ss, 5 * ss), 2 * ss);
    CHECK(memcmp(got, model + 5 * ss, 2 * ss) == 0, "swapped back");
    /* graft: sector 8 of the other disk (same keys, same number, other disk id) */
    raw_pread(path2, c, ss, DATA_OFF + 8 * ss);
    raw_pread(path2, meta, M, META_OFF + 8 * M);
    raw_pwrite(path, c, ss, DATA_OFF + 8 * ss);
    raw_pwrite(path, meta, M, META_OFF + 8 * M);
    CHECK_RC(bc_volume_read(v, got, ss, 8 * ss), -EBADMSG);
    CHECK_RC(bc_volume_read(w, got, ss, 8 * ss), ss);   /* the other disk still reads it */
    /* the same disk under another role does not open */
    bc_volume_unref(v);
    v = vopen(path, &k, stack, ss, size, -1, 0, 1);
    REQUIRE(v != NULL, "reopen");
    CHECK_RC(bc_volume_read(v, got, ss, 0), -EBADMSG);
    bc_volume_unref(v);
    v = vopen(path, &k, stack, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    /* a tampered sector is rewritten whole (a new open: resolve finds no valid slot) */
    CHECK_RC(bc_volume_write(v, model + 8 * ss, ss, 8 * ss), ss);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, model, size) == 0, "graft overwritten");
    /* RMW over a tampered sector fails and writes nothing */
    flip(path, DATA_OFF + 9 * ss + 1, 1);
    CHECK_RC(bc_volume_write(v, pt, 10, 9 * ss + 3), -EBADMSG);
    flip(path, DATA_OFF + 9 * ss + 1, 1);
    CHECK_RC(bc_volume_read(v, got, ss, 9 * ss), ss);
    CHECK(memcmp(got, model + 9 * ss, ss) == 0, "untouched by the refused RMW");
    /* set_layers with another metadata size is refused */
    struct bc_layer xl;
    REQUIRE(bc_layer_xts_new(k.xts, 64, ss, &xl) == 0, "xts");
    CHECK_RC(bc_volume_set_layers(v, &xl, 1), -EINVAL);
    xl.ops->destroy(xl.ctx);
    /* an AEAD layer above another layer is refused at open */
    {
        struct bc_layer ls[2];
        REQUIRE(bc_layer_aead_new(k.aead, 32, ss, k.id, 2, &ls[0]) == 0, "aead");
        REQUIRE(bc_layer_xts_new(k.xts, 64, ss, &ls[1]) == 0, "xts");
        const struct bc_storage_ops *ops;
        void *ctx;
        REQUIRE(bc_storage_local_open(path2, 0, BC_CACHE_BUFFERED, &ops, &ctx) == 0, "storage");
        struct bc_volume_params p = {.size_bytes = size, .sector_size = ss, .data_off = DATA_OFF, .meta_off = META_OFF};
        struct bc_volume *bad_v = NULL;
        CHECK_RC(bc_volume_open(&p, ops, ctx, ls, 2, &bad_v), -EINVAL);
        ops->close(ctx);
        ls[0].ops->destroy(ls[0].ctx);
        ls[1].ops->destroy(ls[1].ctx);
    }
    bc_volume_unref(v);
    bc_volume_unref(w);
    free(pt), free(got), free(c), free(x), free(meta), free(model), free(save), free(msave);
}

/* ---- 3. holes and discard --------------------------------------------------------------- */

/* A 1 MiB request's crypto is cut into parts that helper threads run (bc_parallel.c):
 * every stored sector is still exactly AEAD(XTS(plaintext)) under its own nonce, a
 * whole-span read gives the plaintext back, and a tampered sector in the last part
 * fails that request and is the one reported. */
static void test_parallel_span(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "par.img");
    make_empty(path);
    const size_t size = 1u << 20, ns = size / ss;
    struct keys k;
    make_keys(&k, 500 + ss);
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1 && getenv("BLOCKCRYPT_CRYPTO_THREADS") == NULL)
        CHECK(bc_parallel_width() >= 2, "helper threads on a host with %ld CPUs", sysconf(_SC_NPROCESSORS_ONLN));
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    uint8_t *pt = malloc(size), *got = malloc(size), *c = malloc(ss), *x = malloc(ss), *meta = malloc(M);
    fill(pt, size, 61 + ss);
    CHECK_RC(bc_volume_write(v, pt, size, 0), size);
    CHECK_RC(bc_volume_flush(v), 0);
    int bad = 0;
    uint8_t first_nonce[24], nonce[24];
    for (uint64_t s = 0; s < ns; s++) {
        raw_pread(path, c, ss, DATA_OFF + s * ss);
        raw_pread(path, meta, M, META_OFF + s * M);
        memcpy(nonce, meta + 8, 24);
        if (s == 0)
            memcpy(first_nonce, nonce, 24);
        else if (memcmp(nonce, first_nonce, 24) == 0)
            bad++;   /* two parts must never share nonces */
        if (sodium_open(k.aead, k.id, BC_ROLE_INFRA, s, c, meta, x, ss) != 0) {
            bad++;
            continue;
        }
        ref_xts(k.xts, 0, s, x, c, ss);
        bad += memcmp(c, pt + s * ss, ss) != 0;
    }
    CHECK(bad == 0, "%d of %zu stored sectors are not AEAD(XTS(plaintext))", bad, ns);
    memset(got, 0, size);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, pt, size) == 0, "a whole-span read");
    uint64_t victim = ns - 3;
    flip(path, DATA_OFF + victim * ss + 7, 0x01);
    memset(got, 0x5A, size);
    CHECK_RC(bc_volume_read(v, got, size, 0), -EBADMSG);
    CHECK(all_zero(got, size), "no plaintext behind a failure");
    struct bc_stats st;
    bc_volume_stats(v, &st);
    CHECK(st.integrity_last_sector == victim, "integrity_last_sector %" PRIu64 ", want %" PRIu64,
          st.integrity_last_sector, victim);
    flip(path, DATA_OFF + victim * ss + 7, 0x01);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, pt, size) == 0, "repaired");
    bc_volume_unref(v);
    free(pt);
    free(got);
    free(c);
    free(x);
    free(meta);
}

static void test_holes(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "h.img");
    make_empty(path);
    const size_t ns = 64;
    const uint64_t size = ns * ss;
    struct keys k;
    make_keys(&k, 300 + ss);
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    uint8_t *pt = malloc(size), *got = malloc(size), *raw = malloc(size);
    fill(pt, size, 5);
    CHECK_RC(bc_volume_write(v, pt, size, 0), size);
    CHECK_RC(bc_volume_discard(v, 10 * ss + 1, 40 * ss), 0);
    memset(pt + 10 * ss + 1, 0, 40 * ss);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, pt, size) == 0, "discard reads zeros");
    raw_pread(path, raw, 39 * ss, DATA_OFF + 11 * ss);
    CHECK(all_zero(raw, 39 * ss), "data punched");
    raw_pread(path, raw, 39 * M, META_OFF + 11 * M);
    CHECK(all_zero(raw, 39 * M), "metadata punched");
    raw_pread(path, raw, M, META_OFF + 10 * M);
    CHECK(!all_zero(raw, M), "the partial edge is rewritten");
    /* a discard killed between the data punch and the metadata punch reads zeros */
    bc_volume_unref(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, size, 1, 0, BC_ROLE_INFRA);   /* one storage write: the data punch */
    REQUIRE(v != NULL, "reopen");
    CHECK_RC(bc_volume_discard(v, 0, 4 * ss), 0);
    bc_volume_unref(v);
    raw_pread(path, raw, 4 * M, META_OFF);
    CHECK(!all_zero(raw, 4 * M), "metadata still there (the kill came first)");
    v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    memset(pt, 0, 4 * ss);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, pt, size) == 0, "half-done discard reads zeros, the rest intact");
    /* and writes over it work (stale slots resolved against zero data) */
    fill(pt, 4 * ss, 77);
    CHECK_RC(bc_volume_write(v, pt, 4 * ss, 0), 4 * ss);
    CHECK_RC(bc_volume_read(v, got, 4 * ss, 0), 4 * ss);
    CHECK(memcmp(got, pt, 4 * ss) == 0, "written over a half-done discard");
    /* shrink + grow reads zeros */
    CHECK_RC(bc_volume_resize(v, 2 * ss), 0);
    CHECK_RC(bc_volume_resize(v, size), 0);
    CHECK_RC(bc_volume_read(v, got, 2 * ss, 2 * ss), 2 * ss);
    CHECK(all_zero(got, 2 * ss), "shrunk then grown: zeros");
    bc_volume_unref(v);
    free(pt), free(got), free(raw);
}

/* ---- 4. simulated kills ----------------------------------------------------------------- */

/* every sector reads as exactly one of the candidate images (old or new), never fails */
static int check_old_or_new(struct bc_volume *v, uint32_t ss, size_t ns, const uint8_t *a, const uint8_t *b,
                            int *n_new)
{
    uint8_t *got = malloc(ss);
    int bad = 0;
    *n_new = 0;
    for (size_t s = 0; s < ns; s++) {
        long long rc = bc_volume_read(v, got, ss, s * ss);
        if (rc != (long long)ss) {
            bad++;
            continue;
        }
        int is_a = memcmp(got, a + s * ss, ss) == 0, is_b = memcmp(got, b + s * ss, ss) == 0;
        if (!is_a && !is_b)
            bad++;
        else if (is_b && !is_a)
            (*n_new)++;
    }
    free(got);
    return bad;
}

static void test_crash(uint32_t ss, int tear)
{
    char path[4200];
    path_in_dir(path, sizeof path, "c.img");
    const size_t ns = 48;   /* sector 42's metadata straddles a 4 KiB page of the file */
    const uint64_t size = ns * ss;
    struct keys k;
    make_keys(&k, 500 + ss);
    uint8_t *img0 = malloc(size), *img1 = malloc(size), *img2 = malloc(size), *cur = malloc(size);
    fill(img0, size, 1);
    fill(img1, size, 2);
    fill(img2, size, 3);
    int bad_total = 0, rounds = 0, saw_old = 0, saw_new = 0;
    /* kill after k storage writes, for every k the request makes (plus one past the end) */
    for (long kill1 = 0; kill1 <= 4; kill1++) {
        for (long kill2 = 0; kill2 <= 4; kill2++) {
            make_empty(path);
            struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
            if (v == NULL) {
                bad_total++;
                continue;
            }
            /* img0 written (half by 1-sector requests, half by one request; a 7-byte unaligned
             * piece so that RMW also runs) */
            bc_volume_write(v, img0, size / 2, 0);
            for (size_t s = ns / 2; s < ns; s++)
                bc_volume_write(v, img0 + s * ss, ss, s * ss);
            bc_volume_unref(v);
            /* first killed write: img1 over sectors 38..46 (one request: one metadata write,
             * one data write; a torn metadata write cuts sector 42's slot in two) */
            v = vopen(path, &k, ST_XTS_AEAD, ss, size, kill1, tear, BC_ROLE_INFRA);
            memcpy(cur, img0, size);
            memcpy(cur + 38 * ss, img1 + 38 * ss, 9 * ss);
            bc_volume_write(v, img1 + 38 * ss, 9 * ss, 38 * ss);
            bc_volume_unref(v);
            v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
            int n_new;
            int bad = check_old_or_new(v, ss, ns, img0, cur, &n_new);
            bad_total += bad;
            saw_old += n_new == 0;
            saw_new += n_new > 0;
            /* what reads now is the base of the second killed write */
            uint8_t *base = malloc(size);
            bc_volume_read(v, base, size, 0);
            bc_volume_unref(v);
            /* second killed write (a new process): img2 over every sector, unaligned by 7 */
            v = vopen(path, &k, ST_XTS_AEAD, ss, size, kill2, tear, BC_ROLE_INFRA);
            memcpy(cur, base, size);
            memcpy(cur + 7, img2 + 7, size - 14);
            bc_volume_write(v, img2 + 7, size - 14, 7);
            bc_volume_unref(v);
            v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
            bad = check_old_or_new(v, ss, ns, base, cur, &n_new);
            bad_total += bad;
            /* and a full write afterwards works and reads back */
            bc_volume_write(v, img0, size, 0);
            uint8_t *got = malloc(size);
            bc_volume_read(v, got, size, 0);
            bad_total += memcmp(got, img0, size) != 0;
            free(got);
            bc_volume_unref(v);
            free(base);
            rounds++;
        }
    }
    CHECK(bad_total == 0, "ss %u tear %d: %d sectors neither old nor new (or failing) over %d rounds", ss, tear,
          bad_total, rounds);
    CHECK(saw_old > 0 && saw_new > 0, "kills both before and after the data write (old %d, new %d)", saw_old,
          saw_new);
    free(img0), free(img1), free(img2), free(cur);
}

/* The same sector killed between metadata and data, again and again across restarts:
 * the valid slot must survive every time (the case a plain "write the older slot"
 * rule gets wrong on the second kill). */
static void test_repeated_kills(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "r.img");
    make_empty(path);
    struct keys k;
    make_keys(&k, 700 + ss);
    uint8_t *a = malloc(ss), *b = malloc(ss), *got = malloc(ss);
    fill(a, ss, 10);
    struct bc_volume *v = vopen(path, &k, ST_AEAD, ss, 4 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    bc_volume_write(v, a, ss, ss);
    bc_volume_unref(v);
    int bad = 0;
    for (int round = 0; round < 6; round++) {
        fill(b, ss, 20 + (uint64_t)round);
        v = vopen(path, &k, ST_AEAD, ss, 4 * ss, 1, 0, BC_ROLE_INFRA);   /* metadata only */
        bc_volume_write(v, b, ss, ss);
        bc_volume_unref(v);
        v = vopen(path, &k, ST_AEAD, ss, 4 * ss, -1, 0, BC_ROLE_INFRA);
        bad += bc_volume_read(v, got, ss, ss) != (ssize_t)ss || memcmp(got, a, ss) != 0;
        bc_volume_unref(v);
    }
    CHECK(bad == 0, "%d of 6 repeated kills lost the old content", bad);
    /* within one open, a data write that fails renews the writer, so the next write checks */
    free(a), free(b), free(got);
}

/* A disk closed cleanly and reopened in the same process keeps its writer id: its first
 * overwrites read only the metadata, not the stored data; a new process reads both. */
static void test_reopen_keeps_writer(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "w.img");
    make_empty(path);
    struct keys k;
    make_keys(&k, 1100 + ss);
    const size_t n = 8;
    uint8_t *a = malloc(n * ss), *b = malloc(n * ss), *got = malloc(n * ss);
    fill(a, n * ss, 31), fill(b, n * ss, 32);
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, 16 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    CHECK_RC(bc_volume_write(v, a, n * ss, 0), (ssize_t)(n * ss));
    bc_volume_unref(v);
    v = vopen_here(path, &k, ST_XTS_AEAD, ss, 16 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    g_read_bytes = 0;
    CHECK_RC(bc_volume_write(v, b, n * ss, 0), (ssize_t)(n * ss));
    CHECK(g_read_bytes == n * M, "reopened in-process: %" PRIu64 " bytes read, want %zu (metadata only)",
          g_read_bytes, n * M);
    bc_volume_unref(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, 16 * ss, -1, 0, BC_ROLE_INFRA);   /* a new process */
    REQUIRE(v != NULL, "open again");
    g_read_bytes = 0;
    CHECK_RC(bc_volume_write(v, a, n * ss, 0), (ssize_t)(n * ss));
    CHECK(g_read_bytes == n * M + n * ss, "new process: %" PRIu64 " bytes read, want %zu (metadata + data)",
          g_read_bytes, n * M + n * ss);
    /* another key for the same disk id shares nothing */
    bc_volume_unref(v);
    struct keys k2;
    make_keys(&k2, 1200 + ss);
    memcpy(k2.id, k.id, sizeof k.id);
    v = vopen(path, &k2, ST_XTS_AEAD, ss, 16 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open with another key");
    g_read_bytes = 0;
    CHECK_RC(bc_volume_write(v, b, ss, 8 * ss), (ssize_t)ss);   /* an empty sector: no data read needed */
    bc_volume_unref(v);
    v = vopen_here(path, &k, ST_XTS_AEAD, ss, 16 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen with the first key");
    g_read_bytes = 0;
    CHECK_RC(bc_volume_write(v, b, n * ss, 0), (ssize_t)(n * ss));
    CHECK(g_read_bytes == n * M + n * ss, "another key's instance must not pass on an id: %" PRIu64, g_read_bytes);
    CHECK_RC(bc_volume_read(v, got, n * ss, 0), (ssize_t)(n * ss));
    CHECK(memcmp(got, b, n * ss) == 0, "content after the reopens");
    bc_volume_unref(v);
    free(a), free(b), free(got);
}

/* XTS over AEAD on a crash wrapper whose write call fail_at answers -ENOSPC (nothing
 * written) and whose call eio_at reaches the file, then answers -EIO (0: neither);
 * budget as in vopen. */
static struct bc_volume *vopen_failing(const char *path, const struct keys *k, uint32_t ss, uint64_t size,
                                       long budget, long fail_at, long eio_at)
{
    const struct bc_storage_ops *ops;
    void *ctx;
    if (bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) != 0)
        return NULL;
    struct crash *cr = calloc(1, sizeof *cr);
    cr->in = ops, cr->ictx = ctx, cr->budget = budget, cr->fail_at = fail_at, cr->eio_at = eio_at;
    struct bc_layer ls[2];
    size_t n;
    struct bc_volume *v = NULL;
    struct bc_volume_params p = {.size_bytes = size, .sector_size = ss, .data_off = DATA_OFF, .meta_off = META_OFF};
    if (make_stack(k, ST_XTS_AEAD, ss, BC_ROLE_INFRA, ls, &n) != 0 ||
        bc_volume_open(&p, &crash_ops, cr, ls, n, &v) != 0) {
        cr_close(cr);
        return NULL;
    }
    return v;
}

/* The set-up of the failed-write tests: an empty disk file `name`, keys, and three
 * sector contents a, b, c (fill seeds seed, seed+1, seed+2) plus a buffer to read into. */
struct three {
    char path[4200];
    struct keys k;
    uint8_t *a, *b, *c, *got;
};

static void three_make(struct three *t, const char *name, uint32_t ss, uint64_t key_seed, uint64_t seed)
{
    path_in_dir(t->path, sizeof t->path, name);
    make_empty(t->path);
    make_keys(&t->k, key_seed);
    t->a = malloc(ss), t->b = malloc(ss), t->c = malloc(ss), t->got = malloc(ss);
    fill(t->a, ss, seed), fill(t->b, ss, seed + 1), fill(t->c, ss, seed + 2);
}

static void three_free(struct three *t)
{
    free(t->a), free(t->b), free(t->c), free(t->got);
}

/* A data write that fails after its metadata was stored (ENOSPC) leaves a newer slot
 * that does not match the data, in a live instance: the layer must stop trusting its
 * own slots (write_failed), or the next write of that sector overwrites the only valid
 * slot and a kill then loses the sector. */
static void test_failed_data_write(uint32_t ss)
{
    struct three t;
    three_make(&t, "f.img", ss, 900 + ss, 1);
    const char *path = t.path;
    struct keys k = t.k;
    uint8_t *a = t.a, *b = t.b, *c = t.c, *got = t.got;
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, 8 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    CHECK_RC(bc_volume_write(v, a, ss, 2 * ss), ss);
    bc_volume_unref(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, 8 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    CHECK_RC(bc_volume_write(v, a, ss, 3 * ss), ss);   /* this instance's slot on sector 3 */
    bc_volume_unref(v);
    /* the same instance: 1st write call (metadata) passes, 2nd (data) fails, then the next
     * request stores its metadata and the process "dies" */
    v = vopen_failing(path, &k, ss, 8 * ss, 4, 4, 0);   /* a: 1, 2; b: 3, (4 fails); c: 5 */
    REQUIRE(v != NULL, "open");
    CHECK_RC(bc_volume_write(v, a, ss, 2 * ss), ss);   /* now this instance's slot, data written */
    CHECK_RC(bc_volume_write(v, b, ss, 2 * ss), -ENOSPC);   /* metadata stored, data refused */
    CHECK_RC(bc_volume_read(v, got, ss, 2 * ss), ss);
    CHECK(memcmp(got, a, ss) == 0, "a refused write reads the old content");
    CHECK_RC(bc_volume_write(v, c, ss, 2 * ss), ss);   /* metadata stored, then the kill */
    bc_volume_unref(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, 8 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    CHECK_RC(bc_volume_read(v, got, ss, 2 * ss), ss);
    CHECK(memcmp(got, a, ss) == 0, "after a failed data write and a kill: the old content");
    bc_volume_unref(v);
    three_free(&t);
}

/* Aligned writes encrypt from the caller's buffer (layer 0 out of place: XTS) or copy
 * it first (a layer without encrypt_from: the AEAD layer alone): either way the
 * caller's buffer is left as it was, and what was written reads back. */
static void test_write_leaves_source(uint32_t ss, int stack)
{
    char path[4200];
    path_in_dir(path, sizeof path, "src.img");
    make_empty(path);
    const size_t size = 512u << 10;
    struct keys k;
    make_keys(&k, 700 + ss + (unsigned)stack);
    struct bc_volume *v = vopen(path, &k, stack, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    uint8_t *pt = malloc(size), *ref = malloc(size), *got = malloc(size);
    fill(pt, size, 33 + ss);
    memcpy(ref, pt, size);
    CHECK_RC(bc_volume_write(v, pt, size, 0), size);   /* parts on helpers */
    CHECK(memcmp(pt, ref, size) == 0, "a whole-span write changed the caller's buffer");
    CHECK_RC(bc_volume_write(v, pt + ss, ss, 5 * ss), ss);   /* one sector */
    CHECK(memcmp(pt, ref, size) == 0, "a one-sector write changed the caller's buffer");
    memcpy(ref + 5 * ss, ref + ss, ss);
    CHECK_RC(bc_volume_read(v, got, size, 0), size);
    CHECK(memcmp(got, ref, size) == 0, "read back");
    bc_volume_unref(v);
    free(pt), free(ref), free(got);
}

/* Open prefetches the metadata range (capped at BC_META_PREFETCH_MAX), and the local
 * store really brings it into the page cache: with the file's pages dropped, the
 * metadata pages become resident after the open, without a read. */
static void test_open_prefetches_metadata(void)
{
    const uint32_t ss = 4096;
    char path[4200];
    path_in_dir(path, sizeof path, "pf.img");
    make_empty(path);
    const size_t size = 64u << 20, ns = size / ss;   /* 16,384 sectors: 1.5 MiB of metadata */
    struct keys k;
    make_keys(&k, 31);
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open");
    uint8_t *b = malloc(1u << 20);
    fill(b, 1u << 20, 8);
    for (size_t off = 0; off < size; off += 1u << 20)
        CHECK_RC(bc_volume_write(v, b, 1u << 20, off), 1u << 20);
    CHECK_RC(bc_volume_flush(v), 0);
    bc_volume_unref(v);
    int fd = open(path, O_RDONLY);
    REQUIRE(fd >= 0, "open the file");
    CHECK(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0, "drop its pages");
    size_t mlen = ns * M, pages = (mlen + 4095) / 4096;
    unsigned char *vec = malloc(pages);
    void *map = mmap(NULL, mlen, PROT_READ, MAP_SHARED, fd, META_OFF);
    REQUIRE(map != MAP_FAILED, "mmap the metadata");
    size_t resident = 0;
    CHECK(mincore(map, mlen, vec) == 0, "mincore");
    for (size_t i = 0; i < pages; i++)
        resident += vec[i] & 1;
    CHECK(resident < pages / 2, "the metadata is still cached (%zu of %zu pages): the test proves nothing",
          resident, pages);
    g_prefetch_len = 0;
    v = vopen(path, &k, ST_XTS_AEAD, ss, size, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    CHECK(g_prefetch_off == META_OFF && g_prefetch_len == mlen, "prefetch of [%" PRIu64 ", +%" PRIu64 ")",
          g_prefetch_off, g_prefetch_len);
    for (int t = 0; t < 200 && resident < pages; t++) {   /* readahead is asynchronous: up to 2 s */
        usleep(10000);
        resident = 0;
        CHECK(mincore(map, mlen, vec) == 0, "mincore");
        for (size_t i = 0; i < pages; i++)
            resident += vec[i] & 1;
    }
    CHECK(resident == pages, "%zu of %zu metadata pages resident after the open", resident, pages);
    bc_volume_unref(v);
    munmap(map, mlen);
    close(fd);
    free(vec), free(b);
}

/* A metadata write that reached the file but answered an error (EIO after the write,
 * as a failing device may) leaves a newer slot of this instance beside the old data,
 * and no data write follows: the layer must stop trusting its own slots here too, or the
 * next write keeps that slot, overwrites the only valid one, and a kill loses the sector. */
static void test_failed_meta_write(uint32_t ss)
{
    struct three t;
    three_make(&t, "fm.img", ss, 950 + ss, 4);
    const char *path = t.path;
    struct keys k = t.k;
    uint8_t *a = t.a, *b = t.b, *c = t.c, *got = t.got;
    struct bc_volume *v = vopen_failing(path, &k, ss, 8 * ss, 4, 0, 3);   /* a: 1, 2; b: 3 (EIO); c: 4, kill */
    REQUIRE(v != NULL, "open");
    CHECK_RC(bc_volume_write(v, a, ss, 2 * ss), ss);
    CHECK_RC(bc_volume_write(v, b, ss, 2 * ss), -EIO);   /* metadata on the file, "failed" */
    CHECK_RC(bc_volume_read(v, got, ss, 2 * ss), ss);
    CHECK(memcmp(got, a, ss) == 0, "a failed metadata write reads the old content");
    CHECK_RC(bc_volume_write(v, c, ss, 2 * ss), ss);   /* metadata stored, then the kill */
    bc_volume_unref(v);
    bc_layer_aead_forget_ids();   /* a new process */
    v = vopen(path, &k, ST_XTS_AEAD, ss, 8 * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "reopen");
    CHECK_RC(bc_volume_read(v, got, ss, 2 * ss), ss);
    CHECK(memcmp(got, a, ss) == 0, "after a failed metadata write and a kill: the old content");
    bc_volume_unref(v);
    three_free(&t);
}

/* Nonces come from a per-thread pool (bc_layer_aead.c): a forked child must not hand out
 * the nonces its parent is about to use (the same key in both: keystream reuse). */
static void test_nonce_after_fork(void)
{
    struct keys k;
    make_keys(&k, 77);
    struct bc_layer l;
    REQUIRE(bc_layer_aead_new(k.aead, 32, 512, k.id, BC_ROLE_INFRA, &l) == 0, "layer");
    uint8_t buf[512], meta[M];
    memset(buf, 1, sizeof buf);
    memset(meta, 0, sizeof meta);
    CHECK(l.ops->encrypt(l.ctx, buf, 1, 0, meta, M) == 0, "seal (fills this thread's pool)");
    int fds[2];
    REQUIRE(pipe(fds) == 0, "pipe");
    pid_t pid = fork();
    if (pid == 0) {
        uint8_t m2[M] = {0};
        int ok = l.ops->encrypt(l.ctx, buf, 1, 0, m2, M) == 0 && write(fds[1], m2 + 8, 24) == 24;
        _exit(ok ? 0 : 1);
    }
    uint8_t mine[M] = {0}, theirs[24] = {0};
    CHECK(l.ops->encrypt(l.ctx, buf, 1, 0, mine, M) == 0, "seal in the parent");
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the child sealed");
    CHECK(read(fds[0], theirs, 24) == 24, "the child's nonce");
    CHECK(memcmp(mine + 8, theirs, 24) != 0, "parent and child drew the same nonce after a fork");
    close(fds[0]), close(fds[1]);
    l.ops->destroy(l.ctx);
}

/* ---- 5. bench ---------------------------------------------------------------------------- */

static double mbps(size_t bytes, uint64_t ns) { return (double)bytes / 1e6 / ((double)ns / 1e9); }

static int bench(const char *bench_dir)
{
    const size_t ss = 4096, n = 256, total = 256u << 20;
    struct keys k;
    make_keys(&k, 1);
    struct bc_layer l;
    if (bc_layer_aead_new(k.aead, 32, ss, k.id, 2, &l) != 0)
        return 1;
    uint8_t *buf = malloc(n * ss), *meta = calloc(n, M), *tag = malloc(16), nonce[24], ad[33] = {0};
    fill(buf, n * ss, 3);
    uint8_t *one = malloc(ss), *out = malloc(ss), one_nonce[24], one_tag[16];
    fill(one, ss, 4);
    randombytes_buf(one_nonce, sizeof one_nonce);
    crypto_aead_xchacha20poly1305_ietf_encrypt_detached(one, one_tag, NULL, one, ss, ad, 33, NULL, one_nonce,
                                                        k.aead);
    for (int rep = 0; rep < 3; rep++) {
        uint64_t t0 = now_ns();
        for (size_t done = 0; done < total; done += n * ss)
            l.ops->encrypt(l.ctx, buf, n, 0, meta, M);
        uint64_t t1 = now_ns();
        for (size_t done = 0; done < total; done += n * ss) {   /* decrypt, then encrypt back */
            l.ops->decrypt(l.ctx, buf, n, 0, meta, M);
            l.ops->encrypt(l.ctx, buf, n, 0, meta, M);
        }
        uint64_t t2 = now_ns();
        for (size_t done = 0; done < total; done += ss) {
            randombytes_buf(nonce, sizeof nonce);
            crypto_aead_xchacha20poly1305_ietf_encrypt_detached(buf, tag, NULL, buf, ss, ad, 33, NULL, nonce, k.aead);
        }
        uint64_t t3 = now_ns();
        for (size_t done = 0; done < total; done += ss)
            if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(out, NULL, one, ss, one_tag, ad, 33, one_nonce,
                                                                    k.aead) != 0)
                return 1;
        uint64_t t4 = now_ns();
        double enc = mbps(total, t1 - t0), sod_enc = mbps(total, t3 - t2), sod_dec = mbps(total, t4 - t3);
        double dec = (double)total / 1e6 / (((double)(t2 - t1) - (double)(t1 - t0)) / 1e9);
        printf("aead 4 KiB, one thread: layer encrypt %.0f MB/s, decrypt %.0f MB/s; libsodium one-shot "
               "encrypt (+ randombytes) %.0f MB/s, decrypt %.0f MB/s; ratios %.2f / %.2f\n",
               enc, dec, sod_enc, sod_dec, enc / sod_enc, dec / sod_dec);
    }
    free(one), free(out);
    /* the engine over a file in dir: XTS alone vs XTS over AEAD, one thread */
    char path[4200];
    snprintf(path, sizeof path, "%s/bc-aead-bench.%d.img", bench_dir, (int)getpid());
    const uint64_t vsize = 256ull << 20;
    for (int stack = 0; stack < 2; stack++) {
        make_empty(path);
        const struct bc_storage_ops *ops;
        void *ctx;
        if (bc_storage_local_open(path, 1, BC_CACHE_BUFFERED, &ops, &ctx) != 0)
            return 1;
        struct bc_layer ls[2];
        size_t nl = 1;
        bc_layer_xts_new(k.xts, 64, 4096, &ls[0]);
        if (stack)
            bc_layer_aead_new(k.aead, 32, 4096, k.id, 2, &ls[nl++]);
        struct bc_volume_params p = {.size_bytes = vsize, .sector_size = 4096, .data_off = DATA_OFF,
                                     .meta_off = 1ull << 30};   /* past the data, as on a disk */
        struct bc_volume *v;
        if (bc_volume_open(&p, ops, ctx, ls, nl, &v) != 0)
            return 1;
        uint8_t *b = malloc(1 << 20);
        fill(b, 1 << 20, 9);
        double r[4];
        for (int phase = 0; phase < 4; phase++) {   /* seq write 1M, seq read 1M, rand write 4K, rand read 4K */
            size_t bs = phase < 2 ? (1u << 20) : 4096u;
            uint64_t x = 12345, t0 = now_ns(), bytes = 0;
            for (uint64_t i = 0; bytes < vsize; i++, bytes += bs) {
                uint64_t off = phase < 2 ? (i * bs) % vsize : ((x = x * 6364136223846793005ull + 1) >> 20) % (vsize / bs) * bs;
                if (phase % 2 == 0)
                    bc_volume_write(v, b, bs, off);
                else
                    bc_volume_read(v, b, bs, off);
            }
            r[phase] = mbps(bytes, now_ns() - t0);
        }
        printf("engine on %s, 4 KiB sectors, one thread, %s: seq write 1 MiB %.0f MB/s, seq read %.0f, "
               "rand write 4 KiB %.0f, rand read 4 KiB %.0f\n", bench_dir, stack ? "XTS over AEAD" : "XTS alone",
               r[0], r[1], r[2], r[3]);
        bc_volume_unref(v);
        free(b);
        unlink(path);
    }
    l.ops->destroy(l.ctx);
    free(buf), free(meta), free(tag);
    return 0;
}

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

/* ---- 6. speed (bench/xts_speed.py --engine-aead) ----------------------------------------- */

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* GB/s (10^9 bytes per CPU-second of this thread) of op(arg), which handles `bytes`
 * per call and returns non-zero on a failure, called in batches of 64 for about secs
 * CPU-seconds; -1 if a call failed. */
static double gbps_of(int (*op)(void *), void *arg, size_t bytes, double secs)
{
    uint64_t done = 0, t0 = cpu_ns(), budget = (uint64_t)(secs * 1e9);
    int bad = 0;
    while (!bad && cpu_ns() - t0 < budget) {
        for (int i = 0; i < 64; i++)
            bad |= op(arg) != 0;
        done += 64 * bytes;
    }
    double gbps = (double)done / 1e9 / ((double)(cpu_ns() - t0) / 1e9);
    return bad ? -1.0 : gbps;
}

struct layer_run {
    struct bc_layer *l;
    size_t n;
    uint8_t *buf, *sealed, *meta, *meta0;
};

static int layer_seal_op(void *p)
{
    struct layer_run *r = p;
    return r->l->ops->encrypt(r->l->ctx, r->buf, r->n, 100, r->meta, M);
}

/* an in-place open consumes its input: the sealed copy is restored first (a memcpy of
 * the request, counted against the layer) */
static int layer_open_op(void *p)
{
    struct layer_run *r = p;
    memcpy(r->buf, r->sealed, r->n * 4096);
    return r->l->ops->decrypt(r->l->ctx, r->buf, r->n, 100, r->meta0, M);
}

/* GB/s of the layer's seal (dec == 0) or open of n 4 KiB sectors per call. */
static double layer_gbps(struct bc_layer *l, size_t n, int dec, double secs)
{
    const size_t ss = 4096;
    struct layer_run r = {.l = l, .n = n, .buf = malloc(n * ss), .sealed = malloc(n * ss),
                          .meta = calloc(n, M), .meta0 = calloc(n, M)};
    fill(r.buf, n * ss, 7);
    double gbps = -1.0;
    if (l->ops->encrypt(l->ctx, r.buf, n, 100, r.meta, M) == 0) {
        memcpy(r.sealed, r.buf, n * ss);
        memcpy(r.meta0, r.meta, n * M);
        gbps = gbps_of(dec ? layer_open_op : layer_seal_op, &r, n * ss, secs);
    }
    free(r.buf), free(r.sealed), free(r.meta), free(r.meta0);
    return gbps;
}

static uint8_t speed_buf[4096];

/* what `openssl speed -evp chacha20-poly1305 -bytes 4096` times: EVP_EncryptUpdate of one
 * 4 KiB buffer in place, again and again, under one key and nonce */
static int openssl_bulk_op(void *c)
{
    int outl = 0;
    return EVP_EncryptUpdate(c, speed_buf, &outl, speed_buf, (int)sizeof speed_buf) != 1;
}

static double openssl_bulk_gbps(double secs)
{
    static const uint8_t key[32], iv[12];
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    double gbps = -1.0;
    if (c != NULL && EVP_EncryptInit_ex(c, EVP_chacha20_poly1305(), NULL, key, iv) == 1)
        gbps = gbps_of(openssl_bulk_op, c, sizeof speed_buf, secs);
    EVP_CIPHER_CTX_free(c);
    return gbps;
}

/* libsodium's own one-shot XChaCha20-Poly1305 seal of one 4 KiB sector, in place, a new
 * nonce per call as the layer draws one (the other yardstick) */
static int sodium_seal_op(void *unused)
{
    static const uint8_t key[32], ad[33];
    static uint8_t nonce[24], tag[16];
    (void)unused;
    nonce[0]++;
    return crypto_aead_xchacha20poly1305_ietf_encrypt_detached(speed_buf, tag, NULL, speed_buf, sizeof speed_buf, ad,
                                                               sizeof ad, NULL, nonce, key);
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

#define SPEED_ROUNDS 15

/* The layer's seal and open at one 4 KiB sector per call and at 256, openssl's bulk
 * loop and libsodium's one-shot seal, in SPEED_ROUNDS interleaved rounds of secs / SPEED_ROUNDS each: on a shared VM
 * the host's load moves every figure by tens of per cent within seconds, so each round
 * gives a ratio of figures taken side by side, and the medians are printed. */
static int speed(double secs)
{
    struct keys k;
    make_keys(&k, 5);
    struct bc_layer l;
    if (bc_layer_aead_new(k.aead, 32, 4096, k.id, 2, &l) != 0)
        return 1;
    enum { S1, O1, S256, O256, OSSL, SOD, RS, RO, RSOD, NF };
    static const char *names[NF] = {"seal_4k", "open_4k", "seal_1m", "open_1m", "openssl_bulk_4k",
                                    "sodium_seal_4k", "seal_4k_vs_openssl", "open_4k_vs_openssl",
                                    "seal_4k_vs_sodium"};
    double v[NF][SPEED_ROUNDS], t = secs / SPEED_ROUNDS;
    int bad = 0;
    for (int r = 0; r < SPEED_ROUNDS; r++) {
        v[OSSL][r] = openssl_bulk_gbps(t / 4);
        v[S1][r] = layer_gbps(&l, 1, 0, t / 4);
        v[O1][r] = layer_gbps(&l, 1, 1, t / 4);
        v[SOD][r] = gbps_of(sodium_seal_op, NULL, sizeof speed_buf, t / 8);
        v[S256][r] = layer_gbps(&l, 256, 0, t / 16);
        v[O256][r] = layer_gbps(&l, 256, 1, t / 16);
        for (int f = 0; f < RS; f++)
            bad |= v[f][r] < 0;
        v[RS][r] = v[S1][r] / v[OSSL][r];
        v[RO][r] = v[O1][r] / v[OSSL][r];
        v[RSOD][r] = v[S1][r] / v[SOD][r];
    }
    l.ops->destroy(l.ctx);
    printf("{\"bulk\": \"%s\"", bc_layer_aead_bulk(NULL));
    for (int f = 0; f < NF; f++) {
        qsort(v[f], SPEED_ROUNDS, sizeof v[f][0], cmp_double);
        printf(", \"%s\": %.4f", names[f], bad ? -1.0 : v[f][SPEED_ROUNDS / 2]);
    }
    printf("}\n");
    return bad;
}

/* ---- 7. the AVX-512 ChaCha20-Poly1305 against libsodium's IETF construction ---------- */

static void test_chachapoly_avx512(void)
{
    enum { ROUNDS = 3000 };
    uint8_t *pt = malloc(BC_CP_MAX), *a = malloc(BC_CP_MAX), *b = malloc(BC_CP_MAX + 16), *keep = malloc(BC_CP_MAX);
    uint8_t key[32], nonce[12], ad[64], tag[16];
    int differ = 0, opens = 0, tamper = 0, verifies = 0;
    for (int it = 0; it < ROUNDS; it++) {
        size_t len = it % 3 == 0 ? BC_CP_MAX : it % 3 == 1 ? 512 : (size_t)256 * (1 + it % 16);
        size_t adl = (size_t)(it % 65);
        randombytes_buf(pt, len);
        randombytes_buf(key, sizeof key);
        randombytes_buf(nonce, sizeof nonce);
        randombytes_buf(ad, adl);
        memcpy(a, pt, len);
        unsigned long long cl;
        crypto_aead_chacha20poly1305_ietf_encrypt(b, &cl, pt, len, ad, adl, NULL, nonce, key);
        differ += bc_cp_avx512_seal(a, len, ad, adl, key, nonce, tag) != 0 || memcmp(a, b, len) != 0 ||
                  memcmp(tag, b + len, 16) != 0;
        /* verify: libsodium's ciphertext and tag check, nothing written */
        verifies += bc_cp_avx512_verify(b, len, ad, adl, key, nonce, b + len) != 1 || memcmp(a, b, len) != 0;
        opens += bc_cp_avx512_open(a, len, ad, adl, key, nonce, tag) != 1 || memcmp(a, pt, len) != 0;
        /* one bit off in the tag, the ciphertext or the associated data: refused, p untouched */
        memcpy(a, b, len);
        int what = it % 3;
        if (what == 0)
            tag[it % 16] ^= (uint8_t)(1u << (it % 8));
        else if (what == 1)
            a[(size_t)it * 7 % len] ^= (uint8_t)(1u << (it % 8));
        else if (adl > 0)
            ad[it % adl] ^= 1;
        else
            nonce[it % 12] ^= 1;
        memcpy(keep, a, len);
        tamper += bc_cp_avx512_verify(a, len, ad, adl, key, nonce, tag) != 0;
        tamper += bc_cp_avx512_open(a, len, ad, adl, key, nonce, tag) != 0 || memcmp(a, keep, len) != 0;
    }
    CHECK(verifies == 0, "%d of %d verifies of libsodium's seals failed", verifies, ROUNDS);
    CHECK(differ == 0, "%d of %d seals differ from libsodium's", differ, ROUNDS);
    CHECK(opens == 0, "%d of %d opens failed", opens, ROUNDS);
    CHECK(tamper == 0, "%d of %d tampered messages opened or were changed", tamper, ROUNDS);
    CHECK(bc_cp_avx512_seal(a, 128, ad, 0, key, nonce, tag) == -1 && bc_cp_avx512_seal(a, 0, ad, 0, key, nonce, tag) == -1 &&
              bc_cp_avx512_open(a, BC_CP_MAX + 256, ad, 0, key, nonce, tag) == -1 &&
              bc_cp_avx512_seal(a, 256, ad, 65, key, nonce, tag) == -1 &&
              bc_cp_avx512_verify(a, 100, ad, 0, key, nonce, tag) == -1,
          "lengths it does not take are refused");
    free(pt), free(a), free(b), free(keep);
}

/* ---- 6. the metadata journal (bc_storage_journal.c) ------------------------------------ */

static struct bc_journal_counts jcounts(void)
{
    struct bc_journal_counts c = {0};
    if (g_jctx != NULL)
        bc_storage_journal_counts(g_jctx, &c);
    return c;
}

/* every sector of v reads exp */
static int count_wrong(struct bc_volume *v, uint32_t ss, size_t ns, const uint8_t *exp)
{
    uint8_t *got = malloc(ss);
    int bad = 0;
    for (size_t s = 0; s < ns; s++)
        bad += bc_volume_read(v, got, ss, s * ss) != (ssize_t)ss || memcmp(got, exp + s * ss, ss) != 0;
    free(got);
    return bad;
}

static void kill_and_close(struct bc_volume *v)
{
    g_crash->budget = 0;   /* nothing more reaches the file: the close's checkpoint is lost */
    bc_volume_unref(v);
}

/* Small writes go to the log, not the table; a clean close checkpoints them; a kill leaves
 * them in the log and the next open replays them; a large write and a discard go in place
 * and void the log's older records of their sectors. */
static void test_journal_basic(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "j.img");
    make_empty(path);
    g_jlog = BC_JOURNAL_LOG_BYTES;
    const size_t ns = 256;
    struct keys k;
    make_keys(&k, 900 + ss);
    uint8_t *exp = calloc(ns, ss), *buf = malloc(ns * ss), *raw = malloc(ns * M);
    struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    REQUIRE(v != NULL, "open with a journal");
    uint64_t seed = 77;
    for (int i = 0; i < 200; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        size_t s = (size_t)(seed >> 33) % ns;
        fill(exp + s * ss, ss, seed);
        CHECK_RC(bc_volume_write(v, exp + s * ss, ss, s * ss), ss);
    }
    raw_pread(path, raw, ns * M, META_OFF);
    CHECK(all_zero(raw, ns * M), "small writes leave the table alone");
    struct bc_journal_counts c = jcounts();
    CHECK(c.records == 200 && c.pending > 100 && c.log_used >= 200 * 128, "200 records in the log (%" PRIu64 ")",
          c.records);
    CHECK(count_wrong(v, ss, ns, exp) == 0, "reads see the log");
    bc_volume_unref(v);
    raw_pread(path, raw, ns * M, META_OFF);
    CHECK(!all_zero(raw, ns * M), "a clean close checkpoints into the table");
    v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    c = jcounts();
    CHECK(c.replayed == 0 && c.pending == 0, "after a checkpoint nothing to replay (%" PRIu64 ")", c.replayed);
    CHECK(count_wrong(v, ss, ns, exp) == 0, "the table alone reads right");
    /* a large write where the log holds none of its sectors: in place, and no record (128
     * sectors: the parts of a 512 KiB span are 64, more than a record holds) */
    uint64_t r0 = jcounts().records;
    fill(exp + 128 * ss, 128 * ss, 5500);
    CHECK_RC(bc_volume_write(v, exp + 128 * ss, 128 * ss, 128 * ss), 128 * ss);
    CHECK(jcounts().records == r0, "a large write over sectors the log lacks appends no DROP (%" PRIu64 ")",
          jcounts().records - r0);
    /* a kill: the log is all there is */
    for (size_t s = 0; s < ns; s += 3) {
        fill(exp + s * ss, ss, 5000 + s);
        CHECK_RC(bc_volume_write(v, exp + s * ss, ss, s * ss), ss);
    }
    kill_and_close(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    c = jcounts();
    CHECK(c.replayed == (ns + 2) / 3, "the killed writes are replayed (%" PRIu64 ")", c.replayed);
    CHECK(count_wrong(v, ss, ns, exp) == 0, "after a kill every sector reads its last write");
    /* a large write in place over sectors the log holds, then a kill */
    fill(exp, 128 * ss, 6000);
    r0 = jcounts().records;
    c = jcounts();
    CHECK_RC(bc_volume_write(v, exp, 128 * ss, 0), 128 * ss);
    CHECK(jcounts().records > r0 && jcounts().pending < c.pending,
          "a large write over sectors the log holds appends a DROP (%" PRIu64 ")", jcounts().records - r0);
    kill_and_close(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    CHECK(count_wrong(v, ss, ns, exp) == 0, "a large write voids the older log records of its sectors");
    /* small writes, then a discard of them, then a kill: zeros */
    for (size_t s = 100; s < 110; s++) {
        fill(exp + s * ss, ss, 7000 + s);
        CHECK_RC(bc_volume_write(v, exp + s * ss, ss, s * ss), ss);
    }
    CHECK_RC(bc_volume_discard(v, 100 * ss, 10 * ss), 0);
    memset(exp + 100 * ss, 0, 10 * ss);
    kill_and_close(v);
    v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    CHECK(count_wrong(v, ss, ns, exp) == 0, "a discard voids the log records of its sectors");
    /* a write whose log append fails leaves a gap: the records after it still replay */
    g_crash->fail_at = g_crash->calls + 1;
    uint8_t *x = malloc(ss);
    fill(x, ss, 8000);
    CHECK(bc_volume_write(v, x, ss, 5 * ss) < 0, "the write whose log append fails fails");
    g_crash->fail_at = 0;
    fill(exp + 6 * ss, ss, 8001);
    CHECK_RC(bc_volume_write(v, exp + 6 * ss, ss, 6 * ss), ss);
    kill_and_close(v);
    /* a read-only journal over the killed file: the log is replayed, nothing written */
    uint8_t *before = malloc(ns * M), *seen = malloc(ns * M), *after = malloc(ns * M);
    raw_pread(path, before, ns * M, META_OFF);
    const struct bc_storage_ops *lops, *jops;
    void *lctx, *jctx;
    REQUIRE(bc_storage_local_open(path, 0, BC_CACHE_BUFFERED, &lops, &lctx) == 0, "open read-only");
    struct bc_journal_params jp = {.meta_off = META_OFF, .meta_bytes = M, .meta_sectors = (JLOG_OFF - META_OFF) / M,
                                   .log_off = JLOG_OFF, .log_bytes = g_jlog};
    REQUIRE(bc_storage_journal_wrap(&jp, lops, lctx, 0, &jops, &jctx) == 0, "a read-only journal");
    CHECK_RC(jops->read_at(jctx, seen, ns * M, META_OFF), 0);
    CHECK(jops->write_at(jctx, seen, M, META_OFF) == -EROFS && bc_storage_journal_checkpoint(jctx) == -EROFS,
          "a read-only journal refuses writes");
    jops->close(jctx);
    raw_pread(path, after, ns * M, META_OFF);
    CHECK(memcmp(before, after, ns * M) == 0 && memcmp(seen, before, ns * M) != 0,
          "a read-only journal sees the log and leaves the table alone");
    v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
    c = jcounts();
    uint8_t *m = malloc(M);
    CHECK_RC(g_jctx != NULL ? ((const struct bc_storage_ops *)jops)->read_at(g_jctx, m, M, META_OFF + 6 * M) : -1, 0);
    CHECK(memcmp(m, seen + 6 * M, M) == 0, "the read-only view and the writable one agree");
    CHECK(count_wrong(v, ss, ns, exp) == 0, "records after a gap in the log replay");
    bc_volume_unref(v);
    g_jlog = 0;
    free(exp), free(buf), free(raw), free(x), free(before), free(seen), free(after), free(m);
}

/* A small log (64 one-sector records) that fills again and again: checkpoints under
 * writes; then a kill after every storage write of a sequence that crosses checkpoints:
 * every sector reads its old or its new content, never fails, and every write whose
 * storage writes all reached the file reads new. */
static void test_journal_kills(uint32_t ss)
{
    char path[4200];
    path_in_dir(path, sizeof path, "jk.img");
    g_jlog = 8192;
    const size_t ns = 128, nw = 100;
    struct keys k;
    make_keys(&k, 950 + ss);
    uint8_t *base = malloc(ns * ss), *cur = malloc(ns * ss);
    size_t order[128];
    for (size_t i = 0; i < ns; i++)
        order[i] = i;
    uint64_t seed = 99;
    for (size_t i = ns - 1; i > 0; i--) {   /* a permutation: each sector written once below */
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        size_t r = (size_t)(seed >> 33) % (i + 1), t = order[i];
        order[i] = order[r], order[r] = t;
    }
    fill(base, ns * ss, 1234);
    int bad = 0, lost = 0, rounds = 0, saw_cp = 0;
    long total_writes = -1;
    for (long kill = 0; total_writes < 0 || kill <= total_writes; kill++) {
        make_empty(path);
        struct bc_volume *v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
        REQUIRE(v != NULL, "open");
        for (size_t s = 0; s < ns; s++)
            bc_volume_write(v, base + s * ss, ss, s * ss);   /* fills the log twice: checkpoints */
        saw_cp += jcounts().checkpoints >= 2;
        bc_volume_unref(v);
        v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, total_writes < 0 ? -1 : kill, 0, BC_ROLE_INFRA);
        long calls0 = g_crash->calls;
        memcpy(cur, base, ns * ss);
        int done[128] = {0};
        for (size_t i = 0; i < nw; i++) {
            size_t s = order[i];
            fill(cur + s * ss, ss, 40000 + s);
            bc_volume_write(v, cur + s * ss, ss, s * ss);
            done[s] = g_crash->budget != 0;   /* every write of this request reached the file */
        }
        if (total_writes < 0)
            total_writes = g_crash->calls - calls0;   /* the first round counts them, unkilled */
        kill_and_close(v);
        v = vopen(path, &k, ST_XTS_AEAD, ss, ns * ss, -1, 0, BC_ROLE_INFRA);
        uint8_t *got = malloc(ss);
        for (size_t s = 0; s < ns; s++) {
            if (bc_volume_read(v, got, ss, s * ss) != (ssize_t)ss) {
                bad++;
                continue;
            }
            int is_old = memcmp(got, base + s * ss, ss) == 0, is_new = memcmp(got, cur + s * ss, ss) == 0;
            bad += !is_old && !is_new;
            lost += done[s] && !is_new;
        }
        free(got);
        bc_volume_unref(v);
        rounds++;
    }
    CHECK(total_writes > 2 * (long)nw, "the sequence crosses checkpoints (%ld storage writes)", total_writes);
    CHECK(saw_cp == rounds, "the log filled and checkpointed under writes");
    CHECK(bad == 0, "ss %u: %d sectors neither old nor new (or failing) over %d kills", ss, bad, rounds);
    CHECK(lost == 0, "ss %u: %d completed writes lost over %d kills", ss, lost, rounds);
    g_jlog = 0;
    free(base), free(cur);
}

static void run_all(void)
{
    RUN(test_layer_vs_sodium(512));
    RUN(test_layer_vs_sodium(4096));
    RUN(test_volume(512, ST_AEAD));
    RUN(test_volume(4096, ST_AEAD));
    RUN(test_volume(4096, ST_XTS_AEAD));
    RUN(test_volume(512, ST_XTS_AEAD));
    RUN(test_parallel_span(4096));
    RUN(test_parallel_span(512));
    RUN(test_holes(4096));
    RUN(test_holes(512));
    RUN(test_crash(4096, 0));
    RUN(test_crash(4096, 1));
    RUN(test_crash(512, 1));
    RUN(test_reopen_keeps_writer(4096));
    RUN(test_reopen_keeps_writer(512));
    RUN(test_repeated_kills(4096));
    RUN(test_repeated_kills(512));
    RUN(test_failed_data_write(4096));
    RUN(test_failed_data_write(512));
    RUN(test_failed_meta_write(4096));
    RUN(test_failed_meta_write(512));
    RUN(test_nonce_after_fork());
    RUN(test_open_prefetches_metadata());
    RUN(test_write_leaves_source(4096, ST_XTS_AEAD));
    RUN(test_write_leaves_source(512, ST_XTS_AEAD));
    RUN(test_write_leaves_source(4096, ST_AEAD));
    RUN(test_journal_basic(4096));
    RUN(test_journal_basic(512));
    RUN(test_journal_kills(4096));
    RUN(test_journal_kills(512));
    /* the kill tests again, with the journal between the engine and the file */
    g_jlog = BC_JOURNAL_LOG_BYTES;
    RUN(test_crash(4096, 1));
    RUN(test_crash(512, 1));
    RUN(test_repeated_kills(4096));
    RUN(test_failed_data_write(4096));
    RUN(test_failed_meta_write(4096));
    g_jlog = 0;
}

int main(int argc, char **argv)
{
    if (sodium_init() < 0)
        return 2;
    if (argc > 1 && strcmp(argv[1], "--bench") == 0)
        return bench(argc > 2 ? argv[2] : "/dev/shm");
    if (argc > 1 && strcmp(argv[1], "--speed") == 0)
        return speed(argc > 2 ? atof(argv[2]) : 1.0);
    const char *base = argc > 1 ? argv[1] : getenv("TMPDIR");
    if (base == NULL || !*base)
        base = "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/bc-aead-test.XXXXXX", base);
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (bc_cp_avx512_usable())
        RUN(test_chachapoly_avx512());
    else
        printf("-- test_chachapoly_avx512 not run: this CPU lacks AVX-512 F/VL/IFMA\n");
    /* everything under each library the layer can run its bulk through */
    static const char *const bulks[] = {"avx512", "openssl", "gcrypt"};
    for (size_t i = 0; i < sizeof bulks / sizeof bulks[0]; i++) {
        if (strcmp(bulks[i], "avx512") == 0 && !bc_cp_avx512_usable()) {
            CHECK(bc_layer_aead_bulk(bulks[i]) == NULL, "avx512 refused on a CPU without it");
            printf("-- bulk: avx512 not run: this CPU lacks AVX-512 F/VL/IFMA\n");
            continue;
        }
        CHECK(bc_layer_aead_bulk(bulks[i]) != NULL && strcmp(bc_layer_aead_bulk(NULL), bulks[i]) == 0, "bulk %s",
              bulks[i]);
        printf("-- bulk: %s\n", bulks[i]);
        run_all();
    }
    CHECK(bc_layer_aead_bulk("nss") == NULL, "unknown bulk refused");
    rm_dir(g_dir);
    int f = atomic_load(&g_failures);
    printf("%s: %d checks, %d failed\n", f ? "FAILED" : "PASSED", g_checks, f);
    return f ? 1 : 0;
}
