"""The bench's report on synthetic rows (nothing is timed): implausible rows flagged as
contended in the table and the figure, the figure's axes and title, and --plot failing at
once without matplotlib."""
import sys

import numpy as np
import pytest

from fastbn import bench, bench_crossover, bench_report

pytestmark = pytest.mark.backends("numba")  # the report does not depend on the backend

OPS = {"forward": 1.3, "eval": 1.0, "backward": 1.6}


def row(case, threads, copy, *, torch=2.0, reference=30.0, mb=10.0,
        backends=("numba", "cython")):
    """A row as bench.run makes it: fastbn at 1.0-1.6x the copy, PyTorch ``torch`` times
    slower than fastbn, the reference ``reference`` times slower."""
    r = {"case": case, "shape": [1], "axis": 1, "dtype": "float32", "MB": mb,
         "threads": threads, "backends": list(backends), "copy": copy}
    for op, factor in OPS.items():
        for b in backends:
            r[f"{b}_{op}"] = copy * factor
        r[f"torch_{op}"] = copy * factor * torch
    r["reference_forward"] = copy * OPS["forward"] * reference
    r["reference_backward"] = copy * OPS["backward"] * reference
    return r


def plausible_rows():
    return [row("NCHW", 1, 4e-3), row("NCHW", 2, 2.1e-3, torch=0.7),
            row("NC small", 1, 1e-5, mb=0.13), row("NC small", 2, 3e-5, mb=0.13)]


def test_plausible_rows_are_not_flagged():
    """Including a small case whose copy loses on 2 threads: waking the team costs more
    than copying 64 KiB, so that is no sign of contention."""
    assert bench_report.contention(plausible_rows()) == [[], [], [], []]


def test_copy_slower_on_more_threads_flags_that_row_only():
    rows = [row("NHWC", 1, 4e-3), row("NHWC", 2, 4e-3 * 1.5), row("NHWC", 4, 4e-3 * 1.2)]
    flags = bench_report.contention(rows)
    assert flags[0] == [] and flags[2] == []  # 1.2x is within the margin
    assert len(flags[1]) == 1 and "copy 1.5x slower on 2 threads" in flags[1][0]


@pytest.mark.parametrize("torch,reference,what", [
    (3000.0, 30.0, "speedup over PyTorch 3000x"),
    (1 / 500, 30.0, "speedup over PyTorch 0.002x"),
    (2.0, 5000.0, "speedup over the reference 5000x"),
])
def test_implausible_speedups_are_flagged(torch, reference, what):
    rows = [row("NCHW", 1, 4e-3, torch=torch, reference=reference), row("NCHW", 2, 2e-3)]
    flags = bench_report.contention(rows)
    assert flags[0] == [what] and flags[1] == []


@pytest.mark.parametrize("fastbn_time,what", [(80e-6, "fastbn 80x the copy's time"),
                                               (1e-8, "fastbn 0.01x the copy's time")])
def test_fastbn_far_from_the_copy_is_flagged(fastbn_time, what):
    row_ = row("NC small", 1, 1e-6, mb=0.13)
    row_["cython_eval"] = fastbn_time
    assert bench_report.contention([row_])[0][0] == what  # (the speedup over PyTorch may follow)


@pytest.mark.parametrize("value", [-1e-3, 0.0, float("nan"), float("inf")])
def test_times_that_are_not_positive_and_finite_are_flagged(value):
    bad = row("NCHW", 1, 4e-3)
    bad["numba_eval"] = value
    assert bench_report.contention([bad]) == [["time not positive and finite: numba_eval"]]


def test_table_marks_contended_rows_and_says_why():
    rows = plausible_rows() + [row("NHWC", 1, 4e-3), row("NHWC", 2, 9e-3)]
    lines = bench_report.format_table(rows).splitlines()
    table = [line for line in lines if line.startswith("| ")][1:]
    assert len(table) == 2 * len(rows)  # one line per row and backend
    assert [line.endswith("| **contended** |") for line in table] == [False] * 10 + [True] * 2
    assert all(line.endswith("| ok |") for line in table[:-2])
    assert lines[-1] == "- NHWC, 2 thread(s): contended, copy 2.2x slower on 2 threads than " \
                        "on fewer"


def test_figure_has_log_axes_the_environment_and_no_contended_bars(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = plausible_rows() + [row("NHWC", 1, 4e-3, torch=3000.0)]
    env = {"fastbn": "9.9.9", "date": "2031-01-02 03:04 UTC", "cpu": "Example CPU 3000",
           "cpus": 64, "numba": "0.61.0", "threading_layer": "tbb", "torch": "2.13.0"}
    path = tmp_path / "bench.png"
    fig = bench_report.plot(rows, path, env)
    try:
        assert path.stat().st_size > 10_000
        title = fig._suptitle.get_text()
        for part in ("fastbn 9.9.9", "2031-01-02", "Example CPU 3000", "64 CPUs",
                     "backends cython, numba", "1/2 thread(s)", "[tbb]"):
            assert part in title, (part, title)
        copy_axes, torch_axes = fig.axes
        groups = 2 * len(rows)  # (row, backend) pairs; the last two are contended
        for ax in (copy_axes, torch_axes):
            assert ax.get_yscale() == "log"
            tops = np.array([bar.get_y() + bar.get_height() for bars in ax.containers
                             for bar in bars])
            assert len(tops) == 3 * groups
            assert np.isnan(tops[-2:]).all() and np.isnan(tops[-2 - groups:-groups]).all()
            plotted = tops[~np.isnan(tops)]
            assert len(plotted) == 3 * (groups - 2)
            low, high = ax.get_ylim()
            assert low <= plotted.min() and plotted.max() <= high
            assert high / low < 50  # the 3000x of the contended row sets no scale
        for ax in (copy_axes, torch_axes):  # a label on each contended group
            labels = [t.get_text() for t in ax.texts if "contended" in t.get_text()]
            assert labels == ["contended: not a result"] * 2
        footnote = "\n".join(t.get_text() for t in fig.texts)
        assert "NHWC, 1 thread(s): speedup over PyTorch 3000x" in footnote
    finally:
        plt.close(fig)


def test_plot_without_matplotlib_fails_before_timing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran although its figure cannot be drawn")

    monkeypatch.setattr(bench, "run", no_run)
    monkeypatch.setattr(bench_crossover, "crossover", no_run)
    with pytest.raises(SystemExit) as info:
        bench.main(["--quick", "--no-torch", "--plot", "out.png"])
    assert "--plot needs matplotlib" in str(info.value.code)
    assert 'python3 -m pip install ".[bench]"' in str(info.value.code)
