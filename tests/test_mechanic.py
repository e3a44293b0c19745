"""Mechanic against the authors' package (``mechanic_pytorch.mechanize``) and optax.contrib.mechanize, step for step.

Mechanic learns a scale only from a signal: on gradients of pure noise it rightly stays at its
tiny initial scale and the comparison would prove nothing. The gradients here are those of a
linear loss plus fresh noise each step (a constant mean per coordinate plus N(0, 1)), which do
not depend on the parameters, so the comparison is not blurred by a chaotic feedback loop.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch
from mechanic_pytorch import mechanize

from adaopt import HyperparameterError, MechanicState, adam, adamw, lamb, mechanic, rmsprop, sgd
from tests import parity, problems
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case

INNER = {
    "sgd": lambda lr, hp, mask: sgd(lr, hp["momentum"], weight_decay=hp["weight_decay"], weight_decay_mask=mask),
    "adam": lambda lr, hp, mask: adam(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], weight_decay_mask=mask
    ),
    "adamw": lambda lr, hp, mask: adamw(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], weight_decay_mask=mask
    ),
}


def _mechanized(base: Any, hp: dict[str, Any]) -> Any:
    return mechanize(base, s_decay=hp["s_decay"], s_init=hp["s_init"], store_delta=hp["store_delta"])


# The package's mechanize(torch optimizer class) on torch parameter groups (which carry the
# inner optimizer's weight decay); run_torch sets each group's lr every step.
TORCH = {
    "sgd": lambda groups, hp: _mechanized(torch.optim.SGD, hp)(groups, lr=1.0, momentum=hp["momentum"]),
    "adam": lambda groups, hp: _mechanized(torch.optim.Adam, hp)(
        groups, lr=1.0, betas=(hp["b1"], hp["b2"]), eps=hp["eps"]
    ),
    "adamw": lambda groups, hp: _mechanized(torch.optim.AdamW, hp)(
        groups, lr=1.0, betas=(hp["b1"], hp["b2"]), eps=hp["eps"]
    ),
}
PEAK = {"sgd": (0.05, 1.0), "adam": (0.3, 3.0), "adamw": (0.3, 3.0)}


def _draw(kind: str, seed: int, case: Case, store_delta: bool) -> tuple[dict[str, Any], Any]:
    rng = np.random.default_rng(seed)
    log_uniform = lambda low, high: float(np.exp(rng.uniform(np.log(low), np.log(high))))
    hp: dict[str, Any] = {
        "s_decay": float(rng.uniform(0.0, 0.05)),
        # Around the packages' defaults (1e-8, 1e-6). Much smaller ones stall float32 runs that
        # recompute Delta: S |u| stays under half an ulp of the parameters and nothing moves.
        "s_init": log_uniform(1e-8, 1e-6),
        "momentum": float(rng.uniform(0.0, 0.95)),
        "b1": float(rng.uniform(0.5, 0.99)),
        "b2": float(rng.uniform(0.9, 0.9999)),
        "eps": log_uniform(1e-8, 1e-3),
        "weight_decay": float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0,
        "store_delta": store_delta,
    }
    peak = log_uniform(*PEAK[kind])
    if not case.schedule:
        return hp, peak
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=20, decay_steps=STEPS, end_value=peak / 10)
    return hp, lambda count: schedule(jnp.asarray(count, case.dtype))


def _data(seed: int, dtype: Any) -> tuple[dict, dict]:
    """Parameters, and gradients of a linear loss (a constant mean) plus fresh noise each step."""
    rng = np.random.default_rng(seed + 1000)
    params = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    grads = {
        k: (0.5 * rng.normal(size=shape) + rng.normal(size=(STEPS, *shape))).astype(dtype)
        for k, shape in SHAPES.items()
    }
    return params, grads


def _run(tx: optax.GradientTransformation, params: dict, grads: dict) -> tuple[dict, Any]:
    """The parameter trajectory (as parity.run_adaopt) and the final state."""

    def step(carry: tuple, g: dict) -> tuple[tuple, dict]:
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p: dict, gs: dict) -> tuple[dict, Any]:
        (_, state), trajectory = jax.lax.scan(step, (p, tx.init(p)), gs)
        return trajectory, state

    trajectory, state = run(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    return jax.tree.map(np.asarray, trajectory), state


def _torch(kind: str, hp: dict[str, Any], lr: Any, params: dict, grads: dict, case: Case) -> tuple[dict, np.ndarray]:
    """The package's trajectory and its final scales s (one per beta)."""
    made: list[torch.optim.Optimizer] = []

    def make(groups: list[dict[str, Any]], hp: dict[str, Any]) -> torch.optim.Optimizer:
        made.append(TORCH[kind](groups, hp))
        return made[0]

    trajectory = parity.run_torch(make, hp, lr, params, grads, case)
    return trajectory, made[0].state["_mechanic"]["s"].numpy()


def _moved(trajectory: dict, params: dict) -> float:
    return parity.relative_error(trajectory, {k: np.broadcast_to(params[k], trajectory[k].shape) for k in trajectory})


# Each kind under three or four cases, each with its own draw: float64 and float32, weight decay
# on and off (always on for AdamW), a constant learning rate and a schedule, Delta recomputed
# and stored.
CASES = [
    (Case(False, False, np.float64), False),
    (Case(True, True, np.float64), True),
    (Case(True, False, np.float32), False),
    (Case(False, True, np.float32), True),
]
RUNS = [
    (kind, Case(case.weight_decay or kind == "adamw", case.schedule, case.dtype), store_delta)
    for kind in TORCH
    for case, store_delta in CASES
    # float32 twice: Adam's with stored Delta, AdamW's recomputed (the float32 recomputation each kind shares)
    if case.dtype == np.float64 or (kind, store_delta) in {("adam", True), ("adamw", False)}
]


@pytest.mark.parametrize(
    ("kind", "case", "store_delta"),
    RUNS,
    ids=[f"{k}-{c.label}-{'stored' if s else 'recomputed'}" for k, c, s in RUNS],
)
def test_matches_mechanic_pytorch(kind: str, case: Case, store_delta: bool) -> None:
    seed = 4 * list(TORCH).index(kind) + [c.dtype == case.dtype and s == store_delta for c, s in CASES].index(True)
    hp, lr = _draw(kind, seed, case, store_delta)
    params, grads = _data(seed, case.dtype)
    mask = DECAY_MASK if case.weight_decay else None
    with jax.enable_x64(case.dtype == np.float64):
        tx = mechanic(INNER[kind](lr, hp, mask), hp["s_decay"], s_init=hp["s_init"], store_delta=store_delta)
        ours, state = _run(tx, params, grads)
        theirs, their_s = _torch(kind, hp, lr, params, grads, case)
    for k in SHAPES:
        assert ours[k].dtype == case.dtype
    assert _moved(theirs, params) > 1e-3, "the reference barely moved the parameters"
    error = parity.relative_error(ours, theirs)
    scale_error = abs(float(np.sum([np.asarray(x) for x in state.s])) / float(np.sum(their_s)) - 1)
    if case.dtype == np.float64:
        assert error <= 1e-8 and scale_error <= 1e-8, f"relative error {error:.3g}, scale {scale_error:.3g}"
    elif store_delta or kind == "sgd":
        assert error <= 1e-4 and scale_error <= 1e-4, f"relative error {error:.3g}, scale {scale_error:.3g}"
    else:
        # Recomputing Delta = (x - x_ref) / (S + eps) in float32 while S is ~1e-6 loses most of
        # its digits; with Adam's steps the package's own float32 run then strays from its
        # float64 run by ~1e-3. Ours stays several times closer to it than that.
        with jax.enable_x64(True):
            exact, _ = _torch(
                kind, hp, lr, *_data(seed, np.float64), Case(case.weight_decay, case.schedule, np.float64)
            )
        own = parity.relative_error(theirs, exact)
        assert error <= 1e-3 and error <= 0.25 * own, f"relative error {error:.3g}; float32 vs float64: {own:.3g}"


def _optax_betas(n: int) -> tuple[float, ...]:
    return tuple(1 - 0.1**i for i in range(1, n + 1))


OPTAX_INNER = {
    "sgd": (lambda lr, hp: optax.sgd(lr, hp["momentum"]), lambda lr, hp: sgd(lr, hp["momentum"])),
    "adam": (
        lambda lr, hp: optax.adam(lr, hp["b1"], hp["b2"], hp["eps"]),
        lambda lr, hp: adam(lr, hp["b1"], hp["b2"], hp["eps"]),
    ),
}
OPTAX_RUNS = [("sgd", Case(False, False, np.float64)), ("adam", Case(False, True, np.float32))]


@pytest.mark.parametrize(("kind", "case"), OPTAX_RUNS, ids=[f"{k}-{c.label}" for k, c in OPTAX_RUNS])
def test_optax_variant_matches_optax_contrib_mechanize(kind: str, case: Case) -> None:
    """variant="optax" is optax.contrib.mechanize (around optax's own sgd/adam); the default is not."""
    seed = 100 + OPTAX_RUNS.index((kind, case))
    hp, lr = _draw(kind, seed, case, False)
    num_betas = 1 + seed % 6
    params, grads = _data(seed, case.dtype)
    theirs_inner, our_inner = OPTAX_INNER[kind]
    with jax.enable_x64(case.dtype == np.float64):
        reference = optax.contrib.mechanize(theirs_inner(lr, hp), hp["s_decay"], 1e-8, hp["s_init"], num_betas)
        theirs, their_state = _run(reference, params, grads)
        args = (our_inner(lr, hp), hp["s_decay"], _optax_betas(num_betas), hp["s_init"])
        ours, state = _run(mechanic(*args, variant="optax"), params, grads)
        # The differences the docstring lists (initial s and m, eps in m, clipped h, unclamped
        # r, the point of the decay term) add up to a different trajectory.
        default = _run(mechanic(*args), params, grads)[0] if kind == "sgd" else None
    assert _moved(theirs, params) > 1e-3
    error = parity.relative_error(ours, theirs)
    tolerance = 1e-8 if case.dtype == np.float64 else 1e-4
    assert error <= tolerance, f"relative error {error:.3g}"
    np.testing.assert_allclose([np.asarray(x) for x in state.s], np.asarray(their_state.s), rtol=tolerance)
    if default is not None:
        assert parity.relative_error(default, theirs) > 1e-2


@pytest.mark.parametrize(
    "inner",
    [rmsprop(1e-2), lamb(1e-2)],
    ids=["rmsprop", "lamb"],
)
def test_wraps_any_optimizer_under_jit(inner: optax.GradientTransformation) -> None:
    """Any adaopt optimizer, including one that needs the parameters (LAMB), compiles once and learns."""
    tx = mechanic(inner)
    target = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
    traces = 0

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert traces == 1
    for _ in range(200):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * float(loss({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}))
    assert int(state.count) == 203


def test_extra_arguments_reach_the_inner_optimizer() -> None:
    inner = optax.chain(sgd(1.0), optax.contrib.reduce_on_plateau(patience=0, factor=0.5))
    tx = mechanic(inner)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for value in (1.0, 2.0, 3.0):
        _, state = update({"w": jnp.ones(2)}, state, params, value=jnp.asarray(value))
    assert float(state.inner_state[1].scale) < 1.0  # the plateau rule saw the losses


def test_state_layout_and_dtypes() -> None:
    with jax.enable_x64(True):
        params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((2, 2), jnp.float64), "frozen": None}
        state = mechanic(adam(1e-3), store_delta=True).init(params)
        assert isinstance(state, MechanicState)
        assert jax.tree.structure(state.reference) == jax.tree.structure(params)
        assert jax.tree.structure(state.delta) == jax.tree.structure(params)
        for scalars in (state.s, state.max_product, state.sum_squared_products, state.reward):
            assert len(scalars) == len(inspect.signature(mechanic).parameters["betas"].default)
            assert all(x.shape == () and x.dtype == jnp.float64 for x in scalars)
    half = mechanic(sgd(1.0)).init({"w": jnp.ones(2, jnp.bfloat16)})
    assert half.s[0].dtype == jnp.float32 and half.reference["w"].dtype == jnp.bfloat16
    assert half.delta is None


@pytest.mark.parametrize(("dtype", "store_delta"), [(jnp.float16, True), (jnp.bfloat16, False)], ids=str)
def test_half_precision_zero_gradient_is_finite(dtype: Any, store_delta: bool) -> None:
    with jax.numpy_dtype_promotion("strict"):
        params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros(3, dtype)}
        tx = mechanic(adam(1.0, weight_decay=0.1), store_delta=store_delta)
        state = tx.init(params)
        for grads in (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.ones_like, params)):
            updates, state = jax.jit(tx.update)(grads, state, params)
            for u in jax.tree.leaves(updates):
                assert u.dtype == jnp.dtype(dtype)
                assert bool(jnp.all(jnp.isfinite(u)))
            params = optax.apply_updates(params, updates)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"s_decay": -0.1}, "s_decay"),
        ({"s_init": 0.0}, "s_init"),
        ({"s_init": float("inf")}, "s_init"),
        ({"eps": 0.0}, "eps"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": ()}, "betas"),
        ({"betas": "0.9"}, "betas"),
        ({"variant": "paper"}, "variant"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(HyperparameterError, match=name) as info:
        mechanic(sgd(1.0), **kwargs)
    assert isinstance(info.value, ValueError) and "must be" in str(info.value)


def test_update_needs_the_parameters() -> None:
    tx = mechanic(sgd(1.0))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))


def test_solves_a_logistic_regression() -> None:
    """SGD's learning rate left at 1: Mechanic finds the scale and reaches near the optimum."""
    loss, start, best = problems.binary_logistic_regression()
    final = float(loss(problems.train(mechanic(sgd(1.0)), loss, start, 500)))
    assert final <= best + 0.01, f"loss {final:.4f} vs optimum {best:.4f} (start {float(loss(start)):.4f})"
