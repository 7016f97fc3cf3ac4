"""PyTorch drop-ins running fastbn's kernels on the tensors' own memory.

- :func:`batch_norm`: the signature of ``torch.nn.functional.batch_norm``.
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of torch's, with
  the same constructor arguments, ``state_dict`` keys and train/eval behaviour (momentum=None
  as a cumulative average, ``num_batches_tracked``); only ``forward`` differs.
- :func:`convert`: swaps every torch BatchNorm1d/2d/3d in a model for fastbn's, in place.

Forward and backward go through a ``torch.autograd.Function`` that hands fastbn the tensors'
memory as NumPy views (``Tensor.numpy()`` / ``torch.from_numpy``), so nothing is copied, for
contiguous and ``channels_last`` tensors alike; outputs keep the input's memory format. What
fastbn does not run falls back to PyTorch's own kernel: tensors not on the CPU, dtypes other
than float32/float64, and inputs that need autograd through the running statistics. Double
backward raises (the backward is marked once-differentiable).
"""
try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.torch needs PyTorch: install fastbn's torch extra, "
                      "pip install \".[torch]\" in fastbn's folder (it pins the tested "
                      "release, torch==2.13.0)") from exc

from torch.autograd.function import once_differentiable

from . import api

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

_DTYPES = (torch.float32, torch.float64)


def _numpy(tensor):
    """The tensor's memory as a NumPy array (a view, no copy), or None for None."""
    return None if tensor is None else tensor.detach().numpy()


class _BatchNorm(torch.autograd.Function):
    """y = batch_norm(x); backward from x, the saved mean/invstd and gamma only."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        # Outputs come from PyTorch's allocator, in x's memory format: its kernels (oneDNN
        # convolutions in particular) want its 64-byte alignment, which NumPy's does not give.
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        _, mean, invstd = api.forward(
            _numpy(x), _numpy(weight), _numpy(bias), axis=1, training=training,
            running_mean=_numpy(running_mean), running_var=_numpy(running_var),
            momentum=momentum, eps=eps, out=y.numpy())
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean, invstd, training)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        mean, invstd, training = ctx.stats
        dx = torch.empty_like(x, memory_format=torch.preserve_format)
        _, dgamma, dbeta = api.backward(_numpy(dy), _numpy(x), mean, invstd, _numpy(weight),
                                        axis=1, training=training, out=dx.numpy())
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None,
                torch.from_numpy(dgamma) if need_w else None,
                torch.from_numpy(dbeta) if need_b else None,
                None, None, None, None, None)


def _fastbn_can_run(tensors):
    present = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" for t in present)
            and all(t.dtype in _DTYPES for t in present)
            and not any(t.requires_grad for t in tensors[3:] if t is not None))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on fastbn's kernels.

    Same arguments and result as PyTorch's, feature axis 1. Runs fastbn for float32/float64
    CPU tensors (any memory format, no copy) and PyTorch's own kernel otherwise.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    >>> y = fastbn.torch.batch_norm(x, None, None, training=True)
    >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> bool(torch.allclose(y, ref))
    True
    """
    tensors = (input, weight, bias, running_mean, running_var)
    if not _fastbn_can_run(tensors):
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps)
    if not training and (running_mean is None or running_var is None):
        # PyTorch's own message for this misuse
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps)
    return _BatchNorm.apply(input, weight, bias, running_mean, running_var, bool(training),
                            float(momentum), float(eps))


class _FastForward:
    """forward() of torch's _BatchNorm, with fastbn's batch_norm in place of F.batch_norm."""

    def forward(self, input):
        self._check_input_dim(input)
        # The following mirrors torch.nn.modules.batchnorm._BatchNorm.forward (2.13).
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        use_running = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if use_running else None,
                          self.running_var if use_running else None, self.weight, self.bias,
                          bn_training, factor, self.eps)


class BatchNorm1d(_FastForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels: same arguments, state and behaviour."""


class BatchNorm2d(_FastForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels: same arguments, state and behaviour."""


class BatchNorm3d(_FastForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels: same arguments, state and behaviour."""


_SWAPS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
          torch.nn.BatchNorm3d: BatchNorm3d}


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
