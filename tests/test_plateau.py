"""reduce_on_plateau against torch's ReduceLROnPlateau: the same learning rates, float for float.

torch runs a training loop's order: the optimizer steps with the current learning rate, then
``scheduler.step(loss)``. adaopt runs ``update(grads, state, value=loss)``, which scales the
updates by the current scale and then reads the loss. In float64 the learning-rate sequences
are compared for exact equality, over loss sequences drawn by hypothesis (random walks,
plateaus, values exactly at the threshold and one ulp either side, long improving runs, noise)
and random hyperparameters (both modes and threshold modes, cooldowns, floors reached, eps
suppressing small reductions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch
from hypothesis import given, settings
from sklearn.datasets import load_digits

import adaopt
from adaopt import HyperparameterError
from tests.problems import optimal_softmax_regression_loss, softmax_regression_loss

LENGTH = 160  # losses per drawn sequence (ours runs them in one compiled scan)
NUMERIC = ("factor", "patience", "threshold", "cooldown", "min_lr", "eps", "accumulation_size", "base_learning_rate")


def torch_lrs(losses: list[float], hp: dict[str, Any], every: int = 1) -> np.ndarray:
    """torch's lr before each optimizer step; ``scheduler.step`` gets the mean of each ``every`` losses."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=hp["base_learning_rate"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, hp["mode"], hp["factor"], hp["patience"], hp["threshold"], hp["threshold_mode"], hp["cooldown"],
        hp["min_lr"], hp["eps"],
    )  # fmt: skip
    lrs, group = [], []
    for loss in losses:
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        group.append(loss)
        if len(group) == every:
            total = 0.0
            for v in group:  # the mean as adaopt accumulates it: a running sum, then one division
                total += v
            scheduler.step(total / every)
            group = []
    return np.asarray(lrs)


def _make_runner(mode: str, threshold_mode: str) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """One compiled scan per (mode, threshold_mode): the numeric hyperparameters are traced."""

    @jax.jit
    def run(losses: jax.Array, numeric: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        tx = adaopt.reduce_on_plateau(mode=mode, threshold_mode=threshold_mode, **numeric)
        grads = {"w": jnp.ones(3, losses.dtype)}
        state = tx.init(grads)

        def step(state: adaopt.ReduceOnPlateauState, loss: jax.Array) -> tuple[Any, tuple[jax.Array, ...]]:
            updates, new_state = tx.update(grads, state, value=loss)
            return new_state, (state.learning_rate, state.scale, updates["w"][0])

        return jax.lax.scan(step, state, losses)[1]

    return run


RUNNERS = {(m, t): _make_runner(m, t) for m in ("min", "max") for t in ("rel", "abs")}


def ours_lrs(losses: list[float], hp: dict[str, Any], every: int = 1) -> np.ndarray:
    """adaopt's learning rate before each update, in float64; checks the scale and the updates too."""
    padded = losses + [0.0] * (LENGTH - len(losses))
    with jax.enable_x64(True):
        numeric = {k: jnp.asarray(hp[k]) for k in NUMERIC if k != "accumulation_size"}
        numeric["accumulation_size"] = jnp.asarray(every)
        lr, scale, update = RUNNERS[hp["mode"], hp["threshold_mode"]](jnp.asarray(padded, jnp.float64), numeric)
        lr, scale, update = (np.asarray(x)[: len(losses)] for x in (lr, scale, update))
    assert lr.dtype == np.float64
    np.testing.assert_allclose(scale, lr / hp["base_learning_rate"], rtol=1e-15)
    np.testing.assert_array_equal(update, scale)  # the gradient (1.0) times the scale before the loss
    return lr


@st.composite
def hyperparameters(draw: st.DrawFn) -> dict[str, Any]:
    base = draw(st.floats(1e-4, 1.0))
    threshold_mode = draw(st.sampled_from(["rel", "abs"]))
    factor = draw(st.one_of(st.just(0.0), st.just(0.5), st.floats(0.05, 0.95)))
    # A floor the reductions reach, or none.
    # (No subnormals: XLA on CPU flushes them to zero, torch's Python floats keep them.)
    min_lr = draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.5).map(lambda u: u * base)))
    # torch's default, none, one that suppresses some reductions, or exactly the first reduction
    # (which torch then skips: it needs lr - new_lr > eps).
    first_reduction = base - max(base * factor, min_lr)
    eps = draw(st.sampled_from([1e-8, 0.0, first_reduction]) | st.floats(1e-6, 0.5).map(lambda u: u * base))
    return {
        "base_learning_rate": base,
        "mode": draw(st.sampled_from(["min", "max"])),
        "factor": factor,
        "patience": draw(st.integers(0, 6)),
        "threshold": draw(st.one_of(st.just(0.0), st.floats(1e-8, 0.1 if threshold_mode == "rel" else 1.0))),
        "threshold_mode": threshold_mode,
        "cooldown": draw(st.integers(0, 5)),
        "min_lr": min_lr,
        "eps": eps,
    }


def _bound(best: float, hp: dict[str, Any]) -> float:
    """torch's improvement bound of ``best``, to place losses exactly on it."""
    t = hp["threshold"]
    if hp["threshold_mode"] == "rel":
        return best * (1.0 - t) if hp["mode"] == "min" else best * (t + 1.0)
    return best - t if hp["mode"] == "min" else best + t


@st.composite
def losses_for(draw: st.DrawFn, hp: dict[str, Any], length: int) -> list[float]:
    kind = draw(st.sampled_from(["walk", "plateaus", "ties", "improving", "noise"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sign = 1.0 if hp["mode"] == "min" else -1.0  # "improving" means down for min, up for max
    if kind == "walk":
        values = 10.0 + np.cumsum(rng.normal(-0.02 * sign, 0.2, length))
    elif kind == "plateaus":
        levels = 5.0 - sign * np.cumsum(rng.uniform(0, 1, length) < 0.08) * rng.uniform(0.0, 0.5)
        values = levels
    elif kind == "improving":
        values = 100.0 - sign * np.cumsum(rng.uniform(0.0, 0.5, length))
    elif kind == "noise":
        values = rng.normal(1.0, 0.1, length)
    else:  # values on the improvement bound of the running best, or one ulp either side
        out: list[float] = []
        best = math.inf if hp["mode"] == "min" else -math.inf
        for _ in range(length):
            if math.isinf(best):
                v = float(rng.uniform(1, 2))
            else:
                bound = _bound(best, hp)
                v = [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf), best][rng.integers(4)]
            out.append(v)
            better = v < _bound(best, hp) if hp["mode"] == "min" else v > _bound(best, hp)
            if better or math.isinf(best):
                best = v
        return out
    return [float(v) for v in values]


@settings(max_examples=120)
@given(data=st.data())
def test_same_learning_rates_as_torch(data: st.DataObject) -> None:
    hp = data.draw(hyperparameters())
    losses = data.draw(losses_for(hp, data.draw(st.integers(20, LENGTH))))
    theirs = torch_lrs(losses, hp)
    np.testing.assert_array_equal(ours_lrs(losses, hp), theirs)


@settings(max_examples=40)
@given(data=st.data())
def test_accumulation_is_torch_on_the_means(data: st.DataObject) -> None:
    """accumulation_size=k: one decision per k losses, on their mean, from the next update on."""
    hp = data.draw(hyperparameters())
    every = data.draw(st.integers(2, 5))
    losses = data.draw(losses_for(hp, LENGTH))
    np.testing.assert_array_equal(ours_lrs(losses, hp, every), torch_lrs(losses, hp, every))


FIXED = {
    "base_learning_rate": 0.1, "mode": "min", "factor": 0.5, "patience": 2, "threshold": 1e-4,
    "threshold_mode": "rel", "cooldown": 1, "min_lr": 0.01, "eps": 1e-8,
}  # fmt: skip


def test_reductions_floor_cooldown_and_eps_happen() -> None:
    """The drawn scenarios do exercise torch's rules: a long plateau reduces every patience + 1 +
    cooldown evaluations down to min_lr, and an eps larger than a reduction suppresses it."""
    losses = [1.0] * 40
    lrs = ours_lrs(losses, FIXED)
    np.testing.assert_array_equal(lrs, torch_lrs(losses, FIXED))
    drops = np.flatnonzero(np.diff(lrs)) + 1
    assert drops.tolist() == [4, 8, 12, 16]  # 1 best, 3 bad (patience 2) -> reduce; 1 cooldown step
    assert lrs[-1] == 0.01  # the floor: 0.1 * 0.5**3 = 0.0125, then max(0.00625, 0.01)
    suppressed = {**FIXED, "eps": 0.05}  # 0.1 - 0.05 = 0.05 is not > eps: no reduction at all
    np.testing.assert_array_equal(ours_lrs(losses, suppressed), np.full(40, 0.1))
    np.testing.assert_array_equal(torch_lrs(losses, suppressed), np.full(40, 0.1))


def _torch_training(
    params: np.ndarray, grads: np.ndarray, losses: list[float], hp: dict[str, Any], momentum: float
) -> np.ndarray:
    p = torch.nn.Parameter(torch.tensor(params))
    opt = torch.optim.SGD([p], lr=hp["base_learning_rate"], momentum=momentum)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, hp["mode"], hp["factor"], hp["patience"], hp["threshold"], hp["threshold_mode"], hp["cooldown"],
        hp["min_lr"], hp["eps"],
    )  # fmt: skip
    trajectory = []
    for g, loss in zip(grads, losses, strict=True):
        p.grad = torch.tensor(g)
        opt.step()
        scheduler.step(loss)
        trajectory.append(p.detach().numpy().copy())
    return np.stack(trajectory)


def test_training_trajectory_matches_torch() -> None:
    """Chained after SGD with momentum, the parameters follow torch's SGD + ReduceLROnPlateau (float64).

    (torch's momentum buffer holds lr-free gradients, so the reduced lr applies to the whole step:
    the same as scaling adaopt's momentum step.)
    """
    rng = np.random.default_rng(0)
    steps, hp = 120, {**FIXED, "patience": 3, "cooldown": 2, "min_lr": 0.0}
    params, grads = rng.normal(size=5), rng.normal(size=(steps, 5))
    losses = [float(v) for v in 5.0 + np.cumsum(rng.normal(0.0, 0.1, steps))]
    theirs = _torch_training(params, grads, losses, hp, momentum=0.9)
    with jax.enable_x64(True):
        opt = adaopt.chain(adaopt.sgd(hp["base_learning_rate"], momentum=0.9), adaopt.reduce_on_plateau(**hp))

        def step(carry: tuple, inputs: tuple) -> tuple[tuple, jax.Array]:
            p, s = carry
            g, loss = inputs
            updates, s = opt.update(g, s, p, value=loss)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        p0 = jnp.asarray(params)
        (_, final), ours = jax.jit(
            lambda: jax.lax.scan(step, (p0, opt.init(p0)), (jnp.asarray(grads), jnp.asarray(losses)))
        )()
    assert float(final[1].scale) < 0.5, "the run must include reductions"
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-12, atol=1e-12)


def test_cuts_the_rate_when_minibatch_noise_stalls_the_loss() -> None:
    """Softmax regression on digits, SGD on minibatches of 16 at a rate too large to settle: the
    full-batch loss stalls at the noise floor; observed once per epoch, the plateau cuts the rate
    and the loss ends an order of magnitude closer to the optimum (L-BFGS, float64)."""
    x, y = load_digits(return_X_y=True)
    x, y, l2, batch, epochs = (x / 16.0).astype(np.float32), y.astype(np.int32), 1e-3, 16, 25
    best = optimal_softmax_regression_loss(x, y, l2)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    rng = np.random.default_rng(0)
    n = len(x) // batch * batch
    orders = [jnp.asarray(rng.permutation(len(x))[:n].reshape(-1, batch)) for _ in range(epochs)]
    full_loss = jax.jit(lambda p: softmax_regression_loss(p, xs, ys, l2))

    def excess_after_training(on_plateau: adaopt.ReduceOnPlateau | None) -> tuple[float, Any]:
        tx = adaopt.sgd(1.0) if on_plateau is None else adaopt.chain(adaopt.sgd(1.0), on_plateau)

        @jax.jit
        def epoch(p: Any, s: Any, order: jax.Array) -> tuple[Any, Any]:
            def step(carry: tuple, idx: jax.Array) -> tuple[tuple, None]:
                p, s = carry
                g = jax.grad(softmax_regression_loss)(p, xs[idx], ys[idx], l2)
                updates, s = tx.update(g, s, p)
                return (optax.apply_updates(p, updates), s), None

            (p, s), _ = jax.lax.scan(step, (p, s), order)
            return p, (s if on_plateau is None else on_plateau.observe(s, full_loss(p)))

        p = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
        s = tx.init(p)
        for order in orders:
            p, s = epoch(p, s, order)
        return float(full_loss(p)) - best, s

    constant, _ = excess_after_training(None)
    on_plateau = adaopt.reduce_on_plateau(factor=0.3, patience=1)
    reduced, state = excess_after_training(on_plateau)
    assert float(state[1].scale) < 0.3**2, "the rate must have been cut at least twice"
    assert 0 < reduced < constant / 5, (reduced, constant)


def test_observe_evaluation_losses_between_epochs() -> None:
    """Per-evaluation use: updates without a value, and ``observe`` with the evaluation loss at the
    end of each epoch; torch steps its scheduler once per epoch. observe compiles once."""
    rng = np.random.default_rng(1)
    epochs, steps_per_epoch = 40, 3
    eval_losses = [float(v) for v in 2.0 + np.cumsum(rng.normal(0.0, 0.05, epochs))]
    hp = {**FIXED, "patience": 1, "cooldown": 0, "min_lr": 0.0}
    torch_per_epoch = torch_lrs(eval_losses, hp)  # the lr during each epoch
    traces = []
    with jax.enable_x64(True):
        on_plateau = adaopt.reduce_on_plateau(**hp)
        opt = adaopt.chain(adaopt.sgd(hp["base_learning_rate"]), on_plateau)
        params = {"w": jnp.zeros(2)}
        state = opt.init(params)

        def observe(state: Any, loss: Any) -> Any:
            traces.append(1)
            return on_plateau.observe(state, loss)

        observe_jit = jax.jit(observe)
        update = jax.jit(opt.update)
        ours = []
        for loss in eval_losses:
            for _ in range(steps_per_epoch):
                updates, state = update({"w": jnp.ones(2)}, state, params)
                ours.append(float(state[1].learning_rate))
                np.testing.assert_allclose(updates["w"], -float(state[1].learning_rate), rtol=1e-15)
            state = observe_jit(state, loss)
    np.testing.assert_array_equal(np.asarray(ours), np.repeat(torch_per_epoch, steps_per_epoch))
    assert len(traces) == 1
    assert len(set(ours)) > 2, "the run must include reductions"


def test_update_compiles_once() -> None:
    tx = adaopt.chain(adaopt.adam(1e-3), adaopt.reduce_on_plateau(1e-3, patience=0))
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    traces = []

    @jax.jit
    def step(state: Any, loss: jax.Array) -> Any:
        traces.append(1)
        return tx.update(jax.tree.map(jnp.ones_like, params), state, params, value=loss)[1]

    state = tx.init(params)
    for loss in [3.0, 2.0, 2.5, 2.5, 1.0, jnp.asarray(4.0), np.float32(5.0)]:
        state = step(state, jnp.asarray(loss, jnp.float32))
    assert len(traces) == 1
    assert float(state[1].scale) == pytest.approx(1e-4)  # four reductions: 2.5, 2.5, 4, 5 (patience 0)


def test_differs_from_optax_contrib_as_documented() -> None:
    """optax.contrib.reduce_on_plateau(patience=p + 1) reduces at the same evaluations as ours (and
    torch's) with patience=p, and applies the new scale to the update of that same loss, one update
    before ours; with the same patience it reduces one evaluation earlier."""
    rng = np.random.default_rng(2)
    losses = [float(v) for v in 3.0 + np.cumsum(rng.normal(0.0, 0.1, 150))]
    factor, patience, rtol, cooldown = 0.5, 2, 1e-3, 1

    def scales(tx: optax.GradientTransformationExtraArgs) -> tuple[np.ndarray, np.ndarray]:
        """The scale in the state after each update, and the scale applied to each update."""

        def step(s: Any, loss: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array]]:
            updates, s = tx.update({"w": jnp.ones(())}, s, value=loss)
            return s, (s.scale, updates["w"])

        with jax.enable_x64(True):
            out = jax.lax.scan(step, tx.init({"w": jnp.ones(())}), jnp.asarray(losses))[1]
        return np.asarray(out[0]), np.asarray(out[1])

    ours_state, ours_applied = scales(
        adaopt.reduce_on_plateau(factor=factor, patience=patience, threshold=rtol, cooldown=cooldown, eps=0.0)
    )
    late_state, late_applied = scales(
        optax.contrib.reduce_on_plateau(factor=factor, patience=patience + 1, rtol=rtol, cooldown=cooldown)
    )
    early_state, _ = scales(
        optax.contrib.reduce_on_plateau(factor=factor, patience=patience, rtol=rtol, cooldown=cooldown)
    )
    assert len(set(ours_state.tolist())) > 2, "the run must include reductions"
    np.testing.assert_array_equal(ours_state, late_state)
    np.testing.assert_array_equal(ours_applied[1:], late_applied[:-1])  # ours: one update later
    assert not np.array_equal(ours_applied, late_applied)
    first = int(np.argmax(ours_state < 1))  # the first reduction
    assert ours_state[first - 1] == 1 and early_state[first - 1] < 1


def test_dtypes_and_strict_promotion() -> None:
    """The state is float32 for float32 (and half-precision) parameters, float64 for float64;
    the updates keep their dtype."""
    tx = adaopt.reduce_on_plateau(1e-3, patience=0)
    for x64, dtype, state_dtype in [
        (False, jnp.float32, jnp.float32),
        (False, jnp.bfloat16, jnp.float32),
        (True, jnp.float64, jnp.float64),
        (True, jnp.float16, jnp.float32),
    ]:
        with jax.enable_x64(x64), jax.numpy_dtype_promotion("strict"):
            params = {"w": jnp.ones(3, dtype)}
            state = tx.init(params)
            assert state.scale.dtype == state.learning_rate.dtype == state.best.dtype == state_dtype
            update = jax.jit(tx.update)
            updates, state = update(params, state, value=jnp.asarray(1.0, jnp.float32))
            updates, state = update(params, state, value=jnp.asarray(2.0, jnp.float32))
            assert updates["w"].dtype == dtype
            assert float(state.scale) == pytest.approx(0.1)


def test_inject_hyperparams() -> None:
    tx = optax.inject_hyperparams(adaopt.reduce_on_plateau, static_args=("mode", "threshold_mode"))(
        base_learning_rate=0.1, factor=0.5, patience=0
    )
    state = tx.init({"w": jnp.ones(2)})
    update = jax.jit(tx.update)
    for loss in [1.0, 2.0, 2.0]:
        _, state = update({"w": jnp.ones(2)}, state, value=jnp.asarray(loss))
    assert float(state.inner_state.learning_rate) == pytest.approx(0.025)


def test_observe_needs_exactly_one_plateau_state() -> None:
    on_plateau = adaopt.reduce_on_plateau()
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="exactly one ReduceOnPlateauState, found 0"):
        on_plateau.observe(adaopt.adam().init(params), 1.0)
    two = adaopt.chain(on_plateau, on_plateau).init(params)
    with pytest.raises(ValueError, match="found 2"):
        on_plateau.observe(two, 1.0)
    assert on_plateau.observe(on_plateau.init(params), 1.0).best == 1.0
    with pytest.raises(ValueError, match="scalar"):
        on_plateau.update(params, on_plateau.init(params), value=jnp.ones(2))


INVALID = [
    ("base_learning_rate", 0.0),
    ("base_learning_rate", -1e-3),
    ("mode", "minimum"),
    ("factor", 1.0),
    ("factor", -0.1),
    ("patience", -1),
    ("patience", 1.5),
    ("threshold", -1e-4),
    ("threshold", math.nan),
    ("threshold_mode", "relative"),
    ("cooldown", -1),
    ("cooldown", True),
    ("min_lr", -1.0),
    ("eps", -1e-8),
    ("accumulation_size", 0),
    ("accumulation_size", 2.0),
]


@pytest.mark.parametrize(("name", "bad"), INVALID, ids=[f"{n}-{b!r}" for n, b in INVALID])
def test_invalid_hyperparameters(name: str, bad: Any) -> None:
    with pytest.raises(HyperparameterError) as info:
        adaopt.reduce_on_plateau(**{name: bad})
    message = str(info.value)
    assert name in message and repr(bad) in message and "must be" in message, message
