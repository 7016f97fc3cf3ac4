"""``python -m fastbn``: what fastbn runs on here, and why (in the manner of ``numba -s`` and
``torch.utils.collect_env``). Paste its output into a bug report.

It reports fastbn's version and location; each backend and, for one that is missing, why (the
build's own reason, recorded at install time in ``fastbn/_build_info.json``); Numba's threading
layer and why it was chosen; the thread count and its sources; Numba's on-disk cache folder and
whether it is warm; the CPU, its cores and caches; and the versions of the optional frameworks.
"""
import importlib.metadata
import json
import os
import platform
import sys

from . import __version__, _backends
from ._plans import INNER_MAX_RUN

#: Written by setup.py at build time (see setup.py's docstring).
BUILD_INFO = os.path.join(os.path.dirname(__file__), "_build_info.json")
OPTIONAL = ("numpy", "numba", "llvmlite", "tbb", "Cython", "ml_dtypes", "torch", "mpi4py",
            "mpich", "jax", "jaxlib", "flax", "keras")
#: What a missing package's absence means where it is not obvious: Cython compiles the
#: extension during the install and is not needed to run it.
_WHY_OPTIONAL = {"Cython": " (only the install's build of the Cython backend uses it)"}


def build_info():
    """What setup.py recorded: {"cython": "built" or "not built", "reason": ..., ...}, or None
    where fastbn runs from a source tree that was never built."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cython_status():
    """("available", detail) or ("missing", why) for the Cython backend."""
    info = build_info()
    if _backends._import_cython() is not None:
        flags = " ".join(info.get("flags", [])) if info else ""
        return "available", f"compiled extension loaded{' (flags: ' + flags + ')' if flags else ''}"
    try:
        from . import _cy_kernels  # noqa: F401  (for the import error's own words)
    except ImportError as exc:
        error = str(exc)
    else:  # pragma: no cover - loaded after all
        error = "loaded on a second try"
    if info is not None and info.get("cython") != "built":
        return "missing", f"not built at install time: {info.get('reason')}"
    return "missing", f"the extension does not load: {error}"


def numba_status():
    """(status, detail, threading-layer line, cache line) for the Numba backend."""
    try:
        import numba
    except ImportError as exc:
        return "missing", f"Numba is not installed ({exc})", "-", "-"
    from . import _numba_kernels as K
    from . import _numba_layer

    # one tiny parallel launch, so that Numba reports the layer it really started
    import numpy as np

    x = np.ones((2, 1, INNER_MAX_RUN))
    K.forward_train_outer(2, x, np.empty_like(x), np.ones(1), np.zeros(1), 1e-5,
                          np.empty((3, 1)), np.empty((4, 1)), False, 1)
    try:
        active = numba.threading_layer()
    except ValueError:
        active = "none started"
    choice = _numba_layer.choice
    layer = f"{active} ({choice.reason})" if choice else active
    cached = total = 0
    folder = None
    for kern in vars(K).values():
        if isinstance(kern, K._Kernel):
            for twin in (kern.parallel, kern.serial):
                cache = getattr(twin, "_cache", None)
                if cache is None or not hasattr(cache, "_cache_file"):
                    continue
                folder = cache.cache_path
                total += 1
                cached += os.path.exists(cache._cache_file._index_path)
    warmth = "warm" if total and cached == total else ("cold" if not cached else "partly warm")
    cache_line = f"{folder} ({warmth}: {cached} of {total} kernels compiled and cached)"
    return "available", f"Numba {numba.__version__}", layer, cache_line


def cpu_lines():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    caches = []
    for index in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            with open(base + "/level") as f:
                level = f.read().strip()
            with open(base + "/type") as f:
                kind = f.read().strip()
            with open(base + "/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    return [f"CPU: {model}", f"CPUs: {os.cpu_count()} online, {usable} usable by this process",
            f"caches (cpu0): {', '.join(caches) or 'unknown'}; last level used by fastbn: "
            f"{_backends.last_level_cache_bytes() // 2**20} MiB"]


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report():
    """The report, as text."""
    lines = [f"fastbn {__version__} at {os.path.dirname(__file__)}",
             f"Python {platform.python_version()} ({sys.executable}) on "
             f"{platform.platform()}", ""]
    cy, cy_detail = cython_status()
    nb, nb_detail, layer, cache = numba_status()
    available = _backends.available_backends()
    lines += ["Backends (default first): " + ", ".join(available),
              f"  cython: {cy}: {cy_detail}",
              f"  numba: {nb}: {nb_detail}",
              "  reference: available: plain NumPy, float64 inside",
              f"  default: {_backends.default_backend()}"
              + (f" (FASTBN_BACKEND={os.environ[_backends.BACKEND_ENV]})"
                 if os.environ.get(_backends.BACKEND_ENV) else ""), ""]
    env_threads = os.environ.get(_backends.THREADS_ENV)
    lines += [f"Numba threading layer: {layer}",
              f"Numba cache: {cache}",
              f"Threads: {_backends.get_num_threads()} (limit {_backends.thread_limit()}"
              + (f"; {_backends.THREADS_ENV}={env_threads}" if env_threads else "")
              + (f"; NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}"
                 if os.environ.get("NUMBA_NUM_THREADS") else "") + ")",
              ""]
    lines += cpu_lines() + [""]
    lines.append("Packages: " + ", ".join(
        f"{name} {_version(name)}" for name in OPTIONAL if _version(name)))
    missing = [name + _WHY_OPTIONAL.get(name, "") for name in OPTIONAL if not _version(name)]
    if missing:
        lines.append("Not installed: " + ", ".join(missing))
    return "\n".join(lines)


def main():
    print(report())
