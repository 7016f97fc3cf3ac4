"""Comparison table: fastbn beside a parallel memory copy, the NumPy reference and PyTorch.

Run ``python -m fastbn.bench`` (``--help`` for options). Every figure is the median of several
timed samples taken in this one process, after a warm-up call outside the timed region. The
contenders of a row (copy, each fastbn backend, PyTorch, reference) are timed in interleaved
rounds, so the ratios between them, all from one run, survive the machine's drifts. See
bench/README.md.

The case table below is the one source of benchmark cases: bench/test_bench.py (the
pytest-benchmark suites) generates its tests from it too.
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    axis: int = 1
    dtype: str = "float32"

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * (2 if self.dtype in ("float16", "bfloat16")
                                           else np.dtype(self.dtype).itemsize)


#: The default workload: large cases (the bandwidth targets) and small ones (launch overhead).
CASES = (
    Case("NCHW 32x64x56x56", (32, 64, 56, 56)),
    Case("NCHW 64x128x56x56", (64, 128, 56, 56)),
    Case("NHWC 32x56x56x64", (32, 56, 56, 64), axis=-1),
    Case("NC 8192x1024", (8192, 1024)),
    Case("NC 256x2048", (256, 2048)),
    Case("NC 32x512", (32, 512)),
    Case("NCHW f16 32x64x56x56", (32, 64, 56, 56), dtype="float16"),
    Case("NCHW bf16 32x64x56x56", (32, 64, 56, 56), dtype="bfloat16"),
)
QUICK_CASES = (
    Case("NCHW 16x32x28x28", (16, 32, 28, 28)),
    Case("NHWC 16x28x28x32", (16, 28, 28, 32), axis=-1),
    Case("NC 32x512", (32, 512)),
)

#: Each sample repeats the call until it lasts this long, so that timer resolution and
#: per-call noise matter little; the figure is the median of the samples (per call).
MIN_SAMPLE_S = 0.002
#: Each function is called for this long before it is timed (a call that lasts longer: once).
WARM_UP_S = 0.01


def _repeat(fn, seconds):
    """Calls fn until ``seconds`` have passed (once at least); the mean seconds per call."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return max(elapsed / calls, 1e-7)


def _calibrate(fn):
    """Calls per sample so that a sample lasts MIN_SAMPLE_S, and the time of one call: the
    mean over MIN_SAMPLE_S / 2 of calls, after a first call (imports, compilation, set-up
    on first use) and WARM_UP_S of warm-up calls (a call that lasts longer counts as one of
    each). A small PyTorch layer's training step takes 10-20 calls to settle after the
    process's first autograd call (0.27 s), its first ones 2-10x slower; one warm-up call
    and one timed call had cut its samples to 4 calls, each sample's first call then
    weighing a quarter of its figure."""
    fn()
    _repeat(fn, WARM_UP_S)
    once = _repeat(fn, MIN_SAMPLE_S / 2)
    return max(1, int(MIN_SAMPLE_S / once)), once


def interleaved_medians(fns, samples, slow_budget_s=3.0):
    """Median seconds per call of each function in ``fns`` (a dict), timed in interleaved
    rounds: every round times each function once, so that a slow drift of the machine lands
    on all of them alike and the ratios between them stay fair. Each round starts one
    function later than the last, so that no function always follows the same neighbour (what
    ran before, its heap and its threads, moved a small PyTorch layer's time by up to 1.6x).
    Functions slower than ``slow_budget_s`` in total (the reference on big arrays) take part
    in fewer rounds."""
    plan = {name: _calibrate(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(samples):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            inner, once = plan[name]
            if round_ >= 3 and round_ * inner * once > slow_budget_s:
                continue
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


class Workload:
    """Arrays of one case and the callables that the table times."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        self.case = case
        dtype = _dtype(case.dtype)
        self.x = (1.0 + rng.standard_normal(case.shape, dtype=np.float32)).astype(dtype)
        self.dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
        C = case.shape[case.axis]
        pdtype = np.float32 if dtype.itemsize == 2 else dtype  # half x, float32 parameters
        self.gamma = (1 + 0.1 * rng.standard_normal(C)).astype(pdtype)
        self.beta = (0.1 * rng.standard_normal(C)).astype(pdtype)
        self.rm = np.zeros(C, pdtype)
        self.rv = np.ones(C, pdtype)
        self.y = np.empty_like(self.x)
        self.dx = np.empty_like(self.x)

    def fastbn(self, backend="numba"):
        import fastbn

        x, y, dx, dy, g, b, axis = self.x, self.y, self.dx, self.dy, self.gamma, self.beta, \
            self.case.axis
        _, mean, invstd = fastbn.forward(x, g, b, axis=axis, backend=backend)
        return {
            "forward": lambda: fastbn.forward(x, g, b, axis=axis, running_mean=self.rm,
                                              running_var=self.rv, out=y, backend=backend),
            "eval": lambda: fastbn.forward(x, g, b, axis=axis, training=False,
                                           running_mean=self.rm, running_var=self.rv, out=y,
                                           backend=backend),
            "backward": lambda: fastbn.backward(dy, x, mean, invstd, g, b, axis=axis, out=dx,
                                                backend=backend),
        }

    def copy(self):
        from fastbn import _numba_kernels

        # Same bytes as unsigned integers: Numba has no half floats.
        bits = np.dtype(f"u{self.x.itemsize}")
        src, dst = self.x.reshape(-1).view(bits), self.y.reshape(-1).view(bits)
        return lambda: _numba_kernels.copy_flat.parallel(src, dst)

    def torch(self):
        """PyTorch's own CPU kernels (aten::native_batch_norm and its backward), on the same
        memory (channels-last cases as channels_last tensors), without autograd overhead, and
        writing into preallocated outputs (their ``out`` overloads), as fastbn's figures do
        with ``out=``: allocating 25 MB per call cost PyTorch's forward 5 ms of page faults
        in this process (12.7 against 5.7 ms on NCHW 32x64x56x56), which measures the heap,
        not the kernel."""
        import torch

        case = self.case
        x, dy = _torch_tensor(self.x), _torch_tensor(self.dy)
        if case.axis != 1:  # NHWC memory seen by torch as an NCHW tensor in channels_last
            perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
            x, dy = x.permute(perm), dy.permute(perm)
        g, b = torch.from_numpy(self.gamma), torch.from_numpy(self.beta)
        rm, rv = torch.from_numpy(self.rm.copy()), torch.from_numpy(self.rv.copy())
        y, dx = torch.empty_like(x), torch.empty_like(x)
        self.torch_y, self.torch_dx = y, dx  # what the calls below write (y: forward and eval)
        stats = [torch.empty(g.shape, dtype=torch.float32) for _ in range(4)]  # train, eval
        grads = [torch.empty_like(g), torch.empty_like(b)]
        bn = torch.ops.aten.native_batch_norm.out
        bn_backward = torch.ops.aten.native_batch_norm_backward.out
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, g, b, None, None, True,
                                                                     0.1, 1e-5)
        mask = [True, True, True]

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        return {
            "forward": no_grad(lambda: bn(x, g, b, rm, rv, True, 0.1, 1e-5, out=y,
                                          save_mean=stats[0], save_invstd=stats[1])),
            "eval": no_grad(lambda: bn(x, g, b, rm, rv, False, 0.1, 1e-5, out=y,
                                       save_mean=stats[2], save_invstd=stats[3])),
            "backward": no_grad(lambda: bn_backward(dy, x, g, rm, rv, save_mean, save_invstd,
                                                    True, 1e-5, mask, out0=dx, out1=grads[0],
                                                    out2=grads[1])),
        }


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _torch_tensor(arr):
    """A torch tensor on arr's memory (bfloat16 through an int16 view: NumPy has no bf16)."""
    import torch

    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def compiled_backends():
    """fastbn's compiled backends available here ("numba", and "cython" where it was built)."""
    import fastbn

    return [b for b in fastbn.available_backends() if b != "reference"]


def run(cases, thread_counts, samples, with_reference=True, with_torch=True, log=None,
        backends=None):
    """Time every case at every thread count; returns a list of row dicts, with each
    backend's times under "<backend>_forward", "<backend>_eval", "<backend>_backward"."""
    import numba

    import fastbn

    backends = backends or compiled_backends()
    rows = []
    with_torch = with_torch and _torch_available()
    if with_torch:
        import torch
    threads_before = fastbn.get_num_threads()
    try:
        for case in cases:
            try:
                work = Workload(case)
            except ImportError as exc:  # bfloat16 needs ml_dtypes (the bench extra has it)
                if log:
                    log(f"  skipped {case.name}: {exc}")
                continue
            for threads in thread_counts:
                fastbn.set_num_threads(threads)
                numba.set_num_threads(threads)  # the copy yardstick runs on Numba directly
                if with_torch:
                    torch.set_num_threads(threads)
                fns = {"copy": work.copy()}
                for backend in backends:
                    fns.update({f"{backend}_{op}": fn for op, fn in
                                work.fastbn(backend=backend).items()})
                if with_torch:
                    fns.update({"torch_" + op: fn for op, fn in work.torch().items()})
                if with_reference and threads == thread_counts[-1]:
                    fns.update({"reference_" + op: fn for op, fn in
                                work.fastbn(backend="reference").items() if op != "eval"})
                row = {"case": case.name, "shape": list(case.shape), "axis": case.axis,
                       "dtype": case.dtype, "MB": 2 * case.nbytes / 1e6, "threads": threads,
                       "backends": list(backends)}
                row.update(interleaved_medians(fns, samples))
                rows.append(row)
                if log:
                    log(f"  timed {case.name} on {threads} thread(s)")
    finally:
        fastbn.set_num_threads(threads_before)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases, few samples")
    parser.add_argument("--cases", help="comma-separated substrings of case names to keep")
    parser.add_argument("--threads", help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--samples", type=int, help="timed samples per figure (default 15)")
    parser.add_argument("--backends", help="comma-separated compiled backends (default: all "
                        "available, " + ", ".join(compiled_backends()) + " here)")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--json", metavar="PATH", help="also save rows and environment as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also plot the ratios (needs matplotlib)")
    parser.add_argument("--no-train-step", action="store_true",
                        help="skip the ResNet-block training step (PyTorch)")
    parser.add_argument("--cold-start", action="store_true",
                        help="also time import, first call (cold and warm cache), precompile")
    parser.add_argument("--small-calls", action="store_true",
                        help="instead of the table: only the small-call tables (per-call "
                        "overhead, NC 32x512 and 256x2048, layers; see fastbn.bench_small)")
    parser.add_argument("--no-small-calls", action="store_true",
                        help="skip the small-call tables")
    parser.add_argument("--crossover", action="store_true",
                        help="instead of the table: time each kernel on one thread and on the "
                        "team over sizes from 16 KiB to 4 MiB, and print where the team wins")
    parser.add_argument("--frameworks", metavar="LIST",
                        help="instead of the table: the adapters beside each framework's own "
                        "batch norm, for some of jax,flax,keras-jax,keras-torch (or 'all')")
    parser.add_argument("--distributed", action="store_true",
                        help="instead of the table: synchronized batch norm (MPI and "
                        "torch.distributed) on 1, 2 and 4 processes (--quick: smaller, 1 and 2)")
    opts = parser.parse_args(argv)
    from .bench_crossover import crossover, format_crossover
    from .bench_report import (contention, environment, fastbn_threads, format_table, plot,
                               ratios, require_matplotlib)
    from .bench_train import cold_start, format_train_step, train_step, train_step_memory

    if opts.distributed:
        from . import _bench_distributed

        return _bench_distributed.main(quick=opts.quick)
    if opts.plot:
        require_matplotlib()  # now, not after the run
    import numba

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if opts.crossover:
        backends = opts.backends.split(",") if opts.backends else compiled_backends()
        samples = opts.samples or 15
        rows = crossover(backends, samples, max_kib=1024 if opts.quick else 4096, log=log)
        print(f"\nfastbn parallel crossover ({environment()['cpus']} CPUs, "
              f"{fastbn_threads()} threads in the team); medians of {samples} interleaved "
              f"rounds; x float32, bytes of x")
        print(format_crossover(rows))
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump({"environment": environment(), "crossover": rows}, fh, indent=1)
        return 0

    if opts.frameworks:
        return _frameworks_main(opts, log)

    cases = QUICK_CASES if opts.quick else CASES
    if opts.cases:
        wanted = [w.strip() for w in opts.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    all_threads = numba.config.NUMBA_NUM_THREADS
    threads = sorted({1, all_threads}) if not opts.threads else \
        [int(t) for t in opts.threads.split(",")]
    samples = opts.samples or (5 if opts.quick else 15)
    small = None
    if opts.small_calls or not opts.no_small_calls:
        from .bench_small import format_small_calls, small_calls

        small = small_calls(threads, samples, with_torch=not opts.no_torch, log=log)
    env = environment()
    if opts.small_calls:
        print(f"\nfastbn small calls ({env['cpus']} CPUs, torch {env.get('torch', 'absent')}); "
              f"medians of {samples} interleaved rounds, microseconds per call")
        print(format_small_calls(small))
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump({"environment": env, "small_calls": small}, fh, indent=1)
        return 0
    log(f"fastbn bench: {len(cases)} case(s), threads {threads}, {samples} samples each")
    backends = opts.backends.split(",") if opts.backends else compiled_backends()
    rows = run(cases, threads, samples, with_reference=not opts.no_reference,
               with_torch=not opts.no_torch, log=log, backends=backends)
    print(f"\nfastbn benchmark ({env['cpus']} CPUs, numba {env['numba']} "
          f"[{env['threading_layer']}], torch {env.get('torch', 'absent')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}); medians of {samples} "
          f"interleaved rounds; ratios within this run")
    print(format_table(rows))
    if small is not None:
        print("\nSmall calls (microseconds per call; torch / fastbn >= 1.00x: fastbn no slower)")
        print(format_small_calls(small))
    steps, memory = {}, {}
    if not opts.no_train_step and not opts.no_torch and _torch_available():
        size = dict(batch=8, size=28) if opts.quick else {}
        for fmt in ("contiguous", "channels_last"):
            log(f"  timing a ResNet-block training step ({fmt})")
            steps[fmt] = train_step(memory_format=fmt, samples=3 if opts.quick else 5, **size)
            memory[fmt] = train_step_memory(memory_format=fmt, **size)
            print()
            print(format_train_step(steps[fmt], f"ResNet block step, {fmt}, "
                                    f"batch {size.get('batch', 32)}, 64 ch, "
                                    f"{size.get('size', 56)}x{size.get('size', 56)}, "
                                    f"{fastbn_threads()} threads", memory[fmt]))
        print("\npeak MiB: tensors allocated by PyTorch's CPU allocator during one step, above "
              "those live before it (torch.profiler memory events)")
    cold = None
    if opts.cold_start:
        cold = cold_start(log, backends)
        print("\n| cold start (new process) | seconds |\n|---|---|")
        for what, seconds in cold.items():
            print(f"| {what} | {seconds:.2f} |")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"environment": env, "rows": rows, "cold_start": cold,
                       "train_step": steps, "train_step_peak_bytes": memory,
                       "small_calls": small,
                       "ratios": [{b: ratios(r, b) for b in r["backends"]} for r in rows],
                       "contended": contention(rows)},
                      fh, indent=1)
        log(f"saved {opts.json}")
    if opts.plot:
        import matplotlib.pyplot as plt

        plt.close(plot(rows, opts.plot, env))
        log(f"saved {opts.plot}")
    return 0


def _frameworks_main(opts, log):
    from . import bench_frameworks
    from .bench_report import environment, fastbn_threads
    names = (bench_frameworks.FRAMEWORKS if opts.frameworks == "all"
             else [f.strip() for f in opts.frameworks.split(",")])
    cases = QUICK_CASES[1:2] if opts.quick else (CASES[2], CASES[0])
    threads = [fastbn_threads()] if not opts.threads else \
        [int(t) for t in opts.threads.split(",")]
    samples = opts.samples or (3 if opts.quick else 15)
    rows = []
    for case in cases:
        for n in threads:
            part = bench_frameworks.run(names, case.shape, case.axis, samples, n, log=log)
            print()
            print(bench_frameworks.format_rows(part, f"{case.name}, float32"))
            rows += [dict(r, case=case.name) for r in part]
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"environment": environment(), "frameworks": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
