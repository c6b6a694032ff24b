/* bitsandbytes 4-bit (NF4/FP4) one-row product on a CPU, compiled on first use by
   ops/native/build.py.

   Why: bitsandbytes' own CPU one-row kernel (gemv_4bit without the optional `kernels` package)
   took 6.5 ms for a 3072 x 3072 weight, 8x the bf16 product; its many-row path (dequantize,
   then matmul) is fine and stays.

   Layout (bitsandbytes' quantize_4bit): element i of the row-major weight is the high nibble
   (i even) or low nibble (i odd) of byte i / 2, a code into a 16-value table `lut` (NF4 or
   FP4), times absmax[i / blocksize] (float32, the double-quantized statistics already
   expanded). Each weight is lut * absmax in float32, as bitsandbytes' dequantize computes it
   before its bf16 cast; element k of a row is summed into lane k % 64, the lanes added once. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

static void lut4_rows_portable(const uint8_t *packed, const float *lut, const float *absmax,
                               int64_t blocksize, int64_t k, int64_t r0, int64_t r1,
                               const float *x, void *out, int out_bf16, const uint16_t *bias) {
    float acc[LANES];
    for (int64_t r = r0; r < r1; r++) {
        memset(acc, 0, sizeof acc);
        for (int64_t j = 0; j < k; j++) {
            int64_t i = r * k + j;
            uint8_t byte = packed[i / 2];
            int code = i % 2 ? byte & 0x0f : byte >> 4;
            float w = lut[code] * absmax[i / blocksize];
            acc[j % LANES] = __builtin_fmaf(w, x[j], acc[j % LANES]);
        }
        store_result(out, r, sum_lanes(acc), out_bf16, bias);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 16 packed bytes -> the 32 codes in element order: (hi0, lo0, hi1, lo1, ...) */
static inline void codes32(const uint8_t *p, __m512i *first, __m512i *second) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    *first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    *second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
}

static float lut4_row_avx512(const uint8_t *p, __m512 table, const float *absmax,
                             int64_t blocksize, int64_t first, int64_t k, const float *x) {
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    for (int64_t j = 0; j < k; j += 64, p += 32) {  /* 64 values: one lane each */
        _mm_prefetch((const char *)(p + AHEAD), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m512i c0, c1;
            codes32(p + 16 * h, &c0, &c1);
            int64_t at = j + 32 * h;
            __m512 s = _mm512_set1_ps(absmax[(first + at) / blocksize]);  /* blocksize % 32 == 0 */
            __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(c0, table), s);
            __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(c1, table), s);
            a[2 * h] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + at), a[2 * h]);
            a[2 * h + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + at + 16), a[2 * h + 1]);
        }
    }
    return sum_registers(a[0], a[1], a[2], a[3]);
}
#define HAVE_LUT4_AVX512 1
#endif

#ifdef HAVE_AVX2_ROWS
/* 8 elements from 4 bytes (element 2i the high nibble of byte i): broadcast, each lane shifted
   so its code is in the low 4 bits; two 8-entry lookups in the table of this block's weights (vpermps reads the low 3 bits) and
   bit 3, moved to the sign, picks one. Why: the portable loop (gcc does not vectorise its
   per-element lookup) took 10.7 ms for one row of a 3072 x 3072 weight on Zen 3, 10x bf16. */
static inline __m256 lut8(const uint8_t *p, __m256 lo, __m256 hi, __m256i shifts) {
    int32_t w;
    memcpy(&w, p, 4);
    __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(w), shifts);
    __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c), pick);
}

/* k % 64 == 0, blocksize % 64 == 0, first % 64 == 0: each step of 64 lies in one block */
static float lut4_row_avx2(const uint8_t *p, const float *lut, const float *absmax,
                           int64_t blocksize, int64_t first, int64_t k, const float *x) {
    const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    const float *am = absmax + first / blocksize;
    int64_t left = blocksize - first % blocksize;  /* elements before the next block */
    /* the block's 16 weights lut[c] * absmax, the same float32 products, taken once a block */
    __m256 s = _mm256_broadcast_ss(am), lo_s = _mm256_mul_ps(lo, s), hi_s = _mm256_mul_ps(hi, s);
    for (int64_t j = 0; j < k; j += 64, p += 32) {
        _mm_prefetch((const char *)(p + AHEAD), _MM_HINT_T0);
        for (int i = 0; i < 8; i++)  /* lanes 8i..8i+7 of the portable loop's 64 */
            a[i] = _mm256_fmadd_ps(lut8(p + 4 * i, lo_s, hi_s, shifts),
                                   _mm256_loadu_ps(x + j + 8 * i), a[i]);
        if ((left -= 64) == 0 && j + 64 < k) {
            left = blocksize;
            s = _mm256_broadcast_ss(++am);
            lo_s = _mm256_mul_ps(lo, s), hi_s = _mm256_mul_ps(hi, s);
        }
    }
    return sum_registers8(a);
}
#endif

/* out[r] = sum_j x[j] * w[r, j] for weight rows [r0, r1) of K columns. The AVX-512 form needs
   K % 64 == 0 and blocksize % 32 == 0, the AVX2 one K % 64 == 0 and blocksize % 64 == 0;
   portable = 1 forces the portable loop. Returns 0, or -1 for a K that is odd. */
int dq_lut4_gemv(const uint8_t *packed, const float *lut, const float *absmax, int64_t blocksize,
                 int64_t k, int64_t r0, int64_t r1, const float *x, void *out, int portable,
                 int out_bf16, const uint16_t *bias) {
    if (k % 2 || blocksize < 1) return -1;
#ifdef HAVE_LUT4_AVX512
    if (!portable && k % 64 == 0 && blocksize % 32 == 0) {
        __m512 table = _mm512_loadu_ps(lut);
        for (int64_t r = r0; r < r1; r++)
            store_result(out, r, lut4_row_avx512(packed + r * k / 2, table, absmax, blocksize,
                                                  r * k, k, x), out_bf16, bias);
        return 0;
    }
#endif
#ifdef HAVE_AVX2_ROWS
    if (!portable && k % 64 == 0 && blocksize % 64 == 0) {
        for (int64_t r = r0; r < r1; r++)
            store_result(out, r, lut4_row_avx2(packed + r * k / 2, lut, absmax, blocksize, r * k,
                                               k, x), out_bf16, bias);
        return 0;
    }
#endif
    lut4_rows_portable(packed, lut, absmax, blocksize, k, r0, r1, x, out, out_bf16, bias);
    return 0;
}

/* rows [r0, r1) of the weight -> out bf16 [N, ld], w = bf16(lut[code] * absmax): bitsandbytes'
   dequantize_4bit into a caller's buffer (it always allocates a fresh one). Over 60 lines: the
   same row loop three times, AVX-512, AVX2 and portable, the first two compiled in where built. */
int dq_lut4_decode_bf16(const uint8_t *packed, const float *lut, const float *absmax,
                        int64_t blocksize, int64_t k, int64_t r0, int64_t r1, uint16_t *out,
                        int64_t ld) {
    if (k % 2 || blocksize < 1) return -1;
#ifdef HAVE_LUT4_AVX512
    if (k % 32 == 0 && blocksize % 32 == 0) {  /* 32 values a step: a permute does the lookup */
        __m512 table = _mm512_loadu_ps(lut);
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *p = packed + r * k / 2;
            uint16_t *o = out + r * ld;
            for (int64_t j = 0; j < k; j += 32, p += 16) {
                __m512i c0, c1;
                codes32(p, &c0, &c1);
                __m512 s = _mm512_set1_ps(absmax[(r * k + j) / blocksize]);
                __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(c0, table), s);
                __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(c1, table), s);
                store_bf16x16(o + j, w0);       /* torch's rounding: subnormals kept */
                store_bf16x16(o + j + 16, w1);
            }
        }
        return 0;
    }
#endif
#ifdef HAVE_AVX2_ROWS
    if (k % 64 == 0 && blocksize % 64 == 0) {  /* the one-row loop's lookup, 8 values a step */
        const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
        const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *p = packed + r * k / 2;
            uint16_t *o = out + r * ld;
            for (int64_t j = 0; j < k; j += 64, p += 32) {  /* 64 values lie in one block */
                __m256 s = _mm256_broadcast_ss(absmax + (r * k + j) / blocksize);
                __m256 lo_s = _mm256_mul_ps(lo, s), hi_s = _mm256_mul_ps(hi, s);
                for (int i = 0; i < 8; i++)
                    store_bf16x8(o + j + 8 * i, lut8(p + 4 * i, lo_s, hi_s, shifts));
            }
        }
        return 0;
    }
#endif
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = out + r * ld;
        const uint8_t *p = packed + r * k / 2;
        /* the block followed, not divided for: a division per pair cost more than the rest */
        const float *am = absmax + r * k / blocksize;
        int64_t left = blocksize - r * k % blocksize;
        if (blocksize % 2) {  /* odd blocks: a pair can straddle two (bitsandbytes' are even) */
            for (int64_t j = 0; j < k; j += 2) {
                int64_t i = r * k + j;
                o[j] = float_to_bf16(lut[p[j / 2] >> 4] * absmax[i / blocksize]);
                o[j + 1] = float_to_bf16(lut[p[j / 2] & 0x0f] * absmax[(i + 1) / blocksize]);
            }
            continue;
        }
        for (int64_t j = 0; j < k; j += 2) {
            float s = *am;  /* blocksize is even: i and i + 1 share it */
            o[j] = float_to_bf16(lut[p[j / 2] >> 4] * s);
            o[j + 1] = float_to_bf16(lut[p[j / 2] & 0x0f] * s);
            if ((left -= 2) == 0) am++, left = blocksize;
        }
    }
    return 0;
}
