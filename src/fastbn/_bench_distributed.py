"""``python -m fastbn.bench --distributed``: the per-step time of synchronized batch norm
(forward + backward) on NCHW float32 32x64x56x56, the global batch split over 1, 2 and 4
processes on this machine, for both engines: fastbn.distributed over MPI (mpiexec from the
mpich wheel) and fastbn.torch.SyncBatchNorm over a torch.distributed gloo group.

Each configuration is a fresh set of processes (this module's ``worker``), each with
``cpus // processes`` threads. Every rank times its steps after a warm-up; the table shows
rank 0's median step and the share of it spent in collectives (the gather calls, including
the wait for the slowest rank, which on one machine is mostly load imbalance). With one
process the MPI engine still runs its (trivial) collectives; the torch layer is a plain
batch norm without a group of two or more, as PyTorch's is.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_SHAPE = (32, 64, 56, 56)
QUICK_SHAPE = (8, 64, 28, 28)


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _env(threads):
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(FASTBN_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def launch(engine, procs, shape, steps, timeout_s=600):
    """Run one configuration; returns rank 0's figures (a dict) or raises RuntimeError."""
    threads = max(1, _cpus() // procs)
    args = [str(procs), "x".join(map(str, shape)), str(steps)]
    module = [sys.executable, "-m", "fastbn._bench_distributed", "worker", engine]
    env = _env(threads)
    if engine == "mpi":
        mpiexec = _mpiexec()
        if mpiexec is None:
            raise RuntimeError("mpiexec not found (pip install 'fastbn[mpi]')")
        procs_run = [subprocess.run([mpiexec, "-n", str(procs)] + module + args + ["-", "-"],
                                    capture_output=True, text=True, env=env,
                                    timeout=timeout_s)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            started = [subprocess.Popen(module + args + [str(rank), init],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env) for rank in range(procs)]
            procs_run = []
            for proc in started:
                out, err = proc.communicate(timeout=timeout_s)
                procs_run.append(subprocess.CompletedProcess(proc.args, proc.returncode, out,
                                                             err))
    for proc in procs_run:
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} x{procs} failed:\n{proc.stderr[-3000:]}")
    for line in procs_run[0].stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            result.update(engine=engine, procs=procs, threads=threads)
            return result
    raise RuntimeError(f"{engine} x{procs}: no result\n{procs_run[0].stdout[-2000:]}")


def worker(engine, procs, shape, steps, rank, init):
    """One rank: time ``steps`` synchronized forward+backward steps on its slice."""
    import numpy as np

    n = shape[0]
    if n % procs:
        raise SystemExit(f"the batch {n} does not split evenly over {procs} processes")
    local_shape = (n // procs,) + tuple(shape[1:])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(local_shape, dtype=np.float32)
    dy = rng.standard_normal(local_shape, dtype=np.float32)
    spent = [0.0]

    def timed(method):
        def allgather(self, vector):
            t0 = time.perf_counter()
            try:
                return method(self, vector)
            finally:
                spent[0] += time.perf_counter() - t0
        return allgather

    if engine == "mpi":
        from fastbn import distributed

        class Comm(distributed.MPICommunicator):
            allgather = timed(distributed.MPICommunicator.allgather)

        comm = Comm()
        rank = comm.rank
        bn = distributed.SyncBatchNorm(shape[1], comm=comm)

        def step():
            y = bn.forward(x)
            bn.backward(dy)
            return y

        barrier = comm.comm.Barrier
    else:
        import datetime

        import torch
        import torch.distributed as dist

        from fastbn import _torch_sync
        from fastbn.torch import SyncBatchNorm

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        rank = int(rank)
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=procs, timeout=datetime.timedelta(seconds=300))
        _torch_sync.TorchCommunicator.allgather = timed(_torch_sync.TorchCommunicator.allgather)
        bn = SyncBatchNorm(shape[1])
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def step():
            y = bn(xt)
            y.backward(dyt)
            xt.grad = None
            return y

        barrier = dist.barrier
    for _ in range(2):  # warm-up: compilation, caches, allocator
        step()
    times, shares = [], []
    for _ in range(steps):
        barrier()
        spent[0] = 0.0
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        times.append(elapsed)
        shares.append(spent[0] / elapsed)
    if rank == 0:
        print(json.dumps({"step_ms": statistics.median(times) * 1e3,
                          "collective_share": statistics.median(shares),
                          "shape": list(shape), "steps": steps}), flush=True)
    if engine != "mpi":
        dist.destroy_process_group()


def run(quick=False, engines=("mpi", "torch"), procs=(1, 2, 4), log=print):
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    steps = 3 if quick else 10
    rows = []
    for engine in engines:
        for p in procs:
            log(f"  {engine} on {p} process(es)")
            try:
                rows.append(launch(engine, p, shape, steps))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                rows.append({"engine": engine, "procs": p, "error": str(exc).splitlines()[0]})
    return shape, rows


def format_rows(shape, rows):
    lines = [f"synchronized batch norm, forward + backward, NCHW float32 "
             f"{'x'.join(map(str, shape))} split over the processes ({_cpus()} CPUs)",
             "", "| engine | processes | threads each | step (ms), rank 0 | in collectives |",
             "|---|---|---|---|---|"]
    for r in rows:
        name = {"mpi": "fastbn.distributed (mpi4py)", "torch": "fastbn.torch (gloo)"}[r["engine"]]
        if "error" in r:
            lines.append(f"| {name} | {r['procs']} | - | failed: {r['error']} | - |")
        else:
            lines.append(f"| {name} | {r['procs']} | {r['threads']} | {r['step_ms']:.2f} | "
                         f"{100 * r['collective_share']:.1f}% |")
    return "\n".join(lines)


def main(quick=False, log=None):
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    procs = (1, 2) if quick else (1, 2, 4)
    shape, rows = run(quick=quick, procs=procs, log=log)
    print(format_rows(shape, rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "worker":
        engine, procs, shape, steps, rank, init = sys.argv[2:8]
        worker(engine, int(procs), tuple(int(v) for v in shape.split("x")), int(steps), rank,
               init)
    else:
        sys.exit(main(quick="--quick" in sys.argv))
