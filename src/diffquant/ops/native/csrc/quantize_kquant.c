/* GGUF's K-quants Q4_K and Q5_K on load (Q6_K: quantize_q6k.c): ggml's
   quantize_row_q4_K_ref / q5_K_ref with their scale search (make_qkx2_quants), op for op in
   ggml's order, the bytes ops/formats/gguf_kquant.py (the reference, the same order in torch)
   writes. Compiled on first use by ops/native/build.py; ops/native/quantize.py calls them.

   Why C: the search tries 21 (Q4_K) or 16 (Q5_K) grids per sub-block of 32, each three sums
   and an error sum over its values; in torch that was 0.01-0.02 GB/s of bf16 checkpoint (a
   Flux.1-dev transformer took 30-40 minutes to quantize to Q4_K).

   Same bytes on every CPU: every sum runs one value after the other as ggml's loops do, every
   multiply and add is its own operation (the build has -ffp-contract=off), divisions are
   divisions where ggml divides, and rounding is ggml's nearest_int. The 8 sub-blocks of a
   super-block run side by side (kquant.h: lane j is sub-block j), and NB super-blocks
   interleave so that one's chain of adds runs while another's waits. A super-block holding an
   inf or a NaN returns 1: the caller runs the reference for the whole weight. */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "half.h"
#include "kernels.h"
#include "kquant.h"

enum { Q4_K = 12, Q5_K = 13, Q6_K = 14 };

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


/* the rest of quantize_row_q4_K_ref / q5_K_ref for one super-block x [256], given its
   sub-blocks' scales and mins and, per sub-block, the codes ggml's search kept: in L where
   exact, else the grid (lisc[j], lmin[j]) that made them. The 6-bit scales, d, dmin, the
   codes requantized against the scales as stored, the packing -> o. */
static void k_finish(const float *x, const float *scales, const float *mins, const float *lisc,
                     const float *lmin, int exact, int q5, uint8_t *L, uint8_t *o) {
    const int nmax = q5 ? 31 : 15;
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
        if (d == 0.0f && exact) continue;     /* ggml keeps the search's codes */
        for (int k = 0; k < 32; k += 8) {
            v8f v;
            memcpy(&v, x + 32 * j + k, sizeof v);
            store8(nearest_clamp8(d != 0.0f ? (v + dm) / d : lisc[j] * (v - lmin[j]), 0, nmax),
                   L + 32 * j + k);
        }
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
    v8f xt[32][NB], w[32][NB], scale_v[NB], min_v[NB], lisc_v[NB], lmin_v[NB];
    for (int b = 0; b < NB; b++) {
        v8f sx2 = {0}, av, t[8];
        for (int c = 0; c < 32; c += 8) {     /* xt[i][b] lane j = value i of sub-block j */
            transpose8(x + 256 * b + c, 32, t);
            for (int k = 0; k < 8; k++) xt[c + k][b] = t[k];
        }
        for (int i = 0; i < 32; i++) sx2 += xt[i][b] * xt[i][b];
        av = vsqrt(sx2 / 32.0f);
        for (int i = 0; i < 32; i++) w[i][b] = av + vabs(xt[i][b]);
    }
    int fast = qkx2(xt, w, nmax, rmin, nstep, scale_v, min_v, lisc_v, lmin_v);
#ifdef DQ_KQUANT_EXACT /* tests/test_quantize_blocks.py: the exact search on every block */
    fast = 0;
#endif
    for (int b = 0; b < NB; b++) {
        float scales[8], mins[8], lisc[8], lmin[8];
        uint8_t L[256];
        for (int j = 0; j < 8; j++)
            scales[j] = scale_v[b][j], mins[j] = min_v[b][j], lisc[j] = lisc_v[b][j],
            lmin[j] = lmin_v[b][j];
        if (!fast)
            for (int j = 0; j < 8; j++) {
                float wj[32];
                for (int i = 0; i < 32; i++) wj[i] = w[i][b][j];
                scales[j] = qkx2_exact(x + 256 * b + 32 * j, wj, nmax, rmin, nstep, mins + j,
                                       L + 32 * j);
            }
        k_finish(x + 256 * b, scales, mins, lisc, lmin, !fast, q5, L, o + size * b);
    }
}

/* -- entry ------------------------------------------------------------------------------------ */
/* super-block b of w (dtype 0: bf16, 1: float32, 2: float16) as float32 into x [256]; 1 where
   it holds an inf or a NaN */
static int load(const void *w, int dtype, int64_t b, float *x) {
    uint32_t bad = 0;
    if (dtype == 2) {
        const uint16_t *h = (const uint16_t *)w + b * 256;
        for (int i = 0; i < 256; i++) {
            bad |= (h[i] & 0x7c00u) == 0x7c00u;
            x[i] = half_to_float(h[i]);
        }
    } else if (dtype == 1) {
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

/* super-blocks [b0, b1) of w (256 values each, of load's dtype) -> out (type size bytes each);
   1 where one holds an inf or a NaN (the reference's to write) */
int dq_gguf_kquant(int qtype, const void *w, int dtype, int64_t b0, int64_t b1, uint8_t *out) {
    int64_t size = qtype == Q4_K ? 144 : qtype == Q5_K ? 176 : qtype == Q6_K ? 210 : 0;
    if (!size) return -1;
    for (int64_t b = b0; b < b1; b += NB) {
        float x[NB * 256];
        uint8_t spare[NB * 176];
        int n = b1 - b < NB ? (int)(b1 - b) : NB;
        for (int k = 0; k < NB; k++)   /* past the end: the last one again, written to spare */
            if (load(w, dtype, b + (k < n ? k : n - 1), x + 256 * k)) return 1;
        if (qtype == Q6_K) {
            for (int k = 0; k < n; k++) dq_q6_k_block(x + 256 * k, out + (b + k) * size);
        } else if (n == NB) {
            q45_blocks(x, qtype == Q5_K, out + b * size);
        } else {
            q45_blocks(x, qtype == Q5_K, spare);
            memcpy(out + b * size, spare, (size_t)(n * size));
        }
    }
    return 0;
}
