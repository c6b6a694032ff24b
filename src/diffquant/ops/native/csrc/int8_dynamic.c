/* int8 dynamic quantization on a CPU (torchao int8dq), compiled on first use by
   ops/native/build.py: the tokens' quantization, the int32 sums scaled back to bf16, the
   integer product where torch._int_mm is a generic loop (CPUs without VNNI), and one token
   through all three in one call. The product on AMX tiles is int8_amx.c's.

   Why C: torch runs the two elementwise ends as several passes with mixed dtypes (bf16
   activations, float32 scales, int32 sums), which its CPU kernels do not vectorise: at
   1280 x 3072 they took 28 ms around an 8 ms int8 product on an AMX CPU. Here each is one pass.

   The numbers are those of ops/formats/torchao.py's int8_dynamic_linear (torchao's), rounding
   for rounding:
   - per-token scale: s = bf16(amax / 127.5), at least float32's eps, widened to float32;
     q = clamp(round_half_even(x * (1 / s)), -128, 127), the product in float32;
   - output: y = bf16(float(acc) * s_x), then bf16(y * s_w [+ bias]) with the product and the
     sum each rounded to float32 first;
   - the integer sums are exact in any order.
   bf16 activations only; rows [r0, r1) per call, so callers split rows across threads. */
#include <math.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

/* Row xr's scale (K values) into *s; 1 when the row holds a NaN or an infinity. */
int dq_row_scale_bf16(const uint16_t *xr, int64_t k, float *s) {
    const float eps = 1.1920928955078125e-07f;  /* float32 eps: torchao's floor, a bf16 value */
    uint16_t top = 0;           /* |x| as bits: for finite values their order is the float order */
    for (int64_t i = 0; i < k; i++) {
        uint16_t a = xr[i] & 0x7fff;
        top = a > top ? a : top;
    }
    if (top >= 0x7f80) return 1;
    /* amax / 127.5 in float32, rounded to bf16 (torch's bf16 division by a scalar) */
    float v = round_bf16(bf16_to_float(top) / 127.5f);
    *s = v < eps ? eps : v;
    return 0;
}

/* n values of a row times inv (1 / its scale) -> int8 codes */
static inline void quantize_run(const uint16_t *xr, int64_t n, float inv, int8_t *q) {
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_float(xr[i]) * inv;
        v = v < -128.0f ? -128.0f : v;
        v = v > 127.0f ? 127.0f : v;
        /* round half to even (the default rounding mode); written as (v + 1.5 * 2^23) - 1.5 *
           2^23, the same numbers, or with a nested select, gcc left this loop scalar */
        int c = (int)rintf(v);
        q[i] = (int8_t)c;
    }
}

/* x bf16 [M, ldx] rows [r0, r1), K columns -> q int8 [M, k] and scale float32 [M].
   Returns 0, or 1 when a row holds a NaN or an infinity (the caller then uses torch's ops,
   whose results there are whatever its casts give). */
int dq_quantize_rows_bf16(const uint16_t *x, int64_t ldx, int64_t r0, int64_t r1, int64_t k,
                          int8_t *q, float *scale) {
    for (int64_t r = r0; r < r1; r++) {
        if (dq_row_scale_bf16(x + r * ldx, k, &scale[r])) return 1;
        quantize_run(x + r * ldx, k, 1.0f / scale[r], q + r * k);
    }
    return 0;
}

/* acc int32 [M, N] rows [r0, r1), token scales sx [M], channel scales sw [N], bias bf16 [N]
   or NULL -> y bf16 [M, N] with row stride ldy (a block of columns of a wider output). */
/* one output: sum a of a token of scale s, channel scale sw, bias b (bf16 bits) or none */
static inline uint16_t int8_out(int32_t a, float s, float sw, const uint16_t *b) {
    float t = round_bf16((float)a * s) * sw;
    return float_to_bf16(b ? t + bf16_to_float(*b) : t);
}

int dq_int8_output_bf16(const int32_t *acc, const float *sx, const float *sw, const uint16_t *bias,
                        int64_t r0, int64_t r1, int64_t n, uint16_t *y, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        const int32_t *a = acc + r * n;
        uint16_t *yr = y + r * ldy;
        for (int64_t j = 0; j < n; j++) yr[j] = int8_out(a[j], sx[r], sw[j], bias ? bias + j : 0);
    }
    return 0;
}

/* One token x bf16 [K] through int8 dynamic: channels [r0, r1) of q int8 [N, K] -> y bf16 [N].
   Each thread quantizes the token itself (K values: ~1 us, against a barrier between a
   quantize pass and the product), widens it to int16 once, then streams its weight rows.
   The numbers of quantize_rows + the product + dq_int8_output_bf16. Returns 1 when the token
   holds a NaN or an infinity, or when out of memory (torch's ops then). */
int dq_int8_dynamic_row_bf16(const uint16_t *x, int64_t k, const int8_t *q, const float *sw,
                             const uint16_t *bias, int64_t r0, int64_t r1, uint16_t *y) {
    float s;
    if (dq_row_scale_bf16(x, k, &s)) return 1;
    int8_t *xq = malloc((size_t)k * 3);  /* the codes, then the same widened (2-byte aligned) */
    if (!xq) return 1;
    int16_t *xw = (int16_t *)(xq + k + (k & 1));
    quantize_run(x, k, 1.0f / s, xq);
    for (int64_t j = 0; j < k; j++) xw[j] = xq[j];
    for (int64_t r = r0; r < r1; r++)
        y[r] = int8_out(dq_int8_dot_row(xw, q + r * k, k), s, sw[r], bias ? bias + r : 0);
    free(xq);
    return 0;
}

/* -- the integer product where torch._int_mm is a generic loop ------------------------------ */
#if defined(__AVX2__)
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

#define MADD(S, W, X) S = _mm256_add_epi32(S, _mm256_madd_epi16(W, X))
#endif

/* One token's int32 sum with one weight row, read as a stream (prefetched AHEAD bytes on, as
   the one-row float products): the one-token product of int8 dynamic. Exact, in any order. */
int32_t dq_int8_dot_row(const int16_t *xw, const int8_t *qr, int64_t k) {
    int64_t j = 0;
    int32_t s = 0;
#if defined(__AVX2__)
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;  /* two partial sums in flight */
    for (; j + 32 <= k; j += 32) {
        _mm_prefetch((const char *)(qr + j + AHEAD), _MM_HINT_T0);
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + j)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + j + 16)));
        MADD(s0, w0, _mm256_loadu_si256((const __m256i *)(xw + j)));
        MADD(s1, w1, _mm256_loadu_si256((const __m256i *)(xw + j + 16)));
    }
    s = hsum_epi32(_mm256_add_epi32(s0, s1));
#endif
    for (; j < k; j++) s += (int32_t)xw[j] * qr[j];
    return s;
}

/* int8 dynamic's product for a few tokens where torch._int_mm is a generic loop (no VNNI):
   acc[i, r] = sum_j x[i, j] q[r, j] for tokens i < m and channels [r0, r1), in int32 (exact,
   in any order). xw int16 [m, k]: the tokens' int8 codes widened once by the caller, so each
   weight row is widened once and multiplied into four tokens at a time, two rows at a time;
   the tokens and rows left over go one at a time. */
static void int8_dot_tokens(const int16_t *xw, int64_t m, const int8_t *qr, int64_t k,
                            int32_t *acc, int64_t ldacc) {
    for (int64_t i = 0; i < m; i++) acc[i * ldacc] = dq_int8_dot_row(xw + i * k, qr, k);
}

#if defined(__AVX2__)
/* two weight rows (qr, qr + k) x four tokens at a time: each token load serves two rows
   (~20% fewer instructions per product than one row) */
static void int8_dot2_avx2(const int16_t *xw, int64_t m, const int8_t *qr, int64_t k,
                           int32_t *acc, int64_t ldacc) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const int16_t *x0 = xw + i * k;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        __m256i t0 = s0, t1 = s0, t2 = s0, t3 = s0;
        for (int64_t j = 0; j < k; j += 16) {
            __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + j)));
            __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qr + k + j)));
            __m256i x = _mm256_loadu_si256((const __m256i *)(x0 + j));
            MADD(s0, w, x);
            MADD(t0, v, x);
            x = _mm256_loadu_si256((const __m256i *)(x0 + k + j));
            MADD(s1, w, x);
            MADD(t1, v, x);
            x = _mm256_loadu_si256((const __m256i *)(x0 + 2 * k + j));
            MADD(s2, w, x);
            MADD(t2, v, x);
            x = _mm256_loadu_si256((const __m256i *)(x0 + 3 * k + j));
            MADD(s3, w, x);
            MADD(t3, v, x);
        }
        int32_t *a = acc + i * ldacc;
        a[0] = hsum_epi32(s0), a[1] = hsum_epi32(t0);
        a[ldacc] = hsum_epi32(s1), a[ldacc + 1] = hsum_epi32(t1);
        a[2 * ldacc] = hsum_epi32(s2), a[2 * ldacc + 1] = hsum_epi32(t2);
        a[3 * ldacc] = hsum_epi32(s3), a[3 * ldacc + 1] = hsum_epi32(t3);
    }
    if (i < m) {
        int8_dot_tokens(xw + i * k, m - i, qr, k, acc + i * ldacc, ldacc);
        int8_dot_tokens(xw + i * k, m - i, qr + k, k, acc + i * ldacc + 1, ldacc);
    }
}
#endif

/* Tokens in blocks of DOT_TOKENS (64 x 3072 int16 = 384 KB: a core's L2) with the thread's
   weight rows (from L3) under each: 1280 tokens in one block took 1.4x the time. */
#define DOT_TOKENS 64

int dq_int8_dot_rows(const int16_t *xw, int64_t m, const int8_t *q, int64_t k, int64_t r0,
                     int64_t r1, int32_t *acc, int64_t ldacc) {
    for (int64_t i0 = 0; i0 < m; i0 += DOT_TOKENS) {
        int64_t mb = m - i0 < DOT_TOKENS ? m - i0 : DOT_TOKENS;
        const int16_t *xb = xw + i0 * k;
        int32_t *ab = acc + i0 * ldacc;
        for (int64_t r = r0; r < r1; r++) {
#if defined(__AVX2__)
            if (k % 16 == 0 && r + 1 < r1) {
                int8_dot2_avx2(xb, mb, q + r * k, k, ab + r, ldacc);
                r++;
                continue;
            }
#endif
            int8_dot_tokens(xb, mb, q + r * k, k, ab + r, ldacc);
        }
    }
    return 0;
}
