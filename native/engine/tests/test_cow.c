/*
 * test_cow.c — copy-on-write overlay chains (bc_storage_cow.c) under the volume engine.
 *
 *   test_cow [DIR]   run every test on files in a fresh directory under DIR ($TMPDIR, /tmp)
 *
 * What is checked, against byte-array models: a snapshot (the disk's file frozen, the disk
 * going on in a new top file over it) keeps reading the old bytes while the disk is
 * written, discarded and reopened; two disks made from one snapshot diverge; a chain of
 * 40 files reads every level's view; random writes/discards/reads at 512 and 4096-byte
 * sectors with XTS and with the AEAD layer (per-sector metadata shared as it is); space
 * only for what changed (st_blocks of the top); bitmaps made durable only by a flush;
 * a child killed (SIGKILL) in the middle of writes leaves each chunk old or new and every
 * flushed write intact, in 10 rounds; the storage switched under 4 writing threads
 * (bc_volume_set_storage) loses no write and leaves the frozen file unchanged after.
 */
#define _GNU_SOURCE
#include "../bc_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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
#define REQUIRE(cond, ...)                                                                   \
    do {                                                                                     \
        int _f = atomic_load(&g_failures);                                                   \
        CHECK(cond, __VA_ARGS__);                                                            \
        if (atomic_load(&g_failures) != _f)                                                  \
            return;                                                                          \
    } while (0)

#define DATA_OFF (1u << 20)
#define META_OFF (UINT64_C(1) << 40)
#define MAP_OFF (UINT64_C(3) << 41)
#define CHUNK 65536u

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

static void path_of(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", g_dir, name);
}

static void make_empty(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0)
        close(fd);
}

static uint64_t blocks_of(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_blocks : 0;
}

/* ---- a chain of files under one volume ------------------------------------------- */

enum { ST_XTS = 0, ST_AEAD = 1 };

struct member {
    const char *paths[BC_COW_MAX_FILES];   /* top first */
    uint64_t map_chunks[BC_COW_MAX_FILES];
    size_t n;
};

static const uint8_t g_disk_id[16] = "family-id-16byte";

static int layers_for(int stack, uint32_t ss, struct bc_layer *ls, size_t *nl)
{
    uint8_t key[64];
    struct rng r = {42};
    rnd_fill(&r, key, 64);
    int rc = bc_layer_xts_new(key, 64, ss, &ls[0]);
    *nl = 1;
    if (rc == 0 && stack == ST_AEAD) {
        rc = bc_layer_aead_new(key, 32, ss, g_disk_id, BC_ROLE_INFRA, &ls[1]);
        if (rc != 0)
            ls[0].ops->destroy(ls[0].ctx);
        *nl = 2;
    }
    return rc;
}

static int open_chain(const struct member *m, uint64_t size, uint32_t ss, int stack, int writable,
                      struct bc_volume **out)
{
    struct bc_cow_file files[BC_COW_MAX_FILES] = {{0}};
    size_t opened = 0;
    int rc = 0;
    for (size_t i = 0; i < m->n && rc == 0; i++) {
        rc = bc_storage_local_open(m->paths[i], i == 0 && writable, BC_CACHE_BUFFERED, &files[i].ops,
                                   &files[i].ctx);
        files[i].map_chunks = m->map_chunks[i];
        if (rc == 0)
            opened++;
    }
    const struct bc_storage_ops *ops = NULL;
    void *ctx = NULL;
    struct bc_cow_params p = {.sector_size = ss, .chunk_bytes = CHUNK, .data_off = DATA_OFF,
                              .meta_off = stack == ST_AEAD ? META_OFF : 0,
                              .meta_bytes = stack == ST_AEAD ? BC_AEAD_META_BYTES : 0, .map_off = MAP_OFF};
    if (rc == 0)
        rc = bc_storage_cow_open(&p, files, m->n, writable, &ops, &ctx);
    if (rc != 0) {
        for (size_t i = 0; i < opened; i++)
            files[i].ops->close(files[i].ctx);
        return rc;
    }
    struct bc_layer ls[2];
    size_t nl = 0;
    rc = layers_for(stack, ss, ls, &nl);
    if (rc != 0) {
        ops->close(ctx);
        return rc;
    }
    struct bc_volume_params vp = {.size_bytes = size, .sector_size = ss, .data_off = DATA_OFF,
                                  .meta_off = p.meta_off, .read_only = !writable};
    rc = bc_volume_open(&vp, ops, ctx, ls, nl, out);
    if (rc != 0) {
        for (size_t i = 0; i < nl; i++)
            ls[i].ops->destroy(ls[i].ctx);
        ops->close(ctx);
    }
    return rc;
}

/* the member `child` of a parent member: a new (empty) top over the parent's chain */
static void child_of(struct member *child, const struct member *parent, const char *top, uint64_t size)
{
    child->paths[0] = top;
    child->map_chunks[0] = (size + CHUNK - 1) / CHUNK;
    for (size_t i = 0; i < parent->n; i++) {
        child->paths[i + 1] = parent->paths[i];
        child->map_chunks[i + 1] = parent->map_chunks[i];
    }
    child->n = parent->n + 1;
    make_empty(top);
}

static int read_all(struct bc_volume *v, uint8_t *buf, uint64_t size)
{
    for (uint64_t o = 0; o < size; o += BC_MAX_REQUEST) {
        size_t n = size - o < BC_MAX_REQUEST ? (size_t)(size - o) : BC_MAX_REQUEST;
        if (bc_volume_read(v, buf + o, n, o) != (ssize_t)n)
            return -1;
    }
    return 0;
}

static int same_as(struct bc_volume *v, const uint8_t *model, uint64_t size)
{
    uint8_t *buf = malloc(size);
    int ok = buf != NULL && read_all(v, buf, size) == 0 && memcmp(buf, model, size) == 0;
    free(buf);
    return ok;
}

/* random writes (any offset and length), discards and reads, mirrored in the model */
static void random_ops(struct bc_volume *v, uint8_t *model, uint64_t size, unsigned nops, uint64_t seed)
{
    struct rng r = {seed};
    uint8_t *buf = malloc(3 * CHUNK);
    for (unsigned i = 0; i < nops; i++) {
        uint64_t off = rnd_below(&r, size);
        size_t len = 1 + (size_t)rnd_below(&r, 3 * CHUNK);
        if (len > size - off)
            len = (size_t)(size - off);
        unsigned op = (unsigned)rnd_below(&r, 10);
        if (op < 6) {
            rnd_fill(&r, buf, len);
            CHECK(bc_volume_write(v, buf, len, off) == (ssize_t)len, "write %u", i);
            memcpy(model + off, buf, len);
        } else if (op < 8) {
            CHECK(bc_volume_discard(v, off, len) == 0, "discard %u", i);
            memset(model + off, 0, len);
        } else {
            CHECK(bc_volume_read(v, buf, len, off) == (ssize_t)len && memcmp(buf, model + off, len) == 0,
                  "read %u at %llu+%zu", i, (unsigned long long)off, len);
        }
    }
    free(buf);
}

/* ---- tests ------------------------------------------------------------------------ */

/* disk D; snapshot S (D's file frozen, D in a new top); D written; S unchanged; two disks
 * from S diverge; everything again after closing and reopening (bitmaps from the files) */
static void test_snapshot_model(uint32_t ss, int stack, uint64_t seed)
{
    const uint64_t size = 8u << 20;
    char base[4200], top[4200], c1[4200], c2[4200];
    path_of(base, sizeof base, "base.img");
    path_of(top, sizeof top, "top.img");
    path_of(c1, sizeof c1, "c1.img");
    path_of(c2, sizeof c2, "c2.img");
    make_empty(base);
    struct member d0 = {.paths = {base}, .map_chunks = {0}, .n = 1};
    uint8_t *m_s = calloc(1, size), *m_d = NULL, *m_c1 = NULL, *m_c2 = NULL;
    struct bc_volume *v = NULL;
    REQUIRE(open_chain(&d0, size, ss, stack, 1, &v) == 0, "open base");
    random_ops(v, m_s, size, 300, seed);
    bc_volume_unref(v);
    /* the snapshot: base frozen; the disk goes on in top */
    struct member d1, snap = d0;
    child_of(&d1, &snap, top, size);
    m_d = malloc(size);
    memcpy(m_d, m_s, size);
    REQUIRE(open_chain(&d1, size, ss, stack, 1, &v) == 0, "open disk over snapshot");
    CHECK(same_as(v, m_d, size), "the new top reads the snapshot's bytes");
    uint64_t blocks0 = blocks_of(top);
    random_ops(v, m_d, size, 400, seed + 1);
    CHECK(bc_volume_flush(v) == 0, "flush");
    bc_volume_unref(v);
    CHECK(blocks_of(top) > blocks0, "the top holds the changes");
    struct bc_volume *sv = NULL;
    REQUIRE(open_chain(&snap, size, ss, stack, 0, &sv) == 0, "open snapshot");
    CHECK(same_as(sv, m_s, size), "the snapshot reads its old bytes");
    CHECK(bc_volume_write(sv, "x", 1, 0) == -EROFS, "a snapshot is read-only");
    bc_volume_unref(sv);
    REQUIRE(open_chain(&d1, size, ss, stack, 1, &v) == 0, "reopen disk");
    CHECK(same_as(v, m_d, size), "the disk reads its new bytes after a reopen");
    bc_volume_unref(v);
    /* two disks from the snapshot */
    struct member k1, k2;
    child_of(&k1, &snap, c1, size);
    child_of(&k2, &snap, c2, size);
    m_c1 = malloc(size);
    m_c2 = malloc(size);
    memcpy(m_c1, m_s, size);
    memcpy(m_c2, m_s, size);
    struct bc_volume *v1 = NULL, *v2 = NULL;
    REQUIRE(open_chain(&k1, size, ss, stack, 1, &v1) == 0 && open_chain(&k2, size, ss, stack, 1, &v2) == 0,
            "open the clones");
    random_ops(v1, m_c1, size, 200, seed + 2);
    random_ops(v2, m_c2, size, 200, seed + 3);
    CHECK(same_as(v1, m_c1, size) && same_as(v2, m_c2, size), "the clones diverge");
    bc_volume_unref(v1);
    bc_volume_unref(v2);
    REQUIRE(open_chain(&snap, size, ss, stack, 0, &sv) == 0, "open snapshot");
    CHECK(same_as(sv, m_s, size), "the snapshot is still the same");
    bc_volume_unref(sv);
    free(m_s);
    free(m_d);
    free(m_c1);
    free(m_c2);
}

/* 40 snapshots in a row: each level reads its own view; depth costs nothing per request */
static void test_deep_chain(void)
{
    enum { DEPTH = 40 };
    const uint64_t size = 4u << 20;
    const uint32_t ss = 4096;
    static char paths[DEPTH][4200];
    static uint8_t models[DEPTH][4u << 20];
    struct member m[DEPTH];
    path_of(paths[0], sizeof paths[0], "deep0.img");
    make_empty(paths[0]);
    m[0] = (struct member){.paths = {paths[0]}, .map_chunks = {0}, .n = 1};
    memset(models[0], 0, size);
    for (int lv = 0; lv < DEPTH; lv++) {
        if (lv > 0) {
            char name[32];
            snprintf(name, sizeof name, "deep%d.img", lv);
            path_of(paths[lv], sizeof paths[lv], name);
            child_of(&m[lv], &m[lv - 1], paths[lv], size);
            memcpy(models[lv], models[lv - 1], size);
        }
        struct bc_volume *v = NULL;
        REQUIRE(open_chain(&m[lv], size, ss, ST_XTS, 1, &v) == 0, "open level %d", lv);
        random_ops(v, models[lv], size, 20, 1000 + (uint64_t)lv);
        bc_volume_unref(v);
    }
    for (int lv = 0; lv < DEPTH; lv++) {
        struct bc_volume *v = NULL;
        REQUIRE(open_chain(&m[lv], size, ss, ST_XTS, 0, &v) == 0, "reopen level %d", lv);
        CHECK(same_as(v, models[lv], size), "level %d reads its view", lv);
        bc_volume_unref(v);
    }
}

/* A chunk copied up is held by the top in memory at once, and on disk only after a flush. */
static void test_map_after_flush(void)
{
    const uint64_t size = 1u << 20;
    char base[4200], top[4200];
    path_of(base, sizeof base, "mf-base.img");
    path_of(top, sizeof top, "mf-top.img");
    make_empty(base);
    struct member b = {.paths = {base}, .map_chunks = {0}, .n = 1}, t;
    struct bc_volume *v = NULL;
    uint8_t buf[4096];
    memset(buf, 0xAB, sizeof buf);
    REQUIRE(open_chain(&b, size, 4096, ST_XTS, 1, &v) == 0, "open");
    CHECK(bc_volume_write(v, buf, 4096, 0) == 4096, "write");
    bc_volume_unref(v);
    child_of(&t, &b, top, size);
    REQUIRE(open_chain(&t, size, 4096, ST_XTS, 1, &v) == 0, "open top");
    memset(buf, 0xCD, sizeof buf);
    CHECK(bc_volume_write(v, buf, 4096, CHUNK) == 4096, "write chunk 1");
    uint8_t bits = 0;
    int fd = open(top, O_RDONLY);
    ssize_t got = pread(fd, &bits, 1, (off_t)MAP_OFF);
    CHECK(got == 0 || (got == 1 && (bits & 2) == 0), "no bit before a flush");
    CHECK(bc_volume_flush(v) == 0, "flush");
    bits = 0;
    CHECK(pread(fd, &bits, 1, (off_t)MAP_OFF) == 1 && bits == 2, "chunk 1's bit after the flush (%#x)", bits);
    close(fd);
    bc_volume_unref(v);
}

/* A storage that counts the bytes read through it (the lower file of a chain). */
struct counting {
    const struct bc_storage_ops *in;
    void *ictx;
    _Atomic uint64_t read_bytes;
};
static int cnt_read(void *c, void *b, size_t n, uint64_t o)
{
    struct counting *k = c;
    atomic_fetch_add(&k->read_bytes, n);
    return k->in->read_at(k->ictx, b, n, o);
}
static int cnt_write(void *c, const void *b, size_t n, uint64_t o) { struct counting *k = c; return k->in->write_at(k->ictx, b, n, o); }
static int cnt_flush(void *c) { struct counting *k = c; return k->in->flush(k->ictx); }
static int cnt_size(void *c, uint64_t *v) { struct counting *k = c; return k->in->get_size(k->ictx, v); }
static void cnt_close(void *c) { struct counting *k = c; k->in->close(k->ictx); }
static const struct bc_storage_ops counting_ops = {.name = "counting", .read_at = cnt_read, .write_at = cnt_write,
                                                   .flush = cnt_flush, .get_size = cnt_size, .close = cnt_close};

/* A write that covers whole chunks does not read them from below (nothing to keep); a
 * write into part of a chunk copies the chunk up (reads it); both read back right, before
 * and after a flush and a reopen, with the map bits from the file. */
static void test_whole_chunk_writes_read_nothing_below(void)
{
    const uint64_t size = 1u << 20;
    const uint32_t ss = 4096;
    char base[4200], top[4200];
    path_of(base, sizeof base, "wc-base.img");
    path_of(top, sizeof top, "wc-top.img");
    make_empty(base);
    static uint8_t model[1u << 20];
    struct rng r = {77};
    rnd_fill(&r, model, size);
    struct member b = {.paths = {base}, .map_chunks = {0}, .n = 1}, t;
    struct bc_volume *v = NULL;
    REQUIRE(open_chain(&b, size, ss, ST_XTS, 1, &v) == 0, "open base");
    CHECK(bc_volume_write(v, model, size, 0) == (ssize_t)size, "fill the base");
    bc_volume_unref(v);
    child_of(&t, &b, top, size);

    struct bc_cow_file files[2] = {{0}};
    struct counting lower = {0};
    REQUIRE(bc_storage_local_open(top, 1, BC_CACHE_BUFFERED, &files[0].ops, &files[0].ctx) == 0, "open top");
    REQUIRE(bc_storage_local_open(base, 0, BC_CACHE_BUFFERED, &lower.in, &lower.ictx) == 0, "open base file");
    files[0].map_chunks = t.map_chunks[0];
    files[1].ops = &counting_ops;
    files[1].ctx = &lower;
    files[1].map_chunks = 0;
    struct bc_cow_params p = {.sector_size = ss, .chunk_bytes = CHUNK, .data_off = DATA_OFF, .map_off = MAP_OFF};
    const struct bc_storage_ops *ops = NULL;
    void *ctx = NULL;
    REQUIRE(bc_storage_cow_open(&p, files, 2, 1, &ops, &ctx) == 0, "open the chain");
    struct bc_layer ls[2];
    size_t nl = 0;
    REQUIRE(layers_for(ST_XTS, ss, ls, &nl) == 0, "layers");
    struct bc_volume_params vp = {.size_bytes = size, .sector_size = ss, .data_off = DATA_OFF};
    REQUIRE(bc_volume_open(&vp, ops, ctx, ls, nl, &v) == 0, "open the volume");
    atomic_store(&lower.read_bytes, 0);
    uint8_t buf[4 * CHUNK];
    rnd_fill(&r, buf, sizeof buf);
    /* chunks 2..5 whole, then chunk 9 whole: no read below */
    CHECK(bc_volume_write(v, buf, 4 * CHUNK, 2 * CHUNK) == 4 * CHUNK, "write chunks 2-5");
    memcpy(model + 2 * CHUNK, buf, 4 * CHUNK);
    CHECK(bc_volume_write(v, buf, CHUNK, 9 * CHUNK) == CHUNK, "write chunk 9");
    memcpy(model + 9 * CHUNK, buf, CHUNK);
    CHECK(atomic_load(&lower.read_bytes) == 0, "whole-chunk writes read %llu bytes below",
          (unsigned long long)atomic_load(&lower.read_bytes));
    CHECK(bc_storage_cow_copyups(ctx) == 5, "5 chunks claimed (%llu)", (unsigned long long)bc_storage_cow_copyups(ctx));
    /* half of chunk 12 plus the whole of 13: 12 is copied up (read), 13 is not */
    CHECK(bc_volume_write(v, buf, CHUNK + CHUNK / 2, 12 * CHUNK + CHUNK / 2) == CHUNK + CHUNK / 2, "write 12.5-14");
    memcpy(model + 12 * CHUNK + CHUNK / 2, buf, CHUNK + CHUNK / 2);
    CHECK(atomic_load(&lower.read_bytes) == CHUNK, "a partial chunk is copied up: %llu bytes read below",
          (unsigned long long)atomic_load(&lower.read_bytes));
    CHECK(same_as(v, model, size), "reads match the model");
    CHECK(bc_volume_flush(v) == 0, "flush");
    bc_volume_unref(v);
    REQUIRE(open_chain(&t, size, ss, ST_XTS, 0, &v) == 0, "reopen");
    CHECK(same_as(v, model, size), "reads match the model after a reopen");
    bc_volume_unref(v);
}

/* SIGKILL in the middle of writes, 10 rounds: every chunk reads old or new as a whole
 * (per sector: some version that was written to it), every flushed write survives. */
static void test_kill_rounds(int stack)
{
    const uint64_t size = 4u << 20;
    const uint32_t ss = 4096;
    const uint64_t nsec = size / ss;
    char base[4200], top[4200];
    path_of(base, sizeof base, "kill-base.img");
    path_of(top, sizeof top, "kill-top.img");
    make_empty(base);
    struct member b = {.paths = {base}, .map_chunks = {0}, .n = 1}, t;
    struct bc_volume *v = NULL;
    /* sector n of the base holds version 0: bytes (n, 0); version k: (n, k) */
    uint8_t *buf = malloc(ss);
    REQUIRE(open_chain(&b, size, ss, stack, 1, &v) == 0, "open base");
    for (uint64_t n = 0; n < nsec; n++) {
        memset(buf, 0, ss);
        memcpy(buf, &n, 8);
        bc_volume_write(v, buf, ss, n * ss);
    }
    bc_volume_unref(v);
    child_of(&t, &b, top, size);
    uint32_t *flushed = calloc(nsec, sizeof *flushed);   /* version made durable by a flush */
    uint32_t *written = calloc(nsec, sizeof *written);   /* highest version that could be there */
    for (int round = 0; round < 10; round++) {
        int pfd[2];
        REQUIRE(pipe(pfd) == 0, "pipe");
        pid_t pid = fork();
        if (pid == 0) {
            close(pfd[0]);
            struct bc_volume *cv = NULL;
            if (open_chain(&t, size, ss, stack, 1, &cv) != 0)
                _exit(3);
            struct rng r = {(uint64_t)round * 7919u + 1};
            uint8_t *cb = malloc(ss);
            for (unsigned i = 0;; i++) {
                uint64_t n = rnd_below(&r, nsec);
                uint32_t ver = (uint32_t)(round + 1) * 100000u + i;
                memset(cb, 0, ss);
                memcpy(cb, &n, 8);
                memcpy(cb + 8, &ver, 4);
                /* tell the parent first: what it hears is the highest it may see */
                uint64_t msg[2] = {n, ver};
                if (write(pfd[1], msg, sizeof msg) != sizeof msg)
                    _exit(4);
                if (bc_volume_write(cv, cb, ss, n * ss) != (ssize_t)ss)
                    _exit(5);
                if (i % 16 == 15) {
                    if (bc_volume_flush(cv) != 0)
                        _exit(6);
                    uint64_t fl[2] = {UINT64_MAX, 0};
                    if (write(pfd[1], fl, sizeof fl) != sizeof fl)
                        _exit(4);
                }
            }
        }
        close(pfd[1]);
        /* read the child's log for a while, then kill it */
        struct timespec ts = {0, 30000000L + 10000000L * round};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        CHECK(WIFSIGNALED(status), "the child was killed (status %d)", status);
        uint32_t *pending = calloc(nsec, sizeof *pending);   /* since the last flush */
        uint8_t *touched = calloc(nsec, 1);
        uint64_t msg[2];
        while (read(pfd[0], msg, sizeof msg) == sizeof msg) {
            if (msg[0] == UINT64_MAX) {
                for (uint64_t n = 0; n < nsec; n++)
                    if (touched[n]) {
                        flushed[n] = pending[n];
                        touched[n] = 0;
                    }
                continue;
            }
            /* a sector may hold only its flushed version or anything written after it */
            pending[msg[0]] = (uint32_t)msg[1];
            touched[msg[0]] = 1;
            written[msg[0]] = (uint32_t)msg[1];
        }
        close(pfd[0]);
        REQUIRE(open_chain(&t, size, ss, stack, 1, &v) == 0, "reopen after the kill");
        unsigned bad = 0;
        for (uint64_t n = 0; n < nsec; n++) {
            ssize_t got = bc_volume_read(v, buf, ss, n * ss);
            uint64_t sn;
            uint32_t ver;
            memcpy(&sn, buf, 8);
            memcpy(&ver, buf + 8, 4);
            /* old (0 or the flushed version) or some later version of this round */
            int ok = got == (ssize_t)ss && sn == n && (ver == flushed[n] || (ver >= flushed[n] && ver <= written[n]));
            if (!ok && bad++ < 3)
                CHECK(ok, "round %d: sector %llu reads version %u (flushed %u, written <= %u, rc %zd)", round,
                      (unsigned long long)n, ver, flushed[n], written[n], got);
            flushed[n] = ver;   /* what it holds now is the base of the next round */
            written[n] = ver;
        }
        CHECK(bad == 0, "round %d: %u sectors wrong", round, bad);
        CHECK(bc_volume_flush(v) == 0, "flush after the check");
        bc_volume_unref(v);
        free(pending);
        free(touched);
    }
    /* the frozen base never changed */
    struct bc_volume *bv = NULL;
    REQUIRE(open_chain(&b, size, ss, stack, 0, &bv) == 0, "open base");
    unsigned bad = 0;
    for (uint64_t n = 0; n < nsec; n++) {
        uint64_t sn = ~0ull;
        uint32_t ver = 1;
        bc_volume_read(bv, buf, ss, n * ss);
        memcpy(&sn, buf, 8);
        memcpy(&ver, buf + 8, 4);
        bad += sn != n || ver != 0;
    }
    CHECK(bad == 0, "the frozen file reads version 0 everywhere (%u bad)", bad);
    bc_volume_unref(bv);
    free(buf);
    free(flushed);
    free(written);
}

/* Four threads write while the storage is switched to a new top over the frozen file. */
struct sw_arg {
    struct bc_volume *v;
    int id;
    atomic_int *stop;
    uint32_t last[64];
};

static void *sw_main(void *p)
{
    struct sw_arg *a = p;
    uint8_t buf[4096];
    for (uint32_t ver = 1; !atomic_load(a->stop); ver++) {
        unsigned k = ver % 64;
        uint64_t sector = (uint64_t)a->id * 64 + k;
        memset(buf, 0, sizeof buf);
        memcpy(buf, &sector, 8);
        memcpy(buf + 8, &ver, 4);
        if (bc_volume_write(a->v, buf, sizeof buf, sector * 4096) != 4096)
            break;
        a->last[k] = ver;
    }
    return NULL;
}

static void test_switch_storage(void)
{
    const uint64_t size = 4u << 20;
    char base[4200], top[4200];
    path_of(base, sizeof base, "sw-base.img");
    path_of(top, sizeof top, "sw-top.img");
    make_empty(base);
    struct member b = {.paths = {base}, .map_chunks = {0}, .n = 1}, t;
    struct bc_volume *v = NULL;
    REQUIRE(open_chain(&b, size, 4096, ST_XTS, 1, &v) == 0, "open");
    atomic_int stop = 0;
    struct sw_arg args[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct sw_arg){.v = v, .id = i, .stop = &stop};
        pthread_create(&th[i], NULL, sw_main, &args[i]);
    }
    struct timespec ts = {0, 50000000L};
    nanosleep(&ts, NULL);
    /* freeze: the new chain is [top, base] */
    child_of(&t, &b, top, size);
    struct bc_cow_file files[2];
    REQUIRE(bc_storage_local_open(top, 1, BC_CACHE_BUFFERED, &files[0].ops, &files[0].ctx) == 0, "top");
    REQUIRE(bc_storage_local_open(base, 0, BC_CACHE_BUFFERED, &files[1].ops, &files[1].ctx) == 0, "base");
    files[0].map_chunks = size / CHUNK;
    files[1].map_chunks = 0;
    struct bc_cow_params p = {.sector_size = 4096, .chunk_bytes = CHUNK, .data_off = DATA_OFF, .map_off = MAP_OFF};
    const struct bc_storage_ops *ops;
    void *ctx;
    REQUIRE(bc_storage_cow_open(&p, files, 2, 1, &ops, &ctx) == 0, "chain");
    uint64_t base_blocks_before = 0;
    CHECK(bc_volume_set_storage(v, ops, ctx) == 0, "switch");
    base_blocks_before = blocks_of(base);
    uint8_t snap_after[64 * 4 * 16];
    int fd = open(base, O_RDONLY);
    CHECK(pread(fd, snap_after, sizeof snap_after, DATA_OFF) >= 0, "read base");
    nanosleep(&ts, NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    CHECK(bc_storage_cow_copyups(ctx) > 0, "writes after the switch copied chunks up");
    uint8_t again[sizeof snap_after];
    CHECK(pread(fd, again, sizeof again, DATA_OFF) >= 0 && memcmp(again, snap_after, sizeof again) == 0,
          "the frozen file did not change after the switch");
    close(fd);
    CHECK(blocks_of(base) == base_blocks_before, "nor its size");
    for (int i = 0; i < 4; i++)
        for (unsigned k = 0; k < 64; k++) {
            uint8_t buf[4096];
            uint64_t sector = (uint64_t)i * 64 + k, sn = 0;
            uint32_t ver = 0;
            bc_volume_read(v, buf, sizeof buf, sector * 4096);
            memcpy(&sn, buf, 8);
            memcpy(&ver, buf + 8, 4);
            if (args[i].last[k] != 0)
                CHECK(sn == sector && ver == args[i].last[k], "thread %d sector %u: version %u, want %u", i, k, ver,
                      args[i].last[k]);
        }
    bc_volume_unref(v);
}

/* An open disk already in a chain, with chunks copied up since its last flush (their bits
 * only in memory), is switched to a new top over its old one: the new chain, opened under
 * the gate after the flush, sees every one of them. */
struct reopen_arg {
    const struct member *m;
    uint32_t ss;
};

static int reopen_chain(void *arg, const struct bc_storage_ops **ops, void **ctx)
{
    const struct reopen_arg *a = arg;
    struct bc_cow_file files[BC_COW_MAX_FILES] = {{0}};
    size_t opened = 0;
    int rc = 0;
    for (size_t i = 0; i < a->m->n && rc == 0; i++) {
        rc = bc_storage_local_open(a->m->paths[i], i == 0, BC_CACHE_BUFFERED, &files[i].ops, &files[i].ctx);
        files[i].map_chunks = a->m->map_chunks[i];
        if (rc == 0)
            opened++;
    }
    struct bc_cow_params p = {.sector_size = a->ss, .chunk_bytes = CHUNK, .data_off = DATA_OFF, .map_off = MAP_OFF};
    if (rc == 0)
        rc = bc_storage_cow_open(&p, files, a->m->n, 1, ops, ctx);
    if (rc != 0)
        for (size_t i = 0; i < opened; i++)
            files[i].ops->close(files[i].ctx);
    return rc;
}

static void test_switch_a_chain_with_unflushed_copyups(void)
{
    const uint64_t size = 4u << 20;
    char base[4200], t1[4200], t2[4200];
    path_of(base, sizeof base, "sc-base.img");
    path_of(t1, sizeof t1, "sc-t1.img");
    path_of(t2, sizeof t2, "sc-t2.img");
    make_empty(base);
    struct member b = {.paths = {base}, .map_chunks = {0}, .n = 1}, m1, m2;
    uint8_t *model = calloc(1, size);
    struct bc_volume *v = NULL;
    REQUIRE(open_chain(&b, size, 4096, ST_XTS, 1, &v) == 0, "base");
    random_ops(v, model, size, 100, 501);
    bc_volume_unref(v);
    child_of(&m1, &b, t1, size);
    REQUIRE(open_chain(&m1, size, 4096, ST_XTS, 1, &v) == 0, "t1 over base");
    CHECK(bc_volume_flush(v) == 0, "flush");
    random_ops(v, model, size, 200, 502);   /* copy-ups whose bits no flush wrote yet */
    child_of(&m2, &m1, t2, size);
    struct reopen_arg ra = {&m2, 4096};
    CHECK(bc_volume_set_storage_with(v, reopen_chain, &ra) == 0, "switch to t2 over t1 over base");
    CHECK(same_as(v, model, size), "every write before the switch still reads after it");
    random_ops(v, model, size, 100, 503);
    CHECK(same_as(v, model, size), "and after more writes");
    bc_volume_unref(v);
    REQUIRE(open_chain(&m2, size, 4096, ST_XTS, 0, &v) == 0, "reopen");
    CHECK(same_as(v, model, size), "after a reopen");
    bc_volume_unref(v);
    free(model);
}

/* a grown disk: chunks past its parent's map are its own, also once it is a parent itself */
static void test_grow(void)
{
    const uint64_t small = 1u << 20, big = 3u << 20;
    char a[4200], b2[4200], c[4200];
    path_of(a, sizeof a, "g-a.img");
    path_of(b2, sizeof b2, "g-b.img");
    path_of(c, sizeof c, "g-c.img");
    make_empty(a);
    struct member ma = {.paths = {a}, .map_chunks = {0}, .n = 1}, mb, mc;
    uint8_t *model = calloc(1, big);
    struct bc_volume *v = NULL;
    REQUIRE(open_chain(&ma, small, 4096, ST_XTS, 1, &v) == 0, "a");
    random_ops(v, model, small, 50, 77);
    bc_volume_unref(v);
    child_of(&mb, &ma, b2, small);   /* made at the parent's size, then grown */
    REQUIRE(open_chain(&mb, big, 4096, ST_XTS, 1, &v) == 0, "b");
    random_ops(v, model, big, 100, 78);
    bc_volume_unref(v);
    child_of(&mc, &mb, c, big);
    REQUIRE(open_chain(&mc, big, 4096, ST_XTS, 0, &v) == 0, "c");
    CHECK(same_as(v, model, big), "a snapshot of a grown disk reads all of it");
    bc_volume_unref(v);
    free(model);
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
        call;                                                                                \
        printf("%-4s %s\n", atomic_load(&g_failures) == _f0 ? "ok" : "FAIL", #call);        \
        fflush(stdout);                                                                      \
    } while (0)

int main(int argc, char **argv)
{
    const char *base = argc > 1 ? argv[1] : getenv("TMPDIR");
    if (base == NULL || !*base)
        base = "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/bc-cow-test.XXXXXX", base);
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    RUN(test_snapshot_model(4096, ST_XTS, 1));
    RUN(test_snapshot_model(512, ST_XTS, 2));
    RUN(test_snapshot_model(4096, ST_AEAD, 3));
    RUN(test_snapshot_model(512, ST_AEAD, 4));
    RUN(test_deep_chain());
    RUN(test_map_after_flush());
    RUN(test_whole_chunk_writes_read_nothing_below());
    RUN(test_kill_rounds(ST_XTS));
    RUN(test_kill_rounds(ST_AEAD));
    RUN(test_switch_storage());
    RUN(test_switch_a_chain_with_unflushed_copyups());
    RUN(test_grow());
    rm_dir(g_dir);
    int f = atomic_load(&g_failures);
    printf("%s: %d checks, %d failed\n", f ? "FAILED" : "PASSED", g_checks, f);
    return f ? 1 : 0;
}
