"""Every documented error: the right exception, a message naming the argument, nothing modified."""
import numpy as np
import pytest

import fastbn

X = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
C = 3


def good_forward_kwargs():
    return dict(gamma=np.ones(C, np.float32), beta=np.zeros(C, np.float32),
                running_mean=np.full(C, 0.5, np.float32), running_var=np.full(C, 2.0, np.float32))


FORWARD_ERRORS = [
    # (what changes, exception, text the message must contain)
    (dict(x=X.astype(np.int32)), TypeError, "x"),
    (dict(x=X.astype(np.complex64)), TypeError, "x"),
    (dict(x=object()), TypeError, "x"),
    (dict(x=np.zeros(5, np.float32)), ValueError, "x"),
    (dict(x=np.float32(1.0)), ValueError, "x"),
    (dict(axis=3), ValueError, "axis"),
    (dict(axis=-4), ValueError, "axis"),
    (dict(axis=1.0), TypeError, "axis"),
    (dict(gamma=np.ones(4, np.float32)), ValueError, "gamma"),
    (dict(gamma=np.ones(C, np.int64)), TypeError, "gamma"),
    (dict(beta=np.ones((C, 1), np.float32)), ValueError, "beta"),
    (dict(running_mean=np.zeros(4, np.float32)), ValueError, "running_mean"),
    (dict(running_var=np.ones(2, np.float32)), ValueError, "running_var"),
    (dict(running_var=None), ValueError, "running_var"),
    (dict(running_mean=None), ValueError, "running_mean"),
    (dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "running_mean"),
    (dict(running_var=np.ones(C, np.int32)), TypeError, "running_var"),
    (dict(x=X[:1, :, :1]), ValueError, "x"),  # one value per feature in training
    (dict(x=X[:0]), ValueError, "x"),  # N = 0
    (dict(training=False, running_mean=None, running_var=None), ValueError, "running"),
    (dict(training="yes"), TypeError, "training"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=None), TypeError, "momentum"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(out=np.empty((4, 3, 2), np.float64)), ValueError, "out"),
    (dict(out=np.empty((4, 3), np.float32)), ValueError, "out"),
    (dict(out=[0.0]), ValueError, "out"),
]


def read_only(arr):
    arr = arr.copy()
    arr.flags.writeable = False
    return arr


FORWARD_ERRORS += [
    (dict(out=read_only(X)), ValueError, "out"),
    (dict(running_mean=read_only(np.zeros(C, np.float32))), ValueError, "running_mean"),
]


@pytest.mark.parametrize("change,exc,text", FORWARD_ERRORS,
                         ids=[f"{sorted(c)[0]}-{i}" for i, (c, _, _) in enumerate(FORWARD_ERRORS)])
@pytest.mark.parametrize("fn", [fastbn.forward, fastbn.reference.forward],
                         ids=["fastbn", "reference"])
def test_forward_errors(fn, change, exc, text):
    kwargs = good_forward_kwargs()
    kwargs.update(change)
    x = kwargs.pop("x", X.copy())
    snapshot = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    x_before = x.copy() if isinstance(x, np.ndarray) else None
    with pytest.raises(exc, match=text):
        fn(x, **kwargs)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(kwargs[k], v, err_msg=f"{k} changed on error")
    if x_before is not None:
        np.testing.assert_array_equal(x, x_before)


def test_partly_overlapping_out_is_rejected():
    buf = np.zeros((5, 3, 2), np.float32)
    x = buf[:4]
    with pytest.raises(ValueError, match="out"):
        fastbn.forward(x, out=buf[1:])


def test_running_stats_sharing_memory_are_rejected():
    stats = np.ones(C, np.float32)
    with pytest.raises(ValueError, match="running"):
        fastbn.forward(X, running_mean=stats, running_var=stats)


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTBN_BACKEND"):
        fastbn.forward(X)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "reference")
    y = fastbn.forward(X).y
    np.testing.assert_array_equal(y, fastbn.reference.forward(X).y)


BACKWARD_ERRORS = [
    (dict(dy=X.astype(np.float64)), TypeError, "dy"),
    (dict(dy=X[:2]), ValueError, "dy"),
    (dict(x=X.astype(np.int16), dy=X.astype(np.int16)), TypeError, "x"),
    (dict(mean=np.zeros(4)), ValueError, "mean"),
    (dict(invstd=np.ones(2)), ValueError, "invstd"),
    (dict(mean=np.zeros(C, np.int32)), TypeError, "mean"),
    (dict(gamma=np.ones(5)), ValueError, "gamma"),
    (dict(x=X[:1, :, :1], dy=X[:1, :, :1]), ValueError, "x"),
    (dict(axis=5), ValueError, "axis"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(out=np.empty((4, 3, 2), np.float64)), ValueError, "out"),
]


@pytest.mark.parametrize("change,exc,text", BACKWARD_ERRORS,
                         ids=[f"{sorted(c)[0]}-{i}" for i, (c, _, _) in enumerate(BACKWARD_ERRORS)])
@pytest.mark.parametrize("fn", [fastbn.backward, fastbn.reference.backward],
                         ids=["fastbn", "reference"])
def test_backward_errors(fn, change, exc, text):
    kwargs = dict(dy=X.copy(), x=X.copy(), mean=np.zeros(C, np.float32),
                  invstd=np.ones(C, np.float32))
    kwargs.update(change)
    dy, x, mean, invstd = (kwargs.pop(k) for k in ("dy", "x", "mean", "invstd"))
    dy_before = dy.copy()
    with pytest.raises(exc, match=text):
        fn(dy, x, mean, invstd, **kwargs)
    np.testing.assert_array_equal(dy, dy_before)


def test_nan_stays_in_its_feature():
    x = np.random.default_rng(0).standard_normal((8, 4, 3)).astype(np.float32)
    x[3, 2, 1] = np.nan
    x[5, 0, 0] = np.inf
    y, mean, invstd = fastbn.forward(x)
    assert np.isnan(y[:, 2]).all() and np.isnan(mean[2])
    assert np.isnan(y[:, 0]).all()
    assert np.isfinite(y[:, [1, 3]]).all() and np.isfinite(mean[[1, 3]]).all()
    dx, dg, db = fastbn.backward(np.ones_like(x), x, mean, invstd)
    assert np.isfinite(dx[:, [1, 3]]).all() and np.isfinite(dg[[1, 3]]).all()


RELU_BACKWARDS = ("api", "reference", "phases.backward_sums", "phases.backward_dx")


def _relu_backward(name, beta_kwargs):
    """Call the named backward function with activation="relu" on a small float32 problem."""
    from fastbn import phases, reference

    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    gamma, beta = np.full(3, 1.5, np.float32), np.full(3, 0.7, np.float32)
    y, mean, invstd = fastbn.forward(x, gamma, beta, activation="relu")
    mean64 = x.astype(np.float64).mean(axis=0)
    if name == "api":
        return fastbn.backward(dy, x, mean, invstd, gamma, activation="relu", **beta_kwargs)
    if name == "reference":
        return reference.backward(dy, x, mean, invstd, gamma, activation="relu", **beta_kwargs)
    sums = phases.backward_sums(dy, x, mean64, invstd, gamma, activation="relu", **beta_kwargs)
    if name == "phases.backward_sums":
        return sums
    whole = phases.merge_sums([sums])
    return phases.backward_dx(dy, x, mean64, invstd, whole, gamma, activation="relu",
                              **beta_kwargs)


@pytest.mark.parametrize("name", RELU_BACKWARDS)
def test_relu_backward_without_beta_is_an_error(name):
    """With the fused ReLU, backward recomputes the forward's mask from beta: a left-out beta
    would give other gradients without a word, so it raises, naming beta; None is taken as
    the forward's 'no beta'."""
    with pytest.raises(TypeError, match="beta must be given with activation='relu'"):
        _relu_backward(name, {})
    _relu_backward(name, {"beta": None})  # the forward had none: allowed
    _relu_backward(name, {"beta": np.full(3, 0.7, np.float32)})


def test_backward_without_activation_may_leave_beta_out():
    x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32)
    y, mean, invstd = fastbn.forward(x)
    left_out = fastbn.backward(np.ones_like(x), x, mean, invstd)
    given = fastbn.backward(np.ones_like(x), x, mean, invstd, None, None)
    np.testing.assert_array_equal(left_out.dx, given.dx)


@pytest.mark.backends("cython")
def test_left_out_beta_keeps_the_compiled_call_path():
    """beta's default is a marker object, not None: without an activation fastbn.backward
    turns it into None before the compiled call path, which would step aside for it."""
    from fastbn import _cy_kernels

    x = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    y, mean, invstd = fastbn.forward(x)
    before = _cy_kernels.fast_path_calls()
    fastbn.backward(np.ones_like(x), x, mean, invstd)
    assert _cy_kernels.fast_path_calls() == before + 1


@pytest.mark.parametrize("momentum,ok", [(np.float32(0.25), True), (np.array(0.25), True),
                                         (np.array([0.25]), False), (True, False),
                                         ("0.25", False), (None, False)],
                         ids=["numpy-scalar", "0-d-array", "1-d-array", "bool", "str", "None"])
def test_momentum_as_a_number_or_a_0d_array(momentum, ok):
    """Real numbers and 0-d arrays of a real dtype are momentum values; anything else is a
    TypeError naming momentum (JAX's 0-d arrays: tests/test_jax.py)."""
    x = np.random.default_rng(7).normal(size=(6, 3))
    rm, rv = np.zeros(3), np.ones(3)
    if ok:
        fastbn.forward(x, running_mean=rm, running_var=rv, momentum=momentum)
        np.testing.assert_allclose(rm, 0.25 * x.mean(0))
    else:
        with pytest.raises(TypeError, match="momentum must be a real number"):
            fastbn.forward(x, running_mean=rm, running_var=rv, momentum=momentum)
        assert not rm.any()
