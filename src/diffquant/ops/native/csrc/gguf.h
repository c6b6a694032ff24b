/* GGUF (ggml) blocks for the C kernels of gguf_decode.c and gguf_gemv(_q4).c: the type ids, the
   half-float scales, and each type's block decoded to float32 values, ggml's dequantize_row_*
   op for op (the reference's, ops/formats/gguf.py, in float32: products of a half-float scale
   and a small integer code are exact, so the one rounding of Q4_1/Q4_K, the add of the min, is
   the reference's). Built with -ffp-contract=off so no multiply-add fuses across a rounding. */
#ifndef DIFFQUANT_GGUF_H
#define DIFFQUANT_GGUF_H
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

/* The GGML types decoded here: id, values per block, bytes per block. ops/formats/gguf.py's
   BLOCK_LAYOUT is the source; ops/native/registry.py reads this table (dq_gguf_block) when the
   library loads and refuses a library whose sizes differ from it. */
#define GGUF_TYPES(X) X(Q4_0, 2, 32, 18) X(Q4_1, 3, 32, 20) X(Q8_0, 8, 32, 34) \
                      X(Q4_K, 12, 256, 144) X(Q6_K, 14, 256, 210)
#define GGUF_ID(T, ID, ELEMS, BYTES) T = ID,
#define GGUF_SIZES(T, ID, ELEMS, BYTES) T##_ELEMS = ELEMS, T##_BYTES = BYTES,
enum { GGUF_TYPES(GGUF_ID) };
enum { GGUF_TYPES(GGUF_SIZES) };

/* gguf_gemv.c's dq_gemv for the Q4 types, written in gguf_gemv_q4.c (dq_gemv's arguments) */
int dq_gemv_q4(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
               const float *x, void *out, int portable, int out_bf16, const uint16_t *bias);

static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* subnormal (or zero): m * 2^-24, exact */
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* -- one block -> float32 values y[elems] ------------------------------------------------- */
static inline void block_q8_0(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b);
    const int8_t *q = (const int8_t *)(b + 2);
    for (int i = 0; i < 32; i++) y[i] = d * (float)q[i];
}

static inline void block_q4_0(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b);
    const uint8_t *q = b + 2;                /* element i: low nibble of q[i]; i + 16: high */
    for (int i = 0; i < 16; i++) y[i] = d * ((float)(q[i] & 0x0f) - 8.0f);
    for (int i = 0; i < 16; i++) y[i + 16] = d * ((float)(q[i] >> 4) - 8.0f);
}

static inline void block_q4_1(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    const uint8_t *q = b + 4;
    for (int i = 0; i < 16; i++) y[i] = d * (float)(q[i] & 0x0f) + m;
    for (int i = 0; i < 16; i++) y[i + 16] = d * (float)(q[i] >> 4) + m;
}

/* Q4_K: eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4) */
static void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static inline void block_q4_k(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *q = b + 16;
    for (int j = 0; j < 4; j++, q += 32, y += 64) {  /* 32 bytes: sub-blocks 2j (low), 2j+1 */
        int s0, m0, s1, m1;
        scale_min_k4(2 * j, b + 4, &s0, &m0);
        scale_min_k4(2 * j + 1, b + 4, &s1, &m1);
        float d0 = d * (float)s0, n0 = dmin * (float)m0, d1 = d * (float)s1, n1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            y[l] = d0 * (float)(q[l] & 0x0f) - n0;
            y[l + 32] = d1 * (float)(q[l] >> 4) - n1;
        }
    }
}

/* not inlined: inlined into the row loop it no longer vectorises (3x slower) */
static __attribute__((noinline)) void block_q6_k(const uint8_t *restrict b, float *restrict y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = half_to_float(b + 208), dl[16];
    for (int i = 0; i < 16; i++) dl[i] = d * (float)sc[i];
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, y += 128) {  /* ggml's dequantize_row_q6_K */
        const float *s = dl + 8 * h;
        for (int l = 0; l < 32; l++) {
            int i = l / 16;
            y[l] = s[i] * (float)((int)((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = s[i + 2] * (float)((int)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = s[i + 4] * (float)((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = s[i + 6] * (float)((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* The vector forms: AVX-512 (with F16C for the scales), else AVX2 (HAVE_AVX2_ROWS: no AVX-512) */
#if defined(__AVX512F__) && defined(__F16C__)
#define HAVE_GGUF_AVX512 1
static inline __m512 half_broadcast(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm512_set1_ps(_cvtsh_ss(h));
}

/* One row of a 32-value block type (Q8_0, Q4_0) against x: four blocks a step, block g in the
   lanes of accumulator g % 4, kept as named registers (an indexed array of them lives on the
   stack: 2x slower). ``pair`` (a block's 32 codes times x, unscaled) and ``bytes`` are constants
   at each call, so the loop inlines as if written out per type. */
typedef __m512 (*block_pair_fn)(const uint8_t *b, const float *x);
static inline __attribute__((always_inline)) float gemv_row_blocks32(
        block_pair_fn pair, int bytes, const uint8_t *b, int64_t n_blocks, const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t g = 0;
    for (; g + 3 < n_blocks; g += 4, b += 4 * bytes, x += 128) {
        for (int line = 0; line < 4 * bytes; line += 64)
            _mm_prefetch((const char *)(b + AHEAD + line), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(pair(b, x), half_broadcast(b), a0);
        a1 = _mm512_fmadd_ps(pair(b + bytes, x + 32), half_broadcast(b + bytes), a1);
        a2 = _mm512_fmadd_ps(pair(b + 2 * bytes, x + 64), half_broadcast(b + 2 * bytes), a2);
        a3 = _mm512_fmadd_ps(pair(b + 3 * bytes, x + 96), half_broadcast(b + 3 * bytes), a3);
    }
    if (g < n_blocks) a0 = _mm512_fmadd_ps(pair(b, x), half_broadcast(b), a0);
    if (g + 1 < n_blocks)
        a1 = _mm512_fmadd_ps(pair(b + bytes, x + 32), half_broadcast(b + bytes), a1);
    if (g + 2 < n_blocks)
        a2 = _mm512_fmadd_ps(pair(b + 2 * bytes, x + 64), half_broadcast(b + 2 * bytes), a2);
    return sum_registers(a0, a1, a2, a3);
}
#elif defined(HAVE_AVX2_ROWS) && defined(__F16C__)
#define HAVE_GGUF_AVX2 1
static inline __m256 half_broadcast8(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm256_set1_ps(_cvtsh_ss(h));
}

/* gemv_row_blocks32's AVX2 form: block g's 32 products in accumulators 2 (g % 4) and
   2 (g % 4) + 1; ``pair`` gives a block's codes times x[0:32], unscaled, as two halves */
typedef void (*block_pair8_fn)(const uint8_t *b, const float *x, __m256 *lo, __m256 *hi);
#define BLOCK8(PAIR, B, X, A, C)                                                          \
    do {                                                                                  \
        __m256 lo_, hi_, d_ = half_broadcast8(B);                                         \
        PAIR((B), (X), &lo_, &hi_);                                                       \
        A = _mm256_fmadd_ps(lo_, d_, A);                                                  \
        C = _mm256_fmadd_ps(hi_, d_, C);                                                  \
    } while (0)
static inline __attribute__((always_inline)) float gemv_row_blocks32_8(
        block_pair8_fn pair, int bytes, const uint8_t *b, int64_t n_blocks, const float *x) {
    __m256 a[8];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t g = 0;
    for (; g + 3 < n_blocks; g += 4, b += 4 * bytes, x += 128) {
        for (int line = 0; line < 4 * bytes; line += 64)
            _mm_prefetch((const char *)(b + AHEAD + line), _MM_HINT_T0);
        BLOCK8(pair, b, x, a0, a1);
        BLOCK8(pair, b + bytes, x + 32, a2, a3);
        BLOCK8(pair, b + 2 * bytes, x + 64, a4, a5);
        BLOCK8(pair, b + 3 * bytes, x + 96, a6, a7);
    }
    if (g < n_blocks) BLOCK8(pair, b, x, a0, a1);
    if (g + 1 < n_blocks) BLOCK8(pair, b + bytes, x + 32, a2, a3);
    if (g + 2 < n_blocks) BLOCK8(pair, b + 2 * bytes, x + 64, a4, a5);
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3, a[4] = a4, a[5] = a5, a[6] = a6, a[7] = a7;
    return sum_registers8(a);
}
#undef BLOCK8

/* a Q4_0 / Q4_1 block's 32 values 8 at a time (gguf_decode.c's AVX2
   decode and gguf_gemv_q4.c's rows share it): the float32 ops of block_q4_0 / block_q4_1 */
static inline __attribute__((always_inline)) void q4_block8(int qtype, const uint8_t *b, __m256 *v) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256 eight = _mm256_set1_ps(8.0f);
    __m256 d = half_broadcast8(b);
    __m128i q = _mm_loadu_si128((const __m128i *)(b + (qtype == Q4_0 ? 2 : 4)));
    __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
    __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    __m256 m = qtype == Q4_1 ? half_broadcast8(b + 2) : eight;
    for (int k = 0; k < 4; k++) {
        __m256 u = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[k]));
        v[k] = qtype == Q4_0 ? _mm256_mul_ps(d, _mm256_sub_ps(u, eight))
                             : _mm256_add_ps(_mm256_mul_ps(d, u), m);
    }
}
#endif
#endif
