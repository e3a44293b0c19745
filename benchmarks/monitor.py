"""The cost of ``adaopt.monitor``: AdamW's step time on the GPT-2 tree with and without the monitor.

Each row times blocks of ``--block`` consecutive steps (``update`` + ``apply_updates``, jitted, the
parameters and the state donated, as ``benchmarks/speed.py`` times one step), so that a block of 10
holds one recording step of ``every=10`` and nine skipped ones: the per-step time of a block is
what a training loop pays on average. The rows run interleaved, ``--reps`` blocks each after the
warm-up, and the table gives the medians and their ratio to the unmonitored AdamW (the goal:
under 1.05 when recording every 10 steps). ``every=1`` shows the cost of a recording step itself.
Measured twice, with XLA's defaults and with XLA:CPU's copy elision
(:func:`adaopt.enable_cpu_copy_elision`: a child process measures those columns), beside each
other; ``--copy-elision off`` or ``on`` measures one of them only.

Usage::

    python -m benchmarks.monitor [--reps 7] [--block 10] [--tree gpt2] [--out benchmarks/RESULTS.md] [--copy-elision both]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adaopt
from benchmarks import report, speed
from benchmarks.report import machine, markdown_table, write_section

BEGIN = "<!-- monitor:begin -->"
END = "<!-- monitor:end -->"


def contenders() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The rows, by label: AdamW alone and monitored."""
    adamw = lambda: adaopt.adamw(1e-3, weight_decay=0.1)
    return {
        "adamw": adamw,
        "monitor(adamw, every=10)": lambda: adaopt.monitor(adamw(), every=10),
        "monitor(adamw, every=10, groups=None)": lambda: adaopt.monitor(adamw(), every=10, groups=None),
        "monitor(adamw, every=1)": lambda: adaopt.monitor(adamw(), every=1),
        STATIC: lambda: adaopt.monitor(adamw()),
    }


# Two compiled steps, update(..., record=True / False) chosen by the loop: no cond in either.
STATIC = "monitor(adamw), record=(i % 10 == 0) static"


class Stepper:
    """One optimizer's jitted, donating step, its compile time, and a block of steps to time."""

    def __init__(
        self, optimizer: optax.GradientTransformation, host_params: Any, grads: Any, *, static_every: int = 0
    ) -> None:
        def fn(params: Any, state: Any, grads: Any, **record: Any) -> tuple[Any, Any]:
            updates, state = optimizer.update(grads, state, params, **record)
            return optax.apply_updates(params, updates), state

        self.grads = grads
        self.params = jax.tree.map(lambda x: jnp.array(x, copy=True), host_params)
        self.state = optimizer.init(self.params)
        self.static_every = static_every
        self.step = jax.jit(fn, donate_argnums=(0, 1), static_argnames="record")
        self.records = [{"record": True}, {"record": False}] if static_every else [{}]
        start = time.perf_counter()
        for record in self.records:
            self.step.lower(self.params, self.state, grads, **record).compile()
        self.compile_s = time.perf_counter() - start

    def block(self, steps: int) -> float:
        """The mean time of one step over ``steps`` consecutive steps."""
        start = time.perf_counter()
        for i in range(steps):
            record = {"record": i % self.static_every == 0} if self.static_every else {}
            self.params, self.state = self.step(self.params, self.state, self.grads, **record)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - start) / steps


def run(shapes: Any, reps: int, block: int) -> list[list[str]]:
    host_params = speed.host_arrays(shapes, seed=0, scale=0.02)
    grads = jax.tree.map(jnp.asarray, speed.host_arrays(shapes, seed=1, scale=1e-3))
    steppers = {
        label: Stepper(make(), host_params, grads, static_every=10 if label == STATIC else 0)
        for label, make in contenders().items()
    }
    times: dict[str, list[float]] = {label: [] for label in steppers}
    for stepper in steppers.values():
        for _ in range(speed.WARMUP):
            stepper.block(block)
    for _ in range(reps):  # interleaved: a drift of the machine affects every row alike
        for label, stepper in steppers.items():
            times[label].append(stepper.block(block))
    base = statistics.median(times["adamw"])
    rows = []
    for label, stepper in steppers.items():
        median = statistics.median(times[label])
        rows.append(
            [
                label,
                f"{median * 1e3:.2f}",
                f"{min(times[label]) * 1e3:.2f}",
                f"{median / base:.3f}",
                f"{stepper.compile_s:.1f}",
            ]
        )
    return rows


HEADER = ["ms/step (median)", "ms/step (best)", "vs adamw", "compile (s)"]


def render(args: argparse.Namespace, shapes: Any) -> str:
    leaves, n = speed.count(shapes)
    argv = ["--reps", str(args.reps), "--block", str(args.block), "--tree", args.tree]
    runs: list[tuple[str, list[list[str]]]] = report.copy_elision_runs(
        args.copy_elision,
        lambda: run(shapes, args.reps, args.block),
        lambda: report.measured_in_child("benchmarks.monitor", argv),
    )
    info = machine()
    lines = [
        BEGIN,
        "## The cost of monitoring (`benchmarks/monitor.py`)",
        "",
        f"`{report.invocation('benchmarks.monitor')}`. AdamW on the {args.tree} "
        f"tree ({n / 1e6:.1f} M parameters in {leaves} leaves), per step, averaged over blocks of {args.block} steps; "
        f"medians of {args.reps} blocks. {info['JAX device']}, {info['CPU']}, {info['cores']}, jax {jax.__version__}; "
        f"XLA:CPU copy elision {report.copy_elision_state(args.copy_elision)}.",
        "",
        markdown_table(*report.side_by_side(list(contenders()), HEADER, runs, ["ms/step (median)", "vs adamw"])),
        "",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--tree", default="gpt2", choices=sorted(speed.TREES))
    parser.add_argument("--out", type=Path, default=None, help="a Markdown file to write the section into")
    report.add_copy_elision_arguments(parser)
    args = parser.parse_args(argv)
    report.start_copy_elision(parser, args)
    shapes = speed.TREES[args.tree]()
    if args.rows_json is not None:
        args.rows_json.write_text(json.dumps(run(shapes, args.reps, args.block)))
        return
    section = render(args, shapes)
    if args.out is not None:
        write_section(args.out, section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
