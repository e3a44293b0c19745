"""Schedule-Free SGD, AdamW and RAdam against the authors' package (schedulefree 1.4.1) and optax.contrib.

The package's parameters hold y (where gradients are taken) in train mode, and ``eval()`` swaps
in the averaged iterate x: the trajectory of adaopt's parameters is compared with the package's
train-mode parameters at every step, and ``schedule_free_eval_params`` with the package's
``eval()`` parameters at several steps (read without perturbing the package's trajectory).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import schedulefree
import torch

import adaopt
from adaopt import (
    HyperparameterError,
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_radam,
    schedule_free_sgd,
)
from tests import parity
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case

FACTORIES = {"sgd": schedule_free_sgd, "adamw": schedule_free_adamw, "radam": schedule_free_radam}
EVAL_AT = (0, 4, 5, 57, 123, STEPS - 1)  # 4 and 5: around the end of RAdam's silent phase (b2 >= 0.9)
CASES = [
    Case(False, False, np.float64),
    Case(True, False, np.float64),
    Case(False, True, np.float64),
    Case(True, True, np.float64),
    Case(True, True, np.float32),
    Case(False, False, np.float32),
]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}  # measured: ~2e-15 and ~1e-6

# --- The references, in tests/references.py's format -------------------------------------------


def _train_mode(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The package steps only in train mode; before the first step, train() moves nothing."""
    opt.train()
    return opt


def _betas(hp: dict) -> tuple[float, float]:
    return (hp["b1"], hp["b2"])


TORCH: dict[str, parity.TorchFactory] = {
    "schedulefree.SGDScheduleFree": lambda groups, hp: _train_mode(
        schedulefree.SGDScheduleFree(
            groups, lr=1.0, momentum=hp["momentum"], warmup_steps=hp.get("warmup_steps", 0), r=hp.get("r", 0.0),
            weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
    "schedulefree.SGDScheduleFreeReference": lambda groups, hp: _train_mode(
        schedulefree.SGDScheduleFreeReference(
            groups, lr=1.0, momentum=hp["momentum"], warmup_steps=hp.get("warmup_steps", 0), r=hp.get("r", 0.0),
            weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
    "schedulefree.AdamWScheduleFree": lambda groups, hp: _train_mode(
        schedulefree.AdamWScheduleFree(
            groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], warmup_steps=hp.get("warmup_steps", 0),
            r=hp.get("r", 0.0), weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
    "schedulefree.AdamWScheduleFreeReference": lambda groups, hp: _train_mode(
        schedulefree.AdamWScheduleFreeReference(
            groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], warmup_steps=hp.get("warmup_steps", 0),
            r=hp.get("r", 0.0), weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
    "schedulefree.AdamWScheduleFreePaper": lambda groups, hp: _train_mode(
        schedulefree.AdamWScheduleFreePaper(
            groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], warmup_steps=hp.get("warmup_steps", 0),
            r=hp.get("r", 0.0), weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
    "schedulefree.RAdamScheduleFree": lambda groups, hp: _train_mode(
        schedulefree.RAdamScheduleFree(
            groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], r=hp.get("r", 0.0),
            weight_lr_power=hp.get("weight_lr_power", 2.0), silent_sgd_phase=hp.get("silent_sgd_phase", True),
        )
    ),
}  # fmt: skip


# --- Drawing hyperparameters and running both sides ---------------------------------------------

# adaopt configurations: the factory, its fixed options, and the package's classes it must match.
CONFIGS: dict[str, tuple[Any, dict[str, Any], tuple[str, ...]]] = {
    "sgd": (schedule_free_sgd, {}, ("schedulefree.SGDScheduleFree", "schedulefree.SGDScheduleFreeReference")),
    "adamw": (schedule_free_adamw, {}, ("schedulefree.AdamWScheduleFree", "schedulefree.AdamWScheduleFreeReference")),
    "adamw-paper": (schedule_free_adamw, {"debias": "learning_rate"}, ("schedulefree.AdamWScheduleFreePaper",)),
    "radam": (schedule_free_radam, {}, ("schedulefree.RAdamScheduleFree",)),
    "radam-sgd-phase": (schedule_free_radam, {"silent_sgd_phase": False}, ("schedulefree.RAdamScheduleFree",)),
}


def _draw(config: str, case: Case, seed: int, *, warmup: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Random valid hyperparameters (adaopt's names) and the learning rate of each step."""
    rng = np.random.default_rng(seed)
    hp: dict[str, Any] = {
        "r": float(rng.uniform(0.0, 2.0)),
        "weight_lr_power": float(rng.uniform(0.0, 3.0)),
        "weight_decay": float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0,
    }
    if config == "sgd":
        hp["momentum"] = float(rng.uniform(0.5, 0.98))
        peak = float(np.exp(rng.uniform(np.log(0.03), np.log(0.5))))
    else:
        hp.update(
            b1=float(rng.uniform(0.5, 0.98)),
            b2=float(rng.uniform(0.9, 0.9999)),
            eps=float(np.exp(rng.uniform(np.log(1e-8), np.log(1e-3)))),
        )
        peak = float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-2))))
    if not config.startswith("radam") and warmup:
        hp["warmup_steps"] = int(rng.integers(0, 40))
    if case.schedule:  # from 0, so the first averaging weight is 0 (or 1 at weight_lr_power 0)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=20, decay_steps=STEPS, end_value=peak / 10
        )
        with jax.enable_x64(case.dtype == np.float64):
            rates = np.asarray(jax.vmap(schedule)(jnp.arange(STEPS, dtype=case.dtype)))
    else:
        rates = np.full(STEPS, peak, case.dtype)
    return hp, rates


def _data(case: Case, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed + 1)
    params = {k: rng.normal(size=shape).astype(case.dtype) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)).astype(case.dtype) for k, shape in SHAPES.items()}
    return params, grads


def _scan(tx: optax.GradientTransformation, eval_fn: Any, params: dict, grads: dict) -> tuple[dict, dict]:
    """The parameters and the evaluation parameters after each step."""

    def step(carry: tuple, g: dict) -> tuple[tuple, tuple]:
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), (p, eval_fn(s, p))

    return jax.lax.scan(step, (params, tx.init(params)), grads)[1]


def _run_with_eval(
    tx: optax.GradientTransformation, eval_fn: Any, params: dict, grads: dict, *, strict: bool = True
) -> tuple[dict, dict]:
    """:func:`_scan` compiled; adaopt runs under strict dtype promotion (optax.contrib's does not)."""
    with jax.numpy_dtype_promotion("strict" if strict else "standard"):
        out = jax.jit(functools.partial(_scan, tx, eval_fn))(params, grads)
    return jax.tree.map(np.asarray, out)


class _EvalRecorder:
    """Stands in for the package's optimizer in ``parity.run_torch``.

    After each step in EVAL_AT it reads the ``eval()`` parameters, goes back with ``train()``,
    checks that this restored the training parameters (up to rounding) and then copies them back
    exactly, so the trajectory is not perturbed.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.param_groups = opt.param_groups
        self.t = 0
        self.evals: dict[str, list[np.ndarray]] = {k: [] for k in SHAPES}
        self.restore_error = 0.0
        self.name = {shape: name for name, shape in SHAPES.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        if self.t in EVAL_AT:
            tensors = [p for group in self.param_groups for p in group["params"]]
            saved = [p.detach().clone() for p in tensors]
            self.opt.eval()
            for p in tensors:
                self.evals[self.name[tuple(p.shape)]].append(p.detach().numpy().copy())
            self.opt.train()
            for p, y in zip(tensors, saved, strict=True):
                scale = max(float(y.abs().max()), 1e-30)
                self.restore_error = max(self.restore_error, float((p - y).abs().max()) / scale)
                p.copy_(y)
        self.t += 1


def _run_package(name: str, hp: dict, rates: np.ndarray, params: dict, grads: dict, case: Case) -> tuple:
    """The package's train-mode trajectory, its eval() parameters at EVAL_AT, and train()'s restore error."""
    recorders: list[_EvalRecorder] = []

    def make(groups: list[dict], hp: dict) -> Any:
        recorders.append(_EvalRecorder(TORCH[name](groups, hp)))
        return recorders[0]

    trajectory = parity.run_torch(make, hp, lambda t: float(rates[t]), params, grads, case)
    evals = {k: np.stack(v) for k, v in recorders[0].evals.items()}
    return trajectory, evals, recorders[0].restore_error


def _moved(trajectory: dict, params: dict) -> float:
    return parity.relative_error(trajectory, {k: np.broadcast_to(params[k], v.shape) for k, v in trajectory.items()})


def _compare(config: str, case: Case, hp: dict, rates: np.ndarray, data: tuple, ours: dict, ours_eval: dict) -> None:
    """Our trajectory and eval parameters against every package class the configuration names."""
    for k in SHAPES:
        assert ours[k].dtype == case.dtype and ours_eval[k].dtype == case.dtype
    params, grads = data
    hp = {**hp, **CONFIGS[config][1]}
    for reference in CONFIGS[config][2]:
        theirs, theirs_eval, restore_error = _run_package(reference, hp, rates, params, grads, case)
        assert _moved(theirs, params) > 1e-3, "the reference barely moved; the comparison would prove nothing"
        assert restore_error <= (1e-12 if case.dtype == np.float64 else 1e-5), "the package's train() did not restore y"
        error = parity.relative_error(ours, theirs)
        eval_error = parity.relative_error({k: v[list(EVAL_AT)] for k, v in ours_eval.items()}, theirs_eval)
        assert error <= TOLERANCE[case.dtype], f"trajectory: relative error {error:.3g} vs {reference} with {hp}"
        assert eval_error <= TOLERANCE[case.dtype], f"eval params: error {eval_error:.3g} vs {reference} with {hp}"


# --- Parity with the package ---------------------------------------------------------------------

F64_DRAWS = [(case, seed) for case in CASES if case.dtype == np.float64 for seed in (0, 1)]


@pytest.mark.parametrize("config", ["sgd", "adamw", "radam"])
def test_float64_matches_the_package_trajectory_and_eval_params(config: str) -> None:
    """200 steps, 8 random draws (warmup, r, weight_lr_power, decay on and off, constant and
    scheduled learning rates), every step and the eval parameters at EVAL_AT.

    To compile once for all draws, the hyperparameters and the learning rates enter as float64
    arrays under ``vmap`` (exact in float64); with no decay, the decay is 0 (an exact no-op).
    """
    factory, fixed, _ = CONFIGS[config]
    draws = []
    for case, seed in F64_DRAWS:
        seed = zlib.crc32(f"{config}/{case.label}/{seed}".encode())
        draws.append((*_draw(config, case, seed), *_data(case, seed)))

    def run(hp: dict, rates: jax.Array, params: dict, grads: dict) -> tuple[dict, dict]:
        tx = factory(learning_rate=lambda count: rates[count], weight_decay_mask=DECAY_MASK, **hp, **fixed)
        return _scan(tx, schedule_free_eval_params, params, grads)

    batch = jax.tree.map(lambda *xs: np.stack(xs), *draws)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        ours, ours_eval = jax.tree.map(np.asarray, jax.jit(jax.vmap(run))(*batch))
        for i, (hp, rates, params, grads) in enumerate(draws):
            pick = lambda tree: {k: v[i] for k, v in tree.items()}
            _compare(config, F64_DRAWS[i][0], hp, rates, (params, grads), pick(ours), pick(ours_eval))
            if config == "radam":  # the silent phase: rho_t <= 4 for t <= 4 at b2 >= 0.9, > 4 at t = 5
                for k in SHAPES:
                    np.testing.assert_array_equal(ours[k][i, :4], np.broadcast_to(params[k], ours[k][i, :4].shape))
                    assert np.any(ours[k][i, 4] != params[k])


@pytest.mark.parametrize(
    ("config", "case"),
    [
        ("sgd", CASES[4]),
        ("adamw", CASES[4]),
        ("radam", CASES[4]),
        ("adamw-paper", CASES[3]),
        ("radam-sgd-phase", CASES[3]),
    ],
    ids=lambda x: x if isinstance(x, str) else x.label,
)
def test_matches_the_package_with_python_float_hyperparameters(config: str, case: Case) -> None:
    """One random draw with decay and a schedule: float32 for the three optimizers, float64 for the
    options (the paper's bias correction, RAdam's SGD phase)."""
    seed = zlib.crc32(f"{config}/{case.label}".encode())
    hp, rates = _draw(config, case, seed)
    params, grads = _data(case, seed)
    factory, fixed, _ = CONFIGS[config]
    with jax.enable_x64(case.dtype == np.float64):
        table = jnp.asarray(rates)
        tx = factory(learning_rate=lambda count: table[count], weight_decay_mask=DECAY_MASK, **hp, **fixed)
        ours, ours_eval = _run_with_eval(tx, schedule_free_eval_params, params, grads)
        _compare(config, case, hp, rates, (params, grads), ours, ours_eval)


# --- optax.contrib ------------------------------------------------------------------------------


def _run_all(runs: dict[str, tuple[optax.GradientTransformation, Any]], data: dict, *, strict: bool) -> dict:
    """Several ``(optimizer, eval function)`` runs on their ``(params, grads)``, in one compiled program."""
    with jax.numpy_dtype_promotion("strict" if strict else "standard"):
        out = jax.jit(lambda d: {k: _scan(*runs[k], *d[k]) for k in runs})(data)
    return jax.tree.map(np.asarray, out)


def test_optax_contrib_matches_with_a_constant_learning_rate_and_differs_under_warmup() -> None:
    """optax.contrib.schedule_free_{sgd,adamw} (decay on every leaf, r = 0), float64: the same
    trajectory and eval params with a constant learning rate.

    Under warmup they differ: optax's warmup is a schedule from 0 whose z step uses lr(k) and
    whose weights use lr(k + 1); the package's (and adaopt's) first step moves by
    -lr / warmup_steps * g, optax's by 0. The same offset separates them under any schedule.
    """
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    data: dict[str, Any] = {}
    ours_eval, theirs_eval = schedule_free_eval_params, optax.contrib.schedule_free_eval_params
    with jax.enable_x64(True):
        for opt in ("sgd", "adamw"):
            hp, rates = _draw(opt, CASES[1], zlib.crc32(f"optax/{opt}".encode()), warmup=False)
            hp["r"] = 0.0  # optax has no polynomial weighting
            lr, wlp, wd = float(rates[0]), hp["weight_lr_power"], hp["weight_decay"]
            data[opt] = _data(CASES[1], 7)
            ours[opt] = (FACTORIES[opt](lr, **hp), ours_eval)
            if opt == "sgd":
                theirs[opt] = (
                    optax.contrib.schedule_free_sgd(lr, b1=hp["momentum"], weight_decay=wd, weight_lr_power=wlp),
                    theirs_eval,
                )
            else:
                theirs[opt] = (
                    optax.contrib.schedule_free_adamw(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=wd, weight_lr_power=wlp),
                    theirs_eval,
                )  # fmt: skip
        params, grads = _data(CASES[0], 3)
        data["warmup"] = (params, {k: v[:20] for k, v in grads.items()})
        ours["warmup"] = (schedule_free_sgd(0.5, warmup_steps=10), ours_eval)
        theirs["warmup"] = (optax.contrib.schedule_free_sgd(0.5, warmup_steps=10), theirs_eval)
        ours, theirs = _run_all(ours, data, strict=True), _run_all(theirs, data, strict=False)
    for opt in ("sgd", "adamw"):
        assert _moved(theirs[opt][0], data[opt][0]) > 1e-3
        assert parity.relative_error(ours[opt][0], theirs[opt][0]) <= TOLERANCE[np.float64], opt
        assert parity.relative_error(ours[opt][1], theirs[opt][1]) <= TOLERANCE[np.float64], opt
    for k in SHAPES:
        np.testing.assert_allclose(ours["warmup"][0][k][0], params[k] - 0.05 * grads[k][0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(theirs["warmup"][0][k][0], params[k], rtol=1e-15)  # optax's first step: 0
    assert parity.relative_error(theirs["warmup"][0], ours["warmup"][0]) > 1e-2


# --- The contract: jit, dtypes, validation, the state, evaluation parameters --------------------


def _params(dtype: Any = jnp.float32) -> dict:
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=3), dtype)}


def _loss(params: dict) -> jax.Array:
    return jnp.sum(jnp.tanh(jnp.ones(4) @ params["w"] + params["b"]) ** 2) + 0.1 * jnp.sum(params["w"] ** 2)


@pytest.mark.parametrize("opt", list(FACTORIES))
def test_jit_compiles_once(opt: str) -> None:
    options = {"silent_sgd_phase": False} if opt == "radam" else {}
    tx = FACTORIES[opt](learning_rate=0.05, weight_decay=0.01, **options)
    traces = 0

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = _params(), tx.init(_params())
    for _ in range(3):
        params, state = step(params, state)
    assert traces == 1
    assert float(jnp.max(jnp.abs(params["w"] - _params()["w"]))) > 0


def test_half_precision_zero_gradient_gives_finite_updates() -> None:
    """float16 and bfloat16, six zero gradients (past RAdam's silent phase), in one compiled run."""
    dtypes = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
    txs = {name: factory(learning_rate=1e-2, weight_decay=0.01) for name, factory in FACTORIES.items()}

    def run(params: dict, tx: optax.GradientTransformation) -> tuple:
        state = tx.init(params)
        assert state[-1].log_weight_sum.dtype == jnp.float32 and state[-1].z["w"].dtype == jnp.float32

        def step(carry: tuple, _: None) -> tuple[tuple, dict]:
            p, state = carry
            updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
            return (optax.apply_updates(p, updates), state), updates

        (p, state), updates = jax.lax.scan(step, (params, state), None, length=6)
        return updates, p, schedule_free_eval_params(state, p)

    params = {d: _params(dtype) for d, dtype in dtypes.items()}
    with jax.numpy_dtype_promotion("strict"):
        out = jax.jit(lambda ps: {(d, n): run(ps[d], tx) for d in dtypes for n, tx in txs.items()})(params)
    for (d, name), trees in out.items():
        for x in jax.tree.leaves(trees):
            assert x.dtype == jnp.dtype(dtypes[d]) and bool(jnp.all(jnp.isfinite(x))), (d, name)


def test_state_scalars_are_in_the_widest_float_dtype() -> None:
    with jax.enable_x64(True):
        params = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(3, jnp.float64)}
        state = schedule_free_adamw().init(params)[-1]
        assert isinstance(state, ScheduleFreeState)
        assert state.log_weight_sum.dtype == state.lr_max.dtype == state.b1.dtype == jnp.float64
        assert state.count.dtype == jnp.int32 and state.log_weight_sum.shape == ()
        assert float(state.lr_max) == -1.0 and float(state.log_weight_sum) == -np.inf
        assert state.z["a"].dtype == jnp.float32 and state.z["b"].dtype == jnp.float64
    tx = schedule_free_sgd()
    state = tx.init({})
    assert state[-1].log_weight_sum.dtype == jnp.float32  # an empty tree: float32 scalars
    assert tx.update({}, state, {})[0] == {}


BAD = [
    (schedule_free_sgd, "momentum", 0.0),
    (schedule_free_sgd, "momentum", 1.0),
    (schedule_free_sgd, "learning_rate", -1.0),
    (schedule_free_sgd, "weight_decay", -0.1),
    (schedule_free_sgd, "warmup_steps", -1),
    (schedule_free_sgd, "warmup_steps", 2.5),
    (schedule_free_sgd, "r", -1.0),
    (schedule_free_sgd, "weight_lr_power", float("nan")),
    (schedule_free_sgd, "z_dtype", jnp.int32),
    (schedule_free_adamw, "b1", 0.0),
    (schedule_free_adamw, "b1", 1.5),
    (schedule_free_adamw, "b2", 1.0),
    (schedule_free_adamw, "eps", -1e-8),
    (schedule_free_adamw, "debias", "never"),
    (schedule_free_adamw, "nu_dtype", jnp.int8),
    (schedule_free_radam, "b1", 1.0),
    (schedule_free_radam, "b2", -0.5),
    (schedule_free_radam, "b2", 0.6),  # rho_t <= 4 forever: the silent phase would never end
    (schedule_free_radam, "learning_rate", float("inf")),
    (schedule_free_radam, "weight_lr_power", -2.0),
]


@pytest.mark.parametrize(("factory", "name", "bad"), BAD, ids=[f"{f.__name__}-{n}-{b!r}" for f, n, b in BAD])
def test_bad_hyperparameters_are_rejected(factory: Any, name: str, bad: Any) -> None:
    with pytest.raises(HyperparameterError, match=name):
        factory(**{name: bad})


def test_a_low_b2_is_allowed_without_the_silent_phase() -> None:
    schedule_free_radam(b2=0.5, silent_sgd_phase=False)


def test_update_needs_the_parameters() -> None:
    tx = schedule_free_sgd()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(_params(), tx.init(_params()))


def test_eval_params_through_optax_wrappers() -> None:
    """The helper finds the state inside inject_hyperparams, MultiSteps and chains."""
    params = _params()
    wrapped = [
        adaopt.inject_hyperparams(schedule_free_adamw)(learning_rate=0.01),
        optax.MultiSteps(schedule_free_sgd(0.1), every_k_schedule=1),
        optax.chain(optax.clip_by_global_norm(1.0), schedule_free_radam(0.01, silent_sgd_phase=False)),
    ]

    @jax.jit
    def run() -> list:
        out = []
        for tx in wrapped:
            p, state = params, tx.init(params)
            xs, ys = [schedule_free_eval_params(state, p)], [p]
            for _ in range(3):
                updates, state = tx.update(jax.grad(_loss)(p), state, p)
                p = optax.apply_updates(p, updates)
                xs.append(schedule_free_eval_params(state, p))
                ys.append(p)
            out.append((xs, ys))
        return out

    for xs, ys in run():
        # x_0 = y_0; the first step sets y = x = z (c_1 = 1); then the average x lags z, and y lies between.
        np.testing.assert_allclose(xs[0]["w"], ys[0]["w"], rtol=1e-6)
        np.testing.assert_allclose(xs[1]["w"], ys[1]["w"], rtol=1e-6)
        assert not np.allclose(xs[3]["w"], ys[3]["w"])
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        schedule_free_eval_params(optax.adam(1e-3).init(params), params)


def test_eval_params_of_parameter_groups() -> None:
    """Under param_groups (optax.partition) each group keeps its own ScheduleFreeState: each leaf is averaged by the
    state that trains it, with its b1, as each group's optimizer run alone gives; a frozen group's x is its y."""
    params = {**_params(), "frozen": jnp.arange(3.0)}
    groups = [adaopt.Group("b", learning_rate=0.003, b1=0.5), adaopt.Group("frozen", optimizer=optax.set_to_zero())]
    tx = adaopt.param_groups(schedule_free_adamw, groups, learning_rate=0.01)
    alone = {"w": schedule_free_adamw(0.01), "b": schedule_free_adamw(0.003, b1=0.5)}
    state = tx.init(params)
    states = {k: opt.init(params[k]) for k, opt in alone.items()}
    for _ in range(4):
        grads = jax.grad(lambda p: _loss(p) + jnp.sum(p["frozen"] ** 2))(params)
        updates, state = tx.update(grads, state, params)
        for k, opt in alone.items():
            step, states[k] = opt.update(grads[k], states[k], params[k])
            np.testing.assert_array_equal(updates[k], step)
        params = optax.apply_updates(params, updates)
    x = schedule_free_eval_params(state, params)
    for k in alone:
        np.testing.assert_array_equal(x[k], schedule_free_eval_params(states[k], params[k]))
        assert not np.allclose(x[k], params[k])
    np.testing.assert_array_equal(x["frozen"], params["frozen"])
    # Two states that claim one leaf are refused.
    with pytest.raises(ValueError, match="both train leaf"):
        schedule_free_eval_params((state, schedule_free_adamw(0.01).init(params)), params)
    # One Schedule-Free group beside a frozen one: a single state holding optax.MaskedNode.
    tx = adaopt.param_groups(schedule_free_adamw, [adaopt.Group("frozen", optimizer=optax.set_to_zero())])
    alone, trained = schedule_free_adamw(), {k: params[k] for k in ("w", "b")}
    grads = jax.grad(_loss)(trained)
    updates, state = tx.update({**grads, "frozen": params["frozen"]}, tx.init(params), params)
    _, alone_state = alone.update(grads, alone.init(trained), trained)
    moved = optax.apply_updates(params, updates)
    x = schedule_free_eval_params(state, moved)
    np.testing.assert_array_equal(x["frozen"], params["frozen"])
    expected = schedule_free_eval_params(alone_state, {k: moved[k] for k in trained})
    for k in trained:
        np.testing.assert_array_equal(x[k], expected[k])


def test_a_high_polynomial_weighting_stays_finite_in_float32() -> None:
    """r = 10: the weights' sum W_t grows as t^11, past float32's range by step 7,000 (NaN from there on, where
    the package sums in float64); the state keeps log W_t, and float32 follows float64's average."""

    def run(dtype: Any) -> tuple[jax.Array, jax.Array]:
        tx = schedule_free_sgd(0.05, r=10.0)
        params = jnp.asarray([2.0, -1.0], dtype)

        def step(carry: tuple, _: Any) -> tuple[tuple, None]:
            p, state = carry
            updates, state = tx.update(p - 0.5, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, state), _ = jax.lax.scan(step, (params, tx.init(params)), length=8000)
        return p, schedule_free_eval_params(state, p)

    y32, x32 = jax.jit(lambda: run(jnp.float32))()
    with jax.enable_x64(True):
        y64, x64 = jax.jit(lambda: run(jnp.float64))()
    assert bool(jnp.all(jnp.isfinite(x32)))
    np.testing.assert_allclose(np.asarray(x32), np.asarray(x64), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y32), np.asarray(y64), rtol=1e-4)


def test_zero_learning_rate_still_moves_y_toward_the_average() -> None:
    """The package's weights use the largest learning rate so far: with lr 0, z stays and y moves to x."""
    tx = adaopt.inject_hyperparams(schedule_free_sgd)(learning_rate=0.1)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
    params = _params()
    state = tx.init(params)
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, new_state = step(params, state)
    z, c = state.inner_state[-1].z, 1 / 4  # constant weights: c_4 = 1/4
    np.testing.assert_array_equal(new_state.inner_state[-1].z["w"], z["w"])
    np.testing.assert_allclose(updates["w"], c * (z["w"] - params["w"]), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(updates["w"]))) > 1e-3


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32), y


def test_reduces_the_loss_of_logistic_regression() -> None:
    """Digits, full batch, 300 steps: the loss at the evaluation parameters falls well below its start."""
    txs = {
        "sgd": schedule_free_sgd(1.0, weight_decay=1e-4),
        "adamw": schedule_free_adamw(1e-2, weight_decay=1e-4),
        "radam": schedule_free_radam(3e-2, weight_decay=1e-4),  # rectification < 1 for hundreds of steps
    }

    def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y).mean()

    def train(tx: optax.GradientTransformation, x: jax.Array, y: jax.Array) -> jax.Array:
        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
            return (optax.apply_updates(params, updates), state), None

        params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
        (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
        return loss(schedule_free_eval_params(state, params), x, y)

    x, y = (jnp.asarray(a) for a in _digits())
    zeros = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    start, finals = jax.jit(lambda x, y: (loss(zeros, x, y), {name: train(tx, x, y) for name, tx in txs.items()}))(x, y)
    for name, final in finals.items():
        assert float(final) < 0.15 < float(start) / 10, f"{name}: loss {float(start):.3f} -> {float(final):.3f}"


def test_hypergradients_through_steps_at_a_learning_rate_of_0() -> None:
    """d(loss after some steps)/d(weight_lr_power, r) through steps taken at a rate of 0 (RAdam's silent phase, a
    warmup from 0) agrees with finite differences: a -inf log weight in a product or in logaddexp made it NaN."""

    def loss(w: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(w @ jnp.asarray([1.0, -0.5, 0.3], w.dtype)) ** 2)

    warmup = optax.linear_schedule(0.0, 1e-2, 5)
    makers = {
        "radam": (lambda power, r: adaopt.schedule_free_radam(1e-2, weight_lr_power=power, r=r), 8),
        "adamw, warmup from 0": (lambda power, r: adaopt.schedule_free_adamw(warmup, weight_lr_power=power, r=r), 4),
    }
    with jax.enable_x64(True):
        w0 = jnp.asarray([[0.3, -0.2, 0.7], [0.1, 0.4, -0.6]], jnp.float64)
        for name, (make, steps) in makers.items():

            @jax.jit
            def loss_after(v: jax.Array, make: Any = make, steps: int = steps) -> jax.Array:
                tx, w = make(v[0], v[1]), w0
                state = tx.init(w)
                for _ in range(steps):
                    updates, state = tx.update(jax.grad(loss)(w), state, w)
                    w = optax.apply_updates(w, updates)
                return loss(w)

            v, h = jnp.asarray([2.0, 1.5], jnp.float64), 1e-6
            grad = np.asarray(jax.grad(loss_after)(v))
            numeric = [(loss_after(v + h * e) - loss_after(v - h * e)) / (2 * h) for e in np.eye(2)]
            assert np.all(np.isfinite(grad)), name
            np.testing.assert_allclose(grad, np.asarray(numeric, np.float64), rtol=1e-5, err_msg=name)
