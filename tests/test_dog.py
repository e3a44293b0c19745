"""DoG, LDoG, DoWG and polynomial-decay averaging against their references, step for step.

References: the authors' package ``dog-optimizer`` (``dog.DoG``, ``dog.LDoG``,
``dog.PolynomialDecayAverager``) and ``optax.contrib`` (``dog``, ``dowg``; DoWG has no package
of its own). 200 steps on a tree of several leaves, fresh random gradients each step (and, for
DoG and LDoG at their defaults, gradients of a real loss, so that the distance estimate grows by
orders of magnitude), in float64 (relative error <= 1e-10) and float32 (<= 1e-5).

The adaopt side of the random-gradient comparisons runs with its hyperparameters, learning rates
and weight decay as traced arrays, so that one compiled program serves every draw of a dtype;
the comparisons at the defaults, and the registry's parity tests, run them as Python numbers.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import dog
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adaopt
from adaopt import DoGEstimate, averaged_params, dowg, ldog, polynomial_decay_averaging, scale_by_dog
from adaopt import dog as adaopt_dog
from tests import parity
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
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


class _DoGOneGroup(dog.DoG):
    """``dog.DoG`` with every tensor in one group: its statistics (r-bar, G) are per parameter group.

    A masked decay cannot be a per-group ``weight_decay`` then; it is added to the gradients
    before the step exactly as ``dog.DoG`` adds its own (``p.grad.add_(p, alpha=weight_decay)``).
    """

    def __init__(self, groups: list[dict[str, Any]], **kwargs: Any) -> None:
        self._decayed = [(p, g["weight_decay"]) for g in groups for p in g["params"] if g["weight_decay"] > 0]
        super().__init__([{"params": [p for g in groups for p in g["params"]]}], **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for p, weight_decay in self._decayed:
            p.grad.add_(p, alpha=weight_decay)
        return super().step(closure)


def _dog_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    return {"lr": 1.0, "reps_rel": hp["reps_rel"], "eps": hp["eps"], "init_eta": hp.get("init_eta")}


TORCH: dict[str, parity.TorchFactory] = {
    "dog.DoG": lambda groups, hp: _DoGOneGroup(groups, **_dog_kwargs(hp)),
    "dog.LDoG": lambda groups, hp: dog.LDoG(groups, **_dog_kwargs(hp)),
}
OPTAX: dict[str, Callable[[Any, dict[str, Any], Any], optax.GradientTransformation]] = {
    "optax.contrib.dog": lambda lr, hp, mask: optax.contrib.dog(
        lr, ("heuristic", hp["reps_rel"]), hp["eps"], weight_decay=hp["weight_decay"] or None, mask=mask
    ),
    "optax.contrib.dowg": lambda lr, hp, mask: optax.contrib.dowg(
        lr, hp.get("init_estim_sq_dist"), hp["eps"], weight_decay=hp["weight_decay"] or None, mask=mask
    ),
}


# ---- One compiled program per set of optimizers and dtype, for every draw. ----

Builder = Callable[[Any, dict[str, Any]], optax.GradientTransformation]


@functools.cache
def _compiled(builders: tuple[Builder, ...], record_average: bool = False) -> Callable[..., Any]:
    """A jitted ``(hp, rates, params, grads) -> [trajectory per builder]``, hyperparameters traced."""

    def run(hp: dict, rates: jax.Array, params: dict, grads: dict) -> list[dict]:
        lr = lambda count: rates[count]
        trajectories = []
        for build in builders:
            tx = build(lr, hp)

            def step(carry: tuple, g: dict, tx: optax.GradientTransformation = tx) -> tuple[tuple, dict]:
                p, s = carry
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
                return (p, s), averaged_params(s) if record_average else p

            trajectories.append(jax.lax.scan(step, (params, tx.init(params)), grads)[1])
        return trajectories

    return jax.jit(run)


def _draw(case: Case, seed: int, **ranges: tuple[float, float]) -> tuple[dict[str, float], np.ndarray]:
    """Log-uniform hyperparameters, a weight decay (0 when off), and the learning rate of each step.

    The values are rounded to the case's dtype, so that both sides see the same numbers.
    """
    rng = np.random.default_rng(seed)
    hp = {k: float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) for k, (lo, hi) in ranges.items()}
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0
    hp = {k: float(np.asarray(v, case.dtype)) for k, v in hp.items()}
    peak = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    if case.schedule:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=20, decay_steps=STEPS, end_value=peak / 10
        )
        with jax.enable_x64(case.dtype == np.float64):
            rates = np.asarray(jax.vmap(schedule)(jnp.arange(STEPS, dtype=case.dtype)))
    else:
        rates = np.full(STEPS, peak)
    return hp, rates.astype(case.dtype)


def _problem(case: Case, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=shape).astype(case.dtype) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)).astype(case.dtype) for k, shape in SHAPES.items()}
    return params, grads


def _ours(builders: tuple[Builder, ...], hp: dict, rates: np.ndarray, params: dict, grads: dict, case: Case) -> list:
    with jax.enable_x64(case.dtype == np.float64):
        traced = {k: jnp.asarray(v, case.dtype) for k, v in hp.items()}
        out = _compiled(builders)(traced, jnp.asarray(rates), params, grads)
    return [jax.tree.map(np.asarray, o) for o in out]


def _torch(name: str, hp: dict, rates: np.ndarray, params: dict, grads: dict, case: Case) -> dict:
    return parity.run_torch(TORCH[name], hp, lambda t: float(rates[t]), params, grads, case)


def _check(ours: dict, theirs: dict, params: dict, case: Case, what: str) -> float:
    for k in SHAPES:
        assert ours[k].dtype == case.dtype, f"{what}: {k} in {ours[k].dtype}, expected {case.dtype}"
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, f"{what}: the reference barely moved ({moved:.2g}); the comparison would prove nothing"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[case.dtype], f"{what}: relative error {error:.3g}"
    return error


def _seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ---- DoG and LDoG against the authors' package (and DoG against optax.contrib). ----


def _dog_masked(lr: Any, hp: dict) -> optax.GradientTransformation:
    return adaopt_dog(lr, hp["reps_rel"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK)


def _ldog_masked(lr: Any, hp: dict) -> optax.GradientTransformation:
    return ldog(lr, hp["reps_rel"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK)


def _optax_dog_masked(lr: Any, hp: dict) -> optax.GradientTransformation:
    heuristic = ("heuristic", hp["reps_rel"])
    return optax.contrib.dog(lr, heuristic, hp["eps"], weight_decay=hp["weight_decay"], mask=DECAY_MASK)


def _dog_all_decayed(lr: Any, hp: dict) -> optax.GradientTransformation:
    return adaopt_dog(lr, hp["reps_rel"], hp["eps"], hp["weight_decay"])


def _dog_init_eta(lr: Any, hp: dict) -> optax.GradientTransformation:
    return adaopt_dog(
        lr, hp["reps_rel"], hp["eps"], hp["weight_decay"], init_eta=hp["init_eta"], weight_decay_mask=DECAY_MASK
    )


def _ldog_init_eta(lr: Any, hp: dict) -> optax.GradientTransformation:
    return ldog(
        lr, hp["reps_rel"], hp["eps"], hp["weight_decay"], init_eta=hp["init_eta"], weight_decay_mask=DECAY_MASK
    )


DOG_RANGES = {"reps_rel": (1e-3, 1e-1), "eps": (1e-10, 1e-6)}
DOG_BUILDERS = (_dog_masked, _ldog_masked, _optax_dog_masked, _dog_all_decayed)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dog_and_ldog_match_the_authors_package(case: Case) -> None:
    """And DoG matches optax.contrib.dog, and ``dog.DoG(weight_decay=...)``'s own decay (no mask)."""
    hp, rates = _draw(case, _seed("dog", case.label), **DOG_RANGES)
    params, grads = _problem(case, _seed("dog-problem", case.label))
    ours_dog, ours_ldog, optax_dog, ours_all = _ours(DOG_BUILDERS, hp, rates, params, grads, case)
    _check(ours_dog, _torch("dog.DoG", hp, rates, params, grads, case), params, case, f"dog.DoG {hp}")
    _check(ours_ldog, _torch("dog.LDoG", hp, rates, params, grads, case), params, case, f"dog.LDoG {hp}")
    _check(ours_dog, optax_dog, params, case, f"optax.contrib.dog {hp}")
    if case.weight_decay:
        every = lambda groups, hp: dog.DoG(
            [{"params": [p for g in groups for p in g["params"]]}], weight_decay=hp["weight_decay"], **_dog_kwargs(hp)
        )
        plain = Case(False, case.schedule, case.dtype)  # one group: the package's own decay on every tensor
        theirs = parity.run_torch(every, hp, lambda t: float(rates[t]), params, grads, plain)
        _check(ours_all, theirs, params, case, f"dog.DoG(weight_decay) {hp}")


@pytest.mark.parametrize("case", [CASES[3], CASES[0], CASES[4]], ids=lambda c: c.label)
def test_init_eta_matches_the_authors_package(case: Case) -> None:
    """The first step is ``init_eta`` whatever the learning rate, even a warmup's 0 (which optax's would multiply)."""
    hp, rates = _draw(case, _seed("init_eta", case.label), init_eta=(1e-3, 1e-1), **DOG_RANGES)
    params, grads = _problem(case, _seed("init_eta-problem", case.label))
    ours_dog, ours_ldog = _ours((_dog_init_eta, _ldog_init_eta), hp, rates, params, grads, case)
    _check(ours_dog, _torch("dog.DoG", hp, rates, params, grads, case), params, case, f"dog.DoG {hp}")
    _check(ours_ldog, _torch("dog.LDoG", hp, rates, params, grads, case), params, case, f"dog.LDoG {hp}")


def test_the_comparison_detects_a_wrong_reps_rel() -> None:
    case = CASES[0]
    hp, rates = _draw(case, 0, **DOG_RANGES)
    params, grads = _problem(case, 1)
    ours = _ours(DOG_BUILDERS, {**hp, "reps_rel": hp["reps_rel"] * (1 + 1e-5)}, rates, params, grads, case)[0]
    assert parity.relative_error(ours, _torch("dog.DoG", hp, rates, params, grads, case)) > 1e-7


@functools.cache
def _quadratic_run(dtype: type) -> Callable[..., Any]:
    def run(params: dict, target: dict, curvature: dict, noise: dict) -> list[dict]:
        out = []
        for tx in (adaopt_dog(), ldog()):  # the defaults, as Python numbers

            def step(carry: tuple, n: dict, tx: optax.GradientTransformation = tx) -> tuple[tuple, dict]:
                p, s = carry
                g = jax.tree.map(lambda x, h, c, e: h * (x - c) + e, p, curvature, target, n)
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
                return (p, s), p

            out.append(jax.lax.scan(step, (params, tx.init(params)), noise)[1])
        return out

    return jax.jit(run)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_defaults_on_a_real_problem_match_the_package(dtype: type) -> None:
    """DoG and LDoG at their defaults on gradients ``h * (x - target) + noise`` of each side's own iterates."""
    case = Case(False, False, dtype)
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    target = {k: (3 * rng.normal(size=shape)).astype(dtype) for k, shape in SHAPES.items()}
    curvature = {k: rng.uniform(0.5, 4.0, size=shape).astype(dtype) for k, shape in SHAPES.items()}
    noise = {k: (0.1 * rng.normal(size=(STEPS, *shape))).astype(dtype) for k, shape in SHAPES.items()}
    names = sorted(params)
    with jax.enable_x64(dtype == np.float64):
        ours = [jax.tree.map(np.asarray, o) for o in _quadratic_run(dtype)(params, target, curvature, noise)]

    for optimizer, trajectory in zip((dog.DoG, dog.LDoG), ours, strict=True):
        tensors = {k: torch.tensor(params[k]) for k in names}
        opt = optimizer([tensors[k] for k in names])
        theirs: dict[str, list] = {k: [] for k in names}
        for t in range(STEPS):
            for k in names:
                x = tensors[k]
                x.grad = torch.tensor(curvature[k]) * (x - torch.tensor(target[k])) + torch.tensor(noise[k][t])
            opt.step()
            for k in names:
                theirs[k].append(tensors[k].numpy().copy())
        reference = {k: np.stack(v) for k, v in theirs.items()}
        _check(trajectory, reference, params, case, optimizer.__name__)
        # From reps_rel = 1e-6 the steps grew by orders of magnitude: the distance estimate was exercised.
        assert max(float(np.max(np.abs(reference[k][-1] - params[k]))) for k in SHAPES) > 1.0


# ---- DoWG against optax.contrib.dowg (and so Algorithm 1 of the paper, with eps = 0). ----


def _dowg_default(lr: Any, hp: dict) -> optax.GradientTransformation:
    return dowg(lr, eps=hp["default_eps"], weight_decay=hp["weight_decay"], weight_decay_mask=DECAY_MASK)


def _optax_dowg_default(lr: Any, hp: dict) -> optax.GradientTransformation:
    return optax.contrib.dowg(lr, None, hp["default_eps"], weight_decay=hp["weight_decay"], mask=DECAY_MASK)


def _dowg_given(lr: Any, hp: dict) -> optax.GradientTransformation:
    return dowg(lr, hp["init_estim_sq_dist"], hp["eps"], hp["weight_decay"], weight_decay_mask=DECAY_MASK)


def _optax_dowg_given(lr: Any, hp: dict) -> optax.GradientTransformation:
    init = hp["init_estim_sq_dist"]
    return optax.contrib.dowg(lr, init, hp["eps"], weight_decay=hp["weight_decay"], mask=DECAY_MASK)


DOWG_BUILDERS = (_dowg_default, _optax_dowg_default, _dowg_given, _optax_dowg_given)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dowg_matches_optax_contrib(case: Case) -> None:
    """optax's default (eps is also the initial squared distance), a given one, and the paper's eps = 0."""
    params, grads = _problem(case, _seed("dowg-problem", case.label))
    ranges = {"default_eps": (1e-4, 1e-2), "eps": (1e-8, 1e-4), "init_estim_sq_dist": (1e-4, 1e-1)}
    hp, rates = _draw(case, _seed("dowg", case.label), **ranges)
    for eps in (hp["eps"], 0.0):  # 0: Algorithm 1 exactly
        ours_default, optax_default, ours, theirs = _ours(DOWG_BUILDERS, {**hp, "eps": eps}, rates, params, grads, case)
        _check(ours, theirs, params, case, f"optax.contrib.dowg {hp} eps={eps}")
    _check(ours_default, optax_default, params, case, f"optax.contrib.dowg {hp} (init_estim_sq_dist=None)")


# ---- Polynomial-decay averaging against dog.PolynomialDecayAverager. ----


class _Model(torch.nn.Module):
    def __init__(self, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(params[k])) for k in sorted(params)})


def _averaged(lr: Any, hp: dict, layer_wise: bool) -> optax.GradientTransformation:
    inner = (ldog if layer_wise else adaopt_dog)(lr, hp["reps_rel"], hp["eps"], hp["weight_decay"])
    return polynomial_decay_averaging(inner, hp["gamma"])


def _averaged_dog(lr: Any, hp: dict) -> optax.GradientTransformation:
    return _averaged(lr, hp, layer_wise=False)


def _averaged_ldog(lr: Any, hp: dict) -> optax.GradientTransformation:
    return _averaged(lr, hp, layer_wise=True)


@pytest.mark.parametrize("case", [CASES[3], CASES[0], CASES[4], CASES[5]], ids=lambda c: c.label)
def test_averaging_matches_the_package_averager(case: Case) -> None:
    hp, rates = _draw(case, _seed("average", case.label), gamma=(0.5, 16.0), **DOG_RANGES)
    params, grads = _problem(case, _seed("average-problem", case.label))
    names = sorted(params)
    with jax.enable_x64(case.dtype == np.float64):
        traced = {k: jnp.asarray(v, case.dtype) for k, v in hp.items()}
        out = _compiled((_averaged_dog, _averaged_ldog), record_average=True)(traced, rates, params, grads)
    for layer_wise, ours in zip((False, True), out, strict=True):
        model = _Model(params)
        opt = (dog.LDoG if layer_wise else dog.DoG)(
            model.parameters(), weight_decay=hp["weight_decay"], **_dog_kwargs(hp)
        )
        averager = dog.PolynomialDecayAverager(model, gamma=hp["gamma"])
        theirs: dict[str, list] = {k: [] for k in names}
        for t in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = float(rates[t])
            for k in names:
                model.p[k].grad = torch.tensor(grads[k][t])
            opt.step()
            averager.step()
            for k in names:
                theirs[k].append(averager.averaged_model.p[k].detach().numpy().copy())
        reference = {k: np.stack(v) for k, v in theirs.items()}
        _check(jax.tree.map(np.asarray, ours), reference, params, case, f"averager layer_wise={layer_wise} {hp}")


def test_averaging_is_the_uniform_average_at_gamma_zero_and_leaves_the_updates_alone() -> None:
    params = {"w": jnp.zeros(3)}
    inner = optax.sgd(1.0)
    tx = polynomial_decay_averaging(inner, gamma=0.0)
    state, inner_state = tx.init(params), inner.init(params)
    iterates = []
    for t in range(4):
        g = {"w": jnp.full(3, float(t + 1))}
        updates, state = tx.update(g, state, params)
        expected, inner_state = inner.update(g, inner_state, params)
        np.testing.assert_array_equal(updates["w"], expected["w"])
        params = optax.apply_updates(params, updates)
        iterates.append(params["w"])
    np.testing.assert_allclose(averaged_params(state)["w"], np.mean(iterates, axis=0), rtol=1e-6)


def test_averaged_params_is_found_through_wrappers() -> None:
    params = {"w": jnp.ones(2)}
    tx = optax.MultiSteps(optax.chain(optax.identity(), polynomial_decay_averaging(optax.sgd(0.1))), 1)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    np.testing.assert_allclose(averaged_params(state)["w"], [0.9, 0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="polynomial_decay_averaging"):
        averaged_params(optax.sgd(0.1).init(params))


# ---- Contract: jit, half precision, awkward trees, validation, convergence. ----

OPTIMIZERS = {
    "dog": lambda: adaopt_dog(),
    "ldog": lambda: ldog(),
    "dowg": lambda: dowg(),
    "averaged-dog": lambda: polynomial_decay_averaging(adaopt_dog()),
}
NAMES = list(OPTIMIZERS)


def _loss(params: dict) -> jax.Array:
    w, b = params["dense"]["w"], params["dense"]["b"]
    return jnp.sum(jnp.tanh(jnp.sum(w, axis=0) + b) ** 2) + 0.1 * jnp.sum(w**2) + (params["scale"] - 2) ** 2


def _params(dtype: Any = np.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "dense": {"w": rng.normal(size=(4, 3)).astype(dtype), "b": rng.normal(size=3).astype(dtype)},
        "scale": np.asarray(1.5, dtype),
    }


@pytest.mark.parametrize("name", NAMES)
def test_jit_compiles_once(name: str) -> None:
    tx = OPTIMIZERS[name]()
    traces = 0

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = _params()
    state = jax.jit(tx.init)(params)
    for _ in range(3):
        params, state = step(params, state)
    assert traces == 1, "the step recompiled: the state's types or shapes changed between steps"
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params()), strict=True))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_half_precision_zero_gradient_is_finite(dtype: Any) -> None:
    """A zero gradient, then a real one: finite updates in the parameters' dtype, under strict promotion."""

    @jax.jit
    def two_updates(params: dict, grads: dict) -> dict:
        out = {}
        for name in NAMES:
            tx, p = OPTIMIZERS[name](), params
            state = tx.init(p)
            for g in (jax.tree.map(jnp.zeros_like, grads), grads):
                updates, state = tx.update(g, state, p)
                p = optax.apply_updates(p, updates)
                out.setdefault(name, []).append(updates)
        return out

    params = jax.tree.map(lambda x: np.asarray(x, dtype), _params())
    grads = jax.tree.map(lambda x: np.asarray(np.sin(3 * x + 1), dtype), _params())
    with jax.numpy_dtype_promotion("strict"):
        out = two_updates(params, grads)
    for name, steps in out.items():
        for updates in steps:
            for u in jax.tree.leaves(updates):
                assert u.dtype == dtype, f"{name}: update in {u.dtype}"
                assert bool(jnp.all(jnp.isfinite(u))), f"{name}: non-finite update"
        assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(steps[-1])), (
            f"{name}: the real gradient moved nothing"
        )


AWKWARD = (
    {"a": np.ones(3, np.float32), "frozen": None, "b": [None, np.ones(2, np.float32)]},
    {"empty": np.ones((0, 3), np.float32), "w": np.ones(2, np.float32)},
    {},
)


def test_awkward_trees() -> None:
    """None leaves, a zero-size leaf, an empty tree: two steps keep the structure and stay finite."""

    @jax.jit
    def two_steps(trees: tuple) -> dict:
        out = {}
        for name in NAMES:
            for params in trees:
                tx = OPTIMIZERS[name]()
                grads = jax.tree.map(lambda x: 0.1 * x + 0.05, params)
                state, new = tx.init(params), params
                for _ in range(2):
                    updates, state = tx.update(grads, state, new)
                    new = optax.apply_updates(new, updates)
                out.setdefault(name, []).append(new)
        return out

    for name, results in two_steps(AWKWARD).items():
        for params, new in zip(AWKWARD, results, strict=True):
            assert jax.tree.structure(new) == jax.tree.structure(params), name
            for x, p in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
                assert x.shape == p.shape and bool(jnp.all(jnp.isfinite(x))), name
                assert x.size == 0 or bool(jnp.any(x != p)), f"{name}: a leaf did not move"


def test_ldog_keeps_one_estimate_per_leaf_and_dog_one_for_the_tree() -> None:
    params = _params()
    global_state, layer_state = scale_by_dog().init(params), scale_by_dog(layer_wise=True).init(params)
    assert isinstance(global_state.estimate, DoGEstimate) and global_state.estimate.max_distance.ndim == 0
    np.testing.assert_allclose(
        global_state.estimate.max_distance, 1e-6 * (1 + float(optax.tree.norm(params))), rtol=1e-6
    )
    leaves = jax.tree.leaves(params)
    assert isinstance(layer_state.estimate, tuple) and len(layer_state.estimate) == len(leaves)
    for estimate, leaf in zip(layer_state.estimate, leaves, strict=True):
        assert isinstance(estimate, DoGEstimate)
        np.testing.assert_allclose(estimate.max_distance, 1e-6 * (1 + np.linalg.norm(leaf)), rtol=1e-6)
        np.testing.assert_allclose(estimate.sum_sq_grads, 1e-8, rtol=1e-6)


BAD = [
    (adaopt_dog, {"learning_rate": -1.0}, "learning_rate"),
    (adaopt_dog, {"reps_rel": 0.0}, "reps_rel"),
    (adaopt_dog, {"reps_rel": float("nan")}, "reps_rel"),
    (adaopt_dog, {"reps_rel": "1e-6"}, "reps_rel"),
    (adaopt_dog, {"weight_decay": -0.1}, "weight_decay"),
    (ldog, {"eps": -1e-8}, "eps"),
    (ldog, {"init_eta": 0.0}, "init_eta"),
    (dowg, {"init_estim_sq_dist": 0.0}, "init_estim_sq_dist"),
    (dowg, {"eps": 0.0}, "eps"),
    (dowg, {"eps": float("inf")}, "eps"),
    (dowg, {"learning_rate": float("nan")}, "learning_rate"),
    (lambda **kw: polynomial_decay_averaging(adaopt_dog(), **kw), {"gamma": -1.0}, "gamma"),
    (lambda **kw: polynomial_decay_averaging(adaopt_dog(), **kw), {"average_dtype": jnp.int32}, "average_dtype"),
]


@pytest.mark.parametrize(("factory", "kwargs", "name"), BAD, ids=[f"{n}={kw[n]!r}" for _, kw, n in BAD])
def test_bad_hyperparameters_are_rejected(factory: Any, kwargs: dict, name: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=name) as info:
        factory(**kwargs)
    assert isinstance(info.value, ValueError) and "must be" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_update_without_params_is_a_clear_error(name: str) -> None:
    tx = OPTIMIZERS[name]()
    params = _params()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params), None)


def test_each_reduces_the_loss_of_logistic_regression() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 10)), jnp.float32)
    y = jnp.asarray((x @ rng.normal(size=10) + 0.3 * rng.normal(size=200)) > 0, jnp.float32)

    def loss(p: dict) -> jax.Array:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y))

    @jax.jit
    def train(p0: dict) -> dict:
        out = {}
        for name in NAMES:
            tx = OPTIMIZERS[name]()

            def step(carry: tuple, _: None, tx: optax.GradientTransformation = tx) -> tuple[tuple, None]:
                p, s = carry
                u, s = tx.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, u), s), None

            (p, state), _ = jax.lax.scan(step, (p0, tx.init(p0)), None, length=300)
            out[name] = loss(p)
            if name == "averaged-dog":
                out["average"] = loss(averaged_params(state))
        return out

    p0 = {"w": jnp.zeros(10), "b": jnp.zeros([])}
    start = float(loss(p0))
    for name, end in train(p0).items():
        assert float(end) < 0.5 * start, f"{name}: loss {start:.3f} -> {float(end):.3f}"
