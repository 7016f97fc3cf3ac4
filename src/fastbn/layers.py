"""A stateful batch-norm layer for networks written in NumPy.

:class:`BatchNorm` keeps its parameters, running statistics and the few values its backward
needs, and follows ``torch.nn.BatchNorm*d``: the same state-dict keys (weight, bias,
running_mean, running_var, num_batches_tracked), train/eval modes, ``momentum=None`` as a
cumulative average, and ``track_running_stats=False`` normalizing with batch statistics
in eval mode too.
"""
# annotations kept as written, so that help() shows "ArrayLike", not its expansion
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import api
from ._common import ActivationName, StatsArray, XArray
from ._validate import _axis, _float_array

#: The layer's parameters and running statistics: its ``dtype``.
StateArray = NDArray[np.floating[Any]]


class BatchNorm:
    """Batch normalization over ``axis`` with learnable scale and shift.

    Parameters
    ----------
    num_features : int
        C, the length of the feature axis.
    axis : int
        The feature axis of the inputs (1 for NC/NCHW, -1 for channels-last).
    eps : float
        Added to the variance.
    momentum : float or None
        Weight of the batch in the running statistics; None for a cumulative average.
    affine : bool
        Learn ``weight`` (gamma, initially 1) and ``bias`` (beta, initially 0).
    track_running_stats : bool
        Keep running statistics and use them in eval mode.
    activation : {None, "relu"}
        Passed to :func:`fastbn.forward`.
    unbiased_running_var : bool
        The running variance takes the unbiased batch variance (True, PyTorch) or the biased
        one (False, as Flax and Keras; their ``momentum`` is ``1 -`` this one's).
    dtype : float dtype
        dtype of parameters and running statistics (inputs may be float32 or float64).

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
        The parameters; updated in place by optimizers (see :meth:`parameters`).
    grad_gamma, grad_beta : ndarray (C,) or None
        Gradients from the last :meth:`backward`.
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : int
    training : bool

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (16, 3)).astype(np.float32)
    >>> y = bn.forward(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.grad_beta.tolist(), bn.num_batches_tracked
    ([16.0, 16.0, 16.0], 1)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    num_features: int
    axis: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    activation: ActivationName | None
    unbiased_running_var: bool
    dtype: np.dtype[Any]
    weight: StateArray | None
    bias: StateArray | None
    grad_gamma: StateArray | None
    grad_beta: StateArray | None
    running_mean: StateArray | None
    running_var: StateArray | None
    num_batches_tracked: int
    training: bool

    def __init__(self, num_features: int, *, axis: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: ActivationName | None = None,
                 dtype: DTypeLike = np.float32, unbiased_running_var: bool = True) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        state_dtype = np.dtype(dtype)
        if state_dtype.kind != "f":
            raise TypeError(f"dtype must be a floating dtype, got {state_dtype}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        C = int(num_features)
        self.num_features = C
        self.axis = axis
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.unbiased_running_var = unbiased_running_var
        self.dtype = state_dtype
        self.weight = np.ones(C, state_dtype) if affine else None
        self.bias = np.zeros(C, state_dtype) if affine else None
        self.grad_gamma = self.grad_beta = None
        if track_running_stats:
            self.running_mean = np.zeros(C, state_dtype)
            self.running_var = np.ones(C, state_dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.training = True
        self._saved: tuple[XArray, StatsArray, StatsArray, bool] | None = None

    # --- modes and state ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "BatchNorm":
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Eval mode (running statistics, if tracked); returns self."""
        return self.train(False)

    def parameters(self) -> list[StateArray]:
        """The learnable arrays, [weight, bias] (empty without affine): update them in place."""
        if self.weight is None or self.bias is None:
            return []
        return [self.weight, self.bias]

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the state under PyTorch's names."""
        state: dict[str, NDArray[Any]] = {}
        if self.weight is not None and self.bias is not None:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.running_mean is not None and self.running_var is not None:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, ArrayLike]) -> None:
        """Load a state dict (ours, or a PyTorch one converted with ``.numpy()``), checking keys
        and shapes before writing anything."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise KeyError(f"state dict keys {sorted(state)} differ from {sorted(expected)}")
        arrays = {}
        for key in expected - {"num_batches_tracked"}:
            value = np.asarray(state[key])
            if value.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), "
                                 f"got {value.shape}")
            arrays[key] = value
        for key, value in arrays.items():
            getattr(self, key)[...] = value
        if "num_batches_tracked" in state:
            self.num_batches_tracked = int(np.asarray(state["num_batches_tracked"]))

    # --- passes -------------------------------------------------------------------------------
    def forward(self, x: ArrayLike) -> XArray:
        """Normalize x (its feature axis is ``axis``); keeps what backward needs.

        Raises
        ------
        ValueError
            x's length along ``axis`` is not ``num_features``; and as :func:`fastbn.forward`.
        """
        x_array = self._checked_input(x)
        factor = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update:
            tracked = self.num_batches_tracked + 1
            if self.momentum is None:
                factor = 1.0 / tracked
        batch_stats = self.training or not self.track_running_stats
        running = (self.running_mean, self.running_var) if (update or not batch_stats) \
            else (None, None)
        y, mean, invstd = api.forward(x_array, self.weight, self.bias, axis=self.axis,
                                      training=batch_stats, running_mean=running[0],
                                      running_var=running[1], momentum=factor, eps=self.eps,
                                      activation=self.activation,
                                      unbiased_running_var=self.unbiased_running_var)
        if update:  # only once forward succeeded
            self.num_batches_tracked = tracked
        self._saved = (x_array, mean, invstd, batch_stats)
        return y

    def _checked_input(self, x: ArrayLike) -> XArray:
        """x as an array whose feature axis has ``num_features`` entries. Checked here, before
        :func:`fastbn.forward` would report the mismatch against ``weight`` or
        ``running_mean``, arrays the caller never passed."""
        arr = _float_array(x, "x")
        if arr.ndim < 2:
            return arr  # fastbn.forward explains what x needs
        C = arr.shape[_axis(self.axis, arr.ndim)]
        if C != self.num_features:
            layer = f"BatchNorm({C})" if self.axis == 1 else f"BatchNorm({C}, axis={self.axis})"
            raise ValueError(
                f"x has {C} channels along axis {self.axis} (shape {arr.shape}), but this "
                f"BatchNorm has num_features={self.num_features}; pass an x with "
                f"{self.num_features} channels there, or create the layer as {layer}")
        return arr

    def backward(self, dy: ArrayLike) -> XArray:
        """dx for the last forward's input; stores ``grad_gamma`` and ``grad_beta``."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, mean, invstd, batch_stats = self._saved
        dx, dgamma, dbeta = api.backward(dy, x, mean, invstd, self.weight, self.bias,
                                         axis=self.axis, training=batch_stats,
                                         activation=self.activation)
        self._keep_grads(dgamma, dbeta)
        return dx

    def _keep_grads(self, dgamma: XArray, dbeta: XArray) -> None:
        """Store a backward's parameter gradients, in the parameters' dtype."""
        if self.affine:
            self.grad_gamma = dgamma.astype(self.dtype)
            self.grad_beta = dbeta.astype(self.dtype)

    __call__ = forward

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, "
                f"activation={self.activation!r})")
