"""Reliability: threads, fork, thread control, hostile inputs, fuzzing, memory, huge arrays.

Each test states the property it proves; each can fail (they were checked against broken
variants: a workqueue layer without the launch lock, an unbounded copy, a leaked scratch)."""
import hashlib
import math
import multiprocessing
import os
import queue as queue_module
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from conftest import assert_close, make_x

numba = pytest.importorskip("numba")

# Both families, both dtypes; small enough to run quickly. The thread and fork tests run them on
# the parallel twins whatever their size (the parallel_kernels fixture).
CASES = [((16, 32, 24, 24), 1, np.float32), ((16, 24, 24, 32), -1, np.float32),
         ((2048, 96), 1, np.float64), ((8, 16, 40, 40), 1, np.float64), ((64, 5), 1, np.float32)]


@pytest.fixture
def parallel_kernels(monkeypatch):
    """Every kernel on the thread team, for the whole test (every Python thread, and children
    forked from it), whatever the size crossover says."""
    from fastbn import _backends

    monkeypatch.setattr(_backends, "_forced", True)


def compute(shape, axis, dtype, seed):
    x = make_x(shape, dtype, seed=seed)
    dy = make_x(shape, dtype, seed=seed + 100)
    y, mean, invstd = fastbn.forward(x, axis=axis)
    dx, dg, db = fastbn.backward(dy, x, mean, invstd, axis=axis)
    return y, mean, invstd, dx, dg, db


def test_eight_python_threads_at_once_give_the_serial_results(parallel_kernels):
    """Concurrent calls (same and different shapes/dtypes, parallel kernels) from 8 threads
    return exactly the bits a lone call returns (results do not depend on scheduling)."""
    jobs = [(CASES[i % len(CASES)], i) for i in range(8)]
    expected = {i: compute(*case, seed=i) for case, i in jobs}
    barrier = threading.Barrier(len(jobs))
    failures = []

    def worker(case, i):
        try:
            barrier.wait()
            for _ in range(5):
                got = compute(*case, seed=i)
                for a, b in zip(got, expected[i]):
                    np.testing.assert_array_equal(a, b)
        except Exception as exc:  # reported below, with the worker's case
            failures.append((case, repr(exc)))

    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not failures, failures


def _digest(results):
    return hashlib.sha256(b"".join(r.tobytes() for r in results)).hexdigest()


def _spy_parallel_runs(backend, monkeypatch):
    """The pids of the processes that ran forward_train_outer on more than one thread: Numba's
    parallel twin, or a Cython launch with a team."""
    runs = []
    if backend == "numba":
        from fastbn import _numba_kernels

        kern = _numba_kernels.forward_train_outer
        real = kern.parallel

        def parallel(*args):
            runs.append(os.getpid())
            return real(*args)

        monkeypatch.setattr(kern, "parallel", parallel)
    else:
        from fastbn import _backends, _cy_kernels

        real = _cy_kernels.forward_train_outer

        def spy(threads, *args):
            if threads > 1:
                runs.append(os.getpid())
            return real(threads, *args)

        monkeypatch.setattr(_cy_kernels, "forward_train_outer", spy)
        # the spy sees the Python path's launches; test_fast_path.py forks after the
        # compiled call path's
        monkeypatch.setattr(fastbn.api, "_fast_forward", _backends._no_call_path)
        monkeypatch.setattr(fastbn.api, "_fast_backward", _backends._no_call_path)
    return runs


def _child(queue, shape, axis, dtype, runs):
    try:
        digest = _digest(compute(shape, axis, dtype, seed=7))
        queue.put((digest, sum(pid == os.getpid() for pid in runs)))
    except BaseException as exc:
        queue.put((repr(exc), None))


# JAX, when another test imported it, warns at every fork; the child here never uses JAX.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_child_forked_after_parallel_kernels_can_run_them(backend, monkeypatch):
    """PyTorch's DataLoader forks workers after the parent ran kernels: the child must run
    them too (GNU OpenMP would abort or hang there). x is large enough for the thread team
    (no forcing): the parent runs its kernels in parallel; the child runs Numba's parallel
    twin on TBB, and the Cython kernels on its own thread (GNU OpenMP's pool does not survive
    fork; see _backends._cython_launch)."""
    if fastbn.get_num_threads() < 2:
        pytest.skip("needs at least 2 CPUs for a thread team")
    shape, axis, dtype = CASES[0]
    runs = _spy_parallel_runs(backend, monkeypatch)
    expected = _digest(compute(shape, axis, dtype, seed=7))  # the parent runs them first
    assert runs == [os.getpid()], "the parent did not run the parallel kernel"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, shape, axis, dtype, runs))
    proc.start()
    try:
        got, child_parallel_runs = queue.get(timeout=120)
    except queue_module.Empty:
        got, child_parallel_runs = "no answer: the child hung", None
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    assert got == expected
    assert proc.exitcode == 0
    if backend == "numba":
        assert numba.threading_layer() == "tbb"
        assert child_parallel_runs == 1, "the child did not run the parallel twin"
    else:
        assert child_parallel_runs == 0, "the child ran an OpenMP team"


def _os_threads():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.backends("numba")
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_calls_from_a_thread_pool_do_not_oversubscribe(parallel_kernels):
    """Eight caller threads share one kernel thread pool: the process never holds more OS
    threads than the callers plus Numba's pool (plus a few of the runtime's own)."""
    compute(*CASES[0], seed=1)  # start the pool
    base = _os_threads()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _os_threads())

    def worker(i):
        for _ in range(3):
            compute(*CASES[i % 4], seed=i)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    sampler.join()
    extra = peak[0] - base - len(workers) - 1  # minus callers and sampler
    assert extra <= numba.config.NUMBA_NUM_THREADS + 2, f"{extra} extra OS threads"


@pytest.mark.backends("cython")
def test_cython_runs_one_openmp_team_at_a_time(monkeypatch, parallel_kernels):
    """GNU OpenMP gives every calling thread its own team: eight callers launching at once
    would run 8 x n threads on n cores. The Cython launches take turns (a try-lock): while one
    team runs, other callers run their kernel on their own thread, same bits."""
    import functools

    from fastbn import _backends, _cy_kernels

    active = []
    overlaps = []
    guard = threading.Lock()

    def spied(kern):
        @functools.wraps(kern)
        def spy(threads, *args):
            with guard:
                if threads > 1:
                    overlaps.append(len(active))
                    active.append(threads)
            try:
                return kern(threads, *args)
            finally:
                with guard:
                    if threads > 1:
                        active.remove(threads)
        return spy

    for name in ("forward_train_outer", "forward_train_inner", "backward_outer",
                 "backward_inner"):
        monkeypatch.setattr(_cy_kernels, name, spied(getattr(_cy_kernels, name)))
    # the spies see the Python path's launches; test_fast_path.py checks the compiled one's
    monkeypatch.setattr(fastbn.api, "_fast_forward", _backends._no_call_path)
    monkeypatch.setattr(fastbn.api, "_fast_backward", _backends._no_call_path)
    expected = [compute(*CASES[i % 4], seed=i) for i in range(8)]
    results = [None] * 8

    def worker(i):
        for _ in range(3):
            results[i] = compute(*CASES[i % 4], seed=i)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert overlaps and max(overlaps) == 0, "two OpenMP teams ran at once"
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_set_num_threads_is_honoured(monkeypatch):
    """With one thread, no parallel twin runs; the setting is validated; results agree."""
    from fastbn import _backends, _numba_kernels

    x = make_x(*CASES[0][:1], dtype=np.float32)
    before = fastbn.get_num_threads()
    full = fastbn.forward(x)
    try:
        fastbn.set_num_threads(1)
        assert fastbn.get_num_threads() == 1

        def forbidden(*args):
            raise AssertionError("parallel kernel used with one thread")

        monkeypatch.setattr(_numba_kernels.forward_train_outer, "parallel", forbidden)
        one = fastbn.forward(x)
    finally:
        fastbn.set_num_threads(before)
    for a, b in zip(full, one):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="between 1 and"):
        fastbn.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    with pytest.raises(TypeError):
        fastbn.set_num_threads(1.5)
    assert _backends.get_num_threads() == before


def test_thread_count_from_environment(monkeypatch):
    from fastbn import _backends

    monkeypatch.setattr(_backends, "_num_threads", None)
    monkeypatch.setenv("FASTBN_NUM_THREADS", "1")
    assert fastbn.get_num_threads() == 1
    monkeypatch.setattr(_backends, "_num_threads", None)
    monkeypatch.setenv("FASTBN_NUM_THREADS", "lots")
    with pytest.raises(TypeError, match="FASTBN_NUM_THREADS"):
        fastbn.get_num_threads()
    monkeypatch.setattr(_backends, "_num_threads", None)


# --- hostile but valid inputs ---------------------------------------------------------------

@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
def test_parameters_of_another_dtype_are_cast(x_dtype, param_dtype):
    """gamma/beta/running statistics of any floating dtype: gamma and beta are used in float64,
    running statistics are updated in their own dtype."""
    x = make_x((12, 3, 5), x_dtype)
    gamma = np.array([0.5, 1.0, 2.0], param_dtype)
    beta = np.array([0.1, 0.0, -0.1], param_dtype)
    rm, rv = np.zeros(3, param_dtype), np.ones(3, param_dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    got = fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv)
    ref = fastbn.reference.forward(x, gamma, beta, running_mean=rm_ref, running_var=rv_ref)
    assert_close(got.y, ref.y, x_dtype, "y", scale=4)
    assert rm.dtype == param_dtype and rv.dtype == param_dtype
    # Batch means differ in their last float64 bits (summation order), so compare within
    # the parameters' own precision.
    assert_close(rm, rm_ref, param_dtype, "running_mean", scale=4)
    assert_close(rv, rv_ref, param_dtype, "running_var", scale=4)


def test_strided_running_statistics_are_updated_in_place():
    x = make_x((8, 3), np.float64)
    storage = np.zeros((2, 6))
    rm, rv = storage[0, ::2], storage[1, 1::2]
    rv[:] = 1.0
    fastbn.forward(x, running_mean=rm, running_var=rv, momentum=0.5)
    np.testing.assert_allclose(storage[0, ::2], 0.5 * x.mean(0))
    np.testing.assert_allclose(storage[1, 1::2], 0.5 + 0.5 * x.var(0, ddof=1))
    assert not storage[0, 1::2].any()


@pytest.mark.parametrize("shape,axis,training", [
    ((4, 3, 0), 1, False),   # empty spatial axis, eval: empty output
    ((0, 3), 1, False),      # empty batch, eval
    ((4, 0, 5), 1, True),    # no features: nothing to normalize
    ((1, 6), 1, False),      # one value per feature is fine in eval mode
])
def test_zero_size_and_single_value_inputs(shape, axis, training):
    x = np.ones(shape, np.float32)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fastbn.forward(x, axis=axis, training=training, running_mean=rm,
                                     running_var=rv)
    ref = fastbn.reference.forward(x, axis=axis, training=training, running_mean=rm.copy(),
                                   running_var=rv.copy())
    assert y.shape == shape and mean.shape == (C,)
    np.testing.assert_allclose(y, ref.y, atol=1e-6)
    dx, dg, db = fastbn.backward(x, x, mean, invstd, axis=axis, training=training)
    assert dx.shape == shape and dg.shape == (C,) and db.shape == (C,)
    np.testing.assert_allclose(dx, fastbn.reference.backward(x, x, mean, invstd, axis=axis,
                                                             training=training).dx, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((64, 3, 8), 1), ((64, 8, 3), -1), ((4, 3, 80), 1)])
def test_values_near_float32_max_stay_finite_and_accurate(shape, axis):
    """Data spanning +-3.4e38: x - mean would overflow float32 and gamma*invstd would be
    subnormal; both passes must still match the float64 reference."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-3.4e38, 3.4e38, shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = fastbn.forward(x, axis=axis)
    dx = fastbn.backward(dy, x, mean, invstd, axis=axis).dx
    ref_y = fastbn.reference.forward(x, axis=axis).y
    ref_dx = fastbn.reference.backward(dy, x, mean, invstd, axis=axis).dx
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert np.abs(y - ref_y).max() < 1e-6
    assert np.abs(dx - ref_dx).max() < 1e-6 * np.abs(ref_dx).max()


@pytest.mark.parametrize("shape,axis", [((64, 6), 1), ((8, 4, 4, 6), -1), ((64, 6, 3), 1),
                                        ((4, 6, 80), 1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_features_of_every_magnitude_in_one_call(shape, axis, activation):
    """One feature near float32's max (it needs the prescaled path), one of magnitude 1e-30,
    the rest ordinary: the compiled kernels finish ordinary features in a vectorized pass and
    redo the call's features one at a time when any is not ordinary; every feature must come
    out as the reference computes it, in both passes."""
    rng = np.random.default_rng(3)
    x = np.moveaxis(rng.standard_normal(shape), axis, 0)
    x[0] = rng.uniform(-3.4e38, 3.4e38, x[0].shape)
    x[1] *= 1e-30
    x[2] += 1e4
    x = np.moveaxis(x, 0, axis).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    y, mean, invstd = fastbn.forward(x, gamma, beta, axis=axis, activation=activation)
    dx, dgamma, dbeta = fastbn.backward(dy, x, mean, invstd, gamma, beta, axis=axis,
                                        activation=activation)
    ref = fastbn.reference.forward(x, gamma, beta, axis=axis, activation=activation)
    ref_b = fastbn.reference.backward(dy, x, mean, invstd, gamma, beta, axis=axis,
                                      activation=activation)
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, ref.invstd, rtol=1e-6)
    np.testing.assert_allclose(y, ref.y, atol=1e-5)
    scale = np.moveaxis(np.abs(ref_b.dx), axis, 0).reshape(C, -1).max(axis=1)
    err = np.moveaxis(np.abs(dx - ref_b.dx), axis, 0).reshape(C, -1).max(axis=1)
    assert (err <= 1e-5 * scale + 1e-30).all(), f"dx error per feature {err}, scale {scale}"
    np.testing.assert_allclose(dbeta, ref_b.dbeta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgamma, ref_b.dgamma, rtol=1e-5, atol=1e-4)


# --- fuzzing ----------------------------------------------------------------------------------

def _junk():
    arrays = st.builds(
        lambda shape, dtype, seed: np.random.default_rng(seed).standard_normal(shape)
        .astype(dtype),
        st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
        st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.bool_, np.complex64]),
        st.integers(0, 1000))
    return st.one_of(st.none(), arrays, st.integers(-3, 3), st.floats(allow_nan=True),
                     st.text(max_size=3), st.lists(st.floats(-2, 2), max_size=4),
                     st.just(np.float32(1.0)), st.just(object()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(x=_junk(), gamma=_junk(), beta=_junk(), axis=_junk(), training=_junk(),
       running_mean=_junk(), running_var=_junk(), momentum=_junk(), eps=_junk(), out=_junk(),
       real_x=st.booleans())
def test_fuzz_forward_ends_in_a_result_or_a_clean_error(x, gamma, beta, axis, training,
                                                        running_mean, running_var, momentum,
                                                        eps, out, real_x):
    if real_x:  # half of the runs get a valid x, so that the other arguments are reached
        x = make_x((5, 3, 2), np.float32)
    kwargs = {k: v for k, v in dict(gamma=gamma, beta=beta, axis=axis, training=training,
                                    running_mean=running_mean, running_var=running_var,
                                    momentum=momentum, eps=eps, out=out).items()
              if v is not None}
    snapshots = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    try:
        y, mean, invstd = fastbn.forward(x, **kwargs)
    except (TypeError, ValueError):
        for k, v in snapshots.items():
            np.testing.assert_array_equal(kwargs[k], v, err_msg=f"{k} changed on error")
        return
    x_arr = np.asarray(x)
    assert y.shape == x_arr.shape and y.dtype == x_arr.dtype
    assert mean.shape == invstd.shape == (x_arr.shape[kwargs.get("axis", 1)],)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(dy=_junk(), mean=_junk(), invstd=_junk(), gamma=_junk(), axis=_junk(),
       training=_junk(), out=_junk())
def test_fuzz_backward_ends_in_a_result_or_a_clean_error(dy, mean, invstd, gamma, axis,
                                                         training, out):
    x = make_x((5, 3, 2), np.float32)
    kwargs = {k: v for k, v in dict(gamma=gamma, axis=axis, training=training, out=out).items()
              if v is not None}
    try:
        dx, dg, db = fastbn.backward(dy, x, mean, invstd, **kwargs)
    except (TypeError, ValueError):
        return
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dg.shape == db.shape == (x.shape[kwargs.get("axis", 1)],)


# --- memory -----------------------------------------------------------------------------------

def _peak_traced(run):
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape,axis", [((8, 32, 32, 32), 1), ((64, 32, 32, 32), -1),
                                        ((4096, 512), 1)])
def test_scratch_memory_does_not_grow_with_the_batch(shape, axis):
    """Forward and backward allocate (NumPy and Numba's runtime, both traced by tracemalloc)
    per-feature vectors and per-block partial sums: at most 3 x MAX_CHUNKS x row width
    float64 values (1.5 MiB for 1024-wide rows), whatever the batch. The shapes here have
    enough rows for all 64 blocks, so twice the batch must not allocate more. Without out=,
    one output array more."""
    peaks = {}
    for scale in (1, 2):
        big = (shape[0] * scale,) + shape[1:]
        x = make_x(big, np.float32)
        dy = make_x(big, np.float32, seed=3)
        y = np.empty_like(x)
        _, mean, invstd = fastbn.forward(x, axis=axis, out=y)  # warm: compile, plan cache
        fastbn.backward(dy, x, mean, invstd, axis=axis, out=y)
        peaks[scale] = (
            _peak_traced(lambda: fastbn.forward(x, axis=axis, out=y)),
            _peak_traced(lambda: fastbn.backward(dy, x, mean, invstd, axis=axis, out=y)),
            _peak_traced(lambda: fastbn.forward(x, axis=axis)) - x.nbytes)
    for small, large in zip(peaks[1], peaks[2]):
        assert large <= small + 64 * 1024, f"scratch grew with the batch: {peaks}"
        assert large <= 3 * 64 * 1024 * 8 + 256 * 1024, f"scratch above its bound: {peaks}"


LEAK_CHECK = """
import os
import numpy as np, fastbn

if os.environ["FASTBN_BACKEND"] == "numba":
    from numba.core.runtime import rtsys
    stats = rtsys.get_allocation_stats
else:  # the Cython kernels' scratch is malloc/free: the resident memory shows a leak
    from collections import namedtuple
    stats = lambda: namedtuple("S", "alloc free mi_alloc mi_free")(0, 0, 0, 0)

def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
x4 = np.random.default_rng(1).standard_normal((16, 8, 40, 40)).astype(np.float32)
y, y4 = np.empty_like(x), np.empty_like(x4)

def step():
    for arr, out in ((x, y), (x4, y4)):
        _, mean, invstd = fastbn.forward(arr, out=out)
        fastbn.backward(arr, arr, mean, invstd, out=out)
        fastbn.forward(arr, training=False, running_mean=mean, running_var=invstd, out=out)

for _ in range(500):
    step()
before, rss_before = stats(), rss_bytes()
for _ in range(10_000):
    step()
after, rss_after = stats(), rss_bytes()
print(after.alloc - before.alloc - (after.free - before.free),
      after.mi_alloc - before.mi_alloc - (after.mi_free - before.mi_free),
      rss_after - rss_before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_leak_over_ten_thousand_calls():
    """10,000 rounds of forward, backward and eval forward (small serial and large parallel
    kernels): Numba's runtime frees every scratch array it allocates, and the process's
    resident memory does not grow (the one check that applies to the Cython kernels)."""
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    out = subprocess.run([sys.executable, "-c", LEAK_CHECK], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    leaked_allocs, leaked_meminfos, rss_growth = map(int, out.stdout.split())
    assert leaked_allocs == 0 and leaked_meminfos == 0
    assert rss_growth < 4 * 2**20, f"resident memory grew by {rss_growth} bytes"


def _available_bytes():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_available_bytes() < 12 * 2**30, reason="needs 12 GiB of free memory")
@pytest.mark.parametrize("axis", [1, -1])
def test_more_than_two_to_the_31_elements(axis):
    """Indices past 2**31 elements: x is a broadcast (stride-0 batch axis, no memory), y and
    dx are real arrays of 2**31 + 2**27 float32 values (8.5 GiB), written everywhere."""
    C, B = 8, 2**10
    n = (2**31 + 2**27) // (C * B)
    base_shape = (1, C, B) if axis == 1 else (1, B, C)
    shape = (n, C, B) if axis == 1 else (n, B, C)
    base = make_x(base_shape, np.float32)
    x = np.broadcast_to(base, shape)
    assert x.size > 2**31
    y, mean, invstd = fastbn.forward(x, axis=axis)
    expected = fastbn.reference.forward(base, axis=axis).y
    for i in (0, n // 2, n - 1):
        np.testing.assert_allclose(y[i], expected[0], atol=1e-5)
    del y
    dx = fastbn.backward(x, x, mean, invstd, axis=axis).dx
    expected_dx = fastbn.reference.backward(base, base, mean, invstd, axis=axis).dx
    for i in (0, n - 1):
        np.testing.assert_allclose(dx[i], expected_dx[0], atol=1e-5)
    assert math.isfinite(float(dx[-1].sum()))


def test_threading_layer_is_the_safe_one():
    """Where the tbb package is installed (a dependency on x86-64), fastbn's Numba kernels run
    on TBB, in a plain venv too (the tbb wheel's library sits where the loader does not look).
    Fails, never skips, when TBB is installed but not active."""
    import importlib.metadata
    import platform

    from fastbn import _numba_layer

    if "NUMBA_THREADING_LAYER" in os.environ:
        pytest.skip("the user chose a threading layer")
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        assert platform.machine() not in _numba_layer.TBB_MACHINES, \
            "the tbb package, a dependency on this platform, is not installed"
        pytest.skip("no tbb package for this platform")
    from fastbn import _numba_kernels

    _numba_kernels.forward_train_outer(2, np.ones((2, 1, 64)), np.empty((2, 1, 64)),
                                       np.ones(1), np.zeros(1), 1e-5, np.empty((3, 1)),
                                       np.empty((4, 1)), False, 1)
    assert numba.threading_layer() == "tbb", _numba_layer.choice
    assert _numba_layer.choice.layer == "tbb"


_NO_TBB_SCRIPT = r"""
import hashlib, multiprocessing, os, sys, threading, warnings
sys.modules["numba.np.ufunc.tbbpool"] = None          # TBB's Numba extension cannot load
from fastbn import _numba_layer
_numba_layer.preload_tbb = lambda: (None, "hidden for this test")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastbn import _backends, _numba_kernels
import numba, numpy as np, fastbn
assert [w.category.__name__ for w in caught] == ["ThreadingLayerWarning"], caught
runs = []
real = _numba_kernels.forward_train_outer.parallel
def parallel(*args):
    runs.append(os.getpid())
    return real(*args)
_numba_kernels.forward_train_outer.parallel = parallel

def compute(seed):
    x = np.random.default_rng(seed).normal(3.0, 2.0, (16, 32, 24, 24)).astype(np.float32)
    y, mean, invstd = fastbn.forward(x, backend="numba")
    dx = fastbn.backward(x, x, mean, invstd, backend="numba").dx
    return hashlib.sha256(y.tobytes() + dx.tobytes()).hexdigest()

with _backends.forced_parallel(True):
    expected = [compute(i) for i in range(4)]
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    assert runs, "the parallel twin did not run"
    got = [None] * 8
    def worker(i):
        for _ in range(3):
            got[i] = compute(i % 4)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=120)
    assert got == [expected[i % 4] for i in range(8)], "threads gave other results"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    def child():
        queue.put((compute(1), sum(pid == os.getpid() for pid in runs)))
    proc = ctx.Process(target=child)
    proc.start()
    digest, child_parallel = queue.get(timeout=120)
    proc.join(timeout=30)
    assert proc.exitcode == 0 and digest == expected[1], (proc.exitcode, digest)
    assert child_parallel == 0, "the forked child ran workqueue's parallel twin"
print("ok", _numba_layer.choice.layer)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.backends("numba")
def test_without_tbb_the_fallback_is_thread_and_fork_safe():
    """Where TBB cannot load, Numba's kernels run on workqueue, never GNU OpenMP: a warning
    says so once; eight threads at once give the lone call's bits (launches take turns); a
    child forked after parallel use runs the serial kernels and gives the same bits."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-c", _NO_TBB_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok workqueue"
