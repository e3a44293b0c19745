"""The speed benchmark (benchmarks/speed.py) runs end to end on a toy tree and writes its Markdown section.

Nothing here is about speed: only that every configuration is timed and reported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks import speed as speed_benchmark
from tests import markdown


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    return speed_benchmark


def test_toy_run_writes_table_and_keeps_other_sections(speed: ModuleType, tmp_path: Path) -> None:
    use_torch = importlib.util.find_spec("torch") is not None
    trees = {"small": speed.small_tree(leaves=10, size=50)}
    report = speed.run(trees, ["sgd"], reps=2, use_torch=use_torch, bandwidth_bytes=2**20, log=lambda _: None)
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Results\n\n{speed.BEGIN}\nstale\n{speed.END}\n\n## Convergence\n\nkept\n")
    speed.write_section(out, speed.render(report, "python -m benchmarks.speed --trees small", 1.0))
    text = out.read_text()

    assert "stale" not in text
    assert text.count(speed.BEGIN) == text.count(speed.END) == 1
    assert text.index(speed.END) < text.index("## Convergence") and text.endswith("kept\n")
    assert "Measured bandwidth" in text

    rows = markdown.table(text, "`small`: 10 leaves, 500 parameters", separator=True)
    assert tuple(rows[0]) == speed.COLUMNS
    assert set(rows[1][0]) == {"-"}
    impls = [row[1] for row in rows[2:]]
    assert impls == (["adaopt", "optax", "torch fused", "torch foreach"] if use_torch else ["adaopt", "optax"])
    for row in rows[2:]:
        assert row[0] == "sgd" and len(row) == len(speed.COLUMNS)
        assert row[6] == f"{20 * 500 / 1e6:.1f}"  # 5 x 4 bytes per parameter
        assert float(row[2]) > 0 and float(row[3]) > 0
    adaopt_row, optax_row = rows[2], rows[3]
    assert float(adaopt_row[4]) > 0 and float(optax_row[4]) > 0  # compile times
    for row in (adaopt_row, optax_row):  # one float32 momentum buffer per parameter, and maybe a step count
        assert 4.0 <= float(row[5]) < 4.1
    assert adaopt_row[9] == "1.00"


def test_section_is_appended_to_a_file_without_markers(speed: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Other\n")
    speed.write_section(out, f"{speed.BEGIN}\nnew\n{speed.END}\n")
    assert out.read_text() == f"# Other\n\n{speed.BEGIN}\nnew\n{speed.END}\n"


def test_a_run_with_multi_output_fusion_writes_its_own_section(
    speed: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fusion_on: None
) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# R\n\n{speed.BEGIN}\ndefault run, kept\n{speed.END}\n")
    assert speed.markers() == (speed.MOF_BEGIN, speed.MOF_END)
    assert speed.machine()["XLA:CPU multi-output fusion"] == "on"
    speed.write_section(out, f"{speed.MOF_BEGIN}\nfused run\n{speed.MOF_END}\n")
    speed.write_section(out, f"{speed.MOF_BEGIN}\nfused run 2\n{speed.MOF_END}\n")
    text = out.read_text()
    assert "default run, kept" in text and "fused run 2" in text and "fused run\n" not in text
    monkeypatch.delenv("XLA_FLAGS")
    assert speed.markers() == (speed.BEGIN, speed.END)


def test_trees_have_the_documented_sizes(speed: ModuleType) -> None:
    assert speed.count(speed.gpt2_tree()) == (148, 54_737_920)
    leaves, params = speed.count(speed.resnet_tree())
    assert leaves == 161 and 25_000_000 < params < 26_000_000
    assert speed.count(speed.single_tree()) == (1, 50_000_000)
    assert speed.count(speed.small_tree()) == (1000, 100_000)


def test_unknown_optimizer_is_rejected(speed: ModuleType) -> None:
    with pytest.raises(SystemExit):
        speed.main(["--optimizers", "adam,nosuch"])


def test_targets_name_the_fastest_adaopt_row_and_what_it_misses(speed: ModuleType) -> None:
    def timing(optimizer: str, impl: str, ms: float, compile_s: float | None = 1.0) -> object:
        return speed.Timing(optimizer, impl, [ms / 1e3] * 3, compile_s=compile_s)

    params = 10_000_000  # Adam moves 280 MB a step: 28 ms at the 10 GB/s measured below
    gpt2 = speed.TreeResult(
        "gpt2",
        148,
        params,
        [
            timing("adam", "adaopt", 40.0),
            timing("adam", "adaopt (single pass)", 30.0, compile_s=0.9),
            timing("adam", "optax", 40.0),
            timing("adam", "torch fused", 31.0, compile_s=None),
            timing("sgd", "adaopt", 30.0, compile_s=2.0),
            timing("sgd", "optax", 30.0),
            timing("sgd", "torch fused", 20.0, compile_s=None),
        ],
    )
    small = speed.TreeResult(
        "small",
        1000,
        100_000,
        [
            timing("adam", "adaopt (flat params)", 0.2),
            timing("adam", "optax", 12.0),
            timing("adam", "torch fused", 0.8),
        ],
    )
    bandwidth = speed.Bandwidth("jax", "x = a*x + y", 10**9, [0.1])
    report = speed.Report([bandwidth], [gpt2, small], "cpu")
    rows = {(row[0], row[1]): row for row in speed.target_rows(report)}

    assert rows["`gpt2`", "adam"][2:] == [
        "adaopt (single pass)",
        "30.00",
        "0.75x",
        "0.97x",
        "93.3",
        "0.90x",
        "yes",
    ]
    assert rows["`gpt2`", "sgd"][-1] == "no: vs optax 1.00x, vs torch fused 1.50x, bandwidth 67%, compile 2.00x"
    assert rows["`small`", "adam"][2] == "adaopt (flat params)"
    assert rows["`small`", "adam"][-1] == "no: torch fused only 4.0x"
    assert "### The targets" in speed.render(report, "python -m benchmarks.speed", 1.0)


def test_interleaved_rounds_call_every_step_once_each_starting_one_later(
    speed: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of a comparison are timed in rounds that call each once, each round starting one row later; a
    step's ``prepare`` runs before each of its calls, outside the timer (a fake clock: a call takes 1 + its index,
    a prepare 100)."""
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    log: list[tuple[str, int]] = []

    def step(k: int) -> tuple:
        def call() -> None:
            log.append(("call", k))
            clock[0] += 1 + k

        def prepare() -> None:
            log.append(("prepare", k))
            clock[0] += 100

        return call, prepare if k == 1 else None

    times = speed.time_interleaved([step(k) for k in range(3)], reps=2)
    assert times == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    calls = [k for kind, k in log if kind == "call"]
    rounds = [0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]  # two untimed rounds, then the timed ones
    assert speed.WARMUP == 2 and calls == [k for round_ in rounds for k in round_]
    assert all(log[i - 1] == ("prepare", 1) for i, entry in enumerate(log) if entry == ("call", 1))
    assert log.count(("prepare", 1)) == 4
