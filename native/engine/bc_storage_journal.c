/*
 * bc_storage_journal.c — the metadata journal behind the storage seam (bc_engine.h).
 *
 * A double-encrypted disk keeps 96 bytes of metadata per sector in a table (the metadata
 * area). Written in place, a random 4 KiB write dirties two pages of the backing file (its
 * data page and the table page of its slots), so an fsync after 32 random writes writes 64
 * pages. This wrapper turns the table's small writes into appends to a sequential log in
 * the same file: an fsync then writes the data pages plus about one log page per 32 writes.
 * The table is brought up to date at a checkpoint (the log full, or a clean close), which
 * writes each table page once for all its records, in offset order. docs/FORMAT.md, "The
 * metadata journal", has the byte layout and the argument.
 *
 * Records (little-endian, each at a 64-byte aligned position of the log, padded to 64):
 *
 *   0 magic "BCJ1"  4 kind u16  6 zero u16  8 epoch u64  16 first sector u64  24 count u32
 *   28 crc u32 (zlib's CRC-32 of bytes 0..27, then the payload)   32 payload
 *
 *   kind META: payload = count * meta_bytes, the table's bytes for sectors first..+count
 *   kind DROP: no payload; earlier records of those sectors are void (the table has them)
 *   kind MARK: no payload, count 0; the epoch starts (everything before is in the table)
 *
 * The log is written front to back once per epoch. A checkpoint writes every sector the
 * log holds into the table, flushes, then starts epoch + 1 with a MARK at position 0. At
 * open the whole log is scanned: the records whose crc holds and whose epoch is the
 * highest found are applied, in position order, to an in-memory index (sector -> its
 * metadata) that every read of the table goes through. Records are idempotent (they carry
 * whole values), so replaying a log that a checkpoint already half applied is harmless.
 *
 * Writes of the table: whole sectors of up to a record's payload (4064 bytes: 42 sectors of
 * 96) are appended; larger ones (a big sequential write, a copy-up of a 512-byte-sector
 * chunk) are written into the table in place, then a DROP record voids the log's older
 * values of those sectors (none if the index holds none of them). A write is appended
 * and in the index before write_at returns, so the engine's order (metadata, then data)
 * holds in the file as it did without the log. Two
 * writers' records may land out of order in the log (each reserves its place, then writes),
 * but writes of one sector never overlap (the engine's range lock), and the scan at open
 * walks every 64-byte position, so a reserved place a kill left empty hides nothing after it.
 *
 * Caveats: the index costs about meta_bytes + 8 bytes per sector the log holds (4.5 MiB at
 * most for a 4 MiB log); a checkpoint stalls writes while it runs (at most the log's worth
 * of table writes and one flush). A read-only wrapper (a frozen lower file of a chain)
 * replays and never writes. Writes that are not whole sectors of the table are completed
 * from the current table first (read-modify-write).
 */
#define _GNU_SOURCE
#include "bc_engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define REC_ALIGN 64u
#define REC_HDR 32u
#define REC_MAX 4096u
#define MAGIC 0x314A4342u          /* "BCJ1" little-endian */
enum { K_META = 1, K_DROP = 2, K_MARK = 3 };
#define SCAN_IO (1u << 20)

struct entry {
    uint64_t sector;
    int live;
    /* meta_bytes follow */
};

struct journal {
    struct bc_journal_params p;
    const struct bc_storage_ops *in;
    void *ictx;
    int writable;
    uint64_t table_end;            /* meta_off + meta_sectors * meta_bytes */

    pthread_rwlock_t cp;           /* appenders share it; a checkpoint takes it alone */
    pthread_mutex_t mu;            /* the index and the tail */
    uint64_t epoch, tail;          /* the next record goes at log_off + tail */
    int dirty;                     /* the log holds records after its MARK (a checkpoint has work) */
    size_t esize;                  /* sizeof(struct entry) + meta_bytes, rounded to 8 */
    uint8_t *entries;
    size_t nentries, cap;
    uint32_t *hash;                /* entry index + 1, 0: empty */
    size_t hmask;
    size_t nlive;
    struct bc_journal_counts counts;
};

/* ---- CRC-32 (zlib's: reflected 0xEDB88320), so Python's zlib.crc32 checks a record ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

static size_t rec_len(size_t payload) { return (REC_HDR + payload + REC_ALIGN - 1) / REC_ALIGN * REC_ALIGN; }

/* ---- the index ------------------------------------------------------------------------ */

static struct entry *entry_at(struct journal *j, size_t i) { return (struct entry *)(j->entries + i * j->esize); }
static uint8_t *entry_meta(struct entry *e) { return (uint8_t *)(e + 1); }

static size_t hash_of(const struct journal *j, uint64_t s)
{
    s *= 0x9E3779B97F4A7C15ull;
    return (size_t)(s >> 32) & j->hmask;
}

/* j->mu held. The entry of sector s, or NULL. */
static struct entry *find(struct journal *j, uint64_t s)
{
    for (size_t h = hash_of(j, s);; h = (h + 1) & j->hmask) {
        uint32_t i = j->hash[h];
        if (i == 0)
            return NULL;
        struct entry *e = entry_at(j, i - 1);
        if (e->sector == s)
            return e;
    }
}

/* j->mu held. Sector s's metadata is m (m NULL: dropped, the table holds it). -ENOSPC when
 * the index is full (the caller checkpoints). */
static int set_entry(struct journal *j, uint64_t s, const uint8_t *m)
{
    size_t h = hash_of(j, s);
    for (;; h = (h + 1) & j->hmask) {
        uint32_t i = j->hash[h];
        if (i == 0)
            break;
        struct entry *e = entry_at(j, i - 1);
        if (e->sector == s) {
            if (m != NULL)
                memcpy(entry_meta(e), m, j->p.meta_bytes);
            j->nlive += (size_t)(m != NULL) - (size_t)e->live;
            e->live = m != NULL;
            return 0;
        }
    }
    if (m == NULL)
        return 0;
    if (j->nentries >= j->cap)
        return -ENOSPC;
    struct entry *e = entry_at(j, j->nentries);
    e->sector = s;
    e->live = 1;
    memcpy(entry_meta(e), m, j->p.meta_bytes);
    j->hash[h] = (uint32_t)++j->nentries;
    j->nlive++;
    return 0;
}

static void index_clear(struct journal *j)
{
    memset(j->hash, 0, (j->hmask + 1) * sizeof *j->hash);
    j->nentries = j->nlive = 0;
}

/* ---- records -------------------------------------------------------------------------- */

/* Build a record in rec (REC_MAX bytes); its length. */
static size_t rec_build(const struct journal *j, uint8_t *rec, int kind, uint64_t first, uint32_t count,
                        const uint8_t *payload)
{
    size_t plen = kind == K_META ? (size_t)count * j->p.meta_bytes : 0;
    size_t len = rec_len(plen);
    memset(rec, 0, len);
    put32(rec, MAGIC);
    rec[4] = (uint8_t)kind;
    put64(rec + 8, j->epoch);
    put64(rec + 16, first);
    put32(rec + 24, count);
    if (plen)
        memcpy(rec + REC_HDR, payload, plen);
    uint32_t crc = crc32_update(0, rec, 28);
    crc = crc32_update(crc, rec + REC_HDR, plen);
    put32(rec + 28, crc);
    return len;
}

/* Parse the record at p (avail bytes there); its length, or 0 if no valid record starts at p. */
static size_t rec_parse(const struct journal *j, const uint8_t *p, size_t avail, int *kind, uint64_t *epoch,
                        uint64_t *first, uint32_t *count)
{
    if (avail < REC_HDR || get32(p) != MAGIC || p[5] != 0 || p[6] != 0 || p[7] != 0)
        return 0;
    *kind = p[4];
    *epoch = get64(p + 8);
    *first = get64(p + 16);
    *count = get32(p + 24);
    if (*kind != K_META && *kind != K_DROP && *kind != K_MARK)
        return 0;
    uint64_t plen = *kind == K_META ? (uint64_t)*count * j->p.meta_bytes : 0;
    if (plen > REC_MAX - REC_HDR || REC_HDR + plen > avail)
        return 0;
    if (*count > j->p.meta_sectors || *first > j->p.meta_sectors - *count)
        return 0;
    uint32_t crc = crc32_update(0, p, 28);
    crc = crc32_update(crc, p + REC_HDR, (size_t)plen);
    if (crc != get32(p + 28))
        return 0;
    return rec_len((size_t)plen);
}

/* j->mu held. Apply a record to the index. A DROP wider than the index walks the index. */
static int rec_apply(struct journal *j, int kind, uint64_t first, uint32_t count, const uint8_t *payload)
{
    if (kind == K_DROP && count > j->nentries) {
        for (size_t i = 0; i < j->nentries; i++) {
            struct entry *e = entry_at(j, i);
            if (e->live && e->sector >= first && e->sector - first < count)
                e->live = 0, j->nlive--;
        }
        return 0;
    }
    for (uint32_t i = 0; i < count; i++) {
        int rc = set_entry(j, first + i, kind == K_META ? payload + (size_t)i * j->p.meta_bytes : NULL);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- checkpoint ----------------------------------------------------------------------- */

static int cmp_sector(const void *a, const void *b, void *arg)
{
    const struct journal *j = arg;
    const struct entry *x = (const struct entry *)(j->entries + *(const uint32_t *)a * j->esize);
    const struct entry *y = (const struct entry *)(j->entries + *(const uint32_t *)b * j->esize);
    return x->sector < y->sector ? -1 : x->sector > y->sector;
}

/* j->cp held for writing (nothing appends or checkpoints beside it). Every live entry into
 * the table (runs of consecutive sectors in one write), flush, then a new epoch. */
static int checkpoint(struct journal *j)
{
    if (!j->dirty)
        return 0;
    int rc = 0;
    if (j->nlive > 0) {
        uint32_t *order = malloc(j->nlive * sizeof *order);
        uint8_t *run = malloc(SCAN_IO);
        if (order == NULL || run == NULL) {
            free(order);
            free(run);
            return -ENOMEM;
        }
        size_t n = 0;
        for (size_t i = 0; i < j->nentries; i++)
            if (entry_at(j, i)->live)
                order[n++] = (uint32_t)i;
        qsort_r(order, n, sizeof *order, cmp_sector, j);
        const size_t M = j->p.meta_bytes, per_run = SCAN_IO / M;
        for (size_t i = 0; i < n && rc == 0;) {
            struct entry *e0 = entry_at(j, order[i]);
            size_t k = 0;
            while (i + k < n && k < per_run && entry_at(j, order[i + k])->sector == e0->sector + k) {
                memcpy(run + k * M, entry_meta(entry_at(j, order[i + k])), M);
                k++;
            }
            rc = j->in->write_at(j->ictx, run, k * M, j->p.meta_off + e0->sector * M);
            i += k;
        }
        free(order);
        explicit_bzero(run, SCAN_IO);
        free(run);
    }
    if (rc == 0)
        rc = j->in->flush(j->ictx);    /* the table durable before the log it replaces goes */
    if (rc != 0)
        return rc;                     /* the log still holds everything: a retry or a replay redoes it */
    uint8_t rec[REC_MAX];
    j->epoch++;
    size_t len = rec_build(j, rec, K_MARK, 0, 0, NULL);
    rc = j->in->write_at(j->ictx, rec, len, j->p.log_off);
    if (rc != 0) {
        j->epoch--;                    /* the old epoch's records stand (all in the table now) */
        return rc;
    }
    pthread_mutex_lock(&j->mu);
    index_clear(j);
    j->tail = len;
    j->dirty = 0;
    j->counts.checkpoints++;
    pthread_mutex_unlock(&j->mu);
    return 0;
}

static int checkpoint_now(struct journal *j)
{
    pthread_rwlock_wrlock(&j->cp);
    int rc = checkpoint(j);
    pthread_rwlock_unlock(&j->cp);
    return rc;
}

/* Append one record and apply it to the index, after making room (a checkpoint) if the log
 * or the index is full. pre(j, arg), when given, runs first with the room held, so that no
 * checkpoint can run between it and the record: the in-place table write a DROP follows. */
static int log_record(struct journal *j, int kind, uint64_t first, uint32_t count, const uint8_t *payload,
                      int (*pre)(struct journal *, const void *), const void *arg)
{
    uint8_t rec[REC_MAX];
    size_t len;
    for (;;) {
        pthread_rwlock_rdlock(&j->cp);
        pthread_mutex_lock(&j->mu);
        len = rec_build(j, rec, kind, first, count, payload);   /* under mu: the epoch is current */
        if (j->tail + len <= j->p.log_bytes && (kind != K_META || j->nentries + count <= j->cap))
            break;
        pthread_mutex_unlock(&j->mu);
        pthread_rwlock_unlock(&j->cp);
        int rc = checkpoint_now(j);
        if (rc != 0)
            return rc;
    }
    uint64_t pos = j->tail;
    j->tail += len;
    j->dirty = 1;
    pthread_mutex_unlock(&j->mu);
    /* a failure from here on leaves a gap in the log (skipped at replay) and the index as
     * it was: the engine then does not write the data, which the index still describes */
    int rc = pre != NULL ? pre(j, arg) : 0;
    if (rc == 0)
        rc = j->in->write_at(j->ictx, rec, len, j->p.log_off + pos);
    if (rc == 0) {
        pthread_mutex_lock(&j->mu);
        rc = rec_apply(j, kind, first, count, payload);   /* room was made above */
        j->counts.records++;
        pthread_mutex_unlock(&j->mu);
    }
    pthread_rwlock_unlock(&j->cp);
    return rc;
}

struct inplace { const void *buf; size_t len; uint64_t off; int punch; };

static int inplace_write(struct journal *j, const void *arg)
{
    const struct inplace *w = arg;
    return w->punch ? j->in->punch(j->ictx, w->off, w->len) : j->in->write_at(j->ictx, w->buf, w->len, w->off);
}

/* j->mu held. Whether the index holds a live entry of a sector in [first, first+n). */
static int any_live(struct journal *j, uint64_t first, uint64_t n)
{
    if (j->nlive == 0)
        return 0;
    if (n > j->nentries) {
        for (size_t i = 0; i < j->nentries; i++) {
            const struct entry *e = entry_at(j, i);
            if (e->live && e->sector >= first && e->sector - first < n)
                return 1;
        }
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        const struct entry *e = find(j, first + i);
        if (e != NULL && e->live)
            return 1;
    }
    return 0;
}

/* The table's bytes of sectors [first, first+count) go in place (from buf, or punched),
 * then DROP records void the log's older values of them (a kill between the two replays
 * those over the new table, while the data is still the old that they describe); where
 * the log holds no live value of them, no DROP. */
static int write_in_place(struct journal *j, const void *buf, uint64_t first, uint64_t count)
{
    const size_t M = j->p.meta_bytes;
    int rc = 0;
    while (rc == 0 && count > 0) {
        uint64_t n = count < UINT32_MAX ? count : UINT32_MAX;
        if (buf != NULL && n * M > SIZE_MAX / 2)
            n = (SIZE_MAX / 2) / M;
        struct inplace w = {buf, (size_t)(n * M), j->p.meta_off + first * M, buf == NULL};
        /* no live entry there: no record of the epoch describes these sectors (or a DROP
         * voided it), so replay leaves them to the table and a DROP would void nothing.
         * The range lock keeps other writers off them; the cp lock keeps a checkpoint
         * from starting a new epoch between the look and the write. */
        pthread_rwlock_rdlock(&j->cp);
        pthread_mutex_lock(&j->mu);
        int none = !any_live(j, first, n);
        pthread_mutex_unlock(&j->mu);
        if (none) {
            rc = inplace_write(j, &w);
            pthread_rwlock_unlock(&j->cp);
        } else {
            pthread_rwlock_unlock(&j->cp);
            rc = log_record(j, K_DROP, first, (uint32_t)n, NULL, inplace_write, &w);
        }
        first += n, count -= n;
        if (buf != NULL)
            buf = (const uint8_t *)buf + n * M;
    }
    return rc;
}

/* ---- the seam ------------------------------------------------------------------------- */

static int in_table(const struct journal *j, uint64_t off, size_t len)
{
    return off < j->table_end && off + len > j->p.meta_off;
}

/* Overlay the index on buf = the inner store's bytes [off, off+len). */
static void overlay(struct journal *j, uint8_t *buf, size_t len, uint64_t off)
{
    const size_t M = j->p.meta_bytes;
    uint64_t lo = off > j->p.meta_off ? off : j->p.meta_off;
    uint64_t hi = off + len < j->table_end ? off + len : j->table_end;
    pthread_mutex_lock(&j->mu);
    if (j->nlive > 0)
        for (uint64_t s = (lo - j->p.meta_off) / M; j->p.meta_off + s * M < hi; s++) {
            struct entry *e = find(j, s);
            if (e == NULL || !e->live)
                continue;
            uint64_t so = j->p.meta_off + s * M;
            uint64_t a = so > lo ? so : lo, b = so + M < hi ? so + M : hi;
            memcpy(buf + (a - off), entry_meta(e) + (a - so), (size_t)(b - a));
        }
    pthread_mutex_unlock(&j->mu);
}

static int j_read(void *c, void *buf, size_t len, uint64_t off)
{
    struct journal *j = c;
    int rc = j->in->read_at(j->ictx, buf, len, off);
    if (rc == 0 && in_table(j, off, len))
        overlay(j, buf, len, off);
    return rc;
}

/* Whole sectors [first, first+count) of the table, from buf: appended when they fit one
 * record, else in place. */
static int write_sectors(struct journal *j, const uint8_t *buf, uint64_t first, uint64_t count)
{
    if (count <= (REC_MAX - REC_HDR) / j->p.meta_bytes)
        return log_record(j, K_META, first, (uint32_t)count, buf, NULL, NULL);
    return write_in_place(j, buf, first, count);
}

static int j_write(void *c, const void *buf, size_t len, uint64_t off)
{
    struct journal *j = c;
    if (!j->writable)
        return -EROFS;
    if (!in_table(j, off, len))
        return j->in->write_at(j->ictx, buf, len, off);
    const size_t M = j->p.meta_bytes;
    int rc = 0;
    if (off < j->p.meta_off) {                       /* the part before the table */
        rc = j->in->write_at(j->ictx, buf, (size_t)(j->p.meta_off - off), off);
        buf = (const uint8_t *)buf + (j->p.meta_off - off), len -= (size_t)(j->p.meta_off - off);
        off = j->p.meta_off;
    }
    if (rc == 0 && off + len > j->table_end) {       /* and after it */
        rc = j->in->write_at(j->ictx, (const uint8_t *)buf + (j->table_end - off),
                             (size_t)(off + len - j->table_end), j->table_end);
        len = (size_t)(j->table_end - off);
    }
    if (rc != 0)
        return rc;
    uint64_t first = (off - j->p.meta_off) / M, end = (off + len - j->p.meta_off + M - 1) / M;
    if ((off - j->p.meta_off) % M == 0 && len % M == 0)
        return write_sectors(j, buf, first, end - first);
    /* not whole sectors: complete them from what the table holds now */
    size_t whole = (size_t)((end - first) * M);
    uint8_t *tmp = malloc(whole);
    if (tmp == NULL)
        return -ENOMEM;
    rc = j_read(j, tmp, whole, j->p.meta_off + first * M);
    if (rc == 0) {
        memcpy(tmp + (off - j->p.meta_off - first * M), buf, len);
        rc = write_sectors(j, tmp, first, end - first);
    }
    free(tmp);
    return rc;
}

static int j_punch(void *c, uint64_t off, uint64_t len)
{
    struct journal *j = c;
    if (!j->writable)
        return -EROFS;
    if (!in_table(j, off, (size_t)len))
        return j->in->punch(j->ictx, off, len);
    const size_t M = j->p.meta_bytes;
    uint64_t lo = off > j->p.meta_off ? off : j->p.meta_off;
    uint64_t hi = off + len < j->table_end ? off + len : j->table_end;
    uint64_t first = (lo - j->p.meta_off + M - 1) / M, end = (hi - j->p.meta_off) / M;   /* whole sectors */
    int rc = 0;
    uint8_t zero[REC_MAX];
    memset(zero, 0, sizeof zero);
    /* partial sectors at the edges: zeros written through the log (read-modify-write) */
    uint64_t head_end = first < end ? j->p.meta_off + first * M : hi;
    for (uint64_t a = lo; rc == 0 && a < head_end; a += REC_MAX)
        rc = j_write(j, zero, (size_t)(head_end - a < REC_MAX ? head_end - a : REC_MAX), a);
    uint64_t tail_start = first < end ? j->p.meta_off + end * M : hi;
    for (uint64_t a = tail_start > head_end ? tail_start : head_end; rc == 0 && a < hi; a += REC_MAX)
        rc = j_write(j, zero, (size_t)(hi - a < REC_MAX ? hi - a : REC_MAX), a);
    if (rc == 0 && first < end)
        rc = write_in_place(j, NULL, first, end - first);
    /* outside the table */
    if (rc == 0 && off < j->p.meta_off)
        rc = j->in->punch(j->ictx, off, j->p.meta_off - off);
    if (rc == 0 && off + len > j->table_end)
        rc = j->in->punch(j->ictx, j->table_end, off + len - j->table_end);
    return rc;
}

static int j_flush(void *c) { struct journal *j = c; return j->in->flush(j->ictx); }
static int j_get_size(void *c, uint64_t *v) { struct journal *j = c; return j->in->get_size(j->ictx, v); }
static int j_set_size(void *c, uint64_t v) { struct journal *j = c; return j->in->set_size(j->ictx, v); }
static int j_blocks(void *c, uint64_t *v) { struct journal *j = c; return j->in->blocks_used(j->ictx, v); }

static void j_prefetch(void *c, uint64_t off, uint64_t len)
{
    struct journal *j = c;
    if (j->in->prefetch != NULL)
        j->in->prefetch(j->ictx, off, len);
}

static void j_free(struct journal *j)
{
    if (j->entries != NULL) {
        explicit_bzero(j->entries, j->cap * j->esize);
        free(j->entries);
    }
    free(j->hash);
    pthread_rwlock_destroy(&j->cp);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

static void j_close(void *c)
{
    struct journal *j = c;
    if (j->writable)
        (void)checkpoint_now(j);   /* on failure the log stays: the next open replays it */
    j->in->close(j->ictx);
    j_free(j);
}

static const struct bc_storage_ops journal_ops = {"journal", j_read, j_write, j_punch, j_flush, j_get_size,
                                                  j_set_size, j_blocks, j_close, j_prefetch};

/* ---- open: replay --------------------------------------------------------------------- */

/* Two passes over the log: the highest epoch among valid records, then its records in
 * position order into the index. */
static int replay(struct journal *j)
{
    uint8_t *buf = malloc(SCAN_IO + REC_MAX);
    if (buf == NULL)
        return -ENOMEM;
    int rc = 0;
    uint64_t best = 0, end_of_best = 0;
    int found = 0, content = 0;
    for (int pass = 0; pass < 2 && rc == 0; pass++) {
        for (uint64_t base = 0; base < j->p.log_bytes && rc == 0; base += SCAN_IO) {
            uint64_t want = j->p.log_bytes - base < SCAN_IO + REC_MAX ? j->p.log_bytes - base : SCAN_IO + REC_MAX;
            rc = j->in->read_at(j->ictx, buf, (size_t)want, j->p.log_off + base);
            for (uint64_t at = 0; rc == 0 && at < SCAN_IO && at < want;) {
                int kind;
                uint64_t ep, first;
                uint32_t count;
                size_t len = rec_parse(j, buf + at, (size_t)(want - at), &kind, &ep, &first, &count);
                if (len == 0) {
                    at += REC_ALIGN;
                    continue;
                }
                if (pass == 0) {
                    if (!found || ep > best)
                        best = ep, end_of_best = 0;
                    found = 1;
                    if (ep == best && base + at + len > end_of_best)
                        end_of_best = base + at + len;
                } else if (ep == best) {
                    pthread_mutex_lock(&j->mu);
                    rc = rec_apply(j, kind, first, count, buf + at + REC_HDR);
                    pthread_mutex_unlock(&j->mu);
                    if (kind != K_MARK)
                        content = 1, j->counts.replayed++;
                }
                at += len;
            }
        }
        if (!found)
            break;
    }
    free(buf);
    if (rc == -ENOSPC)
        rc = -EUCLEAN;   /* more sectors than a log can hold: not a log this wrapper wrote */
    if (rc != 0)
        return rc;
    j->epoch = found ? best : 1;
    j->tail = found ? end_of_best : 0;
    j->dirty = content;
    return 0;
}

int bc_storage_journal_wrap(const struct bc_journal_params *p, const struct bc_storage_ops *inner, void *ictx,
                            int writable, const struct bc_storage_ops **ops, void **ctx)
{
    if (p->meta_bytes == 0 || p->meta_bytes > REC_MAX - REC_HDR || p->log_bytes < REC_MAX ||
        p->log_bytes % REC_ALIGN != 0 || p->meta_sectors == 0 || p->meta_sectors > UINT64_MAX / p->meta_bytes ||
        p->meta_off + p->meta_sectors * p->meta_bytes < p->meta_off ||
        (p->log_off < p->meta_off + p->meta_sectors * p->meta_bytes && p->log_off + p->log_bytes > p->meta_off))
        return -EINVAL;
    pthread_once(&crc_once, crc_init);
    struct journal *j = calloc(1, sizeof *j);
    if (j == NULL)
        return -ENOMEM;
    j->p = *p;
    j->in = inner;
    j->ictx = ictx;
    j->writable = writable;
    j->table_end = p->meta_off + p->meta_sectors * p->meta_bytes;
    j->esize = (sizeof(struct entry) + p->meta_bytes + 7) & ~(size_t)7;
    j->cap = (size_t)(p->log_bytes / p->meta_bytes) + 1;   /* a sector costs a log at least M bytes */
    size_t hs = 1;
    while (hs < 2 * j->cap)
        hs <<= 1;
    j->hmask = hs - 1;
    pthread_rwlock_init(&j->cp, NULL);
    pthread_mutex_init(&j->mu, NULL);
    j->entries = malloc(j->cap * j->esize);
    j->hash = calloc(hs, sizeof *j->hash);
    int rc = j->entries != NULL && j->hash != NULL ? replay(j) : -ENOMEM;
    if (rc != 0) {
        j_free(j);
        return rc;
    }
    *ops = &journal_ops;
    *ctx = j;
    return 0;
}

int bc_storage_journal_checkpoint(void *ctx)
{
    struct journal *j = ctx;
    return j->writable ? checkpoint_now(j) : -EROFS;
}

void bc_storage_journal_counts(void *ctx, struct bc_journal_counts *out)
{
    struct journal *j = ctx;
    pthread_mutex_lock(&j->mu);
    *out = j->counts;
    out->pending = j->nlive;
    out->log_used = j->tail;
    pthread_mutex_unlock(&j->mu);
}
