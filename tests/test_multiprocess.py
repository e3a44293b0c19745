"""Training across processes: two ``jax.distributed`` processes of 4 CPU devices each, gloo collectives on localhost.

The test starts its own processes (``python -m tests.multiprocess_worker``, see there), each in its own process
group so that a timeout or a failure kills the whole group, and checks that none is left behind. One pair of
processes trains every case (process start and compilation are the cost), while this process computes the
reference: the same steps on unsharded arrays of one device. A fault test kills one process mid-run: the other
must stop with the coordination service's error within a bounded time, not hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import multiprocess_worker as worker

N_PROCESSES = 2
ROOT = Path(__file__).resolve().parent.parent
WORKER_XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={worker.N_DEVICES // N_PROCESSES}"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
TRAIN_TIMEOUT_S = 240  # the pair trains in ~25 s on 2 idle cores; a loaded machine may take several times that
FAULT_BOUND_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, *extra: str) -> list[subprocess.Popen[bytes]]:
    """The worker processes, each the leader of a new process group (a session): killing the group kills all."""
    env = {**os.environ, "XLA_FLAGS": WORKER_XLA_FLAGS, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    port = str(_free_port())
    procs = []
    for i in range(N_PROCESSES):
        args = ["--process-id", str(i), "--num-processes", str(N_PROCESSES), "--port", port, "--out", str(out)]
        with open(out / f"log_{i}.txt", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", worker.__name__, *args, *extra],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


def _wait(procs: list[subprocess.Popen[bytes]], deadline: float) -> list[int | None]:
    """Each process's return code, or None for one still running at ``deadline`` (time.monotonic())."""
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill every process group and reap the leaders; then no process of any group is left."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):  # the group has already exited
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for p in procs:
        with pytest.raises(ProcessLookupError):  # signal 0: is any process of the group still alive?
            os.killpg(p.pid, 0)


def _logs(out: Path) -> str:
    return "\n".join(
        f"--- process {i} ---\n{(out / f'log_{i}.txt').read_text(errors='replace')[-3000:]}" for i in range(N_PROCESSES)
    )


def _reference() -> dict[str, dict[str, np.ndarray]]:
    """Every case's final parameters from the same steps on unsharded arrays of this process's first device."""
    device = jax.devices()[0]
    results = {}
    for case, make in worker.cases().items():
        params = jax.device_put(worker.host_params(), device)
        batch = jax.device_put(worker.host_batch(), device)
        final, _ = worker.train(make(), params, batch, worker.n_steps(case), gather=False)
        results[case] = {name: np.asarray(value) for name, value in final.items()}
    return results


def test_cases_cover_every_capability_class() -> None:
    labels = {case.split(":")[0] for case in worker.cases()}
    assert labels == {
        "elementwise", "clipped", "trust_ratio", "per_leaf", "global_estimate", "loss_driven", "quantized",
        "matrix_state", "orthogonalized",
    }  # fmt: skip


def test_two_processes_train_as_one(tmp_path: Path) -> None:
    """Data-parallel and fully-sharded training over 2 processes x 4 devices equals one device's, for each class."""
    procs = _launch(tmp_path)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        want = _reference()  # while the workers compile and train
        codes = _wait(procs, deadline)
    finally:
        _kill_all(procs)
    assert codes == [0] * N_PROCESSES, f"return codes {codes} (None: killed at the timeout)\n{_logs(tmp_path)}"

    got = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(N_PROCESSES)]
    expected_keys = {
        f"{case}/{placement}/{name}" for case in want for placement in worker.PLACEMENTS for name in worker.MODEL_SHAPES
    }
    initial = worker.host_params()
    for i, results in enumerate(got):
        assert set(results) == expected_keys, f"process {i} wrote {sorted(set(results) ^ expected_keys)} unexpectedly"
    for key in sorted(expected_keys):
        case, _, name = key.split("/")
        # Every process gathered the same global parameters.
        np.testing.assert_array_equal(got[1][key], got[0][key], err_msg=key)
        # tests/test_sharding.py's tolerance: reductions across shards (and here across processes, by gloo) in
        # another order change a global norm or step size by a few ulps, which moves every coordinate by that
        # fraction of its displacement: 64 float32 ulps of the leaf's largest displacement. A wrong reduction
        # (a process's partial sum used as the whole, a gradient not averaged over both processes' examples) is
        # off by a large fraction of the step.
        displacement = float(np.max(np.abs(want[case][name] - initial[name])))
        atol = max(5e-7, 64 * float(np.finfo(np.float32).eps) * displacement)
        np.testing.assert_allclose(got[0][key], want[case][name], rtol=1e-6, atol=atol, err_msg=key)
        assert not np.array_equal(got[0][key], initial[name]), f"{key} did not move"


def test_a_dead_process_stops_the_other(tmp_path: Path) -> None:
    """Process 1 exits abruptly after 3 steps; process 0, in the middle of its collectives, must not hang.

    jax.distributed's coordination service misses process 1's heartbeats (worker.HEARTBEAT_TIMEOUT_S) and
    aborts process 0 with an error that names the unhealthy task.
    """
    procs = _launch(tmp_path, "--die-after-steps", "3")
    start = time.monotonic()
    try:
        codes = _wait(procs, start + FAULT_BOUND_S)
        elapsed = time.monotonic() - start
    finally:
        _kill_all(procs)
    logs = _logs(tmp_path)
    assert codes[1] == 3, f"process 1 should have exited with its own code 3, got {codes[1]}\n{logs}"
    assert codes[0] is not None, f"process 0 still ran {FAULT_BOUND_S} s after process 1 died: a hang\n{logs}"
    assert codes[0] != 0, f"process 0 finished without an error after its peer died\n{logs}"
    assert elapsed < FAULT_BOUND_S
    assert "exiting after 3 steps" in logs  # process 1 died mid-run, not at start-up
    assert "stopped sending heartbeats" in logs, f"process 0 did not say why it stopped\n{logs}"
