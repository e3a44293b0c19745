"""``python -m benchmarks.speed --model-steps``: whole training steps timed with XLA:CPU's multi-output fusion off
and on, each in processes of its own. Nothing here is about speed: only what is timed, counted and reported."""

from __future__ import annotations

import copy
import os

import pytest

import adaopt
from benchmarks import speed


@pytest.fixture(scope="module")
def conv_run() -> dict:
    """One process's result on the small convolutional network, in this process (the fusion off)."""
    return speed.time_model_steps(["conv"], reps=2)


def test_each_row_is_timed_and_its_kernels_counted(conv_run: dict) -> None:
    assert conv_run["fusion"] is False
    row = conv_run["models"]["conv"]
    assert row["parameters"] == 1_898
    for label in speed.MODEL_ROWS:
        assert len(row[label]["times"]) == 2 and all(t > 0 for t in row[label]["times"])
        kernels, multi_output = row[label]["kernels"]
        assert kernels > 0 and multi_output == 0  # without the fusion no kernel writes several buffers
    # The step runs the forward and backward pass and the optimizer: more kernels than the pass alone.
    assert row[speed.MODEL_ROWS[1]]["kernels"][0] > row[speed.MODEL_ROWS[0]]["kernels"][0]


def test_the_report_compares_the_rounds(conv_run: dict) -> None:
    slower = copy.deepcopy(conv_run)
    slower["fusion"] = True
    for label in speed.MODEL_ROWS:
        slower["models"]["conv"][label]["times"] = [2 * t for t in conv_run["models"]["conv"][label]["times"]]
    text = speed.render_model_steps({False: [conv_run, conv_run], True: [slower, slower]}, "python -m x", 1.0)
    assert text.startswith(speed.MODEL_STEPS_BEGIN) and text.rstrip().endswith(speed.MODEL_STEPS_END)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `conv`")]
    assert [row[2] for row in rows] == list(speed.MODEL_ROWS)
    assert all(row[5] == "2.00" and row[6] == "2.00, 2.00" for row in rows)


def test_the_child_processes_get_the_fusion_off_and_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {adaopt.CPU_MULTI_OUTPUT_FUSION_FLAG}")
    monkeypatch.setenv(adaopt.CPU_FUSION_ENV, "0")
    off, on = speed._model_steps_env(False), speed._model_steps_env(True)
    assert off["XLA_FLAGS"] == on["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert off[adaopt.CPU_FUSION_ENV] == "0" and adaopt.CPU_FUSION_ENV not in on
    assert os.environ[adaopt.CPU_FUSION_ENV] == "0"  # this process's environment is left alone
