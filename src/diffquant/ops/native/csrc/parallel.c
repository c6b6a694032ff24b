/* One entry point for Python: dq_run(kernel, args, n, threads) runs a row kernel of kernels.h
   over rows [0, n) split into `threads` equal ranges. Why here and not in Python: a thread pool
   round trip from Python costs ~100 us, against a one-row product of ~300 us.

   The threads are torch's own OpenMP workers where this is built with -fopenmp: the library
   then needs libgomp.so.1, which the dynamic loader resolves to the copy torch loaded first, so
   there is one pool. Threads of our own (the build without OpenMP: POSIX threads, the caller's
   thread taking the first range) share their CPUs with torch's workers, which spin for a while
   after every torch op under the default wait policy: a one-row product took 1.7x as long.

   args: the kernel's arguments other than its row range, each as an int64 (pointers too), in
   the order of the adapters below. Returns -1 if any range did, else 1 if any did, else 0. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#include "kernels.h"

typedef int (*rows_fn)(const int64_t *a, int64_t r0, int64_t r1);
#define P(i) ((void *)(intptr_t)a[i])

static int decode(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_decode((int)a[0], P(1), a[2], r0, r1, P(3), a[4], (int)a[5]);
}
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

/* a[6] = 1: x is bf16 (k = a[7] values) and out bf16 (plus the bf16 bias a[8], if any), else
   both float32 */
static int gemv(const int64_t *a, int64_t r0, int64_t r1) {
    if (!a[6]) return dq_gemv((int)a[0], P(1), a[2], r0, r1, P(3), P(4), (int)a[5], 0, 0);
    float buf[WIDEN_CAP], *x = widen(P(3), a[7], buf);
    if (!x) return 1;
    int rc = dq_gemv((int)a[0], P(1), a[2], r0, r1, x, P(4), (int)a[5], 1, P(8));
    if (x != buf) free(x);
    return rc;
}
static int quantize(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_quantize_rows_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}
static int int8_output(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int8_output_bf16(P(0), P(1), P(2), P(3), r0, r1, a[4], P(5), a[6]);
}
static int int4_tinygemm(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int4_tinygemm_bf16(P(0), a[1], a[2], P(3), P(4), r0, r1, P(5), a[6]);
}
static int int8_rows(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int8_rows_bf16(P(0), a[1], P(2), a[3], r0, r1, P(4), a[5]);
}
/* quanto: weight rows [r0, r1) are group rows [r0 * per, r1 * per) of a contiguous output */
static int quanto_bits(const int64_t *a, int64_t r0, int64_t r1) {
    int64_t per = a[6], g = a[2];
    uint16_t *out = (uint16_t *)P(7) + r0 * per * g;
    return dq_quanto_bits_bf16(P(0), a[1], g, (int)a[3], P(4), P(5), r0 * per, r1 * per, out);
}

/* a[8] = 1: x is bf16 and out bf16 (plus the bf16 bias a[9], if any), else both float32 */
static int lut4_gemv(const int64_t *a, int64_t r0, int64_t r1) {
    if (!a[8])
        return dq_lut4_gemv(P(0), P(1), P(2), a[3], a[4], r0, r1, P(5), P(6), (int)a[7], 0, 0);
    float buf[WIDEN_CAP], *x = widen(P(5), a[4], buf);
    if (!x) return 1;
    int rc = dq_lut4_gemv(P(0), P(1), P(2), a[3], a[4], r0, r1, x, P(6), (int)a[7], 1, P(9));
    if (x != buf) free(x);
    return rc;
}

static int lut4_decode(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_lut4_decode_bf16(P(0), P(1), P(2), a[3], a[4], r0, r1, P(5), a[6]);
}

static int int8_gemv(const int64_t *a, int64_t r0, int64_t r1) {  /* x bf16 */
    float buf[WIDEN_CAP], *x = widen(P(3), a[1], buf);
    if (!x) return 1;
    int rc = dq_int8_gemv(P(0), a[1], P(2), x, r0, r1, P(4), (int)a[5], P(6), P(7));
    if (x != buf) free(x);
    return rc;
}

static int int4_gemv(const int64_t *a, int64_t r0, int64_t r1) {  /* x bf16 */
    float buf[WIDEN_CAP], *x = widen(P(4), a[2], buf);
    if (!x) return 1;
    int rc = dq_int4_gemv(P(0), P(1), a[2], a[3], r0, r1, x, P(5), (int)a[6], P(7));
    if (x != buf) free(x);
    return rc;
}

static int quantize_vnni(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_quantize_rows_vnni_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}

/* rows: blocks of 32 output channels */
static int amx_linear(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_amx_int8_linear(P(0), a[1], a[2], P(3), a[4], r0, r1, P(5), P(6), P(7), P(8),
                              a[9], a[10]);
}

static int scale_rows(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_scale_rows_bf16(P(0), a[1], r0, r1, a[2], P(3), P(4));
}

static int int8_dot(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int8_dot_rows(P(0), a[1], P(2), a[3], r0, r1, P(4), a[5]);
}

static int int8_dynamic_row(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int8_dynamic_row_bf16(P(0), a[1], P(2), P(3), P(4), r0, r1, P(5));
}

static int quanto_int8(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_quanto_int8_bf16(P(0), a[1], r0, r1, P(2), P(3));
}

static int quanto_affine(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_quanto_affine_bf16(P(0), a[1], (int)a[2], a[3], r0, r1, P(4), P(5), P(6));
}

static int int4_groupwise(const int64_t *a, int64_t r0, int64_t r1) {
    return dq_int4_groupwise_bf16(P(0), a[1], a[2], r0, r1, P(3), P(4), P(5));
}

static const rows_fn KERNELS[] = {decode, gemv, quantize, int8_output, int4_tinygemm, int8_rows,
                                  quanto_bits, lut4_gemv, lut4_decode, int8_gemv, quantize_vnni,
                                  amx_linear, scale_rows, int8_dot, int8_dynamic_row, int4_gemv,
                                  quanto_int8, quanto_affine, int4_groupwise};
#define N_KERNELS (int)(sizeof KERNELS / sizeof KERNELS[0])
#define MAX_THREADS 256

typedef struct {
    rows_fn fn;
    const int64_t *args;
    int64_t r0, r1;
    int rc;
} part_t;

static void *run_part(void *p) {
    part_t *t = p;
    t->rc = t->fn(t->args, t->r0, t->r1);
    return 0;
}

/* Runs fn over rows [0, n) in `threads` equal ranges, parts[i] the i-th; returns how many ran. */
#ifdef _OPENMP
#include <omp.h>

static int run_parts(rows_fn fn, const int64_t *args, int64_t n, int threads, part_t *parts) {
    int team = 1;
#pragma omp parallel num_threads(threads)
    {
        /* the team can be smaller than asked (nested in another parallel region, limits) */
        int i = omp_get_thread_num(), t = omp_get_num_threads();
        if (i == 0) team = t;
        parts[i] = (part_t){fn, args, n * i / t, n * (i + 1) / t, 0};
        run_part(&parts[i]);
    }
    return team;
}
#else
static int run_parts(rows_fn fn, const int64_t *args, int64_t n, int threads, part_t *parts) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < threads; i++)
        parts[i] = (part_t){fn, args, n * i / threads, n * (i + 1) / threads, 0};
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], 0, run_part, &parts[i]) == 0;
    run_part(&parts[0]);  /* the caller's thread takes the first range */
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], 0);
        else run_part(&parts[i]);  /* no thread to be had: do it here */
    }
    return threads;
}
#endif

int dq_run(int kernel, const int64_t *args, int64_t n, int threads) {
    if (kernel < 0 || kernel >= N_KERNELS) return -1;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    part_t parts[MAX_THREADS];
    int team = run_parts(KERNELS[kernel], args, n, threads, parts), rc = 0;
    for (int i = 0; i < team; i++)  /* -1 (refused) over 1 (fall back) over 0 */
        rc = rc < 0 || parts[i].rc < 0 ? -1 : rc > parts[i].rc ? rc : parts[i].rc;
    return rc;
}
