"""fastbn's kernels as PyTorch custom operators, with their autograd.

Three operators, registered with ``torch.library.custom_op`` so that ``torch.compile`` and
``torch.export`` see through them (each has a fake implementation that only computes shapes):

- ``fastbn::batch_norm(x, weight, bias, running_mean, running_var, training, eps, relu)
  -> (y, mean, invstd, batch_mean, batch_var)``, functional, with its autograd;
- ``fastbn::update_running(running_mean, running_var, batch_mean, batch_var, momentum,
  batches)``, which updates the running statistics in place (declared as mutated; PyTorch
  registers autograd only for functional operators, hence the split);
- ``fastbn::batch_norm_backward(dy, x, mean, invstd, weight, bias, training, relu)
  -> (dx, dweight, dbias)``.

They hand fastbn the tensors' own memory as NumPy arrays (no copy; bfloat16 through
``ml_dtypes``), and write outputs allocated by PyTorch in x's memory format. The arguments
arrive checked (:mod:`fastbn.torch` does that, with PyTorch's messages); what is left here is
translation: half-precision parameters go through float32 vectors, PyTorch's update of the
running statistics takes any momentum (fastbn's NumPy API only [0, 1]) and any floating
dtype, and an empty batch gives an empty output.

Eager calls (not traced) skip the dispatcher: first the compiled call path on the tensors'
memory (:func:`call_path_batch_norm`), then, for what it does not serve, the Python path on
NumPy views; either way one autograd node (``_EagerNode``) keeps the statistics as NumPy
arrays for the backward.

The backward is the operator above, except under ``torch.func.vmap`` (batched gradients),
where it is written in torch operations that vmap can batch. The backward itself cannot be
differentiated: double backward raises.
"""
import numpy as np
import torch
from torch._prims_common import suggest_memory_format

from . import _backends, api

#: x dtypes the operators take; parameters and running statistics are x's dtype, or float32
#: for half-precision x (both as PyTorch allows on the CPU).
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float64)


class BatchNormArgumentError(RuntimeError, ValueError):
    """A wrong-size or mismatched argument: a RuntimeError as PyTorch raises for it, and a
    ValueError as fastbn's NumPy API raises for it."""


def size_error(x, running_mean, running_var, weight, bias):
    """PyTorch's error for a per-feature tensor whose size is not x's channel count (checked
    in PyTorch's order and words), or None."""
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != C:
            return BatchNormArgumentError(f"{name} should contain {C} elements not {t.numel()}")
        if t is not None and t.dim() != 1:
            return BatchNormArgumentError(f"{name} must be a vector of {C} elements, got shape "
                                          f"{tuple(t.shape)}")
    return None


def stats_dtype(dtype):
    """dtype of mean/invstd for x of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_numpy(tensor):
    """The tensor's memory as a NumPy array (a view, no copy), or None for None."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # only bfloat16 needs it

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _param(tensor):
    """A per-feature parameter as fastbn takes it: its own memory when float32/float64, else a
    float32 copy (fastbn's NumPy API reads bfloat16 vectors as no floating dtype)."""
    if tensor is None:
        return None
    return as_numpy(tensor if tensor.dtype in FLOATS else tensor.float())


def output_like(x):
    """An empty output (or dx) for batch_norm of x, in the memory format PyTorch's kernel
    gives it: x's own where x is contiguous or channels-last (also where size-1 dimensions
    make that ambiguous, as PyTorch), else what x's strides suggest: contiguous for a
    transposed or otherwise permuted x, where empty_like would keep x's order and code that
    views PyTorch's output would fail on fastbn's."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) \
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return torch.empty_like(x)  # (the common case, without suggest_memory_format's 2 us)
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def _forward(x, weight, bias, running_mean, running_var, training, eps, relu, momentum=None,
             saved=True):
    """(y, mean, invstd, batch_mean, batch_var). With ``momentum`` (in [0, 1], float32/float64
    running statistics; eager calls only), fastbn updates the running statistics itself, in
    place, and batch_mean/batch_var are empty. ``saved=False`` (no autograd: the caller keeps
    only y) returns None for mean and invstd, and for batch_mean/batch_var unless the caller
    needs them for the update."""
    C = x.shape[1]
    sdtype = stats_dtype(x.dtype)
    y = output_like(x)
    batch = (np.zeros(C), np.zeros(C))
    if x.numel() == 0:  # as PyTorch: an empty output (and no update of the statistics)
        return (y, torch.zeros(C, dtype=sdtype), torch.zeros(C, dtype=sdtype),
                torch.from_numpy(batch[0]), torch.from_numpy(batch[1]))
    if not training:
        stats = (_param(running_mean), _param(running_var))
    elif running_mean is None:
        stats = (None, None)
    elif momentum is not None:
        stats = (as_numpy(running_mean), as_numpy(running_var))
    else:
        # with momentum 1, fastbn writes the batch mean and unbiased variance (float64) into
        # these vectors; _update_running applies PyTorch's update to the running statistics
        stats = batch
    result = api.forward(as_numpy(x), _param(weight), _param(bias), axis=1, training=training,
                         running_mean=stats[0], running_var=stats[1],
                         momentum=1.0 if momentum is None else momentum, eps=eps,
                         activation="relu" if relu else None, out=as_numpy(y))
    if not saved:  # only y, and the batch statistics where the caller updates with them
        return (y, None, None) + ((torch.from_numpy(batch[0]), torch.from_numpy(batch[1]))
                                  if stats is batch else (None, None))
    mean, invstd = torch.from_numpy(result.mean), torch.from_numpy(result.invstd)
    if not training:  # (never an alias of the running statistics the caller may change)
        mean, invstd = mean.clone(), invstd.clone()
    return y, mean, invstd, torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


def _backward(dy, x, mean, invstd, weight, bias, training, relu):
    C = x.shape[1]
    pdtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
    if x.numel() == 0:
        return (torch.zeros_like(x, memory_format=torch.preserve_format),
                torch.zeros(C, dtype=pdtype), torch.zeros(C, dtype=pdtype))
    dx = output_like(x)
    _, dgamma, dbeta = api.backward(as_numpy(dy), as_numpy(x), as_numpy(mean),
                                    as_numpy(invstd), _param(weight), _param(bias), axis=1,
                                    training=training, activation="relu" if relu else None,
                                    out=as_numpy(dx))
    return dx, torch.from_numpy(dgamma).to(pdtype), torch.from_numpy(dbeta).to(pdtype)


def backward_in_torch(dy, x, mean, invstd, weight, bias, training, relu):
    """The backward in torch operations (float32 or float64 inside), for the transforms that
    cannot run a custom operator on their wrapped tensors (vmap over gradients)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    sdtype = mean.dtype
    pdtype = weight.dtype if weight is not None else sdtype
    xhat = (x.to(sdtype) - mean.view(shape)) * invstd.view(shape)
    gamma = weight.to(sdtype).view(shape) if weight is not None else 1.0
    dy = dy.to(sdtype)
    if relu:
        beta = bias.to(sdtype).view(shape) if bias is not None else 0.0
        dy = dy * (gamma * xhat + beta > 0)
    dbeta = dy.sum(dims)
    dgamma = (dy * xhat).sum(dims)
    if training:
        m = max(x.numel() // max(x.shape[1], 1), 1)
        dx = gamma * invstd.view(shape) / m * (m * dy - dbeta.view(shape)
                                               - xhat * dgamma.view(shape))
    else:
        dx = gamma * invstd.view(shape) * dy
    return dx.to(x.dtype), dgamma.to(pdtype), dbeta.to(pdtype)


# --- the operators -----------------------------------------------------------------------------

@torch.library.custom_op("fastbn::batch_norm", mutates_args=(), device_types="cpu")
def batch_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  training: bool, eps: float, relu: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, invstd, batch_mean, batch_var): the running statistics are read in eval and
    left alone; in training and when they are given, batch_mean and batch_var (float64, the
    unbiased variance) are what :func:`update_running_op` needs."""
    return _forward(x, weight, bias, running_mean, running_var, training, eps, relu)


@batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, relu):
    C, sdtype = x.shape[1], stats_dtype(x.dtype)
    return (output_like(x),
            x.new_empty((C,), dtype=sdtype), x.new_empty((C,), dtype=sdtype),
            x.new_empty((C,), dtype=torch.float64), x.new_empty((C,), dtype=torch.float64))


def _update_running(running_mean, running_var, batch_mean, batch_var, momentum, batches):
    """PyTorch's ``r = (1 - momentum) * r + momentum * batch``, any momentum, in float64; both
    new vectors are computed before either is written. With ``batches`` (the module's
    num_batches_tracked, already counting this batch), momentum is ``1 / batches``: the
    cumulative average of momentum=None, read from the tensor so that a compiled graph does
    not depend on its value."""
    factor = momentum if batches is None else 1.0 / batches.double()
    new_mean = (1.0 - factor) * running_mean.double() + factor * batch_mean
    new_var = (1.0 - factor) * running_var.double() + factor * batch_var
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


@torch.library.custom_op("fastbn::update_running", mutates_args=("running_mean", "running_var"),
                         device_types="cpu")
def update_running_op(running_mean: torch.Tensor, running_var: torch.Tensor,
                      batch_mean: torch.Tensor, batch_var: torch.Tensor, momentum: float,
                      batches: torch.Tensor | None) -> None:
    _update_running(running_mean, running_var, batch_mean, batch_var, momentum, batches)


@update_running_op.register_fake
def _(running_mean, running_var, batch_mean, batch_var, momentum, batches):
    return None


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=(), device_types="cpu")
def batch_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                           invstd: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, training: bool,
                           relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, mean, invstd, weight, bias, training, relu)


@batch_norm_backward_op.register_fake
def _(dy, x, mean, invstd, weight, bias, training, relu):
    C = x.shape[1]
    pdtype = weight.dtype if weight is not None else stats_dtype(x.dtype)
    return (output_like(x),
            x.new_empty((C,), dtype=pdtype), x.new_empty((C,), dtype=pdtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, _, relu = inputs
    _, mean, invstd, batch_mean, batch_var = output
    ctx.mark_non_differentiable(mean, invstd, batch_mean, batch_var)
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.training, ctx.relu = training, relu


def _is_batched(tensor):
    # vmap over a gradient wraps dy: torch.func.vmap (a functorch wrapper) and gradcheck's
    # batched-gradient check (the older Batched dispatch key). fastbn cannot read a wrapped
    # tensor's memory; torch operations can batch.
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.is_functorch_wrapped_tensor(tensor)
            or torch._C._functorch.is_legacy_batchedtensor(tensor))


def _grad(ctx, dy, *_stats_grads):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None or not (need_x or need_w or need_b):
        return (None,) * 8
    run = backward_in_torch if _is_batched(dy) else batch_norm_backward_op
    dx, dweight, dbias = run(dy, x, mean, invstd, weight, bias, ctx.training, ctx.relu)
    return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None,
            None, None, None, None, None)


batch_norm_op.register_autograd(_grad, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastbn.torch: the batch_norm backward cannot be differentiated twice "
                       "(double backward); use torch.nn.functional.batch_norm for "
                       "higher-order gradients")


batch_norm_backward_op.register_autograd(_no_double_backward,
                                         setup_context=lambda ctx, inputs, output: None)


# --- eager calls: the compiled call path, else the Python path, and one autograd node -----------

def _first_call(*args):
    global _call_forward, _call_backward
    kernels = _backends.import_call_path()
    if kernels is None:
        _call_forward = _call_backward = _not_served
    else:
        kernels.fast_torch_register(torch.float32, torch.float64, torch.strided)
        _call_forward, _call_backward = kernels.fast_torch_forward, kernels.fast_torch_backward
    return _call_forward(*args)


def _not_served(*args):
    return None


#: fast_torch_forward / fast_torch_backward of the compiled call path (``_cy_call.pxi``),
#: loaded on the first call; functions that serve nothing where it was not built.
_call_forward = _first_call
_call_backward = _not_served


class _EagerNode(torch.autograd.Function):
    """The autograd node of an eager forward, run before it (by the compiled call path, or by
    fastbn's Python API where the call path does not serve the call): its forward only hands
    back that output (passed in ``payload``, not as an input, so that y is an ordinary output
    that may be changed in place, as PyTorch's), and its backward runs the call path's
    backward, else the Python path's, on the saved tensors and the statistics kept as NumPy
    arrays. Eager calls skip the dispatcher: a custom operator's call costs about 0.1 ms more
    (measured on a (32, 64) input), which small layers feel."""

    @staticmethod
    def forward(ctx, x, weight, bias, payload):
        y, ctx.mean, ctx.invstd, ctx.training, ctx.relu = payload
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None or not (need_x or need_w or need_b):
            return None, None, None, None
        if torch.is_grad_enabled() or _is_batched(dy):
            # create_graph=True (the operator, whose own backward raises) or vmap: tensors
            run = backward_in_torch if _is_batched(dy) else batch_norm_backward_op
            dx, dweight, dbias = run(dy, x, torch.from_numpy(ctx.mean),
                                     torch.from_numpy(ctx.invstd), weight, bias, ctx.training,
                                     ctx.relu)
        else:
            dx = output_like(x)
            result = _call_backward(dy, x, ctx.mean, ctx.invstd, weight, bias, ctx.training,
                                    ctx.relu, dx)
            if result is None:  # dy strided unlike x, say: the Python path
                dx, dweight, dbias = _backward(dy, x, torch.from_numpy(ctx.mean),
                                               torch.from_numpy(ctx.invstd), weight, bias,
                                               ctx.training, ctx.relu)
            else:
                dweight, dbias = torch.from_numpy(result.dgamma), torch.from_numpy(result.dbeta)
                if weight is not None and weight.dtype != dweight.dtype:
                    dweight, dbias = dweight.to(weight.dtype), dbias.to(weight.dtype)
        return (dx if need_x else None, dweight if need_w else None,
                dbias if need_b else None, None)


#: _EagerNode's apply without torch.autograd.Function.apply's wrapper, which binds default
#: arguments (there are none) and unwraps torch.func's dead wrappers (eager calls come with
#: plain tensors outside transforms only): 1.1 us of a 3.3 us apply.
_node_apply = super(torch.autograd.function._SingleLevelFunction, _EagerNode).apply


def eager(x):
    """True for a call that runs now on a plain tensor; False where the custom operators must
    be recorded instead: traced code (torch.compile, torch.export, torch.jit.trace, whose
    record of the eager path would keep its output as a constant) and tensor subclasses."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None)


def _needs_node(x, weight, bias):
    return torch.is_grad_enabled() and (x.requires_grad
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def call_path_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                         relu):
    """batch_norm of an eager call on the compiled call path: y, with the running statistics
    updated in training, or None, with nothing written, where the call path does not serve
    the call (dtypes, layouts or values it does not take; every invalid call among them).
    ``x`` is a plain CPU tensor outside traced code and transforms."""
    y = output_like(x)
    result = _call_forward(x, y, weight, bias, running_mean, running_var, training, momentum,
                           eps, relu)
    if result is None:
        return None
    if _needs_node(x, weight, bias):
        return _node_apply(x, weight, bias, (y, result.mean, result.invstd, training, relu))
    return y


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
               batches):
    """y = batch_norm(x) (relu(batch_norm(x)) with ``relu``), updating the running statistics
    in training; arguments already checked. Operators when traced, else the Python path
    (the compiled call path declined the call) with an _EagerNode where something needs a
    gradient; fastbn updates the running statistics in the same call where it can."""
    update = training and running_mean is not None and x.numel() > 0
    if not eager(x):
        y, _, _, batch_mean, batch_var = batch_norm_op(x, weight, bias, running_mean,
                                                       running_var, training, eps, relu)
        if update:
            update_running_op(running_mean, running_var, batch_mean, batch_var, momentum,
                              batches)
        return y
    if batches is not None:
        momentum = 1.0 / float(batches)
    in_place = (update and 0.0 <= momentum <= 1.0 and running_mean.dtype in FLOATS
                and running_var.dtype in FLOATS)
    args = (x, weight, bias, running_mean, running_var, training, eps, relu,
            momentum if in_place else None)
    if _needs_node(x, weight, bias):
        y, mean, invstd, batch_mean, batch_var = _forward(*args)
        y = _node_apply(x, weight, bias, (y, mean.numpy(), invstd.numpy(), training, relu))
    else:  # nothing to differentiate (inference, torch.no_grad): no autograd node, 5-15 us less
        y, _, _, batch_mean, batch_var = _forward(*args, saved=False)
    if update and not in_place:
        _update_running(running_mean, running_var, batch_mean, batch_var, momentum, None)
    return y
