/* The tests' stand-in for <immintrin.h>: SIMDe's portable versions of the x86 intrinsics, so the
   AVX-512 paths of ops/native/csrc build and run on a CPU without AVX-512 (tests/native_targets.py
   builds them with -D__AVX512F__ ... -I tests/simde). Arithmetic is IEEE lane by lane, as the
   hardware's; what SIMDe lacks (or does not fuse) is written here. Never used by the library. */
#ifndef DIFFQUANT_SIMDE_SHIM_H
#define DIFFQUANT_SIMDE_SHIM_H
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>
#include <simde/x86/f16c.h>
#include <string.h>

/* SIMDe's fmadd is a product then a sum (two roundings); the instructions round once */
#define DQ_FUSED(WIDTH, N)                                                                  \
    static inline simde__m##WIDTH dq_fmadd##WIDTH(simde__m##WIDTH a, simde__m##WIDTH b,    \
                                                  simde__m##WIDTH c) {                     \
        simde__m##WIDTH##_private a_ = simde__m##WIDTH##_to_private(a),                    \
                                  b_ = simde__m##WIDTH##_to_private(b),                    \
                                  c_ = simde__m##WIDTH##_to_private(c);                    \
        for (int i = 0; i < N; i++) c_.f32[i] = __builtin_fmaf(a_.f32[i], b_.f32[i], c_.f32[i]); \
        return simde__m##WIDTH##_from_private(c_);                                         \
    }
DQ_FUSED(128, 4)
DQ_FUSED(256, 8)
DQ_FUSED(512, 16)
#undef _mm_fmadd_ps
#undef _mm256_fmadd_ps
#undef _mm512_fmadd_ps
#define _mm_fmadd_ps dq_fmadd128
#define _mm256_fmadd_ps dq_fmadd256
#define _mm512_fmadd_ps dq_fmadd512

static inline simde__m512i dq_cvtepi8_epi32(simde__m128i a) {
    simde__m128i_private a_ = simde__m128i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) r.i32[i] = a_.i8[i];
    return simde__m512i_from_private(r);
}

static inline simde__m512i dq_cvtepu8_epi32(simde__m128i a) {
    simde__m128i_private a_ = simde__m128i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) r.i32[i] = a_.u8[i];
    return simde__m512i_from_private(r);
}

static inline simde__m256i dq_cvtepi32_epi16(simde__m512i a) {  /* truncates, as vpmovdw */
    simde__m512i_private a_ = simde__m512i_to_private(a);
    simde__m256i_private r;
    for (int i = 0; i < 16; i++) r.i16[i] = (int16_t)a_.i32[i];
    return simde__m256i_from_private(r);
}

static inline float dq_cvtsh_ss(unsigned short h) {  /* exact, subnormals included */
    unsigned sign = (h >> 15) & 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float f = e == 0 ? (float)m * 5.9604644775390625e-8f
            : e == 31 ? (m ? __builtin_nanf("") : __builtin_inff())
            : __builtin_ldexpf((float)(m | 0x400), (int)e - 25);
    return sign ? -f : f;
}
/* VCVTNEPS2BF16 as Intel's pseudocode defines it, not as torch rounds: a subnormal input
   becomes a zero of its sign (the instruction ignores MXCSR and always treats them so), a NaN
   keeps its sign and payload, quieted; the rest round to nearest even */
static inline simde__m256bh dq_cvtneps_pbh(simde__m512 a) {
    simde__m512_private a_ = simde__m512_to_private(a);
    simde__m256bh_private r;
    uint16_t bits[16];
    for (int i = 0; i < 16; i++) {
        uint32_t u;
        memcpy(&u, &a_.f32[i], 4);
        if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
        if ((u & 0x7fffffffu) > 0x7f800000u)
            bits[i] = (uint16_t)((u >> 16) | 0x40);
        else
            bits[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
    memcpy(&r, bits, 32);
    return simde__m256bh_from_private(r);
}
#define _mm512_cvtneps_pbh dq_cvtneps_pbh

#define _mm512_cvtepi8_epi32 dq_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 dq_cvtepu8_epi32
#define _mm512_cvtepi32_epi16 dq_cvtepi32_epi16
#define _cvtsh_ss dq_cvtsh_ss
#endif
