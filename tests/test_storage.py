"""Storages of the moments for every optimizer that takes ``mu_dtype`` / ``nu_dtype``: quantized blocks and
stochastically rounded bfloat16, their contract (same step from zero moments, stable state, jit, checkpoint)
and the rounding's statistics. The packages' trajectories are in tests/test_storage_bnb.py and
tests/test_storage_torchao.py."""

from __future__ import annotations

import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from adaopt._src import storage
from tests import problems

STORAGE_ARGUMENTS = ("mu_dtype", "nu_dtype", "accumulator_dtype")
SMALL_BLOCKS = adaopt.Blockwise("dynamic8", block_size=64, min_size=64)  # quantizes the test tree's matrix
SPECS = [s for s in adaopt.REGISTRY.values() if adaopt.Capability.MOMENT_DTYPES in s.capabilities]


def _tree() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32), "b": jnp.zeros(12), "s": jnp.ones(())}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    return params, grads


# Moments that refuse blockwise codes: SOAP's first moment, rotated into the eigenbasis (tests/test_soap.py).
REFUSED = {"soap": ("mu_dtype",)}


def _with_storage(spec: adaopt.OptimizerSpec, kind: object) -> optax.GradientTransformationExtraArgs:
    """``spec`` with every moment it keeps whole stored by ``kind`` (factored statistics stay floats)."""
    taken = inspect.signature(spec.factory).parameters
    names = ("mu_dtype",) if adaopt.Capability.FACTORED_STATE in spec.capabilities else STORAGE_ARGUMENTS
    names = tuple(name for name in names if name not in REFUSED.get(spec.name, ()))
    return spec.make(**{name: kind for name in names if name in taken})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_moment_optimizer_takes_a_storage(spec: adaopt.OptimizerSpec) -> None:
    """From zero moments the first step is float32's exactly (it is taken before the moments are quantized);
    the second reads them back within the map's resolution; the state keeps its structure (no recompilation).
    An optimizer with one step size from whole-tree statistics (D-Adaptation, Prodigy) takes its step in a
    second pass, after the estimate, from the new moments recomputed from the stored old ones (a moment stored as
    0, below its block's resolution, would otherwise divide by 0 + eps)."""
    params, grads = _tree()
    plain, light = spec.make(), _with_storage(spec, SMALL_BLOCKS)
    s_plain, s_light = plain.init(params), light.init(params)
    stored = [x for x in jax.tree.leaves(s_light, is_leaf=adaopt.is_stored) if isinstance(x, adaopt.Quantized)]
    assert stored and all(x.shape == (16, 12) for x in stored)  # the matrix only: the others are under min_size
    structure = jax.tree.structure(s_light)
    for t, g in enumerate(grads):
        u_plain, s_plain = plain.update(g, s_plain, params, value=jnp.asarray(1.0))
        u_light, s_light = light.update(g, s_light, params, value=jnp.asarray(1.0))
        assert jax.tree.structure(s_light) == structure, "the state changed structure: a moment was not stored back"
        for a, b in zip(jax.tree.leaves(u_light), jax.tree.leaves(u_plain), strict=True):
            scale = float(jnp.linalg.norm(b)) + 1e-12
            deviation = float(jnp.linalg.norm(a - b)) / scale
            assert deviation < (1e-6 if t == 0 else 0.25), (t, deviation)


def test_quantized_state_checkpoints_bit_for_bit(tmp_path) -> None:
    params, grads = _tree()
    tx = adaopt.adamw(1e-2, mu_dtype=SMALL_BLOCKS, nu_dtype="bfloat16_sr")
    step = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads:
        _, state = step(g, state, params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the next steps, from either, are the same bits (the stochastic rounding's key is in the state).
    u1, s1 = step(grads[0], state, params)
    u2, s2 = step(grads[0], restored, params)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("written", "read"), [("dynamic8", "fp8"), ("fp8", "dynamic8")])
def test_a_checkpoint_does_not_restore_into_another_format(written: str, read: str, tmp_path) -> None:
    """8-bit codes and FP8 values have one shape and one byte each: orbax would cast one into the other (a
    moment off by up to 25 times its size); their key paths differ, so the restore is a structure mismatch."""
    params, _ = _tree()
    make = lambda fmt: adaopt.adamw(1e-2, mu_dtype=adaopt.Blockwise(fmt, block_size=64, min_size=64))
    state = make(written).init(params)
    target = jax.eval_shape(make(read).init, params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        with pytest.raises(ValueError, match="fp8_codes"):
            checkpointer.restore(tmp_path / "state", target)
        back = checkpointer.restore(tmp_path / "state", jax.eval_shape(make(written).init, params))
    jax.tree.map(np.testing.assert_array_equal, back, state)


@pytest.mark.parametrize("kind", ["dynamic8", "fp8"])
def test_dadapt_adams_estimate_with_quantized_moments_at_any_gradient_scale(kind: str) -> None:
    """D-Adapt Adam's numerator divides by the stored second moment: a coordinate stored as 0 (under its block's
    resolution, its s not 0) divided by eps grew D with the square of the gradients' scale (a quadratic's gradients
    times 1e15: D 1e8 after a step, NaN by the fourth). It adds nothing now, and D follows float32's."""
    curvature = jnp.logspace(-1, 1, 512)
    start = jnp.asarray(np.random.default_rng(3).normal(size=(2, 512)), jnp.float32)

    def estimate(storage_: object) -> float:
        tx = adaopt.dadapt_adam(mu_dtype=storage_, nu_dtype=storage_)
        p, state = start[0], tx.init(start[0])
        for _ in range(6):
            updates, state = jax.jit(tx.update)(1e15 * curvature * (p - start[1]), state, p)
            assert bool(jnp.all(jnp.isfinite(updates)))
            p = optax.apply_updates(p, updates)
        return float(optax.tree.get(state, "d"))

    assert estimate(adaopt.Blockwise(kind, block_size=256, min_size=0)) == pytest.approx(estimate(None), rel=0.05)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "bfloat16_sr"])
def test_storages_round_trip_within_their_resolution(kind: str) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 128)) * np.exp(rng.normal(size=(64, 1))), jnp.float32)
    spec = storage.resolve(kind)
    assert spec is not None
    for signed, values in ((True, x), (False, jnp.abs(x))):
        leaf = spec.init(values, signed=signed)
        back = spec.encode(values, leaf).load()
        assert back.shape == values.shape and back.dtype == jnp.float32
        relative = float(jnp.max(jnp.abs(back - values)) / jnp.max(jnp.abs(values)))
        # The widest gap of each map near its top, in units of the block's absmax (bfloat16: its own step).
        assert relative < {"int8": 0.01, "int4": 0.15, "fp8": 0.07, "bfloat16_sr": 0.01}[kind], relative


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_blocks_whose_largest_value_is_above_2_to_the_126_keep_their_values(kind: str) -> None:
    """A block's values times the reciprocal of its scale, as XLA computes the division: above 2**126 (a float32
    second moment of a gradient above 1e20) the reciprocal is subnormal and XLA:CPU flushes it to 0, so such a block
    was stored as zeros (Adam then divided by a zero second moment). The blocks of the second half are in that range;
    all round-trip within the map's resolution."""
    rng = np.random.default_rng(7)
    magnitude = np.exp(rng.uniform(-2.0, 0.0, size=(16, 256))) * np.where(np.arange(16) < 8, 1e30, 3e38)[:, None]
    x = jnp.asarray(magnitude * rng.choice([-1.0, 1.0], size=(16, 256)), jnp.float32)
    spec = storage.resolve(kind)
    assert spec is not None
    for signed, values in ((True, x), (False, jnp.abs(x))):
        back = np.asarray(jax.jit(lambda v, signed=signed: spec.encode(v, spec.init(v, signed=signed)).load())(values))
        relative = np.max(np.abs(back - np.asarray(values)), axis=1) / np.max(np.abs(np.asarray(values)), axis=1)
        assert np.all(relative < {"int8": 0.01, "int4": 0.15, "fp8": 0.07}[kind]), relative


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "bfloat16_sr"])
def test_apply_if_finite_keeps_a_stored_state_through_a_non_finite_gradient(kind: str) -> None:
    """A NaN and an infinite coordinate (which would spoil a block's scale): apply_if_finite skips the step, keeps
    every stored moment bit for bit, and the next step is the one without the bad gradient."""
    params, (g1, g2) = _tree()
    storage_ = adaopt.Blockwise({"int8": "dynamic8", "int4": "dynamic4", "fp8": "fp8"}[kind], block_size=64,
                                min_size=64) if kind != "bfloat16_sr" else kind  # fmt: skip
    make = lambda: adaopt.adamw(1e-2, mu_dtype=storage_, nu_dtype=storage_)
    tx = adaopt.apply_if_finite(make(), max_consecutive_errors=3)
    step = jax.jit(tx.update)
    _, state = step(g1, tx.init(params), params)
    bad = {**g1, "w": g1["w"].at[0, 0].set(jnp.nan).at[3, 5].set(jnp.inf)}
    skipped, after = step(bad, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(skipped))
    jax.tree.map(np.testing.assert_array_equal, after.inner_state, state.inner_state)
    updates, _ = step(g2, after, params)
    plain = jax.jit(make().update)
    expected, _ = plain(g2, plain(g1, make().init(params), params)[1], params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)


def test_storage_memory_per_element() -> None:
    assert adaopt.Blockwise("dynamic8").bytes_per_element() == pytest.approx(1 + 4 / 256)
    assert adaopt.Blockwise("dynamic4", block_size=128).bytes_per_element() == pytest.approx(0.5 + 4 / 128)
    leaf = adaopt.Blockwise("dynamic4", block_size=128, min_size=0).init(jnp.zeros((10, 50)), signed=True)
    assert leaf.codes.nbytes == 256 and leaf.scale.shape == (4,)  # 500 elements: four blocks, two codes a byte


def test_stochastic_rounding_is_unbiased() -> None:
    """The mean of many roundings of one value is that value within its standard error; nearest rounding of
    a value just above a bfloat16 number always returns that number."""
    x = jnp.asarray([1.0 + 2.0**-9, -3.0 - 2.0**-10, 1e-3 * (1 + 2.0**-12), 7.0], jnp.float32)
    draws = 20_000
    rounded = storage.stochastic_round(jnp.broadcast_to(x, (draws, 4)), adaopt.counter_bits((draws, 4), 0, 0))
    values = np.asarray(rounded.astype(jnp.float32), np.float64)
    mean, stderr = values.mean(axis=0), values.std(axis=0) / np.sqrt(draws)
    exact = np.asarray(x, np.float64)
    assert np.all(np.abs(mean - exact) <= 4 * stderr + 1e-12), (mean - exact, stderr)
    assert values[:, 3].std() == 0 and values[0, 3] == 7.0  # representable: never moved
    assert np.all(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))[:2] != exact[:2])


def test_counter_bits_are_uniform_and_uncorrelated_across_elements_steps_and_salts() -> None:
    """The 16 bits that round a value, as a fraction in [0, 1): mean 1/2, and no correlation between neighbouring
    elements, successive counts, two salts (two moments of one leaf) or the two halves of one word, each within
    four standard errors. An unmixed counter (position plus offset) fails the first two, a shared salt the third."""
    counts, size = 64, 4096
    draws = jax.vmap(lambda c, s: adaopt.counter_bits((size,), s, c), in_axes=(0, None))
    words = np.stack([np.asarray(draws(jnp.arange(counts, dtype=jnp.uint32), jnp.uint32(s))) for s in (11, 12)])
    u = (words & 0xFFFF) / 2.0**16
    bound = 4 / np.sqrt(u[0].size)
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
    pairs = {
        "elements": (u[:, :, :-1], u[:, :, 1:]),
        "counts": (u[:, :-1], u[:, 1:]),
        "salts": (u[0], u[1]),
        "halves": (u, (words >> 16) / 2.0**16),
    }
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < bound, (name, r)


def test_stochastic_rounding_takes_a_neighbour_and_keeps_special_values() -> None:
    """Each float32 becomes the bfloat16 toward zero from it or the next one away from zero (the largest finite
    values may go to infinity), away exactly when its 16 dropped bits exceed the draw's low 16; bfloat16 values
    and infinities stay; a NaN stays NaN with its sign, a payload in the dropped bits alone included."""
    rng = np.random.default_rng(0)
    big = np.finfo(np.float32).max
    scale = np.float32(10.0) ** rng.integers(-44, 38, 4000).astype(np.float32)
    x = np.concatenate(
        [rng.standard_normal(4000).astype(np.float32) * scale, np.float32([0.0, -0.0, 1.0, -2.5, 1e-40, -1e-45])]
    )
    x = np.concatenate([x, np.float32([big, -big, np.nextafter(big, 0), 1.0 + 2**-20])])
    raw = x.view(np.uint32)
    for bits in (rng.integers(0, 2**32, x.size, dtype=np.uint32), np.zeros(x.size, np.uint32)):
        got = np.asarray(storage.stochastic_round(jnp.asarray(x), jnp.asarray(bits)))
        toward = (raw & np.uint32(0xFFFF0000)).view(np.float32).astype(jnp.bfloat16)  # exact: no dropped bits
        away = np.nextafter(toward, np.copysign(np.inf, x).astype(jnp.bfloat16))
        want = np.where((bits & 0xFFFF) < (raw & 0xFFFF), away, toward)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.isinf(got[-4:-2]).all()  # bits 0: every inexact value rounds away, the largest to infinity
    same = np.asarray(rng.standard_normal(100), jnp.bfloat16)
    draws = jnp.asarray(rng.integers(0, 2**32, 100, dtype=np.uint32))
    np.testing.assert_array_equal(np.asarray(storage.stochastic_round(jnp.asarray(same), draws)), same)
    special = np.uint32([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xFF80FFFF, 0x7FFFFFFF])
    got = np.asarray(storage.stochastic_round(jnp.asarray(special.view(np.float32)), jnp.zeros(7, jnp.uint32)))
    got = got.astype(np.float32)
    assert list(got[:2]) == [np.inf, -np.inf] and np.isnan(got[2:]).all()
    np.testing.assert_array_equal(np.signbit(got), np.signbit(special.view(np.float32)))


def test_each_moment_of_each_leaf_draws_its_own_bits() -> None:
    """Adam's two moments of three leaves, stored in bfloat16 with stochastic rounding: six distinct salts, so a
    leaf's first and second moments do not round up together (they shared their draws)."""
    params = {"a": jnp.zeros(5), "b": jnp.zeros((2, 3)), "c": jnp.zeros([])}
    state = adaopt.scale_by_adam(mu_dtype="bfloat16_sr", nu_dtype="bfloat16_sr").init(params)
    salts = [
        int(leaf.salt) for moment in (state.mu, state.nu) for leaf in jax.tree.leaves(moment, is_leaf=adaopt.is_stored)
    ]
    assert len(salts) == 6 and len(set(salts)) == 6


@pytest.mark.parametrize(
    "make",
    [
        lambda q: adaopt.ademamix(mu_dtype=q, nu_dtype=q),  # fast and slow averages
        lambda q: adaopt.adan(mu_dtype=q, nu_dtype=q),  # momentum, its difference, the last gradient
        lambda q: adaopt.mars(mu_dtype=q, nu_dtype=q, amsgrad=True),  # the maximum shares nu's draws, by design
        lambda q: adaopt.sophia(mu_dtype=q, nu_dtype=q),
        lambda q: adaopt.adadelta(accumulator_dtype=q),
        lambda q: adaopt.muon(mu_dtype=q),  # two groups: each leaf's index is its place in the tree
    ],
)
def test_each_moment_of_each_leaf_draws_its_own_bits_in_every_optimizer(make) -> None:
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros(5), "c": jnp.zeros((3, 2))}
    state = make("bfloat16_sr").init(params)
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=adaopt.is_stored)
    rounded = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if isinstance(leaf, adaopt.Rounded)]
    drawn = [int(leaf.salt) for path, leaf in rounded if "nu_max" not in path]
    assert len(drawn) >= 3 and len(set(drawn)) == len(drawn), rounded


def test_bfloat16_second_moment_keeps_moving_with_stochastic_rounding() -> None:
    """With b2 = 0.999, an EMA of a constant 1 started at 1/2 never moves in bfloat16 with nearest rounding (each
    step adds 5e-4, under half a bfloat16 step); stochastically rounded, it follows float32's within noise."""
    tx_nearest = adaopt.scale_by_adam(b2=0.999, nu_dtype=jnp.bfloat16, initial_accumulator_value=0.5)
    tx_stochastic = adaopt.scale_by_adam(b2=0.999, nu_dtype="bfloat16_sr", initial_accumulator_value=0.5)
    tx_exact = adaopt.scale_by_adam(b2=0.999, initial_accumulator_value=0.5)
    g = jnp.ones(4096)

    def run(tx):
        state = tx.init(g)
        return jax.lax.fori_loop(0, 500, lambda _, s: tx.update(g, s)[1], state).nu

    nearest, stochastic, exact = run(tx_nearest), run(tx_stochastic), run(tx_exact)
    assert float(jnp.max(nearest.astype(jnp.float32))) == 0.5
    target = float(exact[0])  # 1 - 0.5 * 0.999**500, about 0.697
    assert abs(float(jnp.mean(stochastic.load())) - target) < 2e-3


def test_adafactor_first_moment_takes_a_storage() -> None:
    """Adafactor keeps a first moment only with ``b1`` (not at its defaults, so not in the registry's loop)."""
    params, grads = _tree()
    plain, light = adaopt.adafactor(b1=0.9), adaopt.adafactor(b1=0.9, mu_dtype=SMALL_BLOCKS)
    s_plain, s_light = plain.init(params), light.init(params)
    (core,) = [s for s in s_light if isinstance(s, adaopt.AdafactorState)]
    assert isinstance(core.mu["w"], adaopt.Quantized)
    u_plain, _ = plain.update(grads[0], s_plain, params)
    u_light, _ = light.update(grads[0], s_light, params)
    np.testing.assert_allclose(np.asarray(u_light["w"]), np.asarray(u_plain["w"]), rtol=1e-6)


@pytest.mark.parametrize(("shape", "spec"), [((12,), P("model")), ((4, 12), P(None, "model"))])
def test_4_bit_codes_of_shards_of_odd_length_are_packed_gathered(shape: tuple[int, ...], spec: Any) -> None:
    """Blocks of 4 along an axis of 12 split in 4 (3 elements a shard): the blocks are gathered, and the codes, two a
    byte, could not be packed as the parameter is placed (init failed: "This reshape is not supported"): gathered
    along that axis too. The steps equal the unsharded ones."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    params = {"t": jnp.linspace(-1.0, 1.0, int(np.prod(shape)), dtype=jnp.float32).reshape(shape)}
    tx = adaopt.adam(1e-2, mu_dtype=adaopt.Blockwise("dynamic4", block_size=4, min_size=0))
    step = jax.jit(lambda g, s, p: tx.update(g, s, p), compiler_options=problems.DEFAULT_EMITTERS)

    def run(params: Any) -> Any:
        state = jax.jit(tx.init)(params)
        for _ in range(3):
            updates, state = step(params, state, params)
            params = optax.apply_updates(params, updates)
        return params

    plain = run(params)
    with jax.set_mesh(mesh):
        sharded = run({"t": jax.device_put(params["t"], NamedSharding(mesh, spec))})
    np.testing.assert_allclose(np.asarray(sharded["t"]), np.asarray(plain["t"]), rtol=1e-6, atol=1e-7)


def _placed_run(tx: optax.GradientTransformation, params: Any, grads: list, place: Any) -> tuple[Any, Any]:
    """``tx``'s jitted steps from ``place(params)``, each gradient placed alike: the last parameters and state."""
    step = jax.jit(lambda g, s, p: tx.update(g, s, p), compiler_options=problems.DEFAULT_EMITTERS)
    params = place(params)
    state = tx.init(params)
    for g in grads:
        updates, state = step(place(g), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", ["adopt", "prodigy", "dadapt_adam"])
def test_flat_stored_moments_step_beside_a_sharded_gradient(name: str) -> None:
    """A (64, 320) leaf split by columns: 320 is no multiple of int4's block (128), so its codes are stored flat and
    replicated, and decoded replicated; ADOPT's, Prodigy's and D-Adapt Adam's jnp.where between the decoded moment and
    the sharded gradient's arrays was refused ("select cases must have the same shardings"). The decoded moment takes
    the gradient's sharding; the steps equal the unsharded ones."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(64, 320)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(64, 320)), jnp.float32)} for _ in range(3)]
    tx = getattr(adaopt, name)(1e-2, mu_dtype="int4")
    plain, _ = _placed_run(tx, params, grads, lambda tree: tree)
    with jax.set_mesh(mesh):
        place = lambda tree: {"w": jax.device_put(tree["w"], NamedSharding(mesh, P(None, "model")))}
        sharded, _ = _placed_run(tx, params, grads, place)
    np.testing.assert_allclose(np.asarray(sharded["w"]), np.asarray(plain["w"]), rtol=1e-6, atol=1e-7)


# Leaves on a 4 x 2 mesh, their sharding, and per storage the shape and sharding of their scales: w's rows of 512
# are split in halves of whole blocks; v's last block is partial (flattened, gathered); u's rows are shorter than a
# block, so it is blocked along both axes merged, each shard of its rows holding whole blocks; t's last axis is split
# in halves shorter than an 8-bit block (gathered for its blocks) but of one 4-bit block; c, a convolution kernel,
# is blocked along its last two axes for 8-bit blocks (its last alone for 4-bit ones), its third split in shards of
# whole blocks; a, an attention kernel (model dimension, heads, head dimension), is blocked along its last two, its
# heads split in shards of 6 x 64 elements: one and a half 8-bit blocks (gathered), three 4-bit ones.
LAYOUTS = {
    "w": (
        (64, 512),
        P("data", "model"),
        {"int8": ((64, 2), P("data", "model")), "int4": ((64, 4), P("data", "model"))},
    ),
    "v": ((4100,), P(), {"int8": ((17,), P()), "int4": ((33,), P())}),
    "u": ((64, 64), P("data", None), {"int8": ((16,), P("data")), "int4": ((32,), P("data"))}),
    "t": ((16, 256), P(None, "model"), {"int8": ((16, 1), P()), "int4": ((16, 2), P(None, "model"))}),
    "c": (
        (3, 3, 64, 128),
        P(None, None, "data", None),
        {"int8": ((3, 3, 32), P(None, None, "data")), "int4": ((3, 3, 64, 1), P(None, None, "data"))},
    ),
    "a": (
        (48, 12, 64),
        P("data", "model", None),
        {"int8": ((48, 3), P("data", None)), "int4": ((48, 6), P("data", "model"))},
    ),
}
ALIGNED = {"int8": ("w", "u", "c"), "int4": ("w", "u", "t", "c", "a")}  # every block within one shard


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_a_mesh_axis_of_one_device_on_a_leafs_blocks(kind: str) -> None:
    """Leaves whose trailing axes hold one block a row, split on them over a mesh axis of one device (an 8 x 1 mesh):
    each shard holds whole blocks, and the split kept through the reshape into blocks landed on the blocks' elements,
    where init's and the step's gathers of a block's first element were refused ("Use `.at[...].get(out_sharding=)`").
    The trivial split is dropped there; the steps equal the unsharded ones (FP8's to a last bit: XLA contracts the
    sharded program's multiply-adds otherwise)."""
    mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    rng = np.random.default_rng(3)
    specs = {"rows": P(None, None, "model"), "kernel": P(None, None, "data", "model")}
    params = {
        "rows": jnp.asarray(rng.normal(size=(2, 64, 256)), jnp.float32),
        "kernel": jnp.asarray(rng.normal(size=(3, 3, 64, 128)), jnp.float32),
    }
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
    tx = adaopt.adamw(1e-2, mu_dtype=kind, nu_dtype=kind)
    plain = jax.tree.leaves(_placed_run(tx, params, grads, lambda tree: tree))
    with jax.set_mesh(mesh):
        place = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
        sharded = jax.tree.leaves(_placed_run(tx, params, grads, place))
    for a, b in zip(sharded, plain, strict=True):
        if kind == "fp8" and a.dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_step_gathers_the_codes_of_blocks_that_its_shards_split() -> None:
    """Rows of 256 split in halves over the model axis: each 8-bit block straddles two shards, and the step gathers
    the moments' blocks to read them: their codes (a byte an element; it gathered the decoded values, four bytes).
    Writing the new moments gathers their values, whose blocks' maxima it needs."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    tx = adaopt.adamw(1e-2, mu_dtype="int8", nu_dtype="int8")
    with jax.set_mesh(mesh):
        params = {"t": jax.device_put(jnp.ones((16, 256)), NamedSharding(mesh, P(None, "model")))}
        hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    gathered = re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", hlo)
    assert sorted(gathered) == ["f32", "f32", "u8", "u8"], gathered


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_state_shards_like_the_parameters(kind: str) -> None:
    """On a 4 x 2 mesh with explicit axes (:data:`LAYOUTS`): the codes take each leaf's sharding, the scales (and
    4-bit codes) its leading axes' and its first trailing axis's where its shards hold whole blocks, none straddling
    two shards; the step of the leaves whose blocks lie within shards gathers nothing; a moment filled with a value
    other than 0 is placed so too; and the steps equal the unsharded ones bit for bit."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    rng = np.random.default_rng(2)
    specs = {k: spec for k, (_, spec, _) in LAYOUTS.items()}
    params = {k: jnp.asarray(rng.normal(size=shape), jnp.float32) for k, (shape, _, _) in LAYOUTS.items()}
    grads = [{k: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for k, x in params.items()} for _ in range(3)]
    tx = adaopt.adamw(1e-2, mu_dtype=kind, nu_dtype=kind)
    plain_params, plain_state = _placed_run(tx, params, grads, lambda tree: tree)
    with jax.set_mesh(mesh):

        def place(tree: dict) -> dict:
            return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}

        sharded_params, sharded_state = _placed_run(tx, params, grads, place)
        # A moment that starts at a value other than 0 (AdaGrad's accumulator) is encoded from a fill that keeps
        # the parameter's sharding too.
        adagrad = adaopt.adagrad(1e-2, initial_accumulator_value=0.1, accumulator_dtype=kind)
        filled = optax.tree.get(adagrad.init(place(params)), "AdagradState").sum_of_squares
        # The leaves whose blocks lie within shards: a step without collectives.
        aligned = place({k: params[k] for k in ALIGNED[kind]})
        hlo = jax.jit(tx.update).lower(aligned, tx.init(aligned), aligned).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, sorted(aligned)
    for k, (shape, spec, layouts) in LAYOUTS.items():
        scale_shape, scale_spec = layouts[kind]
        for moment in (optax.tree.get(sharded_state, "AdamState").mu[k], filled[k]):
            if kind == "int8":
                assert moment.codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape)), k
            assert moment.scale.shape == scale_shape, k
            assert moment.scale.sharding.is_equivalent_to(NamedSharding(mesh, scale_spec), len(scale_shape)), k
            if kind == "int4":  # two codes a byte: the scales' axes, the last one's blocks halved
                assert moment.codes.shape == (*scale_shape[:-1], scale_shape[-1] * moment.storage.block_size // 2), k
                assert moment.codes.sharding.is_equivalent_to(NamedSharding(mesh, scale_spec), len(scale_shape)), k
    np.testing.assert_allclose(np.asarray(filled["w"].load()), 0.1, rtol=1e-6)
    sharded, plain = jax.tree.leaves((sharded_params, sharded_state)), jax.tree.leaves((plain_params, plain_state))
    for a, b in zip(sharded, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_storages_are_refused_at_construction() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"block_size must be an integer in \[1, 16777216\], got 0"):
        adaopt.Blockwise(block_size=0)
    with pytest.raises(adaopt.HyperparameterError, match=r"block_size must be an integer in \[1, 16777216\]"):
        adaopt.Blockwise(block_size=2**40, min_size=0)  # a small leaf would be padded to a whole block
    with pytest.raises(adaopt.HyperparameterError, match="block_size must be even for 4-bit"):
        adaopt.Blockwise("dynamic4", block_size=127)
    with pytest.raises(adaopt.HyperparameterError, match="format must be"):
        adaopt.Blockwise("int3")  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match="scale_floor"):
        adaopt.Blockwise(scale_floor=-1.0)
    with pytest.raises(
        adaopt.HyperparameterError, match="nonnegative_map must be 'unsigned' or 'signed', got 'linear'"
    ):
        adaopt.Blockwise(nonnegative_map="linear")  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match="FP8 stores values, with no map"):
        adaopt.Blockwise("fp8", nonnegative_map="signed")
    with pytest.raises(adaopt.HyperparameterError, match="partial_blocks must be True or False, got 'no'"):
        adaopt.Blockwise(partial_blocks="no")  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match="seed"):
        adaopt.StochasticBf16(seed=-1)
    for field in ("block_size", "min_size", "chunk_size"):  # True is not a size
        with pytest.raises(adaopt.HyperparameterError, match=f"{field} must be"):
            adaopt.Blockwise(**{field: True})
    with pytest.raises(adaopt.HyperparameterError, match="seed"):
        adaopt.StochasticBf16(seed=True)
    # NumPy scalars (read from a config array) are numbers like Python's, stored as Python's; np.bool_ is no size.
    numpy_config = adaopt.Blockwise(
        block_size=np.int64(128), min_size=np.int32(0), scale_floor=np.float32(1e-12), chunk_size=np.uint32(1024)
    )
    assert numpy_config == adaopt.Blockwise(
        block_size=128, min_size=0, scale_floor=float(np.float32(1e-12)), chunk_size=1024
    )
    assert type(numpy_config.block_size) is int and type(numpy_config.scale_floor) is float
    assert adaopt.StochasticBf16(seed=np.uint32(2**32 - 1)) == adaopt.StochasticBf16(seed=2**32 - 1)
    with pytest.raises(adaopt.HyperparameterError, match="block_size must be"):
        adaopt.Blockwise(block_size=np.bool_(True))
    # A dtype that cannot hold a moment names the storages that can.
    with pytest.raises(adaopt.HyperparameterError, match=r"mu_dtype.*'int8', 'int4', 'fp8', 'bfloat16_sr'"):
        adaopt.adam(mu_dtype=jnp.int8)
    with pytest.raises(adaopt.HyperparameterError, match="nu_dtype"):
        adaopt.adamw(nu_dtype="int2")


def test_centered_rmsprop_refuses_blockwise_codes_and_keeps_a_rounded_variance_finite() -> None:
    """Centered RMSProp divides by the root of v - m^2, two EMAs stored apart: 8-bit blocks made it NaN within 8 steps
    of a steady gradient, and bfloat16 with stochastic rounding within about 200, where the roundings took the
    variance below 0. Blockwise codes are refused; a variance below 0 is taken as 0."""
    with pytest.raises(adaopt.HyperparameterError, match="nu_dtype='int8' with centered=True"):
        adaopt.rmsprop(1e-3, centered=True, nu_dtype="int8")
    adaopt.rmsprop(1e-3, nu_dtype="int8")
    params = {"w": jnp.zeros((64, 128))}
    g = {"w": jax.random.normal(jax.random.key(0), (64, 128))}
    tx = adaopt.rmsprop(1e-3, centered=True, nu_dtype="bfloat16_sr")

    def run(state: Any, params: Any) -> tuple:
        def body(carry: tuple, _: None) -> tuple:
            state, params = carry
            updates, state = tx.update(g, state, params)
            return (state, optax.apply_updates(params, updates)), None

        return jax.lax.scan(body, (state, params), length=300)[0]

    _, final = jax.jit(run)(tx.init(params), params)
    assert bool(jnp.all(jnp.isfinite(final["w"])))


@pytest.mark.parametrize(
    ("name", "argument"), [("adafactor", "nu_dtype"), ("came", "nu_dtype"), ("sm3", "accumulator_dtype")]
)
@pytest.mark.parametrize("kind", ["int8", "bfloat16_sr"])
def test_factored_statistics_refuse_a_storage_and_say_why(name: str, argument: str, kind: str) -> None:
    """A storage for the factored statistics was refused as "must be a floating dtype or None", with no reason; the
    error now says that they stay floats and that mu_dtype takes any storage (which it does)."""
    with pytest.raises(adaopt.HyperparameterError, match=f"{argument}='{kind}': the factored statistics.*mu_dtype"):
        adaopt.REGISTRY[name].make(**{argument: kind})
    adaopt.REGISTRY[name].make(**{argument: jnp.bfloat16, "mu_dtype": kind})


def test_float16_is_refused_for_squared_gradients_only() -> None:
    """float16's smallest normal number is 6.1e-5, the square of 7.8e-3: a second moment (every ``nu_dtype``,
    AdaGrad's, Adadelta's and SM3's accumulators) of smaller gradients underflows, and AdamW's step with one grew 30
    times too large. Refused there, with bfloat16 named; kept for first moments and momentum buffers."""
    squares = {name: ("nu_dtype",) for name, spec in adaopt.REGISTRY.items()
               if "nu_dtype" in inspect.signature(spec.factory).parameters}  # fmt: skip
    squares |= {"adagrad": ("accumulator_dtype",), "adadelta": ("accumulator_dtype",), "sm3": ("accumulator_dtype",)}
    assert len(squares) > 20
    for name, arguments in squares.items():
        for argument in arguments:
            with pytest.raises(adaopt.HyperparameterError, match=f"{argument} cannot be float16.*bfloat16"):
                adaopt.REGISTRY[name].make(**{argument: jnp.float16})
            adaopt.REGISTRY[name].make(**{argument: jnp.bfloat16})
    adaopt.adam(mu_dtype=jnp.float16)
    adaopt.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.float16)
    adaopt.rmsprop(0.1, momentum=0.9, accumulator_dtype=jnp.float16)


@pytest.mark.parametrize("kind", ["int8", "bfloat16_sr"])
def test_complex_parameters_cannot_be_stored_in_a_storage(kind: str) -> None:
    params = {"z": jnp.ones((64, 64), jnp.complex64)}
    with pytest.raises(TypeError, match="complex parameter"):
        adaopt.adam(mu_dtype=kind).init(params)


def test_zero_size_scalar_and_none_leaves_keep_plain_moments() -> None:
    params = {"z": jnp.zeros((0, 300)), "s": jnp.ones(()), "n": None, "w": jnp.ones((300, 256))}
    tx = adaopt.adamw(1e-3, mu_dtype=adaopt.Blockwise(min_size=0), nu_dtype="int8")
    state = tx.init(params)
    mu = optax.tree.get(state, "AdamState").mu
    assert isinstance(mu["w"], adaopt.Quantized) and mu["z"].dtype == jnp.float32 and mu["s"].shape == ()
    grads = {"z": jnp.zeros((0, 300)), "s": jnp.ones(()), "n": None, "w": jnp.ones((300, 256))}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["z"].shape == (0, 300) and bool(jnp.all(jnp.isfinite(updates["w"])))


def test_a_format_is_one_string() -> None:
    """An array of formats failed with its ambiguous truth value; a NumPy string is stored as a str."""
    with pytest.raises(adaopt.HyperparameterError, match=r"^format must be 'dynamic8', 'dynamic4' or 'fp8', got array"):
        adaopt.Blockwise(format=np.array(["dynamic8", "linear8"]))  # type: ignore[arg-type]
    config = adaopt.Blockwise(format=np.str_("dynamic4"))  # type: ignore[arg-type]
    assert type(config.format) is str and config == adaopt.Blockwise("dynamic4")
