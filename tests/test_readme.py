"""The README's examples run, and its table lists exactly the registry's optimizers."""

from __future__ import annotations

import itertools
import pathlib
import re
from typing import Any

import pytest

from adaopt import REGISTRY, OptimizerSpec

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
# The blocks of this section build on its first one (a torch network and the same in JAX): they run
# in order, in one namespace; every other block runs on its own.
SHARED_SECTION = "Coming from PyTorch"


def _blocks(text: str) -> list[tuple[str, str]]:
    """Each ```python block with the title of the ``## `` section it sits in."""
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]*)$|^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if match.group(1) is not None:
            section = match.group(1).strip()
        else:
            blocks.append((section, match.group(2)))
    return blocks


BLOCKS = _blocks(TEXT)
ALONE = [code for section, code in BLOCKS if section != SHARED_SECTION]
SHARED = [code for section, code in BLOCKS if section == SHARED_SECTION]


def _run(code: str, name: str, namespace: dict[str, Any]) -> None:
    exec(compile(code, f"README.md[{name}]", "exec"), namespace)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) == len(re.findall(r"^```python$", TEXT, flags=re.MULTILINE))
    assert len(ALONE) >= 3
    assert len(SHARED) >= 6  # the setup and a recipe for each of the section's subsections


@pytest.mark.parametrize("index", range(len(ALONE)))
def test_readme_example_runs(index: int) -> None:
    _run(ALONE[index], f"python block {index}", {"__name__": "readme"})


def test_readme_torch_recipes_match_torch() -> None:
    """Each recipe trains the same network with torch and with adaopt and asserts that they agree."""
    namespace: dict[str, Any] = {"__name__": "readme"}
    for index, code in enumerate(SHARED):
        _run(code, f"{SHARED_SECTION}, python block {index}", namespace)
    assert callable(namespace["train_torch"]) and callable(namespace["assert_close"])


def test_readme_torch_recipes_can_fail() -> None:
    """The comparison the recipes rely on catches a wrong recipe: without the decay mask, or without
    the cycled momentum, adaopt ends elsewhere than torch."""
    namespace: dict[str, Any] = {"__name__": "readme"}
    _run(SHARED[0], "setup", namespace)
    torch, adaopt, train_torch, train_adaopt = (
        namespace[k] for k in ("torch", "adaopt", "train_torch", "train_adaopt")
    )
    model = namespace["torch_model"]()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    expected = train_torch(model, torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99)), steps=20)
    unmasked, _ = train_adaopt(adaopt.adamw(1e-2, b1=0.9, b2=0.99, weight_decay=0.1), steps=20)
    with pytest.raises(AssertionError):
        namespace["assert_close"](unmasked, expected)

    model = namespace["torch_model"]()
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, max_lr=1e-2, total_steps=20)
    expected = train_torch(model, torch_optimizer, steps=20, after_step=lambda loss: scheduler.step())
    fixed_b1 = adaopt.inject_hyperparams(adaopt.adamw)(
        learning_rate=adaopt.onecycle_schedule(20, peak_value=1e-2), weight_decay=0.1
    )
    params, _ = train_adaopt(fixed_b1, steps=20)
    with pytest.raises(AssertionError):
        namespace["assert_close"](params, expected)


def _optimizer_table() -> dict[str, str]:
    """The rows of the table of optimizers, by the optimizer's name."""
    lines = TEXT[TEXT.index("| optimizer | what adapts the step |") :].splitlines()[2:]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines))
    names = [re.match(r"^\| `(\w+)` \|", row) for row in rows]
    assert all(names), "every row of the table of optimizers starts with a name in backquotes"
    return {match.group(1): row for match, row in zip(names, rows, strict=True) if match}


def test_readme_table_lists_the_registry() -> None:
    assert sorted(_optimizer_table()) == sorted(REGISTRY)


@pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
def test_readme_table_names_every_reference(spec: OptimizerSpec) -> None:
    row = _optimizer_table()[spec.name]
    for ref in spec.references:
        expected = "the paper" if "paper" in ref.note else ref.name
        assert expected in row, f"{expected} missing from the README row of {spec.name}"
