# Part of the compiled call path, included at the end of _cy_call.pxi: its entry for
# fastbn.torch, over tensors' own memory.

# --- PyTorch tensors: the call path over a tensor's own memory ----------------------------------
# fastbn.torch's eager calls come here first: each tensor becomes an ndarray header over its
# memory (its data pointer, shape and strides; cheaper than Tensor.numpy(), which costs about
# 0.8 us a tensor with its detach), and the call goes on as fast_forward / fast_backward above,
# so that what it serves and computes is theirs. PyTorch's dtype and layout objects are handed
# over by fastbn._torch_ops (this module does not import torch).

cdef object _torch_float32 = None
cdef object _torch_float64 = None
cdef object _torch_strided = None


def fast_torch_register(float32, float64, strided):
    """PyTorch's torch.float32, torch.float64 and torch.strided, which the calls below compare
    tensors' dtype and layout with."""
    global _torch_float32, _torch_float64, _torch_strided
    _torch_float32, _torch_float64, _torch_strided = float32, float64, strided


cdef object _fast_tensor(object t):
    """An ndarray over a CPU, strided float32/float64 tensor's memory (no copy, no reference
    to the tensor: the caller keeps it alive for the call), else None."""
    cdef cnp.npy_intp dims[_FAST_MAX_DIMS]
    cdef cnp.npy_intp strides[_FAST_MAX_DIMS]
    cdef int typenum, nd, i
    cdef Py_ssize_t item
    dtype = t.dtype
    if dtype is _torch_float32:
        typenum, item = cnp.NPY_FLOAT, 4
    elif dtype is _torch_float64:
        typenum, item = cnp.NPY_DOUBLE, 8
    else:
        return None
    if t.is_cpu is not True or t.layout is not _torch_strided:
        return None
    shape = t.shape
    stride = t.stride()
    nd = len(shape)
    if nd > _FAST_MAX_DIMS:
        return None
    for i in range(nd):
        dims[i] = shape[i]
        strides[i] = stride[i] * item
    # NumPy sets the aligned and contiguity flags from the pointer and strides
    return cnp.PyArray_New(cnp.ndarray, nd, dims, typenum, strides,
                           <void *> <size_t> t.data_ptr(), 0, cnp.NPY_ARRAY_WRITEABLE, None)


def fast_torch_forward(x, y, weight, bias, running_mean, running_var, training, momentum, eps,
                       relu, unbiased_running_var=True):
    """fast_forward on tensors: writes y (a tensor of x's shape and strides) and, in training,
    updates the running statistics in place; returns the ForwardResult (its ``y`` an ndarray
    over y's memory, its mean and invstd ndarrays of their own), or None when the call is not
    served (then nothing was written). Running statistics that require grad are not served."""
    if (running_mean is not None and running_mean.requires_grad) \
            or (running_var is not None and running_var.requires_grad):
        return None
    xa = _fast_tensor(x)
    ya = _fast_tensor(y)
    wa = None if weight is None else _fast_tensor(weight)
    ba = None if bias is None else _fast_tensor(bias)
    rma = None if running_mean is None else _fast_tensor(running_mean)
    rva = None if running_var is None else _fast_tensor(running_var)
    if xa is None or ya is None or (wa is None and weight is not None) \
            or (ba is None and bias is not None) or (rma is None and running_mean is not None) \
            or (rva is None and running_var is not None):
        return None
    return _fast_forward(xa, wa, ba, 1, training, rma, rva, momentum, eps,
                         "relu" if relu is True else None, ya, None, unbiased_running_var)


def fast_torch_backward(dy, x, mean, invstd, weight, bias, training, relu, dx):
    """fast_backward on tensors dy, x, weight, bias and dx (x's shape and strides, written),
    with ``mean`` and ``invstd`` the ndarrays fast_torch_forward returned; the BackwardResult
    (dgamma and dbeta ndarrays of their own), or None when the call is not served."""
    ga = _fast_tensor(dy)
    xa = _fast_tensor(x)
    oa = _fast_tensor(dx)
    wa = None if weight is None else _fast_tensor(weight)
    if relu is not True:
        bias = None  # only the ReLU's mask reads it (0.4 us a tensor header, on 8 us calls)
    ba = None if bias is None else _fast_tensor(bias)
    if ga is None or xa is None or oa is None or (wa is None and weight is not None) \
            or (ba is None and bias is not None):
        return None
    return _fast_backward(ga, xa, mean, invstd, wa, ba, 1, training,
                          "relu" if relu is True else None, oa, None)
