"""The forward and backward drivers of the compiled backends: arguments (already validated
by :mod:`fastbn._validate`) in, the plan's views and scratch arrays set up, one kernel launch,
results and the running-statistics update out. Either backend's kernel module is driven by the
same code: the kernels share names and arguments.
"""
import numpy as np

from ._backends import _import_cython, _kernels, _launch, launch_threads
from ._common import BackwardResult, ForwardResult, stats_dtype, update_running_stats
from ._plans import GROUP_BYTES, _chunks, _groups, plan
from ._validate import as_param

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



def _update_running(K, args, stats):
    """The running-statistics update: compiled, or the NumPy twin for dtypes the kernels lack
    (float16, longdouble) or, in the Cython kernels, mixed or unaligned statistics."""
    if args.running_mean is None:
        return
    rm, rv = args.running_mean, args.running_var
    if rm.dtype in _KERNEL_FLOATS and rv.dtype in _KERNEL_FLOATS and (
            K is not _import_cython() or (rm.dtype == rv.dtype and rm.flags.aligned
                                          and rv.flags.aligned)):
        K.update_running_stats(rm, rv, stats, args.momentum, args.running_var_factor)
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
