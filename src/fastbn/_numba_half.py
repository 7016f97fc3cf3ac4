"""Half-precision conversions on Numba (float16 and bfloat16 bit patterns in uint16 arrays
<-> float32), bit for bit as NumPy's and ml_dtypes' casts."""
import numpy as np
from llvmlite import ir
from numba import prange
from numba import types as nbtypes
from numba.extending import intrinsic

from ._numba_jit import kernel


# --- half precision conversions ------------------------------------------------------------------
# Numba has no float16/bfloat16 types: half arrays arrive as uint16 views. float16 uses LLVM's
# own conversions (F16C instructions on x86); bfloat16 is the top half of a float32, rounded to
# nearest-even, NaN kept quiet. Both agree bit for bit with NumPy's and ml_dtypes' casts.

@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return nbtypes.float32(nbtypes.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return nbtypes.uint16(nbtypes.float32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return nbtypes.uint32(nbtypes.float32), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return nbtypes.float32(nbtypes.uint32), codegen


@kernel
def float16_to_float32(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _f16_bits_to_f32(src[i])


@kernel
def float32_to_float16(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _f32_to_f16_bits(src[i])


@kernel
def bfloat16_to_float32(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = _bits_to_f32(np.uint32(src[i]) << np.uint32(16))


@kernel
def float32_to_bfloat16(src, dst):
    for i in prange(src.shape[0]):
        u = _f32_to_bits(src[i])
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it, quiet
            dst[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
        else:  # round to nearest, ties to even
            dst[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                               >> np.uint32(16))
