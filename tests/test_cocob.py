"""COCOB-Backprop against the authors' package (parameterfree) and optax.contrib.cocob, step for step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import parameterfree
import pytest

from adaopt import CocobState, HyperparameterError, cocob
from tests import parity, problems
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case

SEEDS = (0, 1)


def _draw(seed: int, case: Case) -> tuple[dict[str, Any], Any]:
    """Valid hyperparameters (adaopt's names) and a learning rate or schedule."""
    rng = np.random.default_rng(seed)
    log_uniform = lambda low, high: float(np.exp(rng.uniform(np.log(low), np.log(high))))
    hp = {"alpha": log_uniform(20.0, 200.0), "eps": log_uniform(1e-10, 1e-6)}
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0
    peak = log_uniform(0.3, 3.0)
    if not case.schedule:
        return hp, peak
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=20, decay_steps=STEPS, end_value=peak / 10)
    return hp, lambda count: schedule(jnp.asarray(count, case.dtype))


def _data(seed: int, dtype: Any, grad_scale: float = 1.0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed + 1000)
    params = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    grads = {k: (grad_scale * rng.normal(size=(STEPS, *shape))).astype(dtype) for k, shape in SHAPES.items()}
    return params, grads


def _ours(hp: dict[str, Any], lr: Any, case: Case, params: dict, grads: dict) -> dict:
    mask = DECAY_MASK if case.weight_decay else None
    tx = cocob(lr, hp["alpha"], hp["eps"], hp["weight_decay"], weight_decay_mask=mask)
    return parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))


def _parameterfree(groups: list[dict[str, Any]], hp: dict[str, Any]) -> Any:
    # The groups carry the weight decay (coupled, as parameterfree adds it to the gradient).
    return parameterfree.COCOB(groups, alpha=hp["alpha"], eps=hp["eps"])


def _check(ours: dict, theirs: dict, params: dict, case: Case, f64: float = 1e-10, f32: float = 1e-5) -> None:
    for k in SHAPES:
        assert ours[k].dtype == case.dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    error = parity.relative_error(ours, theirs)
    assert error <= (f64 if case.dtype == np.float64 else f32), f"relative error {error:.3g}"


TORCH_CASES = [Case(wd, False, dtype) for wd in (False, True) for dtype in (np.float64, np.float32)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.label)
def test_matches_parameterfree(case: Case, seed: int) -> None:
    """The authors' package, with any constant learning rate (it has none: COCOB is invariant to one)."""
    hp, lr = _draw(seed, case)
    params, grads = _data(seed, case.dtype)
    with jax.enable_x64(case.dtype == np.float64):
        ours = _ours(hp, lr, case, params, grads)
        theirs = parity.run_torch(_parameterfree, hp, lr, params, grads, case)
    _check(ours, theirs, params, case)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_eps_is_the_initial_scale_and_zero_is_the_paper(dtype: Any) -> None:
    """With gradients below eps, L_0 = eps (the packages) and L_0 = 0 (Algorithm 2) part ways; each matches."""
    case = Case(False, False, dtype)
    params, grads = _data(7, dtype, grad_scale=1e-10)
    trajectories = {}
    for eps in (1e-8, 0.0):
        hp = {"alpha": 100.0, "eps": eps, "weight_decay": 0.0}
        with jax.enable_x64(dtype == np.float64):
            ours = _ours(hp, 1.0, case, params, grads)
            theirs = parity.run_torch(_parameterfree, hp, 1.0, params, grads, case)
        _check(ours, theirs, params, case)
        trajectories[eps] = ours
    assert parity.relative_error(trajectories[1e-8], trajectories[0.0]) > 1e-3


OPTAX_CASES = [
    Case(False, False, np.float64),
    Case(True, True, np.float64),
    Case(False, True, np.float32),
    Case(True, False, np.float32),
]


@pytest.mark.parametrize(("seed", "case"), list(enumerate(OPTAX_CASES, 10)), ids=[c.label for c in OPTAX_CASES])
def test_matches_optax_contrib_cocob(case: Case, seed: int) -> None:
    """optax.contrib.cocob, with the learning rate (or a schedule) weighting the gradients and a decay mask."""
    hp, lr = _draw(seed, case)
    params, grads = _data(seed, case.dtype)
    with jax.enable_x64(case.dtype == np.float64):
        ours = _ours(hp, lr, case, params, grads)
        mask = DECAY_MASK if case.weight_decay else None
        reference = optax.contrib.cocob(lr, hp["alpha"], hp["eps"], hp["weight_decay"], mask)
        theirs = parity.run_adaopt(reference, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    _check(ours, theirs, params, case)


def test_a_constant_learning_rate_changes_nothing_and_a_schedule_does() -> None:
    case = Case(False, False, np.float64)
    params, grads = _data(3, np.float64)
    hp = {"alpha": 100.0, "eps": 1e-8, "weight_decay": 0.0}
    with jax.enable_x64(True):
        small, large = (_ours(hp, lr, case, params, grads) for lr in (0.01, 100.0))
        scheduled = _ours(hp, optax.linear_schedule(1.0, 0.1, STEPS), case, params, grads)
    assert parity.relative_error(small, large) < 1e-12
    assert parity.relative_error(scheduled, large) > 1e-3


def test_reference_point_is_taken_at_the_first_update() -> None:
    """Parameters loaded after init (a checkpoint) are the origin of the bets, as in parameterfree.

    optax.contrib.cocob takes them at init instead: the one documented difference from it.
    """
    params, grads = _data(4, np.float32)
    params = jax.tree.map(jnp.asarray, params)
    first = jax.tree.map(lambda g: jnp.asarray(g[0]), grads)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def first_updates(tx: optax.GradientTransformation) -> tuple[list, list]:
        update = jax.jit(tx.update)
        late, _ = update(first, tx.init(zeros), params)
        on_time, _ = update(first, tx.init(params), params)
        return jax.tree.leaves(late), jax.tree.leaves(on_time)

    late, on_time = first_updates(cocob())
    assert all(np.array_equal(a, b) for a, b in zip(late, on_time, strict=True))
    late, on_time = first_updates(optax.contrib.cocob())
    assert not all(np.array_equal(a, b) for a, b in zip(late, on_time, strict=True))


def test_jit_compiles_once() -> None:
    tx = cocob()
    traces = 0

    @jax.jit
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    for t in range(3):
        params, state = step(params, state, jax.tree.map(lambda p: jnp.full_like(p, (-1.0) ** t), params))
    assert traces == 1
    assert isinstance(state, tuple) and isinstance(state[-1], CocobState)
    assert int(state[-1].count) == 3


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_half_precision_zero_gradient_is_finite(dtype: Any, eps: float) -> None:
    with jax.numpy_dtype_promotion("strict"):
        params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros(3, dtype)}
        tx = cocob(eps=eps, weight_decay=0.1)
        state = tx.init(params)
        for grads in (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.ones_like, params)):
            updates, state = jax.jit(tx.update)(grads, state, params)
            for u in jax.tree.leaves(updates):
                assert u.dtype == jnp.dtype(dtype)
                assert bool(jnp.all(jnp.isfinite(u)))
            params = optax.apply_updates(params, updates)
        assert bool(jnp.all(params["w"] < 1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": "1"}, "learning_rate"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(HyperparameterError, match=name) as info:
        cocob(**kwargs)
    assert isinstance(info.value, ValueError) and repr(next(iter(kwargs.values()))) in str(info.value)


def test_update_needs_the_parameters() -> None:
    tx = cocob()
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))


def test_solves_a_logistic_regression() -> None:
    """No learning rate to tune: the default reaches near the optimum of a real problem."""
    loss, start, best = problems.binary_logistic_regression()
    final = float(loss(problems.train(cocob(), loss, start, 500)))
    assert final < 0.5 * float(loss(start))
    assert final <= best + 0.01, f"loss {final:.4f} vs optimum {best:.4f}"
