"""The contract beyond values: accuracy on ill-conditioned data, gradients, determinism, lazy
imports, result types, read-only and list inputs."""
import subprocess
import sys

import os

import numpy as np
import pytest

import fastbn
from conftest import make_x

ILL_CASES = [((64, 8, 16, 16), 1), ((64, 16, 16, 8), -1), ((4096, 8), 1), ((8, 16, 4096), 1)]


def spy_launches(monkeypatch):
    """Every kernel launch of the dispatch from now on, as (kernel, threads, args), the kernel
    still running."""
    from fastbn import _backends, _drivers, _half

    seen = []
    real = _backends._launch

    def spy(backend, threads, kern, *args):
        seen.append((kern, threads, args))
        return real(backend, threads, kern, *args)

    for module in (_drivers, _half):  # every module that launches kernels
        monkeypatch.setattr(module, "_launch", spy)
    python_path_only(monkeypatch)
    return seen


def python_path_only(monkeypatch):
    """Route every call through the Python path: the compiled call path (_cy_call.pxi)
    launches its kernels in C, out of sight of the spies on Python-level launches."""
    from fastbn import _backends, api

    monkeypatch.setattr(api, "_fast_forward", _backends._no_call_path)
    monkeypatch.setattr(api, "_fast_backward", _backends._no_call_path)


@pytest.mark.parametrize("shape,axis", ILL_CASES, ids=[str(c) for c in ILL_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_huge_mean_tiny_spread_float32(backend, shape, axis, training):
    """float32 data of mean 1e4 and spread 0.1: y and dx within 1e-5 of float64 math on the
    same float32 input (PyTorch's CPU kernel is off by 6e-3 here)."""
    rng = np.random.default_rng(5)
    x = (1e4 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x64 = np.moveaxis(x, axis, -1).astype(np.float64)
    dy64 = np.moveaxis(dy, axis, -1).astype(np.float64)
    over = tuple(range(x64.ndim - 1))
    C = x.shape[axis]
    if training:
        mean, var = x64.mean(axis=over), x64.var(axis=over)
        rm = rv = None
    else:  # running statistics as a float32 model would hold them
        rm = x64.mean(axis=over).astype(np.float32)
        rv = (x64.var(axis=over) * 1.3).astype(np.float32)
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x64 - mean) * invstd
    y_true = xhat
    if training:
        m = x64.size // C
        dbeta, dgamma = dy64.sum(axis=over), (dy64 * xhat).sum(axis=over)
        dx_true = invstd / m * (m * dy64 - dbeta - xhat * dgamma)
    else:
        dx_true = invstd * dy64
    y, mu, istd = fastbn.forward(x, axis=axis, training=training, running_mean=rm,
                                 running_var=rv, backend=backend)
    dx, _, _ = fastbn.backward(dy, x, mu, istd, axis=axis, training=training, backend=backend)
    y_err = np.abs(np.moveaxis(y, axis, -1) - y_true).max()
    dx_err = np.abs(np.moveaxis(dx, axis, -1) - dx_true).max() / np.abs(dx_true).max()
    assert y_err < 1e-5, f"y error {y_err:.2e}"
    assert dx_err < 1e-5, f"dx relative error {dx_err:.2e}"


def test_reference_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4))
    gamma, beta = rng.standard_normal(2), rng.standard_normal(2)
    w = rng.standard_normal(x.shape)  # loss = sum(w * y)

    def loss(x_, g_, b_):
        return float((w * fastbn.reference.forward(x_, g_, b_).y).sum())

    _, mean, invstd = fastbn.reference.forward(x, gamma, beta)
    dx, dg, db = fastbn.reference.backward(w, x, mean, invstd, gamma, beta)
    h = 1e-6
    for arr, grad, args in ((x, dx, lambda a: (a, gamma, beta)),
                            (gamma, dg, lambda a: (x, a, beta)),
                            (beta, db, lambda a: (x, gamma, a))):
        numeric = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            numeric[i] = (loss(*args(plus)) - loss(*args(minus))) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_eval_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), 0.5 + rng.random(3)
    w = rng.standard_normal(x.shape)
    y, mean, invstd = fastbn.forward(x, gamma, beta, training=False, running_mean=rm,
                                     running_var=rv)
    dx, dg, db = fastbn.backward(w, x, mean, invstd, gamma, beta, training=False)
    np.testing.assert_allclose(dx, w * gamma * invstd, rtol=1e-12)
    np.testing.assert_allclose(dg, (w * (x - rm) * invstd).sum(0), rtol=1e-12)
    np.testing.assert_allclose(db, w.sum(0), rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((64, 16, 32, 32), 1), ((4096, 96), 1),
                                        ((16, 32, 32, 16), -1)])
def test_same_bits_for_any_thread_count(shape, axis):
    numba = pytest.importorskip("numba")
    x = make_x(shape, np.float32, seed=2)
    dy = make_x(shape, np.float32, seed=3)
    results = []
    before = fastbn.get_num_threads()
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        fastbn.set_num_threads(threads)
        try:
            y, mean, invstd = fastbn.forward(x, axis=axis)
            results.append((y, mean, invstd, *fastbn.backward(dy, x, mean, invstd, axis=axis)))
        finally:
            fastbn.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("C", [7, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_feature_groups_and_threads_do_not_change_the_bits(backend, C, dtype, monkeypatch):
    """The feature-outer kernels cut the features into ``ngroups`` groups of adjacent
    features (_plans._groups): any number of groups, also more than features (empty
    groups), on any number of threads, also more than features, gives every output the bits
    of one group on one thread (a feature left out or done twice would not)."""
    from fastbn import _drivers

    x = make_x((3, C, 40, 40), dtype, seed=4)
    dy = make_x((3, C, 40, 40), dtype, seed=5)
    gamma, beta = 1 + 0.1 * make_x((C,), dtype, seed=6), make_x((C,), dtype, seed=7)
    seen = spy_launches(monkeypatch)

    def run(ngroups, threads):
        monkeypatch.setattr(_drivers, "_groups", lambda *a, **k: ngroups)
        monkeypatch.setattr(_drivers, "launch_threads", lambda *a, **k: threads)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, mean, invstd = fastbn.forward(x, gamma, beta, running_mean=rm, running_var=rv)
        train = fastbn.backward(dy, x, mean, invstd, gamma, beta)
        ev = fastbn.backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), gamma, beta, training=False)
        return [y, mean, invstd, rm, rv, *train, *ev]

    expected = run(1, 1)
    for threads in ((1, 2, 3) if backend == "cython" else (1, 2)):
        for ngroups in (2, 3, 4, C, 2 * C + 1):
            seen.clear()
            for got, want in zip(run(ngroups, threads), expected):
                np.testing.assert_array_equal(got, want, err_msg=f"{ngroups=} {threads=}")
            assert [(kern.__name__, args[-1]) for kern, _, args in seen] == \
                [("forward_train_outer", ngroups)] + [("backward_outer", ngroups)] * 2


def test_serial_and_parallel_twins_agree():
    from fastbn import _backends

    x = make_x((8, 16, 24, 24), np.float64, seed=4)
    dy = make_x(x.shape, np.float64, seed=5)
    results = []
    for parallel in (True, False):
        with _backends.forced_parallel(parallel):
            y, mean, invstd = fastbn.forward(x)
            results.append((y, mean, invstd, *fastbn.backward(dy, x, mean, invstd)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_import_does_not_load_numba_or_torch():
    code = ("import sys, fastbn; "
            "print('numba' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.backends("cython")
def test_cython_backend_never_loads_numba():
    """For processes where Numba's runtime is unwelcome: every path of the Cython backend
    (training, eval, ReLU, half precision, thread control) runs without importing Numba."""
    code = ("import sys, numpy as np, fastbn\n"
            "x = np.random.default_rng(0).standard_normal((64, 8, 16, 16)).astype(np.float32)\n"
            "rm, rv = np.zeros(8), np.ones(8)\n"
            "y, m, i = fastbn.forward(x, running_mean=rm, running_var=rv, activation='relu')\n"
            "fastbn.backward(x, x, m, i, None, None, activation='relu')\n"
            "fastbn.forward(x, training=False, running_mean=rm, running_var=rv)\n"
            "fastbn.forward(x.astype(np.float16)); fastbn.forward(x.transpose(0, 2, 3, 1), axis=-1)\n"
            "fastbn.set_num_threads(fastbn.get_num_threads())\n"
            "print('numba' in sys.modules, 'llvmlite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, FASTBN_BACKEND="cython")).stdout
    assert out.split() == ["False", "False"]


def test_thread_limit_matches_numba():
    """fastbn finds NUMBA_NUM_THREADS without importing Numba, by Numba's own rule."""
    code = ("from fastbn import _backends; a = _backends.thread_limit(); import numba; "
            "print(a, numba.config.NUMBA_NUM_THREADS)")
    for env in ({}, {"NUMBA_NUM_THREADS": "1"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=dict(os.environ, **env)).stdout.split()
        assert out[0] == out[1]


def test_results_are_named_tuples():
    x = make_x((4, 3), np.float64)
    res = fastbn.forward(x)
    assert isinstance(res, fastbn.ForwardResult) and res.y is res[0]
    grads = fastbn.backward(x, x, res.mean, res.invstd)
    assert isinstance(grads, fastbn.BackwardResult) and grads.dbeta is grads[2]


def test_read_only_and_list_inputs_are_accepted():
    x = make_x((6, 3, 2), np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(fastbn.forward(ro).y, fastbn.forward(x).y)
    as_list = fastbn.forward(x.astype(np.float64).tolist())
    np.testing.assert_allclose(as_list.y, fastbn.reference.forward(x.astype(np.float64)).y,
                               atol=1e-12)


def _param_forms(v):
    """v in every form a per-feature parameter may take: float32 and float64 are read as they
    are, the rest converted. With v exact in bfloat16, every form holds v's values."""
    wide = np.repeat(v, 2)
    ro = v.astype(np.float32)
    ro.flags.writeable = False
    forms = {"float32": v.astype(np.float32), "float16": v.astype(np.float16),
             "big-endian float32": v.astype(">f4"), "strided": wide[::2],
             "read-only float32": ro, "list": v.tolist()}
    try:
        import ml_dtypes
    except ImportError:  # the half extra is not installed
        return forms
    return {**forms, "bfloat16": v.astype(ml_dtypes.bfloat16)}


@pytest.mark.parametrize("shape,axis", [((8, 6, 5), 1), ((7, 6), 1), ((4, 3, 6), -1)],
                         ids=["outer", "inner", "channels-last"])
@pytest.mark.parametrize("relu", [None, "relu"], ids=["plain", "relu"])
def test_every_parameter_form_gives_the_same_results(shape, axis, relu):
    """gamma, beta, the running statistics, mean and invstd as float32, float16, bfloat16,
    big-endian, strided, read-only or lists: the same bits as contiguous arrays of the same values (the
    Cython kernels convert float32 vectors themselves, NumPy the others; all exactly)."""
    C = shape[axis]
    x = make_x(shape, np.float32, seed=21)
    dy = make_x(shape, np.float32, seed=22)
    g64, b64 = 1 + np.arange(C) / 8, np.arange(C) / 16 - 0.125  # exact in float16
    rm64, rv64 = np.arange(C) / 4 - 0.5, 1 + np.arange(C) / 2
    fwd = fastbn.forward(x, g64, b64, axis=axis, activation=relu)
    # mean and invstd stay float32 in every form: backward refines a mean to within one unit
    # in the last place of its own dtype, so a float16 or float64 one is another question
    m32, i32 = fwd.mean, fwd.invstd
    stat_forms = {"big-endian float32": (m32.astype(">f4"), i32.astype(">f4")),
                  "strided": (np.repeat(m32, 2)[::2], np.repeat(i32, 2)[::2]),
                  "read-only float32": (m32.copy(), i32.copy())}
    for a in stat_forms["read-only float32"]:
        a.flags.writeable = False
    expected_eval = fastbn.forward(x, g64, b64, axis=axis, training=False, running_mean=rm64,
                                   running_var=rv64, activation=relu).y
    expected_grads = fastbn.backward(dy, x, m32, i32, g64, b64, axis=axis, activation=relu)
    forms = zip(*(_param_forms(v).items() for v in (g64, b64, rm64, rv64)))
    for (form, g), (_, b), (_, rm), (_, rv) in forms:
        where = f"{form} parameters, shape {shape}, axis {axis}, {relu}"
        np.testing.assert_array_equal(fastbn.forward(x, g, b, axis=axis, activation=relu).y,
                                      fwd.y, err_msg=where)
        running = [np.array(r) if isinstance(r, list) else r for r in (rm, rv)]
        got = fastbn.forward(x, g, b, axis=axis, training=False, running_mean=running[0],
                             running_var=running[1], activation=relu).y
        np.testing.assert_array_equal(got, expected_eval, err_msg=where)
        mean, invstd = stat_forms.get(form, (m32, i32))
        grads = fastbn.backward(dy, x, mean, invstd, g, b, axis=axis, activation=relu)
        for name, a, e in zip(grads._fields, grads, expected_grads):
            np.testing.assert_array_equal(a, e, err_msg=f"{name}: {where}")


def test_backward_uses_given_mean_when_it_is_not_the_batch_mean():
    """The float64 refinement applies only to a mean that rounds from the batch mean."""
    x = make_x((8, 3), np.float64, seed=9)
    dy = make_x((8, 3), np.float64, seed=10)
    mean = x.mean(0) + 0.25
    invstd = np.ones(3)
    fast = fastbn.backward(dy, x, mean, invstd)
    ref = fastbn.reference.backward(dy, x, mean, invstd)
    np.testing.assert_allclose(fast.dgamma, (dy * (x - mean)).sum(0), rtol=1e-12)
    np.testing.assert_allclose(fast.dx, ref.dx, rtol=1e-12, atol=1e-12)


def test_available_backends():
    names = fastbn.available_backends()
    assert names[-1] == "reference" and "numba" in names
    if os.environ.get("FASTBN_REQUIRE_CYTHON"):  # CI builds the extension: it must load
        assert "cython" in names


def test_default_backend_is_the_measured_fastest(monkeypatch):
    """Without backend= or FASTBN_BACKEND: Cython where built, for every dtype, else Numba;
    the argument and the environment variable win over the default."""
    from fastbn import _backends

    monkeypatch.delenv("FASTBN_BACKEND")
    names = fastbn.available_backends()
    if "cython" in names:
        assert names[0] == "cython"
        assert _backends.resolve_backend(None) == "cython"
    else:
        assert _backends.resolve_backend(None) == "numba"
    assert _backends.resolve_backend("reference") == "reference"
    monkeypatch.setenv("FASTBN_BACKEND", "numba")
    assert _backends.resolve_backend(None) == "numba"
    # what a call actually ran: the kernel module's launch sees it
    seen = spy_launches(monkeypatch)
    monkeypatch.delenv("FASTBN_BACKEND")
    fastbn.forward(np.ones((4, 3), np.float32))
    fastbn.forward(np.ones((4, 3), np.float16))
    expected = "fastbn._cy_kernels" if "cython" in names else "fastbn._numba_kernels"
    # float16: one fused launch or three
    assert len(seen) >= 2 and {kern.__module__ for kern, _, _ in seen} == {expected}


def test_docstring_examples_run():
    import doctest

    import fastbn.api

    result = doctest.testmod(fastbn.api)
    assert result.attempted >= 3 and result.failed == 0


def test_precompile_runs_every_family(monkeypatch):
    """The ahead-of-time command reaches both families and both twins (from the cache here)."""
    from fastbn import _backends, precompile

    seen = spy_launches(monkeypatch)
    precompile.precompile(dtypes=(np.float32,))
    names = {kern.__name__ for kern, _, _ in seen}
    assert {"forward_train_outer", "forward_train_inner", "normalize_outer", "normalize_inner",
            "backward_outer", "backward_inner"} <= names
    if fastbn.get_num_threads() > 1:
        assert {threads > 1 for _, threads, _ in seen} == {True, False}
    assert _backends._forced is None  # restored


@pytest.mark.parametrize("name", ["NCHW", "NHWC", "f16"])
def test_bench_times_what_it_names(name, backend):
    """The table's contenders compute batch norm: fastbn's and PyTorch's (out= overloads into
    preallocated tensors, channels-last for NHWC) forward, eval and backward outputs agree
    with each other on a small case of the same layout and dtype."""
    pytest.importorskip("torch")
    from fastbn import bench

    like = next(c for c in bench.CASES if name in c.name)
    shape = (4, 6, 5, 7) if like.axis == 1 else (4, 5, 7, 6)
    work = bench.Workload(bench.Case(like.name, shape, like.axis, like.dtype))
    tol = dict(rtol=1e-2, atol=1e-2) if like.dtype == "float16" else dict(rtol=1e-4, atol=1e-4)
    ours, theirs = work.fastbn(backend=backend), work.torch()
    for op in ("forward", "eval", "backward"):
        ours[op]()
        mine = (work.y if op != "backward" else work.dx).astype(np.float32)
        theirs[op]()
        got = work.torch_y if op != "backward" else work.torch_dx
        if like.axis != 1:
            got = got.permute(0, 2, 3, 1)
        np.testing.assert_allclose(got.float().numpy(), mine, **tol, err_msg=op)


def test_bench_skips_a_case_whose_dtype_cannot_be_made(monkeypatch):
    """Without ml_dtypes the bfloat16 row is skipped with a message, not a crash of the table."""
    import sys

    from fastbn import bench

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    messages = []
    rows = bench.run([bench.Case("bf16", (4, 3), dtype="bfloat16")], [1], samples=1,
                     with_reference=False, with_torch=False, log=messages.append)
    assert rows == [] and "skipped bf16" in messages[0]


def test_parallel_threshold_for_every_launch():
    """Every compiled backend has a measured crossover for each family and op; below it a
    kernel runs on the calling thread, from it on fastbn's thread count."""
    from fastbn import _backends

    for backend in ("numba", "cython"):
        for family in ("outer", "inner"):
            for op in ("forward", "eval", "backward"):
                edge = _backends.PARALLEL_MIN_BYTES[backend, family, op]
                assert _backends.launch_threads(backend, family, op, edge - 1) == 1
                assert _backends.launch_threads(backend, family, op,
                                                edge) == fastbn.get_num_threads()
    with _backends.forced_parallel(False):
        assert _backends.launch_threads("cython", "outer", "forward", 2**40) == 1
        with _backends.forced_parallel(True):
            assert _backends.launch_threads("numba", "inner", "eval", 1) == \
                fastbn.get_num_threads()
        assert _backends._forced is False
    assert _backends._forced is None


def test_crossover_point_is_where_the_team_stops_losing():
    """bench --crossover reports, per family and op, the smallest size from which the team
    was never slower, over every layout of the family."""
    from fastbn import bench_crossover as bench

    def row(layout, kib, serial, team):
        r = {"backend": "cython", "layout": layout, "family": "inner", "KiB": kib}
        for op in bench.CROSSOVER_OPS:
            r[f"{op} serial"], r[f"{op} team"] = serial, team
        return r

    rows = [row("NC", 16, 1.0, 2.0), row("NC", 32, 1.0, 0.9), row("NC", 64, 1.0, 0.5),
            row("NHWC", 16, 1.0, 2.0), row("NHWC", 32, 1.0, 1.1), row("NHWC", 64, 1.0, 0.5)]
    assert bench.crossover_points(rows)["cython", "inner", "forward"] == 64
    rows.append(row("NHWC", 128, 1.0, 1.5))  # losing again at the largest size: never
    assert bench.crossover_points(rows)["cython", "inner", "eval"] is None
    table = bench.format_crossover(rows)
    from fastbn._backends import PARALLEL_MIN_BYTES  # the table shows the threshold in use

    in_use = PARALLEL_MIN_BYTES["cython", "inner", "forward"] // 1024
    assert f"| cython | inner | forward | never | {in_use} |" in table


@pytest.mark.backends("cython")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((37, 5, 3, 6), -1), ((50, 300), 1), ((9, 4096), 1),
                                        ((6, 5, 37, 11), 1)],
                         ids=["NHWC", "NC", "NC-wide", "NCHW"])
def test_streaming_stores_give_the_same_bits(backend, dtype, shape, axis):
    """Outputs above stream_min_bytes are written through a buffer with non-temporal stores
    (feature-inner row loops; the feature-outer eval normalize, runs of 407 elements here, not
    a multiple of the buffer): the same bits as regular stores, for outputs at every alignment
    (the stores need 16 bytes: the loops peel up to it), ReLU, training and eval."""
    from fastbn import _cy_kernels

    x = make_x(shape, dtype, seed=31)
    dy = make_x(shape, dtype, seed=32)
    C = shape[axis]
    gamma, beta = 1 + np.arange(C) / C, np.arange(C) / C - 0.5
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)

    def outputs(offset):
        buf = np.zeros(x.size + 4, dtype)
        out = buf[offset:offset + x.size].reshape(shape)  # data misaligned by `offset` items
        results = []
        for relu in (None, "relu"):
            fwd = fastbn.forward(x, gamma, beta, axis=axis, activation=relu, out=out)
            results.append(fwd.y.copy())
            results.append(fastbn.forward(x, gamma, beta, axis=axis, training=False,
                                          running_mean=rm, running_var=rv, activation=relu,
                                          out=out).y.copy())
            bwd = fastbn.backward(dy, x, fwd.mean, fwd.invstd, gamma, beta, axis=axis,
                                  activation=relu, out=out)
            results.extend(a.copy() for a in bwd)
        return results

    before = _cy_kernels.stream_min_bytes()
    try:
        regular = [outputs(offset) for offset in range(3)]
        _cy_kernels.stream_min_bytes(0)
        streamed = [outputs(offset) for offset in range(3)]
    finally:
        _cy_kernels.stream_min_bytes(before)
    for offset in range(3):
        for i, (a, b) in enumerate(zip(regular[offset], streamed[offset])):
            np.testing.assert_array_equal(a, b, err_msg=f"output {i}, offset {offset}")


def test_streaming_threshold_is_the_last_level_cache(monkeypatch):
    """The Cython kernels stream outputs of at least 3/4 of the largest cache (sysfs, read as
    the kernel writes it: "32768K", "1M"); without sysfs, the default."""
    import builtins
    from fastbn import _backends

    assert _backends.last_level_cache_bytes() > 0
    cy = _backends._import_cython()
    if cy is not None:
        assert cy.stream_min_bytes() == _backends.last_level_cache_bytes() * 3 // 4
    sizes = {0: "32K", 1: "32K", 2: "1024K", 3: "32768K"}
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).startswith("/sys/devices/system/cpu/cpu0/cache/index"):
            index = int(str(path).split("index")[1].split("/")[0])
            if index not in sizes:
                raise FileNotFoundError(path)
            import io
            return io.StringIO(sizes[index] + "\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert _backends.last_level_cache_bytes() == 32 * 2**20
    sizes[3] = "2M"
    assert _backends.last_level_cache_bytes() == 2 * 2**20
    sizes.clear()
    assert _backends.last_level_cache_bytes(default=123) == 123
