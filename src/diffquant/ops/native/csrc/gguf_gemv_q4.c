/* The one-row products of GGUF Q4_0, Q4_1 and Q4_K weights on a CPU (gguf_gemv.c has Q8_0 and
   Q6_K and the entry point, dq_gemv, which calls dq_gemv_q4 here for these types): x [1, K] @
   W.T reading the stored blocks in place, rows [r0, r1) per call. The lane order of the sums is
   gguf_gemv.c's (its opening comment). */
#include "gguf.h"

/* Q4_1 and Q4_K: each weight is the reference's float32 value, made by gguf.h's block decode
   (or its vector form in gguf_decode.c: the same float32 ops), and element k of a row is summed
   as acc[k % LANES] = fma(w_k, x_k, acc[k % LANES]); Q4_0 below. These rows read 0.56 (Q4_0, Q4_K) or 0.63
   (Q4_1) bytes a weight in place: no int4pack copy of the blocks is made for one row. */
static inline int q4_size(int qtype) { return qtype == Q4_0 ? 18 : qtype == Q4_1 ? 20 : 144; }

/* Q4_0 is Q8_0's order with the codes u - 8 (exact in float): lane (g % 4) * 16 + i gets
   d * (c[i] x[i] + c[16 + i] x[16 + i]), the scale once per two values (~3.5 vector ops per 8
   weights instead of 5) */
static float gemv_row_q4_0_portable(const uint8_t *b, int64_t n_blocks, const float *x) {
    float acc[LANES] = {0};
    for (int64_t g = 0; g < n_blocks; g++, b += 18, x += 32) {
        const float d = half_to_float(b);
        const uint8_t *q = b + 2;
        float *a = acc + (g % 4) * 16;
        for (int i = 0; i < 16; i++) {
            float t = (float)((int)(q[i] & 0x0f) - 8) * x[i];
            t = __builtin_fmaf((float)((int)(q[i] >> 4) - 8), x[16 + i], t);
            a[i] = __builtin_fmaf(t, d, a[i]);
        }
    }
    return sum_lanes(acc);
}

static float gemv_row_q4_portable(int qtype, const uint8_t *b, int64_t n_blocks, const float *x) {
    if (qtype == Q4_0) return gemv_row_q4_0_portable(b, n_blocks, x);
    float acc[LANES] = {0}, w[256];
    const int size = q4_size(qtype), elems = qtype == Q4_K ? 256 : 32;
    for (int64_t g = 0; g < n_blocks; g++, b += size) {
        if (qtype == Q4_0) block_q4_0(b, w);
        else if (qtype == Q4_1) block_q4_1(b, w);
        else block_q4_k(b, w);
        for (int i = 0; i < elems; i++) {
            int64_t at = g * elems + i;
            acc[at % LANES] = __builtin_fmaf(w[i], x[at], acc[at % LANES]);
        }
    }
    return sum_lanes(acc);
}

#ifdef HAVE_GGUF_AVX512
/* a Q4_0 / Q4_1 block's 32 values as decode_small_avx512 makes them */
static inline void q4_block16(int qtype, const uint8_t *b, __m512 *lo, __m512 *hi) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    __m512 d = half_broadcast(b);
    __m128i q = _mm_loadu_si128((const __m128i *)(b + (qtype == Q4_0 ? 2 : 4)));
    __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
    __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
    if (qtype == Q4_0) {
        const __m512 eight = _mm512_set1_ps(8.0f);
        *lo = _mm512_mul_ps(d, _mm512_sub_ps(l, eight));
        *hi = _mm512_mul_ps(d, _mm512_sub_ps(h, eight));
    } else {
        __m512 m = half_broadcast(b + 2);
        *lo = _mm512_add_ps(_mm512_mul_ps(d, l), m);
        *hi = _mm512_add_ps(_mm512_mul_ps(d, h), m);
    }
}

/* a Q4_0 block's pair sums c[i] x[i] + c[16 + i] x[16 + i], c = u - 8 (the portable order) */
static inline __m512 q4_0_pair(const uint8_t *b, const float *x) {
    const __m128i low4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
    __m128i lo = _mm_sub_epi8(_mm_and_si128(q, low4), eight);
    __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), low4), eight);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), _mm512_loadu_ps(x + 16),
                           _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                                         _mm512_loadu_ps(x)));
}

static float gemv_row_q4_0(const uint8_t *b, int64_t n_blocks, const float *x) {
    return gemv_row_blocks32(q4_0_pair, 18, b, n_blocks, x);
}

/* lanes 0-15, 16-31 (even blocks), 32-47, 48-63 (odd blocks): the portable order */
static float gemv_row_q4(int qtype, const uint8_t *b, int64_t n_blocks, const float *x) {
    if (qtype == Q4_0) return gemv_row_q4_0(b, n_blocks, x);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, lo, hi;
    if (qtype == Q4_K) {
        float w[256] __attribute__((aligned(64)));
        for (int64_t g = 0; g < n_blocks; g++, b += 144, x += 256) {
            for (int line = 0; line < 144; line += 64) _mm_prefetch((const char *)(b + AHEAD + line), _MM_HINT_T0);
            block_q4_k(b, w);
            for (int i = 0; i < 256; i += 64) {
                a0 = _mm512_fmadd_ps(_mm512_load_ps(w + i), _mm512_loadu_ps(x + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_load_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_load_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_load_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
            }
        }
        return sum_registers(a0, a1, a2, a3);
    }
    const int size = q4_size(qtype);
    int64_t g = 0;
    for (; g + 1 < n_blocks; g += 2, b += 2 * size, x += 64) {
        _mm_prefetch((const char *)(b + AHEAD), _MM_HINT_T0);
        q4_block16(qtype, b, &lo, &hi);
        a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), a0);
        a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), a1);
        q4_block16(qtype, b + size, &lo, &hi);
        a2 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32), a2);
        a3 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 48), a3);
    }
    if (g < n_blocks) {
        q4_block16(qtype, b, &lo, &hi);
        a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), a0);
        a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), a1);
    }
    return sum_registers(a0, a1, a2, a3);
}
#endif

#ifdef HAVE_GGUF_AVX2

#define FMA8(A, W, X) A = _mm256_fmadd_ps((W), _mm256_loadu_ps(X), A)

/* Q4_K sub-blocks 2j (low nibbles, d0 u - n0) and 2j + 1 (high, d1 u - n1) of 32 values each
   as block_q4_k makes them, 8 at a time: v[0..3] then v[4..7] */
static inline void q4_k_pair8(const uint8_t *q, float d0, float n0, float d1, float n1, __m256 *v) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256 D0 = _mm256_set1_ps(d0), N0 = _mm256_set1_ps(n0), D1 = _mm256_set1_ps(d1),
                 N1 = _mm256_set1_ps(n1);
    for (int h = 0; h < 2; h++) {
        __m128i c = _mm_loadu_si128((const __m128i *)(q + 16 * h));
        __m128i lo = _mm_and_si128(c, low4), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low4);
        __m256 u0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 u1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 u2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 u3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        v[2 * h] = _mm256_sub_ps(_mm256_mul_ps(D0, u0), N0);
        v[2 * h + 1] = _mm256_sub_ps(_mm256_mul_ps(D0, u1), N0);
        v[4 + 2 * h] = _mm256_sub_ps(_mm256_mul_ps(D1, u2), N1);
        v[4 + 2 * h + 1] = _mm256_sub_ps(_mm256_mul_ps(D1, u3), N1);
    }
}

/* lanes 8j .. 8j + 7 in register aj: even blocks a0-a3, odd blocks a4-a7 (the portable order);
   one copy per type (QTYPE a constant), so no type test runs per block */
#define Q4_ROW_AVX2(NAME, QTYPE)                                                          \
static float NAME(const uint8_t *b, int64_t n_blocks, const float *x) {                  \
    __m256 a[8], v[8];                                                                    \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0; \
    const int size = q4_size(QTYPE);                                                      \
    int64_t g = 0;                                                                        \
    if (QTYPE == Q4_K) {                                                                  \
        for (; g < n_blocks; g++, b += 144, x += 256) {                                   \
            _mm_prefetch((const char *)(b + AHEAD), _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(b + AHEAD + 64), _MM_HINT_T0);                    \
            _mm_prefetch((const char *)(b + AHEAD + 128), _MM_HINT_T0);                   \
            float d = half_to_float(b), dmin = half_to_float(b + 2);                      \
            for (int j = 0; j < 4; j++) {                                                 \
                int s0, m0, s1, m1;                                                       \
                scale_min_k4(2 * j, b + 4, &s0, &m0);                                     \
                scale_min_k4(2 * j + 1, b + 4, &s1, &m1);                                 \
                q4_k_pair8(b + 16 + 32 * j, d * (float)s0, dmin * (float)m0,              \
                           d * (float)s1, dmin * (float)m1, v);                           \
                const float *xj = x + 64 * j;                                             \
                FMA8(a0, v[0], xj), FMA8(a1, v[1], xj + 8), FMA8(a2, v[2], xj + 16);      \
                FMA8(a3, v[3], xj + 24), FMA8(a4, v[4], xj + 32), FMA8(a5, v[5], xj + 40);\
                FMA8(a6, v[6], xj + 48), FMA8(a7, v[7], xj + 56);                         \
            }                                                                             \
        }                                                                                 \
    } else {                                                                              \
        for (; g + 1 < n_blocks; g += 2, b += 2 * size, x += 64) {                        \
            _mm_prefetch((const char *)(b + AHEAD), _MM_HINT_T0);                         \
            q4_block8(QTYPE, b, v);                                                       \
            FMA8(a0, v[0], x), FMA8(a1, v[1], x + 8), FMA8(a2, v[2], x + 16);             \
            FMA8(a3, v[3], x + 24);                                                       \
            q4_block8(QTYPE, b + size, v);                                                \
            FMA8(a4, v[0], x + 32), FMA8(a5, v[1], x + 40), FMA8(a6, v[2], x + 48);       \
            FMA8(a7, v[3], x + 56);                                                       \
        }                                                                                 \
        if (g < n_blocks) {                                                               \
            q4_block8(QTYPE, b, v);                                                       \
            FMA8(a0, v[0], x), FMA8(a1, v[1], x + 8), FMA8(a2, v[2], x + 16);             \
            FMA8(a3, v[3], x + 24);                                                       \
        }                                                                                 \
    }                                                                                     \
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3, a[4] = a4, a[5] = a5, a[6] = a6, a[7] = a7; \
    return sum_registers8(a);                                                             \
}
/* a Q4_0 block's pair sums for lanes i and 8 + i (i < 8), c = u - 8: the portable order */
static inline void q4_0_pair8(const uint8_t *b, const float *x, __m256 *lo, __m256 *hi) {
    const __m128i low4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
    __m128i l = _mm_sub_epi8(_mm_and_si128(q, low4), eight);                 /* c[0..15] */
    __m128i h = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), low4), eight);  /* c[16..31] */
#define C8(V) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(V))
    *lo = _mm256_fmadd_ps(C8(h), _mm256_loadu_ps(x + 16), _mm256_mul_ps(C8(l), _mm256_loadu_ps(x)));
    *hi = _mm256_fmadd_ps(C8(_mm_srli_si128(h, 8)), _mm256_loadu_ps(x + 24),
                          _mm256_mul_ps(C8(_mm_srli_si128(l, 8)), _mm256_loadu_ps(x + 8)));
#undef C8
}

static float gemv_row_q4_0(const uint8_t *b, int64_t n_blocks, const float *x) {
    return gemv_row_blocks32_8(q4_0_pair8, 18, b, n_blocks, x);
}
Q4_ROW_AVX2(gemv_row_q4_1, Q4_1)
Q4_ROW_AVX2(gemv_row_q4_k, Q4_K)

static float gemv_row_q4(int qtype, const uint8_t *b, int64_t n_blocks, const float *x) {
    return qtype == Q4_0 ? gemv_row_q4_0(b, n_blocks, x)
         : qtype == Q4_1 ? gemv_row_q4_1(b, n_blocks, x) : gemv_row_q4_k(b, n_blocks, x);
}
#undef FMA8
#endif

/* dq_gemv's rows for Q4_0, Q4_1 and Q4_K (its arguments; gguf.h declares it) */
int dq_gemv_q4(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
               const float *x, void *out, int portable, int out_bf16, const uint16_t *bias) {
    const int size = q4_size(qtype);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * n_blocks * size;
        float y;
#if defined(HAVE_GGUF_AVX512) || defined(HAVE_GGUF_AVX2)
        if (!portable) y = gemv_row_q4(qtype, b, n_blocks, x);
        else
#endif
            y = gemv_row_q4_portable(qtype, b, n_blocks, x);
        store_result(out, r, y, out_bf16, bias);
    }
    return 0;
}
