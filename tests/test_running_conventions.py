"""The running-statistics conventions: PyTorch's (unbiased batch variance) and Flax/Keras'
(biased, momentum counted as a decay, translated in fastbn._conventions), on every backend."""
import numpy as np
import pytest

import fastbn
from fastbn import _conventions, reference



def _expected(rm, rv, x, momentum, unbiased, axis):
    x64 = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    m = x64.shape[0]
    var = x64.var(axis=0) * (m / (m - 1) if unbiased else 1.0)
    return ((1 - momentum) * rm + momentum * x64.mean(axis=0),
            (1 - momentum) * rv + momentum * var)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype,stats_dtype", [(np.float32, np.float32),
                                               (np.float64, np.float64),
                                               (np.float16, np.float32),
                                               (np.float32, np.float16)])
@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((7, 4), -1)])
def test_update_follows_the_chosen_variance(backend, shape, axis, dtype, stats_dtype,
                                            unbiased):
    x = np.random.default_rng(0).normal(3.0, 2.0, shape).astype(dtype)
    C = shape[axis]
    rm0 = np.linspace(-1, 1, C).astype(stats_dtype)
    rv0 = np.linspace(0.5, 2, C).astype(stats_dtype)
    got = {}
    for name in (backend, "reference"):
        rm, rv = rm0.copy(), rv0.copy()
        fastbn.forward(x, axis=axis, running_mean=rm, running_var=rv, momentum=0.3,
                       unbiased_running_var=unbiased, backend=name)
        got[name] = rm, rv
    want_rm, want_rv = _expected(rm0.astype(np.float64), rv0.astype(np.float64), x, 0.3,
                                 unbiased, axis)
    rtol = (2e-3 if np.float16 in (dtype, stats_dtype)
            else 1e-13 if stats_dtype == np.float64 else 1e-6)
    where = f"{backend}, x {np.dtype(dtype)}, stats {np.dtype(stats_dtype)}, unbiased={unbiased}"
    np.testing.assert_allclose(got[backend][0], want_rm, rtol=rtol, atol=rtol, err_msg=where)
    np.testing.assert_allclose(got[backend][1], want_rv, rtol=rtol, err_msg=where)
    for ours, ref in zip(got[backend], got["reference"]):
        np.testing.assert_allclose(ours, ref, rtol=rtol, err_msg=where)


def test_default_is_pytorchs_unbiased_variance(backend):
    x = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    fastbn.forward(x, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rv, x.astype(np.float64).var(axis=0, ddof=1), rtol=1e-6)


def test_flag_must_be_a_bool_and_nothing_changes():
    x = np.ones((4, 2), np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    for bad in (1, "no", None):
        with pytest.raises(TypeError, match="unbiased_running_var must be True or False"):
            fastbn.forward(x, running_mean=rm, running_var=rv, unbiased_running_var=bad)
    assert not rm.any() and (rv == 1).all()


def test_layer_takes_the_flag(backend):
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    layer = fastbn.BatchNorm(3, momentum=1.0, unbiased_running_var=False)
    layer.forward(x)
    np.testing.assert_allclose(layer.running_var, x.astype(np.float64).var(axis=0), rtol=1e-6)


def test_decay_convention_reproduces_flax_and_keras_update(backend):
    """r = decay * r + (1 - decay) * batch, biased variance, with fastbn.forward."""
    x = np.random.default_rng(3).normal(2.0, 3.0, (9, 4)).astype(np.float64)
    decay = 0.9
    rm, rv = np.full(4, 0.5), np.full(4, 1.5)
    fastbn.forward(x, running_mean=rm, running_var=rv, **_conventions.decay_convention(decay)
                   ._asdict())
    np.testing.assert_allclose(rm, decay * 0.5 + (1 - decay) * x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(rv, decay * 1.5 + (1 - decay) * x.var(axis=0), rtol=1e-14)
    assert _conventions.decay_convention(0.99).momentum == 1.0 - 0.99
    assert 1.0 - _conventions.decay_convention(0.99).momentum == 0.99  # exact


@pytest.mark.parametrize("bad,error", [(1.5, ValueError), (-0.1, ValueError),
                                       (float("nan"), ValueError), (True, TypeError),
                                       ("0.9", TypeError)])
def test_decay_convention_rejects_bad_momentum(bad, error):
    with pytest.raises(error, match="momentum"):
        _conventions.decay_convention(bad)


def test_reference_takes_the_flag():
    x = np.random.default_rng(4).normal(size=(6, 2))
    rm, rv = np.zeros(2), np.ones(2)
    reference.forward(x, running_mean=rm, running_var=rv, momentum=1.0,
                      unbiased_running_var=False)
    np.testing.assert_allclose(rv, x.var(axis=0), rtol=1e-14)
