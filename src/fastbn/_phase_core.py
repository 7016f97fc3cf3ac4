"""The split phases' checks and implementations, behind :mod:`fastbn.phases` (which holds
their public signatures and documentation) and :mod:`fastbn._sync`.

Each ``*_checked`` function takes arguments already checked and returns the phase's result:
on the "reference" backend in NumPy, float64 inside; on the compiled ones through
:mod:`fastbn._phase_drivers`.
"""
from typing import NamedTuple

import numpy as np

from . import _phase_drivers, reference
from ._backends import _kernels, resolve_backend
from ._common import ForwardResult, stats_dtype, update_running_stats
from ._drivers import _forward_into, _update_running
from ._validate import (FLOAT_DTYPES, ForwardArgs, _activation, _axis, _backend, _float_array,
                        _out, _real, _running, _values_per_feature, _vector, backward_beta)


class BatchStats(NamedTuple):
    """Per-feature statistics of a batch (or of a piece of one).

    ``count`` is the number of values per feature (a float); ``mean`` and ``m2`` are float64
    (C,) arrays: the mean, and the sum of squared deviations from it, so that the biased
    variance is ``m2 / count``. An empty piece is ``(0.0, zeros, zeros)``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self):
        """The biased variance, ``m2 / count`` (NaN for an empty batch)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / self.count


class GradSums(NamedTuple):
    """The backward pass's per-feature sums over a batch (or a piece of one), float64 (C,).

    ``sum_dy``: sum of g; ``sum_dy_xmu``: sum of ``g * (x - mean)``; ``sum_xmu``: sum of
    ``x - mean``, where g is dy (masked where the forward's ReLU output was 0, with
    ``activation="relu"``) and ``mean`` is the one given to :func:`backward_sums`.
    ``count`` is the number of values per feature.
    """

    count: float
    sum_dy: np.ndarray
    sum_dy_xmu: np.ndarray
    sum_xmu: np.ndarray


def _data(x, name, axis):
    x = _float_array(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: the split phases take float32 or float64, got {x.dtype} "
                        f"(convert it first, e.g. {name}.astype(np.float32))")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), "
                         f"got {x.ndim}")
    return x, _axis(axis, x.ndim)


def _stats_arg(stats, C, name="stats"):
    if not isinstance(stats, (BatchStats, GradSums)) and not isinstance(stats, tuple):
        raise TypeError(f"{name} must be a BatchStats, got {type(stats).__name__}")
    count = _real(stats[0], f"{name}.count")
    if count < 0:
        raise ValueError(f"{name}.count must be >= 0, got {count}")
    arrays = [np.asarray(_vector(v, f"{name}.{field}", C), dtype=np.float64)
              for v, field in zip(stats[1:], stats._fields[1:])]
    return count, arrays


def batch_stats_checked(x, axis, backend):
    """batch_stats on a checked float32/float64 x, a normalized axis and a resolved backend."""
    C = x.shape[axis]
    m = _values_per_feature(x.shape, axis)
    if m == 0:
        return BatchStats(0.0, np.zeros(C), np.zeros(C))
    if backend == "reference":
        x64 = np.moveaxis(x, axis, -1).reshape(-1, C).astype(np.float64)
        mean = x64.mean(axis=0)
        x64 -= mean
        return BatchStats(float(m), mean, np.einsum("ij,ij->j", x64, x64))
    mean, m2 = _phase_drivers.local_stats(backend, x, axis, C, m)
    return BatchStats(float(m), mean, m2)


def merge_stats_checked(items):
    """merge_stats on (count, mean, m2) tuples already checked: a list in a fixed order."""
    items = [item for item in items if item[0] > 0] or items[:1]
    while len(items) > 1:
        merged = [_chan(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            merged.append(items[-1])
        items = merged
    count, mean, m2 = items[0]
    if count == 0:
        return 0.0, np.zeros_like(mean, dtype=np.float64), np.zeros_like(m2, dtype=np.float64)
    return float(count), np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64)


def _chan(a, b):
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    n = na + nb
    delta = mean_b - mean_a
    wb = nb / n
    return n, mean_a + delta * wb, (m2_a + m2_b) + delta * delta * (na * wb)


def _forward_record(x, axis, C, m, *, training, eps, backend, gamma=None, beta=None,
                    running_mean=None, running_var=None, momentum=0.0, activation=None,
                    out=None, running_var_factor=1.0):
    a = ForwardArgs()
    a.x, a.axis, a.C, a.m = x, axis, C, m
    a.gamma, a.beta, a.training = gamma, beta, training
    a.running_mean, a.running_var, a.momentum, a.eps = running_mean, running_var, momentum, eps
    a.running_var_factor = running_var_factor
    a.activation, a.out, a.backend = activation, out, backend
    return a


def normalize_inputs(x, gamma, beta, axis, running_mean, running_var, momentum, eps, activation,
                     out, backend):
    """Every check of :func:`normalize` but those of ``stats``: a ForwardArgs record (``m``:
    x's own values per feature; ``backend`` resolved)."""
    x, axis = _data(x, "x", axis)
    C = x.shape[axis]
    m = _values_per_feature(x.shape, axis)
    gamma = None if gamma is None else _vector(gamma, "gamma", C)
    beta = None if beta is None else _vector(beta, "beta", C)
    eps = _real(eps, "eps")
    if eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    momentum = _real(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var go together: {missing} is missing")
    if running_mean is not None:
        running_mean = _running(running_mean, "running_mean", C)
        running_var = _running(running_var, "running_var", C)
        for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
            if not arr.flags.writeable:
                raise ValueError(f"{name} must be writable: it is updated in place")
        if np.may_share_memory(running_mean, running_var):
            raise ValueError("running_mean and running_var must not share memory")
    activation = _activation(activation)
    backend = resolve_backend(_backend(backend))
    out = _out(out, x, "x", (x,))
    return _forward_record(x, axis, C, m, training=True, eps=eps, backend=backend, gamma=gamma,
                           beta=beta, running_mean=running_mean, running_var=running_var,
                           momentum=momentum, activation=activation, out=out)


def normalize_checked(a, count, mean, var):
    """normalize on checked arguments (a record of :func:`normalize_inputs`); mean and var
    float64 (C,), the whole batch's, of ``count`` values per feature."""
    x, axis, C, m, backend = a.x, a.axis, a.C, a.m, a.backend
    running_mean, running_var, eps = a.running_mean, a.running_var, a.eps
    args = _forward_record(x, axis, C, m, training=False, eps=eps, backend=backend,
                           gamma=a.gamma, beta=a.beta, running_mean=mean, running_var=var,
                           activation=a.activation, out=a.out)
    if m == 0:
        y = np.empty(x.shape, x.dtype) if a.out is None else a.out
        invstd = 1.0 / np.sqrt(var + eps)
        stats = np.stack([mean, var, invstd])
    elif backend == "reference":
        y, _, _ = reference.forward_checked(args)
        stats = np.stack([mean, var, 1.0 / np.sqrt(var + eps)])
    else:
        y, stats = _forward_into(backend, args)
    if running_mean is not None:
        # the unbiased variance of the whole batch's count (normalize checked count >= 2)
        update = _forward_record(x, axis, C, count, training=True, eps=eps, backend=backend,
                                 running_mean=running_mean, running_var=running_var,
                                 momentum=a.momentum, running_var_factor=count / (count - 1))
        if backend == "reference":
            update_running_stats(update, stats[0], stats[1])
        else:
            _update_running(_kernels(backend), update, stats)
    both = stats[::2].astype(stats_dtype(x.dtype))
    return ForwardResult(y, both[0], both[1])


def backward_inputs(dy, x, mean, invstd, gamma, beta, axis, activation):
    """The checks of :func:`backward_sums`: (x, dy, axis, C, mean as given, and float64
    invstd, gamma, beta, the activation)."""
    x, axis = _data(x, "x", axis)
    dy = _float_array(dy, "dy")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    C = x.shape[axis]
    mean_in = _vector(mean, "mean", C)
    invstd = np.asarray(_vector(invstd, "invstd", C), dtype=np.float64)
    gamma = np.ones(C) if gamma is None else np.asarray(_vector(gamma, "gamma", C), np.float64)
    beta = backward_beta(beta, activation)
    beta = np.zeros(C) if beta is None else np.asarray(_vector(beta, "beta", C), np.float64)
    return x, dy, axis, C, mean_in, invstd, gamma, beta, _activation(activation)


def _rows64(arr, axis, C):
    """arr as a float64 (values, C) array (a copy)."""
    return np.moveaxis(arr, axis, -1).reshape(-1, C).astype(np.float64)


def _relu_mask(x, axis, C, mean, invstd, gamma, beta):
    """Where the forward's ReLU output was positive, as a (values, C) boolean array: the
    normalized value recomputed as the kernels' normalizing pass computes it,
    ``(x * s - mean_hi) * scale + shift'`` in x's dtype from the float64 mean and the returned
    invstd (_phase_drivers.forward_coefs), so the mask is the forward's own."""
    coef = _phase_drivers.forward_coefs(mean, invstd, gamma, beta, x.dtype)
    rows = np.moveaxis(x, axis, -1).reshape(-1, C)
    return (rows * coef[0] - coef[1]) * coef[2] + coef[3] > 0


def backward_sums_checked(dy, x, axis, C, mean, invstd, gamma, beta, activation, backend,
                          mask_mean=None):
    """backward_sums on checked arguments (float64 vectors, a resolved backend).
    ``mask_mean`` (default ``mean``): the mean the ReLU mask is computed from."""
    m = _values_per_feature(x.shape, axis)
    if m == 0:
        zeros = np.zeros(C)
        return GradSums(0.0, zeros, zeros.copy(), zeros.copy())
    mask_mean = mean if mask_mean is None else mask_mean
    if backend != "reference":
        mask = None if activation != "relu" else _phase_drivers.forward_coefs(
            mask_mean, invstd, gamma, beta, x.dtype)
        sum_xmu, sum_dy, sum_dy_xmu = _phase_drivers.backward_reduce(backend, dy, x, axis, C,
                                                                     mean, mask)
        return GradSums(float(m), sum_dy, sum_dy_xmu, sum_xmu)
    d = _rows64(x, axis, C)
    d -= mean
    g = _rows64(dy, axis, C)
    if activation == "relu":
        g[~_relu_mask(x, axis, C, mask_mean, invstd, gamma, beta)] = 0.0
    sum_xmu = d.sum(axis=0)
    sum_dy = g.sum(axis=0)
    d *= g
    return GradSums(float(m), sum_dy, d.sum(axis=0), sum_xmu)


def merge_sums_checked(items):
    count = 0.0
    total = [np.zeros_like(np.asarray(items[0][1], dtype=np.float64)) for _ in range(3)]
    for item in items:
        count += item[0]
        for acc, value in zip(total, item[1:]):
            acc += value
    return GradSums(count, *total)


def refine(mean_in, sums):
    """(refined float64 mean, its offset from mean_in) from the whole batch's sums: the float64
    batch mean where mean_in is its rounding (within one unit in the last place of mean_in's
    dtype), as fastbn.backward's rule; mean_in elsewhere."""
    mean = np.asarray(mean_in, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = sums.sum_xmu / sums.count
    ulp = np.abs(np.spacing(np.asarray(mean_in))).astype(np.float64)
    offset = np.where(np.abs(offset) <= ulp, offset, 0.0)
    return mean + offset, offset


def param_grads(sums, offset, invstd):
    """(dgamma, dbeta) float64 of the batch the sums cover, around the refined mean
    ``mean_in + offset``."""
    return invstd * (sums.sum_dy_xmu - offset * sums.sum_dy), sums.sum_dy.copy()


def backward_dx_checked(dy, x, axis, C, mean, invstd, gamma, beta, activation, count, dgamma,
                        dbeta, out, mask_mean, backend):
    """dx on checked arguments: float64 vectors, the refined mean, the whole batch's count
    and parameter gradients; ``mask_mean`` is the mean the ReLU mask is computed from."""
    if x.size == 0:
        return np.empty(x.shape, x.dtype) if out is None else out
    if backend != "reference":
        coef = _phase_drivers.grad_coefs(mean, invstd, gamma, dgamma, dbeta, count, x.dtype)
        mask = None if activation != "relu" else _phase_drivers.forward_coefs(
            mask_mean, invstd, gamma, beta, x.dtype)
        return _phase_drivers.dx_pass(backend, dy, x, axis, C, coef, mask, out)
    g = _rows64(dy, axis, C)
    if activation == "relu":
        g[~_relu_mask(x, axis, C, mask_mean, invstd, gamma, beta)] = 0.0
    xhat = _rows64(x, axis, C)
    xhat -= mean
    xhat *= invstd
    xhat *= dgamma
    g *= count
    g -= dbeta
    g -= xhat
    g *= gamma * invstd / count
    shape = np.moveaxis(np.empty(x.shape, dtype=np.bool_), axis, -1).shape
    result = np.moveaxis(g.reshape(shape), -1, axis)
    if out is None:
        return result.astype(x.dtype)
    np.copyto(out, result, casting="same_kind")
    return out
