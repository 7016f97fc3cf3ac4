"""The crossover scan of ``python -m fastbn.bench --crossover``: each kernel on one thread and on
the team, over sizes from 16 KiB up, and where the team starts to win (what
:data:`fastbn._backends.PARALLEL_MIN_BYTES` is set from)."""
import numpy as np

from .bench import Case, Workload, interleaved_medians


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
