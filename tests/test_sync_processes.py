"""fastbn.distributed over real MPI (mpiexec from the mpich wheel, 2 and 3 processes) and
fastbn.torch.SyncBatchNorm over a 3-process torch.distributed gloo group. Each launch runs a
worker module of this directory that checks many cases in one go (tests/mpi_worker.py,
tests/gloo_worker.py); every launch has a timeout, so a hang fails instead of blocking.
(Named to run after test_phases.py and test_sync_core.py, whose runs fill Numba's on-disk
cache that the workers then load instead of compiling.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 240


def _env():
    """The environment of a worker: this fastbn first on the path, the default backend, one
    thread per process (several processes share the cores)."""
    env = dict(os.environ)
    env.pop("FASTBN_BACKEND", None)
    src = str(Path(fastbn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(FASTBN_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def _mpiexec():
    """mpiexec beside this Python (the mpich wheel installs it there), else on the PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _check(proc, what):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output


@pytest.mark.backends("numba")  # one launch, on the default backend (see _env)
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_ranks_equal_single_process(ranks, backend):
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    assert mpiexec, "mpiexec not found: install the mpich wheel (pip install 'fastbn[mpi]')"
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable,
                           str(HERE / "mpi_worker.py")], capture_output=True, text=True,
                          env=_env(), timeout=LAUNCH_TIMEOUT_S)
    output = _check(proc, f"mpiexec -n {ranks}")
    for rank in range(ranks):
        assert f"rank {rank} of {ranks}: ok" in output


@pytest.mark.backends("numba")
def test_gloo_group_sync_batchnorm_and_ddp(backend, tmp_path):
    pytest.importorskip("torch")
    size = 3
    init_file = tmp_path / "gloo_init"
    procs = [subprocess.Popen([sys.executable, str(HERE / "gloo_worker.py"), str(rank),
                               str(size), str(init_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env())
             for rank in range(size)]
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            proc.stdout, proc.stderr = out, err
            output = _check(proc, f"gloo rank {rank}")
            assert f"rank {rank} of {size}: ok" in output
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.backends("numba")
def test_import_fastbn_never_imports_mpi4py_and_missing_mpi4py_names_the_extra(backend):
    code = (
        "import sys\n"
        "import fastbn, fastbn.phases\n"
        "assert 'mpi4py' not in sys.modules, 'import fastbn imported mpi4py'\n"
        "sys.modules['mpi4py'] = None  # as if it were not installed\n"
        "try:\n"
        "    import fastbn.distributed\n"
        "except ImportError as exc:\n"
        "    assert 'fastbn[mpi]' in str(exc), exc\n"
        "    print('named the extra')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=LAUNCH_TIMEOUT_S)
    assert "named the extra" in _check(proc, "import check")
