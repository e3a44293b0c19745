"""adaopt.EarlyStopping against Keras' own ``keras.callbacks.EarlyStopping`` (run with the JAX backend):
the same stop epoch, best epoch, best value, wait and restored weights on many random and hand-picked
sequences of metric values, under random settings; and inside one compiled training loop next to
reduce_on_plateau, both watching the same validation loss.

Keras is driven as ``model.fit`` drives it: ``on_train_begin``, ``on_epoch_end(epoch, logs)`` after
each epoch until ``model.stop_training``, ``on_train_end``, on a stand-in model whose weights are
the number of the epoch that produced them. The values are multiples of 1/8 and ``min_delta`` and
``baseline`` too, so that float32 (Keras' comparisons on JAX) and float64 (its ``value - min_delta``
in Python) hold every sum exactly, ties and exact ``min_delta`` steps included.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt

LENGTH = 24  # epochs per sequence
SEQUENCES = 32  # random sequences per setting, besides the hand-picked ones


@functools.cache
def _keras_early_stopping() -> type:
    """Keras' callback class, imported once, with the JAX backend (Keras picks it at import)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    assert keras.backend.backend() == "jax"
    return keras.callbacks.EarlyStopping


class _StandIn:
    """What the callback reads of a model: its weights (here the epoch that produced them) and stop_training."""

    def __init__(self) -> None:
        self.weights = [np.asarray(-1.0)]
        self.stop_training = False

    def get_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self.weights]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.weights = [np.asarray(w) for w in weights]


@dataclasses.dataclass(frozen=True)
class Outcome:
    stopped_epoch: int  # -1: never stopped
    best_epoch: int
    best: float
    wait: int
    final_weights: float  # the epoch whose weights the model ends with


def _keras(stopper: adaopt.EarlyStopping, values: np.ndarray) -> Outcome:
    settings = dataclasses.asdict(stopper)
    callback = _keras_early_stopping()(monitor="val_loss", **settings)
    model = _StandIn()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        model.weights = [np.asarray(float(epoch))]  # the epoch trained, then evaluated
        callback.on_epoch_end(epoch, {"val_loss": float(value)})
        if model.stop_training:
            break
    callback.on_train_end()
    return Outcome(
        stopped_epoch=callback.stopped_epoch if model.stop_training else -1,
        best_epoch=int(callback.best_epoch),
        best=np.nan if callback.best is None else float(callback.best),
        wait=int(callback.wait),
        final_weights=float(model.weights[0]),
    )


@functools.cache
def _runner(mode: str, has_baseline: bool, restore_best_weights: bool) -> Any:
    """Many sequences, each with its own numeric settings, in one compiled program per structure: a scan
    over epochs, as a training loop under jit would run it (the parameters stop changing once
    ``should_stop``), vmapped over (settings, sequence) rows."""

    def run(settings: tuple[jax.Array, ...], values: jax.Array) -> tuple[adaopt.EarlyStoppingState, jax.Array]:
        min_delta, patience, baseline, start_from_epoch = settings
        stopper = adaopt.EarlyStopping(
            min_delta=min_delta,
            patience=patience,
            mode=mode,
            baseline=baseline if has_baseline else None,
            restore_best_weights=restore_best_weights,
            start_from_epoch=start_from_epoch,
        )

        def epoch(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
            params, state = carry
            index, value = inputs
            params = jnp.where(state.should_stop, params, index.astype(params.dtype))  # one epoch of training
            return (params, stopper.update(state, value, params)), None

        params = jnp.asarray(-1.0)
        (params, state), _ = jax.lax.scan(epoch, (params, stopper.init(params)), (jnp.arange(LENGTH), values))
        return state, stopper.final_params(state, params)

    return jax.jit(jax.vmap(run))


def _ours(stopper: adaopt.EarlyStopping, values: np.ndarray) -> list[Outcome]:
    rows = len(values)
    settings = (
        jnp.full(rows, stopper.min_delta, jnp.float32),
        jnp.full(rows, stopper.patience, jnp.int32),
        jnp.full(rows, 0.0 if stopper.baseline is None else stopper.baseline, jnp.float32),
        jnp.full(rows, stopper.start_from_epoch, jnp.int32),
    )
    run = _runner(stopper.mode, stopper.baseline is not None, stopper.restore_best_weights)
    state, final = jax.tree.map(np.asarray, run(settings, jnp.asarray(values, jnp.float32)))
    return [
        Outcome(int(s), int(b), float(v), int(w), float(f))
        for s, b, v, w, f in zip(state.stopped_epoch, state.best_epoch, state.best, state.wait, final, strict=True)
    ]


def _hand_picked() -> np.ndarray:
    """Sequences that reach the rule's corners: plateaus and exact ties, steps of exactly 1/8 and 1/4
    (min_delta's values), an improvement after a long wait, a rise, NaN first and later, infinities."""
    down = np.linspace(2.0, 0.5, LENGTH)
    rows = [
        np.full(LENGTH, 1.0),
        2.0 - np.arange(LENGTH) / 8,  # improves by exactly 1/8 each epoch
        2.0 - np.arange(LENGTH) / 4,
        np.r_[np.full(6, 1.5), np.full(LENGTH - 6, 1.0)],  # an improvement after a plateau
        np.r_[np.arange(8)[::-1] / 8 + 1.0, np.arange(LENGTH - 8) / 8 + 1.0],  # down, then up
        np.round(down * 8) / 8,
        np.r_[np.nan, np.full(LENGTH - 1, 1.0)],
        np.r_[1.0, np.nan, 0.5, np.full(LENGTH - 3, 0.25)],
        np.r_[np.inf, 1.0, -np.inf, np.full(LENGTH - 3, 0.0)],
    ]
    return np.stack(rows)


def _random_sequences(rng: np.random.Generator) -> np.ndarray:
    """Half noisy descents, half draws from a few levels (many ties); multiples of 1/8, a few NaNs."""
    half = SEQUENCES // 2
    trend = np.linspace(4.0, 1.0, LENGTH) + rng.normal(scale=0.1, size=(half, LENGTH)).cumsum(axis=1)
    levels = rng.integers(0, 5, size=(SEQUENCES - half, LENGTH)) / 4
    values = np.round(np.concatenate([trend, levels]) * 8) / 8
    values[rng.random(values.shape) < 0.02] = np.nan
    return values


def _oriented(mode: str, values: Any) -> Any:
    """The values for ``mode``: as drawn (they mostly fall) for "min", mirrored (they mostly rise) for "max"."""
    return values if mode == "min" else 5.0 - values


# (mode, has a baseline, restore_best_weights): each shapes the program; two numeric draws for each.
STRUCTURES = [
    ("min", False, True),
    ("max", False, True),
    ("min", True, True),
    ("max", True, True),
    ("min", False, False),
]


def _draw_stopper(rng: np.random.Generator, structure: tuple[str, bool, bool]) -> adaopt.EarlyStopping:
    mode, has_baseline, restore_best_weights = structure
    return adaopt.EarlyStopping(
        min_delta=float(rng.choice([0.0, 0.125, 0.25])),
        patience=int(rng.integers(0, 9)),
        mode=mode,  # type: ignore[arg-type]
        baseline=_oriented(mode, float(rng.choice([1.0, 1.5, 2.0]))) if has_baseline else None,
        restore_best_weights=restore_best_weights,
        start_from_epoch=int(rng.choice([0, 0, 1, 4])),
    )


SEED = 20240613


def _outcome_fields(outcome: Outcome) -> tuple:
    return dataclasses.astuple(outcome)


def _same(a: Outcome, b: Outcome) -> bool:
    """Equal outcomes, a NaN best equal to a NaN best."""
    return all(x == y or (x != x and y != y) for x, y in zip(_outcome_fields(a), _outcome_fields(b), strict=True))


def test_matches_keras_early_stopping() -> None:
    rng = np.random.default_rng(SEED)
    compared = stopped = restored_before_the_end = 0
    for structure in STRUCTURES * 2:
        stopper = _draw_stopper(rng, structure)
        values = _oriented(stopper.mode, np.concatenate([_hand_picked(), _random_sequences(rng)]))
        for row, ours in zip(values, _ours(stopper, values), strict=True):
            theirs = _keras(stopper, row)
            np.testing.assert_equal(_outcome_fields(ours), _outcome_fields(theirs), err_msg=f"{stopper}, {row}")
            compared += 1
            stopped += theirs.stopped_epoch >= 0
            restored_before_the_end += theirs.final_weights < max(theirs.stopped_epoch, 0)
    # The comparison covered both outcomes, and restorations of an earlier epoch.
    assert compared == 2 * len(STRUCTURES) * len(values)
    assert 0.2 * compared < stopped < 0.9 * compared and restored_before_the_end > 0.1 * compared


def test_the_comparison_sees_patience_and_min_delta() -> None:
    """Off by one in patience, or a min_delta of 0 instead of 1/8: some sequences end differently."""
    rng = np.random.default_rng(SEED + 1)
    values = np.concatenate([_hand_picked(), _random_sequences(rng)])
    stopper = adaopt.EarlyStopping(min_delta=0.125, patience=2)
    for wrong in (dataclasses.replace(stopper, patience=3), dataclasses.replace(stopper, min_delta=0.0)):
        differ = [not _same(ours, _keras(stopper, row)) for row, ours in zip(values, _ours(wrong, values), strict=True)]
        assert sum(differ) > len(values) // 10


def test_patience_zero_and_one_stop_alike_as_in_keras() -> None:
    """The docstring's claim: the wait counts the epoch without improvement itself."""
    values = np.concatenate([_hand_picked(), _random_sequences(np.random.default_rng(SEED + 2))])
    zero, one = adaopt.EarlyStopping(patience=0), adaopt.EarlyStopping(patience=1)
    assert [o.stopped_epoch for o in _ours(zero, values)] == [o.stopped_epoch for o in _ours(one, values)]


# --- in a training loop, next to reduce_on_plateau ---------------------------------------------------


def _regression(seed: int = 0) -> tuple[jax.Array, ...]:
    """More features than training points: the validation loss falls, then rises as the model overfits."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=30)
    x_train, x_val = rng.normal(size=(20, 30)), rng.normal(size=(200, 30))
    y_train = x_train @ w + rng.normal(scale=3.0, size=20)
    y_val = x_val @ w + rng.normal(scale=3.0, size=200)
    return tuple(jnp.asarray(a, jnp.float32) for a in (x_train, y_train, x_val, y_val))


MAX_EPOCHS = 300


def test_one_training_step_feeds_plateau_and_early_stopping() -> None:
    """A compiled while_loop: each epoch trains a step with AdamW chained with reduce_on_plateau, then
    both the plateau (``observe``) and the early stopping see that epoch's validation loss. Keras, fed
    the recorded losses, stops at the same epoch with the same best epoch; the restored parameters
    have the best validation loss; the plateau saw the same losses (its best is theirs) and cut the
    learning rate."""
    x_train, y_train, x_val, y_val = _regression()
    mse = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    plateau = adaopt.reduce_on_plateau(0.05, factor=0.5, patience=3, threshold=0.0, threshold_mode="abs")
    opt = adaopt.chain(adaopt.adamw(0.05, weight_decay=0.0), plateau)
    stopper = adaopt.EarlyStopping(patience=25, restore_best_weights=True)

    @jax.jit
    def train(params: dict) -> tuple[dict, adaopt.EarlyStoppingState, Any, jax.Array]:
        def epoch(carry: tuple) -> tuple:
            params, opt_state, stop_state, losses = carry
            grads = jax.grad(mse)(params, x_train, y_train)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            val_loss = mse(params, x_val, y_val)
            opt_state = plateau.observe(opt_state, val_loss)
            stop_state = stopper.update(stop_state, val_loss, params)
            return params, opt_state, stop_state, losses.at[stop_state.epoch - 1].set(val_loss)

        def running(carry: tuple) -> jax.Array:
            return ~carry[2].should_stop & (carry[2].epoch < MAX_EPOCHS)

        start = (params, opt.init(params), stopper.init(params), jnp.full(MAX_EPOCHS, jnp.nan))
        params, opt_state, stop_state, losses = jax.lax.while_loop(running, epoch, start)
        return stopper.final_params(stop_state, params), stop_state, opt_state, losses

    params, state, opt_state, losses = train({"w": jnp.zeros(30), "b": jnp.zeros([])})
    epochs = int(state.epoch)
    losses = np.asarray(losses)[:epochs]
    assert bool(state.should_stop) and 30 < epochs < MAX_EPOCHS  # it fell, then rose: stopped early
    theirs = _keras(stopper, losses)
    assert (int(state.stopped_epoch), int(state.best_epoch)) == (theirs.stopped_epoch, theirs.best_epoch)
    assert theirs.stopped_epoch == epochs - 1
    assert float(state.best) == float(np.min(losses))
    assert float(mse(params, x_val, y_val)) == pytest.approx(float(state.best), rel=1e-6)
    plateau_state = opt_state[1]
    assert float(plateau_state.best) == float(state.best)
    assert float(plateau_state.scale) < 1.0


# --- errors ------------------------------------------------------------------------------------------------


def test_refuses_bad_settings_and_inputs() -> None:
    error = adaopt.HyperparameterError
    with pytest.raises(error, match=r"min_delta must be a finite number in \[0.0, inf\), got -0.1"):
        adaopt.EarlyStopping(min_delta=-0.1)
    with pytest.raises(error, match=r"patience must be an integer in \[0, "):
        adaopt.EarlyStopping(patience=1.5)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"mode must be one of \('min', 'max'\), got 'auto'"):
        adaopt.EarlyStopping(mode="auto")  # type: ignore[arg-type]
    with pytest.raises(error, match=r"baseline must be a finite number"):
        adaopt.EarlyStopping(baseline=float("nan"))
    with pytest.raises(error, match=r"restore_best_weights must be True or False"):
        adaopt.EarlyStopping(restore_best_weights=1)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"start_from_epoch must be an integer in \[0, "):
        adaopt.EarlyStopping(start_from_epoch=-1)
    restoring = adaopt.EarlyStopping(restore_best_weights=True)
    with pytest.raises(ValueError, match=r"needs the parameters"):
        restoring.init()
    state = restoring.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"needs the parameters"):
        restoring.update(state, 1.0)
    with pytest.raises(adaopt.TreeMismatchError, match=r"another tree structure than those given to init"):
        restoring.update(state, 1.0, {"v": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"one value per epoch, a scalar; got shape \(2,\)"):
        restoring.update(state, jnp.ones(2), {"w": jnp.zeros(2)})


def test_restore_best_weights_takes_a_numpy_bool() -> None:
    """It was checked with isinstance(x, bool): np.True_ (read from an array of settings) was refused."""
    stopping = adaopt.EarlyStopping(restore_best_weights=np.bool_(True))
    state = stopping.init({"w": jnp.zeros(2)})
    stopping.update(state, 1.0, {"w": jnp.zeros(2)})
    with pytest.raises(adaopt.HyperparameterError, match=r"^restore_best_weights must be True or False, got 'no'"):
        adaopt.EarlyStopping(restore_best_weights="no")  # type: ignore[arg-type]
