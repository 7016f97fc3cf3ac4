/* Body of _cy_runs.h for one element type FBN_T, continued (see _cy_runs_t.h): each
 * feature's statistics, coefficients and gradients from its sums. */

#define T FBN_T

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
