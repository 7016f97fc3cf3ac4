"""fastbn.jax: values against the NumPy reference, gradients against JAX's own batch-norm
math, under jit, grad and vmap; read-only inputs; errors while tracing; the kernels really ran."""
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import fastbn  # noqa: E402
import fastbn.api  # noqa: E402
import fastbn.jax  # noqa: E402
from fastbn import reference  # noqa: E402


# (name, shape, feature axis)
LAYOUTS = [("NCHW", (4, 3, 2, 5), 1), ("NHWC", (4, 2, 5, 3), -1)]


def _data(shape, seed=0, mean=3.0, spread=2.0):
    return np.random.default_rng(seed).normal(mean, spread, shape).astype(np.float32)


def jax_batch_norm(x, gamma, beta, axis, training, rm=None, rv=None, eps=1e-5):
    """Batch norm written with jax.numpy (two-pass variance), the gradients' yardstick."""
    axis = axis % x.ndim
    over = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if training:
        mean = x.mean(over)
        var = jnp.square(x - mean.reshape(shape)).mean(over)
    else:
        mean, var = rm, rv
    scale = gamma * jax.lax.rsqrt(var + eps)
    return (x - mean.reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts fastbn.api.forward/backward calls and records whether the arrays JAX handed
    over were read-only views (they are: XLA owns the buffers)."""
    calls = {"forward": 0, "backward": 0, "x_writeable": []}
    real_forward, real_backward = fastbn.api.forward, fastbn.api.backward

    def forward(x, *args, **kwargs):
        calls["forward"] += 1
        calls["x_writeable"].append(x.flags.writeable)
        return real_forward(x, *args, **kwargs)

    def backward(dy, x, *args, **kwargs):
        calls["backward"] += 1
        calls["x_writeable"].append(x.flags.writeable)
        return real_backward(dy, x, *args, **kwargs)

    monkeypatch.setattr(fastbn.api, "forward", forward)
    monkeypatch.setattr(fastbn.api, "backward", backward)
    return calls


@pytest.mark.parametrize("call", fastbn.jax.CALLS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_training_under_jit_matches_reference(name, shape, axis, unbiased, call,
                                              kernel_calls):
    x = _data(shape)
    C = shape[axis]
    gamma, beta = _data(C, 1), _data(C, 2)
    rm, rv = _data(C, 3, 0.0, 1.0), np.abs(_data(C, 4)) + 0.5

    @jax.jit
    def step(x, gamma, beta, rm, rv):
        return fastbn.jax.batch_norm(x, gamma, beta, axis=axis, running_mean=rm,
                                     running_var=rv, momentum=0.2,
                                     unbiased_running_var=unbiased, call=call)

    y, new_rm, new_rv = step(x, gamma, beta, rm, rv)
    ref_rm, ref_rv = rm.copy(), rv.copy()
    ref = reference.forward(x, gamma, beta, axis=axis, running_mean=ref_rm,
                            running_var=ref_rv, momentum=0.2, unbiased_running_var=unbiased)
    where = f"{name}, unbiased_running_var={unbiased}, call={call}"
    np.testing.assert_allclose(np.asarray(y), ref.y, rtol=1e-5, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(np.asarray(new_rm), ref_rm, rtol=1e-6, err_msg=where)
    np.testing.assert_allclose(np.asarray(new_rv), ref_rv, rtol=1e-6, err_msg=where)
    assert new_rm.dtype == jnp.float32 and y.shape == shape
    assert kernel_calls["forward"] == 1 and kernel_calls["x_writeable"] == [False]


@pytest.mark.parametrize("call", fastbn.jax.CALLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_gradients_match_jax_math(name, shape, axis, training, call, kernel_calls):
    x = _data(shape)
    C = shape[axis]
    gamma, beta = _data(C, 1), _data(C, 2)
    rm, rv = _data(C, 3), np.abs(_data(C, 4)) + 0.5
    weights = _data(shape, 5)

    def loss(impl):
        def f(x, gamma, beta, rm, rv):
            y = impl(x, gamma, beta, rm, rv)
            return (jnp.sin(y) * weights).sum()
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    def ours(x, gamma, beta, rm, rv):
        return fastbn.jax.batch_norm(x, gamma, beta, axis=axis, training=training,
                                     running_mean=rm, running_var=rv, call=call).y

    def theirs(x, gamma, beta, rm, rv):
        return jax_batch_norm(x, gamma, beta, axis, training, rm, rv)

    got = loss(ours)(x, gamma, beta, rm, rv)
    want = loss(theirs)(x, gamma, beta, rm, rv)
    names = ["x", "gamma", "beta", "running_mean", "running_var"]
    for label, g, w in zip(names, got, want):
        if training and label.startswith("running"):
            # the loss depends on y only, and y does not depend on them in training
            assert not np.any(np.asarray(g)), label
            continue
        scale = max(1.0, float(np.abs(np.asarray(w)).max()))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"d{label}, {name}, training={training}, "
                                           f"call={call}")
    assert kernel_calls["forward"] == 1 and kernel_calls["backward"] == 1
    assert not any(kernel_calls["x_writeable"])


def test_relu_and_no_affine():
    x = _data((6, 4, 3), mean=0.0, spread=1.0)

    def ours(x):
        return (fastbn.jax.batch_norm(x, activation="relu").y ** 2).sum()

    def theirs(x):
        y = jax_batch_norm(x, jnp.ones(4), jnp.zeros(4), 1, True)
        return (jax.nn.relu(y) ** 2).sum()

    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(theirs)(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5)


def test_running_statistics_gradient_in_training_passes_through_the_decay():
    x = _data((5, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)

    def f(rm, rv):
        _, new_rm, new_rv = fastbn.jax.batch_norm(x, running_mean=rm, running_var=rv,
                                                  momentum=0.25)
        return new_rm.sum() + 2.0 * new_rv.sum()

    d_rm, d_rv = jax.grad(f, argnums=(0, 1))(rm, rv)
    np.testing.assert_allclose(d_rm, 0.75)
    np.testing.assert_allclose(d_rv, 1.5)


def test_vmap_runs_each_element_as_its_own_batch():
    xs = _data((3, 6, 4))  # three independent (N=6, C=4) batches
    gamma = _data(4, 1)

    ys = jax.jit(jax.vmap(lambda x: fastbn.jax.batch_norm(x, gamma).y))(xs)
    for i in range(3):
        np.testing.assert_allclose(ys[i], reference.forward(xs[i], gamma).y, rtol=1e-5,
                                   atol=1e-5)
    grads = jax.vmap(jax.grad(lambda x: (fastbn.jax.batch_norm(x, gamma).y ** 3).sum()))(xs)
    want = jax.vmap(jax.grad(lambda x: (jax_batch_norm(x, gamma, jnp.zeros(4), 1, True)
                                        ** 3).sum()))(xs)
    np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-4)


def test_eval_returns_running_statistics_unchanged():
    x = _data((4, 3))
    rm, rv = jnp.arange(3.0), jnp.ones(3) * 2.0
    y, out_rm, out_rv = fastbn.jax.batch_norm(x, training=False, running_mean=rm,
                                              running_var=rv)
    np.testing.assert_array_equal(out_rm, rm)
    np.testing.assert_array_equal(out_rv, rv)
    np.testing.assert_allclose(y, (x - np.arange(3.0)) / np.sqrt(2.0 + 1e-5), rtol=1e-6)


def test_numpy_and_list_inputs_become_jax_arrays():
    x64 = np.random.default_rng(0).normal(size=(5, 3))  # float64: float32 without x64
    y = fastbn.jax.batch_norm(x64, [1.0, 2.0, 3.0]).y
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, reference.forward(x64.astype(np.float32),
                                                    np.array([1.0, 2.0, 3.0])).y, rtol=1e-5,
                               atol=1e-5)


def test_without_running_statistics_none_come_back():
    result = fastbn.jax.batch_norm(_data((4, 3)))
    assert result.running_mean is None and result.running_var is None


@pytest.mark.parametrize("call", fastbn.jax.CALLS)
def test_a_failure_inside_the_computation_surfaces_with_its_message(call, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastbn.api, "forward", broken)
    with pytest.raises(Exception, match="kernel exploded"):
        jax.jit(lambda x: fastbn.jax.batch_norm(x, call=call).y)(jnp.ones((4, 3))) \
            .block_until_ready()


def test_empty_feature_axis_and_float64_under_x64():
    y = fastbn.jax.batch_norm(jnp.ones((4, 0, 3)), axis=1).y
    assert y.shape == (4, 0, 3)
    with jax.enable_x64(True):
        x = np.random.default_rng(0).normal(size=(6, 2))
        y, rm, rv = fastbn.jax.batch_norm(jnp.asarray(x), running_mean=jnp.zeros(2),
                                          running_var=jnp.ones(2))
        assert y.dtype == jnp.float64 and rm.dtype == jnp.float64
        ref_rm, ref_rv = np.zeros(2), np.ones(2)
        ref = reference.forward(x, running_mean=ref_rm, running_var=ref_rv)
        np.testing.assert_allclose(y, ref.y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rv, ref_rv, rtol=1e-12)


def test_ffi_falls_back_to_the_callback_on_an_unknown_ffi_api(monkeypatch, backend):
    import fastbn._jax_ffi
    assert fastbn._jax_ffi.available(jax)  # this jaxlib's is known
    used = []
    real = jax.pure_callback
    monkeypatch.setattr(fastbn._jax_ffi, "available", lambda jax: False)
    monkeypatch.setattr(jax, "pure_callback", lambda *a, **k: used.append(1) or real(*a, **k))
    x = _data((5, 3))
    # a configuration not compiled before (the backend's runs differ by it)
    y = fastbn.jax.batch_norm(x, axis=-1, eps=1e-3, backend=backend).y
    assert used
    np.testing.assert_allclose(y, reference.forward(x, eps=1e-3).y, rtol=1e-5, atol=1e-5)


def test_bfloat16_input():
    x = jnp.asarray(_data((8, 3, 4)), dtype=jnp.bfloat16)
    y = jax.jit(lambda x: fastbn.jax.batch_norm(x).y)(x)
    assert y.dtype == jnp.bfloat16
    want = reference.forward(np.asarray(x)).y
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), want.view(np.uint16))
    dx = jax.grad(lambda x: fastbn.jax.batch_norm(x).y.astype(jnp.float32).sum())(x)
    assert dx.dtype == jnp.bfloat16


def test_kernels_take_jax_read_only_views_without_a_copy(backend):
    x = jnp.asarray(_data((6, 3, 4)))
    view = np.asarray(x)
    assert not view.flags.writeable
    assert view.__array_interface__["data"][0] == x.unsafe_buffer_pointer()  # no copy
    gamma = np.asarray(jnp.ones(3))
    y, mean, invstd = fastbn.forward(view, gamma, backend=backend)
    dx, dgamma, _ = fastbn.backward(view, view, mean, invstd, gamma, backend=backend)
    ref_y, ref_mean, ref_invstd = reference.forward(view, gamma)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, reference.backward(view, view, ref_mean, ref_invstd,
                                                      gamma).dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(axis=3), ValueError, "axis 3 is out of range"),
    (dict(training=False), ValueError, "running_mean and running_var"),
    (dict(gamma=jnp.ones(4)), ValueError, "gamma must have shape (3,)"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(momentum=1.5), ValueError, "momentum must be in [0, 1]"),
    (dict(unbiased_running_var=1), TypeError, "unbiased_running_var must be True or False"),
    (dict(x=jnp.ones((4, 3), jnp.int32)), TypeError, "x must have dtype"),
    (dict(x=jnp.ones((1, 3))), ValueError, "at least 2 values per feature"),
    (dict(call="xla"), ValueError, "call must be one of"),
])
def test_bad_arguments_raise_while_tracing(kwargs, error, words, kernel_calls):
    kwargs = {"x": jnp.ones((4, 3)), **kwargs}
    x = kwargs.pop("x")
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        jax.jit(lambda x: fastbn.jax.batch_norm(x, **kwargs))(x)
    assert kernel_calls["forward"] == 0


def test_momentum_and_eps_as_jax_scalars():
    """0-d JAX arrays (jnp.float32(0.9), as Flax and Keras users write them) are numbers;
    traced ones are not, and say so."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(6, 3)), jnp.float32)
    rm, rv = jnp.zeros(3), jnp.ones(3)
    as_scalars = fastbn.jax.batch_norm(
        x, running_mean=rm, running_var=rv, momentum=jnp.float32(0.25), eps=jnp.float32(1e-3))
    as_floats = fastbn.jax.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25,
                                      eps=float(np.float32(1e-3)))
    for got, want in zip(as_scalars, as_floats):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(TypeError, match="momentum must be a concrete real number"):
        jax.jit(lambda m: fastbn.jax.batch_norm(x, running_mean=rm, running_var=rv,
                                                momentum=m))(0.25)


def test_importing_fastbn_imports_no_framework_and_a_missing_one_names_the_extra():
    code = ("import sys, fastbn\n"
            "assert not {'jax', 'flax', 'keras'} & set(sys.modules), 'imported'\n"
            "for module, extra in (('jax', 'jax'), ('flax', 'flax'), ('keras', 'keras')):\n"
            "    sys.modules[module] = None\n"
            "    try:\n"
            "        __import__('fastbn.' + module)\n"
            "    except ImportError as exc:\n"
            "        assert f'fastbn[{extra}]' in str(exc), exc\n"
            "    else:\n"
            "        raise AssertionError('no ImportError for ' + module)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_docstring_examples():
    import doctest
    assert doctest.testmod(fastbn.jax).failed == 0


@pytest.mark.backends("numba")
def test_bench_rows_run():
    from fastbn import bench_frameworks
    rows = bench_frameworks.run(["jax"], (4, 6, 6, 8), -1, samples=1, threads=1)
    assert [r["op"] for r in rows] == ["forward", "forward+backward"]
    assert all(r["native_s"] > 0 and r["fastbn_s"] > 0 and r["numpy_s"] > 0
               and r["callback_s"] > 0 for r in rows)
    assert "| jax forward | 1 |" in bench_frameworks.format_rows(rows, "case")


def test_several_calls_in_one_graph_and_in_a_scan():
    """XLA may run independent callbacks concurrently, and a scan calls one repeatedly."""
    xs = _data((4, 8, 3))

    @jax.jit
    def independent(xs):
        return [fastbn.jax.batch_norm(xs[i]).y for i in range(4)]

    def body(carry, x):
        y, rm, rv = fastbn.jax.batch_norm(x, running_mean=carry[0], running_var=carry[1])
        return (rm, rv), y

    (rm, rv), ys = jax.jit(lambda xs: jax.lax.scan(body, (jnp.zeros(3), jnp.ones(3)), xs))(xs)
    ref_rm, ref_rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for i, y in enumerate(independent(xs)):
        want = reference.forward(xs[i], running_mean=ref_rm, running_var=ref_rv).y
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ys[i], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-6)
