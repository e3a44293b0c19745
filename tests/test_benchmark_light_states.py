"""The light-states quality benchmark (benchmarks/light_states.py) runs end to end on a tiny budget and reports.

Nothing here is about how good a variant is: only that each trains on AdamW's grid, is scored at AdamW's
tuned learning rate and at its own best, and that its state is the light one it names.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import pytest

import adaopt
from benchmarks import convergence, light_states, workloads
from tests import markdown


def test_tiny_run_scores_each_variant_at_adamws_rate(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Results\n\n{light_states.BEGIN}\nstale\n{light_states.END}\n\n## Notes\n\nkept\n")
    json_path = tmp_path / "rows.json"
    argv = ["--workloads", "softmax", "--variants", "adamw_int8,adafactor", "--steps-scale", "0.02"]
    argv += ["--out", str(out), "--plots", str(tmp_path / "plots"), "--json", str(json_path), "--no-progress"]
    assert light_states.main(argv) == 0
    text = out.read_text()
    assert "stale" not in text and text.endswith("## Notes\n\nkept\n")

    summary = markdown.table(text, "Memory-light states and optimizers")
    assert summary[0] == ["variant", "softmax ratio (own)", "within 1% on", "own within 1% on"]
    assert [r[0] for r in summary[1:]] == ["`adamw_int8`", "`adafactor`"]

    rows = {r[0].strip("`"): r for r in markdown.table(text, "### `softmax`")[1:]}
    assert set(rows) == {"adamw", "adamw_int8", "adafactor"}
    grid = convergence.learning_rate_grid(adaopt.REGISTRY["adamw"])
    adamw_final = float(rows["adamw"][3])
    for row in rows.values():
        lr = float(row[2])
        assert min(abs(lr / r - 1) for r in grid) < 1e-3 and lr == float(rows["adamw"][2])  # AdamW's tuned rate
        assert float(row[4]) == pytest.approx(float(row[3]) / adamw_final, rel=1e-3)
        assert row[5] == ("yes" if float(row[4]) <= 1.01 else "no")
        assert float(row[7]) <= float(row[3]) * (1 + 1e-3)  # its own best is at least as good
    assert float(rows["adamw"][4]) == 1.0

    # The state bytes are those of the light state, on the workload's tree: int8 codes and one scale per block.
    params = workloads.WORKLOADS["softmax"]().init()
    sizes = [x.size for x in jax.tree.leaves(params)]
    int8 = sum(2 * (n + 4 * math.ceil(n / 256)) for n in sizes) / sum(sizes)
    assert float(rows["adamw_int8"][1]) == pytest.approx(int8, abs=0.01)
    assert float(rows["adamw"][1]) == pytest.approx(8.0, abs=0.01)
    assert float(rows["adafactor"][1]) < 8.0

    link = next(line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("!["))
    assert not Path(link).is_absolute()
    assert (out.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json_path.exists()


def test_storages_run_on_adamws_grid_and_optimizers_on_theirs_too() -> None:
    adamw = convergence.learning_rate_grid(adaopt.REGISTRY["adamw"])
    assert light_states.variant_grid(light_states.variant_spec("adamw_int8")) == adamw
    own = convergence.learning_rate_grid(adaopt.REGISTRY["adafactor"])
    assert light_states.variant_grid(light_states.variant_spec("adafactor")) == sorted({*adamw, *own})
    assert light_states.variant_spec("adafactor").capabilities == adaopt.REGISTRY["adafactor"].capabilities


def test_variants_store_what_they_name() -> None:
    params = {"w": jax.numpy.zeros((4, 3)), "b": jax.numpy.zeros(3)}
    for name, kind in (("adamw_int8", "Quantized"), ("adamw_int4", "Quantized"), ("adamw_bf16_sr", "Rounded")):
        state = light_states.variant_spec(name).factory(learning_rate=1e-3).init(params)
        leaves = jax.tree.leaves(state, is_leaf=lambda x: type(x).__name__ in ("Quantized", "Rounded"))
        assert sum(type(x).__name__ == kind for x in leaves) == 4  # both moments of both leaves, however small


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(SystemExit):
        light_states.main(["--variants", "adamw_int8,nosuch"])
