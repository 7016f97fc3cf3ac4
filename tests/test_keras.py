"""fastbn.keras.BatchNormalization against Keras' own layer, one subprocess per backend (Keras
reads KERAS_BACKEND once, at import): weights after several fit steps, eval and training
outputs, input and weight gradients, trainable=False, half inputs, config and errors, and a
spy proving fastbn's kernels ran. The checks are in tests/_keras_backend_check.py."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

import fastbn

if importlib.util.find_spec("keras") is None:  # importing it here would fix its backend
    pytest.skip("keras is not installed", allow_module_level=True)

SCRIPT = pathlib.Path(__file__).with_name("_keras_backend_check.py")


@pytest.mark.backends("numba")  # the kernels' backends are compared elsewhere; this is slow
@pytest.mark.parametrize("keras_backend,framework", [("jax", "jax"), ("torch", "torch"),
                                                     ("tensorflow", "tensorflow")])
def test_matches_keras_on_backend(keras_backend, framework):
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    env = dict(os.environ, KERAS_BACKEND=keras_backend)  # FASTBN_BACKEND: this run's, from conftest
    # the fastbn these tests import (an installed one, or a source tree), in the child too
    here = str(pathlib.Path(fastbn.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", str(SCRIPT)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.backends("numba")
def test_missing_backend_framework_is_named():
    """Keras installed but its backend's framework missing (TensorFlow, Keras' default): the
    error says which backend failed and how to pick another, not that Keras is missing."""
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "try:\n    import fastbn.keras\nexcept ImportError as e:\n    print(e)")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    here = str(pathlib.Path(fastbn.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code],
                         env=env, capture_output=True, text=True, timeout=300).stdout
    assert "Keras could not start its backend (KERAS_BACKEND=tensorflow)" in out, out
    assert "KERAS_BACKEND to 'jax' or 'torch'" in out, out
