/* int8 dynamic quantization's two elementwise ends on a CPU, compiled on first use by
   ops/native.py (with gguf_cpu.c, into one library).

   Why C: torch runs them as several passes with mixed dtypes (bf16 activations, float32 scales,
   int32 sums), which its CPU kernels do not vectorise: at 1280 x 3072 they took 28 ms around
   an 8 ms int8 product on an AMX CPU. Here each is one pass.

   The numbers are those of int_quant.int8_dynamic_linear (torchao's), rounding for rounding:
   - per-token scale: s = bf16(amax / 127.5), at least float32's eps, widened to float32;
     q = clamp(round_half_even(x * (1 / s)), -128, 127), the product in float32;
   - output: y = bf16(float(acc) * s_x), then bf16(y * s_w [+ bias]) with the product and the
     sum each rounded to float32 first.
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
