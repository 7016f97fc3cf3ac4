/* Half precision (float16, bfloat16 as uint16 bit patterns) for the Cython backend: the
 * conversions, bit for bit as NumPy's and ml_dtypes', and the fused loops that go through
 * float32 in cache. Part of _cy_runs.h, included at its end (it uses the float loops). */
#ifndef FASTBN_CY_HALF_H
#define FASTBN_CY_HALF_H

/* --- half-precision conversions (bit patterns in uint16), bit for bit as NumPy/ml_dtypes ---- */
#include <stdint.h>
#include <string.h>

static inline float fbn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t fbn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float16 -> float32, exact (F. Giesen's magic-number method: subnormals through one float
 * subtraction, Inf/NaN keep their payload). */
static inline float fbn_half_to_float(uint16_t h)
{
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;  /* Inf/NaN */
    } else if (exp == 0) {               /* zero or subnormal: renormalize */
        o += 1u << 23;
        o = fbn_f32_bits(fbn_bits_f32(o) - fbn_bits_f32(113u << 23));
    }
    return fbn_bits_f32(o | (((uint32_t)h & 0x8000u) << 16));
}

/* float32 -> float16, round to nearest even; NaN as NumPy converts it (top payload bits kept,
 * never turned into Inf). */
static inline uint16_t fbn_float_to_half(float f)
{
    uint32_t u = fbn_f32_bits(f);
    uint32_t sign = (u & 0x80000000u) >> 16;
    uint32_t a = u & 0x7fffffffu;
    uint32_t o;
    if (a > 0x7f800000u) {                        /* NaN */
        o = 0x7c00u + ((a & 0x007fffffu) >> 13);
        if (o == 0x7c00u)
            o++;
    } else if (a >= (uint32_t)(127 + 16) << 23) { /* beyond the largest half: Inf */
        o = 0x7c00u;
    } else if (a < 113u << 23) {                  /* subnormal half or zero */
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = fbn_f32_bits(fbn_bits_f32(a) + fbn_bits_f32(magic)) - magic;
    } else {
        uint32_t odd = (a >> 13) & 1u;
        a += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = a >> 13;
    }
    return (uint16_t)(o | sign);
}

/* bfloat16: the top half of a float32, rounded to nearest even; NaN kept, quiet. */
static inline float fbn_bf16_to_float(uint16_t h) { return fbn_bits_f32((uint32_t)h << 16); }

static inline uint16_t fbn_float_to_bf16(float f)
{
    uint32_t u = fbn_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float16 <-> float32 by the CPU's own conversion instructions (AVX-512F, or F16C with AVX),
 * where the loader's CPU has them: the software conversions above took 41% of a float16
 * training forward (perf, NCHW 32x64x56x56), where Numba's LLVM code uses the instructions.
 * Same bits, except that a signaling NaN comes back quiet (as from Numba). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FBN_NO_CLONES)
#include <immintrin.h>
#define FBN_HARDWARE_HALF 1

__attribute__((target("avx512f")))
static void fbn_half_to_float_avx512(const uint16_t *src, float *dst, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i,
                         _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++)
        dst[i] = fbn_half_to_float(src[i]);
}

__attribute__((target("avx512f")))
static void fbn_float_to_half_avx512(const float *src, uint16_t *dst, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = fbn_float_to_half(src[i]);
}

__attribute__((target("avx,f16c")))
static void fbn_half_to_float_f16c(const uint16_t *src, float *dst, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = fbn_half_to_float(src[i]);
}

__attribute__((target("avx,f16c")))
static void fbn_float_to_half_f16c(const float *src, uint16_t *dst, fbn_idx n)
{
    fbn_idx i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = fbn_float_to_half(src[i]);
}
#endif

/* Which float16 conversion runs: FBN_HALF_BEST (the best this CPU has), or one named, for the
 * tests (fastbn._cy_kernels.half_conversion). */
enum { FBN_HALF_BEST = 0, FBN_HALF_AVX512 = 1, FBN_HALF_F16C = 2, FBN_HALF_SOFTWARE = 3 };

/* The conversion every call makes, resolved once by fbn_half_select (at module import, and
 * when the tests choose one) rather than asking the CPU on every chunk of 256 values. Until
 * then the portable loops, which are right everywhere. */
static int fbn_half_resolved = FBN_HALF_SOFTWARE;

/* Make `choice` the conversion, where this CPU runs it; else the best it runs. */
static int fbn_half_select(int choice)
{
#ifdef FBN_HARDWARE_HALF
    int avx512 = __builtin_cpu_supports("avx512f");
    int f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    if (choice == FBN_HALF_SOFTWARE)
        fbn_half_resolved = FBN_HALF_SOFTWARE;
    else if (choice == FBN_HALF_F16C && f16c)
        fbn_half_resolved = FBN_HALF_F16C;
    else
        fbn_half_resolved = avx512 ? FBN_HALF_AVX512 : f16c ? FBN_HALF_F16C : FBN_HALF_SOFTWARE;
#else
    (void)choice;
    fbn_half_resolved = FBN_HALF_SOFTWARE;
#endif
    return fbn_half_resolved;
}

static inline int fbn_half_path(void) { return fbn_half_resolved; }

FBN_LOOP void fbn_bf16_to_float_run(const uint16_t *src, float *dst, fbn_idx n)
{
    fbn_idx i;
    #pragma omp simd
    for (i = 0; i < n; i++) dst[i] = fbn_bf16_to_float(src[i]);
}

FBN_LOOP void fbn_float_to_bf16_run(const float *src, uint16_t *dst, fbn_idx n)
{
    fbn_idx i;
    #pragma omp simd
    for (i = 0; i < n; i++) dst[i] = fbn_float_to_bf16(src[i]);
}

static void fbn_half_to_float_run(const uint16_t *src, float *dst, fbn_idx n, int brain)
{
    fbn_idx i;
    if (brain) {
        fbn_bf16_to_float_run(src, dst, n);
        return;
    }
#ifdef FBN_HARDWARE_HALF
    switch (fbn_half_path()) {
    case FBN_HALF_AVX512:
        fbn_half_to_float_avx512(src, dst, n);
        return;
    case FBN_HALF_F16C:
        fbn_half_to_float_f16c(src, dst, n);
        return;
    }
#endif
    for (i = 0; i < n; i++) dst[i] = fbn_half_to_float(src[i]);
}

static void fbn_float_to_half_run(const float *src, uint16_t *dst, fbn_idx n, int brain)
{
    fbn_idx i;
    if (brain) {
        fbn_float_to_bf16_run(src, dst, n);
        return;
    }
#ifdef FBN_HARDWARE_HALF
    switch (fbn_half_path()) {
    case FBN_HALF_AVX512:
        fbn_float_to_half_avx512(src, dst, n);
        return;
    case FBN_HALF_F16C:
        fbn_float_to_half_f16c(src, dst, n);
        return;
    }
#endif
    for (i = 0; i < n; i++) dst[i] = fbn_float_to_half(src[i]);
}


/* --- inference on half-precision data, fused -------------------------------------------------
 * y = bn(x) with x and y as half bit patterns: each chunk of FBN_STREAM_CHUNK values is
 * converted into a float buffer, normalized there by the float32 expression (bn_value_f, the
 * same bits as the float32 kernels on a float32 copy of x) and rounded back. One pass over the
 * half data, where going through float32 arrays moved 3x its bytes. */

/* The normalization of one chunk, vectorized for the CPU at hand (coefficients per value). */
FBN_LOOP void fbn_normalize_chunk(float *buf, fbn_idx m, const float *c0, const float *c1,
                                  const float *c2, const float *c3, int relu)
{
    fbn_idx j;
    if (relu) {
        #pragma omp simd
        for (j = 0; j < m; j++)
            buf[j] = relu_f(bn_value_f(buf[j], c0[j], c1[j], c2[j], c3[j]));
    } else {
        #pragma omp simd
        for (j = 0; j < m; j++)
            buf[j] = bn_value_f(buf[j], c0[j], c1[j], c2[j], c3[j]);
    }
}

/* Run of n values, one feature's coefficients s, hi, scale, shift (feature-outer views). */
static void fbn_normalize_half_run(const uint16_t *x, uint16_t *y, fbn_idx n, float s, float hi,
                                   float scale, float shift, int relu, int brain)
{
    float buf[FBN_STREAM_CHUNK];
    fbn_idx b0, m;
    for (b0 = 0; b0 < n; b0 += FBN_STREAM_CHUNK) {
        m = n - b0 < FBN_STREAM_CHUNK ? n - b0 : FBN_STREAM_CHUNK;
        fbn_half_to_float_run(x + b0, buf, m, brain);
        normalize_run_f(buf, 1, buf, 1, m, s, hi, scale, shift, relu, 0);
        fbn_float_to_half_run(buf, y + b0, m, brain);
    }
}

/* Rows a0..a1 of L contiguous values each (feature-inner views), coef (4, L) tiled. */
static void fbn_normalize_half_rows(const uint16_t *x, fbn_idx rs, uint16_t *y, fbn_idx yrs,
                                    fbn_idx a0, fbn_idx a1, fbn_idx L, const float *coef,
                                    int relu, int brain)
{
    float buf[FBN_STREAM_CHUNK];
    fbn_idx a, j0, m;
    for (a = a0; a < a1; a++) {
        for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
            m = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
            fbn_half_to_float_run(x + a * rs + j0, buf, m, brain);
            fbn_normalize_chunk(buf, m, coef + j0, coef + L + j0, coef + 2 * L + j0,
                                coef + 3 * L + j0, relu);
            fbn_float_to_half_run(buf, y + a * yrs + j0, m, brain);
        }
    }
}


/* --- training on half-precision rows (feature-inner views), fused -----------------------------
 * The float32 row loops on converted chunks: each block of up to four rows (the float loops'
 * own blocks, from a0) is converted a column chunk at a time and handed to them, so every sum
 * gets the float32 path's additions in its order, and the same bits. */

FBN_LOOP void fbn_dx_chunk(float *g, const float *x, fbn_idx m, const float *c0,
                           const float *c1, const float *c2, const float *c3, const float *c4,
                           int training)
{
    fbn_idx j;
    if (training) {
        #pragma omp simd
        for (j = 0; j < m; j++)
            g[j] = dx_value_f(g[j], x[j], c0[j], c1[j], c2[j], c3[j], c4[j]);
    } else {  /* eval: dx = dy * k, as scale_rows */
        #pragma omp simd
        for (j = 0; j < m; j++)
            g[j] = g[j] * c2[j];
    }
}

static void fbn_accumulate_half_rows(const uint16_t *x, fbn_idx rs, fbn_idx a0, fbn_idx a1,
                                     fbn_idx L, const double *shift, double *p0, double *p1,
                                     int brain)
{
    float buf[4 * FBN_STREAM_CHUNK];
    fbn_idx a = a0, n, r, j0, m;
    while (a < a1) {
        n = a1 - a >= 4 ? 4 : a1 - a;
        for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
            m = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
            for (r = 0; r < n; r++)
                fbn_half_to_float_run(x + (a + r) * rs + j0, buf + r * m, m, brain);
            accumulate_rows_f(buf, m, 1, 0, n, m, shift + j0, p0 + j0, p1 + j0);
        }
        a += n;
    }
}

static void fbn_accumulate_backward_half_rows(const uint16_t *dy, fbn_idx drs,
                                              const uint16_t *x, fbn_idx rs, fbn_idx a0,
                                              fbn_idx a1, fbn_idx L, const double *shift,
                                              double *p0, double *p1, double *p2, int brain)
{
    float xb[4 * FBN_STREAM_CHUNK], gb[4 * FBN_STREAM_CHUNK];
    fbn_idx a = a0, n, r, j0, m;
    while (a < a1) {
        n = a1 - a >= 4 ? 4 : a1 - a;
        for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
            m = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
            for (r = 0; r < n; r++) {
                fbn_half_to_float_run(x + (a + r) * rs + j0, xb + r * m, m, brain);
                fbn_half_to_float_run(dy + (a + r) * drs + j0, gb + r * m, m, brain);
            }
            accumulate_backward_rows_f(gb, m, 1, xb, m, 1, 0, n, m, shift + j0, p0 + j0,
                                       p1 + j0, p2 + j0);
        }
        a += n;
    }
}

/* dx of half rows a0..a1 from coef (5, L) tiled; dx may be dy. */
static void fbn_dx_half_rows(const uint16_t *dy, fbn_idx drs, const uint16_t *x, fbn_idx rs,
                             uint16_t *dx, fbn_idx ors, fbn_idx a0, fbn_idx a1, fbn_idx L,
                             const float *coef, int training, int brain)
{
    float xb[FBN_STREAM_CHUNK], gb[FBN_STREAM_CHUNK];
    fbn_idx a, j0, m;
    for (a = a0; a < a1; a++) {
        for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
            m = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
            fbn_half_to_float_run(x + a * rs + j0, xb, m, brain);
            fbn_half_to_float_run(dy + a * drs + j0, gb, m, brain);
            fbn_dx_chunk(gb, xb, m, coef + j0, coef + L + j0, coef + 2 * L + j0,
                         coef + 3 * L + j0, coef + 4 * L + j0, training);
            fbn_float_to_half_run(gb, dx + a * ors + j0, m, brain);
        }
    }
}

#endif
