"""Run by tests/test_keras.py in a subprocess with KERAS_BACKEND set (Keras reads it once, at
import): fastbn.keras.BatchNormalization against keras.layers.BatchNormalization on that
backend. Exits non-zero, with the failure on stderr, if anything differs."""
import os
import sys

import numpy as np

BACKEND = os.environ["KERAS_BACKEND"]

import keras  # noqa: E402

import fastbn.api  # noqa: E402
import fastbn.keras  # noqa: E402

assert keras.backend.backend() == BACKEND

CALLS = []
_real_forward = fastbn.api.forward


def _spy(x, *args, **kwargs):
    CALLS.append(tuple(x.shape))
    return _real_forward(x, *args, **kwargs)


fastbn.api.forward = _spy


def data(shape, seed, mean=1.0, spread=2.0, dtype="float32"):
    return np.random.default_rng(seed).normal(mean, spread, shape).astype(dtype)


def close(got, want, what, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                               keras.ops.convert_to_numpy(want), rtol=rtol, atol=atol,
                               err_msg=f"{BACKEND}: {what}")


def input_and_weight_grads(layer, x, weights):
    """d/dx and d/d(gamma, beta) of sum(sin(layer(x, training=True)) * weights)."""
    if BACKEND == "jax":
        import jax

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, [v.value for v in
                                                    layer.non_trainable_variables],
                                        x, training=True)
            return (jax.numpy.sin(y) * weights).sum()
        dw, dx = jax.grad(loss, argnums=(0, 1))([v.value for v in layer.trainable_variables],
                                                x)
        return dx, dw
    if BACKEND == "torch":
        import torch
        xt = torch.tensor(x, requires_grad=True)
        for v in layer.trainable_variables:
            v.value.grad = None
        (torch.sin(layer(xt, training=True)) * torch.tensor(weights)).sum().backward()
        return xt.grad, [v.value.grad for v in layer.trainable_variables]
    import tensorflow as tf
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.sin(layer(xt, training=True)) * weights)
    grads = tape.gradient(loss, [xt] + [v.value for v in layer.trainable_variables])
    return grads[0], grads[1:]


def build(cls, shape, axis, **kwargs):
    inputs = keras.Input(shape[1:])
    return keras.Model(inputs, cls(axis=axis, momentum=0.8, **kwargs)(inputs))


def check_fit_parity(shape, axis):
    models = [build(cls, shape, axis) for cls in (keras.layers.BatchNormalization,
                                                  fastbn.keras.BatchNormalization)]
    C = shape[axis]
    start = [data(C, 1), data(C, 2), data(C, 3, 0.0, 1.0), np.abs(data(C, 4)) + 0.5]
    x, target = data((24,) + shape[1:], 5), data((24,) + shape[1:], 6)
    for model in models:
        model.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    del CALLS[:]
    for model in models:
        model.fit(x, target, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert len(CALLS) == 3, CALLS  # three steps, each through fastbn's kernels
    where = f"shape {shape}, axis {axis}"
    for got, want, name in zip(models[1].get_weights(), models[0].get_weights(),
                               ["gamma", "beta", "moving_mean", "moving_variance"]):
        close(got, want, f"{where}: {name} after fit", rtol=1e-4, atol=1e-5)
    xe = data((4,) + shape[1:], 7)
    close(models[1].predict(xe, verbose=0), models[0].predict(xe, verbose=0),
          f"{where}: eval output")
    theirs, ours = models[0].layers[-1], models[1].layers[-1]
    weights = data(x[:8].shape, 8)
    dx_t, dw_t = input_and_weight_grads(theirs, x[:8], weights)
    dx_o, dw_o = input_and_weight_grads(ours, x[:8], weights)
    close(dx_o, dx_t, f"{where}: dx", rtol=1e-3, atol=1e-4)
    for got, want, name in zip(dw_o, dw_t, ["dgamma", "dbeta"]):
        close(got, want, f"{where}: {name}", rtol=1e-3, atol=1e-4)
    close(ours(x[:8], training=True), theirs(x[:8], training=True), f"{where}: train output")


def check_inference_modes_and_half():
    x = data((16, 3), 0)
    theirs = keras.layers.BatchNormalization()
    ours = fastbn.keras.BatchNormalization()
    for layer in (theirs, ours):
        layer.build(x.shape)
        layer.set_weights([data(3, 1), data(3, 2), data(3, 3), np.abs(data(3, 4)) + 0.5])
        layer.trainable = False  # inference mode even with training=True
    close(ours(x, training=True), theirs(x, training=True), "trainable=False")
    close(ours.moving_mean, theirs.moving_mean, "trainable=False keeps moving_mean")
    for layer in (theirs, ours):
        layer.trainable = True
    for dtype in ("float16", "bfloat16"):
        xh = keras.ops.cast(x, dtype)
        y_t, y_o = theirs(xh, training=True), ours(xh, training=True)
        assert keras.backend.standardize_dtype(y_o.dtype) == \
            keras.backend.standardize_dtype(y_t.dtype), (dtype, y_o.dtype, y_t.dtype)
        close(y_o, y_t, f"{dtype} input", rtol=1e-3, atol=1e-3)
        close(ours.moving_variance, theirs.moving_variance, f"{dtype} moving_variance",
              rtol=1e-3)


def check_config_and_errors():
    layer = fastbn.keras.BatchNormalization(axis=1, momentum=0.5, epsilon=1e-2, center=False)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is fastbn.keras.BatchNormalization
    assert clone.get_config() == layer.get_config()
    bad = [dict(axis="x"), dict(renorm=True, renorm_clipping={"bad": 1})]
    if BACKEND != "tensorflow":
        bad.append(dict(synchronized=True))
    for kwargs in bad:
        errors = []
        for cls in (keras.layers.BatchNormalization, fastbn.keras.BatchNormalization):
            try:
                cls(**kwargs)
            except Exception as exc:  # noqa: BLE001 - the type is what is compared
                errors.append(type(exc))
        assert errors == [ValueError, ValueError], (kwargs, errors)
    for kwargs, words in ((dict(epsilon=0.0), "epsilon"), (dict(momentum=2.0), "momentum")):
        try:
            fastbn.keras.BatchNormalization(**kwargs)
        except ValueError as exc:
            assert words in str(exc), exc
        else:
            raise AssertionError(f"no error for {kwargs}")


if __name__ == "__main__":
    check_fit_parity((8, 3, 2, 4), -1)
    check_fit_parity((8, 4, 3, 2), 1)
    check_inference_modes_and_half()
    check_config_and_errors()
    import doctest
    assert doctest.testmod(fastbn.keras).failed == 0
    print("ok", BACKEND, len(CALLS), file=sys.stderr)
