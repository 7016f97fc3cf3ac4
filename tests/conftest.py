"""Shared fixtures: the awkward-layout generator, tolerances, and backend parametrization."""
import numpy as np
import pytest

import fastbn

DTYPES = [np.float32, np.float64]


# (name, logical shape, feature axis, how the array is laid out in memory)
LAYOUTS = [
    ("NC", (17, 5), 1, "C"),
    ("NC-axis0", (5, 17), 0, "C"),
    ("NC-fortran", (17, 5), 1, "F"),
    ("NCL", (4, 3, 7), 1, "C"),
    ("NCHW", (3, 4, 5, 6), 1, "C"),
    ("NCHW-fortran", (3, 4, 5, 6), 1, "F"),
    ("NCHW-channels-last-memory", (3, 4, 5, 6), 1, "NHWC"),
    ("NCHW-sliced-batch", (3, 4, 5, 6), 1, "batch::2"),
    ("NCHW-sliced-width", (3, 4, 5, 6), 1, "width::2"),
    ("NCHW-sliced-height", (3, 4, 5, 6), 1, "height::2"),  # cannot fold: copied
    ("NCHW-reversed-features", (3, 4, 5, 6), 1, "features::-1"),
    ("NCHW-broadcast-batch", (3, 4, 5, 6), 1, "broadcast"),
    ("NHWC", (3, 5, 6, 4), -1, "C"),
    ("NCDHW", (2, 3, 4, 3, 2), 1, "C"),
    ("N1HW", (4, 1, 3, 3), 1, "C"),
    ("single-sample", (1, 6, 2, 2), 1, "C"),
    ("NC-wide", (300, 96), 1, "C"),  # several row blocks in the feature-inner kernels
    ("NCHW-runs-of-64", (5, 6, 8, 8), 1, "C"),  # the shortest runs of the feature-outer family
    ("NCHW-runs-of-72-sliced", (6, 5, 8, 9), 1, "batch::2"),
    ("NCHW-large", (16, 8, 48, 48), 1, "C"),  # above the parallel threshold
    ("NHWC-large", (16, 48, 48, 8), -1, "C"),
]
LAYOUT_IDS = [layout[0] for layout in LAYOUTS]


def arrange(base, layout):
    """``base`` (C-contiguous, logical shape) rearranged in memory as ``layout`` says; the
    result has the same logical values as ``base`` where shapes agree."""
    if layout == "C":
        return base
    if layout == "F":
        return np.asfortranarray(base)
    if layout == "NHWC":
        return np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "batch::2":
        big = np.repeat(base, 2, axis=0)
        return big[::2]
    if layout == "width::2":
        big = np.repeat(base, 2, axis=3)
        return big[..., ::2]
    if layout == "height::2":
        big = np.repeat(base, 2, axis=2)
        return big[:, :, ::2, :]
    if layout == "features::-1":
        return np.ascontiguousarray(base[:, ::-1])[:, ::-1]
    if layout == "broadcast":
        return np.broadcast_to(base[:1], base.shape)
    raise ValueError(layout)


def make_x(shape, dtype, layout="C", seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    base = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    return arrange(base, layout)


def params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = (0.3 * rng.standard_normal(C)).astype(dtype)
    return gamma, beta


def tolerance(dtype, scale):
    """Absolute tolerance for a result of magnitude ``scale`` computed in ``dtype``."""
    return 32 * np.finfo(dtype).eps * max(1.0, float(scale))


def assert_close(actual, expected, dtype, what, scale=None):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = np.abs(expected).max() if expected.size else 1.0
    tol = tolerance(dtype, scale)
    err = np.abs(actual - expected)
    both_nan = np.isnan(actual) & np.isnan(expected)
    worst = float(np.where(both_nan, 0.0, err).max()) if err.size else 0.0
    assert not np.any(np.isnan(actual) != np.isnan(expected)), f"{what}: NaN pattern differs"
    assert worst <= tol, f"{what}: max error {worst:.3g} > tolerance {tol:.3g}"


#: The compiled backends built here. Every test runs once per backend: the autouse fixture
#: below sets FASTBN_BACKEND, so calls that name no backend (the layer, the torch adapter, the
#: examples, subprocesses) run on it too.
FAST_BACKENDS = [b for b in fastbn.available_backends() if b != "reference"]


def pytest_generate_tests(metafunc):
    """Parametrize every test over FAST_BACKENDS, or over those named by its
    ``@pytest.mark.backends(...)`` marker (tests of one backend's machinery)."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = [b for b in FAST_BACKENDS if marker is None or b in marker.args]
    metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """The compiled backend this run of the test is for (also made the default)."""
    monkeypatch.setenv("FASTBN_BACKEND", request.param)
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param
