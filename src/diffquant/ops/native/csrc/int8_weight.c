/* Integer weight formats decoded into a bf16 buffer on a CPU, compiled on first use by
   ops/native.py. Each repeats its reference's bf16 math (torch's bf16 ops compute in float32
   and round to bf16 after every op), so the weight it writes is bit-identical:

   - torchao int4 (tinygemm): w = bf16(bf16((u - 8) * s) + z), u the nibble of column 2j (low)
     or 2j + 1 (high) of packed [N, K/2], (s, z) one per group of columns;
   - row-scaled int8 (quanto int8, modelopt INT8): w = bf16(q * s), one s per row (or one);
   - quanto int4/int2: w = bf16(bf16(c * s) - shift) per group row of g values, group row
     i + j * P held in bits j * bits of byte row i of packed [P, g].

   And the one-row product of int8 rows with a scale per row (torchao int8, quanto int8), and
   torchao int8's two output ops after its matmul on the integers as one pass:
   y = bf16(bf16(y * s) + bias), s the channel scale in bf16.

   Why C: torch runs each as 3-4 passes over the weight (the bf16 ones convert to float32 and
   back each time): 8-10 ms per 3072 x 3072 against a 15 ms bf16 product on an AMX CPU; here one
   pass. Rows [r0, r1) of the weight per call, so callers split rows across threads. */
#include "bf16.h"
#include "kernels.h"

#ifdef __AVX512F__
#include <immintrin.h>

/* one group of tinygemm codes (group % 32 == 0): 16 bytes -> 32 values per step, the low
   nibble of byte j being column 2j; the scalar loop's ops lane by lane */
static void tinygemm_group(const uint8_t *pg, int64_t group, float s, float z, uint16_t *og) {
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), eight = _mm512_set1_ps(8.0f);
    const __m128i nib = _mm_set1_epi8(0x0f);
    for (int64_t j = 0; j < group / 2; j += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(pg + j));
        __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
        __m128i half[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int h = 0; h < 2; h++) {
            __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(half[h]));
            __m512 t = round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(u, eight), vs));
            store_bf16x16(og + 2 * j + 16 * h, _mm512_add_ps(t, vz));
        }
    }
}
#endif

/* packed uint8 [N, K/2], scale/zero bf16 [N, K/group] -> out bf16 rows [r0, r1), stride ld */
int dq_int4_tinygemm_bf16(const uint8_t *packed, int64_t k, int64_t group, const uint16_t *scale,
                          const uint16_t *zero, int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    if (k % group || group % 2) return -1;
    int64_t groups = k / group;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * (k / 2);
        uint16_t *o = out + r * ld;
        for (int64_t g = 0; g < groups; g++) {
            float s = bf16_to_float(scale[r * groups + g]), z = bf16_to_float(zero[r * groups + g]);
            const uint8_t *pg = p + g * group / 2;
            uint16_t *og = o + g * group;
#ifdef __AVX512F__
            if (group % 32 == 0) {
                tinygemm_group(pg, group, s, z, og);
                continue;
            }
#endif
            for (int64_t j = 0; j < group / 2; j++) {
                og[2 * j] = float_to_bf16(round_bf16((float)((pg[j] & 0x0f) - 8) * s) + z);
                og[2 * j + 1] = float_to_bf16(round_bf16((float)((pg[j] >> 4) - 8) * s) + z);
            }
        }
    }
    return 0;
}

/* q int8 [N, k], scale bf16 at scale[r * scale_step] (step 1: per row, 0: one for all) */
int dq_int8_rows_bf16(const int8_t *q, int64_t k, const uint16_t *scale, int64_t scale_step,
                      int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    for (int64_t r = r0; r < r1; r++) {
        float s = bf16_to_float(scale[r * scale_step]);
        const int8_t *qr = q + r * k;
        uint16_t *o = out + r * ld;
        int64_t j = 0;
#ifdef __AVX512F__
        for (__m512 vs = _mm512_set1_ps(s); j + 16 <= k; j += 16)
            store_bf16x16(o + j, _mm512_mul_ps(int8x16_to_float(qr + j), vs));
#endif
        for (; j < k; j++) o[j] = float_to_bf16((float)qr[j] * s);
    }
    return 0;
}

/* group rows [a, b) of quanto's packing -> out bf16 [R, g] contiguous (the weight's rows) */
int dq_quanto_bits_bf16(const uint8_t *packed, int64_t p, int64_t g, int bits,
                        const uint16_t *scale, const uint16_t *shift, int64_t a, int64_t b,
                        uint16_t *out) {
    if (bits != 2 && bits != 4) return -1;
    const int mask = (1 << bits) - 1;
    for (int64_t i = a; i < b; i++) {
        const uint8_t *src = packed + (i % p) * g;
        int sh = (int)(i / p) * bits;
        float s = bf16_to_float(scale[i]), t = bf16_to_float(shift[i]);
        uint16_t *o = out + (i - a) * g;
        int64_t j = 0;
#ifdef __AVX512F__
        const __m512i vsh = _mm512_set1_epi32(sh), vmask = _mm512_set1_epi32(mask);
        const __m512 vs = _mm512_set1_ps(s), vt = _mm512_set1_ps(t);
        for (; j + 16 <= g; j += 16) {
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + j)));
            c = _mm512_and_si512(_mm512_srlv_epi32(c, vsh), vmask);
            __m512 v = round_bf16x16(_mm512_mul_ps(_mm512_cvtepi32_ps(c), vs));
            store_bf16x16(o + j, _mm512_sub_ps(v, vt));
        }
#endif
        for (; j < g; j++)
            o[j] = float_to_bf16(round_bf16((float)((src[j] >> sh) & mask) * s) - t);
    }
    return 0;
}

/* One row of x (float32 [K]) times int8 rows: out[r] = bf16(scale[r] * sum_j q[r, j] x[j]), the
   numbers of torch._weight_int8pack_mm(x, q, scale) (a float32 sum, then the bf16 scale, one
   rounding), element j summed into lane j % LANES. Why not that kernel: it reads the weight at
   ~70% of this loop's rate from memory (no software prefetch) and needs 64-byte alignment. */
static float int8_row_portable(const int8_t *q, int64_t k, const float *x) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= k; j += LANES)  /* lane-major inner loop: the compiler vectorises it */
        for (int l = 0; l < LANES; l++) acc[l] = __builtin_fmaf((float)q[j + l], x[j + l], acc[l]);
    for (int l = 0; j + l < k; l++) acc[l] = __builtin_fmaf((float)q[j + l], x[j + l], acc[l]);
    return sum_lanes(acc);
}

#ifdef __AVX512F__
static float int8_row(const int8_t *q, int64_t k, const float *x) {  /* k % 64 == 0 */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; j += 64) {
        _mm_prefetch((const char *)(q + j + AHEAD), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(int8x16_to_float(q + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(int8x16_to_float(q + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(int8x16_to_float(q + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(int8x16_to_float(q + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    return sum_registers(a0, a1, a2, a3);
}
#endif

#ifdef HAVE_AVX2_ROWS
/* gcc's vectorised portable loop ran at ~5 GB/s of weights on Zen 3, half a bf16 product's
   rate: it does not prefetch and it spills the accumulators. k % 64 == 0 */
static float int8_row(const int8_t *q, int64_t k, const float *x) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 64) {
        _mm_prefetch((const char *)(q + j + AHEAD), _MM_HINT_T0);
        for (int i = 0; i < 8; i++)
            a[i] = _mm256_fmadd_ps(int8x8_to_float(q + j + 8 * i), _mm256_loadu_ps(x + j + 8 * i), a[i]);
    }
    return sum_registers8(a);
}
#endif

/* q int8 [N, K], scale bf16 [N] (NULL: 1), x float32 [K] -> out bf16 [N], rows [r0, r1):
   y = bf16(sum * scale); then, each rounded to bf16 as torch's ops, y * post and y + bias where
   given (bf16 [N], NULL: none): torchao int8's output scale and bias, or quanto's unfused bias,
   in this one call instead of a second pass. portable = 1 forces the portable loop. */
int dq_int8_gemv(const int8_t *q, int64_t k, const uint16_t *scale, const float *x, int64_t r0,
                 int64_t r1, uint16_t *out, int portable, const uint16_t *post,
                 const uint16_t *bias) {
    float (*row)(const int8_t *, int64_t, const float *) = int8_row_portable;
#if defined(__AVX512F__) || defined(HAVE_AVX2_ROWS)
    if (!portable && k % 64 == 0) row = int8_row;
#endif
    for (int64_t r = r0; r < r1; r++) {
        float y = row(q + r * k, k, x);
        if (scale) y *= bf16_to_float(scale[r]);
        if (post) y = round_bf16(y) * bf16_to_float(post[r]);
        out[r] = bf16_plus(y, bias ? bias + r : 0);
    }
    return 0;
}

/* y bf16 [M, ldy] rows [r0, r1), N columns, in place: y * scale (bf16 [N]) rounded to bf16,
   then + bias (bf16 [N], or none) rounded again: torch's y.mul_(s) then y.add_(bias). */
int dq_scale_rows_bf16(uint16_t *y, int64_t ldy, int64_t r0, int64_t r1, int64_t n,
                       const uint16_t *scale, const uint16_t *bias) {
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *yr = y + r * ldy;
        if (bias) {
            for (int64_t j = 0; j < n; j++)
                yr[j] = float_to_bf16(round_bf16(bf16_to_float(yr[j]) * bf16_to_float(scale[j]))
                                      + bf16_to_float(bias[j]));
        } else {
            for (int64_t j = 0; j < n; j++)
                yr[j] = float_to_bf16(bf16_to_float(yr[j]) * bf16_to_float(scale[j]));
        }
    }
    return 0;
}

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
