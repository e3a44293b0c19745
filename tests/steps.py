"""Checks the family test files run on the variants the registry does not hold (the contract,
tests/test_contract.py, runs them on the registry's entries): a jitted step that compiles once and
descends, and half-precision steps that stay finite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def tanh_loss(p: dict) -> jax.Array:
    """A small nonconvex loss of ``{"w": (3, 2), "v": (2,)}``."""
    return jnp.sum(jnp.tanh(p["w"] @ p["v"]) ** 2) + jnp.sum(p["v"] ** 2)


def assert_compiles_once_and_descends(tx: optax.GradientTransformationExtraArgs, steps: int = 3) -> None:
    """``steps`` jitted steps on :func:`tanh_loss` (the loss passed as ``value=``): one trace, a lower loss."""
    traces = 0

    @jax.jit
    def step(p: dict, s: Any) -> tuple[dict, Any]:
        nonlocal traces
        traces += 1
        value, grads = jax.value_and_grad(tanh_loss)(p)
        u, s = tx.update(grads, s, p, value=value)
        return optax.apply_updates(p, u), s

    params = {"w": jnp.ones((3, 2), jnp.float32), "v": jnp.full((2,), 0.5, jnp.float32)}
    state = tx.init(params)
    start = tanh_loss(params)
    for _ in range(steps):
        params, state = step(params, state)
    assert traces == 1, "the step recompiled: the state's types or shapes changed between steps"
    assert float(tanh_loss(params)) < float(start)


def assert_half_precision_steps_are_finite(
    tx: optax.GradientTransformationExtraArgs, dtype: Any, values: tuple[float, float] = (1.0, 2.0)
) -> Any:
    """A zero gradient then ones, with the losses ``values``, under strict promotion: updates in
    ``dtype`` and finite. Returns the state after the two steps."""
    with jax.numpy_dtype_promotion("strict"):
        params = {"w": jnp.ones((3, 2), dtype), "s": jnp.asarray(2.0, dtype)}
        state = tx.init(params)
        gradients = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.ones_like, params))
        for grads, value in zip(gradients, values, strict=True):
            updates, state = jax.jit(tx.update)(grads, state, params, value=jnp.asarray(value, dtype))
            for u in jax.tree.leaves(updates):
                assert u.dtype == jnp.dtype(dtype), f"update in {u.dtype} for {jnp.dtype(dtype)} parameters"
                assert bool(jnp.all(jnp.isfinite(u))), "non-finite update"
            params = optax.apply_updates(params, updates)
    return state


def mixed_tree(dtype: Any = jnp.float32) -> dict:
    """A matrix, a zero vector and a scalar."""
    return {
        "w": jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3),
        "b": jnp.zeros(3, dtype),
        "s": jnp.ones((), dtype),
    }


def quadratic_loss(params: Any) -> jax.Array:
    return sum(jnp.sum((x.astype(jnp.float32) - 2.0) ** 2) for x in jax.tree.leaves(params))


def assert_all_compile_once_and_move(txs: Sequence[optax.GradientTransformation], steps: int = 3) -> None:
    """``txs`` stepping :func:`mixed_tree` on :func:`quadratic_loss` in one jitted function: traced
    once over ``steps`` steps, and every one moves its parameters."""
    traces = 0

    @jax.jit
    def step(params: list, states: list) -> tuple[list, list]:
        nonlocal traces
        traces += 1
        out = [tx.update(jax.grad(quadratic_loss)(p), s, p) for tx, p, s in zip(txs, params, states, strict=True)]
        return [optax.apply_updates(p, u) for p, (u, _) in zip(params, out, strict=True)], [s for _, s in out]

    params = [mixed_tree() for _ in txs]
    states = [tx.init(p) for tx, p in zip(txs, params, strict=True)]
    for _ in range(steps):
        params, states = step(params, states)
    assert traces == 1, "the step recompiled: the state's types or shapes changed between steps"
    for p in params:
        assert any(
            bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(mixed_tree()), strict=True)
        )


def half_precision_two_steps(txs: Sequence[optax.GradientTransformation], dtype: Any) -> list[Any]:
    """Each of ``txs`` on :func:`mixed_tree` in ``dtype``: a zero gradient, then ones, jitted under
    strict promotion. Asserts the updates are in ``dtype`` and finite; returns each one's state."""

    @jax.jit
    def two_steps(params: dict) -> list:
        out = []
        for tx in txs:
            p, state = params, tx.init(params)
            updates = []
            for grads in (jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.ones_like, p)):
                u, state = tx.update(grads, state, p)
                updates.append(u)
                p = optax.apply_updates(p, u)
            out.append((updates, state))
        return out

    with jax.numpy_dtype_promotion("strict"):
        results = two_steps(mixed_tree(dtype))
    for updates, _ in results:
        for u in jax.tree.leaves(updates):
            assert u.dtype == jnp.dtype(dtype), f"update in {u.dtype} for {jnp.dtype(dtype)} parameters"
            assert bool(jnp.all(jnp.isfinite(u))), "non-finite update"
    return [state for _, state in results]
