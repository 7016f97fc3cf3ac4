"""The synchronized batch norm's protocol and numbers (fastbn._sync), without MPI: ranks are
threads of this process, exchanging through an in-memory communicator. The MPI and
torch.distributed engines are tested in subprocesses (test_distributed.py)."""
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _sync

TIMEOUT_S = 60


class ThreadGroup:
    """``size`` ranks as threads: allgather through a shared list and a barrier (a barrier
    that times out fails the test instead of hanging it)."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.collectives = [0] * size

    def comm(self, rank):
        group = self

        class Comm:
            def __init__(self):
                self.rank, self.size = rank, group.size

            def allgather(self, vector):
                group.collectives[rank] += 1
                group.slots[rank] = np.array(vector, dtype=np.float64)
                group.barrier.wait()
                gathered = np.stack(group.slots)
                group.barrier.wait()
                return gathered

        return Comm()

    def run(self, fn):
        """fn(comm, rank) on every rank; returns (results, errors) by rank."""
        results, errors = [None] * self.size, [None] * self.size

        def target(rank):
            try:
                results[rank] = fn(self.comm(rank), rank)
            except Exception as exc:  # noqa: BLE001 - handed back to the test
                errors[rank] = exc

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S * 3)
            assert not t.is_alive(), "a rank hung"
        return results, errors


LAYOUTS = [("NCHW", (10, 4, 9, 8), 1), ("NHWC", (10, 9, 8, 4), -1), ("NC", (10, 6), 1)]
#: uneven slices of the batch along axis 0, one empty
SLICES = [slice(0, 3), slice(3, 3), slice(3, 10)]


def _case(shape, dtype, ill):
    rng = np.random.default_rng(5)
    loc, scale = (1e4, 0.1) if ill else (0.5, 2.0)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype,ill", [(np.float64, False), (np.float32, True)],
                         ids=["float64", "float32-mean1e4"])
@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_sync_equals_whole_batch(name, shape, axis, dtype, ill, activation, backend):
    x, dy = _case(shape, dtype, ill)
    C = shape[axis]
    rng = np.random.default_rng(6)
    gamma, beta = 1 + 0.5 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    rm_ref, rv_ref = np.zeros(C, dtype), np.ones(C, dtype)
    ref = fastbn.forward(x, gamma, beta, axis=axis, activation=activation,
                         running_mean=rm_ref, running_var=rv_ref)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                           activation=activation)
    group = ThreadGroup(len(SLICES))

    def rank_fn(comm, rank):
        s = SLICES[rank]
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        fwd, _ = _sync.forward(comm, x[s], gamma, beta, axis, rm, rv, 0.1, 1e-5, activation,
                               None, backend)
        # the rounded mean goes back, as a caller of fastbn.distributed would pass it
        bwd = _sync.backward(comm, dy[s], x[s], fwd.mean, fwd.invstd, gamma, beta, axis,
                             activation, None, backend)
        return fwd, bwd, rm, rv

    results, errors = group.run(rank_fn)
    assert errors == [None] * 3, errors
    what = f"{backend} {name} {np.dtype(dtype).name} {activation}"
    y = np.concatenate([r[0].y for r in results])
    dx = np.concatenate([r[1].dx for r in results])
    for fwd, _, rm, rv in results[1:]:  # bit-identical statistics on every rank
        for a, b in ((fwd.mean, results[0][0].mean), (fwd.invstd, results[0][0].invstd),
                     (rm, results[0][2]), (rv, results[0][3])):
            assert np.array_equal(a, b), what
    y_tol, rel = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-4)
    assert np.abs(y - ref.y).max() <= y_tol, what
    assert np.abs(dx - bref.dx).max() <= rel * np.abs(bref.dx).max(), what
    np.testing.assert_allclose(results[0][2], rm_ref, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(results[0][3], rv_ref, rtol=1e-5, err_msg=what)
    dgamma = sum(r[1].dgamma.astype(np.float64) for r in results)  # shares add up
    dbeta = sum(r[1].dbeta.astype(np.float64) for r in results)
    scale = max(np.abs(bref.dgamma).max(), np.abs(bref.dbeta).max())
    assert np.abs(dgamma - bref.dgamma).max() <= rel * scale, what
    assert np.abs(dbeta - bref.dbeta).max() <= rel * scale, what
    extra = 1 if activation == "relu" and dtype == np.float32 else 0
    assert group.collectives == [4 + extra] * 3, "two collectives per pass"


def test_bad_input_on_one_rank_raises_on_every_rank():
    x = np.random.default_rng(0).normal(size=(6, 3))
    rm, rv = np.zeros(3), np.ones(3)
    group = ThreadGroup(3)

    def rank_fn(comm, rank):
        gamma = np.ones(4 if rank == 1 else 3)  # wrong length on rank 1
        return _sync.forward(comm, x, gamma, None, 1, rm if rank == 0 else rm.copy(),
                             rv if rank == 0 else rv.copy(), 0.1, 1e-5, None, None, None)

    _, errors = group.run(rank_fn)
    assert isinstance(errors[1], ValueError) and "gamma" in str(errors[1])
    for r in (0, 2):
        assert isinstance(errors[r], _sync.RemoteInputError) and "[1]" in str(errors[r])
    assert group.collectives == [1, 1, 1]  # the header only
    assert not rm.any() and (rv == 1).all()


def test_bad_backward_input_and_mismatched_features_raise_everywhere():
    group = ThreadGroup(2)

    def rank_fn(comm, rank):
        x = np.ones((4, 3 + rank))  # C differs between the ranks
        return _sync.forward(comm, x, None, None, 1, None, None, 0.1, 1e-5, None, None, None)

    _, errors = group.run(rank_fn)
    assert all(isinstance(e, ValueError) and "disagree" in str(e) for e in errors)
    group = ThreadGroup(2)
    x = np.random.default_rng(1).normal(size=(4, 3))

    def back_fn(comm, rank):
        dy = x[:2] if rank == 0 else x  # dy of the wrong shape on rank 0
        return _sync.backward(comm, dy, x, np.zeros(3), np.ones(3), None, None, 1, None, None,
                              None)

    _, errors = group.run(back_fn)
    assert "dy" in str(errors[0]) and isinstance(errors[1], _sync.RemoteInputError)


def test_relu_backward_without_beta_on_one_rank_raises_on_every_rank():
    """A backward with activation="relu" needs beta (fastbn.distributed.backward hands its
    left-out marker on to this layer); a rank that leaves it out raises, and the others
    raise with it instead of waiting in a collective."""
    from fastbn._validate import FORWARD_BETA

    group = ThreadGroup(2)
    x = np.random.default_rng(2).normal(size=(6, 3))
    beta = np.full(3, 0.5)

    def rank_fn(comm, rank):
        (y, mean, invstd), _ = _sync.forward(comm, x, None, beta, 1, None, None, 0.1, 1e-5,
                                             "relu", None, None)
        return _sync.backward(comm, np.ones_like(x), x, mean, invstd, None,
                              FORWARD_BETA if rank == 0 else beta, 1, "relu", None, None)

    _, errors = group.run(rank_fn)
    assert isinstance(errors[0], TypeError) and "beta must be given" in str(errors[0])
    assert isinstance(errors[1], _sync.RemoteInputError)


def test_global_count_below_two_raises_on_every_rank():
    group = ThreadGroup(3)

    def rank_fn(comm, rank):
        x = np.ones((1 if rank == 2 else 0, 3))  # one value per feature in the whole batch
        return _sync.forward(comm, x, None, None, 1, None, None, 0.1, 1e-5, None, None, None)

    _, errors = group.run(rank_fn)
    assert all(isinstance(e, ValueError) and "more than 1 value" in str(e) for e in errors)
    group = ThreadGroup(2)
    _, errors = group.run(lambda comm, rank: _sync.forward(
        comm, np.ones((0, 3)), None, None, 1, None, None, 0.1, 1e-5, None, None, None))
    assert all(isinstance(e, ValueError) and "got 0" in str(e) for e in errors)


def test_layers_fold_the_header_into_one_collective_per_pass():
    """With the C every rank expects (a layer's num_features), each pass is one collective,
    and a bad input (here: the wrong C on one rank) still raises on every rank."""
    x = np.random.default_rng(3).normal(2.0, 1.5, (9, 4, 5))
    dy = np.random.default_rng(4).normal(size=x.shape)
    ref = fastbn.forward(x)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd)
    group = ThreadGroup(3)

    def rank_fn(comm, rank):
        s = SLICES[rank]
        fwd, mean64 = _sync.forward(comm, x[s], None, None, 1, None, None, 0.1, 1e-5, None,
                                    None, None, features=4)
        bwd = _sync.backward(comm, dy[s], x[s], mean64, fwd.invstd, None, None, 1, None, None,
                             None, features=4)
        return fwd.y, bwd.dx

    results, errors = group.run(rank_fn)
    assert errors == [None] * 3 and group.collectives == [2, 2, 2]
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), ref.y, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), bref.dx, atol=1e-12)
    group = ThreadGroup(3)

    def bad_fn(comm, rank):
        xr = x[:, :3] if rank == 2 else x  # 3 features where the layer has 4
        return _sync.forward(comm, xr, None, None, 1, None, None, 0.1, 1e-5, None, None, None,
                             features=4)

    _, errors = group.run(bad_fn)
    assert "num_features=4" in str(errors[2])
    assert all(isinstance(errors[r], _sync.RemoteInputError) for r in (0, 1))
    assert group.collectives == [1, 1, 1]
