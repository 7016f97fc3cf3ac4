"""fastbn.flax.BatchNorm against flax.linen.BatchNorm(use_fast_variance=False): outputs,
gradients and batch_stats over several jitted training steps, eval mode, both layouts,
variables interchangeable, the same errors, and fastbn's kernels really running."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
jnp = jax.numpy

import fastbn._phase_core  # noqa: E402
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


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float16"])
def test_half_precision_parameters_as_flax(param_dtype):
    """param_dtype bfloat16 or float16: scale, bias (and their gradients) in that dtype, as
    Flax has them; fastbn reads such vectors in float32/float64 (bfloat16 has NumPy kind "V",
    which the checks once refused)."""
    x = _data((8, 3), 0)
    fields = dict(use_running_average=False, param_dtype=jnp.dtype(param_dtype))
    theirs = nn.BatchNorm(use_fast_variance=False, **fields)
    ours = fastbn.flax.BatchNorm(**fields)
    variables = theirs.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda v: (v + 0.25).astype(v.dtype), variables)
    _close(ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x), "init")
    (y_t, s_t), (y_o, s_o) = (m.apply(variables, x, mutable=["batch_stats"])
                              for m in (theirs, ours))
    assert y_o.dtype == y_t.dtype
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_t), rtol=1e-5, atol=1e-5)
    _close(s_o, s_t, param_dtype, rtol=1e-5, atol=1e-6)

    def loss(module, params):
        return jnp.sin(module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    x, mutable=["batch_stats"])[0]).sum()

    g_t, g_o = (jax.grad(loss, argnums=1)(m, variables["params"]) for m in (theirs, ours))
    assert jax.tree_util.tree_map(lambda a: a.dtype, g_o) == \
        jax.tree_util.tree_map(lambda a: a.dtype, g_t)
    _close(g_o, g_t, "grads", rtol=2e-2, atol=2e-2)  # rounded to the half dtype


def test_float64_batch_stats_under_x64_as_flax():
    """Under x64 with float64 input, Flax's update promotes the float32 running statistics to
    float64 (its batch statistics are float64); fastbn's must too, on every path (a scan or
    jit carry that changed dtype with the batch size would fail)."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (8, 3)))
        for xb in (x, x[:1]):  # the kernels' path, and one value per feature
            (y_t, s_t), (y_o, s_o) = (
                m(use_running_average=False).apply(
                    m(use_running_average=False).init(jax.random.key(0), xb), xb,
                    mutable=["batch_stats"])
                for m in (lambda **k: nn.BatchNorm(use_fast_variance=False, **k),
                          fastbn.flax.BatchNorm))
            assert jax.tree_util.tree_map(lambda a: a.dtype, s_o) == \
                jax.tree_util.tree_map(lambda a: a.dtype, s_t), xb.shape
            assert y_o.dtype == y_t.dtype
            # Flax rounds momentum * running to the running statistics' float32 before the
            # float64 sum; fastbn computes the update in float64 throughout
            _close(s_o, s_t, f"batch {xb.shape[0]}", rtol=1e-7, atol=1e-9)


def test_momentum_and_epsilon_as_jax_scalars_as_flax():
    x = _data((6, 3), 2)
    fields = dict(use_running_average=False, momentum=jnp.float32(0.9),
                  epsilon=jnp.float32(1e-3))
    theirs = nn.BatchNorm(use_fast_variance=False, **fields)
    ours = fastbn.flax.BatchNorm(**fields)
    variables = theirs.init(jax.random.key(0), x)
    (y_t, s_t), (y_o, s_o) = (m.apply(variables, x, mutable=["batch_stats"])
                              for m in (theirs, ours))
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_t), rtol=1e-5, atol=1e-5)
    _close(s_o, s_t, "momentum 0.9", rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("key", ["mean", "var"])
@pytest.mark.parametrize("use_running_average", [False, True])
def test_batch_stats_of_another_shape_are_named(key, use_running_average):
    x = _data((4, 3), 0)
    bn = fastbn.flax.BatchNorm(use_running_average=use_running_average)
    variables = bn.init(jax.random.key(0), x)
    stats = dict(variables["batch_stats"], **{key: jnp.zeros(4)})
    with pytest.raises(ValueError, match=rf"batch_stats\['{key}'\] must have shape \(3,\)"):
        bn.apply({"params": variables["params"], "batch_stats": stats}, x,
                 mutable=["batch_stats"])


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


# --- batch statistics across devices (axis_name) ----------------------------------------------

DEVICES = 3


def _per_device_step(module, variables, weights):
    """vmap over a leading axis of devices, each taking the gradient of its own loss
    sum(sin(BN(x)) * weights), as a pmap'd training step does."""
    def loss(params, x, w):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, use_running_average=False, mutable=["batch_stats"])
        return (jnp.sin(y) * w).sum(), (y, updates["batch_stats"])

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(jax.vmap(grad, in_axes=(None, 0, 0), axis_name="batch"))


@pytest.mark.parametrize("name,shape,axis",
                         LAYOUTS + [("NC, one value per device", (1, 5), -1)],
                         ids=[n for n, _, _ in LAYOUTS] + ["NC1"])
def test_axis_name_under_vmap_matches_flax_and_the_whole_batch(name, shape, axis,
                                                               monkeypatch):
    local_stats = []
    real = fastbn._phase_core.batch_stats_checked
    monkeypatch.setattr(fastbn._phase_core, "batch_stats_checked",
                        lambda x, *a: local_stats.append(x.shape) or real(x, *a))
    fields = dict(axis=axis, momentum=0.8, epsilon=1e-3)
    x = _data((DEVICES, *shape), 0)
    weights = _data((DEVICES, *shape), 99)
    variables = nn.BatchNorm(**fields).init(jax.random.key(0), x[0], use_running_average=False)
    variables = jax.tree_util.tree_map(lambda v: v + 0.25, variables)
    theirs = _per_device_step(nn.BatchNorm(use_fast_variance=False, axis_name="batch",
                                           **fields), variables, weights)
    ours = _per_device_step(fastbn.flax.BatchNorm(axis_name="batch", **fields), variables,
                            weights)
    (dp_t, dx_t), (y_t, stats_t) = theirs(variables["params"], x, weights)
    (dp_o, dx_o), (y_o, stats_o) = ours(variables["params"], x, weights)
    assert local_stats == [shape] * DEVICES  # each device's statistics from fastbn's kernel
    for what, got, want in [("y", y_o, y_t), ("dx", dx_o, dx_t), ("dparams", dp_o, dp_t),
                            ("batch_stats", stats_o, stats_t)]:
        _close(got, want, f"{name}: {what} against Flax, ")
    for leaf in jax.tree_util.tree_leaves(stats_o):  # every device ends with the same bits
        assert all(np.array_equal(leaf[0], leaf[d]) for d in range(DEVICES))

    # the same as fastbn on the concatenated batch (the devices' losses summed)
    whole_x = np.concatenate(list(x), axis=0)
    whole_w = np.concatenate(list(weights), axis=0)
    layer = fastbn.flax.BatchNorm(**fields)

    def whole_loss(params, x):
        y, updates = layer.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, use_running_average=False, mutable=["batch_stats"])
        return (jnp.sin(y) * whole_w).sum(), (y, updates["batch_stats"])

    (dp_w, dx_w), (y_w, stats_w) = jax.grad(whole_loss, argnums=(0, 1), has_aux=True)(
        variables["params"], whole_x)
    np.testing.assert_allclose(np.concatenate(list(y_o)), y_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(list(dx_o)), dx_w, rtol=1e-5, atol=1e-5)
    _close(jax.tree_util.tree_map(lambda g: g.sum(0), dp_o), dp_w, f"{name}: summed dparams",
           rtol=1e-5, atol=1e-5)
    _close(jax.tree_util.tree_map(lambda s: s[0], stats_o), stats_w, f"{name}: batch_stats",
           rtol=1e-6, atol=1e-7)


def test_axis_name_exact_on_large_mean_data():
    """Mean 1e4, spread 0.1, four devices: the merged variance is float64's to float32's
    rounding (the statistics travel as float64 bits with jax_enable_x64 off); Flax's default
    fast variance loses it."""
    x = (1e4 + 0.1 * np.random.default_rng(0).normal(size=(4, 8, 3, 3, 6))).astype(np.float32)
    whole = x.astype(np.float64).reshape(-1, 6)
    mean64, var64 = whole.mean(0), whole.var(0)
    y64 = (x - mean64) / np.sqrt(var64 + 1e-5)
    assert not jax.config.jax_enable_x64
    results = {}
    for name, module in [("fast", nn.BatchNorm(momentum=0.0, axis_name="batch")),
                         ("fastbn", fastbn.flax.BatchNorm(momentum=0.0, axis_name="batch"))]:
        variables = module.init(jax.random.key(0), x[0], use_running_average=False)

        def apply(x, module=module, variables=variables):
            return module.apply(variables, x, use_running_average=False,
                                mutable=["batch_stats"])

        y, updates = jax.vmap(apply, axis_name="batch")(x)
        var = np.asarray(updates["batch_stats"]["var"], np.float64)
        results[name] = (np.max(np.abs(var - var64) / var64), np.max(np.abs(y - y64)))
    assert results["fastbn"][0] < 1e-6 < 1e-1 < results["fast"][0], results
    assert results["fastbn"][1] < 1e-5 < 1.0 < results["fast"][1], results


@pytest.mark.backends("numba")
def test_axis_name_gradient_outside_vmap_raises_clearly():
    module = fastbn.flax.BatchNorm(use_running_average=False, axis_name="batch")
    x = _data((2, 4, 3), 0)
    variables = module.init(jax.random.key(0), x[0])

    def loss(x):
        y, _ = jax.vmap(lambda xi: module.apply(variables, xi, mutable=["batch_stats"]),
                        axis_name="batch")(x)
        return y.sum()

    with pytest.raises(NotImplementedError, match="inside the transform"):
        jax.grad(loss)(x)


_DEVICES_SCRIPT = r'''
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn, fastbn.flax
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 4, jax.devices()
x = np.random.default_rng(0).normal(1.0, 2.0, (4, 6, 3, 5)).astype(np.float32)
w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
mesh = jax.make_mesh((4,), ("batch",))
sharded = NamedSharding(mesh, P("batch"))

def run(cls, how, **fields):
    module = cls(use_running_average=False, axis_name="batch", momentum=0.5, **fields)
    v = module.init(jax.random.key(0), x[0])
    def f(p, xi, wi):
        y, upd = module.apply({"params": p, "batch_stats": v["batch_stats"]}, xi,
                              mutable=["batch_stats"])
        return (jnp.sin(y) * wi).sum(), (y, upd)
    grad = jax.grad(f, argnums=(0, 1), has_aux=True)
    if how == "pmap":
        return jax.pmap(grad, in_axes=(None, 0, 0), axis_name="batch")(v["params"], x, w)
    if how == "grad of pmap":
        def total(p, x):
            losses, aux = jax.pmap(f, in_axes=(None, 0, 0), axis_name="batch")(p, x, w)
            return losses.sum(), aux
        return jax.grad(total, argnums=(0, 1), has_aux=True)(v["params"], x)
    def body(p, xs, ws):  # shard_map: a replicated p, whose gradient JAX sums
        out = grad(p, xs[0], ws[0])
        return jax.tree_util.tree_map(lambda a: a[None], out)
    step = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                         out_specs=P("batch"))
    return jax.jit(step)(v["params"], jax.device_put(x, sharded), jax.device_put(w, sharded))

for how, fields in [("pmap", {}), ("grad of pmap", {}), ("shard_map", {}),
                    ("pmap", {"axis_index_groups": [[0, 2], [1, 3]]})]:
    want = run(nn.BatchNorm, how, use_fast_variance=False, **fields)
    got = run(fastbn.flax.BatchNorm, how, **fields)
    paths = jax.tree_util.tree_leaves_with_path(want)
    for (path, a), b in zip(paths, jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4,
                                   err_msg=f"{how} {fields}: {jax.tree_util.keystr(path)}")
    stats = np.asarray(got[1][1]["batch_stats"]["var"])
    groups = fields.get("axis_index_groups", [[0, 1, 2, 3]])
    for group in groups:
        assert all(np.array_equal(stats[group[0]], stats[d]) for d in group), how
    print("ok", how, fields)
'''


@pytest.mark.backends("numba")  # JAX's device machinery; the kernels are tested above
def test_axis_name_on_four_host_devices_pmap_and_shard_map_match_flax():
    """pmap (its gradient taken inside and outside), shard_map and axis_index_groups on four
    CPU devices, in a subprocess (the device count is fixed when JAX starts)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, timeout=240,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 4, done.stdout
