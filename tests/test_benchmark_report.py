"""benchmarks/report.py: the tables' shared parts."""

from __future__ import annotations

from benchmarks import report


def test_measurements_are_set_side_by_side_by_label() -> None:
    off = [["a", "1", "2"], ["b", "3", "4"]]
    on = [["b", "30", "40"], ["a", "10", "20"]]  # another order: matched by label
    header, rows = report.side_by_side(["a", "b"], ["x", "y"], [("", off), ("elided", on)])
    assert header == ["optimizer", "x", "y", "x, elided", "y, elided"]
    assert rows == [["a", "1", "2", "10", "20"], ["b", "3", "4", "30", "40"]]
    header, rows = report.side_by_side(["b"], ["x", "y"], [("", off), ("elided", on)], repeated=["y"])
    assert header == ["optimizer", "x", "y", "y, elided"] and rows == [["b", "3", "4", "40"]]


def test_cells_name_what_is_not_a_number() -> None:
    assert report.cell(0.123456) == "0.1235" and report.cell(42, "d") == "42"
    assert (report.cell(None), report.cell(float("nan")), report.cell(float("inf"))) == ("—", "n/a", "diverged")


def test_the_command_in_a_report_leaves_out_where_its_results_went() -> None:
    argv = ["--reps", "5", "--out", "/elsewhere/RESULTS.md", "--plots=/tmp/x", "--tree", "gpt2"]
    assert report.invocation("benchmarks.monitor", argv) == "python -m benchmarks.monitor --reps 5 --tree gpt2"


def test_kernel_times_name_each_kernel_once_with_its_launches_per_call() -> None:
    import jax
    import jax.numpy as jnp

    x = jnp.ones(1 << 16)
    step = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, y: jnp.sin(y) * 1.5 + i, x))
    step(x).block_until_ready()
    kernels = report.kernel_times(lambda: step(x), calls=3)
    names = [name for name, _, _ in kernels]
    assert len(names) == len(set(names)) and not any(":" in n or "$" in n or n[-1].isdigit() for n in names)
    launches = dict((name, n) for name, _, n in kernels)
    assert launches["while"] == 1 and 7 in launches.values()  # the loop once, its body once per iteration
    times = [ms for _, ms, _ in kernels]
    assert times == sorted(times, reverse=True) and times[0] > 0
