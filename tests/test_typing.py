"""The public API's annotations, checked with mypy as a user's code would see them.

One mypy run covers fastbn's public modules (every function annotated, the bodies consistent
with the annotations) and a usage snippet: its plain uses must pass, and each line marked
``# E: code`` must be reported with that error code, and nothing else. An annotation that is
too loose (a misspelled backend accepted) or too strict (a plain use rejected) fails.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn

pytest.importorskip("mypy")

PUBLIC_MODULES = ("__init__.py", "api.py", "layers.py", "_common.py", "reference.py", "phases.py",
                  "distributed.py")
FLAGS = ["--follow-imports=silent", "--disallow-untyped-defs", "--disallow-incomplete-defs",
         "--check-untyped-defs", "--strict-equality", "--warn-unused-ignores",
         "--warn-redundant-casts", "--no-error-summary", "--show-error-codes",
         "--hide-error-context", "--no-pretty", "--no-color-output"]

SNIPPET = '''\
from typing import Any

import numpy as np
from numpy.typing import NDArray

import fastbn
from fastbn import reference

x = np.ones((8, 3), np.float32)
rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
result = fastbn.forward(x, np.ones(3), [0.0, 0.0, 0.0], axis=1, training=True,
                        running_mean=rm, running_var=rv, momentum=0.1, eps=1e-5,
                        activation="relu", out=None, backend="numba")
y: np.ndarray = result.y
mean: NDArray[np.float32 | np.float64] = result.mean
y2, mean2, invstd2 = fastbn.forward([[1.0, 2.0], [3.0, 4.0]], backend=None)
grads = fastbn.backward(x, x, mean, result.invstd, activation=None, backend="cython")
dx: np.ndarray = grads.dx
dgamma: np.ndarray = grads.dgamma
names: tuple[str, ...] = fastbn.available_backends()
threads: int = fastbn.get_num_threads()
fastbn.set_num_threads(threads)
ref: fastbn.ForwardResult = reference.forward(x, backend="reference")
ref_grads: fastbn.BackwardResult = reference.backward(x, x, mean, result.invstd)
layer = fastbn.BatchNorm(3, axis=-1, eps=1e-3, momentum=None, affine=False,
                         track_running_stats=False, activation="relu", dtype=np.float64)
same: fastbn.BatchNorm = layer.train().eval().train(True)
out: np.ndarray = layer.forward(x)
dx_layer: np.ndarray = layer.backward(np.ones_like(out))
called: np.ndarray = layer(x)
params: list[np.ndarray] = layer.parameters()
state: dict[str, np.ndarray] = layer.state_dict()
layer.load_state_dict(state)
weight: np.ndarray | None = layer.weight
version: str = fastbn.__version__

fastbn.forward(x, activation="gelu")  # E: arg-type
fastbn.forward(x, backend="cuda")  # E: arg-type
reference.forward(x, backend="gpu")  # E: arg-type
fastbn.forward(x, axis="1")  # E: arg-type
fastbn.forward(x, training="yes")  # E: arg-type
fastbn.forward(x, running_mean=[0.0, 0.0, 0.0], running_var=rv)  # E: arg-type
fastbn.forward(x, epsilon=1e-5)  # E: call-arg
fastbn.backward(x, x)  # E: call-arg
fastbn.forward(x).dx  # E: attr-defined
wrong_y: int = fastbn.forward(x).y  # E: assignment
wrong_threads: str = fastbn.get_num_threads()  # E: assignment
wrong_names: list[str] = fastbn.available_backends()  # E: assignment
fastbn.set_num_threads("2")  # E: arg-type
fastbn.BatchNorm(3, activation="tanh")  # E: arg-type
fastbn.BatchNorm("3")  # E: arg-type
wrong_layer: int = fastbn.BatchNorm(3).forward(x)  # E: assignment
'''

ERROR_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<msg>.*)  \[(?P<code>[a-z-]+)\]$")


def _expected(snippet):
    return {(number, match.group(1)) for number, text in enumerate(snippet.splitlines(), 1)
            if (match := re.search(r"# E: ([a-z-]+)$", text))}


@pytest.mark.backends("numba")  # annotations do not depend on the backend: one run
def test_public_api_annotations_hold_for_mypy(tmp_path):
    package = Path(fastbn.__file__).resolve().parent
    assert (package / "py.typed").is_file(), "the PEP 561 marker must ship with the package"
    usage = tmp_path / "usage.py"
    usage.write_text(SNIPPET)
    # mypy is given a copy of the package's Python files: given files inside site-packages,
    # it would take site-packages for a source folder, and other packages' modules there
    # for the user's own (an error: "This file shadows library module ...").
    src = tmp_path / "src"
    shutil.copytree(package, src / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.c"))
    env = dict(os.environ, MYPYPATH=str(src))
    files = [str(src / "fastbn" / name) for name in PUBLIC_MODULES] + [str(usage)]
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                           *FLAGS, *files], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in (0, 1), f"mypy did not run:\n{proc.stdout}\n{proc.stderr}"
    reported, other = set(), []
    for line in proc.stdout.splitlines():
        match = ERROR_LINE.match(line)
        if match and Path(match["path"]).name == usage.name:
            reported.add((int(match["line"]), match["code"]))
        elif match or ": error:" in line:
            other.append(line)
    assert not other, "mypy errors in fastbn's public modules:\n" + "\n".join(other)
    expected = _expected(SNIPPET)
    lines = SNIPPET.splitlines()
    missed = sorted(expected - reported)
    unexpected = sorted(reported - expected)
    assert not missed, "not reported: " + "; ".join(f"{n}: {lines[n - 1]}" for n, _ in missed)
    assert not unexpected, "\n".join(["reported, but the use is meant to pass:"]
                                     + [f"{n} [{c}]: {lines[n - 1]}" for n, c in unexpected]
                                     + ["mypy said:", proc.stdout])
