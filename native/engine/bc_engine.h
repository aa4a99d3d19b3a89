/*
 * bc_engine.h — the blockcrypt volume engine: one open disk in C.
 *
 * An open disk (struct bc_volume) is a storage backend (the backing-store seam,
 * struct bc_storage_ops), a stack of sector layers (struct bc_layer_ops: AES-256-XTS
 * today, a null layer for benchmarks, an AEAD layer with per-sector metadata next),
 * range locks over sectors, read-modify-write of partial sectors, holes that read as
 * zeros, discard/zero-range, flush, a revocation gate and per-disk counters.
 *
 * Byte geometry (all offsets are backing-store offsets, see docs/FORMAT.md):
 *
 *   sector n of the data area   at  data_off + n * sector_size
 *   metadata of sector n        at  meta_off + n * meta_bytes   (meta_bytes = sum over layers)
 *
 * Layers: layer 0 is the outermost (customer) layer. On write, plaintext goes
 * through layer 0, then 1, ... and the result is stored; on read the reverse.
 * Each layer encrypts whole sectors in place and may produce meta_bytes of
 * per-sector metadata (nonce + tag for an AEAD layer); the engine stores and
 * fetches that metadata and hands each layer its own slice.
 *
 * Holes: a sector whose stored bytes are all zero (and whose metadata, if any, is
 * all zero; or whatever its metadata when a layer sets BC_LAYER_ZERO_DATA_IS_HOLE)
 * reads as zeros without decryption; this is how a new disk reads as zeros and how
 * discard works (the backing range is punched: data first, then metadata).
 *
 * Writes with metadata: the engine reads the metadata range of the sectors first
 * (layers choose where the new metadata goes from the current one; a layer's resolve
 * may ask for the stored data too), then stores the new metadata, then the data. A
 * process killed between the two leaves new metadata beside old data, which a layer
 * with two slots per sector reads as the old content (bc_layer_aead.c).
 *
 * Concurrency: every call may come from any thread at once. Requests on disjoint
 * sector ranges run in parallel; overlapping ones serialize (range lock over the
 * touched sectors, for reads and writes). No allocation on the request path: each
 * thread keeps a scratch buffer of BC_MAX_REQUEST bytes (+ metadata) made on its
 * first request.
 *
 * Revocation gate: bc_volume_revoke() waits for requests in flight to leave, wipes
 * and destroys every layer (key bytes zeroed), and records (err, reason); every
 * later request returns -err without touching a layer or the storage.
 * bc_volume_set_layers() installs a fresh stack (key back) and opens the gate.
 *
 * Errors: every function returns 0 (or a byte count) on success and -errno on
 * failure: -EIO storage/unknown, -EBADMSG a layer found a sector tampered with,
 * -EROFS write to a read-only volume, -EFBIG a write that starts at or past the
 * end, -ENOSPC the backing store is full, the gate's err once revoked.
 *
 * Caveats: the engine holds no policy: geometry and keys come from the caller
 * (Python parses the header and unwraps the DEKs). It never prints or logs.
 */
#ifndef BC_ENGINE_H
#define BC_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BC_MAX_REQUEST (1u << 20)   /* largest read/write handed to the engine in one call */
#define BC_MAX_LAYERS 4
#define BC_REASON_MAX 256

/* ---- the storage seam --------------------------------------------------------------
 * Synchronous, thread-safe calls on one backing object. A remote store (librbd's
 * rbd_read2/rbd_write2/rbd_discard/rbd_flush, or librados objects) implements the
 * same table; asynchronous backends complete inside the call (the FUSE session is
 * multi-threaded, so concurrency comes from the callers' threads). */
struct bc_storage_ops {
    const char *name;                                                    /* "local" */
    /* read len bytes at off; bytes past the end of the store read as zeros */
    int (*read_at)(void *ctx, void *buf, size_t len, uint64_t off);
    int (*write_at)(void *ctx, const void *buf, size_t len, uint64_t off);
    int (*punch)(void *ctx, uint64_t off, uint64_t len);                 /* may be -EOPNOTSUPP */
    int (*flush)(void *ctx);                                             /* durable on return */
    int (*get_size)(void *ctx, uint64_t *size_bytes);
    int (*set_size)(void *ctx, uint64_t size_bytes);
    int (*blocks_used)(void *ctx, uint64_t *blocks_512);                 /* space really used */
    void (*close)(void *ctx);
    /* optional: start reading [off, off+len) into memory in the background (a hint: it
     * returns at once and nothing fails if it does not happen) */
    void (*prefetch)(void *ctx, uint64_t off, uint64_t len);
};

/* At open, a volume with per-sector metadata asks its storage to prefetch the first
 * BC_META_PREFETCH_MAX bytes of the metadata range (all of it for a disk of up to
 * 2.6 GiB with 4 KiB sectors): random writes and reads then find the metadata they must
 * read in the page cache instead of waiting for the disk once per metadata page. */
#define BC_META_PREFETCH_MAX (64ull << 20)

/* The local sparse file backend. cache: BC_CACHE_BUFFERED (page cache) or
 * BC_CACHE_NONE (O_DIRECT on the backing file, as QEMU's cache=none; requests the
 * engine makes are sector-aligned, buffers page-aligned). */
enum { BC_CACHE_BUFFERED = 0, BC_CACHE_NONE = 1 };
int bc_storage_local_open(const char *path, int writable, int cache,
                          const struct bc_storage_ops **ops, void **ctx);

/* Copy-on-write overlay chains (bc_storage_cow.c, docs/FORMAT.md "Snapshots and images"):
 * files[0] is the member's own top file (written when writable), files[1..] its parent's
 * file, the grandparent's, ... Each file's chunk bitmap (map_chunks bits at map_off) says
 * which chunks it holds; chunks at or past a file's map_chunks are its own. On success the
 * chain owns every file's storage (closed with it); on failure nothing is taken. */
#define BC_COW_MAX_FILES 255
#define BC_COW_CHUNK_BYTES 65536u
struct bc_cow_params {
    uint32_t sector_size;
    uint32_t chunk_bytes;       /* a power of two, a multiple of sector_size, <= BC_MAX_REQUEST */
    uint64_t data_off;          /* backing offset of sector 0 */
    uint64_t meta_off;          /* of sector 0's metadata (meta_bytes 0: none) */
    size_t meta_bytes;          /* per sector, over all layers */
    uint64_t map_off;           /* backing offset of every file's chunk bitmap */
};
struct bc_cow_file {
    const struct bc_storage_ops *ops;
    void *ctx;
    uint64_t map_chunks;        /* bits in this file's bitmap (0: it holds every chunk) */
};
int bc_storage_cow_open(const struct bc_cow_params *p, const struct bc_cow_file *files, size_t nfiles,
                        int writable, const struct bc_storage_ops **ops, void **ctx);
uint64_t bc_storage_cow_copyups(void *ctx);   /* chunks copied up since open (tests, status) */
/* The metadata journal (bc_storage_journal.c, docs/FORMAT.md "The metadata journal"): the
 * per-sector metadata table [meta_off, + meta_sectors * meta_bytes) of the wrapped store is
 * written as appends to a log [log_off, + log_bytes) of the same store and brought up to
 * date at checkpoints (the log full, a clean close, bc_storage_journal_checkpoint); reads
 * of the table see the log. At wrap the log is replayed (a kill leaves it). Read-only: it
 * replays and never writes. On success the wrapper owns the inner store; on failure
 * nothing is taken. */
#define BC_JOURNAL_LOG_BYTES (4u << 20)
struct bc_journal_params {
    uint64_t meta_off;
    size_t meta_bytes;          /* per sector, at most 4064 */
    uint64_t meta_sectors;      /* the table's length in sectors */
    uint64_t log_off;           /* outside the table */
    uint64_t log_bytes;         /* a multiple of 64, at least 4096 */
};
struct bc_journal_counts {
    uint64_t records;           /* appended since wrap */
    uint64_t checkpoints;       /* since wrap */
    uint64_t replayed;          /* records found and applied at wrap */
    uint64_t pending;           /* sectors the log holds that the table does not have yet */
    uint64_t log_used;          /* bytes of the log in use */
};
int bc_storage_journal_wrap(const struct bc_journal_params *p, const struct bc_storage_ops *inner, void *ictx,
                            int writable, const struct bc_storage_ops **ops, void **ctx);
int bc_storage_journal_checkpoint(void *ctx);
void bc_storage_journal_counts(void *ctx, struct bc_journal_counts *out);

/* A fault-injecting backend wrapping another (tests, `make fuzz`): each read, write and
 * flush fails with probability 1/one_in (0: never) with the errno picked from errs (EIO,
 * ENOSPC, ...); a failing write may first write a prefix of its buffer (a short write);
 * a seeded PRNG makes a run repeatable. It takes ownership of the inner backend (closed
 * with it). Counters say what was injected. */
struct bc_fault_plan {
    uint64_t seed;
    uint32_t read_one_in, write_one_in, flush_one_in;
    int errs[4];             /* positive errnos, 0-terminated; {EIO} when empty */
    int short_writes;        /* a failing write first writes a random prefix */
};
struct bc_fault_counts { _Atomic uint64_t reads, writes, flushes, short_writes; };
int bc_storage_faulty_wrap(const struct bc_storage_ops *inner, void *inner_ctx, const struct bc_fault_plan *plan,
                           struct bc_fault_counts *counts, const struct bc_storage_ops **ops, void **ctx);

/* ---- sector layers ------------------------------------------------------------------ */
struct bc_layer_ops {
    const char *name;           /* "aes-xts-plain64", "null", ... */
    size_t meta_bytes;          /* per-sector metadata this layer stores (0 for XTS) */
    /* in place over nsectors whole sectors starting at sector_no; meta points at this
     * layer's slice of sector 0's metadata and advances by meta_stride per sector */
    int (*encrypt)(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no,
                   uint8_t *meta, size_t meta_stride);
    int (*decrypt)(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no,
                   const uint8_t *meta, size_t meta_stride);             /* -EBADMSG on a bad tag */
    void (*destroy)(void *ctx);                                          /* wipes key bytes */
    /* optional (NULL/0 for layers without metadata): */
    unsigned flags;             /* BC_LAYER_ZERO_DATA_IS_HOLE */
    /* Before a write (meta_bytes > 0), with meta holding the sectors' current metadata:
     * old == NULL: return 1 to ask for the stored bytes of the sectors (the engine reads
     * them and calls again), 0 if not needed. old != NULL: fix up meta from them (the
     * AEAD layer empties slots that do not authenticate the stored data). Only the
     * innermost (last) layer may have it: the stored bytes are its ciphertext. */
    int (*resolve)(void *ctx, const uint8_t *old, size_t nsectors, uint64_t sector_no,
                   uint8_t *meta, size_t meta_stride);
    /* a storage write of data encrypted by this layer failed after its metadata was stored */
    void (*write_failed)(void *ctx);
    /* right after decrypt answered -EBADMSG, on the same thread: the sector that failed */
    uint64_t (*failed_sector)(void *ctx);
    /* optional: encrypt out of place, src (plaintext, not changed) into dst; the engine
     * uses it for layer 0 of aligned writes, which saves copying the request first */
    int (*encrypt_from)(void *ctx, uint8_t *dst, const uint8_t *src, size_t nsectors, uint64_t sector_no,
                        uint8_t *meta, size_t meta_stride);
};

/* A stored sector whose data is all zero is a hole whatever its metadata (the engine's
 * default for layers with metadata: data and metadata all zero). */
#define BC_LAYER_ZERO_DATA_IS_HOLE 1u

struct bc_layer {
    const struct bc_layer_ops *ops;
    void *ctx;
};

/* AES-256-XTS, dm-crypt aes-xts-plain64 (tweak = LE64 sector number). key: 64 bytes,
 * the halves must differ. The key is copied into locked memory; the caller wipes its copy. */
int bc_layer_xts_new(const uint8_t *key, size_t key_len, uint32_t sector_size, struct bc_layer *out);
/* The same with a random key drawn into the locked page itself (no caller ever sees it):
 * the ephemeral key of a temp disk under encryption at host; it dies with the layer. */
int bc_layer_xts_new_ephemeral(uint32_t sector_size, struct bc_layer *out);
/* XChaCha20-Poly1305 per sector (bc_layer_aead.c, libsodium): key 32 bytes, the disk id
 * (16 bytes) and the layer role (2 = infrastructure) go into every sector's associated
 * data. BC_AEAD_META_BYTES of metadata per sector: two slots (seq, writer, nonce, tag);
 * -EBADMSG when neither slot authenticates a sector. Needs the engine's write order:
 * metadata first, then data (docs/FORMAT.md, crash consistency). */
#define BC_AEAD_META_BYTES 96u
#define BC_ROLE_INFRA 2u
int bc_layer_aead_new(const uint8_t *key, size_t key_len, uint32_t sector_size, const uint8_t disk_id[16],
                      uint8_t role, struct bc_layer *out);
/* Forget the writer ids destroyed AEAD instances left for the next instance of their disk
 * in this process (bc_layer_aead.c): the state of a new process. Tests that simulate a
 * kill and a restart inside one process call it. */
void bc_layer_aead_forget_ids(void);

/* What runs the AEAD layer's ChaCha20-Poly1305: "avx512" (bc_chachapoly_avx512.c),
 * "openssl" or "gcrypt" (chosen once by the CPU, or by BLOCKCRYPT_AEAD_BULK). force !=
 * NULL switches every thread to that one (tests; NULL return: an unknown name, or
 * avx512 on a CPU without it). */
const char *bc_layer_aead_bulk(const char *force);

/* ---- helper threads for one large request's crypto (bc_parallel.c) ---------------- */

/* 1 + the helper threads this process runs (started on first call; fewer on 1 CPU or
 * with BLOCKCRYPT_CRYPTO_THREADS=0). */
unsigned bc_parallel_width(void);
/* fn(args[0]) in the caller, the other parts on helpers (or the caller, when none has
 * taken one by then); returns when every part is done. */
void bc_parallel_run(void (*fn)(void *), void *const *args, size_t n);
/* No encryption at all (benchmarks only). */
int bc_layer_null_new(uint32_t sector_size, struct bc_layer *out);

/* ---- the volume ------------------------------------------------------------------- */
struct bc_volume_params {
    uint64_t size_bytes;        /* logical size, a multiple of sector_size */
    uint32_t sector_size;       /* 512 or 4096 */
    uint64_t data_off;          /* backing offset of sector 0 */
    uint64_t meta_off;          /* backing offset of sector 0's metadata (when any layer has some) */
    int read_only;
};

struct bc_stats {
    uint64_t reads, writes, discards, flushes, errors;
    uint64_t bytes_read, bytes_written;
    uint64_t lat_us_hist[32];   /* request latency: bucket i counts 2^(i-1) < us <= 2^i (0: <= 1 us) */
    uint64_t integrity_errors;  /* requests that failed with -EBADMSG (a sector failed its tag) */
    uint64_t integrity_last_sector;  /* the last sector that failed its tag (when integrity_errors) */
};

struct bc_volume;

/* Takes ownership of the storage (closed by the last unref) and of the layers. On
 * failure nothing is taken: the caller still closes the storage and destroys the layers. */
int bc_volume_open(const struct bc_volume_params *p, const struct bc_storage_ops *sops, void *sctx,
                   const struct bc_layer *layers, size_t nlayers, struct bc_volume **out);
void bc_volume_ref(struct bc_volume *v);
void bc_volume_unref(struct bc_volume *v);      /* the last one flushes (if writable) and closes */

ssize_t bc_volume_read(struct bc_volume *v, void *buf, size_t len, uint64_t off);   /* short at the end */
ssize_t bc_volume_write(struct bc_volume *v, const void *buf, size_t len, uint64_t off); /* clipped at the end */
int bc_volume_discard(struct bc_volume *v, uint64_t off, uint64_t len);     /* holes; partial edges zeroed */
int bc_volume_zero_range(struct bc_volume *v, uint64_t off, uint64_t len);
int bc_volume_flush(struct bc_volume *v);
int bc_volume_resize(struct bc_volume *v, uint64_t new_size_bytes);         /* logical size only */
uint64_t bc_volume_size(const struct bc_volume *v);
uint32_t bc_volume_sector_size(const struct bc_volume *v);
int bc_volume_read_only(const struct bc_volume *v);
int bc_volume_blocks_used(struct bc_volume *v, uint64_t *blocks_512);

/* The revocation gate. After revoke returns, no request returns plaintext and
 * every new one fails with -err. reason is copied (a one-line text, no key bytes). */
int bc_volume_revoke(struct bc_volume *v, int err, const char *reason);
/* 0 while serving; else the gate's err, with the reason copied into buf. */
int bc_volume_gate(struct bc_volume *v, char *reason_buf, size_t reason_len);
/* Replace the layer stack (a restored key) and open the gate; old layers are destroyed.
 * The new stack must have the same total meta_bytes (-EINVAL, and the caller keeps the
 * layers, otherwise). */
int bc_volume_set_layers(struct bc_volume *v, const struct bc_layer *layers, size_t nlayers);

/* Replace the storage (a snapshot froze the file under an open disk: the disk goes on in a
 * new top file over it). Waits for requests in flight, flushes the old storage (writable
 * volumes), closes it and installs the new one, which the volume then owns. On failure
 * (-errno from the flush) nothing changes and the caller still owns the new storage. */
int bc_volume_set_storage(struct bc_volume *v, const struct bc_storage_ops *sops, void *sctx);
/* The same, with the new storage opened by open_fn(arg, &ops, &ctx) after the old one is
 * flushed and while no request runs: a chain whose lower files include the old top must read
 * their bitmaps after the flush made every copied-up chunk's bit durable (bc_storage_cow.c).
 * open_fn returns 0 or -errno (then nothing changes). */
int bc_volume_set_storage_with(struct bc_volume *v,
                               int (*open_fn)(void *arg, const struct bc_storage_ops **ops, void **ctx),
                               void *arg);

void bc_volume_stats(struct bc_volume *v, struct bc_stats *out);

#ifdef __cplusplus
}
#endif
#endif
