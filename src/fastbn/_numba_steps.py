"""The building blocks of the Numba kernels (:mod:`fastbn._numba_kernels`, whose note says how
the layers stack and how the numbers are kept exact): serial helpers over one run or a block
of rows, which LLVM inlines into the parallel kernels, and the per-feature finishing steps
(statistics, coefficients and gradients from a feature's sums)."""
import math

import numpy as np
from numba import njit

from ._numba_jit import _OPTIONS, ELEMENTWISE_FLAGS, REDUCTION_FLAGS, _helper


# --- per-run helpers (serial, inlined by LLVM into the kernels) ---------------------------------
# They take whole arrays and indices rather than row views: creating a view per row costs a
# reference-count update, which dominated short rows (and contended between threads).

@_helper(REDUCTION_FLAGS)
def _shifted_sums(x, a, c, shift):
    """sum(x - shift) and sum((x - shift)**2) over the run x[a, c, :], in float64."""
    s1 = 0.0
    s2 = 0.0
    for b in range(x.shape[2]):
        d = x[a, c, b] - shift
        s1 += d
        s2 += d * d
    return s1, s2


@_helper(REDUCTION_FLAGS)
def _backward_sums(dy, x, a, c, shift):
    """sum(x - shift), sum(dy) and sum(dy * (x - shift)) over the run [a, c, :], in float64."""
    sx = 0.0
    sdy = 0.0
    sdyx = 0.0
    for b in range(x.shape[2]):
        d = x[a, c, b] - shift
        g = dy[a, c, b] + 0.0
        sx += d
        sdy += g
        sdyx += g * d
    return sx, sdy, sdyx


@njit(**_OPTIONS)
def _bn_value(v, s, hi, scale, shift):
    """The normalized value, ``(v * s - hi) * scale + shift``. Compiled without fast-math
    flags (LLVM keeps flags per instruction, also once inlined): forward writes it, and the
    ReLU backward recomputes it, inside reductions that may reassociate, bit for bit."""
    return (v * s - hi) * scale + shift


@njit(**_OPTIONS)
def _relu(v):
    """max(v, 0) with NaN passed through, as torch.relu."""
    return 0.0 if v <= 0.0 else v


@_helper(ELEMENTWISE_FLAGS)
def _normalize_run(x, y, a, c, coef, relu):
    s = coef[0, c]
    hi = coef[1, c]
    scale = coef[2, c]
    shift = coef[3, c]
    if relu:
        for b in range(x.shape[2]):
            y[a, c, b] = _relu(_bn_value(x[a, c, b], s, hi, scale, shift))
    else:
        for b in range(x.shape[2]):
            y[a, c, b] = _bn_value(x[a, c, b], s, hi, scale, shift)


@_helper(ELEMENTWISE_FLAGS)
def _dx_run(dy, x, dx, a, c, coef):
    s = coef[0, c]
    hi = coef[1, c]
    k = coef[2, c]
    u1 = coef[3, c]
    u2 = coef[4, c]
    for b in range(x.shape[2]):
        dx[a, c, b] = (dy[a, c, b] + (x[a, c, b] * s - hi) * u1 + u2) * k


@_helper(ELEMENTWISE_FLAGS)
def _scale_run(dy, dx, a, c, coef):
    k = coef[2, c]
    for b in range(dy.shape[2]):
        dx[a, c, b] = dy[a, c, b] * k


@_helper(ELEMENTWISE_FLAGS)
def _normalize_rows(x, y, a0, a1, coef, relu):
    if relu:
        for a in range(a0, a1):
            for c in range(x.shape[1]):
                y[a, c] = _relu(_bn_value(x[a, c], coef[0, c], coef[1, c], coef[2, c],
                                          coef[3, c]))
    else:
        for a in range(a0, a1):
            for c in range(x.shape[1]):
                y[a, c] = _bn_value(x[a, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c])


@_helper(ELEMENTWISE_FLAGS)
def _dx_rows(dy, x, dx, a0, a1, coef):
    for a in range(a0, a1):
        for c in range(x.shape[1]):
            dx[a, c] = (dy[a, c] + (x[a, c] * coef[0, c] - coef[1, c]) * coef[3, c]
                        + coef[4, c]) * coef[2, c]


@_helper(ELEMENTWISE_FLAGS)
def _scale_rows(dy, dx, a0, a1, coef):
    for a in range(a0, a1):
        for c in range(dy.shape[1]):
            dx[a, c] = dy[a, c] * coef[2, c]


@_helper(REDUCTION_FLAGS)
def _accumulate_rows(x, a0, a1, shift, partial, t):
    """Shifted sums per column of rows a0..a1 of a 2-D view, added into partial[:, t, :].
    Four rows per update: the accumulators' loads and stores, not the arithmetic, bound it."""
    L = x.shape[1]
    a = a0
    while a + 4 <= a1:
        for j in range(L):
            k = shift[j]
            d0 = x[a, j] - k
            d1 = x[a + 1, j] - k
            d2 = x[a + 2, j] - k
            d3 = x[a + 3, j] - k
            partial[0, t, j] += (d0 + d1) + (d2 + d3)
            partial[1, t, j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        a += 4
    for r in range(a, a1):
        for j in range(L):
            d = x[r, j] - shift[j]
            partial[0, t, j] += d
            partial[1, t, j] += d * d


@_helper(REDUCTION_FLAGS)
def _accumulate_backward_rows(dy, x, a0, a1, shift, partial, t):
    """Per column of rows a0..a1: sum(x - shift), sum(dy), sum(dy * (x - shift)), two rows
    per update of the accumulators."""
    L = x.shape[1]
    a = a0
    while a + 2 <= a1:
        for j in range(L):
            k = shift[j]
            d0 = x[a, j] - k
            d1 = x[a + 1, j] - k
            g0 = dy[a, j] + 0.0
            g1 = dy[a + 1, j] + 0.0
            partial[0, t, j] += d0 + d1
            partial[1, t, j] += g0 + g1
            partial[2, t, j] += g0 * d0 + g1 * d1
        a += 2
    for r in range(a, a1):
        for j in range(L):
            d = x[r, j] - shift[j]
            g = dy[r, j] + 0.0
            partial[0, t, j] += d
            partial[1, t, j] += g
            partial[2, t, j] += g * d


# Column j of a feature-inner view (A, L) holds feature (j // B) % C: L = k * C * B, with k
# samples side by side. The helpers below walk that as nested (k, C, B) loops, since integer
# division per column cost more than the arithmetic it indexes.

@njit(**_OPTIONS)
def _column_shifts(x, C, B):
    """Shift of each column: the first value of the column's feature, so that all columns of
    one feature sum around the same point."""
    L = x.shape[1]
    shift = np.empty(L)
    j = 0
    for _ in range(L // (C * B)):
        for c in range(C):
            value = x[0, c * B] + 0.0
            for _ in range(B):
                shift[j] = value
                j += 1
    return shift


@njit(**_OPTIONS)
def _fold_columns(partial, C, B):
    """partial (S, nchunks, L) -> per-feature sums (S, C), in a fixed order."""
    S, nchunks, L = partial.shape
    sums = np.zeros((S, C))
    for s in range(S):
        for t in range(nchunks):
            j = 0
            for _ in range(L // (C * B)):
                for c in range(C):
                    acc = 0.0
                    for _ in range(B):
                        acc += partial[s, t, j]
                        j += 1
                    sums[s, c] += acc
    return sums


@njit(**_OPTIONS)
def tile_columns(coef, C, B):
    """coef[:, j] = coef[:, feature of column j] for every column j, in place: columns 0..C-1
    hold the features' values on entry. Columns are rewritten from the last one down, and the
    source column (a feature index c) is never above the column j being written, so no source
    is overwritten before it is read."""
    L = coef.shape[1]
    j = L - 1
    for _ in range(L // (C * B)):
        for c in range(C - 1, -1, -1):
            for _ in range(B):
                for r in range(coef.shape[0]):
                    coef[r, j] = coef[r, c]
                j -= 1


# --- sums of a group of features, sample by sample (memory order): the order of the fused
# kernels, which the ReLU backward and the split phases repeat to find the same bits

@njit(**_OPTIONS)
def _feature_sums(x, c, shift):
    """Shifted sums of feature c of a (A, C, B) view: the forward's own order, which the ReLU
    backward repeats to find the forward's mean bit for bit."""
    s1 = 0.0
    s2 = 0.0
    for a in range(x.shape[0]):
        r1, r2 = _shifted_sums(x, a, c, shift)
        s1 += r1
        s2 += r2
    return s1, s2


@_helper(set())  # no fast-math: the sums over samples keep their order (same bits)
def _group_sums(x, c0, c1):
    """(2, c1 - c0): sum(x - shift) and sum((x - shift)**2) of features c0..c1 of an (A, C, B)
    view, shift being each feature's first value, sample by sample (memory order)."""
    sums = np.zeros((2, c1 - c0))
    for a in range(x.shape[0]):
        for c in range(c0, c1):
            r1, r2 = _shifted_sums(x, a, c, x[0, c, 0] + 0.0)
            sums[0, c - c0] += r1
            sums[1, c - c0] += r2
    return sums


@_helper(set())  # no fast-math: the sums over samples keep their order (same bits)
def _group_backward_sums(dy, x, c0, c1):
    """(3, c1 - c0): sum(x - shift), sum(dy), sum(dy * (x - shift)) of features c0..c1 of
    (A, C, B) views, shift being each feature's first value, sample by sample (memory order)."""
    sums = np.zeros((3, c1 - c0))
    for a in range(x.shape[0]):
        for c in range(c0, c1):
            r0, r1, r2 = _backward_sums(dy, x, a, c, x[0, c, 0] + 0.0)
            sums[0, c - c0] += r0
            sums[1, c - c0] += r1
            sums[2, c - c0] += r2
    return sums


# --- fused ReLU backward, per run and per block of rows: g = dy where the forward's output
# was > 0 (its coefficients fcoef, its value through _bn_value), then the batch-norm backward of g

@_helper(REDUCTION_FLAGS)
def _relu_sums_run(dy, x, a, c, shift, fcoef):
    """sum(g) and sum(g * (x - shift)) over the run [a, c, :], g = dy masked by the forward."""
    s = fcoef[0, c]
    hi = fcoef[1, c]
    scale = fcoef[2, c]
    offset = fcoef[3, c]
    sdy = 0.0
    sdyx = 0.0
    for b in range(x.shape[2]):
        v = x[a, c, b]
        g = dy[a, c, b] + 0.0 if _bn_value(v, s, hi, scale, offset) > 0.0 else 0.0
        sdy += g
        sdyx += g * (v - shift)
    return sdy, sdyx


@_helper(REDUCTION_FLAGS)
def _relu_sums_rows(dy, x, a0, a1, shift, fcoef, partial, t):
    for a in range(a0, a1):
        for j in range(x.shape[1]):
            v = x[a, j]
            z = _bn_value(v, fcoef[0, j], fcoef[1, j], fcoef[2, j], fcoef[3, j])
            g = dy[a, j] + 0.0 if z > 0.0 else 0.0
            partial[0, t, j] += g
            partial[1, t, j] += g * (v - shift[j])


@_helper(ELEMENTWISE_FLAGS)
def _relu_dx_run(dy, x, dx, a, c, coef, fcoef, training):
    s = fcoef[0, c]
    hi = fcoef[1, c]
    scale = fcoef[2, c]
    offset = fcoef[3, c]
    bs = coef[0, c]
    bhi = coef[1, c]
    k = coef[2, c]
    u1 = coef[3, c]
    u2 = coef[4, c]
    zero = dy[a, c, 0] * 0
    for b in range(x.shape[2]):
        v = x[a, c, b]
        g = dy[a, c, b] if _bn_value(v, s, hi, scale, offset) > 0.0 else zero
        if training:
            dx[a, c, b] = (g + (v * bs - bhi) * u1 + u2) * k
        else:
            dx[a, c, b] = g * k


@_helper(ELEMENTWISE_FLAGS)
def _relu_dx_rows(dy, x, dx, a0, a1, coef, fcoef, training):
    for a in range(a0, a1):
        for j in range(x.shape[1]):
            v = x[a, j]
            z = _bn_value(v, fcoef[0, j], fcoef[1, j], fcoef[2, j], fcoef[3, j])
            g = dy[a, j] if z > 0.0 else dy[a, j] * 0
            if training:
                dx[a, j] = ((g + (v * coef[0, j] - coef[1, j]) * coef[3, j] + coef[4, j])
                            * coef[2, j])
            else:
                dx[a, j] = g * coef[2, j]


# --- per-feature finishing steps (scalars in, scalars out) ---------------------------------
# Scalars only: an array argument to a helper with branches makes Numba keep an atomic
# reference-count update per call, which cost 60 ns per feature (0.5 ms for C = 8192).

@njit(**_OPTIONS)
def _stats(s1, s2, shift, m, eps):
    """mean, var, invstd (float64) of a feature from its sums around ``shift``."""
    dm = s1 / m
    var = s2 / m - dm * dm
    if var < 0.0:  # rounding only; written so that NaN passes through
        var = 0.0
    return shift + dm, var, 1.0 / np.sqrt(var + eps)


@njit(**_OPTIONS)
def _refined_mean(mean, mean_ulp, shift, sx, m):
    """The float64 batch mean ``shift + sx / m`` where the given mean is its rounding (within
    ``mean_ulp``), else the given mean: the rule of reference.backward in training mode."""
    batch_mean = shift + sx / m
    return batch_mean if abs(batch_mean - mean) <= mean_ulp else mean


@njit(**_OPTIONS)
def _grad_terms(sdy, sdyx, shift, m, mean, invstd, weight, training):
    """From a feature's sums around ``shift`` and the mean used: dgamma, and the coefficients
    of ``dx = k * (dy + (x - mean) * u1 + u2)`` (u1 = u2 = 0 in eval mode). Factoring k out
    keeps u1 and u2 in float32's normal range even for data near its maximum."""
    dgamma = (sdyx - (mean - shift) * sdy) * invstd
    k = weight * invstd
    if training:
        return dgamma, k, -invstd * dgamma / m, -sdy / m
    return dgamma, k, 0.0, 0.0


@njit(**_OPTIONS)
def _prescale(mean, var):
    """A power of two s for one feature, 1 for ordinary data. When the mean or the spread pass
    2**64, the elementwise loops work on x * s (exact) so that ``x - mean`` cannot overflow
    float32 and ``gamma * invstd`` cannot fall into its subnormals; the coefficients are
    scaled to match. NaN and Inf statistics keep s = 1."""
    bound = np.sqrt(var)
    if abs(mean) > bound:
        bound = abs(mean)
    if bound > 2.0 ** 64 and bound < np.inf:
        return math.ldexp(1.0, 64 - math.frexp(bound)[1])
    return 1.0


@njit(**_OPTIONS)
def _prescale_of(mean, invstd):
    """_prescale(mean, 1 / invstd**2), without its divisions and square root for ordinary
    data (|mean| <= 2**64 and var <= 2**128 give 1 there too, exactly): they cost more than
    the data of a small feature-inner call (NC 32x512)."""
    q = invstd * invstd
    if abs(mean) <= 2.0 ** 64 and q >= 2.0 ** -128:
        return 1.0
    return _prescale(mean, 1.0 / q)


@njit(**_OPTIONS)
def _store_stats(stats, coef, c, mean, var, invstd, weight, bias):
    """stats[:, c] = mean, var, invstd; coef[:, c] = s, mean_hi, scale, shift' with
    ``y = (x * s - mean_hi) * scale + shift'``. mean_hi is mean * s rounded to x's dtype; what
    the rounding lost, mean_lo, is folded into shift' = bias - mean_lo * scale in float64, so
    the mean is carried beyond x's precision while x * s - mean_hi stays exact near the mean."""
    stats[0, c] = mean
    stats[1, c] = var
    stats[2, c] = invstd
    coef[2, c] = invstd  # rounded to x's dtype: invstd as forward returns it
    _forward_coefs(coef, c, mean, coef[2, c] + 0.0, weight, bias)


@njit(**_OPTIONS)
def _forward_coefs(coef, c, mean, invstd, weight, bias):
    """coef[:, c] from the mean (float64) and invstd as forward returns it (rounded to the
    statistics' dtype): the ReLU backward, which gets that invstd, rebuilds these exactly."""
    s = _prescale_of(mean, invstd)
    scale = weight * invstd
    if s != 1.0:  # dividing by 1 changes nothing but costs a division per feature
        scale = scale / s
    coef[0, c] = s
    coef[1, c] = mean * s
    coef[2, c] = scale
    coef[3, c] = bias - (mean * s - coef[1, c]) * scale


@njit(**_OPTIONS)
def _store_grads(grads, coef, c, mean, invstd, dgamma, dbeta, k, u1, u2):
    """grads[:, c] = dgamma, dbeta; coef[:, c] = s, mean_hi, k, u1 / s, u2' with
    ``dx = (dy + (x * s - mean_hi) * (u1 / s) + u2') * k``, mean_lo folded into u2' as in
    _store_stats."""
    grads[0, c] = dgamma
    grads[1, c] = dbeta
    s = _prescale_of(mean, invstd)
    coef[0, c] = s
    coef[1, c] = mean * s
    coef[2, c] = k
    u1s = u1 if s == 1.0 else u1 / s
    coef[3, c] = u1s
    coef[4, c] = u2 - (mean * s - coef[1, c]) * u1s


@njit(**_OPTIONS)
def eval_coefficients(running_mean, running_var, weight, bias, eps, stats, coef):
    """Eval-mode statistics and normalizing coefficients from the running statistics."""
    for c in range(running_mean.shape[0]):
        mean = running_mean[c] + 0.0
        var = running_var[c] + 0.0
        _store_stats(stats, coef, c, mean, var, 1.0 / np.sqrt(var + eps), weight[c], bias[c])
