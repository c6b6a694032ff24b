/* The K-quant quantizers' shared pieces (quantize_kquant.c: Q4_K, Q5_K; quantize_q6k.c: Q6_K):
   ggml's nearest_int, and 8-lane vectors in which lane j is sub-block j of a super-block.

   The vectors are GCC's vector extensions (one AVX register of 8 floats, two SSE2 ones):
   every operation runs lane by lane as the scalar C would, so a sub-block's sums keep ggml's
   one-after-the-other order while 8 sub-blocks advance at once. max, min, blend, round, sqrt
   and the 8x8 transpose use AVX intrinsics where the target has AVX, else lane loops. */
#ifndef DIFFQUANT_KQUANT_H
#define DIFFQUANT_KQUANT_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define KQ_EPS 1e-15f        /* ggml's GROUP_MAX_EPS */
#define KQ_MAGIC 12582912.f  /* 1.5 * 2^23: nearest_int's */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

/* ggml's nearest_int: ties to even through the mantissa of f + 1.5 * 2^23 (|f| < 2^22; past
   that its own values, which every caller clamps) */
static inline int32_t nearest_int(float f) {
    float v = f + KQ_MAGIC;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* nearest_int lane by lane, for any value; then clamped to [lo, hi] */
static inline v8i nearest_clamp8(v8f f, int32_t lo, int32_t hi) {
    v8i v = (((v8i)(f + KQ_MAGIC)) & 0x007fffff) - 0x00400000, l = v - v + lo, h = v - v + hi;
    v = ((v < l) & l) | (~(v < l) & v);
    return ((v > h) & h) | (~(v > h) & v);
}

#if defined(__AVX__)
static inline v8f vmax(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
static inline v8f vmin(v8f a, v8f b) { return (v8f)_mm256_min_ps((__m256)a, (__m256)b); }
static inline v8f vsel(v8i m, v8f a, v8f b) {
    return (v8f)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m);
}
/* round to nearest even (the current rounding mode, as rintf: nobody changes it), nearest_int's
   integer for |v| < 2^22. _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC, not TO_NEAREST_INT,
   which SIMDe (tests' AVX-512 emulation) rounds half away from zero */
static inline v8f vround(v8f v) { return (v8f)_mm256_round_ps((__m256)v, 0x0C); }
#else
static inline v8f vmax(v8f a, v8f b) {            /* a > b ? a : b, as maxps */
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = a[j] > b[j] ? a[j] : b[j];
    return r;
}
static inline v8f vmin(v8f a, v8f b) {            /* a < b ? a : b, as minps */
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = a[j] < b[j] ? a[j] : b[j];
    return r;
}
static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8f vround(v8f v) { return (v + KQ_MAGIC) - KQ_MAGIC; }
#endif
static inline v8f vsqrt(v8f v) {                  /* 8 a super-block: the libm's, IEEE's */
    for (int j = 0; j < 8; j++) v[j] = sqrtf(v[j]);
    return v;
}

/* nearest_int(v) clamped to [lo, hi], as a float, for |v| < 2^22 (the callers check that
   bound, in_range, for the lanes whose codes count) */
static inline v8f codes(v8f v, float lo, float hi) {
    const v8f l = {lo, lo, lo, lo, lo, lo, lo, lo}, h = {hi, hi, hi, hi, hi, hi, hi, hi};
    return vmax(vmin(vround(v), h), l);
}
/* lanes where |v| < 2^22 (false for a NaN) */
static inline v8i in_range(v8f v) { return (v < 0x1p22f) & (v > -0x1p22f); }
static inline int all(v8i m) {
    for (int j = 0; j < 8; j++)
        if (!m[j]) return 0;
    return 1;
}
static inline v8f vabs(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }

/* out[c] lane r = src[r * stride + c]: 8 rows of 8 floats, transposed */
static inline void transpose8(const float *src, int64_t stride, v8f out[8]) {
#if defined(__AVX__)
    __m256 r[8], t[8], s[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + k * stride);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        out[k] = (v8f)_mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
        out[k + 4] = (v8f)_mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
    }
#else
    for (int c = 0; c < 8; c++)
        for (int r = 0; r < 8; r++) out[c][r] = src[r * stride + c];
#endif
}

/* quantize_q6k.c: quantize_row_q6_K_ref of one super-block x [256] -> o (210 bytes) */
void dq_q6_k_block(const float *x, uint8_t *o);

/* 8 codes (0..255) -> 8 bytes at dst */
static inline void store8(v8i v, uint8_t *dst) {
    v8u8 b = __builtin_convertvector(v & 0xff, v8u8);
    memcpy(dst, &b, 8);
}
#endif
