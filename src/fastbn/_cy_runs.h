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
 * The bodies are included once per element type, float (suffix _f) and double (suffix _d):
 * _cy_runs_t.h (runs of one feature), _cy_rows_t.h (rows of a feature-inner view) and
 * _cy_finish_t.h (each feature's statistics and coefficients from its sums); the
 * half-precision loops are in _cy_half.h. Strides are in elements; a run is n values st
 * apart.
 */
#ifndef FASTBN_CY_RUNS_H
#define FASTBN_CY_RUNS_H

#include <stddef.h>
#include <string.h>

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

#include <math.h>

/* --- per-feature helpers, double only ------------------------------------------------------ */

/* Features with |mean| <= 2**64 and invstd**2 >= 2**-128 (var + eps <= 2**128): ordinary data,
 * whose prescale is exactly 1. The rest go through fbn_prescale. */
static inline int fbn_ordinary(double mean, double invstd)
{
    /* & rather than &&: no branch, so that the loops calling this vectorize */
    return (fabs(mean) <= 18446744073709551616.0) & (invstd * invstd >= 2.938735877055719e-39);
}

/* A power of two s with |mean * s| and sqrt(var) * s below 2**64, so that the squares of the
 * prescaled data stay finite in float32 and double (1 for ordinary data). */
static inline double fbn_prescale(double mean, double var)
{
    double bound = sqrt(var);
    int exponent;
    if (fabs(mean) > bound)
        bound = fabs(mean);
    if (bound > 18446744073709551616.0 && bound < INFINITY) {  /* 2**64 */
        frexp(bound, &exponent);
        return ldexp(1.0, 64 - exponent);
    }
    return 1.0;
}

/* fbn_prescale(mean, 1 / invstd**2), without its divisions and square root for ordinary
 * data: they cost more than the data of a small feature-inner call (NC 32x512). */
static inline double fbn_prescale_of(double mean, double invstd)
{
    if (fbn_ordinary(mean, invstd))
        return 1.0;
    return fbn_prescale(mean, 1.0 / (invstd * invstd));
}

/* In training, backward's mean is the float64 batch mean when the given one agrees with it
 * within mean_ulp (see fastbn.reference.backward); sx = sum(x - shift). */
static inline double fbn_refined_mean(double mean, double mean_ulp, double shift, double sx,
                                      double m)
{
    double batch_mean = shift + sx / m;
    return fabs(batch_mean - mean) <= mean_ulp ? batch_mean : mean;
}

/* partial (S, nchunks, L) -> per-feature sums (S, C) for views whose columns are features
 * (B == 1, L = k * C), added in the order of the general fold (_fold_columns in
 * _cy_kernels.pyx): block by block, tile by tile. Vectorized across features. */
FBN_LOOP void fbn_fold_features(const double *partial, fbn_idx S, fbn_idx nchunks, fbn_idx L,
                                fbn_idx C, double *sums)
{
    fbn_idx s, t, r, c;
    if (nchunks == 1 && L == C) {  /* one block, one column a feature: 0.0 + p is p (a sum
                                       that starts at +0.0 is never -0.0), so a copy */
        memcpy(sums, partial, (size_t)(S * C) * sizeof(double));
        return;
    }
    for (s = 0; s < S; s++) {
        double *out = sums + s * C;
        for (c = 0; c < C; c++)
            out[c] = 0.0;
        for (t = 0; t < nchunks; t++) {
            for (r = 0; r + C <= L; r += C) {
                const double *p = partial + (s * nchunks + t) * L + r;
                #pragma omp simd
                for (c = 0; c < C; c++)
                    out[c] += p[c];
            }
        }
    }
}

/* --- non-temporal stores ---------------------------------------------------------------------
 * A large output that is written once and not read back soon is cheaper to write around the
 * caches: a regular store first reads its line (read-for-ownership), so writing y costs two
 * transfers per line instead of one. The row loops below write through a small buffer (256
 * elements: a 4 KB buffer conflicted in L1 with 4 KB rows of x and of the coefficients,
 * measured 2x slower) that fbn_stream_f/d copy out with SSE2's streaming stores, which every
 * x86-64 CPU has. Feature-inner normalize of NHWC-like data on one thread, cold: 1.9 ms ->
 * 1.35-1.6 ms, a copy's time (C harness). fbn_sfence orders them before the kernel returns. */
#define FBN_STREAM_CHUNK 256
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
static inline void fbn_stream_f(float *dst, const float *src, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i < n && ((size_t)(dst + i) & 15) != 0; i++)
        dst[i] = src[i];
    for (; i + 4 <= n; i += 4)
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}

static inline void fbn_stream_d(double *dst, const double *src, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i < n && ((size_t)(dst + i) & 15) != 0; i++)
        dst[i] = src[i];
    for (; i + 2 <= n; i += 2)
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    for (; i < n; i++)
        dst[i] = src[i];
}

static inline void fbn_sfence(void) { _mm_sfence(); }
#else
static inline void fbn_stream_f(float *dst, const float *src, fbn_idx n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static inline void fbn_stream_d(double *dst, const double *src, fbn_idx n)
{
    memcpy(dst, src, (size_t)n * sizeof(double));
}

static inline void fbn_sfence(void) {}
#endif

#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN(name) FBN_CAT(name, FBN_SUFFIX)

#define FBN_T float
#define FBN_SUFFIX f
#include "_cy_runs_t.h"
#include "_cy_rows_t.h"
#include "_cy_finish_t.h"
#undef FBN_T
#undef FBN_SUFFIX

#define FBN_T double
#define FBN_SUFFIX d
#include "_cy_runs_t.h"
#include "_cy_rows_t.h"
#include "_cy_finish_t.h"
#undef FBN_T
#undef FBN_SUFFIX

#include "_cy_half.h"

#endif
