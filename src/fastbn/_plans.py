"""The (A, C, B) view of x, and how the kernels cut it into work.

x's axes are ordered as (axes with stride larger than the feature axis's, feature, the others)
and folded into ``(A, C, B)`` without a copy. Only an input whose outer or inner axes cannot be
merged into one strided axis each (say ``x[:, :, ::2, :]`` of an NCHW array) is copied once,
into that order; outputs are allocated in x's own memory order. The plan also picks the kernel
family: feature-outer for runs of INNER_MAX_RUN values or more, feature-inner otherwise. The
row blocks of the feature-inner kernels (:func:`_chunks`) and the feature groups of the
feature-outer ones (:func:`_groups`) are decided here too.
"""
import math

import numpy as np

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



def _chunks(rows, nbytes):
    """Row blocks of the feature-inner kernels. A function of the shape alone, never of the
    thread count, so that the summation order (hence every bit of the result) is the same for
    1 or 16 threads and for the serial and parallel twins."""
    return max(1, min(rows // CHUNK_MIN_ROWS, MAX_CHUNKS, nbytes // CHUNK_MIN_BYTES))



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
