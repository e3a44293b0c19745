"""D-Adapt Adam, SGD and AdaGrad against the authors' package ``dadaptation`` (3.2), step for step.

200 steps on a tree of several leaves, in float64 (relative error <= 1e-8) and float32 (<= 1e-4),
with and without weight decay (masked, through parameter groups), with a constant learning rate
and a warmup-cosine schedule that starts at 0 (a step the package skips), for drawn
hyperparameters and every option that changes the trajectory; and against
``optax.contrib.dadapt_adamw``.

The gradients are those of a real loss, a noisy quadratic ``0.5 * sum(h * (x - c)^2)`` plus fresh
unit noise each step, taken at each side's own iterates: D-Adaptation estimates the distance to a
solution, and fresh random gradients have none (the estimate then stays near ``d0``, or, around a
fixed mean, grows without bound). Every comparison checks that the estimate grew at least a
hundredfold, so that its update was exercised.

The adaopt side runs with its hyperparameters, learning rates and weight decay as traced arrays,
so that one compiled program serves every draw of a dtype; the comparison at the defaults, and
the registry's parity tests (fresh random gradients), run them as Python numbers.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import dadaptation
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from adaopt import (
    REGISTRY,
    DAdaptAdaGradState,
    DAdaptAdamState,
    DAdaptSGDState,
    dadapt_adagrad,
    dadapt_adam,
    dadapt_sgd,
)
from tests import parity, steps
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case

TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}
CASES = [
    Case(False, False, np.float64),
    Case(True, False, np.float64),
    Case(False, True, np.float64),
    Case(True, True, np.float64),
    Case(True, True, np.float32),
    Case(False, False, np.float32),
]
CASE_IDS = [c.label for c in CASES]


# ---- The reference runners, in tests/references.py's TORCH / OPTAX formats. ----


class DAdaptSGDSkippingZeroLr(dadaptation.DAdaptSGD):
    """``dadaptation.DAdaptSGD`` that skips a step whose learning rate is 0.

    The package raises there (``ZeroDivisionError`` at the first step, ``UnboundLocalError``
    later); skipping it is what its own ``sk_sq == 0`` early return intends, and what adaopt does.
    """

    def step(self, closure: Any = None) -> Any:
        if max(group["lr"] for group in self.param_groups) == 0:
            return None
        return super().step(closure)


def _core(state: Any) -> Any:
    """The D-Adaptation block's state inside an optimizer's chain."""
    return next(s for s in state if isinstance(s, (DAdaptAdamState, DAdaptSGDState, DAdaptAdaGradState)))


def _all_decayed(groups: list[dict[str, Any]], hp: dict[str, Any]) -> list[dict[str, Any]]:
    """One group decaying every tensor: DAdaptSGD applies the first group's weight_decay to all groups."""
    return [{"params": [p for g in groups for p in g["params"]], "weight_decay": hp["weight_decay"]}]


def _with_layer_scale(groups: list[dict[str, Any]], hp: dict[str, Any]) -> list[dict[str, Any]]:
    """The decayed group (or the only one) gets ``hp["layer_scale"]``, the other ``hp["layer_scale_plain"]``."""
    scales = (hp.get("layer_scale", 1.0), hp.get("layer_scale_plain", 1.0))
    return [{**g, "layer_scale": r} for g, r in zip(groups, scales, strict=False)]


def _dadapt_adam(groups: list[dict[str, Any]], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return dadaptation.DAdaptAdam(
        _with_layer_scale(groups, hp),
        lr=1.0,
        betas=(hp["b1"], hp["b2"]),
        eps=hp["eps"],
        decouple=hp.get("decoupled_weight_decay", False),
        use_bias_correction=hp.get("bias_correction", False),
        d0=hp.get("d0", 1e-6),
        growth_rate=hp.get("growth_rate", math.inf),
    )


TORCH: dict[str, parity.TorchFactory] = {
    "dadaptation.DAdaptAdam": _dadapt_adam,
    "dadaptation.DAdaptSGD": lambda groups, hp: DAdaptSGDSkippingZeroLr(
        _all_decayed(groups, hp),
        lr=1.0,
        momentum=hp["momentum"],
        d0=hp.get("d0", 1e-6),
        growth_rate=hp.get("growth_rate", math.inf),
    ),
    "dadaptation.DAdaptAdaGrad": lambda groups, hp: dadaptation.DAdaptAdaGrad(
        groups,
        lr=1.0,
        momentum=hp["momentum"],
        eps=hp["eps"],
        d0=hp.get("d0", 1e-6),
        growth_rate=hp.get("growth_rate", math.inf),
    ),
}
# The registry's arguments for optax's form (what a user reads there): bias-corrected, decay decoupled.
OPTAX_REFERENCE = next(r for r in REGISTRY["dadapt_adam"].references if r.name == "optax.contrib.dadapt_adamw")
OPTAX: dict[str, Callable[[Any, dict[str, Any], Any], optax.GradientTransformation]] = {
    "optax.contrib.dadapt_adamw": lambda lr, hp, mask: optax.contrib.dadapt_adamw(
        lr, (hp["b1"], hp["b2"]), hp["eps"], hp.get("d0", 1e-6), hp["weight_decay"]
    ),
}


# ---- The problem, and one compiled program per set of optimizers and dtype, for every draw. ----

Problem = tuple[dict, dict, dict, dict]  # start, curvature, minimiser, noise of each step
Rates = dict[str, Any]  # named learning-rate schedules: "main", "unit" (peak 1), "steady" (never 0)
Builder = Callable[[Rates, dict[str, Any]], optax.GradientTransformation]


def quadratic(dtype: type, seed: int) -> Problem:
    """A noisy quadratic ``0.5 * sum(h * (x - c)^2)``: start, curvature h, minimiser c, noise per step."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    curvature = {k: rng.uniform(0.5, 2.0, size=shape).astype(dtype) for k, shape in SHAPES.items()}
    target = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    noise = {k: rng.normal(size=(STEPS, *shape)).astype(dtype) for k, shape in SHAPES.items()}
    return params, curvature, target, noise


def _gradient(x: Any, h: Any, c: Any, e: Any) -> Any:
    return h * (x - c) + e


def trajectories(txs: list[optax.GradientTransformation], problem: Problem) -> tuple[list[dict], list[Any]]:
    """Each optimizer's iterates on the problem (gradients at its own iterates), and its final state."""
    params, curvature, target, noise = problem
    out, states = [], []
    for tx in txs:

        def step(carry: tuple, n: dict, tx: optax.GradientTransformation = tx) -> tuple[tuple, dict]:
            p, s = carry
            u, s = tx.update(jax.tree.map(_gradient, p, curvature, target, n), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, state), trajectory = jax.lax.scan(step, (params, tx.init(params)), noise)
        out.append(trajectory)
        states.append(state)
    return out, states


@functools.cache
def _compiled(builders: tuple[Builder, ...]) -> Callable[..., Any]:
    """A jitted ``(hp, rates, problem) -> ([trajectory], [final state])`` per builder, hyperparameters traced."""

    def run(hp: dict, rates: dict, problem: Problem) -> tuple[list[dict], list[Any]]:
        schedules = {name: (lambda count, r=r: r[count]) for name, r in rates.items()}
        return trajectories([build(schedules, hp) for build in builders], problem)

    return jax.jit(run)


def seed_of(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def draw(case: Case, seed: int, **ranges: tuple[float, float]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Hyperparameters (log-uniform where the range spans a decade or more, else uniform), a weight
    decay (0 when off), and learning rates: "main" (peak in [0.3, 1], a warmup-cosine schedule from 0
    for a schedule case), "unit" (the same, peak 1) and "steady" (1, or from 1 down to 0.2: never 0,
    for optax); all rounded to the case's dtype."""
    rng = np.random.default_rng(seed)
    hp = {}
    for k, (lo, hi) in ranges.items():
        u = float(rng.uniform())
        hp[k] = math.exp(math.log(lo) + u * math.log(hi / lo)) if lo > 0 and hi >= 10 * lo else lo + u * (hi - lo)
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0
    hp = {k: float(np.asarray(v, case.dtype)) for k, v in hp.items()}
    peak = float(np.exp(rng.uniform(np.log(0.3), np.log(1.0))))
    rates = {}
    for name, top in (("main", peak), ("unit", 1.0)):
        if case.schedule:
            schedule = optax.warmup_cosine_decay_schedule(
                0.0, top, warmup_steps=20, decay_steps=STEPS, end_value=top / 10
            )
            with jax.enable_x64(case.dtype == np.float64):
                rates[name] = np.asarray(jax.vmap(schedule)(jnp.arange(STEPS, dtype=case.dtype)))
        else:
            rates[name] = np.full(STEPS, top)
    rates["steady"] = np.linspace(1.0, 0.2, STEPS) if case.schedule else np.full(STEPS, 1.0)
    return hp, {name: r.astype(case.dtype) for name, r in rates.items()}


def run_ours(builders: tuple[Builder, ...], hp: dict, rates: dict, problem: Problem, case: Case) -> list:
    with jax.enable_x64(case.dtype == np.float64):
        traced = {k: jnp.asarray(v, case.dtype) for k, v in hp.items()}
        out, _ = _compiled(builders)(traced, rates, problem)
    return [jax.tree.map(np.asarray, o) for o in out]


def run_reference(
    make: parity.TorchFactory, hp: dict, rates: np.ndarray, problem: Problem, case: Case
) -> tuple[dict, float]:
    """The package's iterates on the problem, with parameter groups and learning rates set as
    ``tests.parity.run_torch`` sets them, and its final estimate d."""
    params, curvature, target, noise = problem
    names = sorted(params)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if case.dtype == np.float64 else torch.float32)
    try:
        tensors = {k: torch.tensor(params[k]) for k in names}
        if case.weight_decay:
            groups = [
                {"params": [tensors[k] for k in names if DECAY_MASK[k]], "weight_decay": hp["weight_decay"]},
                {"params": [tensors[k] for k in names if not DECAY_MASK[k]], "weight_decay": 0.0},
            ]
        else:
            groups = [{"params": [tensors[k] for k in names], "weight_decay": 0.0}]
        optimizer = make(groups, hp)
        theirs: dict[str, list] = {k: [] for k in names}
        for t in range(STEPS):
            for group in optimizer.param_groups:
                group["lr"] = float(rates[t])
            for k in names:
                x = tensors[k]
                x.grad = _gradient(x.detach(), *(torch.tensor(a) for a in (curvature[k], target[k], noise[k][t])))
            optimizer.step()
            for k in names:
                theirs[k].append(tensors[k].detach().numpy().copy())
        return {k: np.stack(v) for k, v in theirs.items()}, float(optimizer.param_groups[0]["d"])
    finally:
        torch.set_default_dtype(previous)


def check(ours: dict, reference: tuple[dict, float], params: dict, case: Case, what: str, d0: float) -> float:
    """Same dtype, a trajectory that moved, an estimate d that grew, and the relative error within tolerance."""
    theirs, d = reference
    for k in SHAPES:
        assert ours[k].dtype == case.dtype, f"{what}: {k} in {ours[k].dtype}, expected {case.dtype}"
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2, f"{what}: the reference barely moved ({moved:.2g}); the comparison would prove nothing"
    assert d > 100 * d0, f"{what}: the estimate d only grew from {d0:.3g} to {d:.3g}"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[case.dtype], f"{what}: relative error {error:.3g}"
    return error


# ---- D-Adapt Adam, SGD and AdaGrad against the package (and optax), hyperparameters traced. ----


def _layer_scale(hp: dict) -> dict:
    return {k: hp["layer_scale"] if DECAY_MASK[k] else hp["layer_scale_plain"] for k in SHAPES}


def _adam_coupled(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """Coupled decay, a growth cap and layer scales."""
    return dadapt_adam(
        lr["main"], hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK, d0=hp["d0"],
        growth_rate=hp["growth_rate"], layer_scale=_layer_scale(hp),
    )  # fmt: skip


def _adam_decoupled(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """Decoupled decay and bias correction."""
    return dadapt_adam(
        lr["main"], hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK,
        decoupled_weight_decay=True, bias_correction=True, d0=hp["d0"],
    )  # fmt: skip


def _sgd(lr: Rates, hp: dict) -> optax.GradientTransformation:
    return dadapt_sgd(lr["main"], hp["momentum"], hp["weight_decay"], d0=hp["d0"], growth_rate=hp["growth_rate"])


def _adagrad(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """At a peak learning rate of 1: below it, D-Adapt AdaGrad's estimate grows too slowly to be exercised."""
    return dadapt_adagrad(
        lr["unit"], hp["momentum"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK,
        d0=hp["adagrad_d0"], growth_rate=hp["adagrad_growth_rate"],
    )  # fmt: skip


def _adamw_unmasked(lr: Rates, hp: dict) -> optax.GradientTransformation:
    return dadapt_adam(
        lr["steady"], hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], d0=hp["d0"], **OPTAX_REFERENCE.kwargs
    )  # fmt: skip


def _optax_adamw(lr: Rates, hp: dict) -> optax.GradientTransformation:
    return OPTAX["optax.contrib.dadapt_adamw"](lr["steady"], hp, None)


BUILDERS = (_adam_coupled, _adam_decoupled, _sgd, _adagrad, _adamw_unmasked, _optax_adamw)
RANGES = {
    "b1": (0.5, 0.95),
    "b2": (0.9, 0.9999),
    "eps": (1e-10, 1e-6),
    "d0": (1e-7, 1e-4),
    "growth_rate": (1.1, 1.5),
    "adagrad_d0": (1e-4, 1e-3),  # D-Adapt AdaGrad's estimate grows slowly under a warmup: start it higher
    "adagrad_growth_rate": (1.2, 2.0),
    "momentum": (0.0, 0.9),
    "layer_scale": (0.5, 2.0),
    "layer_scale_plain": (0.5, 2.0),
}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dadapt_matches_the_package(case: Case) -> None:
    """Every option that changes the trajectory, in one of the comparisons; every draw traced."""
    hp, rates = draw(case, seed_of("dadapt", case.label), **RANGES)
    if not case.weight_decay:
        hp["layer_scale_plain"] = hp["layer_scale"]  # one parameter group: one layer scale
    problem = quadratic(case.dtype, seed_of("dadapt-problem", case.label))
    params, d0 = problem[0], hp["d0"]
    coupled, decoupled, sgd, adagrad, adamw, optax_adamw = run_ours(BUILDERS, hp, rates, problem, case)

    adam = TORCH["dadaptation.DAdaptAdam"]
    theirs = run_reference(adam, hp, rates["main"], problem, case)
    check(coupled, theirs, params, case, f"DAdaptAdam(growth_rate, layer_scale) {hp}", d0)
    plain = {k: v for k, v in hp.items() if k not in ("growth_rate", "layer_scale", "layer_scale_plain")}
    theirs = run_reference(
        adam, {**plain, "decoupled_weight_decay": True, "bias_correction": True}, rates["main"], problem, case
    )
    check(decoupled, theirs, params, case, f"DAdaptAdam(decouple, use_bias_correction) {plain}", d0)
    theirs = run_reference(TORCH["dadaptation.DAdaptSGD"], hp, rates["main"], problem, case)
    check(sgd, theirs, params, case, f"DAdaptSGD {hp}", d0)
    adagrad_hp = {**hp, "d0": hp["adagrad_d0"], "growth_rate": hp["adagrad_growth_rate"]}
    theirs = run_reference(TORCH["dadaptation.DAdaptAdaGrad"], adagrad_hp, rates["unit"], problem, case)
    check(adagrad, theirs, params, case, f"DAdaptAdaGrad {adagrad_hp}", adagrad_hp["d0"])
    # optax's D-Adapt AdamW: bias-corrected, decay unmasked, and it never skips a step (a rate never 0).
    check(adamw, (optax_adamw, math.inf), params, case, f"optax.contrib.dadapt_adamw {plain}", d0)


def test_the_comparison_detects_a_wrong_d0() -> None:
    case = CASES[0]
    hp, rates = draw(case, 0, **RANGES)
    hp["layer_scale_plain"] = hp["layer_scale"]
    problem = quadratic(case.dtype, 1)
    ours = run_ours(BUILDERS, {**hp, "d0": hp["d0"] * (1 + 1e-6)}, rates, problem, case)[0]
    theirs, _ = run_reference(TORCH["dadaptation.DAdaptAdam"], hp, rates["main"], problem, case)
    assert parity.relative_error(ours, theirs) > 1e-7


# ---- At the defaults, as Python numbers. ----


@functools.cache
def _defaults_run() -> Callable[..., Any]:
    return jax.jit(lambda problem: trajectories([dadapt_adam(), dadapt_sgd(), dadapt_adagrad()], problem))


def test_defaults_match_the_package() -> None:
    """Every default a Python number (their static code paths), and the final estimate d of each side."""
    case = Case(False, False, np.float64)
    problem = quadratic(case.dtype, 3)
    with jax.enable_x64(True):
        ours, states = _defaults_run()(problem)
    packages = (dadaptation.DAdaptAdam, dadaptation.DAdaptSGD, dadaptation.DAdaptAdaGrad)
    for package, trajectory, state in zip(packages, ours, states, strict=True):
        theirs = run_reference(lambda groups, hp, p=package: p(groups), {}, np.ones(STEPS), problem, case)
        check(jax.tree.map(np.asarray, trajectory), theirs, problem[0], case, package.__name__, 1e-6)
        np.testing.assert_allclose(float(_core(state).d), theirs[1], rtol=1e-8)


# ---- Semantics, dtypes, jit, validation, convergence. ----


OPTIMIZERS = {
    "dadapt_adam": dadapt_adam,
    "dadapt_adamw": functools.partial(dadapt_adam, weight_decay=0.01, decoupled_weight_decay=True),
    "dadapt_sgd": functools.partial(dadapt_sgd, momentum=0.9),
    "dadapt_adagrad": dadapt_adagrad,
}


def test_jit_compiles_once() -> None:
    """Every variant in one step function: traced once over three steps, and moving."""
    steps.assert_all_compile_once_and_move([make() for make in OPTIMIZERS.values()])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_half_precision_zero_gradient_is_finite(dtype: Any) -> None:
    """A zero first gradient, then ones: finite updates in the parameters' dtype, float32 states."""
    for state in steps.half_precision_two_steps([make() for make in OPTIMIZERS.values()], dtype):
        for x in jax.tree.leaves(state):
            if x.ndim and jnp.issubdtype(x.dtype, jnp.floating):  # a state mirroring the parameters
                assert x.dtype in (jnp.dtype(dtype), jnp.float32)
                assert bool(jnp.all(jnp.isfinite(x)))
        assert _core(state).d.dtype == jnp.float32


def test_a_zero_gradient_first_step_is_skipped() -> None:
    """No gradient yet, no estimate: the update is zero, and d and the step counter stay."""
    params = steps.mixed_tree()
    txs = [make() for make in OPTIMIZERS.values()]
    zeros = jax.tree.map(jnp.zeros_like, params)
    results = jax.jit(lambda p: [tx.update(zeros, tx.init(p), p) for tx in txs])(params)
    for name, (updates, state) in zip(OPTIMIZERS, results, strict=True):
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates)), name
        core = _core(state)
        assert np.float32(core.d) == np.float32(1e-6), name
        assert int(core.count) == 1 and int(getattr(core, "step", 0)) == 0, name


@pytest.mark.parametrize(
    "ours, package",
    [
        (lambda: dadapt_sgd(1.0), lambda params: dadaptation.DAdaptSGD(params, lr=1.0)),
        (lambda: dadapt_adagrad(1.0), lambda params: dadaptation.DAdaptAdaGrad(params, lr=1.0)),
    ],
    ids=["sgd", "adagrad"],
)
def test_an_overflowing_estimate_leaves_d_as_the_package_does(ours: Callable, package: Callable) -> None:
    """Two gradients of 1e200 overflow the estimate's sums (inf / inf: d_hat is NaN); the package's Python max keeps
    d, and so does adaopt, where jnp.maximum made d, and every step after, NaN. float64, 8 steps."""
    rng = np.random.default_rng(0)
    start, grads = rng.normal(size=(4, 3)), rng.normal(size=(8, 4, 3))
    grads[3:5] *= 1e200
    tx = ours()
    theirs = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = package([theirs])
    with jax.enable_x64(True):
        params, state = jnp.asarray(start, jnp.float64), tx.init(jnp.asarray(start, jnp.float64))
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, params)
            params = params + updates
            theirs.grad = torch.tensor(g)
            optimizer.step()
            np.testing.assert_allclose(np.asarray(params), theirs.detach().numpy(), rtol=1e-12, equal_nan=True)
        d = float(_core(state).d)
        assert np.isfinite(d) and d == optimizer.param_groups[0]["d"]


def test_a_zero_learning_rate_is_a_skipped_step_for_adam_and_sgd() -> None:
    """The whole state but the schedule's count stays; the update is zero."""
    params = steps.mixed_tree()
    grads = jax.tree.map(jnp.ones_like, params)
    txs = [make(learning_rate=lambda count: jnp.where(count == 1, 0.0, 1.0)) for make in (dadapt_adam, dadapt_sgd)]

    @jax.jit
    def two_steps(p: dict) -> list:
        out = []
        for tx in txs:
            _, state = tx.update(grads, tx.init(p), p)
            out.append((state, *tx.update(grads, state, p)))
        return out

    for before, updates, after in two_steps(params):
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
        after, before = _core(after), _core(before)
        assert int(after.count) == 2 and int(after.step) == int(before.step) == 1
        for a, b in zip(jax.tree.leaves(after[1:]), jax.tree.leaves(before[1:]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adagrad_moves_at_zero_learning_rate_as_the_package_does() -> None:
    """Dual averaging: the iterate is x0 - s / sqrt(alpha), and alpha takes every gradient."""
    grads = jax.tree.map(jnp.ones_like, steps.mixed_tree())
    tx = dadapt_adagrad(learning_rate=lambda count: jnp.where(count == 1, 0.0, 1.0))

    @jax.jit
    def second_update(params: dict) -> Any:
        updates, state = tx.update(grads, tx.init(params), params)
        return tx.update(grads, state, optax.apply_updates(params, updates))[0]

    assert float(jnp.max(jnp.abs(second_update(steps.mixed_tree())["w"]))) > 0


def test_layer_scale_accepts_a_function_of_the_parameters() -> None:
    params = steps.mixed_tree()
    grads = jax.tree.map(jnp.ones_like, params)
    fixed = dadapt_adam(layer_scale={"w": 2.0, "b": 0.5, "s": 1.0})
    by_fn = dadapt_adam(layer_scale=lambda p: {"w": 2.0, "b": 0.5, "s": 1.0})
    u1, _ = fixed.update(grads, fixed.init(params), params)
    u2, _ = by_fn.update(grads, by_fn.init(params), params)
    plain, _ = dadapt_adam().update(grads, dadapt_adam().init(params), params)
    np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))
    np.testing.assert_allclose(np.asarray(u1["w"]), 2 * np.asarray(plain["w"]), rtol=1e-6)


def test_state_scalars_are_in_the_widest_parameter_dtype() -> None:
    with jax.enable_x64(True):
        params = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.float64)}
        for make in (dadapt_adam, dadapt_sgd, dadapt_adagrad):
            core = _core(make().init(params))
            assert core.d.dtype == jnp.float64 and core.d.shape == ()
            assert core.s["a"].dtype == jnp.float32 and core.s["b"].dtype == jnp.float64


def test_params_are_required() -> None:
    params = steps.mixed_tree()
    for make in (
        dadapt_sgd,
        dadapt_adagrad,
        functools.partial(dadapt_adam, weight_decay=0.1, decoupled_weight_decay=True),
    ):
        tx = make()
        with pytest.raises(ValueError, match="needs the parameters"):
            tx.update(params, tx.init(params))


BAD = [
    (dadapt_adam, "learning_rate", -1.0),
    (dadapt_adam, "b1", 1.0),
    (dadapt_adam, "b2", -0.1),
    (dadapt_adam, "eps", 0.0),
    (dadapt_adam, "weight_decay", -1e-3),
    (dadapt_adam, "d0", 0.0),
    (dadapt_adam, "growth_rate", 0.5),
    (dadapt_adam, "growth_rate", math.nan),
    (dadapt_adam, "layer_scale", {"w": -1.0}),
    (dadapt_adam, "mu_dtype", jnp.int32),
    (dadapt_sgd, "momentum", 1.0),
    (dadapt_sgd, "d0", -1e-6),
    (dadapt_sgd, "learning_rate", math.inf),
    (dadapt_adagrad, "eps", -1e-6),
    (dadapt_adagrad, "momentum", -0.5),
    (dadapt_adagrad, "growth_rate", "fast"),
]


@pytest.mark.parametrize(("make", "name", "bad"), BAD, ids=[f"{m.__name__}-{n}-{b!r}" for m, n, b in BAD])
def test_bad_hyperparameters_name_the_argument(make: Callable[..., Any], name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        make(**{name: bad})


def test_infinite_growth_rate_is_valid() -> None:
    for make in (dadapt_adam, dadapt_sgd, dadapt_adagrad):
        make(growth_rate=math.inf)
        make(growth_rate=np.float64("inf"))
        make(growth_rate=1.0)


def _least_squares() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = x @ rng.normal(size=8).astype(np.float32) + 0.1 * rng.normal(size=64).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_reduces_the_loss_of_a_least_squares_problem() -> None:
    """From d0 = 1e-6, with no learning rate to tune, 300 full-batch steps fit a linear model."""
    x, y = _least_squares()
    txs = [make() for make in OPTIMIZERS.values()]
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}

    @jax.jit
    def train(params: dict) -> list:
        out = []
        for tx in txs:

            def step(carry: tuple, _: None, tx: optax.GradientTransformation = tx) -> tuple[tuple, None]:
                p, s = carry
                u, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
                return (optax.apply_updates(p, u), s), None

            out.append(jax.lax.scan(step, (params, tx.init(params)), None, length=300)[0])
        return out

    start = float(_loss(params, x, y))
    for name, (final, state) in zip(OPTIMIZERS, train(params), strict=True):
        end = float(_loss(final, x, y))
        assert end < 0.05 * start, f"{name}: loss {start:.3g} -> {end:.3g}"
        assert float(_core(state).d) > 1e-2, f"{name}: the distance estimate did not grow from d0"
