"""activation="relu": relu(batch_norm(x)) fused, and a backward whose mask is the forward's."""
import numpy as np
import pytest

import fastbn
from conftest import LAYOUT_IDS, LAYOUTS, assert_close, make_x, params


def _over(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def _run(x, axis, training, dtype, seed=0, dy=None):
    C = x.shape[axis]
    gamma, beta = params(C, dtype, seed=seed)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype) * 3
    kw = dict(axis=axis, training=training, activation="relu")
    y, mean, invstd = fastbn.forward(x, gamma, beta, running_mean=rm.copy(),
                                     running_var=rv.copy(), **kw)
    ref = fastbn.reference.forward(x, gamma, beta, running_mean=rm.copy(),
                                   running_var=rv.copy(), **kw)
    dy = make_x(x.shape, dtype, seed=seed + 1) if dy is None else dy
    grads = fastbn.backward(dy, x, mean, invstd, gamma, beta, **kw)
    ref_grads = fastbn.reference.backward(dy, x, mean, invstd, gamma, beta, **kw)
    return (y, mean, invstd, grads), (ref, ref_grads), (gamma, beta, dy)


@pytest.mark.parametrize("name,shape,axis,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_matches_reference_in_float64(name, shape, axis, layout, training):
    if training and np.prod(shape) // shape[axis] < 2:
        pytest.skip("training needs two values per feature")
    x = make_x(shape, np.float64, layout)
    (y, _, _, g), (ref, rg), (_, _, dy) = _run(x, axis, training, np.float64)
    assert (y >= 0).all()
    assert_close(y, ref.y, np.float64, f"y {name}", scale=10)
    m = x.size // shape[axis]
    scale = float(np.abs(dy).max()) * 10
    assert_close(g.dx, rg.dx, np.float64, f"dx {name}", scale=scale * 10)
    assert_close(g.dbeta, rg.dbeta, np.float64, f"dbeta {name}", scale=scale * m)
    assert_close(g.dgamma, rg.dgamma, np.float64, f"dgamma {name}", scale=scale * m * 4)


@pytest.mark.parametrize("shape,axis", [((16, 8, 12, 12), 1), ((512, 24), 1),
                                        ((16, 12, 12, 8), -1), ((16, 8, 48, 48), 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_float32_matches_reference_away_from_zero(shape, axis, training):
    """float32 and float64 may put a pre-activation within rounding of 0 on different sides:
    compare where |z| is clearly away from 0, and bound the sums by the ambiguous terms."""
    x = make_x(shape, np.float32)
    (y, mean, invstd, g), (ref, rg), (gamma, beta, dy) = _run(x, axis, training, np.float32)
    shape_c = [1] * x.ndim
    shape_c[axis] = -1
    z = ((x.astype(np.float64) - ref.mean.astype(np.float64).reshape(shape_c))
         * ref.invstd.astype(np.float64).reshape(shape_c) * gamma.reshape(shape_c)
         + beta.reshape(shape_c))
    clear = np.abs(z) > 1e-4
    np.testing.assert_allclose(y[clear], ref.y[clear], atol=2e-6)
    np.testing.assert_allclose(g.dx[clear], rg.dx[clear], atol=1e-5 * np.abs(rg.dx).max())
    slack = np.where(clear, 0.0, np.abs(dy)).sum(axis=_over(x, axis)) + 1e-3
    assert (np.abs(g.dbeta - rg.dbeta) <= slack * 2).all()


HARD_DATA = {
    # pre-activations exactly 0 (x = mean, beta = 0): the tie-break decides
    "exact zeros": lambda shape, dtype: np.random.default_rng(0).integers(-1, 2, shape)
    .astype(dtype),
    # a float32 mean of 1e4 is off by 5e-4: a mask from it would disagree
    "huge mean": lambda shape, dtype: (1e4 + 0.1 * np.random.default_rng(1)
                                       .standard_normal(shape)).astype(dtype),
    "normal": lambda shape, dtype: make_x(shape, dtype, seed=2),
}


@pytest.mark.parametrize("data", HARD_DATA)
@pytest.mark.parametrize("shape,axis", [((32, 8, 16, 16), 1), ((32, 16, 16, 8), -1),
                                        ((2048, 40), 1), ((6, 5, 4, 4), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_mask_is_the_forward_mask_bit_for_bit(data, shape, axis, dtype, training):
    """With dy = 1, dbeta counts the elements the backward let through: exactly the forward's
    positive outputs, feature by feature, in every family and mode."""
    x = HARD_DATA[data](shape, dtype)
    C = shape[axis]
    gamma = np.linspace(0.5, 2.0, C).astype(dtype)
    beta = np.zeros(C, dtype) if data == "exact zeros" else np.linspace(-0.3, 0.3, C)
    beta = beta.astype(dtype)
    rm = x.mean(axis=_over(x, axis)).astype(dtype)
    rv = (x.var(axis=_over(x, axis)) + 0.5).astype(dtype)
    kw = dict(axis=axis, training=training, activation="relu")
    y, mean, invstd = fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv, **kw)
    dx, dg, db = fastbn.backward(np.ones_like(x), x, mean, invstd, gamma, beta, **kw)
    np.testing.assert_array_equal(db, (y > 0).sum(axis=_over(x, axis)).astype(db.dtype))
    if not training:  # dx = gamma * invstd * mask: zero exactly where the output was not > 0
        np.testing.assert_array_equal(dx != 0, y > 0)


def test_tie_at_zero_passes_no_gradient():
    """z == 0 exactly gives y = 0 and no gradient, like torch.relu (whose derivative at 0 is
    0)."""
    x = np.array([[-1.0], [0.0], [1.0], [0.0]])
    y, mean, invstd = fastbn.forward(x, training=False, running_mean=np.zeros(1),
                                     running_var=np.ones(1), eps=1e-12, activation="relu")
    np.testing.assert_allclose(y.ravel(), [0.0, 0.0, 1.0, 0.0])
    assert y[1, 0] == 0.0 and y[3, 0] == 0.0
    dx = fastbn.backward(np.ones_like(x), x, mean, invstd, beta=None, training=False,
                         activation="relu").dx
    np.testing.assert_allclose(dx.ravel(), [0.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_relu_matches_torch_autograd(dtype, training):
    torch = pytest.importorskip("torch")
    x = make_x((8, 5, 6, 6), dtype)
    dy = make_x(x.shape, dtype, seed=4)
    gamma, beta = params(5, dtype)
    rm, rv = np.zeros(5, dtype), np.ones(5, dtype) * 2
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    gt = torch.from_numpy(gamma.copy()).requires_grad_(True)
    bt = torch.from_numpy(beta.copy()).requires_grad_(True)
    yt = torch.relu(torch.nn.functional.batch_norm(xt, torch.from_numpy(rm.copy()),
                                                   torch.from_numpy(rv.copy()), gt, bt,
                                                   training, 0.1, 1e-5))
    yt.backward(torch.from_numpy(dy))
    y, mean, invstd = fastbn.forward(x, gamma, beta, training=training, running_mean=rm,
                                     running_var=rv, activation="relu")
    dx, dg, db = fastbn.backward(dy, x, mean, invstd, gamma, beta, training=training,
                                 activation="relu")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dg, gt.grad.numpy(), **tol)
    np.testing.assert_allclose(db, bt.grad.numpy(), **tol)


def test_layer_with_relu_and_half_precision():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = fastbn.BatchNorm(4, activation="relu")
    x = make_x((16, 4, 3, 3), ml_dtypes.bfloat16)
    y = layer.forward(x)
    assert y.dtype == x.dtype and (y.astype(np.float32) >= 0).all()
    layer.backward(np.ones_like(x))
    np.testing.assert_array_equal(layer.grad_beta,
                                  (y.astype(np.float32) > 0).sum(axis=(0, 2, 3)))
