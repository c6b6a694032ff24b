/* int8 weights with a scale per row on a CPU (torchao int8wo, quanto int8, modelopt INT8):
   their decode into a bf16 buffer, their one-row product, and torchao int8's output scaling.
   Compiled on first use by ops/native/build.py; each does rows [r0, r1) of its output, so
   ops/native/parallel.c splits rows across threads.

   - decode: w = bf16(q * s), one s per row (or one for all), the reference's bf16 math (torch's
     bf16 ops compute in float32 and round after every op), so the weight is bit-identical;
   - one row: out[r] = bf16(scale[r] * sum_j q[r, j] x[j]), torch._weight_int8pack_mm's numbers,
     then torchao's output scale and bias, or quanto's unfused bias, in the same call;
   - output scaling: torchao int8's two ops after its matmul on the integers as one pass,
     y = bf16(bf16(y * s) + bias), s the channel scale in bf16.

   Why C: torch runs each as 3-4 passes over the weight (the bf16 ones convert to float32 and
   back each time): 8-10 ms per 3072 x 3072 against a 15 ms bf16 product on an AMX CPU; here one
   pass. */
#include "bf16.h"
#include "kernels.h"

/* q int8 [N, k], scale bf16 at scale[r * scale_step] (step 1: per row, 0: one for all) */
int dq_int8_rows_bf16(const int8_t *q, int64_t k, const uint16_t *scale, int64_t scale_step,
                      int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    for (int64_t r = r0; r < r1; r++) {
        float s = bf16_to_float(scale[r * scale_step]);
        const int8_t *qr = q + r * k;
        uint16_t *o = out + r * ld;
        int64_t j = 0;
#ifdef __AVX512F__
        for (__m512 vs = _mm512_set1_ps(s); j + 16 <= k; j += 16)
            store_bf16x16(o + j, _mm512_mul_ps(int8x16_to_float(qr + j), vs));
#endif
        for (; j < k; j++) o[j] = float_to_bf16((float)qr[j] * s);
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

#ifdef HAVE_AVX2_ROWS
/* gcc's vectorised portable loop ran at ~5 GB/s of weights on Zen 3, half a bf16 product's
   rate: it does not prefetch and it spills the accumulators. k % 64 == 0 */
static float int8_row(const int8_t *q, int64_t k, const float *x) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 64) {
        _mm_prefetch((const char *)(q + j + AHEAD), _MM_HINT_T0);
        for (int i = 0; i < 8; i++)
            a[i] = _mm256_fmadd_ps(int8x8_to_float(q + j + 8 * i), _mm256_loadu_ps(x + j + 8 * i), a[i]);
    }
    return sum_registers8(a);
}
#endif

/* q int8 [N, K], scale bf16 [N] (NULL: 1), x float32 [K] -> out bf16 [N], rows [r0, r1):
   y = bf16(sum * scale); then, each rounded to bf16 as torch's ops, y * post and y + bias where
   given (bf16 [N], NULL: none): torchao int8's output scale and bias, or quanto's unfused bias,
   in this one call instead of a second pass. portable = 1 forces the portable loop. */
int dq_int8_gemv(const int8_t *q, int64_t k, const uint16_t *scale, const float *x, int64_t r0,
                 int64_t r1, uint16_t *out, int portable, const uint16_t *post,
                 const uint16_t *bias) {
    float (*row)(const int8_t *, int64_t, const float *) = int8_row_portable;
#if defined(__AVX512F__) || defined(HAVE_AVX2_ROWS)
    if (!portable && k % 64 == 0) row = int8_row;
#endif
    for (int64_t r = r0; r < r1; r++) {
        float y = row(q + r * k, k, x);
        if (scale) y *= bf16_to_float(scale[r]);
        if (post) y = round_bf16(y) * bf16_to_float(post[r]);
        out[r] = bf16_plus(y, bias ? bias + r : 0);
    }
    return 0;
}

/* y bf16 [M, ldy] rows [r0, r1), N columns, in place: y * scale (bf16 [N]) rounded to bf16,
   then + bias (bf16 [N], or none) rounded again: torch's y.mul_(s) then y.add_(bias). */
int dq_scale_rows_bf16(uint16_t *y, int64_t ldy, int64_t r0, int64_t r1, int64_t n,
                       const uint16_t *scale, const uint16_t *bias) {
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *yr = y + r * ldy;
        if (bias) {
            for (int64_t j = 0; j < n; j++)
                yr[j] = float_to_bf16(round_bf16(bf16_to_float(yr[j]) * bf16_to_float(scale[j]))
                                      + bf16_to_float(bias[j]));
        } else {
            for (int64_t j = 0; j < n; j++)
                yr[j] = float_to_bf16(bf16_to_float(yr[j]) * bf16_to_float(scale[j]));
        }
    }
    return 0;
}
