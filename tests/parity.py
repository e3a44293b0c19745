"""The machinery of step-for-step comparisons: run adaopt, optax or torch on one gradient sequence.

Used by tests/test_parity.py (the registry's references) and by the tests of families whose
references need more than a gradient (loss-driven methods, evaluation parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import torch

TorchFactory = Callable[[list[dict[str, Any]], dict[str, Any]], torch.optim.Optimizer]

STEPS = 200
SHAPES = {"w": (7, 5), "b": (5,), "s": (), "conv": (3, 2, 2, 2)}  # flattened in sorted key order
DECAY_MASK = {"w": True, "b": False, "s": False, "conv": True}


@dataclasses.dataclass(frozen=True)
class Case:
    weight_decay: bool
    schedule: bool
    dtype: type

    @property
    def label(self) -> str:
        wd = "wd" if self.weight_decay else "nowd"
        lr = "schedule" if self.schedule else "constant"
        return f"{wd}-{lr}-{np.dtype(self.dtype).name}"


def random_problem(
    shapes: dict, seed: int, dtype: Any, steps: int = STEPS, complex_: bool = False
) -> tuple[dict, dict]:
    """Standard-normal parameters of ``shapes`` and ``steps`` gradients for each (complex: normal real
    and imaginary parts), drawn in that order from one seeded generator."""
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.normal(size=shape)
        return (x + 1j * rng.normal(size=shape) if complex_ else x).astype(dtype)

    params = {k: normal(s) for k, s in shapes.items()}
    grads = {k: normal((steps, *s)) for k, s in shapes.items()}
    return params, grads


def run_adaopt(tx: optax.GradientTransformation, params: dict, grads: dict) -> dict:
    """The parameter trajectory (STEPS, *shape) per leaf, the whole run in one compiled scan."""

    def step(carry: tuple, g: dict) -> tuple[tuple, dict]:
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p: dict, gs: dict) -> dict:
        _, trajectory = jax.lax.scan(step, (p, tx.init(p)), gs)
        return trajectory

    return jax.tree.map(np.asarray, run(params, grads))


def run_torch(make: TorchFactory, hp: dict, lr: Any, params: dict, grads: dict, case: Case) -> dict:
    names = sorted(params)
    tensors = {k: torch.tensor(params[k]) for k in names}
    if case.weight_decay:
        groups = [
            {"params": [tensors[k] for k in names if DECAY_MASK[k]], "weight_decay": hp["weight_decay"]},
            {"params": [tensors[k] for k in names if not DECAY_MASK[k]], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": [tensors[k] for k in names], "weight_decay": 0.0}]
    # torch keeps scalar state (NAdam's mu_product) in the default dtype: match the case's.
    wide = np.finfo(case.dtype).bits == 64  # float64 and complex128
    with default_dtype(torch.float64 if wide else torch.float32):
        return _torch_trajectory(make(groups, hp), tensors, lr, grads)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype ``dtype`` meanwhile: the dtype of the scalars a reference creates (NAdam's
    ``mu_product``; heavyball's learning rate and debiasing factors)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def decay_groups(tensors: dict, weight_decay: float, mask: dict | None) -> list[dict[str, Any]]:
    """torch parameter groups: the decayed tensors (``mask`` True, all without a mask) with ``weight_decay``, the
    others with none; an empty group left out."""
    names = sorted(tensors)
    decayed = [k for k in names if mask is None or mask[k]]
    groups = [
        {"params": [tensors[k] for k in decayed], "weight_decay": weight_decay},
        {"params": [tensors[k] for k in names if k not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _torch_trajectory(opt: torch.optim.Optimizer, tensors: dict, lr: Any, grads: dict) -> dict:
    names = sorted(tensors)
    trajectory: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for t in range(len(grads[names[0]])):
        rate = float(lr(t)) if callable(lr) else lr
        for group in opt.param_groups:
            group["lr"] = rate
        for k in names:
            tensors[k].grad = torch.tensor(grads[k][t])
        opt.step()
        for k in names:
            trajectory[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def relative_error(ours: dict, theirs: dict) -> float:
    """The largest difference over the leaves, relative to each reference leaf's largest magnitude; inf where either
    side is not finite where the other is (``max`` with a NaN keeps its first argument: NaN passed as 0)."""
    worst = 0.0
    for k in theirs:
        a, b = np.asarray(ours[k]), np.asarray(theirs[k])
        finite = np.isfinite(b)
        if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(a[~finite], b[~finite], equal_nan=True):
            return float("inf")
        scale = max(float(np.max(np.abs(b[finite]), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale)
    return worst
