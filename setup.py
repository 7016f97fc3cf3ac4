"""Build script. Everything declarative lives in pyproject.toml; this file adds the optional
Cython/OpenMP backend, ``fastbn._cy_kernels``.

The extension is optional in every sense: without Cython, NumPy headers, a C compiler or OpenMP,
installation still succeeds, prints one warning line, and fastbn runs on Numba. Environment:

- ``FASTBN_NO_CYTHON=1``: do not try to build it;
- ``FASTBN_REQUIRE_CYTHON=1``: a failed build is an error (CI sets it, so that a broken
  extension shows up red instead of silently falling back);
- ``FASTBN_CFLAGS``: extra compiler flags, e.g. ``-march=native`` for a build that will only
  run on this machine (the default is the compiler's portable baseline).

The outcome (built, or why not) is written into the package as ``fastbn/_build_info.json``,
which ``python -m fastbn`` reports: pip hides the build's warnings. A failed build removes the
extension it would have replaced, so that a stale one from an earlier build is never packaged.
"""
import glob
import importlib.machinery
import json
import os
import shlex
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

WARNING = "fastbn: the optional Cython/OpenMP backend was not built ({}); fastbn will use Numba."
BUILD_INFO = "_build_info.json"
#: What the build did, for fastbn/_build_info.json.
OUTCOME = {"cython": "not built", "reason": "no extension was configured"}


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(reason):
    OUTCOME.update(cython="not built", reason=reason)
    if _flag("FASTBN_REQUIRE_CYTHON"):
        raise RuntimeError(WARNING.format(reason) + " FASTBN_REQUIRE_CYTHON is set.")
    print("WARNING: " + WARNING.format(reason), file=sys.stderr)


def _write_build_info(package_dir):
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_INFO), "w") as f:
        json.dump(OUTCOME, f, indent=1)


class BuildPy(build_py):
    """build_py that records the build's outcome, and removes compiled extensions left in the
    build folder by an earlier build when this one builds none."""

    def run(self):
        super().run()
        package_dir = os.path.join(self.build_lib, "fastbn")
        if not self.distribution.ext_modules:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                for stale in glob.glob(os.path.join(package_dir, "_cy_*" + suffix)):
                    os.remove(stale)
        _write_build_info(package_dir)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed extension build into a warning, with OpenMP flags for
    the compiler at hand."""

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/openmp", "/fp:precise"]
            ext.extra_link_args = []
        else:
            # -ffp-contract=off: no fused multiply-add either, so that the normalized value
            # is computed as written, identically in forward and in the ReLU backward.
            # -fno-math-errno: sqrt need not set errno (nothing reads it), so the per-feature
            # loops that take square roots vectorize; it changes no value.
            # -fno-trapping-math: nothing here reads floating-point exception flags, so GCC may
            # compute both sides of a select (the ReLU masks) and vectorize those loops; it
            # changes no value. Without it the ReLU backward ran scalar, branching on a
            # random mask: 6.3 ms against 0.72 ms (float32 NCHW 16x64x28x28, one thread).
            ext.extra_compile_args = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
                                      "-fno-trapping-math"]
            ext.extra_link_args = ["-fopenmp"]
        ext.extra_compile_args += shlex.split(os.environ.get("FASTBN_CFLAGS", ""))
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler, no OpenMP, ...: the package still installs
            target = self.get_ext_fullpath(ext.name)
            if os.path.exists(target):  # an earlier build's: it must not be packaged
                os.remove(target)
            _warn(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            OUTCOME.update(cython="built", reason=None, compiler=self.compiler.compiler_type,
                           flags=ext.extra_compile_args)

    def run(self):
        super().run()
        _write_build_info(os.path.dirname(self.get_ext_fullpath("fastbn._cy_kernels")))


#: The files _cy_kernels.pyx includes (Cython and C): a change to one rebuilds the extension,
#: and the sdist carries them all.
CYTHON_INCLUDES = ("_cy_families.pxi", "_cy_entries.pxi", "_cy_phases.pxi", "_cy_half.pxi",
                   "_cy_call.pxi", "_cy_call_checks.pxi", "_cy_call_torch.pxi", "_cy_runs.h",
                   "_cy_runs_t.h", "_cy_rows_t.h", "_cy_finish_t.h", "_cy_half.h")


def extensions():
    if _flag("FASTBN_NO_CYTHON"):
        OUTCOME.update(cython="not built", reason="FASTBN_NO_CYTHON is set")
        return []
    try:
        import numpy
        from Cython.Build import cythonize
    except ImportError as exc:
        _warn(f"cannot import {exc.name}")
        return []
    ext = Extension(
        "fastbn._cy_kernels",
        ["src/fastbn/_cy_kernels.pyx"],
        include_dirs=[numpy.get_include(), "src/fastbn"],
        depends=[f"src/fastbn/{name}" for name in CYTHON_INCLUDES],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    OUTCOME.update(cython="not built", reason="the extension build did not run")
    try:
        return cythonize([ext], quiet=True)
    except Exception as exc:
        _warn(f"Cython failed: {exc}")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPy})
