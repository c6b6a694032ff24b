/* Every kernel Python calls, by name: its argument list and the adapter that unpacks it.

   A kernel is called as dq_run(index, args, n, threads) (parallel.c): args holds its arguments
   other than its row range, each as an int64 (pointers too), in the order its argument list
   below declares them, "name:p" a pointer and "name:i" an integer. ops/native/registry.py
   declares the same lists; when the library loads it reads this table (dq_kernel_count,
   dq_kernel_name, dq_kernel_args) and refuses a library whose table differs from its own, so a
   kernel added, removed or changed on one side only fails loudly, before any call. */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"
#include "registry.h"

#define P(i) ((void *)(intptr_t)a[i])
#define I(i) ((int)a[i])
/* an adapter: rows [r0, r1) of kernel NAME with its arguments a[], in the order of ARGS */
#define KERNEL(NAME, ARGS)                                                                \
    static const char NAME##_args[] = ARGS;                                               \
    static int NAME(const int64_t *a, int64_t r0, int64_t r1)

/* A bf16 row x [k] as float32: into buf (WIDEN_CAP floats on the thread's stack: 16 KB, small
   enough for any OpenMP stack size) or, longer, a malloc'd copy; NULL when out of memory. Each
   thread widens x itself: converting it in Python first was a torch op (~10 us) per one-row
   product of ~1 ms. */
#define WIDEN_CAP 4096
static float *widen(const uint16_t *x, int64_t k, float *buf) {
    float *f = k <= WIDEN_CAP ? buf : malloc((size_t)k * sizeof(float));
    if (f)
        for (int64_t i = 0; i < k; i++) f[i] = bf16_to_float(x[i]);
    return f;
}

/* -- GGUF (gguf_decode.c, gguf_gemv.c, gguf_gemv_q4.c) ---------------------------------------- */
KERNEL(decode, "qtype:i blocks:p n_blocks:i out:p ld_out:i out_bf16:i") {
    return dq_decode(I(0), P(1), a[2], r0, r1, P(3), a[4], I(5));
}
/* bf16 = 1: x is bf16 (k values) and out bf16 (plus the bf16 bias, if any), else both float32 */
KERNEL(gemv, "qtype:i blocks:p n_blocks:i x:p out:p portable:i bf16:i k:i bias:p") {
    if (!a[6]) return dq_gemv(I(0), P(1), a[2], r0, r1, P(3), P(4), I(5), 0, 0);
    float buf[WIDEN_CAP], *x = widen(P(3), a[7], buf);
    if (!x) return 1;
    int rc = dq_gemv(I(0), P(1), a[2], r0, r1, x, P(4), I(5), 1, P(8));
    if (x != buf) free(x);
    return rc;
}

/* -- int8 weights (int8_weight.c) ---------------------------------------------------------- */
KERNEL(int8_rows, "q:p k:i scale:p scale_step:i out:p ld:i") {
    return dq_int8_rows_bf16(P(0), a[1], P(2), a[3], r0, r1, P(4), a[5]);
}
KERNEL(int8_gemv, "q:p k:i scale:p x:p out:p portable:i post:p bias:p") {  /* x bf16 */
    float buf[WIDEN_CAP], *x = widen(P(3), a[1], buf);
    if (!x) return 1;
    int rc = dq_int8_gemv(P(0), a[1], P(2), x, r0, r1, P(4), I(5), P(6), P(7));
    if (x != buf) free(x);
    return rc;
}
KERNEL(scale_rows, "y:p ldy:i n:i scale:p bias:p") {
    return dq_scale_rows_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}

/* -- 4-bit weights in groups (int4.c) ------------------------------------------------------- */
KERNEL(int4_tinygemm, "packed:p k:i group:i scale:p zero:p out:p ld:i") {
    return dq_int4_tinygemm_bf16(P(0), a[1], a[2], P(3), P(4), r0, r1, P(5), a[6]);
}
/* quanto: weight rows [r0, r1) are group rows [r0 * per, r1 * per) of a contiguous output */
KERNEL(quanto_bits, "packed:p p:i g:i bits:i scale:p shift:p per:i out:p") {
    int64_t per = a[6], g = a[2];
    uint16_t *out = (uint16_t *)P(7) + r0 * per * g;
    return dq_quanto_bits_bf16(P(0), a[1], g, I(3), P(4), P(5), r0 * per, r1 * per, out);
}
KERNEL(int4_gemv, "packed:p sz:p k:i group:i x:p out:p portable:i bias:p") {  /* x bf16 */
    float buf[WIDEN_CAP], *x = widen(P(4), a[2], buf);
    if (!x) return 1;
    int rc = dq_int4_gemv(P(0), P(1), a[2], a[3], r0, r1, x, P(5), I(6), P(7));
    if (x != buf) free(x);
    return rc;
}

/* -- bitsandbytes NF4/FP4 (bnb4.c) --------------------------------------------------------- */
/* bf16 = 1: x is bf16 and out bf16 (plus the bf16 bias, if any), else both float32 */
KERNEL(lut4_gemv, "packed:p lut:p absmax:p blocksize:i k:i x:p out:p portable:i bf16:i bias:p") {
    if (!a[8])
        return dq_lut4_gemv(P(0), P(1), P(2), a[3], a[4], r0, r1, P(5), P(6), I(7), 0, 0);
    float buf[WIDEN_CAP], *x = widen(P(5), a[4], buf);
    if (!x) return 1;
    int rc = dq_lut4_gemv(P(0), P(1), P(2), a[3], a[4], r0, r1, x, P(6), I(7), 1, P(9));
    if (x != buf) free(x);
    return rc;
}
KERNEL(lut4_decode, "packed:p lut:p absmax:p blocksize:i k:i out:p ld:i") {
    return dq_lut4_decode_bf16(P(0), P(1), P(2), a[3], a[4], r0, r1, P(5), a[6]);
}

/* -- int8 dynamic quantization (int8_dynamic.c, int8_amx.c) -------------------------------- */
KERNEL(quantize, "x:p ldx:i k:i q:p scale:p") {
    return dq_quantize_rows_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}
KERNEL(int8_output, "acc:p sx:p sw:p bias:p n:i y:p ldy:i") {
    return dq_int8_output_bf16(P(0), P(1), P(2), P(3), r0, r1, a[4], P(5), a[6]);
}
KERNEL(int8_dot, "xw:p m:i q:p k:i acc:p ldacc:i") {
    return dq_int8_dot_rows(P(0), a[1], P(2), a[3], r0, r1, P(4), a[5]);
}
KERNEL(int8_dynamic_row, "x:p k:i q:p sw:p bias:p y:p") {
    return dq_int8_dynamic_row_bf16(P(0), a[1], P(2), P(3), P(4), r0, r1, P(5));
}
KERNEL(quantize_vnni, "x:p ldx:i k:i xp:p scale:p") {
    return dq_quantize_rows_vnni_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}
/* rows: blocks of 32 output channels */
KERNEL(amx_linear, "w:p k:i n:i xp:p groups:i sx:p sw:p bias:p y:p ldy:i m:i") {
    return dq_amx_int8_linear(P(0), a[1], a[2], P(3), a[4], r0, r1, P(5), P(6), P(7), P(8),
                              a[9], a[10]);
}

/* -- weight quantization on load (quantize.c) ---------------------------------------------- */
KERNEL(quanto_int8, "w:p k:i q:p scale:p") {
    return dq_quanto_int8_bf16(P(0), a[1], r0, r1, P(2), P(3));
}
KERNEL(quanto_affine, "w:p g:i bits:i rows:i packed:p scale:p shift:p") {
    return dq_quanto_affine_bf16(P(0), a[1], I(2), a[3], r0, r1, P(4), P(5), P(6));
}
KERNEL(int4_groupwise, "w:p k:i g:i packed:p scale:p zero:p") {
    return dq_int4_groupwise_bf16(P(0), a[1], a[2], r0, r1, P(3), P(4), P(5));
}
/* quantize_blocks.c: rows are blocks (bnb4_quantize, gguf_quantize) or weight rows */
KERNEL(bnb4_quantize, "w:p bounds:p order:p blocksize:i packed:p absmax:p") {
    return dq_bnb4_quantize_bf16(P(0), P(1), P(2), a[3], r0, r1, P(4), P(5));
}
KERNEL(bnb_int8_quantize, "w:p k:i q:p scb:p") {
    return dq_bnb_int8_bf16(P(0), a[1], r0, r1, P(2), P(3));
}
KERNEL(gguf_quantize, "qtype:i w:p out:p") {
    return dq_gguf_quantize_bf16(I(0), P(1), r0, r1, P(2));
}
/* quantize_kquant.c: rows are super-blocks of 256 values, w bf16 (dtype 0), float32 (1) or
   float16 (2) */
KERNEL(gguf_kquant, "qtype:i w:p dtype:i out:p") {
    return dq_gguf_kquant(I(0), P(1), I(2), r0, r1, P(3));
}

#define ENTRY(NAME) {#NAME, NAME##_args, NAME}
static const struct {
    const char *name, *args;
    rows_fn fn;
} KERNELS[] = {
    ENTRY(decode), ENTRY(gemv), ENTRY(int8_rows), ENTRY(int8_gemv), ENTRY(scale_rows),
    ENTRY(int4_tinygemm), ENTRY(quanto_bits), ENTRY(int4_gemv), ENTRY(lut4_gemv),
    ENTRY(lut4_decode), ENTRY(quantize), ENTRY(int8_output), ENTRY(int8_dot),
    ENTRY(int8_dynamic_row), ENTRY(quantize_vnni), ENTRY(amx_linear), ENTRY(quanto_int8),
    ENTRY(quanto_affine), ENTRY(int4_groupwise), ENTRY(bnb4_quantize), ENTRY(bnb_int8_quantize),
    ENTRY(gguf_quantize), ENTRY(gguf_kquant),
};
#define N_KERNELS (int)(sizeof KERNELS / sizeof KERNELS[0])

int dq_kernel_count(void) { return N_KERNELS; }
const char *dq_kernel_name(int i) { return i >= 0 && i < N_KERNELS ? KERNELS[i].name : 0; }
const char *dq_kernel_args(int i) { return i >= 0 && i < N_KERNELS ? KERNELS[i].args : 0; }
rows_fn dq_kernel_fn(int i) { return i >= 0 && i < N_KERNELS ? KERNELS[i].fn : 0; }
