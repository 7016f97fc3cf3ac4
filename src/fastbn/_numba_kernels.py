"""Numba kernels: loops only.

How the layers stack
--------------------
The dispatch layer folds x into a 3-D view ``(A, C, B)`` without copying (axes whose stride is
larger than the feature axis's fold into A, smaller ones into B) and calls one of two families:

- *feature-outer* (B > 1, e.g. NCHW): ``prange`` over features. Each feature's data is A runs of
  B contiguous values; the kernel reduces them, finishes the feature's statistics and at once
  normalizes the same runs while they are still in L2 cache. One read of x from memory.
- *feature-inner* (B == 1, e.g. NC or channels-last): the view is ``(A, C)`` with features
  contiguous in each row. Rows are split into ``nchunks`` blocks reduced in parallel into
  per-block partial sums, the partials are combined per feature, then rows are normalized in
  parallel.

Numerics
--------
- Sums are taken in float64 around a per-feature shift (the feature's first value), so
  ``var = E[(x-K)^2] - E[x-K]^2`` does not cancel for data with a huge mean and small spread.
- The normalizing loops compute ``((x - mean_hi) - mean_lo) * scale + shift`` in x's dtype, with
  the float64 mean split into ``mean_hi`` (rounded to x's dtype) and the remainder ``mean_lo``.
  ``x - mean_hi`` is exact for x near the mean, so float32 output keeps float32 accuracy.
- Fast-math: reduction helpers get ``reassoc`` (so LLVM can vectorize the sums); elementwise
  helpers must not, since reassociation would fold the compensated ``(x - hi) - lo`` back into
  ``x - (hi + lo)``. LLVM keeps fast-math flags per instruction, so the flags survive inlining
  into the parallel kernels. ``nnan``/``ninf`` are never used: NaN and Inf propagate per feature.

Kernels never check arguments or allocate outputs (the caller passes ``stats``/``grads``/``coef``
arrays); every kernel is compiled twice, a ``parallel`` and a ``serial`` version, and both are
cached on disk.
"""
import os
import threading
import types

import numba
import numpy as np
from numba import njit, prange

# --- threading layer --------------------------------------------------------------------------
# TBB is the one Numba threading layer that is both thread-safe (several Python threads may
# launch kernels at once) and fork-safe (a child forked after the parent ran kernels can run
# them; GNU OpenMP would hang or abort there). The user's NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401  (import only probes for TBB)

        numba.config.THREADING_LAYER = "safe"
    except ImportError:
        numba.config.THREADING_LAYER = "threadsafe"

#: Held around parallel launches only when the active layer is not thread-safe (workqueue).
_launch_lock = threading.Lock()

REDUCTION_FLAGS = {"reassoc", "contract", "nsz", "arcp"}
ELEMENTWISE_FLAGS = {"contract"}
_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


def _helper(fastmath):
    """Decorator for the serial per-run helpers that the kernels call."""
    return njit(fastmath=fastmath, **_OPTIONS)


class _Kernel:
    """A kernel compiled twice: ``.parallel`` (prange runs on threads) and ``.serial``.

    The serial twin is a copy of the Python function under another qualified name, because
    Numba's on-disk cache is keyed by name and signature, not by the ``parallel`` option."""

    def __init__(self, fn):
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.parallel = njit(parallel=True, **_OPTIONS)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        self.serial = njit(parallel=False, **_OPTIONS)(twin)


def kernel(fn):
    return _Kernel(fn)


# --- per-run helpers (serial, inlined by LLVM into the kernels) ---------------------------------

@_helper(REDUCTION_FLAGS)
def _shifted_sums(x, shift):
    """sum(x - shift) and sum((x - shift)**2) over a 1-D run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[0]):
        d = x[i] - shift
        s1 += d
        s2 += d * d
    return s1, s2


@_helper(REDUCTION_FLAGS)
def _backward_sums(dy, x, shift):
    """sum(x - shift), sum(dy) and sum(dy * (x - shift)) over a 1-D run, in float64."""
    sx = 0.0
    sdy = 0.0
    sdyx = 0.0
    for i in range(x.shape[0]):
        d = x[i] - shift
        g = dy[i] + 0.0
        sx += d
        sdy += g
        sdyx += g * d
    return sx, sdy, sdyx


@_helper(ELEMENTWISE_FLAGS)
def _normalize_run(x, y, hi, lo, scale, shift):
    for i in range(x.shape[0]):
        y[i] = ((x[i] - hi) - lo) * scale + shift


@_helper(ELEMENTWISE_FLAGS)
def _normalize_row(x, y, hi, lo, scale, shift):
    for i in range(x.shape[0]):
        y[i] = ((x[i] - hi[i]) - lo[i]) * scale[i] + shift[i]


@_helper(ELEMENTWISE_FLAGS)
def _dx_run(dy, x, dx, hi, lo, k, c1, c2):
    for i in range(x.shape[0]):
        dx[i] = dy[i] * k + ((x[i] - hi) - lo) * c1 + c2


@_helper(ELEMENTWISE_FLAGS)
def _dx_row(dy, x, dx, hi, lo, k, c1, c2):
    for i in range(x.shape[0]):
        dx[i] = dy[i] * k[i] + ((x[i] - hi[i]) - lo[i]) * c1[i] + c2[i]


@_helper(ELEMENTWISE_FLAGS)
def _scale_run(dy, dx, k):
    for i in range(dy.shape[0]):
        dx[i] = dy[i] * k


@_helper(ELEMENTWISE_FLAGS)
def _scale_row(dy, dx, k):
    for i in range(dy.shape[0]):
        dx[i] = dy[i] * k[i]


@_helper(REDUCTION_FLAGS)
def _accumulate_rows(x, a0, a1, shift, s1, s2):
    """Per-feature shifted sums of rows a0..a1 of a (A, C) view, added into s1 and s2."""
    for a in range(a0, a1):
        row = x[a]
        for c in range(row.shape[0]):
            d = row[c] - shift[c]
            s1[c] += d
            s2[c] += d * d


@_helper(REDUCTION_FLAGS)
def _accumulate_backward_rows(dy, x, a0, a1, shift, sx, sdy, sdyx):
    for a in range(a0, a1):
        xrow = x[a]
        dyrow = dy[a]
        for c in range(xrow.shape[0]):
            d = xrow[c] - shift[c]
            g = dyrow[c] + 0.0
            sx[c] += d
            sdy[c] += g
            sdyx[c] += g * d


# --- per-feature finishing steps (scalar) ------------------------------------------------------

@njit(**_OPTIONS)
def _finish_stats(c, s1, s2, shift, m, weight, bias, eps, stats, coef):
    """From the shifted sums of feature c: stats[:, c] = mean, var, invstd (float64) and the
    normalizing coefficients coef[:, c] = mean_hi, mean_lo, scale, shift (x's dtype)."""
    dm = s1 / m
    mean = shift + dm
    var = s2 / m - dm * dm
    if var < 0.0:  # rounding only; written so that NaN passes through
        var = 0.0
    invstd = 1.0 / np.sqrt(var + eps)
    stats[0, c] = mean
    stats[1, c] = var
    stats[2, c] = invstd
    coef[0, c] = mean
    coef[1, c] = mean - coef[0, c]
    coef[2, c] = weight[c] * invstd
    coef[3, c] = bias[c]


@njit(**_OPTIONS)
def _finish_grads(c, sx, sdy, sdyx, shift, m, mean_in, mean_ulp, invstd_in, weight, training,
                  grads, coef):
    """From the shifted sums of feature c: grads[:, c] = dgamma, dbeta (float64) and the dx
    coefficients coef[:, c] = mean_hi, mean_lo, k, c1, c2 with
    ``dx = dy*k + (x - mean)*c1 + c2`` (c1 = c2 = 0 in eval mode)."""
    mean = mean_in[c]
    if training:
        batch_mean = shift + sx / m
        if abs(batch_mean - mean) <= mean_ulp[c]:
            mean = batch_mean
    invstd = invstd_in[c]
    dbeta = sdy
    dgamma = (sdyx - (mean - shift) * sdy) * invstd
    grads[0, c] = dgamma
    grads[1, c] = dbeta
    k = weight[c] * invstd
    coef[0, c] = mean
    coef[1, c] = mean - coef[0, c]
    coef[2, c] = k
    if training:
        coef[3, c] = -k * invstd * dgamma / m
        coef[4, c] = -k * dbeta / m
    else:
        coef[3, c] = 0.0
        coef[4, c] = 0.0


# --- kernels -----------------------------------------------------------------------------------

@kernel
def forward_train_outer(x, y, weight, bias, eps, stats, coef):
    """Training forward on a (A, C, B) view: statistics and normalization per feature."""
    A, C, B = x.shape
    m = A * B
    for c in prange(C):
        shift = x[0, c, 0] + 0.0
        s1 = 0.0
        s2 = 0.0
        for a in range(A):
            r1, r2 = _shifted_sums(x[a, c], shift)
            s1 += r1
            s2 += r2
        _finish_stats(c, s1, s2, shift, m, weight, bias, eps, stats, coef)
        hi = coef[0, c]
        lo = coef[1, c]
        scale = coef[2, c]
        offset = coef[3, c]
        for a in range(A):
            _normalize_run(x[a, c], y[a, c], hi, lo, scale, offset)


@kernel
def forward_train_inner(x, y, weight, bias, eps, stats, coef, nchunks):
    """Training forward on a (A, C) view: per-chunk partial sums, combine, normalize rows."""
    A, C = x.shape
    m = A
    shift = np.empty(C)
    for c in range(C):
        shift[c] = x[0, c]
    partial = np.zeros((2, nchunks, C))
    for t in prange(nchunks):
        _accumulate_rows(x, t * A // nchunks, (t + 1) * A // nchunks, shift,
                         partial[0, t], partial[1, t])
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for t in range(nchunks):
            s1 += partial[0, t, c]
            s2 += partial[1, t, c]
        _finish_stats(c, s1, s2, shift[c], m, weight, bias, eps, stats, coef)
    for a in prange(A):
        _normalize_row(x[a], y[a], coef[0], coef[1], coef[2], coef[3])


@kernel
def normalize_outer(x, y, coef):
    """y = ((x - hi) - lo) * scale + shift with per-feature coefficients on a (A, C, B) view."""
    A, C, B = x.shape
    for ac in prange(A * C):
        a = ac // C
        c = ac - a * C
        _normalize_run(x[a, c], y[a, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c])


@kernel
def normalize_inner(x, y, coef):
    """The same on a (A, C) view."""
    for a in prange(x.shape[0]):
        _normalize_row(x[a], y[a], coef[0], coef[1], coef[2], coef[3])


@kernel
def backward_outer(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, training, grads, coef):
    """Backward on (A, C, B) views: reductions and dx per feature, dx while x/dy are cached."""
    A, C, B = x.shape
    m = A * B
    for c in prange(C):
        shift = x[0, c, 0] + 0.0
        sx = 0.0
        sdy = 0.0
        sdyx = 0.0
        for a in range(A):
            r0, r1, r2 = _backward_sums(dy[a, c], x[a, c], shift)
            sx += r0
            sdy += r1
            sdyx += r2
        _finish_grads(c, sx, sdy, sdyx, shift, m, mean_in, mean_ulp, invstd_in, weight,
                      training, grads, coef)
        for a in range(A):
            if training:
                _dx_run(dy[a, c], x[a, c], dx[a, c], coef[0, c], coef[1, c], coef[2, c],
                        coef[3, c], coef[4, c])
            else:
                _scale_run(dy[a, c], dx[a, c], coef[2, c])


@kernel
def backward_inner(dy, x, dx, mean_in, mean_ulp, invstd_in, weight, training, grads, coef,
                   nchunks):
    """Backward on (A, C) views: per-chunk partial sums, combine, dx rows."""
    A, C = x.shape
    m = A
    shift = np.empty(C)
    for c in range(C):
        shift[c] = x[0, c]
    partial = np.zeros((3, nchunks, C))
    for t in prange(nchunks):
        _accumulate_backward_rows(dy, x, t * A // nchunks, (t + 1) * A // nchunks, shift,
                                  partial[0, t], partial[1, t], partial[2, t])
    for c in range(C):
        sx = 0.0
        sdy = 0.0
        sdyx = 0.0
        for t in range(nchunks):
            sx += partial[0, t, c]
            sdy += partial[1, t, c]
            sdyx += partial[2, t, c]
        _finish_grads(c, sx, sdy, sdyx, shift[c], m, mean_in, mean_ulp, invstd_in, weight,
                      training, grads, coef)
    for a in prange(A):
        if training:
            _dx_row(dy[a], x[a], dx[a], coef[0], coef[1], coef[2], coef[3], coef[4])
        else:  # eval: dx does not depend on x, so an Inf in x must not reach it
            _scale_row(dy[a], dx[a], coef[2])


@kernel
def copy_flat(src, dst):
    """dst[:] = src[:] on 1-D arrays: the bandwidth yardstick of the benchmark."""
    for i in prange(src.shape[0]):
        dst[i] = src[i]
