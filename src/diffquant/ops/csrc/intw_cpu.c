/* Integer weight formats decoded into a bf16 buffer on a CPU, compiled on first use by
   ops/native.py. Each repeats its reference's bf16 math (torch's bf16 ops compute in float32
   and round to bf16 after every op), so the weight it writes is bit-identical:

   - torchao int4 (tinygemm): w = bf16(bf16((u - 8) * s) + z), u the nibble of column 2j (low)
     or 2j + 1 (high) of packed [N, K/2], (s, z) one per group of columns;
   - row-scaled int8 (quanto int8, modelopt INT8): w = bf16(q * s), one s per row (or one);
   - quanto int4/int2: w = bf16(bf16(c * s) - shift) per group row of g values, group row
     i + j * P held in bits j * bits of byte row i of packed [P, g].

   And the one-row product of int8 rows with a scale per row (torchao int8, quanto int8).

   Why C: torch runs each as 3-4 passes over the weight (the bf16 ones convert to float32 and
   back each time): 8-10 ms per 3072 x 3072 against a 15 ms bf16 product on an AMX CPU; here one
   pass. Rows [r0, r1) of the weight per call, so callers split rows across threads. */
#include "bf16.h"
#include "kernels.h"

/* packed uint8 [N, K/2], scale/zero bf16 [N, K/group] -> out bf16 rows [r0, r1), stride ld */
int dq_int4_tinygemm_bf16(const uint8_t *packed, int64_t k, int64_t group, const uint16_t *scale,
                          const uint16_t *zero, int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    if (k % group || group % 2) return -1;
    int64_t groups = k / group;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * (k / 2);
        uint16_t *o = out + r * ld;
        for (int64_t g = 0; g < groups; g++) {
            float s = bf16_to_float(scale[r * groups + g]), z = bf16_to_float(zero[r * groups + g]);
            const uint8_t *pg = p + g * group / 2;
            uint16_t *og = o + g * group;
            for (int64_t j = 0; j < group / 2; j++) {
                og[2 * j] = float_to_bf16(round_bf16((float)((pg[j] & 0x0f) - 8) * s) + z);
                og[2 * j + 1] = float_to_bf16(round_bf16((float)((pg[j] >> 4) - 8) * s) + z);
            }
        }
    }
    return 0;
}

/* q int8 [N, k], scale bf16 at scale[r * scale_step] (step 1: per row, 0: one for all) */
int dq_int8_rows_bf16(const int8_t *q, int64_t k, const uint16_t *scale, int64_t scale_step,
                      int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    for (int64_t r = r0; r < r1; r++) {
        float s = bf16_to_float(scale[r * scale_step]);
        const int8_t *qr = q + r * k;
        uint16_t *o = out + r * ld;
        for (int64_t j = 0; j < k; j++) o[j] = float_to_bf16((float)qr[j] * s);
    }
    return 0;
}

/* group rows [a, b) of quanto's packing -> out bf16 [R, g] contiguous (the weight's rows) */
int dq_quanto_bits_bf16(const uint8_t *packed, int64_t p, int64_t g, int bits,
                        const uint16_t *scale, const uint16_t *shift, int64_t a, int64_t b,
                        uint16_t *out) {
    if (bits != 2 && bits != 4) return -1;
    const int mask = (1 << bits) - 1;
    for (int64_t i = a; i < b; i++) {
        const uint8_t *src = packed + (i % p) * g;
        int sh = (int)(i / p) * bits;
        float s = bf16_to_float(scale[i]), t = bf16_to_float(shift[i]);
        uint16_t *o = out + (i - a) * g;
        for (int64_t j = 0; j < g; j++)
            o[j] = float_to_bf16(round_bf16((float)((src[j] >> sh) & mask) * s) - t);
    }
    return 0;
}

/* One row of x (float32 [K]) times int8 rows: out[r] = bf16(scale[r] * sum_j q[r, j] x[j]), the
   numbers of torch._weight_int8pack_mm(x, q, scale) (a float32 sum, then the bf16 scale, one
   rounding), element j summed into lane j % LANES. Why not that kernel: it reads the weight at
   ~70% of this loop's rate from memory (no software prefetch) and needs 64-byte alignment. */
static float int8_row_portable(const int8_t *q, int64_t k, const float *x) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= k; j += LANES)  /* lane-major inner loop: the compiler vectorises it */
        for (int l = 0; l < LANES; l++) acc[l] = __builtin_fmaf((float)q[j + l], x[j + l], acc[l]);
    for (int l = 0; j + l < k; l++) acc[l] = __builtin_fmaf((float)q[j + l], x[j + l], acc[l]);
    return sum_lanes(acc);
}

#ifdef __AVX512F__
static float int8_row(const int8_t *q, int64_t k, const float *x) {  /* k % 64 == 0 */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; j += 64) {
        _mm_prefetch((const char *)(q + j + AHEAD), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(int8x16_to_float(q + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(int8x16_to_float(q + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(int8x16_to_float(q + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(int8x16_to_float(q + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    return sum_registers(a0, a1, a2, a3);
}
#endif

/* q int8 [N, K], scale bf16 [N], x float32 [K] -> out bf16 [N], rows [r0, r1); portable = 1
   forces the portable loop (tests compare the two) */
int dq_int8_gemv(const int8_t *q, int64_t k, const uint16_t *scale, const float *x, int64_t r0,
                 int64_t r1, uint16_t *out, int portable) {
    float (*row)(const int8_t *, int64_t, const float *) = int8_row_portable;
#ifdef __AVX512F__
    if (!portable && k % 64 == 0) row = int8_row;
#endif
    for (int64_t r = r0; r < r1; r++)
        out[r] = float_to_bf16(row(q + r * k, k, x) * bf16_to_float(scale[r]));
    return 0;
}
