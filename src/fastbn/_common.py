"""What every backend shares after its kernels ran: the result tuples and the update of the
running statistics (done once, here, so that all backends follow PyTorch's convention alike)."""
from typing import NamedTuple

import numpy as np


class ForwardResult(NamedTuple):
    """``y`` (x's shape and dtype), and the per-feature ``mean`` and ``invstd`` used."""

    y: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray


class BackwardResult(NamedTuple):
    """``dx`` (x's shape and dtype), ``dgamma`` and ``dbeta`` (C,)."""

    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray


def stats_dtype(x_dtype):
    """dtype of mean/invstd/dgamma/dbeta: float64 for float64 input, float32 otherwise."""
    return np.dtype(np.float64) if x_dtype == np.float64 else np.dtype(np.float32)


def update_running_stats(args, batch_mean, batch_var):
    """PyTorch's update, ``r = (1 - momentum) * r + momentum * batch``, with the unbiased batch
    variance. Both new vectors are computed (in float64) before either is written, and the two
    writes cannot fail once validation passed, so the statistics are never half-updated."""
    if args.running_mean is None:
        return
    momentum = args.momentum
    unbiased = batch_var * (args.m / (args.m - 1))
    new_mean = (1.0 - momentum) * args.running_mean.astype(np.float64) + momentum * batch_mean
    new_var = (1.0 - momentum) * args.running_var.astype(np.float64) + momentum * unbiased
    args.running_mean[...] = new_mean
    args.running_var[...] = new_var
