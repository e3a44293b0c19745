"""Train every optimizer in adaopt's registry on five small real workloads, and report how fast each converges.

The workloads (``benchmarks/workloads.py``): softmax regression, an MLP and a small convolutional
network on scikit-learn's digits, a character-level transformer language model on a text shipped
with CPython, and a noisy ill-conditioned quadratic. Each has a fixed budget of steps and a fixed
target of its reported metric.

For each optimizer and workload the learning rate runs on a 7-point geometric grid around the
learning rate ``lr`` of :mod:`benchmarks.learning_rates`: ``lr * 3**k`` for ``k = -3, ..., 3``. The 7 runs are one compiled
program: ``jax.vmap`` over the learning rate of a jitted ``lax.scan`` training loop (the factories
take traced learning rates), so each (optimizer, workload) pair compiles once.

- "defaults": that learning rate (``k = 0``, a point of the grid), all else at the
  factory's defaults.
- "tuned": the grid point with the lowest final value of the reported metric (the training
  objective on the whole training split for the digits workloads, held-out bits per character for
  the language model, the noiseless loss for the quadratic). A run whose metric is ever NaN or
  infinite has diverged: its final loss counts as infinite and it never reaches the target.

Schedules (``--schedule``, default ``cosine``): optimizers whose learning rate is tuned get a
cosine decay from the learning rate to 0 over the budget; those that are meant to run at their
defaults (``TUNING_FREE``), Schedule-Free (``AVERAGED_ITERATES``) and those whose step size decays
by itself (``CONSTANT_LEARNING_RATE``) get the constant learning rate, as their authors run them.
``--schedule constant`` gives every optimizer a constant learning rate.

Every step calls ``tx.update(grads, state, params, value=loss)`` (the loss-driven methods use the
loss); an optimizer with ``NEEDS_HESSIAN`` (Sophia) also gets ``hessian=``, Hutchinson's estimate of
the minibatch loss's Hessian diagonal (Sophia-H's), which it computes every ``update_interval`` steps
(its timed step includes that cost). Optimizers with ``AVERAGED_ITERATES`` are evaluated at
``adaopt.schedule_free_eval_params``.
Optimizers with ``FULL_BATCH`` (they compare the loss between steps) see the whole training set
every step on the workloads that have one, and are "n/a" on those that do not (the language model).
The minibatch sequences are fixed (seeded) and the same for every optimizer and learning rate.

Steps to target: the first evaluation (``--evals`` evenly spaced evaluations per run) at which the
metric is at or below the target. Seconds to target: steps to target times the seconds per step,
which is the sum of two timings taken after compilation (each the best of 3 calls): the
workload's loss-and-gradient step (once per workload, a tenth of the budget, one learning rate, no
evaluations; shared by every optimizer) and the optimizer's ``update`` and ``apply_updates`` on the
workload's parameters (200 steps, per optimizer and workload, at that learning rate).
Compilation is timed separately and never counted.

The performance profile (as in AlgoPerf, Dahl et al. 2023): on each workload the ratio of an
optimizer's seconds to target to the best optimizer's; an optimizer's profile at ``tau`` is the
fraction of workloads on which that ratio is at most ``tau`` (a workload not solved counts as an
infinite ratio).

``--tuning-free`` runs the ``TUNING_FREE`` optimizers at their defaults only, beside Adam tuned on
the grid (and, named ``<name>+cosine``, those of ``DECAYED_VARIANTS`` with their default learning
rate under a cosine decay over the budget, as their authors run them), and writes its own section: per workload, each method's final loss and its ratio to
tuned Adam's (within 5%?), steps and seconds to target, and the performance profile of these
methods against tuned Adam.

``--section language-model`` trains the GPT-style language model (``gpt``: 4 layers, width 128,
context 128) that the matrix optimizers (Muon, SOAP, Shampoo) are known to help, on the same 7-point
grids; its target is tuned AdamW's final loss there, so that steps to target are the steps each
optimizer needs to reach what AdamW reaches in the whole budget. It writes its own section, between
``<!-- language-model:begin -->`` and ``<!-- language-model:end -->``, and plots named ``language_model_*``.

``--optimizers`` also takes a registry entry with some of its arguments set, written
``name(key=value,...)`` (values as Python literals, else strings), as in
``--optimizers adamw,shampoo,"shampoo(graft=rmsprop,learning_rate=0.003)"``: the variant runs on
the grid around its entry's tuned learning rate, or around its own ``learning_rate``.

Results go between ``<!-- convergence:begin -->`` and ``<!-- convergence:end -->`` in ``--out``,
and the tuning-free comparison between ``<!-- tuning-free:begin -->`` and ``<!-- tuning-free:end -->``
(written by ``--tuning-free``, and by any run that holds Adam and a tuning-free method: the grid's
default points are the defaults); the rest of the file is kept. Plots (PNG) go to ``--plots``.

Usage::

    python -m benchmarks.convergence [--section convergence | language-model]
                                     [--workloads softmax,mlp] [--optimizers adam,sgd]
                                     [--steps-scale 1.0 | --quick] [--tuning-free]
                                     [--out benchmarks/RESULTS.md] [--plots benchmarks]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import adaopt
from adaopt import Capability, OptimizerSpec

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

from benchmarks import workloads as wl
from benchmarks.learning_rates import TUNED
from benchmarks.report import cell, invocation, load_average, machine, markdown_table, write_section

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Section:
    """A part of the results file that a grid run writes: its markers, title, plots and default workloads."""

    name: str  # the markers are <!-- name:begin --> and <!-- name:end -->; the plots' names start with it
    title: str
    workloads: tuple[str, ...]  # --workloads' default

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}:begin -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    @property
    def plot_prefix(self) -> str:
        return self.name.replace("-", "_")


SECTIONS = {
    "convergence": Section("convergence", "Convergence: small real workloads", wl.DEFAULT_WORKLOADS),
    "language-model": Section("language-model", "Convergence: a GPT-style language model", ("gpt",)),
}
BEGIN = SECTIONS["convergence"].begin
END = SECTIONS["convergence"].end
TF_BEGIN = "<!-- tuning-free:begin -->"
TF_END = "<!-- tuning-free:end -->"
DEFAULT_OUT = HERE / "RESULTS.md"
BASELINE = "adam"  # the tuned baseline of the tuning-free comparison
GRID_FACTOR = 3.0
GRID_POWERS = tuple(range(-3, 4))  # lr * 3**k: 7 points, the tuned learning rate in the middle
DEFAULT_INDEX = GRID_POWERS.index(0)
TAUS = (1.0, 1.5, 2.0, 4.0, 8.0, math.inf)
WITHIN = 0.05  # the goal: the tuning-free method's final loss within 5% of tuned Adam's
GRADIENT_TIMING_FRACTION = 0.1  # of the budget: the steps of the gradient's timing run
UPDATE_TIMING_STEPS = 200  # steps of the optimizer's timing run
TIMING_REPS = 3  # timed calls of each timing run, after compilation; the fastest counts
QUICK_SCALE = 0.1
COSINE = "+cosine"  # the suffix of a decayed variant's name
# Tuning-free methods whose learning rate multiplies the step size they estimate. The authors of
# Prodigy and D-Adaptation pair them with a decaying schedule (cosine annealing), Mechanic keeps its
# base optimizer's schedule; so ``--tuning-free`` also runs these (and DoG's family, to compare) with
# the default learning rate decayed to 0 by a cosine over the budget: still no tuning.
DECAYED_VARIANTS = ("prodigy", "dadapt_adam", "dadapt_sgd", "dadapt_adagrad", "mechanic", "dog", "ldog", "dowg")


# ---------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Run:
    """One optimizer on one workload, at each learning rate of its grid (or at its default only)."""

    optimizer: str
    workload: str
    learning_rates: list[float]
    default_index: int  # the tuned learning rate's index in ``learning_rates``
    eval_steps: list[int]  # 0, every, 2 * every, ..., steps
    losses: list[list[float]]  # (learning rate, evaluation)
    accuracies: list[list[float]]
    seconds_per_step: float  # gradient_s + update_s
    gradient_s: float  # the workload's loss and gradient, per step (the same for every optimizer)
    update_s: float  # the optimizer's update and apply_updates, per step
    compile_s: float  # the grid program and the update's timing program
    run_s: float  # the grid program, after compilation
    scheduled: bool  # cosine-decayed learning rate
    full_batch: bool
    skipped: str = ""  # why the pair did not run ("" when it did)

    def diverged(self, i: int) -> bool:
        return not all(math.isfinite(x) for x in self.losses[i])

    def final(self, i: int) -> float:
        return math.inf if self.diverged(i) else self.losses[i][-1]

    def final_accuracy(self, i: int) -> float:
        return math.nan if self.diverged(i) else self.accuracies[i][-1]

    def steps_to(self, i: int, target: float) -> int | None:
        if self.diverged(i):
            return None
        return next((s for s, x in zip(self.eval_steps, self.losses[i], strict=True) if x <= target), None)

    def seconds_to(self, i: int, target: float) -> float | None:
        steps = self.steps_to(i, target)
        return None if steps is None else steps * self.seconds_per_step

    @property
    def tuned_index(self) -> int | None:
        """The learning rate with the lowest final loss; None when every one diverged."""
        if self.skipped:
            return None
        finals = [self.final(i) for i in range(len(self.learning_rates))]
        best = min(range(len(finals)), key=finals.__getitem__) if finals else None
        return None if best is None or not math.isfinite(finals[best]) else best


def base_name(name: str) -> str:
    """The registry entry a (decayed or configured) variant's ``name`` derives from."""
    return name.split("(", 1)[0].removesuffix(COSINE)


def tuned_rate(spec: OptimizerSpec) -> float:
    """The learning rate ``spec`` runs at by default: the tuned one of its registry entry (a variant's too), or the
    ``learning_rate`` a configured variant sets."""
    if "(" in spec.name:
        rate = configured_arguments(spec.name)[1].get("learning_rate")
        if rate is not None:
            return float(rate)
    return TUNED[base_name(spec.name)]


def learning_rate_grid(spec: OptimizerSpec) -> list[float]:
    """``lr * 3**k`` for ``k = -3, ..., 3`` around the tuned learning rate (benchmarks/learning_rates.py)."""
    return [tuned_rate(spec) * GRID_FACTOR**k for k in GRID_POWERS]


def cosine_variant(spec: OptimizerSpec) -> OptimizerSpec:
    """``spec`` run with its default learning rate under a cosine decay (one of ``DECAYED_VARIANTS``)."""
    return dataclasses.replace(spec, name=spec.name + COSINE)


CONFIGURED = re.compile(r"(?P<base>\w+)\((?P<arguments>[^()]*)\)")


def configured_arguments(name: str) -> tuple[OptimizerSpec, dict[str, Any]]:
    """The registry entry and the arguments of a configured variant's ``name``, ``base(key=value,...)``.

    Values are read as Python literals (``b2=0.95``, ``nesterov=False``), anything else as a string
    (``graft=rmsprop``). Raises ValueError for a malformed name or an unknown entry.
    """
    match = CONFIGURED.fullmatch(name.replace(" ", ""))
    if match is None or match["base"] not in adaopt.REGISTRY:
        raise ValueError(f"{name!r} is not a registry entry nor one written name(key=value,...)")
    arguments: dict[str, Any] = {}
    for item in filter(None, match["arguments"].split(",")):
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{name!r}: {item!r} is not key=value")
        try:
            arguments[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            arguments[key] = text
    return adaopt.REGISTRY[match["base"]], arguments


def configured_variant(name: str) -> OptimizerSpec:
    """The registry entry ``base`` with some arguments set, named ``base(key=value,...)``; a ``learning_rate``
    among them is the centre of its grid (:func:`tuned_rate`), not a fixed rate.

    Raises ValueError for a malformed name, an unknown entry or argument, or an invalid value.
    """
    base, arguments = configured_arguments(name)
    fixed = {k: v for k, v in arguments.items() if k != "learning_rate"}
    try:
        base.make(**arguments)
    except TypeError as error:
        raise ValueError(f"{name!r}: {error}") from error
    canonical = ",".join(f"{k}={v}" for k, v in arguments.items())
    return dataclasses.replace(base, name=f"{base.name}({canonical})", factory=functools.partial(base.factory, **fixed))


def spec_of(name: str) -> OptimizerSpec:
    """The registry entry ``name``, the decayed variant that ``name + COSINE`` names, or a configured variant."""
    if name.endswith(COSINE):
        return cosine_variant(adaopt.REGISTRY[name.removesuffix(COSINE)])
    if name in adaopt.REGISTRY:
        return adaopt.REGISTRY[name]
    return configured_variant(name)


def is_scheduled(spec: OptimizerSpec, schedule: str) -> bool:
    """Whether the optimizer gets a cosine-decayed learning rate (see the module docstring)."""
    if spec.name.endswith(COSINE):
        return True
    own = {Capability.TUNING_FREE, Capability.AVERAGED_ITERATES, Capability.CONSTANT_LEARNING_RATE}
    return schedule == "cosine" and not (own & spec.capabilities)


def budget(workload: wl.Workload, scale: float, evals: int | None) -> tuple[int, int]:
    """(steps, steps between evaluations): the budget scaled, rounded to a multiple of the evaluations.

    ``evals`` None: the workload's own number of evaluations.
    """
    steps = max(1, round(workload.steps * scale))
    n_evals = max(1, min(evals or workload.evals, steps))
    every = max(1, round(steps / n_evals))
    return every * n_evals, every


def _chunked(batches: Any, n_evals: int, every: int) -> Any:
    return jax.tree.map(lambda b: jnp.asarray(b).reshape(n_evals, every, *b.shape[1:]), batches)


def _optimizer(spec: OptimizerSpec, lr: Any, steps: int, scheduled: bool) -> optax.GradientTransformationExtraArgs:
    rate = optax.cosine_decay_schedule(lr, steps) if scheduled else lr
    return spec.factory(learning_rate=rate)


def _grad_fn(workload: wl.Workload) -> Callable[..., Any]:
    return jax.value_and_grad(workload.loss, has_aux=True)


def _train_fn(spec: OptimizerSpec, workload: wl.Workload, steps: int, scheduled: bool) -> Callable[..., Any]:
    """``train(lr, params, data, chunks) -> (losses, accuracies)``, evaluated after each chunk of steps."""
    averaged = Capability.AVERAGED_ITERATES in spec.capabilities
    grad = _grad_fn(workload)

    def train(lr: Any, params: Any, data: Any, chunks: Any) -> tuple[jax.Array, jax.Array]:
        tx = _optimizer(spec, lr, steps, scheduled)

        def step(carry: tuple[Any, Any, Any], batch: Any) -> tuple[tuple[Any, Any, Any], None]:
            params, state, key = carry
            key, probe = jax.random.split(key)
            (_, value), grads = grad(params, data, batch)
            extras = wl.update_extras(spec, lambda p: workload.loss(p, data, batch)[0], probe)
            updates, state = tx.update(grads, state, params, value=value, **extras)
            return (optax.apply_updates(params, updates), state, key), None

        def chunk(carry: tuple[Any, Any, Any], batches: Any) -> tuple[tuple[Any, Any, Any], tuple[jax.Array, ...]]:
            carry, _ = jax.lax.scan(step, carry, batches)
            params, state, _ = carry
            point = adaopt.schedule_free_eval_params(state, params) if averaged else params
            return carry, workload.evaluate(point, data)

        start = (params, tx.init(params), jax.random.key(wl.SEED))
        _, (losses, accuracies) = jax.lax.scan(chunk, start, chunks)
        return losses, accuracies

    return train


def _best_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def time_gradient(workload: wl.Workload, params: Any, data: Any, batches: Any) -> tuple[float, float]:
    """(seconds per step, compile seconds) of the workload's loss and gradient, over the given batches.

    Each step also moves the parameters by ``1e-9`` times the gradient, so that nothing is
    optimised away and every step starts from new parameters.
    """
    grad = _grad_fn(workload)

    def steps(params: Any, data: Any, batches: Any) -> jax.Array:
        def step(p: Any, batch: Any) -> tuple[Any, jax.Array]:
            (_, value), g = grad(p, data, batch)
            return jax.tree.map(lambda a, b: a - 1e-9 * b, p, g), value

        return jax.lax.scan(step, params, batches)[1]

    start = time.perf_counter()
    compiled = jax.jit(steps).lower(params, data, batches).compile()
    compile_s = time.perf_counter() - start
    n = len(jax.tree.leaves(batches)[0])
    return _best_time(lambda: compiled(params, data, batches), TIMING_REPS) / n, compile_s


def time_update(
    spec: OptimizerSpec, lr: float, steps: int, scheduled: bool, params: Any, grads: Any, value: Any,
    loss_of_params: Callable[[Any], jax.Array],
) -> tuple[float, float]:  # fmt: skip
    """(seconds per step, compile seconds) of ``tx.update`` + ``optax.apply_updates`` at the learning rate ``lr``
    (with a Hessian estimate of ``loss_of_params`` every ``update_interval`` steps where ``spec`` takes one)."""

    def run(params: Any, grads: Any, value: Any) -> Any:
        tx = _optimizer(spec, lr, steps, scheduled)
        extras = wl.update_extras(spec, loss_of_params, jax.random.key(wl.SEED))

        def step(carry: tuple[Any, Any], _: None) -> tuple[tuple[Any, Any], None]:
            p, s = carry
            updates, s = tx.update(grads, s, p, value=value, **extras)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, tx.init(params)), None, length=UPDATE_TIMING_STEPS)[0][0]

    start = time.perf_counter()
    compiled = jax.jit(run).lower(params, grads, value).compile()
    compile_s = time.perf_counter() - start
    return _best_time(lambda: compiled(params, grads, value), TIMING_REPS) / UPDATE_TIMING_STEPS, compile_s


@dataclasses.dataclass
class Prepared:
    """What every optimizer shares on one workload: initial parameters, data, batches, gradient timings."""

    workload: wl.Workload
    params: Any
    data: Any
    loss0: float
    accuracy0: float
    _batches: dict[tuple[int, bool], Any] = dataclasses.field(default_factory=dict)
    _gradient: dict[tuple[int, bool], tuple[float, float, Any, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, workload: wl.Workload) -> Prepared:
        params = jax.tree.map(jnp.asarray, workload.init())
        data = jax.tree.map(jnp.asarray, workload.data)
        loss0, accuracy0 = jax.jit(workload.evaluate)(params, data)
        return cls(workload, params, data, float(loss0), float(accuracy0))

    def batches(self, steps: int, full_batch: bool) -> Any:
        key = (steps, full_batch)
        if key not in self._batches:
            self._batches[key] = jax.tree.map(jnp.asarray, self.workload.batches(steps, full_batch))
        return self._batches[key]

    def gradient(self, steps: int, full_batch: bool) -> tuple[float, float, Any, Any]:
        """(seconds per step, compile seconds, gradient, value) of the gradient; the gradient at the start."""
        key = (steps, full_batch)
        if key not in self._gradient:
            batches = self.batches(steps, full_batch)
            n = max(1, round(GRADIENT_TIMING_FRACTION * steps))
            seconds, compile_s = time_gradient(
                self.workload, self.params, self.data, jax.tree.map(lambda b: b[:n], batches)
            )
            first = jax.tree.map(lambda b: b[0], batches)
            (_, value), grads = jax.jit(_grad_fn(self.workload))(self.params, self.data, first)
            self._gradient[key] = (seconds, compile_s, grads, value)
        return self._gradient[key]


def run_pair(spec: OptimizerSpec, prepared: Prepared, learning_rates: Sequence[float], default_index: int, *,
             scale: float, evals: int | None, schedule: str) -> Run:  # fmt: skip
    """Train ``spec`` at every learning rate (one vmapped program), and time its step at the default one."""
    workload = prepared.workload
    full_batch = Capability.FULL_BATCH in spec.capabilities
    scheduled = is_scheduled(spec, schedule)
    steps, every = budget(workload, scale, evals)
    n_evals = steps // every
    if full_batch and not workload.has_full_batch:
        return Run(
            spec.name, workload.name, list(learning_rates), default_index, [], [], [], math.nan, math.nan,
            math.nan, 0.0, 0.0, scheduled, full_batch,
            skipped="needs the same objective every step (full_batch); this workload has no full batch",
        )  # fmt: skip
    batches = prepared.batches(steps, full_batch)
    chunks = _chunked(batches, n_evals, every)
    rates = jnp.asarray(learning_rates, jnp.float32)
    grad_s, _, grads, value = prepared.gradient(steps, full_batch)

    start = time.perf_counter()
    train = jax.jit(jax.vmap(_train_fn(spec, workload, steps, scheduled), in_axes=(0, None, None, None)))
    grid = train.lower(rates, prepared.params, prepared.data, chunks).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    losses, accuracies = jax.block_until_ready(grid(rates, prepared.params, prepared.data, chunks))
    run_s = time.perf_counter() - start
    first_batch = jax.tree.map(lambda b: b[0], batches)
    update_s, update_compile_s = time_update(
        spec, float(learning_rates[default_index]), steps, scheduled, prepared.params, grads, value,
        lambda p: workload.loss(p, prepared.data, first_batch)[0],
    )  # fmt: skip

    def curves(values: Any, first: float) -> list[list[float]]:
        values = np.asarray(values, np.float64)
        return np.concatenate([np.full((len(learning_rates), 1), first), values], 1).tolist()

    return Run(
        spec.name,
        workload.name,
        [float(x) for x in learning_rates],
        default_index,
        [every * i for i in range(n_evals + 1)],
        curves(losses, prepared.loss0),
        curves(accuracies, prepared.accuracy0),
        grad_s + update_s,
        grad_s,
        update_s,
        compile_s + update_compile_s,
        run_s,
        scheduled,
        full_batch,
    )


@dataclasses.dataclass
class Suite:
    """All the runs of one invocation, and what it needs to render them."""

    mode: str  # "grid" or "tuning-free"
    workloads: dict[str, wl.Workload]
    runs: dict[tuple[str, str], Run]  # (optimizer, workload)
    optimizers: list[str]
    schedule: str
    scale: float
    evals: int | None
    load_start: str = "unknown"
    load_end: str = "unknown"
    elapsed_s: float = 0.0
    gradient_compile_s: float = 0.0  # the gradient timing programs, one per workload (and batch kind)
    section: Section = SECTIONS["convergence"]


def run_suite(
    specs: Sequence[OptimizerSpec],
    workload_names: Sequence[str],
    *,
    tuning_free: bool = False,
    scale: float = 1.0,
    evals: int | None = None,
    schedule: str = "cosine",
    progress: bool = True,
    section: Section = SECTIONS["convergence"],
    grid: Callable[[OptimizerSpec], list[float]] = learning_rate_grid,
) -> Suite:
    """Every (optimizer, workload) pair: on the grid, or (``tuning_free``) at the defaults only but the baseline.

    ``grid``: each optimizer's learning rates (its middle point the default run).
    """
    start = time.perf_counter()
    load_start = load_average()
    workloads = {name: wl.WORKLOADS[name]() for name in workload_names}
    runs: dict[tuple[str, str], Run] = {}
    pairs = [(spec, w) for w in workloads.values() for spec in specs]
    bar = tqdm(pairs, disable=not progress, unit="run", dynamic_ncols=True)
    gradient_compile_s = 0.0
    for workload in workloads.values():
        prepared = Prepared.of(workload)
        for spec in specs:
            bar.set_description(f"{workload.name:>9} {spec.name:>20}")
            if tuning_free and spec.name != BASELINE:
                rates, default_index = [tuned_rate(spec)], 0
            else:
                rates, default_index = grid(spec), DEFAULT_INDEX
            try:
                run = run_pair(spec, prepared, rates, default_index, scale=scale, evals=evals, schedule=schedule)
            except Exception as error:  # one broken pair is reported, not allowed to end a long run
                reason = f"failed with {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                run = Run(spec.name, workload.name, list(rates), default_index, [], [], [], math.nan, math.nan,
                          math.nan, 0.0, 0.0, is_scheduled(spec, schedule), Capability.FULL_BATCH in spec.capabilities,
                          skipped=reason)  # fmt: skip
            runs[spec.name, workload.name] = run
            if not run.skipped and run.tuned_index is not None:
                bar.set_postfix(final=f"{run.final(run.tuned_index):.3g}")
            bar.update()
        gradient_compile_s += sum(g[1] for g in prepared._gradient.values())
        jax.clear_caches()
    bar.close()
    return Suite(
        "tuning-free" if tuning_free else "grid",
        workloads,
        runs,
        [s.name for s in specs],
        schedule,
        scale,
        evals,
        load_start,
        load_average(),
        time.perf_counter() - start,
        gradient_compile_s,
        section,
    )


# ---------------------------------------------------------------------------------------------
# Performance profiles.


Times = Mapping[str, Mapping[str, float | None]]  # optimizer -> workload -> seconds to target (None: not reached)


def ratios(times: Times) -> dict[str, list[float]]:
    """Each optimizer's time to target over the best optimizer's, per workload (in sorted workload order).

    Not reached, or a workload no optimizer solved: an infinite ratio.
    """
    workloads = sorted({w for per in times.values() for w in per})
    best: dict[str, float | None] = {}
    for w in workloads:
        reached = [x for per in times.values() if (x := per.get(w)) is not None]
        best[w] = min(reached) if reached else None
    out: dict[str, list[float]] = {}
    for name, per in times.items():
        out[name] = []
        for w in workloads:
            x, b = per.get(w), best[w]
            if x is None or b is None:
                out[name].append(math.inf)
            else:
                out[name].append(x / b if b > 0 else 1.0)
    return out


def profile(times: Times, taus: Sequence[float] = TAUS) -> dict[str, list[float]]:
    """For each optimizer, the fraction of workloads whose time to target is within ``tau`` x the best.

    τ = ∞ counts the workloads solved at all; a workload that no optimizer solved counts as unsolved.
    """
    return {
        name: [sum(math.isfinite(r) and r <= tau for r in rs) / max(1, len(rs)) for tau in taus]
        for name, rs in ratios(times).items()
    }


def ratio_curve(times: Times) -> dict[str, list[float]]:
    """Each optimizer's finite ratios, sorted (the steps of its profile plot)."""
    return {name: sorted(r for r in rs if math.isfinite(r)) for name, rs in ratios(times).items()}


# ---------------------------------------------------------------------------------------------
# The report.


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _tau(tau: float) -> str:
    return "∞" if math.isinf(tau) else f"{tau:g}"


def _header(suite: Suite, command: str, title: str) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    compile_s = suite.gradient_compile_s + sum(r.compile_s for r in suite.runs.values())
    parts = [f"## {title}", "", f"Finished {now}, {suite.elapsed_s:.0f} s in all ({compile_s:.0f} s compiling), with:"]
    parts += ["", "```", command, "```", ""]
    parts += [f"- {key}: {value}" for key, value in machine().items()]
    parts += [f"- load average (1, 5, 15 min): {suite.load_start} at the start, {suite.load_end} at the end", ""]
    return parts


def _workload_lines(w: wl.Workload, steps: int, every: int) -> list[str]:
    return [
        f"### `{w.name}`: {w.summary}",
        "",
        f"{steps} steps; metric: {w.metric}, evaluated every {every} steps; target: **{w.target:.4g}**.",
        "",
    ]


def _lr_text(run: Run, i: int | None) -> str:
    return "—" if i is None else f"{run.learning_rates[i]:.3g}"


def render_grid(suite: Suite, command: str, plots: Mapping[str, str]) -> str:
    """The grid run's section (markers included): ``convergence``, or the suite's own."""
    parts = [suite.section.begin, *_header(suite, command, suite.section.title)]
    parts += [
        f"Learning rates: a 7-point grid `lr * 3**k`, k = -3..3, around the tuned `lr` of benchmarks/learning_rates.py, run as one vmapped "
        f"program; **tuned** = the grid point with the lowest final metric; **default** = that `lr` "
        f"(k = 0). Schedule: {suite.schedule} (cosine decay for the optimizers whose learning rate is tuned; "
        "constant for tuning-free, Schedule-Free and self-decaying ones). Steps to target: first of the evenly "
        "spaced evaluations at or below the target; seconds = steps x ms/step, where ms/step = the workload's "
        "loss-and-gradient step (timed once per workload) + the optimizer's `update` and `apply_updates` (timed "
        "per pair), compilation excluded (compile s: the pair's programs). Diverged: a NaN or infinite metric. "
        "Accuracy: test accuracy (digits), next-character validation accuracy (charlm).",
        "",
    ]
    for w in suite.workloads.values():
        steps, every = budget(w, suite.scale, suite.evals)
        parts += _workload_lines(w, steps, every)
        header = [
            "optimizer", "lr default", "lr tuned", "final tuned", "final default", "acc tuned", "acc default",
            "steps to target tuned", "s to target tuned", "steps to target default", "s to target default",
            "ms/step", "compile s",
        ]  # fmt: skip
        rows, notes = [], []
        runs = [suite.runs[name, w.name] for name in suite.optimizers]
        for run in sorted(runs, key=lambda r: (bool(r.skipped), _sort_key(r))):
            if run.skipped:
                notes.append(f"- {run.optimizer}: n/a, {run.skipped}.")
                continue
            t, d = run.tuned_index, run.default_index
            rows.append(
                [
                    run.optimizer,
                    _lr_text(run, d),
                    _lr_text(run, t),
                    cell(math.inf if t is None else run.final(t)),
                    cell(run.final(d)),
                    _pct(run.final_accuracy(t)) if t is not None and w.has_accuracy else "n/a",
                    _pct(run.final_accuracy(d)) if w.has_accuracy else "n/a",
                    cell(None if t is None else run.steps_to(t, w.target), "d"),
                    cell(None if t is None else run.seconds_to(t, w.target), ".3g"),
                    cell(run.steps_to(d, w.target), "d"),
                    cell(run.seconds_to(d, w.target), ".3g"),
                    f"{1e3 * run.seconds_per_step:.3g}",
                    f"{run.compile_s:.1f}",
                ]
            )
        parts += [markdown_table(header, rows), ""]
        edge = [r.optimizer for r in runs if not r.skipped and r.tuned_index in (0, len(r.learning_rates) - 1)]
        if edge:
            notes.append(f"- tuned at an end of the grid (the best rate may lie outside it): {', '.join(edge)}.")
        whole = [r.optimizer for r in runs if not r.skipped and r.full_batch]
        if whole:
            notes.append(f"- the whole training split at every step (`Capability.FULL_BATCH`): {', '.join(whole)}.")
        parts += [*notes, ""] if notes else []
        if w.name in plots:
            parts += [f"![{w.name} loss curves]({plots[w.name]})", ""]
    parts += _profile_lines(suite, _times(suite, "tuned"), "tuned learning rate", plots.get("profile"))
    parts += _profile_lines(suite, _times(suite, "default"), "registry learning rate (defaults)", None)
    parts.append(suite.section.end)
    return "\n".join(parts) + "\n"


def _sort_key(run: Run) -> tuple[float, str]:
    t = run.tuned_index
    return (math.inf if t is None else run.final(t), run.optimizer)


def _times(suite: Suite, which: str) -> dict[str, dict[str, float | None]]:
    """Seconds to target per optimizer and workload, of the tuned or the default run (skipped pairs left out)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in suite.optimizers:
        out[name] = {}
        for w in suite.workloads.values():
            run = suite.runs[name, w.name]
            if run.skipped:
                out[name][w.name] = None
                continue
            i = run.tuned_index if which == "tuned" else run.default_index
            out[name][w.name] = None if i is None else run.seconds_to(i, w.target)
    return out


def _profile_lines(suite: Suite, times: Times, what: str, plot: str | None) -> list[str]:
    prof = profile(times)
    header = ["optimizer", *(f"τ = {_tau(t)}" for t in TAUS), "solved"]
    ranked = sorted(prof, key=lambda n: (-sum(prof[n]), n))
    n = len(suite.workloads)
    rows = [[name, *(f"{x:.2f}" for x in prof[name]), f"{round(prof[name][-1] * n)}/{n}"] for name in ranked]
    parts = [
        f"### Performance profile: {what}",
        "",
        "Fraction of the workloads on which the optimizer reaches the target within τ times the fastest "
        "optimizer's seconds to target (τ = ∞: reaches it at all).",
        "",
        markdown_table(header, rows),
        "",
    ]
    if plot:
        parts += [f"![performance profile]({plot})", ""]
    return parts


def render_tuning_free(suite: Suite, command: str, plots: Mapping[str, str]) -> str:
    """The ``tuning-free`` section (markers included): the tuning-free methods against tuned Adam."""
    parts = [TF_BEGIN, *_header(suite, command, f"Tuning-free methods at their defaults against tuned {BASELINE}")]
    free = tuning_free_names(suite)
    parts += [
        f"Each `Capability.TUNING_FREE` method runs once, at its defaults (`<name>{COSINE}`: the same with its default "
        "learning rate decayed to 0 by a cosine over the budget, as the authors of Prodigy and D-Adaptation run "
        f"them); {BASELINE} runs on the 7-point grid "
        f"`lr * 3**k` (k = -3..3, lr = {TUNED[BASELINE]:g}) with a {suite.schedule} "
        f"schedule, and the grid point with the lowest final metric is its tuned run. **ratio** = the method's "
        f"final metric / tuned {BASELINE}'s; **within 5%**: ratio <= {1 + WITHIN:g}. Seconds to target = steps "
        "to target x seconds per step (compilation excluded).",
        "",
    ]
    baseline_final: dict[str, float] = {}
    for w in suite.workloads.values():
        steps, every = budget(w, suite.scale, suite.evals)
        parts += _workload_lines(w, steps, every)
        base = suite.runs[BASELINE, w.name]
        t = base.tuned_index
        adam_final = math.inf if t is None else base.final(t)
        baseline_final[w.name] = adam_final
        header = ["method", "final", f"ratio to tuned {BASELINE}", "within 5%", "accuracy", "steps to target",
                  "s to target", "ms/step"]  # fmt: skip
        rows = [
            [
                f"**{BASELINE} (tuned, lr {_lr_text(base, t)})**",
                cell(adam_final),
                "1",
                "—",
                _pct(base.final_accuracy(t)) if t is not None and w.has_accuracy else "n/a",
                cell(None if t is None else base.steps_to(t, w.target), "d"),
                cell(None if t is None else base.seconds_to(t, w.target), ".3g"),
                f"{1e3 * base.seconds_per_step:.3g}",
            ]
        ]
        notes = []
        for name in sorted(free, key=lambda n: (bool(suite.runs[n, w.name].skipped), _final_default(suite, n, w))):
            run = suite.runs[name, w.name]
            if run.skipped:
                notes.append(f"- {name}: n/a, {run.skipped}.")
                continue
            d = run.default_index
            final = run.final(d)
            ratio = final / adam_final if math.isfinite(adam_final) and adam_final > 0 else math.nan
            rows.append(
                [
                    name,
                    cell(final),
                    cell(ratio, ".3f"),
                    "n/a" if math.isnan(ratio) else ("yes" if ratio <= 1 + WITHIN else "no"),
                    _pct(run.final_accuracy(d)) if w.has_accuracy else "n/a",
                    cell(run.steps_to(d, w.target), "d"),
                    cell(run.seconds_to(d, w.target), ".3g"),
                    f"{1e3 * run.seconds_per_step:.3g}",
                ]
            )
        parts += [markdown_table(header, rows), "", *notes, *([""] if notes else [])]
    if plots.get("tf_curves"):
        parts += [f"![tuning-free loss curves]({plots['tf_curves']})", ""]

    times = {name: dict(per) for name, per in _times_tf(suite).items()}
    parts += _profile_lines(suite, times, f"tuning-free methods at their defaults and tuned {BASELINE}", None)
    if plots.get("tf_profile"):
        parts += [f"![tuning-free performance profile]({plots['tf_profile']})", ""]
    parts += _verdict(suite, free, baseline_final, times)
    parts.append(TF_END)
    return "\n".join(parts) + "\n"


def _final_default(suite: Suite, name: str, w: wl.Workload) -> float:
    run = suite.runs[name, w.name]
    return math.inf if run.skipped else run.final(run.default_index)


def tuning_free_names(suite: Suite) -> list[str]:
    """The suite's ``Capability.TUNING_FREE`` optimizers (the baseline left out)."""
    return [n for n in suite.optimizers if n != BASELINE and Capability.TUNING_FREE in spec_of(n).capabilities]


def has_tuning_free_comparison(suite: Suite) -> bool:
    """Whether the suite holds tuned Adam and a tuning-free method at its defaults, on the small workloads."""
    if suite.section.name != "convergence":
        return False
    return BASELINE in suite.optimizers and bool(tuning_free_names(suite))


def _times_tf(suite: Suite) -> dict[str, dict[str, float | None]]:
    """Tuned time for the baseline, default-run time for the tuning-free methods."""
    tuned = _times(suite, "tuned")
    default = _times(suite, "default")
    return {BASELINE: tuned[BASELINE], **{name: default[name] for name in tuning_free_names(suite)}}


def _verdict(
    suite: Suite,
    free: Sequence[str],
    baseline_final: Mapping[str, float],
    times: Times,
) -> list[str]:
    """The goal, method by method: within 5% on every workload, and a profile at least as good."""
    prof = profile(times)
    n = len(suite.workloads)
    rows = []
    winners = []
    for name in free:
        within = 0
        for w in suite.workloads.values():
            run = suite.runs[name, w.name]
            if run.skipped:
                continue
            base = baseline_final[w.name]
            if math.isfinite(base) and run.final(run.default_index) <= (1 + WITHIN) * base:
                within += 1
        dominates = all(a >= b for a, b in zip(prof[name], prof[BASELINE], strict=True))
        if within == n and dominates:
            winners.append(name)
        rows.append([name, f"{within}/{n}", "yes" if dominates else "no", "yes" if within == n and dominates else "no"])
    rows.sort(key=lambda r: (r[3] != "yes", -int(r[1].split("/")[0]), r[2] != "yes", r[0]))
    verdict = (
        f"**Goal met** by {', '.join(winners)}."
        if winners
        else f"**Goal not met**: no tuning-free method is within 5% of tuned {BASELINE} on every workload with a "
        "performance profile at least as good."
    )
    return [
        "### The goal: within 5% of tuned Adam",
        "",
        f"The best tuning-free method should end within 5% of tuned {BASELINE}'s final metric on every workload "
        f"and have a performance profile at least as good as tuned {BASELINE}'s (at every τ above).",
        "",
        markdown_table(["method", "workloads within 5%", f"profile >= tuned {BASELINE}", "goal met"], rows),
        "",
        verdict,
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Plots.
#
# Thirty curves in one panel cannot be told apart, so every plot draws the best few in colour, the
# baseline (Adam) in black, and the rest as thin grey lines under one legend entry: "the others".

HIGHLIGHT = 5  # optimizers drawn in colour per panel, beside the baseline
_BASELINE_STYLE: dict[str, Any] = {"color": "black", "lw": 2.4, "zorder": 4}
_OTHERS_STYLE: dict[str, Any] = {"color": "0.72", "lw": 0.8, "alpha": 0.8, "zorder": 1}


def highlighted(ranked: Sequence[str], baseline: str | None, n: int = HIGHLIGHT) -> list[str]:
    """The names drawn in colour: the first ``n`` of ``ranked`` (best first) that are not the baseline."""
    return [name for name in ranked if name != baseline][:n]


def _colour(rank: int) -> Any:
    """The colour of the ``rank``-th highlighted curve of a panel: saturated, never grey."""
    return plt.get_cmap("tab10")((0, 1, 2, 3, 4, 5, 6, 8, 9)[rank % 9])


def _plain_log_ticks(ax: Any) -> None:
    """Log-scale y ticks written as plain numbers (0.1, 0.2, 3.5), not as powers of ten."""
    formatter = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.3g}")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(formatter)
    if high < 20 * low:  # under about a decade: label the minor ticks too, there are few
        ax.yaxis.set_minor_formatter(formatter)
        ax.tick_params(axis="y", which="minor", labelsize="x-small")
    elif high < 200 * low:  # two decades or so: label 2 and 5 times each power of ten
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.3g}" if f"{y:.1e}"[0] in "25" else "")
        )
        ax.tick_params(axis="y", which="minor", labelsize="x-small")
    else:
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _curve(ax: Any, run: Run, i: int, **kw: Any) -> None:
    y = np.asarray(run.losses[i], np.float64)
    y = np.where(np.isfinite(y), y, np.nan)
    ax.plot(run.eval_steps, y, **kw)


def _final_text(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


def _panel(ax: Any, curves: Mapping[str, tuple[Run, int]], baseline: str | None, shown: Sequence[str]) -> list[str]:
    """Draw ``curves`` (name -> run and learning-rate index): ``shown`` in colour, the baseline in black,
    the rest in grey; returns the legend's labels, in order."""
    others = [name for name in curves if name not in shown and name != baseline]
    for k, name in enumerate(others):
        run, i = curves[name]
        _curve(ax, run, i, label=f"the {len(others)} others" if k == 0 else None, **_OTHERS_STYLE)
    for rank, name in enumerate(shown):
        run, i = curves[name]
        _curve(ax, run, i, label=f"{name} ({_final_text(run.final(i))})", color=_colour(rank), lw=1.8, zorder=3)
    if baseline is not None and baseline in curves:
        run, i = curves[baseline]
        _curve(ax, run, i, label=f"{baseline}, baseline ({_final_text(run.final(i))})", **_BASELINE_STYLE)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: labels[j].startswith("the ") and labels[j].endswith(" others"))
    ax.legend([handles[j] for j in order], [labels[j] for j in order], loc="upper right", fontsize="x-small")
    return [labels[j] for j in order]


def _ranked(curves: Mapping[str, tuple[Run, int]], target: float) -> list[str]:
    """Best first: the lowest final metric as the tables print it (4 digits, diverged runs last), then
    the fewest steps to the target (a tie on the final metric goes to the faster run), then the name."""

    def key(name: str) -> tuple[float, float, str]:
        run, i = curves[name]
        final, steps = run.final(i), run.steps_to(i, target)
        return (float(f"{final:.4g}") if math.isfinite(final) else math.inf, math.inf if steps is None else steps, name)

    return sorted(curves, key=key)


def plot_workload(suite: Suite, w: wl.Workload, path: Path) -> dict[str, list[str]]:
    """Two panels, at the tuned and at the default learning rate (log y): in each, the ``HIGHLIGHT``
    optimizers with the lowest final metric (on a tie, the fewest steps to the target) in colour, Adam in
    black, the others in grey.

    Returns each panel's legend labels.
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True, constrained_layout=True)
    panels: dict[str, dict[str, tuple[Run, int]]] = {}
    for which in ("tuned", "default"):
        panels[which] = {}
        for name in suite.optimizers:
            run = suite.runs[name, w.name]
            i = run.tuned_index if which == "tuned" else run.default_index
            if not run.skipped and i is not None:
                panels[which][name] = (run, i)
    legends = {}
    for ax, (which, curves) in zip(axes, panels.items(), strict=True):
        legends[which] = _panel(ax, curves, BASELINE, highlighted(_ranked(curves, w.target), BASELINE))
        ax.axhline(w.target, color="black", lw=0.8, ls=":")
        ax.set(xlabel="step", yscale="log", title=f"{which} learning rate (final metric in the legend)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"{w.metric} (dotted: target)")
    _clip_y(axes[0], w)
    fig.suptitle(textwrap.fill(f"{w.name}: {w.summary}", 120), fontsize="medium")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return legends


def _clip_y(ax: Any, w: wl.Workload) -> None:
    """Keep the target in view and cut off blow-ups far above the start."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, w.target / 30), min(high, 1e3 * max(w.target, 1e-12)))
    _plain_log_ticks(ax)


def plot_profile(times: Times, path: Path, title: str, baseline: str | None = BASELINE) -> list[str]:
    """Step curves: the fraction of workloads solved within τ times the best, against τ (log x). The
    ``HIGHLIGHT`` optimizers with the best profile (the table's order) in colour, the baseline in
    black, the others in grey. Returns the legend's labels."""
    curves = ratio_curve(times)
    prof = profile(times)
    ranked = sorted(prof, key=lambda name: (-sum(prof[name]), name))
    shown = highlighted(ranked, baseline)
    n = len({w for t in times.values() for w in t})
    finite = [r for c in curves.values() for r in c]
    tau_max = max([8.0, *finite]) * 1.5
    fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    others = [name for name in ranked if name not in shown and name != baseline]
    for name in [*others, *shown, *([baseline] if baseline is not None and baseline in curves else [])]:
        xs = [*sorted({1.0, *curves[name]}), tau_max]
        ys = [sum(r <= x for r in curves[name]) / n for x in xs]
        label: str | None
        if name == baseline:
            style, label = _BASELINE_STYLE, f"{name}, baseline"
        elif name in shown:
            style, label = {"color": _colour(shown.index(name)), "lw": 1.8, "zorder": 3}, name
        else:
            style, label = _OTHERS_STYLE, f"the {len(others)} others" if name == others[0] else None
        ax.step(xs, ys, where="post", label=label, **style)
    ax.set(xscale="log", xlabel="τ (time to target / best time to target)", ylabel="fraction of workloads")
    ax.set(ylim=(-0.02, 1.02), xlim=(1.0, tau_max), title=title)
    ticks = [t for t in (1, 1.5, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if t <= tau_max]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: labels[j].startswith("the ") and labels[j].endswith(" others"))
    ax.legend([handles[j] for j in order], [labels[j] for j in order], loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [labels[j] for j in order]


def plot_tuning_free_curves(suite: Suite, path: Path) -> dict[str, list[str]]:
    """One panel per workload: tuned Adam in black, the ``HIGHLIGHT`` tuning-free methods (at their
    defaults) with the lowest final metric on that workload in colour, the others in grey. Returns
    each panel's legend labels."""
    ws = list(suite.workloads.values())
    cols = min(3, len(ws))
    rows = -(-len(ws) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.8 * rows), squeeze=False, constrained_layout=True)
    panels: dict[str, dict[str, tuple[Run, int]]] = {}
    for w in ws:
        panels[w.name] = {}
        base = suite.runs[BASELINE, w.name]
        if not base.skipped and base.tuned_index is not None:
            panels[w.name][f"{BASELINE} (tuned)"] = (base, base.tuned_index)
        for name in tuning_free_names(suite):
            run = suite.runs[name, w.name]
            if not run.skipped:
                panels[w.name][name] = (run, run.default_index)
    baseline = f"{BASELINE} (tuned)"
    legends = {}
    for ax, w in zip(axes.flat, ws, strict=False):
        legends[w.name] = _panel(ax, panels[w.name], baseline, highlighted(_ranked(panels[w.name], w.target), baseline))
        ax.axhline(w.target, color="black", lw=0.8, ls=":")
        ax.set(xlabel="step", ylabel=w.metric, yscale="log", title=f"{w.name} (dotted: target)")
        ax.grid(True, which="both", alpha=0.3)
        _clip_y(ax, w)
    for ax in list(axes.flat)[len(ws) :]:
        ax.axis("off")
    fig.suptitle("Tuning-free methods at their defaults (final metric in the legend) against tuned Adam")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return legends


def make_plots(suite: Suite, out_dir: Path, link_base: Path) -> dict[str, str]:
    """Write the PNGs; returns their paths relative to ``link_base`` (the results file's folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def link(path: Path) -> str:
        return os.path.relpath(path, link_base).replace(os.sep, "/")

    links = {}
    if suite.mode == "grid":
        for w in suite.workloads.values():
            path = out_dir / f"{suite.section.plot_prefix}_{w.name}.png"
            plot_workload(suite, w, path)
            links[w.name] = link(path)
        path = out_dir / f"{suite.section.plot_prefix}_profile.png"
        plot_profile(_times(suite, "tuned"), path, "Performance profile, tuned learning rates")
        links["profile"] = link(path)
    if has_tuning_free_comparison(suite):
        path = out_dir / "convergence_tuning_free.png"
        plot_tuning_free_curves(suite, path)
        links["tf_curves"] = link(path)
        path = out_dir / "convergence_tuning_free_profile.png"
        plot_profile(_times_tf(suite), path, f"Tuning-free at defaults vs tuned {BASELINE}")
        links["tf_profile"] = link(path)
    return links


# ---------------------------------------------------------------------------------------------
# The command.


def select(names: Sequence[str] | None, tuning_free: bool) -> list[OptimizerSpec]:
    """The registry entries to run, in registry order, then the configured variants among ``names`` in their order.

    ``tuning_free``: the baseline, the Capability.TUNING_FREE entries, then the cosine variants of those in
    ``DECAYED_VARIANTS``.
    """
    specs = [s for s in adaopt.REGISTRY.values() if names is None or s.name in names]
    specs += [configured_variant(n) for n in names or () if n not in adaopt.REGISTRY]
    if tuning_free:
        specs = [s for s in specs if Capability.TUNING_FREE in s.capabilities]
        specs = [adaopt.REGISTRY[BASELINE], *specs, *(cosine_variant(s) for s in specs if s.name in DECAYED_VARIANTS)]
    return specs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--section",
        choices=tuple(SECTIONS),
        default="convergence",
        help="the results file's section a grid run writes, and its default workloads: "
        + "; ".join(f"{k}: {','.join(v.workloads)}" for k, v in SECTIONS.items()),
    )
    parser.add_argument(
        "--workloads", default=None, help="comma-separated, of " + ",".join(wl.WORKLOADS) + " (default: the section's)"
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated registry names, or name(key=value,...) for an entry with arguments set (default: all)",
    )
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"--steps-scale {QUICK_SCALE}: a smoke run")
    parser.add_argument(
        "--tuning-free",
        action="store_true",
        help=f"Capability.TUNING_FREE methods at their defaults against tuned {BASELINE}",
    )
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument(
        "--evals", type=int, default=None, help="evaluations per run (default: each workload's, 20 to 50)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown results file")
    parser.add_argument("--plots", type=Path, default=None, help="folder of the PNGs (default: --out's folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's curves as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.section = SECTIONS[args.section]
    chosen = args.workloads if args.workloads is not None else ",".join(args.section.workloads)
    args.workloads = [x.strip() for x in chosen.split(",") if x.strip()]
    unknown = [x for x in args.workloads if x not in wl.WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(wl.WORKLOADS)}")
    if args.optimizers is not None:
        # commas between the names, not those between a variant's arguments
        args.optimizers = [x.strip() for x in re.split(r",(?![^()]*\))", args.optimizers) if x.strip()]
        if not args.optimizers:
            parser.error(f"no optimizers named; choose from {', '.join(adaopt.REGISTRY)}")
        for name in args.optimizers:
            try:
                spec_of(name)
            except (ValueError, KeyError) as error:
                parser.error(f"{error}; choose from {', '.join(adaopt.REGISTRY)}, or name(key=value,...)")
    if args.quick:
        args.steps_scale = QUICK_SCALE
    if args.steps_scale <= 0 or (args.evals is not None and args.evals < 1):
        parser.error("--steps-scale and --evals must be positive")
    if args.tuning_free and not select(args.optimizers, True)[1:]:
        parser.error("--tuning-free: none of the chosen optimizers is Capability.TUNING_FREE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation("benchmarks.convergence", argv)
    specs = select(args.optimizers, args.tuning_free)
    suite = run_suite(
        specs,
        args.workloads,
        tuning_free=args.tuning_free,
        scale=args.steps_scale,
        evals=args.evals,
        schedule=args.schedule,
        progress=not args.no_progress,
        section=args.section,
    )
    out: Path = args.out
    plots = make_plots(suite, args.plots or out.parent, out.parent)
    if not args.tuning_free:
        write_section(out, render_grid(suite, command, plots), suite.section.begin, suite.section.end)
    if has_tuning_free_comparison(suite):  # the grid run holds the defaults and tuned Adam too
        write_section(out, render_tuning_free(suite, command, plots), TF_BEGIN, TF_END, after=END)
    if args.json is not None:
        args.json.write_text(json.dumps({f"{o}/{w}": dataclasses.asdict(r) for (o, w), r in suite.runs.items()}))
    print(f"total {suite.elapsed_s:.1f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
