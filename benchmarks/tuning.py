"""The tuner (``adaopt.Sweep``: random search and successive halving in one compiled program) against the
convergence benchmark's exhaustive learning-rate grid and a single training run, on its workloads.

Per workload and optimizer (the steps, data, schedule and evaluation of ``benchmarks/convergence.py``,
through its ``budget``, ``Prepared``, ``_train_fn``, ``learning_rate_grid`` and ``is_scheduled``):

- **grid**: convergence.py's 7-point grid ``lr * 3**k``, ``k = -3..3``, one vmapped program; its best
  final metric.
- **single**: one training run at the default learning rate (``k = 0``), the same program one lane
  wide; its wall time, compilation included (compile + run, as convergence.py measures them).
- **tuner**: ``--trials`` learning rates drawn log-uniformly (seeded) over the grid's span
  ``[lr / 27, lr * 27]``, trained by ``adaopt.Sweep`` with successive halving (keep ``--keep`` of
  the live trials at each fraction ``--rungs`` of the budget) in blocks of ``--lanes`` lanes; its best
  final metric (over the trials trained the whole budget) and its wall time, compilation included
  (a fresh ``Sweep``: nothing is cached from another run).

The goals (issue 13): the tuner's best final metric within 2% of the grid's best, at no more than
2x the wall time of the single run. Prints a Markdown table.

Usage::

    python -m benchmarks.tuning [--workloads softmax,mlp] [--optimizers adamw] [--trials 8] [--lanes 1]
                                [--keep 0.5] [--rungs 0.25,0.5] [--seed 0] [--steps-scale 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaopt
from benchmarks import convergence as cv
from benchmarks import workloads as wl
from benchmarks.report import invocation, load_average, machine, markdown_table, write_section

BEGIN = "<!-- tuning:begin -->"
END = "<!-- tuning:end -->"
WITHIN = 0.02  # the tuner's best final metric over the grid's best
TIME_RATIO = 2.0  # the tuner's wall time over the single run's


def _final(losses: Any) -> np.ndarray:
    """Each lane's final metric; infinite where any evaluation was not finite (convergence.py's divergence)."""
    losses = np.asarray(losses, np.float64)
    return np.where(np.isfinite(losses).all(1), losses[:, -1], np.inf)


def grid_and_single(spec: adaopt.OptimizerSpec, prepared: cv.Prepared, steps: int, every: int) -> dict[str, float]:
    """The grid's best final metric and the single run's final metric and wall time (compile + run)."""
    w = prepared.workload
    scheduled = cv.is_scheduled(spec, "cosine")
    chunks = cv._chunked(prepared.batches(steps, False), steps // every, every)
    out: dict[str, float] = {}
    for name, rates in (("single", [cv.tuned_rate(spec)]), ("grid", cv.learning_rate_grid(spec))):
        lanes = jnp.asarray(rates, jnp.float32)
        start = time.perf_counter()
        train = jax.jit(jax.vmap(cv._train_fn(spec, w, steps, scheduled), in_axes=(0, None, None, None)))
        compiled = train.lower(lanes, prepared.params, prepared.data, chunks).compile()
        losses, _ = jax.block_until_ready(compiled(lanes, prepared.params, prepared.data, chunks))
        out[f"{name}_s"] = time.perf_counter() - start
        out[name] = float(_final(losses).min())
    return out


def tuner(
    spec: adaopt.OptimizerSpec, prepared: cv.Prepared, steps: int, every: int, args: argparse.Namespace
) -> adaopt.SweepResult:
    """Random search over the grid's span with successive halving, from a fresh ``adaopt.Sweep``."""
    w = prepared.workload
    scheduled = cv.is_scheduled(spec, "cosine")
    rate = cv.tuned_rate(spec)
    space = {"learning_rate": adaopt.Range(rate / cv.GRID_FACTOR**3, rate * cv.GRID_FACTOR**3, log=True)}
    configs = adaopt.random_configs(space, args.trials, seed=args.seed)
    rungs = sorted({max(every, round(f * steps / every) * every) for f in args.rungs} - {steps})
    sweep = adaopt.Sweep(
        spec,
        lambda params, batch, data: w.loss(params, data, batch)[0],
        eval_fn=lambda params, data: w.evaluate(params, data)[0],
        schedule=(lambda lr: optax.cosine_decay_schedule(lr, steps)) if scheduled else None,
    )
    return sweep.run(
        configs,
        prepared.params,
        prepared.batches(steps, False),
        steps=steps,
        eval_every=every,
        halve_every=rungs or None,
        keep=args.keep,
        lanes=args.lanes,
        data=prepared.data,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--workloads", default=",".join(wl.DEFAULT_WORKLOADS))
    parser.add_argument("--optimizers", default="adamw", help="registry names (learning rate tuned)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--lanes", type=int, default=1, help="the program's width (0: all live trials at once)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--rungs", default="0.25,0.5", help="fractions of the budget at which to halve ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="a Markdown file to write the section into")
    args = parser.parse_args(argv)
    args.workloads = [x for x in args.workloads.split(",") if x]
    args.optimizers = [x for x in args.optimizers.split(",") if x]
    args.rungs = [float(x) for x in args.rungs.split(",") if x]
    args.lanes = args.lanes or None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation("benchmarks.tuning", argv)
    load_start = load_average()
    rows = []
    for name in args.workloads:
        prepared = cv.Prepared.of(wl.WORKLOADS[name]())
        steps, every = cv.budget(prepared.workload, args.steps_scale, None)
        for optimizer in args.optimizers:
            spec = adaopt.REGISTRY[optimizer]
            reference = grid_and_single(spec, prepared, steps, every)
            result = tuner(spec, prepared, steps, every, args)
            ratio = result.best_metric / reference["grid"]
            speed = result.seconds / reference["single_s"]
            rows.append([
                name, optimizer, f"{reference['grid']:.4g}", f"{result.best_metric:.4g}",
                f"{result.best_config['learning_rate']:.3g}" if result.best_config else "-",
                f"{ratio:.3f}", "yes" if ratio <= 1 + WITHIN else "no",
                f"{reference['single_s']:.2f}", f"{result.seconds:.2f}", f"{speed:.2f}",
                "yes" if speed <= TIME_RATIO else "no", f"{reference['grid_s']:.2f}",
            ])  # fmt: skip
            print(f"{name} {optimizer}: {rows[-1]}", file=sys.stderr, flush=True)
    header = [
        "workload", "optimizer", "grid best", "tuner best", "tuner lr", "tuner / grid", "within 2%",
        "single run s", "tuner s", "tuner / single", "at most 2x", "grid s",
    ]  # fmt: skip
    info = machine()
    trials = f"{args.trials} random learning rates, halving at {args.rungs} of the budget keeping {args.keep}"
    section = "\n".join([
        BEGIN,
        "## Tuning in one program (`benchmarks/tuning.py`)",
        "",
        f"Machine: {info['CPU']}, {info['cores']} cores, JAX {info['jax / jaxlib']}; load average {load_start}.",
        "",
        f"`{command}`: the tuner = {trials}, lanes={args.lanes or 'all'}; **grid** = convergence.py's 7-point "
        "learning-rate grid (one vmapped program); **single run** = one training run at the tuned rate, "
        "compilation included; the goals: the tuner's best within 2% of the grid's, in at most 2x the single run.",
        "",
        markdown_table(header, rows),
        "",
        END,
    ])  # fmt: skip
    if args.out is not None:
        write_section(args.out, section, BEGIN, END)
    print(section)
    return 0 if all(r[6] == "yes" and r[10] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
