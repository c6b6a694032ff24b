/* One entry point for Python: dq_run(kernel, args, n, threads) runs kernel `kernel` of
   registry.c's table over rows [0, n) split into `threads` equal ranges. Why here and not in
   Python: a thread pool round trip from Python costs ~100 us, against a one-row product of
   ~300 us.

   The threads are torch's own OpenMP workers where this is built with -fopenmp: the library
   then needs libgomp.so.1, which the dynamic loader resolves to the copy torch loaded first, so
   there is one pool. Threads of our own (the build without OpenMP: POSIX threads, the caller's
   thread taking the first range) share their CPUs with torch's workers, which spin for a while
   after every torch op under the default wait policy: a one-row product took 1.7x as long.

   args: the kernel's arguments other than its row range, each as an int64 (pointers too), in
   the order registry.c declares them. Each range returns 0, 1 (this input needs the caller's
   torch fallback) or -1 (bad arguments); dq_run returns -1 if any range did, else 1 if any
   did, else 0. */
#include <pthread.h>
#include <stdint.h>

#include "registry.h"

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
    rows_fn fn = dq_kernel_fn(kernel);
    if (!fn) return -1;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    part_t parts[MAX_THREADS];
    int team = run_parts(fn, args, n, threads, parts), rc = 0;
    for (int i = 0; i < team; i++)  /* -1 (refused) over 1 (fall back) over 0 */
        rc = rc < 0 || parts[i].rc < 0 ? -1 : rc > parts[i].rc ? rc : parts[i].rc;
    return rc;
}
