/*
 * bc_layer_aead.c — the infrastructure layer of double encryption: XChaCha20-Poly1305
 * (libsodium's crypto_aead_xchacha20poly1305_ietf construction) per sector, a random 192-bit nonce
 * per write, a 128-bit tag, two metadata slots per sector for crash consistency.
 *
 * Metadata of one sector (BC_AEAD_META_BYTES = 96, this layer's slice):
 *
 *   slot 0 (48 bytes) | slot 1 (48 bytes)
 *   slot = LE32 seq | LE32 writer | nonce (24) | tag (16); all zero = empty
 *
 * Associated data (33 bytes) = disk id (16) || LE64 sector number || role (1) ||
 * LE32 seq || LE32 writer: a sector (with its metadata) moved to another sector
 * number, another disk or another layer role does not open.
 *
 * Crash consistency (docs/FORMAT.md argues it): the engine reads the metadata of the
 * sectors it is about to write, writes the new metadata first, then the data. This
 * layer puts a write's nonce+tag into the slot that does NOT authenticate the stored
 * data, so the valid slot survives until the data is replaced: a kill at any moment
 * leaves old data + the old slot, or new data + the new slot. A read tries the newer
 * slot (higher seq, serial arithmetic), then the other.
 *
 * Which slot authenticates the stored data? If the newer slot was written by this
 * layer instance (writer = this instance's random 32-bit id), its data write
 * completed (writes to a sector are serialised by the engine's range lock and a failed
 * data write makes the instance take a new id, write_failed). Otherwise (written
 * before a restart, perhaps by a process killed between its two writes) resolve()
 * asks the engine for the stored data and checks the newer slot's tag (Poly1305 only),
 * then the older one's, and empties in the metadata buffer any slot that does not
 * authenticate: so this costs one extra read on the first write of a sector after an
 * open, and nothing after that.
 *
 * Reopens in one process: an instance that is destroyed (the last reference of its
 * volume gone, so no write of it is in flight, and every failed data write already
 * renewed its id) leaves its id in a small process-wide table under (disk id, role,
 * a hash of the key); the next instance of that disk in this process takes it back
 * (removing it, so two live instances never share an id). Its own earlier slots then
 * count as written by it, and a disk closed and reopened by the same mount (fio jobs,
 * a VM restarted on the same host) pays no extra reads. A new process draws new ids:
 * after a kill every slot is checked as before. Caveat: a disk file replaced by an older
 * copy taken while it was being written, under the same running process, trusts that
 * copy's slots of this id.
 *
 * Holes: the layer sets BC_LAYER_ZERO_DATA_IS_HOLE: a stored sector whose data is all
 * zero reads as zeros whatever its metadata (a discard punches the data first, then
 * the metadata, and a kill in between must read the discard's zeros).
 *
 * Bulk: the per-sector ChaCha20-Poly1305 (RFC 8439) under the HChaCha20 subkey runs
 * through libgcrypt's GCRY_CIPHER_MODE_POLY1305 (one stitched AVX2 pass: 1.6-1.8x
 * OpenSSL 3's EVP per 4 KiB message and 2-3x libsodium's here; the same construction as
 * libsodium's crypto_aead_xchacha20poly1305_ietf, which the tests check sector by
 * sector); the HChaCha20 subkey is SSE2 code of this file (libsodium's where SSE2 is
 * missing); nonces and the Poly1305-only check of resolve() stay in libsodium. Each
 * thread keeps one cipher handle.
 *
 * Key: 32 bytes in sodium_malloc'd memory (guard pages, mlock'ed, zeroed by
 * sodium_free on destroy). A read decrypts each sector in place; when the newer slot's
 * tag fails, the same stream is applied again (XOR: the ciphertext comes back) before
 * the other slot is tried, so a failure costs a pass and success costs no copy.
 */
#define _GNU_SOURCE
#include "bc_engine.h"
#include "bc_chachapoly.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include <gcrypt.h>
#include <openssl/evp.h>

#define SLOT_BYTES 48u
#define NONCE_OFF 8u
#define TAG_OFF 32u
#define AD_BYTES 33u
#define NONCE_POOL 128u    /* nonces drawn per getrandom, kept per thread */

struct aead_layer {
    unsigned char *key;          /* sodium_malloc'd, 32 bytes */
    uint32_t sector_size;
    uint8_t disk_id[16];
    uint8_t role;
    _Atomic uint32_t writer;     /* this instance's id, never 0; renewed after a failed data write */
    uint64_t serial;             /* unique in the process: names the layer in spare subkeys */
};

static _Atomic uint64_t layer_serials;

static void le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t new_writer(void)
{
    uint32_t w;
    do
        w = randombytes_random();
    while (w == 0);
    return w;
}

/* ---- nonces: random, drawn in batches ------------------------------------------------
 * One getrandom() costs about as much as sealing a fifth of a 4 KiB sector, so each
 * thread draws NONCE_POOL nonces at once and hands them out one by one: a 4 KiB write
 * pays one system call per NONCE_POOL sectors instead of one per request. Nonces are
 * public (they are stored beside the tag); what matters is that no two writes under one
 * key share one. A pool is this thread's alone, and a fork makes every pool stale (the
 * child's copy of the forking thread's pool would otherwise repeat the parent's next
 * nonces): pools carry the fork generation they were drawn in. */

static _Atomic unsigned fork_gen;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void nonce_child_after_fork(void)
{
    atomic_fetch_add(&fork_gen, 1);
}

static void nonce_fork_hook(void)
{
    pthread_atfork(NULL, NULL, nonce_child_after_fork);
}

struct nonce_pool {
    uint8_t bytes[NONCE_POOL * 24];
    unsigned left;   /* nonces not handed out yet, at the end of bytes */
    unsigned gen;
};

static __thread struct nonce_pool tls_nonces;

/* The next fresh 24-byte nonce of this thread. */
static const uint8_t *next_nonce(void)
{
    struct nonce_pool *p = &tls_nonces;
    unsigned g = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (p->left == 0 || p->gen != g) {
        randombytes_buf(p->bytes, sizeof p->bytes);
        p->left = NONCE_POOL;
        p->gen = g;
    }
    return p->bytes + (size_t)(NONCE_POOL - p->left--) * 24;
}

/* ---- ids of destroyed instances, for the next instance of the same disk ------------ */

#define ID_TABLE 256u

struct kept_id {
    uint8_t disk_id[16];
    uint8_t key_hash[16];
    uint8_t role;
    uint32_t writer;   /* 0: free */
};

static struct kept_id kept[ID_TABLE];
static unsigned kept_next;   /* the slot a full table gives up next */
static pthread_mutex_t kept_mu = PTHREAD_MUTEX_INITIALIZER;

static void key_hash(const unsigned char *key, uint8_t out[16])
{
    static const unsigned char ctx[] = "blockcrypt aead instance id";
    crypto_generichash(out, 16, key, crypto_aead_xchacha20poly1305_ietf_KEYBYTES, ctx, sizeof ctx - 1);
}

static int kept_match(const struct kept_id *k, const uint8_t id[16], uint8_t role, const uint8_t h[16])
{
    return k->writer != 0 && k->role == role && memcmp(k->disk_id, id, 16) == 0 &&
           sodium_memcmp(k->key_hash, h, 16) == 0;
}

/* The id a destroyed instance of this disk left, removed from the table, or 0. */
static uint32_t kept_take(const uint8_t id[16], uint8_t role, const uint8_t h[16])
{
    uint32_t w = 0;
    pthread_mutex_lock(&kept_mu);
    for (unsigned i = 0; i < ID_TABLE && w == 0; i++) {
        if (kept_match(&kept[i], id, role, h)) {
            w = kept[i].writer;
            memset(&kept[i], 0, sizeof kept[i]);
        }
    }
    pthread_mutex_unlock(&kept_mu);
    return w;
}

static void kept_put(const uint8_t id[16], uint8_t role, const uint8_t h[16], uint32_t writer)
{
    pthread_mutex_lock(&kept_mu);
    unsigned at = ID_TABLE;
    for (unsigned i = 0; i < ID_TABLE; i++) {
        if (kept_match(&kept[i], id, role, h) || (at == ID_TABLE && kept[i].writer == 0))
            at = i;
        if (kept_match(&kept[i], id, role, h))
            break;
    }
    if (at == ID_TABLE) {   /* full: give up the oldest-placed entry (its disk pays reads) */
        at = kept_next;
        kept_next = (kept_next + 1) % ID_TABLE;
    }
    memcpy(kept[at].disk_id, id, 16);
    memcpy(kept[at].key_hash, h, 16);
    kept[at].role = role;
    kept[at].writer = writer;
    pthread_mutex_unlock(&kept_mu);
}

void bc_layer_aead_forget_ids(void)
{
    pthread_mutex_lock(&kept_mu);
    sodium_memzero(kept, sizeof kept);
    kept_next = 0;
    pthread_mutex_unlock(&kept_mu);
}

static int slot_empty(const uint8_t *slot)
{
    static const uint8_t z[SLOT_BYTES];
    return memcmp(slot, z, SLOT_BYTES) == 0;
}

/* index (0/1) of the newer non-empty slot, or -1 if both are empty */
static int newer_slot(const uint8_t *meta)
{
    int e0 = slot_empty(meta), e1 = slot_empty(meta + SLOT_BYTES);
    if (e0 && e1)
        return -1;
    if (e0)
        return 1;
    if (e1)
        return 0;
    return (int32_t)(rd32(meta + SLOT_BYTES) - rd32(meta)) > 0 ? 1 : 0;
}

static void make_ad(const struct aead_layer *a, uint64_t sector, const uint8_t *slot, uint8_t ad[AD_BYTES])
{
    memcpy(ad, a->disk_id, 16);
    le64(ad + 16, sector);
    ad[24] = a->role;
    memcpy(ad + 25, slot, 8);   /* seq, writer */
}

/* HChaCha20 (the XChaCha20 subkey): out = words 0-3 and 12-15 of 20 ChaCha rounds over
 * constants | key | in, without the final addition. With SSE2 (every x86-64) the state's
 * four rows sit in four registers and a diagonal round is three lane rotations:
 * 0.05 us instead of libsodium's portable 0.14 us, which was a twentieth of a 4 KiB
 * seal. The tests check every sector against libsodium's one-shot API, which uses its
 * own HChaCha20. */
#if defined(__SSE2__)
#include <emmintrin.h>
#define ROTL32X4(x, n) _mm_or_si128(_mm_slli_epi32((x), (n)), _mm_srli_epi32((x), 32 - (n)))
#define QROUND4(a, b, c, d)                                                                                   \
    do {                                                                                                     \
        a = _mm_add_epi32(a, b), d = _mm_xor_si128(d, a), d = ROTL32X4(d, 16);                               \
        c = _mm_add_epi32(c, d), b = _mm_xor_si128(b, c), b = ROTL32X4(b, 12);                               \
        a = _mm_add_epi32(a, b), d = _mm_xor_si128(d, a), d = ROTL32X4(d, 8);                                \
        c = _mm_add_epi32(c, d), b = _mm_xor_si128(b, c), b = ROTL32X4(b, 7);                                \
    } while (0)

static void hchacha20(uint8_t out[32], const uint8_t in[16], const uint8_t key[32])
{
    __m128i a = _mm_setr_epi32(0x61707865, 0x3320646e, 0x79622d32, 0x6b206574);
    __m128i b = _mm_loadu_si128((const __m128i *)key), c = _mm_loadu_si128((const __m128i *)(key + 16));
    __m128i d = _mm_loadu_si128((const __m128i *)in);
    for (int i = 0; i < 10; i++) {
        QROUND4(a, b, c, d);   /* columns */
        b = _mm_shuffle_epi32(b, _MM_SHUFFLE(0, 3, 2, 1));
        c = _mm_shuffle_epi32(c, _MM_SHUFFLE(1, 0, 3, 2));
        d = _mm_shuffle_epi32(d, _MM_SHUFFLE(2, 1, 0, 3));
        QROUND4(a, b, c, d);   /* diagonals */
        b = _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 1, 0, 3));
        c = _mm_shuffle_epi32(c, _MM_SHUFFLE(1, 0, 3, 2));
        d = _mm_shuffle_epi32(d, _MM_SHUFFLE(0, 3, 2, 1));
    }
    _mm_storeu_si128((__m128i *)out, a);
    _mm_storeu_si128((__m128i *)(out + 16), d);
}
#else
static void hchacha20(uint8_t out[32], const uint8_t in[16], const uint8_t key[32])
{
    crypto_core_hchacha20(out, in, key, NULL);
}
#endif

/* The IETF nonce of an XChaCha20 nonce: four zero bytes, then its last eight. */
static void nonce12(uint8_t n2[12], const uint8_t *nonce)
{
    memset(n2, 0, 4);
    memcpy(n2 + 4, nonce + 16, 8);
}

/* The IETF ChaCha20-Poly1305 key and nonce of an XChaCha20 nonce (as libsodium does). */
static void subkey(const struct aead_layer *a, const uint8_t *nonce, uint8_t k2[32], uint8_t n2[12])
{
    hchacha20(k2, nonce, a->key);
    nonce12(n2, nonce);
}

/* ---- the bulk: our AVX-512 code, OpenSSL or libgcrypt -------------------------------
 * All three run RFC 8439 ChaCha20-Poly1305 under the HChaCha20 subkey; which is fastest
 * per 4 KiB message depends on the CPU (docs/CRYPTO.md):
 *  - with AVX-512 F, VL and IFMA, bc_chachapoly_avx512.c: about 1.1 us per message,
 *    against 1.3-1.4 us through OpenSSL 3's EVP_chacha20_poly1305 (its own AVX-512
 *    code plus 0.3-0.5 us of EVP set-up per message) and 2.0 us through libgcrypt 1.10,
 *    which has no AVX-512 code;
 *  - with AVX-512 F and VL but no IFMA, OpenSSL;
 *  - with AVX2 only, libgcrypt's GCRY_CIPHER_MODE_POLY1305 (one stitched AVX2 pass,
 *    1.6-1.8 us): OpenSSL's provider dispatch then costs 0.6-0.9 us per message on top
 *    of its 2.0 us update (stop 22).
 * BLOCKCRYPT_AEAD_BULK=avx512|openssl|gcrypt overrides the choice (A/B runs; the tests
 * run each one the CPU has). Each thread keeps one context of the chosen library; freeing it wipes the
 * subkey it holds. libgcrypt is initialised once, without its secure-memory pool (the
 * subkey is set and replaced per sector; the layer's own key stays in sodium_malloc'd
 * memory). */

enum { BULK_UNSET, BULK_AVX512, BULK_OPENSSL, BULK_GCRYPT };
static _Atomic int bulk_kind;
static pthread_key_t bulk_key;
static pthread_once_t bulk_once = PTHREAD_ONCE_INIT;
static int bulk_ok;
static EVP_CIPHER *ossl_cipher;   /* fetched once: an implicit fetch per init costs more */
static __thread void *tls_bulk;   /* EVP_CIPHER_CTX * or gcry_cipher_hd_t */
static __thread int tls_bulk_kind;

static void bulk_free(void *p)
{
    if (p == NULL || tls_bulk_kind == BULK_AVX512)
        return;
    if (tls_bulk_kind == BULK_OPENSSL)
        EVP_CIPHER_CTX_free(p);
    else
        gcry_cipher_close((gcry_cipher_hd_t)p);
}

static int cpu_choice(void)
{
    if (bc_cp_avx512_usable())
        return BULK_AVX512;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return BULK_OPENSSL;
#endif
    return BULK_GCRYPT;
}

static int kind_of(const char *name)
{
    return name == NULL                       ? -1
           : strcmp(name, "avx512") == 0      ? (bc_cp_avx512_usable() ? BULK_AVX512 : -1)
           : strcmp(name, "openssl") == 0     ? BULK_OPENSSL
           : strcmp(name, "gcrypt") == 0      ? BULK_GCRYPT
                                              : -1;
}

static const char *name_of(int k)
{
    return k == BULK_AVX512 ? "avx512" : k == BULK_OPENSSL ? "openssl" : "gcrypt";
}

static void bulk_init(void)
{
    /* another part of the process may have initialised libgcrypt already: then keep its
     * settings (GCRYCTL_INITIALIZATION_FINISHED_P) */
    if (!gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
        if (gcry_check_version(GCRYPT_VERSION) == NULL)
            return;
        gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
        gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    }
    ossl_cipher = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    if (atomic_load(&bulk_kind) == BULK_UNSET) {
        int k = kind_of(getenv("BLOCKCRYPT_AEAD_BULK"));
        atomic_store(&bulk_kind, k > 0 ? k : cpu_choice());
    }
    if (atomic_load(&bulk_kind) == BULK_OPENSSL && ossl_cipher == NULL)
        atomic_store(&bulk_kind, BULK_GCRYPT);
    bulk_ok = pthread_key_create(&bulk_key, bulk_free) == 0;
}

const char *bc_layer_aead_bulk(const char *force)
{
    if (force != NULL) {
        int k = kind_of(force);
        if (k < 0)
            return NULL;
        atomic_store(&bulk_kind, k);
    }
    pthread_once(&bulk_once, bulk_init);
    return name_of(atomic_load(&bulk_kind));
}

/* This thread's context of the chosen library, or -ENOMEM. A thread whose context is of
 * the other library (the tests switch) gets a new one. */
static int bulk_get(void)
{
    pthread_once(&bulk_once, bulk_init);
    int k = atomic_load_explicit(&bulk_kind, memory_order_relaxed);
    if ((tls_bulk != NULL || k == BULK_AVX512) && tls_bulk_kind == k)
        return 0;
    if (!bulk_ok)
        return -ENOMEM;
    if (k == BULK_AVX512) {   /* no context: drop the other library's, if any */
        bulk_free(tls_bulk);
        pthread_setspecific(bulk_key, NULL);
        tls_bulk = NULL;
        tls_bulk_kind = k;
        return 0;
    }
    void *c = NULL;
    if (k == BULK_OPENSSL) {
        EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
        if (x != NULL && EVP_CipherInit_ex(x, ossl_cipher, NULL, NULL, NULL, 1) != 1) {
            EVP_CIPHER_CTX_free(x);
            x = NULL;
        }
        c = x;
    } else {
        gcry_cipher_hd_t h;
        if (gcry_cipher_open(&h, GCRY_CIPHER_CHACHA20, GCRY_CIPHER_MODE_POLY1305, 0) == 0)
            c = h;
    }
    if (c == NULL)
        return -ENOMEM;
    bulk_free(tls_bulk);   /* the other library's, if any */
    tls_bulk = c;
    tls_bulk_kind = k;
    if (pthread_setspecific(bulk_key, c) != 0) {
        bulk_free(c);
        tls_bulk = NULL;
        return -ENOMEM;
    }
    return 0;
}

/* key, nonce and associated data of one message through libgcrypt */
static int gc_start(gcry_cipher_hd_t h, const uint8_t *ad, const uint8_t k2[32], const uint8_t n2[12])
{
    if (gcry_cipher_setkey(h, k2, 32) != 0 || gcry_cipher_setiv(h, n2, 12) != 0 ||
        gcry_cipher_authenticate(h, ad, AD_BYTES) != 0 || gcry_cipher_final(h) != 0)
        return -EIO;
    return 0;
}

/* key, nonce and associated data of one message through OpenSSL (enc: 1 seal, 0 open) */
static int ossl_start(EVP_CIPHER_CTX *x, const uint8_t *ad, const uint8_t k2[32], const uint8_t n2[12], int enc)
{
    int outl;
    if (EVP_CipherInit_ex(x, NULL, NULL, k2, n2, enc) != 1 || EVP_CipherUpdate(x, NULL, &outl, ad, AD_BYTES) != 1)
        return -EIO;
    return 0;
}

/* ChaCha20-Poly1305 of n bytes in place under subkey k2 / nonce n2 with ad; tag out. */
static int bulk_seal(uint8_t *p, size_t n, const uint8_t *ad, const uint8_t k2[32], const uint8_t n2[12],
                     uint8_t tag[16])
{
    if (tls_bulk_kind == BULK_AVX512)
        return bc_cp_avx512_seal(p, n, ad, AD_BYTES, k2, n2, tag) == 0 ? 0 : -EIO;
    if (tls_bulk_kind == BULK_OPENSSL) {
        EVP_CIPHER_CTX *x = tls_bulk;
        int outl, fin;
        if (ossl_start(x, ad, k2, n2, 1) != 0 || EVP_CipherUpdate(x, p, &outl, p, (int)n) != 1 ||
            EVP_CipherFinal_ex(x, p + outl, &fin) != 1 || EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_GET_TAG, 16, tag) != 1)
            return -EIO;
        return 0;
    }
    gcry_cipher_hd_t h = tls_bulk;
    if (gc_start(h, ad, k2, n2) != 0 || gcry_cipher_encrypt(h, p, n, NULL, 0) != 0 ||
        gcry_cipher_gettag(h, tag, 16) != 0)
        return -EIO;
    return 0;
}

/* The libraries' open in place: 1 if the tag checks out, 0 if not (p then holds the
 * ciphertext XOR the stream), -EIO on a library failure. */
static int lib_open(uint8_t *p, size_t n, const uint8_t *ad, const uint8_t k2[32], const uint8_t n2[12],
                     const uint8_t tag[16])
{
    if (tls_bulk_kind == BULK_OPENSSL) {
        EVP_CIPHER_CTX *x = tls_bulk;
        int outl, fin;
        if (ossl_start(x, ad, k2, n2, 0) != 0 || EVP_CipherUpdate(x, p, &outl, p, (int)n) != 1 ||
            EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag) != 1)
            return -EIO;
        /* Final's only failure here is the tag (the update above already succeeded) */
        return EVP_CipherFinal_ex(x, p + outl, &fin) == 1 ? 1 : 0;
    }
    gcry_cipher_hd_t h = tls_bulk;
    if (gc_start(h, ad, k2, n2) != 0 || gcry_cipher_decrypt(h, p, n, NULL, 0) != 0)
        return -EIO;
    gcry_error_t e = gcry_cipher_checktag(h, tag, 16);
    if (e == 0)
        return 1;
    return gcry_err_code(e) == GPG_ERR_CHECKSUM ? 0 : -EIO;
}

/* Open n bytes of ciphertext in place against tag: 1 if the tag checks out (p holds the
 * plaintext), 0 if not (p holds the ciphertext again), -EIO on a failure. The libraries
 * decrypt as they authenticate: after a failed tag the same stream once more (a seal
 * under the same key and nonce) gives the ciphertext back; the AVX-512 code checks the
 * tag first and leaves p alone. */
static int bulk_open(uint8_t *p, size_t n, const uint8_t *ad, const uint8_t k2[32], const uint8_t n2[12],
                     const uint8_t tag[16])
{
    if (tls_bulk_kind == BULK_AVX512) {
        int ok = bc_cp_avx512_open(p, n, ad, AD_BYTES, k2, n2, tag);
        return ok < 0 ? -EIO : ok;
    }
    int ok = lib_open(p, n, ad, k2, n2, tag);
    uint8_t again[16];
    if (ok == 0 && bulk_seal(p, n, ad, k2, n2, again) != 0)
        ok = -EIO;
    return ok;
}

/* Does slot authenticate ciphertext c of sector `sector`? On success k2/n2 hold the
 * subkey for decryption. Nothing is written to c. */
static int slot_verify(const struct aead_layer *a, const uint8_t *c, uint64_t sector, const uint8_t *slot,
                       uint8_t k2[32], uint8_t n2[12])
{
    static const uint8_t pad[16];
    uint8_t ad[AD_BYTES], block0[64], lens[16], mac[16];
    size_t clen = a->sector_size;
    make_ad(a, sector, slot, ad);
    subkey(a, slot + NONCE_OFF, k2, n2);
    if (bulk_get() == 0 && tls_bulk_kind == BULK_AVX512)   /* 0.61 us a 4 KiB sector, libsodium 1.30 (Zen 4) */
        return bc_cp_avx512_verify(c, clen, ad, AD_BYTES, k2, n2, slot + TAG_OFF) == 1;
    crypto_stream_chacha20_ietf(block0, sizeof block0, n2, k2);
    crypto_onetimeauth_poly1305_state st;
    crypto_onetimeauth_poly1305_init(&st, block0);
    crypto_onetimeauth_poly1305_update(&st, ad, AD_BYTES);
    crypto_onetimeauth_poly1305_update(&st, pad, (16 - AD_BYTES % 16) % 16);
    crypto_onetimeauth_poly1305_update(&st, c, clen);
    crypto_onetimeauth_poly1305_update(&st, pad, (16 - clen % 16) % 16);
    le64(lens, AD_BYTES);
    le64(lens + 8, clen);
    crypto_onetimeauth_poly1305_update(&st, lens, sizeof lens);
    crypto_onetimeauth_poly1305_final(&st, mac);
    int ok = crypto_verify_16(mac, slot + TAG_OFF) == 0;
    sodium_memzero(block0, sizeof block0);
    sodium_memzero(&st, sizeof st);
    return ok;
}

/* The subkeys of nb <= 4 XChaCha20 nonces: with the AVX-512 bulk in one chain of rounds
 * for all four (bc_chachapoly_avx512.c), else one by one. */
static void subkeys(const struct aead_layer *a, const uint8_t *const *nonces, size_t nb, uint8_t (*k2)[32])
{
    if (tls_bulk_kind == BULK_AVX512) {
        bc_cp_avx512_hchacha20(k2, nonces, nb, a->key);
        return;
    }
    for (size_t j = 0; j < nb; j++)
        hchacha20(k2[j], nonces[j], a->key);
}

/* Spare (nonce, subkey) pairs for writes of fewer than four sectors: HChaCha20 takes the
 * same time for four nonces as for one (one chain of rounds), so a one-sector write
 * draws four nonces, derives their four subkeys at once and leaves three here for this
 * thread's next small writes to the same layer (docs/CRYPTO.md: 0.1 us of a
 * 1.3 us sector). A spare is only ever used once, with its own nonce: it is wiped when
 * taken, and a fork (the pool's generation) or another layer drops the lot. A spare
 * left behind by a destroyed layer can only open sectors sealed under its nonce, and
 * none ever was. */
struct spare_keys {
    uint64_t serial;
    unsigned gen, left;
    uint8_t nonce[4][24];
    uint8_t k2[4][32];
};

static __thread struct spare_keys tls_spare;

static void take_spare(const struct aead_layer *a, uint8_t nonce[24], uint8_t k2[32])
{
    struct spare_keys *sp = &tls_spare;
    unsigned g = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (sp->left == 0 || sp->serial != a->serial || sp->gen != g) {
        const uint8_t *ns[4];
        for (int j = 0; j < 4; j++)
            ns[j] = memcpy(sp->nonce[j], next_nonce(), 24);
        subkeys(a, ns, 4, sp->k2);
        sp->serial = a->serial, sp->gen = g, sp->left = 4;
    }
    unsigned j = --sp->left;
    memcpy(nonce, sp->nonce[j], 24);
    memcpy(k2, sp->k2[j], 32);
    sodium_memzero(sp->k2[j], 32);
}

static int aead_encrypt(void *ctx, uint8_t *buf, size_t n, uint64_t s, uint8_t *meta, size_t stride)
{
    struct aead_layer *a = ctx;
    if (n > 0 && s + (n - 1) < s)
        return -EINVAL;
    size_t ss = a->sector_size;
    uint32_t writer = atomic_load_explicit(&a->writer, memory_order_relaxed);
    if (bulk_get() != 0)
        return -ENOMEM;
    uint8_t k2[4][32], n2[12];
    int rc = 0;
    for (size_t i0 = 0; i0 < n && rc == 0; i0 += 4) {
        size_t nb = n - i0 < 4 ? n - i0 : 4;
        uint8_t *slots[4];
        const uint8_t *nonces[4];
        int spare = nb < 4 && tls_bulk_kind == BULK_AVX512;   /* else four subkeys at once, below */
        for (size_t j = 0; j < nb; j++) {
            uint8_t *m = meta + (i0 + j) * stride;
            int nw = newer_slot(m);
            /* keep the newer slot (it authenticates the stored data, see resolve); an
             * empty slot goes first */
            int target = nw < 0 ? 0 : 1 - nw;
            uint32_t seq = nw < 0 ? 1 : rd32(m + (size_t)nw * SLOT_BYTES) + 1;
            if (seq == 0)
                seq = 1;
            uint8_t *slot = slots[j] = m + (size_t)target * SLOT_BYTES;
            le32(slot, seq);
            le32(slot + 4, writer);
            if (spare)
                take_spare(a, slot + NONCE_OFF, k2[j]);
            else
                memcpy(slot + NONCE_OFF, next_nonce(), 24);
            nonces[j] = slot + NONCE_OFF;
        }
        if (!spare)
            subkeys(a, nonces, nb, k2);
        for (size_t j = 0; j < nb && rc == 0; j++) {
            uint8_t ad[AD_BYTES];
            make_ad(a, s + i0 + j, slots[j], ad);
            nonce12(n2, nonces[j]);
            rc = bulk_seal(buf + (i0 + j) * ss, ss, ad, k2[j], n2, slots[j] + TAG_OFF);
        }
    }
    sodium_memzero(k2, sizeof k2);
    return rc;
}

/* the sector the last -EBADMSG of this thread's aead_decrypt was about */
static __thread uint64_t tls_failed_sector;

static uint64_t aead_failed_sector(void *ctx)
{
    (void)ctx;
    return tls_failed_sector;
}

static int aead_decrypt(void *ctx, uint8_t *buf, size_t n, uint64_t s, const uint8_t *meta, size_t stride)
{
    struct aead_layer *a = ctx;
    if (n > 0 && s + (n - 1) < s)
        return -EINVAL;
    size_t ss = a->sector_size;
    if (bulk_get() != 0)
        return -ENOMEM;
    int rc = 0;
    uint8_t first[4][32], k2[32], n2[12], ad[AD_BYTES];
    for (size_t i0 = 0; i0 < n && rc == 0; i0 += 4) {
        size_t nb = n - i0 < 4 ? n - i0 : 4, nk = 0;
        const uint8_t *nonces[4];
        int newer[4];
        /* the newer slots' subkeys, four at once (most reads need no other) */
        for (size_t j = 0; j < nb; j++) {
            newer[j] = newer_slot(meta + (i0 + j) * stride);
            if (newer[j] >= 0)
                nonces[nk++] = meta + (i0 + j) * stride + (size_t)newer[j] * SLOT_BYTES + NONCE_OFF;
        }
        subkeys(a, nonces, nk, first);
        nk = 0;
        for (size_t j = 0; j < nb; j++) {
            size_t i = i0 + j;
            const uint8_t *m = meta + i * stride;
            uint8_t *p = buf + i * ss;
            int nw = newer[j];
            int ok = 0;
            for (int t = 0; t < 2 && nw >= 0 && ok == 0; t++) {
                const uint8_t *slot = m + (size_t)(t == 0 ? nw : 1 - nw) * SLOT_BYTES;
                if (t == 1 && slot_empty(slot))
                    break;
                make_ad(a, s + i, slot, ad);
                if (t == 0)
                    memcpy(k2, first[nk++], 32);
                else
                    hchacha20(k2, slot + NONCE_OFF, a->key);
                nonce12(n2, slot + NONCE_OFF);
                /* in place; a failed tag leaves the ciphertext for the other slot's try */
                ok = bulk_open(p, ss, ad, k2, n2, slot + TAG_OFF);
            }
            if (ok < 0) {
                rc = ok;
                break;
            }
            if (!ok) {
                tls_failed_sector = s + i;
                rc = -EBADMSG;
                break;
            }
        }
    }
    sodium_memzero(k2, sizeof k2);
    sodium_memzero(first, sizeof first);
    return rc;
}

/* old == NULL: 1 if some sector's newer slot was not written by this instance (the
 * stored data is needed), else 0. old != NULL (the stored bytes of the n sectors):
 * empty in meta every slot that does not authenticate its stored data. */
static int aead_resolve(void *ctx, const uint8_t *old, size_t n, uint64_t s, uint8_t *meta, size_t stride)
{
    struct aead_layer *a = ctx;
    uint32_t writer = atomic_load_explicit(&a->writer, memory_order_relaxed);
    uint8_t k2[32], n2[12];
    for (size_t i = 0; i < n; i++) {
        uint8_t *m = meta + i * stride;
        int nw = newer_slot(m);
        if (nw < 0 || rd32(m + (size_t)nw * SLOT_BYTES + 4) == writer)
            continue;
        if (old == NULL)
            return 1;
        const uint8_t *c = old + i * (size_t)a->sector_size;
        uint8_t *newer = m + (size_t)nw * SLOT_BYTES, *other = m + (size_t)(1 - nw) * SLOT_BYTES;
        if (slot_verify(a, c, s + i, newer, k2, n2))
            continue;
        memset(newer, 0, SLOT_BYTES);   /* stale (a write cut short) or damaged */
        if (!slot_empty(other) && !slot_verify(a, c, s + i, other, k2, n2))
            memset(other, 0, SLOT_BYTES);
    }
    sodium_memzero(k2, sizeof k2);
    return 0;
}

static void aead_write_failed(void *ctx)
{
    struct aead_layer *a = ctx;
    atomic_store(&a->writer, new_writer());
}

static void aead_destroy(void *ctx)
{
    struct aead_layer *a = ctx;
    if (a == NULL)
        return;
    uint8_t h[16];
    key_hash(a->key, h);
    kept_put(a->disk_id, a->role, h, atomic_load(&a->writer));
    sodium_free(a->key);
    sodium_memzero(a, sizeof *a);
    free(a);
}

static const struct bc_layer_ops aead_ops = {
    .name = "xchacha20-poly1305",
    .meta_bytes = BC_AEAD_META_BYTES,
    .encrypt = aead_encrypt,
    .decrypt = aead_decrypt,
    .destroy = aead_destroy,
    .flags = BC_LAYER_ZERO_DATA_IS_HOLE,
    .resolve = aead_resolve,
    .write_failed = aead_write_failed,
    .failed_sector = aead_failed_sector,
};

int bc_layer_aead_new(const uint8_t *key, size_t key_len, uint32_t sector_size, const uint8_t disk_id[16],
                      uint8_t role, struct bc_layer *out)
{
    if (key == NULL || disk_id == NULL || out == NULL || key_len != crypto_aead_xchacha20poly1305_ietf_KEYBYTES ||
        (sector_size != 512 && sector_size != 4096))
        return -EINVAL;
    if (sodium_init() < 0)
        return -EIO;
    pthread_once(&fork_once, nonce_fork_hook);
    struct aead_layer *a = calloc(1, sizeof *a);
    if (a == NULL)
        return -ENOMEM;
    a->key = sodium_malloc(key_len);
    if (a->key == NULL) {
        free(a);
        return -ENOMEM;
    }
    memcpy(a->key, key, key_len);
    sodium_mprotect_readonly(a->key);
    a->sector_size = sector_size;
    memcpy(a->disk_id, disk_id, 16);
    a->role = role;
    uint8_t h[16];
    key_hash(a->key, h);
    uint32_t w = kept_take(disk_id, role, h);
    atomic_init(&a->writer, w != 0 ? w : new_writer());
    a->serial = atomic_fetch_add(&layer_serials, 1) + 1;
    out->ops = &aead_ops;
    out->ctx = a;
    return 0;
}
