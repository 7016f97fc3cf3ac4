/* Body of _cy_runs.h for one element type FBN_T, continued (see _cy_runs_t.h): the loops
 * over rows of a feature-inner view. */

#define T FBN_T

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

#undef T
