/*
 * bc_layer_xts.c — AES-256-XTS sector layer, exactly dm-crypt aes-xts-plain64:
 * tweak = sector number as a little-endian 64-bit integer, upper 8 bytes zero.
 *
 * The key is set once per EVP context; per sector only the tweak changes. Like
 * native/blockcrypt_xts.c, the tweak is written straight into the provider's IV
 * buffer (EVP_CIPHER_CTX_iv_noconst) when a self-test at context creation proves that
 * equivalent to EVP_CipherInit_ex with the IV (which costs about 8 % of a 4096-byte
 * sector); otherwise the documented re-init is used.
 *
 * Many threads at once: an EVP context is stateful, so the layer keeps a pool of
 * (encrypt, decrypt) context pairs. A call pops an idle pair (a mutex, a pointer
 * swap) and pushes it back; a new pair is made only when every pair is busy, so after
 * warm-up the pool has as many pairs as the highest concurrency and nothing is
 * allocated per request.
 *
 * Key bytes: the 64-byte key lives in one mmap'ed page, mlock'ed (best effort: a
 * RLIMIT_MEMLOCK refusal is not fatal) and excluded from core dumps; destroy wipes it
 * with OPENSSL_cleanse and frees every context (EVP_CIPHER_CTX_free cleanses the
 * expanded key schedules). Keys with equal halves are refused (-EINVAL), as OpenSSL
 * (FIPS) and dm-crypt do.
 *
 * Ephemeral keys (bc_layer_xts_new_ephemeral, the temp disks of a mount with encryption
 * at host): the key is drawn by OpenSSL's private DRBG straight into the locked page, so
 * it never exists anywhere else: no caller buffer, no Python object, no file. When the
 * layer is destroyed (volume closed, process gone) the data it wrote is unreadable.
 *
 * The layer has no notion of holes; the engine skips all-zero stored sectors. A
 * sector range running past sector 2^64-1 is refused (-EINVAL) rather than wrapped.
 */
#define _GNU_SOURCE
/* EVP_CIPHER_CTX_iv_noconst is deprecated in OpenSSL 3.0 but still exported; see pair_open */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "bc_engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#define XTS_KEY_BYTES 64
#define XTS_TWEAK_BYTES 16
#define XTS_POOL_INITIAL 2

struct xts_dir {
    EVP_CIPHER_CTX *evp;
    unsigned char *iv_slot;   /* the provider's IV buffer, when proven equivalent */
    int encrypt;
};

struct xts_pair {
    struct xts_dir enc, dec;
    struct xts_pair *next_idle;
    struct xts_pair *next_all;
};

struct xts_layer {
    uint32_t sector_size;
    pthread_mutex_t mu;
    struct xts_pair *idle;
    struct xts_pair *all;
    unsigned char *key;       /* XTS_KEY_BYTES in a locked page */
    size_t key_page;
    int locked;
};

static void plain64_iv(unsigned char iv[XTS_TWEAK_BYTES], uint64_t sector_no)
{
    for (int b = 0; b < 8; b++)
        iv[b] = (unsigned char)(sector_no >> (8 * b));
    memset(iv + 8, 0, 8);
}

static int xts_unit(const struct xts_dir *d, const unsigned char iv[XTS_TWEAK_BYTES], const unsigned char *src,
                    unsigned char *dst, int len)
{
    int outl = 0;
    if (d->iv_slot != NULL)
        memcpy(d->iv_slot, iv, XTS_TWEAK_BYTES);
    else if (EVP_CipherInit_ex(d->evp, NULL, NULL, NULL, iv, d->encrypt) != 1)
        return -EIO;
    if (EVP_CipherUpdate(d->evp, dst, &outl, src, len) != 1 || outl != len)
        return -EIO;
    return 0;
}

/* Writing tweak B into the slot must give what the documented path gives for B, and
 * differ from tweak A's output, so the slot is proven to be the IV the cipher reads. */
static int direct_iv_selftest(struct xts_dir *d, unsigned char *slot)
{
    unsigned char in[64], out_a[64], want_b[64], got_b[64];
    unsigned char iv_a[XTS_TWEAK_BYTES], iv_b[XTS_TWEAK_BYTES];
    for (size_t i = 0; i < sizeof in; i++)
        in[i] = (unsigned char)(i * 37 + 11);
    for (int b = 0; b < XTS_TWEAK_BYTES; b++) {
        iv_a[b] = (unsigned char)(b * 3 + 1);
        iv_b[b] = (unsigned char)(0xF0 - b);
    }
    struct xts_dir slow = {d->evp, NULL, d->encrypt}, fast = {d->evp, slot, d->encrypt};
    int ok = xts_unit(&slow, iv_a, in, out_a, (int)sizeof in) == 0 && memcmp(slot, iv_a, XTS_TWEAK_BYTES) == 0 &&
             xts_unit(&fast, iv_b, in, got_b, (int)sizeof in) == 0 &&
             xts_unit(&slow, iv_b, in, want_b, (int)sizeof in) == 0 && memcmp(got_b, want_b, sizeof got_b) == 0 &&
             memcmp(out_a, want_b, sizeof out_a) != 0;
    OPENSSL_cleanse(out_a, sizeof out_a);
    OPENSSL_cleanse(got_b, sizeof got_b);
    OPENSSL_cleanse(want_b, sizeof want_b);
    return ok;
}

static void dir_close(struct xts_dir *d)
{
    EVP_CIPHER_CTX_free(d->evp);   /* cleanses the key schedule */
    d->evp = NULL;
    d->iv_slot = NULL;
}

static int dir_open(struct xts_dir *d, const unsigned char *key, int encrypt)
{
    static const unsigned char zero_iv[XTS_TWEAK_BYTES];
    d->encrypt = encrypt;
    d->iv_slot = NULL;
    d->evp = EVP_CIPHER_CTX_new();
    if (d->evp == NULL)
        return -ENOMEM;
    if (EVP_CipherInit_ex(d->evp, EVP_aes_256_xts(), NULL, key, zero_iv, encrypt) != 1) {
        dir_close(d);
        return -EINVAL;
    }
#ifndef OPENSSL_NO_DEPRECATED_3_0
    unsigned char *slot = EVP_CIPHER_CTX_iv_noconst(d->evp);
    if (slot != NULL && direct_iv_selftest(d, slot))
        d->iv_slot = slot;
#endif
    return 0;
}

static void pair_free(struct xts_pair *p)
{
    dir_close(&p->enc);
    dir_close(&p->dec);
    free(p);
}

/* A new pair on the layer's key, linked into the list of all pairs (not the idle one). */
static struct xts_pair *pair_new(struct xts_layer *x, int *err)
{
    struct xts_pair *p = calloc(1, sizeof *p);
    if (p == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    int rc = dir_open(&p->enc, x->key, 1);
    if (rc == 0)
        rc = dir_open(&p->dec, x->key, 0);
    if (rc != 0) {
        pair_free(p);
        *err = rc;
        return NULL;
    }
    pthread_mutex_lock(&x->mu);
    p->next_all = x->all;
    x->all = p;
    pthread_mutex_unlock(&x->mu);
    return p;
}

static struct xts_pair *pair_take(struct xts_layer *x, int *err)
{
    pthread_mutex_lock(&x->mu);
    struct xts_pair *p = x->idle;
    if (p != NULL)
        x->idle = p->next_idle;
    pthread_mutex_unlock(&x->mu);
    if (p == NULL)
        p = pair_new(x, err);   /* warm-up only: every pair is busy */
    return p;
}

static void pair_give(struct xts_layer *x, struct xts_pair *p)
{
    pthread_mutex_lock(&x->mu);
    p->next_idle = x->idle;
    x->idle = p;
    pthread_mutex_unlock(&x->mu);
}

static int xts_run(struct xts_layer *x, int encrypt, uint8_t *dst, const uint8_t *src, size_t nsectors,
                   uint64_t sector_no)
{
    if (nsectors == 0)
        return 0;
    if (sector_no > UINT64_MAX - (nsectors - 1))
        return -EINVAL;
    int err = -ENOMEM;
    struct xts_pair *p = pair_take(x, &err);
    if (p == NULL)
        return err;
    const struct xts_dir *d = encrypt ? &p->enc : &p->dec;
    unsigned char iv[XTS_TWEAK_BYTES];
    int rc = 0;
    size_t ss = x->sector_size;
    for (size_t i = 0; i < nsectors && rc == 0; i++) {
        plain64_iv(iv, sector_no + i);
        rc = xts_unit(d, iv, src + i * ss, dst + i * ss, (int)ss);
    }
    pair_give(x, p);
    return rc;
}

static int xts_encrypt(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no, uint8_t *meta,
                       size_t meta_stride)
{
    (void)meta;
    (void)meta_stride;
    return xts_run(ctx, 1, buf, buf, nsectors, sector_no);
}

static int xts_encrypt_from(void *ctx, uint8_t *dst, const uint8_t *src, size_t nsectors, uint64_t sector_no,
                            uint8_t *meta, size_t meta_stride)
{
    (void)meta;
    (void)meta_stride;
    return xts_run(ctx, 1, dst, src, nsectors, sector_no);
}

static int xts_decrypt(void *ctx, uint8_t *buf, size_t nsectors, uint64_t sector_no, const uint8_t *meta,
                       size_t meta_stride)
{
    (void)meta;
    (void)meta_stride;
    return xts_run(ctx, 0, buf, buf, nsectors, sector_no);
}

static void xts_destroy(void *ctx)
{
    struct xts_layer *x = ctx;
    if (x == NULL)
        return;
    struct xts_pair *p = x->all;
    while (p != NULL) {
        struct xts_pair *next = p->next_all;
        pair_free(p);
        p = next;
    }
    x->all = x->idle = NULL;
    if (x->key != NULL) {
        OPENSSL_cleanse(x->key, x->key_page);
        if (x->locked)
            munlock(x->key, x->key_page);
        munmap(x->key, x->key_page);
        x->key = NULL;
    }
    pthread_mutex_destroy(&x->mu);
    OPENSSL_cleanse(x, sizeof *x);
    free(x);
}

static const struct bc_layer_ops xts_ops = {
    .name = "aes-xts-plain64",
    .meta_bytes = 0,
    .encrypt = xts_encrypt,
    .decrypt = xts_decrypt,
    .destroy = xts_destroy,
    .encrypt_from = xts_encrypt_from,
};

/* key == NULL: a fresh random key, drawn straight into the locked page (RAND_priv_bytes). */
static int xts_new(const uint8_t *key, uint32_t sector_size, struct bc_layer *out)
{
    struct xts_layer *x = calloc(1, sizeof *x);
    if (x == NULL)
        return -ENOMEM;
    x->sector_size = sector_size;
    pthread_mutex_init(&x->mu, NULL);
    long page = sysconf(_SC_PAGESIZE);
    x->key_page = page > 0 ? (size_t)page : 4096;
    void *mem = mmap(NULL, x->key_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        pthread_mutex_destroy(&x->mu);
        free(x);
        return -ENOMEM;
    }
    x->key = mem;
    x->locked = mlock(mem, x->key_page) == 0;
    madvise(mem, x->key_page, MADV_DONTDUMP);
    int rc = 0;
    if (key != NULL) {
        memcpy(x->key, key, XTS_KEY_BYTES);
    } else {
        do {   /* equal halves have probability 2^-256; refuse them all the same */
            if (RAND_priv_bytes(x->key, XTS_KEY_BYTES) != 1)
                rc = -EIO;
        } while (rc == 0 && CRYPTO_memcmp(x->key, x->key + 32, 32) == 0);
    }
    for (int i = 0; i < XTS_POOL_INITIAL && rc == 0; i++) {
        struct xts_pair *p = pair_new(x, &rc);
        if (p != NULL)
            pair_give(x, p);
    }
    if (rc != 0) {
        xts_destroy(x);
        return rc;
    }
    out->ops = &xts_ops;
    out->ctx = x;
    return 0;
}

int bc_layer_xts_new(const uint8_t *key, size_t key_len, uint32_t sector_size, struct bc_layer *out)
{
    if (key == NULL || out == NULL || key_len != XTS_KEY_BYTES || (sector_size != 512 && sector_size != 4096))
        return -EINVAL;
    if (CRYPTO_memcmp(key, key + 32, 32) == 0)
        return -EINVAL;   /* equal halves: XTS degenerates; OpenSSL and dm-crypt refuse it too */
    return xts_new(key, sector_size, out);
}

int bc_layer_xts_new_ephemeral(uint32_t sector_size, struct bc_layer *out)
{
    if (out == NULL || (sector_size != 512 && sector_size != 4096))
        return -EINVAL;
    return xts_new(NULL, sector_size, out);
}
