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

Kernels never check arguments or allocate outputs (the caller passes ``stats``/``grads``/``coef``
arrays); every kernel is compiled twice, a ``parallel`` and a ``serial`` version, and both are
cached on disk.
"""
import math
import threading
import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.extending import intrinsic

from . import _numba_layer

# --- threading layer --------------------------------------------------------------------------
# TBB (thread- and fork-safe), loaded wherever pip put it; else workqueue behind the launch
# lock, never GNU OpenMP. See fastbn._numba_layer.
_numba_layer.choose(numba.config)

#: Held around parallel launches only when the active layer is not thread-safe (workqueue).
_launch_lock = threading.Lock()
_threadsafe_layer = False

REDUCTION_FLAGS = {"reassoc", "contract", "nsz", "arcp"}
ELEMENTWISE_FLAGS = {"contract"}
_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


def _helper(fastmath):
    """Decorator for the serial per-run helpers that the kernels call."""
    return njit(fastmath=fastmath, **_OPTIONS)


class _Kernel:
    """A kernel compiled twice: ``.parallel`` (prange runs on threads) and ``.serial``.
    Called as ``kernel(threads, *args)``, as the Cython kernels are: one thread runs the serial
    twin, more run the parallel one on that many of Numba's threads.

    The serial twin is a copy of the Python function under another qualified name, because
    Numba's on-disk cache is keyed by name and signature, not by the ``parallel`` option."""

    def __init__(self, fn):
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.parallel = njit(parallel=True, **_OPTIONS)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        self.serial = njit(parallel=False, **_OPTIONS)(twin)

    def __call__(self, threads, *args):
        global _threadsafe_layer
        if threads == 1 or _numba_layer.serial_only():
            return self.serial(*args)
        # Numba's thread count is per calling thread: apply ours, give the caller's back.
        callers = numba.get_num_threads()
        if callers != threads:
            numba.set_num_threads(threads)
        try:
            if _threadsafe_layer:
                return self.parallel(*args)
            # Until we know the active threading layer is thread-safe (it is not when a user
            # forced "workqueue"), parallel launches are serialized.
            with _launch_lock:
                result = self.parallel(*args)
                _threadsafe_layer = numba.threading_layer() in ("tbb", "omp")
                return result
        finally:
            if callers != threads:
                numba.set_num_threads(callers)


def kernel(fn):
    return _Kernel(fn)


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


# --- kernels -----------------------------------------------------------------------------------

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


# --- half precision conversions ------------------------------------------------------------------
# Numba has no float16/bfloat16 types: half arrays arrive as uint16 views. float16 uses LLVM's
# own conversions (F16C instructions on x86); bfloat16 is the top half of a float32, rounded to
# nearest-even, NaN kept quiet. Both agree bit for bit with NumPy's and ml_dtypes' casts.

@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return nbtypes.float32(nbtypes.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return nbtypes.uint16(nbtypes.float32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return nbtypes.uint32(nbtypes.float32), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return nbtypes.float32(nbtypes.uint32), codegen


@kernel
def float16_to_float32(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _f16_bits_to_f32(src[i])


@kernel
def float32_to_float16(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _f32_to_f16_bits(src[i])


@kernel
def bfloat16_to_float32(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _bits_to_f32(np.uint32(src[i]) << np.uint32(16))


@kernel
def float32_to_bfloat16(src, dst):
    for i in prange(src.shape[0]):
        u = _f32_to_bits(src[i])
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it, quiet
            dst[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
        else:  # round to nearest, ties to even
            dst[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                               >> np.uint32(16))


@kernel
def copy_flat(src, dst):
    """dst[:] = src[:] on 1-D arrays: the bandwidth yardstick of the benchmark."""
    for i in prange(src.shape[0]):
        dst[i] = src[i]
