"""How well the memory-light states and optimizers train: each against float32 AdamW at the same learning rate.

On the convergence suite's workloads (``benchmarks/workloads.py``), each variant below trains on
float32 AdamW's 7-point learning-rate grid (``lr * 3**k``, k = -3..3, with the cosine decay of
:mod:`benchmarks.convergence`; one vmapped program per pair), the memory-light optimizers also on
their own grid (around their rate of :mod:`benchmarks.learning_rates`: Adafactor's, a step relative
to the parameters, means another thing), and is compared with AdamW's tuned run (its grid point
with the lowest final metric):

- **at AdamW's rate**: the variant's final metric at the learning rate AdamW's tuned run chose,
  over AdamW's final metric (the goal: within 1%);
- **own best**: the variant's best point of its grid(s), over AdamW's final metric.

The variants:

- AdamW with both moments stored as 8-bit (``"int8"``), 4-bit (``"int4"``) and FP8 blocks
  (``"fp8"``), every leaf quantized (``min_size=0``: the workloads' leaves are smaller than the
  reference packages' 4,096-element threshold, so the defaults would keep them all in float32);
- AdamW with bfloat16 moments rounded stochastically (``"bfloat16_sr"``) and, for contrast,
  rounded to nearest (``jnp.bfloat16``);
- the memory-light optimizers at their registry defaults: Adafactor, CAME, Adam-mini, and
  GaLore-AdamW at rank 16 (the registry's rank 128 would project none of these matrices).

State bytes per parameter are those of each workload's parameter tree (the scales of 8-bit
blocks weigh more on these small leaves than on a large model's: see ``benchmarks/memory.py``).

The results go between ``<!-- light-states:begin -->`` and ``<!-- light-states:end -->`` of
``--out``, with a plot of the curves at AdamW's rate.

Usage::

    python -m benchmarks.light_states [--workloads softmax,mlp] [--variants adamw_int8,adafactor]
                                      [--steps-scale 1.0 | --quick] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import adaopt
from benchmarks import convergence as cv
from benchmarks import speed
from benchmarks import workloads as wl
from benchmarks.memory import state_bytes
from benchmarks.report import cell, invocation, machine, markdown_table, write_section

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BEGIN = "<!-- light-states:begin -->"
END = "<!-- light-states:end -->"
BASELINE = "adamw"
WITHIN = 0.01  # the goal: the final metric within 1% of float32 AdamW's at the same learning rate
GALORE_RANK = 16


def _adamw(storage: Any) -> Callable[..., optax.GradientTransformation]:
    return functools.partial(adaopt.adamw, mu_dtype=storage, nu_dtype=storage)


# name -> (what it is, the factory of a learning rate)
VARIANTS: dict[str, tuple[str, Callable[..., optax.GradientTransformation]]] = {
    "adamw_int8": (
        "AdamW, 8-bit blockwise moments (bitsandbytes' maps, blocks of 256)",
        _adamw(adaopt.Blockwise("dynamic8", min_size=0)),
    ),
    "adamw_int4": (
        "AdamW, 4-bit blockwise moments (torchao's maps, blocks of 128)",
        _adamw(adaopt.Blockwise("dynamic4", block_size=128, min_size=0)),
    ),
    "adamw_fp8": ("AdamW, FP8 (E4M3) blockwise moments", _adamw(adaopt.Blockwise("fp8", min_size=0))),
    "adamw_bf16_sr": ("AdamW, bfloat16 moments, stochastic rounding", _adamw("bfloat16_sr")),
    "adamw_bf16": ("AdamW, bfloat16 moments, rounded to nearest", _adamw(jnp.bfloat16)),
    "adafactor": ("Adafactor (factored second moment, registry defaults)", adaopt.adafactor),
    "came": ("CAME (factored, confidence-guided, registry defaults)", adaopt.came),
    "adam_mini": ("Adam-mini (one second moment per block, registry defaults)", adaopt.adam_mini),
    "galore_adamw": (
        f"GaLore-AdamW, rank {GALORE_RANK} (registry defaults otherwise)",
        functools.partial(adaopt.galore_adamw, rank=GALORE_RANK),
    ),
}


def variant_spec(name: str) -> adaopt.OptimizerSpec:
    """``name``'s registry entry (AdamW's for a storage of AdamW's moments) with ``name``'s factory."""
    return dataclasses.replace(
        adaopt.REGISTRY.get(name, adaopt.REGISTRY[BASELINE]), name=name, factory=VARIANTS[name][1]
    )


def variant_grid(spec: adaopt.OptimizerSpec) -> list[float]:
    """Float32 AdamW's grid, and an optimizer of the registry's own grid too (its learning rate means another thing)."""
    rates = cv.learning_rate_grid(adaopt.REGISTRY[BASELINE])
    if spec.name in adaopt.REGISTRY and spec.name != BASELINE:
        rates = sorted(set(rates) | set(cv.learning_rate_grid(spec)))
    return rates


def _index(rates: Sequence[float], rate: float) -> int:
    return next(k for k, r in enumerate(rates) if math.isclose(r, rate, rel_tol=1e-9))


@dataclasses.dataclass
class Comparison:
    """One variant against AdamW on one workload."""

    variant: str
    workload: str
    bytes_per_param: float
    adamw_lr: float | None
    adamw_final: float
    final: float  # at AdamW's tuned learning rate
    own_lr: float | None
    own_final: float

    @property
    def ratio(self) -> float:
        return self.final / self.adamw_final

    @property
    def own_ratio(self) -> float:
        return self.own_final / self.adamw_final

    @property
    def within(self) -> bool:
        return _within(self.ratio)

    @property
    def own_within(self) -> bool:
        return _within(self.own_ratio)


def _within(ratio: float) -> bool:
    return math.isfinite(ratio) and ratio <= 1 + WITHIN


def compare(suite: cv.Suite, variants: Sequence[str]) -> list[Comparison]:
    """Each variant's final metric at AdamW's tuned learning rate and at its own best, per workload."""
    rows = []
    for w in suite.workloads.values():
        base = suite.runs[BASELINE, w.name]
        i = base.tuned_index
        adamw_final = math.inf if i is None else base.final(i)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), w.init())
        n = speed.count(shapes)[1]
        for name in [BASELINE, *variants]:
            run = suite.runs[name, w.name]
            at = None if i is None else _index(run.learning_rates, base.learning_rates[i])  # AdamW's rate
            j = run.tuned_index
            spec = variant_spec(name) if name in VARIANTS else adaopt.REGISTRY[name]
            rows.append(
                Comparison(
                    name,
                    w.name,
                    state_bytes(spec.factory(learning_rate=1e-3), shapes) / n,
                    None if at is None else run.learning_rates[at],
                    adamw_final,
                    math.inf if at is None else run.final(at),
                    None if j is None else run.learning_rates[j],
                    math.inf if j is None else run.final(j),
                )
            )
    return rows


def render(suite: cv.Suite, rows: Sequence[Comparison], command: str, plot: str | None) -> str:
    """The Markdown section: the summary grid of ratios, then one table per workload."""
    variants = list(dict.fromkeys(r.variant for r in rows if r.variant != BASELINE))
    by = {(r.variant, r.workload): r for r in rows}
    lines = [BEGIN, "## Memory-light states and optimizers: quality against float32 AdamW", ""]
    lines += [f"Written by `{command}` on {datetime.date.today().isoformat()} in {suite.elapsed_s:.0f} s."]
    lines += ["", *(f"- {k}: {v}" for k, v in machine().items()), ""]
    lines += [
        "Each variant trains on float32 AdamW's 7-point grid (`lr * 3**k`, k = -3..3, cosine decay to 0 over the "
        "budget, one vmapped program per pair), the optimizers also on their own grid around their rate of "
        "benchmarks/learning_rates.py. **ratio** = the variant's final metric at the learning rate AdamW's "
        f"tuned run chose / AdamW's final metric (goal: at most {1 + WITHIN:g}); **own** = its best point of its "
        "grid(s) / AdamW's. Quantized moments are stored for every leaf (`min_size=0`). bytes/param: the "
        "optimizer state over the workload's parameter count. Metrics as in the convergence section.",
        "",
    ]
    for name in variants:
        lines.append(f"- `{name}`: {VARIANTS[name][0]}")
    lines.append("")
    header = ["variant", *(f"{w} ratio (own)" for w in suite.workloads), "within 1% on", "own within 1% on"]
    table = []
    for name in variants:
        cells = [by[name, w] for w in suite.workloads]
        table.append([
            f"`{name}`", *(f"{cell(c.ratio)} ({cell(c.own_ratio)})" for c in cells),
            f"{sum(c.within for c in cells)} of {len(cells)}", f"{sum(c.own_within for c in cells)} of {len(cells)}",
        ])  # fmt: skip
    lines += [markdown_table(header, table), ""]
    if plot:
        lines += [f"![curves at AdamW's learning rate]({plot})", ""]
    for w in suite.workloads.values():
        lines += [f"### `{w.name}`: {w.summary}", ""]
        table = []
        for r in (x for x in rows if x.workload == w.name):
            table.append([
                f"`{r.variant}`", f"{r.bytes_per_param:.3f}", cell(r.adamw_lr), cell(r.final), cell(r.ratio),
                "yes" if r.within else "no", cell(r.own_lr), cell(r.own_final), cell(r.own_ratio),
            ])  # fmt: skip
        header = ["variant", "bytes/param", "lr", "final", "ratio", "within 1%", "own lr", "own final", "own ratio"]
        lines += [markdown_table(header, table), ""]
    lines.append(END)
    return "\n".join(lines)


def plot_curves(suite: cv.Suite, variants: Sequence[str], path: Path) -> None:
    """One panel per workload: the metric over the steps, each variant at AdamW's tuned learning rate."""
    n = len(suite.workloads)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, w in zip(axes[0], suite.workloads.values(), strict=True):
        base = suite.runs[BASELINE, w.name]
        i = base.tuned_index
        for k, name in enumerate([BASELINE, *variants]):
            run = suite.runs[name, w.name]
            if i is None or run.skipped:
                continue
            at = _index(run.learning_rates, base.learning_rates[i])
            style = {"color": "black", "lw": 2.0} if name == BASELINE else {"color": plt.cm.tab10(k % 10), "lw": 1.0}
            ax.plot(run.eval_steps, run.losses[at], label=name, **style)
        ax.set_yscale("log")
        ax.set_title(w.name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("metric")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--workloads", default=",".join(wl.DEFAULT_WORKLOADS), help="comma-separated workloads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ",".join(VARIANTS))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"--steps-scale {cv.QUICK_SCALE}: a smoke run")
    parser.add_argument("--out", type=Path, default=cv.DEFAULT_OUT, help="the Markdown results file")
    parser.add_argument("--plots", type=Path, default=None, help="folder of the PNG (default: --out's folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the comparisons as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    args.variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    unknown = [x for x in args.workloads if x not in wl.WORKLOADS] + [x for x in args.variants if x not in VARIANTS]
    if unknown or not args.workloads or not args.variants:
        parser.error(
            f"unknown or empty: {unknown}; workloads {', '.join(wl.WORKLOADS)}; variants {', '.join(VARIANTS)}"
        )
    if args.quick:
        args.steps_scale = cv.QUICK_SCALE
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation("benchmarks.light_states", argv)
    specs = [adaopt.REGISTRY[BASELINE], *(variant_spec(v) for v in args.variants)]
    suite = cv.run_suite(
        specs, args.workloads, scale=args.steps_scale, progress=not args.no_progress, grid=variant_grid
    )
    rows = compare(suite, args.variants)
    out: Path = args.out
    plot_dir = args.plots or out.parent
    plot = plot_dir / "light_states.png"
    plot_curves(suite, args.variants, plot)
    link = os.path.relpath(plot, out.parent).replace(os.sep, "/")
    write_section(out, render(suite, rows, command, link), BEGIN, END)
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    for r in rows:
        print(f"{r.workload:>10} {r.variant:>14} ratio {cell(r.ratio):>9} own {cell(r.own_ratio):>9}", flush=True)
    print(f"total {suite.elapsed_s:.1f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
