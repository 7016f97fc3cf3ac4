"""How fastbn's Numba kernels are compiled: the threading layer, the fast-math flag sets, and
the two decorators (``_helper`` for the serial helpers, ``kernel`` for the kernels, each
compiled twice: parallel and serial). Every JIT option of the Numba backend is set here.
"""
import threading
import types

import numba
from numba import njit

from . import _numba_layer


# --- threading layer --------------------------------------------------------------------------
# TBB (thread- and fork-safe), loaded wherever pip put it; else workqueue behind the launch
# lock, never GNU OpenMP. See fastbn._numba_layer.
_numba_layer.choose(numba.config)

#: Held around parallel launches only when the active layer is not thread-safe (workqueue).
_launch_lock = threading.Lock()
_threadsafe_layer = False

REDUCTION_FLAGS = {"reassoc", "contract", "nsz", "arcp"}
ELEMENTWISE_FLAGS = {"contract"}
_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


def _helper(fastmath):
    """Decorator for the serial per-run helpers that the kernels call."""
    return njit(fastmath=fastmath, **_OPTIONS)


class _Kernel:
    """A kernel compiled twice: ``.parallel`` (prange runs on threads) and ``.serial``.
    Called as ``kernel(threads, *args)``, as the Cython kernels are: one thread runs the serial
    twin, more run the parallel one on that many of Numba's threads.

    The serial twin is a copy of the Python function under another qualified name, because
    Numba's on-disk cache is keyed by name and signature, not by the ``parallel`` option."""

    def __init__(self, fn):
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.parallel = njit(parallel=True, **_OPTIONS)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        self.serial = njit(parallel=False, **_OPTIONS)(twin)

    def __call__(self, threads, *args):
        global _threadsafe_layer
        if threads == 1 or _numba_layer.serial_only():
            return self.serial(*args)
        # Numba's thread count is per calling thread: apply ours, give the caller's back.
        callers = numba.get_num_threads()
        if callers != threads:
            numba.set_num_threads(threads)
        try:
            if _threadsafe_layer:
                return self.parallel(*args)
            # Until we know the active threading layer is thread-safe (it is not when a user
            # forced "workqueue"), parallel launches are serialized.
            with _launch_lock:
                result = self.parallel(*args)
                _threadsafe_layer = numba.threading_layer() in ("tbb", "omp")
                return result
        finally:
            if callers != threads:
                numba.set_num_threads(callers)


def kernel(fn):
    return _Kernel(fn)
