"""Benchmark rows for the framework adapters: fastbn.jax, fastbn.flax and fastbn.keras (on
its JAX and PyTorch backends) beside each framework's own batch norm.

Each framework is timed in a subprocess of its own (Keras fixes its backend at import; XLA
reads its thread flags at start-up), with the same thread count for fastbn and the framework:
``python -m fastbn.bench --frameworks jax,flax,keras-jax,keras-torch``. Per framework, three
rows on one float32 case: the forward in training mode, forward plus backward (gradients of
x and the parameters), and a training step of a small convolution + batch norm + ReLU model.
Every figure is the median of interleaved timed samples (see :func:`fastbn.bench.
interleaved_medians`), after a warm-up (compilation) outside the timed region.
"""
import json
import os
import subprocess
import sys

import numpy as np

FRAMEWORKS = ("jax", "flax", "keras-jax", "keras-torch")


def _data(shape, seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(np.float32)


def _jax_rows(shape, axis, samples):
    import jax
    import jax.numpy as jnp

    import fastbn
    import fastbn.jax

    from .bench import interleaved_medians

    C = shape[axis]
    x, w = jnp.asarray(_data(shape)), jnp.asarray(_data(shape, 1))
    g, b = jnp.ones(C), jnp.zeros(C)
    over = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    bshape = [1] * len(shape)
    bshape[axis] = C

    def native(x, g, b):
        mean = x.mean(over, keepdims=True)
        var = jnp.square(x - mean).mean(over, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g.reshape(bshape) + b.reshape(bshape)

    def ours(x, g, b):
        return fastbn.jax.batch_norm(x, g, b, axis=axis).y

    def ours_callback(x, g, b):
        return fastbn.jax.batch_norm(x, g, b, axis=axis, call="callback").y

    fns = {}
    for name, f in (("jax", native), ("fastbn", ours), ("callback", ours_callback)):
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda x, g, b, f=f: (f(x, g, b) * w).sum(), argnums=(0, 1, 2)))
        fns[f"{name} forward"] = lambda fwd=fwd: fwd(x, g, b).block_until_ready()
        fns[f"{name} forward+backward"] = \
            lambda grad=grad: jax.block_until_ready(grad(x, g, b))
    # the same kernels called on NumPy arrays: the difference is the callbacks' cost (JAX's
    # dispatch, the views, the copy of the outputs into XLA's buffers)
    xn, wn, gn, bn = (np.asarray(a) for a in (x, w, g, b))

    def numpy_forward_backward():
        _, mean, invstd = fastbn.forward(xn, gn, bn, axis=axis)
        fastbn.backward(wn, xn, mean, invstd, gn, axis=axis)

    fns["numpy forward"] = lambda: fastbn.forward(xn, gn, bn, axis=axis)
    fns["numpy forward+backward"] = numpy_forward_backward
    return _pair_rows("jax", interleaved_medians(fns, samples), ("jax", "fastbn"))


def _flax_rows(shape, axis, samples):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import fastbn.flax

    from .bench import interleaved_medians

    x, target = jnp.asarray(_data(shape)), jnp.asarray(_data(shape, 1))
    fns = {}
    for name, norm in (("flax", nn.BatchNorm), ("fastbn", fastbn.flax.BatchNorm)):
        bn = norm(use_running_average=False, axis=axis)
        variables = bn.init(jax.random.key(0), x)
        fwd = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, mutable=["batch_stats"]))
        grad = jax.jit(jax.grad(lambda p, x, s, bn=bn: (bn.apply(
            {"params": p, "batch_stats": s}, x, mutable=["batch_stats"])[0] * target).sum(),
            argnums=(0, 1)))
        step = _flax_train_step(norm, shape, axis)
        fns[f"{name} forward"] = lambda fwd=fwd, v=variables: jax.block_until_ready(fwd(v, x))
        fns[f"{name} forward+backward"] = lambda grad=grad, v=variables: jax.block_until_ready(
            grad(v["params"], x, v["batch_stats"]))
        fns[f"{name} train step"] = step
    return _pair_rows("flax", interleaved_medians(fns, samples), ("flax", "fastbn"))


def _flax_train_step(norm, shape, axis):
    """A jitted SGD step of conv -> batch norm -> relu (channels-last, as Flax's Conv)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    nhwc = shape if axis in (-1, len(shape) - 1) else tuple(np.array(shape)[[0, 2, 3, 1]])
    C = nhwc[-1]

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(C, (3, 3), use_bias=False)(x)
            return nn.relu(norm(use_running_average=False)(x))

    model, x = Block(), jnp.asarray(_data(nhwc))
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def step(params, batch_stats):
        def loss(p):
            y, upd = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                 mutable=["batch_stats"])
            return jnp.square(y).mean(), upd
        grads, upd = jax.grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads), upd

    return lambda: jax.block_until_ready(step(variables["params"], variables["batch_stats"]))


def _keras_rows(shape, axis, samples):
    import keras

    import fastbn.keras

    from .bench import interleaved_medians

    backend = keras.backend.backend()
    x, target = _data(shape), _data(shape, 1)
    fns = {}
    for name, cls in (("keras", keras.layers.BatchNormalization),
                      ("fastbn", fastbn.keras.BatchNormalization)):
        layer = cls(axis=axis)
        layer.build(shape)
        xt = keras.ops.convert_to_tensor(x)
        fns[f"{name} forward"] = lambda layer=layer, xt=xt: _sync(layer(xt, training=True))
        fns[f"{name} forward+backward"] = _keras_grad(backend, layer, x, target)
        inputs = keras.Input(shape[1:])
        channels = shape[axis]
        fmt = "channels_last" if axis in (-1, len(shape) - 1) else "channels_first"
        conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                   data_format=fmt)(inputs)
        model = keras.Model(inputs, keras.layers.ReLU()(cls(axis=axis)(conv)))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        fns[f"{name} train step"] = lambda model=model: model.train_on_batch(x, target)
    return _pair_rows(f"keras-{backend}", interleaved_medians(fns, samples),
                      ("keras", "fastbn"))


def _sync(y):
    if hasattr(y, "block_until_ready"):
        y.block_until_ready()
    return y


def _keras_grad(backend, layer, x, target):
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        others = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def grad(trainable, x):
            def loss(trainable, x):
                y, _ = layer.stateless_call(trainable, others, x, training=True)
                return (y * target).sum()
            return jax.grad(loss, argnums=(0, 1))(trainable, x)

        return lambda: jax.block_until_ready(grad(trainable, x))
    import torch

    xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(target)

    def step():
        (layer(xt, training=True) * tt).sum().backward()

    return step


def _pair_rows(framework, times, names):
    native, ours = names
    ops = sorted({k.split(" ", 1)[1] for k in times
                  if not k.startswith(("numpy ", "callback "))}, key=["forward", "forward+backward",
                                                            "train step"].index)
    return [{"framework": framework, "op": op, "native_s": times[f"{native} {op}"],
             "fastbn_s": times[f"{ours} {op}"], "numpy_s": times.get(f"numpy {op}"),
             "callback_s": times.get(f"callback {op}")} for op in ops]


def measure(framework, shape, axis, samples, threads):
    """Rows for one framework, in this process (called in the subprocess)."""
    import fastbn
    fastbn.set_num_threads(threads)
    if framework == "keras-torch":
        import torch
        torch.set_num_threads(threads)
    runner = {"jax": _jax_rows, "flax": _flax_rows}.get(framework, _keras_rows)
    return runner(shape, axis, samples)


def run(frameworks, shape, axis, samples, threads, log=None):
    """Rows for each framework, each timed in its own subprocess."""
    rows = []
    for framework in frameworks:
        if framework not in FRAMEWORKS:
            raise ValueError(f"frameworks must be among {FRAMEWORKS}, got {framework!r}")
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this fastbn
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        if framework.startswith("keras-"):
            env["KERAS_BACKEND"] = framework.split("-", 1)[1]
        if threads == 1:  # XLA's CPU thread pool, as fastbn's, to one thread
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                " intra_op_parallelism_threads=1").strip()
        if log:
            log(f"  timing {framework} ({threads} threads)")
        args = [sys.executable, "-m", "fastbn.bench_frameworks", framework,
                json.dumps([list(shape), axis, samples, threads])]
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{framework} rows failed:\n{done.stderr[-3000:]}")
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append(dict(row, threads=threads))
    return rows


def format_rows(rows, label):
    """A Markdown table. Where measured (the JAX rows): "via callback", fastbn.jax with
    call="callback" (pure_callback, outputs copied) instead of XLA's FFI, and "on NumPy",
    fastbn.forward/backward called directly, so that the adapter's own cost shows."""
    lines = [f"| {label} | threads | framework ms | fastbn ms | fastbn speedup "
             "| fastbn via callback ms | fastbn on NumPy ms |", "|---|---|---|---|---|---|---|"]

    def ms(seconds):
        return "-" if seconds is None else f"{seconds * 1e3:.2f}"

    for r in rows:
        lines.append(f"| {r['framework']} {r['op']} | {r['threads']} | "
                     f"{ms(r['native_s'])} | {ms(r['fastbn_s'])} | "
                     f"{r['native_s'] / r['fastbn_s']:.2f}x | {ms(r.get('callback_s'))} | "
                     f"{ms(r.get('numpy_s'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    shape, axis, samples, threads = json.loads(sys.argv[2])
    print(json.dumps(measure(sys.argv[1], tuple(shape), axis, samples, threads)))
