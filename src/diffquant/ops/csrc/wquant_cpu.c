/* Weight quantization on load of bf16 weights: optimum-quanto's (ops/quanto_math.py) and
   torchao int4's group-wise (int_quant.int4_quantize_groupwise), one pass per row, compiled on
   first use by ops/native.py.

   Why C: these recipes are six to ten bf16 torch passes over the weight (abs, amax, divisions,
   round, clamp, casts), each rounding to bf16; on a 2-core AVX2 machine quanto's were 5 of the
   6.6 s of quantizing a 1.16B-parameter transformer on load, torchao int4's 5.8 of 6.5. Here each
   row (or group) is read twice (its extreme values, then its codes) and written once.

   The numbers are torch's, op for op: every bf16 op is computed in float32 and rounded to bf16
   (round_bf16), the division by the scalar qmax too (checked over every bf16 value); round is
   half to even (rintf in the default rounding mode); clamp keeps NaN and the cast gives 0 for
   it, as torch's does on the CPU. NaN in a row makes its extremes NaN, as torch's amax/amin. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

/* the code of one value: rint(v) clamped to [lo, hi], NaN -> 0; no branch, so the loops
   vectorise (with a branch each value took ~4 ns) */
static inline int code_of(float v, float lo, float hi) {
    float c = rintf(v);
    c = c < lo ? lo : c;    /* NaN compares false: it stays NaN */
    c = c > hi ? hi : c;
    return c == c ? (int)c : 0;
}

/* round_bf16 without float_to_bf16's NaN branch: a bf16 value widened, or a NaN made by an
   arithmetic op (0x7fc00000), has no carry out of the low half, so it stays NaN */
static inline float rbf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* the extremes of n bf16 values; NaN in them makes both NaN (torch's amin / amax) */
static void extremes(const uint16_t *w, int64_t n, float *lo_out, float *hi_out) {
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_float(w[i]);
        nan += v != v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    *lo_out = nan ? NAN : lo;
    *hi_out = nan ? NAN : hi;
}

/* int8, absmax per row: w bf16 [N, k] rows [r0, r1) -> q int8 [N, k], scale bf16 [N]:
   scale = bf16(amax|w| / 127), q = clamp(round(bf16(w / scale)), -128, 127) */
int dq_quanto_int8_bf16(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, int8_t *q,
                        uint16_t *scale) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * k;
        uint16_t top = 0;       /* |w| as bits: ordered as the values, a NaN above inf */
        for (int64_t i = 0; i < k; i++) {
            uint16_t a = wr[i] & 0x7fff;
            top = a > top ? a : top;
        }
        float s = top > 0x7f80 ? NAN : round_bf16(bf16_to_float(top) / 127.0f);
        scale[r] = float_to_bf16(s);
        int8_t *qr = q + r * k;
        for (int64_t i = 0; i < k; i++)
            qr[i] = (int8_t)code_of(rbf16(bf16_to_float(wr[i]) / s), -128.0f, 127.0f);
    }
    return 0;
}

/* affine, min/max per group row of g values: w bf16 [R, g] group rows [r0, r1) -> codes uint8
   [R, g] in [0, 2^bits - 1], scale and shift bf16 [R]: scale = bf16(bf16(max - min) /
   (2^bits - 1)), shift = -min, code = clamp(round(bf16(bf16(w + shift) / scale))) */
int dq_quanto_affine_bf16(const uint16_t *w, int64_t g, int bits, int64_t r0, int64_t r1,
                          uint8_t *codes, uint16_t *scale, uint16_t *shift) {
    const float top_code = (float)((1 << bits) - 1);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * g;
        float lo, hi;
        extremes(wr, g, &lo, &hi);
        float s = round_bf16(round_bf16(hi - lo) / top_code), sh = -lo;
        scale[r] = float_to_bf16(s);
        shift[r] = float_to_bf16(sh);
        uint8_t *cr = codes + r * g;
        for (int64_t i = 0; i < g; i++) {
            float v = rbf16(rbf16(bf16_to_float(wr[i]) + sh) / s);
            cr[i] = (uint8_t)code_of(v, 0.0f, top_code);
        }
    }
    return 0;
}

/* torchao int4, w bf16 [N, k] rows [r0, r1) in groups of g (even) -> packed uint8 [N, k/2]
   (column 2j in the low nibble), scale and zero bf16 [N, k/g]:
   scale = max(bf16(bf16(max - min) / 15), smallest normal), zero = bf16(min + bf16(8 scale)),
   q = clamp(round(bf16(bf16(w - bf16(zero - bf16(8 scale))) / scale)), 0, 15) */
int dq_int4_groupwise_bf16(const uint16_t *w, int64_t k, int64_t g, int64_t r0, int64_t r1,
                           uint8_t *packed, uint16_t *scale, uint16_t *zero) {
    if (g % 2 || k % g) return -1;
    const float eps = 0x1p-126f;  /* bf16's smallest normal, torch.clamp's min */
    for (int64_t r = r0; r < r1; r++)
        for (int64_t j = 0; j < k / g; j++) {
            const uint16_t *wg = w + r * k + j * g;
            float lo, hi;
            extremes(wg, g, &lo, &hi);
            float s = rbf16(rbf16(hi - lo) / 15.0f);
            s = s < eps ? eps : s;                           /* NaN stays NaN */
            float z = rbf16(lo + rbf16(s * 8.0f)), m = rbf16(z - rbf16(s * 8.0f));
            scale[r * (k / g) + j] = float_to_bf16(s);
            zero[r * (k / g) + j] = float_to_bf16(z);
            uint8_t *pg = packed + (r * k + j * g) / 2;
            for (int64_t i = 0; i < g / 2; i++) {
                int c0 = code_of(rbf16(rbf16(bf16_to_float(wg[2 * i]) - m) / s), 0.0f, 15.0f);
                int c1 = code_of(rbf16(rbf16(bf16_to_float(wg[2 * i + 1]) - m) / s), 0.0f, 15.0f);
                pg[i] = (uint8_t)(c0 | (c1 << 4));
            }
        }
    return 0;
}
