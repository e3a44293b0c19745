"""CAME against the authors' package and pytorch-optimizer, its state's layout, and its validation.

``tests/test_parity.py`` runs the registry's references on ``parity.SHAPES``. Here the tree adds
a 3-d leaf (a batch of two 3x4 matrices: both references factor the last two axes and keep the
leading one as a batch), each trajectory is compared with several references at once, and
pytorch-optimizer's per-parameter path (``foreach=False``) is compared as well as its default
``foreach`` path. Both packages compute in the parameters' dtype: float64 is compared in float64.
"""

from __future__ import annotations

import zlib
from typing import Any

import came_pytorch
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

import adaopt
from tests import parity

SPEC = adaopt.REGISTRY["came"]
SHAPES = {**parity.SHAPES, "t": (2, 3, 4)}
TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(3e-4), np.log(3e-3))))
    hp["weight_decay"] = float(rng.uniform(1e-2, 0.1)) if weight_decay else 0.0
    return hp


def _ours(hp: dict[str, Any], params: dict, grads: dict, **options: Any) -> dict:
    keys = ("learning_rate", "b1", "b2", "b3", "clip_threshold", "weight_decay")
    with jax.enable_x64(next(iter(params.values())).dtype == np.float64):
        return parity.run_adaopt(adaopt.came(**{k: hp[k] for k in keys}, **options), params, grads)


def _theirs(reference: str, hp: dict[str, Any], params: dict, grads: dict) -> dict:
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = [{"params": [tensors[k] for k in sorted(tensors)]}]
    betas = (hp["b1"], hp["b2"], hp["b3"])
    lr, wd, clip = hp["learning_rate"], hp["weight_decay"], hp["clip_threshold"]
    opt: torch.optim.Optimizer
    if reference == "came_pytorch.CAME":
        opt = came_pytorch.CAME(groups, lr=lr, betas=betas, clip_threshold=clip, weight_decay=wd)
    else:
        coupled = "weight_decouple=False" in reference
        opt = pytorch_optimizer.CAME(
            groups, lr=lr, betas=betas, clip_threshold=clip, weight_decay=wd, weight_decouple=not coupled,
            foreach=False if "foreach=False" in reference else None,
        )  # fmt: skip
    return parity._torch_trajectory(opt, tensors, lr, grads)


# (weight decay, dtype, the references compared with one trajectory of ours (decoupled decay), and those compared
# with one of ours with decoupled_weight_decay=False)
CASES = [
    (True, np.float64, ["came_pytorch.CAME", "pytorch_optimizer.CAME"], ["pytorch_optimizer.CAME(weight_decouple=False, foreach=False)"]),
    (False, np.float64, ["came_pytorch.CAME", "pytorch_optimizer.CAME(foreach=False)"], []),
]  # fmt: skip  # float32: tests/test_parity.py runs came_pytorch.CAME there


@pytest.mark.parametrize(
    ("weight_decay", "dtype", "decoupled", "coupled"),
    CASES,
    ids=[f"{'wd' if wd else 'nowd'}-{np.dtype(d).name}" for wd, d, _, _ in CASES],
)
def test_matches_the_references(weight_decay: bool, dtype: Any, decoupled: list[str], coupled: list[str]) -> None:
    seed = zlib.crc32(f"came/{weight_decay}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    ours_decoupled = _ours(hp, params, grads)
    runs = [(name, ours_decoupled) for name in decoupled]
    if coupled:
        ours_coupled = _ours(hp, params, grads, decoupled_weight_decay=False)
        runs += [(name, ours_coupled) for name in coupled]
    for name, ours in runs:
        theirs = _theirs(name, hp, params, grads)
        for k in SHAPES:
            assert ours[k].dtype == dtype
        moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
        assert moved > 1e-3, "the reference barely moved the parameters: the comparison would prove little"
        error = parity.relative_error(ours, theirs)
        print(f"{name} {np.dtype(dtype).name} wd={weight_decay}: {error:.2e}")  # the measured error, shown with -s
        assert error <= TOLERANCE[dtype], f"relative error {error:.3g} vs {name} with {hp}"
    if weight_decay and coupled:
        # The two decays differ (coupled decay passes through the second moment): the mapping is needed.
        assert parity.relative_error(ours_decoupled, ours_coupled) > 1e-4


def test_the_comparison_is_sharp() -> None:
    """b3 off by 1e-4 (the confidence's decay alone) fails it (on one matrix: a quicker compile)."""
    hp = _draw(0, True)
    params, grads = parity.random_problem({"w": SHAPES["w"]}, 1, np.float64)
    theirs = _theirs("came_pytorch.CAME", hp, params, grads)
    assert parity.relative_error(_ours(hp, params, grads), theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(_ours({**hp, "b3": hp["b3"] - 1e-4}, params, grads), theirs) > 1e-6


def test_state_is_factored_over_the_last_two_axes_and_full_below_two() -> None:
    """Matrices and the 3-d batch keep row and column statistics; 0-d and 1-d leaves a full second moment."""
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = adaopt.scale_by_came().init(params)
    masked = optax.MaskedNode()
    assert jax.tree.map(jnp.shape, state.nu_row) == {
        "w": (7,),
        "b": masked,
        "s": masked,
        "conv": (3, 2, 2),
        "t": (2, 3),
    }
    assert jax.tree.map(jnp.shape, state.nu_col) == {
        "w": (5,),
        "b": masked,
        "s": masked,
        "conv": (3, 2, 2),
        "t": (2, 4),
    }
    assert jax.tree.map(jnp.shape, state.nu) == {"w": masked, "b": (5,), "s": (), "conv": masked, "t": masked}
    assert jax.tree.structure(state.res_row) == jax.tree.structure(state.nu_row)
    assert jax.tree.map(jnp.shape, state.mu) == SHAPES


def test_low_dimensional_leaves_follow_the_unfactored_rule() -> None:
    """A 1-d leaf's first step: (1 - b1) times g / sqrt((1 - b2)(g^2 + eps1)), clipped to RMS 1 (no confidence)."""
    g = jnp.array([1.0, -2.0, 0.5])
    tx = adaopt.scale_by_came(b1=0.9, b2=0.999)
    updates, _ = tx.update(g, tx.init(g))
    u = np.asarray(g) / np.sqrt(1e-3 * (np.asarray(g) ** 2 + 1e-30))
    u = u / max(1.0, float(np.sqrt(np.mean(u**2))))
    np.testing.assert_allclose(np.asarray(updates), 0.1 * u, rtol=1e-5)


def test_refuses_complex_parameters_naming_the_leaf() -> None:
    with pytest.raises(TypeError, match=r"CAME does not take complex.*\['z'\]"):
        adaopt.came().init({"w": jnp.ones((2, 2)), "z": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"b1": 1.0}, r"b1 must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"b2": -0.1}, r"b2 must be a finite number in \[0.0, 1.0\), got -0.1"),
        ({"b3": 1.5}, r"b3 must be a finite number in \[0.0, 1.0\), got 1.5"),
        ({"eps1": -1e-30}, r"eps1 must be a finite number in \[0.0, inf\), got -1e-30"),
        ({"eps2": float("nan")}, r"eps2 must be a finite number in \[0.0, inf\), got nan"),
        ({"clip_threshold": 0.0}, r"clip_threshold must be a finite number in \(0.0, inf\), got 0.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number in \[0.0, inf\), got -0.1"),
        ({"learning_rate": -1.0}, r"learning_rate must be a finite number in \[0.0, inf\), got -1.0"),
        ({"mu_dtype": jnp.int32}, r"mu_dtype must be a floating dtype"),
        ({"nu_dtype": "float8_e4m3fn"}, r"nu_dtype cannot be float8_e4m3fn"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=message):
        adaopt.came(**kwargs)
