"""Batch normalization in phases: local statistics, an exact merge, normalization with given
statistics, and the backward pass split around its reduction.

:func:`fastbn.forward` and :func:`fastbn.backward` are each one fused pass over the data.
When the batch is spread over several places (processes of a data-parallel job, micro-batches
accumulated before a step, the "ghost" batches of ghost batch norm), the statistics must be
those of the whole batch, and the passes split where the data meet::

    forward:   batch_stats(x_i)  ->  merge_stats([...])  ->  normalize(x_i, merged)
    backward:  backward_sums(dy_i, x_i, ...)  ->  merge_sums([...])  ->  backward_dx(..., merged)

Every piece of the batch is reduced on its own; only per-feature float64 numbers (a count,
a mean and a sum of squared deviations; or three gradient sums) travel between the phases.
:mod:`fastbn.distributed` (MPI) and :class:`fastbn.torch.SyncBatchNorm` (torch.distributed)
are these phases with a collective in the middle.

Numerics
--------
- Statistics are merged exactly, never as ``E[x^2] - E[x]^2`` (which cancels, and goes
  negative, for data with a large mean): the pairwise update of Chan, Golub and LeVeque on
  (count, mean, M2) triples, in a fixed tree over the list's order, so that every process
  merging the same list gets the same bits.
- Counts are float64, so pieces of any size (zero included) merge; an empty piece changes
  nothing.
- The backward's sums are taken around the ``mean`` passed in, with ``sum(x - mean)`` beside
  them: :func:`backward_dx` uses it to refine a float32 ``mean`` to the float64 mean of the
  whole batch, as :func:`fastbn.backward` does for one batch.

Implementation
--------------
On the compiled backends every phase is one kernel launch over x's (A, C, B) view, with the
fused kernels' own loops and summation order: :func:`batch_stats` and :func:`backward_sums`
run reductions that return per-feature float64 sums around each feature's shift (converted
here to (mean, M2) and to sums around the given mean), :func:`normalize` is the eval-mode
normalizing pass with the float64 statistics carried beyond x's precision, and
:func:`backward_dx` is the fused backward's dx pass with coefficients built from the whole
batch's sums (:mod:`fastbn._phase_drivers`). The "reference" backend computes each phase in
NumPy, float64 inside. float16/bfloat16 inputs are not taken yet (convert them to float32).
"""
# annotations kept as written, so that help() shows "ArrayLike", not its expansion
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._backends import resolve_backend
from ._common import ActivationName, BackendName, BackwardResult, ForwardResult, stats_dtype
from ._phase_core import (BatchStats, GradSums, _backend, _data, _out, _stats_arg,
                          backward_dx_checked, backward_inputs,
                          backward_sums_checked, batch_stats_checked, merge_stats_checked,
                          merge_sums_checked, normalize_checked, normalize_inputs, param_grads,
                          refine)
from ._validate import FORWARD_BETA

__all__ = ["BatchStats", "GradSums", "batch_stats", "merge_stats", "normalize",
           "backward_sums", "merge_sums", "backward_dx"]


def batch_stats(x: ArrayLike, *, axis: int = 1,
                backend: BackendName | None = None) -> BatchStats:
    """Per-feature count, mean and sum of squared deviations of ``x``, in float64.

    Parameters
    ----------
    x : array_like, float32 or float64, ndim >= 2
        Any layout, as :func:`fastbn.forward` takes it; may be empty along any axis but
        ``axis``.
    axis : int
        The feature axis.
    backend : {None, "numba", "cython", "reference"}
        As in :func:`fastbn.forward`.

    Returns
    -------
    BatchStats(count, mean, m2)
        ``count`` (float) values per feature; ``mean`` and ``m2`` float64 (C,). Zeros for an
        empty x.

    Raises
    ------
    TypeError
        x not float32/float64.
    ValueError
        x.ndim < 2, axis out of range, unknown backend.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import phases
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> s = phases.batch_stats(x)
    >>> s.count, s.mean.tolist(), np.round(s.var, 6).tolist()
    (6.0, [5.0, 6.0], [11.666667, 11.666667])
    """
    x, axis = _data(x, "x", axis)
    backend = resolve_backend(_backend(backend))
    return batch_stats_checked(x, axis, backend)


def merge_stats(stats: Iterable[BatchStats]) -> BatchStats:
    """The statistics of the union of batches, from theirs (exact, deterministic).

    Pairs are merged with Chan et al.'s update (``delta = mean_b - mean_a``,
    ``mean = mean_a + delta * n_b / n``, ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``) in a
    fixed binary tree over the list's order: the same list gives the same bits everywhere.
    Empty batches (count 0) are skipped.

    Parameters
    ----------
    stats : sequence of BatchStats
        At least one, all with the same number of features.

    Returns
    -------
    BatchStats
        float64, as the inputs.

    Raises
    ------
    TypeError, ValueError
        An empty sequence, an item that is not a (count, mean, m2) triple, lengths that
        differ, a negative count.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import phases
    >>> x = np.random.default_rng(0).normal(1e4, 0.1, (10, 3))
    >>> merged = phases.merge_stats([phases.batch_stats(x[:4]), phases.batch_stats(x[4:])])
    >>> bool(np.allclose(merged.var, x.var(axis=0), rtol=1e-12))
    True
    """
    items = list(stats)
    if not items:
        raise ValueError("stats must hold at least one BatchStats")
    C = np.shape(items[0][1])[0] if len(items[0]) == 3 and np.ndim(items[0][1]) == 1 else None
    if C is None:
        raise TypeError("stats must hold BatchStats (count, mean, m2) triples")
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple) or len(item) != 3:
            raise TypeError(f"stats[{i}] must be a BatchStats, got {type(item).__name__}")
        count, (mean, m2) = _stats_arg(BatchStats(*item), C, f"stats[{i}]")
        checked.append((count, mean, m2))
    return BatchStats(*merge_stats_checked(checked))


def normalize(x: ArrayLike, stats: BatchStats, gamma: ArrayLike | None = None,
              beta: ArrayLike | None = None, *, axis: int = 1,
              running_mean: NDArray[np.floating[Any]] | None = None,
              running_var: NDArray[np.floating[Any]] | None = None, momentum: float = 0.1,
              eps: float = 1e-5, activation: ActivationName | None = None,
              out: NDArray[Any] | None = None,
              backend: BackendName | None = None) -> ForwardResult:
    """Normalize x with given statistics (those of a larger batch), and update running ones.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with ``mean = stats.mean`` and the
    biased ``var = stats.m2 / stats.count``. With ``running_mean`` and ``running_var``, they
    are updated in place as :func:`fastbn.forward` does in training, with the unbiased
    variance of ``stats.count`` values: ``r = (1 - momentum) * r + momentum * batch``.

    Parameters
    ----------
    x : array_like, float32 or float64, ndim >= 2
        This piece of the batch (may be empty along any axis but ``axis``).
    stats : BatchStats
        The statistics of the whole batch (:func:`merge_stats`); count >= 1 (>= 2 with
        running statistics).
    gamma, beta, axis, running_mean, running_var, momentum, eps, activation, out, backend
        As in :func:`fastbn.forward`.

    Returns
    -------
    ForwardResult(y, mean, invstd)
        As :func:`fastbn.forward` in training: y like x, mean and invstd (C,) in float64 for
        float64 x and float32 otherwise. Every caller given the same ``stats`` gets the same
        mean, invstd and running statistics, bit for bit.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.forward`; ``stats`` of the wrong length; ``stats.count`` < 1, or < 2
        with running statistics (the unbiased variance needs two values). Nothing is
        modified when an error is raised.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> from fastbn import phases
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5, 5))
    >>> whole = phases.merge_stats([phases.batch_stats(x[:3]), phases.batch_stats(x[3:])])
    >>> y = np.concatenate([phases.normalize(x[:3], whole).y, phases.normalize(x[3:], whole).y])
    >>> bool(np.allclose(y, fastbn.forward(x).y, atol=1e-12))
    True
    """
    a = normalize_inputs(x, gamma, beta, axis, running_mean, running_var, momentum, eps,
                         activation, out, backend)
    count, (mean, m2) = _stats_arg(stats, a.C)
    minimum = 1 if a.running_mean is None else 2
    if count < minimum:
        raise ValueError(f"stats.count must be at least {minimum} "
                         f"{'to update running statistics (unbiased variance) ' if minimum == 2 else ''}"
                         f"in training, got {count:g} (expected more than 1 value per feature)")
    return normalize_checked(a, count, mean, m2 / count)


def backward_sums(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                  gamma: ArrayLike | None = None, beta: ArrayLike | None = FORWARD_BETA, *,
                  axis: int = 1, activation: ActivationName | None = None,
                  backend: BackendName | None = None) -> GradSums:
    """The backward pass's per-feature sums over this piece of the batch, in float64.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array_like, float32 or float64, ndim >= 2
        This piece of the forward's input (may be empty along any axis but ``axis``).
    mean, invstd : array_like (C,), floating
        The whole batch's, as :func:`normalize` returned them (the float64 ``mean`` of
        :func:`merge_stats` may be passed instead of the rounded one). Sums are taken around
        ``mean`` as given.
    gamma, beta : array_like (C,) or None
        The forward's (None: 1 and 0). beta is read with ``activation="relu"`` only, to find
        where the forward's output was positive, and must then be given (None where the
        forward had none); left out there, it raises TypeError.
    axis : int
    activation : {None, "relu"}
        The forward's. With "relu", g is dy where the forward's output was positive, else 0;
        pass the float64 mean then, since the mask is recomputed from ``mean``.
    backend : {None, "numba", "cython", "reference"}
        As in :func:`fastbn.backward`.

    Returns
    -------
    GradSums(count, sum_dy, sum_dy_xmu, sum_xmu)

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import phases
    >>> x = np.arange(8.0).reshape(4, 2)
    >>> s = phases.backward_sums(np.ones_like(x), x, [3.0, 4.0], [1.0, 1.0])
    >>> s.count, s.sum_dy.tolist(), s.sum_xmu.tolist()
    (4.0, [4.0, 4.0], [0.0, 0.0])
    """
    x, dy, axis, C, mean_in, invstd, gamma, beta, activation = backward_inputs(
        dy, x, mean, invstd, gamma, beta, axis, activation)
    backend = resolve_backend(_backend(backend))
    mean = np.asarray(mean_in, dtype=np.float64)
    return backward_sums_checked(dy, x, axis, C, mean, invstd, gamma, beta, activation,
                                 backend)


def merge_sums(sums: Iterable[GradSums]) -> GradSums:
    """The sums of the union of batches: added in the list's order (deterministic).

    Parameters
    ----------
    sums : sequence of GradSums
        At least one, all of the same length.

    Returns
    -------
    GradSums

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import phases
    >>> s = phases.GradSums(2.0, np.ones(3), np.zeros(3), np.zeros(3))
    >>> phases.merge_sums([s, s]).sum_dy.tolist()
    [2.0, 2.0, 2.0]
    """
    items = list(sums)
    if not items:
        raise ValueError("sums must hold at least one GradSums")
    if not all(isinstance(item, tuple) and len(item) == 4 for item in items):
        raise TypeError("sums must hold GradSums (count, sum_dy, sum_dy_xmu, sum_xmu)")
    C = np.shape(items[0][1])[0] if np.ndim(items[0][1]) == 1 else 0
    checked = [_stats_arg(GradSums(*item), C, f"sums[{i}]") for i, item in enumerate(items)]
    return merge_sums_checked([(count, *arrays) for count, arrays in checked])


def backward_dx(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                sums: GradSums, gamma: ArrayLike | None = None,
                beta: ArrayLike | None = FORWARD_BETA,
                *, axis: int = 1, activation: ActivationName | None = None,
                out: NDArray[Any] | None = None,
                backend: BackendName | None = None) -> BackwardResult:
    """dx of this piece of the batch, from the whole batch's sums (training mode).

    With M = ``sums.count``, mean refined as :func:`fastbn.backward` does (to
    ``mean + sum_xmu / M`` when ``mean`` is that value's rounding), ``xhat = (x - mean) *
    invstd``, ``dbeta = sum_dy`` and ``dgamma = invstd * sum(g * (x - mean))``::

        dx = gamma * invstd / M * (M * g - dbeta - xhat * dgamma)

    Parameters
    ----------
    dy, x, mean, invstd, gamma, beta, axis, activation
        As in :func:`backward_sums` (the same values as given there).
    sums : GradSums
        The whole batch's (:func:`merge_sums` of every piece's :func:`backward_sums`).
    out : ndarray, optional
        Where to write dx; may be ``dy`` or ``x`` itself.
    backend : {None, "numba", "cython", "reference"}
        As in :func:`fastbn.backward`.

    Returns
    -------
    BackwardResult(dx, dgamma, dbeta)
        dx like x; dgamma and dbeta are the whole batch's (C,), float64 for float64 x and
        float32 otherwise.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.backward`; ``sums`` of the wrong length or with a count < 1.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> from fastbn import phases
    >>> x = np.random.default_rng(0).normal(size=(6, 3))
    >>> dy = np.random.default_rng(1).normal(size=(6, 3))
    >>> y, mean, invstd = fastbn.forward(x)
    >>> parts = [phases.backward_sums(dy[s], x[s], mean, invstd) for s in (slice(0, 2), slice(2, 6))]
    >>> total = phases.merge_sums(parts)
    >>> dx = np.concatenate([phases.backward_dx(dy[s], x[s], mean, invstd, total).dx
    ...                      for s in (slice(0, 2), slice(2, 6))])
    >>> bool(np.allclose(dx, fastbn.backward(dy, x, mean, invstd).dx, atol=1e-12))
    True
    """
    xa, dya, axis, C, mean_in, inv, g, b, activation = backward_inputs(
        dy, x, mean, invstd, gamma, beta, axis, activation)
    count, arrays = _stats_arg(sums, C, "sums")
    if count < 1:
        raise ValueError(f"sums.count must be at least 1, got {count:g}")
    name = resolve_backend(_backend(backend))
    out = _out(out, xa, "x", (dya, xa))
    refined, offset = refine(mean_in, GradSums(count, *arrays))
    dgamma, dbeta = param_grads(GradSums(count, *arrays), offset, inv)
    dx = backward_dx_checked(dya, xa, axis, C, refined, inv, g, b, activation, count, dgamma,
                             dbeta, out, np.asarray(mean_in, dtype=np.float64), name)
    sdt = stats_dtype(xa.dtype)
    return BackwardResult(dx, dgamma.astype(sdt), dbeta.astype(sdt))
