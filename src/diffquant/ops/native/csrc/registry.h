/* registry.c's table, for parallel.c: a kernel's adapter runs rows [r0, r1) of its output with
   its arguments a[] and returns 0, 1 (this input needs the caller's torch fallback) or -1 (bad
   arguments). */
#ifndef DIFFQUANT_REGISTRY_H
#define DIFFQUANT_REGISTRY_H
#include <stdint.h>

typedef int (*rows_fn)(const int64_t *a, int64_t r0, int64_t r1);

int dq_kernel_count(void);
rows_fn dq_kernel_fn(int i);  /* NULL for an index out of range */
#endif
