"""The README's Python examples run as printed, each on its own (a newcomer copies one block,
not the page): every ```python block but the MPI one, which runs under mpiexec and is
exercised by tests/test_sync_processes.py."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
#: What a block needs beyond fastbn and NumPy, found from its imports.
NEEDS = {"torch": "torch", "jax": "jax", "flax": "flax", "keras": "keras"}


def _needs(block):
    return [module for word, module in NEEDS.items()
            if re.search(rf"^import {word}\b|^import fastbn\.{word}\b", block, flags=re.M)]


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5
    assert sum("mpiexec" in b for b in BLOCKS) == 1


@pytest.mark.parametrize("block", [b for b in BLOCKS if "mpiexec" not in b],
                         ids=lambda b: b.strip().splitlines()[0][:40])
def test_readme_example_runs_on_its_own(block):
    for module in _needs(block):
        pytest.importorskip(module)
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
