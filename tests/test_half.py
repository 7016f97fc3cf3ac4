"""float16 and bfloat16 (ml_dtypes) inputs: float32 statistics, results in the input's dtype."""
import numpy as np
import pytest

import fastbn
from conftest import make_x, params

ml_dtypes = pytest.importorskip("ml_dtypes")
HALVES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
#: Unit roundoff of each half type: results may differ from the float64 reference by the
#: reference's own rounding to the half type plus the float32 intermediate's (one unit each).
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def close(a, b, name, scale):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    worst = np.abs(a - b).max() if a.size else 0.0
    assert worst <= 2 * EPS[name] * max(1.0, scale), f"max error {worst}"


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape,axis", [((8, 4, 6, 6), 1), ((8, 6, 6, 4), -1), ((64, 5), 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_against_reference(name, shape, axis, training):
    dtype = HALVES[name]
    x = make_x(shape, dtype)
    dy = make_x(shape, dtype, seed=5)
    C = shape[axis]
    gamma, beta = params(C, np.float32)  # the normal case: float32 parameters and statistics
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.forward(x, gamma, beta, axis=axis, training=training,
                                     running_mean=rm, running_var=rv)
    ref = fastbn.reference.forward(x, gamma, beta, axis=axis, training=training,
                                   running_mean=rm_ref, running_var=rv_ref)
    assert y.dtype == dtype and mean.dtype == np.float32 and invstd.dtype == np.float32
    close(y, ref.y, name, np.abs(ref.y.astype(np.float64)).max())
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6, atol=1e-6)
    dx, dg, db = fastbn.backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    gr = fastbn.reference.backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    assert dx.dtype == dtype and dg.dtype == np.float32
    close(dx, gr.dx, name, 4 * np.abs(gr.dx.astype(np.float64)).max())
    np.testing.assert_allclose(dg, gr.dgamma, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, gr.dbeta, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", HALVES)
def test_half_out_and_in_place(name):
    dtype = HALVES[name]
    x = make_x((6, 3, 4, 4), dtype)
    expected = fastbn.forward(x).y
    out = np.empty_like(x)
    assert fastbn.forward(x, out=out).y is out
    np.testing.assert_array_equal(out, expected)
    inplace = x.copy()
    assert fastbn.forward(inplace, out=inplace).y is inplace
    np.testing.assert_array_equal(inplace, expected)


@pytest.mark.parametrize("name", HALVES)
def test_half_matches_torch(name):
    torch = pytest.importorskip("torch")
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    x32 = make_x((8, 4, 5, 5), np.float32)
    xt = torch.from_numpy(x32).to(tdtype).requires_grad_(True)
    x = xt.detach().float().numpy().astype(HALVES[name])  # the same half values
    w = torch.ones(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    y_t = torch.nn.functional.batch_norm(xt, rm, rv, w, b, True, 0.1, 1e-5)
    dy32 = make_x((8, 4, 5, 5), np.float32, seed=9)
    y_t.backward(torch.from_numpy(dy32).to(tdtype))
    rm_np, rv_np = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, mean, invstd = fastbn.forward(x, np.ones(4, np.float32), np.zeros(4, np.float32),
                                     running_mean=rm_np, running_var=rv_np)
    dy = torch.from_numpy(dy32).to(tdtype).float().numpy().astype(HALVES[name])
    dx, dg, db = fastbn.backward(dy, x, mean, invstd, np.ones(4, np.float32))
    close(y, y_t.detach().float().numpy(), name, 4)
    close(dx, xt.grad.float().numpy(), name, 4 * np.abs(dx.astype(np.float64)).max())
    np.testing.assert_allclose(rm_np, rm.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(rv_np, rv.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(db, b.grad.numpy(), rtol=2e-2, atol=2e-2)


@pytest.fixture(params=["best", "f16c", "software"])
def half_path(request, backend):
    """The Cython kernels' float16 conversion: the best this CPU has (AVX-512F here), F16C
    with AVX, and the portable C loops; one this CPU lacks is skipped. Numba has one."""
    if backend != "cython":
        if request.param != "best":
            pytest.skip("Numba has one float16 conversion (LLVM's)")
        yield request.param
        return
    from fastbn import _cy_kernels

    try:
        if _cy_kernels.half_conversion(request.param) != request.param != "best":
            pytest.skip(f"this CPU has no {request.param}")
        yield request.param
    finally:
        _cy_kernels.half_conversion("best")


@pytest.mark.parametrize("name", HALVES)
def test_conversion_kernels_match_numpy_bit_for_bit(name, backend, half_path):
    """Round trips through the parallel conversion kernels equal NumPy's/ml_dtypes' casts,
    special values included: +-0, +-inf, NaN, subnormals, overflow, ties."""
    from fastbn import _half

    dtype = HALVES[name]
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-8, 6e-5, 65504.0, 7e4,
                         1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 3.0e38],
                        np.float32)
    values = np.concatenate([specials, (rng.standard_normal(300_000) * 100).astype(np.float32)])
    with np.errstate(over="ignore"):
        expected_half = values.astype(dtype)
    half = np.empty(values.shape, dtype)
    _half._convert(values, half, backend)
    np.testing.assert_array_equal(half.view(np.uint16), expected_half.view(np.uint16))
    back = np.empty(values.shape, np.float32)
    _half._convert(half, back, backend)
    np.testing.assert_array_equal(back, expected_half.astype(np.float32))


@pytest.mark.parametrize("name", HALVES)
def test_strided_half_input(name):
    x = make_x((8, 4, 6, 6), HALVES[name])[:, :, ::2]
    close(fastbn.forward(x).y, fastbn.reference.forward(x).y, name, 4)


@pytest.mark.parametrize("name", HALVES)
def test_conversion_kernels_on_every_half_and_random_float_bits(name, backend, half_path):
    """Every one of the 65,536 half bit patterns to float32, and 2**21 random float32 bit
    patterns (all exponents, NaN payloads, subnormals) to half, against NumPy's casts."""
    from fastbn import _half

    dtype = HALVES[name]
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    wide = np.empty(halves.shape, np.float32)
    _half._convert(halves, wide, backend)
    # Exact bits, except that a signaling NaN may come back quiet (x86's hardware conversion,
    # which Numba and the Cython kernels use where the CPU has it, sets the quiet bit; NumPy
    # and the Cython software loops keep it as it is).
    expected_wide = halves.astype(np.float32).view(np.uint32)
    quiet = np.where(np.isnan(halves.astype(np.float32)), np.uint32(0x400000), np.uint32(0))
    np.testing.assert_array_equal(wide.view(np.uint32) | quiet, expected_wide | quiet)
    bits = np.random.default_rng(5).integers(0, 2**32, 2**21, dtype=np.uint64)
    floats = bits.astype(np.uint32).view(np.float32)
    floats = floats[~np.isnan(floats)] if name == "bfloat16" else floats
    narrow = np.empty(floats.shape, dtype)
    _half._convert(floats, narrow, backend)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = floats.astype(dtype)
    nan = np.isnan(floats)  # NaN stays NaN of the same sign; its payload may be quieted
    np.testing.assert_array_equal(narrow[~nan].view(np.uint16), expected[~nan].view(np.uint16))
    assert np.isnan(narrow[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(np.signbit(narrow[nan]), np.signbit(floats[nan]))


def _assert_same_bytes(got, expected):
    """Every array of got has the dtype and the bytes of its twin in expected."""
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == b.dtype, f"output {i}: {a.dtype} != {b.dtype}"
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=f"output {i}")


def _spy_kernels(monkeypatch, *names):
    """Calls of the named _cy_kernels functions from now on, as (name, args), each still
    running."""
    from fastbn import _cy_kernels

    seen = []
    for name in names:
        real = getattr(_cy_kernels, name)
        monkeypatch.setattr(_cy_kernels, name,
                            lambda *a, name=name, real=real: seen.append((name, a)) or real(*a))
    return seen


def _whole_arrays_only(monkeypatch):
    """From here on, half inputs take the whole-array float32 path (the reference for the
    fused paths' bits)."""
    from fastbn import _half

    monkeypatch.setattr(_half, "_forward_half_fused", lambda backend, args: None)
    monkeypatch.setattr(_half, "_half_plan", lambda backend, args: None)


@pytest.mark.backends("cython")
@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape", [(8, 7, 10, 10), (2, 7, 32, 32), (3, 5, 70)],
                         ids=["NCHW", "NCHW-groups", "NCL"])
@pytest.mark.parametrize("relu", [None, "relu"], ids=["plain", "relu"])
@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
def test_feature_outer_half_training_gives_the_whole_array_bits(name, shape, relu, in_place,
                                                                backend, monkeypatch):
    """Training on feature-outer half inputs goes through float32 in cache (forward and
    backward by groups of features, the ReLU backward by slices): every output and running
    statistic has the bits of the whole-array conversion path, also when writing over x and
    dy. With 16 KiB of scratch per thread, NCHW-groups (1024-value runs) has four forward groups
    (one feature, then three of two) and ReLU-backward slices of four and three; the others
    one feature per group (runs under 4 KiB) and one slice."""
    from fastbn import _half

    dtype = HALVES[name]
    C = shape[1]
    x = make_x(shape, dtype)
    dy = make_x(shape, dtype, seed=7)
    gamma, beta = params(C, np.float32)
    monkeypatch.setattr(_half, "HALF_SLICE_BYTES_PER_THREAD", 16 * 1024)
    monkeypatch.setattr(_half, "get_num_threads", lambda: 2)
    grouped = shape == (2, 7, 32, 32)
    seen = _spy_kernels(monkeypatch, "forward_train_half_outer", "backward_half_outer",
                        "convert_runs")

    def run():
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        xs, dys = x.copy(), dy.copy()
        fwd = fastbn.forward(xs, gamma, beta, running_mean=rm, running_var=rv, activation=relu,
                             out=xs if in_place else None)
        bwd = fastbn.backward(dys, x, fwd.mean, fwd.invstd, gamma, beta, activation=relu,
                              out=dys if in_place else None)
        return [fwd.y, fwd.mean, fwd.invstd, rm, rv, *bwd]

    fast = run()
    kernels = {k for k, _ in seen}
    assert [a[-1] for k, a in seen if k == "forward_train_half_outer"] == [4 if grouped else C]
    if relu:
        widths = sorted({a[1].shape[1] for k, a in seen if k == "convert_runs"})
        assert widths == ([3, 4] if grouped else [C])
    else:
        assert "backward_half_outer" in kernels and "convert_runs" not in kernels
    _whole_arrays_only(monkeypatch)
    whole = run()
    _assert_same_bytes(fast, whole)


@pytest.mark.backends("cython")
@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape,axis", [((8, 7, 10, 10), 1), ((3, 5, 70), 1), ((8, 6, 6, 12), -1),
                                        ((40, 300), 1)], ids=["NCHW", "NCL", "NHWC", "NC"])
@pytest.mark.parametrize("relu", [None, "relu"], ids=["plain", "relu"])
@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
def test_fused_half_inference_gives_the_float32_path_bits(name, shape, axis, relu, in_place,
                                                          backend, monkeypatch):
    """Inference on half x in one pass (normalize_half: a chunk at a time through float32)
    has the bits of normalizing a float32 copy of x and rounding, on both kernel families."""

    dtype = HALVES[name]
    C = shape[axis]
    x = make_x(shape, dtype)
    gamma, beta = params(C, np.float32)
    rm = np.linspace(-1, 1, C).astype(np.float32)
    rv = np.linspace(0.5, 2, C).astype(np.float32)
    calls = _spy_kernels(monkeypatch, "normalize_half")

    def run():
        xs = x.copy()
        res = fastbn.forward(xs, gamma, beta, axis=axis, training=False, running_mean=rm,
                             running_var=rv, activation=relu, out=xs if in_place else None)
        return [res.y, res.mean, res.invstd]

    fused = run()
    assert calls, "normalize_half did not run"
    _whole_arrays_only(monkeypatch)
    whole = run()
    _assert_same_bytes(fused, whole)


@pytest.mark.backends("cython")
@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape,axis", [((8, 6, 6, 12), -1), ((37, 1030), 1), ((3, 4, 5, 6), 1)],
                         ids=["NHWC", "NC-ragged", "inner-runs"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-backward"])
@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
def test_feature_inner_half_training_gives_the_whole_array_bits(name, shape, axis, training,
                                                                in_place, backend,
                                                                monkeypatch):
    """Training on feature-inner half inputs (forward_train_half_inner, backward_half_inner:
    the float32 row loops on converted chunks of up to four rows) has the bytes of the
    whole-array path: rows not a multiple of four, rows longer than a chunk (1030 values),
    features with runs of several values (B > 1), in place, eval-mode backward."""

    dtype = HALVES[name]
    C = shape[axis]
    x = make_x(shape, dtype)
    dy = make_x(shape, dtype, seed=7)
    gamma, beta = params(C, np.float32)
    seen = _spy_kernels(monkeypatch, "forward_train_half_inner", "backward_half_inner")

    def run():
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        xs, dys = x.copy(), dy.copy()
        fwd = fastbn.forward(xs, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                             out=xs if in_place else None)
        bwd = fastbn.backward(dys, x, fwd.mean, fwd.invstd, gamma, beta, axis=axis,
                              training=training, out=dys if in_place else None)
        return [fwd.y, fwd.mean, fwd.invstd, rm, rv, *bwd]

    fast = run()
    assert [name for name, _ in seen] == ["forward_train_half_inner", "backward_half_inner"]
    _whole_arrays_only(monkeypatch)
    whole = run()
    _assert_same_bytes(fast, whole)
