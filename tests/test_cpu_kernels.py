"""adaopt.enable_cpu_kernels: Adam's and Lion's steps with quantized moments (8-bit, 4-bit, FP8) by hand-written XLA:CPU
kernels equal XLA's.

Each step is compared from the same state (XLA's trajectory, the kernel's step taken from each of its states), so
that a difference shows where it arises instead of compounding. The kernel computes in float32 operation for
operation as XLA's traced step, with XLA's fused multiply-adds and its division by a block's scale as a product
by its reciprocal (read off XLA:CPU's chunked step at its default options): differences remain where another
compilation contracts otherwise (this suite compiles at a lower optimisation level), a last bit of a moment, and
through it, rarely, a code one entry of the map away. The reference packages' own runs are in
tests/test_storage_bnb.py (bitsandbytes' Adam8bit, AdamW8bit and Lion8bit with the kernels on) and
tests/test_storage_torchao.py (torchao's AdamW8bit, AdamW4bit and AdamWFp8).
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adaopt
from adaopt._src import storage
from adaopt._src.layouts import cpu_kernels as kernels
from tests import problems

pytestmark = pytest.mark.usefixtures("cpu_kernels")

INT8 = "int8"
# By rows, chunked (64 x 4096 is above a chunk); by rows, whole (below it); flat with a partial last block,
# chunked; flat, whole; 3-d by rows; 3-d along its last two axes (rows of 768 for blocks of 256; by rows for 128);
# a leaf too small to quantize.
SHAPES = {
    "loop": (64, 4096), "rows": (40, 512), "flat": (4096 * 40 + 77,), "short": (5000,), "cube": (3, 8, 512),
    "heads": (8, 6, 128),
}  # fmt: skip
SMALL = {"tiny": (7, 3)}
# XLA:CPU's defaults, which tests/conftest.py lowers for speed.
DEFAULT_OPTIONS = {"xla_backend_optimization_level": 3, **problems.DEFAULT_EMITTERS}


def _problem(shapes: dict, seed: int, steps: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    # Rows of mixed scales, as a model's gradients: the blocks' range matters to the codes.
    grads = [
        {k: jnp.asarray(rng.standard_normal(s) * np.exp(rng.normal(size=s[:1] + (1,) * (len(s) - 1))), jnp.float32)
         for k, s in shapes.items()}
        for _ in range(steps)
    ]  # fmt: skip
    return params, grads


def _uses_kernel(tx: optax.GradientTransformation, params: dict, grads: dict, target: str = kernels.TARGET) -> int:
    """How many leaves of a step take the kernel ``target``: its custom calls in the lowered program."""
    text = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
    return text.count(target)


def _compiled(make, params: dict, grads: dict, *, kernel: bool, target: str = kernels.TARGET, options=None):
    """A new optimizer's ``update`` compiled with the kernels on or off, then left on. The switch is read when a
    step is traced, and JAX reuses a function's trace: each side needs a function of its own."""
    (adaopt.enable_cpu_kernels if kernel else adaopt.disable_cpu_kernels)()
    tx = make()
    compiled = jax.jit(tx.update).lower(grads, tx.init(params), params).compile(compiler_options=options)
    adaopt.enable_cpu_kernels()
    assert (target in compiled.as_text()) == kernel
    return compiled


def _stored(state: object) -> list:
    return jax.tree.leaves(state, is_leaf=adaopt.is_stored)


def _codes(leaf: adaopt.Quantized) -> np.ndarray:
    """A quantized leaf's codes as integers: FP8 values as their bits (one apart: neighbours of one sign), 4-bit
    codes each (two a byte)."""
    codes = np.asarray(leaf.codes).view(np.uint8).astype(int)
    if leaf.storage.format == "dynamic4":
        return np.stack([codes >> 4, codes & 0xF], axis=-1)
    return codes


def _compare_from_xla_states(make, params: dict, grads: list[dict], target: str = kernels.TARGET) -> dict[str, float]:
    """Each step of XLA's trajectory and the kernel's step from the same state; returns the worst differences."""
    tx = make()
    xla, native = (_compiled(make, params, grads[0], kernel=on, target=target) for on in (False, True))
    state, worst = tx.init(params), {"update": 0.0, "codes": 0.0, "codes by more than one": 0.0, "scale": 0.0}
    for g in grads:
        u_xla, s_xla = xla(g, state, params)
        u_native, s_native = native(g, state, params)
        for k in u_xla:  # a NaN on one side only is no difference of a last bit (max() would drop it)
            theirs, ours = np.asarray(u_xla[k]), np.asarray(u_native[k])
            finite = np.isfinite(theirs)
            np.testing.assert_array_equal(np.isfinite(ours), finite)
            scale = float(np.max(np.abs(theirs[finite]), initial=0.0)) or 1.0
            difference = float(np.max(np.abs(ours[finite] - theirs[finite]), initial=0.0))
            worst["update"] = max(worst["update"], difference / scale)
        for a, b in zip(_stored(s_xla), _stored(s_native), strict=True):
            if isinstance(a, adaopt.Quantized):
                steps = np.abs(_codes(a) - _codes(b))
                worst["codes"] = max(worst["codes"], float(np.mean(steps > 0)))
                worst["codes by more than one"] = max(worst["codes by more than one"], float(np.mean(steps > 1)))
                theirs, ours = np.asarray(a.scale), np.asarray(b.scale)
                same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))  # zero blocks: 0 / 0
                ratio = np.where(same, 0.0, np.abs(ours / np.where(same, 1.0, theirs) - 1))
                worst["scale"] = max(worst["scale"], float(np.max(ratio)))
            else:
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        state = s_xla
    return worst


def _assert_close(worst: dict[str, float]) -> None:
    assert worst["update"] < 1e-5 and worst["scale"] < 1e-6, worst
    assert worst["codes"] < 1e-3 and worst["codes by more than one"] == 0, worst


ADAM_CASES = {
    "adamw": lambda q: adaopt.adamw(1e-3, 0.9, 0.999, 1e-8, weight_decay=0.1, mu_dtype=q, nu_dtype=q),
    "adam, other betas": lambda q: adaopt.adam(3e-3, 0.8, 0.95, 1e-6, mu_dtype=q, nu_dtype=q),
    "eps 0 (a zero denominator gives 0)": lambda q: adaopt.adam(1e-3, eps=0.0, mu_dtype=q, nu_dtype=q),
    "eps_root": lambda q: adaopt.adam(1e-3, eps_root=1e-10, mu_dtype=q, nu_dtype=q),
    "eps on the raw root (Hugging Face's)": lambda q: adaopt.scale_by_adam(
        eps=1e-6, eps_on_raw_root=True, mu_dtype=q, nu_dtype=q
    ),
    "no bias correction": lambda q: adaopt.scale_by_adam(bias_correction=False, mu_dtype=q, nu_dtype=q),
    "blocks of 64, floored scales": lambda q: adaopt.adam(
        1e-3,
        mu_dtype=adaopt.Blockwise(storage.ALIASES[q].format, block_size=64, scale_floor=1e-12),
        nu_dtype=adaopt.Blockwise(storage.ALIASES[q].format, block_size=64, scale_floor=1e-12),
    ),
    "blocks of 48 (AVX-512's 8-bit codes looked up 16 at a time, not 64)": lambda q: adaopt.adam(
        1e-3, mu_dtype=adaopt.Blockwise(block_size=48), nu_dtype=adaopt.Blockwise(block_size=48)
    ),
    "blocks of 24 (AVX2's vector path, AVX-512's scalar one)": lambda q: adaopt.adam(
        1e-3, mu_dtype=adaopt.Blockwise(block_size=24), nu_dtype=adaopt.Blockwise(block_size=24)
    ),
    "traced hyperparameters": lambda q: optax.inject_hyperparams(adaopt.adam, static_args=("mu_dtype", "nu_dtype"))(
        learning_rate=1e-3, b1=0.85, b2=0.99, mu_dtype=q, nu_dtype=q
    ),
}
# Every case with 8-bit moments; the 4-bit and FP8 kernels share all but the codes' reading and writing.
LIGHTER = ("adamw", "eps 0 (a zero denominator gives 0)", "blocks of 64, floored scales", "traced hyperparameters")


@pytest.mark.parametrize(
    "name, fmt", [(name, INT8) for name in ADAM_CASES] + [(name, fmt) for fmt in ("int4", "fp8") for name in LIGHTER]
)
def test_each_step_equals_xlas_from_the_same_state(name: str, fmt: str) -> None:
    make = lambda: ADAM_CASES[name](fmt)
    params, grads = _problem(SHAPES | SMALL, seed=len(name), steps=6)
    assert _uses_kernel(make(), params, grads[0]) == len(SHAPES)  # every quantized leaf, not the tiny one
    _assert_close(_compare_from_xla_states(make, params, grads))


@pytest.mark.parametrize(
    "name, make",
    [
        ("lion", lambda: adaopt.lion(1e-4, 0.9, 0.99, weight_decay=0.1, mu_dtype=INT8)),
        ("lion, other betas", lambda: adaopt.scale_by_lion(0.95, 0.98, mu_dtype=INT8)),
        ("lion, blocks of 128", lambda: adaopt.scale_by_lion(mu_dtype=adaopt.Blockwise(block_size=128))),
        ("lion, 4-bit", lambda: adaopt.lion(1e-4, 0.9, 0.99, weight_decay=0.1, mu_dtype="int4")),
        (
            "lion, FP8, floored scales",
            lambda: adaopt.scale_by_lion(mu_dtype=adaopt.Blockwise("fp8", scale_floor=1e-12)),
        ),
    ],
)
def test_each_lion_step_equals_xlas_from_the_same_state(name: str, make) -> None:
    params, grads = _problem(SHAPES | SMALL, seed=len(name), steps=6)
    assert _uses_kernel(make(), params, grads[0], kernels.LION_TARGET) == len(SHAPES)
    worst = _compare_from_xla_states(make, params, grads, kernels.LION_TARGET)
    # The step is a sign: a last-bit difference of an interpolation at zero could flip one, which none did here.
    assert worst["update"] == 0 and worst["scale"] < 1e-6, worst
    assert worst["codes"] < 1e-3 and worst["codes by more than one"] == 0, worst


@pytest.mark.parametrize("fmt", [INT8, "int4", "fp8"])
def test_bit_for_bit_with_xlas_step_at_its_default_options_on_leaves_chunked_by_rows(fmt: str) -> None:
    """At XLA:CPU's default optimisation level (this suite compiles at 0), whose fused multiply-adds the kernel
    makes, Adam's and Lion's steps of a leaf chunked by rows equal XLA's byte for byte: the steps, codes and scales.
    (The kernel's Adam moments of 8-bit and 4-bit codes had the other form: a last bit of a quarter of the scales.)"""
    params, grads = _problem({"loop": SHAPES["loop"]}, seed=9, steps=3)
    for make, target in [
        (lambda: adaopt.scale_by_adam(mu_dtype=fmt, nu_dtype=fmt), kernels.TARGET),
        (lambda: adaopt.scale_by_lion(mu_dtype=fmt), kernels.LION_TARGET),
    ]:
        xla, native = (
            _compiled(make, params, grads[0], kernel=on, target=target, options=DEFAULT_OPTIONS) for on in (False, True)
        )
        state = make().init(params)
        for g in grads:
            ours, theirs = native(g, state, params), xla(g, state, params)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
                np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
            state = theirs[1]


def test_fp8_codes_round_ties_to_even_as_float8() -> None:
    """With b1 = 0 the first moment is the gradient, and a block whose largest magnitude is 448 has the scale 1: its
    codes are the gradient's float8_e4m3fn values (ml_dtypes' rounding), here the midpoints between neighbouring
    FP8 numbers, normal and subnormal, of both signs, and the floats on either side of each."""
    finite = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(finite[np.isfinite(finite) & (finite >= 0)])
    middles = (grid[:-1] + grid[1:]) / 2
    values = np.concatenate([middles, np.nextafter(middles, 0), np.nextafter(middles, np.inf)])
    values = np.concatenate([values, -values])
    values = np.pad(values, (0, -values.size % 255)).reshape(-1, 255)
    blocks = np.concatenate([np.full((len(values), 1), 448.0, np.float32), values], axis=1)
    rows = np.resize(blocks, (16, 256))  # whole blocks: the vector path
    flat = np.concatenate([rows.reshape(-1), blocks[0, :100]])  # with a partial last block: the scalar path
    grads = {"rows": jnp.asarray(rows), "flat": jnp.asarray(flat)}
    tx = adaopt.scale_by_adam(b1=0.0, mu_dtype="fp8", nu_dtype="fp8")
    assert _uses_kernel(tx, grads, grads) == 2
    _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    for k, g in grads.items():
        expected = np.asarray(g).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        np.testing.assert_array_equal(np.asarray(state.mu[k].codes).view(np.uint8), expected)


@pytest.mark.parametrize("fmt", [INT8, "int4"])
def test_codes_are_the_nearest_entries_at_and_beside_every_midpoint(fmt: str) -> None:
    """As above for the maps: with b1 = 0 a block whose largest magnitude is 1 stores the gradient's nearest entries
    of the signed map, here each midpoint between neighbouring entries (a tie: the lower entry), the floats on either
    side of it, the entries themselves and a NaN, each as ``storage.nearest_index`` (XLA's step) finds it; in whole
    blocks (the vector path: the 4-bit map searched in registers, the 8-bit map by arithmetic with AVX-512, its search
    table near a midpoint) and a partial last block (the scalar path: the search table)."""
    blockwise = storage.ALIASES[fmt]
    qmap = blockwise.qmap(True)
    middles = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
    values = np.concatenate(
        [middles, np.nextafter(middles, -np.inf), np.nextafter(middles, np.inf), qmap, [np.nan, -0.0]]
    ).astype(np.float32)
    block = blockwise.block_size
    values = np.pad(values, (0, -values.size % (block - 1))).reshape(-1, block - 1)
    blocks = np.concatenate([np.ones((len(values), 1), np.float32), values], axis=1)
    rows = np.resize(blocks, (max(blockwise.min_size // block, len(blocks)), block))  # quantized: min_size or more
    flat = np.concatenate([rows.reshape(-1), blocks[0, :100]])
    grads = {"rows": jnp.asarray(rows), "flat": jnp.asarray(flat)}
    tx = adaopt.scale_by_adam(b1=0.0, mu_dtype=fmt, nu_dtype=fmt)
    assert _uses_kernel(tx, grads, grads) == 2
    _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    for k, g in grads.items():
        stored = state.mu[k]
        np.testing.assert_array_equal(np.asarray(stored.scale), 1.0)
        expected = np.asarray(storage.nearest_index(g.reshape(-1), qmap)).astype(int)
        np.testing.assert_array_equal(_codes(stored).reshape(-1)[: g.size], expected)


def test_8bit_codes_found_by_arithmetic_are_the_search_tables_for_every_float() -> None:
    """With AVX-512 the kernel codes an 8-bit moment by arithmetic on its map's runs of equally spaced entries (Search8
    in blockwise_adam.cc), and by the search table only where a float lies too near a midpoint: for either map, every
    float32 in [-4, 4], the largest ones, the infinities and every NaN (over 2**31 floats) gets the table's code of
    the float clipped to [-1, 1], and for the unsigned map (the second moment's, from 0 up) so does the search's
    unsigned form. A build without AVX-512 has only the table, and says so (-1)."""
    count = kernels._library().AdaoptCodes8Mismatches
    count.restype = ctypes.c_int64
    count.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    macros = kernels.native_macros()
    avx512 = "__AVX512F__" in macros and "__AVX512BW__" in macros
    maps, tables = kernels._tables("dynamic8")
    for qmap, table in zip(maps, tables, strict=True):
        qmap, table = np.ascontiguousarray(qmap, np.float32), np.ascontiguousarray(table, np.uint32)
        assert count(qmap.ctypes.data, table.ctypes.data) == (0 if avx512 else -1)


def test_second_moments_of_the_linear_map_take_the_nearest_entry_at_its_midpoints() -> None:
    """The 4-bit second moment's map of sixteenths, whose codes the AVX-512 kernel computes as ceil(16 x - 1.5)
    rather than by a search: with b2 = 0 a block whose largest gradient is 1 stores g * g over a scale of 1, here each
    midpoint and each float beside one that is a float32 square, each as ``storage.nearest_index`` finds it (a tie: the
    lower entry)."""
    qmap = storage.linear_map(4)
    middles = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
    targets = np.concatenate([middles, np.nextafter(middles, -np.inf), np.nextafter(middles, np.inf)])
    # For each target, the float32 g nearest its square root and their neighbours whose square rounds to it.
    near = np.sqrt(targets.astype(np.float64)).astype(np.float32)[:, None]
    steps = np.arange(-6, 7, dtype=np.int32)
    candidates = (near.view(np.int32) + steps).view(np.float32)
    roots = candidates[(candidates * candidates) == targets[:, None]]
    assert len(np.intersect1d(roots * roots, middles)) >= 5  # ties, not only their neighbours
    block = storage.ALIASES["int4"].block_size
    values = np.pad(roots, (0, -roots.size % (block - 1))).reshape(-1, block - 1)
    blocks = np.concatenate([np.ones((len(values), 1), np.float32), values], axis=1)
    g = {"rows": jnp.asarray(np.resize(blocks, (4096 // block, block)))}
    tx = adaopt.scale_by_adam(b1=0.0, b2=0.0, mu_dtype="int4", nu_dtype="int4")
    assert _uses_kernel(tx, g, g) == 1
    _, state = jax.jit(tx.update)(g, tx.init(g), g)
    stored = state.nu["rows"]
    np.testing.assert_array_equal(np.asarray(stored.scale), 1.0)
    squares = np.asarray(g["rows"]) * np.asarray(g["rows"])
    expected = np.asarray(storage.nearest_index(jnp.asarray(squares.reshape(-1)), qmap)).astype(int)
    np.testing.assert_array_equal(_codes(stored).reshape(-1), expected)


@pytest.mark.parametrize("fmt", [INT8, "int4", "fp8"])
def test_a_block_of_nan_stays_nan_as_in_xlas_step(fmt: str) -> None:
    """A gradient whose elements 256 to 511 (whole blocks) are NaN, then finite ones, each side on its own trajectory: XLA's reduction gives
    the block the scale -inf (its maximum's identity) and its steps stay NaN; the kernel's, started at 0, recovered."""
    rng = np.random.default_rng(0)
    first = rng.standard_normal(8192).astype(np.float32)
    first[256:512] = np.nan
    grads = [{"w": jnp.asarray(g)} for g in (first, *rng.standard_normal((2, 8192)).astype(np.float32))]
    params = {"w": jnp.zeros(8192)}
    for make, target in [
        (lambda: adaopt.scale_by_adam(mu_dtype=fmt, nu_dtype=fmt), kernels.TARGET),
        (lambda: adaopt.scale_by_lion(mu_dtype=fmt), kernels.LION_TARGET),
    ]:
        runs = []
        for kernel in (False, True):
            step, state = _compiled(make, params, grads[0], kernel=kernel, target=target), make().init(params)
            for g in grads:
                updates, state = step(g, state, params)
            runs.append((np.asarray(updates["w"]), np.asarray(state.mu["w"].scale)))
        (u_xla, scale_xla), (u_kernel, scale_kernel) = runs
        nan_block = 256 // storage.ALIASES[fmt].block_size  # of 256 (int4: of 128, the first of two)
        assert scale_xla[nan_block] == scale_kernel[nan_block] == -np.inf
        np.testing.assert_array_equal(np.isnan(u_kernel), np.isnan(u_xla))
        assert np.isnan(u_xla[256:512]).all() and not np.isnan(u_xla[512:]).any()


@pytest.mark.parametrize("fmt", [INT8, "int4", "fp8"])
def test_zero_and_non_finite_gradients_come_out_as_xlas(fmt: str) -> None:
    params, grads = _problem(SHAPES, seed=3, steps=4)
    grads[0] = jax.tree.map(jnp.zeros_like, grads[0])  # the first step from nothing: eps 0 makes 0 / 0 a 0
    grads[2] = jax.tree.map(
        lambda g: g.reshape(-1).at[:300].set(jnp.nan).at[700].set(jnp.inf).reshape(g.shape), grads[2]
    )
    for eps in (0.0, 1e-8):
        make = lambda eps=eps: adaopt.adam(1e-3, eps=eps, mu_dtype=fmt, nu_dtype=fmt)
        tx = make()
        xla, native = (_compiled(make, params, grads[0], kernel=on) for on in (False, True))
        state = tx.init(params)
        for g in grads:
            (u_x, s_x), (u_n, s_n) = xla(g, state, params), native(g, state, params)
            for k in u_x:  # NaN where XLA has NaN, the same numbers elsewhere (to float32's last bits)
                a, b = np.asarray(u_x[k]), np.asarray(u_n[k])
                np.testing.assert_array_equal(np.isnan(b), np.isnan(a))
                finite = np.isfinite(a)
                scale = np.abs(a[finite]).max(initial=0.0) or 1.0
                np.testing.assert_allclose(b[finite], a[finite], rtol=0, atol=1e-5 * scale)
            for a, b in zip(_stored(s_x), _stored(s_n), strict=True):
                if isinstance(a, adaopt.Quantized):  # the same NaN scales (none: NaN is left out of the maxima)
                    np.testing.assert_array_equal(np.isnan(np.asarray(b.scale)), np.isnan(np.asarray(a.scale)))
                    # and the same codes, a NaN coordinate's included (its clipped value stays NaN on both sides)
                    assert np.mean(_codes(a) != _codes(b)) < 1e-4
            state = s_x


def test_a_sweep_runs_the_kernel_lane_by_lane() -> None:
    params, grads = _problem(SHAPES, seed=4, steps=3)
    rates = jnp.asarray([1e-3, 3e-3, 1e-2])

    def run(lr: jax.Array) -> dict:
        tx = adaopt.adamw(lr, weight_decay=0.01, mu_dtype=INT8, nu_dtype=INT8)
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    adaopt.disable_cpu_kernels()
    xla = jax.jit(jax.vmap(run))(rates)
    adaopt.enable_cpu_kernels()
    batched = jax.jit(jax.vmap(lambda lr: run(lr)))
    assert kernels.TARGET in batched.lower(rates).as_text()
    native = batched(rates)
    for k in xla:
        # From the same start the runs part where a code moves by one entry (~1% of its block's scale): a few
        # coordinates, by a small fraction of how far the step moved them.
        moved = float(jnp.max(jnp.abs(xla[k] - params[k])))
        apart = np.abs(np.asarray(native[k]) - np.asarray(xla[k]))
        assert apart.max() < 0.02 * moved and np.mean(apart > 1e-6) < 1e-4, (apart.max(), moved)


@pytest.mark.parametrize(
    "make",
    [
        lambda: adaopt.amsgrad(1e-3, mu_dtype=INT8, nu_dtype=INT8),  # a third quantized moment: XLA's step
        lambda: adaopt.adabelief(1e-3, mu_dtype=INT8, nu_dtype=INT8),
        lambda: adaopt.adam(1e-3, mu_dtype="int4", nu_dtype="fp8"),  # two formats
        lambda: adaopt.adam(1e-3, mu_dtype=INT8, nu_dtype=jnp.float32),
        lambda: adaopt.adam(1e-3, mu_dtype="bfloat16_sr", nu_dtype="bfloat16_sr"),
        lambda: adaopt.lion(1e-3, mu_dtype="bfloat16_sr"),
        lambda: adaopt.adam(1e-3, mu_dtype=INT8, nu_dtype=adaopt.Blockwise(block_size=128)),  # two storages
        lambda: adaopt.adamw(1e-3, mu_dtype=INT8, nu_dtype=INT8, eps_mode="max"),  # the kernel adds eps
    ],
)
def test_other_steps_keep_xlas(make) -> None:
    params, grads = _problem(SHAPES, seed=5, steps=1)
    tx = make()
    assert _uses_kernel(tx, params, grads[0]) == 0 and _uses_kernel(tx, params, grads[0], kernels.LION_TARGET) == 0


def test_half_precision_gradients_and_explicit_shardings_keep_xlas() -> None:
    tx = adaopt.adam(1e-3, mu_dtype=INT8, nu_dtype=INT8)
    params, grads = _problem({"w": (64, 4096)}, seed=6, steps=1)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert _uses_kernel(tx, half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads[0])) == 0
    assert _uses_kernel(tx, params, grads[0]) == 1
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        sharded = jax.tree.map(lambda x: jax.device_put(x, spec), params)
        assert _uses_kernel(tx, sharded, jax.tree.map(lambda x: jax.device_put(x, spec), grads[0])) == 0
    adaopt.disable_cpu_kernels()  # for steps traced from now on
    fresh = adaopt.adam(1e-3, mu_dtype=INT8, nu_dtype=INT8)
    assert _uses_kernel(fresh, params, grads[0]) == 0 and not adaopt.cpu_kernels_enabled()


def test_a_failed_build_warns_and_keeps_xlas_steps(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("ADAOPT_CACHE_DIR", str(tmp_path))
    kernels._library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no-such-compiler"):
            kernels._library()
    finally:
        kernels._library.cache_clear()
    adaopt.disable_cpu_kernels()
    monkeypatch.setattr(kernels, "_register", lambda: kernels._library())
    with pytest.warns(adaopt.CpuKernelWarning, match="no C\\+\\+ compiler"):
        assert adaopt.enable_cpu_kernels() is False
    assert not adaopt.cpu_kernels_enabled()


@pytest.mark.parametrize("spike", [3e19, 4.5e20])
@pytest.mark.parametrize("moments", ["int8", "int4", "fp8"])
def test_gradients_whose_squares_overflow_keep_their_blocks_finite(moments: str, spike: float) -> None:
    """(1 - b2) g g, as XLA's step (and torch's Adam): a gradient of 3e19 leaves its block's second moment finite,
    where g g made its scale inf and the block's steps NaN. One of 4.5e20 makes it 2e38, above 2**126, whose
    reciprocal is subnormal: 8-bit and 4-bit blocks were stored as zeros, and the next step at that coordinate
    divided its first moment by the root of the next gradient's square alone (a step of 5e17 after gradients of 1)."""
    params = {"w": jnp.zeros((4, 1024))}
    ones = jnp.ones((4, 1024))
    grads = [{"w": ones.at[0, 0].set(spike)}, {"w": ones}, {"w": ones}]
    tx = adaopt.adamw(1e-3, mu_dtype=moments, nu_dtype=moments)
    assert _uses_kernel(tx, params, grads[0]) == 1
    step, state, w = jax.jit(tx.update), tx.init(params), params
    for g in grads:
        updates, state = step(g, state, w)
        w = optax.apply_updates(w, updates)
    assert bool(jnp.all(jnp.isfinite(w["w"]))) and bool(jnp.all(w["w"].ravel()[1:] < 0))
    assert float(jnp.max(jnp.abs(w["w"]))) < 0.1  # Adam's steps are at most about lr / sqrt(1 - b2) each
    stored = float(optax.tree.get(state, "AdamState").nu["w"].load()[0, 0])
    assert stored == pytest.approx(0.001 * spike**2 * 0.999**2, rel=0.15)
