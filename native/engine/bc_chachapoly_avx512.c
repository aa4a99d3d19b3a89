/* bc_chachapoly_avx512.c — RFC 8439 ChaCha20-Poly1305 of one sector, with AVX-512.
 *
 * What the AEAD layer (bc_layer_aead.c) seals and opens per sector: one message of 512
 * or 4096 bytes (any multiple of 256 up to BC_CP_MAX), associated data of up to 64
 * bytes, a fresh key and nonce each time (the HChaCha20 subkey of XChaCha20). Library
 * code pays a fixed cost per message on top of its bulk rate: OpenSSL 3's EVP runs at
 * 0.75x of its own streaming figure at 4 KiB, libgcrypt 1.10 has no AVX-512 code at all
 * (docs/CRYPTO.md). This file does the message in three flat passes:
 *
 *  1. ChaCha20 keystream, blocks 0..len/64: each whole KiB sixteen blocks at once, one
 *     block per 32-bit lane (chacha16); the rest four blocks per zmm register (one
 *     128-bit lane per block: the rows of the state, as in the SSE2 HChaCha20 of
 *     bc_layer_aead.c), up to six such groups interleaved so the rounds of one hide
 *     the latency of another; vprold for the rotations. Block 0 (its first 32 bytes
 *     are the Poly1305 key, RFC 8439 2.6) runs as a four-block group of its own,
 *     inside the first sixteen-block batch;
 *  2. Poly1305 over pad16(ad) || ciphertext || lengths: the associated data and the
 *     lengths block with 64-bit scalar code (radix 2^44, three limbs), the ciphertext
 *     with AVX-512 IFMA (vpmadd52: 52-bit multiply-accumulate, the low and high halves
 *     of each product summed apart, the high ones shifted into place), eight 16-byte
 *     blocks per zmm register, one per 64-bit lane, in two independent sets of lanes
 *     (the first and second 128 bytes of every 256). Each lane steps by r^16 and takes
 *     its own power of r (r^16 .. r^1) at the last step, so the lanes' sum is Horner's
 *     polynomial;
 *  3. to seal, pass 1 XORs the stream straight into the data, before pass 2; to open,
 *     the first sixteen blocks' stream (or a short message's whole stream) goes to a
 *     stack buffer, pass 2 checks the tag, and only then is the stream XORed into the
 *     data, so an open whose tag fails leaves the data as it was.
 *
 * Compiled for AVX-512 F/VL/IFMA by the pragma below (on x86-64; elsewhere three stubs
 * that refuse): call nothing here unless bc_cp_avx512_usable() (bc_layer_aead.c checks
 * the CPU once). Checked against libsodium's crypto_aead_chacha20poly1305_ietf and
 * XChaCha20 APIs, every sector, by native/engine/tests/test_aead.c. Key material
 * (subkeys, Poly1305 key and powers, keystream not yet applied) is wiped before return. */
#define _GNU_SOURCE
#include "bc_chachapoly.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512ifma")

#include <immintrin.h>
#include <string.h>

#define M44 ((uint64_t)0xfffffffffff)
#define M42 ((uint64_t)0x3ffffffffff)

/* ---- 1. ChaCha20 keystream --------------------------------------------------------- */

#define QR(a, b, c, d)                                                                                   \
    do {                                                                                                 \
        a = _mm512_add_epi32(a, b), d = _mm512_xor_si512(d, a), d = _mm512_rol_epi32(d, 16);             \
        c = _mm512_add_epi32(c, d), b = _mm512_xor_si512(b, c), b = _mm512_rol_epi32(b, 12);             \
        a = _mm512_add_epi32(a, b), d = _mm512_xor_si512(d, a), d = _mm512_rol_epi32(d, 8);              \
        c = _mm512_add_epi32(c, d), b = _mm512_xor_si512(b, c), b = _mm512_rol_epi32(b, 7);              \
    } while (0)

/* a quarter round on the four rows, then the rows rotated by pb / pc / pd words: into
 * the diagonals after the column round, back after the diagonal one */
#define HALF(a, b, c, d, pb, pc, pd)                                                                     \
    do {                                                                                                 \
        QR(a, b, c, d);                                                                                  \
        b = _mm512_shuffle_epi32(b, (_MM_PERM_ENUM)(pb));                                                \
        c = _mm512_shuffle_epi32(c, (_MM_PERM_ENUM)(pc));                                                \
        d = _mm512_shuffle_epi32(d, (_MM_PERM_ENUM)(pd));                                                \
    } while (0)
#define TO_DIAG _MM_SHUFFLE(0, 3, 2, 1), _MM_SHUFFLE(1, 0, 3, 2), _MM_SHUFFLE(2, 1, 0, 3)
#define TO_COLS _MM_SHUFFLE(2, 1, 0, 3), _MM_SHUFFLE(1, 0, 3, 2), _MM_SHUFFLE(0, 3, 2, 1)
#define HALF_(...) HALF(__VA_ARGS__)

/* One group: four blocks from counter ctr; their 256 bytes XORed onto dst (xor) or
 * stored there. Groups need not be contiguous: a seal runs the data's groups (counters
 * 1, 5, 9, ...) XORing straight into the data, and block 0's group (the Poly1305 key)
 * beside the last of them, so no group has to check block by block where it goes. */
struct group {
    uint32_t ctr;
    int xor;
    uint8_t *dst;
};

/* groups interleaved at most: six (24 registers of state) ran a 4 KiB sector's stream
 * in 0.56 us here, four in 0.70, seven or eight (spills) in 0.59-0.64 */
#define GMAX 6

/* the first row of four blocks: "expand 32-byte k" */
static inline __m512i sigma4(void)
{
    return _mm512_broadcast_i32x4(_mm_setr_epi32(0x61707865, 0x3320646e, 0x79622d32, 0x6b206574));
}

/* the last row of blocks ctr .. ctr + 3: counter, nonce */
static inline __m512i row_d(__m512i nonce_d, uint32_t ctr)
{
    int c = (int)ctr;
    return _mm512_add_epi32(nonce_d, _mm512_set_epi32(0, 0, 0, c + 3, 0, 0, 0, c + 2, 0, 0, 0, c + 1, 0, 0, 0, c));
}

/* A group's rounds done: add the input state, put the four blocks in order (lane i of
 * the rows is block i: transpose the 128-bit lanes) and XOR or store them at g->dst. */
static inline __attribute__((always_inline)) void group_out(const struct group *g, __m512i a, __m512i b,
                                                            __m512i c, __m512i d, __m512i key_lo, __m512i key_hi,
                                                            __m512i nonce_d)
{
    __m512i x = _mm512_add_epi32(a, sigma4()), y = _mm512_add_epi32(b, key_lo);
    __m512i z = _mm512_add_epi32(c, key_hi), w = _mm512_add_epi32(d, row_d(nonce_d, g->ctr));
    __m512i t0 = _mm512_shuffle_i64x2(x, y, _MM_SHUFFLE(1, 0, 1, 0));   /* x0 x1 y0 y1 */
    __m512i t1 = _mm512_shuffle_i64x2(x, y, _MM_SHUFFLE(3, 2, 3, 2));   /* x2 x3 y2 y3 */
    __m512i t2 = _mm512_shuffle_i64x2(z, w, _MM_SHUFFLE(1, 0, 1, 0));
    __m512i t3 = _mm512_shuffle_i64x2(z, w, _MM_SHUFFLE(3, 2, 3, 2));
    __m512i blk[4] = {_mm512_shuffle_i64x2(t0, t2, _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_i64x2(t0, t2, _MM_SHUFFLE(3, 1, 3, 1)),
                      _mm512_shuffle_i64x2(t1, t3, _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_i64x2(t1, t3, _MM_SHUFFLE(3, 1, 3, 1))};
    uint8_t *o = g->dst;
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        _mm512_storeu_si512(o + 64 * i, g->xor ? _mm512_xor_si512(_mm512_loadu_si512(o + 64 * i), blk[i]) : blk[i]);
}

static inline __attribute__((always_inline)) void chacha_groups(const struct group *gs, const int ng,
                                                                __m512i key_lo, __m512i key_hi, __m512i nonce_d)
{
    const __m512i sigma = sigma4();
    __m512i a[GMAX], b[GMAX], c[GMAX], d[GMAX];
#pragma GCC unroll 8
    for (int g = 0; g < ng; g++) {
        a[g] = sigma, b[g] = key_lo, c[g] = key_hi;
        d[g] = row_d(nonce_d, gs[g].ctr);
    }
    for (int i = 0; i < 10; i++) {
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++)
            HALF_(a[g], b[g], c[g], d[g], TO_DIAG);   /* columns */
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++)
            HALF_(a[g], b[g], c[g], d[g], TO_COLS);   /* diagonals */
    }
#pragma GCC unroll 8
    for (int g = 0; g < ng; g++)
        group_out(&gs[g], a[g], b[g], c[g], d[g], key_lo, key_hi, nonce_d);
}

/* The n groups of gs under key / nonce (IETF: 32-bit counter), up to GMAX at once. */
static void run_groups(const struct group *gs, size_t n, const uint8_t key[32], const uint8_t nonce[12])
{
    __m512i key_lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)key));
    __m512i key_hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(key + 16)));
    uint32_t w[3];
    memcpy(w, nonce, 12);
    __m512i nonce_d = _mm512_broadcast_i32x4(_mm_setr_epi32(0, (int)w[0], (int)w[1], (int)w[2]));
    for (size_t g = 0; g < n;) {
        size_t left = n - g;
        /* six at a time, and two even batches rather than a short last one: a batch of
         * one or two groups runs mostly one dependent chain */
        int ng = left <= GMAX ? (int)left : left < 2 * GMAX ? (int)(left + 1) / 2 : GMAX;
        switch (ng) {
        case 6: chacha_groups(gs + g, 6, key_lo, key_hi, nonce_d); break;
        case 5: chacha_groups(gs + g, 5, key_lo, key_hi, nonce_d); break;
        case 4: chacha_groups(gs + g, 4, key_lo, key_hi, nonce_d); break;
        case 3: chacha_groups(gs + g, 3, key_lo, key_hi, nonce_d); break;
        case 2: chacha_groups(gs + g, 2, key_lo, key_hi, nonce_d); break;
        default: chacha_groups(gs + g, 1, key_lo, key_hi, nonce_d); break;
        }
        g += (size_t)ng;
    }
}

#define MAX_GROUPS (BC_CP_MAX / 256 + 1)

/* Sixteen blocks at once, one block per 32-bit lane: x[j] holds word j of blocks ctr ..
 * ctr + 15, so the rounds need no shuffles (the four-block groups above spend a fifth of
 * their instructions rotating rows into diagonals and back, and on a CPU that runs a
 * zmm shuffle as two 256-bit halves on fewer ports, Zen 4, that cost 1.1 us per 4 KiB
 * sector against OpenSSL's 0.83). The 1024 bytes go to dst (XORed onto it or stored),
 * after a transpose of the 16 x 16 words. One four-block group (extra, if not NULL)
 * runs inside the same rounds, so its dependent chain hides behind the batch's. */
#define ROT(v, n) _mm512_rol_epi32(v, n)
#define QR16(a, b, c, d)                                                                                 \
    do {                                                                                                 \
        x[a] = _mm512_add_epi32(x[a], x[b]), x[d] = ROT(_mm512_xor_si512(x[d], x[a]), 16);               \
        x[c] = _mm512_add_epi32(x[c], x[d]), x[b] = ROT(_mm512_xor_si512(x[b], x[c]), 12);               \
        x[a] = _mm512_add_epi32(x[a], x[b]), x[d] = ROT(_mm512_xor_si512(x[d], x[a]), 8);                \
        x[c] = _mm512_add_epi32(x[c], x[d]), x[b] = ROT(_mm512_xor_si512(x[b], x[c]), 7);                \
    } while (0)

static inline __attribute__((always_inline)) void chacha16(uint32_t ctr, int xor, uint8_t *dst,
                                                           const struct group *extra, const uint32_t kw[8],
                                                           const uint32_t nw[3], __m512i key_lo, __m512i key_hi,
                                                           __m512i nonce_d)
{
    static const uint32_t sig[4] = {0x61707865, 0x3320646e, 0x79622d32, 0x6b206574};
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i x[16];
#pragma GCC unroll 16
    for (int j = 0; j < 4; j++)
        x[j] = _mm512_set1_epi32((int)sig[j]);
#pragma GCC unroll 16
    for (int j = 0; j < 8; j++)
        x[4 + j] = _mm512_set1_epi32((int)kw[j]);
    x[12] = _mm512_add_epi32(_mm512_set1_epi32((int)ctr), lane);
#pragma GCC unroll 16
    for (int j = 0; j < 3; j++)
        x[13 + j] = _mm512_set1_epi32((int)nw[j]);
    const __m512i sigma = sigma4();
    __m512i ea = sigma, eb = key_lo, ec = key_hi, ed = row_d(nonce_d, extra ? extra->ctr : 0);
    for (int i = 0; i < 10; i++) {
        QR16(0, 4, 8, 12);
        QR16(1, 5, 9, 13);
        QR16(2, 6, 10, 14);
        QR16(3, 7, 11, 15);
        if (extra)
            HALF_(ea, eb, ec, ed, TO_DIAG);
        QR16(0, 5, 10, 15);
        QR16(1, 6, 11, 12);
        QR16(2, 7, 8, 13);
        QR16(3, 4, 9, 14);
        if (extra)
            HALF_(ea, eb, ec, ed, TO_COLS);
    }
#pragma GCC unroll 16
    for (int j = 0; j < 4; j++)
        x[j] = _mm512_add_epi32(x[j], _mm512_set1_epi32((int)sig[j]));
#pragma GCC unroll 16
    for (int j = 0; j < 8; j++)
        x[4 + j] = _mm512_add_epi32(x[4 + j], _mm512_set1_epi32((int)kw[j]));
    x[12] = _mm512_add_epi32(x[12], _mm512_add_epi32(_mm512_set1_epi32((int)ctr), lane));
#pragma GCC unroll 16
    for (int j = 0; j < 3; j++)
        x[13 + j] = _mm512_add_epi32(x[13 + j], _mm512_set1_epi32((int)nw[j]));
    /* words 4g .. 4g + 3 of block 4L + k into 128-bit lane L of u[g][k] (a 4 x 4 transpose
     * inside each lane), then the lanes of u[0..3][k] transposed: block 4L + k whole */
    __m512i u[4][4];
#pragma GCC unroll 16
    for (int g = 0; g < 4; g++) {
        __m512i t0 = _mm512_unpacklo_epi32(x[4 * g], x[4 * g + 1]), t1 = _mm512_unpackhi_epi32(x[4 * g], x[4 * g + 1]);
        __m512i t2 = _mm512_unpacklo_epi32(x[4 * g + 2], x[4 * g + 3]);
        __m512i t3 = _mm512_unpackhi_epi32(x[4 * g + 2], x[4 * g + 3]);
        u[g][0] = _mm512_unpacklo_epi64(t0, t2), u[g][1] = _mm512_unpackhi_epi64(t0, t2);
        u[g][2] = _mm512_unpacklo_epi64(t1, t3), u[g][3] = _mm512_unpackhi_epi64(t1, t3);
    }
#pragma GCC unroll 16
    for (int k = 0; k < 4; k++) {
        __m512i p0 = _mm512_shuffle_i64x2(u[0][k], u[1][k], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i p1 = _mm512_shuffle_i64x2(u[0][k], u[1][k], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i p2 = _mm512_shuffle_i64x2(u[2][k], u[3][k], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i p3 = _mm512_shuffle_i64x2(u[2][k], u[3][k], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i blk[4] = {_mm512_shuffle_i64x2(p0, p2, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i64x2(p0, p2, _MM_SHUFFLE(3, 1, 3, 1)),
                          _mm512_shuffle_i64x2(p1, p3, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i64x2(p1, p3, _MM_SHUFFLE(3, 1, 3, 1))};
#pragma GCC unroll 16
        for (int l = 0; l < 4; l++) {
            uint8_t *o = dst + 64 * (4 * l + k);
            _mm512_storeu_si512(o, xor ? _mm512_xor_si512(_mm512_loadu_si512(o), blk[l]) : blk[l]);
        }
    }
    if (extra)
        group_out(extra, ea, eb, ec, ed, key_lo, key_hi, nonce_d);
}

/* The stream of len16 bytes (a multiple of 1024) from block ctr onto dst in batches of
 * sixteen blocks, the first batch with extra beside it; then the groups of rest (n). */
static void run_stream(uint32_t ctr, int xor, uint8_t *dst, size_t len16, const struct group *extra,
                       const struct group *rest, size_t n, const uint8_t key[32], const uint8_t nonce[12])
{
    uint32_t kw[8], nw[3];
    memcpy(kw, key, 32);
    memcpy(nw, nonce, 12);
    __m512i key_lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)key));
    __m512i key_hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(key + 16)));
    __m512i nonce_d = _mm512_broadcast_i32x4(_mm_setr_epi32(0, (int)nw[0], (int)nw[1], (int)nw[2]));
    /* two copies of the batch: with the extra group's rounds and without, so the other
     * batches carry neither its registers nor its test (0.57 -> 0.55 us a 4 KiB stream,
     * Zen 5) */
    size_t off = 0;
    if (extra != NULL && len16 > 0) {
        chacha16(ctr, xor, dst, extra, kw, nw, key_lo, key_hi, nonce_d);
        off = 1024;
    }
    for (; off < len16; off += 1024)
        chacha16(ctr + (uint32_t)(off / 64), xor, dst + off, NULL, kw, nw, key_lo, key_hi, nonce_d);
    if (n > 0)
        run_groups(rest, n, key, nonce);
    explicit_bzero(kw, sizeof kw);
}

/* The stream XORed onto len bytes at p (blocks 1 ..) from byte `from` on (0, or 1024 when
 * an open has taken the first batch's stream already); block 0's group (256 bytes) to
 * block0 if not NULL. Whole 1024-byte runs go sixteen blocks at a time (block 0's group
 * inside the first), the rest (a 512-byte sector, say) four at a time. */
static void stream_xor(uint8_t *p, size_t len, size_t from, uint8_t *block0, const uint8_t key[32],
                       const uint8_t nonce[12])
{
    struct group gs[MAX_GROUPS];
    size_t n = 0, len16 = len / 1024 * 1024;
    for (size_t off = len16; off < len; off += 256)
        gs[n++] = (struct group){.ctr = (uint32_t)(1 + off / 64), .xor = 1, .dst = p + off};
    struct group b0 = {.ctr = 0, .xor = 0, .dst = block0};
    if (block0 != NULL && len16 == from)
        gs[n++] = b0;
    run_stream((uint32_t)(1 + from / 64), 1, p + from, len16 - from, block0 != NULL && len16 > from ? &b0 : NULL,
               gs, n, key, nonce);
}

/* open: blocks 0 .. len/64 (and up to three more) of the stream into ks */
static void keystream(uint8_t *ks, size_t len, const uint8_t key[32], const uint8_t nonce[12])
{
    struct group gs[MAX_GROUPS];
    size_t n = 0, len16 = len / 1024 * 1024;
    for (size_t off = len16; off < len + 64; off += 256)
        gs[n++] = (struct group){.ctr = (uint32_t)(off / 64), .xor = 0, .dst = ks + off};
    /* the first leftover group (block len16/64 ..) rides in the first batch */
    if (len16 != 0)
        run_stream(0, 0, ks, len16, &gs[0], gs + 1, n - 1, key, nonce);
    else
        run_groups(gs, n, key, nonce);
}

/* HChaCha20 (the XChaCha20 subkey) of up to four 16-byte inputs under one key, one per
 * 128-bit lane: one chain of rounds for all of them. */
void bc_cp_avx512_hchacha20(uint8_t (*out)[32], const uint8_t *const *in, size_t n, const uint8_t key[32])
{
    uint8_t d[4][16] = {{0}};
    for (size_t i = 0; i < n && i < 4; i++)
        memcpy(d[i], in[i], 16);
    __m512i a = sigma4();
    __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)key));
    __m512i c = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(key + 16)));
    __m512i w = _mm512_loadu_si512(d);
    for (int i = 0; i < 10; i++) {
        HALF_(a, b, c, w, TO_DIAG);
        HALF_(a, b, c, w, TO_COLS);
    }
    uint8_t ra[64], rw[64];
    _mm512_storeu_si512(ra, a);
    _mm512_storeu_si512(rw, w);
    for (size_t i = 0; i < n && i < 4; i++) {
        memcpy(out[i], ra + 16 * i, 16);
        memcpy(out[i] + 16, rw + 16 * i, 16);
    }
    explicit_bzero(ra, sizeof ra);
    explicit_bzero(rw, sizeof rw);
}

/* ---- 2. Poly1305 ------------------------------------------------------------------- */

typedef unsigned __int128 u128;

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* h = h * r mod 2^130 - 5 (h loosely reduced in, carried out: h0, h1 < 2^44 + 1, h2 < 2^42) */
static void mul_r(uint64_t h[3], const uint64_t r[3])
{
    uint64_t s1 = r[1] * 20, s2 = r[2] * 20;
    u128 d0 = (u128)h[0] * r[0] + (u128)h[1] * s2 + (u128)h[2] * s1;
    u128 d1 = (u128)h[0] * r[1] + (u128)h[1] * r[0] + (u128)h[2] * s2;
    u128 d2 = (u128)h[0] * r[2] + (u128)h[1] * r[1] + (u128)h[2] * r[0];
    uint64_t c = (uint64_t)(d0 >> 44);
    h[0] = (uint64_t)d0 & M44;
    d1 += c;
    c = (uint64_t)(d1 >> 44);
    h[1] = (uint64_t)d1 & M44;
    d2 += c;
    c = (uint64_t)(d2 >> 42);
    h[2] = (uint64_t)d2 & M42;
    h[0] += c * 5;
    c = h[0] >> 44;
    h[0] &= M44;
    h[1] += c;
}

/* h += one full 16-byte block (with its 2^128 bit) */
static void add_block(uint64_t h[3], const uint8_t *m)
{
    uint64_t t0 = rd64(m), t1 = rd64(m + 8);
    h[0] += t0 & M44;
    h[1] += ((t0 >> 44) | (t1 << 20)) & M44;
    h[2] += ((t1 >> 24) & M42) | ((uint64_t)1 << 40);
}

static void carry(uint64_t h[3])
{
    uint64_t c = h[0] >> 44;
    h[0] &= M44, h[1] += c, c = h[1] >> 44;
    h[1] &= M44, h[2] += c, c = h[2] >> 42;
    h[2] &= M42, h[0] += c * 5, c = h[0] >> 44;
    h[0] &= M44, h[1] += c;
}

/* the 8-way IFMA step: h = (h + m) * R, lane by lane (R: r0, r1, r2 and 20 r1, 20 r2) */
struct vr {
    __m512i r0, r1, r2, s1, s2;
};

/* h = a * R lane by lane (a's limbs below 2^47; h carried as vstep leaves it) */
static inline __attribute__((always_inline)) void vmul(__m512i *h0, __m512i *h1, __m512i *h2, __m512i a0,
                                                       __m512i a1, __m512i a2, const struct vr *R)
{
    const __m512i m44 = _mm512_set1_epi64((long long)M44), m42 = _mm512_set1_epi64((long long)M42);
    const __m512i z = _mm512_setzero_si512();
    /* products at weight 2^0 (t0), 2^44 (t1), 2^88 (t2); 2^132 = 20 mod p */
    __m512i t0l = _mm512_madd52lo_epu64(z, a0, R->r0), t0h = _mm512_madd52hi_epu64(z, a0, R->r0);
    __m512i t1l = _mm512_madd52lo_epu64(z, a0, R->r1), t1h = _mm512_madd52hi_epu64(z, a0, R->r1);
    __m512i t2l = _mm512_madd52lo_epu64(z, a0, R->r2), t2h = _mm512_madd52hi_epu64(z, a0, R->r2);
    t0l = _mm512_madd52lo_epu64(t0l, a1, R->s2), t0h = _mm512_madd52hi_epu64(t0h, a1, R->s2);
    t1l = _mm512_madd52lo_epu64(t1l, a1, R->r0), t1h = _mm512_madd52hi_epu64(t1h, a1, R->r0);
    t2l = _mm512_madd52lo_epu64(t2l, a1, R->r1), t2h = _mm512_madd52hi_epu64(t2h, a1, R->r1);
    t0l = _mm512_madd52lo_epu64(t0l, a2, R->s1), t0h = _mm512_madd52hi_epu64(t0h, a2, R->s1);
    t1l = _mm512_madd52lo_epu64(t1l, a2, R->s2), t1h = _mm512_madd52hi_epu64(t1h, a2, R->s2);
    t2l = _mm512_madd52lo_epu64(t2l, a2, R->r0), t2h = _mm512_madd52hi_epu64(t2h, a2, R->r0);
    /* the high halves sit 52 bits up: t0h at 2^52 = 2^44 * 2^8, t1h at 2^88 * 2^8, t2h at
     * 2^140 = 5 * 2^10 mod p */
    __m512i d0 = _mm512_add_epi64(t0l, _mm512_add_epi64(_mm512_slli_epi64(t2h, 12), _mm512_slli_epi64(t2h, 10)));
    __m512i d1 = _mm512_add_epi64(t1l, _mm512_slli_epi64(t0h, 8));
    __m512i d2 = _mm512_add_epi64(t2l, _mm512_slli_epi64(t1h, 8));
    /* one carry out of each limb, all three at once (not a chain): h0 < 2^45, h1 < 2^44 +
     * 2^12, h2 < 2^42 + 2^12 after it, and with the next block added every operand of the
     * next step stays far below vpmadd52's 2^52 */
    __m512i c0 = _mm512_srli_epi64(d0, 44), c1 = _mm512_srli_epi64(d1, 44), c2 = _mm512_srli_epi64(d2, 42);
    *h0 = _mm512_add_epi64(_mm512_and_si512(d0, m44), _mm512_add_epi64(c2, _mm512_slli_epi64(c2, 2)));
    *h1 = _mm512_add_epi64(_mm512_and_si512(d1, m44), c0);
    *h2 = _mm512_add_epi64(_mm512_and_si512(d2, m42), c1);
}

/* h = (h + the eight blocks at p, one per lane) * R */
static inline __attribute__((always_inline)) void vstep(__m512i *h0, __m512i *h1, __m512i *h2, const uint8_t *p,
                                                        const struct vr *R)
{
    const __m512i idx_lo = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i idx_hi = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i m44 = _mm512_set1_epi64((long long)M44);
    __m512i x = _mm512_loadu_si512(p), y = _mm512_loadu_si512(p + 64);
    __m512i lo = _mm512_permutex2var_epi64(x, idx_lo, y), hi = _mm512_permutex2var_epi64(x, idx_hi, y);
    __m512i a0 = _mm512_add_epi64(*h0, _mm512_and_si512(lo, m44));
    __m512i a1 = _mm512_add_epi64(
        *h1, _mm512_and_si512(_mm512_or_si512(_mm512_srli_epi64(lo, 44), _mm512_slli_epi64(hi, 20)), m44));
    __m512i a2 = _mm512_add_epi64(*h2, _mm512_or_si512(_mm512_srli_epi64(hi, 24),
                                                       _mm512_set1_epi64((long long)((uint64_t)1 << 40))));
    vmul(h0, h1, h2, a0, a1, a2, R);
}


static struct vr vr_make(__m512i r0, __m512i r1, __m512i r2)
{
    struct vr v = {r0, r1, r2, _mm512_add_epi64(_mm512_slli_epi64(r1, 4), _mm512_slli_epi64(r1, 2)),
                   _mm512_add_epi64(_mm512_slli_epi64(r2, 4), _mm512_slli_epi64(r2, 2))};
    return v;
}

static __m512i lanes(uint64_t (*pw)[3], int k)   /* lane j: limb k of r^(4-j%4) */
{
    return _mm512_set_epi64((long long)pw[1][k], (long long)pw[2][k], (long long)pw[3][k], (long long)pw[4][k],
                            (long long)pw[1][k], (long long)pw[2][k], (long long)pw[3][k], (long long)pw[4][k]);
}

static void mul_into(uint64_t out[3], const uint64_t a[3], const uint64_t b[3])
{
    memcpy(out, a, 3 * sizeof out[0]);
    mul_r(out, b);
}

/* Poly1305 of pad16(ad) || c || le64(adlen) || le64(len) under key (r || s) */
static void poly1305(uint8_t tag[16], const uint8_t *ad, size_t adlen, const uint8_t *c, size_t len,
                     const uint8_t key[32])
{
    uint64_t t0 = rd64(key), t1 = rd64(key + 8);
    uint64_t pw[5][3];   /* r^1 .. r^4, scalar (r^4 = r^2 r^2) */
    pw[1][0] = t0 & 0xffc0fffffff;
    pw[1][1] = ((t0 >> 44) | (t1 << 20)) & 0xfffffc0ffff;
    pw[1][2] = (t1 >> 24) & 0x00ffffffc0f;
    mul_into(pw[2], pw[1], pw[1]);
    mul_into(pw[3], pw[2], pw[1]);
    mul_into(pw[4], pw[2], pw[2]);
    /* the associated data: m1 r^3 + m2 r^2 + m3 r, ... (Horner's sum, products apart) */
    uint64_t h[3] = {0, 0, 0};
    uint8_t blk[16];
    size_t nad = (adlen + 15) / 16;
    for (size_t i = 0; i < nad; i++) {
        size_t off = i * 16, n = adlen - off < 16 ? adlen - off : 16;
        uint64_t m[3] = {0, 0, 0};
        memset(blk, 0, sizeof blk);
        memcpy(blk, ad + off, n);
        add_block(m, blk);
        mul_r(m, pw[nad - i]);
        h[0] += m[0], h[1] += m[1], h[2] += m[2];
    }
    /* two sets of eight lanes, A on the first 128 bytes of every 256 and B on the second,
     * so two independent chains of vpmadd52 run at once: both step by r^16, and at the
     * last step A's lane j takes r^(16-j) and B's r^(8-j) */
    const __m512i first = _mm512_setzero_si512();
    __m512i q0, q1, q2;
    /* lanes r^4 r^3 r^2 r^1 r^4 r^3 r^2 r^1 times r^4 (lanes 0-3) and 1 (4-7): lane j is
     * r^(8-j), one vector multiply where r^5..r^8 took four scalar ones */
    const __mmask8 lo4 = 0x0f;
    struct vr m4 = vr_make(_mm512_mask_set1_epi64(_mm512_set1_epi64(1), lo4, (long long)pw[4][0]),
                           _mm512_maskz_set1_epi64(lo4, (long long)pw[4][1]),
                           _mm512_maskz_set1_epi64(lo4, (long long)pw[4][2]));
    vmul(&q0, &q1, &q2, lanes(pw, 0), lanes(pw, 1), lanes(pw, 2), &m4);
    struct vr lb = vr_make(q0, q1, q2);
    struct vr r8 = vr_make(_mm512_permutexvar_epi64(first, q0), _mm512_permutexvar_epi64(first, q1),
                           _mm512_permutexvar_epi64(first, q2));
    vmul(&q0, &q1, &q2, lb.r0, lb.r1, lb.r2, &r8);   /* lane j: r^(16-j) */
    struct vr la = vr_make(q0, q1, q2);
    struct vr r16 = vr_make(_mm512_permutexvar_epi64(first, q0), _mm512_permutexvar_epi64(first, q1),
                            _mm512_permutexvar_epi64(first, q2));
    /* the associated data's sum goes in with the first ciphertext block (A's lane 0) */
    __m512i a0 = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, (long long)h[0]);
    __m512i a1 = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, (long long)h[1]);
    __m512i a2 = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, (long long)h[2]);
    __m512i b0 = _mm512_setzero_si512(), b1 = b0, b2 = b0;
    size_t steps = len / 256;
    for (size_t i = 0; i + 1 < steps; i++) {
        vstep(&a0, &a1, &a2, c + i * 256, &r16);
        vstep(&b0, &b1, &b2, c + i * 256 + 128, &r16);
    }
    vstep(&a0, &a1, &a2, c + (steps - 1) * 256, &la);
    vstep(&b0, &b1, &b2, c + (steps - 1) * 256 + 128, &lb);
    h[0] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(a0, b0));
    h[1] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(a1, b1));
    h[2] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(a2, b2));
    carry(h);
    uint64_t lens[2] = {adlen, len};
    memcpy(blk, lens, 16);
    add_block(h, blk);
    mul_r(h, pw[1]);
    /* h mod p, + s, mod 2^128 */
    carry(h);
    uint64_t g0 = h[0] + 5, cc = g0 >> 44;
    g0 &= M44;
    uint64_t g1 = h[1] + cc;
    cc = g1 >> 44;
    g1 &= M44;
    uint64_t g2 = h[2] + cc - ((uint64_t)1 << 42);
    uint64_t mask = (g2 >> 63) - 1;   /* all ones: h >= p, take g */
    h[0] = (h[0] & ~mask) | (g0 & mask);
    h[1] = (h[1] & ~mask) | (g1 & mask);
    h[2] = (h[2] & ~mask) | (g2 & mask);
    uint64_t s0 = rd64(key + 16), s1 = rd64(key + 24);
    h[0] += s0 & M44;
    cc = h[0] >> 44;
    h[0] &= M44;
    h[1] += (((s0 >> 44) | (s1 << 20)) & M44) + cc;
    cc = h[1] >> 44;
    h[1] &= M44;
    h[2] += ((s1 >> 24) & M42) + cc;
    uint64_t out[2] = {h[0] | (h[1] << 44), (h[1] >> 20) | (h[2] << 24)};
    memcpy(tag, out, 16);
    explicit_bzero(pw, sizeof pw);
    explicit_bzero(h, sizeof h);
    explicit_bzero(&r16, sizeof r16);
    explicit_bzero(&r8, sizeof r8);
    explicit_bzero(&la, sizeof la);
    explicit_bzero(&lb, sizeof lb);
    explicit_bzero(&m4, sizeof m4);
}

/* ---- 3. the message ---------------------------------------------------------------- */

static void xor_into(uint8_t *p, const uint8_t *ks, size_t len)
{
    for (size_t i = 0; i < len; i += 64)
        _mm512_storeu_si512(p + i, _mm512_xor_si512(_mm512_loadu_si512(p + i), _mm512_loadu_si512(ks + i)));
}

/* keystream of a short message (under 1 KiB) and one block more: block 0 (the Poly1305
 * key) and the data's */
#define KS_BYTES (1024 + 64 + 192)

int bc_cp_avx512_seal(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], uint8_t tag[16])
{
    if (len == 0 || len % 256 != 0 || len > BC_CP_MAX || adlen > 64)
        return -1;
    uint8_t block0[256] __attribute__((aligned(64)));
    stream_xor(p, len, 0, block0, key, nonce);
    poly1305(tag, ad, adlen, p, len, block0);
    explicit_bzero(block0, sizeof block0);
    return 0;
}

static int tag_equal(const uint8_t mac[16], const uint8_t tag[16])
{
    unsigned diff = 0;
    for (int i = 0; i < 16; i++)
        diff |= (unsigned)(mac[i] ^ tag[i]);
    return diff == 0;
}

/* Open: the tag is checked before anything is written to p, so an open whose tag fails
 * leaves the data as it was. A message of 1 KiB or more: the first sixteen-block batch
 * (blocks 1..16, block 0's group inside it) goes to a 1 KiB stack buffer, Poly1305 runs
 * over the ciphertext, and once the tag checks out that buffer and then the rest of the
 * stream are XORed into p, as a seal does (a full-length buffer cost an extra store and
 * load of every byte). A shorter one: its whole stream to the buffer first. */
int bc_cp_avx512_open(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], const uint8_t tag[16])
{
    if (len == 0 || len % 256 != 0 || len > BC_CP_MAX || adlen > 64)
        return -1;
    uint8_t ks[KS_BYTES] __attribute__((aligned(64))), block0[256] __attribute__((aligned(64))), mac[16];
    int ok;
    if (len >= 1024) {
        struct group b0 = {.ctr = 0, .xor = 0, .dst = block0};
        run_stream(1, 0, ks, 1024, &b0, NULL, 0, key, nonce);
        poly1305(mac, ad, adlen, p, len, block0);
        ok = tag_equal(mac, tag);
        if (ok) {
            xor_into(p, ks, 1024);
            stream_xor(p, len, 1024, NULL, key, nonce);
        }
        /* the Poly1305 key goes; the rest of the stream only if it was not applied (once
         * applied it is the plaintext XOR the ciphertext, and the plaintext is in p) */
        explicit_bzero(block0, ok ? 64 : sizeof block0);
        if (!ok)
            explicit_bzero(ks, 1024);
    } else {
        keystream(ks, len, key, nonce);
        poly1305(mac, ad, adlen, p, len, ks);
        ok = tag_equal(mac, tag);
        if (ok)
            xor_into(p, ks + 64, len);
        explicit_bzero(ks, ok ? 64 : sizeof ks);
    }
    return ok;
}

int bc_cp_avx512_verify(const uint8_t *c, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                        const uint8_t nonce[12], const uint8_t tag[16])
{
    if (len == 0 || len % 256 != 0 || len > BC_CP_MAX || adlen > 64)
        return -1;
    uint8_t block0[256] __attribute__((aligned(64))), mac[16];
    struct group g = {.ctr = 0, .xor = 0, .dst = block0};
    run_groups(&g, 1, key, nonce);
    poly1305(mac, ad, adlen, c, len, block0);
    explicit_bzero(block0, sizeof block0);
    return tag_equal(mac, tag);
}

#else /* not x86-64: bc_cp_avx512_usable() is 0, nothing here is called */

int bc_cp_avx512_verify(const uint8_t *c, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                        const uint8_t nonce[12], const uint8_t tag[16])
{
    (void)c, (void)len, (void)ad, (void)adlen, (void)key, (void)nonce, (void)tag;
    return -1;
}

int bc_cp_avx512_seal(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], uint8_t tag[16])
{
    (void)p, (void)len, (void)ad, (void)adlen, (void)key, (void)nonce, (void)tag;
    return -1;
}

int bc_cp_avx512_open(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], const uint8_t tag[16])
{
    (void)p, (void)len, (void)ad, (void)adlen, (void)key, (void)nonce, (void)tag;
    return -1;
}

void bc_cp_avx512_hchacha20(uint8_t (*out)[32], const uint8_t *const *in, size_t n, const uint8_t key[32])
{
    (void)out, (void)in, (void)n, (void)key;
}

#endif
