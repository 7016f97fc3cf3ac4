"""What every backend shares after its kernels ran: the result tuples and the update of the
running statistics (done once, here, so that all backends follow the same convention)."""
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ._validate import ForwardArgs

#: The ``activation`` argument's values besides None.
ActivationName = Literal["relu"]
#: The ``backend`` argument's values besides None.
BackendName = Literal["numba", "cython", "reference"]
#: An array of x's dtype: float16, float32, float64 or ml_dtypes' bfloat16 (which NumPy does
#: not count among its floating types, hence ``Any``).
XArray = NDArray[Any]
#: Per-feature statistics and gradients: float64 for float64 x, float32 otherwise.
StatsArray = NDArray[np.float32 | np.float64]


class ForwardResult(NamedTuple):
    """``y`` (x's shape and dtype), and the per-feature ``mean`` and ``invstd`` used."""

    y: XArray
    mean: StatsArray
    invstd: StatsArray


class BackwardResult(NamedTuple):
    """``dx`` (x's shape and dtype), ``dgamma`` and ``dbeta`` (C,)."""

    dx: XArray
    dgamma: StatsArray
    dbeta: StatsArray


def stats_dtype(x_dtype: np.dtype[Any]) -> np.dtype[np.float32 | np.float64]:
    """dtype of mean/invstd/dgamma/dbeta: float64 for float64 input, float32 otherwise."""
    return np.dtype(np.float64) if x_dtype == np.float64 else np.dtype(np.float32)


def update_running_stats(args: "ForwardArgs", batch_mean: NDArray[np.float64],
                         batch_var: NDArray[np.float64]) -> None:
    """The update ``r = (1 - momentum) * r + momentum * batch``, the batch variance multiplied by
    ``args.running_var_factor`` (``m / (m - 1)``, the unbiased variance, as PyTorch; 1.0 for
    the biased one, as Flax and Keras, whose ``momentum`` is ``1 -`` this one). Both new
    vectors are computed (in float64) before either is written, and the two
    writes cannot fail once validation passed, so the statistics are never half-updated."""
    running_mean, running_var = args.running_mean, args.running_var
    if running_mean is None or running_var is None:
        return
    momentum = args.momentum
    unbiased = batch_var * args.running_var_factor
    new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * batch_mean
    new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
    running_mean[...] = new_mean
    running_var[...] = new_var
