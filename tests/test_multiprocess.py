"""Training across processes: two ``jax.distributed`` processes of 4 CPU devices each, gloo collectives on localhost.

The test starts its own processes (``python -m tests.multiprocess_worker``, see there), each in its own process
group so that a timeout or a failure kills the whole group, and checks that none is left behind. One pair of
processes trains every case (process start and compilation are the cost), while this process computes the
reference: the same steps on unsharded arrays of one device; the orbax checkpoint the pair writes one step before
the end then resumes in this process. A fault test kills one process mid-run, a peer or the coordinator: the other
must stop with the coordination service's error within a bounded time, not hang, and the last checkpoint the pair
committed resumes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from tests import multiprocess_worker as worker

N_PROCESSES = 2
ROOT = Path(__file__).resolve().parent.parent
WORKER_XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={worker.N_DEVICES // N_PROCESSES}"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
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


class _Reference(NamedTuple):
    """Every case's final parameters from the same steps on unsharded arrays of this process's first device, and the
    compiled step of each case, to continue from a checkpoint without compiling again."""

    final: dict[str, dict[str, np.ndarray]]
    steps: dict[str, Callable[[Any, Any, Any], tuple[Any, Any]]]


def _reference() -> _Reference:
    device = jax.devices()[0]
    batch = jax.device_put(worker.host_batch(), device)
    final, steps = {}, {}
    for case, make in worker.cases().items():
        tx = make()
        steps[case] = worker.make_step(tx, gather=False)
        params = jax.device_put(worker.host_params(), device)
        params, _ = worker.train(tx, params, batch, worker.n_steps(case), gather=False, step=steps[case])
        final[case] = {name: np.asarray(value) for name, value in params.items()}
    return _Reference(final, steps)


def _assert_close(got: Any, want: np.ndarray, name: str, what: str) -> None:
    """tests/test_sharding.py's tolerance: reductions across shards (and here across processes, by gloo) in another
    order change a global norm or step size by a few ulps, which moves every coordinate by that fraction of its
    displacement: 64 float32 ulps of the leaf's largest displacement. A wrong reduction (a process's partial sum used
    as the whole, a gradient not averaged over both processes' examples) is off by a large fraction of the step."""
    initial = worker.host_params()[name]
    displacement = float(np.max(np.abs(want - initial)))
    atol = max(5e-7, 64 * float(np.finfo(np.float32).eps) * displacement)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=atol, err_msg=what)
    assert not np.array_equal(want, initial), f"{what} did not move"


def _targets(make: Callable[[], Any], shardings: dict[str, Any]) -> dict[str, Any]:
    """``{"params", "opt_state"}`` as restore targets: the parameters placed by ``shardings``, the state as init would."""
    params = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[name])
        for name, value in worker.host_params().items()
    }
    return {"params": params, "opt_state": adaopt.abstract_state(make(), params)}


def test_cases_cover_every_capability_class() -> None:
    labels = {case.split(":")[0] for case in worker.cases()}
    assert labels == {
        "elementwise", "clipped", "trust_ratio", "per_leaf", "global_estimate", "loss_driven", "quantized",
        "matrix_state", "orthogonalized", "factored",
    }  # fmt: skip


def test_two_processes_train_as_one(tmp_path: Path) -> None:
    """Data-parallel (also with the states split by shard_states) and fully-sharded training over 2 processes x 4
    devices equals one device's, for each class; the
    checkpoint the processes write together one step before the end resumes in this process and ends there too."""
    procs = _launch(tmp_path)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        reference = _reference()  # while the workers compile and train
        codes = _wait(procs, deadline)
    finally:
        _kill_all(procs)
    assert codes == [0] * N_PROCESSES, f"return codes {codes} (None: killed at the timeout)\n{_logs(tmp_path)}"

    want = reference.final
    got = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(N_PROCESSES)]
    expected_keys = {
        f"{prefix}{case}/{placement}/{name}"
        for prefix in ("", "checkpoint/")
        for case in want
        for placement in worker.placements(case)
        for name in worker.MODEL_SHAPES
    }
    for i, results in enumerate(got):
        assert set(results) == expected_keys, f"process {i} wrote {sorted(set(results) ^ expected_keys)} unexpectedly"
    for key in sorted(expected_keys):
        # Every process gathered the same global parameters.
        np.testing.assert_array_equal(got[1][key], got[0][key], err_msg=key)
        if not key.startswith("checkpoint/"):
            case, _, name = key.split("/")
            _assert_close(got[0][key], want[case][name], name, key)

    # The checkpoint, written by both processes (each its shards), restored in this process: on one device, and the
    # quantized case's fully-sharded run on this process's 8 devices as the processes' mesh (its int8 codes and
    # scales split as they were). Each restored leaf has the bits the processes held (the parameters are compared),
    # the state's dtype and the placement asked for; the last step from there ends where the processes' run did, to
    # the tolerance above (one device sums the batch and the shards in another order than the 8 devices of 2
    # processes; 8 devices of one process sum them without gloo).
    cases = worker.cases()
    on_mesh = worker.checkpoint_key(next(case for case in cases if case.startswith("quantized:")), "fsdp")
    the_mesh = worker.mesh()
    targets = {}
    for case, make in cases.items():
        for placement in worker.placements(case):
            key = worker.checkpoint_key(case, placement)
            on_device = {name: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for name in worker.MODEL_SHAPES}
            on_the_mesh = {name: NamedSharding(the_mesh, spec) for name, spec in worker.param_specs(placement).items()}
            targets[key] = _targets(make, on_the_mesh if key == on_mesh else on_device)
    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoint", targets)
    for case, make in cases.items():
        for placement in worker.placements(case):
            key = worker.checkpoint_key(case, placement)
            entry = restored[key]
            for (path, leaf), target in zip(
                jax.tree_util.tree_leaves_with_path(entry), jax.tree.leaves(targets[key]), strict=True
            ):
                where = f"{case}/{placement}{jax.tree_util.keystr(path)}"
                assert (leaf.dtype, leaf.shape) == (target.dtype, target.shape), where
                assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim), f"{where}: {leaf.sharding}"
            for name, value in entry["params"].items():
                held = f"checkpoint/{case}/{placement}/{name}"
                np.testing.assert_array_equal(np.asarray(value), got[0][held], err_msg=f"restored {held}")
            steps_left = worker.n_steps(case) - worker.checkpoint_step(case)
            if key == on_mesh:
                with jax.set_mesh(the_mesh):
                    data = NamedSharding(the_mesh, P("data"))
                    batch = worker.place(worker.host_batch(), (data, data))
                    final, _ = worker.train(
                        make(), entry["params"], batch, steps_left, gather=True, state=entry["opt_state"]
                    )
                where = "resumed on this process's 8 devices"
            else:
                batch = jax.device_put(worker.host_batch(), jax.devices()[0])
                final, _ = worker.train(
                    make(),
                    entry["params"],
                    batch,
                    steps_left,
                    False,
                    state=entry["opt_state"],
                    step=reference.steps[case],
                )
                where = "resumed on one device"
            for name, value in final.items():
                _assert_close(value, got[0][f"{case}/{placement}/{name}"], name, f"{where}: {case}/{placement}/{name}")
                _assert_close(value, want[case][name], name, f"{where} vs one device's run: {case}/{placement}/{name}")


# What the survivor's coordination-service client says when it terminates it: the service found a peer dead by its
# missing heartbeats (a non-coordinator died), or the service itself is gone (the coordinator, process 0, died).
SURVIVOR_ERRORS = {1: "stopped sending heartbeats", 0: "Failed to send RPC to coordination service"}
FAULT_DIE_AFTER = 3
FAULT_TOTAL_STEPS = 5


@functools.cache
def _fault_step() -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    return worker.make_step(worker.fault_optimizer(), gather=False)


@pytest.mark.parametrize("dying", [1, 0], ids=["peer_dies", "coordinator_dies"])
def test_a_dead_process_stops_the_other_and_the_last_checkpoint_resumes(dying: int, tmp_path: Path) -> None:
    """Process ``dying`` exits abruptly after 3 steps; the other, in the middle of its collectives, must not hang.

    jax.distributed's coordination service misses a dead peer's heartbeats (worker.HEARTBEAT_TIMEOUT_S) and aborts
    the survivor with an error that names the unhealthy task; when the coordinator itself dies, the survivor's
    client loses the service at once and aborts with an error that says so. Either way the last checkpoint the
    processes committed (step 2, written every worker.FAULT_CHECKPOINT_EVERY steps) resumes: restored on one
    device, the run finished from it ends where an uninterrupted run does.
    """
    survivor = 1 - dying
    procs = _launch(tmp_path, "--die-after-steps", str(FAULT_DIE_AFTER), "--die-process", str(dying))
    start = time.monotonic()
    try:
        codes = _wait(procs, start + FAULT_BOUND_S)
        elapsed = time.monotonic() - start
    finally:
        _kill_all(procs)
    logs = _logs(tmp_path)
    assert codes[dying] == 3, f"process {dying} should have exited with its own code 3, got {codes[dying]}\n{logs}"
    assert codes[survivor] is not None, f"process {survivor} still ran {FAULT_BOUND_S} s after {dying} died\n{logs}"
    assert codes[survivor] != 0, f"process {survivor} finished without an error after its peer died\n{logs}"
    assert elapsed < FAULT_BOUND_S
    assert f"process {dying}: exiting after {FAULT_DIE_AFTER} steps" in logs  # it died mid-run, not at start-up
    assert "JAX distributed service detected fatal errors" in logs, f"process {survivor} did not say why\n{logs}"
    assert SURVIVOR_ERRORS[dying] in logs, f"process {survivor} did not say what failed\n{logs}"

    manager = ocp.CheckpointManager(tmp_path / "fault", options=ocp.CheckpointManagerOptions(read_only=True))
    last = FAULT_DIE_AFTER - FAULT_DIE_AFTER % worker.FAULT_CHECKPOINT_EVERY
    assert manager.all_steps() == [last], f"committed checkpoints {manager.all_steps()}, expected [{last}]"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = _targets(worker.fault_optimizer, dict.fromkeys(worker.MODEL_SHAPES, device))
    restored = manager.restore(last, args=ocp.args.StandardRestore(targets))
    batch = jax.device_put(worker.host_batch(), device)
    tx = worker.fault_optimizer()
    finished, _ = worker.train(
        tx, restored["params"], batch, FAULT_TOTAL_STEPS - last, False, state=restored["opt_state"], step=_fault_step()
    )
    params = jax.device_put(worker.host_params(), device)
    straight, _ = worker.train(tx, params, batch, FAULT_TOTAL_STEPS, False, step=_fault_step())
    for name, value in finished.items():
        _assert_close(value, np.asarray(straight[name]), name, f"finished from step {last}: {name}")
