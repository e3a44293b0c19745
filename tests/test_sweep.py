"""Sweeps (adaopt.sweep, adaopt.Sweep): each lane of the vectorised program is the run of its configuration alone,
every numeric hyperparameter of every registry optimizer can be batched, grid and random spaces, successive
halving against a host-side ranking and its compilation count, Optuna's ask/tell, divergence, bad input."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import optuna
import pytest

import adaopt
from adaopt import REGISTRY, Capability, OptimizerSpec, Range
from benchmarks import learning_rates

matplotlib.use("Agg")

STEPS, EVERY = 12, 4


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4))
    return x, x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 + 0.1 * rng.normal(size=32)


def loss_fn(params: dict, batch: jax.Array) -> jax.Array:
    """Least squares on a minibatch of rows (``batch``: their indices)."""
    x, y = _data()
    x, y = jnp.asarray(x, params["w"].dtype)[batch], jnp.asarray(y, params["w"].dtype)[batch]
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def eval_fn(params: dict) -> jax.Array:
    return loss_fn(params, jnp.arange(32))


def _params() -> dict:
    return {"w": jnp.zeros(4), "b": jnp.zeros(())}


def _init(key: jax.Array) -> dict:
    return {"w": jax.random.normal(key, (4,), jnp.zeros(()).dtype), "b": jnp.zeros(())}


def _batches(steps: int = STEPS) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 32, size=(steps, 8)).astype(np.int32)


@functools.cache
def _separate_program(factory: Any) -> Any:
    """One configuration alone, as a user would train it (its hyperparameters arguments of one jitted function,
    compiled once per optimizer): its metric after every EVERY steps, and its parameters."""

    @jax.jit
    def train(config: dict, params: Any) -> tuple[jax.Array, Any]:
        tx = factory(**config)

        def step(carry: Any, batch: jax.Array) -> tuple[Any, None]:
            p, s = carry
            value, grads = jax.value_and_grad(loss_fn)(p, batch)
            updates, s = tx.update(grads, s, p, value=value)
            return (optax.apply_updates(p, updates), s), None

        def chunk(carry: Any, batches: jax.Array) -> tuple[Any, jax.Array]:
            carry, _ = jax.lax.scan(step, carry, batches)
            return carry, eval_fn(carry[0])

        (params, _), metrics = jax.lax.scan(chunk, (params, tx.init(params)), _batches().reshape(-1, EVERY, 8))
        return metrics, params

    return train


def _separate_run(factory: Any, config: dict, params: Any) -> tuple[list[float], Any]:
    metrics, params = _separate_program(factory)(config, params)
    return np.asarray(metrics).tolist(), params


# The few optimizers whose lanes are compared with separate runs: per-coordinate with weight decay, momentum,
# the loss as value= (Polyak).
LANE_CASES = {
    "adamw": {"learning_rate": [0.01, 0.1, 0.03], "b2": [0.99, 0.9, 0.999], "weight_decay": [0.0, 0.1, 0.01]},
    "sgd": {"learning_rate": [0.01, 0.05, 0.1], "momentum": [0.9, 0.0, 0.5]},
    "polyak_sgd": {"max_learning_rate": [0.1, 1.0, 0.5]},
}


@pytest.mark.parametrize("name", list(LANE_CASES))
def test_each_lane_equals_a_separate_run(name: str) -> None:
    """Each trial from its own initial parameters: ``init(fold_in(key(seed), i))``."""
    with jax.enable_x64(True):
        factory = REGISTRY[name].factory
        result = adaopt.sweep(factory, LANE_CASES[name], loss_fn, _init, _batches(), eval_fn=eval_fn, eval_every=EVERY,
                              seed=3)  # fmt: skip
        assert result.curves.shape == (3, STEPS // EVERY)
        np.testing.assert_array_equal(result.eval_steps, [4, 8, 12])
        for i in range(3):
            start = _init(jax.random.fold_in(jax.random.key(3), i))
            metrics, params = _separate_run(factory, result.config(i), start)
            np.testing.assert_allclose(result.curves[i], metrics, rtol=1e-10, atol=1e-12)
            if i == result.best_index:
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), result.best_params, params)
        assert result.best_index == int(np.argmin(result.curves[:, -1]))
        # The configurations made a difference: the lanes did not all train the same optimizer.
        assert len(set(np.round(result.curves[:, -1], 8).tolist())) == 3


# ---------------------------------------------------------------------------------------------
# Every numeric hyperparameter of every registry optimizer can be a lane of a vmap.


def _tiny_loss(params: dict, step: jax.Array) -> jax.Array:
    """Nonconvex, its gradient changing with the parameters and the step (the batch is the step number)."""
    w, b = params["w"], params["b"]
    return jnp.sum(jnp.tanh(w @ jnp.array([1.0, -0.5]) + b - 0.1 * step) ** 2) + 0.1 * jnp.sum(w**2)


# XLA:CPU's cheaper compilation (the same numbers to the tolerance below): 47 programs, each run once.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _space(spec: OptimizerSpec) -> dict[str, Any]:
    rate = learning_rates.TUNED[spec.name]
    space = adaopt.search_space(spec, Range(rate / 2, rate * 2, log=True))
    if Capability.WEIGHT_DECAY in spec.capabilities:
        space["weight_decay"] = Range(0.0, 0.1)
    return space


@pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
def test_every_numeric_hyperparameter_can_be_batched(spec: OptimizerSpec) -> None:
    """``jax.vmap`` over two random draws of all of them equals ``jax.lax.map`` (the unbatched body), in one program.

    Nine steps: a Capability.DELAYED_START optimizer's first updates are zero.
    """
    with jax.enable_x64(True):
        sweep = adaopt.Sweep(spec, _tiny_loss)
        configs = adaopt.random_configs(_space(spec), 2, seed=0)
        hps = {name: jnp.asarray(v) for name, v in configs.items()}
        params = {"w": jnp.array([[0.5, -0.3], [0.2, 0.8], [-0.6, 0.1]]), "b": jnp.array([0.1, -0.2, 0.3])}
        steps = jnp.arange(9, dtype=jnp.int32)

        def body(hp: dict) -> Any:
            p, s = sweep.init_lane(hp, params)
            return sweep.train_lane(hp, p, s, steps)[0]

        program = jax.jit(lambda h: (jax.vmap(body)(h), jax.lax.map(body, h))).lower(hps).compile(FAST_COMPILE)
        batched, mapped = program(hps)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(mapped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert not np.allclose(a[0], a[1]), "the two draws trained the same: a hyperparameter was not used"


# ---------------------------------------------------------------------------------------------
# Search spaces.


def test_grid_configs_is_the_product_first_name_slowest() -> None:
    space = {"learning_rate": Range(1e-3, 1e-1, log=True), "b1": [0.0, 0.9], "eps": Range(0.0, 1.0)}
    configs = adaopt.grid_configs(space, points={"learning_rate": 3, "eps": 2})
    expected = list(itertools.product([1e-3, 1e-2, 1e-1], [0.0, 0.9], [0.0, 1.0]))
    got = list(zip(*(configs[n].tolist() for n in ("learning_rate", "b1", "eps")), strict=True))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert list(configs) == ["learning_rate", "b1", "eps"]
    np.testing.assert_allclose(adaopt.grid_configs({"x": Range(1.0, 4.0, log=True)}, 1)["x"], [2.0])


def test_random_configs_are_seeded_in_range_and_log_uniform() -> None:
    space = {"learning_rate": Range(1e-4, 1e0, log=True), "b2": [0.9, 0.99, 0.999], "wd": Range(0.0, 0.5)}
    a = adaopt.random_configs(space, 3000, seed=7)
    b = adaopt.random_configs(space, 3000, seed=7)
    assert all(np.array_equal(a[n], b[n]) for n in space)
    assert not np.array_equal(a["learning_rate"], adaopt.random_configs(space, 3000, seed=8)["learning_rate"])
    lr = a["learning_rate"]
    assert lr.min() >= 1e-4 and lr.max() <= 1.0
    # Log-uniform: each decade holds about a quarter of the draws (uniform would put 90% in the last one).
    counts = np.histogram(np.log10(lr), bins=[-4, -3, -2, -1, 0])[0] / lr.size
    np.testing.assert_allclose(counts, 0.25, atol=0.04)
    assert set(a["b2"].tolist()) == {0.9, 0.99, 0.999}
    assert a["wd"].min() >= 0.0 and a["wd"].max() <= 0.5 and abs(a["wd"].mean() - 0.25) < 0.02


# ---------------------------------------------------------------------------------------------
# Successive halving.

HALVING_STEPS = 16


def _reference_steps(curves: np.ndarray, rungs: list[int], keep: float) -> np.ndarray:
    """Host-side successive halving on the full curves: at each rung, the best floor(keep * live) stay."""
    live = list(range(curves.shape[0]))
    steps = np.full(curves.shape[0], HALVING_STEPS)
    for rung in rungs:
        column = rung // EVERY - 1
        ranked = sorted(live, key=lambda i: (not math.isfinite(curves[i, column]), curves[i, column], i))
        kept = ranked[: max(1, math.floor(keep * len(live)))]
        for i in set(live) - set(kept):
            steps[i] = rung
        live = sorted(kept)
    return steps


def test_successive_halving_keeps_the_best_continues_them_and_compiles_once_per_width() -> None:
    """Against a host-side halving of the uninterrupted curves. lanes=None gathers the survivors into powers of two
    (9 trials: widths 9, 4, 2, 1, each compiled once); fixed lanes compile one program whatever the rung."""
    with jax.enable_x64(True):
        configs = adaopt.random_configs({"learning_rate": Range(1e-3, 0.3, log=True)}, 9, seed=2)
        configs["learning_rate"][4] = 1e30  # diverges: dropped first
        sweep = adaopt.Sweep(adaopt.sgd, loss_fn, eval_fn=eval_fn)
        run = functools.partial(sweep.run, params=_params(), batches=_batches(HALVING_STEPS), eval_every=EVERY)
        full = run(configs)
        assert sweep.compilations == {"init": 1, "chunk": 1}
        halved = {(None, 0.5): run(configs, halve_every=EVERY, keep=0.5)}
        assert sweep.compilations == {"init": 1, "chunk": 4}  # widths 9 (compiled), 4, 2, 1
        halved[3, 1 / 3] = run(configs, halve_every=[4, 8, 12], keep=1 / 3, lanes=3)
        assert sweep.compilations == {"init": 2, "chunk": 5}  # width 3
        for seed in range(2):  # other configurations: nothing recompiles
            run(adaopt.random_configs({"learning_rate": Range(1e-3, 0.3, log=True)}, 9, seed=seed), lanes=3,
                halve_every=EVERY)  # fmt: skip
        assert sweep.compilations == {"init": 2, "chunk": 5}
    assert full.diverged[4]
    for (_, keep), result in halved.items():
        expected = _reference_steps(full.curves, [4, 8, 12], keep)
        np.testing.assert_array_equal(result.steps, expected)
        assert result.steps[4] == EVERY and (expected < HALVING_STEPS).sum() == 8  # one survivor
        # Survivors go on from their own parameters and states: their curves are the uninterrupted runs'.
        for i in range(9):
            trained = result.eval_steps <= result.steps[i]
            np.testing.assert_allclose(result.curves[i, trained], full.curves[i, trained], rtol=1e-10)
            assert np.isnan(result.curves[i, ~trained]).all()
        assert result.best_index == int(np.argmax(expected))
    assert halved[None, 0.5].steps.tolist() != halved[3, 1 / 3].steps.tolist()  # keep made a difference


# ---------------------------------------------------------------------------------------------
# Optuna.


def test_optuna_study_is_told_what_the_program_computed() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"learning_rate": Range(1e-3, 1.0, log=True), "b1": [0.0, 0.9]}
    with jax.enable_x64(True):
        sweep = adaopt.Sweep(adaopt.adam, loss_fn, eval_fn=eval_fn)
        result = sweep.optuna(space, _params(), _batches(), trials_per_round=4, rounds=2, seed=0, eval_every=EVERY)
        again = sweep.optuna(space, _params(), _batches(), trials_per_round=4, rounds=2, seed=0, eval_every=EVERY)
        assert sweep.compilations == {"init": 1, "chunk": 1}  # four rounds: one program
        # The same configurations, trained again by the same program outside Optuna, a round at a time.
        rounds = [{n: v[k : k + 4] for n, v in result.configs.items()} for k in (0, 4)]
        direct = [sweep.run(configs, _params(), _batches(), eval_every=EVERY) for configs in rounds]
    metrics = np.concatenate([r.metrics for r in direct])
    curves = np.concatenate([r.curves for r in direct])
    study = result.study
    assert [t.number for t in study.trials] == list(range(8))
    for i, trial in enumerate(study.trials):
        assert trial.params == result.config(i)
        assert trial.value == pytest.approx(metrics[i], rel=1e-12)
        assert trial.intermediate_values == pytest.approx(dict(zip(EVERY * np.arange(1, 4), curves[i], strict=True)))
    assert study.best_trial.params == result.best_config
    assert study.best_value == pytest.approx(result.best_metric, rel=1e-12)
    assert all(np.array_equal(result.configs[n], again.configs[n]) for n in space)  # seeded


def test_optuna_with_halving_prunes_and_a_user_study() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    with jax.enable_x64(True):
        result = adaopt.optuna_sweep(
            adaopt.sgd, {"learning_rate": Range(1e-3, 0.1, log=True)}, loss_fn, _params(), _batches(),
            eval_fn=lambda p: -eval_fn(p), mode="max", study=study, trials_per_round=4, rounds=1,
            eval_every=EVERY, halve_every=EVERY, lanes=2,
        )  # fmt: skip
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert states.count(optuna.trial.TrialState.PRUNED) == 3
    assert result.study is study and study.best_trial.number == result.best_index
    assert result.best_metric == pytest.approx(study.best_value) and result.best_metric < 0
    with pytest.raises(adaopt.HyperparameterError, match="direction is MAXIMIZE but mode='min'"):
        adaopt.Sweep(adaopt.sgd, loss_fn).optuna({"learning_rate": [0.1]}, _params(), _batches(), study=study)


# ---------------------------------------------------------------------------------------------
# Divergence, the result, bad input.


@functools.cache
def _diverging() -> adaopt.SweepResult:
    """float32: learning rates 1e6 and 1e4 overflow within 4 and 8 steps."""
    configs = {"learning_rate": [0.01, 1e6, 0.1, 1e4]}
    return adaopt.sweep(adaopt.sgd, configs, loss_fn, _params(), _batches(), eval_fn=eval_fn, eval_every=EVERY)


def test_diverging_trials_rank_last_and_the_sweep_goes_on() -> None:
    result = _diverging()
    np.testing.assert_array_equal(result.diverged, [False, True, False, True])
    assert not np.isfinite(result.curves[1]).any() and np.isfinite(result.curves[3, 0])
    assert list(result.order[:2]) == [2, 0] and set(result.order[2:].tolist()) == {1, 3}
    assert result.best_index == 2 and result.best_config == {"learning_rate": 0.1}
    lines = result.table().splitlines()
    assert lines[0].split() == ["rank", "trial", "learning_rate", "metric", "steps"]
    assert lines[1].split()[:3] == ["1", "2", "0.1"] and lines[-1].split()[3] == "diverged"


def test_a_survivor_that_diverges_later_leaves_the_best_to_a_stopped_trial() -> None:
    """lr 0.3 wins the first rung and diverges after step 20 (the loss's log turns NaN); lr 0.01, stopped at step
    10, is the best: its configuration, metric and parameters at step 10 (it ranked after the diverged one)."""
    loss = lambda p, step: jnp.sum(p**2) + jnp.where(step > 20, jnp.sum(jnp.log(p - 0.1)), 0.0)
    result = adaopt.sweep(
        adaopt.sgd, {"learning_rate": [0.01, 0.3]}, loss, jnp.ones(2), steps=40, eval_every=10, halve_every=10
    )
    np.testing.assert_array_equal(result.diverged, [False, True])
    np.testing.assert_array_equal(result.steps, [10, 40])
    assert result.order.tolist() == [0, 1] and result.best_config == {"learning_rate": 0.01}
    np.testing.assert_allclose(result.best_params, np.ones(2) * 0.98**10, rtol=1e-6)  # sgd on sum(p^2): p *= 1 - 2 lr


def test_the_ranking_of_a_result() -> None:
    """Finite before diverged, then the longest trained, then by metric (``mode``), then by trial index."""
    result = adaopt.SweepResult(
        configs={"x": np.arange(6.0)},
        curves=np.array([[1.0, 0.5], [1.0, 0.2], [0.1, np.nan], [1.0, 0.5], [1.0, np.inf], [0.3, np.nan]]),
        eval_steps=np.array([10, 20]),
        steps=np.array([20, 20, 10, 20, 20, 10]),
        diverged=np.array([False, False, False, False, True, False]),
    )
    assert result.order.tolist() == [1, 0, 3, 2, 5, 4]
    np.testing.assert_array_equal(result.metrics, [0.5, 0.2, 0.1, 0.5, np.inf, 0.3])
    flipped = dataclasses.replace(result, mode="max")
    assert flipped.order.tolist() == [0, 3, 1, 5, 2, 4] and flipped.best_config == {"x": 0.0}
    everything = dataclasses.replace(result, diverged=np.ones(6, bool))
    assert everything.best_index is None and everything.best_config is None and math.isnan(everything.best_metric)


def test_plot_draws_metric_and_curves() -> None:
    import matplotlib.pyplot as plt

    result = _diverging()
    ax = result.plot()
    assert ax.get_xlabel() == "learning_rate" and ax.get_xscale() == "log"
    assert len(ax.collections) == 3  # the trials, the diverged ones, the best circled
    ax = result.plot("curves")
    assert len(ax.lines) == 4 and ax.get_xlabel() == "step"
    plt.close("all")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"configs": {"lr": [0.1]}}, r"names 'lr', which is not an argument of adam: its numeric .*'learning_rate'"),
        ({"configs": {"mu_dtype": [1.0]}}, r"'mu_dtype', an option of adam .* Pass it in fixed="),
        ({"configs": {}}, r"configs must be a non-empty dict"),
        ({"configs": {"learning_rate": Range(0.1, 1.0)}}, r"a Range is a search space: .*random_configs"),
        ({"configs": {"learning_rate": [0.1, 0.2], "b1": [0.9]}}, r"lengths \{'learning_rate': 2, 'b1': 1\}"),
        ({"configs": {"learning_rate": 0.1}}, r"one per trial, got 0.1 \(a value shared by every trial goes in fixed="),
        ({"keep": 1.0}, r"keep must be a finite number in \(0.0, 1.0\), got 1.0"),
        ({"keep": 0}, r"keep must be a finite number in \(0.0, 1.0\), got 0"),
        ({"eval_every": 5}, r"eval_every must divide steps: got steps=12, eval_every=5"),
        ({"halve_every": 6, "eval_every": 4}, r"steps \[6\] of halve_every are not multiples of eval_every=4"),
        ({"steps": 13}, r"steps must be an integer in \[1, 12\], got 13"),
        ({"lanes": 0}, r"lanes must be an integer in \[1, "),
        # A trial's values are checked as the factory checks them (batched, they are traced and it cannot).
        (
            {"configs": {"learning_rate": [0.1, 0.1], "b1": [0.9, 1.5]}},
            r"trial 1 \(\{'learning_rate': 0.1, 'b1': 1.5\}\): b1 must be a finite number in \[0.0, 1.0\), got 1.5",
        ),
        ({"configs": {"learning_rate": [0.1, -0.1]}}, r"trial 1 .*learning_rate must be"),
        ({"seed": "abc"}, r"^seed must be an integer in \[0, 4294967295\], got 'abc'"),  # was accepted, unused
        ({"seed": 2.5}, r"^seed must be an integer in \[0, 4294967295\], got 2.5"),
    ],
)
def test_bad_run_arguments_are_refused_with_the_fix(kwargs: dict, message: str) -> None:
    args = {"configs": {"learning_rate": [0.1]}, **kwargs}
    with pytest.raises(adaopt.HyperparameterError, match=message):
        adaopt.Sweep(adaopt.adam, loss_fn).run(args.pop("configs"), _params(), _batches(), **args)


def test_steps_without_batches_and_a_numpy_halving_period() -> None:
    """Without batches, ``steps`` is checked before it makes the step numbers (it was checked against the 0 steps it
    made: "in [1, 0]"); ``halve_every`` takes a NumPy integer, as ``eval_every`` does."""
    sweep = adaopt.Sweep(adaopt.sgd, lambda p, step: jnp.sum((p["w"] - 1.0) ** 2) + 0.0 * step)
    with pytest.raises(adaopt.HyperparameterError, match=r"^steps must be an integer in \[1, 2147483647\], got 0"):
        sweep.run({"learning_rate": [0.1]}, _params(), None, steps=0)
    result = sweep.run({"learning_rate": [0.1, 0.01]}, _params(), None, steps=4, eval_every=2, halve_every=np.int64(2))
    assert sorted(result.steps.tolist()) == [2, 4]  # one trial stopped at the halving


def test_bad_ranges_are_refused_when_made() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"a Range needs finite low < high, got low=0.1, high=0.1"):
        Range(0.1, 0.1)
    with pytest.raises(adaopt.HyperparameterError, match=r"a Range needs finite low < high, got low=1.0, high=0.0"):
        Range(1.0, 0.0)
    with pytest.raises(adaopt.HyperparameterError, match=r"a log-uniform Range needs low > 0"):
        Range(0.0, 0.1, log=True)  # its draws would take the log of 0
    with pytest.raises(adaopt.HyperparameterError, match=r"^log must be True or False, got 'abc'"):
        Range(0.1, 1.0, log="abc")  # type: ignore[arg-type]  # was read for its truth


def test_a_range_takes_numpy_scalars_as_python_numbers() -> None:
    """NumPy scalars (read from an array) were refused as not finite numbers."""
    assert Range(np.float32(0.5), 1.0) == Range(0.5, 1.0)
    assert Range(np.int64(1), np.int64(10), log=np.bool_(True)) == Range(1, 10, log=True)
    assert type(Range(np.int64(1), 10).low) is int and type(Range(0.1, np.float64(1.0)).high) is float


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, r"space must be a non-empty dict"),
        ({"learning_rate": []}, r"at least one finite number"),
        ({"learning_rate": ["adam"]}, r"only numbers \(options such as dtypes, masks and flags go in fixed=\)"),
        (
            {"learning_rate": Range(1e-3, 1.0)},
            r"a grid needs its number of points, e.g. grid_configs\(space, points=5\)",
        ),
    ],
)
def test_bad_spaces_are_refused(space: dict, message: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=message):
        adaopt.grid_configs(space)


def test_bad_construction_is_refused() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"fixed names 'mask', which is not an argument of adamw"):
        adaopt.Sweep(adaopt.adamw, loss_fn, fixed={"mask": None})
    with pytest.raises(adaopt.HyperparameterError, match=r"mode must be one of \('min', 'max'\), got 'lowest'"):
        adaopt.Sweep(adaopt.adamw, loss_fn, mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match=r"'b1' is both swept \(configs\) and fixed"):
        adaopt.Sweep(adaopt.adamw, loss_fn, fixed={"b1": 0.9}).run({"b1": [0.5]}, _params(), _batches())
    with pytest.raises(adaopt.HyperparameterError, match=r"n must be an integer in \[1, "):
        adaopt.random_configs({"b1": [0.9]}, 0)


def test_bad_sweep_arguments_are_named_when_given() -> None:
    """Each failed with Python's own error (a dict() of a string, 'str' object is not callable, SeedSequence's) or,
    for search_space's learning rate, in grid_configs."""
    error = adaopt.HyperparameterError
    with pytest.raises(error, match=r"^spec must be a registry entry .*got None"):
        adaopt.search_space(None)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^spec must be a registry entry .*pass adaopt.REGISTRY\['adam'\]"):
        adaopt.search_space(adaopt.adam)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^space\['learning_rate'\] must be a Range or a list of numbers, got 'abc'"):
        adaopt.search_space(REGISTRY["adam"], learning_rate="abc")  # type: ignore[arg-type]
    for seed in ("abc", 2.5, [1, 2], -1):
        with pytest.raises(error, match=r"^seed must be an integer in \[0, 4294967295\]"):
            adaopt.random_configs({"b1": [0.9]}, 3, seed=seed)  # type: ignore[arg-type]
    space = {"b1": Range(0.0, 0.9)}
    np.testing.assert_array_equal(
        adaopt.random_configs(space, 3, seed=np.int64(3))["b1"], adaopt.random_configs(space, 3, seed=3)["b1"]
    )
    for fixed in ("abc", 0.5, [("b1", 0.9)]):
        with pytest.raises(error, match=r"^fixed must be a mapping of the factory's argument names"):
            adaopt.Sweep(adaopt.adam, loss_fn, fixed=fixed)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^schedule must be a function of the learning rate .*got 'abc'"):
        adaopt.Sweep(adaopt.adam, loss_fn, schedule="abc")  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^schedule must be a function of the learning rate .*got 0.5"):
        adaopt.sweep(adaopt.adam, {"learning_rate": [0.1]}, loss_fn, _params(), _batches(), schedule=0.5)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^fixed must be a mapping"):
        adaopt.optuna_sweep(adaopt.adam, {"learning_rate": [0.1]}, loss_fn, _params(), _batches(), fixed=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metric", "returned"),
    [(lambda p: p, "returned dict"), (lambda p: jnp.ones(2), r"shape \(2,\)"), (lambda p: "0.5", "returned str")],
)
def test_an_eval_fn_that_returns_no_scalar_is_named(metric: Any, returned: str) -> None:
    with pytest.raises(
        adaopt.HyperparameterError, match=rf"^eval_fn must return the metric, a real scalar .*{returned}"
    ):
        adaopt.sweep(adaopt.adam, {"learning_rate": [0.1]}, loss_fn, _params(), _batches(), eval_fn=metric)
