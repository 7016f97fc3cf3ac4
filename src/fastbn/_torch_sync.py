"""Synchronized batch norm for PyTorch on the CPU, over torch.distributed (gloo, or any backend
with all_gather): :class:`SyncBatchNorm` and :func:`convert_sync_batchnorm`, re-exported by
:mod:`fastbn.torch`.

PyTorch's own ``torch.nn.SyncBatchNorm`` runs on GPUs only, and DistributedDataParallel
rejects any instance of it on the CPU; this class therefore derives from
``torch.nn.modules.batchnorm._BatchNorm`` instead, with the same constructor arguments,
``state_dict`` keys and train/eval behaviour. The numbers are fastbn's synchronized phases
(:mod:`fastbn._sync`): exact merged statistics, bit-identical on every rank, one small
collective per pass.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _sync, _torch_ops

_DTYPES = (torch.float32, torch.float64)
#: What convert_sync_batchnorm replaces by SyncBatchNorm: plain batch norms (fastbn's
#: BatchNorm1d/2d/3d are subclasses of torch's) and torch's SyncBatchNorm. fastbn's fused
#: layers (their ``_relu`` True) become SyncBatchNormReLU.
_CONVERTED = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
              torch.nn.SyncBatchNorm)


class TorchCommunicator:
    """A torch.distributed process group as fastbn's synchronized functions use it:
    ``allgather`` of a float64 vector into a (size, n) array, in rank order."""

    def __init__(self, group=None):
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    def allgather(self, vector):
        send = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64))
        recv = torch.empty((self.size, send.numel()), dtype=torch.float64)
        dist.all_gather(list(recv.unbind(0)), send, group=self.group)
        return recv.numpy()


def _agree_on_features(comm, features):
    """Raise on every rank where the ranks' layers disagree on num_features. The layers'
    collectives carry 3 * num_features values; torch.distributed's all_gather of vectors of
    other lengths does not raise but aborts the process (gloo), so the lengths are compared
    first, once per layer and group, in a collective of one value."""
    counts = comm.allgather(np.array([float(features)]))[:, 0]
    if np.any(counts != counts[0]):
        raise ValueError(f"fastbn.torch.SyncBatchNorm: the ranks' layers disagree on "
                         f"num_features ({', '.join(str(int(c)) for c in counts)} by rank); "
                         f"every rank must run the same model")


def _numpy(tensor):
    return None if tensor is None else tensor.detach().numpy()


def _unsupported(tensors):
    """Why fastbn cannot run on these tensors (None if it can)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return ValueError("fastbn.torch.SyncBatchNorm runs on CPU tensors; use "
                              "torch.nn.SyncBatchNorm on GPUs")
        if t.dtype not in _DTYPES:
            return TypeError(f"fastbn.torch.SyncBatchNorm takes float32 or float64 tensors, "
                             f"got {t.dtype}")
    return None


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) with the global batch's statistics; backward is a collective too."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm,
                features, relu):
        tensors = (x, weight, bias, running_mean, running_var)
        error = _unsupported(tensors) or _torch_ops.size_error(x, running_mean, running_var,
                                                               weight, bias)
        y = _torch_ops.output_like(x)
        if error is None:
            args = [_numpy(t) for t in tensors] + [y.numpy()]
        else:  # still takes part in the header collective, and raises there
            args = [None] * 6
        activation = "relu" if relu else None
        result, mean64 = _sync.forward(comm, args[0], args[1], args[2], 1, args[3], args[4],
                                       momentum, eps, activation, args[5], None,
                                       local_error=error, features=features)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean64, result.invstd)
        ctx.comm = comm
        ctx.features = features
        ctx.activation = activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        mean64, invstd = ctx.stats
        error = _unsupported((dy,))
        dx = _torch_ops.output_like(x)
        if error is None and dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        _, dgamma, dbeta = _sync.backward(
            ctx.comm, None if error else _numpy(dy), _numpy(x), mean64, invstd, _numpy(weight),
            _numpy(bias), 1, ctx.activation, dx.numpy(), None, local_error=error,
            features=ctx.features)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None,
                torch.from_numpy(dgamma).to(weight.dtype) if need_w else None,
                torch.from_numpy(dbeta).to(bias.dtype) if need_b else None,
                None, None, None, None, None, None, None)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm with the statistics of the batch spread over a torch.distributed group, for
    CPU tensors, usable inside ``DistributedDataParallel``.

    The constructor, ``state_dict`` keys and behaviour follow ``torch.nn.SyncBatchNorm``:
    input (N, C, ...) of any rank >= 2; in training mode the mean and variance are those of
    every rank's batch together (local batches may differ in size or be empty) and the running
    statistics are updated with them, identically on every rank; in eval mode, or without an
    initialized process group, or with a group of one process, it is a plain batch norm on
    fastbn's kernels. The weight and bias gradients are this rank's share:
    DistributedDataParallel averages them with the other gradients, as it does for PyTorch's
    layer. Each training step costs one collective in forward and one in backward, of
    (2 + 2C) and (2 + 3C) doubles per rank (see :mod:`fastbn.distributed`). A bad input on one rank raises on every rank.

    Parameters
    ----------
    num_features : int
        C.
    eps, momentum, affine, track_running_stats, device, dtype, bias
        As ``torch.nn.SyncBatchNorm`` (momentum None: cumulative average).
    process_group : torch.distributed.ProcessGroup, optional
        The group whose ranks share the batch; None for the default (whole world).

    Raises
    ------
    ValueError
        An input of fewer than 2 dimensions; a non-CPU tensor (PyTorch's layer serves GPUs)
        or a global batch of fewer than 2 values per feature, in synchronized training.
    TypeError
        A tensor dtype other than float32/float64 in synchronized training.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.SyncBatchNorm(3)       # no process group: a plain batch norm
    >>> y = bn(torch.randn(8, 3, 4, 4))
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    #: relu(batch_norm(x)) fused (SyncBatchNormReLU)
    _relu = False

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group
        #: id() of the process group whose ranks were found to agree on num_features (see
        #: _agree_on_features), checked once per group on the first synchronized call.
        self._features_agreed = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        """Mirrors ``torch.nn.SyncBatchNorm.forward`` (2.13), with fastbn's kernels."""
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
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
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) < 2:
                group = None
        if group is None:
            from .torch import _batch_norm  # fastbn's single-process kernels

            return _batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               bn_training, factor, self.eps, self._relu)
        comm = TorchCommunicator(group)
        if getattr(self, "_features_agreed", None) != id(group):
            _agree_on_features(comm, self.num_features)
            self._features_agreed = id(group)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                            running_var, float(factor), float(self.eps),
                                            comm, self.num_features, self._relu)


class SyncBatchNormReLU(SyncBatchNorm):
    """``relu(SyncBatchNorm(x))`` fused: the global batch's statistics, the ReLU written in the
    same pass, and a backward that recomputes the forward's mask from x (no output stored),
    as :class:`BatchNormReLU2d` does on one process. Arguments, state and behaviour as
    :class:`SyncBatchNorm`; :func:`convert_sync_batchnorm` makes one of each fused layer, and
    :func:`fuse_relu` one of each SyncBatchNorm followed by a ReLU.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.SyncBatchNormReLU(3)   # no process group: a plain fused layer
    >>> bool((bn(torch.randn(8, 3, 4, 4)) >= 0).all())
    True
    """

    _relu = True


def convert_sync_batchnorm(module, process_group=None):
    """Replace every batch-norm layer of ``module`` by a :class:`SyncBatchNorm`, state kept.

    BatchNorm1d/2d/3d (torch's and fastbn's) and ``torch.nn.SyncBatchNorm`` are replaced,
    recursively, by :class:`SyncBatchNorm` layers (fastbn's fused BatchNormReLU layers by
    :class:`SyncBatchNormReLU` ones) sharing their parameters and buffers
    (weight, bias, running statistics, num_batches_tracked) and train/eval mode, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Call it before wrapping the model
    in DistributedDataParallel and before creating the optimizer.

    Parameters
    ----------
    module : torch.nn.Module
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; None for the whole world.

    Returns
    -------
    torch.nn.Module
        ``module`` itself with its children replaced, or a new :class:`SyncBatchNorm` when
        ``module`` is itself a batch-norm layer.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> net = fastbn.torch.convert_sync_batchnorm(net)
    >>> type(net[1]).__name__
    'SyncBatchNorm'
    """
    return _convert(module, process_group)


def _convert(module, process_group):
    output = module
    fused = getattr(module, "_relu", False) is True and not isinstance(module, SyncBatchNorm)
    if isinstance(module, _CONVERTED) or (
            fused and isinstance(module, torch.nn.modules.batchnorm._BatchNorm)):
        cls = SyncBatchNormReLU if fused else SyncBatchNorm
        output = cls(module.num_features, module.eps, module.momentum, module.affine,
                     module.track_running_stats, process_group, bias=module.bias is not None)
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, _convert(child, process_group))
    del module
    return output
