"""Prodigy against the authors' package ``prodigyopt`` (1.1.2), step for step, and against optax.contrib.

As tests/test_dadapt.py (whose problem and machinery this shares): 200 steps on a tree of several
leaves, gradients of a noisy quadratic at each side's own iterates (so that the distance estimate
grows by orders of magnitude), in float64 (relative error <= 1e-8) and float32 (<= 1e-4), with and
without masked weight decay, with a constant learning rate and a warmup-cosine schedule from 0,
for drawn hyperparameters (traced) and every option that changes the trajectory: decoupled and
coupled decay, bias correction, beta3, safeguard_warmup, d0, d_coef, growth_rate, slice_p and
the momentum-free step of b1 = 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import prodigyopt
import pytest
import torch

from adaopt import REGISTRY, ProdigyState, prodigy
from tests import parity, steps
from tests.parity import DECAY_MASK, STEPS, Case
from tests.test_dadapt import (
    CASE_IDS,
    CASES,
    Rates,
    check,
    draw,
    quadratic,
    run_ours,
    run_reference,
    seed_of,
    trajectories,
)

# ---- The reference runners, in tests/references.py's TORCH / OPTAX formats. ----


def _prodigy(groups: list[dict[str, Any]], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return prodigyopt.Prodigy(
        groups,
        lr=1.0,
        betas=(hp["b1"], hp["b2"]),
        beta3=hp.get("b3"),
        eps=hp["eps"],
        decouple=hp.get("decoupled_weight_decay", True),
        use_bias_correction=hp.get("bias_correction", False),
        safeguard_warmup=hp.get("safeguard_warmup", False),
        d0=hp.get("d0", 1e-6),
        d_coef=hp.get("d_coef", 1.0),
        growth_rate=hp.get("growth_rate", math.inf),
        slice_p=hp.get("slice_p", 1),
    )


TORCH: dict[str, parity.TorchFactory] = {"prodigyopt.Prodigy": _prodigy}
# The registry's arguments for optax's form (what a user reads there): bias-corrected.
OPTAX_REFERENCE = next(r for r in REGISTRY["prodigy"].references if r.name == "optax.contrib.prodigy")
OPTAX: dict[str, Callable[[Any, dict[str, Any], Any], optax.GradientTransformation]] = {
    "optax.contrib.prodigy": lambda lr, hp, mask: optax.contrib.prodigy(
        lr,
        (hp["b1"], hp["b2"]),
        hp.get("b3"),
        hp["eps"],
        estim_lr0=hp.get("d0", 1e-6),
        estim_lr_coef=hp.get("d_coef", 1.0),
        weight_decay=hp["weight_decay"],
        safeguard_warmup=hp.get("safeguard_warmup", False),
    ),
}


# ---- Prodigy against the package (and optax), hyperparameters traced. ----


def _decoupled(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """The package's defaults' shape: decoupled decay, beta3 = sqrt(b2); with d_coef and a growth cap."""
    return prodigy(
        lr["main"], hp["b1"], hp["b2"], None, hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK,
        d0=hp["d0"], d_coef=hp["d_coef"], growth_rate=hp["growth_rate"],
    )  # fmt: skip


def _coupled_corrected_no_momentum(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """Coupled decay, bias correction, beta3, and b1 = 0 as a Python number: the package's momentum-free step."""
    return prodigy(
        lr["main"], 0.0, hp["b2"], hp["b3"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK,
        decoupled_weight_decay=False, bias_correction=True, d0=hp["d0"],
    )  # fmt: skip


def _safeguarded_sliced(lr: Rates, hp: dict) -> optax.GradientTransformation:
    """safeguard_warmup is meant for a warmup to 1: below, its estimate may stall near d0 (and prove nothing)."""
    return prodigy(
        lr["unit"], hp["b1"], hp["b2"], hp["b3"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK,
        safeguard_warmup=True, d0=hp["d0"], slice_p=3,
    )  # fmt: skip


def _unmasked_corrected(lr: Rates, hp: dict) -> optax.GradientTransformation:
    return prodigy(
        lr["steady"], hp["b1"], hp["b2"], hp["b3"], hp["eps"], hp["optax_weight_decay"], safeguard_warmup=True,
        d0=hp["d0"], d_coef=hp["d_coef"], **OPTAX_REFERENCE.kwargs,
    )  # fmt: skip


def _optax_prodigy(lr: Rates, hp: dict) -> optax.GradientTransformation:
    return OPTAX["optax.contrib.prodigy"](
        lr["steady"], {**hp, "weight_decay": hp["optax_weight_decay"], "safeguard_warmup": True}, None
    )


BUILDERS = (_decoupled, _coupled_corrected_no_momentum, _safeguarded_sliced, _unmasked_corrected, _optax_prodigy)
RANGES = {
    "b1": (0.5, 0.95),
    "b2": (0.9, 0.9999),
    "b3": (0.9, 0.999),
    "eps": (1e-10, 1e-6),
    "d0": (1e-7, 1e-4),
    "d_coef": (0.5, 2.0),
    "growth_rate": (1.1, 1.5),
}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prodigy_matches_the_package(case: Case) -> None:
    """Every option that changes the trajectory, in one of the comparisons; every draw traced."""
    hp, rates = draw(case, seed_of("prodigy", case.label), **RANGES)
    # optax decays in one expression, the package (and adaopt) in two steps: in float32 the different
    # roundings of the first, tiny steps would grow through the estimate of d. Decay in float64 only.
    hp["optax_weight_decay"] = hp["weight_decay"] if case.dtype == np.float64 else 0.0
    problem = quadratic(case.dtype, seed_of("prodigy-problem", case.label))
    params, d0 = problem[0], hp["d0"]
    decoupled, coupled, sliced, unmasked, optax_prodigy = run_ours(BUILDERS, hp, rates, problem, case)

    main = rates["main"]
    base = {k: v for k, v in hp.items() if k not in ("b3", "d_coef", "growth_rate", "optax_weight_decay")}
    options = {**base, "d_coef": hp["d_coef"], "growth_rate": hp["growth_rate"]}
    theirs = run_reference(_prodigy, options, main, problem, case)
    check(decoupled, theirs, params, case, f"Prodigy(d_coef, growth_rate) {options}", d0)
    options = {**base, "b1": 0.0, "b3": hp["b3"], "decoupled_weight_decay": False, "bias_correction": True}
    theirs = run_reference(_prodigy, options, main, problem, case)
    what = f"Prodigy(betas=(0, b2), beta3, decouple=False, use_bias_correction) {options}"
    check(coupled, theirs, params, case, what, d0)
    options = {**base, "b3": hp["b3"], "safeguard_warmup": True, "slice_p": 3}
    theirs = run_reference(_prodigy, options, rates["unit"], problem, case)
    check(sliced, theirs, params, case, f"Prodigy(safeguard_warmup, slice_p=3) {options}", d0)
    # optax's Prodigy: bias-corrected, decay unmasked, and it never skips a step (a rate never 0).
    check(unmasked, (optax_prodigy, math.inf), params, case, f"optax.contrib.prodigy {hp}", d0)


def test_the_comparison_detects_a_wrong_d_coef() -> None:
    case = CASES[0]
    hp, rates = draw(case, 0, **RANGES)
    problem = quadratic(case.dtype, 1)
    hp["optax_weight_decay"] = 0.0
    ours = run_ours(BUILDERS, {**hp, "d_coef": hp["d_coef"] * (1 + 1e-6)}, rates, problem, case)[0]
    theirs, _ = run_reference(_prodigy, hp, rates["main"], problem, case)
    assert parity.relative_error(ours, theirs) > 1e-7


@functools.cache
def _defaults_run() -> Callable[..., Any]:
    return jax.jit(lambda problem: trajectories([prodigy()], problem))


def test_defaults_match_the_package() -> None:
    """Every default a Python number (their static code paths), and the final estimate d of each side."""
    case = Case(False, False, np.float64)
    problem = quadratic(case.dtype, 3)
    with jax.enable_x64(True):
        (ours,), (state,) = _defaults_run()(problem)
    theirs = run_reference(lambda groups, hp: prodigyopt.Prodigy(groups), {}, np.ones(STEPS), problem, case)
    check(jax.tree.map(np.asarray, ours), theirs, problem[0], case, "prodigyopt.Prodigy()", 1e-6)
    np.testing.assert_allclose(float(_core(state).d), theirs[1], rtol=1e-8)


# ---- Semantics, dtypes, jit, validation, convergence. ----


def _core(state: Any) -> ProdigyState:
    return next(s for s in state if isinstance(s, ProdigyState))


OPTIMIZERS = {
    "prodigy": functools.partial(prodigy, weight_decay=0.01),
    "prodigy_coupled_no_momentum": functools.partial(prodigy, b1=0.0, weight_decay=0.01, decoupled_weight_decay=False),
    "prodigy_sliced": functools.partial(prodigy, slice_p=2, safeguard_warmup=True),
}


def test_jit_compiles_once() -> None:
    """Every variant in one step function: traced once over three steps, and moving."""
    steps.assert_all_compile_once_and_move([make() for make in OPTIMIZERS.values()])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_half_precision_zero_gradient_is_finite(dtype: Any) -> None:
    """A zero first gradient, then ones: finite updates in the parameters' dtype, float32 states."""
    for state in steps.half_precision_two_steps([make() for make in OPTIMIZERS.values()], dtype):
        core = _core(state)
        assert core.d.dtype == jnp.float32 and float(core.d) > 0
        for x in jax.tree.leaves((core.mu, core.nu, core.s, core.p0)):
            assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))


def test_a_zero_gradient_first_step_and_a_zero_learning_rate_are_skipped() -> None:
    """The update is zero and d, its numerator and the step counter stay (the schedule's count moves on)."""
    params = steps.mixed_tree()
    ones = jax.tree.map(jnp.ones_like, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = prodigy(learning_rate=lambda count: jnp.where(count == 2, 0.0, 1.0))

    @jax.jit
    def three_updates(p: dict) -> list:
        state = tx.init(p)
        out = []
        for grads in (zeros, ones, ones):  # no gradient yet; a step; a step at learning rate 0
            updates, new = tx.update(grads, state, p)
            out.append((state, updates, new))
            state = new
        return out

    (before, u0, after0), (_, u1, _), (before2, u2, after2) = three_updates(params)
    for updates in (u0, u2):
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    assert float(jnp.max(jnp.abs(u1["w"]))) > 0
    for b, a in ((before, after0), (before2, after2)):
        b, a = _core(b), _core(a)
        assert int(a.count) == int(b.count) + 1 and int(a.step) == int(b.step)
        assert float(a.d) == float(b.d) and float(a.numerator) == float(b.numerator)
    core = _core(after2)
    for a, b in zip(jax.tree.leaves(core[2:]), jax.tree.leaves(_core(before2)[2:]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a zero learning rate touches nothing


def test_an_overflowing_estimate_leaves_d_as_the_package_does() -> None:
    """A noisy quadratic at 1e6 that the default Prodigy (decoupled decay on ``w``) drives to 1e297 in 117 steps: there
    the estimate's sums overflow (inf / inf: d_hat is NaN) and the package's Python max keeps d; so does adaopt, where
    jnp.maximum made d NaN three steps before the package's parameters overflowed. float64, 125 steps."""
    steps, rng = 125, np.random.default_rng(91)
    shapes = {"w": (8, 6), "b": (6,), "s": ()}
    start = {k: rng.normal(size=v) * 1e6 for k, v in shapes.items()}
    curvature = {k: rng.uniform(0.5, 2.0, size=v) for k, v in shapes.items()}
    centre = {k: rng.normal(size=v) * 1e6 for k, v in shapes.items()}
    noise = {k: rng.normal(size=(steps, *v)) * 1e6 for k, v in shapes.items()}
    gradient = lambda k, x, t: curvature[k] * (x - centre[k]) + noise[k][t]
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    decayed, plain = [theirs["w"]], [theirs["b"], theirs["s"]]
    package = prodigyopt.Prodigy(
        [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}], lr=1.0
    )
    tx = prodigy(1.0, weight_decay=0.1, weight_decay_mask={"w": True, "b": False, "s": False})
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in start.items()}
        step, state = jax.jit(tx.update), tx.init(params)
        for t in range(steps):
            updates, state = step({k: gradient(k, x, t) for k, x in params.items()}, state, params)
            params = optax.apply_updates(params, updates)
            for k, x in theirs.items():
                x.grad = torch.tensor(gradient(k, x.detach().numpy(), t))
            package.step()
            assert float(_core(state).d) == pytest.approx(package.param_groups[0]["d"], rel=1e-12), f"step {t}"
        for k, x in theirs.items():
            np.testing.assert_allclose(np.asarray(params[k]), x.detach().numpy(), rtol=1e-12, equal_nan=True)
        assert np.isnan(theirs["w"].detach().numpy()).any()  # the run diverged, on both sides


def test_an_injected_zero_b1_takes_the_momentum_free_step() -> None:
    """b1 = 0 as an array (inject_hyperparams) follows the package's ``betas[0] == 0`` step, as a Python 0 does."""
    problem = quadratic(np.float32, 5)
    txs = [prodigy(b1=0.0), prodigy(b1=jnp.asarray(0.0)), prodigy(b1=1e-30)]
    (static, injected, tiny), _ = jax.jit(lambda pr: trajectories(txs, pr))(problem)
    for k in static:
        np.testing.assert_array_equal(np.asarray(static[k]), np.asarray(injected[k]))
    # b1 -> 0 is not the same step: the momentum's d is the previous one.
    assert parity.relative_error(jax.tree.map(np.asarray, tiny), jax.tree.map(np.asarray, static)) > 1e-6


def test_state_mirrors_the_parameters_and_keeps_the_initial_point() -> None:
    params = steps.mixed_tree()
    state = _core(prodigy().init(params))
    for tree in (state.mu, state.nu, state.s, state.p0):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True))
    np.testing.assert_array_equal(np.asarray(state.p0["w"]), np.asarray(params["w"]))
    # b1 = 0 keeps the first moment too: the structure does not depend on the value.
    assert jax.tree.structure(_core(prodigy(b1=0.0).init(params))) == jax.tree.structure(state)
    sliced = _core(prodigy(slice_p=4).init(params))
    assert sliced.s["w"].shape == sliced.p0["w"].shape == (2,)  # every 4th of 6 entries
    assert sliced.s["s"].shape == (1,)
    np.testing.assert_array_equal(np.asarray(sliced.p0["w"]), np.asarray(params["w"]).ravel()[::4])


def test_state_scalars_are_in_the_widest_parameter_dtype() -> None:
    with jax.enable_x64(True):
        core = _core(prodigy().init({"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.float64)}))
        assert core.d.dtype == core.d_max.dtype == core.numerator.dtype == jnp.float64
        assert core.p0["a"].dtype == jnp.float32 and core.p0["b"].dtype == jnp.float64


def test_params_are_required() -> None:
    tx = prodigy()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(steps.mixed_tree(), tx.init(steps.mixed_tree()))


BAD = [
    ("learning_rate", -1.0),
    ("b1", 1.0),
    ("b2", 1.5),
    ("b3", -0.1),
    ("eps", 0.0),
    ("weight_decay", -1e-3),
    ("d0", 0.0),
    ("d_coef", 0.0),
    ("d_coef", math.inf),
    ("growth_rate", 0.9),
    ("growth_rate", -math.inf),
    ("slice_p", 0),
    ("slice_p", 2.0),
    ("nu_dtype", jnp.int8),
]


@pytest.mark.parametrize(("name", "bad"), BAD, ids=[f"{n}-{b!r}" for n, b in BAD])
def test_bad_hyperparameters_name_the_argument(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        prodigy(**{name: bad})


def test_infinite_growth_rate_is_valid() -> None:
    prodigy(growth_rate=math.inf)
    prodigy(growth_rate=np.float32("inf"))


def test_reduces_the_loss_of_a_least_squares_problem() -> None:
    """From d0 = 1e-6, with no learning rate to tune, 300 full-batch steps fit a linear model."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    y = x @ jnp.asarray(rng.normal(size=8), jnp.float32) + 0.1 * jnp.asarray(rng.normal(size=64), jnp.float32)
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    txs = [make() for make in OPTIMIZERS.values()]
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}

    @jax.jit
    def train(params: dict) -> list:
        out = []
        for tx in txs:

            def step(carry: tuple, _: None, tx: optax.GradientTransformation = tx) -> tuple[tuple, None]:
                p, s = carry
                u, s = tx.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, u), s), None

            out.append(jax.lax.scan(step, (params, tx.init(params)), None, length=300)[0])
        return out

    start = float(loss(params))
    for name, (final, state) in zip(OPTIMIZERS, train(params), strict=True):
        end = float(loss(final))
        assert end < 0.05 * start, f"{name}: loss {start:.3g} -> {end:.3g}"
        assert float(_core(state).d) > 1e-2, f"{name}: the distance estimate did not grow from d0"


def test_slice_p_is_a_static_argument_under_inject_hyperparams() -> None:
    params = steps.mixed_tree()
    grads = jax.tree.map(jnp.ones_like, params)
    injected = optax.inject_hyperparams(prodigy, static_args=("slice_p",))(slice_p=2)
    fixed = prodigy(slice_p=2)
    ours, theirs = jax.jit(lambda p: [tx.update(grads, tx.init(p), p)[0] for tx in (injected, fixed)])(params)
    np.testing.assert_allclose(np.asarray(ours["w"]), np.asarray(theirs["w"]), rtol=1e-4)  # float32 b2
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(lambda k: prodigy(slice_p=k))(2)
