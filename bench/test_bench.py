"""pytest-benchmark suites, generated from the case table in fastbn.bench (one source of cases).

Run: ``python -m pytest bench/ --benchmark-enable`` (add ``--benchmark-json=out.json`` to keep
the figures). Groups are per case and operation, so each group's table puts fastbn beside the
memory copy of the same bytes, PyTorch's kernel and the NumPy reference.
"""
import pytest

from fastbn.bench import CASES, Workload, compiled_backends

CASE_IDS = [c.name.replace(" ", "-") for c in CASES]


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def work(request):
    return Workload(request.param)


def _run(benchmark, work, op, fn):
    benchmark.group = f"{work.case.name} {op}"
    fn()  # warm-up (compilation, first touch) outside the timed rounds
    benchmark(fn)


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("op", ["forward", "eval", "backward"])
def test_fastbn(benchmark, work, op, backend):
    _run(benchmark, work, op, work.fastbn(backend=backend)[op])


@pytest.mark.parametrize("op", ["forward", "eval", "backward"])
def test_copy_yardstick(benchmark, work, op):
    _run(benchmark, work, op, work.copy())


@pytest.mark.parametrize("op", ["forward", "eval", "backward"])
def test_torch(benchmark, work, op):
    pytest.importorskip("torch")
    _run(benchmark, work, op, work.torch()[op])


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_reference(benchmark, work, op):
    benchmark.group = f"{work.case.name} {op}"
    benchmark.pedantic(work.fastbn(backend="reference")[op], rounds=3, warmup_rounds=1)
