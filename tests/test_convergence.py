"""Every optimizer solves small real problems at its defaults (with the learning rate of benchmarks/learning_rates.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adaopt
from adaopt import REGISTRY, Capability, OptimizerSpec
from benchmarks import learning_rates
from tests import problems

SPECS = pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
L2 = 1e-3


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, (x_test - mean) / std, y_train, y_test


def _logistic_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return problems.softmax_regression_loss(params, x, y, L2)


@functools.cache
def _optimal_logistic_loss() -> float:
    x, _, y, _ = _digits()
    return problems.optimal_softmax_regression_loss(x, y, L2)


def _logistic_steps(spec: OptimizerSpec) -> int:
    """2000 full-batch steps; 3000 for an optimizer that finds its own step size (it starts from a
    guess far below the tuned one) or holds its first steps back (Capability.DELAYED_START)."""
    slow = {Capability.TUNING_FREE, Capability.DELAYED_START} & spec.capabilities
    return 3000 if slow else 2000


@SPECS
def test_logistic_regression_on_digits(spec: OptimizerSpec) -> None:
    x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in _digits())
    x_train, x_test = x_train.astype(jnp.float32), x_test.astype(jnp.float32)
    tx = learning_rates.make(spec)

    @jax.jit
    def train() -> dict:
        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            params, state = carry
            loss, grads = jax.value_and_grad(_logistic_loss)(params, x_train, y_train)
            updates, state = tx.update(grads, state, params, value=loss)
            return (optax.apply_updates(params, updates), state), None

        params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=_logistic_steps(spec))
        return params

    params = train.lower().compile(problems.DEFAULT_CODEGEN)()
    accuracy = float(jnp.mean(jnp.argmax(x_test @ params["w"] + params["b"], -1) == y_test))
    loss = float(_logistic_loss(params, x_train, y_train))
    assert accuracy >= 0.95, f"test accuracy {accuracy:.3f}"
    assert loss <= 1.05 * _optimal_logistic_loss(), f"loss {loss:.4f} vs optimum {_optimal_logistic_loss():.4f}"


def _rosenbrock(p: jax.Array) -> jax.Array:
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if Capability.TUNING_FREE not in s.capabilities], ids=lambda s: s.name
)
def test_rosenbrock_from_the_standard_start(spec: OptimizerSpec) -> None:
    """From (-1.2, 1), with a cosine-decayed learning rate, the best of a 7-point grid reaches (1, 1).

    A test of the methods whose learning rate is tuned. The tuning-free ones run at their defaults,
    here in the logistic regression above and in the convergence benchmark
    (``benchmarks/convergence.py --tuning-free``), where their results are recorded as they are.
    """
    steps = 20_000
    grid = jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])

    def final_point(peak: jax.Array) -> jax.Array:
        # Schedule-Free is meant to run without a schedule, and to be evaluated at its average x.
        averaged = Capability.AVERAGED_ITERATES in spec.capabilities
        constant = averaged or Capability.CONSTANT_LEARNING_RATE in spec.capabilities
        lr = peak if constant else optax.cosine_decay_schedule(peak, steps)
        tx = spec.factory(learning_rate=lr, weight_decay=0.0)

        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            p, state = carry
            loss, grads = jax.value_and_grad(_rosenbrock)(p)
            updates, state = tx.update(grads, state, p, value=loss)
            return (optax.apply_updates(p, updates), state), None

        start = jnp.asarray([-1.2, 1.0])
        (p, state), _ = jax.lax.scan(step, (start, tx.init(start)), None, length=steps)
        return adaopt.schedule_free_eval_params(state, p) if averaged else p

    points = jax.jit(jax.vmap(final_point))(grid)
    losses = jax.vmap(_rosenbrock)(points)
    best = int(jnp.nanargmin(losses))
    assert float(losses[best]) < 1e-6, f"best loss {float(losses[best]):.2e} at learning rate {float(grid[best])}"
    np.testing.assert_allclose(np.asarray(points[best]), [1.0, 1.0], atol=1e-2)
