"""Quantized moments computed chunk by chunk under ``jit`` (``adaopt._src.storage.step_leaf``): the same steps and
stored moments as whole leaves, a compiled step whose peak memory is below float32's, the fallback where the
moments are not elementwise, and the one-lookup search of the nearest entry, exact where it can fail."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt._src import storage

# Blocked by rows with a strided last chunk (34 = 2 x 17 rows), by rows in 3-d, flattened with a partial last block
# (1617 = 7 * 7 * 33), and one leaf under min_size. With chunk_size 300 every quantized leaf takes a loop.
SHAPES = {"rows": (34, 64), "cube": (3, 5, 128), "flat": (7, 7, 33), "small": (10,)}
CHUNK = 300


def _blocks(fmt: str, chunk_size: int | None) -> adaopt.Blockwise:
    return adaopt.Blockwise(fmt, block_size=32 if fmt == "dynamic4" else 64, min_size=64, chunk_size=chunk_size)


@functools.cache
def _contracts() -> bool:
    """Whether XLA:CPU contracts ``a * b + c`` into fused multiply-adds here (not at the suite's optimization level 0):
    it does so within a kernel, so the chunks' kernels may round the last bit of a few values differently."""
    a, b = jnp.linspace(0.1, 0.9, 1000), jnp.linspace(0.7, 0.2, 1000)
    fused = np.asarray(jax.jit(lambda a, b: 0.9 * a + 0.1 * b)(a, b))
    return bool(np.any(fused != np.float32(0.9) * np.asarray(a) + np.float32(0.1) * np.asarray(b)))


def _problem(shapes: dict) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [
        {k: jnp.asarray(rng.normal(size=s) * np.exp(rng.normal(size=s)), jnp.float32) for k, s in shapes.items()}
        for _ in range(3)
    ]
    return params, grads


def _trajectory(tx: optax.GradientTransformationExtraArgs, shapes: dict = SHAPES) -> tuple[list, str]:
    """Three jitted steps: the final (params, state) leaves and the lowered step's program text."""
    params, grads = _problem(shapes)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.asarray(1.0)))
    state = tx.init(params)
    text = step.lower(grads[0], state, params).as_text()
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.leaves((params, state)), text


CASES = {
    # Two storages of different blocks in one leaf's loop (by rows and flattened).
    "adamw_int8_int4": lambda kind: adaopt.adamw(1e-2, mu_dtype=kind("dynamic8"), nu_dtype=kind("dynamic4")),
    # A bfloat16 moment read in the loop, and stored whole.
    "adamw_int8_bf16": lambda kind: adaopt.adamw(1e-2, mu_dtype=kind("dynamic8"), nu_dtype="bfloat16_sr"),
    # AMSGrad's maximum is stored like the second moment; LAMB's step needs the whole leaf (its trust ratio);
    # Prodigy's moments are gated by whole-tree estimates; Lion's one moment in FP8.
    "amsgrad_int8": lambda kind: adaopt.amsgrad(1e-2, mu_dtype=kind("dynamic8"), nu_dtype=kind("dynamic8")),
    "lamb_int8": lambda kind: adaopt.lamb(1e-2, mu_dtype=kind("dynamic8"), nu_dtype=kind("dynamic8")),
    "prodigy_int4": lambda kind: adaopt.prodigy(mu_dtype=kind("dynamic4"), nu_dtype=kind("dynamic4")),
    "lion_fp8": lambda kind: adaopt.lion(1e-3, mu_dtype=kind("fp8")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_moments_and_steps_equal_whole_leaves(case: str) -> None:
    """Chunks of 300 elements (a loop over each quantized leaf) give the trajectory of whole leaves: parameters,
    codes and scales bit for bit, but for the last bit of a few values (XLA:CPU compiles the same operations of the
    two programs differently now and then, even a leaf's outside the loops; more so where it contracts
    multiply-adds)."""
    chunked, text = _trajectory(CASES[case](lambda fmt: _blocks(fmt, CHUNK)))
    whole, whole_text = _trajectory(CASES[case](lambda fmt: _blocks(fmt, None)))
    assert text.count("stablehlo.while") >= 3 and "stablehlo.while" not in whole_text  # each quantized leaf loops
    for a, b in zip(chunked, whole, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        if not _contracts():
            if a.dtype in (np.float32, np.float64):  # a chunk's misplaced rows would be far apart
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
            else:
                np.testing.assert_array_equal(a, b)
        elif np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-3, atol=1e-6)


def test_moments_that_are_not_elementwise_keep_the_whole_leaf() -> None:
    """MARS clips a matrix's corrected gradient by its norm before its moments: no chunks, the same program."""
    mars = functools.partial(adaopt.mars, 1e-2)
    matrices = {k: s for k, s in SHAPES.items() if len(s) > 1}
    chunked, text = _trajectory(
        mars(mu_dtype=_blocks("dynamic8", CHUNK), nu_dtype=_blocks("dynamic8", CHUNK)), matrices
    )
    whole, _ = _trajectory(mars(mu_dtype=_blocks("dynamic8", None), nu_dtype=_blocks("dynamic8", None)), matrices)
    assert "stablehlo.while" not in text
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _peak(tx: optax.GradientTransformation, shapes: dict) -> tuple[int, int]:
    """(peak bytes, temporaries) of the jitted update and apply, parameters and state donated (benchmarks/memory.py)."""

    def step(params: dict, state: object, grads: dict) -> tuple:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, shapes)
    memory = jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile().memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return peak - memory.alias_size_in_bytes, memory.temp_size_in_bytes


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantized_step_peaks_below_float32(kind: str) -> None:
    """The compiled step of quantized AdamW needs less memory than float32 AdamW's: its working set is the copy of
    the largest leaf's old codes (the step reads them after the loop overwrote them) and a few chunks, not float32
    copies of every leaf."""
    shapes = {f"w{i}": jax.ShapeDtypeStruct((1024, 512), jnp.float32) for i in range(4)}
    shapes["b"] = jax.ShapeDtypeStruct((512,), jnp.float32)
    peak32, _ = _peak(adaopt.adamw(1e-3), shapes)
    peak, temporaries = _peak(adaopt.adamw(1e-3, mu_dtype=kind, nu_dtype=kind), shapes)
    largest = 1024 * 512
    chunk = storage.DEFAULT_CHUNK_SIZE
    # Two moments' codes of the largest leaf (FP8's also as bits), and float32 chunks.
    assert temporaries <= 2 * 2 * largest + 16 * 4 * chunk, (temporaries, largest)
    assert peak < 0.75 * peak32, (peak, peak32)


def test_chunk_size_is_checked() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"chunk_size must be a positive integer .* got 0"):
        adaopt.Blockwise(chunk_size=0)
    assert adaopt.Blockwise(chunk_size=None).chunk_size is None


@pytest.mark.parametrize(
    "qmap",
    [
        adaopt.dynamic_map(True),
        adaopt.dynamic_map(False),
        adaopt.dynamic_map(True, total_bits=4, max_exponent_bits=3),
        adaopt.linear_map(4),
    ],
    ids=["signed8", "unsigned8", "signed4", "linear4"],
)
def test_nearest_index_is_exact_at_every_midpoint_and_range_edge(qmap: np.ndarray) -> None:
    """The one-lookup search against the count of float32 midpoints below ``x`` (the nearest entry, ties to the lower
    one): at every float within 3 units in the last place of each midpoint, at the first and last float of every
    16-bit prefix (where the table's entries change), and at random values. (The quantizer searches finite values in
    [-1, 1]; for NaN and -inf, the search keeps the guess of the range, as it did with two comparisons.)"""
    midpoints = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
    near = (midpoints.view(np.int32)[:, None] + np.arange(-3, 4)[None, :]).astype(np.int32).view(np.float32)
    prefixes = np.arange(1 << 16, dtype=np.uint32) << 16
    edges = np.concatenate([prefixes, prefixes | 0xFFFF]).view(np.float32)
    rng = np.random.default_rng(0)
    random = (rng.normal(size=20_000) * np.exp(rng.normal(size=20_000) * 4)).astype(np.float32)
    x = np.concatenate([near.reshape(-1), edges, random, np.float32([0.0, -0.0, 1.0, -1.0])])
    x = x[np.isfinite(x)]
    expected = np.searchsorted(midpoints, x, side="left")  # midpoints strictly below x
    ours = np.asarray(jax.jit(lambda v: storage.nearest_index(v, qmap))(jnp.asarray(x))).astype(int)
    np.testing.assert_array_equal(ours, expected)
