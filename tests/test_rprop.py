"""Rprop beyond its torch comparison (tests/test_parity.py): a schedule, the step-size bounds, non-finite gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt


def _updates(tx: optax.GradientTransformation, grads: np.ndarray) -> tuple[np.ndarray, Any]:
    """Each call's update for the rows of ``grads``, and the final state."""
    state = tx.init(jnp.zeros(grads.shape[1:]))
    out = []
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state)
        out.append(np.asarray(u))
    return np.stack(out), state


def _factors(state: Any) -> np.ndarray:
    """The step-size factors of rprop's chained state."""
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, adaopt.RpropState))
             if isinstance(x, adaopt.RpropState)]  # fmt: skip
    return np.asarray(found[0].factors)


def _signs(steps: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(steps, size)) * np.random.default_rng(
        seed + 1
    ).uniform(0.5, 2.0, size=(steps, size))


def test_a_schedule_scales_every_step_size() -> None:
    """Under a schedule the steps are the constant rate's, times the schedule over that rate, while no bound binds."""
    grads = _signs(30, 8, 0)
    constant, _ = _updates(adaopt.rprop(0.01), grads)
    schedule = lambda count: 0.01 * (1.0 + 0.1 * count)
    scheduled, _ = _updates(adaopt.rprop(schedule), grads)
    factors = np.asarray([schedule(t) / 0.01 for t in range(30)])[:, None]
    np.testing.assert_allclose(scheduled, constant * factors, rtol=1e-5)


def test_the_bounds_hold_on_the_actual_step() -> None:
    """Gradients of one sign grow the step to max_step_size and no further, whatever the schedule's rate; a flip
    shrinks it to min_step_size and no further."""
    same = np.ones((40, 3))
    for rate in (0.01, lambda count: 0.01 / (1.0 + count)):
        updates, _ = _updates(adaopt.rprop(rate, max_step_size=0.05), same)
        assert np.max(np.abs(updates)) == pytest.approx(0.05, rel=1e-6)
        assert np.all(np.abs(updates[-5:]) == pytest.approx(0.05, rel=1e-6))
    flips = np.where(np.arange(40)[:, None] % 2 == 0, 1.0, -1.0) * np.ones((40, 3))
    updates, _ = _updates(adaopt.rprop(0.01, min_step_size=1e-3), flips)
    moving = np.abs(updates[np.abs(updates) > 0])
    assert moving.min() == pytest.approx(1e-3, rel=1e-6) and moving.min() < 0.01


def test_a_nan_gradient_gives_a_nan_step_and_leaves_the_step_sizes() -> None:
    grads = np.ones((6, 2))
    grads[3, 0] = np.nan
    updates, state = _updates(adaopt.rprop(0.01), grads)
    assert np.isnan(updates[3, 0]) and np.isfinite(updates[3, 1])
    _, clean_state = _updates(adaopt.rprop(0.01), np.ones((6, 2)))
    factors, clean_factors = _factors(state), _factors(clean_state)
    assert np.all(np.isfinite(np.asarray(factors)))
    # The NaN coordinate's step size skipped the NaN step's growth and the one after (its sign then compares with NaN).
    assert float(factors[0]) == pytest.approx(float(clean_factors[0]) / 1.2**2, rel=1e-6)
    assert float(factors[1]) == pytest.approx(float(clean_factors[1]), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"eta_minus": 1.0}, "eta_minus"), ({"eta_plus": 1.0}, "eta_plus"), ({"min_step_size": -1.0}, "min_step_size"),
     ({"max_step_size": 0.0}, "max_step_size"), ({"min_step_size": 1.0, "max_step_size": 0.5}, "min_step_size")],
)  # fmt: skip
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=name):
        adaopt.rprop(**kwargs)


def test_gradients_whose_products_are_subnormal_adapt_the_step_sizes() -> None:
    """Only the signs count: float32 gradients of 1e-20, whose products with the previous ones are subnormal (which
    XLA:CPU flushes to 0), take the steps of the same gradients at scale 1, as torch's do."""
    grads = _signs(40, 8, 2).astype(np.float32)
    normal, _ = _updates(adaopt.rprop(0.01), grads)
    tiny, _ = _updates(adaopt.rprop(0.01), grads * np.float32(1e-20))
    np.testing.assert_array_equal(tiny, normal)
    assert np.abs(normal).max() > 0.0119 and np.abs(normal[np.abs(normal) > 0]).min() < 0.0051  # grew and shrank
