/* Body of _cy_runs.h for one element type FBN_T (float or double); FBN(name) appends the
 * type's suffix. The arithmetic is that of fastbn/_numba_kernels.py, operation for operation:
 * sums in double around a per-feature shift, elementwise results in FBN_T. One exception: the
 * feature-inner backward sums add four rows per update where Numba's add two (four measured no
 * faster there), so the two backends' backward sums may differ in the last bits. Each loop
 * has a unit-stride version (vectorized) and a strided one. */

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

/* --- rows of a feature-inner view (A, L) ------------------------------------------------------
 * Row a starts at x + a * rs; its columns are cs apart. Column j's coefficients are coef[r * L
 * + j] (r-th coefficient), its shift shift[j]; partial sums p0, p1, p2 are rows of L doubles. */

/* Shifted sums of rows a0..a1, four rows per update of the accumulators (their loads and
 * stores, not the arithmetic, bound this loop). */
FBN_LOOP void FBN(accumulate_rows)(const T *x, fbn_idx rs, fbn_idx cs, fbn_idx a0,
                                        fbn_idx a1, fbn_idx L, const double *shift, double *p0,
                                        double *p1)
{
    fbn_idx a = a0, j;
    for (; a + 4 <= a1; a += 4) {
        const T *r0 = x + a * rs, *r1 = r0 + rs, *r2 = r1 + rs, *r3 = r2 + rs;
        if (cs == 1) {
            #pragma omp simd
            for (j = 0; j < L; j++) {
                double k = shift[j];
                double d0 = (double)r0[j] - k, d1 = (double)r1[j] - k;
                double d2 = (double)r2[j] - k, d3 = (double)r3[j] - k;
                p0[j] += (d0 + d1) + (d2 + d3);
                p1[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
        } else {
            for (j = 0; j < L; j++) {
                double k = shift[j];
                double d0 = (double)r0[j * cs] - k, d1 = (double)r1[j * cs] - k;
                double d2 = (double)r2[j * cs] - k, d3 = (double)r3[j * cs] - k;
                p0[j] += (d0 + d1) + (d2 + d3);
                p1[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
        }
    }
    for (; a < a1; a++) {
        const T *r = x + a * rs;
        #pragma omp simd
        for (j = 0; j < L; j++) {
            double d = (double)r[j * cs] - shift[j];
            p0[j] += d;
            p1[j] += d * d;
        }
    }
}

/* Per column of rows a0..a1: sum(x - shift), sum(dy), sum(dy * (x - shift)), four rows per
 * update of the accumulators, as accumulate_rows (two rows per update measured 1.3-1.6x slower
 * on rows of 256-1024 float32 columns, cold, one thread: the accumulators' loads and stores). */
FBN_LOOP void FBN(accumulate_backward_rows)(const T *dy, fbn_idx drs, fbn_idx dcs,
                                                 const T *x, fbn_idx rs, fbn_idx cs, fbn_idx a0,
                                                 fbn_idx a1, fbn_idx L, const double *shift,
                                                 double *p0, double *p1, double *p2)
{
    fbn_idx a = a0, j;
    for (; a + 4 <= a1; a += 4) {
        const T *x0 = x + a * rs, *x1 = x0 + rs, *x2 = x1 + rs, *x3 = x2 + rs;
        const T *g0r = dy + a * drs, *g1r = g0r + drs, *g2r = g1r + drs, *g3r = g2r + drs;
        if (cs == 1 && dcs == 1) {
            #pragma omp simd
            for (j = 0; j < L; j++) {
                double k = shift[j];
                double d0 = (double)x0[j] - k, d1 = (double)x1[j] - k;
                double d2 = (double)x2[j] - k, d3 = (double)x3[j] - k;
                double g0 = (double)g0r[j], g1 = (double)g1r[j];
                double g2 = (double)g2r[j], g3 = (double)g3r[j];
                p0[j] += (d0 + d1) + (d2 + d3);
                p1[j] += (g0 + g1) + (g2 + g3);
                p2[j] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3);
            }
        } else {
            for (j = 0; j < L; j++) {
                double k = shift[j];
                double d0 = (double)x0[j * cs] - k, d1 = (double)x1[j * cs] - k;
                double d2 = (double)x2[j * cs] - k, d3 = (double)x3[j * cs] - k;
                double g0 = (double)g0r[j * dcs], g1 = (double)g1r[j * dcs];
                double g2 = (double)g2r[j * dcs], g3 = (double)g3r[j * dcs];
                p0[j] += (d0 + d1) + (d2 + d3);
                p1[j] += (g0 + g1) + (g2 + g3);
                p2[j] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3);
            }
        }
    }
    for (; a < a1; a++) {
        const T *xr = x + a * rs, *gr = dy + a * drs;
        #pragma omp simd
        for (j = 0; j < L; j++) {
            double d = (double)xr[j * cs] - shift[j];
            double g = (double)gr[j * dcs];
            p0[j] += d;
            p1[j] += g;
            p2[j] += g * d;
        }
    }
}

/* The elementwise row loops below take four rows per pass over the coefficients: coef holds
 * 4 or 5 values per column (16-20 bytes per 4-byte float32 element), so one row per pass read
 * four to five times the data's bytes from L2 (a 2048-column coef is 32 KB, L1's size): that
 * made the float32 normalize 2x a copy on NC 256x2048 (perf: the coefficient loads). Every
 * element is computed by the same expression, so the bits do not depend on the blocking. */
FBN_LOOP void FBN(normalize_rows)(const T *x, fbn_idx rs, fbn_idx cs, T *y, fbn_idx yrs,
                                       fbn_idx ycs, fbn_idx a0, fbn_idx a1, fbn_idx L,
                                       const T *coef, int relu, int stream)
{
    const T *c0 = coef, *c1 = coef + L, *c2 = coef + 2 * L, *c3 = coef + 3 * L;
    fbn_idx a = a0, j;
    if (stream && cs == 1 && ycs == 1) {  /* non-temporal stores: see _cy_runs.h */
        T buf[FBN_STREAM_CHUNK];
        fbn_idx j0, n;
        for (; a < a1; a++) {
            const T *xr = x + a * rs;
            for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
                n = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
                if (relu) {
                    #pragma omp simd
                    for (j = 0; j < n; j++)
                        buf[j] = FBN(relu)(FBN(bn_value)(xr[j0 + j], c0[j0 + j], c1[j0 + j],
                                                         c2[j0 + j], c3[j0 + j]));
                } else {
                    #pragma omp simd
                    for (j = 0; j < n; j++)
                        buf[j] = FBN(bn_value)(xr[j0 + j], c0[j0 + j], c1[j0 + j], c2[j0 + j],
                                               c3[j0 + j]);
                }
                FBN(fbn_stream)(y + a * yrs + j0, buf, n);
            }
        }
        fbn_sfence();
        return;
    }
    if (cs == 1 && ycs == 1) {
        for (; a + 4 <= a1; a += 4) {
            const T *x0 = x + a * rs, *x1 = x0 + rs, *x2 = x1 + rs, *x3 = x2 + rs;
            T *y0 = y + a * yrs, *y1 = y0 + yrs, *y2 = y1 + yrs, *y3 = y2 + yrs;
            if (relu) {
                #pragma omp simd
                for (j = 0; j < L; j++) {
                    T s = c0[j], hi = c1[j], k = c2[j], b = c3[j];
                    y0[j] = FBN(relu)(FBN(bn_value)(x0[j], s, hi, k, b));
                    y1[j] = FBN(relu)(FBN(bn_value)(x1[j], s, hi, k, b));
                    y2[j] = FBN(relu)(FBN(bn_value)(x2[j], s, hi, k, b));
                    y3[j] = FBN(relu)(FBN(bn_value)(x3[j], s, hi, k, b));
                }
            } else {
                #pragma omp simd
                for (j = 0; j < L; j++) {
                    T s = c0[j], hi = c1[j], k = c2[j], b = c3[j];
                    y0[j] = FBN(bn_value)(x0[j], s, hi, k, b);
                    y1[j] = FBN(bn_value)(x1[j], s, hi, k, b);
                    y2[j] = FBN(bn_value)(x2[j], s, hi, k, b);
                    y3[j] = FBN(bn_value)(x3[j], s, hi, k, b);
                }
            }
        }
    }
    for (; a < a1; a++) {
        const T *xr = x + a * rs;
        T *yr = y + a * yrs;
        if (cs == 1 && ycs == 1) {
            if (relu) {
                #pragma omp simd
                for (j = 0; j < L; j++)
                    yr[j] = FBN(relu)(FBN(bn_value)(xr[j], c0[j], c1[j], c2[j], c3[j]));
            } else {
                #pragma omp simd
                for (j = 0; j < L; j++)
                    yr[j] = FBN(bn_value)(xr[j], c0[j], c1[j], c2[j], c3[j]);
            }
        } else {
            for (j = 0; j < L; j++) {
                T z = FBN(bn_value)(xr[j * cs], c0[j], c1[j], c2[j], c3[j]);
                yr[j * ycs] = relu ? FBN(relu)(z) : z;
            }
        }
    }
}

FBN_LOOP void FBN(dx_rows)(const T *dy, fbn_idx drs, fbn_idx dcs, const T *x, fbn_idx rs,
                                fbn_idx cs, T *dx, fbn_idx ors, fbn_idx ocs, fbn_idx a0,
                                fbn_idx a1, fbn_idx L, const T *coef, int stream)
{
    const T *c0 = coef, *c1 = coef + L, *c2 = coef + 2 * L, *c3 = coef + 3 * L,
            *c4 = coef + 4 * L;
    fbn_idx a = a0, j;
    if (stream && cs == 1 && dcs == 1 && ocs == 1) {  /* non-temporal stores: see _cy_runs.h */
        T buf[FBN_STREAM_CHUNK];
        fbn_idx j0, n;
        for (; a < a1; a++) {
            const T *gr = dy + a * drs, *xr = x + a * rs;
            for (j0 = 0; j0 < L; j0 += FBN_STREAM_CHUNK) {
                n = L - j0 < FBN_STREAM_CHUNK ? L - j0 : FBN_STREAM_CHUNK;
                #pragma omp simd
                for (j = 0; j < n; j++)
                    buf[j] = FBN(dx_value)(gr[j0 + j], xr[j0 + j], c0[j0 + j], c1[j0 + j],
                                           c2[j0 + j], c3[j0 + j], c4[j0 + j]);
                FBN(fbn_stream)(dx + a * ors + j0, buf, n);
            }
        }
        fbn_sfence();
        return;
    }
    if (cs == 1 && dcs == 1 && ocs == 1) {
        for (; a + 4 <= a1; a += 4) {
            const T *g0 = dy + a * drs, *g1 = g0 + drs, *g2 = g1 + drs, *g3 = g2 + drs;
            const T *x0 = x + a * rs, *x1 = x0 + rs, *x2 = x1 + rs, *x3 = x2 + rs;
            T *o0 = dx + a * ors, *o1 = o0 + ors, *o2 = o1 + ors, *o3 = o2 + ors;
            #pragma omp simd
            for (j = 0; j < L; j++) {
                T s = c0[j], hi = c1[j], k = c2[j], u1 = c3[j], u2 = c4[j];
                o0[j] = FBN(dx_value)(g0[j], x0[j], s, hi, k, u1, u2);
                o1[j] = FBN(dx_value)(g1[j], x1[j], s, hi, k, u1, u2);
                o2[j] = FBN(dx_value)(g2[j], x2[j], s, hi, k, u1, u2);
                o3[j] = FBN(dx_value)(g3[j], x3[j], s, hi, k, u1, u2);
            }
        }
    }
    for (; a < a1; a++) {
        const T *gr = dy + a * drs, *xr = x + a * rs;
        T *o = dx + a * ors;
        if (cs == 1 && dcs == 1 && ocs == 1) {
            #pragma omp simd
            for (j = 0; j < L; j++)
                o[j] = FBN(dx_value)(gr[j], xr[j], c0[j], c1[j], c2[j], c3[j], c4[j]);
        } else {
            for (j = 0; j < L; j++)
                o[j * ocs] = FBN(dx_value)(gr[j * dcs], xr[j * cs], c0[j], c1[j], c2[j], c3[j],
                                           c4[j]);
        }
    }
}

FBN_LOOP void FBN(scale_rows)(const T *dy, fbn_idx drs, fbn_idx dcs, T *dx, fbn_idx ors,
                                   fbn_idx ocs, fbn_idx a0, fbn_idx a1, fbn_idx L, const T *k)
{
    fbn_idx a, j;
    for (a = a0; a < a1; a++) {
        const T *gr = dy + a * drs;
        T *o = dx + a * ors;
        if (dcs == 1 && ocs == 1) {
            #pragma omp simd
            for (j = 0; j < L; j++)
                o[j] = gr[j] * k[j];
        } else {
            for (j = 0; j < L; j++)
                o[j * ocs] = gr[j * dcs] * k[j];
        }
    }
}

FBN_LOOP void FBN(relu_sums_rows)(const T *dy, fbn_idx drs, fbn_idx dcs, const T *x,
                                       fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1,
                                       fbn_idx L, const double *shift, const T *fcoef,
                                       double *p0, double *p1)
{
    const T *c0 = fcoef, *c1 = fcoef + L, *c2 = fcoef + 2 * L, *c3 = fcoef + 3 * L;
    fbn_idx a, j;
    for (a = a0; a < a1; a++) {
        const T *xr = x + a * rs, *gr = dy + a * drs;
        if (cs == 1 && dcs == 1) {  /* channels-last rows: unit strides, vector loads */
            #pragma omp simd
            for (j = 0; j < L; j++) {
                T v = xr[j];
                double g = FBN(bn_value)(v, c0[j], c1[j], c2[j], c3[j]) > (T)0
                           ? (double)gr[j] : 0.0;
                p0[j] += g;
                p1[j] += g * ((double)v - shift[j]);
            }
            continue;
        }
        #pragma omp simd
        for (j = 0; j < L; j++) {
            T v = xr[j * cs];
            double g = FBN(bn_value)(v, c0[j], c1[j], c2[j], c3[j]) > (T)0
                       ? (double)gr[j * dcs] : 0.0;
            p0[j] += g;
            p1[j] += g * ((double)v - shift[j]);
        }
    }
}

FBN_LOOP void FBN(relu_dx_rows)(const T *dy, fbn_idx drs, fbn_idx dcs, const T *x,
                                     fbn_idx rs, fbn_idx cs, T *dx, fbn_idx ors, fbn_idx ocs,
                                     fbn_idx a0, fbn_idx a1, fbn_idx L, const T *coef,
                                     const T *fcoef, int training)
{
    fbn_idx a, j;
    const T *f0 = fcoef, *f1 = fcoef + L, *f2 = fcoef + 2 * L, *f3 = fcoef + 3 * L;
    const T *k0 = coef, *k1 = coef + L, *k2 = coef + 2 * L, *k3 = coef + 3 * L;
    const T *k4 = coef + 4 * L;
    for (a = a0; a < a1; a++) {
        const T *xr = x + a * rs, *gr = dy + a * drs;
        T *o = dx + a * ors;
        if (cs == 1 && dcs == 1 && ocs == 1) {
            /* channels-last rows: the loop below with unit strides, one vector loop per mode
             * (the mask a select, which -fno-trapping-math lets the compiler vectorize) */
            if (training) {
                #pragma omp simd
                for (j = 0; j < L; j++) {
                    T v = xr[j];
                    T g = FBN(bn_value)(v, f0[j], f1[j], f2[j], f3[j]) > (T)0
                          ? gr[j] : gr[j] * (T)0;
                    o[j] = (g + (v * k0[j] - k1[j]) * k3[j] + k4[j]) * k2[j];
                }
            } else {
                #pragma omp simd
                for (j = 0; j < L; j++) {
                    T g = FBN(bn_value)(xr[j], f0[j], f1[j], f2[j], f3[j]) > (T)0
                          ? gr[j] : gr[j] * (T)0;
                    o[j] = g * k2[j];
                }
            }
            continue;
        }
        for (j = 0; j < L; j++) {
            T v = xr[j * cs];
            T g = gr[j * dcs];
            if (!(FBN(bn_value)(v, fcoef[j], fcoef[L + j], fcoef[2 * L + j], fcoef[3 * L + j])
                  > (T)0))
                g = g * (T)0;
            T z = training ? (g + (v * coef[j] - coef[L + j]) * coef[3 * L + j] + coef[4 * L + j])
                             * coef[2 * L + j]
                           : g * coef[2 * L + j];
            o[j * ocs] = z;
        }
    }
}

/* --- per-feature finishing ---------------------------------------------------------------
 * The statistics and coefficients of one feature from its sums: the only copy of this math in
 * the Cython backend (the feature-outer kernels call these one feature at a time, with exact
 * = 1). The feature-inner kernels finish all features in loops the compiler vectorizes: on
 * NC 32x512 the scalar divisions and square roots of 512 features took longer than the pass
 * over the data. Division and sqrt are correctly rounded in vector form too, so the bits are
 * those of the scalar code. The vectorized pass takes the prescale as 1 (exact = 0); when a
 * feature is not ordinary (fbn_ordinary) the whole finishing runs again with the exact
 * prescale, one feature at a time. */

/* The forward's normalizing coefficients (4, W) of feature c, for invstd already rounded to T. */
static inline void FBN(forward_coefs)(T *coef, fbn_idx W, fbn_idx c, double mean, double invstd,
                                      double weight, double bias, double s)
{
    double scale = weight * invstd;
    T hi = (T)(mean * s);
    if (s != 1.0)  /* dividing by 1 changes nothing but costs a division per feature */
        scale = scale / s;
    coef[c] = (T)s;
    coef[W + c] = hi;
    coef[2 * W + c] = (T)scale;
    coef[3 * W + c] = (T)(bias - (mean * s - (double)hi) * scale);
}

/* Feature c's statistics (stats (3, C): mean, biased var, invstd) and coefficients from its
 * mean and variance; returns 1 where the feature is not ordinary. exact: use its prescale
 * (else 1). */
static inline int FBN(stats_and_coefs)(double mean, double var, double eps, double weight,
                                       double bias, double *stats, fbn_idx C, T *coef,
                                       fbn_idx W, fbn_idx c, int exact)
{
    double invstd = 1.0 / sqrt(var + eps);
    double inv_t = (double)(T)invstd;  /* invstd as forward returns it, in x's dtype */
    stats[c] = mean;
    stats[C + c] = var;
    stats[2 * C + c] = invstd;
    FBN(forward_coefs)(coef, W, c, mean, inv_t, weight, bias,
                       exact ? fbn_prescale_of(mean, inv_t) : 1.0);
    return !fbn_ordinary(mean, inv_t);
}

/* The same from feature c's sums around shift: s1 = sum(x - shift), s2 = sum((x - shift)^2). */
static inline int FBN(forward_feature)(double s1, double s2, double shift, double m, double eps,
                                       double weight, double bias, double *stats, fbn_idx C,
                                       T *coef, fbn_idx W, fbn_idx c, int exact)
{
    double dm = s1 / m;
    double var = s2 / m - dm * dm;
    if (var < 0.0)  /* rounding only; written so that NaN passes through */
        var = 0.0;
    return FBN(stats_and_coefs)(shift + dm, var, eps, weight, bias, stats, C, coef, W, c, exact);
}

/* Every feature's statistics from sums (2, C) around shift[c * B]. */
/* The running statistics' update of the compiled call path (_fast_update_running in
 * _cy_call.pxi): r = (1 - momentum) * r + momentum * batch, the batch variance times
 * var_factor. rm and rv are disjoint (the call path checks) and stats is its scratch, hence
 * restrict, which lets the loop vectorize; the same operations as the scalar loop. */
FBN_LOOP void FBN(update_running)(T *__restrict rm, T *__restrict rv,
                                  const double *__restrict stats, fbn_idx C, double momentum,
                                  double var_factor)
{
    fbn_idx c;
    #pragma omp simd
    for (c = 0; c < C; c++) {
        double new_mean = (1.0 - momentum) * (double)rm[c] + momentum * stats[c];
        double new_var = (1.0 - momentum) * (double)rv[c] + momentum * (stats[C + c] * var_factor);
        rm[c] = (T)new_mean;
        rv[c] = (T)new_var;
    }
}

FBN_LOOP void FBN(finish_forward)(const double *sums, fbn_idx C, const double *shift, fbn_idx B,
                                  double m, double eps, const double *weight,
                                  const double *bias, double *stats, T *coef, fbn_idx W)
{
    fbn_idx c;
    int odd = 0;
    #pragma omp simd reduction(|:odd)
    for (c = 0; c < C; c++)
        odd |= FBN(forward_feature)(sums[c], sums[C + c], shift[c * B], m, eps, weight[c],
                                    bias[c], stats, C, coef, W, c, 0);
    if (odd)
        for (c = 0; c < C; c++)
            FBN(forward_feature)(sums[c], sums[C + c], shift[c * B], m, eps, weight[c], bias[c],
                                 stats, C, coef, W, c, 1);
}

/* Eval mode: every feature's statistics and coefficients from the running ones (float64). */
FBN_LOOP void FBN(finish_eval)(const double *running_mean, const double *running_var,
                               fbn_idx C, double eps, const double *weight, const double *bias,
                               double *stats, T *coef, fbn_idx W)
{
    fbn_idx c;
    int odd = 0;
    #pragma omp simd reduction(|:odd)
    for (c = 0; c < C; c++)
        odd |= FBN(stats_and_coefs)(running_mean[c], running_var[c], eps, weight[c], bias[c],
                                    stats, C, coef, W, c, 0);
    if (odd)
        for (c = 0; c < C; c++)
            FBN(stats_and_coefs)(running_mean[c], running_var[c], eps, weight[c], bias[c], stats,
                                 C, coef, W, c, 1);
}

/* Feature c's gradients (grads (2, C): dgamma, dbeta) and dx coefficients (5, W) from sdy =
 * sum(dy) and sdyx = sum(dy * (x - shift)), for the mean dx uses. Returns 1 where the feature
 * is not ordinary. */
static inline int FBN(grad_coefs)(double sdy, double sdyx, double shift, double m, double mean,
                                  double invstd, double weight, int training, double *grads,
                                  fbn_idx C, T *coef, fbn_idx W, fbn_idx c, int exact)
{
    double dgamma = (sdyx - (mean - shift) * sdy) * invstd;
    double k = weight * invstd;
    double u1 = 0.0, u2 = 0.0, s;
    T hi;
    if (training) {
        u1 = -invstd * dgamma / m;
        u2 = -sdy / m;
    }
    grads[c] = dgamma;
    grads[C + c] = sdy;
    s = exact ? fbn_prescale_of(mean, invstd) : 1.0;
    hi = (T)(mean * s);
    if (s != 1.0)
        u1 = u1 / s;
    coef[c] = (T)s;
    coef[W + c] = hi;
    coef[2 * W + c] = (T)k;
    coef[3 * W + c] = (T)u1;
    coef[4 * W + c] = (T)(u2 - (mean * s - (double)hi) * u1);
    return !fbn_ordinary(mean, invstd);
}

/* Feature c of backward from sums (3, C): sum(x - shift), sum(dy), sum(dy * (x - shift)); in
 * training the mean is refined first (fbn_refined_mean). */
static inline int FBN(backward_feature)(const double *sums, fbn_idx C, double shift, double m,
                                        double mean, double mean_ulp, double invstd,
                                        double weight, int training, double *grads, T *coef,
                                        fbn_idx W, fbn_idx c, int exact)
{
    if (training)
        mean = fbn_refined_mean(mean, mean_ulp, shift, sums[c], m);
    return FBN(grad_coefs)(sums[C + c], sums[2 * C + c], shift, m, mean, invstd, weight,
                           training, grads, C, coef, W, c, exact);
}

/* Every feature of backward; returns whether one is not ordinary. Called with training and
 * exact as constants, so that the inlined branches fold and the loop vectorizes (a branch on
 * training inside it kept GCC from vectorizing). */
static inline int FBN(backward_features)(const double *sums, fbn_idx C, const double *shift,
                                         fbn_idx B, double m, const double *mean,
                                         const double *mean_ulp, const double *invstd,
                                         const double *weight, int training, double *grads,
                                         T *coef, fbn_idx W, int exact)
{
    fbn_idx c;
    int odd = 0;
    #pragma omp simd reduction(|:odd)
    for (c = 0; c < C; c++)
        odd |= FBN(backward_feature)(sums, C, shift[c * B], m, mean[c], mean_ulp[c], invstd[c],
                                     weight[c], training, grads, coef, W, c, exact);
    return odd;
}

FBN_LOOP void FBN(finish_backward)(const double *sums, fbn_idx C, const double *shift,
                                   fbn_idx B, double m, const double *mean,
                                   const double *mean_ulp, const double *invstd,
                                   const double *weight, int training, double *grads, T *coef,
                                   fbn_idx W)
{
    /* B == 1 (every feature-inner view) as a constant too: with B a variable, GCC's versioned
     * loop ran its scalar copy for B == 1 (training: 2.0 us against 0.6 us at B == 2 for 512
     * features, where NC 32x512's whole backward kernel took 8.8 us) */
#define FBN_FEATURES(b, tr) FBN(backward_features)(sums, C, shift, b, m, mean, mean_ulp, invstd, \
                                                   weight, tr, grads, coef, W, 0)
    int odd = B == 1 ? (training ? FBN_FEATURES(1, 1) : FBN_FEATURES(1, 0))
                     : (training ? FBN_FEATURES(B, 1) : FBN_FEATURES(B, 0));
#undef FBN_FEATURES
    if (odd)
        FBN(backward_features)(sums, C, shift, B, m, mean, mean_ulp, invstd, weight, training,
                               grads, coef, W, 1);
}

#undef T
