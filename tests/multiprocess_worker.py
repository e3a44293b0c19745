"""One process of tests/test_multiprocess.py's ``jax.distributed`` runs, and what it shares with the reference.

Run by the test as ``python -m tests.multiprocess_worker --process-id I --num-processes N --port PORT --out DIR``
with ``XLA_FLAGS`` giving each process its CPU devices (4 each: 8 in all for 2 processes). Every process joins
the same jax.distributed cluster (gloo collectives over localhost), builds the same global 8-device meshes and
trains :data:`MODEL_SHAPES`'s small MLP with each optimizer of :func:`cases` under two placements:

- ``dp``: data parallel, the parameters (and so the optimizer's state) replicated, the batch split over
  the 8 devices;
- ``fsdp``: fully sharded, the batch split the same way and every parameter (and the state that mirrors it)
  split along its first axis over the 8 devices; the forward pass gathers each weight (``reshard`` to
  replicated), whose transpose reduce-scatters its gradient back to the parameter's placement;
- ``zero`` (the classes of :data:`ZERO_CLASSES`): data parallel with the optimizer wrapped in
  ``adaopt.shard_states``: the parameters replicated, the state that mirrors them split along its first axis
  (ZeRO), each device updating its slice and the updates gathered across both processes.

Each process then gathers the final parameters (``process_allgather``) and writes them to
``DIR/process_I.npz``, under ``"<case>/<placement>/<leaf>"``, with the parameters one step before the end under
``"checkpoint/<case>/<placement>/<leaf>"``; the processes also write those parameters and their optimizer states
together as one orbax checkpoint, ``DIR/checkpoint``, each its own shards, which the test restores in its own
process and finishes. With ``--die-after-steps K``, process ``--die-process`` (1 by default; 0 is the coordinator)
trains ``K`` steps and exits abruptly while the others keep stepping, all of them writing an orbax checkpoint to
``DIR/fault`` every :data:`FAULT_CHECKPOINT_EVERY` steps: the test's fault scenario.

The model, the data, the placements, the training loop and the choice of optimizers live here once, so that
the test's single-process reference runs exactly the same code.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from adaopt import Capability
from benchmarks import learning_rates

N_STEPS = 3
DELAYED_EXTRA_STEPS = 6  # Capability.DELAYED_START: its first updates are zero (as tests/test_sharding.py)
N_DEVICES = 8
BATCH = 32
# w1 has 4096 elements with rows of 256: int8 storage (min_size 4096, blocks of 256) quantizes it, and its blocks
# split with its rows under the fully-sharded placement. Every first axis divides by the 8 devices.
MODEL_SHAPES = {"w1": (16, 256), "b1": (256,), "w2": (256, 8), "b2": (8,)}
PLACEMENTS = ("dp", "fsdp", "zero")
# The classes whose state shard_states splits (it mirrors the parameters), among them a norm per leaf, a global
# estimate summed over the slices and quantized blocks; the others' states are placed as under dp.
ZERO_CLASSES = ("elementwise", "trust_ratio", "global_estimate", "quantized")
# Heartbeats and timeouts small enough that a dead peer is noticed within seconds, not jax's minutes.
HEARTBEAT_TIMEOUT_S = 5
INITIALIZATION_TIMEOUT_S = 60
FAULT_CHECKPOINT_EVERY = 2


def host_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        name: (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32) for name, shape in MODEL_SHAPES.items()
    }


def host_batch() -> tuple[np.ndarray, np.ndarray]:
    """One full batch, the same at every step (loss-driven methods compare the loss between steps)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, MODEL_SHAPES["w1"][0])).astype(np.float32)
    y = rng.normal(size=(BATCH, MODEL_SHAPES["w2"][1])).astype(np.float32)
    return x, y


# Shampoo starts preconditioning at step 25 and recomputes its roots every 1000 steps by default.
_PRECONDITION_FROM_THE_START = {"start_preconditioning_step": 1, "preconditioning_compute_steps": 1}


def _first(
    description: str,
    want: set[Capability],
    exclude: frozenset[Capability] | set[Capability] = frozenset(),
    second_moment: bool | None = None,
) -> adaopt.OptimizerSpec:
    """The first optimizer of the registry with the capabilities ``want`` and none of ``exclude``; ``second_moment``:
    True for one with Adam's two moments (both ``b1`` and ``b2`` among its hyperparameters), False for one without a
    second moment (no ``b2``)."""
    for spec in adaopt.REGISTRY.values():
        keys = spec.hyperparameters.keys()
        moments = second_moment is None or ({"b1", "b2"} <= keys if second_moment else "b2" not in keys)
        if want <= spec.capabilities and not exclude & spec.capabilities and moments:
            return spec
    raise LookupError(f"no optimizer of the registry is {description}: has {want}, lacks {exclude}")


def cases() -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    """One optimizer of each capability class of the registry, chosen by capability, never by name.

    The classes are what a step reads across the devices and processes:

    - ``elementwise``: the first Adam-family optimizer (MOMENT_DTYPES, with ``b1`` and ``b2``) whose step reads
      nothing beyond each coordinate (no parameters, loss, global step size, delayed start, factored or matrix state);
    - ``clipped``: global norms: ``optax.clip_by_global_norm`` (a norm over every leaf, so over both processes)
      chained before it, at a bound the gradients exceed;
    - ``trust_ratio``: the Adam-family optimizer that reads the parameters without a global step size, averaged
      iterates or tuning-free estimates (MOMENT_DTYPES and NEEDS_PARAMS only: LAMB, whose per-leaf trust ratios
      are norms over each sharded leaf; the registry has no flag for a trust ratio);
    - ``per_leaf``: one step size per leaf from the parameters (NEEDS_PARAMS and CONSTANT_LEARNING_RATE without
      GLOBAL_STEP_SIZE: LDoG);
    - ``global_estimate``: the first GLOBAL_STEP_SIZE estimated from the distance travelled (TUNING_FREE,
      NEEDS_PARAMS: DoG, whose distance and gradient norms sum over every shard of every leaf);
    - ``loss_driven``: the first NEEDS_VALUE optimizer with a GLOBAL_STEP_SIZE (Polyak's step: the loss, a mean
      over both processes' examples, over the gradient's global norm);
    - ``quantized``: ``elementwise`` with int8 block-wise moments (``mu_dtype="int8", nu_dtype="int8"``);
    - ``matrix_state``: the first MATRIX_STATE optimizer that can compute its preconditioner at every step from the
      first (it takes :data:`_PRECONDITION_FROM_THE_START`'s arguments: Shampoo), so that within three steps the
      inverse roots of the Kronecker factors of sharded matrices move the parameters. Not SOAP: Adam in the
      eigenbasis of this model's rank-deficient factors (a 16 x 256 matrix has a 256 x 256 factor of rank 16)
      turns rounding in the null space into whole steps, so any change of reduction order (one process, on
      another mesh, already) moves its parameters by more than their displacement;
    - ``orthogonalized``: REAL_ONLY without MATRIX_STATE, FACTORED_STATE or NEEDS_PARAMS, and no second moment: the
      first optimizer whose per-matrix math has no complex form but keeps only momentum (Muon's Newton-Schulz
      of a whole sharded matrix);
    - ``factored``: the first FACTORED_STATE optimizer without MATRIX_STATE (Adafactor: the row and column means of
      each sharded matrix's squared gradients, kept whole).
    """
    elementwise_excluded = {
        Capability.NEEDS_PARAMS, Capability.NEEDS_VALUE, Capability.GLOBAL_STEP_SIZE, Capability.DELAYED_START,
        Capability.FACTORED_STATE, Capability.MATRIX_STATE, Capability.SIGN_UPDATE, Capability.TUNING_FREE,
        Capability.REAL_ONLY,
    }  # fmt: skip
    elementwise = _first(
        "elementwise Adam-family", {Capability.MOMENT_DTYPES}, elementwise_excluded, second_moment=True
    )
    trust_ratio = _first(
        "an Adam-family optimizer reading the parameters",
        {Capability.MOMENT_DTYPES, Capability.NEEDS_PARAMS},
        {Capability.GLOBAL_STEP_SIZE, Capability.AVERAGED_ITERATES, Capability.TUNING_FREE},
    )
    per_leaf = _first(
        "per-leaf step sizes",
        {Capability.NEEDS_PARAMS, Capability.CONSTANT_LEARNING_RATE},
        {Capability.GLOBAL_STEP_SIZE},
    )
    estimate = _first(
        "a global estimate of the step size",
        {Capability.GLOBAL_STEP_SIZE, Capability.TUNING_FREE, Capability.NEEDS_PARAMS},
    )
    loss_driven = _first("loss-driven with a global step size", {Capability.NEEDS_VALUE, Capability.GLOBAL_STEP_SIZE})
    matrix_state = next(
        (
            spec
            for spec in adaopt.REGISTRY.values()
            if Capability.MATRIX_STATE in spec.capabilities
            and _PRECONDITION_FROM_THE_START.keys() <= inspect.signature(spec.factory).parameters.keys()
        ),
        None,
    )
    if matrix_state is None:
        raise LookupError(f"no MATRIX_STATE optimizer of the registry takes {sorted(_PRECONDITION_FROM_THE_START)}")
    orthogonalized = _first(
        "an orthogonalizing optimizer",
        {Capability.REAL_ONLY},
        {Capability.MATRIX_STATE, Capability.FACTORED_STATE, Capability.NEEDS_PARAMS},
        second_moment=False,
    )
    factored = _first("factored", {Capability.FACTORED_STATE}, {Capability.MATRIX_STATE})
    return {
        f"elementwise:{elementwise.name}": lambda: learning_rates.make(elementwise),
        f"clipped:{elementwise.name}": lambda: optax.chain(
            optax.clip_by_global_norm(0.1), learning_rates.make(elementwise)
        ),
        f"trust_ratio:{trust_ratio.name}": lambda: learning_rates.make(trust_ratio),
        f"per_leaf:{per_leaf.name}": lambda: learning_rates.make(per_leaf),
        f"global_estimate:{estimate.name}": lambda: learning_rates.make(estimate),
        f"loss_driven:{loss_driven.name}": lambda: learning_rates.make(loss_driven),
        f"quantized:{elementwise.name}": lambda: learning_rates.make(elementwise, mu_dtype="int8", nu_dtype="int8"),
        f"matrix_state:{matrix_state.name}": lambda: learning_rates.make(matrix_state, **_PRECONDITION_FROM_THE_START),
        f"orthogonalized:{orthogonalized.name}": lambda: learning_rates.make(orthogonalized),
        f"factored:{factored.name}": lambda: learning_rates.make(factored),
    }


def n_steps(case: str) -> int:
    spec = adaopt.REGISTRY[case.split(":")[1]]
    return N_STEPS + DELAYED_EXTRA_STEPS if Capability.DELAYED_START in spec.capabilities else N_STEPS


def checkpoint_step(case: str) -> int:
    """The step after which ``run_all`` keeps a case's parameters and state for the checkpoint: one before the end."""
    return n_steps(case) - 1


def mesh() -> Mesh:
    """The 8 devices of every process as one data axis (explicit: shardings are fixed by the code, not guessed)."""
    return jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))


def param_specs(placement: str) -> dict[str, P]:
    return {name: P("data") if placement == "fsdp" else P() for name in MODEL_SHAPES}


def placements(case: str) -> tuple[str, ...]:
    """The placements a case trains under: ``zero`` only for :data:`ZERO_CLASSES`."""
    return PLACEMENTS if case.split(":")[0] in ZERO_CLASSES else tuple(p for p in PLACEMENTS if p != "zero")


def optimizer(make: Callable[[], optax.GradientTransformationExtraArgs], placement: str) -> Any:
    """The case's optimizer under ``placement``: wrapped in ``adaopt.shard_states`` for ``zero``."""
    return adaopt.shard_states(make()) if placement == "zero" else make()


def loss(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array], gather: bool) -> jax.Array:
    """Mean squared error of a tanh MLP; ``gather``: the fully-sharded placement gathers each weight to use it."""
    if gather:
        params = {name: jax.sharding.reshard(p, P()) for name, p in params.items()}
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def make_step(tx: optax.GradientTransformationExtraArgs, gather: bool) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """One jitted training step, the loss passed to ``update`` as ``value``.

    The batch is an argument: a jitted function cannot close over an array that spans other processes' devices.
    """

    @jax.jit
    def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(loss)(params, batch, gather)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    return step


def train(
    tx: optax.GradientTransformationExtraArgs,
    params: Any,
    batch: Any,
    steps: int,
    gather: bool,
    *,
    state: Any = None,
    step: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None,
) -> tuple[Any, Any]:
    """``init`` (unless ``state`` is given: a resumed run) and ``steps`` training steps, of ``step`` if given (one of
    :func:`make_step`'s, compiled already). Returns the final parameters and state."""
    step = make_step(tx, gather) if step is None else step
    state = jax.jit(tx.init)(params) if state is None else state
    for _ in range(steps):
        params, state = step(params, state, batch)
    return params, state


def place(host: Any, shardings: Any) -> Any:
    """Global arrays from host values that every process holds whole: each process fills its own shards."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host, shardings)


def check_state_placement(state: Any, params: dict[str, jax.Array], where: str, split: bool = False) -> None:
    """A state leaf with a parameter's shape (a moment, an accumulator) is placed as that parameter, or, ``split``
    (``zero``), along its first axis over the devices (every first axis of the model divides by them)."""
    by_shape = {p.shape: p for p in params.values()}  # the model's shapes are distinct
    for leaf in jax.tree.leaves(state):
        p = by_shape.get(tuple(getattr(leaf, "shape", ())))
        want = NamedSharding(p.sharding.mesh, P("data")) if split and p is not None else getattr(p, "sharding", None)
        if p is not None and not leaf.sharding.is_equivalent_to(want, p.ndim):
            raise AssertionError(f"{where}: a state leaf of shape {leaf.shape} is placed {leaf.sharding}, not {want}")


def checkpoint_key(case: str, placement: str) -> str:
    """A case's entry in the checkpoint of ``run_all``: its class and placement (orbax names leaves by their keys)."""
    return f"{case.split(':')[0]}_{placement}"


def run_all(checkpoint_dir: str | None = None) -> dict[str, np.ndarray]:
    """Every case under every placement on the global mesh; the final parameters, gathered to this host.

    Each run's parameters and state after :func:`checkpoint_step` steps are also gathered (``checkpoint/...``) and,
    with ``checkpoint_dir``, written there by all processes together in one orbax checkpoint, a dict of
    :func:`checkpoint_key` to ``{"params", "opt_state"}``, each process writing its own shards.
    """
    results: dict[str, np.ndarray] = {}
    kept: dict[str, dict[str, Any]] = {}
    the_mesh = mesh()
    with jax.set_mesh(the_mesh):
        x, y = host_batch()
        data = NamedSharding(the_mesh, P("data"))
        batch = place((x, y), (data, data))
        for case, make in cases().items():
            for placement in placements(case):
                shardings = {name: NamedSharding(the_mesh, spec) for name, spec in param_specs(placement).items()}
                params = place(host_params(), shardings)
                tx, gather = optimizer(make, placement), placement == "fsdp"
                step = make_step(tx, gather)
                params, state = train(tx, params, batch, checkpoint_step(case), gather, step=step)
                kept[checkpoint_key(case, placement)] = {"params": params, "opt_state": state}
                for name, value in multihost_utils.process_allgather(params, tiled=True).items():
                    results[f"checkpoint/{case}/{placement}/{name}"] = np.asarray(value)
                final, state = train(
                    tx, params, batch, n_steps(case) - checkpoint_step(case), gather, state=state, step=step
                )
                for name, p in final.items():
                    if not p.sharding.is_equivalent_to(shardings[name], p.ndim):
                        raise AssertionError(
                            f"{case}/{placement}: {name} is placed {p.sharding}, not {shardings[name]}"
                        )
                if not case.startswith("factored:"):  # its whole statistics share shapes with the model's vectors
                    check_state_placement(state, final, f"{case}/{placement}", split=placement == "zero")
                gathered = multihost_utils.process_allgather(final, tiled=True)
                for name, value in gathered.items():
                    results[f"{case}/{placement}/{name}"] = np.asarray(value)
    if checkpoint_dir is not None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(checkpoint_dir, "checkpoint"), kept)
        checkpointer.wait_until_finished()
    return results


def fault_optimizer() -> optax.GradientTransformationExtraArgs:
    """The optimizer of the fault scenario, which the test finishes from the last checkpoint."""
    return adaopt.adam(1e-3)


def _die_after(steps: int, dying: int, checkpoint_dir: str) -> None:
    """The fault scenario: process ``dying`` trains ``steps`` steps and exits without a word; the others train on.

    Every :data:`FAULT_CHECKPOINT_EVERY` steps, all processes write the fully-sharded ``{"params", "opt_state"}`` to
    an orbax ``CheckpointManager`` in ``checkpoint_dir/fault`` (each its own shards) and wait until it is committed.
    """
    manager = ocp.CheckpointManager(
        os.path.join(checkpoint_dir, "fault"),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),  # save() returns once committed
    )
    the_mesh = mesh()
    with jax.set_mesh(the_mesh):
        x, y = host_batch()
        data = NamedSharding(the_mesh, P("data"))
        batch = place((x, y), (data, data))
        shardings = {name: NamedSharding(the_mesh, spec) for name, spec in param_specs("fsdp").items()}
        params = place(host_params(), shardings)
        tx = fault_optimizer()
        step = make_step(tx, gather=True)
        state = jax.jit(tx.init)(params)
        i = 0
        while True:
            params, state = step(params, state, batch)
            jax.block_until_ready(params)
            i += 1
            if i % FAULT_CHECKPOINT_EVERY == 0:
                manager.save(i, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
            if jax.process_index() == dying and i == steps:
                print(f"process {dying}: exiting after {i} steps", flush=True)
                os._exit(3)  # no shutdown, no goodbye to the coordinator or the peers: a crash
            time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True, help="the folder where process I writes process_I.npz")
    parser.add_argument("--die-after-steps", type=int, default=0, help="the fault scenario: --die-process exits then")
    parser.add_argument("--die-process", type=int, default=1, help="the process that dies (0: the coordinator)")
    args = parser.parse_args(argv)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )
    if jax.device_count() != N_DEVICES:
        raise RuntimeError(
            f"expected {N_DEVICES} devices in all, got {jax.device_count()} ({jax.local_device_count()} local): "
            "set XLA_FLAGS=--xla_force_host_platform_device_count to 8 / the number of processes"
        )
    if args.die_after_steps:
        _die_after(args.die_after_steps, args.die_process, args.out)
    results = run_all(checkpoint_dir=args.out)
    np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), **results)  # type: ignore[arg-type]
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
