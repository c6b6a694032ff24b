/* GGUF's K-quants Q4_K, Q5_K and Q6_K on load: ggml's quantize_row_q{4,5,6}_K_ref, with their
   scale searches (make_qkx2_quants, make_qx_quants), op for op in ggml's order, as
   ops/formats/gguf_kquant.py (the reference, the same order in torch) writes them. Compiled on
   first use by ops/native/build.py; ops/native/quantize.py calls them.

   Why C: the searches try 16 to 21 candidate grids per sub-block, each a few passes over its
   values; in torch that was 0.01-0.02 GB/s of bf16 checkpoint (a Flux.1-dev transformer took
   30-40 minutes to quantize to Q4_K).

   Same bytes on every CPU: every sum runs one value after the other, as ggml's loops do, every
   multiply and add is its own operation (the build has -ffp-contract=off), divisions are
   divisions (not reciprocals) where ggml divides, and rounding is ggml's nearest_int (the
   1.5 * 2^23 trick, ties to even, its own values past 2^22). Speed comes from running the
   8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks of a super-block side by side: lane j of every loop
   below is sub-block j, so the compiler vectorises across sub-blocks while each sub-block's
   sums keep their order. A super-block holding an inf or a NaN returns 1: the caller runs the
   reference for the whole weight. */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "half.h"
#include "kernels.h"

enum { Q4_K = 12, Q5_K = 13, Q6_K = 14 };
#define EPS 1e-15f /* ggml's GROUP_MAX_EPS */

/* ggml's nearest_int: round to nearest even through the float's mantissa (|f| < 2^22) */
static inline int32_t nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* Lane j of a vector is sub-block j: 8 floats, one AVX register (two SSE2 ones), every
   operation lane by lane as the scalar C would run it (GCC's vector extensions; max, min and
   blend through the intrinsics where the target has AVX, else a lane loop). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__AVX__)
#include <immintrin.h>
static inline v8f vmax(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
static inline v8f vmin(v8f a, v8f b) { return (v8f)_mm256_min_ps((__m256)a, (__m256)b); }
static inline v8f vsel(v8i m, v8f a, v8f b) {
    return (v8f)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m);
}
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
#endif

#define MAGIC 12582912.f   /* 1.5 * 2^23: nearest_int's */
/* nearest_int(v) clamped to [lo, hi], as a float: v + MAGIC - MAGIC is nearest_int's integer
   for |v| < 2^22; the callers check that bound for the lanes whose codes count */
static inline v8f codes(v8f v, float lo, float hi) {
    const v8f l = {lo, lo, lo, lo, lo, lo, lo, lo}, h = {hi, hi, hi, hi, hi, hi, hi, hi};
    return vmax(vmin((v + MAGIC) - MAGIC, h), l);
}
/* lanes of m where |v| < 2^22 (comparisons are false for a NaN) */
static inline v8i in_range(v8f v) { return (v < 0x1p22f) & (v > -0x1p22f); }
static inline int all(v8i m) {
    for (int j = 0; j < 8; j++)
        if (!m[j]) return 0;
    return 1;
}

/* -- Q4_K, Q5_K ------------------------------------------------------------------------------ */
/* make_qkx2_quants on the 8 sub-blocks of 32 of NB super-blocks at once (x[i][b] lane j: value
   i of sub-block j of super-block b; w their weights): scale, -min, and the grid (iscale, min)
   whose codes ggml keeps, from which the caller recomputes them. The NB super-blocks' chains of
   sums interleave (one super-block alone waits on each add's latency). Returns 0 where a grid's
   values leave nearest_int's range (|v| >= 2^22) in a lane that counts: the caller then runs
   the exact scalar search. */
#define NB 2
static int qkx2(const v8f x[32][NB], const v8f w[32][NB], int nmax, float rmin, int nstep,
                v8f scale_out[NB], v8f min_out[NB], v8f l_iscale[NB], v8f l_min[NB]) {
    const v8f zero = {0};
    v8f lo[NB], mx[NB], sw[NB], sx[NB], mn[NB], min0[NB], iscale[NB], scale[NB], best[NB];
    v8i counts[NB], ok = zero == zero;
    for (int b = 0; b < NB; b++) {
        lo[b] = mx[b] = x[0][b], sw[b] = w[0][b], sx[b] = w[0][b] * x[0][b];
        for (int i = 1; i < 32; i++) {
            lo[b] = vmin(x[i][b], lo[b]);          /* x < min ? x : min */
            mx[b] = vmax(x[i][b], mx[b]);
            sw[b] += w[i][b];
            sx[b] += w[i][b] * x[i][b];
        }
        min0[b] = mn[b] = vsel(lo[b] > zero, zero, lo[b]);
        counts[b] = ~(mx[b] == min0[b]);          /* flat lanes: ggml returns before searching */
        iscale[b] = (float)nmax / (mx[b] - mn[b]), scale[b] = 1.0f / iscale[b], best[b] = zero;
        ok &= (in_range(iscale[b] * (lo[b] - mn[b])) & in_range(iscale[b] * (mx[b] - mn[b])))
              | ~counts[b];
        l_iscale[b] = iscale[b], l_min[b] = mn[b];
    }
    for (int i = 0; i < 32; i++)
        for (int b = 0; b < NB; b++) {
            v8f diff = scale[b] * codes(iscale[b] * (x[i][b] - mn[b]), 0.0f, (float)nmax)
                       + mn[b] - x[i][b];
            diff = diff * diff;
            best[b] += w[i][b] * diff;
        }
    for (int is = 0; is <= nstep; is++) {
        const float stretch = rmin + 0.1f * (float)is + (float)nmax;
        v8f sl[NB], sl2[NB], sxl[NB], cur[NB], ts[NB], tm[NB], D[NB], lf[32][NB];
        for (int b = 0; b < NB; b++) {
            sl[b] = sl2[b] = sxl[b] = cur[b] = zero;
            iscale[b] = stretch / (mx[b] - mn[b]);
            ok &= (in_range(iscale[b] * (lo[b] - mn[b])) & in_range(iscale[b] * (mx[b] - mn[b])))
                  | ~counts[b];
        }
        for (int i = 0; i < 32; i++)
            for (int b = 0; b < NB; b++) {
                lf[i][b] = codes(iscale[b] * (x[i][b] - mn[b]), 0.0f, (float)nmax);
                v8f wl = w[i][b] * lf[i][b];
                sl[b] += wl;
                sl2[b] += wl * lf[i][b];
                sxl[b] += wl * x[i][b];
            }
        for (int b = 0; b < NB; b++) {
            D[b] = sw[b] * sl2[b] - sl[b] * sl[b];
            v8f s = (sw[b] * sxl[b] - sx[b] * sl[b]) / D[b];
            v8f m = (sl2[b] * sx[b] - sl[b] * sxl[b]) / D[b];
            v8i positive = m > zero;
            ts[b] = vsel(positive, sxl[b] / sl2[b], s), tm[b] = vsel(positive, zero, m);
        }
        for (int i = 0; i < 32; i++)
            for (int b = 0; b < NB; b++) {
                v8f diff = ts[b] * lf[i][b] + tm[b] - x[i][b];
                diff = diff * diff;
                cur[b] += w[i][b] * diff;
            }
        for (int b = 0; b < NB; b++) {
            v8i win = (D[b] > zero) & (cur[b] < best[b]);
            best[b] = vsel(win, cur[b], best[b]);
            scale[b] = vsel(win, ts[b], scale[b]);
            l_iscale[b] = vsel(win, iscale[b], l_iscale[b]);
            l_min[b] = vsel(win, mn[b], l_min[b]);
            mn[b] = vsel(win, tm[b], mn[b]);
        }
    }
    for (int b = 0; b < NB; b++) {
        min_out[b] = -vsel(counts[b], mn[b], min0[b]);
        scale_out[b] = vsel(counts[b], scale[b], zero);
        l_iscale[b] = vsel(counts[b], l_iscale[b], zero);     /* flat: codes 0 */
        l_min[b] = vsel(counts[b], l_min[b], zero);
    }
    return all(ok);
}

/* the same search one sub-block at a time, ggml's C as it is (integer nearest_int), for the
   rare super-block whose grids leave nearest_int's range: scale, -min, codes L [32] */
static float qkx2_exact(const float *x, const float *w, int nmax, float rmin, int nstep,
                        float *the_min, uint8_t *L) {
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0], best_error = 0.0f;
    uint8_t Laux[32];
    for (int i = 1; i < 32; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, 32);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min), scale = 1.0f / iscale;
    for (int i = 0; i < 32; i++) {
        L[i] = (uint8_t)clampi(nearest_int(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * (float)L[i] + min - x[i];
        diff = diff * diff;
        best_error += w[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        float sum_l = 0, sum_l2 = 0, sum_xl = 0, cur = 0;
        iscale = (rmin + 0.1f * (float)is + (float)nmax) / (max - min);
        for (int i = 0; i < 32; i++) {
            int32_t l = clampi(nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            float wl = w[i] * (float)l;
            sum_l += wl;
            sum_l2 += wl * (float)l;
            sum_xl += wl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0)) continue;
        float ts = (sum_w * sum_xl - sum_x * sum_l) / D, tm = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (tm > 0) tm = 0, ts = sum_xl / sum_l2;
        for (int i = 0; i < 32; i++) {
            float diff = ts * (float)Laux[i] + tm - x[i];
            diff = diff * diff;
            cur += w[i] * diff;
        }
        if (cur < best_error) {
            memcpy(L, Laux, 32);
            best_error = cur, scale = ts, min = tm;
        }
    }
    *the_min = -min;
    return scale;
}

static inline v8f vabs(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }

/* the rest of quantize_row_q4_K_ref / q5_K_ref for one super-block x [256] given its
   sub-blocks' scales, mins and searched codes L: the 6-bit scales, d, dmin, the codes
   requantized against the stored scales, the packing -> o */
static void k_pack(const float *x, const float *scales, const float *mins, uint8_t *L,
                   int nmax, int q5, uint8_t *o) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8], *sc = o + 4;
    for (int j = 0; j < 8; j++) {
        ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);   /* uint8_t as ggml's: mod 256 */
        lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
        ls[j] = ls[j] < 63 ? ls[j] : 63;
        lm[j] = lm[j] < 63 ? lm[j] : 63;
    }
    for (int j = 0; j < 4; j++) {                             /* get_scale_min_k4's packing */
        sc[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        sc[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        sc[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    uint16_t dh = half_bits(max_scale / 63.f), mh = half_bits(max_min / 63.f);
    memcpy(o, &dh, 2);
    memcpy(o + 2, &mh, 2);
    float d0 = half_to_float(dh), m0 = half_to_float(mh);
    for (int j = 0; j < 8; j++) {
        const float d = d0 * (float)ls[j], dm = m0 * (float)lm[j];
        if (d == 0.0f) continue;              /* ggml keeps the search's codes */
        for (int i = 0; i < 32; i++)
            L[32 * j + i] = (uint8_t)clampi(nearest_int((x[32 * j + i] + dm) / d), 0, nmax);
    }
    uint8_t *qs = o + 16;
    if (q5) {
        uint8_t *qh = o + 16;
        qs = o + 48;
        for (int l = 0; l < 32; l++) {
            uint8_t h = 0;
            for (int n = 0; n < 8; n++) h |= (uint8_t)((L[32 * n + l] >> 4) << n);
            qh[l] = h;
        }
    }
    for (int n = 0; n < 4; n++)
        for (int l = 0; l < 32; l++)
            qs[32 * n + l] = (uint8_t)((L[64 * n + l] & 0xF) | ((L[64 * n + 32 + l] & 0xF) << 4));
}

/* quantize_row_q4_K_ref / q5_K_ref of NB super-blocks x [NB * 256] -> o (144 / 176 bytes each) */
static void q45_blocks(const float *x, int q5, uint8_t *o) {
    const int nmax = q5 ? 31 : 15, nstep = q5 ? 15 : 20, size = q5 ? 176 : 144;
    const float rmin = q5 ? -0.5f : -1.0f;
    v8f xt[32][NB], w[32][NB], scale_v[NB], min_v[NB], l_iscale[NB], l_min[NB];
    for (int b = 0; b < NB; b++) {
        v8f sx2 = {0}, av;
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 32; i++) xt[i][b][j] = x[256 * b + 32 * j + i];
        for (int i = 0; i < 32; i++) sx2 += xt[i][b] * xt[i][b];
        av = sx2;
        for (int j = 0; j < 8; j++) av[j] = sqrtf(sx2[j] / 32.0f);
        for (int i = 0; i < 32; i++) w[i][b] = av + vabs(xt[i][b]);
    }
    int fast = qkx2(xt, w, nmax, rmin, nstep, scale_v, min_v, l_iscale, l_min);
    for (int b = 0; b < NB; b++) {
        float scales[8], mins[8];
        uint8_t L[256];
        if (fast) {
            for (int i = 0; i < 32; i++) {   /* the kept grid's codes, as the search had them */
                v8f c = codes(l_iscale[b] * (xt[i][b] - l_min[b]), 0.0f, (float)nmax);
                for (int j = 0; j < 8; j++) L[32 * j + i] = (uint8_t)c[j];
            }
            for (int j = 0; j < 8; j++) scales[j] = scale_v[b][j], mins[j] = min_v[b][j];
        } else {
            for (int j = 0; j < 8; j++) {
                float wj[32];
                for (int i = 0; i < 32; i++) wj[i] = w[i][b][j];
                scales[j] = qkx2_exact(x + 256 * b + 32 * j, wj, nmax, rmin, nstep, mins + j,
                                       L + 32 * j);
            }
        }
        k_pack(x + 256 * b, scales, mins, L, nmax, q5, o + size * b);
    }
}

/* -- Q6_K ------------------------------------------------------------------------------------ */
/* the sums of one grid of make_qx_quants(rmse_type 1) over 8 sub-blocks of 16 side by side */
static inline void qx_fit(const v8f x[16], const v8f w[16], const v8f wx[16], v8f isc,
                          v8f *slx, v8f *sl2) {
    v8f a = {0}, b = {0};
    for (int i = 0; i < 16; i++) {
        v8f q = codes(isc * x[i], -32.0f, 31.0f);
        a += wx[i] * q;
        b += w[i] * q * q;
    }
    *slx = a, *sl2 = b;
}

/* make_qx_quants(16, 32, rmse_type 1) of 8 sub-blocks: scale, the grid's iscale whose codes
   ggml keeps and the all-zero lanes (codes 0); 0 where a grid leaves nearest_int's range in a
   lane that counts (the caller runs qx_exact) */
static int qx8(const v8f x[16], v8f *scale_out, v8f *l_iscale, v8i *none_out) {
    const v8f zero = {0};
    v8f amax = zero, mx = zero, lo = x[0], hi = x[0], w[16], wx[16], slx, sl2, scale, best;
    for (int i = 0; i < 16; i++) {
        v8f a = vabs(x[i]);
        v8i bigger = a > amax;
        mx = vsel(bigger, x[i], mx);
        amax = vsel(bigger, a, amax);
        lo = vmin(x[i], lo);
        hi = vmax(x[i], hi);
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    v8i none = amax < EPS;
    v8f iscale = -32.0f / mx;
    v8i ok = in_range(iscale * lo) & in_range(iscale * hi);
    qx_fit(x, w, wx, iscale, &slx, &sl2);
    scale = vsel(sl2 != zero, slx / sl2, zero);
    best = scale * slx;
    *l_iscale = iscale;
    for (int is = -9; is <= 9; is++) {
        if (!is) continue;
        iscale = -(32.0f + 0.1f * (float)is) / mx;
        ok &= in_range(iscale * lo) & in_range(iscale * hi);
        qx_fit(x, w, wx, iscale, &slx, &sl2);
        v8i win = (sl2 > zero) & (slx * slx > best * sl2);
        scale = vsel(win, slx / sl2, scale);
        best = vsel(win, scale * slx, best);
        *l_iscale = vsel(win, iscale, *l_iscale);
    }
    *scale_out = vsel(none, zero, scale);
    *none_out = none;
    return all(ok | none);
}

/* make_qx_quants(16, 32, rmse_type 1) as ggml's C, one sub-block: scale, codes L [16] */
static void qx_sums(const float *x, float iscale, float *sumlx, float *suml2) {
    float a = 0, b = 0;
    for (int i = 0; i < 16; i++) {
        float l = (float)clampi(nearest_int(iscale * x[i]), -32, 31), w = x[i] * x[i];
        a += w * x[i] * l;
        b += w * l * l;
    }
    *sumlx = a, *suml2 = b;
}

static void qx_codes(const float *x, float iscale, uint8_t *L) {
    for (int i = 0; i < 16; i++) L[i] = (uint8_t)(clampi(nearest_int(iscale * x[i]), -32, 31) + 32);
}

static float qx_exact(const float *x, uint8_t *L) {
    float max = 0, amax = 0, sumlx, suml2;
    for (int i = 0; i < 16; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
    if (amax < EPS) {
        memset(L, 0, 16);
        return 0.0f;
    }
    float iscale = -32.0f / max;
    qx_sums(x, iscale, &sumlx, &suml2);
    qx_codes(x, iscale, L);
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (!is) continue;
        iscale = -(32.0f + 0.1f * (float)is) / max;
        qx_sums(x, iscale, &sumlx, &suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            qx_codes(x, iscale, L);
            scale = sumlx / suml2, best = scale * sumlx;
        }
    }
    return scale;
}

/* quantize_row_q6_K_ref of one super-block x [256] -> o (210 bytes) */
static void q6_block(const float *x, uint8_t *o) {
    float scales[16];
    uint8_t L[256];
    for (int h = 0; h < 2; h++) {             /* sub-blocks 8h .. 8h + 7 side by side */
        v8f xt[16], scale_v, l_iscale;
        v8i none;
        const float *xh = x + 128 * h;
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 16; i++) xt[i][j] = xh[16 * j + i];
        if (qx8(xt, &scale_v, &l_iscale, &none)) {
            for (int i = 0; i < 16; i++) {    /* the kept grid's codes, 0 for an all-zero one */
                v8f c = codes(l_iscale * xt[i], -32.0f, 31.0f) + 32.0f;
                for (int j = 0; j < 8; j++) L[128 * h + 16 * j + i] = none[j] ? 0 : (uint8_t)c[j];
            }
            for (int j = 0; j < 8; j++) scales[8 * h + j] = scale_v[j];
        } else {
            for (int j = 0; j < 8; j++)
                scales[8 * h + j] = qx_exact(xh + 16 * j, L + 128 * h + 16 * j);
        }
    }
    float max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; j++)
        if (fabsf(scales[j]) > max_abs) max_abs = fabsf(scales[j]), max_scale = scales[j];
    if (max_abs < EPS) {                      /* ggml zeroes the block (d = fp16 0 too) */
        memset(o, 0, 210);
        return;
    }
    float iscale = -128.f / max_scale;
    uint16_t dh = half_bits(1.0f / iscale);
    int8_t *sc = (int8_t *)(o + 192);
    for (int j = 0; j < 16; j++) {
        int32_t v = nearest_int(iscale * scales[j]);
        sc[j] = (int8_t)(uint8_t)(v < 127 ? v : 127);   /* int8_t as ggml's: mod 256 */
    }
    memcpy(o + 208, &dh, 2);
    float d0 = half_to_float(dh);
    for (int j = 0; j < 16; j++) {
        const float d = d0 * (float)sc[j];
        if (d == 0.0f) continue;              /* ggml keeps the search's codes */
        for (int i = 0; i < 16; i++)
            L[16 * j + i] = (uint8_t)(clampi(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
    }
    uint8_t *ql = o, *qh = o + 128;
    for (int h = 0; h < 2; h++, ql += 64, qh += 32)
        for (int l = 0; l < 32; l++) {
            const uint8_t *p = L + 128 * h + l;
            ql[l] = (uint8_t)((p[0] & 0xF) | ((p[64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((p[32] & 0xF) | ((p[96] & 0xF) << 4));
            qh[l] = (uint8_t)((p[0] >> 4) | ((p[32] >> 4) << 2) | ((p[64] >> 4) << 4)
                              | ((p[96] >> 4) << 6));
        }
}

/* -- entry ------------------------------------------------------------------------------------ */
/* super-block b of w (bf16, or float32 where f32) as float32 into x [256]; 1 where it holds an
   inf or a NaN */
static int load(const void *w, int f32, int64_t b, float *x) {
    uint32_t bad = 0;
    if (f32) {
        memcpy(x, (const float *)w + b * 256, 256 * sizeof(float));
        for (int i = 0; i < 256; i++) {
            uint32_t u;
            memcpy(&u, x + i, 4);
            bad |= (u & 0x7f800000u) == 0x7f800000u;
        }
    } else {
        const uint16_t *h = (const uint16_t *)w + b * 256;
        for (int i = 0; i < 256; i++) {
            bad |= (h[i] & 0x7f80u) == 0x7f80u;
            x[i] = bf16_to_float(h[i]);
        }
    }
    return bad != 0;
}

/* super-blocks [b0, b1) of w (256 values each: bf16, or float32 where f32) -> out (type size
   bytes each); 1 where one holds an inf or a NaN (the reference's to write) */
int dq_gguf_kquant(int qtype, const void *w, int f32, int64_t b0, int64_t b1, uint8_t *out) {
    int64_t size = qtype == Q4_K ? 144 : qtype == Q5_K ? 176 : qtype == Q6_K ? 210 : 0;
    if (!size) return -1;
    for (int64_t b = b0; b < b1; b += NB) {
        float x[NB * 256];
        uint8_t spare[NB * 176];
        int n = b1 - b < NB ? (int)(b1 - b) : NB;
        for (int k = 0; k < NB; k++)   /* past the end: the last one again, written to spare */
            if (load(w, f32, b + (k < n ? k : n - 1), x + 256 * k)) return 1;
        if (qtype == Q6_K) {
            for (int k = 0; k < n; k++) q6_block(x + 256 * k, out + (b + k) * size);
        } else if (n == NB) {
            q45_blocks(x, qtype == Q5_K, out + b * size);
        } else {
            q45_blocks(x, qtype == Q5_K, spare);
            memcpy(out + b * size, spare, (size_t)(n * size));
        }
    }
    return 0;
}
