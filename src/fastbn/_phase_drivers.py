"""Drivers of the split phases (:mod:`fastbn.phases`) on the compiled backends: the plan's
views, one kernel launch, and the per-feature float64 arithmetic around it.

The reductions (``stats_*``, ``backward_reduce_*``, ``backward_relu_reduce_*``) return raw sums
around each feature's shift, the same sums the fused kernels take, in the same order; they are
converted here to (mean, M2) or to sums around a given mean. The dx pass
(``backward_elemt_*``, ``backward_relu_elemt_*``) takes the coefficients the fused backward
would have built from the whole batch's sums: :func:`grad_coefs` and :func:`forward_coefs`
build them here, in NumPy over the C features, with the fused kernels' formulas
(``_store_grads`` and ``_forward_coefs`` in :mod:`fastbn._numba_steps`).
"""
import numpy as np

from ._backends import _kernels, _launch, launch_threads
from ._drivers import _aligned_input, _aligned_output
from ._plans import GROUP_BYTES, _chunks, _groups, plan


def _prescale(mean, invstd):
    """The fused kernels' power-of-two prescale s per feature (_prescale_of): 1 for data of
    ordinary magnitude."""
    s = np.ones_like(mean)
    with np.errstate(all="ignore"):
        q = invstd * invstd
        odd = ~((np.abs(mean) <= 2.0 ** 64) & (q >= 2.0 ** -128))
        if odd.any():
            bound = np.maximum(np.sqrt(1.0 / q[odd]), np.abs(mean[odd]))
            big = (bound > 2.0 ** 64) & (bound < np.inf)
            exps = np.frexp(np.where(big, bound, 1.0))[1]
            s[odd] = np.where(big, np.ldexp(1.0, 64 - exps), 1.0)
    return s


def forward_coefs(mean, invstd, weight, bias, dtype):
    """The forward's normalizing coefficients (4, C) in x's dtype: s, mean_hi, scale, shift',
    with ``y = (x * s - mean_hi) * scale + shift'``, from the float64 mean and the invstd the
    forward returned (the ReLU mask is rebuilt from them)."""
    s = _prescale(mean, invstd)
    coef = np.empty((4, mean.shape[0]), dtype=dtype)
    coef[0] = s
    coef[1] = mean * s
    scale = weight * invstd / s
    coef[2] = scale
    coef[3] = bias - (mean * s - coef[1].astype(np.float64)) * scale
    return coef


def grad_coefs(mean, invstd, weight, dgamma, sum_dy, count, dtype):
    """The dx coefficients (5, C) in x's dtype: s, mean_hi, k, u1 / s, u2', with
    ``dx = (dy + (x * s - mean_hi) * (u1 / s) + u2') * k``, k = weight * invstd,
    u1 = -invstd * dgamma / M and u2 = -sum(dy) / M over the whole batch (M values)."""
    s = _prescale(mean, invstd)
    coef = np.empty((5, mean.shape[0]), dtype=dtype)
    coef[0] = s
    coef[1] = mean * s
    coef[2] = weight * invstd
    u1s = (-invstd * dgamma / count) / s
    coef[3] = u1s
    coef[4] = -sum_dy / count - (mean * s - coef[1].astype(np.float64)) * u1s
    return coef


def _setup(backend, x, axis, op):
    K = _kernels(backend)
    p = plan(x, axis)
    threads = launch_threads(backend, "inner" if p.inner else "outer", op, x.nbytes)
    return K, p, threads


def _input(backend, p, arr):
    view = p.input_view(arr)
    return _aligned_input(view) if backend == "cython" else view


def local_stats(backend, x, axis, C, m):
    """(mean, m2) float64 (C,) of a non-empty x."""
    K, p, threads = _setup(backend, x, axis, "forward")
    xv = _input(backend, p, x)
    sums = np.empty((3, C))
    if p.inner:
        _launch(backend, threads, K.stats_inner, xv, sums, _chunks(p.shape[0], x.nbytes), p.B)
    else:
        _launch(backend, threads, K.stats_outer, xv, sums, _groups(p.shape, x.itemsize, threads))
    shift, s1, s2 = sums
    mean = shift + s1 / m
    m2 = s2 - s1 * (s1 / m)
    return mean, np.where(m2 < 0.0, 0.0, m2)  # below 0 by rounding only; NaN passes


def backward_reduce(backend, dy, x, axis, C, mean, mask_coefs):
    """(sum(x - mean), sum(g), sum(g * (x - mean))) float64 (C,) of non-empty x and dy around
    ``mean`` (float64); g is dy, masked by the forward's ReLU output when ``mask_coefs`` (the
    forward's coefficients, :func:`forward_coefs`) are given."""
    K, p, threads = _setup(backend, x, axis, "backward")
    xv, gv = _input(backend, p, x), _input(backend, p, dy)
    sums = np.empty((4, C))
    nchunks = _chunks(p.shape[0], x.nbytes)
    if mask_coefs is None:
        if p.inner:
            _launch(backend, threads, K.backward_reduce_inner, gv, xv, sums, nchunks, p.B)
        else:
            _launch(backend, threads, K.backward_reduce_outer, gv, xv, sums,
                    _groups(p.shape, x.itemsize, threads, GROUP_BYTES // 2))
    else:
        fcoef = _tiled(K, p, mask_coefs, C)
        if p.inner:
            _launch(backend, threads, K.backward_relu_reduce_inner, gv, xv, fcoef, sums,
                    nchunks, p.B)
        else:
            _launch(backend, threads, K.backward_relu_reduce_outer, gv, xv, fcoef, sums)
    shift, sx, sdy, sdyx = sums
    offset = mean - shift
    m = x.size // C
    return sx - m * offset, sdy, sdyx - offset * sdy


def _tiled(K, p, coef, C):
    """coef (R, C) widened to a feature-inner view's columns, or as it is for feature-outer."""
    if not p.inner:
        return np.ascontiguousarray(coef)
    wide = np.empty((coef.shape[0], p.shape[1]), dtype=coef.dtype)
    wide[:, :C] = coef
    K.tile_columns(wide, C, p.B)
    return wide


def dx_pass(backend, dy, x, axis, C, coef, mask_coefs, out):
    """dx of non-empty x and dy with the coefficients of :func:`grad_coefs` (and the ReLU mask
    of ``mask_coefs``), written into ``out`` if given."""
    K, p, threads = _setup(backend, x, axis, "backward")
    xv, gv = _input(backend, p, x), _input(backend, p, dy)
    dx, dx_v, copy_back = p.output_view(out, x)
    written = None
    if backend == "cython":
        dx_v, written = _aligned_output(dx_v)
    nchunks = _chunks(p.shape[0], x.nbytes)
    coef = _tiled(K, p, coef, C)
    if mask_coefs is None:
        if p.inner:
            _launch(backend, threads, K.backward_elemt_inner, gv, xv, dx_v, coef, nchunks)
        else:
            _launch(backend, threads, K.backward_elemt_outer, gv, xv, dx_v, coef)
    else:
        fcoef = _tiled(K, p, mask_coefs, C)
        if p.inner:
            _launch(backend, threads, K.backward_relu_elemt_inner, gv, xv, dx_v, coef, fcoef,
                    nchunks)
        else:
            _launch(backend, threads, K.backward_relu_elemt_outer, gv, xv, dx_v, coef, fcoef)
    if written is not None:
        np.copyto(written, dx_v)
    if copy_back:
        np.copyto(out, dx)
        dx = out
    return dx
