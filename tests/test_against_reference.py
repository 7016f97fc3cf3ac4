"""Every kernel path against the NumPy reference: dtype x layout x training/eval x affine x out."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from conftest import LAYOUT_IDS, LAYOUTS, assert_close, make_x, params


def with_out(arr, out_mode):
    """(the array to pass, the out= to pass) for out_mode None, "new" or "inplace"."""
    if out_mode == "new":
        return arr, np.empty_like(arr)
    if out_mode == "inplace":
        copy = arr.copy()
        return copy, copy
    return arr, None


def run_pair(backend, x, *, axis, training, affine, out_mode, dtype, seed=3):
    """forward then backward on ``backend`` and on the reference, compared step by step."""
    C = x.shape[axis]
    gamma, beta = params(C, dtype) if affine else (None, None)
    rng = np.random.default_rng(seed)
    rm0 = rng.standard_normal(C).astype(dtype)
    rv0 = (0.5 + rng.random(C)).astype(dtype)
    where = f"backend={backend} dtype={np.dtype(dtype).name} shape={x.shape} axis={axis} " \
            f"training={training} affine={affine} out={out_mode}"

    x_before = x.copy()
    rm, rv = rm0.copy(), rv0.copy()
    rm_ref, rv_ref = rm0.copy(), rv0.copy()
    x_in, out = with_out(x, out_mode)
    res = fastbn.forward(x_in, gamma, beta, axis=axis, training=training, running_mean=rm,
                         running_var=rv, momentum=0.2, eps=1e-3, out=out, backend=backend)
    ref = fastbn.reference.forward(x, gamma, beta, axis=axis, training=training,
                                   running_mean=rm_ref, running_var=rv_ref, momentum=0.2,
                                   eps=1e-3)
    if out is not None:
        assert res.y is out, where
    if out_mode != "inplace":
        np.testing.assert_array_equal(x, x_before, err_msg=f"x was modified: {where}")
    assert res.y.dtype == x.dtype and res.y.shape == x.shape, where
    sdt = np.float64 if dtype == np.float64 else np.float32
    assert res.mean.dtype == sdt and res.invstd.dtype == sdt, where
    # A mean of magnitude M is itself known to M * eps: results inherit M * invstd * eps.
    cond = float(np.abs(ref.mean.astype(np.float64) * ref.invstd).max()) if C else 0.0
    gmax = 1.0 if gamma is None else float(np.abs(gamma).max())
    scale_y = max(float(np.abs(ref.y).max()) if x.size else 0.0, cond * gmax)
    assert_close(res.y, ref.y, dtype, f"y: {where}", scale=scale_y)
    xc = np.moveaxis(x, axis, -1).astype(np.float64) - ref.mean.astype(np.float64)
    xhat_max = float(np.abs(xc * ref.invstd).max()) if x.size else 0.0
    x_max = float(np.abs(x).max()) if x.size else 0.0
    assert_close(res.mean, ref.mean, dtype, f"mean: {where}", scale=x_max)
    invstd_max = float(np.abs(ref.invstd).max()) if C else 0.0
    assert_close(res.invstd, ref.invstd, dtype, f"invstd: {where}",
                 scale=invstd_max * (1 + 4 * xhat_max ** 2))
    assert_close(rm, rm_ref, dtype, f"running_mean: {where}", scale=max(x_max, 4.0))
    xc_max = float(np.abs(xc).max()) if x.size else 0.0
    assert_close(rv, rv_ref, dtype, f"running_var: {where}",
                 scale=float(np.abs(rv_ref).max()) + 4 * xc_max ** 2)

    dy = make_x(x.shape, dtype, seed=seed + 1)
    dy_before = dy.copy()
    dy_in, bout = with_out(dy, out_mode)
    g = fastbn.backward(dy_in, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                        training=training, out=bout, backend=backend)
    gr = fastbn.reference.backward(dy, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                                   training=training)
    if bout is not None:
        assert g.dx is bout, where
    else:
        np.testing.assert_array_equal(dy, dy_before, err_msg=f"dy was modified: {where}")
    assert g.dx.dtype == x.dtype and g.dgamma.dtype == sdt and g.dbeta.dtype == sdt, where
    # Scales of the terms each result sums, so that tolerances follow cancellation.
    k = np.abs(ref.invstd).max() * (1.0 if gamma is None else np.abs(gamma).max())
    dy_max = float(np.abs(dy).max()) if x.size else 0.0
    m = x.size // C if C else 0
    assert_close(g.dx, gr.dx, dtype, f"dx: {where}",
                 scale=k * dy_max * (2 + xhat_max ** 2 + cond * xhat_max))
    assert_close(g.dbeta, gr.dbeta, dtype, f"dbeta: {where}", scale=dy_max * m)
    assert_close(g.dgamma, gr.dgamma, dtype, f"dgamma: {where}",
                 scale=dy_max * m * (1 + xhat_max + cond))


@pytest.mark.parametrize("name,shape,axis,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layouts(backend, dtype, name, shape, axis, layout, training, affine):
    if training and np.prod(shape) // shape[axis] < 2:
        pytest.skip("training needs two values per feature")
    x = make_x(shape, dtype, layout)
    run_pair(backend, x, axis=axis, training=training, affine=affine, out_mode=None,
             dtype=dtype)


@pytest.mark.parametrize("out_mode", ["new", "inplace"])
@pytest.mark.parametrize("name,shape,axis,layout",
                         [LAYOUTS[i] for i in (0, 4, 5, 8, 9, 12, 19, 20)],
                         ids=[LAYOUT_IDS[i] for i in (0, 4, 5, 8, 9, 12, 19, 20)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out(backend, dtype, name, shape, axis, layout, out_mode, training):
    x = make_x(shape, dtype, layout)
    run_pair(backend, x, axis=axis, training=training, affine=True, out_mode=out_mode,
             dtype=dtype)


def test_out_in_another_layout_is_filled(backend):
    """out need not share x's memory order: a C-ordered out for an F-ordered x."""
    x = make_x((6, 3, 4, 5), np.float32, "F")
    out = np.empty(x.shape, np.float32)
    res = fastbn.forward(x, out=out, backend=backend)
    assert res.y is out
    assert_close(out, fastbn.reference.forward(x).y, np.float32, "y")


@st.composite
def arrays(draw):
    """A float array of rank 2-5 with random sizes, axis, memory order, slicing and values."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    steps = tuple(draw(st.lists(st.sampled_from([1, 1, 2, -1]), min_size=ndim, max_size=ndim)))
    perm = draw(st.permutations(range(ndim)))
    loc = draw(st.sampled_from([0.0, 1.0, -3.0, 1e3, 1e4]))
    scale = draw(st.sampled_from([1.0, 1e-2, 10.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    big_shape = tuple(n * abs(s) for n, s in zip(shape, steps))
    storage = (loc + scale * rng.standard_normal([big_shape[p] for p in perm])).astype(dtype)
    big = storage.transpose(np.argsort(perm))  # logical order, memory order ``perm``
    x = big[tuple(slice(None, None, s) for s in steps)]
    assert x.shape == shape
    return x, axis, dtype


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(case=arrays(), training=st.booleans(), affine=st.booleans())
def test_hypothesis_shapes_strides_values(case, training, affine, backend):
    x, axis, dtype = case
    if training and x.size // x.shape[axis] < 2:
        training = False
    run_pair(backend, x, axis=axis, training=training, affine=affine, out_mode=None,
             dtype=dtype)
