"""The public functions: signatures and documentation, nothing else.

Checks live in :mod:`fastbn._validate`; :mod:`fastbn._dispatch` routes a call to a backend
(its docstring shows how the modules stack); loops live in :mod:`fastbn._numba_kernels` (and
``fastbn/_cy_kernels.pyx``, the optional compiled twin), the NumPy twin in
:mod:`fastbn.reference`.

A call first goes to the compiled call path (``_cy_call.pxi`` in the Cython extension), which
serves the common case in C and returns None for anything else, every invalid argument
included: the Python path below then runs and raises the documented errors.
"""
# annotations kept as written, so that help() shows "ArrayLike", not its expansion
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _backends, _dispatch
from ._common import ActivationName, BackendName, BackwardResult, ForwardResult
from ._validate import FORWARD_BETA, backward_args, forward_args


def _first_forward(*args: Any) -> ForwardResult | None:
    global _fast_forward, _fast_backward
    _fast_forward, _fast_backward = _backends.call_path()
    return _fast_forward(*args)


def _first_backward(*args: Any) -> BackwardResult | None:
    global _fast_forward, _fast_backward
    _fast_forward, _fast_backward = _backends.call_path()
    return _fast_backward(*args)


#: The compiled call path, loaded on the first call (see the module's docstring).
_fast_forward: Callable[..., ForwardResult | None] = _first_forward
_fast_backward: Callable[..., BackwardResult | None] = _first_backward


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run here, the default first.

    ``"numba"`` (Numba installed), ``"cython"`` (the optional extension was built at install
    time and loads), and always ``"reference"`` (plain NumPy, float64 inside). Any of them can
    be passed as ``backend=`` or set as ``$FASTBN_BACKEND``; all give the same results to
    within rounding (see the README for how they compare in speed).

    Examples
    --------
    >>> import fastbn
    >>> names = fastbn.available_backends()
    >>> names[-1]
    'reference'
    >>> set(names) <= {"numba", "cython", "reference"}
    True
    """
    return _backends.available_backends()


def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            axis: int = 1, training: bool = True,
            running_mean: NDArray[np.floating[Any]] | None = None,
            running_var: NDArray[np.floating[Any]] | None = None, momentum: float = 0.1,
            eps: float = 1e-5, activation: ActivationName | None = None,
            out: NDArray[Any] | None = None,
            backend: BackendName | None = None,
            unbiased_running_var: bool = True) -> ForwardResult:
    """Batch normalization forward pass.

    Over every axis of ``x`` but ``axis``::

        mean = sum(x) / m                        (m = values per feature)
        var  = sum((x - mean)**2) / m            (biased)
        y    = gamma * (x - mean) / sqrt(var + eps) + beta

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16 (ml_dtypes), ndim >= 2
        NC, NCL, NCHW, NCDHW, ... or channels-last with ``axis=-1``. Any memory order and
        strides (views, transposes, Fortran order) work; x is never modified unless it is
        ``out``. Half-precision x is computed through a float32 copy (float32 statistics, as
        PyTorch on the CPU) and the result rounded back to x's dtype.
    gamma, beta : array_like (C,), any floating dtype, optional
        Scale and shift; None means 1 and 0.
    axis : int
        The feature axis (negative counts from the end).
    training : bool
        True: normalize with the batch statistics and, if ``running_mean`` and
        ``running_var`` are given, update them in place:
        ``r = (1 - momentum) * r + momentum * batch``, with the unbiased batch variance
        (``var * m / (m - 1)``), as PyTorch does (see ``unbiased_running_var``). False: normalize with the running statistics,
        which are then required.
    running_mean, running_var : ndarray (C,), floating, optional
        Both or neither. Updated in place in training (computed in float64, stored in their
        own dtype); never partly updated.
    momentum : float in [0, 1]
    eps : float > 0
        Added to the variance; we use the standard ``sqrt(var + eps)`` form.
    activation : {None, "relu"}
        "relu" writes ``relu(y)`` in the same pass. NaN passes through; an output of exactly 0
        passes no gradient (as ``torch.relu``, whose derivative at 0 is 0).
    out : ndarray, optional
        Where to write y: x's shape and dtype, writable; may be ``x`` itself (in place), but
        must not partly overlap it. Returned as that very object.
    backend : {None, "numba", "cython", "reference"}
        None takes ``$FASTBN_BACKEND`` if set, else the default (the first of
        :func:`available_backends`). "cython" needs the optional compiled extension.
    unbiased_running_var : bool
        Which batch variance the running variance takes in training: True, the unbiased
        ``var * m / (m - 1)`` (PyTorch's convention); False, the biased ``var`` itself (Flax's
        and Keras', whose layers also count ``momentum`` the other way round: their
        ``momentum=0.99`` is this function's ``momentum=0.01``). Used only when running
        statistics are updated.

    Returns
    -------
    ForwardResult(y, mean, invstd)
        ``y`` has x's shape and dtype. ``mean`` and ``invstd = 1/sqrt(var + eps)`` are (C,),
        float64 for float64 input and float32 otherwise (half inputs included): the batch
        statistics in training, the running ones in eval, so that :func:`backward` can take
        them back.

    Raises
    ------
    TypeError
        x not array-like or not of a float dtype above; a parameter not floating; training
        or unbiased_running_var not a bool.
    ValueError
        x.ndim < 2; axis out of range; a parameter of length != C; fewer than 2 values per
        feature in training; training=False without running statistics; a bad ``out``;
        eps <= 0; momentum outside [0, 1]; unknown activation or backend.
        Nothing is modified when an error is raised.

    Notes
    -----
    Statistics are accumulated in float64 around a per-feature shift, and the float32 output
    is computed as ``((x - mean_hi) - mean_lo) * scale + beta`` with the mean carried in two
    parts: float32 data with mean 1e4 and spread 0.1 normalizes to within 1e-5 of a float64
    computation. A NaN or Inf in x makes its own feature NaN and leaves the others alone.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y, mean, invstd = fastbn.forward(x, running_mean=rm, running_var=rv)
    >>> bool(abs(y.mean()) < 1e-5), y.dtype, mean.shape
    (True, dtype('float32'), (4,))
    """
    result = _fast_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum,
                           eps, activation, out, backend, unbiased_running_var)
    if result is None:
        result = _dispatch.forward(forward_args(x, gamma, beta, axis, training, running_mean,
                                                running_var, momentum, eps, activation, out,
                                                backend, unbiased_running_var))
    return result


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, beta: ArrayLike | None = FORWARD_BETA, *,
             axis: int = 1,
             training: bool = True, activation: ActivationName | None = None,
             out: NDArray[Any] | None = None,
             backend: BackendName | None = None) -> BackwardResult:
    """Batch normalization backward pass.

    With ``xhat = (x - mean) * invstd`` and sums over every axis but ``axis``::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)   (training)
        dx     = gamma * invstd * dy                                      (eval)

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
        The forward pass's input; nothing else from the forward pass is stored.
    mean, invstd : array_like (C,), floating
        As returned by :func:`forward`. In training, ``mean`` is refined to the float64 batch
        mean of x when the two agree to within one unit in the last place of mean's dtype (a
        float32 mean loses digits that dx needs); a ``mean`` further off is used as given.
    gamma : array_like (C,), optional
        None means 1.
    beta : array_like (C,) or None
        The forward's; None means 0. Read with ``activation="relu"`` only, to find where the
        forward's output was positive, and then it must be given (None where the forward had
        none): left out, it raises TypeError. Without an activation it may be left out.
    axis, training, backend
        As in :func:`forward`.
    activation : {None, "relu"}
        The forward's. With "relu", dy is masked by the forward's own mask, recomputed bit
        for bit from x, mean, invstd, gamma and beta (the forward's float64 mean is found again
        with its own summation order), so no output needs to be stored.
    out : ndarray, optional
        Where to write dx; may be ``dy`` or ``x`` itself.

    Returns
    -------
    BackwardResult(dx, dgamma, dbeta)
        ``dx`` has x's shape and dtype; ``dgamma`` and ``dbeta`` are (C,), float64 for float64
        input and float32 otherwise, in training and eval mode alike.

    Raises
    ------
    TypeError
        dy's dtype differs from x's; a non-floating input; beta left out with
        ``activation="relu"``.
    ValueError
        As :func:`forward`, and dy's shape differs from x's. Nothing is modified on error.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    >>> y, mean, invstd = fastbn.forward(x)
    >>> dx, dgamma, dbeta = fastbn.backward(np.ones_like(x), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-5), dbeta.tolist()
    (True, [16.0, 16.0, 16.0])
    """
    if beta is FORWARD_BETA and activation is None:
        beta = None  # (with an activation, the Python path's checks say what is missing)
    result = _fast_backward(dy, x, mean, invstd, gamma, beta, axis, training, activation, out,
                            backend)
    if result is None:
        result = _dispatch.backward(backward_args(dy, x, mean, invstd, gamma, beta, axis,
                                                  training, activation, out, backend))
    return result


def set_num_threads(n: int) -> None:
    """Set how many threads fastbn's kernels use.

    One process-wide count, for both compiled backends and calls from every Python thread
    (Numba's own ``numba.set_num_threads`` is per calling thread; fastbn applies its count
    around each parallel launch and restores the caller's; the Cython kernels pass it to
    OpenMP as ``num_threads``, so ``OMP_NUM_THREADS`` does not apply). The starting value is
    ``$FASTBN_NUM_THREADS`` if set, else ``NUMBA_NUM_THREADS`` (by default every CPU this
    process may run on). With 1, kernels run serially. Results do not depend on the count,
    bit for bit.

    Parameters
    ----------
    n : int
        1 <= n <= NUMBA_NUM_THREADS.

    Raises
    ------
    TypeError
        n is not an integer.
    ValueError
        n is outside [1, NUMBA_NUM_THREADS].

    Examples
    --------
    >>> import fastbn
    >>> before = fastbn.get_num_threads()
    >>> fastbn.set_num_threads(1)
    >>> fastbn.get_num_threads()
    1
    >>> fastbn.set_num_threads(before)
    """
    _backends.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads fastbn's kernels use (see :func:`set_num_threads`).

    Raises
    ------
    TypeError, ValueError
        ``$FASTBN_NUM_THREADS`` is set but is not an integer in [1, NUMBA_NUM_THREADS]
        (reported on first use).
    """
    return _backends.get_num_threads()
