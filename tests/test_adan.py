"""Adan's options beyond the registry's parity runs: the global gradient clip and complex parameters.

``tests/test_parity.py`` compares the default path (both weight-decay modes) with
``pytorch_optimizer.Adan`` and ``optax.adan``. Here: ``max_grad_norm`` against
``pytorch_optimizer.Adan(max_grad_norm=...)``, whose global norm is summed in float32 whatever the
parameters' dtype; in float64 it is compared with that sum patched to float64 (a restatement of
its ``get_global_gradient_norm`` in the test) and, unpatched, at float32's precision. Complex
parameters with ``complex_convention="real_imag"`` against its ``view_as_real`` path.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
import optax
import pytest
import pytorch_optimizer.optimizer.adan as reference_adan
import torch

import adaopt
from tests import parity, references

SPEC = adaopt.REGISTRY["adan"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["max_grad_norm"] = float(rng.uniform(1.0, 5.0))  # the gradients' norm is about 8: every step clips
    return hp


# pytorch_optimizer.Adan(max_grad_norm > 0) fails on a 0-d parameter (its clip factor has shape (1,)): none here.
SHAPES = {k: shape for k, shape in parity.SHAPES.items() if shape}


def _theirs(hp: dict, params: dict, grads: dict) -> dict:
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = [{"params": [tensors[k] for k in sorted(tensors)], "weight_decay": hp["weight_decay"]}]
    opt = references.TORCH["pytorch_optimizer.Adan"](groups, hp)
    return parity._torch_trajectory(opt, tensors, hp["learning_rate"], grads)


def _ours(hp: dict, params: dict, grads: dict, **options: Any) -> dict:
    keys = ("learning_rate", "b1", "b2", "b3", "eps", "weight_decay", "max_grad_norm", "weight_decay_mode")
    tx = adaopt.adan(**{k: hp[k] for k in keys if k in hp}, **options)
    return parity.run_adaopt(tx, params, grads)


def _global_norm_in_float64(param_groups: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
    """pytorch-optimizer's ``get_global_gradient_norm`` (the sum of the squared gradient norms), summed in float64."""
    del device, kwargs
    grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
    return torch.stack([g.double().square().sum() for g in grads]).sum().reshape(1)


CLIP_CASES = [
    ("proximal", False, np.float64), ("proximal", True, np.float64), ("decoupled", True, np.float64),
    ("proximal", True, np.float32), ("decoupled", True, np.float32),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "weight_decay", "dtype"), CLIP_CASES)
def test_max_grad_norm_matches_pytorch_optimizer_Adan(
    mode: str, weight_decay: bool, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = zlib.crc32(f"adan/clip/{mode}/{weight_decay}/{np.dtype(dtype).name}".encode())
    hp = {**_draw(seed, weight_decay), "weight_decay_mode": mode}
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        ours = _ours(hp, params, grads)
        unclipped = _ours({**hp, "max_grad_norm": None}, params, grads)
    if dtype == np.float64:
        # Unpatched, the reference's clip factor is a float32 number: alike to float32's precision only.
        error = parity.relative_error(ours, _theirs(hp, params, grads))
        assert 1e-12 < error < 1e-6
        monkeypatch.setattr(reference_adan, "get_global_gradient_norm", _global_norm_in_float64)
    assert parity.relative_error(ours, _theirs(hp, params, grads)) <= TOLERANCE[dtype]
    assert parity.relative_error(ours, unclipped) > 1e-3, "the clip changed nothing: the comparison proves little"


@pytest.mark.parametrize("mode", ["proximal", "decoupled"])
def test_real_imag_matches_pytorch_optimizer_Adan_on_complex_parameters(mode: str) -> None:
    """pytorch-optimizer views a complex tensor as real pairs (its per-parameter path): ``complex_convention="real_imag"``."""
    seed = zlib.crc32(f"adan/complex/{mode}".encode())
    hp = {**_draw(seed, True), "weight_decay_mode": mode, "max_grad_norm": None}
    params, grads = parity.random_problem(SHAPES, seed + 1, np.complex128, complex_=True)
    with jax.enable_x64(True):
        ours = _ours(hp, params, grads, complex_convention="real_imag")
        modulus = _ours(hp, params, grads)
    theirs = _theirs({**hp, "max_grad_norm": 0.0}, params, grads)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(modulus, theirs) > 1e-6


def test_the_comparison_is_sharp() -> None:
    """b3 off by 1e-4 fails it."""
    hp = {**_draw(0, True), "max_grad_norm": None}
    params, grads = parity.random_problem(SHAPES, 1, np.float64)
    theirs = _theirs({**hp, "max_grad_norm": 0.0}, params, grads)
    with jax.enable_x64(True):
        assert parity.relative_error(_ours(hp, params, grads), theirs) <= TOLERANCE[np.float64]
        assert parity.relative_error(_ours({**hp, "b3": hp["b3"] - 1e-4}, params, grads), theirs) > 1e-6


def test_optax_adan_weighs_the_difference_by_one_minus_b2() -> None:
    """The registry's optax convention is needed: with the paper's weight, optax.adan differs."""
    hp = {**_draw(2, True), "max_grad_norm": None, "weight_decay_mode": "decoupled"}
    params, grads = parity.random_problem(SHAPES, 3, np.float64)
    with jax.enable_x64(True):
        theirs = parity.run_adaopt(
            optax.adan(hp["learning_rate"], hp["b1"], hp["b2"], hp["b3"], hp["eps"], 1e-8, hp["weight_decay"]),
            params,
            grads,
        )
        paper = _ours(hp, params, grads, eps_root=1e-8)
        optax_weight = _ours(hp, params, grads, eps_root=1e-8, diff_weight=1 - hp["b2"])
    assert parity.relative_error(optax_weight, theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(paper, theirs) > 1e-4


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"b3": 1.0}, "b3"), ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"diff_weight": -1.0}, "diff_weight"),
        ({"weight_decay_mode": "coupled"}, "weight_decay_mode"), ({"eps_root": -1.0}, "eps_root"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.adan(**kwargs)
