"""The small-call table of ``python -m fastbn.bench``: what a call costs where the arithmetic is
small, against PyTorch's CPU kernel and modules in the same interleaved rounds.

Two tables:

- per call: fastbn's forward, eval and backward (with ``out=``, as the main table) on a (2, 2)
  array (the per-call overhead: nearly no arithmetic), NC 32x512 and NC 256x2048; beside them
  the same calls through fastbn's Python path (validation and dispatch in Python, as before the
  compiled call path), and PyTorch's aten kernel writing into preallocated outputs;
- per layer: ``fastbn.BatchNorm`` and ``fastbn.torch.BatchNorm1d`` against
  ``torch.nn.BatchNorm1d``, a training step (forward and the three gradients) and an eval
  forward, on small batches.

Ratios are PyTorch's time over fastbn's: 1.00x or more means fastbn is no slower.
"""
import numpy as np

from .bench import Case, Workload, _torch_available, interleaved_medians

#: (2, 2): the per-call overhead; NC 32x512 and 256x2048: tabular MLP batches.
SMALL_CASES = (
    Case("NC 2x2", (2, 2)),
    Case("NC 32x512", (32, 512)),
    Case("NC 256x2048", (256, 2048)),
)
LAYER_CASES = (
    Case("NC 32x512", (32, 512)),
    Case("NC 256x2048", (256, 2048)),
)
OPS = ("forward", "eval", "backward")


def python_path(work):
    """The calls of ``Workload.fastbn`` through the Python path (fastbn._validate and
    fastbn._dispatch), skipping the compiled call path."""
    from . import _dispatch
    from ._validate import backward_args, forward_args

    x, y, dx, dy, g, b, axis = work.x, work.y, work.dx, work.dy, work.gamma, work.beta, \
        work.case.axis
    _, mean, invstd = _dispatch.forward(forward_args(x, g, b, axis, True, None, None, 0.1, 1e-5,
                                                     None, None, None))
    rm, rv = work.rm, work.rv
    return {
        "forward": lambda: _dispatch.forward(forward_args(x, g, b, axis, True, rm, rv, 0.1,
                                                          1e-5, None, y, None)),
        "eval": lambda: _dispatch.forward(forward_args(x, g, b, axis, False, rm, rv, 0.1, 1e-5,
                                                       None, y, None)),
        "backward": lambda: _dispatch.backward(backward_args(dy, x, mean, invstd, g, b, axis,
                                                             True, None, dx, None)),
    }


def layer_calls(work, with_torch):
    """{contender_mode: callable}: a training step (forward, then dx, dgamma and dbeta) and an
    eval forward of each layer on the workload's x and dy."""
    import fastbn

    C = work.case.shape[work.case.axis]
    x, dy = work.x, work.dy
    fns = {}
    bn = fastbn.BatchNorm(C, dtype=x.dtype)
    bn_eval = fastbn.BatchNorm(C, dtype=x.dtype)
    bn_eval.train(False)

    def fastbn_train():
        bn.forward(x)
        bn.backward(dy)

    fns["fastbn_train"] = fastbn_train
    fns["fastbn_eval"] = lambda: bn_eval.forward(x)
    if with_torch:
        import torch

        import fastbn.torch as fbt

        xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
        for name, cls in (("fbtorch", fbt.BatchNorm1d), ("torch", torch.nn.BatchNorm1d)):
            train, ev = cls(C), cls(C).eval()

            def step(m=train):
                torch.autograd.grad(m(xt), (xt, m.weight, m.bias), dyt)

            def infer(m=ev):
                with torch.no_grad():
                    m(xt)

            fns[name + "_train"], fns[name + "_eval"] = step, infer
    return fns


def small_calls(thread_counts, samples, with_torch=True, log=None):
    """Rows of both tables: {"table": "call" or "layer", "case", "threads", and seconds per call
    under "<contender>_<op>"}."""
    import fastbn

    with_torch = with_torch and _torch_available()
    if with_torch:
        import torch

        torch_threads = torch.get_num_threads()
    before = fastbn.get_num_threads()
    rows = []
    try:
        for table, cases in (("call", SMALL_CASES), ("layer", LAYER_CASES)):
            for case in cases:
                work = Workload(case)
                for threads in thread_counts:
                    fastbn.set_num_threads(threads)
                    if with_torch:
                        torch.set_num_threads(threads)
                    if table == "call":
                        fns = {f"fastbn_{op}": fn for op, fn in work.fastbn(backend=None).items()}
                        fns.update({f"python_{op}": fn for op, fn in python_path(work).items()})
                        if with_torch:
                            fns.update({f"torch_{op}": fn for op, fn in work.torch().items()})
                    else:
                        fns = layer_calls(work, with_torch)
                    row = {"table": table, "case": case.name, "threads": threads}
                    row.update(interleaved_medians(fns, samples))
                    rows.append(row)
                    if log:
                        log(f"  timed small calls: {table} {case.name} on {threads} thread(s)")
    finally:
        fastbn.set_num_threads(before)
        if with_torch:
            torch.set_num_threads(torch_threads)
    return rows


def _us(row, key):
    return f"{row[key] * 1e6:.2f}" if key in row else "-"


def _vs(row, key, base):
    return f"{row[base] / row[key]:.2f}x" if key in row and base in row else "-"


def format_small_calls(rows):
    """Two Markdown tables: microseconds per call, and PyTorch's time over fastbn's."""
    lines = ["| case | thr | op | fastbn us | Python path us | torch aten us | torch / fastbn "
             "| Python path / fastbn |", "|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["table"] == "call"):
        for op in OPS:
            lines.append(f"| {row['case']} | {row['threads']} | {op} | "
                         f"{_us(row, 'fastbn_' + op)} | {_us(row, 'python_' + op)} | "
                         f"{_us(row, 'torch_' + op)} | "
                         f"{_vs(row, 'fastbn_' + op, 'torch_' + op)} | "
                         f"{_vs(row, 'fastbn_' + op, 'python_' + op)} |")
    lines += ["", "| layer case | thr | mode | fastbn.BatchNorm us | fastbn.torch.BatchNorm1d us "
              "| torch.nn.BatchNorm1d us | torch / fastbn | torch / fastbn.torch |",
              "|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["table"] == "layer"):
        for mode in ("train", "eval"):
            lines.append(f"| {row['case']} | {row['threads']} | {mode} | "
                         f"{_us(row, 'fastbn_' + mode)} | {_us(row, 'fbtorch_' + mode)} | "
                         f"{_us(row, 'torch_' + mode)} | "
                         f"{_vs(row, 'fastbn_' + mode, 'torch_' + mode)} | "
                         f"{_vs(row, 'fbtorch_' + mode, 'torch_' + mode)} |")
    return "\n".join(lines)
