"""Flax: :class:`BatchNorm`, ``flax.linen.BatchNorm`` on fastbn's kernels.

The same fields, call signature and variables (``params``: ``scale``, ``bias``;
``batch_stats``: ``mean``, ``var``, float32), so a model swaps the class and keeps its
checkpoints. The batch statistics, the output and the gradients come from fastbn's kernels
through :func:`fastbn.jax.batch_norm`; the running statistics follow Flax's update,
``ra = momentum * ra + (1 - momentum) * batch`` with the biased batch variance (translated
in one place for every adapter, :mod:`fastbn._conventions`).

The variance is always exact (fastbn accumulates in float64 around a per-feature shift).
Flax's default, ``use_fast_variance=True``, computes ``E[x^2] - E[x]^2`` in float32, which
cancels on data whose mean is large against its spread. Float32 data of mean 1e4 and
standard deviation 0.1 (NHWC 32x8x8x16, ``axis=-1``), against a float64 computation:

==============================================  ===================  ====================
                                                batch variance,      output,
                                                largest rel. error   largest abs. error
==============================================  ===================  ====================
``flax.linen.BatchNorm()`` (fast variance)      1.5e+03              1.4e+02
``BatchNorm(use_fast_variance=False)`` (Flax)   3.0e-05              5.5e-03
``fastbn.flax.BatchNorm()``                     4.8e-08              3.4e-07
==============================================  ===================  ====================

(``momentum=0`` so that ``batch_stats["var"]`` is the batch variance; the middle row's output
is limited by Flax's float32 mean, off by a few units of 1e4's last place, which is 1e-3 of
the spread; fastbn carries the mean in two parts).

Batch statistics across devices (``axis_name``, and ``axis_index_groups`` where JAX's
``all_gather`` takes them: under ``pmap``, not under ``vmap``) work under ``pmap``,
``shard_map`` and ``vmap(axis_name=...)``. Each device reduces its own piece of the batch with
fastbn's kernel to a float64 (count, mean, M2) per feature; ``jax.lax.all_gather`` collects
every device's, as the bits of the float64 values (so nothing is rounded, with or without
``jax_enable_x64``); each device merges them exactly (Chan's update, never
``E[x^2] - E[x]^2``) in axis index order and normalizes its piece with the result. The
backward gathers each device's three gradient sums the same way. Every device therefore ends
with the same statistics, bit for bit, equal to those of the concatenated batch. The same data
on four devices (``vmap`` over a leading axis of 4 batches of 8x8x8x16):

==============================================  ===================  ====================
                                                batch variance,      output,
                                                largest rel. error   largest abs. error
==============================================  ===================  ====================
``flax.linen.BatchNorm(axis_name=...)``         1.6e+03              1.4e+02
``use_fast_variance=False`` (Flax, ``pmean``)   6.6e-05              8.2e-03
``fastbn.flax.BatchNorm(axis_name=...)``        4.8e-08              3.4e-07
==============================================  ===================  ====================

Gradients follow Flax's: dx is the gradient of the sum of every device's loss, the ``scale``
and ``bias`` gradients are each device's own share (summed by JAX under ``shard_map`` for
replicated parameters). One limit: take the gradient inside the transform that names the axis
(``jax.vmap(jax.grad(f), axis_name=...)``, or anything under ``pmap``/``shard_map``);
``jax.grad`` of a function that calls ``jax.vmap(..., axis_name=...)`` raises
``NotImplementedError``, because JAX runs a custom gradient's collectives only where the axis
is bound. These calls use ``jax.pure_callback`` (one copy of y and of dx).

Differences from Flax, all raised as errors rather than computed differently:

- ``mask`` raises ``NotImplementedError``: use ``flax.linen.BatchNorm`` there;
- ``axis`` names one feature axis (an int or a 1-tuple), not several;
- ``epsilon`` must be > 0 and ``momentum`` in [0, 1].

``use_fast_variance`` is accepted and has no effect (the variance is always exact). A batch of
one value per feature (as in ``init`` on a single example of a dense layer) has variance 0 and
is computed with ``jax.numpy`` as Flax does, since fastbn's kernels need two values.
"""
from typing import Any, Callable, Optional

try:
    import flax.linen as nn
    import jax.numpy as jnp
    from flax.linen import dtypes as _flax_dtypes
    from flax.linen import initializers
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.flax needs Flax; install it with: pip install 'fastbn[flax]' "
                      "(flax, jax and jaxlib)") from exc

from . import _jax_sync
from . import jax as _fastbn_jax
from ._conventions import decay_convention

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` running fastbn's kernels: same fields, variables and calls.

    Attributes
    ----------
    use_running_average : bool, optional
        True: normalize with ``batch_stats`` (eval); False: with the batch's statistics, and
        update ``batch_stats`` (mark it mutable). Given here or at the call, not both.
    axis : int or 1-tuple of int
        The feature axis (-1: channels-last, as Flax).
    momentum : float in [0, 1]
        Decay of the running statistics: ``ra = momentum * ra + (1 - momentum) * batch``.
    epsilon : float > 0
    dtype : dtype, optional
        Of the result; None infers it from x and the parameters, as Flax.
    param_dtype : dtype
        Of ``scale`` and ``bias`` (float32).
    use_bias, use_scale : bool
    bias_init, scale_init : initializers
    axis_name : hashable, optional
        The name of a ``pmap``/``shard_map``/``vmap`` axis: the batch statistics are those of
        every device's batch together (see the module documentation). Not used by ``init``.
    axis_index_groups : sequence of sequences of int, optional
        With ``axis_name``: statistics within each group of axis indices (as Flax; JAX takes
        them under ``pmap``, not under ``vmap``).
    use_fast_variance : bool
        Accepted for compatibility; the variance is always exact.
    force_float32_reductions : bool
        As Flax: float32 running statistics and reductions.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fastbn.flax
    >>> bn = fastbn.flax.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 2.0
    >>> variables = bn.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'batch_stats': {'mean': (4,), 'var': (4,)}, 'params': {'bias': (4,), 'scale': (4,)}}
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> bool(jnp.abs(y.mean(0)).max() < 1e-5), bool(updates["batch_stats"]["var"][0] > 1.0)
    (True, True)

    The same batch as four devices' pieces of four examples, under ``vmap``:

    >>> sync = fastbn.flax.BatchNorm(use_running_average=False, axis_name="batch")
    >>> ys, _ = jax.vmap(lambda xi: sync.apply(variables, xi, mutable=["batch_stats"]),
    ...                  axis_name="batch")(x.reshape(4, 4, 4))
    >>> bool(jnp.allclose(ys.reshape(16, 4), y, atol=1e-5))
    True
    """

    use_running_average: Optional[bool] = None
    axis: Any = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: Optional[str] = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
        """Normalize x; see ``flax.linen.BatchNorm.__call__``."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        initializing = self.is_initializing()
        feature_axes = _feature_axes(x.ndim, self.axis)
        feature_shape = [x.shape[ax] for ax in feature_axes]  # Flax's IndexError if out of range
        if len(feature_axes) != 1:
            raise NotImplementedError(f"fastbn.flax.BatchNorm normalizes over one feature "
                                      f"axis, got axis={self.axis!r}")
        if mask is not None:
            raise NotImplementedError("fastbn.flax.BatchNorm does not support mask; use "
                                      "flax.linen.BatchNorm for this layer")
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, stats_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, stats_dtype), feature_shape)
        # (batch_stats of another model, say: named as the user knows them, not as the
        # running statistics of fastbn.jax further down)
        for key, variable in (("mean", ra_mean), ("var", ra_var)):
            if tuple(variable.value.shape) != tuple(feature_shape):
                raise ValueError(f"batch_stats['{key}'] must have shape "
                                 f"{tuple(feature_shape)} to match x's feature axis, got "
                                 f"{tuple(variable.value.shape)}")
        scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
                if self.use_bias else None)
        if not self.force_float32_reductions:
            scale = None if scale is None else jnp.asarray(scale, self.param_dtype)
            bias = None if bias is None else jnp.asarray(bias, self.param_dtype)
        out_dtype = _flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        # Flax computes in at least float32 (its statistics are float32) and casts at the end
        compute_dtype = jnp.result_type(x.dtype, stats_dtype, *(
            p.dtype for p in (scale, bias) if p is not None))
        x_dtype = jnp.result_type(x)  # (Flax's batch statistics follow it, not compute_dtype)
        x = jnp.asarray(x, compute_dtype)
        axis = feature_axes[0]
        update = decay_convention(self.momentum)
        if use_running_average:
            y = _fastbn_jax.batch_norm(x, scale, bias, axis=axis, training=False,
                                       running_mean=ra_mean.value, running_var=ra_var.value,
                                       eps=self.epsilon).y
        elif self.axis_name is not None and not initializing:
            # Flax's init takes no collective either (there may be no named axis then)
            y, mean, var = _jax_sync.batch_norm(
                x, scale, bias, axis=axis, eps=self.epsilon, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        elif x.size // max(1, x.shape[axis]) < 2:
            y, mean, var = _one_value_per_feature(x, scale, bias, axis, self.epsilon)
            if not initializing:
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        elif initializing:  # Flax leaves the running statistics alone in init
            y = _fastbn_jax.batch_norm(x, scale, bias, axis=axis, eps=self.epsilon).y
        else:
            # Flax's batch statistics are in x's dtype (or ``dtype``), at least float32 with
            # force_float32_reductions, and its update promotes the running ones to that
            batch_dtype = x_dtype if self.dtype is None else jnp.dtype(self.dtype)
            if self.force_float32_reductions:
                batch_dtype = jnp.promote_types(batch_dtype, jnp.float32)
            updated_dtype = jnp.result_type(ra_mean.value, batch_dtype)
            y, ra_mean.value, ra_var.value = _fastbn_jax.batch_norm(
                x, scale, bias, axis=axis, running_mean=ra_mean.value.astype(updated_dtype),
                running_var=ra_var.value.astype(updated_dtype), momentum=update.momentum,
                eps=self.epsilon, unbiased_running_var=update.unbiased_running_var)
        return jnp.asarray(y, out_dtype)


def _feature_axes(ndim, axis):
    """Flax's canonical feature axes: deduplicated, non-negative."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted({ndim + a if a < 0 else a for a in axes}))


def _one_value_per_feature(x, scale, bias, axis, eps):
    """Flax's computation where each feature has at most one value (variance 0, or NaN for
    none), which fastbn's kernels do not take."""
    over = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = x.mean(over)
    var = jnp.square(x - mean.reshape(shape)).mean(over)
    mul = 1.0 / jnp.sqrt(var + eps)
    if scale is not None:
        mul = mul * scale
    y = (x - mean.reshape(shape)) * mul.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y, mean, var
