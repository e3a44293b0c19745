"""The convergence benchmark (benchmarks/convergence.py) runs end to end on a tiny budget and writes its sections.

Nothing here is about which optimizer wins: only that every run is trained, scored and reported,
that divergence and unsolved workloads are handled, and that the rest of the results file is kept.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import adaopt
from adaopt import Capability
from benchmarks import convergence, learning_rates
from tests import markdown

OPTIMIZERS = ("adam", "schedule_free_sgd")  # the baseline, and a tuning-free method evaluated at its average
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def conv() -> ModuleType:
    return convergence


def _section(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == text.count(end) == 1
    return text[text.index(begin) : text.index(end)]


def test_tiny_run_writes_both_sections_and_keeps_the_rest(conv: ModuleType, tmp_path: Path) -> None:
    assert Capability.AVERAGED_ITERATES in adaopt.REGISTRY["schedule_free_sgd"].capabilities
    out = tmp_path / "RESULTS.md"
    speed = "<!-- speed:begin -->\nspeed table, kept\n<!-- speed:end -->"
    out.write_text(f"# Results\n\n{speed}\n\n{conv.BEGIN}\nstale\n{conv.END}\n\n## Notes\n\nkept\n")
    argv = ["--workloads", "softmax,quadratic", "--optimizers", ",".join(OPTIMIZERS), "--steps-scale", "0.02"]
    argv += ["--out", str(out), "--plots", str(tmp_path / "plots"), "--no-progress"]
    assert conv.main(argv) == 0
    text = out.read_text()

    assert speed in text and text.endswith("## Notes\n\nkept\n") and "stale" not in text
    grid = _section(text, conv.BEGIN, conv.END)
    free = _section(text, conv.TF_BEGIN, conv.TF_END)
    assert text.index(conv.END) < text.index(conv.TF_BEGIN) < text.index("## Notes")  # placed beside its sibling
    assert "--steps-scale 0.02" in grid and "load average" in grid

    for workload, steps, initial in (("softmax", 20, math.log(10)), ("quadratic", 30, None)):
        rows = markdown.table(grid, f"`{workload}`")
        header, body = rows[0], rows[1:]
        assert header[:5] == ["optimizer", "lr default", "lr tuned", "final tuned", "final default"]
        assert sorted(r[0] for r in body) == sorted(OPTIMIZERS)
        assert f"{steps} steps" in grid
        for row in body:
            spec = adaopt.REGISTRY[row[0]]
            assert len(row) == len(header)
            assert float(row[1]) == pytest.approx(learning_rates.TUNED[spec.name], rel=1e-2)
            grid_rates = [learning_rates.TUNED[spec.name] * 3.0**k for k in range(-3, 4)]
            assert min(abs(float(row[2]) / r - 1) for r in grid_rates) < 1e-2  # a point of the grid
            tuned, default = float(row[3]), float(row[4])
            assert tuned <= default  # the tuned run is the best of the grid, which holds the default
            if initial is not None:
                assert tuned < initial  # 20 steps of the best rate make progress from zero weights
                assert 0 < float(row[5].rstrip("%")) <= 100  # test accuracy
            else:
                assert row[5] == "n/a"
            assert float(row[11]) > 0  # ms per step

    profile = markdown.table(grid, "Performance profile: tuned")
    assert profile[0] == ["optimizer", "τ = 1", "τ = 1.5", "τ = 2", "τ = 4", "τ = 8", "τ = ∞", "solved"]
    assert sorted(r[0] for r in profile[1:]) == sorted(OPTIMIZERS)
    for row in profile[1:]:
        values = [float(x) for x in row[1:7]]
        assert values == sorted(values) and all(0 <= v <= 1 for v in values)

    # The tuning-free section: schedule_free_sgd at its defaults against tuned Adam.
    rows = markdown.table(free, "`softmax`")
    assert rows[1][0].startswith("**adam (tuned")
    assert [r[0] for r in rows[2:]] == ["schedule_free_sgd"]
    ratio = float(rows[2][2])
    assert ratio == pytest.approx(float(rows[2][1]) / float(rows[1][1]), rel=1e-2)
    assert rows[2][3] == ("yes" if ratio <= 1.05 else "no")
    assert "The goal: within 5% of tuned Adam" in free

    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    names = {Path(link).name for link in links}
    assert names == {
        "convergence_softmax.png", "convergence_quadratic.png", "convergence_profile.png",
        "convergence_tuning_free.png", "convergence_tuning_free_profile.png",
    }  # fmt: skip
    for link in links:
        assert not Path(link).is_absolute()
        assert (out.parent / link).read_bytes()[:8] == PNG_MAGIC


def _run(conv: ModuleType, losses: list[list[float]]) -> Any:
    n = len(losses[0])
    return conv.Run(
        "x", "w", [0.1, 1.0, 10.0][: len(losses)], 1, [10 * i for i in range(n)], losses,
        [[0.5] * n for _ in losses], 0.002, 0.001, 0.001, 1.0, 1.0, False, False,
    )  # fmt: skip


def test_diverged_runs_never_win_nor_reach_the_target(conv: ModuleType) -> None:
    run = _run(conv, [[3.0, 2.0, 1.5], [3.0, 0.5, 0.4], [3.0, 0.1, math.nan]])
    assert run.diverged(2) and run.final(2) == math.inf and math.isnan(run.final_accuracy(2))
    assert run.steps_to(2, 0.2) is None  # it was below the target before it diverged
    assert run.tuned_index == 1
    assert run.steps_to(1, 0.5) == 10 and run.seconds_to(1, 0.5) == pytest.approx(0.02)
    assert run.steps_to(0, 0.5) is None and run.seconds_to(0, 0.5) is None

    all_diverged = _run(conv, [[3.0, math.inf], [3.0, math.nan]])
    assert all_diverged.tuned_index is None


def test_sections_replace_their_markers_only(conv: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    conv.write_section(out, f"{conv.BEGIN}\none\n{conv.END}\n", conv.BEGIN, conv.END)
    assert out.read_text() == f"# adaopt benchmark results\n\n{conv.BEGIN}\none\n{conv.END}\n"
    out.write_text(f"# R\n\n{conv.BEGIN}\nold\n{conv.END}\n\ntail\n")
    conv.write_section(out, f"{conv.TF_BEGIN}\nfree\n{conv.TF_END}\n", conv.TF_BEGIN, conv.TF_END, after=conv.END)
    conv.write_section(out, f"{conv.BEGIN}\nnew\n{conv.END}\n", conv.BEGIN, conv.END)
    expected = f"# R\n\n{conv.BEGIN}\nnew\n{conv.END}\n\n{conv.TF_BEGIN}\nfree\n{conv.TF_END}\n\ntail\n"
    assert out.read_text() == expected
    conv.write_section(out, f"{conv.TF_BEGIN}\nfree 2\n{conv.TF_END}\n", conv.TF_BEGIN, conv.TF_END, after=conv.END)
    assert out.read_text() == expected.replace("\nfree\n", "\nfree 2\n")


def test_performance_profile(conv: ModuleType) -> None:
    times = {
        "a": {"w1": 1.0, "w2": 4.0, "w3": None, "w4": None},
        "b": {"w1": 2.0, "w2": 2.0, "w3": 5.0, "w4": None},
    }
    profile = conv.profile(times, taus=(1.0, 2.0, 3.0, math.inf))
    assert profile["a"] == [0.25, 0.5, 0.5, 0.5]  # best on w1, twice the best on w2, never solves w3
    assert profile["b"] == [0.5, 0.75, 0.75, 0.75]  # w4: solved by nobody, counted as unsolved
    assert conv.ratio_curve(times)["a"] == [1.0, 2.0]


def test_grid_budget_and_schedule(conv: ModuleType) -> None:
    spec = adaopt.REGISTRY["adam"]
    rates = conv.learning_rate_grid(spec)
    assert len(rates) == 7 and rates[conv.DEFAULT_INDEX] == learning_rates.TUNED[spec.name]
    np.testing.assert_allclose(np.diff(np.log(rates)), math.log(3.0))
    workload = conv.wl.WORKLOADS["quadratic"]()
    assert conv.budget(workload, 1.0, None) == (workload.steps, workload.steps // workload.evals)
    steps, every = conv.budget(workload, 0.013, 7)
    assert steps % every == 0 and steps // every == 7
    for spec in adaopt.REGISTRY.values():  # tuned methods get the cosine decay, tuning-free ones their constant rate
        assert conv.is_scheduled(spec, "cosine") == (Capability.TUNING_FREE not in spec.capabilities and not spec.capabilities
                                                      & {Capability.AVERAGED_ITERATES, Capability.CONSTANT_LEARNING_RATE})  # fmt: skip
        assert not conv.is_scheduled(spec, "constant")


def test_tuning_free_runs_add_the_cosine_variants(conv: ModuleType) -> None:
    specs = conv.select(None, tuning_free=True)
    names = [s.name for s in specs]
    assert names[0] == conv.BASELINE
    variants = [n for n in names if n.endswith(conv.COSINE)]
    assert sorted(v.removesuffix(conv.COSINE) for v in variants) == sorted(conv.DECAYED_VARIANTS)
    for name in conv.DECAYED_VARIANTS:
        spec = adaopt.REGISTRY[name]
        assert Capability.TUNING_FREE in spec.capabilities and name in names
        variant = conv.spec_of(name + conv.COSINE)
        assert conv.tuned_rate(variant) == learning_rates.TUNED[spec.name] and variant.factory is spec.factory
        assert conv.is_scheduled(variant, "constant") and conv.is_scheduled(variant, "cosine")
        assert not conv.is_scheduled(spec, "cosine")
    assert conv.select(["dog"], tuning_free=True)[1:] == [adaopt.REGISTRY["dog"], conv.spec_of("dog+cosine")]

    # The variant is trained under the decay: not the constant run's trajectory.
    prepared = conv.Prepared.of(conv.wl.WORKLOADS["quadratic"]())
    runs = [
        conv.run_pair(spec, prepared, [1.0], 0, scale=0.02, evals=4, schedule="constant")
        for spec in (adaopt.REGISTRY["dadapt_sgd"], conv.spec_of("dadapt_sgd+cosine"))
    ]
    assert [r.scheduled for r in runs] == [False, True]
    assert runs[0].losses != runs[1].losses


def test_configured_variants_run_an_entry_with_arguments_set(conv: ModuleType) -> None:
    """name(key=value,...): the entry's factory with those arguments, on the grid around its tuned rate or its own."""
    variant = conv.spec_of("shampoo( graft=rmsprop, b2=0.95 )")
    assert (
        variant.name == "shampoo(graft=rmsprop,b2=0.95)" and conv.tuned_rate(variant) == learning_rates.TUNED["shampoo"]
    )
    assert variant.factory.keywords == {"graft": "rmsprop", "b2": 0.95}  # a literal where it reads as one
    centred = conv.spec_of("shampoo(graft=rmsprop,learning_rate=0.003)")
    assert (
        conv.learning_rate_grid(centred)[conv.DEFAULT_INDEX] == 0.003
        and "learning_rate" not in centred.factory.keywords
    )

    # The variant trains as the entry built with those arguments does, not as the entry's defaults.
    prepared = conv.Prepared.of(conv.wl.WORKLOADS["quadratic"]())
    run = lambda spec: conv.run_pair(spec, prepared, [0.01], 0, scale=0.02, evals=4, schedule="constant").losses
    plain = dataclasses.replace(adaopt.REGISTRY["adam"], factory=lambda **kw: adaopt.adam(**{"b1": 0.5, **kw}))
    assert run(conv.spec_of("adam(b1=0.5)")) == run(plain) != run(adaopt.REGISTRY["adam"])

    names = ["shampoo(graft=rmsprop,b2=0.95)", "adamw", "muon"]
    assert [s.name for s in conv.select(names, False)] == ["adamw", "muon", names[0]]  # the registry's order first
    args = conv.parse_args(["--optimizers", "adamw, shampoo(graft=rmsprop,b2=0.95),muon"])
    assert args.optimizers == ["adamw", "shampoo(graft=rmsprop,b2=0.95)", "muon"]  # split between names only
    for bad, message in [
        ("shampoo(graft)", "is not key=value"),
        ("nope(b2=0.9)", "not a registry entry"),
        ("shampoo(nope=1)", "unexpected keyword argument 'nope'"),
        ("shampoo(graft=nope)", "graft must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            conv.spec_of(bad)
        with pytest.raises(SystemExit):
            conv.parse_args(["--optimizers", bad])


def test_full_batch_methods_skip_the_workloads_without_one(conv: ModuleType) -> None:
    specs = [s for s in adaopt.REGISTRY.values() if Capability.FULL_BATCH in s.capabilities]
    assert specs  # the bold driver
    lm = conv.wl.char_lm()
    assert not lm.has_full_batch
    prepared = conv.Prepared(lm, None, None, 7.0, 0.0)
    run = conv.run_pair(specs[0], prepared, [1.0], 0, scale=1.0, evals=None, schedule="cosine")
    assert run.skipped and run.tuned_index is None
    # Where they run, the section names them: their steps are full passes, the others' minibatches.
    suite = _suite(conv, ["adam", "rprop"], {"w1": [0.2, 0.1]})
    suite.runs["rprop", "w1"] = conv.dataclasses.replace(suite.runs["rprop", "w1"], full_batch=True)
    assert "- the whole training split at every step (`Capability.FULL_BATCH`): rprop." in conv.render_grid(
        suite, "cmd", {}
    )


def test_workloads_are_real_and_deterministic(conv: ModuleType) -> None:
    wl = conv.wl
    text = wl.corpus()
    assert len(text) > 100_000 and text.isascii()
    assert b" the " in text and text.count(b"\n") > 1000  # English prose, many lines
    softmax = wl.softmax_regression()
    assert softmax.target == pytest.approx(1.01 * wl.softmax_optimum())
    assert 0.05 < wl.softmax_optimum() < math.log(10)
    for name, make in wl.WORKLOADS.items():
        workload = make()
        assert workload.name == name and workload.steps > 0 and workload.target > 0
        a, b = workload.init(), workload.init()
        for x, y in zip(*(conv.jax.tree.leaves(t) for t in (a, b)), strict=True):
            assert x.dtype == np.float32
            np.testing.assert_array_equal(x, y)
        batches = workload.batches(40, False)
        np.testing.assert_array_equal(
            conv.jax.tree.leaves(batches)[0], conv.jax.tree.leaves(workload.batches(40, False))[0]
        )
        assert len(conv.jax.tree.leaves(batches)[0]) == 40


def test_bad_arguments_are_rejected(conv: ModuleType) -> None:
    for argv in (["--optimizers", "adam,nosuch"], ["--workloads", "mnist"], ["--tuning-free", "--optimizers", "sgd"]):
        with pytest.raises(SystemExit):
            conv.main(argv)


def _suite(conv: ModuleType, names: list[str], finals: dict[str, list[float]]) -> Any:
    """A grid suite of made-up runs on the quadratic workload(s) named in ``finals``: optimizer k ends
    at ``finals[workload][k]`` at its best (middle) learning rate, 0.1 higher at the others."""
    workloads = {w: dataclasses.replace(conv.wl.WORKLOADS["quadratic"](), name=w) for w in finals}
    runs = {}
    for w, ends in finals.items():
        for name, end in zip(names, ends, strict=True):
            losses = [[1.0, 0.5, end + (0.0 if i == 3 else 0.1)] for i in range(7)]
            runs[name, w] = conv.Run(
                name, w, [0.1 * 3.0**k for k in range(-3, 4)], 3, [0, 10, 20], losses, [[0.5] * 3] * 7,
                0.001, 0.0005, 0.0005, 1.0, 1.0, False, False,
            )  # fmt: skip
    return conv.Suite("grid", workloads, runs, list(names), "cosine", 1.0, None)


def test_plots_highlight_the_best_and_the_baseline_and_group_the_rest(conv: ModuleType, tmp_path: Path) -> None:
    assert conv.highlighted(["a", "adam", "b", "c"], "adam", n=2) == ["a", "b"]
    names = [s.name for s in adaopt.REGISTRY.values()][:12]
    assert conv.BASELINE in names
    ends = [0.3 - 0.02 * k for k in range(12)]  # the last of the list ends lowest
    ends[names.index("sgd")] = math.nan  # a diverged run is one of the others
    suite = _suite(conv, names, {"w1": ends})
    legends = conv.plot_workload(suite, suite.workloads["w1"], tmp_path / "w1.png")
    assert (tmp_path / "w1.png").read_bytes()[:8] == PNG_MAGIC
    best = [n for n in reversed(names) if n != conv.BASELINE][: conv.HIGHLIGHT]
    others = {"tuned": len(names) - conv.HIGHLIGHT - 2, "default": len(names) - conv.HIGHLIGHT - 1}  # sgd: no tuned run
    for which, labels in legends.items():
        assert [label.split(" ")[0] for label in labels[: conv.HIGHLIGHT]] == best
        assert labels[conv.HIGHLIGHT].startswith(f"{conv.BASELINE}, baseline")
        assert labels[conv.HIGHLIGHT + 1 :] == [f"the {others[which]} others"]

    times = {name: {"w1": 1.0 + k, "w2": 2.0 + k} for k, name in enumerate(names)}  # the first is fastest
    labels = conv.plot_profile(times, tmp_path / "profile.png", "profile")
    assert labels[: conv.HIGHLIGHT] == [n for n in names if n != conv.BASELINE][: conv.HIGHLIGHT]
    assert labels[conv.HIGHLIGHT :] == [f"{conv.BASELINE}, baseline", f"the {len(names) - conv.HIGHLIGHT - 1} others"]


def test_tuning_free_plot_highlights_per_workload(conv: ModuleType, tmp_path: Path) -> None:
    free = [s.name for s in adaopt.REGISTRY.values() if Capability.TUNING_FREE in s.capabilities]
    names = [conv.BASELINE, *free]
    rising = [0.1 + 0.01 * k for k in range(len(names))]  # the registry's order is the ranking on w1
    suite = _suite(conv, names, {"w1": rising, "w2": rising[:1] + rising[1:][::-1]})  # and reversed on w2
    legends = conv.plot_tuning_free_curves(suite, tmp_path / "free.png")
    assert (tmp_path / "free.png").read_bytes()[:8] == PNG_MAGIC
    for workload, order in (("w1", free), ("w2", free[::-1])):
        labels = legends[workload]
        assert [label.split(" ")[0] for label in labels[: conv.HIGHLIGHT]] == order[: conv.HIGHLIGHT]
        assert labels[conv.HIGHLIGHT].startswith(f"{conv.BASELINE} (tuned), baseline")
        assert labels[-1] == f"the {len(free) - conv.HIGHLIGHT} others"


def test_the_language_model_section_has_its_own_markers_plots_and_workload(conv: ModuleType, tmp_path: Path) -> None:
    """``--section language-model`` trains ``gpt`` by default and writes between its own markers and
    plots, leaving the small workloads' section and plots as they were."""
    args = conv.parse_args(["--section", "language-model"])
    assert args.workloads == ["gpt"] and args.section.name == "language-model"
    assert conv.parse_args([]).workloads == list(conv.wl.DEFAULT_WORKLOADS)
    names = ["adam", "sgd"]
    suite = conv.dataclasses.replace(
        _suite(conv, names, {"w1": [0.2, 0.1]}), section=conv.SECTIONS["language-model"], optimizers=names
    )
    plots = conv.make_plots(suite, tmp_path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["language_model_profile.png", "language_model_w1.png"]
    section = conv.render_grid(suite, "cmd", plots)
    assert section.startswith("<!-- language-model:begin -->") and section.rstrip().endswith(
        "<!-- language-model:end -->"
    )
    assert "GPT-style" in section and not conv.has_tuning_free_comparison(suite)


def test_suggested_learning_rate_is_the_best_geometric_mean_over_the_digits_workloads() -> None:
    def run(finals: list[float], skipped: str = "") -> dict[str, Any]:  # as convergence.py's JSON holds it
        fields = dataclasses.asdict(_run(convergence, [[2.0, f] for f in finals]))
        return fields | {"learning_rates": [0.1, 0.3, 0.9], "skipped": skipped}

    runs = {
        "a/softmax": run([0.5, 0.2, math.nan]),  # ratios 2.5, 1, diverged
        "a/mlp": run([0.5, 0.4, 0.3]),  # 5/3, 4/3, 1
        "a/conv": run([0.3, 0.3, 0.3]),
        "a/charlm": run([9.0, 9.0, 0.001]),  # not a digits workload
        "b/softmax": run([0.2, 0.1, 0.1]),
        "b/mlp": run([0.2, 0.1, 0.1], skipped="full batch"),
    }
    suggested = learning_rates.suggest(runs)
    assert suggested["a"][0] == 0.3
    assert suggested["a"][1] == pytest.approx((1 * 4 / 3 * 1) ** (1 / 3))
    assert suggested["b"][0] == 0.3  # the first of a tie; the skipped run counts for nothing
    runs["a/conv"] = {**runs["a/conv"], "learning_rates": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="different grids"):
        learning_rates.suggest(runs)
