/* GGUF block decoding and few-row products on a CPU, compiled on first use by ops/native.py.

   Why C: torch runs a decode as several elementwise passes over the weight (15 ms for a Q6_K
   3072 x 3072 weight on a Zen 4 core pair, a third of the bf16 product it feeds); here each
   block is decoded once, in registers, and written once.

   The numbers are gguf_dequant.py's, op for op in float32: products of a half-float scale and
   a small integer code are exact, so the one rounding of Q4_1/Q4_K (the add of the min) is the
   reference's. Built with -ffp-contract=off so no multiply-add fuses across a rounding.
   bf16 output rounds to nearest even, as torch's cast.

   Every function works on rows [r0, r1) of a weight of `n_blocks` blocks per row, so callers
   split rows across threads. Types: the GGML ids below. */
#include <stdint.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* subnormal (or zero): m * 2^-24, exact */
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* element count and byte size of one block; 0 for a type this file does not handle */
static int block_layout(int qtype, int *elems) {
    switch (qtype) {
    case Q4_0: *elems = 32; return 18;
    case Q4_1: *elems = 32; return 20;
    case Q8_0: *elems = 32; return 34;
    case Q4_K: *elems = 256; return 144;
    case Q6_K: *elems = 256; return 210;
    }
    return 0;
}

/* -- one block -> float32 values y[elems] ------------------------------------------------- */
static void block_q8_0(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b);
    const int8_t *q = (const int8_t *)(b + 2);
    for (int i = 0; i < 32; i++) y[i] = d * (float)q[i];
}

static void block_q4_0(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b);
    const uint8_t *q = b + 2;                /* element i: low nibble of q[i]; i + 16: high */
    for (int i = 0; i < 16; i++) y[i] = d * ((float)(q[i] & 0x0f) - 8.0f);
    for (int i = 0; i < 16; i++) y[i + 16] = d * ((float)(q[i] >> 4) - 8.0f);
}

static void block_q4_1(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    const uint8_t *q = b + 4;
    for (int i = 0; i < 16; i++) y[i] = d * (float)(q[i] & 0x0f) + m;
    for (int i = 0; i < 16; i++) y[i + 16] = d * (float)(q[i] >> 4) + m;
}

/* Q4_K: eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4) */
static void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void block_q4_k(const uint8_t *restrict b, float *restrict y) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *q = b + 16;
    for (int j = 0; j < 4; j++, q += 32, y += 64) {  /* 32 bytes: sub-blocks 2j (low), 2j+1 */
        int s0, m0, s1, m1;
        scale_min_k4(2 * j, b + 4, &s0, &m0);
        scale_min_k4(2 * j + 1, b + 4, &s1, &m1);
        float d0 = d * (float)s0, n0 = dmin * (float)m0, d1 = d * (float)s1, n1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            y[l] = d0 * (float)(q[l] & 0x0f) - n0;
            y[l + 32] = d1 * (float)(q[l] >> 4) - n1;
        }
    }
}

static void block_q6_k(const uint8_t *restrict b, float *restrict y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = half_to_float(b + 208), dl[16];
    for (int i = 0; i < 16; i++) dl[i] = d * (float)sc[i];
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, y += 128) {  /* ggml's dequantize_row_q6_K */
        const float *s = dl + 8 * h;
        for (int l = 0; l < 32; l++) {
            int i = l / 16;
            y[l] = s[i] * (float)((int)((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = s[i + 2] * (float)((int)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = s[i + 4] * (float)((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = s[i + 6] * (float)((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

typedef void (*block_fn)(const uint8_t *restrict, float *restrict);

static block_fn block_decoder(int qtype) {
    switch (qtype) {
    case Q4_0: return block_q4_0;
    case Q4_1: return block_q4_1;
    case Q8_0: return block_q8_0;
    case Q4_K: return block_q4_k;
    case Q6_K: return block_q6_k;
    }
    return 0;
}

/* rows [r0, r1) of blocks [N, n_blocks * size] -> out [N, n_blocks * elems], float32
   (out_bf16 = 0) or bf16 (1), row stride ld_out elements. Returns 0, or -1 for an unknown type. */
int dq_decode(int qtype, const uint8_t *blocks, int64_t n_blocks, int64_t r0, int64_t r1,
              void *out, int64_t ld_out, int out_bf16) {
    int elems, size = block_layout(qtype, &elems);
    block_fn decode = block_decoder(qtype);
    if (!size || !decode) return -1;
    float tmp[256];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * n_blocks * size;
        for (int64_t g = 0; g < n_blocks; g++, b += size) {
            int64_t at = r * ld_out + g * elems;
            if (out_bf16) {
                decode(b, tmp);
                uint16_t *o = (uint16_t *)out + at;
                for (int i = 0; i < elems; i++) o[i] = float_to_bf16(tmp[i]);
            } else {
                decode(b, (float *)out + at);
            }
        }
    }
    return 0;
}
