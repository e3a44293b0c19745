"""adaopt.lookahead: optax.lookahead's step exactly, with ``value=`` passed to the fast optimizer;
and the optax wrappers that pass ``update``'s extra arguments on, as the module's docstring says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import Capability, OptimizerSpec

SYNC = 2
ALPHA = 0.5
STEPS = 5  # two synchronisations and a fast step after them


def _loss(p: dict) -> jax.Array:
    return jnp.sum(jnp.tanh(p["w"] @ p["v"]) ** 2) + jnp.sum(p["v"] ** 2)


def _params() -> dict:
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "v": jnp.array([0.5, -0.25])}


def _run(tx: optax.GradientTransformation, steps: int = STEPS, **extra: Any) -> optax.LookaheadParams:
    """Gradients at the fast parameters; ``value=`` the loss there when ``extra`` asks for it."""
    params = optax.LookaheadParams.init_synced(_params())
    state = tx.init(params)
    for _ in range(steps):
        value, grads = jax.value_and_grad(_loss)(params.fast)
        updates, state = tx.update(grads, state, params, **({"value": value} if extra.get("value") else {}))
        params = optax.apply_updates(params, updates)
    return params


def _assert_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# adaopt.lookahead runs optax.lookahead's step: one optimizer of each kind of state shows it
# (per-coordinate, a scalar step size, the parameters needed, a delayed start, partitioned groups).
WITHOUT_VALUE = [adaopt.REGISTRY[n] for n in ("adam", "sgd", "prodigy", "schedule_free_adamw", "adopt", "muon")]
NEEDS_VALUE = [s for s in adaopt.REGISTRY.values() if Capability.NEEDS_VALUE in s.capabilities]


@pytest.mark.parametrize("spec", WITHOUT_VALUE, ids=lambda s: s.name)
def test_matches_optax_lookahead(spec: OptimizerSpec) -> None:
    """Bit for bit, for optimizers that need no loss (which optax.lookahead can wrap)."""
    # A Capability.DELAYED_START optimizer's first updates are zero: run past them.
    steps = STEPS + 6 if Capability.DELAYED_START in spec.capabilities else STEPS
    ours = _run(adaopt.lookahead(spec.make(), SYNC, ALPHA), steps)
    _assert_equal(ours, _run(optax.lookahead(spec.make(), SYNC, ALPHA), steps))
    assert not np.array_equal(ours.slow["w"], _params()["w"])  # the slow parameters moved


def test_matches_optax_lookahead_with_reset_state() -> None:
    tx = lambda: optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    _assert_equal(
        _run(adaopt.lookahead(tx(), SYNC, ALPHA, reset_state=True)),
        _run(optax.lookahead(tx(), SYNC, ALPHA, reset_state=True)),
    )


@pytest.mark.parametrize("spec", NEEDS_VALUE, ids=lambda s: s.name)
def test_passes_value_to_the_fast_optimizer(spec: OptimizerSpec) -> None:
    """Before the first synchronisation, the fast parameters follow the plain optimizer given the
    same losses; at it, the slow ones move ``ALPHA`` of the way to them."""
    start = _params()
    fast = start
    tx = spec.make()
    state = tx.init(fast)
    for _ in range(SYNC):
        value, grads = jax.value_and_grad(_loss)(fast)
        updates, state = tx.update(grads, state, fast, value=value)
        fast = optax.apply_updates(fast, updates)
    ours = _run(adaopt.lookahead(spec.make(), SYNC, ALPHA), steps=SYNC, value=True)
    want = jax.tree.map(lambda s, f: s + ALPHA * (f - s), start, fast)
    for got, expected in ((ours.slow, want), (ours.fast, want)):
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7), got, expected)
    assert not np.allclose(ours.slow["w"], start["w"])


def test_refuses_bad_arguments_when_built() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"sync_period must be an integer in \[1, "):
        adaopt.lookahead(adaopt.sgd(), 0, ALPHA)
    with pytest.raises(adaopt.HyperparameterError, match=r"slow_step_size must be a finite number in \[0.0, 1.0\]"):
        adaopt.lookahead(adaopt.sgd(), SYNC, 1.5)


# What the module's docstring says of optax's wrappers, around an optimizer that needs value=.

POLYAK = adaopt.polyak_sgd
PASS_VALUE_ON: dict[str, Callable[[], optax.GradientTransformation]] = {
    "chain": lambda: optax.chain(optax.clip(1.0), POLYAK()),
    "named_chain": lambda: optax.named_chain(("polyak", POLYAK())),
    "MultiSteps": lambda: optax.MultiSteps(POLYAK(), every_k_schedule=1),
    "apply_if_finite": lambda: optax.apply_if_finite(POLYAK(), max_consecutive_errors=2),
    "masked": lambda: optax.masked(POLYAK(), {"w": True, "v": True}),
    "partition": lambda: optax.partition({"a": POLYAK()}, {"w": "a", "v": "a"}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(POLYAK)(),
    "flatten": lambda: optax.flatten(POLYAK()),
    "with_extra_args_support": lambda: optax.with_extra_args_support(POLYAK()),
    "contrib.schedule_free": lambda: optax.contrib.schedule_free(POLYAK(), 1.0),
    "contrib.mechanize": lambda: optax.contrib.mechanize(POLYAK()),
    "adaopt.polynomial_decay_averaging": lambda: adaopt.polynomial_decay_averaging(POLYAK()),
}


@pytest.mark.parametrize("make", PASS_VALUE_ON.values(), ids=PASS_VALUE_ON.keys())
def test_optax_wrappers_that_pass_value_on(make: Callable[[], optax.GradientTransformation]) -> None:
    """polyak_sgd raises without the loss: a wrapper that dropped value= would fail here."""
    params = _params()
    tx = make()
    value, grads = jax.value_and_grad(_loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params, value=value)
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


def test_optax_lookahead_takes_no_value() -> None:
    """If optax's lookahead learns to pass value=, adaopt.lookahead's docstring must say so."""
    params = optax.LookaheadParams.init_synced(_params())
    tx = optax.lookahead(POLYAK(), SYNC, ALPHA)
    with pytest.raises(TypeError, match="value"):
        tx.update(_params(), tx.init(params), params, value=jnp.asarray(1.0))
