"""``python -m fastbn``: the environment report names each backend (and why one is missing),
the threading layer and why, the threads, the cache and the CPU."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import fastbn
from fastbn import _backends, _report


def test_report_runs_and_names_what_fastbn_runs_on():
    env = {k: v for k, v in os.environ.items() if k != "FASTBN_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "fastbn"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"fastbn {fastbn.__version__} at ")
    assert "Backends (default first): " + ", ".join(fastbn.available_backends()) in out
    for name in ("cython", "numba", "reference"):
        assert f"  {name}: " in out
    assert "Numba threading layer: " in out and "Numba cache: " in out
    assert f"Threads: {fastbn.get_num_threads()} " in out
    assert "CPU: " in out and "caches (cpu0): " in out
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        if "NUMBA_THREADING_LAYER" not in os.environ:
            assert "Numba threading layer: tbb (TBB loaded from " in out


def test_a_backend_missing_is_reported_with_the_builds_reason(tmp_path, monkeypatch):
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"cython": "not built",
                                "reason": "CompileError: command '/nonexistent-cc' failed"}))
    monkeypatch.setattr(_report, "BUILD_INFO", str(info))
    monkeypatch.setattr(_backends, "_import_cython", lambda: None)
    status, why = _report.cython_status()
    assert status == "missing"
    assert why == "not built at install time: CompileError: command '/nonexistent-cc' failed"


def test_backend_not_available_error_points_to_the_report(monkeypatch):
    monkeypatch.setattr(_backends, "_available", ("numba", "reference"))
    with pytest.raises(ValueError, match=r"not available here.*python -m fastbn"):
        _backends.resolve_backend("cython")
