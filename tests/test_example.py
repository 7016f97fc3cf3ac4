"""The worked example's code path (examples/digits_mlp.py), on a few steps."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("digits_mlp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlp_gradients_match_finite_differences(example):
    """The example's hand-written backward (through fastbn.BatchNorm) is the true gradient."""
    layers = example.make_mlp((5, 7, 3), batchnorm=True, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    loss, grad = example.softmax_cross_entropy(example.forward(layers, X), y)
    for layer in reversed(layers):
        grad = layer.backward(grad)
    W = layers[0].W
    analytic = layers[0].grads[0]
    h = 1e-2
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        old = W[i, j]
        W[i, j] = old + h
        up = example.softmax_cross_entropy(example.forward(layers, X), y)[0]
        W[i, j] = old - h
        down = example.softmax_cross_entropy(example.forward(layers, X), y)[0]
        W[i, j] = old
        assert abs((up - down) / (2 * h) - analytic[i, j]) < 2e-3


def test_training_steps_lower_the_loss_with_and_without_batchnorm(example, tmp_path):
    pytest.importorskip("sklearn")
    X_train, y_train, X_test, y_test = example.load_data()
    results = {}
    for batchnorm in (False, True):
        layers = example.make_mlp((64, 32, 10), batchnorm)
        losses = example.train(layers, X_train, y_train, lr=0.1, epochs=1, max_steps=15)
        assert len(losses) == 15 and np.isfinite(losses).all()
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
        results[(batchnorm, 0.1)] = (losses, example.accuracy(layers, X_test, y_test))
    pytest.importorskip("matplotlib")
    example.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


# The example run as a script with one of its packages made unimportable (None in sys.modules).
_BLOCKED_RUN = """
import runpy, sys
sys.modules[sys.argv[1]] = None
sys.argv = [sys.argv[2], "--epochs", "1", "--out", sys.argv[3]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.backends("numba")  # a message, whatever the backend: one run
@pytest.mark.parametrize("module,package", [("sklearn", "scikit-learn"),
                                            ("matplotlib", "matplotlib")])
def test_missing_package_names_the_examples_extra_before_training(module, package, tmp_path):
    out = tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, module, str(EXAMPLE), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"needs {package}" in proc.stderr, proc.stderr
    assert 'python3 -m pip install ".[examples]"' in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "BatchNorm: loss" not in proc.stdout  # it stopped before training
    assert not out.exists()
