"""Every optimizer against every reference the registry names, step for step.

For each (optimizer, reference) pair: 200 steps on a tree of several leaves with fresh random
gradients each step, for several random draws of valid hyperparameters, with weight decay on
(with a mask, through torch parameter groups) and off, with a constant learning rate and with a
schedule, in float64 (relative error <= 1e-10) and float32 (<= 1e-5). The whole trajectory is
compared, not only the end point.
"""

from __future__ import annotations

import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adaopt
from adaopt import REGISTRY, OptimizerSpec, Reference
from benchmarks import learning_rates
from tests import parity, references
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case


def _draw(spec: OptimizerSpec, ref: Reference, case: Case, seed: int) -> tuple[dict[str, Any], Any]:
    """Random valid hyperparameters (adaopt's names) and the learning rate or schedule."""
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in spec.hyperparameters.items()}
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0
    peak = learning_rates.TUNED[spec.name] * float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
    if case.schedule:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=20, decay_steps=STEPS, end_value=peak / 10
        )
        # optax evaluates a schedule in float32 at an int32 count; evaluate it in the case's
        # dtype so that both sides see the same float64 rates.
        lr: Any = lambda count: schedule(jnp.asarray(count, case.dtype))
    else:
        lr = peak
    return {**hp, **ref.kwargs}, lr


TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}  # the largest relative error over the trajectory

# Comparisons that need a real problem (estimated step sizes, loss-driven rates) run in their
# family's test file, which must exist and name the reference: random gradients prove nothing there.
COMPARED_IN = {
    "prodigy": "tests/test_prodigy.py",
    "dadapt_adam": "tests/test_dadapt.py",
    "dadapt_sgd": "tests/test_dadapt.py",
    "dadapt_adagrad": "tests/test_dadapt.py",
    "cocob": "tests/test_cocob.py",
    "mechanic": "tests/test_mechanic.py",
    "sgd_hd": "tests/test_hypergradient.py",
    "sgdn_hd": "tests/test_hypergradient.py",
    "adam_hd": "tests/test_hypergradient.py",
    "polyak_sgd": "tests/test_polyak.py",
    "muon": "tests/test_muon.py",
    "scion": "tests/test_scion.py",
    "sophia": "tests/test_sophia.py",
    "soap": "tests/test_soap.py",
    "shampoo": "tests/test_shampoo.py",
    "psgd_kron": "tests/test_psgd_kron.py",
    "galore_adamw": "tests/test_galore.py",
}
PAIRS = [(spec, ref) for spec in REGISTRY.values() for ref in spec.references if spec.name not in COMPARED_IN]
ELSEWHERE = [(spec, ref) for spec in REGISTRY.values() for ref in spec.references if spec.name in COMPARED_IN]


def _cases(spec: OptimizerSpec, ref: Reference) -> list[Case]:
    """A run per reference in float64 with everything it follows (masked weight decay, so some leaves
    decay and others do not, and a schedule); and, for the optimizer's first reference, one in
    float32 with neither (no decay at all, a constant learning rate: the other code path, where a
    float32-only difference shows; it is the optimizer's own, the same whichever reference)."""
    first = ref is next(r for s, r in PAIRS if s is spec)
    return [Case(ref.weight_decay, ref.schedule, np.float64)] + ([Case(False, False, np.float32)] if first else [])


RUNS = [(spec, ref, case) for spec, ref in PAIRS for case in _cases(spec, ref)]


@pytest.mark.parametrize(("spec", "ref"), ELSEWHERE, ids=[f"{s.name}-vs-{r.name}" for s, r in ELSEWHERE])
def test_references_compared_elsewhere_are_compared_there(spec: OptimizerSpec, ref: Reference) -> None:
    tested_in = COMPARED_IN[spec.name]
    path = pathlib.Path(__file__).parent.parent / tested_in
    assert path.is_file(), f"{spec.name}: {ref.name} is said to be compared in {tested_in}, which does not exist"
    source = path.read_text()
    assert ref.name in source, f"{tested_in} does not mention {ref.name!r}"
    assert "def test_" in source


def test_every_reference_is_implemented() -> None:
    missing = [ref.name for _, ref in PAIRS if not references.is_known(ref.name)]
    assert not missing, f"registry names references with no runner in tests/references.py: {missing}"


@pytest.mark.parametrize(
    ("spec", "ref", "case"), RUNS, ids=[f"{s.name}-vs-{r.name}{dict(r.kwargs) or ''}-{c.label}" for s, r, c in RUNS]
)
def test_parity(spec: OptimizerSpec, ref: Reference, case: Case) -> None:
    seed = zlib.crc32(f"{spec.name}/{ref.name}/{ref.kwargs}/{case.label}".encode())
    hp, lr = _draw(spec, ref, case, seed)
    rng = np.random.default_rng(seed + 1)
    params = {k: rng.normal(size=shape).astype(case.dtype) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)).astype(case.dtype) for k, shape in SHAPES.items()}
    mask = DECAY_MASK if case.weight_decay else None

    with jax.enable_x64(case.dtype == np.float64):
        kwargs = ref.adaopt_kwargs(hp)
        tx = spec.factory(learning_rate=lr, weight_decay_mask=mask, **kwargs)
        ours = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
        if ref.name in references.TORCH:
            theirs = parity.run_torch(references.TORCH[ref.name], hp, lr, params, grads, case)
        else:
            other = references.OPTAX[ref.name](lr, hp, mask)
            theirs = parity.run_adaopt(other, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))

    for k in SHAPES:
        assert ours[k].dtype == case.dtype, f"{k}: adaopt returned {ours[k].dtype}, expected {case.dtype}"
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    error = parity.relative_error(ours, theirs)
    tolerance = TOLERANCE[case.dtype]
    assert error <= tolerance, f"relative error {error:.3g} vs {ref.name} with {hp}"


def test_parity_detects_a_wrong_hyperparameter() -> None:
    """The comparison is sharp: Adam with b2 off by 1e-4 fails it."""
    ref = Reference("torch.optim.Adam")
    spec = adaopt.REGISTRY["adam"]
    case = Case(False, False, np.float64)
    hp, lr = _draw(spec, ref, case, 0)
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=shape) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)) for k, shape in SHAPES.items()}
    with jax.enable_x64(True):
        tx = adaopt.adam(lr, hp["b1"], hp["b2"] - 1e-4, hp["eps"])
        ours = parity.run_adaopt(tx, params, grads)
    theirs = parity.run_torch(references.TORCH[ref.name], hp, lr, params, grads, case)
    assert parity.relative_error(ours, theirs) > 1e-6


def test_a_trajectory_that_is_not_finite_where_the_references_is_fails() -> None:
    """max(worst, nan) keeps worst: a NaN in adaopt's trajectory passed the comparison as an error of 0."""
    theirs = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    assert parity.relative_error({"w": np.ones((3, 2)), "b": np.zeros(2)}, theirs) == 0.0
    for bad in (np.nan, np.inf):
        ours = {"w": np.ones((3, 2)), "b": np.asarray([0.0, bad])}
        assert parity.relative_error(ours, theirs) == np.inf
        assert parity.relative_error(theirs, ours) == np.inf
    assert parity.relative_error({"w": np.asarray([np.nan, 1.5])}, {"w": np.asarray([np.nan, 1.0])}) == 0.5


# Gradients whose float32 squares overflow (|g| > 1.8e19) but whose weighted squares do not: torch's addcmul
# weights each square first, so RMSprop's and Adadelta's every coordinate moves, and Adam's second moment is finite.
HUGE = {
    "rmsprop": (lambda: adaopt.rmsprop(1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    "adadelta": (lambda: adaopt.adadelta(1.0), lambda p: torch.optim.Adadelta(p, lr=1.0)),
    "adopt": (lambda: adaopt.adopt(1e-2), lambda p: references.torch_adopt.ADOPT(p, lr=1e-2)),
}


def _huge_problem(name: str) -> tuple[dict, dict]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    params = {"w": rng.normal(size=(6, 5)).astype(np.float32)}
    grads = {"w": (np.clip(rng.normal(size=(10, 6, 5)), -3, 3) * 1e19).astype(np.float32)}
    grads["w"][:, 0] = rng.normal(size=(10, 5))  # a row of ordinary gradients beside them
    if name == "adopt":  # its first gradient's square is its v, unweighted (the reference's too): an ordinary one
        grads["w"][0] = rng.normal(size=(6, 5))
    return params, grads


@pytest.mark.parametrize("name", HUGE)
def test_gradients_whose_squares_overflow_float32_take_torchs_steps(name: str) -> None:
    ours_tx, theirs_opt = HUGE[name]
    params, grads = _huge_problem(name)
    ours = parity.run_adaopt(ours_tx(), jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    tensor = torch.tensor(params["w"])
    opt = theirs_opt([tensor])
    for g in grads["w"]:
        tensor.grad = torch.tensor(g)
        opt.step()
    theirs = tensor.numpy()
    assert np.all(theirs != params["w"]), "the reference left a coordinate where it was"
    np.testing.assert_allclose(ours["w"][-1], theirs, rtol=1e-5, atol=1e-6)


def test_adams_second_moment_of_huge_gradients_is_torchs() -> None:
    """Adam's v stays finite as torch's (it was inf, and froze its coordinate for good); its first steps there are
    0 while v / (1 - b2^t) overflows (torch's root is taken first: a guard for it cost the common step its time)."""
    params, grads = _huge_problem("adam")
    tx, tensor = adaopt.adam(1e-3), torch.tensor(params["w"])
    opt, state, update = torch.optim.Adam([tensor], lr=1e-3), tx.init(jnp.asarray(params["w"])), jax.jit(tx.update)
    for g in grads["w"]:
        tensor.grad = torch.tensor(g)
        opt.step()
        _, state = update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(state[2].nu), opt.state[tensor]["exp_avg_sq"].numpy(), rtol=1e-5)


def test_huge_gradients_keep_quantized_moments_finite() -> None:
    """An 8-bit block whose second moment held inf had a NaN scale: the whole block's steps were NaN after."""
    g = jnp.ones((4, 1024)).at[0, 0].set(3e19)
    for moments in ("int8", "fp8"):
        tx = adaopt.adamw(1e-3, mu_dtype=moments, nu_dtype=moments)
        w, update = jnp.zeros((4, 1024)), jax.jit(tx.update)
        state = tx.init(w)
        for _ in range(3):
            u, state = update(g, state, w)
            w = optax.apply_updates(w, u)
        assert bool(jnp.all(jnp.isfinite(w))), moments
        assert bool(jnp.all(w.ravel()[1:] < 0)), moments  # the huge coordinate's own first steps are 0 (above)
