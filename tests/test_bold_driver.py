"""Bold driver: the rule step by step, the undo exactly, and a recovery from a learning rate that diverges.

There is no reference package for the bold driver; the tests check the rule on scripted losses,
the undo on a real loss (after a rise the parameters return to the previous point, up to the
rounding of one addition), and the behaviour on least squares on sklearn's diabetes data, where
gradient descent at 5 / L diverges and the bold driver, started there, converges.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_diabetes

from adaopt import BoldDriverState, bold_driver, scale_by_bold_driver, sgd
from tests import steps


def _bold_state(state: Any) -> BoldDriverState:
    if isinstance(state, BoldDriverState):
        return state
    return next(x for x in state if isinstance(x, BoldDriverState))


# ---- The rule on scripted losses. ----


@pytest.mark.parametrize("undo", [False, True], ids=["keep", "undo"])
def test_rule_on_scripted_losses(undo: bool) -> None:
    """Increase on a fall, decrease on a rise or a non-finite loss, no change on a tie or the first step; a
    non-finite loss is never the one compared with (a NaN first, an infinity then a finite loss: no fall)."""
    eta, up, down = 0.1, 1.25, 0.5
    tx = bold_driver(eta, up, down, undo=undo)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    grads = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(3.0)}
    values = [math.nan, 5.0, 4.0, 4.0, 6.0, 7.0, 3.0, math.nan, 2.0, math.inf, 2.5, 2.4, -math.inf, 2.3]
    state = tx.init(params)
    scale, compare, previous, applied = 1.0, False, 0.0, None
    for value in values:
        updates, state = tx.update(grads, state, params, value=jnp.asarray(value))
        rose = compare and not (math.isfinite(value) and value <= previous)
        if rose:
            scale *= down
        elif compare and value < previous:
            scale *= up
        if rose and undo:
            expected = jax.tree.map(lambda u: -u, applied)
        else:
            expected = jax.tree.map(lambda g, s=scale: -eta * s * g, grads)
            previous = value if math.isfinite(value) else previous
        compare = not (rose and undo) and (math.isfinite(value) or compare)
        applied = expected
        for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(e), rtol=1e-6)
        bold = _bold_state(state)
        assert float(bold.learning_rate) == pytest.approx(eta * scale, rel=1e-6)
        assert bool(bold.compare) == compare
        params = optax.apply_updates(params, updates)
    assert scale != 1.0


def test_a_loss_that_stays_put_leaves_the_rate_finite() -> None:
    """At an exact fit (loss 0, gradient 0) every tie was a fall: the rate grew by 1.05 a step until it overflowed
    and inf * 0 made the parameters NaN (step 1819). A loss falling by ever less never takes the rate past the
    float's range either."""
    tx = bold_driver(1e-2)
    params = {"w": jnp.zeros(3)}

    def run(values: jax.Array, grads: jax.Array) -> tuple[Any, Any]:
        def step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            p, state = carry
            value, g = xs
            updates, state = tx.update({"w": g}, state, p, value=value)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, (params, tx.init(params)), (values, grads))[0]

    n = 3000
    p, state = jax.jit(run)(jnp.zeros(n), jnp.zeros((n, 3)))
    assert float(_bold_state(state).learning_rate) == pytest.approx(1e-2) and np.all(np.asarray(p["w"]) == 0)
    falling = jnp.asarray(1.0) - jnp.arange(n) * 1e-7  # every step a fall: the rate grows to the float's limit
    p, state = jax.jit(run)(falling, jnp.full((n, 3), 1e-30))
    rate = float(_bold_state(state).learning_rate)
    assert np.isfinite(rate) and rate > 1e35 and np.all(np.isfinite(np.asarray(p["w"])))


def test_schedule_is_multiplied_by_the_learned_factor() -> None:
    rates = [0.1, 0.3, 0.2, 0.05]
    tx = bold_driver(lambda count: jnp.asarray(rates)[count], 2.0, 0.5, undo=False)
    params = jnp.ones(2)
    state = tx.init(params)
    factors = [1.0, 2.0, 1.0, 2.0]  # first step, fall, rise, fall
    for t, value in enumerate([3.0, 2.0, 2.5, 1.0]):
        updates, state = tx.update(jnp.ones(2), state, params, value=value)
        np.testing.assert_allclose(np.asarray(updates), -rates[t] * factors[t] * np.ones(2), rtol=1e-6)


# ---- The undo, exactly. ----


def _quadratic(p: dict) -> jax.Array:
    return jnp.sum(jnp.asarray([1.0, 4.0, 9.0]) * p["w"] ** 2) + (p["b"] - 1.0) ** 2


def test_undo_returns_to_the_previous_point() -> None:
    with jax.enable_x64(True):
        tx = bold_driver(0.3, 1.1, 0.5, undo=True)  # 0.3 > 2 / 18: the stiffest coordinate overshoots
        params = {"w": jnp.asarray([1.0, 1.0, 1.0]), "b": jnp.asarray(0.0)}
        state = tx.init(params)
        history = [params]
        undos = 0
        for _ in range(30):
            value, grads = jax.value_and_grad(_quadratic)(params)
            before = _bold_state(state)
            updates, state = tx.update(grads, state, params, value=value)
            params = optax.apply_updates(params, updates)
            after = _bold_state(state)
            if bool(before.compare) and float(value) > float(before.previous_value):
                undos += 1
                # Back to the point before the rejected step, with the rate halved.
                leaves = zip(
                    jax.tree.leaves(params), jax.tree.leaves(history[-2]), jax.tree.leaves(history[-1]), strict=True
                )
                for x, y, rejected in leaves:
                    ulp = np.finfo(np.float64).eps * np.maximum(np.abs(np.asarray(y)), np.abs(np.asarray(rejected)))
                    assert np.all(np.abs(np.asarray(x) - np.asarray(y)) <= ulp), "the undo missed the previous point"
                assert float(after.learning_rate) == pytest.approx(0.5 * float(before.learning_rate))
                assert not bool(after.compare)
                assert float(after.previous_value) == float(before.previous_value)
            history.append(params)
        assert undos >= 2
        assert float(_quadratic(params)) < 1e-3 * float(_quadratic(history[0]))


def test_undo_keeps_one_copy_of_the_parameters_in_their_dtype() -> None:
    params = {"a": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(5, jnp.float32), "frozen": None}
    kept = _bold_state(bold_driver(undo=True).init(params)).previous_update
    assert jax.tree.structure(kept) == jax.tree.structure(params)
    for k, p in zip(jax.tree.leaves(kept), jax.tree.leaves(params), strict=True):
        assert k.shape == p.shape and k.dtype == p.dtype
    assert _bold_state(bold_driver(undo=False).init(params)).previous_update is None


def test_step_after_an_undo_does_not_compare() -> None:
    """A loss that is still higher right after an undo does not cut the rate a second time."""
    tx = scale_by_bold_driver(1.0, 2.0, 0.5, undo=True)
    params = jnp.zeros(2)
    state = tx.init(params)
    g = jnp.ones(2)
    for value in (1.0, 2.0, 9.0):  # first, rise (undo), then a high loss that is not compared
        _, state = tx.update(g, state, params, value=value)
    assert float(state.learning_rate) == 0.5
    _, state = tx.update(g, state, params, value=8.0)  # compared with 9: a fall
    assert float(state.learning_rate) == 1.0


# ---- Recovery from a learning rate that diverges, on a real problem. ----


@functools.cache
def _diabetes() -> tuple[np.ndarray, np.ndarray, float, float]:
    """Standardised diabetes regression, the smoothness L of its least-squares loss, and its minimum."""
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    smoothness = float(np.linalg.eigvalsh(x.T @ x / len(y)).max())
    design = np.c_[x, np.ones(len(y))]
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    return x, y, smoothness, float(0.5 * np.mean((design @ solution - y) ** 2))


def _least_squares(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _train(tx: optax.GradientTransformation, steps: int = 300) -> tuple[jax.Array, Any]:
    x_np, y_np, _, _ = _diabetes()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = {"w": jnp.zeros(10), "b": jnp.zeros(())}

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        p, s = carry
        value, grads = jax.value_and_grad(_least_squares)(p, x, y)
        u, s = tx.update(grads, s, p, value=value)
        return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.jit(lambda: jax.lax.scan(step, (params, tx.init(params)), None, length=steps))()
    return _least_squares(params, x, y), state


def test_recovers_from_a_rate_that_diverges_with_a_fixed_rate() -> None:
    with jax.enable_x64(True):
        _, _, smoothness, f_star = _diabetes()
        lr = 5 / smoothness  # gradient descent is stable only below 2 / L
        fixed, _ = _train(sgd(lr))
        assert not float(fixed) < 1e3, f"gradient descent at 5 / L should diverge, got loss {float(fixed)}"
        for undo in (False, True):
            loss, state = _train(bold_driver(lr, undo=undo))
            assert (float(loss) - f_star) / f_star < 1e-2, f"undo={undo}: loss {float(loss)} vs minimum {f_star}"
            assert float(_bold_state(state).learning_rate) < 2 / smoothness


# ---- jit, dtypes, the loss requirement and validation. ----

FACTORIES = {"bold_driver": lambda: bold_driver(0.1, undo=False), "bold_driver_undo": lambda: bold_driver(0.1)}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jit_compiles_once(name: str) -> None:
    steps.assert_compiles_once_and_descends(FACTORIES[name]())


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_zero_gradient_is_finite(name: str, dtype: Any) -> None:
    steps.assert_half_precision_steps_are_finite(FACTORIES[name](), dtype)


def test_the_loss_is_required() -> None:
    tx = bold_driver()
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="scalar"):
        tx.update(params, tx.init(params), params, value=jnp.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"increase": 0.9}, "increase"),
        ({"increase": math.inf}, "increase"),
        ({"decrease": 0.0}, "decrease"),
        ({"decrease": 1.5}, "decrease"),
        ({"decrease": "0.5"}, "decrease"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        bold_driver(**kwargs)
