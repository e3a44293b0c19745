"""Small real problems that several test files train on, and their optima by L-BFGS in float64."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

# XLA:CPU's default code generation (tests/conftest.py starts the backend with a cheaper one): for the
# programs whose assertion is about the code users run, where rounding steers a float32 trajectory.
DEFAULT_CODEGEN = {
    "xla_backend_optimization_level": 3,
    "xla_llvm_disable_expensive_passes": False,
    "xla_cpu_use_fusion_emitters": True,
}
# XLA:CPU's default emitters (tests/conftest.py starts the backend with its older ones, which compile faster):
# for the tests that compare two programs bit for bit (sharded and unsharded, one mesh and another), where
# the older emitters contract a different set of multiply-adds into fused ones in each program.
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


def softmax_regression_loss(params: dict, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
    """Cross-entropy of ``x @ w + b`` against integer labels, plus ``l2 * |w|^2``."""
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(params["w"] ** 2)


def optimal_softmax_regression_loss(x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """The minimum of :func:`softmax_regression_loss` (strictly convex for l2 > 0), by L-BFGS in float64."""
    n_features, n_classes = x.shape[1], int(y.max()) + 1
    n_weights = n_features * n_classes
    onehot = np.eye(n_classes)[y]

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = flat[:n_weights].reshape(n_features, n_classes), flat[n_weights:]
        logits = x @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(y)), y])) + l2 * np.sum(w**2)
        dlogits = (p - onehot) / len(y)
        return loss, np.concatenate([(x.T @ dlogits + 2 * l2 * w).ravel(), dlogits.sum(0)])

    start = np.zeros(n_weights + n_classes)
    result = scipy.optimize.minimize(objective, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    return float(result.fun)


@functools.cache
def binary_logistic_regression() -> tuple[Callable[[dict], jax.Array], dict, float]:
    """A 5-feature binary logistic regression with L2 1e-2: the loss, the start (zeros) and its minimum."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 5)), jnp.float32)
    y = (x @ jnp.asarray([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.3 * jnp.asarray(rng.normal(size=200)) > 0).astype(jnp.float32)

    def loss(p: dict) -> jax.Array:
        logits = x @ p["w"] + p["b"]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)) + 1e-2 * jnp.sum(p["w"] ** 2)

    flat = lambda v: {"w": jnp.asarray(v[:5], jnp.float32), "b": jnp.asarray(v[5], jnp.float32)}
    value_and_grad = jax.jit(jax.value_and_grad(lambda v: loss(flat(v))))
    best = scipy.optimize.minimize(
        lambda v: tuple(np.asarray(a, np.float64) for a in value_and_grad(v)), np.zeros(6), jac=True, method="L-BFGS-B"
    ).fun
    return loss, {"w": jnp.zeros(5), "b": jnp.zeros(())}, float(best)


def train(tx: optax.GradientTransformation, loss: Callable[[Any], jax.Array], start: Any, steps: int) -> Any:
    """``steps`` full-batch steps of ``tx`` from ``start`` in one compiled scan, the loss passed as ``value=``."""

    @jax.jit
    def run(p: Any) -> Any:
        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            u, s = tx.update(grads, s, p, value=value)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

    return run(start)


def least_squares_run(tx: optax.GradientTransformation, steps: int = 100) -> tuple[jax.Array, Any]:
    """An ill-conditioned least-squares problem (a 48 x 32 matrix and a long vector) trained by ``tx``: the losses
    and the final state."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    loss = lambda p: jnp.mean((a @ p["w"] - b) ** 2) + jnp.mean(p["v"] ** 2)

    @jax.jit
    def run(params: Any) -> tuple[jax.Array, Any]:
        def step(carry: tuple, _: Any) -> tuple[tuple, jax.Array]:
            p, s = carry
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), value

        (_, state), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return losses, state

    return run({"w": jnp.zeros((48, 32)), "v": jnp.ones(5000)})
