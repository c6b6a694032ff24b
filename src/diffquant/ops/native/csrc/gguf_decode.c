/* GGUF block decoding into a float32 or bf16 buffer on a CPU, compiled on first use by
   ops/native/build.py.

   Why C: torch runs a decode as several elementwise passes over the weight (15 ms for a Q6_K
   3072 x 3072 weight on a Zen 4 core pair, a third of the bf16 product it feeds); here each
   block is decoded once, in registers, and written once, with gguf.h's float32 ops (the
   reference's, bit for bit). bf16 output rounds to nearest even, as torch's cast.

   Every function works on rows [r0, r1) of a weight of `n_blocks` blocks per row, so callers
   split rows across threads. */
#include "gguf.h"

/* float32 -> bf16 as torch's cast, n a multiple of 16 (16 at a time with AVX-512). Not
   VCVTNEPS2BF16 (AVX512_BF16): it flushes subnormal inputs to zero and keeps a NaN's sign,
   where torch keeps subnormals and writes every NaN as 0x7fc0. */
#ifdef __AVX512F__
static inline void store_bf16(uint16_t *restrict o, const float *restrict f, int n) {
    for (int i = 0; i < n; i += 16) store_bf16x16(o + i, _mm512_loadu_ps(f + i));
}
#else
static inline void store_bf16(uint16_t *restrict o, const float *restrict f, int n) {
    for (int i = 0; i < n; i++) o[i] = float_to_bf16(f[i]);
}
#endif

/* rows [r0, r1) of blocks [N, n_blocks * size] -> out [N, n_blocks * ELEMS]; one copy of the
   loop per type and output dtype, so each block decoder is inlined (an indirect call per
   32-value block cost more than the decode) */
#define DECODE_ROWS(DECODE, SIZE, ELEMS)                                                  \
    for (int64_t r = r0; r < r1; r++) {                                                   \
        const uint8_t *b = blocks + r * n_blocks * (SIZE);                                \
        for (int64_t g = 0; g < n_blocks; g++, b += (SIZE)) {                             \
            int64_t at = r * ld_out + g * (ELEMS);                                        \
            if (out_bf16) {                                                               \
                float tmp[ELEMS];                                                         \
                DECODE(b, tmp);                                                           \
                store_bf16((uint16_t *)out + at, tmp, (ELEMS));                           \
            } else {                                                                      \
                DECODE(b, (float *)out + at);                                             \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    return 0;

#ifdef HAVE_GGUF_AVX512
/* The 32-value types with AVX-512: the portable form stores a block's floats and reloads them
   for the bf16 cast, and a 64-byte load of two 32-byte stores stalls (no store forwarding):
   Q8_0 took 3 ms per 3072 x 3072 that way, 1 ms here. Same float32 ops, same bits. */
static inline void put16(void *out, int64_t at, __m512 v, int out_bf16) {
    if (out_bf16) store_bf16x16((uint16_t *)out + at, v);
    else _mm512_storeu_ps((float *)out + at, v);
}

static inline __m512 u8_to_float(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

static int decode_small_avx512(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0,
                               int64_t r1, void *out, int64_t ld_out, int out_bf16) {
    const int size = qtype == Q8_0 ? Q8_0_BYTES : qtype == Q4_0 ? Q4_0_BYTES : Q4_1_BYTES;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * n_blocks * size;
        for (int64_t g = 0; g < n_blocks; g++, b += size) {
            int64_t at = r * ld_out + g * 32;
            __m512 d = half_broadcast(b), lo, hi;
            if (qtype == Q8_0) {
                lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
                hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
                lo = _mm512_mul_ps(d, lo);
                hi = _mm512_mul_ps(d, hi);
            } else {
                __m128i q = _mm_loadu_si128((const __m128i *)(b + (qtype == Q4_0 ? 2 : 4)));
                lo = u8_to_float(_mm_and_si128(q, low4));
                hi = u8_to_float(_mm_and_si128(_mm_srli_epi16(q, 4), low4));
                if (qtype == Q4_0) {                                  /* d * (u - 8) */
                    lo = _mm512_mul_ps(d, _mm512_sub_ps(lo, eight));
                    hi = _mm512_mul_ps(d, _mm512_sub_ps(hi, eight));
                } else {                                              /* d * u + m */
                    __m512 m = half_broadcast(b + 2);
                    lo = _mm512_add_ps(_mm512_mul_ps(d, lo), m);
                    hi = _mm512_add_ps(_mm512_mul_ps(d, hi), m);
                }
            }
            put16(out, at, lo, out_bf16);
            put16(out, at + 16, hi, out_bf16);
        }
    }
    return 0;
}
#endif

#ifdef HAVE_GGUF_AVX2
/* The same for AVX2 (8 lanes): gcc's code for the per-block loops took ~2.5 cycles a value on
   a Zen 3 (Q4_0 3.3-3.9 ms per 3072 x 3072 into float32 on two cores). Same float32 ops in
   the same order, so the same bits; bf16 stores round as float_to_bf16. */
static inline void put8(void *out, int64_t at, __m256 v, int out_bf16) {
    if (out_bf16) store_bf16x8((uint16_t *)out + at, v);
    else _mm256_storeu_ps((float *)out + at, v);
}

static int decode_small_avx2(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0,
                             int64_t r1, void *out, int64_t ld_out, int out_bf16) {
    const int size = qtype == Q8_0 ? Q8_0_BYTES : qtype == Q4_0 ? Q4_0_BYTES : Q4_1_BYTES;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * n_blocks * size;
        for (int64_t g = 0; g < n_blocks; g++, b += size) {
            int64_t at = r * ld_out + g * 32;
            __m256 v[4];
            if (qtype == Q8_0) {
                __m256 d = half_broadcast8(b);
                for (int k = 0; k < 4; k++)
                    v[k] = _mm256_mul_ps(d, int8x8_to_float(b + 2 + 8 * k));
            } else {
                q4_block8(qtype, b, v);
            }
            for (int k = 0; k < 4; k++) put8(out, at + 8 * k, v[k], out_bf16);
        }
    }
    return 0;
}
#endif

/* rows [r0, r1) of blocks [N, n_blocks * size] -> out [N, n_blocks * elems], float32
   (out_bf16 = 0) or bf16 (1), row stride ld_out elements. Returns 0, or -1 for an unknown type. */
int dq_decode(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
              void *out, int64_t ld_out, int out_bf16) {
#ifdef HAVE_GGUF_AVX512
    if (qtype == Q8_0 || qtype == Q4_0 || qtype == Q4_1)
        return decode_small_avx512(qtype, blocks, n_blocks, r0, r1, out, ld_out, out_bf16);
#elif defined(HAVE_GGUF_AVX2)
    if (qtype == Q8_0 || qtype == Q4_0 || qtype == Q4_1)
        return decode_small_avx2(qtype, blocks, n_blocks, r0, r1, out, ld_out, out_bf16);
#endif
    switch (qtype) {
    case Q4_0: DECODE_ROWS(block_q4_0, Q4_0_BYTES, Q4_0_ELEMS)
    case Q4_1: DECODE_ROWS(block_q4_1, Q4_1_BYTES, Q4_1_ELEMS)
    case Q8_0: DECODE_ROWS(block_q8_0, Q8_0_BYTES, Q8_0_ELEMS)
    case Q4_K: DECODE_ROWS(block_q4_k, Q4_K_BYTES, Q4_K_ELEMS)
    case Q6_K: DECODE_ROWS(block_q6_k, Q6_K_BYTES, Q6_K_ELEMS)
    }
    return -1;
}

/* entry i of GGUF_TYPES as (id, values per block, bytes per block); 0, or -1 past the end */
int dq_gguf_block(int i, int *id, int *elems, int *bytes) {
#define GGUF_ROW(T, ID, ELEMS, BYTES) {ID, ELEMS, BYTES},
    static const int table[][3] = {GGUF_TYPES(GGUF_ROW)};
    if (i < 0 || i >= (int)(sizeof table / sizeof table[0])) return -1;
    *id = table[i][0], *elems = table[i][1], *bytes = table[i][2];
    return 0;
}
