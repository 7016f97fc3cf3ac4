"""How Flax and Keras count a batch-norm layer's running statistics, in fastbn's terms.

fastbn (as PyTorch) updates ``r = (1 - momentum) * r + momentum * batch`` with the unbiased
batch variance. Flax's ``BatchNorm`` and Keras' ``BatchNormalization`` update
``r = momentum * r + (1 - momentum) * batch`` with the biased one: their ``momentum`` is the
weight of the old value (a decay). The translation lives here, once, with no framework
imported, and every adapter that imitates those layers uses it.
"""
import math
from typing import NamedTuple

from ._validate import as_real


class RunningUpdate(NamedTuple):
    """Keywords of :func:`fastbn.forward` that give a layer's running-statistics update."""

    momentum: float
    unbiased_running_var: bool


def decay_convention(decay):
    """fastbn's keywords for a Flax/Keras ``momentum`` (the weight of the old running value):
    ``momentum = 1 - decay`` and the biased batch variance.

    ``1 - decay`` is exact for decay in [0.5, 1] (Sterbenz), so fastbn's float64 update
    multiplies the old value by exactly ``decay``, as the frameworks do.

    Raises
    ------
    TypeError
        decay is not a real number.
    ValueError
        decay is not finite or outside [0, 1].

    Examples
    --------
    >>> decay_convention(0.99)
    RunningUpdate(momentum=0.010000000000000009, unbiased_running_var=False)
    """
    decay = as_real(decay, "momentum")
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {decay}")
    return RunningUpdate(1.0 - decay, False)


def biased_variance(unbiased_var, m):
    """The biased batch variance from the unbiased one of ``m`` values per feature (works on
    any array type with ``*``): for backends whose kernels hand back only the unbiased one."""
    return unbiased_var * ((m - 1) / m)
