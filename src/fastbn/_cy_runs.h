/* Per-run loops of the Cython backend, in C because two things they need have no Cython
 * spelling:
 *   - "#pragma omp simd reduction(+: ...)" on the sums: it lets the compiler vectorize a
 *     float64 reduction (reordering that one sum) without -ffast-math on the whole file;
 *   - "#pragma omp simd" on the elementwise loops, which vectorizes them also when out is x
 *     itself (in-place use), where the compiler's own alias check would fall back to scalar.
 * Nothing else is reassociated: the extension is compiled with -ffp-contract=off and no
 * fast-math flags, so (v * s - hi) * scale + shift is evaluated exactly as written, in the
 * same way in forward and in the ReLU backward that recomputes it.
 *
 * The bodies are in _cy_runs_t.h, included once per element type: float (suffix _f) and
 * double (suffix _d). Strides are in elements; a run is n values st apart.
 */
#ifndef FASTBN_CY_RUNS_H
#define FASTBN_CY_RUNS_H

#include <stddef.h>

typedef ptrdiff_t fbn_idx;

/* Each loop is compiled for AVX-512, AVX2 and the baseline, and the loader picks the best one
 * this CPU runs (GCC's function multiversioning; ifunc, so glibc). Compiled for the x86-64
 * baseline only (SSE2), the float64 sums convert two floats per instruction instead of eight,
 * which measured 20-40% slower in training forward and backward than Numba's host-specific
 * code. Without the -ffp-contract=off of setup.py this would also bring fused multiply-adds;
 * with it, every version computes the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FBN_NO_CLONES)
#define FBN_LOOP __attribute__((target_clones("avx512f", "avx2", "default"))) static
#else
#define FBN_LOOP static inline
#endif

#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN(name) FBN_CAT(name, FBN_SUFFIX)

#define FBN_T float
#define FBN_SUFFIX f
#include "_cy_runs_t.h"
#undef FBN_T
#undef FBN_SUFFIX

#define FBN_T double
#define FBN_SUFFIX d
#include "_cy_runs_t.h"
#undef FBN_T
#undef FBN_SUFFIX

#endif
