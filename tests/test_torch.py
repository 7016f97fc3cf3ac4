"""fastbn against torch.nn.functional.batch_norm and its autograd (skipped without torch)."""
import numpy as np
import pytest

import fastbn
from conftest import assert_close, make_x, params

torch = pytest.importorskip("torch")
F = torch.nn.functional

CASES = [((6, 4), 1), ((4, 3, 7), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1), ((2, 3, 4, 3, 2), 1),
         ((16, 8, 48, 48), 1)]


def torch_bn(x, gamma, beta, rm, rv, axis, training, momentum, eps, dy):
    """PyTorch's forward and autograd backward, with the feature axis moved to 1."""
    xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).requires_grad_(True)
    g = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
    y = F.batch_norm(xt, rmt, rvt, g, b, training=training, momentum=momentum, eps=eps)
    y.backward(torch.from_numpy(np.moveaxis(dy, axis, 1).copy()))
    return (np.moveaxis(y.detach().numpy(), 1, axis), rmt.numpy(), rvt.numpy(),
            np.moveaxis(xt.grad.numpy(), 1, axis), g.grad.numpy(), b.grad.numpy())


@pytest.mark.parametrize("shape,axis", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["compiled", "reference"])
def test_matches_torch(dtype, shape, axis, training, which, backend):
    backend = backend if which == "compiled" else "reference"
    x = make_x(shape, dtype, loc=1.5)
    dy = make_x(shape, dtype, seed=7)
    C = x.shape[axis]
    gamma, beta = params(C, dtype)
    rng = np.random.default_rng(2)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    rm_t, rv_t = rm.copy(), rv.copy()
    y_t, rm_t, rv_t, dx_t, dg_t, db_t = torch_bn(x, gamma, beta, rm_t, rv_t, axis, training,
                                                 0.1, 1e-5, dy)

    y, mean, invstd = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                                     running_mean=rm, running_var=rv, momentum=0.1, eps=1e-5,
                                     backend=backend)
    dx, dg, db = fastbn.backward(dy, x, mean, invstd, gamma, beta, axis=axis,
                                 training=training, backend=backend)
    # PyTorch accumulates float32 data in float32 in places; allow for its rounding too.
    loose = np.float32 if dtype == np.float32 else np.float64
    m = x.size // C
    assert_close(y, y_t, loose, "y", scale=10)
    assert_close(rm, rm_t, loose, "running_mean", scale=10)
    assert_close(rv, rv_t, loose, "running_var", scale=10)
    assert_close(dx, dx_t, loose, "dx", scale=10 * float(np.abs(dx_t).max()) + 10)
    assert_close(dg, dg_t, loose, "dgamma", scale=10 * m)
    assert_close(db, db_t, loose, "dbeta", scale=10 * m)


def test_running_stats_over_several_steps_match_torch():
    """Momentum, unbiased variance and in-place update over five steps, as in a training loop."""
    C = 3
    rm, rv = np.zeros(C), np.ones(C)
    rm_t, rv_t = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(5):
        x = make_x((8, C, 4), np.float64, seed=step, loc=step)
        fastbn.forward(x, running_mean=rm, running_var=rv, momentum=0.3)
        F.batch_norm(torch.from_numpy(x), rm_t, rv_t, training=True, momentum=0.3)
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-12)
