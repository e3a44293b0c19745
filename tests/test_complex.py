"""Complex parameters: each convention step for step against its reference, and every optimizer on complex trees.

``complex_convention="real_imag"`` is compared with ``torch.optim`` (which views a complex
tensor as real pairs) in complex64 and complex128; ``"modulus"`` with optax (one second moment
of ``|g|^2`` per complex coordinate) in complex128, and by its defining property: the step
commutes with a rotation of the parameters. Every registry optimizer runs on complex trees
under strict dtype promotion with warnings as errors, so a silent cast to real fails.
"""

from __future__ import annotations

import inspect
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import REGISTRY, Capability, OptimizerSpec, Reference
from benchmarks import learning_rates
from tests import parity, references
from tests.parity import DECAY_MASK, SHAPES, Case
from tests.test_parity import TOLERANCE, _draw

# The optimizers with complex math of their own: they take complex_convention.
NATIVE = [s for s in REGISTRY.values() if "complex_convention" in inspect.signature(s.factory).parameters]
# Linear in the gradient, or built on norms and inner products: the two conventions agree,
# so their optax references hold for complex parameters too.
AGREE = {"sgd", "dog", "dowg", "schedule_free_sgd"}
REAL = {np.complex64: np.float32, np.complex128: np.float64}

TORCH_RUNS = [
    (spec, ref, dtype)
    for spec in REGISTRY.values()
    for i, ref in enumerate(r for r in spec.references if r.name.startswith("torch.optim."))
    if Capability.REAL_ONLY not in spec.capabilities
    for dtype in (np.complex128, np.complex64)
    if dtype == np.complex128 or i == 0  # complex64 once per optimizer, against its first torch reference
]
# optax.adadelta squares a complex gradient (g**2, not |g|^2): it follows neither convention.
OPTAX_RUNS = [
    (spec, ref)
    for spec in REGISTRY.values()
    for ref in spec.references
    if ref.name in references.OPTAX and (spec in NATIVE or spec.name in AGREE) and ref.name != "optax.adadelta"
]


def _complex_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)


def _compare(spec: OptimizerSpec, ref: Reference, dtype: Any, convention: str, weight_decay: bool) -> None:
    case = Case(weight_decay and ref.weight_decay, ref.schedule, REAL[dtype])
    seed = zlib.crc32(f"complex/{spec.name}/{ref.name}/{ref.kwargs}/{np.dtype(dtype).name}".encode())
    hp, lr = _draw(spec, ref, case, seed)
    rng = np.random.default_rng(seed + 1)
    params = {k: _complex_normal(rng, shape, dtype) for k, shape in SHAPES.items()}
    grads = {k: _complex_normal(rng, (parity.STEPS, *shape), dtype) for k, shape in SHAPES.items()}
    mask = DECAY_MASK if case.weight_decay else None
    kwargs = ref.adaopt_kwargs(hp)
    if spec in NATIVE:
        kwargs["complex_convention"] = convention

    with jax.enable_x64(dtype == np.complex128):
        tx = spec.factory(learning_rate=lr, weight_decay_mask=mask, **kwargs)
        ours = parity.run_adaopt(tx, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
        if ref.name in references.TORCH:
            theirs = parity.run_torch(references.TORCH[ref.name], hp, lr, params, grads, case)
        else:
            other = references.OPTAX[ref.name](lr, hp, mask)
            theirs = parity.run_adaopt(other, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))

    for k in SHAPES:
        assert ours[k].dtype == dtype, f"{k}: adaopt returned {ours[k].dtype}, expected {np.dtype(dtype).name}"
    moved = max(np.abs(ours[k][-1].imag - params[k].imag).max() for k in SHAPES)
    assert moved > 1e-3, "the imaginary parts barely moved; the comparison would prove little"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[case.dtype], f"relative error {error:.3g} vs {ref.name} with {hp}"


@pytest.mark.parametrize(
    ("spec", "ref", "dtype"),
    TORCH_RUNS,
    ids=[f"{s.name}-vs-{r.name}{dict(r.kwargs) or ''}-{np.dtype(d).name}" for s, r, d in TORCH_RUNS],
)
def test_real_imag_matches_torch(spec: OptimizerSpec, ref: Reference, dtype: Any) -> None:
    """torch.optim on complex tensors, step for step (weight decay and a schedule in complex128)."""
    _compare(spec, ref, dtype, "real_imag", weight_decay=dtype == np.complex128)


@pytest.mark.parametrize(
    ("spec", "ref"), OPTAX_RUNS, ids=[f"{s.name}-vs-{r.name}{dict(r.kwargs) or ''}" for s, r in OPTAX_RUNS]
)
def test_modulus_matches_optax(spec: OptimizerSpec, ref: Reference) -> None:
    _compare(spec, ref, np.complex128, "modulus", weight_decay=True)


def _rotated_trajectories(
    tx: optax.GradientTransformation, params: np.ndarray, grads: np.ndarray, phase: complex
) -> Any:
    """The trajectories from (params, grads) and from both rotated by ``phase``, in one compiled run."""

    def run(p: jax.Array, gs: jax.Array) -> jax.Array:
        def step(carry: tuple, g: jax.Array) -> tuple[tuple, jax.Array]:
            p, s = carry
            updates, s = tx.update(g, s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        return jax.lax.scan(step, (p, tx.init(p)), gs)[1]

    both = jax.jit(jax.vmap(run))(
        jnp.asarray(np.stack([params, phase * params])), jnp.asarray(np.stack([grads, phase * grads]))
    )
    return np.asarray(both[0]), np.asarray(both[1])


@pytest.mark.parametrize("spec", NATIVE, ids=lambda s: s.name)
def test_modulus_commutes_with_a_rotation(spec: OptimizerSpec) -> None:
    """Rotating the parameters and the gradients by one phase rotates the whole trajectory."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    params = _complex_normal(rng, (4, 3), np.complex128)
    grads = _complex_normal(rng, (parity.STEPS // 4, 4, 3), np.complex128)
    phase = np.exp(0.7j)
    # Yogi starts both moments at a real constant, which no rotation turns: start them at 0.
    start = {"initial_accumulator_value": 0.0} if spec.name == "yogi" else {}
    with jax.enable_x64(True):
        plain, rotated = _rotated_trajectories(
            learning_rates.make(spec, weight_decay=1e-2, **start), params, grads, phase
        )
    np.testing.assert_allclose(rotated, phase * plain, rtol=1e-10, atol=1e-12)


def test_real_imag_does_not_commute_with_a_rotation() -> None:
    """The property above is sharp: the per-part convention fails it."""
    rng = np.random.default_rng(0)
    params, grads = _complex_normal(rng, (4, 3), np.complex128), _complex_normal(rng, (8, 4, 3), np.complex128)
    phase = np.exp(0.7j)
    with jax.enable_x64(True):
        plain, rotated = _rotated_trajectories(adaopt.adam(0.1, complex_convention="real_imag"), params, grads, phase)
    assert np.abs(rotated - phase * plain).max() > 1e-3


def _quadratic_run(spec: OptimizerSpec, dtype: Any, convention: str | None) -> tuple[float, float, Any]:
    """Train on ``|z - target|^2`` (conjugated gradients, as optax expects) under strict promotion."""
    rng = np.random.default_rng(1)
    target = {
        "w": jnp.asarray(_complex_normal(rng, (6, 4), dtype)),
        "b": jnp.asarray(_complex_normal(rng, (4,), dtype)),
    }
    params = jax.tree.map(lambda t: t + jnp.asarray(0.1 * _complex_normal(rng, t.shape, dtype)), target)
    loss = lambda p: sum(jnp.sum(jnp.abs(p[k] - target[k]) ** 2) for k in p)
    kwargs = {} if convention is None else {"complex_convention": convention}
    tx = learning_rates.make(spec, **kwargs)

    @jax.jit
    def run(params: Any) -> tuple[Any, Any]:
        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = tx.update(jax.tree.map(jnp.conj, grads), s, p, value=value)
            return (optax.apply_updates(p, updates), s), None

        (p, s), _ = jax.lax.scan(step, (params, tx.init(params)), length=300)
        return p, s

    with warnings.catch_warnings(), jax.numpy_dtype_promotion("strict"):
        warnings.simplefilter("error")
        final, state = run(params)
    return float(loss(params)), float(loss(final)), (final, state)


# A Capability.REAL_ONLY optimizer refuses complex parameters instead (test_real_only_optimizers_refuse_complex).
CONVENTION_RUNS = [
    (s, c)
    for s in REGISTRY.values()
    if Capability.REAL_ONLY not in s.capabilities
    for c in ((None,) if s not in NATIVE else ("modulus", "real_imag"))
]
REAL_ONLY = [s for s in REGISTRY.values() if Capability.REAL_ONLY in s.capabilities]


@pytest.mark.parametrize("spec", REAL_ONLY, ids=lambda s: s.name)
def test_real_only_optimizers_refuse_complex_parameters_at_init(spec: OptimizerSpec) -> None:
    """Loudly, naming the leaf, rather than a silent real cast or a real view its math was not made for."""
    params = {"w": jnp.ones((3, 2)), "z": jnp.ones((2, 2), jnp.complex64)}
    with pytest.raises(TypeError, match=r"complex.*\[.z.\]"):
        learning_rates.make(spec).init(params)


@pytest.mark.parametrize(
    ("spec", "convention"), CONVENTION_RUNS, ids=[f"{s.name}-{c or 'pairs'}" for s, c in CONVENTION_RUNS]
)
def test_every_optimizer_trains_complex_parameters(spec: OptimizerSpec, convention: str | None) -> None:
    """No silent cast to real: strict promotion, warnings as errors, complex updates, a lower loss."""
    dtype = np.complex64
    before, after, (final, state) = _quadratic_run(spec, dtype, convention)
    assert after < 0.5 * before, f"{spec.name}: the loss went from {before:.3g} to {after:.3g}"
    for leaf in jax.tree.leaves(final):
        assert leaf.dtype == dtype
    for leaf in jax.tree.leaves(state):
        # A state holds complex64 moments, or real float32 ones (second moments, real pairs, scalars), never float64.
        assert leaf.dtype in (jnp.complex64, jnp.float32, jnp.int32, jnp.bool_), (
            f"{spec.name}: state leaf of {leaf.dtype}"
        )


def test_the_first_adam_steps_of_each_convention() -> None:
    """Adam on [1+1j, 2-1j] with the gradient equal to the parameter, lr 0.1: torch's and optax's first steps."""
    z = jnp.array([1 + 1j, 2 - 1j], jnp.complex64)
    steps = {}
    for convention in ("modulus", "real_imag"):
        tx = adaopt.adam(0.1, complex_convention=convention)
        updates, _ = tx.update(z, tx.init(z), z)
        steps[convention] = np.asarray(z + updates)
    import torch

    p = torch.tensor(np.asarray(z), requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = p.detach().clone()
    opt.step()
    np.testing.assert_allclose(steps["real_imag"], p.detach().numpy(), rtol=1e-6)
    o = optax.adam(0.1)
    np.testing.assert_allclose(steps["modulus"], np.asarray(z + o.update(z, o.init(z), z)[0]), rtol=1e-6)


def test_a_complex_moment_needs_a_complex_dtype() -> None:
    z = jnp.zeros(3, jnp.complex64)
    with pytest.raises(ValueError, match="complex parameter's moment cannot be stored in bfloat16"):
        adaopt.adam(1e-3, mu_dtype=jnp.bfloat16).init(z)
    # A real second moment can be narrow; the complex first moment follows the requested precision.
    state = adaopt.adam(1e-3, nu_dtype=jnp.bfloat16, mu_dtype=jnp.float32).init(z)
    core = optax.tree.get(state, "nu")
    assert core.dtype == jnp.bfloat16 and optax.tree.get(state, "mu").dtype == jnp.complex64


def test_complex_convention_is_validated() -> None:
    with pytest.raises(adaopt.HyperparameterError, match="complex_convention must be one of"):
        adaopt.adam(1e-3, complex_convention="torch")


@pytest.mark.parametrize("convention", ["modulus", "real_imag"])
def test_schedule_free_evaluates_complex_parameters(convention: str) -> None:
    """The averaged iterate of a complex run: under real_imag, that of the run on the real view;
    under modulus, rotated with the problem."""
    rng = np.random.default_rng(3)
    params, grads = _complex_normal(rng, (3, 2), np.complex128), _complex_normal(rng, (6, 3, 2), np.complex128)
    with jax.enable_x64(True):
        tx = adaopt.schedule_free_adamw(0.1, complex_convention=convention)

        def evaluated(p: jax.Array, gs: jax.Array) -> jax.Array:
            s = tx.init(p)
            for g in gs:
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
            return adaopt.schedule_free_eval_params(s, p)

        x = evaluated(jnp.asarray(params), jnp.asarray(grads))
        assert x.dtype == jnp.complex128
        if convention == "real_imag":
            view = lambda z: jnp.stack([z.real, z.imag], axis=-1)
            on_view = evaluated(view(jnp.asarray(params)), view(jnp.asarray(grads)))
            np.testing.assert_allclose(np.asarray(x), np.asarray(on_view[..., 0] + 1j * on_view[..., 1]), rtol=1e-12)
        else:
            phase = np.exp(0.7j)
            rotated = evaluated(jnp.asarray(phase * params), jnp.asarray(phase * grads))
            np.testing.assert_allclose(np.asarray(rotated), phase * np.asarray(x), rtol=1e-10)


def test_wrappers_and_tools_take_complex_leaves_beside_real_ones() -> None:
    """inject_hyperparams keeps real hyperparameters (a complex leaf promoted them to complex); monitor reads a
    real_imag state's real views as the moments they are, and packs complex and real leaves under strict promotion."""
    params = {"z": jnp.asarray([1 + 2j, -0.5j, 3.0], jnp.complex64), "r": jnp.asarray([1.0, -2.0])}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    injected = adaopt.inject_hyperparams(adaopt.adam)(learning_rate=1e-2)
    state = injected.init(params)
    assert all(v.dtype == jnp.float32 for v in state.hyperparams.values())
    injected.update(grads, state, params)
    records, nu = {}, {}
    for convention in ("modulus", "real_imag"):
        tx = adaopt.monitor(adaopt.adam(1e-2, complex_convention=convention))
        with jax.numpy_dtype_promotion("strict"):
            _, state = tx.update(grads, tx.init(params), params)
        records[convention], nu[convention] = adaopt.read_records(state), optax.tree.get(state, "nu")
    # Under modulus a complex parameter's second moment is real, of its shape: read as it is.
    coords = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(nu["modulus"])])
    assert records["modulus"]["state/nu/rms"] == pytest.approx(np.sqrt(np.mean(coords**2)), rel=1e-6)
    assert records["modulus"]["state/nu/max"] == pytest.approx(np.max(np.abs(coords)), rel=1e-6)
    assert {"state/mu/rms", "state/mu/max"} <= records["real_imag"].keys()
    for name in ("state/mu/rms", "state/mu/max", "grad_norm"):  # mu is linear: both conventions agree
        assert records["real_imag"][name] == pytest.approx(records["modulus"][name], rel=1e-6), name
