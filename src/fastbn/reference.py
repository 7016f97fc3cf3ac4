"""The reference: plain NumPy, float64 inside, same names and signatures as :mod:`fastbn`.

Every kernel is tested against these two functions, and they are tested against finite
differences and PyTorch. They favour the obvious formula over speed: x is moved to
channels-last and converted to float64, and every statistic is a NumPy reduction.

Conventions (shared by all backends):
- the variance is the biased one, ``mean((x - mean)**2)``; ``invstd = 1 / sqrt(var + eps)``;
- the running statistics follow PyTorch (unbiased batch variance) unless
  ``unbiased_running_var=False`` (the biased one, as Flax and Keras); see
  :func:`fastbn._common.update_running_stats`;
- in training, :func:`backward` uses the float64 batch mean of x in place of ``mean`` when the
  two agree to within one unit in the last place of ``mean``'s dtype. A float32 mean of data
  near 1e4 is off by up to 5e-4 from the true one, which after scaling by ``invstd`` would cost
  more accuracy than everything else together; a ``mean`` that differs by more is used as given.
"""
# annotations kept as written, so that help() shows "ArrayLike", not its expansion
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._common import (ActivationName, BackendName, BackwardResult, ForwardResult, XArray,
                      stats_dtype, update_running_stats)
from ._validate import FORWARD_BETA, BackwardArgs, ForwardArgs, backward_args, forward_args


def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            axis: int = 1, training: bool = True,
            running_mean: NDArray[np.floating[Any]] | None = None,
            running_var: NDArray[np.floating[Any]] | None = None, momentum: float = 0.1,
            eps: float = 1e-5, activation: ActivationName | None = None,
            out: NDArray[Any] | None = None,
            backend: BackendName | None = None,
            unbiased_running_var: bool = True) -> ForwardResult:
    """Reference batch-norm forward; see :func:`fastbn.forward` for the contract."""
    args = forward_args(x, gamma, beta, axis, training, running_mean, running_var, momentum,
                        eps, activation, out, backend, unbiased_running_var)
    return forward_checked(args)


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, beta: ArrayLike | None = FORWARD_BETA, *,
             axis: int = 1,
             training: bool = True, activation: ActivationName | None = None,
             out: NDArray[Any] | None = None,
             backend: BackendName | None = None) -> BackwardResult:
    """Reference batch-norm backward; see :func:`fastbn.backward` for the contract."""
    args = backward_args(dy, x, mean, invstd, gamma, beta, axis, training, activation, out,
                         backend)
    return backward_checked(args)


def _channels_last64(arr: XArray, axis: int) -> NDArray[np.float64]:
    return np.moveaxis(arr, axis, -1).astype(np.float64)


def _write(result64: NDArray[np.float64], args: ForwardArgs | BackwardArgs,
           like: XArray) -> XArray:
    """Cast a channels-last float64 result back to x's layout and dtype (into out if given)."""
    result = np.moveaxis(result64, -1, args.axis).astype(like.dtype)
    if args.out is None:
        return result
    np.copyto(args.out, result)
    return args.out


def forward_checked(args: ForwardArgs) -> ForwardResult:
    """Forward on validated arguments (a :class:`fastbn._validate.ForwardArgs`)."""
    x64 = _channels_last64(args.x, args.axis)
    over = tuple(range(x64.ndim - 1))
    if args.training:
        mean = x64.mean(axis=over)
        var = np.square(x64 - mean).mean(axis=over)
    else:  # validation made sure that eval mode has running statistics
        assert args.running_mean is not None and args.running_var is not None
        mean = args.running_mean.astype(np.float64)
        var = args.running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + args.eps)
    gamma = 1.0 if args.gamma is None else args.gamma.astype(np.float64)
    beta = 0.0 if args.beta is None else args.beta.astype(np.float64)
    y64 = (x64 - mean) * (gamma * invstd) + beta
    if args.activation == "relu":
        y64 = np.where(y64 > 0, y64, np.where(np.isnan(y64), y64, 0.0))
    y = _write(y64, args, args.x)
    if args.training:
        update_running_stats(args, mean, var)
    sdt = stats_dtype(args.x.dtype)
    return ForwardResult(y, mean.astype(sdt), invstd.astype(sdt))


def backward_checked(args: BackwardArgs) -> BackwardResult:
    """Backward on validated arguments (a :class:`fastbn._validate.BackwardArgs`)."""
    x64 = _channels_last64(args.x, args.axis)
    dy64 = _channels_last64(args.dy, args.axis)
    over = tuple(range(x64.ndim - 1))
    mean = args.mean.astype(np.float64)
    invstd = args.invstd.astype(np.float64)
    if args.training:
        batch_mean = x64.mean(axis=over)
        mean = np.where(np.abs(batch_mean - mean) <= args.mean_ulp, batch_mean, mean)
    xhat = (x64 - mean) * invstd
    gamma = 1.0 if args.gamma is None else args.gamma.astype(np.float64)
    if args.activation == "relu":  # the gradient passes where the forward's output was > 0
        beta = 0.0 if args.beta is None else args.beta.astype(np.float64)
        dy64 = np.where(xhat * gamma + beta > 0, dy64, 0.0)
    dbeta = dy64.sum(axis=over)
    dgamma = (dy64 * xhat).sum(axis=over)
    if args.training:
        dx64 = (gamma * invstd / args.m) * (args.m * dy64 - dbeta - xhat * dgamma)
    else:
        dx64 = (gamma * invstd) * dy64
    dx = _write(dx64, args, args.x)
    sdt = stats_dtype(args.x.dtype)
    return BackwardResult(dx, dgamma.astype(sdt), dbeta.astype(sdt))
