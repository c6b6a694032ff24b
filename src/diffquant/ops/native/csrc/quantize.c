/* Weight quantization on load of bf16 weights: optimum-quanto's (ops/formats/quanto.py) and
   torchao int4's group-wise (ops/formats/torchao.int4_quantize_groupwise), one pass per row,
   compiled on first use by ops/native/build.py.

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

/* code_of for lo = 0: one select clamps below and sends NaN to 0 (NaN > 0 is false); gcc's
   vector loop for it is ~1.5x shorter than for code_of */
static inline int ucode_of(float v, float hi) {
    float c = rintf(v);
    c = c > 0.0f ? c : 0.0f;
    c = c < hi ? c : hi;
    return (int)c;
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

/* a bf16 value's bits as an int16 ordered as the values (-0 just below +0; NaNs land past the
   infinities and are caught apart), and back */
static inline int16_t order_key(uint16_t u) {
    int16_t s = (int16_t)u;
    return s < 0 ? (int16_t)(s ^ 0x7fff) : s;
}

static inline float key_value(int16_t key) {
    return bf16_to_float((uint16_t)(key < 0 ? key ^ 0x7fff : key));
}

/* the first zero of w, with its sign: a float loop's min (max) of values whose extreme is a
   zero keeps the first zero it meets, and that sign reaches the stored shift / zero. torch's
   amin / amax agree where the group holds other values (tests/test_quanto_math.py); in a group
   of nothing but zeros of both signs their lane order picks, and the stored zero may differ in
   sign only (the dequantized weight does not) */
static float first_zero(const uint16_t *w, int64_t n) {
    int64_t i = 0;
    while (i < n && (w[i] & 0x7fff)) i++;
    return bf16_to_float(w[i]);
}

/* the extremes of n >= 1 bf16 values; NaN in them makes both NaN (torch's amin / amax).
   Integer min / max over order_key, which gcc vectorises; a float min / max reduction it
   leaves scalar (reordering it could change which of -0 and +0 wins; first_zero settles that
   as the scalar loop `lo = v < lo ? v : lo` would) */
static void extremes(const uint16_t *w, int64_t n, float *lo_out, float *hi_out) {
    int16_t lo = INT16_MAX, hi = INT16_MIN;
    uint16_t top = 0;       /* |w| as bits: a NaN lies above inf's 0x7f80 */
    for (int64_t i = 0; i < n; i++) {
        int16_t key = order_key(w[i]);
        uint16_t a = w[i] & 0x7fff;
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
        top = a > top ? a : top;
    }
    if (top > 0x7f80) {
        *lo_out = *hi_out = NAN;
        return;
    }
    float l = key_value(lo), h = key_value(hi);
    *lo_out = l == 0.0f ? first_zero(w, n) : l;
    *hi_out = h == 0.0f ? first_zero(w, n) : h;
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

/* affine, min/max per group row of g values, packed as quanto's pack_weights: w bf16 [R, g]
   -> packed uint8 [P, g], P = ceil(R / (8 / bits)), packed rows [p0, p1): byte (p, c) holds
   the code of row p + i P in bits i * bits.. (rows past R leave theirs 0); scale and shift bf16
   [R]: scale = bf16(bf16(max - min) / (2^bits - 1)), shift = -min,
   code = clamp(round(bf16(bf16(w + shift) / scale))). A thread owns whole packed rows, so no
   two write one byte; the codes go straight into their bits (packing them in torch after the
   pass took a third of a quanto int4 load). */
int dq_quanto_affine_bf16(const uint16_t *w, int64_t g, int bits, int64_t rows, int64_t p0,
                          int64_t p1, uint8_t *packed, uint16_t *scale, uint16_t *shift) {
    if (bits != 2 && bits != 4) return -1;
    const float top_code = (float)((1 << bits) - 1);
    const int64_t per = 8 / bits, np = (rows + per - 1) / per;
    for (int64_t p = p0; p < p1; p++) {
        uint8_t *pr = packed + p * g;
        memset(pr, 0, (size_t)g);
        for (int64_t slice = 0, r = p; slice < per && r < rows; slice++, r += np) {
            const uint16_t *wr = w + r * g;
            float lo, hi;
            extremes(wr, g, &lo, &hi);
            float s = round_bf16(round_bf16(hi - lo) / top_code), sh = -lo;
            scale[r] = float_to_bf16(s);
            shift[r] = float_to_bf16(sh);
            const int at = (int)(slice * bits);
            for (int64_t i = 0; i < g; i++) {
                float v = rbf16(rbf16(bf16_to_float(wr[i]) + sh) / s);
                pr[i] = (uint8_t)(pr[i] | (ucode_of(v, top_code) << at));
            }
        }
    }
    return 0;
}

#define CODES 256
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
            for (int64_t i0 = 0; i0 < g; i0 += CODES) {    /* codes, then pairs: two loops
                                                           that gcc vectorises */
                uint8_t c[CODES];
                int64_t n = g - i0 < CODES ? g - i0 : CODES;
                for (int64_t i = 0; i < n; i++)
                    c[i] = (uint8_t)ucode_of(rbf16(rbf16(bf16_to_float(wg[i0 + i]) - m) / s),
                                             15.0f);
                for (int64_t i = 0; i < n / 2; i++)
                    pg[i0 / 2 + i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
            }
        }
    return 0;
}
