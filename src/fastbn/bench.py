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
import platform
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


def _calibrate(fn):
    """Calls per sample so that a sample lasts MIN_SAMPLE_S, after a warm-up call; and the
    time of one call."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
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


#: The crossover scan: one layout per row, x from 16 KiB up, doubling. NCHW reaches the
#: feature-outer kernels, NC and NHWC the feature-inner ones (as the default cases do).
CROSSOVER_LAYOUTS = (
    ("NCHW n x64x8x8", "outer", lambda n: (n, 64, 8, 8), 1),
    ("NC n x512", "inner", lambda n: (n, 512), 1),
    ("NHWC n x8x8x64", "inner", lambda n: (n, 8, 8, 64), -1),
)
CROSSOVER_OPS = ("forward", "eval", "backward")


def crossover(backends, samples, max_kib=4096, log=None):
    """Each op of each layout on the calling thread alone ("serial") and on the thread team
    ("team"), over sizes doubling from 16 KiB to ``max_kib``, timed in interleaved rounds;
    returns rows of {backend, layout, family, KiB, "<op> serial", "<op> team"}."""
    from fastbn import _backends

    def forced(parallel, fn):
        def run():
            with _backends.forced_parallel(parallel):
                fn()
        return run

    rows = []
    for backend in backends:
        for layout, family, shape_of, axis in CROSSOVER_LAYOUTS:
            per_n = 4 * int(np.prod(shape_of(1)))
            n = max(1, 16 * 1024 // per_n)
            while n * per_n <= max_kib * 1024:
                work = Workload(Case(layout, shape_of(n), axis))
                fns = {}
                for op, fn in work.fastbn(backend=backend).items():
                    fns[f"{op} serial"] = forced(False, fn)
                    fns[f"{op} team"] = forced(True, fn)
                row = {"backend": backend, "layout": layout, "family": family,
                       "KiB": n * per_n // 1024}
                row.update(interleaved_medians(fns, samples))
                rows.append(row)
                if log:
                    log(f"  crossover {backend} {layout} {row['KiB']} KiB")
                n *= 2
    return rows


def crossover_points(rows):
    """{(backend, family, op): the smallest size (KiB) from which the team was at least as
    fast as one thread at every larger size of every layout of the family; None if never}."""
    points = {}
    for backend, family in {(r["backend"], r["family"]) for r in rows}:
        mine = [r for r in rows if r["backend"] == backend and r["family"] == family]
        for op in CROSSOVER_OPS:
            losing = [r["KiB"] for r in mine if r[f"{op} team"] > r[f"{op} serial"]]
            sizes = sorted(r["KiB"] for r in mine if r["KiB"] > max(losing, default=0))
            points[backend, family, op] = sizes[0] if sizes else None
    return points


def format_crossover(rows):
    """Markdown: the scan's times and ratios per backend, layout and size, then the crossover
    per backend, family and op beside the threshold fastbn uses (PARALLEL_MIN_BYTES)."""
    from fastbn import _backends

    lines = ["| backend | layout | KiB | " + " | ".join(
        f"{op} 1 thr us | {op} team us | {op} 1thr/team" for op in CROSSOVER_OPS) + " |",
             "|---|---|---|" + "---|---|---|" * len(CROSSOVER_OPS)]
    for r in rows:
        cells = []
        for op in CROSSOVER_OPS:
            one, team = r[f"{op} serial"], r[f"{op} team"]
            cells.append(f"{one * 1e6:.1f} | {team * 1e6:.1f} | {one / team:.2f}")
        lines.append(f"| {r['backend']} | {r['layout']} | {r['KiB']} | " + " | ".join(cells)
                     + " |")
    lines += ["", "| backend | family | op | team from (KiB, measured) | "
              "PARALLEL_MIN_BYTES in use (KiB) |", "|---|---|---|---|---|"]
    for (backend, family, op), kib in sorted(crossover_points(rows).items()):
        used = _backends.PARALLEL_MIN_BYTES.get((backend, family, op))
        lines.append(f"| {backend} | {family} | {op} | {kib if kib is not None else 'never'} | "
                     f"{'-' if used is None else used // 1024} |")
    return "\n".join(lines)


def ratios(row, backend=None):
    """The ratios of one row for one backend (default: the row's first): against the copy (the
    bandwidth floor), PyTorch and the reference. Backward moves three arrays where the copy
    moves two, hence its 1.5 x copy yardstick."""
    backend = backend or row["backends"][0]
    t = {op: row[f"{backend}_{op}"] for op in ("forward", "eval", "backward")}
    r = {"fwd/copy": t["forward"] / row["copy"],
         "eval/copy": t["eval"] / row["copy"],
         "bwd/(1.5copy)": t["backward"] / (1.5 * row["copy"])}
    for op in ("forward", "eval", "backward"):
        if "torch_" + op in row:
            r[f"torch/{op}"] = row["torch_" + op] / t[op]
    for op in ("forward", "backward"):
        if "reference_" + op in row:
            r[f"ref/{op}"] = row["reference_" + op] / t[op]
    return r


def format_table(rows):
    """A Markdown table: times in ms, then ratios (x copy: lower is better, 1.0 is the floor;
    speedups over torch and the reference: higher is better). A row whose figures are
    implausible (see :func:`contention`) says "contended" in its last column, and the reasons
    follow the table."""
    header = ["case", "thr", "backend", "MB moved", "copy ms", "fwd ms", "eval ms", "bwd ms",
              "fwd/copy", "eval/copy", "bwd/1.5copy", "torch fwd ms", "torch bwd ms",
              "fwd vs torch", "eval vs torch", "bwd vs torch", "fwd vs ref", "bwd vs ref",
              "sanity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flags = contention(rows)
    for row, reasons in zip(rows, flags):
        for backend in row["backends"]:
            r = ratios(row, backend)

            def ms(key):
                return f"{row[key] * 1e3:.3f}" if key in row else "-"

            def x(key):
                return f"{r[key]:.2f}x" if key in r else "-"

            cells = [row["case"], str(row["threads"]), backend, f"{row['MB']:.1f}", ms("copy"),
                     ms(f"{backend}_forward"), ms(f"{backend}_eval"), ms(f"{backend}_backward"),
                     x("fwd/copy"), x("eval/copy"), x("bwd/(1.5copy)"), ms("torch_forward"),
                     ms("torch_backward"), x("torch/forward"), x("torch/eval"),
                     x("torch/backward"), x("ref/forward"), x("ref/backward"),
                     "**contended**" if reasons else "ok"]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row['case']}, {row['threads']} thread(s): contended, {'; '.join(reasons)}"
             for row, reasons in zip(rows, flags) if reasons]
    if notes:
        lines += ["", "Rows marked contended have implausible figures: another process "
                  "probably shared the CPUs while they were timed. They are not results "
                  "(rerun on a quiet machine):", *notes]
    return "\n".join(lines)


def _train_step_variants(batch, channels, size, memory_format):
    """{variant: step()} for the ResNet-style basic block (conv-BN-ReLU-conv-BN plus the
    identity, then ReLU) with PyTorch's BatchNorm2d, fastbn's, fastbn's with the first BN
    fused with its ReLU (fastbn.torch.fuse_relu; the second BN feeds the addition, so it stays
    unfused, as in torchvision's block), and none (to find BN's share)."""
    import torch

    import fastbn.torch as fbt

    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format

    class Block(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = norm(channels)
            self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = norm(channels)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + x)

    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    steps = {}
    for name, norm in (("torch BN", torch.nn.BatchNorm2d), ("fastbn BN", fbt.BatchNorm2d),
                       ("fastbn BN+ReLU fused", fbt.BatchNorm2d),
                       ("no BN", lambda c: torch.nn.Identity())):
        torch.manual_seed(0)
        block = Block(norm).to(memory_format=fmt)
        if name == "fastbn BN+ReLU fused":
            block = fbt.fuse_relu(block)

        def step(block=block):
            block.zero_grad(set_to_none=True)
            block(x).mean().backward()

        steps[name] = step
    return steps


def train_step(batch=32, channels=64, size=56, memory_format="contiguous", samples=5):
    """A training step (forward + backward) of a ResNet-style basic block in each variant of
    :func:`_train_step_variants`, timed in interleaved rounds. Returns {variant: seconds}."""
    steps = _train_step_variants(batch, channels, size, memory_format)
    return interleaved_medians(steps, samples, slow_budget_s=60.0)


def train_step_memory(batch=32, channels=64, size=56, memory_format="contiguous"):
    """Peak bytes of tensors allocated by PyTorch's CPU allocator during one training step of
    each variant (after a warm-up step), above what was live when the step began: the
    allocation events of ``torch.profiler`` (profile_memory=True), summed in time order. This
    counts activations saved for backward, outputs, gradients and temporaries made by
    PyTorch, fastbn's outputs included (they come from PyTorch's allocator); it does not see
    the small per-thread partial sums fastbn's kernels allocate with NumPy, nor heap
    fragmentation (the process's RSS); blocks allocated before the step and freed in it (the
    previous step's gradients) are not subtracted, which may overstate the peak alike for
    every variant. Returns {variant: bytes}."""
    from torch.profiler import ProfilerActivity, profile

    peaks = {}
    for name, step in _train_step_variants(batch, channels, size, memory_format).items():
        step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        peaks[name] = peak
    return peaks


def format_train_step(times, label, memory=None):
    base = times["no BN"]
    lines = [f"| {label} | step ms | BN ms (step - no-BN step) | BN share of step "
             "| step vs torch | peak MiB |", "|---|---|---|---|---|---|"]
    for name in times:
        bn = times[name] - base
        share = f"{bn / times[name]:.0%}" if name != "no BN" else "-"
        peak = f"{memory[name] / 2**20:.1f}" if memory else "-"
        lines.append(f"| {name} | {times[name] * 1e3:.1f} | "
                     f"{bn * 1e3:.1f} | {share} | {times['torch BN'] / times[name]:.2f}x "
                     f"| {peak} |")
    return "\n".join(lines)


_FIRST_CALL = """
import time
t0 = time.perf_counter()  # the backend comes from FASTBN_BACKEND
import fastbn
t1 = time.perf_counter()
import numpy as np
x = np.random.default_rng(0).standard_normal((32, 64, 28, 28)).astype(np.float32)
y, mean, invstd = fastbn.forward(x)
fastbn.backward(x, x, mean, invstd)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def cold_start(log=None, backends=None):
    """Seconds for: importing fastbn; the first forward+backward (float32 NCHW) in a new process
    with a warm and with a cold (empty) on-disk cache, per backend (the Cython kernels are
    compiled ahead: no cache); and precompiling every Numba kernel cold."""
    import subprocess
    import tempfile

    def child(code, env):
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout
        return [float(v) for v in out.split()[-2:]]

    result = {}
    backends = backends or compiled_backends()
    with tempfile.TemporaryDirectory() as cache:
        for backend in backends:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, FASTBN_BACKEND=backend)
            _, first_cold = child(_FIRST_CALL, env)
            imp, first_warm = child(_FIRST_CALL, env)
            result["import fastbn"] = imp
            if backend == "numba":
                result["numba: first call, cold cache"] = first_cold
                result["numba: first call, warm cache"] = first_warm
            else:
                result[f"{backend}: first call"] = first_warm
        if log:
            log("  timed first calls")
    with tempfile.TemporaryDirectory() as cache:
        code = ("import time; t = time.perf_counter(); from fastbn.precompile import precompile; "
                "precompile(); print(0, time.perf_counter() - t)")
        result["numba: every kernel, cold cache"] = child(
            code, dict(os.environ, NUMBA_CACHE_DIR=cache))[1]
    return result


def fastbn_threads():
    import fastbn

    return fastbn.get_num_threads()


def cpu_model():
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what platform reports)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    import datetime

    import numba

    import fastbn

    info = {"fastbn": fastbn.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "machine": platform.machine(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "threading_layer": None}
    try:
        info["threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel Numba kernel ran yet: the layer fastbn asked Numba for
        from fastbn import _numba_kernels, _numba_layer  # noqa: F401  (the import chooses)

        info["threading_layer"] = _numba_layer.choice.layer
    if _torch_available():
        import torch

        info["torch"] = torch.__version__
    return info


#: A copy on more threads slower than on fewer by this factor is not bandwidth: another
#: process held the CPUs. Checked on cases whose x has at least CONTENTION_MIN_BYTES, where a
#: parallel copy always gains (below, waking the team can cost more than the copy itself).
COPY_SLOWDOWN_LIMIT = 1.3
CONTENTION_MIN_BYTES = 2**20
#: Speedups beyond these are measurement accidents, not kernels: PyTorch's CPU kernels are
#: within a few times of the memory-bandwidth floor, and the reference (NumPy, float64, a
#: handful of passes) within a few hundred times of it even on many cores.
MAX_SPEEDUP = {"torch": (100.0, "PyTorch"), "ref": (1000.0, "the reference")}
#: fastbn more than this many times slower than the copy of the same bytes, or faster: even on
#: the smallest case, where fastbn's fixed cost per call (checks, dispatch) or the copy's
#: (waking its threads) dominates, the two stay far closer.
MAX_COPY_RATIO = 50.0


def contention(rows):
    """For each row of :func:`run`, the reasons its figures are implausible (an empty list for
    a plausible row): a time that is not positive and finite; the copy on more threads slower
    than on fewer by more than COPY_SLOWDOWN_LIMIT (same case); fastbn's time over the copy's
    beyond MAX_COPY_RATIO, either way; a speedup over PyTorch or the reference, either way, beyond
    MAX_SPEEDUP. Such a row was timed while something else ran,
    and is reported as contended rather than as a result."""
    flags = []
    for row in rows:
        reasons = []
        times = {k: v for k, v in row.items() if k == "copy" or k.endswith(
            ("_forward", "_eval", "_backward"))}
        bad = sorted(k for k, v in times.items()
                     if not isinstance(v, (int, float)) or not 0.0 < v < float("inf"))
        if bad:
            reasons.append("time not positive and finite: " + ", ".join(bad))
        fewer = [r["copy"] for r in rows if r["case"] == row["case"]
                 and r["threads"] < row["threads"] and r.get("copy", 0) > 0]
        if fewer and "copy" not in bad and row["MB"] * 1e6 / 2 >= CONTENTION_MIN_BYTES \
                and row["copy"] > COPY_SLOWDOWN_LIMIT * min(fewer):
            reasons.append(f"copy {row['copy'] / min(fewer):.1f}x slower on {row['threads']} "
                           f"threads than on fewer")
        copy_ratios = [] if bad else [v for b in row["backends"]
                                      for k, v in ratios(row, b).items() if "copy" in k]
        worst = max(copy_ratios, key=lambda v: max(v, 1 / v), default=1.0)
        if not 1 / MAX_COPY_RATIO <= worst <= MAX_COPY_RATIO:
            reasons.append(f"fastbn {_factor(worst)}x the copy's time")
        for kind, (limit, name) in MAX_SPEEDUP.items():
            speedups = [] if bad else [v for b in row["backends"]
                                       for k, v in ratios(row, b).items() if k.startswith(kind)]
            worst = max(speedups, key=lambda v: max(v, 1 / v), default=1.0)
            if not 1 / limit <= worst <= limit:
                reasons.append(f"speedup over {name} {_factor(worst)}x")
        flags.append(reasons)
    return flags


def _factor(value):
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def require_matplotlib():
    """matplotlib, checked before a run whose figure needs it; SystemExit naming the extra."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('python -m fastbn.bench: --plot needs matplotlib, which is not '
                         'installed; install the bench extra (from a clone of fastbn: '
                         'python3 -m pip install ".[bench]") or matplotlib itself, or drop '
                         '--plot') from None


def figure_title(rows, env):
    """Two lines: what ran (fastbn version, backends, thread counts) and where and when."""
    backends = sorted({b for r in rows for b in r["backends"]})
    threads = sorted({r["threads"] for r in rows})
    return (f"fastbn {env.get('fastbn', '?')}, backends {', '.join(backends)}, "
            f"{'/'.join(map(str, threads))} thread(s); numba {env.get('numba', '?')}"
            f"{' [' + env['threading_layer'] + ']' if env.get('threading_layer') else ''}, "
            f"torch {env.get('torch', 'absent')}\n"
            f"{env.get('cpu', '?')}, {env.get('cpus', '?')} CPUs; "
            f"{env.get('date', '?')}; medians of interleaved rounds, ratios within this run")


def plot(rows, path, env=None):
    """Bar charts, on log axes with bars from 1, of each (row, backend): time over the copy's
    (lower is better, 1 is the bandwidth floor) and, where PyTorch was timed, speedup over it
    (higher is better). Contended rows (:func:`contention`) get a label in place of bars.
    Returns the matplotlib Figure (also saved to ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    env = environment() if env is None else env
    flags = contention(rows)
    groups = [(r, b, reasons) for r, reasons in zip(rows, flags) for b in r["backends"]]
    labels = [f"{r['case']}\n{r['threads']} thr {b}" for r, b, _ in groups]
    panels = [("time / copy time (log; 1 = bandwidth floor, lower is better)",
               [("fwd/copy", "forward"), ("eval/copy", "eval"), ("bwd/(1.5copy)", "backward")])]
    if any("torch_forward" in r for r, _, reasons in groups if not reasons):
        panels.append(("speedup over PyTorch (log; above 1: fastbn faster)",
                       [("torch/forward", "forward"), ("torch/eval", "eval"),
                        ("torch/backward", "backward")]))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(8.0, 1.3 * len(groups) + 2), 3.6 * len(panels) + 1))
    where = np.arange(len(groups))
    for ax, (ylabel, keys) in zip(axes[:, 0], panels):
        width = 0.8 / len(keys)
        shown = []
        for i, (key, label) in enumerate(keys):
            values = [np.nan if reasons else ratios(r, b).get(key, np.nan)
                      for r, b, reasons in groups]
            offsets = where + (i - (len(keys) - 1) / 2) * width
            # bars from 1 up or down: a 2x lead and a 2x lag look the same size
            bars = ax.bar(offsets, np.asarray(values) - 1.0, width, bottom=1.0, label=label,
                          color=f"C{i}")
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.3g}" for v in values],
                         fontsize=6, padding=1)
            shown += [v for v in values if not np.isnan(v)]
        ax.set_yscale("log")
        ax.set_ylim(min(shown + [1 / 1.2]) / 1.4, max(shown + [1.2]) * 1.4)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="k", lw=0.8)
        for j, (_, _, reasons) in enumerate(groups):
            if reasons:
                ax.axvspan(j - 0.45, j + 0.45, color="0.92", zorder=0)
                ax.text(j, 0.5, "contended: not a result", transform=ax.get_xaxis_transform(),
                        ha="center", va="center", fontsize=7, color="C3", rotation=90,
                        bbox=dict(facecolor="0.92", edgecolor="none"))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks(where, labels, fontsize=7)
        for tick, (_, _, reasons) in zip(ax.get_xticklabels(), groups):
            if reasons:
                tick.set_color("C3")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(figure_title(rows, env), fontsize=8)
    notes = [f"{r['case']}, {r['threads']} thread(s): {'; '.join(reasons)}"
             for r, reasons in zip(rows, flags) if reasons]
    if len(notes) > 6:
        notes[5:] = [f"and {len(notes) - 5} more rows (see the table)"]
    if notes:
        notes.insert(0, "Contended rows (implausible figures, probably timed while another "
                        "process used the CPUs), not plotted:")
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, color="C3", va="bottom")
    fig.tight_layout(rect=(0, (0.11 * len(notes) + 0.05) / fig.get_figheight() if notes else 0,
                           1, 1))
    fig.savefig(path, dpi=110)
    return fig


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
