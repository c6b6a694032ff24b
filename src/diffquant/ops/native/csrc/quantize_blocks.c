/* Weight quantization on load of bf16 weights into bitsandbytes' and GGUF's blocks:
   bitsandbytes' 4-bit NF4/FP4 (its CPU quantize_4bit, backends/default/ops.py) and LLM.int8()
   rows (int8_vectorwise_quant of the fp16 weight), and ggml's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
   (ops/formats/gguf.py, itself gguf-py's numpy bit for bit). Compiled on first use by
   ops/native/build.py; ops/native/quantize.py calls them.

   Why C: each reference is five to ten torch passes over the float32 copy of the weight
   (abs, max, multiply, clamp, bucketize, casts, packing) plus that copy; bitsandbytes NF4 ran at
   0.06-0.11 GB/s of bf16 checkpoint and GGUF Q4_0 at 0.18 on a 2-core Zen 4. Here each block
   is read twice (its extreme, then its codes) and written once.

   The numbers are the references', op for op, in float32 (bf16 widens exactly): torch's
   `1.0 / t` is reciprocal(t) * 1.0, so 1.0f / a; clamp keeps NaN; bucketize puts NaN past the
   last boundary; ggml rounds half away from zero (roundf), truncates for Q4_0 and Q5_0. Where a
   reference's cast of a non-finite value is the platform's (int8 of NaN or inf), the kernel
   returns 1 and the caller runs the reference for the whole weight. */
/* gcc keeps rintf / floorf / truncf and the selects around them as branches while it must
   preserve floating-point exception flags; nothing here reads them, and the values are the
   same, so the code loops vectorise (3x on AVX2) */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "half.h"
#include "kernels.h"

/* |w| of n bf16 values as bits: ordered as the values, a NaN above inf's 0x7f80 */
static uint16_t top_bits(const uint16_t *w, int64_t n) {
    uint16_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        uint16_t a = w[i] & 0x7fff;
        top = a > top ? a : top;
    }
    return top;
}

/* -- bitsandbytes 4-bit ------------------------------------------------------------------ */
/* blocks [b0, b1) of bs values: absmax[b] = max |w| (NaN if any), codes = order[bucket of
   clamp(w * (1 / max(absmax, 1e-38)), -1, 1) among the 15 sorted bounds], two to a byte, the
   first in the high nibble. bucketize's index is the count of bounds below the value; a NaN
   passes every one (!(v <= b)), as torch's binary search does. */
int dq_bnb4_quantize_bf16(const uint16_t *w, const float *bounds, const uint8_t *order,
                          int64_t bs, int64_t b0, int64_t b1, uint8_t *packed, float *absmax) {
    if (bs % 64) return -1;
    const float tiny = (float)1e-38;    /* torch converts clamp's double min to float */
    float bd[15];
    memcpy(bd, bounds, sizeof bd);
    for (int64_t b = b0; b < b1; b++) {
        const uint16_t *x = w + b * bs;
        float am = bf16_to_float(top_bits(x, bs));  /* a NaN keeps its payload, as torch's max */
        absmax[b] = am;
        float inv = 1.0f / (am < tiny ? tiny : am);          /* NaN stays NaN */
        for (int64_t i0 = 0; i0 < bs; i0 += 64) {  /* simple loops over 64 values: vectorised */
            float v[64];
            int32_t c[64];
            for (int i = 0; i < 64; i++) {
                float t = bf16_to_float(x[i0 + i]) * inv;
                t = t < -1.0f ? -1.0f : t;
                v[i] = t > 1.0f ? 1.0f : t;
                c[i] = 0;
            }
            for (int j = 0; j < 15; j++)
                for (int i = 0; i < 64; i++) c[i] += !(v[i] <= bd[j]);
            uint8_t *p = packed + (b * bs + i0) / 2;
            for (int i = 0; i < 32; i++)
                p[i] = (uint8_t)((order[c[2 * i]] << 4) | order[c[2 * i + 1]]);
        }
    }
    return 0;
}

/* a bf16 value f rounded to fp16's precision and widened back (torch's .to(float16).float()),
   for |f| <= 65504: fp16's normals hold every bf16 value of their range (8 significant bits in
   10), so only its subnormals (steps of 2^-24 below 2^-14) round. Larger values (fp16's inf)
   are the caller's to catch. */
static inline float via_half(float f) {
    float a = fabsf(f), sub = rintf(a * 0x1p24f) * 0x1p-24f;
    return copysignf(a < 0x1p-14f ? sub : a, f);
}

/* -- LLM.int8() rows: w bf16 [N, k] rows [r0, r1) -> q int8, scb float32 [N] -------------- */
/* bitsandbytes quantizes the fp16 weight: scb = max |fp16(w)|, q = round(fp16(w) * (127 / scb)),
   127 / scb being reciprocal(scb) * 127. A row whose scb is 0, inf or NaN returns 1 (its codes
   are the platform's cast of NaN or inf). */
int dq_bnb_int8_bf16(const uint16_t *w, int64_t k, int64_t r0, int64_t r1, int8_t *q,
                     float *scb) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *x = w + r * k;
        uint16_t top = top_bits(x, k);
        float m = via_half(bf16_to_float(top));  /* rounding is monotonic: the max's rounding */
        if (top > 0x7f80 || m == 0.0f || m > 65504.0f) return 1;  /* NaN, 0 or fp16's inf */
        scb[r] = m;
        float s = (1.0f / m) * 127.0f;
        int8_t *qr = q + r * k;
        for (int64_t i = 0; i < k; i++)
            qr[i] = (int8_t)(int32_t)rintf(via_half(bf16_to_float(x[i])) * s);
    }
    return 0;
}

/* -- GGUF Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 ------------------------------------ */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };

/* the value of largest magnitude top (bits of |x|), sign kept, the first on ties (argmax) */
static float signed_absmax(const uint16_t *x, uint16_t top) {
    int at = 0;
    while ((x[at] & 0x7fff) != top) at++;
    return bf16_to_float(x[at]);
}

/* roundf (half away from zero) of a finite v as ggml's, in ops that vectorise */
static inline float round_away(float v) {
    float a = fabsf(v), f = floorf(a);
    return copysignf(f + floorf(2.0f * (a - f)), v);
}

/* the block's minimum into *lo and maximum into *hi; 1 where the minimum is a zero and both
   signs of zero are in the block (torch's amin then picks the stored sign by lane order) */
static int block_extremes(const uint16_t *x, float *lo, float *hi) {
    float l = bf16_to_float(x[0]), h = l;
    int zeros = 0;                      /* bit 0: a +0 seen, bit 1: a -0 */
    for (int i = 0; i < 32; i++) {
        float v = bf16_to_float(x[i]);
        l = v < l ? v : l;
        h = v > h ? v : h;
        zeros |= x[i] == 0 ? 1 : x[i] == 0x8000 ? 2 : 0;
    }
    if (l == 0.0f) {
        if (zeros == 3) return 1;
        l = zeros == 2 ? -0.0f : 0.0f;
    }
    *lo = l, *hi = h;
    return 0;
}

/* Q4_1 / Q5_1: d = (max - min) / (2^bits - 1), codes trunc((x - min) / d + 0.5); d, min, then
   Q5_1's high bits, then the nibbles */
static int gguf_affine_block(int qtype, const uint16_t *x, uint8_t *o) {
    float lo, hi;
    if (block_extremes(x, &lo, &hi)) return 1;
    const float top_code = qtype == Q4_1 ? 15.0f : 31.0f;
    float d = (hi - lo) / top_code, inv = d == 0.0f ? 0.0f : 1.0f / d;
    if (isinf(inv) || isinf(d)) return 1;
    uint16_t dh = half_bits(d), mh = half_bits(lo);
    memcpy(o, &dh, 2);
    memcpy(o + 2, &mh, 2);
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float c = truncf((bf16_to_float(x[i]) - lo) * inv + 0.5f);
        c = c < 0.0f ? 0.0f : c;
        q[i] = (uint8_t)(int32_t)(c > top_code ? top_code : c);
    }
    uint8_t *nib = o + 4;
    if (qtype == Q5_1) {
        uint32_t high = 0;
        for (int i = 0; i < 32; i++) high |= (uint32_t)((q[i] >> 4) & 1) << i;
        for (int j = 0; j < 4; j++) o[4 + j] = (uint8_t)(high >> (8 * j));
        nib += 4;
    }
    for (int j = 0; j < 16; j++) nib[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    return 0;
}

/* one block x [32] -> its type's bytes at o; 1 where the reference's codes are not defined */
static int gguf_block(int qtype, const uint16_t *x, uint8_t *o) {
    uint16_t top = top_bits(x, 32);
    if (top >= 0x7f80) return 1;                        /* inf or NaN: the cast's own */
    if (qtype == Q4_1 || qtype == Q5_1) return gguf_affine_block(qtype, x, o);
    float d = qtype == Q8_0 ? bf16_to_float(top) / 127.0f
              : signed_absmax(x, top) / (qtype == Q4_0 ? -8.0f : -16.0f);
    float inv = d == 0.0f ? 0.0f : 1.0f / d;
    if (isinf(inv)) return 1;
    uint16_t dh = half_bits(d);
    memcpy(o, &dh, 2);
    if (qtype == Q8_0) {
        for (int i = 0; i < 32; i++)
            o[2 + i] = (uint8_t)(int32_t)round_away(bf16_to_float(x[i]) * inv);
        return 0;
    }
    const float top_code = qtype == Q4_0 ? 15.0f : 31.0f, mid = qtype == Q4_0 ? 8.5f : 16.5f;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float c = truncf(bf16_to_float(x[i]) * inv + mid);
        c = c < 0.0f ? 0.0f : c;
        q[i] = (uint8_t)(int32_t)(c > top_code ? top_code : c);
    }
    uint8_t *nib = o + 2;
    if (qtype == Q5_0) {
        uint32_t high = 0;
        for (int i = 0; i < 32; i++) high |= (uint32_t)((q[i] >> 4) & 1) << i;
        for (int j = 0; j < 4; j++) o[2 + j] = (uint8_t)(high >> (8 * j));
        nib += 4;
    }
    for (int j = 0; j < 16; j++) nib[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    return 0;
}

/* blocks [b0, b1) of w (32 bf16 values each) -> out (type_size bytes each) */
int dq_gguf_quantize_bf16(int qtype, const uint16_t *w, int64_t b0, int64_t b1, uint8_t *out) {
    int64_t size = qtype == Q8_0 ? 34 : qtype == Q4_0 ? 18 : qtype == Q5_0 ? 22
                   : qtype == Q4_1 ? 20 : qtype == Q5_1 ? 24 : 0;
    if (!size) return -1;
    for (int64_t b = b0; b < b1; b++)
        if (gguf_block(qtype, w + b * 32, out + b * size)) return 1;
    return 0;
}
