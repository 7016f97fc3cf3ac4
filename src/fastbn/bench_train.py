"""Whole-step figures of ``python -m fastbn.bench``: a ResNet-style block's training step in
PyTorch with fastbn's and with PyTorch's batch norm (time and peak memory), and the cost of a
first call in a new process (``--cold-start``)."""
import os
import sys

from .bench import compiled_backends, interleaved_medians


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
