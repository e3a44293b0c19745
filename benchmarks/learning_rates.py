"""The learning rate each registry optimizer runs at in the benchmarks, the demo and the tests.

Tuned on the digits workloads of :mod:`benchmarks.workloads` with every other hyperparameter at
its default (the convergence benchmark's grid is centred on these). A tuning-free optimizer
(``adaopt.Capability.TUNING_FREE``) runs at its factory's default. These are settings of our
measurements, not of the library: ``adaopt.REGISTRY`` holds only what users need.
"""

from __future__ import annotations

from typing import Any

import adaopt

TUNED: dict[str, float] = {
    "sgd": 0.5,
    "adagrad": 0.1,
    "rmsprop": 3e-3,
    "adadelta": 1.0,
    "adam": 3e-3,
    "adamw": 3e-3,
    "amsgrad": 3e-3,
    "adamax": 1e-2,
    "nadam": 3e-3,
    "nadamw": 3e-3,
    "radam": 1e-2,
    "adabelief": 3e-3,
    "yogi": 1e-2,
    "adopt": 1e-2,  # not tuned on the grid yet (b2 = 0.9999 needs more than Adam's 3e-3 on digits)
    "ademamix": 1e-2,  # not tuned on the grid yet
    "laprop": 3e-3,  # not tuned on the grid yet
    "adan": 3e-3,  # not tuned on the grid yet (Adam's; the paper's 1e-3 to 1.5e-2 for its tasks)
    "mars": 3e-3,  # the reference's default (pytorch-optimizer, the authors' code): not tuned on the grid yet
    "sophia": 3e-3,  # not tuned on the grid yet
    "adam_mini": 3e-3,  # Adam's: not tuned on the grid yet
    "galore_adamw": 3e-3,  # AdamW's: not tuned on the grid yet (no matrix of the digits MLP is projected at rank 128)
    "lion": 1e-3,
    "lamb": 5e-3,
    "muon": 0.02,  # the author's default (the auxiliary AdamW at the same rate): not tuned on the grid yet
    "scion": 0.02,  # not tuned on the grid yet
    "soap": 3e-3,  # the reference's default: not tuned on the grid yet
    "psgd_kron": 1e-3,  # the reference's default (psgd-jax): not tuned on the grid yet
    "shampoo": 1e-2,  # not tuned on the grid yet (grafted onto SGD with Nesterov momentum 0.9)
    "adafactor": 1e-2,  # the paper's cap of the relative step, rho_t = min(1e-2, 1/sqrt(t)): not tuned on the grid yet
    "came": 1e-3,  # not tuned on the grid yet (its first steps are ~10x the rate: the confidence starts small)
    "sm3": 0.1,  # not tuned on the grid yet (AdaGrad's)
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
