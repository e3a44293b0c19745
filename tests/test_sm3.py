"""SM3 against optax and pytorch-optimizer, its 0-d and 1-d leaves, its state's layout, and its validation.

``tests/test_parity.py`` runs the registry's references on ``parity.SHAPES``. Here the tree adds
a 3-d leaf (three covers per coordinate), each trajectory is compared with both references at
once, ``optax.sm3`` itself (the alias, whose eps is fixed at 1e-8 and whose learning rate is a
number) is compared on the leaves it accepts, and the coupled weight decay is compared with
pytorch-optimizer fed ``g + wd * p`` (neither reference takes a decay). optax fails on 0-d leaves:
its runner (``tests/references.py``) gives each as a vector of one element. Both packages compute
in the parameters' dtype: float64 is compared in float64.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

import adaopt
from tests import parity, references

SPEC = adaopt.REGISTRY["sm3"]
SHAPES = {**parity.SHAPES, "t": (2, 3, 4)}
TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}


def _draw(seed: int, b2: float | None, weight_decay: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["momentum"] = float(rng.uniform(0.5, 0.95))  # the registry's range starts at 0: here always a momentum
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(0.01), np.log(0.1))))
    hp["weight_decay"] = float(rng.uniform(1e-2, 0.1)) if weight_decay else 0.0
    return {**hp, "b2": b2}


def _ours(hp: dict[str, Any], params: dict, grads: dict, **options: Any) -> dict:
    keys = ("learning_rate", "momentum", "b2", "eps", "weight_decay")
    with jax.enable_x64(next(iter(params.values())).dtype == np.float64):
        return parity.run_adaopt(adaopt.sm3(**{k: hp[k] for k in keys}, **options), params, grads)


class _CoupledDecaySM3(pytorch_optimizer.SM3):
    """pytorch_optimizer.SM3 with the gradient g + wd * p (coupled L2 decay, which it does not take)."""

    def __init__(self, params: Any, weight_decay: float, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.decay = weight_decay

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.add_(p, alpha=self.decay)
        return super().step(closure)


def _pytorch_optimizer(hp: dict[str, Any], params: dict, grads: dict) -> dict:
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = [{"params": [tensors[k] for k in sorted(tensors)]}]
    kwargs = {"lr": hp["learning_rate"], "momentum": hp["momentum"], "beta": hp["b2"] or 0.0, "eps": hp["eps"]}
    opt = _CoupledDecaySM3(groups, hp["weight_decay"], **kwargs)
    return parity._torch_trajectory(opt, tensors, hp["learning_rate"], grads)


def _optax(hp: dict[str, Any], params: dict, grads: dict) -> dict:
    tx = references.OPTAX["optax.scale_by_sm3"](hp["learning_rate"], hp, None)
    with jax.enable_x64(next(iter(params.values())).dtype == np.float64):
        return parity.run_adaopt(tx, params, grads)


def _check(name: str, ours: dict, theirs: dict, params: dict, dtype: Any) -> float:
    for k in params:
        assert ours[k].dtype == dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, f"{name} barely moved the parameters: the comparison would prove little"
    error = parity.relative_error(ours, theirs)
    print(f"{name} {np.dtype(dtype).name}: {error:.2e}")
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} vs {name}"
    return error


# (b2, dtype): None sums (the paper's SM3-II), a number takes moving averages.
# float32 is run by tests/test_parity.py on the registry's references.
CASES = [(None, np.float64), (0.95, np.float64)]


@pytest.mark.parametrize(("b2", "dtype"), CASES, ids=[f"b2={b}-{np.dtype(d).name}" for b, d in CASES])
def test_matches_optax_and_pytorch_optimizer(b2: float | None, dtype: Any) -> None:
    """With b2, optax replaces each accumulator by its new maximum and pytorch-optimizer keeps the running
    maximum (monotone_accumulators=True); the sums of b2=None never decrease, and both agree."""
    seed = zlib.crc32(f"sm3/{b2}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, b2)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    ours = _ours(hp, params, grads)
    _check("optax.scale_by_sm3", ours, _optax(hp, params, grads), params, dtype)
    theirs = _pytorch_optimizer(hp, params, grads)
    if b2 is None:
        _check("pytorch_optimizer.SM3", ours, theirs, params, dtype)
        return
    monotone = _ours(hp, params, grads, monotone_accumulators=True)
    _check("pytorch_optimizer.SM3(beta > 0)", monotone, theirs, params, dtype)
    assert parity.relative_error(ours, theirs) > 1e-4, "the two rules of the accumulators should differ here"


def test_coupled_weight_decay_is_the_gradient_plus_decay() -> None:
    """On a matrix and a vector (a quicker compile)."""
    hp = _draw(7, None, weight_decay=True)
    params, grads = parity.random_problem({"w": SHAPES["w"], "b": SHAPES["b"]}, 8, np.float64)
    _check(
        "pytorch_optimizer.SM3(g + wd p)",
        _ours(hp, params, grads),
        _pytorch_optimizer(hp, params, grads),
        params,
        np.float64,
    )


def test_matches_optax_sm3_itself() -> None:
    """The alias ``optax.sm3(learning_rate, momentum)`` (eps 1e-8 inside the root), on a matrix and a 3-d leaf."""
    hp = {**_draw(3, None), "eps": 1e-8}
    shapes = {"w": SHAPES["w"], "t": SHAPES["t"]}
    params, grads = parity.random_problem(shapes, 4, np.float64)
    with jax.enable_x64(True):
        theirs = parity.run_adaopt(optax.sm3(hp["learning_rate"], hp["momentum"]), params, grads)
    _check("optax.sm3", _ours(hp, params, grads), theirs, params, np.float64)
    with pytest.raises(IndexError):  # a 0-d leaf: why the registry's runner gives optax vectors of one element
        tx = optax.sm3(0.1)
        tx.update(jnp.ones(()), tx.init(jnp.ones(())))


def test_low_dimensional_leaves_keep_a_full_accumulator() -> None:
    """A 0-d or 1-d leaf is AdaGrad (eps inside the root), step for step; a matrix is not (its covers share)."""
    params, grads = parity.random_problem({"b": (5,), "s": (), "w": (4, 3)}, 5, np.float64)
    with jax.enable_x64(True):
        sm3 = parity.run_adaopt(adaopt.sm3(0.1, momentum=None, eps=1e-6), params, grads)
        adagrad = parity.run_adaopt(adaopt.adagrad(0.1, eps=0.0, eps_root=1e-6), params, grads)
    low = ("b", "s")
    assert parity.relative_error({k: sm3[k] for k in low}, {k: adagrad[k] for k in low}) <= 1e-14
    assert parity.relative_error({"w": sm3["w"]}, {"w": adagrad["w"]}) > 1e-3


def test_the_comparison_is_sharp() -> None:
    """momentum off by 1e-3 fails it (on one 3-d leaf: a quicker compile)."""
    hp = _draw(0, None)
    params, grads = parity.random_problem({"t": SHAPES["t"]}, 1, np.float64)
    theirs = _pytorch_optimizer(hp, params, grads)
    assert parity.relative_error(_ours(hp, params, grads), theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(_ours({**hp, "momentum": hp["momentum"] - 1e-3}, params, grads), theirs) > 1e-6


def test_state_keeps_one_vector_per_axis() -> None:
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = adaopt.scale_by_sm3().init(params)
    masked = optax.MaskedNode()
    shapes = [jax.tree.map(jnp.shape, tree) for tree in state.accumulators]
    assert shapes == [
        {"w": (7,), "b": (5,), "s": (), "conv": (3,), "t": (2,)},
        {"w": (5,), "b": masked, "s": masked, "conv": (2,), "t": (3,)},
        {"w": masked, "b": masked, "s": masked, "conv": (2,), "t": (4,)},
        {"w": masked, "b": masked, "s": masked, "conv": (2,), "t": masked},
    ]
    assert jax.tree.map(jnp.shape, state.mu) == SHAPES
    assert adaopt.scale_by_sm3(momentum=None).init(params).mu is None


def test_no_momentum_is_momentum_zero_without_a_buffer() -> None:
    params, grads = parity.random_problem({"w": (4, 3)}, 6, np.float32)
    none = parity.run_adaopt(adaopt.sm3(0.1, momentum=None), params, grads)
    zero = parity.run_adaopt(adaopt.sm3(0.1, momentum=0.0), params, grads)
    np.testing.assert_array_equal(none["w"], zero["w"])


def test_a_state_for_other_parameters_is_refused() -> None:
    """By the momentum's check, and without a momentum by the accumulators' own."""
    params, other = {"w": jnp.zeros((3, 2))}, {"w": jnp.zeros((2, 3))}
    tx = adaopt.scale_by_sm3()
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['w'\] have shape \(2, 3\).*state there has shape \(3, 2\)"):
        tx.update(other, tx.init(params))
    tx = adaopt.scale_by_sm3(momentum=None)
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['w'\] have shape \(2, 3\).*shapes \[\(3,\), \(2,\)\]"):
        tx.update(other, tx.init(params))
    with pytest.raises(adaopt.TreeMismatchError, match="structure of SM3's accumulators"):
        tx.update({"v": jnp.zeros((3, 2))}, tx.init(params))


def test_refuses_complex_parameters_naming_the_leaf() -> None:
    with pytest.raises(TypeError, match=r"SM3 does not take complex.*\['z'\]"):
        adaopt.sm3().init({"w": jnp.ones((2, 2)), "z": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 1.0}, r"momentum must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"b2": 1.0}, r"b2 must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"eps": -1e-8}, r"eps must be a finite number in \[0.0, inf\), got -1e-08"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number in \[0.0, inf\), got -0.1"),
        ({"learning_rate": float("inf")}, r"learning_rate must be a finite number in \[0.0, inf\), got inf"),
        ({"accumulator_dtype": jnp.int8}, r"accumulator_dtype must be a floating dtype"),
        ({"mu_dtype": "float8_e5m2"}, r"mu_dtype cannot be float8_e5m2"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=message):
        adaopt.sm3(**kwargs)


def test_the_momentum_takes_a_storage() -> None:
    """The momentum mirrors the parameters (the accumulators are factored): an int8 one, its first step float32's."""
    params = {"w": jnp.ones((64, 128))}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 128)), jnp.float32)}
    light = adaopt.sm3(1e-2, momentum=0.9, mu_dtype=adaopt.Blockwise("dynamic8", min_size=0))
    state = light.init(params)
    assert isinstance(optax.tree.get(state, "mu")["w"], adaopt.Quantized)
    updates, _ = light.update(grads, state, params)
    plain = adaopt.sm3(1e-2, momentum=0.9)
    expected, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(expected["w"]))
