"""Optimizer state bytes per device with and without ``adaopt.shard_states`` (ZeRO), on a data-parallel mesh.

The GPT-2 tree of ``benchmarks/speed.py`` (or another of its trees, ``--tree``: the ResNet-50 tree's
convolution kernels are quantized along their last two axes), its parameters replicated over a mesh of ``--devices``
devices (one ``data`` axis; on a CPU, XLA's host platform split into that many devices), and each
optimizer's state built by ``init`` on it, plain and wrapped in ``adaopt.shard_states``. For each:

- the **state bytes each device holds** (the bytes of every state leaf's shards on that device,
  the largest over the devices), against the whole state divided by the number of devices (the
  goal: within 5%);
- XLA's memory analysis of the compiled optimizer step (``update`` and ``apply_updates``, the
  gradients given, replicated, as after the data-parallel all-reduce; parameters and state donated):
  the argument bytes per device and the temporaries;
- the collectives in that step, and its time (median of ``--reps``; on a CPU the "devices" share
  the cores, so the time says what the exchange costs there, not on an accelerator).

Usage::

    python -m benchmarks.zero [--devices 8] [--reps 5] [--tree gpt2] [--out benchmarks/RESULTS.md]

On a CPU the script restarts itself with ``--xla_force_host_platform_device_count`` when JAX has
fewer devices than asked.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from benchmarks import report, speed
from benchmarks.report import load_average, machine, markdown_table, write_section

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
MIB = 2**20
TREE_NAMES = {"gpt2": "GPT-2", "resnet": "ResNet-50"}
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: adaopt.adamw(1e-3),
    "adamw_int8": lambda: adaopt.adamw(1e-3, mu_dtype="int8", nu_dtype="int8"),
    "adamw_int4": lambda: adaopt.adamw(1e-3, mu_dtype="int4", nu_dtype="int4"),
    "lion": lambda: adaopt.lion(1e-4),
    "adafactor": lambda: adaopt.adafactor(1e-3),
}


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """The bytes of ``tree``'s arrays held by each device (every addressable shard of every leaf)."""
    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def whole_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def collectives(hlo: str) -> str:
    counts = {name: len(re.findall(rf"\b{name}(-start)?\(", hlo)) for name in COLLECTIVES}
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"


def measure(
    name: str, make: Callable[[], optax.GradientTransformation], params: Any, grads: Any, reps: int
) -> list[list[str]]:
    rows = []
    for zero in (False, True):
        tx = adaopt.shard_states(make()) if zero else make()
        state = tx.init(params)
        whole = whole_bytes(state)
        held = max(per_device_bytes(state).values())
        ideal = whole / jax.device_count()

        def step(p: Any, s: Any, g: Any, tx: optax.GradientTransformation = tx) -> tuple[Any, Any]:
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        analysis = compiled.memory_analysis()
        p = jax.tree.map(lambda x: x.copy(), params)
        s = state
        times = []
        for i in range(reps + 2):
            start = time.perf_counter()
            p, s = jax.block_until_ready(compiled(p, s, grads))
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - start)
        del p, s
        rows.append(
            [
                f"shard_states({name})" if zero else name,
                f"{whole / MIB:.1f}",
                f"{held / MIB:.1f}",
                f"{held / ideal:.3f}",
                f"{analysis.argument_size_in_bytes / MIB:.1f}",
                f"{analysis.temp_size_in_bytes / MIB:.1f}",
                collectives(compiled.as_text() or ""),
                f"{statistics.median(times) * 1e3:.1f}",
            ]
        )
    return rows


def markers(tree: str) -> tuple[str, str]:
    """The results file's section of a tree's run (the GPT-2 tree's: "zero")."""
    name = "zero" if tree == "gpt2" else f"zero-{tree}"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def render(args: argparse.Namespace, rows: list[list[str]], n_leaves: int, n_params: int) -> str:
    begin, end = markers(args.tree)
    return "\n".join(
        [
            begin,
            "## Optimizer states split across devices (`benchmarks/zero.py`)"
            if args.tree == "gpt2"
            else f"### The same on the {TREE_NAMES.get(args.tree, args.tree)} tree",
            "",
            f"`{report.invocation('benchmarks.zero')}`, "
            f"{datetime.date.today().isoformat()}; load average {load_average()}; "
            f"{jax.device_count()} {jax.devices()[0].platform.upper()} devices on one `data` axis.",
            "",
            markdown_table(["", ""], [[k, v] for k, v in machine().items()]),
            "",
            f"The {TREE_NAMES.get(args.tree, args.tree)} tree ({n_leaves} leaves, {n_params / 1e6:.1f} M parameters), "
            "parameters replicated. "
            "**held** = the state bytes on the device that holds the most; **/ ideal** = that over the whole "
            "state divided by the number of devices (the goal: at most 1.05 with `shard_states`). The step: "
            f"`update` + `apply_updates` with replicated gradients, median of {args.reps}.",
            "",
            markdown_table(
                [
                    "optimizer",
                    "whole state (MiB)",
                    "held per device (MiB)",
                    "/ ideal",
                    "step arguments per device (MiB)",
                    "step temporaries (MiB)",
                    "collectives in the step",
                    "step (ms)",
                ],
                rows,
            ),
            end,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated names of OPTIMIZERS")
    parser.add_argument("--tree", default="gpt2", choices=sorted(speed.TREES), help="benchmarks/speed.py's tree")
    parser.add_argument("--out", type=Path, default=None, help="a Markdown file to write the section into")
    args = parser.parse_args(argv)
    if jax.device_count() < args.devices:
        if jax.default_backend() != "cpu":
            sys.exit(f"{args.devices} devices asked, {jax.device_count()} found")
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
        env = {**os.environ, "XLA_FLAGS": flags.strip()}
        sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.zero", *sys.argv[1:]], env=env))

    mesh = jax.make_mesh((args.devices,), ("data",), devices=jax.devices()[: args.devices])
    shapes = speed.TREES[args.tree]()
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        params = jax.device_put(speed.host_arrays(shapes, seed=0, scale=0.02), replicated)
        grads = jax.device_put(speed.host_arrays(shapes, seed=1, scale=1e-3), replicated)
        rows = []
        for name in args.optimizers.split(","):
            rows += measure(name, OPTIMIZERS[name], params, grads, args.reps)
            for row in rows[-2:]:
                print(" | ".join(row), flush=True)
    n_leaves, n_params = speed.count(shapes)
    section = render(args, rows, n_leaves, n_params)
    if args.out is not None:
        write_section(args.out, section, *markers(args.tree), after=markers("gpt2")[1])
    print(section)


if __name__ == "__main__":
    main()
