"""adaopt.cautious: pytorch-optimizer's ``cautious=True`` step for step (Lion, LaProp, ADOPT, AdEMAMix),
C-AdamW against torch.optim.AdamW's direction masked by pytorch-optimizer's own ``apply_cautious``,
and the rule itself on complex, scalar, zero-size and None leaves."""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

import adaopt
from tests import parity, references
from tests.parity import DECAY_MASK, SHAPES, STEPS, Case
from tests.test_parity import _draw

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
DRAWS = 2  # random hyperparameter draws per case

# The registry entry whose reference (tests/references.py's runner) pytorch-optimizer's cautious=True extends.
CAUTIOUS = {
    "lion": "pytorch_optimizer.Lion",
    "laprop": "pytorch_optimizer.LaProp",
    "adopt": "pytorch_optimizer.ADOPT",
    "ademamix": "pytorch_optimizer.AdEMAMix",
}
# pytorch-optimizer's AdEMAMix masks its fast moment alone, before adding alpha times the slow
# one: the two rules agree at alpha = 0 (tested here), and differ for alpha > 0 (tested below).
FIXED = {"ademamix": {"alpha": 0.0}}
CASES = [  # as tests/test_parity.py's: float64 with masked decay and a schedule, float32 with neither
    Case(True, True, np.float64),
    Case(False, False, np.float32),
]


def _data(case: Case, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed + 1)
    params = {k: rng.normal(size=shape).astype(case.dtype) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)).astype(case.dtype) for k, shape in SHAPES.items()}
    return params, grads


def _cautious_torch(name: str) -> parity.TorchFactory:
    """tests/references.py's runner for ``name``, with ``cautious=True`` in every parameter group."""

    def make(groups: list[dict[str, Any]], hp: dict[str, Any]) -> torch.optim.Optimizer:
        opt = references.TORCH[name](groups, hp)
        for group in opt.param_groups:
            group["cautious"] = True
        return opt

    return make


def _compare(spec_name: str, case: Case, seed: int, fixed: dict[str, Any]) -> tuple[float, float, dict]:
    """(relative error of cautious adaopt vs cautious pytorch-optimizer, how far the reference moved, hp)."""
    spec = adaopt.REGISTRY[spec_name]
    (ref,) = [r for r in spec.references if r.name == CAUTIOUS[spec_name]]
    hp, lr = _draw(spec, ref, case, seed)
    hp = {**hp, **fixed, **ref.kwargs}
    params, grads = _data(case, seed)
    mask = DECAY_MASK if case.weight_decay else None
    with jax.enable_x64(case.dtype == np.float64):
        tx = adaopt.cautious(spec.factory)(learning_rate=lr, weight_decay_mask=mask, **ref.adaopt_kwargs(hp))
        ours = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
        theirs = parity.run_torch(_cautious_torch(ref.name), hp, lr, params, grads, case)
    for k in SHAPES:
        assert ours[k].dtype == case.dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    return parity.relative_error(ours, theirs), moved, hp


RUNS = [(name, case, draw) for name in CAUTIOUS for case in CASES for draw in range(DRAWS)]


@pytest.mark.parametrize(
    ("name", "case", "draw"), RUNS, ids=[f"{n}-vs-{CAUTIOUS[n]}(cautious=True)-{c.label}-{d}" for n, c, d in RUNS]
)
def test_matches_pytorch_optimizer_cautious(name: str, case: Case, draw: int) -> None:
    seed = zlib.crc32(f"cautious/{name}/{case.label}/{draw}".encode())
    error, moved, hp = _compare(name, case, seed, FIXED.get(name, {}))
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    assert error <= TOLERANCE[case.dtype], f"relative error {error:.3g} vs {CAUTIOUS[name]}(cautious=True) with {hp}"


def test_the_comparison_sees_the_mask() -> None:
    """Plain Lion is far from cautious Lion: the comparison above would catch a mask not applied."""
    case = Case(True, True, np.float64)
    seed = zlib.crc32(b"cautious/lion/off")
    spec = adaopt.REGISTRY["lion"]
    hp, lr = _draw(spec, spec.references[0], case, seed)  # a reference without fixed arguments
    params, grads = _data(case, seed)
    with jax.enable_x64(True):
        tx = spec.factory(learning_rate=lr, weight_decay_mask=DECAY_MASK, **hp)
        plain = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
        theirs = parity.run_torch(_cautious_torch("pytorch_optimizer.Lion"), hp, lr, params, grads, case)
    assert parity.relative_error(plain, theirs) > 1e-2


def test_ademamix_reference_masks_the_fast_moment_alone() -> None:
    """For alpha > 0, pytorch-optimizer's AdEMAMix(cautious=True) is not the cautious rule on the direction."""
    error, moved, _ = _compare("ademamix", Case(False, False, np.float64), 7, {"alpha": 5.0})
    assert moved > 1e-3 and error > 1e-4


# C-AdamW: pytorch-optimizer has no cautious AdamW. Its reference is torch.optim.AdamW's direction,
# masked by pytorch-optimizer's own apply_cautious, with the decoupled decay applied unmasked.


class _CautiousAdamW(torch.optim.Optimizer):
    """C-AdamW from real parts: torch.optim.AdamW (lr=1, no decay) steps a shadow tensor reset to 0
    before each step, so that it holds minus AdamW's direction; pytorch-optimizer's ``apply_cautious``
    masks it; the parameters are decayed (``p *= 1 - lr * wd``, as AdamW and pytorch-optimizer's Lion)
    and stepped by the masked direction."""

    def __init__(self, groups: list[dict[str, Any]], hp: dict[str, Any]) -> None:
        super().__init__(groups, {"lr": 1.0, "weight_decay": 0.0})
        self.shadows = {p: torch.zeros_like(p) for g in self.param_groups for p in g["params"]}
        self.direction = torch.optim.AdamW(
            list(self.shadows.values()), lr=1.0, betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=0.0
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for p, shadow in self.shadows.items():
            shadow.zero_()
            shadow.grad = p.grad.clone()
        self.direction.step()
        for group in self.param_groups:
            for p in group["params"]:
                update = -self.shadows[p]
                pytorch_optimizer.base.optimizer.BaseOptimizer.apply_cautious(update, p.grad)
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
@pytest.mark.parametrize("draw", range(DRAWS))
def test_cautious_adamw_is_the_rule_on_torch_adamw(case: Case, draw: int) -> None:
    seed = zlib.crc32(f"cautious/adamw/{case.label}/{draw}".encode())
    spec = adaopt.REGISTRY["adamw"]
    hp, lr = _draw(spec, spec.references[0], case, seed)  # a reference without fixed arguments
    params, grads = _data(case, seed)
    mask = DECAY_MASK if case.weight_decay else None
    with jax.enable_x64(case.dtype == np.float64):
        tx = adaopt.cautious(adaopt.adamw)(learning_rate=lr, weight_decay_mask=mask, **hp)
        ours = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
        plain = parity.run_adaopt(
            adaopt.adamw(learning_rate=lr, weight_decay_mask=mask, **hp),
            jax.tree.map(jnp.asarray, params),
            jax.tree.map(jnp.asarray, grads),
        )
        theirs = parity.run_torch(_CautiousAdamW, hp, lr, params, grads, case)
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[case.dtype], f"relative error {error:.3g} with {hp}"
    assert parity.relative_error(plain, theirs) > 1e-3  # the mask changed the trajectory


def test_complex_real_imag_matches_pytorch_optimizer() -> None:
    """pytorch-optimizer views complex parameters as real pairs: the mask and its n count each part."""
    case = Case(True, False, np.complex128)
    seed = zlib.crc32(b"cautious/lion/complex")
    spec = adaopt.REGISTRY["lion"]
    hp, lr = _draw(spec, spec.references[0], case, seed)  # a reference without fixed arguments
    rng = np.random.default_rng(seed)
    complex_normal = lambda *shape: rng.normal(size=shape) + 1j * rng.normal(size=shape)
    params = {k: complex_normal(*shape) for k, shape in SHAPES.items()}
    grads = {k: complex_normal(STEPS, *shape) for k, shape in SHAPES.items()}
    with jax.enable_x64(True):
        tx = adaopt.cautious(adaopt.lion)(
            learning_rate=lr, weight_decay_mask=DECAY_MASK, complex_convention="real_imag", **hp
        )
        ours = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    theirs = parity.run_torch(_cautious_torch("pytorch_optimizer.Lion"), hp, lr, params, grads, case)
    assert parity.relative_error(ours, theirs) <= 1e-10


# The rule itself.


def _rotate(angle: float) -> optax.GradientTransformation:
    """A stateless block whose direction is the gradient turned by ``angle``."""
    return optax.GradientTransformation(
        optax.init_empty_state, lambda u, s, p=None: (jax.tree.map(lambda g: g * jnp.exp(1j * angle), u), s)
    )


def test_complex_modulus_keeps_directions_within_90_degrees() -> None:
    g = jnp.array([1.0 + 1.0j, -2.0j, 3.0, 0.5 - 0.5j], jnp.complex64)
    for degrees, kept in ((60.0, True), (-80.0, True), (100.0, False), (180.0, False)):
        tx = adaopt.scale_by_cautious_mask(_rotate(np.deg2rad(degrees)))
        updates, _ = tx.update(g, tx.init(g))
        assert updates.dtype == jnp.complex64
        expected = g * np.exp(1j * np.deg2rad(degrees)) * (4 / 5) if kept else jnp.zeros_like(g)
        np.testing.assert_allclose(updates, expected, rtol=1e-6, atol=1e-7)


def test_complex_modulus_commutes_with_a_rotation() -> None:
    """C-Lion under the modulus convention: rotating the gradients rotates the updates."""
    rng = np.random.default_rng(0)
    grads = [jnp.asarray(rng.normal(size=6) + 1j * rng.normal(size=6), jnp.complex64) for _ in range(5)]
    turn = np.exp(0.7j)

    def run(sequence: list) -> jax.Array:
        tx = adaopt.cautious(adaopt.lion)(learning_rate=1.0, b1=0.99, b2=0.5)  # mostly the past gradients
        state = tx.init(sequence[0])
        for g in sequence:
            updates, state = tx.update(g, state, jnp.zeros_like(g))
        return updates

    plain = run(grads)
    assert np.count_nonzero(np.asarray(plain)) not in (0, 6)  # some coordinates masked, not all
    np.testing.assert_allclose(run([g * turn for g in grads]), plain * turn, rtol=1e-5, atol=1e-6)


def test_scalar_zero_size_none_and_half_precision_leaves() -> None:
    params = {
        "scalar": jnp.asarray(1.0),
        "empty": jnp.zeros((0, 3)),
        "none": None,
        "half": jnp.ones(4, jnp.bfloat16),
    }
    grads = {
        "scalar": jnp.asarray(2.0),
        "empty": jnp.zeros((0, 3)),
        "none": None,
        "half": jnp.asarray([1.0, -1.0, 0.0, 2.0], jnp.bfloat16),
    }
    tx = adaopt.cautious(adaopt.sgd)(learning_rate=1.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert updates["none"] is None
    assert updates["empty"].shape == (0, 3)
    # A scalar that agrees keeps 1 / (1 + 1) of its step; the zero gradient disagrees (0 * 0 is not > 0).
    np.testing.assert_allclose(updates["scalar"], -2.0 * 1 / 2)
    assert updates["half"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updates["half"], np.float32), [-1.0, 1.0, 0.0, -2.0])  # 4 / (3 + 1)


def test_same_state_as_the_plain_optimizer_and_no_recompilation() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    for factory in (adaopt.adamw, adaopt.laprop, adaopt.muon):
        tx = adaopt.cautious(factory)()
        state = tx.init(params)
        assert jax.tree.structure(state) == jax.tree.structure(factory().init(params))
        update = jax.jit(tx.update)
        for _ in range(2):
            _, state = update(params, state, params)
        assert update._cache_size() == 1


def test_inject_hyperparams_around_cautious() -> None:
    """inject_hyperparams(cautious(factory)) finds the factory's signature and masks the direction."""
    params = jnp.array([1.0, 1.0, 1.0])
    g = jnp.array([1.0, -1.0, 2.0])
    injected = adaopt.inject_hyperparams(adaopt.cautious(adaopt.adamw))(learning_rate=0.1, weight_decay=0.5)
    state = injected.init(params)
    assert "weight_decay" in state.hyperparams and "complex_convention" not in state.hyperparams
    plain = adaopt.cautious(adaopt.adamw)(learning_rate=0.1, weight_decay=0.5)
    np.testing.assert_allclose(
        injected.update(g, state, params)[0], plain.update(g, plain.init(params), params)[0], rtol=1e-4
    )


def test_hypergradient_descent_learns_from_the_masked_step() -> None:
    """cautious(sgd_hd): the direction is masked inside the learner of the rate, so the direction it keeps for the
    next hypergradient is the one applied (each update is -alpha_t times it), not the unmasked one."""
    a = jnp.array([1.0, 10.0, 3.0, 0.5])
    loss = lambda x: 0.5 * jnp.sum(a * x**2)
    params = jnp.array([1.0, -1.0, 0.5, 2.0])
    opt = adaopt.cautious(adaopt.sgd_hd)(learning_rate=0.05, momentum=0.9)
    state = opt.init(params)
    masked = 0
    for _ in range(6):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        (hd,) = optax.tree.get_all_with_path(state, "HypergradientState")
        kept = hd[1]
        np.testing.assert_allclose(updates, -kept.learning_rate * kept.direction, rtol=1e-6)
        masked += int(jnp.sum(updates == 0))
        params = optax.apply_updates(params, updates)
    assert masked > 0  # the mask did drop coordinates: the comparison above saw masked steps


def test_refuses_a_factory_without_adaopt_assembly() -> None:
    with pytest.raises(TypeError, match="bold driver"):
        adaopt.cautious(adaopt.bold_driver)(learning_rate=0.5, undo=True)
    adaopt.cautious(adaopt.bold_driver)(learning_rate=0.5, undo=False)  # no undo to replay: its direction masked
    for factory in (optax.adamw, adaopt.inject_hyperparams(adaopt.adamw), adaopt.schedule_free_adamw):
        with pytest.raises(TypeError, match=r"adaopt.inject_hyperparams\(adaopt.cautious\(adaopt.adamw\)\)"):
            adaopt.cautious(factory)(learning_rate=1e-3)
    with pytest.raises(adaopt.HyperparameterError, match="updates_are must be one of"):
        adaopt.cautious(adaopt.adamw, updates_are="gradients")  # type: ignore[arg-type]


def test_a_transformation_has_its_whole_update_masked() -> None:
    """cautious(optax.adamw(...)) masks the step (decay included): a decayed coordinate whose step
    is turned uphill by the decay is dropped; as a direction block, the rule flips."""
    params = jnp.array([10.0, 1.0, 1.0])
    g = jnp.array([-1.0, 1.0, -1.0])
    tx = adaopt.cautious(optax.adamw(0.1, weight_decay=0.5))
    updates, _ = tx.update(g, tx.init(params), params)
    # optax.adamw's step: -0.1 * (sign(g) + 0.5 * params) = [-0.4, -0.15, 0.05]; only the last two descend.
    np.testing.assert_allclose(updates, [0.0, -0.15, 0.05], rtol=1e-4)  # 3 / (2 + 1) = 1
    block = adaopt.cautious(optax.scale_by_adam(), updates_are="directions")
    updates, _ = block.update(g, block.init(params))
    np.testing.assert_allclose(updates, g * 3 / 4, rtol=1e-5)
