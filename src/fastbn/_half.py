"""Half-precision (float16, bfloat16) inputs, through the float32 kernels.

The kernels have no float16/bfloat16 arithmetic: half inputs run through the float32 kernels,
with float32 statistics as PyTorch computes them on the CPU, and the result is rounded back.
On the Cython backend, where the views have contiguous runs (rows):
- inference needs no statistics: normalize_half converts, normalizes and rounds back a chunk
  at a time in one pass over the half data, on either family;
- training on feature-outer views (NCHW, NCL, ...): forward_train_half_outer and
  backward_half_outer convert each thread's group of features into float32 scratch that
  stays in cache, run the float32 steps on it and round the output back, so memory sees x
  (and dy) read once and the output written once, in half; the backward of ReLU goes a slice
  of features at a time through the float32 kernels instead (convert_runs). Statistics are
  per feature and the sums do not depend on grouping;
- training on feature-inner views (NHWC, NC): forward_train_half_inner and
  backward_half_inner run the float32 row loops on chunks of up to four rows converted on
  the fly, in those loops' own blocks (two passes over the half data, as float32 makes two).
Every result has the bits of the whole-array path below. Otherwise (the ReLU backward of
feature-inner views, Numba, views that need a copy) whole arrays are converted to float32
(in their own memory order, by parallel conversion kernels): float32 temporaries of x, dy in
backward, and the output, up to 6x the bytes of x.
"""
import numpy as np

from ._backends import _kernels, _launch, get_num_threads, launch_threads
from ._common import BackwardResult, ForwardResult
from ._drivers import (_backward_into, _update_running, _weight_bias, kernel_backward,
                       kernel_forward)
from ._plans import MAX_CHUNKS, _chunks, _groups, plan
from ._validate import as_param

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
