/* bitsandbytes 4-bit (NF4/FP4) one-row product on a CPU, compiled on first use by
   ops/native.py.

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
                               const float *x, void *out, int out_bf16) {
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
        store_result(out, r, sum_lanes(acc), out_bf16);
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

/* out[r] = sum_j x[j] * w[r, j] for weight rows [r0, r1) of K columns. The AVX-512 form needs
   K % 64 == 0 and blocksize % 32 == 0; portable = 1 forces the portable loop. Returns 0, or -1
   for a K that is odd. */
int dq_lut4_gemv(const uint8_t *packed, const float *lut, const float *absmax, int64_t blocksize,
                 int64_t k, int64_t r0, int64_t r1, const float *x, void *out, int portable,
                 int out_bf16) {
    if (k % 2 || blocksize < 1) return -1;
#ifdef HAVE_LUT4_AVX512
    if (!portable && k % 64 == 0 && blocksize % 32 == 0) {
        __m512 table = _mm512_loadu_ps(lut);
        for (int64_t r = r0; r < r1; r++)
            store_result(out, r, lut4_row_avx512(packed + r * k / 2, table, absmax, blocksize,
                                                  r * k, k, x), out_bf16);
        return 0;
    }
#endif
    lut4_rows_portable(packed, lut, absmax, blocksize, k, r0, r1, x, out, out_bf16);
    return 0;
}

/* rows [r0, r1) of the weight -> out bf16 [N, ld], w = bf16(lut[code] * absmax): bitsandbytes'
   dequantize_4bit into a caller's buffer (it always allocates a fresh one). */
int dq_lut4_decode_bf16(const uint8_t *packed, const float *lut, const float *absmax,
                        int64_t blocksize, int64_t k, int64_t r0, int64_t r1, uint16_t *out,
                        int64_t ld) {
    if (k % 2 || blocksize < 1) return -1;
#if defined(HAVE_LUT4_AVX512) && defined(__AVX512BF16__)
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
                _mm256_storeu_si256((__m256i *)(o + j), (__m256i)_mm512_cvtneps_pbh(w0));
                _mm256_storeu_si256((__m256i *)(o + j + 16), (__m256i)_mm512_cvtneps_pbh(w1));
            }
        }
        return 0;
    }
#endif
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = out + r * ld;
        for (int64_t j = 0; j < k; j += 2) {
            int64_t i = r * k + j;
            uint8_t byte = packed[i / 2];
            float s = absmax[i / blocksize];  /* blocksize is even: i and i + 1 share it */
            o[j] = float_to_bf16(lut[byte >> 4] * s);
            o[j + 1] = float_to_bf16(lut[byte & 0x0f] * s);
        }
    }
    return 0;
}
