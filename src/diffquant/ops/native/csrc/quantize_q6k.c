/* GGUF's K-quant Q6_K on load: ggml's quantize_row_q6_K_ref with its scale search
   (make_qx_quants, rmse_type 1), op for op in ggml's order, the bytes
   ops/formats/gguf_kquant.py writes (quantize_kquant.c's entry calls it; that file says why
   C and how the bytes stay the same on every CPU). The 16 sub-blocks of 16 run as two halves
   of 8 lanes (kquant.h), interleaved. */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half.h"
#include "kquant.h"

/* one grid of make_qx_quants: its sums sum(w x l) and sum(w l l), w = x^2, per lane of the two
   halves (x[i][h] lane j: value i of sub-block 8 h + j) */
static inline void qx_fit(const v8f x[16][2], const v8f w[16][2], const v8f wx[16][2],
                          const v8f isc[2], v8f slx[2], v8f sl2[2]) {
    v8f a[2] = {{0}, {0}}, b[2] = {{0}, {0}};
    for (int i = 0; i < 16; i++)
        for (int h = 0; h < 2; h++) {
            v8f q = codes(isc[h] * x[i][h], -32.0f, 31.0f);
            a[h] += wx[i][h] * q;
            b[h] += w[i][h] * q * q;
        }
    for (int h = 0; h < 2; h++) slx[h] = a[h], sl2[h] = b[h];
}

/* make_qx_quants(16, 32, rmse_type 1) of the 16 sub-blocks: scale, the iscale of the grid
   whose codes ggml keeps, the all-zero lanes (scale 0, codes 0). Every grid is laid from the
   value of largest magnitude mx (iscale = -(32 + 0.1 is) / mx), so |iscale * x| <= 33 within
   rounding for every x of the sub-block: always inside nearest_int's range (2^22), where
   codes() is exact, unlike make_qkx2_quants's grids. */
static void qx16(const v8f x[16][2], v8f scale_out[2], v8f lisc[2], v8i none[2]) {
    const v8f zero = {0};
    v8f amax[2], mx[2], w[16][2], wx[16][2], isc[2], slx[2], sl2[2], scale[2], best[2];
    for (int h = 0; h < 2; h++) {
        amax[h] = mx[h] = zero;
        for (int i = 0; i < 16; i++) {
            v8f a = vabs(x[i][h]);
            v8i bigger = a > amax[h];            /* the first of largest magnitude */
            mx[h] = vsel(bigger, x[i][h], mx[h]);
            amax[h] = vsel(bigger, a, amax[h]);
            w[i][h] = x[i][h] * x[i][h];
            wx[i][h] = w[i][h] * x[i][h];
        }
        none[h] = amax[h] < KQ_EPS;
        lisc[h] = isc[h] = -32.0f / mx[h];
    }
    qx_fit(x, w, wx, isc, slx, sl2);
    for (int h = 0; h < 2; h++) {
        scale[h] = vsel(sl2[h] != zero, slx[h] / sl2[h], zero);
        best[h] = scale[h] * slx[h];
    }
    for (int is = -9; is <= 9; is++) {
        if (!is) continue;
        for (int h = 0; h < 2; h++) isc[h] = -(32.0f + 0.1f * (float)is) / mx[h];
        qx_fit(x, w, wx, isc, slx, sl2);
        for (int h = 0; h < 2; h++) {
            v8i win = (sl2[h] > zero) & (slx[h] * slx[h] > best[h] * sl2[h]);
            scale[h] = vsel(win, slx[h] / sl2[h], scale[h]);
            best[h] = vsel(win, scale[h] * slx[h], best[h]);
            lisc[h] = vsel(win, isc[h], lisc[h]);
        }
    }
    for (int h = 0; h < 2; h++) scale_out[h] = vsel(none[h], zero, scale[h]);
}

/* quantize_row_q6_K_ref of one super-block x [256] -> o (210 bytes) */
void dq_q6_k_block(const float *x, uint8_t *o) {
    v8f xt[16][2], scale_v[2], lisc_v[2], t[8];
    v8i none_v[2];
    float scales[16], lisc[16];
    int32_t none[16];
    uint8_t L[256];
    for (int h = 0; h < 2; h++)              /* xt[i][h] lane j = value i of sub-block 8h + j */
        for (int c = 0; c < 16; c += 8) {
            transpose8(x + 128 * h + c, 16, t);
            for (int k = 0; k < 8; k++) xt[c + k][h] = t[k];
        }
    qx16(xt, scale_v, lisc_v, none_v);
    for (int j = 0; j < 16; j++)
        scales[j] = scale_v[j / 8][j % 8], lisc[j] = lisc_v[j / 8][j % 8],
        none[j] = none_v[j / 8][j % 8];
    float max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; j++)
        if (fabsf(scales[j]) > max_abs) max_abs = fabsf(scales[j]), max_scale = scales[j];
    if (max_abs < KQ_EPS) {                   /* ggml zeroes the block (d = fp16 0 too) */
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
        /* d == 0: ggml keeps the search's codes */
        for (int k = 0; k < 16; k += 8) {
            v8f v;
            memcpy(&v, x + 16 * j + k, sizeof v);
            v8i q = nearest_clamp8(d != 0.0f ? v / d : lisc[j] * v, -32, 31) + 32;
            store8(d == 0.0f && none[j] ? q - q : q, L + 16 * j + k);
        }
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
