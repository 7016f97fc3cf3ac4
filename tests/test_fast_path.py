"""The compiled call path (``_cy_call.pxi``): for the calls it serves, the Python path's results
bit for bit (values, dtypes, memory order, running statistics); served for the common calls,
stepping aside for everything else; and the same threads, team lock and fork rule."""
import multiprocessing
import os

import numpy as np
import pytest

import fastbn
from conftest import LAYOUT_IDS, LAYOUTS, make_x, params
from fastbn import _backends, _dispatch
from fastbn._validate import backward_args, forward_args

pytestmark = pytest.mark.backends("cython")

#: The layouts the plans cannot fold without a copy: the call path leaves them to Python.
COPIED = {"NCHW-sliced-height"}


def served():
    from fastbn import _cy_kernels

    return _cy_kernels.fast_path_calls()


def python_forward(x, gamma=None, beta=None, *, axis=1, training=True, running_mean=None,
                   running_var=None, momentum=0.1, eps=1e-5, activation=None, out=None,
                   backend=None, unbiased_running_var=True):
    return _dispatch.forward(forward_args(x, gamma, beta, axis, training, running_mean,
                                          running_var, momentum, eps, activation, out, backend,
                                          unbiased_running_var))


def python_backward(dy, x, mean, invstd, gamma=None, beta=None, *, axis=1, training=True,
                    activation=None, out=None, backend=None):
    return _dispatch.backward(backward_args(dy, x, mean, invstd, gamma, beta, axis, training,
                                            activation, out, backend))


def bits(a):
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_same(got, want, what):
    """Same dtype, shape, memory order and bits (NaN payloads and signed zeros included)."""
    assert type(got) is type(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]"
        assert g.strides == w.strides, f"{what}[{i}]: memory order {g.strides} != {w.strides}"
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"{what}[{i}]")


def compare_calls(x, dy, axis, dtype, what, expect_served, out_kind=None):
    """Every option of forward and backward on x (dy laid out as x), through the public
    functions and through the Python path; returns how many calls the call path served."""
    C = x.shape[axis]
    gamma, beta = params(C, dtype)
    before = served()
    calls = 0
    for affine in (None, (gamma, beta), (gamma.astype(np.float32), beta.astype(np.float64))):
        g, b = affine or (None, None)
        for activation in (None, "relu"):
            for training in (True, False):
                label = f"{what} affine={affine is not None} {activation} {training=}"
                stats = []
                results = []
                for run in (fastbn.forward, python_forward):
                    rm = np.linspace(-1, 1, C).astype(dtype)
                    rv = np.linspace(0.5, 2, C).astype(dtype)
                    out = np.empty_like(x) if out_kind == "out" else None
                    results.append(run(x, g, b, axis=axis, training=training, running_mean=rm,
                                       running_var=rv, momentum=0.3, activation=activation,
                                       out=out))
                    stats.append((rm, rv))
                calls += 1
                assert_same(results[0], results[1], "forward " + label)
                assert_same(stats[0], stats[1], "running statistics " + label)
                _, mean, invstd = results[1]
                back = [run(dy, x, mean, invstd, g, b, axis=axis, training=training,
                            activation=activation,
                            out=np.empty_like(x) if out_kind == "out" else None)
                        for run in (fastbn.backward, python_backward)]
                calls += 1
                assert_same(back[0], back[1], "backward " + label)
        # no running statistics, training only
        assert_same(fastbn.forward(x, g, b, axis=axis), python_forward(x, g, b, axis=axis),
                    what + " without running statistics")
        calls += 1
    assert served() - before == (calls if expect_served else 0), what
    return calls


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_same_bits_as_the_python_path(layout, dtype):
    name, shape, axis, arrangement = layout
    x = make_x(shape, dtype, arrangement, seed=2)
    dy = make_x(shape, dtype, arrangement, seed=3)
    compare_calls(x, dy, axis, dtype, f"{name} {np.dtype(dtype).name}", name not in COPIED)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_and_in_place(dtype):
    """out= an array of x's layout, x itself (in place), and dy itself in backward."""
    x = make_x((6, 5, 4, 4), dtype, "NHWC", seed=2)
    dy = make_x((6, 5, 4, 4), dtype, "NHWC", seed=3)
    compare_calls(x, dy, 1, dtype, "out=", True, out_kind="out")
    before = served()
    for inplace in (True, False):
        a, b = x.copy(order="K"), x.copy(order="K")
        y = fastbn.forward(a, out=a if inplace else None)
        want = python_forward(b, out=b if inplace else None)
        assert_same(y, want, f"in place {inplace}")
        assert (y.y is a) == inplace
    dy, xx = make_x((7, 3), dtype, seed=4), make_x((7, 3), dtype, seed=5)
    _, mean, invstd = python_forward(xx)
    got = fastbn.backward(dy.copy(), xx, mean, invstd, out=None)
    d2 = dy.copy()
    same = fastbn.backward(d2, xx, mean, invstd, out=d2)
    assert same.dx is d2
    assert_same(same, got, "backward out=dy")
    assert served() - before == 4


@pytest.mark.parametrize("shape,axis", [((256, 512), 1), ((255, 514), 1), ((16, 8, 48, 48), 1),
                                        ((16, 48, 48, 8), 3)])
def test_threads_and_the_crossover(shape, axis, monkeypatch):
    """Around the serial/parallel crossover, on 1 and 2 threads, forced either way: the call
    path gives the Python path's bits and the serial kernel's."""
    x = make_x(shape, np.float32, seed=6)
    dy = make_x(shape, np.float32, seed=7)
    C = shape[axis]
    gamma, beta = params(C, np.float32)
    results = []
    before = served()
    limit = min(2, _backends.thread_limit())
    for threads in range(1, limit + 1):
        monkeypatch.setattr(_backends, "_num_threads", threads)
        for forced in (None, True, False):
            monkeypatch.setattr(_backends, "_forced", forced)
            for run_f, run_b in ((fastbn.forward, fastbn.backward),
                                 (python_forward, python_backward)):
                y = run_f(x, gamma, beta, axis=axis)
                results.append((*y, *run_b(dy, x, y.mean, y.invstd, gamma, beta, axis=axis,
                                           activation="relu")))
    assert served() - before == 2 * 3 * limit
    for got in results[1:]:
        assert_same(got, results[0], f"{shape}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_mean_at_the_edges(dtype):
    """backward's mean refinement uses the ulp of each given mean (np.spacing in the Python
    path): zeros of both signs, negatives, huge, infinite and NaN means give the same bits."""
    x = make_x((9, 8), dtype, seed=8)
    dy = make_x((9, 8), dtype, seed=9)
    true_mean = x.astype(np.float64).mean(axis=0).astype(dtype)
    mean = np.array([0.0, -0.0, true_mean[2], -3.5, 1e30, np.inf, -np.inf, np.nan], dtype)
    x[:, 0] -= x[:, 0].mean()  # a batch mean near zero, so the refinement has work to do
    invstd = np.full(8, 0.7, dtype)
    before = served()
    for training in (True, False):
        for activation in (None, "relu"):
            got = fastbn.backward(dy, x, mean, invstd, beta=None, training=training,
                                  activation=activation)
            want = python_backward(dy, x, mean, invstd, training=training,
                                   activation=activation)
            assert_same(got, want, f"{training=} {activation}")
    assert served() - before == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_biased_running_variance(dtype):
    """unbiased_running_var=False (Flax's and Keras' convention) and True: the Python path's
    bits, served."""
    x = make_x((10, 4), dtype, seed=3)
    before = served()
    for unbiased in (True, False):
        stats = []
        results = []
        for run in (fastbn.forward, python_forward):
            rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
            results.append(run(x, running_mean=rm, running_var=rv, momentum=0.25,
                               unbiased_running_var=unbiased))
            stats.append((rm, rv))
        assert_same(results[0], results[1], f"forward {unbiased=}")
        assert_same(stats[0], stats[1], f"running statistics {unbiased=}")
    assert served() - before == 2
    var = x.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(stats[0][1], 0.75 + 0.25 * var, rtol=1e-6)


class _Sub(np.ndarray):
    pass


def _unusual_forward_calls():
    """(name, x, keyword arguments): valid calls the call path leaves to the Python path."""
    x = make_x((8, 3), np.float32, seed=1)
    C = 3
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    return [
        ("list x", x.tolist(), {}),
        ("float16 x", x.astype(np.float16), {}),
        ("ndarray subclass", x.view(_Sub), {}),
        ("numpy bool training", x, {"training": np.True_}),
        ("int eps", x, {"eps": 1}),
        ("numpy float momentum", x, {"momentum": np.float64(0.2)}),
        ("numpy int axis", x, {"axis": np.int64(1)}),
        ("numpy bool unbiased_running_var", x,
         {"running_mean": rm, "running_var": rv, "unbiased_running_var": np.False_}),
        ("float16 gamma", x, {"gamma": np.ones(C, np.float16)}),
        ("strided gamma", x, {"gamma": np.ones(2 * C, np.float32)[::2]}),
        ("list beta", x, {"beta": [0.0] * C}),
        ("float64 running stats of float32 x", x,
         {"running_mean": rm.astype(np.float64), "running_var": rv.astype(np.float64)}),
        ("strided running stats", x,
         {"running_mean": np.zeros(2 * C, np.float32)[::2],
          "running_var": np.ones(2 * C, np.float32)[::2]}),
        ("backend numba", x, {"backend": "numba"}),
        ("backend reference", x, {"backend": "reference"}),
        ("out in another memory order", x, {"out": np.empty((8, 3), np.float32, order="F")}),
        ("empty batch in eval", np.zeros((0, 3), np.float32),
         {"training": False, "running_mean": rm, "running_var": rv}),
    ]


@pytest.mark.parametrize("name,x,kwargs", _unusual_forward_calls(),
                         ids=[c[0] for c in _unusual_forward_calls()])
def test_unusual_calls_go_to_the_python_path(name, x, kwargs):
    if kwargs.get("backend") == "numba" and "numba" not in fastbn.available_backends():
        kwargs = {**kwargs, "backend": "reference"}
    before = served()
    got = fastbn.forward(x, **kwargs)
    assert served() == before, f"{name}: served by the call path"
    want = python_forward(x, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_backend_from_the_environment(monkeypatch):
    x = make_x((8, 3), np.float32, seed=1)
    before = served()
    for env in ("numba", "reference"):
        if env in fastbn.available_backends():
            monkeypatch.setenv("FASTBN_BACKEND", env)
            fastbn.forward(x)
            assert served() == before, env
    monkeypatch.setenv("FASTBN_BACKEND", "")
    fastbn.forward(x)
    monkeypatch.delenv("FASTBN_BACKEND")
    fastbn.forward(x)
    monkeypatch.setenv("FASTBN_BACKEND", "cython")
    fastbn.forward(x, backend="cython")
    assert served() == before + 3


def test_errors_are_the_python_paths():
    """Invalid calls are never served: the documented error comes from _validate, and nothing
    is written."""
    x = make_x((8, 3), np.float32, seed=1)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = served()
    with pytest.raises(ValueError, match="eps must be > 0"):
        fastbn.forward(x, running_mean=rm, running_var=rv, eps=-1.0)
    with pytest.raises(ValueError, match="gamma must have shape"):
        fastbn.forward(x, np.ones(4, np.float32), running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match="out overlaps an input"):
        fastbn.forward(x, out=x[::-1])
    with pytest.raises(TypeError, match="dy must have x's dtype"):
        fastbn.backward(x.astype(np.float64), x, rm, rv)
    with pytest.raises(TypeError, match="x must have dtype"):
        fastbn.forward(x.astype(">f4"))  # byte-swapped
    with pytest.raises(ValueError, match="training needs at least 2 values"):
        fastbn.forward(x[:1])
    assert served() == before
    assert not rm.any() and (rv == 1).all()


class _SpyLock:
    """A stand-in for the team lock: counts launches that took it; ``free`` False plays a
    team already running elsewhere."""

    def __init__(self, free=True):
        self.free, self.taken, self.held = free, 0, False

    def acquire(self, blocking=True):
        if not self.free or self.held:
            return False
        self.taken += 1
        self.held = True
        return True

    def release(self):
        assert self.held
        self.held = False


def test_team_lock_and_forked_child(monkeypatch):
    """A parallel launch takes the team lock and gives it back; with the lock taken, or in a
    forked child, the kernel runs on the calling thread: same bits, the lock left alone."""
    x = make_x((64, 32), np.float32, seed=1)
    dy = make_x((64, 32), np.float32, seed=2)
    monkeypatch.setattr(_backends, "_forced", True)
    monkeypatch.setattr(_backends, "_num_threads", 2)
    want = python_forward(x)
    want_b = python_backward(dy, x, want.mean, want.invstd)
    for free, forked, taken in ((True, False, 2), (False, False, 0), (True, True, 0)):
        lock = _SpyLock(free)
        monkeypatch.setattr(_backends, "_team_lock", lock)
        monkeypatch.setattr(_backends, "_forked_child", forked)
        before = served()
        got = fastbn.forward(x)
        got_b = fastbn.backward(dy, x, got.mean, got.invstd)
        assert served() == before + 2
        assert lock.taken == taken and not lock.held, (free, forked)
        assert_same(got, want, f"forward {free=} {forked=}")
        assert_same(got_b, want_b, f"backward {free=} {forked=}")


def _forked(queue, x):
    try:
        before = served()
        y = fastbn.forward(x)
        queue.put((bits(y.y).tobytes(), served() - before))
    except BaseException as exc:
        queue.put((repr(exc), None))


# JAX, once imported (by its tests' collection), warns at every fork; this child never uses it
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_child_forked_after_a_parallel_call(monkeypatch):
    """A child forked after the parent's call path ran a thread team runs its calls on its
    own thread (GNU OpenMP's pool does not survive fork), served, same bits, no hang."""
    monkeypatch.setattr(_backends, "_forced", True)
    monkeypatch.setattr(_backends, "_num_threads", min(2, _backends.thread_limit()))
    x = make_x((64, 8, 16, 16), np.float32, seed=1)
    before = served()
    want = fastbn.forward(x)
    assert served() == before + 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked, args=(queue, x))
    proc.start()
    try:
        got, child_served = queue.get(timeout=60)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert child_served == 1, got
    assert got == bits(want.y).tobytes()


def test_one_thread_stays_serial(monkeypatch):
    """set_num_threads(1): no launch takes the team lock, even forced parallel."""
    lock = _SpyLock()
    monkeypatch.setattr(_backends, "_team_lock", lock)
    monkeypatch.setattr(_backends, "_forced", True)
    monkeypatch.setattr(_backends, "_num_threads", 1)
    fastbn.forward(make_x((64, 32), np.float32, seed=1))
    assert lock.taken == 0


def test_layer_and_plan_cache():
    """fastbn.BatchNorm's calls are served; more layouts than the cache holds still agree."""
    from fastbn import _cy_kernels

    bn = fastbn.BatchNorm(6)
    x = make_x((16, 6), np.float32, seed=1)
    before = served()
    y = bn.forward(x)
    bn.backward(np.ones_like(y))
    bn.training = False
    bn.forward(x)
    assert served() == before + 3
    _cy_kernels.fast_path_clear()
    for n in range(2, 40):  # 38 shapes: more than the 32 cached plans
        x = make_x((n, 3), np.float64, seed=n)
        assert_same(fastbn.forward(x), python_forward(x), f"{n}")
