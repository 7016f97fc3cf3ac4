"""Compile fastbn's kernels into Numba's on-disk cache ahead of time.

``python -m fastbn.precompile`` runs every kernel family (feature-outer and feature-inner;
training and eval forward; backward; the split phases of fastbn.phases) for float32 and float64 on contiguous arrays, in both
their parallel and serial twins, so that later processes load machine code instead of
compiling on first call. Useful when building an image or before timing a cold start.
Strided inputs compile their own (rarer) specializations on first use.
"""
import argparse
import sys
import time

import numpy as np

# Shapes that reach each family: NCHW with long runs (outer), NC (inner). Big enough for the
# parallel twin, small enough to run in milliseconds.
_SHAPES = (((4, 8, 128, 128), 1), ((4096, 64), 1))


def _split_phases(x, axis, invstd):
    """The kernels of fastbn.phases (and so of the synchronized layers)."""
    from fastbn import phases

    stats = phases.batch_stats(x, axis=axis, backend="numba")
    for activation in (None, "relu"):
        sums = phases.backward_sums(x, x, stats.mean, invstd, None, None, axis=axis,
                                    activation=activation, backend="numba")
        phases.backward_dx(x, x, stats.mean, invstd, sums, None, None, axis=axis,
                           activation=activation, backend="numba")


def precompile(dtypes=(np.float32, np.float64), log=None):
    """Run each kernel once per dtype, family and twin; returns the seconds it took."""
    import fastbn
    from fastbn import _backends

    start = time.perf_counter()
    for parallel in (True, False):
        for dtype in dtypes:
            for shape, axis in _SHAPES:
                x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
                rm, rv = np.zeros(shape[axis], dtype), np.ones(shape[axis], dtype)
                with _backends.forced_parallel(parallel):
                    _, mean, invstd = fastbn.forward(x, axis=axis, running_mean=rm,
                                                     running_var=rv, backend="numba")
                    fastbn.forward(x, axis=axis, training=False, running_mean=rm,
                                   running_var=rv, backend="numba")
                    fastbn.backward(x, x, mean, invstd, axis=axis, backend="numba")
                    _split_phases(x, axis, invstd)
                if log:
                    log(f"  {np.dtype(dtype).name} {shape} "
                        f"{'parallel' if parallel else 'serial'}: "
                        f"{time.perf_counter() - start:.1f} s")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.precompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true")
    opts = parser.parse_args(argv)
    log = None if opts.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    seconds = precompile(log=log)
    print(f"fastbn kernels compiled or loaded from cache in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
