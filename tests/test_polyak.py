"""Stochastic Polyak step sizes (SPS, SPS-max) against optax.polyak_sgd, step for step, and at work.

The reference is ``optax.polyak_sgd``; it needs the loss, so the comparison runs on a real problem:
minibatch least squares on sklearn's diabetes data, with targets that a linear model fits exactly
(so the loss interpolates and its minimum is 0), 200 steps, several random draws of optax's
hyperparameters mapped to adaopt's (``c = scaling``, ``max_learning_rate = scaling * max``,
``eps = eps / scaling``, see ``adaopt.polyak_sgd``), in float64 (relative error <= 1e-10) and
float32 (<= 1e-4). On the same problem, SPS with its defaults converges faster than SGD at any
learning rate of a grid.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_diabetes

from adaopt import PolyakState, polyak_sgd, scale_by_polyak, sgd
from tests import parity, steps

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
STEPS, BATCH, DRAWS = 200, 16, 3


@functools.cache
def _interpolating_problem() -> tuple[np.ndarray, np.ndarray]:
    """Standardised diabetes features and targets that a linear model with a bias fits exactly."""
    x, _ = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    w = np.random.default_rng(0).normal(size=10)
    return x, x @ w + 0.5


def _loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _train(tx: optax.GradientTransformation, dtype: Any, steps: int = STEPS) -> tuple[dict, jax.Array]:
    """Minibatch training with the batch loss as value=: the trajectory and the full loss after each step."""
    x_np, y_np = _interpolating_problem()
    x, y = jnp.asarray(x_np, dtype), jnp.asarray(y_np, dtype)
    params = {"w": jnp.zeros(10, dtype), "b": jnp.zeros((), dtype)}

    def step(carry: tuple, t: jax.Array) -> tuple[tuple, tuple]:
        p, s = carry
        batch = jax.random.randint(jax.random.fold_in(jax.random.key(0), t), (BATCH,), 0, x.shape[0])
        value, grads = jax.value_and_grad(_loss)(p, x[batch], y[batch])
        u, s = tx.update(grads, s, p, value=value)
        p = optax.apply_updates(p, u)
        return (p, s), (p, _loss(p, x, y))

    _, (trajectory, losses) = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return trajectory, losses


def _draw(seed: int, variant: str, capped: bool) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {
        "scaling": float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))),
        "max_learning_rate": float(np.exp(rng.uniform(np.log(0.05), np.log(1.0)))) if capped else math.inf,
        # Uncapped SPS needs a true lower bound (0 here): below f_min its step ascends, by gap / |g|^2.
        "f_min": 0.0 if not capped else float(rng.uniform(0.0, 0.05 if variant == "sps" else 0.5)),
        "eps": float(rng.choice([0.0, float(np.exp(rng.uniform(np.log(1e-6), np.log(1e-2))))])),
    }


def _optax(hp: dict, variant: str) -> optax.GradientTransformation:
    return optax.polyak_sgd(hp["max_learning_rate"], hp["scaling"], hp["f_min"], hp["eps"], variant)


def _ours(hp: dict, variant: str, capped: bool) -> optax.GradientTransformation:
    s = hp["scaling"]
    cap = s * hp["max_learning_rate"] if capped else None
    return polyak_sgd(1.0, c=s, f_min=hp["f_min"], max_learning_rate=cap, eps=hp["eps"] / s, variant=variant)


@functools.partial(jax.jit, static_argnames=("variant", "capped", "dtype"))
def _both(hp: dict, variant: str, capped: bool, dtype: Any) -> tuple[dict, dict]:
    """Both sides for every draw, in one compiled program (the hyperparameters traced and vmapped)."""
    run = lambda make: jax.vmap(lambda h: _train(make(h), dtype)[0])(hp)
    return run(lambda h: _ours(h, variant, capped)), run(lambda h: _optax(h, variant))


RUNS = [("sps", True, np.float64), ("sps", True, np.float32), ("sps", False, np.float64), ("sps+", True, np.float64)]


@pytest.mark.parametrize(
    ("variant", "capped", "dtype"),
    RUNS,
    ids=[f"{v}-{'max' if c else 'nocap'}-{np.dtype(d).name}" for v, c, d in RUNS],
)
def test_matches_optax_polyak_sgd(variant: str, capped: bool, dtype: Any) -> None:
    seed = zlib.crc32(f"{variant}/{capped}/{np.dtype(dtype).name}".encode())
    draws = [_draw(seed + i, variant, capped) for i in range(DRAWS)]
    with jax.enable_x64(dtype == np.float64):
        stacked = {k: jnp.asarray([d[k] for d in draws], dtype) for k in draws[0]}
        ours, theirs = jax.tree.map(np.asarray, _both(stacked, variant, capped, jnp.dtype(dtype)))
    for i, hp in enumerate(draws):
        mine, reference = {k: v[i] for k, v in ours.items()}, {k: v[i] for k, v in theirs.items()}
        assert all(v.dtype == dtype for v in mine.values())
        assert max(float(np.max(np.abs(v))) for v in reference.values()) > 0.1, "the parameters barely moved from 0"
        error = parity.relative_error(mine, reference)
        assert error <= TOLERANCE[dtype], f"relative error {error:.3g} with {hp}"


def test_optax_scaling_is_not_the_factor_its_docstring_states() -> None:
    """optax scales the gradient before taking its norm: scaling s is c = s here, not a factor s on the step."""
    with jax.enable_x64(True):
        g, value = {"w": jnp.asarray([1.0, -2.0])}, jnp.asarray(3.0)
        params = {"w": jnp.zeros(2)}
        step = lambda tx: np.asarray(tx.update(g, tx.init(params), params, value=value)[0]["w"])
        reference = step(optax.polyak_sgd(max_learning_rate=10.0, scaling=2.0))
        np.testing.assert_allclose(step(polyak_sgd(1.0, c=2.0, max_learning_rate=20.0)), reference, rtol=1e-14)
        # The docstring's s * min(gap / |g|^2, max): twice the Polyak step, where optax takes half.
        documented = step(polyak_sgd(2.0, c=1.0, max_learning_rate=10.0))
        np.testing.assert_allclose(documented, 4 * reference, rtol=1e-14)


def test_step_size_formula_and_state() -> None:
    """gamma = min((f - f*) / (c |g|^2 + eps), gamma_max), summed over leaves; sps+ clips a negative gap."""
    g = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray(4.0)}  # |g|^2 = 25
    params = jax.tree.map(jnp.zeros_like, g)
    cases = [
        (dict(c=0.5), 2.0, 2.0 / 12.5),
        (dict(c=0.5, f_min=1.0, eps=5.0), 2.0, 1.0 / 17.5),
        (dict(c=1.0, max_learning_rate=0.01), 2.0, 0.01),
        (dict(c=1.0, f_min=3.0), 2.0, -1.0 / 25),
        (dict(c=1.0, f_min=3.0, variant="sps+"), 2.0, 0.0),
    ]
    for kwargs, value, gamma in cases:
        tx = scale_by_polyak(**kwargs)
        updates, state = tx.update(g, tx.init(params), params, value=value)
        assert isinstance(state, PolyakState)
        assert float(state.step_size) == pytest.approx(gamma, rel=1e-6)
        for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(np.asarray(u), gamma * np.asarray(x), rtol=1e-6)
    # A zero gradient takes no step (and no NaN), whatever the gap.
    zero = jax.tree.map(jnp.zeros_like, g)
    updates, state = scale_by_polyak().update(zero, scale_by_polyak().init(params), params, value=1.0)
    assert float(state.step_size) == 0.0
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    # A NaN or infinite loss takes no step (it made the parameters NaN for good); +inf under a cap takes the cap.
    for kwargs, value, gamma in [({}, math.nan, 0.0), ({}, -math.inf, 0.0), ({}, math.inf, 0.0),
                                 ({"max_learning_rate": 0.5}, math.inf, 0.5)]:  # fmt: skip
        tx = scale_by_polyak(**kwargs)
        updates, state = tx.update(g, tx.init(params), params, value=value)
        assert float(state.step_size) == gamma
        for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(g), strict=True):
            np.testing.assert_array_equal(np.asarray(u), gamma * np.asarray(x))


def test_sps_converges_fast_without_tuning_where_the_loss_interpolates() -> None:
    """SPS (c = 1/2, f* = 0, no cap) beats SGD at every learning rate of a grid (the largest diverges)."""
    steps = 500
    with jax.enable_x64(True):
        x_np, y_np = _interpolating_problem()
        start = float(_loss({"w": jnp.zeros(10), "b": jnp.zeros(())}, jnp.asarray(x_np), jnp.asarray(y_np)))
        plain = polyak_sgd(max_learning_rate=None)  # SPS itself: nothing to tune
        sps = float(jax.jit(lambda: _train(plain, jnp.float64, steps)[1][-1])()) / start
        grid = jnp.asarray([0.01, 0.03, 0.1, 0.3, 1.0])
        sgd_final = jax.jit(jax.vmap(lambda lr: _train(sgd(lr), jnp.float64, steps)[1][-1]))(grid)
        sgd_relative = np.asarray(sgd_final) / start
    best = np.nanmin(np.where(np.isfinite(sgd_relative), sgd_relative, np.nan))
    assert sps < 1e-4, f"SPS reached {sps:.3g} of the initial loss"
    assert sps < 0.5 * best, f"SPS {sps:.3g}, SGD over {np.asarray(grid)}: {sgd_relative}"


def test_weight_decay_enters_the_gradient_and_its_norm() -> None:
    params = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}
    g = {"w": jnp.asarray([0.5, -1.0]), "b": jnp.asarray(1.0)}
    tx = polyak_sgd(1.0, c=1.0, max_learning_rate=None, weight_decay=0.5, weight_decay_mask={"w": True, "b": False})
    updates, _ = tx.update(g, tx.init(params), params, value=2.0)
    decayed = {"w": np.asarray([1.0, 0.0]), "b": np.asarray(1.0)}  # g + 0.5 * w on w only
    gamma = 2.0 / (1.0 + 0.0 + 1.0)
    for k in decayed:
        np.testing.assert_allclose(np.asarray(updates[k]), -gamma * decayed[k], rtol=1e-6)


def test_learning_rate_multiplies_the_step_and_follows_a_schedule() -> None:
    g = {"w": jnp.asarray([1.0, 1.0])}
    params = {"w": jnp.zeros(2)}
    tx = polyak_sgd(lambda count: 0.5 ** (count + 1), c=1.0, max_learning_rate=None)
    state = tx.init(params)
    for t in range(3):
        updates, state = tx.update(g, state, params, value=4.0)
        np.testing.assert_allclose(np.asarray(updates["w"]), -(0.5 ** (t + 1)) * 2.0 * np.ones(2), rtol=1e-6)


# ---- jit, dtypes, the loss requirement and validation. ----


@pytest.mark.parametrize("max_learning_rate", [None, 1.0], ids=["sps", "sps_max"])
def test_jit_compiles_once(max_learning_rate: Any) -> None:
    steps.assert_compiles_once_and_descends(polyak_sgd(max_learning_rate=max_learning_rate))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_zero_gradient_is_finite(dtype: Any) -> None:
    steps.assert_half_precision_steps_are_finite(polyak_sgd(max_learning_rate=1.0), dtype)


def test_the_loss_is_required() -> None:
    tx = polyak_sgd()
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"c": 0.0}, "c"),
        ({"c": math.nan}, "c"),
        ({"f_min": math.inf}, "f_min"),
        ({"max_learning_rate": -1.0}, "max_learning_rate"),
        ({"eps": -1e-8}, "eps"),
        ({"variant": "sps-max"}, "variant"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        polyak_sgd(**kwargs)
