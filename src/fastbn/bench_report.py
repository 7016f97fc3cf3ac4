"""What ``python -m fastbn.bench`` reports around its timings: the ratios and the table, the
environment it ran in, the check that flags rows another process disturbed, and the figure
(``--plot``)."""
import os
import platform

import numpy as np

from .bench import _torch_available


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
