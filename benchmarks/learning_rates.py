"""The learning rate each registry optimizer runs at in the benchmarks, the demo and the tests.

Tuned on the digits workloads of :mod:`benchmarks.workloads` with every other hyperparameter at
its default (the convergence benchmark's grid is centred on these). A tuning-free optimizer
(``adaopt.Capability.TUNING_FREE``) runs at its factory's default. These are settings of our
measurements, not of the library: ``adaopt.REGISTRY`` holds only what users need.

The rule (:func:`suggest`, for the entries tuned since it was written down, marked "by
suggest()"): from a convergence run's JSON with a constant learning rate (``python -m
benchmarks.convergence --schedule constant --workloads softmax,mlp,conv --json runs.json``),
the point of the 7-point grid whose final metrics, each over the best final metric of the grid on
its workload, have the smallest geometric mean over the digits workloads (a diverged run counts
as 100 times the best). ``python -m benchmarks.learning_rates runs.json`` prints it per optimizer.
The earlier entries (Adam's 3e-3 among them) came within one grid point of what the rule gives.

Usage::

    python -m benchmarks.learning_rates runs.json [runs2.json ...]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import adaopt

DIGITS = ("softmax", "mlp", "conv")
DIVERGED = 100.0  # a diverged run's final metric, as a multiple of the workload's best

TUNED: dict[str, float] = {
    "sgd": 0.5,
    "adagrad": 0.1,
    "rmsprop": 3e-3,
    "adadelta": 1.0,
    "adam": 3e-3,
    "adamw": 3e-3,
    "amsgrad": 3e-3,
    "adamax": 1e-2,
    "rprop": 1e-2,  # torch's default initial step size
    "nadam": 3e-3,
    "nadamw": 3e-3,
    "radam": 1e-2,
    "adabelief": 3e-3,
    "yogi": 1e-2,
    "adopt": 1e-2,  # by suggest() (b2 = 0.9999 needs more than Adam's 3e-3 on digits)
    "ademamix": 1e-2,  # by suggest()
    "laprop": 9e-3,  # by suggest()
    "adan": 2.7e-2,  # by suggest() (the paper's 1e-3 to 1.5e-2 for its tasks)
    "mars": 9e-3,  # by suggest() (the reference's default is 3e-3)
    "sophia": 1e-3,  # by suggest()
    "adam_mini": 3e-3,  # by suggest()
    "galore_adamw": 9e-3,  # by suggest() (no matrix of the digits MLP is projected at rank 128)
    "lion": 1e-3,
    "lamb": 5e-3,
    "muon": 2e-2 / 3,  # by suggest() (the author's default is 0.02; its auxiliary AdamW runs at the same rate)
    "scion": 2e-2 / 3,  # by suggest()
    "soap": 9e-3,  # by suggest() (the reference's default is 3e-3)
    "psgd_kron": 1e-3,  # by suggest() (the reference's default, psgd-jax)
    "shampoo": 3e-2,  # by suggest() (grafted onto SGD with Nesterov momentum 0.9)
    "adafactor": 0.27,  # by suggest() (scale_parameter: a step relative to the parameters' RMS)
    "came": 1e-3,  # by suggest() (its first steps are ~10x the rate: the confidence starts small)
    "sm3": 0.3,  # by suggest()
    "schedule_free_sgd": 1.0,
    "schedule_free_adamw": 2.5e-3,
    "schedule_free_radam": 2.5e-3,
    "dog": 1.0,
    "ldog": 1.0,
    "dowg": 1.0,
    "prodigy": 1.0,
    "dadapt_adam": 1.0,
    "dadapt_sgd": 1.0,
    "dadapt_adagrad": 1.0,
    "cocob": 1.0,
    "mechanic": 1.0,
    "sgd_hd": 1e-3,
    "sgdn_hd": 1e-3,
    "adam_hd": 1e-3,
    "bold_driver": 1e-2,
    "polyak_sgd": 1.0,
}


def make(spec: adaopt.OptimizerSpec, **overrides: Any) -> Any:
    """``spec``'s optimizer at its tuned learning rate and default hyperparameters, updated by ``overrides``."""
    return spec.factory(**{"learning_rate": TUNED[spec.name], **overrides})


def suggest(runs: Mapping[str, Mapping[str, Any]], workloads: Sequence[str] = DIGITS) -> dict[str, tuple[float, float]]:
    """Per optimizer of ``runs`` (convergence.py's JSON: ``"optimizer/workload"`` -> its run), the grid point with
    the smallest geometric mean of final metric over best final metric on ``workloads``, and that mean."""
    from benchmarks.convergence import Run  # which imports TUNED from here

    by_optimizer: dict[str, list[Run]] = {}
    for key, fields in runs.items():
        optimizer, workload = key.rsplit("/", 1)
        run = Run(**fields)
        if workload in workloads and not run.skipped and len(run.learning_rates) > 1:
            by_optimizer.setdefault(optimizer, []).append(run)
    out = {}
    for optimizer, chosen in by_optimizer.items():
        rates = chosen[0].learning_rates
        if not all(np.allclose(r.learning_rates, rates, rtol=1e-6, atol=0) for r in chosen):
            raise ValueError(f"{optimizer}: its runs have different grids")
        logs = [0.0] * len(rates)
        for run in chosen:
            finals = [run.final(i) for i in range(len(rates))]  # a diverged run's: inf
            best = min(finals)
            for i, final in enumerate(finals):
                ratio = final / best if math.isfinite(final) and best > 0 else DIVERGED
                logs[i] += math.log(min(ratio, DIVERGED)) / len(chosen)
        i = min(range(len(rates)), key=logs.__getitem__)
        out[optimizer] = (rates[i], math.exp(logs[i]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(__doc__)
        return 2
    runs: dict[str, Any] = {}
    for path in paths:
        runs.update(json.loads(Path(path).read_text()))
    for optimizer, (rate, mean) in sorted(suggest(runs).items()):
        now = TUNED.get(optimizer)
        print(f"{optimizer:>22}: {rate:.3g} (geometric mean {mean:.4f} of the best; now {now})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
