"""Numba's threading layer for fastbn's kernels: Intel TBB wherever pip put it, and never GNU
OpenMP by accident.

TBB is the one Numba threading layer that is both thread-safe (several Python threads may
launch kernels at once) and fork-safe (a child forked after the parent ran kernels can run
them). GNU OpenMP is neither: a forked child aborts ("fork() called from a process already
using GNU OpenMP") and every calling thread gets a team of its own.

The ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib`` (a venv's, the user base's, a conda
environment's), where the dynamic loader does not look when Numba's ``tbbpool`` extension
asks for it: in a plain venv ``import numba.np.ufunc.tbbpool`` fails although TBB is
installed, and Numba then silently takes GNU OpenMP. So before Numba looks, :func:`choose`
loads the library by its full path, found from the installed ``tbb`` distribution's own file
list, with ``RTLD_GLOBAL``; the loader then resolves tbbpool's dependency to that copy.

Where TBB still cannot load, fastbn asks Numba for ``workqueue`` (never ``omp``): its parallel
launches are taken in turn behind a lock (``workqueue`` is not thread-safe), and a process
forked after fastbn was imported runs the serial kernels. A :class:`ThreadingLayerWarning`
says so once, and ``python -m fastbn`` reports the layer and why. A ``NUMBA_THREADING_LAYER``
set by the user always wins.
"""
import ctypes
import importlib.metadata
import os
import site
import sys
import warnings
from typing import NamedTuple, Optional

from . import _backends

#: The TBB runtime's file name, by platform (Numba's tbbpool links to this soname).
TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}
#: Platforms where fastbn depends on the ``tbb`` wheel (pyproject.toml's marker).
TBB_MACHINES = ("x86_64", "AMD64")


class ThreadingLayerWarning(RuntimeWarning):
    """Numba's kernels run on a threading layer other than TBB (see :mod:`fastbn._numba_layer`)."""


class Choice(NamedTuple):
    """The threading layer asked of Numba, why, and the TBB library loaded (if any)."""

    layer: str
    reason: str
    tbb_library: Optional[str]


#: Set by :func:`choose` (once, when the Numba kernels are first imported).
choice: Optional[Choice] = None


def _library_name():
    for prefix, name in TBB_LIBRARY.items():
        if sys.platform.startswith(prefix):
            return name
    return None


def tbb_candidates():
    """Paths where the TBB runtime may be, best first: the files of the installed ``tbb``
    distribution, then the ``lib`` folders of this interpreter's prefixes, the user base and
    an active conda environment."""
    name = _library_name()
    if name is None:
        return []
    found = []
    try:
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if os.path.basename(str(file)) == name:
                found.append(os.path.realpath(dist.locate_file(file)))
    libdir = "Library/bin" if sys.platform == "win32" else "lib"
    prefixes = [sys.prefix, sys.base_prefix, site.getuserbase(), os.environ.get("CONDA_PREFIX")]
    for prefix in prefixes:
        if prefix:
            found.append(os.path.join(prefix, libdir, name))
    unique = []
    for path in found:
        if path not in unique and os.path.exists(path):
            unique.append(path)
    return unique


def preload_tbb():
    """Load the TBB runtime by its full path, globally. Returns (path loaded or None, why not)."""
    candidates = tbb_candidates()
    if not candidates:
        try:
            importlib.metadata.distribution("tbb")
        except importlib.metadata.PackageNotFoundError:
            return None, "the tbb package is not installed"
        return None, f"the tbb package has no {_library_name()} for this platform"
    errors = []
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=mode)
            return path, None
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors)


def choose(numba_config, environ=os.environ, warn=True):
    """Set ``numba_config.THREADING_LAYER`` for fastbn (before Numba's first parallel launch)
    and return the :class:`Choice`. Called once, by :mod:`fastbn._numba_jit`."""
    global choice
    path, why_not = preload_tbb()
    user = environ.get("NUMBA_THREADING_LAYER")
    if user:
        choice = Choice(user, "NUMBA_THREADING_LAYER is set", path)
        return choice
    if path is not None:
        try:
            from numba.np.ufunc import tbbpool  # noqa: F401  (the import is the probe)
        except ImportError as exc:
            why_not = f"TBB loaded from {path}, but Numba's tbbpool did not: {exc}"
        else:
            numba_config.THREADING_LAYER = "tbb"
            choice = Choice("tbb", f"TBB loaded from {path}", path)
            return choice
    numba_config.THREADING_LAYER = "workqueue"
    reason = (f"TBB could not be loaded ({why_not}); workqueue instead of GNU OpenMP, which "
              "is not fork-safe: parallel launches take turns, and a forked child runs the "
              "serial kernels")
    choice = Choice("workqueue", reason, None)
    if warn and _tbb_expected():
        warnings.warn(f"fastbn: Numba's kernels use the workqueue threading layer: {reason}. "
                      "Run 'python -m fastbn' for details; 'pip install tbb' usually fixes it.",
                      ThreadingLayerWarning, stacklevel=3)
    return choice


def _tbb_expected():
    """Whether TBB should have loaded: its wheel is a dependency here, or it is installed."""
    import platform

    if platform.machine() in TBB_MACHINES:
        return True
    try:
        importlib.metadata.distribution("tbb")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def serial_only():
    """Whether parallel Numba kernels must not run in this process: a child forked after
    fastbn was imported (the flag fastbn._backends keeps for the Cython kernels too), on a
    layer that is not known to be fork-safe (anything but TBB)."""
    return _backends._forked_child and (choice is None or choice.layer != "tbb")
