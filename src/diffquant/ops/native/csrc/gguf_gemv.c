/* The one-row products of GGUF Q8_0, Q6_K, Q4_0, Q4_1 and Q4_K weights on a CPU, compiled on
   first use by ops/native/build.py: x [1, K] @ W.T reading the stored blocks in place (no
   int4pack copy of the weight). Rows [r0, r1) of the weight per call, so callers split rows across
   threads. Q8_0 and Q6_K here, Q4_0, Q4_1 and Q4_K in gguf_gemv_q4.c; dq_gemv, at the end,
   takes every type. */
#include "gguf.h"

/* -- one-row products ------------------------------------------------------------------------ */
/* out[r] = sum_k x[k] * w[r, k] for rows [r0, r1) of the weight; x float32 [K]. Each weight is
   the reference's exact float32 value (a half-float scale times a small code: an exact
   product), decoded in registers and never stored, so a row costs one read of its blocks
   (Q8_0 1.06, Q6_K 0.82 bytes/weight against bf16's 2). Element k is summed in float32 into
   lane k % 64 (four vector accumulators that do not wait on each other, no reassociation); the
   lanes are added once per output. The AVX-512 kernels and the portable loop sum in this same
   order, so they give the same bits. */
/* Q8_0 one-row order: block g's 32 products pair up per lane i < 16, t = c[i] x[i] then
   t += c[16 + i] x[16 + i], and lane (g % 4) * 16 + i gets t * d. The scale multiplies once per
   two values, not once per value: the kernel does 3.5 vector ops per 16 weights, not 4. */
static float gemv_row_q8_0_portable(const uint8_t *b, int64_t n_blocks, const float *x) {
    float acc[LANES] = {0};
    for (int64_t g = 0; g < n_blocks; g++, b += 34, x += 32) {
        const float d = half_to_float(b);
        const int8_t *c = (const int8_t *)(b + 2);
        float *a = acc + (g % 4) * 16;
        for (int i = 0; i < 16; i++) {
            float t = (float)c[i] * x[i];
            t = __builtin_fmaf((float)c[16 + i], x[16 + i], t);
            a[i] = __builtin_fmaf(t, d, a[i]);
        }
    }
    return sum_lanes(acc);
}

#ifdef HAVE_GGUF_AVX512
/* Q6_K one-row order of the AVX-512 kernel: element k of a row into lane k % LANES, weight
   times x */
static float gemv_row_q6_k_portable(const uint8_t *b, int64_t n_blocks, const float *x) {
    float w[256], acc[LANES] = {0};
    for (int64_t g = 0; g < n_blocks; g++, b += 210) {
        block_q6_k(b, w);
        for (int i = 0; i < 256; i++) {
            int64_t at = g * 256 + i;
            acc[at % LANES] = __builtin_fmaf(w[i], x[at], acc[at % LANES]);
        }
    }
    return sum_lanes(acc);
}
#else
/* block b's 256 codes minus 32 (block_q6_k's order) and its 16 sub-block scales d * sc[j] */
static void q6_k_codes(const uint8_t *b, int8_t *c, float *s) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, c += 128)
        for (int l = 0; l < 32; l++) {
            c[l] = (int8_t)(((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32);
            c[l + 32] = (int8_t)(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            c[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            c[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    float d = half_to_float(b + 208);
    for (int j = 0; j < 16; j++) s[j] = d * (float)((const int8_t *)(b + 192))[j];
}

/* Q6_K one-row order elsewhere: the scale multiplies once per two codes, not once per code.
   Sub-block j (16 values) of a block: lane l < 8 sums t = c[l] x[l] + c[8 + l] x[8 + l] (the
   integer codes, exact as floats) and lane (j % 8) * 8 + l gets t * s[j]. The weight is never
   rounded on its own (the reference's s * c): the sums differ from the reference's by float32
   rounding only. On Zen 3 this is 3.5 vector ops per 8 weights, not 4: the kernel is bound by
   its vector ops (~2 a cycle there), not by memory. */
static float gemv_row_q6_k_portable(const uint8_t *b, int64_t n_blocks, const float *x) {
    float acc[LANES] = {0}, s[16];
    int8_t c[256];
    for (int64_t g = 0; g < n_blocks; g++, b += 210, x += 256) {
        q6_k_codes(b, c, s);
        for (int j = 0; j < 16; j++)
            for (int l = 0; l < 8; l++) {
                int e = 16 * j + l;
                float t = (float)c[e] * x[e];
                t = __builtin_fmaf((float)c[e + 8], x[e + 8], t);
                acc[(j % 8) * 8 + l] = __builtin_fmaf(t, s[j], acc[(j % 8) * 8 + l]);
            }
    }
    return sum_lanes(acc);
}
#endif

#ifdef HAVE_GGUF_AVX512
/* one Q8_0 block's lane partials, t = c[0:16] x[0:16] + c[16:32] x[16:32] (portable order) */
static inline __m512 q8_pair(const uint8_t *b, const float *x) {
    return _mm512_fmadd_ps(int8x16_to_float(b + 18), _mm512_loadu_ps(x + 16),
                           _mm512_mul_ps(int8x16_to_float(b + 2), _mm512_loadu_ps(x)));
}

static float gemv_row_q8_0(const uint8_t *b, int64_t n_blocks, const float *x) {
    return gemv_row_blocks32(q8_pair, 34, b, n_blocks, x);
}

/* 16 codes (bytes, minus 32) of a sub-block of scale s, times x[0:16], into A */
static inline __m512 q6_sub(__m128i codes, float s, const float *x, __m512 A) {
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)));
    return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), A);
}

/* Per 16 weights ~6 vector ops: the sub-block scales d * sc[j] are made once per block and
   broadcast from memory (a load, no ALU op), and the 6-bit codes are put together 64 at a time. */
static float gemv_row_q6_k(const uint8_t *b, int64_t n_blocks, const float *x) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), bits45 = _mm512_set1_epi8(0x30),
                  off = _mm512_set1_epi8(32);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float dl[16] __attribute__((aligned(64)));
    for (int64_t g = 0; g < n_blocks; g++, b += 210, x += 256) {
        for (int line = 0; line < 210; line += 64) _mm_prefetch((const char *)(b + AHEAD + line), _MM_HINT_T0);
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192))));
        _mm512_store_ps(dl, _mm512_mul_ps(half_broadcast(b + 208), sc));  /* d * sc[j], as block_q6_k */
        for (int h = 0; h < 2; h++) {  /* 128 values from ql[64h : 64h + 64], qh[32h : 32h + 32] */
            __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            /* high bits 4-5 of elements 128h + l (l < 64) and 128h + 64 + l, block_q6_k's order */
            __m512i h01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi16(qh, 4)),
                                             _mm256_slli_epi16(qh, 2), 1);
            __m512i h23 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
            __m512i v01 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(ql, low4),
                                                          _mm512_and_si512(h01, bits45)), off);
            __m512i v23 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                                          _mm512_and_si512(h23, bits45)), off);
            const float *xh = x + 128 * h, *dh = dl + 8 * h;
            /* 16-byte lane i of v01 is sub-block 8h + i, of v23 8h + 4 + i: accumulator i */
            a0 = q6_sub(_mm512_castsi512_si128(v01), dh[0], xh, a0);
            a1 = q6_sub(_mm512_extracti32x4_epi32(v01, 1), dh[1], xh + 16, a1);
            a2 = q6_sub(_mm512_extracti32x4_epi32(v01, 2), dh[2], xh + 32, a2);
            a3 = q6_sub(_mm512_extracti32x4_epi32(v01, 3), dh[3], xh + 48, a3);
            a0 = q6_sub(_mm512_castsi512_si128(v23), dh[4], xh + 64, a0);
            a1 = q6_sub(_mm512_extracti32x4_epi32(v23, 1), dh[5], xh + 80, a1);
            a2 = q6_sub(_mm512_extracti32x4_epi32(v23, 2), dh[6], xh + 96, a2);
            a3 = q6_sub(_mm512_extracti32x4_epi32(v23, 3), dh[7], xh + 112, a3);
        }
    }
    return sum_registers(a0, a1, a2, a3);
}
#endif

#ifdef HAVE_GGUF_AVX2

/* one Q8_0 block's lane partials for lanes i and 8 + i (i < 8), the portable order */
static inline void q8_pair8(const uint8_t *b, const float *x, __m256 *lo, __m256 *hi) {
    const uint8_t *c = b + 2;
    *lo = _mm256_fmadd_ps(int8x8_to_float(c + 16), _mm256_loadu_ps(x + 16),
                          _mm256_mul_ps(int8x8_to_float(c), _mm256_loadu_ps(x)));
    *hi = _mm256_fmadd_ps(int8x8_to_float(c + 24), _mm256_loadu_ps(x + 24),
                          _mm256_mul_ps(int8x8_to_float(c + 8), _mm256_loadu_ps(x + 8)));
}

static float gemv_row_q8_0(const uint8_t *b, int64_t n_blocks, const float *x) {
    return gemv_row_blocks32_8(q8_pair8, 34, b, n_blocks, x);
}

/* block b's codes minus 32, block_q6_k's order: 4 x 32 bytes per half */
static inline void q6_codes8(const uint8_t *b, int8_t *codes) {
    /* a code is its low nibble plus 16 * (its two high bits) - 32; the second term comes from a
       16-entry table indexed by a nibble of qh, which holds two codes' high bits: one vpshufb
       where shifting, masking and subtracting took three ops */
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i lut0 = _mm256_broadcastsi128_si256(            /* the pair at bits 0-1 */
        _mm_setr_epi8(-32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16));
    const __m256i lut1 = _mm256_broadcastsi128_si256(            /* the pair at bits 2-3 */
        _mm_setr_epi8(-32, -32, -32, -32, -16, -16, -16, -16, 0, 0, 0, 0, 16, 16, 16, 16));
    for (int h = 0; h < 2; h++, codes += 128) {
        __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        /* the high-bit pairs of quarters 0, 1 are bits 0-1, 2-3 of qh (hlo); of 2, 3 bits 4-7 */
        __m256i hlo = _mm256_and_si256(qh, low4);
        __m256i hhi = _mm256_and_si256(_mm256_srli_epi16(qh, 4), low4);
        __m256i lo0 = _mm256_and_si256(ql0, low4), lo1 = _mm256_and_si256(ql1, low4);
        __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4);
        __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4);
        __m256i *out = (__m256i *)codes;
        _mm256_store_si256(out, _mm256_add_epi8(lo0, _mm256_shuffle_epi8(lut0, hlo)));
        _mm256_store_si256(out + 1, _mm256_add_epi8(lo1, _mm256_shuffle_epi8(lut1, hlo)));
        _mm256_store_si256(out + 2, _mm256_add_epi8(hi0, _mm256_shuffle_epi8(lut0, hhi)));
        _mm256_store_si256(out + 3, _mm256_add_epi8(hi1, _mm256_shuffle_epi8(lut1, hhi)));
    }
}

/* sub-blocks j, j + 1 (codes C, scales S, x X) into accumulators A0, A1: the portable order */
#define Q6_PAIR(C, S, X, A0, A1)                                                          \
    do {                                                                                  \
        __m256 t0 = _mm256_mul_ps(int8x8_to_float(C), _mm256_loadu_ps(X));               \
        __m256 t1 = _mm256_mul_ps(int8x8_to_float((C) + 16), _mm256_loadu_ps((X) + 16));  \
        t0 = _mm256_fmadd_ps(int8x8_to_float((C) + 8), _mm256_loadu_ps((X) + 8), t0);     \
        t1 = _mm256_fmadd_ps(int8x8_to_float((C) + 24), _mm256_loadu_ps((X) + 24), t1);   \
        A0 = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(S), A0);                             \
        A1 = _mm256_fmadd_ps(t1, _mm256_broadcast_ss((S) + 1), A1);                       \
    } while (0)

/* Two blocks at a time: their codes and scales are made and stored, then read back as loads
   (vpmovsxbd and a broadcast from memory: no shuffles). Stored and read in one step, the
   loads waited on the stores (17% slower); taken out of registers, the shuffles cost more. */
#define Q6_AHEAD 2
static float gemv_row_q6_k(const uint8_t *b, int64_t n_blocks, const float *x) {
    __m256 a[8];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    float dl[Q6_AHEAD * 16] __attribute__((aligned(32)));
    int8_t codes[Q6_AHEAD * 256] __attribute__((aligned(32)));
    for (int64_t g0 = 0; g0 < n_blocks; g0 += Q6_AHEAD) {
        int64_t nb = n_blocks - g0 < Q6_AHEAD ? n_blocks - g0 : Q6_AHEAD;
        for (int64_t g = 0; g < nb; g++) {
            const uint8_t *bb = b + (g0 + g) * 210;
            for (int line = 0; line < 210; line += 64) _mm_prefetch((const char *)(bb + AHEAD + line), _MM_HINT_T0);
            __m256 d = half_broadcast8(bb + 208);                     /* d * sc[j], as block_q6_k */
            _mm256_store_ps(dl + 16 * g, _mm256_mul_ps(d, int8x8_to_float(bb + 192)));
            _mm256_store_ps(dl + 16 * g + 8, _mm256_mul_ps(d, int8x8_to_float(bb + 200)));
            q6_codes8(bb, codes + 256 * g);
        }
        __asm__ __volatile__("" : : : "memory");  /* read them back: gcc would shuffle */
        for (int64_t i = 0; i < 2 * nb; i++) {  /* half i: sub-blocks 8i .. 8i + 7 */
            const int8_t *c = codes + 128 * i;
            const float *xh = x + 256 * g0 + 128 * i, *s = dl + 8 * i;
            Q6_PAIR(c, s, xh, a0, a1);
            Q6_PAIR(c + 32, s + 2, xh + 32, a2, a3);
            Q6_PAIR(c + 64, s + 4, xh + 64, a4, a5);
            Q6_PAIR(c + 96, s + 6, xh + 96, a6, a7);
        }
    }
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3, a[4] = a4, a[5] = a5, a[6] = a6, a[7] = a7;
    return sum_registers8(a);
}
#endif

/* Q8_0, Q6_K, Q4_0, Q4_1 or Q4_K; out [N] float32, or bf16 (rounded once) with out_bf16, then
   plus bias (bf16 [N] or NULL; bf16 output only) as torch's y.add_(bias). portable = 1 forces
   the portable loop (tests compare the two). Returns 0, or -1 for another type. */
int dq_gemv(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
            const float *x, void *out, int portable, int out_bf16, const uint16_t *bias) {
    if (qtype == Q4_0 || qtype == Q4_1 || qtype == Q4_K)  /* gguf_gemv_q4.c */
        return dq_gemv_q4(qtype, blocks, n_blocks, r0, r1, x, out, portable, out_bf16, bias);
    if (qtype != Q8_0 && qtype != Q6_K) return -1;
    float (*row)(const uint8_t *, int64_t, const float *) =
        qtype == Q8_0 ? gemv_row_q8_0_portable : gemv_row_q6_k_portable;
#if defined(HAVE_GGUF_AVX512) || defined(HAVE_GGUF_AVX2)
    if (!portable) row = qtype == Q8_0 ? gemv_row_q8_0 : gemv_row_q6_k;
#endif
    const int size = qtype == Q8_0 ? 34 : 210;
    for (int64_t r = r0; r < r1; r++)
        store_result(out, r, row(blocks + r * n_blocks * size, n_blocks, x), out_bf16, bias);
    return 0;
}
