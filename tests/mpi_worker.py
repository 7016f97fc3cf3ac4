"""Run under ``mpiexec -n N python tests/mpi_worker.py`` by test_distributed.py: every rank
checks fastbn.distributed against fastbn on the concatenated batch, case after case, in one
launch. A failure on any rank aborts the whole job (nonzero exit, no hang)."""
import doctest
import sys
import traceback

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import distributed

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
#: The default backend only: every compiled backend is checked against the same core in-process
#: (test_sync_core.py, test_phases.py); here the engine is under test.
BACKENDS = [fastbn.available_backends()[0]]
LAYOUTS = [("NCHW", (10, 4, 6, 5), 1), ("NHWC", (10, 6, 5, 4), -1), ("NC", (10, 6), 1)]


class CountingCommunicator(distributed.MPICommunicator):
    """Counts the collectives it runs."""

    calls = 0

    def allgather(self, vector):
        self.calls += 1
        return super().allgather(vector)


def slices(n, empty_rank):
    """Uneven slices of n samples, one per rank, the slice of ``empty_rank`` empty."""
    sizes = [0 if r == empty_rank else r + 1 for r in range(SIZE)]
    sizes[-1 if empty_rank != SIZE - 1 else 0] += n - sum(sizes)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(edges[r]), int(edges[r + 1])) for r in range(SIZE)]


def same_everywhere(*arrays):
    """Every rank holds these arrays bit for bit."""
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    theirs = WORLD.allgather(mine)
    assert all(t == mine for t in theirs), "statistics differ between ranks"


def check_numbers():
    for backend in BACKENDS:
        for name, shape, axis in LAYOUTS:
            for dtype, loc, scale in ((np.float64, 0.5, 2.0), (np.float32, 1e4, 0.1)):
                for activation in (None, "relu"):
                    for empty_rank in (None, SIZE - 1):
                        check_case(backend, name, shape, axis, dtype, loc, scale, activation,
                                   empty_rank)


def check_case(backend, name, shape, axis, dtype, loc, scale, activation, empty_rank):
    what = f"rank {RANK}: {backend} {name} {np.dtype(dtype).name} {activation} {empty_rank}"
    rng = np.random.default_rng(7)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    gamma, beta = 1 + 0.5 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    rm_ref, rv_ref = np.zeros(C, dtype), np.ones(C, dtype)
    ref = fastbn.forward(x, gamma, beta, axis=axis, activation=activation, running_mean=rm_ref,
                         running_var=rv_ref, backend=backend)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                           activation=activation, backend=backend)
    s = slices(shape[0], empty_rank)[RANK]
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    comm = CountingCommunicator()
    y, mean, invstd = distributed.forward(x[s], gamma, beta, comm=comm, axis=axis,
                                          running_mean=rm, running_var=rv,
                                          activation=activation, backend=backend)
    dx, dgamma, dbeta = distributed.backward(dy[s], x[s], mean, invstd, gamma, beta,
                                             comm=comm, axis=axis, activation=activation,
                                             backend=backend)
    extra = 1 if activation == "relu" and dtype == np.float32 else 0
    assert comm.calls == 4 + extra, f"{what}: {comm.calls} collectives"
    same_everywhere(mean, invstd, rm, rv)
    y_tol, rel = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-4)
    assert y.shape == x[s].shape and y.dtype == x.dtype, what
    if y.size:
        assert np.abs(y - ref.y[s]).max() <= y_tol, what
        assert np.abs(dx - bref.dx[s]).max() <= rel * np.abs(bref.dx).max(), what
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-5, err_msg=what)
    total_gamma = WORLD.allreduce(dgamma.astype(np.float64))  # the shares add up
    total_beta = WORLD.allreduce(dbeta.astype(np.float64))
    gscale = max(np.abs(bref.dgamma).max(), np.abs(bref.dbeta).max())
    assert np.abs(total_gamma - bref.dgamma).max() <= rel * gscale, what
    assert np.abs(total_beta - bref.dbeta).max() <= rel * gscale, what


def check_eval_does_not_communicate():
    x = np.random.default_rng(1).normal(size=(4 + RANK, 3))
    comm = CountingCommunicator()
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    y, mean, invstd = distributed.forward(x, comm=comm, training=False, running_mean=rm,
                                          running_var=rv)
    distributed.backward(np.ones_like(x), x, mean, invstd, comm=comm, training=False)
    assert comm.calls == 0
    np.testing.assert_array_equal(y, fastbn.forward(x, training=False, running_mean=rm,
                                                    running_var=rv).y)


def check_layer_over_steps():
    """SyncBatchNorm on slices, with summed gradient shares and an SGD step, equals
    fastbn.BatchNorm on the whole batch, over several steps."""
    C, lr = 5, 0.1
    whole = fastbn.BatchNorm(C, dtype=np.float64, activation="relu")
    sync = distributed.SyncBatchNorm(C, dtype=np.float64, activation="relu", momentum=None,
                                     comm=CountingCommunicator())
    whole.momentum = None
    rng = np.random.default_rng(3)
    for step in range(3):
        x = rng.normal(2.0, 3.0, (9, C, 4))
        dy = rng.standard_normal(x.shape)
        s = slices(9, 0 if step == 1 else None)[RANK]
        y_whole = whole.forward(x)
        dx_whole = whole.backward(dy)
        y = sync.forward(x[s])
        dx = sync.backward(dy[s])
        assert np.abs(y - y_whole[s]).max() <= 1e-12 if y.size else True
        assert np.abs(dx - dx_whole[s]).max() <= 1e-12 * np.abs(dx_whole).max() if dx.size \
            else True
        grads = [WORLD.allreduce(g) for g in (sync.grad_gamma, sync.grad_beta)]
        for p, g, p_ref, g_ref in zip(sync.parameters(), grads, whole.parameters(),
                                      (whole.grad_gamma, whole.grad_beta)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-12)
            p -= lr * g
            p_ref -= lr * g_ref
    assert sync.comm.calls == 2 * 3, "a layer: one collective per pass"
    state, ref_state = sync.state_dict(), whole.state_dict()
    assert sorted(state) == sorted(ref_state)
    for key in state:
        np.testing.assert_allclose(state[key], ref_state[key], rtol=1e-11, err_msg=key)
    same_everywhere(*state.values())
    sync.eval()  # eval: running statistics, no communication
    x = rng.normal(size=(2 + RANK, C, 4))
    np.testing.assert_allclose(sync.forward(x), whole.eval().forward(x), rtol=1e-11,
                               atol=1e-12)


def check_errors_raise_everywhere():
    x = np.random.default_rng(2).normal(size=(6, 3))
    gamma = np.ones(4 if RANK == 1 else 3)  # wrong on rank 1 only
    rm, rv = np.zeros(3), np.ones(3)
    try:
        distributed.forward(x, gamma, running_mean=rm, running_var=rv)
    except distributed.RemoteInputError as exc:
        assert RANK != 1 and "[1]" in str(exc)
    except ValueError as exc:
        assert RANK == 1 and "gamma" in str(exc)
    else:
        raise AssertionError("no error")
    assert not rm.any() and (rv == 1).all()
    dy = x[:2] if RANK == SIZE - 1 else x  # bad dy on the last rank
    try:
        distributed.backward(dy, x, np.zeros(3), np.ones(3))
    except distributed.RemoteInputError:
        assert RANK != SIZE - 1
    except ValueError as exc:
        assert RANK == SIZE - 1 and "dy" in str(exc)
    else:
        raise AssertionError("no error")
    try:  # an empty global batch
        distributed.forward(np.ones((0, 3)))
    except ValueError as exc:
        assert "got 0" in str(exc)
    else:
        raise AssertionError("no error")
    # and the communicator still works afterwards
    assert WORLD.allreduce(1) == SIZE


def main():
    try:
        check_numbers()
        check_eval_does_not_communicate()
        check_layer_over_steps()
        check_errors_raise_everywhere()
        result = doctest.testmod(distributed)
        assert result.failed == 0 and result.attempted > 0, result
        WORLD.Barrier()
    except BaseException:  # noqa: BLE001 - one rank failing must end every rank
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        WORLD.Abort(1)
    print(f"rank {RANK} of {SIZE}: ok", flush=True)


if __name__ == "__main__":
    main()
