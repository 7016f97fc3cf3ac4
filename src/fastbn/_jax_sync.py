"""Training batch norm over the devices of a named JAX axis (``pmap``, ``shard_map``,
``vmap(axis_name=...)``): :mod:`fastbn.phases` with ``jax.lax.all_gather`` between them.

Forward, on every device::

    local (count, mean, M2)   a callback: fastbn's batch_stats kernel on this device's x
    all_gather along the axis (or within the device's group of ``axis_index_groups``)
    merge + normalize         a callback: Chan's merge in the gathered (axis index) order,
                              then fastbn's normalizing kernel with the merged statistics

Backward: the local sums (count, sum(dy), sum(dy * (x - mean)), sum(x - mean)) around the
merged float64 mean, gathered the same way, added in axis index order, then fastbn's dx kernel
with the whole batch's sums. Every device of a group gathers the same numbers and merges them
in the same order, so every device gets the same statistics, bit for bit.

The numbers travel as the bits of float64 values, in pairs of uint32 words: a gather moves
them unchanged, so the merge is as exact as in :mod:`fastbn.distributed` whether or not
``jax_enable_x64`` is set (a float32 gather would round each mean to 24 bits: up to 5e-4 for
a mean of 1e4, which is 5e-3 of a spread of 0.1). The callbacks are ``jax.pure_callback``
(the output is copied once into XLA's buffer); under ``vmap`` they run once per element.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _phase_core
from ._common import stats_dtype


class SyncConfig(NamedTuple):
    """The static (hashable) options of one call."""

    axis: int
    eps: float
    axis_name: Any
    axis_index_groups: Any  # a tuple of tuples of ints, or None
    backend: Any


def batch_norm(x, gamma, beta, *, axis, eps, axis_name, axis_index_groups=None,
               backend=None):
    """(y, batch mean, biased batch variance) of the whole batch along ``axis_name``.

    x is this device's float32 or float64 piece of the batch; gamma and beta (C,) or None.
    The statistics have x's statistics dtype (float32 for float32 x) and carry no gradient;
    y is differentiable with respect to x, gamma and beta (each device's gamma and beta
    gradients are its own share, as when the statistics come from ``jax.lax.pmean``).
    Arguments are checked while tracing, where every device has the same shapes, so a bad
    one raises on all of them and no collective is left waiting.
    """
    shadows = [None if a is None else np.broadcast_to(np.zeros((), np.dtype(a.dtype)), a.shape)
               for a in (x, gamma, beta)]
    args = _phase_core.normalize_inputs(*shadows, axis, None, None, 0.0, eps, None, None,
                                        backend)
    if args.m == 0:
        raise ValueError(f"x has no values per feature (shape {tuple(x.shape)}, feature axis "
                         f"{args.axis}): the batch statistics need at least one value")
    groups = None if axis_index_groups is None else tuple(
        tuple(int(i) for i in group) for group in axis_index_groups)
    cfg = SyncConfig(args.axis, args.eps, axis_name, groups, args.backend)
    return _sync_batch_norm(cfg, x, gamma, beta)


def _as_bits(values):
    """float64 values as uint32 words (their bits, two per value)."""
    return np.ascontiguousarray(values, dtype=np.float64).view(np.uint32)


def _from_bits(words):
    """uint32 words of :func:`_as_bits` (any leading shape) back as float64 values."""
    return np.ascontiguousarray(words, dtype=np.uint32).view(np.float64)


def _words(values_count):
    return jax.ShapeDtypeStruct((2 * values_count,), jnp.uint32)


def _gather(cfg, words):
    return jax.lax.all_gather(words, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)


def _manual_axes(value):
    """The shard_map axes over which value varies (empty outside shard_map's type checks)."""
    aval = jax.typeof(value) if hasattr(jax, "typeof") else None
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10; before: aval.vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _varying_like(value, model):
    """value typed as varying over model's shard_map axes: a callback's results are typed
    as the same on every device, which y and dx are not."""
    missing = tuple(_manual_axes(model) - _manual_axes(value))
    if not missing:
        return value
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is None:  # JAX before pcast
        return jax.lax.pvary(value, missing)
    return pcast(value, missing, to="varying")


def _cotangent(share, x, param):
    """A parameter's gradient from this device's share: summed over the shard_map axes along
    which the parameter is the same on every device (as JAX's own transpose does)."""
    share = _varying_like(share.astype(param.dtype), x)
    shared = tuple(_manual_axes(share) - _manual_axes(param))
    return jax.lax.psum(share, shared) if shared else share


def _views(*arrays):
    return [None if a is None else np.asarray(a) for a in arrays]


# --- host callbacks ---------------------------------------------------------------------------

def _local_stats_host(cfg, x):
    (x,) = _views(x)
    local = _phase_core.batch_stats_checked(x, cfg.axis, cfg.backend)
    return _as_bits(np.concatenate([[local.count], local.mean, local.m2]))


def _merged(gathered, C):
    """(count, mean, M2) of the whole batch from every device's, in axis index order."""
    rows = _from_bits(gathered)
    return _phase_core.merge_stats_checked(
        [(row[0], row[1:C + 1], row[C + 1:]) for row in rows])


def _normalize_host(cfg, x, gathered, gamma, beta):
    x, gathered, gamma, beta = _views(x, gathered, gamma, beta)
    a = _phase_core.normalize_inputs(x, gamma, beta, cfg.axis, None, None, 0.0, cfg.eps,
                                     None, None, cfg.backend)
    count, mean, m2 = _merged(gathered, a.C)
    var = m2 / count
    y, _, invstd = _phase_core.normalize_checked(a, count, mean, var)
    sdt = stats_dtype(x.dtype)
    return y, mean.astype(sdt), var.astype(sdt), invstd, _as_bits(mean)


def _checked_backward(cfg, dy, x, mean_words, invstd, gamma, beta):
    dy, x, mean_words, invstd, gamma, beta = _views(dy, x, mean_words, invstd, gamma, beta)
    mean = _from_bits(mean_words)
    x, dy, axis, C, _, invstd, gamma, beta, _ = _phase_core.backward_inputs(
        dy, x, mean, invstd, gamma, beta, cfg.axis, None)
    return dy, x, C, mean, invstd, gamma, beta


def _local_sums_host(cfg, dy, x, mean_words, invstd, gamma, beta):
    dy, x, C, mean, invstd, gamma, beta = _checked_backward(cfg, dy, x, mean_words, invstd,
                                                            gamma, beta)
    s = _phase_core.backward_sums_checked(dy, x, cfg.axis, C, mean, invstd, gamma, beta, None,
                                          cfg.backend)
    return _as_bits(np.concatenate([[s.count], s.sum_dy, s.sum_dy_xmu, s.sum_xmu]))


def _sums(words, C):
    """GradSums of packed float64 values (count, sum_dy, sum_dy_xmu, sum_xmu)."""
    v = _from_bits(words)
    return _phase_core.GradSums(float(v[0]), v[1:C + 1], v[C + 1:2 * C + 1], v[2 * C + 1:])


def _dx_host(cfg, dy, x, mean_words, invstd, local_words, gathered, gamma, beta):
    dy, x, C, mean, invstd, gamma, beta = _checked_backward(cfg, dy, x, mean_words, invstd,
                                                            gamma, beta)
    rows = _from_bits(np.asarray(gathered))
    total = rows.sum(axis=0)  # column by column in axis index order: the same on every device
    whole = _phase_core.GradSums(float(total[0]), total[1:C + 1], total[C + 1:2 * C + 1],
                                 total[2 * C + 1:])
    refined, offset = _phase_core.refine(mean, whole)
    dgamma, dbeta = _phase_core.param_grads(whole, offset, invstd)
    dx = _phase_core.backward_dx_checked(dy, x, cfg.axis, C, refined, invstd, gamma, beta, None,
                                         whole.count, dgamma, dbeta, np.empty_like(x), mean,
                                         cfg.backend)
    share_gamma, share_beta = _phase_core.param_grads(_sums(np.asarray(local_words), C), offset,
                                                      invstd)
    sdt = stats_dtype(x.dtype)
    return dx, share_gamma.astype(sdt), share_beta.astype(sdt)


@functools.lru_cache(maxsize=None)
def _hosts(cfg):
    """The callbacks of one configuration, the same objects every time (JAX caches compiled
    callbacks by identity)."""
    return tuple(functools.partial(f, cfg) for f in (
        _local_stats_host, _normalize_host, _local_sums_host, _dx_host))


def _call(host, shapes, *args):
    return jax.pure_callback(host, shapes, *args, vmap_method="sequential")


# --- the differentiable function --------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sync_batch_norm(cfg, x, gamma, beta):
    return _forward(cfg, x, gamma, beta)[0]


def _forward(cfg, x, gamma, beta):
    C = x.shape[cfg.axis]
    local_stats, normalize = _hosts(cfg)[:2]
    gathered = _gather(cfg, _call(local_stats, _words(1 + 2 * C), x))
    stat = jax.ShapeDtypeStruct((C,), stats_dtype(np.dtype(x.dtype)))
    y, mean, var, invstd, mean_words = _call(
        normalize, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat, stat, _words(C)),
        x, gathered, gamma, beta)
    return (_varying_like(y, x), mean, var), (mean_words, invstd)


def _forward_vjp(cfg, x, gamma, beta):
    outputs, (mean_words, invstd) = _forward(cfg, x, gamma, beta)
    return outputs, (x, gamma, beta, mean_words, invstd)


def _backward_vjp(cfg, residuals, cotangents):
    x, gamma, beta, mean_words, invstd = residuals
    dy = cotangents[0]  # the statistics carry no gradient (see batch_norm)
    C = x.shape[cfg.axis]
    local_sums, dx_of = _hosts(cfg)[2:]
    local = _call(local_sums, _words(1 + 3 * C), dy, x, mean_words, invstd, gamma, beta)
    try:
        gathered = _gather(cfg, local)
    except NameError as exc:  # JAX traces a custom_vjp's backward outside an enclosing vmap
        raise NotImplementedError(
            f"the gradient of a batch norm over axis_name={cfg.axis_name!r} must be taken "
            f"inside the transform that names the axis: jax.vmap(jax.grad(f), axis_name=...) "
            f"rather than jax.grad of a function that calls jax.vmap(..., axis_name=...) "
            f"(JAX runs a custom gradient's collectives only where the axis is bound; "
            f"pmap and shard_map work either way)") from exc
    stat = jax.ShapeDtypeStruct((C,), invstd.dtype)
    dx, dgamma, dbeta = _call(dx_of, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat),
                              dy, x, mean_words, invstd, local, gathered, gamma, beta)
    return (_varying_like(dx, x), None if gamma is None else _cotangent(dgamma, x, gamma),
            None if beta is None else _cotangent(dbeta, x, beta))


_sync_batch_norm.defvjp(_forward_vjp, _backward_vjp)
