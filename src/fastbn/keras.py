"""Keras 3: :class:`BatchNormalization`, ``keras.layers.BatchNormalization`` on fastbn's kernels.

A subclass of Keras' layer with the same arguments, weights (``gamma``, ``beta``,
``moving_mean``, ``moving_variance``), config and saving; only ``call`` differs. The running
statistics follow Keras' update, ``moving = momentum * moving + (1 - momentum) * batch`` with
the biased batch variance (translated in :mod:`fastbn._conventions`); ``trainable=False``
means inference mode, and float16/bfloat16 inputs are computed in float32, as in Keras.

The backend is Keras' (``KERAS_BACKEND``, chosen before ``keras`` is first imported):

- **jax**: :func:`fastbn.jax.batch_norm` (an XLA FFI call with a custom VJP), under
  ``jit`` and Keras' stateless training;
- **torch**: :func:`fastbn.torch.batch_norm` and its autograd function (CPU tensors); the batch
  statistics for the moving averages come from the same call (momentum 1 into scratch
  buffers), so x is read by fastbn only;
- **tensorflow**: ``tf.numpy_function`` calls into :func:`fastbn.forward` and
  :func:`fastbn.backward` under a ``tf.custom_gradient``.

Keras' own ``call`` runs instead (documented fallbacks, not errors) for ``renorm=True``,
``synchronized=True``, a ``mask``, and batches with fewer than two values per feature in
training (their variance is 0 and Keras outputs beta; fastbn's kernels need two values). Keras on PyTorch
computes the batch variance as ``E[x^2] - E[x]^2`` in float32; fastbn's is exact, so on data
whose mean is large against its spread the two differ, fastbn's being the accurate one.
"""
try:
    import keras
    from keras import ops
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    import importlib.util as _util
    import os as _os

    if _util.find_spec("keras") is None:
        raise ImportError("fastbn.keras needs Keras 3; install it with: pip install "
                          "'fastbn[keras]' (and the backend's framework: jax, torch or "
                          "tensorflow)") from exc
    # Keras is there, but its backend's framework is not (TensorFlow unless KERAS_BACKEND)
    raise ImportError(f"Keras could not start its backend "
                      f"(KERAS_BACKEND={_os.environ.get('KERAS_BACKEND', 'tensorflow')}): "
                      f"{exc}. Install that framework, or set KERAS_BACKEND to 'jax' or "
                      f"'torch' before importing keras") from exc

import math

import numpy as np

from . import api
from ._conventions import biased_variance, decay_convention

__all__ = ["BatchNormalization"]


@keras.saving.register_keras_serializable(package="fastbn")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` running fastbn's kernels.

    Same arguments (``axis=-1``, ``momentum=0.99``, ``epsilon=1e-3``, ``center``, ``scale``,
    initializers, regularizers, constraints), weights and behaviour as Keras' layer; see the
    module documentation for the backends and the cases left to Keras' own computation.
    ``epsilon`` must be > 0 and ``momentum`` in [0, 1] (``ValueError`` otherwise).

    Examples
    --------
    >>> import numpy as np, keras, fastbn.keras
    >>> layer = fastbn.keras.BatchNormalization(momentum=0.9)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (32, 4)).astype("float32")
    >>> y = layer(x, training=True)
    >>> bool(np.abs(keras.ops.convert_to_numpy(y).mean(0)).max() < 1e-4)
    True
    >>> [w.name for w in layer.weights]
    ['gamma', 'beta', 'moving_mean', 'moving_variance']
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        decay_convention(self.momentum)  # the same checks as every call, at construction
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")

    def call(self, inputs, training=None, mask=None):
        """Normalize ``inputs``; see ``keras.layers.BatchNormalization.call``."""
        axis = self.axis % len(inputs.shape)
        others = [s for i, s in enumerate(inputs.shape) if i != axis]
        m = None if None in others else math.prod(others)  # None: a symbolic batch size
        batch_stats = bool(training and self.trainable)
        if (mask is not None or self.renorm or self.synchronized
                or (batch_stats and m is not None and m < 2)):
            return super().call(inputs, training=training, mask=mask)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None
        moving_mean = ops.cast(self.moving_mean, compute_dtype)
        moving_variance = ops.cast(self.moving_variance, compute_dtype)
        run = _BACKENDS[keras.backend.backend()]
        y, new_mean, new_var = run(self, inputs, gamma, beta, moving_mean, moving_variance,
                                   axis, batch_stats, m)
        if batch_stats:
            self.moving_mean.assign(ops.cast(new_mean, self.moving_mean.dtype))
            self.moving_variance.assign(ops.cast(new_var, self.moving_variance.dtype))
        return ops.cast(y, self.compute_dtype)


# --- one function per Keras backend: (y, new moving mean, new moving variance) ----------------

def _jax(layer, x, gamma, beta, moving_mean, moving_variance, axis, training, m):
    from . import jax as fastbn_jax

    update = decay_convention(layer.momentum)
    return fastbn_jax.batch_norm(x, gamma, beta, axis=axis, training=training,
                                 running_mean=moving_mean, running_var=moving_variance,
                                 momentum=update.momentum, eps=layer.epsilon,
                                 unbiased_running_var=update.unbiased_running_var)


def _torch(layer, x, gamma, beta, moving_mean, moving_variance, axis, training, m):
    import torch

    from . import torch as fastbn_torch

    x1 = torch.movedim(x, axis, 1)  # a view: fastbn.torch takes the feature axis as 1
    if not training:
        y = fastbn_torch.batch_norm(x1, moving_mean, moving_variance, gamma, beta,
                                    training=False, eps=layer.epsilon)
        return torch.movedim(y, 1, axis), None, None
    # momentum 1 writes the batch mean and unbiased variance into these float64 buffers
    batch_mean = torch.zeros(x.shape[axis], dtype=torch.float64)
    batch_var = torch.zeros(x.shape[axis], dtype=torch.float64)
    y = fastbn_torch.batch_norm(x1, batch_mean, batch_var, gamma, beta, training=True,
                                momentum=1.0, eps=layer.epsilon)
    decay = layer.momentum
    batch_var = biased_variance(batch_var, m)
    with torch.no_grad():
        new_mean = decay * moving_mean.double() + (1.0 - decay) * batch_mean
        new_var = decay * moving_variance.double() + (1.0 - decay) * batch_var
    return torch.movedim(y, 1, axis), new_mean, new_var


def _tensorflow(layer, x, gamma, beta, moving_mean, moving_variance, axis, training, m):
    import tensorflow as tf

    update = decay_convention(layer.momentum)
    C = x.shape[axis]
    ones, zeros = tf.ones([C], x.dtype), tf.zeros([C], x.dtype)
    gamma = ones if gamma is None else gamma
    beta = zeros if beta is None else beta
    stats_dtype = tf.float64 if x.dtype == tf.float64 else tf.float32

    def forward(x, gamma, beta, rm, rv):
        rm, rv = np.array(rm), np.array(rv)  # TensorFlow's buffers: updated in copies
        y, mean, invstd = api.forward(x, gamma, beta, axis=axis, training=training,
                                      running_mean=rm, running_var=rv,
                                      momentum=update.momentum, eps=layer.epsilon,
                                      unbiased_running_var=update.unbiased_running_var)
        return y, mean, invstd, rm, rv

    def backward(dy, x, mean, invstd, gamma):
        return tuple(api.backward(dy, x, mean, invstd, gamma, axis=axis, training=training))

    @tf.custom_gradient
    def batch_norm(x, gamma, beta):
        y, mean, invstd, new_mean, new_var = tf.numpy_function(
            forward, [x, gamma, beta, moving_mean, moving_variance],
            [x.dtype, stats_dtype, stats_dtype, moving_mean.dtype, moving_variance.dtype],
            stateful=False)
        y.set_shape(x.shape)  # numpy_function's outputs have unknown shapes
        for stat in (mean, invstd, new_mean, new_var):
            stat.set_shape([C])

        def grad(dy, *_):  # the running statistics carry no gradient
            dx, dgamma, dbeta = tf.numpy_function(
                backward, [dy, x, mean, invstd, gamma], [x.dtype, stats_dtype, stats_dtype],
                stateful=False)
            dx.set_shape(x.shape)
            return dx, tf.cast(dgamma, gamma.dtype), tf.cast(dbeta, beta.dtype)

        return (y, tf.stop_gradient(new_mean), tf.stop_gradient(new_var)), grad

    return batch_norm(x, gamma, beta)


_BACKENDS = {"jax": _jax, "torch": _torch, "tensorflow": _tensorflow}
