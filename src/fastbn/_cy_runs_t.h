/* Body of _cy_runs.h for one element type FBN_T (float or double); FBN(name) appends the
 * type's suffix. The arithmetic is that of the Numba kernels (fastbn/_numba_steps.py),
 * operation for operation: sums in double around a per-feature shift, elementwise results in
 * FBN_T. One exception: the feature-inner backward sums add four rows per update where
 * Numba's add two (four measured no faster there), so the two backends' backward sums may
 * differ in the last bits. Each loop has a unit-stride version (vectorized) and a strided
 * one. */

#define T FBN_T

/* The normalized value, (v * s - hi) * scale + shift, evaluated as written (see _cy_runs.h). */
static inline T FBN(bn_value)(T v, T s, T hi, T scale, T shift)
{
    return (v * s - hi) * scale + shift;
}

/* The training gradient, dx = (dy + (x * s - hi) * u1 + u2) * k */
static inline T FBN(dx_value)(T g, T v, T s, T hi, T k, T u1, T u2)
{
    return (g + (v * s - hi) * u1 + u2) * k;
}

/* max(z, 0) with NaN passed through, as torch.relu. */
static inline T FBN(relu)(T z)
{
    return z <= (T)0 ? (T)0 : z;
}

/* --- runs of one feature (feature-outer family) ------------------------------------------- */

/* Unit-stride sums keep FBN_LANES partial sums, added lane by lane (a vectorized loop over
 * a block of FBN_LANES elements): several independent chains of vector additions instead of
 * one, whose latency (4 cycles an addition) bounded the loop to 2 elements a cycle in cache.
 * The lanes are added up in a fixed order at the end, so a run's sums do not depend on the
 * thread or the alignment. From memory, one thread's statistics pass was bound by how much
 * the hardware prefetchers ask for ahead (they do not cross 4 KB pages): it also prefetches
 * FBN_PF_DIST bytes ahead, which took one thread from 27 to 34 GB/s on NCHW 64x128x56x56
 * (2-vCPU EPYC; distances 1-16 KB tried, 8 KB best; no change in cache). */
#ifndef FBN_PF_DIST
#define FBN_PF_DIST 8192
#endif
/* Prefetch the cache lines FBN_PF_DIST bytes past n elements at p. */
#define FBN_PREFETCH(p, n) do { \
    size_t fbn_q_; \
    for (fbn_q_ = 0; fbn_q_ < sizeof(T) * (size_t)(n); fbn_q_ += 64) \
        __builtin_prefetch((const char *)(p) + FBN_PF_DIST + fbn_q_); \
} while (0)
#ifndef FBN_LANES
#define FBN_LANES 32
#endif

/* out = sum(x - shift), sum((x - shift)^2) over the run. */
FBN_LOOP void FBN(shifted_sums)(const T *x, fbn_idx n, fbn_idx st, double shift,
                                     double *out)
{
    double s1 = 0.0, s2 = 0.0;
    fbn_idx b;
    if (st == 1) {
        double p1[FBN_LANES] = {0.0}, p2[FBN_LANES] = {0.0};
        fbn_idx k;
        for (b = 0; b + FBN_LANES <= n; b += FBN_LANES) {
            FBN_PREFETCH(x + b, FBN_LANES);
            #pragma omp simd
            for (k = 0; k < FBN_LANES; k++) {
                double d = (double)x[b + k] - shift;
                p1[k] += d;
                p2[k] += d * d;
            }
        }
        for (; b < n; b++) {
            double d = (double)x[b] - shift;
            s1 += d;
            s2 += d * d;
        }
        for (k = 0; k < FBN_LANES; k++) {
            s1 += p1[k];
            s2 += p2[k];
        }
    } else {
        for (b = 0; b < n; b++) {
            double d = (double)x[b * st] - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    out[0] = s1;
    out[1] = s2;
}

/* out = sum(x - shift), sum(dy), sum(dy * (x - shift)) over the run (lanes as above). */
FBN_LOOP void FBN(backward_sums)(const T *dy, fbn_idx sdy, const T *x, fbn_idx sx,
                                      fbn_idx n, double shift, double *out)
{
    double a0 = 0.0, a1 = 0.0, a2 = 0.0;
    fbn_idx b;
    if (sdy == 1 && sx == 1) {
        double p0[FBN_LANES] = {0.0}, p1[FBN_LANES] = {0.0}, p2[FBN_LANES] = {0.0};
        fbn_idx k;
        for (b = 0; b + FBN_LANES <= n; b += FBN_LANES) {
            #pragma omp simd
            for (k = 0; k < FBN_LANES; k++) {
                double d = (double)x[b + k] - shift;
                double g = (double)dy[b + k];
                p0[k] += d;
                p1[k] += g;
                p2[k] += g * d;
            }
        }
        for (; b < n; b++) {
            double d = (double)x[b] - shift;
            double g = (double)dy[b];
            a0 += d;
            a1 += g;
            a2 += g * d;
        }
        for (k = 0; k < FBN_LANES; k++) {
            a0 += p0[k];
            a1 += p1[k];
            a2 += p2[k];
        }
    } else {
        for (b = 0; b < n; b++) {
            double d = (double)x[b * sx] - shift;
            double g = (double)dy[b * sdy];
            a0 += d;
            a1 += g;
            a2 += g * d;
        }
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
}

FBN_LOOP void FBN(normalize_run)(const T *x, fbn_idx sx, T *y, fbn_idx sy, fbn_idx n,
                                      T s, T hi, T scale, T shift, int relu, int stream)
{
    fbn_idx b;
    if (stream && sx == 1 && sy == 1) {  /* non-temporal stores: see _cy_runs.h */
        T buf[FBN_STREAM_CHUNK];
        fbn_idx b0, m;
        for (b0 = 0; b0 < n; b0 += FBN_STREAM_CHUNK) {
            m = n - b0 < FBN_STREAM_CHUNK ? n - b0 : FBN_STREAM_CHUNK;
            FBN_PREFETCH(x + b0, m);
            if (relu) {
                #pragma omp simd
                for (b = 0; b < m; b++)
                    buf[b] = FBN(relu)(FBN(bn_value)(x[b0 + b], s, hi, scale, shift));
            } else {
                #pragma omp simd
                for (b = 0; b < m; b++)
                    buf[b] = FBN(bn_value)(x[b0 + b], s, hi, scale, shift);
            }
            FBN(fbn_stream)(y + b0, buf, m);
        }
        return;
    }
    if (sx == 1 && sy == 1) {
        if (relu) {
            #pragma omp simd
            for (b = 0; b < n; b++)
                y[b] = FBN(relu)(FBN(bn_value)(x[b], s, hi, scale, shift));
        } else {
            #pragma omp simd
            for (b = 0; b < n; b++)
                y[b] = FBN(bn_value)(x[b], s, hi, scale, shift);
        }
    } else {
        for (b = 0; b < n; b++) {
            T z = FBN(bn_value)(x[b * sx], s, hi, scale, shift);
            y[b * sy] = relu ? FBN(relu)(z) : z;
        }
    }
}

FBN_LOOP void FBN(dx_run)(const T *dy, fbn_idx sdy, const T *x, fbn_idx sx, T *dx,
                               fbn_idx sdx, fbn_idx n, T s, T hi, T k, T u1, T u2)
{
    fbn_idx b;
    if (sdy == 1 && sx == 1 && sdx == 1) {
        #pragma omp simd
        for (b = 0; b < n; b++)
            dx[b] = FBN(dx_value)(dy[b], x[b], s, hi, k, u1, u2);
    } else {
        for (b = 0; b < n; b++)
            dx[b * sdx] = FBN(dx_value)(dy[b * sdy], x[b * sx], s, hi, k, u1, u2);
    }
}

FBN_LOOP void FBN(scale_run)(const T *dy, fbn_idx sdy, T *dx, fbn_idx sdx, fbn_idx n, T k)
{
    fbn_idx b;
    if (sdy == 1 && sdx == 1) {
        #pragma omp simd
        for (b = 0; b < n; b++)
            dx[b] = dy[b] * k;
    } else {
        for (b = 0; b < n; b++)
            dx[b * sdx] = dy[b * sdy] * k;
    }
}

/* out = sum(g), sum(g * (x - shift)) with g = dy where the forward's output was > 0. */
FBN_LOOP void FBN(relu_sums_run)(const T *dy, fbn_idx sdy, const T *x, fbn_idx sx,
                                      fbn_idx n, double shift, T s, T hi, T scale, T offset,
                                      double *out)
{
    double a0 = 0.0, a1 = 0.0;
    fbn_idx b;
    if (sdy == 1 && sx == 1) {
        #pragma omp simd reduction(+:a0,a1)
        for (b = 0; b < n; b++) {
            T v = x[b];
            double g = FBN(bn_value)(v, s, hi, scale, offset) > (T)0 ? (double)dy[b] : 0.0;
            a0 += g;
            a1 += g * ((double)v - shift);
        }
    } else {
        for (b = 0; b < n; b++) {
            T v = x[b * sx];
            double g = FBN(bn_value)(v, s, hi, scale, offset) > (T)0 ? (double)dy[b * sdy] : 0.0;
            a0 += g;
            a1 += g * ((double)v - shift);
        }
    }
    out[0] = a0;
    out[1] = a1;
}

/* fc: the forward's s, hi, scale, offset (its mask); bc: the backward's s, hi, k, u1, u2. */
FBN_LOOP void FBN(relu_dx_run)(const T *dy, fbn_idx sdy, const T *x, fbn_idx sx, T *dx,
                                    fbn_idx sdx, fbn_idx n, const T *fc, const T *bc,
                                    int training)
{
    fbn_idx b;
    for (b = 0; b < n; b++) {
        T v = x[b * sx];
        T g = dy[b * sdy];
        if (!(FBN(bn_value)(v, fc[0], fc[1], fc[2], fc[3]) > (T)0))
            g = g * (T)0;
        dx[b * sdx] = training ? (g + (v * bc[0] - bc[1]) * bc[3] + bc[4]) * bc[2] : g * bc[2];
    }
}

#undef T
