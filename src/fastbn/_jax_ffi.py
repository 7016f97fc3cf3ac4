"""fastbn.jax's second call path: an XLA FFI handler, so that XLA allocates the outputs and the
kernels write into them (``jax.pure_callback`` copies every output once).

The handler is a C function pointer made by ``ctypes`` from Python, registered with
``jax.ffi.register_ffi_target``: no compiler and no headers are needed at build or run time.
It reads XLA's C call frame through ``ctypes`` mirrors of the structures of XLA's FFI C API
(``xla/ffi/api/c_api.h``, API version 0.x; only fields that version has kept stable), wraps
the buffers as NumPy arrays (inputs read-only) and calls :func:`fastbn.forward` /
:func:`fastbn.backward` with ``out=`` the result buffers. A Python exception becomes an XLA
error carrying its message. The one attribute, ``config``, indexes the calls'
configurations (hashable tuples) kept here.
"""
import ctypes
import functools
import os
import re
import threading

import numpy as np

from . import api

# --- ctypes mirrors of xla/ffi/api/c_api.h --------------------------------------------------
_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ERROR_INTERNAL = 13
_API_VERSION = (0, 1)  # the C API version whose structures this module reads
_DTYPES = {10: "float16", 11: "float32", 12: "float64", 16: "bfloat16"}


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("items", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("names", ctypes.c_void_p), ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields only
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ErrorCreate)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _List), ("rets", _List), ("attrs", _Attrs),
                ("future", ctypes.c_void_p)]


_Handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


# --- the handlers ---------------------------------------------------------------------------

def _array(pointer, writable):
    """An XLA buffer as a NumPy array on its memory (no copy)."""
    buf = ctypes.cast(pointer, ctypes.POINTER(_Buffer)).contents
    dtype = np.dtype(_DTYPES[buf.dtype]) if buf.dtype != 16 else _bfloat16()
    shape = tuple(buf.dims[i] for i in range(buf.rank))
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        arr = np.empty(shape, dtype)
    else:
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(buf.data)
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    arr.flags.writeable = writable
    return arr


def _bfloat16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _frame_arrays(frame):
    args = [_array(frame.args.items[i], False) for i in range(frame.args.size)]
    rets = [_array(frame.rets.items[i], True) for i in range(frame.rets.size)]
    scalar = ctypes.cast(frame.attrs.attrs[0], ctypes.POINTER(_Scalar)).contents
    config = _CONFIGS[ctypes.cast(scalar.value, ctypes.POINTER(ctypes.c_int64)).contents.value]
    return args, rets, config


def _forward_execute(frame):
    args, rets, (cfg, has_gamma, has_beta, update) = _frame_arrays(frame)
    x = args.pop(0)
    gamma = args.pop(0) if has_gamma else None
    beta = args.pop(0) if has_beta else None
    rm, rv = (args[0], args[1]) if args else (None, None)
    y, mean_out, invstd_out = rets[:3]
    if update:  # the new statistics are written into the result buffers
        np.copyto(rets[3], rm)
        np.copyto(rets[4], rv)
        rm, rv = rets[3], rets[4]
    _, mean, invstd = api.forward(
        x, gamma, beta, axis=cfg.axis, training=cfg.training, running_mean=rm,
        running_var=rv, momentum=cfg.momentum, eps=cfg.eps,
        unbiased_running_var=cfg.unbiased_running_var, activation=cfg.activation, out=y,
        backend=cfg.backend)
    mean_out[...] = mean
    invstd_out[...] = invstd


def _backward_execute(frame):
    args, rets, (cfg, has_gamma, has_beta) = _frame_arrays(frame)
    dy, x, mean, invstd = args[:4]
    gamma = args[4] if has_gamma else None
    beta = args[4 + has_gamma] if has_beta else None
    dx, dgamma_out, dbeta_out = rets
    _, dgamma, dbeta = api.backward(dy, x, mean, invstd, gamma, beta, axis=cfg.axis,
                                    training=cfg.training, activation=cfg.activation, out=dx,
                                    backend=cfg.backend)
    dgamma_out[...] = dgamma
    dbeta_out[...] = dbeta


def _handler(execute):
    def handle(frame_pointer):
        frame = frame_pointer.contents
        try:
            ext = frame.extension_start
            if ext and ext.contents.type == _EXTENSION_METADATA:
                meta = ctypes.cast(ext, ctypes.POINTER(_MetadataExtension)).contents.metadata
                meta.contents.api_version.major_version = _API_VERSION[0]
                meta.contents.api_version.minor_version = _API_VERSION[1]
                meta.contents.traits = 0
                return None
            if frame.stage != _STAGE_EXECUTE:
                return None
            execute(frame)
            return None
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to XLA
            message = f"{type(exc).__name__}: {exc}".encode()
            err = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message,
                                   _ERROR_INTERNAL)
            return frame.api.contents.error_create(ctypes.byref(err))
    return _Handler(handle)


_FORWARD = _handler(_forward_execute)
_BACKWARD = _handler(_backward_execute)
_CONFIGS = []
_CONFIG_IDS = {}
_lock = threading.Lock()
_registered = False


@functools.lru_cache(maxsize=None)
def available(jax):
    """Whether this jaxlib's FFI C API is the major version whose structures this module
    mirrors (read from the header jaxlib ships); where not, fastbn.jax uses its callback."""
    try:
        with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as fh:
            found = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", fh.read())
    except (OSError, AttributeError):
        return False
    return found is not None and int(found.group(1)) == _API_VERSION[0]


def _config_id(config):
    with _lock:
        if config not in _CONFIG_IDS:
            _CONFIG_IDS[config] = len(_CONFIGS)
            _CONFIGS.append(config)
        return _CONFIG_IDS[config]


def _register(jax):
    global _registered
    with _lock:
        if not _registered:
            jax.ffi.register_ffi_target("fastbn_forward", jax.ffi.pycapsule(_FORWARD),
                                        platform="cpu")
            jax.ffi.register_ffi_target("fastbn_backward", jax.ffi.pycapsule(_BACKWARD),
                                        platform="cpu")
            _registered = True


def forward_call(jax, cfg, shapes, x, gamma, beta, running_mean, running_var):
    """(y, mean, invstd, new running mean or None, new running var or None) by the FFI."""
    _register(jax)
    update = shapes[3] is not None
    inputs = [a for a in (x, gamma, beta) if a is not None]
    if running_mean is not None:
        inputs += [running_mean, running_var]
    config = _config_id((cfg, gamma is not None, beta is not None, update))
    call = jax.ffi.ffi_call("fastbn_forward", [s for s in shapes if s is not None],
                            vmap_method="sequential")
    outs = call(*inputs, config=np.int64(config))
    return (*outs[:3], *(outs[3:5] if update else (None, None)))


def backward_call(jax, cfg, shapes, dy, x, mean, invstd, gamma, beta):
    """(dx, dgamma, dbeta) by the FFI."""
    _register(jax)
    inputs = [dy, x, mean, invstd] + [a for a in (gamma, beta) if a is not None]
    config = _config_id((cfg, gamma is not None, beta is not None))
    call = jax.ffi.ffi_call("fastbn_backward", list(shapes), vmap_method="sequential")
    return tuple(call(*inputs, config=np.int64(config)))
