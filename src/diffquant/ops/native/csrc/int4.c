/* 4-bit weights in groups of columns on a CPU, compiled on first use by ops/native/build.py:
   torchao int4's decode into a bf16 buffer and quanto's int4/int2 decode (each the reference's
   bf16 math, op for op: torch's bf16 ops compute in float32 and round after every op), and the
   one-row product of every format of the form w = (u - 8) * s + z (torchao int4, quanto int4,
   GGUF Q4_0 / Q4_1 / Q4_K as ops/cpu/int4.py and ops/cpu/gguf.py map them).

   Decodes (rows [r0, r1) of the weight per call):
   - torchao int4 (tinygemm): w = bf16(bf16((u - 8) * s) + z), u the nibble of column 2j (low)
     or 2j + 1 (high) of packed [N, K/2], (s, z) one per group of columns;
   - quanto int4/int2: w = bf16(bf16(c * s) - shift) per group row of g values, group row
     i + j * P held in bits j * bits of byte row i of packed [P, g].
   Why C: torch runs each as 3-4 passes over the weight; here one.

   The one-row product. Why: where the CPU has AVX2 but not AVX-512 (AMD Zen 3), torch's int4pack
   kernel takes one row of a 3072 x 3072 weight in ~0.75 ms on two cores (0.65-0.8x the bf16
   product), bound by its own arithmetic, not by the 5 MB it reads. This loop does three vector
   ops per 8 weights.

   Layout (ops/native/int4.py's pack_rows): packed uint8 [N, K/2], element 2i the low nibble of
   byte i and 2i + 1 the high one; the last element of every 8 (lane 7 below) stored xor 8. sz
   uint32 [N, K/group]: the bf16 bits of the group's scale (low half) and zero (high half), the
   values int4pack is given.

   The trick: the 8 elements of 4 bytes are broadcast to 8 lanes and lane l keeps its nibble in
   place (a mask, no shift): lane l < 7 holds u * 16^l, lane 7 (its nibble xor 8, read as the
   sign bits) (u - 8) * 2^28, each an exact float32 integer. Scaling a float32 product or sum by
   a power of two changes none of its roundings, so each run's lane sums T are taken scaled and
   multiplied back once per group. Groups of 32 (one run r of 32 elements, element 32r + 8j + l
   in lane l, j = 0..3), with X_l = ((x_0 + x_1) + x_2) + x_3 the lane's sum of the run's x:
       T_l = c_0 x_0, then T_l = fma(c_j, x_j, T_l) for j = 1, 2, 3
       A_l = fma(T_l * 16^-l, s, A_l)          (lane 7: * 2^-28)
       B_l = fma(X_l, fma(s, e_l, z), B_l)     (e_l = -8 for l < 7, 0 for lane 7)
   as sum_k ((u_k - 8) s + z) x_k = s sum u x - 8 s sum x + z sum x. Larger groups (2 runs or
   more): T_l = (T0_l + T1_l) + (T2_l + T3_l), Tj_l = fma(c_j, x_j, Tj_l) over the group's runs
   in order from 0, and X_l the runs' X_l added in order. Even runs (groups) go to (A, B)
   accumulator 0, odd ones to 1; y = per lane (A0 + A1) + (B0 + B1), lanes added
   ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)). The AVX2 loops and the portable ones do these
   operations in this order: the same bits. A row x with a value of magnitude 2^64 or more, or
   a NaN, is left to the caller's torch path (return 1): the scaled sums then could overflow
   where int4pack's do not. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

#define X_CAP 1024 /* per-run lane sums on the stack: K up to 4096 */

static const float INV[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 0x1p-28f};
static const float E[8] = {-8.0f, -8.0f, -8.0f, -8.0f, -8.0f, -8.0f, -8.0f, 0.0f};

static inline uint32_t word_at(const uint8_t *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* lane l's value of the 8 elements in the 4 bytes at p, as the vector loop converts it */
static inline float lane_code(const uint8_t *p, int l) {
    return (float)(int32_t)(word_at(p) & (0xfu << (4 * l)));
}

/* groups of 32 (one run each: GGUF's Q4_0 / Q4_1 / Q4_K) */
static float int4_row_portable(const uint8_t *p, const uint32_t *sz, int64_t runs,
                               const float *x, const float *X) {
    float A[2][8] = {{0}}, B[2][8] = {{0}};
    for (int64_t r = 0; r < runs; r++, p += 16, x += 32, X += 8) {
        uint32_t g = sz[r];
        float s = bf16_to_float((uint16_t)(g & 0xffff)), z = bf16_to_float((uint16_t)(g >> 16));
        for (int l = 0; l < 8; l++) {
            float t = lane_code(p, l) * x[l];
            for (int j = 1; j < 4; j++) t = __builtin_fmaf(lane_code(p + 4 * j, l), x[8 * j + l], t);
            A[r % 2][l] = __builtin_fmaf(t * INV[l], s, A[r % 2][l]);
            B[r % 2][l] = __builtin_fmaf(X[l], __builtin_fmaf(s, E[l], z), B[r % 2][l]);
        }
    }
    float f[8];
    for (int l = 0; l < 8; l++) f[l] = (A[0][l] + A[1][l]) + (B[0][l] + B[1][l]);
    return ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
}

/* groups of 2 runs or more (per >= 2): each lane's sums over the whole group, by position j of
   the 8 elements in the run (four chains that do not wait on each other), are scaled once per
   group, not once per run; XG holds the lane sums of x per group (the runs' X added in order) */
static float int4_row_groups_portable(const uint8_t *p, const uint32_t *sz, int64_t groups,
                                      int64_t per, const float *x, const float *XG) {
    float A[2][8] = {{0}}, B[2][8] = {{0}};
    for (int64_t gi = 0; gi < groups; gi++, XG += 8) {
        float T[4][8] = {{0}};
        for (int64_t r = 0; r < per; r++, p += 16, x += 32)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 8; l++)
                    T[j][l] = __builtin_fmaf(lane_code(p + 4 * j, l), x[8 * j + l], T[j][l]);
        float s = bf16_to_float((uint16_t)(sz[gi] & 0xffff));
        float z = bf16_to_float((uint16_t)(sz[gi] >> 16));
        for (int l = 0; l < 8; l++) {
            float t = (T[0][l] + T[1][l]) + (T[2][l] + T[3][l]);
            A[gi % 2][l] = __builtin_fmaf(t * INV[l], s, A[gi % 2][l]);
            B[gi % 2][l] = __builtin_fmaf(XG[l], __builtin_fmaf(s, E[l], z), B[gi % 2][l]);
        }
    }
    float f[8];
    for (int l = 0; l < 8; l++) f[l] = (A[0][l] + A[1][l]) + (B[0][l] + B[1][l]);
    return ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
}

#ifdef HAVE_AVX2_ROWS
/* y = per lane (A0 + A1) + (B0 + B1), the lanes added ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) */
static inline float lane_total(__m256 a0, __m256 a1, __m256 b0, __m256 b1) {
    float f[8];
    _mm256_storeu_ps(f, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)));
    return ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
}

static inline __m256 codes8(const uint8_t *p, __m256i masks) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_set1_epi32((int)word_at(p)), masks));
}

/* T of the run at p (16 bytes) against x (32 values) */
static inline __m256 run_sum(const uint8_t *p, const float *x, __m256i masks) {
    __m256 t = _mm256_mul_ps(codes8(p, masks), _mm256_loadu_ps(x));
    t = _mm256_fmadd_ps(codes8(p + 4, masks), _mm256_loadu_ps(x + 8), t);
    t = _mm256_fmadd_ps(codes8(p + 8, masks), _mm256_loadu_ps(x + 16), t);
    return _mm256_fmadd_ps(codes8(p + 12, masks), _mm256_loadu_ps(x + 24), t);
}

/* one run into (A, B): its group's scale and zero are the bf16 halves of *GP, broadcast from
   memory (a load) and split with a shift and a mask: from a general register the broadcasts
   took 4 vector ops, and the loop 6% longer */
#define INT4_RUN(P, XP, XS, GP, A, B)                                                       \
    do {                                                                                  \
        __m256i g_ = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(GP)));       \
        __m256 s_ = _mm256_castsi256_ps(_mm256_slli_epi32(g_, 16));                       \
        __m256 z_ = _mm256_castsi256_ps(_mm256_and_si256(g_, hi16));                      \
        A = _mm256_fmadd_ps(_mm256_mul_ps(run_sum((P), (XP), masks), inv), s_, A);         \
        B = _mm256_fmadd_ps(_mm256_loadu_ps(XS), _mm256_fmadd_ps(s_, e, z_), B);          \
    } while (0)

static float int4_row_avx2(const uint8_t *p, const uint32_t *sz, int64_t runs, const float *x,
                           const float *X) {
    const __m256i masks = _mm256_setr_epi32(0xf, 0xf0, 0xf00, 0xf000, 0xf0000, 0xf00000,
                                            0xf000000, (int)0xf0000000u);
    const __m256 inv = _mm256_loadu_ps(INV), e = _mm256_loadu_ps(E);
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t r = 0;
    for (; r + 1 < runs; r += 2, p += 32, x += 64, X += 16, sz += 2) {
        _mm_prefetch((const char *)(p + AHEAD), _MM_HINT_T0);
        INT4_RUN(p, x, X, sz, a0, b0);
        INT4_RUN(p + 16, x + 32, X + 8, sz + 1, a1, b1);
    }
    if (r < runs) INT4_RUN(p, x, X, sz, a0, b0);
    return lane_total(a0, a1, b0, b1);
}

/* one group of PER runs at P into (A, B), int4_row_groups_portable's order */
#define INT4_GROUP(P, XP, XG, GP, A, B)                                                    \
    do {                                                                                  \
        __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;                        \
        const uint8_t *q_ = (P);                                                          \
        const float *x_ = (XP);                                                           \
        for (int64_t r_ = 0; r_ < per; r_ += 2, q_ += 32, x_ += 64) {                       \
            _mm_prefetch((const char *)(q_ + AHEAD), _MM_HINT_T0);                        \
            t0 = _mm256_fmadd_ps(codes8(q_, masks), _mm256_loadu_ps(x_), t0);              \
            t1 = _mm256_fmadd_ps(codes8(q_ + 4, masks), _mm256_loadu_ps(x_ + 8), t1);      \
            t2 = _mm256_fmadd_ps(codes8(q_ + 8, masks), _mm256_loadu_ps(x_ + 16), t2);     \
            t3 = _mm256_fmadd_ps(codes8(q_ + 12, masks), _mm256_loadu_ps(x_ + 24), t3);    \
            t0 = _mm256_fmadd_ps(codes8(q_ + 16, masks), _mm256_loadu_ps(x_ + 32), t0);    \
            t1 = _mm256_fmadd_ps(codes8(q_ + 20, masks), _mm256_loadu_ps(x_ + 40), t1);    \
            t2 = _mm256_fmadd_ps(codes8(q_ + 24, masks), _mm256_loadu_ps(x_ + 48), t2);    \
            t3 = _mm256_fmadd_ps(codes8(q_ + 28, masks), _mm256_loadu_ps(x_ + 56), t3);    \
        }                                                                                 \
        __m256 t_ = _mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3));           \
        __m256i g_ = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(GP)));       \
        __m256 s_ = _mm256_castsi256_ps(_mm256_slli_epi32(g_, 16));                       \
        __m256 z_ = _mm256_castsi256_ps(_mm256_and_si256(g_, hi16));                      \
        A = _mm256_fmadd_ps(_mm256_mul_ps(t_, inv), s_, A);                               \
        B = _mm256_fmadd_ps(_mm256_loadu_ps(XG), _mm256_fmadd_ps(s_, e, z_), B);          \
    } while (0)

/* per >= 2 (even): 3 vector ops per 8 weights plus ~6 per group instead of per run of 32
   (torchao and quanto int4 in groups of 128: 0.73 -> 0.57 ms per 3072 x 3072 row on one Zen 3
   core) */
static float int4_row_groups_avx2(const uint8_t *p, const uint32_t *sz, int64_t groups,
                                  int64_t per, const float *x, const float *XG) {
    const __m256i masks = _mm256_setr_epi32(0xf, 0xf0, 0xf00, 0xf000, 0xf0000, 0xf00000,
                                            0xf000000, (int)0xf0000000u);
    const __m256 inv = _mm256_loadu_ps(INV), e = _mm256_loadu_ps(E);
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    const int64_t step = 16 * per;  /* bytes of a group */
    int64_t gi = 0;
    for (; gi + 1 < groups; gi += 2, p += 2 * step, x += 64 * per, XG += 16, sz += 2) {
        INT4_GROUP(p, x, XG, sz, a0, b0);
        INT4_GROUP(p + step, x + 32 * per, XG + 8, sz + 1, a1, b1);
    }
    if (gi < groups) INT4_GROUP(p, x, XG, sz, a0, b0);
    return lane_total(a0, a1, b0, b1);
}
#endif

/* out bf16 [N]: rows [r0, r1) of the weight times x float32 [k]. k % 32 == 0, group a multiple
   of 32 that is 32 or of an even number of runs (64, 128, 256: a pair of runs never straddles
   two groups) and k % group == 0, else -1; 1 for an x this loop leaves to the caller (see above) or no
   memory; portable = 1 forces the scalar loop. bias: bf16 [N] added as torch's y.add_(bias)
   would, or NULL. */
int dq_int4_gemv(const uint8_t *packed, const uint32_t *sz, int64_t k, int64_t group,
                 int64_t r0, int64_t r1, const float *x, uint16_t *out, int portable,
                 const uint16_t *bias) {
    if (k % 32 || group % 32 || k % group || (group > 32 && group % 64)) return -1;
    for (int64_t i = 0; i < k; i++)
        if (!(fabsf(x[i]) < 0x1p64f)) return 1;  /* also NaN */
    int64_t runs = k / 32, per = group / 32, groups = k / group;
    float buf[X_CAP], *X = runs * 8 <= X_CAP ? buf : malloc((size_t)runs * 8 * sizeof(float));
    if (!X) return 1;
    for (int64_t r = 0; r < runs; r++)
        for (int l = 0; l < 8; l++) {
            const float *xr = x + 32 * r + l;
            X[8 * r + l] = ((xr[0] + xr[8]) + xr[16]) + xr[24];
        }
    if (per > 1)  /* per group: the runs' sums added in order, in place (XG[g] <= X[per g]) */
        for (int64_t g = 0; g < groups; g++)
            for (int l = 0; l < 8; l++) {
                float t = X[8 * per * g + l];
                for (int64_t r = 1; r < per; r++) t += X[8 * (per * g + r) + l];
                X[8 * g + l] = t;
            }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pr = packed + r * (k / 2);
        const uint32_t *szr = sz + r * groups;
        float y;
#ifdef HAVE_AVX2_ROWS
        if (!portable)
            y = per > 1 ? int4_row_groups_avx2(pr, szr, groups, per, x, X)
                        : int4_row_avx2(pr, szr, runs, x, X);
        else
#endif
            y = per > 1 ? int4_row_groups_portable(pr, szr, groups, per, x, X)
                        : int4_row_portable(pr, szr, runs, x, X);
        out[r] = bf16_plus(y, bias ? bias + r : 0);
    }
    if (X != buf) free(X);
    return 0;
}

/* Whether dq_int4_gemv has its vector loop in this build: where the CPU has AVX-512, torch's
   int4pack kernel is the faster one-row product (0.3-0.4x bf16) and keeps that job. */
int dq_int4_gemv_vector(void) {
#ifdef HAVE_AVX2_ROWS
    return 1;
#else
    return 0;
#endif
}

/* -- decodes into a bf16 buffer -------------------------------------------------------------- */
#ifdef __AVX512F__
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
