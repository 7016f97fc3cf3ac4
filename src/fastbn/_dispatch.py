"""forward and backward of the public API, after validation: to the reference, to the
half-precision paths or to the kernel drivers of the chosen backend.

How the modules stack:
- :mod:`fastbn._validate`: every argument check, once;
- :mod:`fastbn._backends`: backend choice, threads and the kernel launch;
- :mod:`fastbn._plans`: the (A, C, B) view of x, the kernel family, blocks and groups;
- :mod:`fastbn._drivers`: float32/float64 forward and backward on a compiled backend;
- :mod:`fastbn._half`: float16/bfloat16 through the float32 kernels;
- :mod:`fastbn._numba_kernels` and ``fastbn._cy_kernels``: the loops.
"""
from . import reference
from ._backends import resolve_backend
from ._drivers import kernel_backward, kernel_forward
from ._half import _backward_half, _forward_half
from ._validate import is_half


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
