"""The split phases of :mod:`fastbn.phases` on Numba: the reductions and the dx pass, apart.
Twins of the Cython kernels of the same names (``_cy_phases.pxi``); the loops are the fused
kernels' own helpers (:mod:`fastbn._numba_steps`), in their order."""
import numpy as np
from numba import prange

from ._numba_jit import kernel
from ._numba_steps import (_accumulate_backward_rows, _accumulate_rows, _column_shifts, _dx_rows,
                            _dx_run, _feature_sums, _fold_columns, _group_backward_sums,
                            _group_sums, _relu_dx_rows, _relu_dx_run, _relu_sums_rows,
                            _relu_sums_run)


# --- split phases (fastbn.phases): reductions and the dx pass, apart --------------------------
# The reductions write raw sums around each feature's shift (the forward's: its first value),
# sums[0] holding the shift, so that the caller converts them in float64 to sums around any
# mean; the dx pass takes coefficients (coef, and fcoef for the ReLU mask) built by the caller
# from the whole batch's sums, in the layout the fused kernels use.

@kernel
def stats_outer(x, sums, ngroups):
    """sums (3, C) = shift, sum(x - shift), sum((x - shift)**2) of a (A, C, B) view, in the
    forward's order (groups of adjacent features, as forward_train_outer)."""
    A, C, B = x.shape
    for g in prange(ngroups):
        c0 = g * C // ngroups
        c1 = (g + 1) * C // ngroups
        acc = _group_sums(x, c0, c1)
        for c in range(c0, c1):
            sums[0, c] = x[0, c, 0]
            sums[1, c] = acc[0, c - c0]
            sums[2, c] = acc[1, c - c0]


@kernel
def stats_inner(x, sums, nchunks, B):
    """The same on a feature-inner view (A, L), as forward_train_inner sums."""
    A, L = x.shape
    C = sums.shape[1]
    shift = _column_shifts(x, C, B)
    partial = np.zeros((2, nchunks, L))
    for t in prange(nchunks):
        _accumulate_rows(x, t * A // nchunks, (t + 1) * A // nchunks, shift, partial, t)
    folded = _fold_columns(partial, C, B)
    for c in range(C):
        sums[0, c] = shift[c * B]
        sums[1, c] = folded[0, c]
        sums[2, c] = folded[1, c]


@kernel
def backward_reduce_outer(dy, x, sums, ngroups):
    """sums (4, C) = shift, sum(x - shift), sum(dy), sum(dy * (x - shift)) of (A, C, B) views."""
    A, C, B = x.shape
    for g in prange(ngroups):
        c0 = g * C // ngroups
        c1 = (g + 1) * C // ngroups
        acc = _group_backward_sums(dy, x, c0, c1)
        for c in range(c0, c1):
            sums[0, c] = x[0, c, 0]
            sums[1, c] = acc[0, c - c0]
            sums[2, c] = acc[1, c - c0]
            sums[3, c] = acc[2, c - c0]


@kernel
def backward_reduce_inner(dy, x, sums, nchunks, B):
    """The same on feature-inner views (A, L)."""
    A, L = x.shape
    C = sums.shape[1]
    shift = _column_shifts(x, C, B)
    partial = np.zeros((3, nchunks, L))
    for t in prange(nchunks):
        _accumulate_backward_rows(dy, x, t * A // nchunks, (t + 1) * A // nchunks, shift,
                                  partial, t)
    folded = _fold_columns(partial, C, B)
    for c in range(C):
        sums[0, c] = shift[c * B]
        for r in range(3):
            sums[r + 1, c] = folded[r, c]


@kernel
def backward_relu_reduce_outer(dy, x, fcoef, sums):
    """As backward_reduce_outer with dy masked where the forward's output (rebuilt from fcoef,
    the forward's coefficients) was not positive; sum(x - shift) unmasked."""
    A, C, B = x.shape
    for c in prange(C):
        shift = x[0, c, 0] + 0.0
        s1, _ = _feature_sums(x, c, shift)
        sdy = 0.0
        sdyx = 0.0
        for a in range(A):
            r1, r2 = _relu_sums_run(dy, x, a, c, shift, fcoef)
            sdy += r1
            sdyx += r2
        sums[0, c] = shift
        sums[1, c] = s1
        sums[2, c] = sdy
        sums[3, c] = sdyx


@kernel
def backward_relu_reduce_inner(dy, x, fcoef, sums, nchunks, B):
    """The same on feature-inner views (A, L), fcoef tiled to the columns."""
    A, L = x.shape
    C = sums.shape[1]
    shift = _column_shifts(x, C, B)
    partial = np.zeros((2, nchunks, L))
    for t in prange(nchunks):
        _accumulate_rows(x, t * A // nchunks, (t + 1) * A // nchunks, shift, partial, t)
    xsums = _fold_columns(partial, C, B)
    gpartial = np.zeros((2, nchunks, L))
    for t in prange(nchunks):
        _relu_sums_rows(dy, x, t * A // nchunks, (t + 1) * A // nchunks, shift, fcoef,
                        gpartial, t)
    gsums = _fold_columns(gpartial, C, B)
    for c in range(C):
        sums[0, c] = shift[c * B]
        sums[1, c] = xsums[0, c]
        sums[2, c] = gsums[0, c]
        sums[3, c] = gsums[1, c]


@kernel
def backward_elemt_outer(dy, x, dx, coef):
    """dx = (dy + (x * s - mean_hi) * u1' + u2') * k on (A, C, B) views (see _store_grads)."""
    A, C, B = x.shape
    for ac in prange(A * C):
        a = ac // C
        _dx_run(dy, x, dx, a, ac - a * C, coef)


@kernel
def backward_elemt_inner(dy, x, dx, coef, nchunks):
    """The same on feature-inner views, coefficients tiled to the columns."""
    A = x.shape[0]
    for t in prange(nchunks):
        _dx_rows(dy, x, dx, t * A // nchunks, (t + 1) * A // nchunks, coef)


@kernel
def backward_relu_elemt_outer(dy, x, dx, coef, fcoef):
    """The dx pass of relu(batch_norm(x)): dy masked by the forward's output (fcoef)."""
    A, C, B = x.shape
    for ac in prange(A * C):
        a = ac // C
        _relu_dx_run(dy, x, dx, a, ac - a * C, coef, fcoef, True)


@kernel
def backward_relu_elemt_inner(dy, x, dx, coef, fcoef, nchunks):
    """The same on feature-inner views."""
    A = x.shape[0]
    for t in prange(nchunks):
        _relu_dx_rows(dy, x, dx, t * A // nchunks, (t + 1) * A // nchunks, coef, fcoef, True)
