"""Backend choice and threads: which compiled backend runs, how many threads a kernel launch
gets, and the launch itself.

- the backend: the ``backend`` argument, else ``$FASTBN_BACKEND``, else the fastest available
  (see :func:`resolve_backend`). The two compiled backends, Numba
  (:mod:`fastbn._numba_kernels`) and Cython (``fastbn._cy_kernels``, optional), expose the same
  kernels under the same names and arguments, each launched as ``kernel(threads, *args)``;
- threads: one process-wide count (:func:`set_num_threads`), and per launch the serial twin
  below a size (PARALLEL_MIN_BYTES, from crossovers measured on 2 cores), since small arrays do not pay for waking threads;
- launching: one OpenMP team at a time, and serial kernels in a child forked after the parent
  used OpenMP (see :func:`_cython_launch`).
"""
import contextlib
import importlib.util
import numbers
import os
import sys
import threading

import numpy as np

from ._validate import BACKENDS

BACKEND_ENV = "FASTBN_BACKEND"
THREADS_ENV = "FASTBN_NUM_THREADS"

_KiB = 1024
#: From how many bytes of x a kernel ran faster on a team of two threads than on the calling
#: thread alone, by (backend, family, op), measured with ``python -m fastbn.bench --crossover``
#: on the 2-core machine with a 32 MiB last-level cache (bench/README.md has the table): the
#: smallest size tried from which the team was not slower at any larger size, over NCHW
#: (feature-outer) and NC and NHWC (feature-inner) scans; Cython's are the median of three
#: scans made after its serial kernels got faster (waking the team measured 4-6 us). Numba's feature-inner kernels pay 20-40 us for their team, hence a far higher
#: crossover. Half-precision conversions use the "inner", "eval" figure (one elementwise pass).
#: :func:`parallel_min_bytes` carries them to other core counts and caches.
CROSSOVER_2_CORES_BYTES = {
    ("cython", "outer", "forward"): 128 * _KiB,
    ("cython", "outer", "eval"): 512 * _KiB,
    ("cython", "outer", "backward"): 128 * _KiB,
    ("cython", "inner", "forward"): 512 * _KiB,
    ("cython", "inner", "eval"): 512 * _KiB,
    ("cython", "inner", "backward"): 512 * _KiB,
    ("numba", "outer", "forward"): 256 * _KiB,
    ("numba", "outer", "eval"): 512 * _KiB,
    ("numba", "outer", "backward"): 128 * _KiB,
    ("numba", "inner", "forward"): 1024 * _KiB,
    ("numba", "inner", "eval"): 1024 * _KiB,
    ("numba", "inner", "backward"): 512 * _KiB,
}


def parallel_min_bytes(cores, cache_bytes):
    """The crossover table for a machine of ``cores`` CPUs and a last-level cache of
    ``cache_bytes``: CROSSOVER_2_CORES_BYTES carried over by two rules, each of which leaves the
    2-core, 32 MiB figures as they were measured.

    - Cores: a team of p threads saves (1 - 1/p) of the serial time t(n) = n / r and costs a
      fixed t_team to wake and join, so it wins from n* = t_team * r * p / (p - 1); relative to
      the measured p = 2, n*(p) = n*(2) * p / (2 (p - 1)): the same at 2, 0.57x at 8, half at
      many cores. This keeps t_team fixed; on large machines waking more threads costs more,
      which the scan there should check (bench/README.md, "Serial or parallel").
    - Cache: once x and its output (forward, eval), or x, dy and dx (backward), exceed one
      core's share of the last-level cache (cache_bytes / cores), one thread streams them from
      memory at one core's bandwidth, which a team multiplies: the team wins from there
      whatever the count above says. On the 2-core machine that cap is 8 MiB (5.3 MiB for
      backward), above every measured crossover, so it changes nothing there.
    """
    cores = max(2, int(cores))
    table = {}
    for (backend, family, op), measured in CROSSOVER_2_CORES_BYTES.items():
        by_cores = measured * cores // (2 * (cores - 1))
        arrays = 3 if op == "backward" else 2
        table[backend, family, op] = max(1, min(by_cores, cache_bytes // (arrays * cores)))
    return table


#: None: by size, as above. True or False: every kernel on the team, or on the calling thread
#: (see :func:`forced_parallel`).
_forced = None

_available = None
_cython_kernels = None


def _import_cython():
    """The compiled Cython module, or None where it was not built (or cannot load)."""
    global _cython_kernels
    if _cython_kernels is None:
        try:
            from . import _cy_kernels
        except ImportError:
            _cython_kernels = False
        else:
            _cy_kernels.stream_min_bytes(last_level_cache_bytes() * 3 // 4)
            _cython_kernels = _cy_kernels
    return _cython_kernels or None


def _no_call_path(*args):
    return None


def import_call_path():
    """The compiled Cython module, for its call path, with the backends listed (so that it
    knows the default); None where it was not built."""
    kernels = _import_cython()
    available_backends()
    return kernels


def call_path():
    """(forward, backward) of the compiled call path of the Cython extension
    (``fast_forward`` and ``fast_backward`` in ``_cy_call.pxi``), or two functions that return
    None where it was not built: each takes the public function's arguments, all of them, and
    returns its result for a common call, or None, and then the Python path runs."""
    kernels = import_call_path()
    if kernels is None:
        return _no_call_path, _no_call_path
    return kernels.fast_forward, kernels.fast_backward


def last_level_cache_bytes(default=32 * 2**20):
    """The largest cache of CPU 0 (Linux sysfs; ``default`` elsewhere). The Cython
    feature-inner kernels (and the feature-outer eval normalize) write outputs of at least 3/4
    of it with non-temporal stores, glibc's rule for memcpy: such an output mostly cannot stay
    in cache for its consumer anyway, and streaming saves its read-for-ownership (NHWC
    32x56x56x64, 25.7 MB with a 32 MiB L3: eval 0.87x -> 0.73x the copy, forward 1.56x ->
    1.50x; NCHW 64x128x56x56 eval 5.0 -> 4.6 ms). Smaller outputs keep regular stores,
    which leave part of them in cache for the next operation. In a ResNet-block step the two
    choices could not be told apart (+-10 ms noise between identical configurations over
    21-25 interleaved steps). glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reported 384 MiB on the
    test VM (the socket's), hence sysfs (32 MiB there)."""
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or default


def available_backends():
    """Names of the backends that can run here: the compiled ones, the default first, then
    "reference"."""
    global _available
    if _available is None:
        names = []
        if _import_cython() is not None:
            names.append("cython")
        if importlib.util.find_spec("numba") is not None:
            names.append("numba")
        names.append("reference")
        _available = tuple(names)
    return _available


def resolve_backend(backend):
    """The backend to use: the argument, else $FASTBN_BACKEND, else the default (see
    :func:`default_backend`)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must name a backend of {available_backends()}, "
                             f"got {backend!r}")
    if backend is None:
        return default_backend()
    if backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: "
                         f"{available_backends()} (run 'python -m fastbn' to see why)")
    return backend


def default_backend():
    """The fastest available backend, as ``python -m fastbn.bench`` measured it (README,
    "Backends"): Cython where it was built (0.46-0.98x Numba's time on the float32 cases at 2
    threads, 0.67-1.03x on one, no compile on first call), for every dtype: with the CPU's
    float16 conversion instructions in both, float16 calls take the same time on either
    (NCHW 32x64x56x56, interleaved: forward 7.32 / 7.32 ms, eval 4.17 / 3.93, backward
    10.80 / 10.50 on one thread)."""
    return available_backends()[0]


# --- kernel modules --------------------------------------------------------------------------

_numba_kernels = None


def _kernels(backend):
    """The kernel module of a compiled backend, imported on first use so that ``import
    fastbn`` stays light (and never loads Numba when the Cython backend is used)."""
    global _numba_kernels
    if backend == "cython":
        return _import_cython()
    if _numba_kernels is None:
        from . import _numba_kernels as module

        _numba_kernels = module
    return _numba_kernels


# --- threads -------------------------------------------------------------------------------------
# fastbn's thread count is one process-wide number, set by set_num_threads() (initially from
# $FASTBN_NUM_THREADS, else every CPU this process may run on), and passed to every kernel
# launch of either backend. Numba's own setting is per calling thread: its kernels apply ours
# for the launch and give the caller's back (fastbn._numba_jit._Kernel); the Cython
# kernels pass it to OpenMP as num_threads.

_num_threads = None


def thread_limit():
    """The most threads a kernel may use: the size of Numba's thread pool, NUMBA_NUM_THREADS,
    found without importing Numba (by Numba's own rule) unless it is already loaded."""
    if "numba" in sys.modules:
        return sys.modules["numba"].config.NUMBA_NUM_THREADS
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: From how many bytes of x a kernel runs on the thread team rather than on the calling thread
#: alone, by (backend, family, op); see :func:`launch_threads`. The measured 2-core crossovers
#: carried to this machine's CPUs and last-level cache (:func:`parallel_min_bytes`): on the
#: 2-core machine they are the measured figures themselves.
PARALLEL_MIN_BYTES = parallel_min_bytes(thread_limit(), last_level_cache_bytes())


def _check_threads(n, name):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {n!r}")
    limit = thread_limit()
    if not 1 <= int(n) <= limit:
        raise ValueError(f"{name} must be between 1 and {limit} (NUMBA_NUM_THREADS, the size of "
                         f"Numba's thread pool), got {n}")
    return int(n)


def set_num_threads(n):
    """Set how many threads fastbn's kernels use, for calls from every Python thread."""
    global _num_threads
    _num_threads = _check_threads(n, "n")


def get_num_threads():
    """How many threads fastbn's kernels use."""
    global _num_threads
    if _num_threads is None:
        env = os.environ.get(THREADS_ENV)
        _num_threads = (thread_limit() if not env else
                        _check_threads(int(env) if env.strip().isdigit() else env, THREADS_ENV))
    return _num_threads


_forked_child = False


def _after_fork_in_child():
    # See _cython_launch. Numba's TBB layer is fork-safe and needs nothing.
    global _forked_child, _team_lock
    _forked_child = True
    _team_lock = threading.Lock()  # it may have been held by a thread that did not fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def launch_threads(backend, family, op, nbytes):
    """Threads for one kernel launch: fastbn's thread count, or 1 below the measured crossover
    (PARALLEL_MIN_BYTES), where waking the team costs more than it saves. ``family`` is
    "outer" or "inner", ``op`` "forward", "eval" or "backward"."""
    parallel = nbytes >= PARALLEL_MIN_BYTES[backend, family, op] if _forced is None else _forced
    return get_num_threads() if parallel else 1


@contextlib.contextmanager
def forced_parallel(parallel):
    """Within the block, every kernel runs on the thread team (True) or on the calling thread
    (False) whatever its size: for the crossover scan, precompilation and the tests."""
    global _forced
    before, _forced = _forced, bool(parallel)
    try:
        yield
    finally:
        _forced = before


def _launch(backend, threads, kern, *args):
    """Run a kernel of ``backend`` on ``threads`` threads (see :func:`launch_threads`)."""
    if threads > 1 and backend == "cython":
        return _cython_launch(kern, threads, *args)
    return kern(threads, *args)


#: Held while a Cython kernel runs an OpenMP team.
_team_lock = threading.Lock()


def _cython_launch(kern, threads, *args):
    """GNU OpenMP gives each calling thread a team of its own, so eight Python threads
    launching at once would run 8 x n threads on n cores. One team runs at a time: a caller
    that finds the lock taken runs its kernel on its own thread instead of waiting (the same
    bits: see _chunks). A child forked after the parent used OpenMP runs on one thread too:
    GNU OpenMP's pool does not survive fork, and its first parallel region could hang."""
    if _forked_child or not _team_lock.acquire(blocking=False):
        return kern(1, *args)
    try:
        return kern(threads, *args)
    finally:
        _team_lock.release()
