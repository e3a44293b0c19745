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
