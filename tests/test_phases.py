"""The split phases (fastbn.phases) against fastbn.forward/backward on the whole batch: pieces
of uneven size, an empty one among them, every layout family, dtype, activation and backend."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from conftest import LAYOUTS as LAYOUTS_ALL
from conftest import make_x
from fastbn import phases
from fastbn._backends import forced_parallel, thread_limit

# (name, shape, axis): NCHW (feature-outer), NHWC (feature-inner, axis=-1), NC
LAYOUTS = [("NCHW", (11, 4, 9, 8), 1), ("NHWC", (11, 9, 8, 4), -1), ("NC", (11, 6), 1)]
#: pieces of the batch along axis 0: uneven, one of them empty
CUTS = [slice(0, 3), slice(3, 3), slice(3, 4), slice(4, 11)]


def _data(shape, dtype, seed, ill_conditioned):
    rng = np.random.default_rng(seed)
    if ill_conditioned:  # float32 data of mean 1e4 and spread 0.1
        x = (1e4 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    else:
        x = (0.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def _run_phases(x, dy, gamma, beta, axis, activation, backend, rm, rv):
    """Forward and backward of the whole batch, piece by piece through the phases."""
    merged = phases.merge_stats([phases.batch_stats(x[c], axis=axis, backend=backend)
                                 for c in CUTS])
    outs = [phases.normalize(x[c], merged, gamma, beta, axis=axis, activation=activation,
                             running_mean=rm if i == 0 else None,
                             running_var=rv if i == 0 else None, backend=backend)
            for i, c in enumerate(CUTS)]
    for other in outs[1:]:  # every piece gets the same statistics, bit for bit
        assert np.array_equal(other.mean, outs[0].mean)
        assert np.array_equal(other.invstd, outs[0].invstd)
    y = np.concatenate([o.y for o in outs])
    mean, invstd = outs[0].mean, outs[0].invstd
    # the float32 mean goes back, as a caller stores it; ReLU needs the float64 one
    back_mean = merged.mean if activation == "relu" else mean
    sums = phases.merge_sums([phases.backward_sums(dy[c], x[c], back_mean, invstd, gamma,
                                                   beta, axis=axis, activation=activation,
                                                   backend=backend) for c in CUTS])
    grads = [phases.backward_dx(dy[c], x[c], back_mean, invstd, sums, gamma, beta, axis=axis,
                                activation=activation, backend=backend) for c in CUTS]
    dx = np.concatenate([g.dx for g in grads])
    return y, mean, invstd, dx, grads[0].dgamma, grads[0].dbeta


#: (dtype, ill-conditioned data): float64 on ordinary data to 1e-12, float32 on both
DATA = [(np.float64, False), (np.float32, False), (np.float32, True)]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype,ill", DATA, ids=["float64", "float32", "float32-mean1e4"])
@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_phases_equal_whole_batch(name, shape, axis, dtype, ill, activation, backend):
    x, dy = _data(shape, dtype, 3, ill)
    C = shape[axis]
    rng = np.random.default_rng(4)
    gamma, beta = 1 + 0.5 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, mean, invstd, dx, dgamma, dbeta = _run_phases(x, dy, gamma, beta, axis, activation,
                                                     backend, rm, rv)
    ref = fastbn.forward(x, gamma, beta, axis=axis, activation=activation, running_mean=rm_ref,
                         running_var=rv_ref, backend=backend)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                           activation=activation, backend=backend)
    what = f"{backend} {name} {np.dtype(dtype).name} {activation} ill={ill}"
    assert y.dtype == x.dtype and dx.dtype == x.dtype and mean.dtype == ref.mean.dtype, what
    if dtype == np.float64:
        y_tol, dx_rel, stat_rel = 1e-12, 1e-12, 1e-12
    else:
        y_tol, dx_rel, stat_rel = 1e-5, 1e-4, 1e-6
    assert np.abs(y - ref.y).max() <= y_tol, what
    scale = np.abs(bref.dx).max()
    assert np.abs(dx - bref.dx).max() <= dx_rel * scale, what
    np.testing.assert_allclose(mean, ref.mean, rtol=stat_rel, err_msg=what)
    np.testing.assert_allclose(invstd, ref.invstd, rtol=max(stat_rel, 1e-5 if ill else 0),
                               err_msg=what)
    np.testing.assert_allclose(rm, rm_ref, rtol=stat_rel, err_msg=what)
    np.testing.assert_allclose(rv, rv_ref, rtol=max(stat_rel, 1e-5 if ill else 0),
                               err_msg=what)
    gscale = max(np.abs(bref.dgamma).max(), np.abs(bref.dbeta).max())
    assert np.abs(dgamma - bref.dgamma).max() <= dx_rel * gscale, what
    assert np.abs(dbeta - bref.dbeta).max() <= dx_rel * gscale, what


def test_merge_is_exact_on_ill_conditioned_data():
    """Never E[x^2] - E[x]^2: mean 1e8, spread 1e-3, in float64, in 143 pieces. The pieces'
    means carry float64's rounding at 1e8 (1.5e-8, 1e-5 of the spread), hence 1e-4; the
    E[x^2] - E[x]^2 form is off by far more than the variance itself there."""
    x = 1e8 + 1e-3 * np.random.default_rng(0).standard_normal((1000, 2))
    parts = [phases.batch_stats(x[i:i + 7]) for i in range(0, 1000, 7)]
    merged = phases.merge_stats(parts)
    np.testing.assert_allclose(merged.var, x.var(axis=0), rtol=1e-4)
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.all(np.abs(naive - x.var(axis=0)) > x.var(axis=0))
    assert merged.count == 1000.0


def test_merge_order_is_fixed_and_empty_pieces_change_nothing():
    x = np.random.default_rng(1).normal(3.0, 1.0, (20, 3))
    parts = [phases.batch_stats(x[a:b]) for a, b in ((0, 5), (5, 5), (5, 13), (13, 20))]
    first = phases.merge_stats(parts)
    again = phases.merge_stats(parts)
    assert np.array_equal(first.mean, again.mean) and np.array_equal(first.m2, again.m2)
    without_empty = phases.merge_stats([parts[0], parts[2], parts[3]])
    np.testing.assert_allclose(first.mean, without_empty.mean, rtol=1e-15)
    empty = phases.merge_stats([parts[1]])
    assert empty.count == 0.0 and not empty.mean.any() and not empty.m2.any()


def test_errors_name_the_argument_and_change_nothing():
    x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    stats = phases.batch_stats(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    one = phases.batch_stats(x[:1])
    with pytest.raises(ValueError, match="stats.count"):
        phases.normalize(x[:1], one, running_mean=rm, running_var=rv)
    assert not rm.any() and (rv == 1).all()
    with pytest.raises(ValueError, match="stats.mean"):
        phases.normalize(x, phases.BatchStats(4.0, np.zeros(2), np.ones(2)))
    with pytest.raises(ValueError, match="running_var"):
        phases.normalize(x, stats, running_mean=rm)
    with pytest.raises(ValueError, match="at least one"):
        phases.merge_stats([])
    with pytest.raises(ValueError, match="stats\\[1\\].mean"):
        phases.merge_stats([stats, phases.BatchStats(1.0, np.zeros(2), np.zeros(2))])
    with pytest.raises(TypeError, match="float32 or float64"):
        phases.batch_stats(x.astype(np.float16))
    with pytest.raises(ValueError, match="sums.count"):
        phases.backward_dx(x, x, stats.mean, np.ones(3),
                           phases.GradSums(0.0, np.zeros(3), np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="dy"):
        phases.backward_sums(x[:2], x, stats.mean, np.ones(3))


def _split_run(x, dy, axis, backend, activation):
    """Phases over two pieces of x cut along its first non-feature axis."""
    cut_axis = 0 if axis != 0 else 1
    n = x.shape[cut_axis]
    pieces = [tuple(slice(a, b) if i == cut_axis else slice(None) for i in range(x.ndim))
              for a, b in ((0, n // 2), (n // 2, n))]
    C = x.shape[axis]
    gamma, beta = np.linspace(0.5, 1.5, C), np.linspace(-0.2, 0.3, C)
    merged = phases.merge_stats([phases.batch_stats(x[p], axis=axis, backend=backend)
                                 for p in pieces])
    ys = [phases.normalize(x[p], merged, gamma, beta, axis=axis, activation=activation,
                           backend=backend) for p in pieces]
    sums = phases.merge_sums([phases.backward_sums(dy[p], x[p], merged.mean, ys[0].invstd,
                                                   gamma, beta, axis=axis, activation=activation,
                                                   backend=backend) for p in pieces])
    dxs = [phases.backward_dx(dy[p], x[p], merged.mean, ys[0].invstd, sums, gamma, beta,
                              axis=axis, activation=activation, backend=backend).dx
           for p in pieces]
    return (np.concatenate([y.y for y in ys], axis=cut_axis),
            np.concatenate(dxs, axis=cut_axis), gamma, beta)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("name,shape,axis,order", LAYOUTS_ALL, ids=[lay[0] for lay in LAYOUTS_ALL])
def test_every_layout_serial_and_parallel_alike(name, shape, axis, order, activation, backend):
    """Awkward layouts (Fortran, strided, channels-last memory, broadcast, ...), float64,
    against the fused functions, on one thread and on two. The two agree to rounding, not bit
    for bit: Numba compiles the serial and parallel twins apart, and freshly compiled twins
    were seen to differ in the last bits of the ReLU backward (the statistics every rank
    shares come from one merge, so they are identical on every rank regardless)."""
    x = make_x(shape, np.float64, order, seed=2)
    dy = make_x(shape, np.float64, "C", seed=3)
    with forced_parallel(False):
        y1, dx1, gamma, beta = _split_run(x, dy, axis, backend, activation)
    before = fastbn.get_num_threads()
    fastbn.set_num_threads(min(2, thread_limit()))
    try:
        with forced_parallel(True):
            y2, dx2, _, _ = _split_run(x, dy, axis, backend, activation)
    finally:
        fastbn.set_num_threads(before)
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-12, atol=1e-12 * np.abs(dx1).max(),
                               err_msg=name)
    ref = fastbn.forward(x, gamma, beta, axis=axis, activation=activation, backend=backend)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd, gamma, beta, axis=axis,
                           activation=activation, backend=backend)
    assert np.abs(y1 - ref.y).max() <= 1e-12, name
    assert np.abs(dx1 - bref.dx).max() <= 1e-12 * max(1.0, np.abs(bref.dx).max()), name


def test_doctests():
    import doctest

    result = doctest.testmod(phases)
    assert result.failed == 0 and result.attempted > 0


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 40), C=st.integers(1, 5), B=st.sampled_from([1, 3, 70]),
       cuts=st.lists(st.integers(0, 40), max_size=5), loc=st.sampled_from([0.0, 1e6]),
       relu=st.booleans(), data=st.data())
def test_hypothesis_any_split_equals_the_whole(n, C, B, cuts, loc, relu, data, backend):
    """Any split of the batch (empty pieces included, runs short and long), merged, gives
    the whole batch's forward and backward (float64)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = loc + rng.standard_normal((n, C, B))
    dy = rng.standard_normal(x.shape)
    edges = sorted({0, n, *(min(c, n) for c in cuts)})
    pieces = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])] + [slice(0, 0)]
    activation = "relu" if relu else None
    merged = phases.merge_stats([phases.batch_stats(x[p], backend=backend) for p in pieces])
    outs = [phases.normalize(x[p], merged, activation=activation, backend=backend)
            for p in pieces]
    sums = phases.merge_sums([phases.backward_sums(dy[p], x[p], merged.mean, outs[0].invstd,
                                                   beta=None, activation=activation,
                                                   backend=backend)
                              for p in pieces])
    dx = np.concatenate([phases.backward_dx(dy[p], x[p], merged.mean, outs[0].invstd, sums,
                                            beta=None, activation=activation,
                                            backend=backend).dx
                         for p in pieces])
    ref = fastbn.forward(x, activation=activation, backend=backend)
    bref = fastbn.backward(dy, x, ref.mean, ref.invstd, beta=None, activation=activation,
                           backend=backend)
    cond = max(1.0, loc) * np.abs(ref.invstd).max()  # relative error grows with mean/spread
    np.testing.assert_allclose(np.concatenate([o.y for o in outs]), ref.y,
                               atol=1e-13 * cond + 1e-12)
    np.testing.assert_allclose(dx, bref.dx, atol=(1e-13 * cond + 1e-12)
                               * max(1.0, np.abs(bref.dx).max()))
