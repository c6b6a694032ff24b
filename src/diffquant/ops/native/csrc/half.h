/* float32 <-> fp16 bits as torch's .to(float16) and .float() (and ggml's GGML_FP32_TO_FP16 /
   GGML_FP16_TO_FP32, F16C's conversions): nearest even, subnormals kept, overflow to inf. */
#ifndef DIFFQUANT_HALF_H
#define DIFFQUANT_HALF_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t half_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    float a = fabsf(f);
    if (a != a) return sign | 0x7e00;
    if (a < 0x1p-14f)                        /* fp16 subnormal (or 1024: its min normal) */
        return sign | (uint16_t)(int)rintf(a * 0x1p24f);
    uint32_t v;
    memcpy(&v, &a, 4);
    v = (v + 0xfffu + ((v >> 13) & 1)) & ~0x1fffu;     /* 10 mantissa bits, nearest even */
    int32_t e = (int32_t)(v >> 23) - 127 + 15;
    if (e >= 31) return sign | 0x7c00;
    return sign | (uint16_t)((e << 10) | ((v >> 13) & 0x3ff));
}

static inline float half_to_float(uint16_t h) {
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {                            /* zero or subnormal: m * 2^-24, exact */
        f = (float)m * 0x1p-24f;
        return h & 0x8000 ? -f : f;
    }
    u = ((uint32_t)(h & 0x8000) << 16) | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (m << 13);
    memcpy(&f, &u, 4);
    return f;
}
#endif
