"""fastbn.BatchNorm, the NumPy layer, against torch.nn.BatchNorm*d step by step."""
import doctest

import numpy as np
import pytest

import fastbn
import fastbn.layers
from conftest import make_x

try:
    import torch
except ImportError:  # the tests against PyTorch skip; the others run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

CONFIGS = [
    dict(momentum=0.1, affine=True, track_running_stats=True),
    dict(momentum=None, affine=True, track_running_stats=True),
    dict(momentum=0.3, affine=False, track_running_stats=True),
    dict(momentum=0.1, affine=True, track_running_stats=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in
                                                                c.items()))
@pytest.mark.parametrize("shape,torch_cls", [((8, 4), "BatchNorm1d"),
                                             ((6, 4, 5, 5), "BatchNorm2d")])
@needs_torch
def test_layer_follows_torch_over_train_and_eval_steps(config, shape, torch_cls):
    ours = fastbn.BatchNorm(4, dtype=np.float64, eps=1e-3, **config)
    ref = getattr(torch.nn, torch_cls)(4, eps=1e-3, dtype=torch.float64, **config)
    lr = 0.1
    for step in range(4):
        if step == 3:
            ours.eval()
            ref.eval()
        x = make_x(shape, np.float64, seed=step, loc=step)
        dy = make_x(shape, np.float64, seed=10 + step)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y_ref = ref(xt)
        y_ref.backward(torch.from_numpy(dy))
        y = ours.forward(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
        if config["affine"]:
            np.testing.assert_allclose(ours.grad_gamma, ref.weight.grad.numpy(), rtol=1e-9)
            np.testing.assert_allclose(ours.grad_beta, ref.bias.grad.numpy(), rtol=1e-9)
            for p, g in zip(ours.parameters(), (ours.grad_gamma, ours.grad_beta)):
                p -= lr * g  # SGD, in place, as a NumPy training loop does
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr * p.grad
                    p.grad = None
    ref_state = {k: v.numpy() for k, v in ref.state_dict().items()}
    state = ours.state_dict()
    assert list(state) == list(ref_state)
    for key in state:
        np.testing.assert_allclose(state[key], ref_state[key], rtol=1e-10, err_msg=key)


@needs_torch
def test_state_dict_round_trip_and_torch_state():
    src = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    src(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    layer = fastbn.BatchNorm(3, dtype=np.float64)
    layer.load_state_dict({k: v.numpy() for k, v in src.state_dict().items()})
    assert layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.running_var, src.running_var.numpy())
    copy = fastbn.BatchNorm(3, dtype=np.float64)
    copy.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(copy.state_dict()[key], value)
    with pytest.raises(KeyError):
        copy.load_state_dict({"weight": np.ones(3)})
    bad = layer.state_dict()
    bad["running_mean"] = np.zeros(4)
    before = copy.state_dict()
    with pytest.raises(ValueError, match="running_mean"):
        copy.load_state_dict(bad)
    for key, value in before.items():  # nothing written on error
        np.testing.assert_array_equal(copy.state_dict()[key], value)


def test_layer_errors_and_channels_last():
    with pytest.raises(RuntimeError, match="forward"):
        fastbn.BatchNorm(3).backward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="num_features"):
        fastbn.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.BatchNorm(3, momentum=2.0)
    layer = fastbn.BatchNorm(3)
    with pytest.raises(ValueError, match="num_features"):
        layer.forward(np.ones((4, 5), np.float32))
    assert layer.num_batches_tracked == 0  # a failed forward counts nothing
    nhwc = fastbn.BatchNorm(3, axis=-1)
    x = make_x((4, 5, 5, 3), np.float32)
    np.testing.assert_allclose(nhwc(x), fastbn.reference.forward(x, axis=-1).y, atol=1e-5)


@pytest.mark.parametrize("config", [dict(), dict(affine=False),
                                    dict(affine=False, track_running_stats=False)],
                         ids=["affine", "stats-only", "stateless"])
@pytest.mark.parametrize("shape,axis", [((8, 4), 1), ((2, 4, 3, 3), 1), ((2, 3, 3, 4), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_wrong_channel_count_names_num_features_and_x_not_parameters(config, shape, axis):
    """The user passed num_features and x, not gamma or running_mean: the message names
    those two, with x's count and axis, whatever state the layer keeps; nothing changes."""
    layer = fastbn.BatchNorm(3, axis=axis, **config)
    before = layer.state_dict()
    for training in (True, False):
        layer.train(training)
        with pytest.raises(ValueError) as info:
            layer.forward(np.ones(shape, np.float32))
        message = str(info.value)
        assert "num_features=3" in message, message
        assert f"x has 4 channels along axis {axis}" in message, message
        assert f"shape {shape}" in message, message
        assert "gamma" not in message and "weight" not in message, message
        assert "running_mean" not in message, message
    after = layer.state_dict()
    assert list(after) == list(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert layer._saved is None  # no forward to take a backward from
    layer.train()
    right = make_x(shape[:-1] + (3,) if axis == -1 else shape[:1] + (3,) + shape[2:],
                   np.float32)
    assert layer.forward(right).shape == right.shape  # the layer still works


def test_layer_docstring_example():
    assert doctest.testmod(fastbn.layers).failed == 0
