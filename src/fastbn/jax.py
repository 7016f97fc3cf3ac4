"""JAX: batch normalization on fastbn's kernels, differentiable, under ``jit``, ``grad``, ``vmap``.

:func:`batch_norm` takes JAX arrays and the keywords of :func:`fastbn.forward`, and returns the
output with the *new* running statistics (JAX arrays are immutable, so nothing is updated in
place). It is a ``jax.custom_vjp`` whose forward and backward call :func:`fastbn.forward` and
:func:`fastbn.backward` from inside the compiled computation, in one of two ways:

- ``call="ffi"`` (the default): a handler registered with XLA's FFI (``jax.ffi.ffi_call``,
  see :mod:`fastbn._jax_ffi`). XLA allocates the outputs and the kernels write into them:
  nothing is copied;
- ``call="callback"``: ``jax.pure_callback``, which copies every output (y, and dx in the
  backward) once into XLA's buffers. On NCHW 32x64x56x56 float32 on one thread of a busy
  2-core machine, the FFI path took about half the callback's time (forward 11 against
  22 ms; forward and backward under ``grad`` 53 against 99 ms).

Either way the inputs reach the kernels as read-only NumPy views of XLA's buffers, without a
copy, and under ``vmap`` the kernels run once per batch element (``vmap_method=
"sequential"``). Every argument is checked while tracing, with :func:`fastbn.forward`'s own
messages, so a bad argument raises a ``TypeError``/``ValueError`` at the call, not an error
inside XLA.

It differentiates in reverse mode (``grad``, ``vjp``), once: ``jvp`` and ``jacfwd`` raise JAX's
error for a ``custom_vjp``, and ``hessian`` JAX's error for an FFI call that cannot be
differentiated.

Flax and Keras layers built on this module are :mod:`fastbn.flax` and :mod:`fastbn.keras`.
"""
import functools
from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.jax needs JAX; install it with: pip install 'fastbn[jax]' "
                      "(jax and jaxlib)") from exc

import numpy as np

from . import _jax_ffi, api
from ._common import stats_dtype
from ._validate import forward_args

__all__ = ["batch_norm", "BatchNormResult"]


class BatchNormResult(NamedTuple):
    """``y`` (x's shape and dtype) and the running statistics after the call (None when none
    were given; the given ones, unchanged, in eval mode)."""

    y: Any
    running_mean: Any
    running_var: Any


class _Config(NamedTuple):
    """The static (hashable) options of one call."""

    axis: int
    training: bool
    momentum: float
    eps: float
    unbiased_running_var: bool
    activation: Any
    backend: Any
    call: str


#: How the kernels are called: "ffi" (XLA's FFI: the kernels write into XLA's buffers) or
#: "callback" (jax.pure_callback: outputs copied once).
CALLS = ("ffi", "callback")


def batch_norm(x, gamma=None, beta=None, *, axis=1, training=True, running_mean=None,
               running_var=None, momentum=0.1, eps=1e-5, unbiased_running_var=True,
               activation=None, backend=None, call="ffi"):
    """Batch normalization of a JAX array on fastbn's kernels.

    The same computation and keywords as :func:`fastbn.forward`; differentiable with respect
    to ``x``, ``gamma`` and ``beta`` (and, in eval mode, the running statistics), and usable
    under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    x : jax.Array, float32, float64 (with ``jax_enable_x64``), float16 or bfloat16, ndim >= 2
        NumPy arrays and lists are converted with ``jnp.asarray`` (float64 to float32 unless
        ``jax_enable_x64`` is set).
    gamma, beta : jax.Array (C,), floating, optional
        Scale and shift; None means 1 and 0.
    axis : int
        The feature axis (1 for NCHW, -1 for channels-last as in Flax and Keras).
    training : bool
        Batch statistics (True) or the running ones (False, which are then required).
    running_mean, running_var : jax.Array (C,), floating, optional
        Both or neither. Not modified: the updated ones are returned.
    momentum : float in [0, 1]
        Weight of the batch in the update, ``r = (1 - momentum) * r + momentum * batch``
        (PyTorch's meaning; Flax's and Keras' ``momentum`` is ``1 -`` this one).
    eps : float > 0
    unbiased_running_var : bool
        True (PyTorch): the running variance takes the unbiased batch variance; False (Flax,
        Keras): the biased one.
    activation : {None, "relu"}
    backend : {None, "numba", "cython", "reference"}
    call : {"ffi", "callback"}
        How the compiled computation reaches the kernels (see the module documentation):
        XLA's FFI, writing into XLA's buffers, or ``jax.pure_callback``, copying the outputs.
        "ffi" becomes "callback" with a jaxlib whose FFI C API has a major version other than
        the one fastbn reads (0).

    ``axis``, ``training``, ``momentum``, ``eps`` and the rest are Python values, fixed when
    a function is traced (``jit`` recompiles for new ones).

    Returns
    -------
    BatchNormResult(y, running_mean, running_var)
        ``y`` has x's shape and dtype; the running statistics keep their shape and dtype (None
        if none were given). In training they carry no gradient back to ``x``, ``gamma`` or
        ``beta`` (they are statistics, not part of the model's function), only to the old
        running statistics.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.forward`, while tracing: nothing runs then; an unknown ``call``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fastbn.jax
    >>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4)) * 2.0 + 5.0
    >>> rm, rv = jnp.zeros(3), jnp.ones(3)
    >>> y, rm, rv = jax.jit(fastbn.jax.batch_norm)(x, running_mean=rm, running_var=rv)
    >>> bool(jnp.abs(y.mean()) < 1e-5), bool(jnp.all(rm > 0.4))
    (True, True)
    >>> loss = lambda x: (fastbn.jax.batch_norm(x).y ** 3).sum()
    >>> jax.grad(loss)(x).shape
    (8, 3, 4, 4)
    """
    # NumPy arrays and lists become JAX arrays first (float64 ones float32 unless
    # jax_enable_x64 is set), so that the checks below see the dtypes the kernels will get
    x, gamma, beta, running_mean, running_var = (
        None if a is None else jnp.asarray(a)
        for a in (x, gamma, beta, running_mean, running_var))
    args = forward_args(_shadow(x), _shadow(gamma), _shadow(beta), axis, training,
                        _shadow(running_mean, writable=True),
                        _shadow(running_var, writable=True), momentum, eps, activation, None,
                        backend)
    if call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}, got {call!r}")
    if call == "ffi" and not _jax_ffi.available(jax):
        call = "callback"  # a jaxlib whose FFI C API this version does not know
    cfg = _Config(args.axis, args.training, args.momentum, args.eps,
                  _flag(unbiased_running_var), args.activation, args.backend, call)
    return BatchNormResult(*_compiled(cfg, x, gamma, beta, running_mean, running_var))


def _flag(value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"unbiased_running_var must be True or False, got {value!r}")
    return bool(value)


def _shadow(value, writable=False):
    """A NumPy stand-in with value's shape and dtype (no data copied, none needed), so that
    fastbn's own validation checks a JAX array, or a tracer, while tracing."""
    if value is None:
        return None
    shape, dtype = value.shape, np.dtype(value.dtype)
    if writable:
        return np.zeros(shape, dtype)  # (C,): running statistics must be writable arrays
    return np.broadcast_to(np.zeros((), dtype), shape)


def _struct(value):
    return None if value is None else jax.ShapeDtypeStruct(value.shape, value.dtype)


# --- the differentiable function ----------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm(cfg, x, gamma, beta, running_mean, running_var):
    return _forward(cfg, x, gamma, beta, running_mean, running_var)[0]


def _forward(cfg, x, gamma, beta, running_mean, running_var):
    """((y, new running mean, new running var), (mean, invstd)) through one callback."""
    sdt = stats_dtype(np.dtype(x.dtype))
    stats = (jax.ShapeDtypeStruct((x.shape[cfg.axis],), sdt),) * 2
    update = cfg.training and running_mean is not None
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), *stats,
              _struct(running_mean) if update else None,
              _struct(running_var) if update else None)
    if cfg.call == "ffi":
        y, mean, invstd, new_mean, new_var = _jax_ffi.forward_call(
            jax, cfg, shapes, x, gamma, beta, running_mean, running_var)
    else:
        y, mean, invstd, new_mean, new_var = jax.pure_callback(
            _hosts(cfg)[0], shapes, x, gamma, beta, running_mean, running_var,
            vmap_method="sequential")
    if not update:
        new_mean, new_var = running_mean, running_var
    return (y, new_mean, new_var), (mean, invstd)


@functools.lru_cache(maxsize=None)
def _hosts(cfg):
    """The forward and backward callbacks of one configuration, the same objects every time:
    JAX caches what it compiles for a callback by the callback's identity, so a new partial
    per call would recompile every eager call."""
    return functools.partial(_forward_host, cfg), functools.partial(_backward_host, cfg)


def _forward_host(cfg, x, gamma, beta, running_mean, running_var):
    """The callback: fastbn.forward on NumPy views of XLA's buffers."""
    x, gamma, beta, running_mean, running_var = _views(x, gamma, beta, running_mean,
                                                       running_var)
    update = cfg.training and running_mean is not None
    if update:  # XLA's buffers are read-only: the update goes into copies, returned
        running_mean, running_var = np.array(running_mean), np.array(running_var)
    y, mean, invstd = api.forward(
        x, gamma, beta, axis=cfg.axis, training=cfg.training, running_mean=running_mean,
        running_var=running_var, momentum=cfg.momentum, eps=cfg.eps,
        unbiased_running_var=cfg.unbiased_running_var, activation=cfg.activation,
        backend=cfg.backend)
    if not update:
        running_mean = running_var = None
    return y, mean, invstd, running_mean, running_var


def _views(*arrays):
    """The callback's arguments (CPU jax.Arrays) as NumPy arrays: read-only views of XLA's
    buffers, no copy."""
    return [None if a is None else np.asarray(a) for a in arrays]


def _batch_norm_fwd(cfg, x, gamma, beta, running_mean, running_var):
    outputs, (mean, invstd) = _forward(cfg, x, gamma, beta, running_mean, running_var)
    return outputs, (x, gamma, beta, mean, invstd, running_mean, running_var)


def _batch_norm_bwd(cfg, residuals, cotangents):
    x, gamma, beta, mean, invstd, running_mean, running_var = residuals
    dy, d_new_mean, d_new_var = cotangents
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), _struct(mean), _struct(mean))
    if cfg.call == "ffi":
        dx, dgamma, dbeta = _jax_ffi.backward_call(jax, cfg, shapes, dy, x, mean, invstd,
                                                   gamma, beta)
    else:
        dx, dgamma, dbeta = jax.pure_callback(
            _hosts(cfg)[1], shapes, dy, x, mean, invstd, gamma, beta,
            vmap_method="sequential")
    d_mean = d_var = None
    if running_mean is not None:
        if cfg.training:  # new = (1 - momentum) * old + momentum * batch
            keep = 1.0 - cfg.momentum
            d_mean, d_var = keep * d_new_mean, keep * d_new_var
        else:  # y = gamma * (x - rm) * (rv + eps)**-0.5 + beta
            g = 1.0 if gamma is None else gamma.astype(dgamma.dtype)
            d_mean = -g * invstd * dbeta
            d_var = -0.5 * g * invstd * invstd * dgamma
        d_mean = d_mean.astype(running_mean.dtype)
        d_var = d_var.astype(running_var.dtype)
    return (dx, _cast_like(dgamma, gamma), _cast_like(dbeta, beta), d_mean, d_var)


def _cast_like(grad, param):
    return None if param is None else grad.astype(param.dtype)


def _backward_host(cfg, dy, x, mean, invstd, gamma, beta):
    dy, x, mean, invstd, gamma, beta = _views(dy, x, mean, invstd, gamma, beta)
    return tuple(api.backward(dy, x, mean, invstd, gamma, beta, axis=cfg.axis,
                              training=cfg.training, activation=cfg.activation,
                              backend=cfg.backend))


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
# Compiled once per configuration and shapes, so that eager calls do not trace every time
# (inside a caller's jit it is inlined).
_compiled = jax.jit(_batch_norm, static_argnums=0)
