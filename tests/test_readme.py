"""The README's examples run, and its table lists exactly the registry's optimizers."""

from __future__ import annotations

import pathlib
import re

import pytest

from adaopt import REGISTRY, OptimizerSpec

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})


def test_readme_table_lists_the_registry() -> None:
    rows = re.findall(r"^\| `(\w+)` \|", README.read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(REGISTRY)


@pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
def test_readme_table_names_every_reference(spec: OptimizerSpec) -> None:
    row = re.search(rf"^\| `{spec.name}` \|.*$", README.read_text(), flags=re.MULTILINE)
    assert row is not None
    for ref in spec.references:
        expected = "the paper" if "paper" in ref.note else ref.name
        assert expected in row.group(0), f"{expected} missing from the README row of {spec.name}"
