"""Numba kernels: loops only.

How the layers stack
--------------------
The dispatch layer folds x into a 3-D view ``(A, C, B)`` without copying (axes whose stride is
larger than the feature axis's fold into A, smaller ones into B) and calls one of two families:

- *feature-outer* (runs of B >= 64 values, e.g. NCHW): ``prange`` over groups of adjacent
  features. Each feature's data is A runs of B contiguous values; a group is reduced sample by
  sample (memory order), its statistics finished, and its runs normalized while still cached.
- *feature-inner* (short runs, NC, channels-last): a 2-D view ``(A', L)`` whose column j holds
  feature ``(j // B) % C`` (rows of a few samples side by side, so rows are wide). Rows are
  split into ``nchunks`` blocks reduced in parallel into per-block partial sums, the partials
  are folded per feature, then rows are normalized in parallel.

Numerics
--------
- Sums are taken in float64 around a per-feature shift (the feature's first value), so
  ``var = E[(x-K)^2] - E[x-K]^2`` does not cancel for data with a huge mean and small spread.
- The normalizing loops compute ``(x * s - mean_hi) * scale + shift'`` in x's dtype (s is a
  power of two, 1 unless the data nears float32's limits), with the float64 mean split into
  ``mean_hi`` (rounded to x's dtype) and the remainder ``mean_lo``, folded into
  ``shift' = beta - mean_lo * scale`` in float64. ``x - mean_hi`` is exact for x near the mean,
  so float32 output keeps float32 accuracy for data of any mean.
- Fast-math: reduction helpers get ``reassoc`` (so LLVM can vectorize the sums); the normalized
  value (_bn_value) gets no flags at all, since reassociation could rewrite it into
  ``x * scale + (shift' - hi * scale)``, the cancelling form that costs PyTorch 6e-3. LLVM
  keeps fast-math flags per instruction, so they survive inlining into the parallel kernels.
  ``nnan``/``ninf`` are never used: NaN and Inf propagate per feature.

Files: this module holds the fused kernels (training forward, eval normalize, backward, the
fused ReLU backward) and the entry points of the others under the same names as the Cython
backend's; :mod:`fastbn._numba_jit` every JIT option (threading layer, fast-math flag sets, the
two decorators); :mod:`fastbn._numba_steps` the serial helpers and per-feature finishing steps;
:mod:`fastbn._numba_phases` the split phases; :mod:`fastbn._numba_half` the half-precision
conversions.

Kernels never check arguments or allocate outputs (the caller passes ``stats``/``grads``/``coef``
arrays); every kernel is compiled twice, a ``parallel`` and a ``serial`` version, and both are
cached on disk.
"""
import numpy as np
from numba import njit, prange

from ._numba_jit import _OPTIONS, _Kernel, kernel  # noqa: F401 (_Kernel: fastbn._report)
# the entry points the drivers call on this module, by the names fastbn._cy_kernels gives them
from ._numba_half import (bfloat16_to_float32, float16_to_float32,  # noqa: F401
                          float32_to_bfloat16, float32_to_float16)
from ._numba_phases import (backward_elemt_inner, backward_elemt_outer,  # noqa: F401
                            backward_reduce_inner, backward_reduce_outer,
                            backward_relu_elemt_inner, backward_relu_elemt_outer,
                            backward_relu_reduce_inner, backward_relu_reduce_outer, stats_inner,
                            stats_outer)
from ._numba_steps import eval_coefficients  # noqa: F401
from ._numba_steps import (_accumulate_backward_rows, _accumulate_rows, _column_shifts, _dx_rows,
                            _dx_run, _feature_sums, _fold_columns, _forward_coefs, _grad_terms,
                            _group_backward_sums, _group_sums, _normalize_rows, _normalize_run,
                            _refined_mean, _relu_dx_rows, _relu_dx_run, _relu_sums_rows,
                            _relu_sums_run, _scale_rows, _scale_run, _stats, _store_grads,
                            _store_stats, tile_columns)


# --- kernels -----------------------------------------------------------------------------------

@kernel
def forward_train_outer(x, y, weight, bias, eps, stats, coef, relu, ngroups):
    """Training forward on a (A, C, B) view. Threads take ``ngroups`` groups of adjacent
    features (group g: features g * C // ngroups to (g + 1) * C // ngroups; see
    _plans._groups) and walk each group in memory order (sample by sample, the group's runs
    side by side): reading one feature at a time jumps a whole sample between runs, which cost
    up to 2.7x in read bandwidth. Each feature's sums still add its runs in sample order, as
    _feature_sums does, so results do not depend on the grouping."""
    A, C, B = x.shape
    m = A * B
    for g in prange(ngroups):
        c0 = g * C // ngroups
        c1 = (g + 1) * C // ngroups
        sums = _group_sums(x, c0, c1)
        for c in range(c0, c1):
            mean, var, invstd = _stats(sums[0, c - c0], sums[1, c - c0], x[0, c, 0] + 0.0, m,
                                       eps)
            _store_stats(stats, coef, c, mean, var, invstd, weight[c], bias[c])
        for a in range(A):
            for c in range(c0, c1):
                _normalize_run(x, y, a, c, coef, relu)


@kernel
def forward_train_inner(x, y, weight, bias, eps, stats, coef, nchunks, B, relu):
    """Training forward on a feature-inner view (A, L): column j holds feature (j // B) % C.
    Per-chunk partial sums, folded per feature, then rows normalized with tiled coefficients."""
    A, L = x.shape
    C = weight.shape[0]
    m = A * (L // C)
    shift = _column_shifts(x, C, B)
    partial = np.zeros((2, nchunks, L))
    for t in prange(nchunks):
        _accumulate_rows(x, t * A // nchunks, (t + 1) * A // nchunks, shift, partial, t)
    sums = _fold_columns(partial, C, B)  # backward_relu_inner repeats this: keep in step
    for c in range(C):
        mean, var, invstd = _stats(sums[0, c], sums[1, c], shift[c * B], m, eps)
        _store_stats(stats, coef, c, mean, var, invstd, weight[c], bias[c])
    tile_columns(coef, C, B)
    for t in prange(nchunks):
        _normalize_rows(x, y, t * A // nchunks, (t + 1) * A // nchunks, coef, relu)


@kernel
def normalize_outer(x, y, coef, relu):
    """y = (x * s - mean_hi) * scale + shift' (see _store_stats) on a (A, C, B) view."""
    A, C, B = x.shape
    for ac in prange(A * C):
        a = ac // C
        _normalize_run(x, y, a, ac - a * C, coef, relu)


@kernel
def normalize_inner(x, y, coef, nchunks, relu):
    """The same on a feature-inner view, with coefficients already tiled to its columns."""
    A = x.shape[0]
    for t in prange(nchunks):
        _normalize_rows(x, y, t * A // nchunks, (t + 1) * A // nchunks, coef, relu)


@kernel
def backward_outer(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, training, grads, coef,
                   ngroups):
    """Backward on (A, C, B) views, by groups of adjacent features in memory order (see
    forward_train_outer): reductions, then dx."""
    A, C, B = x.shape
    m = A * B
    for g in prange(ngroups):
        c0 = g * C // ngroups
        c1 = (g + 1) * C // ngroups
        sums = _group_backward_sums(dy, x, c0, c1)
        for c in range(c0, c1):
            i = c - c0
            shift = x[0, c, 0] + 0.0
            mean = mean_in[c]
            if training:
                mean = _refined_mean(mean, mean_ulp[c], shift, sums[0, i], m)
            dgamma, k, u1, u2 = _grad_terms(sums[1, i], sums[2, i], shift, m, mean,
                                            invstd_in[c], weight[c], training)
            _store_grads(grads, coef, c, mean, invstd_in[c], dgamma,
                         sums[1, i], k, u1, u2)
        for a in range(A):
            for c in range(c0, c1):
                if training:
                    _dx_run(dy, x, dx, a, c, coef)
                else:  # eval: dx does not depend on x, so an Inf in x must not reach it
                    _scale_run(dy, dx, a, c, coef)


@kernel
def backward_inner(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, training, grads, coef,
                   nchunks, B):
    """Backward on feature-inner views (A, L): per-chunk partial sums, fold, dx rows."""
    A, L = x.shape
    C = weight.shape[0]
    m = A * (L // C)
    shift = _column_shifts(x, C, B)
    partial = np.zeros((3, nchunks, L))
    for t in prange(nchunks):
        _accumulate_backward_rows(dy, x, t * A // nchunks, (t + 1) * A // nchunks, shift,
                                  partial, t)
    sums = _fold_columns(partial, C, B)
    for c in range(C):
        mean = mean_in[c]
        if training:
            mean = _refined_mean(mean, mean_ulp[c], shift[c * B], sums[0, c], m)
        dgamma, k, u1, u2 = _grad_terms(sums[1, c], sums[2, c], shift[c * B], m, mean,
                                        invstd_in[c], weight[c], training)
        _store_grads(grads, coef, c, mean, invstd_in[c], dgamma,
                     sums[1, c], k, u1, u2)
    tile_columns(coef, C, B)
    for t in prange(nchunks):
        a0 = t * A // nchunks
        a1 = (t + 1) * A // nchunks
        if training:
            _dx_rows(dy, x, dx, a0, a1, coef)
        else:  # eval: dx does not depend on x, so an Inf in x must not reach it
            _scale_rows(dy, dx, a0, a1, coef)


# --- fused ReLU backward --------------------------------------------------------------------------
# The mask is the forward's own: its coefficients come from the forward's float64 mean (found
# again with the forward's summation code and row blocks) and the invstd the forward returned,
# through _forward_coefs, and z through _bn_value. g = dy where z > 0, else 0 (at exactly 0, no
# gradient, as torch.relu); then the batch-norm backward of g.

@kernel
def backward_relu_outer(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, bias, training,
                        grads, coef, fcoef):
    """Backward of relu(batch_norm(x)) on (A, C, B) views, per feature from cache."""
    A, C, B = x.shape
    m = A * B
    for c in prange(C):
        shift = x[0, c, 0] + 0.0
        mean = mean_in[c]
        if training:
            s1, _ = _feature_sums(x, c, shift)
            mean = _refined_mean(mean, mean_ulp[c], shift, s1, m)
        _forward_coefs(fcoef, c, mean, invstd_in[c], weight[c], bias[c])
        sdy = 0.0
        sdyx = 0.0
        for a in range(A):
            r1, r2 = _relu_sums_run(dy, x, a, c, shift, fcoef)
            sdy += r1
            sdyx += r2
        dgamma, k, u1, u2 = _grad_terms(sdy, sdyx, shift, m, mean, invstd_in[c], weight[c],
                                        training)
        _store_grads(grads, coef, c, mean, invstd_in[c], dgamma, sdy,
                     k, u1, u2)
        for a in range(A):
            _relu_dx_run(dy, x, dx, a, c, coef, fcoef, training)


@kernel
def backward_relu_inner(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, bias, training,
                        grads, coef, fcoef, nchunks, B):
    """Backward of relu(batch_norm(x)) on feature-inner views (A, L)."""
    A, L = x.shape
    C = weight.shape[0]
    m = A * (L // C)
    shift = _column_shifts(x, C, B)
    if training:  # the forward's sums, as forward_train_inner takes them
        partial = np.zeros((2, nchunks, L))
        for t in prange(nchunks):
            _accumulate_rows(x, t * A // nchunks, (t + 1) * A // nchunks, shift, partial, t)
        sums = _fold_columns(partial, C, B)
    for c in range(C):
        mean = mean_in[c]
        if training:
            mean = _refined_mean(mean, mean_ulp[c], shift[c * B], sums[0, c], m)
        _forward_coefs(fcoef, c, mean, invstd_in[c], weight[c], bias[c])
        grads[0, c] = mean  # parked here until the gradients are known
    tile_columns(fcoef, C, B)
    gpartial = np.zeros((2, nchunks, L))
    for t in prange(nchunks):
        _relu_sums_rows(dy, x, t * A // nchunks, (t + 1) * A // nchunks, shift, fcoef,
                        gpartial, t)
    gsums = _fold_columns(gpartial, C, B)
    for c in range(C):
        mean = grads[0, c]
        dgamma, k, u1, u2 = _grad_terms(gsums[0, c], gsums[1, c], shift[c * B], m, mean,
                                        invstd_in[c], weight[c], training)
        _store_grads(grads, coef, c, mean, invstd_in[c], dgamma,
                     gsums[0, c], k, u1, u2)
    tile_columns(coef, C, B)
    for t in prange(nchunks):
        _relu_dx_rows(dy, x, dx, t * A // nchunks, (t + 1) * A // nchunks, coef, fcoef,
                      training)


@njit(**_OPTIONS)
def update_running_stats(running_mean, running_var, stats, momentum, var_factor):
    """The compiled twin of fastbn._common.update_running_stats (same operations in the same
    order, so the same bits; there it is about 6 us of NumPy calls per step). ``var_factor``
    multiplies the batch variance: m / (m - 1) for the unbiased one, 1.0 for the biased."""
    for c in range(running_mean.shape[0]):
        new_mean = (1.0 - momentum) * running_mean[c] + momentum * stats[0, c]
        new_var = (1.0 - momentum) * running_var[c] + momentum * (stats[1, c] * var_factor)
        running_mean[c] = new_mean
        running_var[c] = new_var


@kernel
def copy_flat(src, dst):
    """dst[:] = src[:] on 1-D arrays: the bandwidth yardstick of the benchmark."""
    for i in prange(src.shape[0]):
        dst[i] = src[i]
