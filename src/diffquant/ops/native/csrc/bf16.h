/* bf16 <-> float32 as torch converts: widening is exact, narrowing rounds to nearest even and
   turns every NaN into torch's 0x7fc0. */
#ifndef DIFFQUANT_BF16_H
#define DIFFQUANT_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* f rounded to bf16 and widened back: one bf16 op's result, kept in float32 */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* y rounded to bf16, then plus *bias (bf16 bits; NULL: none) rounded again: torch's
   y.add_(bias) after a bf16 product, in the same pass */
static inline uint16_t bf16_plus(float y, const uint16_t *bias) {
    return float_to_bf16(bias ? round_bf16(y) + bf16_to_float(*bias) : y);
}

/* out[r] = v, out float32, or bf16 (rounded once) when as_bf16 and then plus bias[r] (bf16
   bits; NULL: none) as bf16_plus: the one-row products' store */
static inline void store_result(void *out, int64_t r, float v, int as_bf16,
                                const uint16_t *bias) {
    if (as_bf16)
        ((uint16_t *)out)[r] = bf16_plus(v, bias ? bias + r : 0);
    else
        ((float *)out)[r] = v;
}
#endif
