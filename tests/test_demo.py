"""The digits demo (benchmarks/demo.py) runs end to end: a table on stdout and a non-empty PNG."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import adaopt
from benchmarks import learning_rates


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return importlib.import_module("benchmarks.demo")


def test_demo_prints_table_and_writes_plot(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--steps", "100", "--optimizers", "adam,sgd", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    assert set(lines[header + 1]) <= {"-", " "}
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 4]}
    assert set(rows) == {"adam", "sgd"}
    assert all(len(row) == 8 for row in rows.values())
    # The state's bytes per parameter: Adam's two float32 moments, plain SGD's none.
    assert "state B/param" in lines[header]
    assert float(rows["adam"][5]) == pytest.approx(8.0, abs=0.01)
    assert float(rows["sgd"][5]) == pytest.approx(0.0, abs=0.01)
    assert len({len(line) for line in lines[header : header + 4]}) == 1  # aligned columns
    png = tmp_path / "digits_mlp.png"
    assert str(png) in out
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_returns_one_result_per_optimizer(demo: ModuleType) -> None:
    results = demo.run(["sgd"], steps=25, chunk=10, progress=False)
    assert [r["name"] for r in results] == ["sgd"]
    for r in results:
        assert r["steps"] == [0, 10, 20, 25]  # the last chunk is shorter
        assert len(r["train_loss"]) == len(r["test_accuracy"]) == 4
        assert r["train_loss"][-1] < r["train_loss"][0]
        assert 0.0 <= r["final_test_accuracy"] <= 1.0


def test_storage_variants_run_beside_adamw(demo: ModuleType) -> None:
    """AdamW with 8-bit / bfloat16 moments: its bytes per parameter in the table, and it trains like AdamW."""
    results = {r["name"]: r for r in demo.run(["adamw", "adamw_int8", "adamw_bf16_sr"], steps=200, progress=False)}
    assert set(results) == {"adamw", "adamw_int8", "adamw_bf16_sr"}
    assert results["adamw_int8"]["learning_rate"] == results["adamw"]["learning_rate"]
    assert demo.tuned_rate(adaopt.REGISTRY["adafactor"]) == learning_rates.TUNED["adafactor"]  # its own, not AdamW's
    # two 1-byte codes per parameter, a float32 scale per block of 256 (per leaf at least one), the counts
    assert 2.0 < results["adamw_int8"]["state_bytes_per_param"] < 2.2
    assert 4.0 < results["adamw_bf16_sr"]["state_bytes_per_param"] < 4.1
    assert results["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    for name in ("adamw_int8", "adamw_bf16_sr"):
        assert results[name]["final_train_loss"] == pytest.approx(results["adamw"]["final_train_loss"], rel=0.1)
        assert results[name]["final_test_accuracy"] == pytest.approx(results["adamw"]["final_test_accuracy"], abs=0.01)


def test_unknown_optimizer_is_rejected(demo: ModuleType) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--optimizers", "adam,nosuch"])


def test_an_unwritable_out_is_refused_before_training(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder under a file: refused at once (it failed after the whole training, losing the tables)."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "a_file" / "out")])
    assert "cannot write the plots there" in capsys.readouterr().err


def test_an_interrupt_keeps_the_finished_results(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the second optimizer: the first one's table and plot, and the shell's exit code for it."""
    original = demo.tuned_rate
    calls = []

    def interrupted(spec: Any) -> Any:
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(spec)

    monkeypatch.setattr(demo, "tuned_rate", interrupted)
    args = ["--steps", "20", "--chunk", "10", "--optimizers", "sgd,adam", "--out", str(tmp_path), "--no-progress"]
    assert demo.main(args) == 130
    captured = capsys.readouterr()
    assert "Interrupted: 1 of 2 optimizers finished." in captured.err
    assert (tmp_path / "digits_mlp.png").exists() and "\nsgd " in captured.out


def test_tuning_free_section_beside_tuned_adam(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--steps", "40", "--chunk", "20", "--optimizers", "adam,prodigy,bold_driver", "--out", str(tmp_path)]
    assert demo.main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    free = out[out.index("tuning-free methods at their defaults") :]
    rows = {line.split()[0] for line in free.splitlines()[3:6]}
    assert rows == {"adam", "prodigy", "bold_driver"}  # tuned Adam beside the tuning-free methods
    assert (tmp_path / "digits_mlp_tuning_free.png").stat().st_size > 0
