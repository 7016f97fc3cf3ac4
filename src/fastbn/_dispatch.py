"""Backend choice, the (A, C, B) view of x, and the calls into the kernels.

Arguments arrive here already validated (:mod:`fastbn._validate`). This module decides:
- the backend: the ``backend`` argument, else ``$FASTBN_BACKEND``, else the fastest available
  (see :func:`resolve_backend`). The two compiled backends, Numba
  (:mod:`fastbn._numba_kernels`) and Cython (``fastbn._cy_kernels``, optional), expose the same
  kernels under the same names and arguments, each launched as ``kernel(threads, *args)``; the
  code below drives either;
- the view: x's axes are ordered as (axes with stride larger than the feature axis's, feature,
  the others) and folded into ``(A, C, B)`` without a copy. Only an input whose outer or inner
  axes cannot be merged into one strided axis each (say ``x[:, :, ::2, :]`` of an NCHW array) is
  copied once, into that order; outputs are allocated in x's own memory order;
- the kernel family (feature-outer for runs of INNER_MAX_RUN values or more, feature-inner
  otherwise), and whether to run the parallel or the serial twin (small arrays do not pay for
  waking threads);
- half-precision inputs, which go through float32 (see the end of this module).
"""
import contextlib
import importlib.util
import math
import numbers
import os
import sys
import threading

import numpy as np

from . import reference
from ._validate import BACKENDS, as_param, is_half
from ._common import BackwardResult, ForwardResult, stats_dtype, update_running_stats

BACKEND_ENV = "FASTBN_BACKEND"
THREADS_ENV = "FASTBN_NUM_THREADS"

_KiB = 1024
#: From how many bytes of x a kernel runs on the thread team rather than on the calling thread
#: alone, by (backend, family, op); see :func:`launch_threads`. Measured with ``python -m
#: fastbn.bench --crossover`` on the 2-core machine (bench/README.md has the table): the
#: smallest size tried from which the team was not slower at any larger size, over NCHW
#: (feature-outer) and NC and NHWC (feature-inner) scans; Cython's are the median of three
#: scans of the fourth session (its serial kernels got faster, and waking the team measured 4-6
#: us). Numba's feature-inner kernels pay 20-40 us for their team, hence a far higher
#: crossover. Half-precision conversions use the "inner", "eval" figure (one elementwise pass).
PARALLEL_MIN_BYTES = {
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
#: None: by size, as above. True or False: every kernel on the team, or on the calling thread
#: (see :func:`forced_parallel`).
_forced = None

#: Feature-inner kernels split rows into at most MAX_CHUNKS blocks of at least CHUNK_MIN_BYTES.
MAX_CHUNKS = 64
CHUNK_MIN_BYTES = 64 * 1024
#: ... and of at least this many rows, so that the per-block partial sums (float64, one row of
#: them per block) stay small next to the data.
CHUNK_MIN_ROWS = 32
#: Runs shorter than this (values of one feature that are contiguous) use the feature-inner
#: family; longer ones the feature-outer family, which reuses each feature's data in cache.
INNER_MAX_RUN = 64
#: Feature-inner views put k samples side by side until rows are this many values wide.
TILE_COLUMNS = 1024

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


def last_level_cache_bytes(default=32 * 2**20):
    """The largest cache of CPU 0 (Linux sysfs; ``default`` elsewhere). The Cython
    feature-inner kernels write outputs of at least 3/4 of it with non-temporal stores, glibc's
    rule for memcpy: such an output mostly cannot stay in cache for its consumer anyway, and
    streaming saves its read-for-ownership (NHWC 32x56x56x64, 25.7 MB with a 32 MiB L3: eval
    0.87x -> 0.73x the copy, forward 1.56x -> 1.50x). Smaller outputs keep regular stores,
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
                         f"{available_backends()}")
    return backend


def default_backend():
    """The fastest available backend, as ``python -m fastbn.bench`` measured it (README,
    "Backends"): Cython where it was built (0.46-0.98x Numba's time on the float32 cases at 2
    threads, 0.67-1.03x on one, no compile on first call), for every dtype: with the CPU's
    float16 conversion instructions in both, float16 calls take the same time on either
    (NCHW 32x64x56x56, interleaved: forward 7.32 / 7.32 ms, eval 4.17 / 3.93, backward
    10.80 / 10.50 on one thread)."""
    return available_backends()[0]


# --- the (A, C, B) view ------------------------------------------------------------------------

def fold_plan(x, axis, broadcast_outer=False):
    """Order of x's axes, (A axes..., feature, B axes...), and the folded shape (A, C, B).
    With ``broadcast_outer``, stride-0 axes (np.broadcast_to) go to A, where the kernels take
    any stride: they cannot merge with a strided axis anywhere else."""
    shape, strides = x.shape, x.strides
    C = shape[axis]
    others = [i for i in range(x.ndim) if i != axis]
    trivial = [i for i in others if shape[i] <= 1]
    # By decreasing |stride|, so that C-, F- and channels-last orders all fold without a copy.
    sized = sorted((i for i in others if shape[i] > 1), key=lambda i: -abs(strides[i]))
    if broadcast_outer:
        trivial += [i for i in sized if strides[i] == 0]
        sized = [i for i in sized if strides[i] != 0]
    if C > 1:
        outer = [i for i in sized if abs(strides[i]) > abs(strides[axis])]
        inner = [i for i in sized if abs(strides[i]) <= abs(strides[axis])]
    else:
        outer, inner = [], sized
    perm = trivial + outer + [axis] + inner
    A = math.prod(shape[i] for i in trivial + outer)
    B = math.prod(shape[i] for i in inner)
    return perm, (A, C, B)


def _fold(arr, perm, shape):
    """arr with its axes in order ``perm``, reshaped to ``shape`` without a copy, or None."""
    try:
        return np.reshape(arr.transpose(perm), shape, copy=False)
    except ValueError:
        return None


def _tile_factor(A, width):
    """How many rows of a feature-inner view to put side by side, so that rows are at least
    TILE_COLUMNS wide (short rows leave the vector loops mostly in their prologue): the largest
    divisor k of A with k * width <= TILE_COLUMNS."""
    for k in range(max(1, TILE_COLUMNS // max(width, 1)), 0, -1):
        if A % k == 0:
            return k
    return 1


class Plan:
    """Which kernel family runs, on which view of the arrays.

    ``shape`` is the view: (A/k, k*C*B) for the feature-inner family, where each row holds k
    samples' features side by side and column j belongs to feature (j // B) % C, or (A, C, B)
    for the feature-outer one. ``perm`` orders x's axes for that view (None: as they are)."""

    __slots__ = ("perm", "shape", "inner", "B")

    def view_of(self, arr):
        """arr (x, dy, out) as this plan's view, or None where that would need a copy."""
        if self.perm is None and arr.flags.c_contiguous:
            return arr.reshape(self.shape)
        return _fold(arr, self.perm or range(arr.ndim), self.shape)

    def input_view(self, arr):
        view = self.view_of(arr)
        if view is None:  # documented: the one case where an input is copied
            ordered = arr if self.perm is None else arr.transpose(self.perm)
            view = np.ascontiguousarray(ordered).reshape(self.shape)
        return view

    def output_view(self, out, like):
        """(result array, its view, whether the view is a temporary to copy into out)."""
        if out is not None:
            view = self.view_of(out)
            if view is not None:
                return out, view, False
        if self.perm is None:
            buf = np.empty(like.shape, dtype=like.dtype)
            return buf, buf.reshape(self.shape), out is not None
        buf = np.empty([like.shape[i] for i in self.perm], dtype=like.dtype)
        return buf.transpose(np.argsort(self.perm)), buf.reshape(self.shape), out is not None


_plans = {}
#: Plans depend on x's shape, strides and axis only; training loops repeat a few of them.
_PLAN_CACHE_SIZE = 256


def plan(x, axis):
    """Choose the family and view for x: the tiled feature-inner view if x folds into it,
    else the plain one, else the feature-outer (A, C, B) view (copying x only if even that
    fails). Short runs (B < INNER_MAX_RUN) go to the feature-inner family."""
    key = (x.shape, x.strides, axis)
    p = _plans.get(key)
    if p is None:
        p = _new_plan(x, axis)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.clear()
        _plans[key] = p
    return p


def _new_plan(x, axis):
    p = Plan()
    for broadcast_outer in (False, True):
        perm, (A, C, B) = fold_plan(x, axis, broadcast_outer)
        p.perm = tuple(perm)
        p.B = B
        candidates = []
        if B < INNER_MAX_RUN:
            k = _tile_factor(A, C * B)
            candidates = [(True, (A // k, k * C * B)), (True, (A, C * B))]
        candidates.append((B == 1, (A, C * B) if B == 1 else (A, C, B)))
        for p.inner, p.shape in candidates:
            if p.view_of(x) is not None:
                break
        else:
            continue  # no view without a copy: try the other order
        break
    if p.perm == tuple(range(x.ndim)):
        p.perm = None
    return p


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
# for the launch and give the caller's back (fastbn._numba_kernels._Kernel); the Cython
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


def _chunks(rows, nbytes):
    """Row blocks of the feature-inner kernels. A function of the shape alone, never of the
    thread count, so that the summation order (hence every bit of the result) is the same for
    1 or 16 threads and for the serial and parallel twins."""
    return max(1, min(rows // CHUNK_MIN_ROWS, MAX_CHUNKS, nbytes // CHUNK_MIN_BYTES))


_KERNEL_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _vector64(arr):
    """A running statistic as the kernels take it: contiguous float64 (the other per-feature
    vectors arrive so from validation)."""
    return np.ascontiguousarray(arr, dtype=np.float64)


def _aligned_input(view):
    """The Cython kernels address elements, not bytes: a view whose data or strides are not
    multiples of its dtype's alignment (a field of a packed record array) is copied."""
    return view if view.flags.aligned else np.ascontiguousarray(view)


def _aligned_output(view):
    """(array the kernel writes, the view to copy it into afterwards or None)."""
    return (view, None) if view.flags.aligned else (np.empty(view.shape, view.dtype), view)


#: Feature-outer kernels read groups of adjacent features in memory order when runs are at
#: least GROUP_MIN_RUN_BYTES long, with up to GROUP_BYTES of data per group (served from L3 on
#: the second pass) and at least GROUPS_PER_THREAD groups per thread. Measured on NCHW float32
#: (2-core machine): 56x56 maps, forward 2.2x -> 1.6x a copy on one thread; 14x14 maps lose
#: 1.5x when grouped, since one feature (200 KB) then no longer stays in L2 between passes.
GROUP_MIN_RUN_BYTES = 4096
GROUP_BYTES = 8 * 2**20
GROUPS_PER_THREAD = 2


def _groups(shape3, itemsize, threads, budget=GROUP_BYTES):
    """How many groups of adjacent features the feature-outer kernels cut the C features of
    an (A, C, B) view into, group g being features g * C // n to (g + 1) * C // n: a multiple
    of ``threads`` (as far as C allows), so that the static schedule gives every thread the
    same number of features, give or take one. Groups of a fixed size did not: 64 features in
    groups of 10 were 40 against 24 on two threads, and the backward of NCHW 32x64x56x56 took
    2.50 ms against 2.13 ms balanced. Results do not depend on the grouping."""
    A, C, B = shape3
    if B * itemsize < GROUP_MIN_RUN_BYTES:
        return max(1, C)  # one feature per group
    by_cache = max(1, budget // max(1, A * B * itemsize))  # features per group at most
    per_thread = -(-C // threads)
    return max(1, min(C, threads * max(GROUPS_PER_THREAD, -(-per_thread // by_cache))))


def _update_running(K, args, stats):
    """The running-statistics update: compiled, or the NumPy twin for dtypes the kernels lack
    (float16, longdouble) or, in the Cython kernels, mixed or unaligned statistics."""
    if args.running_mean is None:
        return
    rm, rv = args.running_mean, args.running_var
    if rm.dtype in _KERNEL_FLOATS and rv.dtype in _KERNEL_FLOATS and (
            K is not _import_cython() or (rm.dtype == rv.dtype and rm.flags.aligned
                                          and rv.flags.aligned)):
        K.update_running_stats(rm, rv, stats, args.momentum, args.m)
    else:
        update_running_stats(args, stats[0], stats[1])


def _weight_bias(args, C, cython):
    weight = np.ones(C) if args.gamma is None else _for_backend(args.gamma, cython)
    bias = np.zeros(C) if args.beta is None else _for_backend(args.beta, cython)
    return weight, bias


def _for_backend(param, cython):
    """A validated per-feature vector (float32 or float64, see _validate.as_param) as the
    backend takes it: the Cython kernels read either, Numba's are compiled for float64."""
    return param if cython else _vector64(param)


def kernel_forward(backend, args):
    """forward on a compiled backend ("numba" or "cython")."""
    y, stats = _forward_into(backend, args)
    if args.training:
        _update_running(_kernels(backend), args, stats)
    both = stats[::2].astype(stats_dtype(args.x.dtype))  # one conversion for both
    return ForwardResult(y, both[0], both[1])  # indexed: unpacking an array costs 0.6 us


def _forward_into(backend, args):
    """(y, stats (3, C) float64: mean, var, invstd) of forward; running statistics untouched."""
    K = _kernels(backend)
    cython = backend == "cython"
    x, C = args.x, args.C
    p = plan(x, args.axis)
    x_v = p.input_view(x)
    y, y_v, copy_back = p.output_view(args.out, x)
    written = None
    if cython:
        x_v = _aligned_input(x_v)
        y_v, written = _aligned_output(y_v)
    weight, bias = _weight_bias(args, C, cython)
    coef = np.empty((4, p.shape[1] if p.inner else C), dtype=x.dtype)
    nchunks = _chunks(p.shape[0], x.nbytes)
    relu = args.activation == "relu"
    stats = np.empty((3, C))
    family = "inner" if p.inner else "outer"
    threads = launch_threads(backend, family, "forward" if args.training else "eval", x.nbytes)
    if args.training:
        if p.inner:
            _launch(backend, threads, K.forward_train_inner, x_v, y_v, weight, bias, args.eps,
                    stats, coef, nchunks, p.B, relu)
        else:
            _launch(backend, threads, K.forward_train_outer, x_v, y_v, weight, bias, args.eps,
                    stats, coef, relu, _groups(p.shape, x.itemsize, threads))
    else:
        rm, rv = args.running_mean, args.running_var  # any floating (C,) array: validated
        K.eval_coefficients(as_param(rm) if cython else _vector64(rm),
                            as_param(rv) if cython else _vector64(rv), weight, bias, args.eps,
                            stats, coef)
        if p.inner:
            K.tile_columns(coef, C, p.B)
            _launch(backend, threads, K.normalize_inner, x_v, y_v, coef, nchunks, relu)
        else:
            _launch(backend, threads, K.normalize_outer, x_v, y_v, coef, relu)
    if written is not None:
        np.copyto(written, y_v)
    if copy_back:
        np.copyto(args.out, y)
        y = args.out
    return y, stats


def kernel_backward(backend, args):
    """backward on a compiled backend ("numba" or "cython")."""
    dx, grads = _backward_into(backend, args)
    both = grads.astype(stats_dtype(args.x.dtype))
    return BackwardResult(dx, both[0], both[1])


def _backward_into(backend, args):
    """(dx, grads (2, C) float64: dgamma, dbeta) of backward."""
    K = _kernels(backend)
    cython = backend == "cython"
    x, C = args.x, args.C
    p = plan(x, args.axis)
    dx, dx_v, copy_back = p.output_view(args.out, x)
    grads = np.zeros((2, C))
    if args.m > 0:  # eval mode allows an empty batch: dx is empty and the sums are zero
        x_v = p.input_view(x)
        dy_v = p.input_view(args.dy)
        written = None
        if cython:
            x_v, dy_v = _aligned_input(x_v), _aligned_input(dy_v)
            dx_v, written = _aligned_output(dx_v)
        weight, bias = _weight_bias(args, C, cython)
        mean, invstd = _for_backend(args.mean, cython), _for_backend(args.invstd, cython)
        width = p.shape[1] if p.inner else C
        coef = np.empty((5, width), dtype=x.dtype)
        nchunks = _chunks(p.shape[0], x.nbytes)
        threads = launch_threads(backend, "inner" if p.inner else "outer", "backward",
                                 x.nbytes)
        if args.activation == "relu":
            # the forward's coefficients, rebuilt to find its mask
            fcoef = np.empty((4, width), dtype=x.dtype)
            common = (mean, _for_backend(args.mean_ulp, cython), invstd, weight, bias,
                      args.training, grads, coef, fcoef)
            if p.inner:
                _launch(backend, threads, K.backward_relu_inner, dy_v, x_v, dx_v, *common,
                        nchunks, p.B)
            else:
                _launch(backend, threads, K.backward_relu_outer, dy_v, x_v, dx_v, *common)
        else:
            common = (mean, _for_backend(args.mean_ulp, cython), invstd, weight,
                      args.training, grads, coef)
            if p.inner:
                _launch(backend, threads, K.backward_inner, dy_v, x_v, dx_v, *common, nchunks,
                        p.B)
            else:
                # backward reads two arrays where forward reads one: half the budget
                _launch(backend, threads, K.backward_outer, dy_v, x_v, dx_v, *common,
                        _groups(p.shape, x.itemsize, threads, GROUP_BYTES // 2))
        if written is not None:
            np.copyto(written, dx_v)
    if copy_back:
        np.copyto(args.out, dx)
        dx = args.out
    return dx, grads


# --- half precision ------------------------------------------------------------------------------
# The kernels have no float16/bfloat16 arithmetic: half inputs run through the float32 kernels,
# with float32 statistics as PyTorch computes them on the CPU, and the result is rounded back.
# On the Cython backend, where the views have contiguous runs (rows):
# - inference needs no statistics: normalize_half converts, normalizes and rounds back a chunk
#   at a time in one pass over the half data, on either family;
# - training on feature-outer views (NCHW, NCL, ...): forward_train_half_outer and
#   backward_half_outer convert each thread's group of features into float32 scratch that
#   stays in cache, run the float32 steps on it and round the output back, so memory sees x
#   (and dy) read once and the output written once, in half; the backward of ReLU goes a slice
#   of features at a time through the float32 kernels instead (convert_runs). Statistics are
#   per feature and the sums do not depend on grouping;
# - training on feature-inner views (NHWC, NC): forward_train_half_inner and
#   backward_half_inner run the float32 row loops on chunks of up to four rows converted on
#   the fly, in those loops' own blocks (two passes over the half data, as float32 makes two).
# Every result has the bits of the whole-array path below. Otherwise (the ReLU backward of
# feature-inner views, Numba, views that need a copy) whole arrays are converted to float32
# (in their own memory order, by parallel conversion kernels): float32 temporaries of x, dy in
# backward, and the output, up to 6x the bytes of x.

#: Float32 scratch per thread for one group or slice of features. Measured for slices (x's; the
#: output's, and dy's in backward, as much again) on float16 NCHW 32x64x56x56 and 64x128x28x28,
#: 256 KiB to 4 MiB: 2 MiB was best or within 10% of it on one and two threads (smaller slices
#: pay more calls; larger ones fall out of cache).
HALF_SLICE_BYTES_PER_THREAD = 2 * 2**20


def _half_plan(backend, args):
    """x's plan when a backward on half data may take the fused or sliced paths (Cython, a
    non-empty batch), else None."""
    if backend != "cython" or args.m == 0:
        return None
    return plan(args.x, args.axis)


def _half_slices(shape3, threads):
    """Feature ranges (c0, c1) of the slices of an (A, C, B) view."""
    A, C, B = shape3
    per_feature = 4 * A * B
    width = max(threads, threads * HALF_SLICE_BYTES_PER_THREAD // max(per_feature, 1))
    return [(c0, min(C, c0 + width)) for c0 in range(0, C, width)]


def _slice_args(args, c0, c1, **arrays):
    """A copy of backward's args for features c0..c1 of a float32 (A, C, B) scratch:
    per-feature vectors sliced, axis 1, and ``arrays`` (x, dy, out: the scratch views) set."""
    sub = type(args)()
    for name in type(args).__slots__:
        value = getattr(args, name)
        if name in ("gamma", "beta", "mean", "invstd", "mean_ulp") and value is not None:
            value = value[c0:c1]
        setattr(sub, name, value)
    sub.axis, sub.C = 1, c1 - c0
    for name, value in arrays.items():
        setattr(sub, name, value)
    return sub


def _unit_stride_bits(view):
    """A half view as uint16 bits, or None where its last axis (runs of (A, C, B), rows of
    (A, L)) is not contiguous and aligned."""
    if view is None or view.strides[-1] != view.itemsize or not view.flags.aligned:
        return None
    return view.view(np.uint16)


def _backward_half_sliced(backend, args, p):
    """Backward of ReLU on half x and dy of a feature-outer plan, through float32 slices of
    features (convert_runs, the float32 kernels, convert_runs back), or None where a view does
    not allow it (nothing written then)."""
    names = ("x", "dy")
    bits = [_unit_stride_bits(p.view_of(getattr(args, name))) for name in names]
    dx, dx_view, copy_back = p.output_view(args.out, args.x)
    dx_bits = _unit_stride_bits(dx_view)
    if dx_bits is None or any(b is None for b in bits):
        return None
    K = _kernels(backend)
    brain = args.x.dtype.name == "bfloat16"
    A, C, B = p.shape
    slices = _half_slices(p.shape, get_num_threads())
    width = slices[0][1] - slices[0][0]
    scratch = [np.empty((A, width, B), np.float32) for _ in range(len(names) + 1)]
    grads = np.empty((2, C))
    for c0, c1 in slices:
        parts = [s[:, :c1 - c0] for s in scratch]  # x's, dy's, then dx's
        threads = launch_threads(backend, "outer", "eval", parts[0].nbytes)
        for src, part in zip(bits, parts):
            _launch(backend, threads, K.convert_runs, src[:, c0:c1], part, brain)
        sub = _slice_args(args, c0, c1, out=parts[-1], **dict(zip(names, parts)))
        _, grads[:, c0:c1] = _backward_into(backend, sub)
        _launch(backend, threads, K.convert_runs, parts[-1], dx_bits[:, c0:c1], brain)
    if copy_back:
        np.copyto(args.out, dx)
        dx = args.out
    both = grads.astype(np.float32)
    return BackwardResult(dx, both[0], both[1])


def _outer_half_groups(p, threads, arrays):
    """Groups of the fused feature-outer half kernels (see _groups): float32 scratch of
    ``arrays`` (A, features in the group, B) arrays within HALF_SLICE_BYTES_PER_THREAD."""
    return _groups(p.shape, 4 * arrays, threads, HALF_SLICE_BYTES_PER_THREAD)


def _forward_half_fused(backend, args):
    """forward on half x by the fused Cython kernels (see above: normalize_half in inference,
    forward_train_half_outer or _inner in training), or None where the backend or the views
    do not allow it (nothing written then)."""
    x = args.x
    if backend != "cython" or x.size == 0 or (args.training and args.m == 0):
        return None
    p = plan(x, args.axis)
    x_bits = _unit_stride_bits(p.view_of(x))
    y, y_v, copy_back = p.output_view(args.out, x)
    y_bits = _unit_stride_bits(y_v)
    if x_bits is None or y_bits is None:
        return None
    K = _kernels(backend)
    C = args.C
    weight, bias = _weight_bias(args, C, True)
    coef = np.empty((4, p.shape[1] if p.inner else C), np.float32)
    stats = np.empty((3, C))
    relu, brain = args.activation == "relu", x.dtype.name == "bfloat16"
    family = "inner" if p.inner else "outer"
    if not args.training:
        K.eval_coefficients(as_param(args.running_mean), as_param(args.running_var), weight,
                            bias, args.eps, stats, coef)
        if p.inner:
            K.tile_columns(coef, C, p.B)
            blocks = _chunks(p.shape[0], x.nbytes)
        else:  # blocks of (a, c) runs: elementwise, so the bits do not depend on them
            blocks = min(p.shape[0] * p.shape[1], MAX_CHUNKS)
        threads = launch_threads(backend, family, "eval", x.nbytes)
        _launch(backend, threads, K.normalize_half, x_bits, y_bits, coef, relu, brain, blocks)
    else:
        threads = launch_threads(backend, family, "forward", 2 * x.nbytes)  # the float32 work's
        common = (x_bits, y_bits, weight, bias, args.eps, stats, coef)
        if p.inner:
            _launch(backend, threads, K.forward_train_half_inner, *common,
                    _chunks(p.shape[0], 2 * x.nbytes), p.B, relu, brain)
        else:
            _launch(backend, threads, K.forward_train_half_outer, *common, relu, brain,
                    _outer_half_groups(p, threads, 1))
        _update_running(K, args, stats)
    if copy_back:
        np.copyto(args.out, y)
        y = args.out
    both = stats[::2].astype(np.float32)
    return ForwardResult(y, both[0], both[1])


def _backward_half_fused(backend, args, p):
    """Backward (without ReLU) on half x and dy by backward_half_outer or _inner, or None
    where the views do not allow it (nothing written then)."""
    if args.activation == "relu":
        return None
    x = args.x
    x_bits = _unit_stride_bits(p.view_of(x))
    dy_bits = _unit_stride_bits(p.view_of(args.dy))
    dx, dx_v, copy_back = p.output_view(args.out, x)
    dx_bits = _unit_stride_bits(dx_v)
    if x_bits is None or dy_bits is None or dx_bits is None:
        return None
    K = _kernels(backend)
    C = args.C
    weight, _ = _weight_bias(args, C, True)
    coef = np.empty((5, p.shape[1] if p.inner else C), np.float32)
    grads = np.zeros((2, C))
    brain = x.dtype.name == "bfloat16"
    threads = launch_threads(backend, "inner" if p.inner else "outer", "backward", 2 * x.nbytes)
    common = (dy_bits, x_bits, dx_bits, args.mean, args.mean_ulp, args.invstd, weight,
              args.training, grads, coef)
    if p.inner:
        _launch(backend, threads, K.backward_half_inner, *common,
                _chunks(p.shape[0], 2 * x.nbytes), p.B, brain)
    else:
        _launch(backend, threads, K.backward_half_outer, *common, brain,
                _outer_half_groups(p, threads, 2))
    if copy_back:
        np.copyto(args.out, dx)
        dx = args.out
    both = grads.astype(np.float32)
    return BackwardResult(dx, both[0], both[1])


def _flat(arr):
    """arr's elements in memory order as a 1-D view, or None if arr is not dense."""
    flat = arr.ravel(order="K")
    return flat if np.may_share_memory(flat, arr) or arr.size == 0 else None


def _convert(src, dst, backend):
    """dst[...] = src between a half dtype and float32, same shape and memory order, by the
    backend's parallel conversion kernels (NumPy's cast where the layout is not dense)."""
    s, d = _flat(src), _flat(dst)
    if s is None or d is None or not (s.flags.aligned and d.flags.aligned) or src.strides != tuple(
            st * src.itemsize // dst.itemsize for st in dst.strides):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf, as the kernels
            np.copyto(dst, src, casting="unsafe")
        return
    K = _kernels(backend)
    # sized by the float32 side, as the float32 kernels are by their x
    threads = launch_threads(backend, "inner", "eval", max(s.nbytes, d.nbytes))
    if src.dtype == np.float32:
        kern = K.float32_to_float16 if dst.dtype.name == "float16" else K.float32_to_bfloat16
        _launch(backend, threads, kern, s, d.view(np.uint16))
    else:
        kern = K.float16_to_float32 if src.dtype.name == "float16" else K.bfloat16_to_float32
        _launch(backend, threads, kern, s.view(np.uint16), d)


def _as_float32(arr, backend):
    if _flat(arr) is None:
        arr = np.ascontiguousarray(arr)
    out = np.empty_like(arr, dtype=np.float32)  # same memory order
    _convert(arr, out, backend)
    return out


def _via_float32(run, backend, args, *names):
    """Run ``run`` on args with the half arrays ``names`` converted to float32 and ``out``
    left to the kernels; the first result is rounded back into out (or a new half array)."""
    half = args.x.dtype
    out = args.out
    for name in names:
        setattr(args, name, _as_float32(getattr(args, name), backend))
    args.out = None
    result = run(backend, args)
    first = result[0]
    if out is None:
        out = np.empty_like(first, dtype=half)
    _convert(first, out, backend)
    return result._replace(**{result._fields[0]: out})


def _forward_half(backend, args):
    """forward on half x by the first of the paths above (half-precision notes) that the
    backend and the views allow."""
    result = _forward_half_fused(backend, args)
    return result if result is not None else _via_float32(kernel_forward, backend, args, "x")


def _backward_half(backend, args):
    p = _half_plan(backend, args)
    result = None if p is None else _backward_half_fused(backend, args, p)
    if result is None and p is not None and not p.inner:
        result = _backward_half_sliced(backend, args, p)
    return result if result is not None else _via_float32(kernel_backward, backend, args, "x",
                                                          "dy")


def forward(args):
    backend = resolve_backend(args.backend)
    if backend == "reference":
        return reference.forward_checked(args)
    if is_half(args.x.dtype):
        return _forward_half(backend, args)
    return kernel_forward(backend, args)


def backward(args):
    backend = resolve_backend(args.backend)
    if backend == "reference":
        return reference.backward_checked(args)
    if is_half(args.x.dtype):
        return _backward_half(backend, args)
    return kernel_backward(backend, args)
