"""PyTorch drop-ins running fastbn's kernels on the tensors' own memory.

- :func:`batch_norm`: the signature of ``torch.nn.functional.batch_norm``.
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of torch's, with
  the same constructor arguments, ``state_dict`` keys and train/eval behaviour (momentum=None
  as a cumulative average, ``num_batches_tracked``); only ``forward`` differs.
- :func:`convert`: swaps every torch BatchNorm1d/2d/3d in a model for fastbn's, in place.
- :class:`BatchNormReLU1d`, :class:`BatchNormReLU2d`, :class:`BatchNormReLU3d`:
  ``relu(batch_norm(x))`` in one pass, with no mask stored for the backward.
- :func:`fuse_relu`: every BatchNorm of a model whose output feeds only a ReLU made fused.
- :class:`SyncBatchNorm`, :class:`SyncBatchNormReLU`, :func:`convert_sync_batchnorm`: the
  statistics of a batch spread over a torch.distributed group (CPU, gloo), fused or not.

Inputs may be float32, float64, float16 or bfloat16 (bfloat16 needs ``ml_dtypes``), with
parameters and running statistics in any of these dtypes (PyTorch's kernel takes the input's,
or float32 for half input; fastbn computes in float32 or float64 alike); under ``torch.autocast("cpu")``
BatchNorm runs in its input's dtype, as PyTorch's does.

Forward and backward hand fastbn the tensors' memory, so nothing is copied, for contiguous
and ``channels_last`` tensors alike; outputs and input gradients take the memory format
PyTorch's kernel gives them (the input's, but contiguous for a transposed or permuted one).
Eager calls on float32/float64 tensors go first to the compiled call path of the Cython
extension (checks, plan and launch in C, on the tensors' data pointers); everything it does
not serve (other dtypes, the Numba backend, invalid arguments) runs through fastbn's Python
API on NumPy views of the tensors. Both are also registered as the custom operators
``fastbn::batch_norm``, ``fastbn::batch_norm_backward`` and ``fastbn::update_running``
(:mod:`fastbn._torch_ops`), which ``torch.compile`` (no graph break), ``torch.export`` and
``torch.jit.trace`` record whole; eager calls run the same code without the dispatcher's
cost. ``torch.jit.script`` cannot compile these modules (their forward is Python that
TorchScript does not take).

Edge cases behave as PyTorch's: an empty batch gives an empty output, zero gradients and
untouched running statistics; momentum may be any number in training and is ignored in eval;
errors have PyTorch's types and messages (a wrong-size weight, bias or running statistic
raises :class:`BatchNormArgumentError`, both a RuntimeError and a ValueError).

PyTorch's own kernel runs instead (documented fallbacks): for tensors not on the CPU, dtypes
other than float32/float64/float16/bfloat16, bfloat16 input without ``ml_dtypes``,
inputs that need autograd through the running statistics, eval with ``eps=0``, and under ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``) and
forward-mode AD (dual tensors), for which fastbn has no rule. A gradient taken under vmap
(``gradcheck(check_batched_grad=True)``) uses the backward written in torch operations.
Double backward raises.
"""
try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.torch needs PyTorch: install fastbn's torch extra, "
                      "pip install \".[torch]\" in fastbn's folder (it pins the tested "
                      "release, torch==2.13.0)") from exc

import importlib.util
import numbers
import warnings

import torch.autograd.forward_ad as _forward_ad

from . import api  # noqa: F401  (tests spy on fastbn.torch.api.forward)
from . import _torch_fuse, _torch_ops
from ._torch_ops import FLOATS, HALF, BatchNormArgumentError
from ._torch_sync import SyncBatchNorm, SyncBatchNormReLU, convert_sync_batchnorm

__all__ = [
    "batch_norm",
    "BatchNormArgumentError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "fuse_relu",
    "SyncBatchNorm",
    "SyncBatchNormReLU",
    "convert_sync_batchnorm",
]


#: bfloat16 tensors reach fastbn as ml_dtypes arrays; without ml_dtypes they run on PyTorch's.
_HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None


def _under_transform():
    """True under torch.func transforms (vmap, grad, jvp) and forward-mode AD, which run on
    PyTorch's kernel (see the module's docstring)."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _fastbn_can_run(input, tensors):
    """Whether fastbn's kernels take these tensors (the input, weight, bias, running_mean,
    running_var); else PyTorch's kernel runs (and raises PyTorch's errors)."""
    if input.device.type != "cpu" or input.dim() < 2 or input.layout != torch.strided:
        return False
    if input.dtype not in FLOATS and not (
            input.dtype in HALF and (input.dtype == torch.float16 or _HAS_ML_DTYPES)):
        return False
    # parameters and statistics: any of these (PyTorch's kernel insists on the input's dtype,
    # or float32 for half input; fastbn takes any, as its NumPy API does)
    allowed = FLOATS + HALF
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in allowed or t.layout != torch.strided:
            return False
        if i >= 2 and t.requires_grad:  # autograd through the running statistics
            return False
    if torch.compiler.is_compiling():
        return True
    return not _under_transform()


def _check(input, running_mean, running_var, weight, bias, training, eps):
    """PyTorch's checks of F.batch_norm, with its messages, before anything runs."""
    if training:
        size = list(input.shape)
        if size[0] * _prod(size[2:]) == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {torch.Size(size)}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither "
                         "be None")
    error = _torch_ops.size_error(input, running_mean, running_var, weight, bias)
    if error is not None:
        raise error


def _prod(values):
    result = 1
    for v in values:
        result *= v
    return result


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                batches=None):
    """batch_norm (with ``relu``: relu(batch_norm)); ``batches``, a module's
    num_batches_tracked, makes the momentum ``1 / batches`` (momentum=None)."""
    if _torch_ops.eager(input) and not _under_transform():
        # the compiled call path, which serves valid calls only: else the checks below
        y = _torch_ops.call_path_batch_norm(
            input, weight, bias, running_mean, running_var, training,
            momentum if batches is None else 1.0 / float(batches), eps, relu)
        if y is not None:
            return y
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
            batches)
    if torch._C._get_tracing_state() is not None:
        # Under torch.jit.trace sizes are traced values: the checks and branches below would
        # each warn that the trace keeps their outcome. It may, as for PyTorch's own checks
        # (in C++, unseen by the tracer): the parameters fix the features, and the trace
        # records the custom operators.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _checked_batch_norm(*args)
    return _checked_batch_norm(*args)


def _checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        relu, batches):
    """_batch_norm's Python path: PyTorch's kernel where fastbn's cannot run, else PyTorch's
    checks, then fastbn's operators."""
    tensors = (weight, bias, running_mean, running_var)
    if not _fastbn_can_run(input, tensors) or (
            not training and (running_mean is None or running_var is None or eps == 0.0)):
        # PyTorch's kernel, which also raises PyTorch's error for missing running statistics
        if batches is not None:
            momentum = 1.0 / float(batches)
        y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                           training, momentum, eps)
        return torch.relu(y) if relu else y
    _check(input, running_mean, running_var, weight, bias, training, eps)
    return _torch_ops.batch_norm(input, weight, bias, running_mean, running_var,
                                 bool(training), 0.0 if batches is not None else float(momentum),
                                 float(eps), relu, batches)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on fastbn's kernels.

    Same arguments, result and errors as PyTorch's, feature axis 1.

    Parameters
    ----------
    input : Tensor (N, C, ...), float32, float64, float16 or bfloat16
        Any memory format (contiguous, channels_last, strided); read in place, no copy.
    running_mean, running_var : Tensor (C,) or None
        Updated in place in training: ``r = (1 - momentum) * r + momentum * batch`` with the
        unbiased batch variance (any momentum; ignored in eval).
    weight, bias : Tensor (C,) or None
        Any of the four floating dtypes (likewise the running statistics).
    training : bool
    momentum : float
    eps : float
        > 0 in training, >= 0 in eval.

    Returns
    -------
    Tensor
        input's shape, dtype and memory format.

    Raises
    ------
    ValueError
        One value per feature in training; eps out of range; only one running statistic.
    RuntimeError
        A weight, bias or running statistic of the wrong size (the error is also a ValueError).

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    >>> y = fastbn.torch.batch_norm(x, None, None, training=True)
    >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> bool(torch.allclose(y, ref))
    True
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):  # PyTorch's words
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not "
                        f"{type(momentum).__name__}")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       False)


class _FastForward:
    """forward() of torch's _BatchNorm, with fastbn's batch_norm in place of F.batch_norm
    (``_relu``: relu(batch_norm(x)) in one pass)."""

    _relu = False

    def forward(self, input):
        self._check_input_dim(input)
        # The following mirrors torch.nn.modules.batchnorm._BatchNorm.forward (2.13).
        factor, batches = (0.0 if self.momentum is None else self.momentum), None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: 1 / num_batches_tracked
                batches = self.num_batches_tracked
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        use_running = not self.training or self.track_running_stats
        return _batch_norm(input, self.running_mean if use_running else None,
                           self.running_var if use_running else None, self.weight, self.bias,
                           bn_training, factor, self.eps, self._relu, batches)

    def extra_repr(self):
        return super().extra_repr() + ", on fastbn"


class BatchNorm1d(_FastForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels: same arguments, state and behaviour."""


class BatchNorm2d(_FastForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels: same arguments, state and behaviour."""


class BatchNorm3d(_FastForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels: same arguments, state and behaviour."""


class _BatchNormReLU(_FastForward, torch.nn.modules.batchnorm._BatchNorm):
    """relu(batch_norm(x)) in one pass over memory; the backward recomputes the ReLU's mask
    from x, the saved statistics, weight and bias, so no mask or output is stored."""

    _relu = True


class BatchNormReLU1d(_BatchNormReLU):
    """``relu(BatchNorm1d(x))`` fused, on fastbn's kernels.

    BatchNorm1d's constructor arguments, ``state_dict`` keys and train/eval behaviour; (N, C)
    or (N, C, L) input. Not a subclass of ``torch.nn.BatchNorm1d`` (its output differs), so
    code that looks for BatchNorms (conv-bn folding) leaves it alone.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.BatchNormReLU1d(3)
    >>> bool((bn(torch.randn(8, 3)) >= 0).all())
    True
    """

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchNormReLU2d(_BatchNormReLU):
    """``relu(BatchNorm2d(x))`` fused, on fastbn's kernels: (N, C, H, W) input in any memory
    format; otherwise as :class:`BatchNormReLU1d`.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    >>> y = fastbn.torch.BatchNormReLU2d(3)(x)
    >>> y.is_contiguous(memory_format=torch.channels_last), bool((y >= 0).all())
    (True, True)
    """

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNormReLU3d(_BatchNormReLU):
    """``relu(BatchNorm3d(x))`` fused, on fastbn's kernels: (N, C, D, H, W) input; otherwise
    as :class:`BatchNormReLU1d`."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim


_SWAPS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
          torch.nn.BatchNorm3d: BatchNorm3d}
_FUSED = {BatchNorm1d: BatchNormReLU1d, BatchNorm2d: BatchNormReLU2d,
          BatchNorm3d: BatchNormReLU3d, torch.nn.BatchNorm1d: BatchNormReLU1d,
          torch.nn.BatchNorm2d: BatchNormReLU2d, torch.nn.BatchNorm3d: BatchNormReLU3d,
          SyncBatchNorm: SyncBatchNormReLU}


def fuse_relu(model):
    """``model`` with every BatchNorm whose output feeds only a ReLU running as one fused
    BatchNormReLU on fastbn (torch's BatchNorm1d/2d/3d and fastbn's alike).

    In a ``torch.nn.Sequential`` a BatchNorm followed by a ``torch.nn.ReLU`` is replaced in
    place (the ReLU by ``Identity``). A module that calls its children in its forward code (a
    ResNet block) is traced with ``torch.fx``: a BatchNorm whose every call feeds only a ReLU
    (module, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not) becomes fused and
    the module a ``torch.fx.GraphModule``. Fused modules share the BatchNorm's parameters and
    buffers (same tensors: optimizers and ``state_dict`` keys are unchanged). A module fx cannot
    trace is searched child by child; BatchNorms it calls directly stay unfused, with a
    warning naming it.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``model`` itself (changed in place) when it is a Sequential or nothing in its own
        forward was fused, else a ``torch.fx.GraphModule`` built around its submodules.

    Warns
    -----
    UserWarning
        For each module fx cannot trace that calls a BatchNorm directly.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
    ...                           torch.nn.ReLU())
    >>> net = fastbn.torch.fuse_relu(net)
    >>> type(net[1]).__name__, type(net[2]).__name__
    ('BatchNormReLU2d', 'Identity')
    """
    return _torch_fuse.fuse_relu(model, tuple(_FUSED),
                                 lambda bn: _torch_fuse.share_state(bn, _FUSED[type(bn)]))


def convert(model):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` (the model itself included) run
    on fastbn, in place, and return ``model``.

    Only the modules' classes change: parameters, buffers, hooks, train/eval state and any
    optimizer holding the parameters stay as they are. Subclasses of torch's classes (such as
    SyncBatchNorm) are left alone, since their forward may differ.
    """
    for module in model.modules():
        fast = _SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model
