"""Synchronized batch normalization across processes, over MPI (mpi4py).

In data-parallel training each process holds a slice of the global batch; batch norm must
use the statistics of the whole batch. :func:`forward`, :func:`backward` and
:class:`SyncBatchNorm` are :func:`fastbn.forward`, :func:`fastbn.backward` and
:class:`fastbn.BatchNorm` for that case: called on every rank of a communicator with the
rank's slice, they return exactly what the single-process functions return on the
concatenated batch (to rounding), and the same mean, invstd and running statistics, bit for
bit, on every rank.

- Local batches may differ in size, and may be empty: such a rank takes part and gets an empty
  output. A global batch of fewer than 2 values per feature in training raises on every rank.
- Statistics are merged exactly (Chan et al.'s update on per-rank count, mean and M2), never
  as ``E[x^2] - E[x]^2``.
- Each call of :func:`forward` or :func:`backward` costs two collectives: a header of three
  doubles per rank (so that a bad input on one rank, a wrong C included, raises on every rank
  instead of leaving the others waiting), then a gather of 2C (forward) or 3C (backward)
  doubles per rank. :class:`SyncBatchNorm` knows C and sends both in one collective per pass.
  No activations are sent. Eval mode does not communicate. See the README, "Distributed
  training", for the cost at scale.
- Call every function on every rank of ``comm``, in the same order, as with any collective.

Requires mpi4py (``pip install 'fastbn[mpi]'``, which also brings the ``mpich`` wheel and its
``mpiexec``); ``import fastbn`` does not import it. Run a script with
``mpiexec -n 4 python train.py``.
"""
# annotations kept as written, so that help() shows "ArrayLike", not its expansion
from __future__ import annotations

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.distributed needs mpi4py: pip install 'fastbn[mpi]' (mpi4py and "
                      "the mpich wheel, which brings mpiexec)") from exc

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _sync, api
from ._common import ActivationName, BackendName, BackwardResult, ForwardResult
from ._sync import RemoteInputError
from ._validate import FORWARD_BETA, _flag
from .layers import BatchNorm

__all__ = ["forward", "backward", "SyncBatchNorm", "RemoteInputError", "MPICommunicator"]


class MPICommunicator:
    """An mpi4py communicator as fastbn's synchronized functions use it: ``allgather`` of a
    float64 vector into a (size, n) array, in rank order (``Comm.Allgather`` on buffers)."""

    def __init__(self, comm: "MPI.Intracomm | None" = None) -> None:
        comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator (such as "
                            f"MPI.COMM_WORLD), got {type(comm).__name__}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, vector: ArrayLike) -> NDArray[np.float64]:
        send = np.ascontiguousarray(vector, dtype=np.float64)
        recv = np.empty((self.size, send.size))
        self.comm.Allgather(send, recv)
        return recv


def _communicator(comm: "MPI.Intracomm | MPICommunicator | None") -> "MPICommunicator":
    return comm if isinstance(comm, MPICommunicator) else MPICommunicator(comm)


def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            comm: "MPI.Intracomm | MPICommunicator | None" = None, axis: int = 1,
            training: bool = True, running_mean: NDArray[np.floating[Any]] | None = None,
            running_var: NDArray[np.floating[Any]] | None = None, momentum: float = 0.1,
            eps: float = 1e-5, activation: ActivationName | None = None,
            out: NDArray[Any] | None = None,
            backend: BackendName | None = None) -> ForwardResult:
    """Batch normalization forward over the batch spread across the ranks of ``comm``.

    In training, ``mean`` and ``var`` are those of the global batch (every rank's x together),
    and the running statistics are updated with them (unbiased variance of the global count).
    In eval mode this is :func:`fastbn.forward` on the local x: no communication.

    Parameters
    ----------
    x : array_like, float32 or float64, ndim >= 2
        This rank's slice of the batch; the feature axis must have the same length C on every
        rank; the other axes may differ, and may be empty.
    comm : mpi4py.MPI.Intracomm or MPICommunicator, optional
        Default ``MPI.COMM_WORLD``. Every rank of it must call, in the same order.
    gamma, beta, axis, training, running_mean, running_var, momentum, eps, activation, out, backend
        As in :func:`fastbn.forward`; the same values on every rank (the running statistics
        stay identical across ranks if they start so).

    Returns
    -------
    ForwardResult(y, mean, invstd)
        y like x; mean and invstd (C,) the global batch's, float64 for float64 x, float32
        otherwise, bit-identical on every rank.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.forward`, on the rank whose argument is bad, and then
    RemoteInputError
        on every other rank (after the header collective: no rank is left waiting). A global
        batch of fewer than 2 values per feature, or ranks with different C, raise ValueError
        on every rank. Nothing is modified when an error is raised.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import distributed   # run under mpiexec -n 2 ...
    >>> from mpi4py import MPI
    >>> rank = MPI.COMM_WORLD.Get_rank()
    >>> x = np.random.default_rng(rank).normal(size=(8, 3, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = distributed.forward(x)   # the mean of every rank's x
    >>> y.shape, mean.dtype
    ((8, 3, 4, 4), dtype('float32'))
    """
    if not _flag(training, "training"):
        return api.forward(x, gamma, beta, axis=axis, training=False, running_mean=running_mean,
                           running_var=running_var, momentum=momentum, eps=eps,
                           activation=activation, out=out, backend=backend)
    result, _ = _sync.forward(_communicator(comm), x, gamma, beta, axis, running_mean,
                              running_var, momentum, eps, activation, out, backend)
    return result


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, beta: ArrayLike | None = FORWARD_BETA, *,
             comm: "MPI.Intracomm | MPICommunicator | None" = None, axis: int = 1,
             training: bool = True, activation: ActivationName | None = None,
             out: NDArray[Any] | None = None,
             backend: BackendName | None = None) -> BackwardResult:
    """Batch normalization backward over the batch spread across the ranks of ``comm``.

    dx is the exact gradient, for this rank's slice, of the loss of the global batch (each
    rank's dy being the gradient of the global loss with respect to its own y). ``dgamma`` and
    ``dbeta`` are this rank's share: their sum over the ranks is the global batch's gradient.
    Reduce them with the other parameters' gradients (as PyTorch's SyncBatchNorm leaves them
    to DistributedDataParallel). In eval mode this is :func:`fastbn.backward`: no
    communication.

    Parameters
    ----------
    dy : array_like
        x's shape and dtype.
    x : array_like, float32 or float64, ndim >= 2
        This rank's slice, as given to :func:`forward`.
    mean, invstd : array_like (C,)
        As :func:`forward` returned them. A float32 mean is refined to the global float64 mean
        (``sum(x - mean)`` travels with the gradient sums), as :func:`fastbn.backward` does.
        With ``activation="relu"`` and a float32 mean this takes one more collective (C
        doubles): pass a float64 mean to avoid it.
    gamma, beta, comm, axis, training, activation, out, backend
        As in :func:`forward` and :func:`fastbn.backward`.

    Returns
    -------
    BackwardResult(dx, dgamma, dbeta)
        dx like x; dgamma and dbeta (C,) this rank's share, float64 for float64 x, float32
        otherwise.

    Raises
    ------
    TypeError, ValueError, RemoteInputError
        As :func:`forward`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import distributed   # run under mpiexec -n 2 ...
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> y, mean, invstd = distributed.forward(x)
    >>> dx, dgamma, dbeta = distributed.backward(np.ones_like(x), x, mean, invstd)
    >>> dbeta.tolist()   # this rank's share of sum(dy)
    [8.0, 8.0, 8.0]
    """
    if not _flag(training, "training"):
        return api.backward(dy, x, mean, invstd, gamma, beta, axis=axis, training=False,
                            activation=activation, out=out, backend=backend)
    return _sync.backward(_communicator(comm), dy, x, mean, invstd, gamma, beta, axis,
                          activation, out, backend)


class SyncBatchNorm(BatchNorm):
    """:class:`fastbn.BatchNorm` whose training statistics are those of the global batch.

    Same arguments (plus ``comm``), attributes and state dict as :class:`fastbn.BatchNorm`.
    In training mode, :meth:`forward` and :meth:`backward` are one collective each over
    ``comm`` (call them on every rank, in the same order); ``grad_gamma`` and ``grad_beta`` are this
    rank's share (sum them over the ranks, with the other gradients). In eval mode the layer
    is a plain :class:`fastbn.BatchNorm` (running statistics, or with
    ``track_running_stats=False`` the local batch's): no communication, as PyTorch's.

    Parameters
    ----------
    num_features : int
    comm : mpi4py.MPI.Intracomm or MPICommunicator, optional
        Default ``MPI.COMM_WORLD``.
    axis, eps, momentum, affine, track_running_stats, activation, dtype
        As :class:`fastbn.BatchNorm`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.distributed import SyncBatchNorm   # run under mpiexec -n 2 ...
    >>> bn = SyncBatchNorm(3)
    >>> y = bn.forward(np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32))
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.num_batches_tracked
    1
    """

    def __init__(self, num_features: int, *,
                 comm: "MPI.Intracomm | MPICommunicator | None" = None, axis: int = 1,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: ActivationName | None = None,
                 dtype: DTypeLike = np.float32) -> None:
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, activation=activation,
                         dtype=dtype)
        self.comm = _communicator(comm)
        self._synced = False

    def forward(self, x: ArrayLike) -> NDArray[Any]:
        """Normalize this rank's slice x with the global batch's statistics (training) or as
        :class:`fastbn.BatchNorm` (eval); keeps what backward needs."""
        if not self.training:
            self._synced = False
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = self.num_batches_tracked + 1
        if self.track_running_stats and self.momentum is None:
            factor = 1.0 / tracked
        result, mean64 = _sync.forward(self.comm, x, self.weight, self.bias, self.axis,
                                       self.running_mean, self.running_var, factor, self.eps,
                                       self.activation, None, None,
                                       features=self.num_features)
        if self.track_running_stats:  # only once forward succeeded
            self.num_batches_tracked = tracked
        # the float64 mean: backward needs no collective to refine it
        self._saved = (np.asarray(x), mean64, result.invstd, True)
        self._synced = True
        return result.y

    def backward(self, dy: ArrayLike) -> NDArray[Any]:
        """dx for the last forward's slice; stores this rank's ``grad_gamma``/``grad_beta``."""
        if self._saved is None or not self._synced:
            return super().backward(dy)
        x, mean, invstd, _ = self._saved
        dx, dgamma, dbeta = _sync.backward(self.comm, dy, x, mean, invstd, self.weight,
                                           self.bias, self.axis, self.activation, None, None,
                                           features=self.num_features)
        self._keep_grads(dgamma, dbeta)
        return dx

    __call__ = forward

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()
