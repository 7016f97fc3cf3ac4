"""fastbn.flax.BatchNorm against flax.linen.BatchNorm(use_fast_variance=False): outputs,
gradients and batch_stats over several jitted training steps, eval mode, both layouts,
variables interchangeable, the same errors, and fastbn's kernels really running."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
jnp = jax.numpy

import fastbn.api  # noqa: E402
import fastbn.flax  # noqa: E402


LAYOUTS = [("NHWC", (4, 3, 2, 5), -1), ("NCHW", (4, 5, 3, 2), 1)]


def _data(shape, seed, mean=1.0, spread=2.0):
    return np.random.default_rng(seed).normal(mean, spread, shape).astype(np.float32)


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    real = fastbn.api.forward

    def spy(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fastbn.api, "forward", spy)
    return calls


def _train_step(module, weights):
    """One jitted SGD step of loss = sum(sin(BN(x)) * weights): returns y, dx, the parameter
    gradients and the new variables."""
    def loss(params, batch_stats, x):
        y, updates = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                  use_running_average=False, mutable=["batch_stats"])
        return (jnp.sin(y) * weights).sum(), (y, updates["batch_stats"])

    @jax.jit
    def step(variables, x):
        grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
        (dparams, dx), (y, batch_stats) = grad(variables["params"], variables["batch_stats"], x)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], dparams)
        return y, dx, dparams, {"params": params, "batch_stats": batch_stats}

    return step


def _close(got, want, what, rtol=1e-4, atol=2e-5):
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = got
        for key in path:
            g = g[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_training_steps_and_eval_match_flax(name, shape, axis, forward_calls):
    fields = dict(axis=axis, momentum=0.8, epsilon=1e-3)
    theirs = nn.BatchNorm(use_fast_variance=False, **fields)
    ours = fastbn.flax.BatchNorm(**fields)
    x0 = _data(shape, 0)
    init = theirs.init(jax.random.key(0), x0, use_running_average=False)
    ours_init = ours.init(jax.random.key(0), x0, use_running_average=False)
    assert jax.tree_util.tree_structure(ours_init) == jax.tree_util.tree_structure(init)
    _close(ours_init, init, "init")
    weights = _data(shape, 99)
    step_theirs, step_ours = _train_step(theirs, weights), _train_step(ours, weights)
    v_theirs = v_ours = init
    forward_calls.clear()
    for i in range(3):
        x = _data(shape, i + 1)
        y_t, dx_t, dp_t, v_theirs = step_theirs(v_theirs, x)
        y_o, dx_o, dp_o, v_ours = step_ours(v_ours, x)
        where = f"{name}, step {i}: "
        _close(y_o, y_t, where + "y")
        _close(dx_o, dx_t, where + "dx")
        _close(dp_o, dp_t, where + "dparams")
        _close(v_ours, v_theirs, where + "variables", rtol=1e-5, atol=1e-6)
    assert forward_calls == [shape] * 3  # fastbn's forward ran in every step

    x = _data(shape, 7)

    def eval_loss(module):
        def f(variables, x):
            return (jnp.sin(module.apply(variables, x, use_running_average=True))
                    * weights).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (l_t, (dv_t, dx_t)), (l_o, (dv_o, dx_o)) = (eval_loss(theirs)(v_theirs, x),
                                                eval_loss(ours)(v_theirs, x))
    np.testing.assert_allclose(l_o, l_t, rtol=1e-4)
    _close(dx_o, dx_t, f"{name}, eval: dx")
    _close(dv_o, dv_t, f"{name}, eval: dvariables", rtol=1e-4, atol=1e-4)
    assert len(forward_calls) == 4


def test_variables_swap_between_the_classes():
    x = _data((6, 3), 0)
    variables = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.5, variables)  # a trained checkpoint
    y_t = nn.BatchNorm(use_running_average=True).apply(variables, x)
    y_o = fastbn.flax.BatchNorm(use_running_average=True).apply(variables, x)
    np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-6)


def test_no_scale_no_bias_bfloat16_input_and_dtype():
    x = jnp.asarray(_data((8, 4), 0), jnp.bfloat16)
    for fields in (dict(use_scale=False, use_bias=False), dict(dtype=jnp.bfloat16)):
        theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False, **fields)
        ours = fastbn.flax.BatchNorm(use_running_average=False, **fields)
        variables = theirs.init(jax.random.key(0), x)
        (y_t, s_t), (y_o, s_o) = (m.apply(variables, x, mutable=["batch_stats"])
                                  for m in (theirs, ours))
        assert y_o.dtype == y_t.dtype, fields
        tol = 1e-2 if y_t.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(y_o, np.float32), np.asarray(y_t, np.float32),
                                   rtol=tol, atol=tol, err_msg=str(fields))
        _close(s_o, s_t, str(fields), rtol=1e-5, atol=1e-6)


def test_one_example_init_and_step_as_flax(forward_calls):
    """init on a single example (one value per feature) works as in Flax."""
    x = _data((1, 5), 0)
    theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    ours = fastbn.flax.BatchNorm(use_running_average=False)
    variables = theirs.init(jax.random.key(0), x)
    (y_t, s_t), (y_o, s_o) = (m.apply(variables, x, mutable=["batch_stats"])
                              for m in (theirs, ours))
    np.testing.assert_allclose(y_o, y_t)
    _close(s_o, s_t, "batch_stats")


def test_exact_variance_on_large_mean_data():
    """The module docstring's table, on a smaller batch: Flax's default fast variance loses
    the variance of float32 data of mean 1e4 and spread 0.1; fastbn keeps it."""
    x = (1e4 + 0.1 * np.random.default_rng(0).normal(size=(16, 4, 4, 8))).astype(np.float32)
    var64 = x.astype(np.float64).var((0, 1, 2))
    errors = {}
    for name, module in [("fast", nn.BatchNorm(use_running_average=False, momentum=0.0)),
                         ("fastbn", fastbn.flax.BatchNorm(use_running_average=False,
                                                          momentum=0.0))]:
        variables = module.init(jax.random.key(0), x)
        _, updates = module.apply(variables, x, mutable=["batch_stats"])
        var = np.asarray(updates["batch_stats"]["var"], np.float64)
        errors[name] = np.max(np.abs(var - var64) / var64)
    assert errors["fastbn"] < 1e-6 < 1e-1 < errors["fast"], errors


@pytest.mark.parametrize("build,call,error,words", [
    (dict(), dict(), ValueError, "use_running_average"),
    (dict(use_running_average=True), dict(use_running_average=True), ValueError,
     "use_running_average"),
    (dict(axis=4, use_running_average=True), dict(), IndexError, "out of range"),
])
def test_errors_are_flaxs(build, call, error, words):
    x = _data((4, 3), 0)
    for cls in (nn.BatchNorm, fastbn.flax.BatchNorm):
        with pytest.raises(error, match=words):
            cls(**build).init(jax.random.key(0), x, **call)


@pytest.mark.parametrize("build,call,words", [
    (dict(axis_name="batch"), dict(), "axis_name"),
    (dict(), dict(mask=jnp.ones((4, 3), bool)), "mask"),
    (dict(axis=(0, 1)), dict(), "one feature axis"),
])
def test_unsupported_options_raise(build, call, words):
    module = fastbn.flax.BatchNorm(use_running_average=False, **build)
    x = _data((4, 3, 2), 0)
    variables = nn.BatchNorm(use_running_average=False, axis=build.get("axis", -1)).init(
        jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match=words):
        module.apply(variables, x, mutable=["batch_stats"], **call)


def test_docstring_examples():
    import doctest
    assert doctest.testmod(fastbn.flax).failed == 0
