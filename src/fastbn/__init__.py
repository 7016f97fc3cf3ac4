"""fastbn: fast, accurate batch normalization on the CPU.

``forward`` and ``backward`` run fused, parallel Numba kernels; :mod:`fastbn.reference` is their
plain NumPy twin (float64 inside). Importing fastbn does not import Numba: the kernels load,
and compile or come from the on-disk cache, on the first call.
"""
from . import phases, reference
from ._common import BackwardResult, ForwardResult
from .api import available_backends, backward, forward, get_num_threads, set_num_threads
from .layers import BatchNorm

__version__ = "0.1.0"
__all__ = ["forward", "backward", "BatchNorm", "available_backends", "set_num_threads",
           "get_num_threads", "ForwardResult", "BackwardResult", "phases", "reference",
           "__version__"]
