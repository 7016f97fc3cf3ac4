"""Synchronized batch norm, independent of the engine that moves the numbers.

:mod:`fastbn.distributed` (mpi4py) and :mod:`fastbn._torch_sync` (torch.distributed) wrap
their engine in a *communicator*: an object with ``rank``, ``size`` and one method,
``allgather(vector)``, which takes a float64 vector of the same length on every rank and
returns a (size, length) float64 array of every rank's vector, in rank order. Everything else
is here, and is the split phases of :mod:`fastbn.phases` with a gather between them.

Protocol (the same collectives in the same order on every rank, whatever happens):

1. each rank checks its own arguments, keeping the error if there is one;
2. **header**: every rank sends ``(error flag, C, local count)``: three doubles. If any rank
   failed, every rank raises (the failing one its own error, the others
   :class:`RemoteInputError` naming it), and no data collective is left waiting. Differing
   feature counts and a global count below 2 in training raise on every rank too;
3. **data**: forward gathers each rank's ``(mean, m2)`` (2C doubles) and merges them with
   Chan's update in rank order; backward gathers ``(sum_dy, sum_dy_xmu, sum_xmu)`` (3C
   doubles) and adds them in rank order. Every rank merges the same numbers in the same order,
   so every rank gets the same bits.

The layers know C in advance (``num_features``), so they fold the header into the data
message (``features=C``): one collective per pass, of ``(error flag, count, data)``, where a
rank whose input is bad (a wrong C included) sends its flag and zeros.

A gather, rather than an allreduce, because it is exact and deterministic by construction: an
allreduce of (count, mean, M2) has no built-in operator, and a sum reduced in an order the
library chooses need not give every rank the same bits. Its cost grows with the number of
ranks (each receives ``size x 2C`` doubles): the README's "Distributed training" gives the
figures, and the allreduce that would replace it at scale.

With ``activation="relu"``, backward needs the forward's float64 mean for the mask; when the
mean given is rounded (float32), one more gather (C doubles of ``sum(x - mean)``) recovers it
first. The layers keep the float64 mean and never need it.
"""
import numpy as np

from . import _phase_core
from ._common import BackwardResult, stats_dtype


class RemoteInputError(ValueError):
    """Another rank's input was rejected; that rank raised the error itself. Raised on every
    other rank instead of leaving them waiting in a collective."""


def _agree(comm, error, C, count, what):
    """The header collective: every rank's (error flag, C, count); raises on every rank if any
    failed. Returns the counts of all ranks (float64, rank order)."""
    header = comm.allgather(np.array([0.0 if error is None else 1.0, float(C), float(count)]))
    if error is not None:
        raise error
    failed = [r for r in range(comm.size) if header[r, 0] != 0.0]
    if failed:
        raise RemoteInputError(f"{what}: the input of rank(s) {failed} was rejected there "
                               f"(see the error raised on that rank); nothing was computed")
    features = header[:, 1]
    if np.any(features != features[0]):
        raise ValueError(f"{what}: ranks disagree on the number of features (C by rank: "
                         f"{features.astype(int).tolist()})")
    return header[:, 2]


def _exchange(comm, error, C, count, payload, width, what, features):
    """A pass's collectives: (every rank's count, every rank's payload) in rank order, or an
    error raised on every rank.

    ``features`` None: the header (:func:`_agree`), then the payload (``payload()``, ``width``
    doubles; C may differ between ranks, which the header catches first). ``features`` = the C
    every rank expects (a layer's num_features): one collective of (error flag, count,
    payload), the payload of a failed rank zeros."""
    if features is None:
        counts = _agree(comm, error, C, count, what)
        return counts, comm.allgather(payload())
    if error is None and C != features:
        error = ValueError(f"x has {C} features where the layer has num_features={features}")
    message = np.zeros(2 + width)
    if error is None:
        try:
            message[1] = count
            message[2:] = payload()
        except Exception as exc:  # noqa: BLE001 - this rank must still send its flag
            error = exc
    if error is not None:
        message[:] = 0.0
        message[0] = 1.0
    gathered = comm.allgather(message)
    if error is not None:
        raise error
    failed = [r for r in range(comm.size) if gathered[r, 0] != 0.0]
    if failed:
        raise RemoteInputError(f"{what}: the input of rank(s) {failed} was rejected there "
                               f"(see the error raised on that rank); nothing was computed")
    return gathered[:, 1], gathered[:, 2:]


def forward(comm, x, gamma, beta, axis, running_mean, running_var, momentum, eps, activation,
            out, backend, local_error=None, features=None):
    """Training forward over the global batch. Returns (ForwardResult, float64 mean).

    ``local_error``: an error the caller found already (the rank still takes part in the
    collectives, and raises it there). ``features``: the C every rank expects, where the
    caller knows it (a layer): the header travels with the data, one collective instead of
    two."""
    error, a = local_error, None
    if error is None:
        try:
            a = _phase_core.normalize_inputs(x, gamma, beta, axis, running_mean, running_var,
                                             momentum, eps, activation, out, backend)
        except (TypeError, ValueError) as exc:
            error = exc
    C = 0 if a is None else a.C

    def payload():
        local = _phase_core.batch_stats_checked(a.x, a.axis, a.backend)
        return np.concatenate([local.mean, local.m2])

    counts, gathered = _exchange(comm, error, C, 0 if a is None else a.m, payload,
                                 2 * (features or 0), "forward", features)
    total = float(counts.sum())
    if total < 2:
        raise ValueError(f"forward: training needs more than 1 value per feature in the whole "
                         f"batch, got {total:g} over {comm.size} rank(s) (local counts "
                         f"{counts.astype(int).tolist()})")
    count, mean, m2 = _phase_core.merge_stats_checked(
        [(counts[r], gathered[r, :C], gathered[r, C:]) for r in range(comm.size)])
    result = _phase_core.normalize_checked(a, count, mean, m2 / count)
    return result, mean


def _backward_checked(dy, x, mean, invstd, gamma, beta, axis, activation, out, backend):
    x, dy, axis, C, mean_in, invstd, gamma, beta, activation = _phase_core.backward_inputs(
        dy, x, mean, invstd, gamma, beta, axis, activation)
    backend = _phase_core.resolve_backend(_phase_core._backend(backend))
    out = _phase_core._out(out, x, "x", (dy, x))
    return x, dy, axis, C, mean_in, invstd, gamma, beta, activation, out, backend


def backward(comm, dy, x, mean, invstd, gamma, beta, axis, activation, out, backend,
             local_error=None, features=None):
    """Training backward: dx of the global batch, and this rank's dgamma and dbeta.
    ``local_error``, ``features``: as in :func:`forward`."""
    error, checked = local_error, None
    if error is None:
        try:
            checked = _backward_checked(dy, x, mean, invstd, gamma, beta, axis, activation,
                                        out, backend)
        except (TypeError, ValueError) as exc:
            error = exc
    C = m = 0
    if checked is not None:
        x, dy, axis, C, mean_in, invstd, gamma, beta, activation, out, backend = checked
        m = _phase_core._values_per_feature(x.shape, axis)
    mean_given = mask_mean = local = None

    def payload():
        nonlocal local
        local = _phase_core.backward_sums_checked(dy, x, axis, C, mean_given, invstd, gamma,
                                                  beta, activation, backend,
                                                  mask_mean=mask_mean)
        return np.concatenate([local.sum_dy, local.sum_dy_xmu, local.sum_xmu])

    if checked is not None:
        mean_given = mask_mean = np.asarray(mean_in, dtype=np.float64)
    rounded_relu_mean = checked is not None and activation == "relu" \
        and mean_in.dtype != np.float64
    if features is None:
        counts = _agree(comm, error, C, m, "backward")
        if rounded_relu_mean:
            # the mask needs the forward's float64 mean: recover it from sum(x - mean) first
            local_sx = np.zeros(C)
            if m:
                stats = _phase_core.batch_stats_checked(x, axis, backend)
                local_sx = stats.count * (stats.mean - mean_given)
            sx = comm.allgather(local_sx).sum(axis=0)
            whole_sx = _phase_core.GradSums(float(counts.sum()), sx, sx, sx)
            mask_mean, _ = _phase_core.refine(mean_in, whole_sx)
        gathered = comm.allgather(payload())
    else:
        if error is None and rounded_relu_mean:
            error = ValueError("mean must be float64 with activation='relu' (the forward's "
                               "float64 mean, which the layers keep)")
        counts, gathered = _exchange(comm, error, C, m, payload, 3 * features, "backward",
                                     features)
    total = float(counts.sum())
    if total < 1:
        raise ValueError("backward: the whole batch is empty (no rank has values)")
    summed = gathered.sum(axis=0)  # rank order, the same on every rank
    whole = _phase_core.GradSums(total, summed[:C], summed[C:2 * C], summed[2 * C:])
    refined, offset = _phase_core.refine(mean_in, whole)
    dgamma, dbeta = _phase_core.param_grads(whole, offset, invstd)
    dx = _phase_core.backward_dx_checked(dy, x, axis, C, refined, invstd, gamma, beta,
                                         activation, total, dgamma, dbeta, out, mask_mean,
                                         backend)
    share_gamma, share_beta = _phase_core.param_grads(local, offset, invstd)
    sdt = stats_dtype(x.dtype)
    return BackwardResult(dx, share_gamma.astype(sdt), share_beta.astype(sdt))

