"""Every argument check of the public API, done once, in Python, before any kernel runs.

The functions here only read their arguments: when one raises, nothing has been written
(running statistics and ``out`` included). They return a small record of the resolved
arguments that the backends consume; the backends never check anything themselves.

Error policy (the messages name the argument):
- TypeError: an argument of the wrong kind (not array-like, not floating, dy's dtype unlike x's).
- ValueError: a wrong value (rank, axis, lengths, eps, momentum, too few values per feature,
  missing running statistics in eval mode, a bad ``out``, unknown activation or backend).
"""
import math
import numbers

from typing import Any

import numpy as np
from numpy.typing import NDArray

#: A per-feature parameter as the kernels take it (see :func:`as_param`).
Param = NDArray[np.float32 | np.float64]
#: dtypes of x (and dy) the kernels take. Parameters and statistics may be any real floating dtype.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Half-precision x: float16, and bfloat16 from the ml_dtypes package (recognized by name, so
#: that fastbn need not import ml_dtypes). They compute through float32; see _half.
HALF_NAMES = ("float16", "bfloat16")
ACTIVATIONS = (None, "relu")
BACKENDS = ("numba", "cython", "reference")


class _ForwardBeta:
    """The default of the backward functions' ``beta``: taken as None (0) without an
    activation; with activation="relu" beta must be given (the forward's, or None where the
    forward had none), as the forward's mask depends on it and a left-out beta would give
    other gradients without a word."""

    __slots__ = ()

    def __repr__(self):
        return "<the forward's>"


#: ``beta``'s default in every backward function (see _ForwardBeta).
FORWARD_BETA: Any = _ForwardBeta()


def backward_beta(beta, activation):
    """beta of a backward call: None where left out without an activation; TypeError where
    left out with activation="relu"."""
    if beta is not FORWARD_BETA:
        return beta
    if isinstance(activation, str) and activation == "relu":
        raise TypeError("beta must be given with activation='relu' (the forward's beta, or "
                        "None where the forward had none): the ReLU's mask depends on it")
    return None


def is_half(dtype):
    # itemsize first: dtype.name runs Python code in NumPy (4.6 us), float32/float64 skip it
    return dtype.itemsize == 2 and dtype.name in HALF_NAMES


class ForwardArgs:
    """The resolved arguments of one forward call."""

    __slots__ = ("x", "axis", "C", "m", "gamma", "beta", "training", "running_mean",
                 "running_var", "momentum", "running_var_factor", "eps", "activation", "out",
                 "backend")
    x: NDArray[Any]
    axis: int  # in [0, x.ndim)
    C: int
    m: int  # values per feature
    gamma: Param | None
    beta: Param | None
    training: bool
    running_mean: NDArray[np.floating[Any]] | None
    running_var: NDArray[np.floating[Any]] | None
    momentum: float
    running_var_factor: float  # what the batch variance is multiplied by in the update
    eps: float
    activation: str | None
    out: NDArray[Any] | None
    backend: str | None


class BackwardArgs:
    """The resolved arguments of one backward call."""

    __slots__ = ("dy", "x", "axis", "C", "m", "mean", "mean_ulp", "invstd", "gamma", "beta",
                 "training", "activation", "out", "backend")
    dy: NDArray[Any]
    x: NDArray[Any]
    axis: int
    C: int
    m: int
    mean: Param
    mean_ulp: Param
    invstd: Param
    gamma: Param | None
    beta: Param | None
    training: bool
    activation: str | None
    out: NDArray[Any] | None
    backend: str | None


def _float_array(value, name):
    """x or dy as an ndarray of float16/bfloat16/float32/float64 (lists are accepted, as NumPy
    does)."""
    arr = value if isinstance(value, np.ndarray) else _asarray_or_type_error(value, name)
    if arr.dtype not in FLOAT_DTYPES and not is_half(arr.dtype):
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got "
                        f"{arr.dtype} (convert it first, e.g. {name}.astype(np.float32))")
    return arr


def _axis(axis, ndim):
    if type(axis) is not int and (isinstance(axis, (bool, np.bool_))
                                  or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for x with {ndim} dimensions")
    return axis % ndim


def _vector(value, name, C):
    """A per-feature parameter (gamma, beta, mean, invstd) as an aligned, contiguous float32 or
    float64 vector of length C: as given when it is one (the Cython kernels read float32 ones
    in C, cheaper than a NumPy conversion per call), else converted to float64."""
    arr = value if isinstance(value, np.ndarray) else _asarray_or_type_error(value, name)
    if not _floating(arr.dtype):
        raise TypeError(f"{name} must be a floating array, got dtype {arr.dtype}")
    if arr.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match x's feature axis, "
                         f"got {arr.shape}")
    return as_param(arr)


def _floating(dtype):
    """A real floating dtype: NumPy's, or bfloat16 from ml_dtypes (whose kind is "V")."""
    return dtype.kind == "f" or is_half(dtype)


def as_param(arr):
    """A floating (C,) array as a per-feature parameter: itself when aligned, contiguous and
    float32 or float64, else a float64 copy."""
    if arr.dtype in FLOAT_DTYPES and arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.ascontiguousarray(arr, dtype=np.float64)


def _asarray_or_type_error(value, name):
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from exc


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def as_real(value, name):
    """A real number as a float: Python's and NumPy's, and 0-d arrays of a real dtype (such as
    ``jnp.float32(0.9)``, which Flax and Keras take for momentum and epsilon); not bools, and
    not values traced by a JAX transform (they have no number yet)."""
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, numbers.Real):
        return float(value)
    raw = getattr(value, "dtype", None)
    try:  # (a torch dtype, say, is no NumPy one: then not a number here)
        dtype = np.dtype(np.object_ if raw is None else raw)
    except TypeError:
        dtype = np.dtype(np.object_)
    if getattr(value, "shape", None) == () and (dtype.kind in "fiu" or is_half(dtype)):
        try:
            return float(value)
        except Exception as exc:  # JAX's ConcretizationTypeError for a traced value
            raise TypeError(f"{name} must be a concrete real number, not a value traced by "
                            f"a JAX transform ({type(value).__name__})") from exc
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _real(value, name):
    value = as_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _running(value, name, C):
    """A running statistic: updated in place, so it must be a writable floating ndarray (C,)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (it is updated in place), "
                        f"got {type(value).__name__}")
    if not _floating(value.dtype):
        raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
    if value.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match x's feature axis, "
                         f"got {value.shape}")
    return value


def _values_per_feature(shape, axis):
    return math.prod(shape[:axis]) * math.prod(shape[axis + 1:])


def _backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def _activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _out(out, like, name_like, allowed_aliases):
    """out must be a writable ndarray shaped and typed like ``like``. It may be one of
    ``allowed_aliases`` exactly (in-place use) but must not partly overlap any input."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"out must have {name_like}'s shape {like.shape}, got {out.shape}")
    if out.dtype != like.dtype:
        raise ValueError(f"out must have {name_like}'s dtype {like.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    for arr in allowed_aliases:
        if out is arr or not np.may_share_memory(out, arr) or _same_view(out, arr):
            continue
        if np.shares_memory(out, arr, max_work=10**6):
            raise ValueError("out overlaps an input without being that very array; pass a "
                             "separate array, or the input itself for in-place use")
    return out


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def forward_args(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps,
                 activation, out, backend, unbiased_running_var=True):
    """Check the arguments of :func:`fastbn.forward`; returns a :class:`ForwardArgs`.

    ``running_var_factor`` is what the batch variance is multiplied by in the running update:
    ``m / (m - 1)`` (unbiased, PyTorch) or 1.0 (biased, Flax and Keras)."""
    a = ForwardArgs()
    a.x = x = _float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and features), got {x.ndim}")
    a.axis = _axis(axis, x.ndim)
    a.C = C = x.shape[a.axis]
    a.m = _values_per_feature(x.shape, a.axis)
    a.gamma = None if gamma is None else _vector(gamma, "gamma", C)
    a.beta = None if beta is None else _vector(beta, "beta", C)
    a.training = _flag(training, "training")
    a.eps = _real(eps, "eps")
    if a.eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {a.eps}")
    a.momentum = _real(momentum, "momentum")
    if not 0.0 <= a.momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {a.momentum}")
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var go together: {missing} is missing")
    a.running_mean = a.running_var = None
    if running_mean is not None:
        a.running_mean = _running(running_mean, "running_mean", C)
        a.running_var = _running(running_var, "running_var", C)
        if a.training:
            for name, arr in (("running_mean", a.running_mean), ("running_var", a.running_var)):
                if not arr.flags.writeable:
                    raise ValueError(f"{name} must be writable: training updates it in place")
            if np.may_share_memory(a.running_mean, a.running_var):
                raise ValueError("running_mean and running_var must not share memory")
    unbiased = _flag(unbiased_running_var, "unbiased_running_var")
    a.running_var_factor = a.m / (a.m - 1) if unbiased and a.m > 1 else 1.0
    if a.training:
        if a.m < 2:
            raise ValueError(f"x: training needs at least 2 values per feature to estimate a "
                             f"variance, got {a.m} (shape {x.shape}, axis {a.axis})")
    elif a.running_mean is None:
        raise ValueError("training=False normalizes with running_mean and running_var; "
                         "pass both")
    a.activation = _activation(activation)
    a.backend = _backend(backend)
    a.out = _out(out, x, "x", (x,))
    return a


def backward_args(dy, x, mean, invstd, gamma, beta, axis, training, activation, out, backend):
    """Check the arguments of :func:`fastbn.backward`; returns a :class:`BackwardArgs`."""
    a = BackwardArgs()
    a.x = x = _float_array(x, "x")
    a.dy = dy = _float_array(dy, "dy")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and features), got {x.ndim}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    a.axis = _axis(axis, x.ndim)
    a.C = C = x.shape[a.axis]
    a.m = _values_per_feature(x.shape, a.axis)
    mean = mean if isinstance(mean, np.ndarray) else _asarray_or_type_error(mean, "mean")
    a.mean = _vector(mean, "mean", C)
    a.invstd = _vector(invstd, "invstd", C)
    # In training, backward refines `mean` to the float64 batch mean when the two agree to
    # within one unit in the last place of mean's own dtype (see reference.backward).
    # (in mean's dtype, as a per-feature parameter: a float64 cast here cost 0.5 us a call)
    a.mean_ulp = as_param(np.abs(np.spacing(mean)))
    a.gamma = None if gamma is None else _vector(gamma, "gamma", C)
    beta = backward_beta(beta, activation)
    a.beta = None if beta is None else _vector(beta, "beta", C)
    a.training = _flag(training, "training")
    if a.training and a.m < 2:
        raise ValueError(f"x: training needs at least 2 values per feature, got {a.m} "
                         f"(shape {x.shape}, axis {a.axis})")
    a.activation = _activation(activation)
    a.backend = _backend(backend)
    a.out = _out(out, x, "x", (dy, x))
    return a
