/* bc_chachapoly.h — RFC 8439 ChaCha20-Poly1305 of one sector with AVX-512
 * (bc_chachapoly_avx512.c), for the AEAD layer. Internal to the engine. */
#ifndef BC_CHACHAPOLY_H
#define BC_CHACHAPOLY_H

#include <stddef.h>
#include <stdint.h>

#define BC_CP_MAX 4096u   /* the longest message (a sector) */

/* Does this CPU run bc_chachapoly_avx512.c (AVX-512 F, VL and IFMA)? */
static inline int bc_cp_avx512_usable(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512ifma");
#else
    return 0;
#endif
}

/* Seal len bytes at p in place (len a multiple of 256, at most BC_CP_MAX; ad at most 64
 * bytes) under key and the 12-byte nonce; the tag to tag. 0, or -1 on a length it does
 * not take. Only where bc_cp_avx512_usable(). */
int bc_cp_avx512_seal(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], uint8_t tag[16]);

/* Open in place: 1 if tag authenticates (p now holds the plaintext), 0 if not (p
 * untouched), -1 on a length it does not take. */
int bc_cp_avx512_open(uint8_t *p, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                      const uint8_t nonce[12], const uint8_t tag[16]);

/* Check only: 1 if tag authenticates the ciphertext c, 0 if not, -1 on a length it does
 * not take; nothing is decrypted or written (the stream's block 0 and Poly1305). */
int bc_cp_avx512_verify(const uint8_t *c, size_t len, const uint8_t *ad, size_t adlen, const uint8_t key[32],
                        const uint8_t nonce[12], const uint8_t tag[16]);

/* HChaCha20 of n <= 4 inputs of 16 bytes under key at once: out[i] is in[i]'s subkey. */
void bc_cp_avx512_hchacha20(uint8_t (*out)[32], const uint8_t *const *in, size_t n, const uint8_t key[32]);

#endif
