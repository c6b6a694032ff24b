/* The row kernels of the C files here: each does rows [r0, r1) of its output and returns 0, 1
   (this input needs the caller's torch fallback) or -1 (bad arguments); registry.c names them
   and declares their arguments, parallel.c runs them over row ranges on several threads. Then
   the helpers the one-row products share: their order of sums, and the vector forms of the
   bf16 conversions. */
#ifndef DIFFQUANT_KERNELS_H
#define DIFFQUANT_KERNELS_H
#include <stdint.h>

int dq_decode(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
              void *out, int64_t ld_out, int out_bf16);
int dq_gemv(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
            const float *x, void *out, int portable, int out_bf16, const uint16_t *bias);
int dq_quantize_rows_bf16(const uint16_t *x, int64_t ldx, int64_t r0, int64_t r1, int64_t k,
                          int8_t *q, float *scale);
int dq_row_scale_bf16(const uint16_t *xr, int64_t k, float *s);
int dq_quantize_rows_vnni_bf16(const uint16_t *x, int64_t ldx, int64_t r0, int64_t r1,
                               int64_t k, int8_t *xp, float *scale);
int dq_amx_int8_linear(const int8_t *w, int64_t k, int64_t n, const int8_t *xp, int64_t groups,
                       int64_t c0, int64_t c1, const float *sx, const float *sw,
                       const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m);
int dq_int8_output_bf16(const int32_t *acc, const float *sx, const float *sw,
                        const uint16_t *bias, int64_t r0, int64_t r1, int64_t n, uint16_t *y,
                        int64_t ldy);
int dq_int4_tinygemm_bf16(const uint8_t *packed, int64_t k, int64_t group,
                          const uint16_t *scale, const uint16_t *zero, int64_t r0, int64_t r1,
                          uint16_t *out, int64_t ld);
int dq_int8_rows_bf16(const int8_t *q, int64_t k, const uint16_t *scale, int64_t scale_step,
                      int64_t r0, int64_t r1, uint16_t *out, int64_t ld);
int dq_quanto_bits_bf16(const uint8_t *packed, int64_t p, int64_t g, int bits,
                        const uint16_t *scale, const uint16_t *shift, int64_t a, int64_t b,
                        uint16_t *out);
int dq_scale_rows_bf16(uint16_t *y, int64_t ldy, int64_t r0, int64_t r1, int64_t n,
                       const uint16_t *scale, const uint16_t *bias);
int dq_int8_gemv(const int8_t *q, int64_t k, const uint16_t *scale, const float *x, int64_t r0,
                 int64_t r1, uint16_t *out, int portable, const uint16_t *post,
                 const uint16_t *bias);
int dq_lut4_gemv(const uint8_t *packed, const float *lut, const float *absmax, int64_t blocksize,
                 int64_t k, int64_t r0, int64_t r1, const float *x, void *out, int portable,
                 int out_bf16, const uint16_t *bias);
int dq_quanto_int8_bf16(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, int8_t *q,
                        uint16_t *scale);
int dq_quanto_affine_bf16(const uint16_t *w, int64_t g, int bits, int64_t rows, int64_t p0,
                          int64_t p1, uint8_t *packed, uint16_t *scale, uint16_t *shift);
int dq_int4_groupwise_bf16(const uint16_t *w, int64_t k, int64_t g, int64_t r0, int64_t r1,
                           uint8_t *packed, uint16_t *scale, uint16_t *zero);
int dq_bnb4_quantize_bf16(const uint16_t *w, const float *bounds, const uint8_t *order,
                          int64_t bs, int64_t b0, int64_t b1, uint8_t *packed, float *absmax);
int dq_bnb_int8_bf16(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, int8_t *q,
                     float *scb);
int dq_gguf_quantize_bf16(int qtype, const uint16_t *w, int64_t b0, int64_t b1, uint8_t *out);
int dq_gguf_kquant(int qtype, const void *w, int dtype, int64_t b0, int64_t b1, uint8_t *out);
int32_t dq_int8_dot_row(const int16_t *xw, const int8_t *qr, int64_t k);
int dq_int8_dynamic_row_bf16(const uint16_t *x, int64_t k, const int8_t *q, const float *sw,
                             const uint16_t *bias, int64_t r0, int64_t r1, uint16_t *y);
int dq_int8_dot_rows(const int16_t *xw, int64_t m, const int8_t *q, int64_t k, int64_t r0,
                     int64_t r1, int32_t *acc, int64_t ldacc);
int dq_int4_gemv(const uint8_t *packed, const uint32_t *sz, int64_t k, int64_t group,
                 int64_t r0, int64_t r1, const float *x, uint16_t *out, int portable,
                 const uint16_t *bias);
int dq_int4_gemv_vector(void);
int dq_lut4_decode_bf16(const uint8_t *packed, const float *lut, const float *absmax,
                        int64_t blocksize, int64_t k, int64_t r0, int64_t r1, uint16_t *out,
                        int64_t ld);

/* The one-row products sum element k of a row into lane k % LANES (independent vector
   accumulators, no float reassociation) and add the lanes once, in this order. */
#define LANES 64

static inline float sum_lanes(const float *acc) {
    float s = 0.0f;
    for (int t = 0; t < LANES; t++) s += acc[t];
    return s;
}

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>

/* Software prefetch distance of the one-row products, in bytes of the weight stream (~2.5
   Q8_0 rows of 3072). A thread's rows are one long stream that the hardware prefetcher follows
   too late: from memory, 1 KB ahead ran at ~60% of a plain read of the same bytes, 8 KB ahead
   at ~95% (one core of an AMX Xeon). */
#ifndef AHEAD
#define AHEAD 8192
#endif
#endif

/* The one-row products on a CPU with AVX2 and FMA but not AVX-512 (AMD Zen 3, Intel before
   Skylake-X): the 64 lanes as eight 8-lane registers, the portable loop's order. */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HAVE_AVX2_ROWS 1

/* 8 int8 values at p -> 8 floats (exact) */
static inline __m256 int8x8_to_float(const void *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* float_to_bf16 of 8 values stored at o (NaN -> 0x7fc0, as torch) */
static inline void store_bf16x8(uint16_t *o, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0),
                           _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(packed));
}

/* the eight lane accumulators (lanes 0-7, 8-15, ...) -> their sum, in sum_lanes' order */
static inline float sum_registers8(const __m256 *a) {
    float acc[LANES] __attribute__((aligned(32)));
    for (int i = 0; i < 8; i++) _mm256_store_ps(acc + 8 * i, a[i]);
    return sum_lanes(acc);
}
#endif

#ifdef __AVX512F__

/* 16 int8 values at p -> 16 floats (exact) */
static inline __m512 int8x16_to_float(const void *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* float_to_bf16 of 16 values, as 32-bit lanes holding the bf16 bits (NaN -> 0x7fc0, as torch) */
static inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                 _mm512_set1_epi32(0x7fc0));
}

/* round_bf16 of 16 values (a bf16 op's result, kept in float32) */
static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16));
}

/* 16 values -> 16 bf16 at o */
static inline void store_bf16x16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

/* the four lane accumulators (lanes 0-15, 16-31, ...) -> their sum, in sum_lanes' order */
static inline float sum_registers(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    float acc[LANES] __attribute__((aligned(64)));
    _mm512_store_ps(acc, a0);
    _mm512_store_ps(acc + 16, a1);
    _mm512_store_ps(acc + 32, a2);
    _mm512_store_ps(acc + 48, a3);
    return sum_lanes(acc);
}
#endif
#endif
