"""How a moment is stored between steps: float32, 8-bit or 4-bit blocks, FP8 blocks, bfloat16 with stochastic rounding.

A storage is a property of the state, not of an algorithm: every optimizer that takes
``mu_dtype`` / ``nu_dtype`` accepts one of these in their place, and its step reads each moment
back in float32, computes as usual, and writes the new moment through the same
storage. The step is taken from the new moments *before* they are re-quantized,
as bitsandbytes and torchao do.

Blockwise quantization (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
ICLR 2022): a leaf is cut into blocks of ``block_size`` consecutive elements in row-major order
(the last one may be shorter); each block keeps its largest magnitude
(``scale``, float32) and each element the index of the nearest value of a 256-entry (8-bit) or
16-entry (4-bit) map of [-1, 1] to the element divided by that scale. The first moment uses a
signed map, the second moment (and anything else that is never negative) an unsigned one.
Leaves smaller than ``min_size`` stay in float32, as in both reference packages.

=================  ======================================  ==========================================
storage            maps (signed / unsigned), block         reference
=================  ======================================  ==========================================
``"int8"``         dynamic 8-bit / dynamic 8-bit, 256      ``bitsandbytes`` ``Adam8bit`` & co.,
                                                           ``torchao.optim.AdamW8bit``
``"int4"``         dynamic 4-bit / linear 1/16..1, 128     ``torchao.optim.AdamW4bit``
``"fp8"``          float8_e4m3fn of x / (absmax / 448)     ``torchao.optim.AdamWFp8``
``"bfloat16_sr"``  bfloat16, stochastically rounded        ``torchao.optim._AdamW(bf16_stochastic_round)``
=================  ======================================  ==========================================

Layout and sharding: a leaf whose last axis is a multiple of the block size is blocked along that
axis (the same blocks as in row-major order): its codes (8-bit, FP8) have its shape, 4-bit codes
its shape with the last axis halved, and its scales its leading axes and one entry per block
along the last, so all of them shard with the parameter (created with its sharding, and kept
there step after step). On a mesh, a block then never straddles two shards as long as each
shard of the last axis is a multiple of the block size. Any other leaf is flattened in row-major
order, its last block possibly partial, with one vector of scales; under an explicit sharding it
is gathered for its blocks and its codes placed back as the parameter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adaopt._src.base import HyperparameterError, StoredLeaf, is_stored

# --------------------------------------------------------------------------- maps


def dynamic_map(signed: bool, *, total_bits: int = 8, max_exponent_bits: int = 7) -> np.ndarray:
    r"""The dynamic quantization map (Dettmers, 2015): ``2**total_bits`` sorted float32 values in [-1, 1] or [0, 1].

    Decade :math:`i` (:math:`10^{i - e + 1}`, :math:`i = 0..e-1` for ``max_exponent_bits``
    :math:`e`) holds the midpoints of an even split of [0.1, 1] into :math:`2^{i + b - e}` parts
    (signed, both signs; :math:`b` = ``total_bits`` - 1) or :math:`2^{i + b - e + 1}` parts
    (unsigned), scaled by the decade; 0 and 1 complete the map. The values are computed in
    float64 and rounded once to float32. bitsandbytes (``create_dynamic_map``) and torchao build
    the same values in float32 arithmetic (``torch.linspace``), so up to a few dozen entries of
    theirs differ from these by 1 or 2 units in the last place; no entry is closer to another
    entry than to its counterpart here.

    Example:
      >>> import adaopt
      >>> m = adaopt.dynamic_map(signed=True)
      >>> m.shape, round(float(m.min()), 6), float(m.max()), int((m == 0).sum())
      ((256,), -0.992969, 1.0, 1)
    """
    sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        parts = 2 ** (i + sign_bits - max_exponent_bits + (0 if signed else 1))
        edges = 0.1 + 0.9 * np.arange(parts + 1) / parts
        means = 10.0 ** (i - max_exponent_bits + 1) * (edges[:-1] + edges[1:]) / 2
        values += list(means) + (list(-means) if signed else [])
    extra = 2 ** (sign_bits - max_exponent_bits) - 1  # mantissa-only values where the exponent bits run out
    if extra > 0:
        edges = 0.1 + 0.9 * np.arange(extra + 1) / extra
        means = 10.0 ** (max_exponent_bits - max_exponent_bits) * (edges[:-1] + edges[1:]) / 2
        values += list(means) + (list(-means) if signed else [])
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


def linear_map(total_bits: int = 4) -> np.ndarray:
    """``2**total_bits`` evenly spaced values from ``1 / 2**total_bits`` to 1 (no zero): torchao's 4-bit map of the second moment."""
    n = 2**total_bits
    return (np.arange(1, n + 1, dtype=np.float64) / n).astype(np.float32)


@functools.cache
def _lookup(qmap: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The midpoints of a sorted map (exact, in float64) and a first guess of the entry per float32 prefix.

    The guess for a float is the number of midpoints below the smallest float sharing its top 16
    bits (sign, exponent and 7 bits of mantissa). Such a range spans less than 1% of its values,
    which holds at most two midpoints of a map whose neighbours differ by at least 0.4% of their
    value; comparisons from the guess then land on the nearest entry, ties to the lower.
    """
    values = np.asarray(qmap, np.float32).astype(np.float64)
    midpoints = (values[:-1] + values[1:]) / 2  # exact: a float32 sum fits in a float64
    prefixes = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = prefixes.view(np.float32).copy()
    negative = (prefixes >> 31).astype(bool)
    lows[negative] = (prefixes[negative] | 0xFFFF).view(np.float32)  # the most negative float of the range
    lows = np.nan_to_num(lows, nan=0.0)
    guess = np.searchsorted(midpoints.astype(np.float32), lows, side="left").astype(np.uint8)
    return np.append(midpoints, np.inf), guess


def nearest_index(x: jax.Array, qmap: np.ndarray) -> jax.Array:
    """The index (uint8) of the entry of the sorted ``qmap`` nearest to each ``x`` (ties to the lower one).

    Float32 ``x`` is compared with the midpoints rounded to float32 (where bitsandbytes compares
    the two distances in float32: the same up to a tie within rounding); float64 ``x`` with the
    exact midpoints.
    """
    midpoints, guess = _lookup(tuple(float(v) for v in qmap))
    wide = x.dtype == jnp.float64
    x32 = x.astype(jnp.float32)
    prefix = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(x32, jnp.uint32), jnp.uint32(16))
    index = _take(jnp.asarray(guess), prefix).astype(jnp.int32)
    if wide:  # x rounded to float32 may have crossed one midpoint upward
        index = jnp.maximum(index - 1, 0)
    mids = jnp.asarray(midpoints.astype(np.float64 if wide else np.float32))
    for _ in range(3 if wide else 2):
        index = index + (x > _take(mids, index))
    return index.astype(jnp.uint8)


# --------------------------------------------------------------------------- stored leaves


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized(StoredLeaf):
    """A moment leaf stored in blocks: ``codes`` and one float32 ``scale`` per block.

    Reads as an array of ``shape`` and ``dtype`` float32: ``load`` dequantizes it, ``astype``
    dequantizes and casts, so an optimizer's step reads it like any moment.

    Attributes:
      codes: uint8 indices into the map (8-bit: the leaf's shape; 4-bit: two per byte, the last
        axis halved, or flat), or the float8 values (FP8, the leaf's shape).
      scale: float32 per block: its largest magnitude (FP8: that divided by 448); the leading
        axes and one per block along the last, or one vector (:meth:`Blockwise.by_rows`).
      storage: the :class:`Blockwise` storage that wrote it.
      signed: whether the signed map is used (first moments) or the unsigned one.
      shape: the leaf's shape.
    """

    codes: jax.Array
    scale: jax.Array
    storage: Blockwise = dataclasses.field(metadata={"static": True})
    signed: bool = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    dtype: ClassVar[np.dtype] = np.dtype(np.float32)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"Quantized({self.storage.format}, block {self.storage.block_size}, {kind}, shape={self.shape})"

    def load(self, dtype: Any = jnp.float32) -> jax.Array:
        """The values, dequantized in ``dtype`` (float32, or float64 for a float64 step)."""
        return self.storage.decode(self, dtype)

    def astype(self, dtype: Any) -> jax.Array:
        return self.load(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rounded(StoredLeaf):
    """A moment leaf stored in bfloat16 with stochastic rounding: the values and the counter of its draws.

    Attributes:
      value: the bfloat16 values.
      salt: a uint32 that tells this leaf's draws from every other leaf's (from the seed and its position).
      count: the stores so far (uint32): each store draws the bits of :func:`counter_bits` at
        ``(salt, count)``, so the draws are pure functions of the state.
      storage: the :class:`StochasticBf16` storage that wrote it.
    """

    value: jax.Array
    salt: jax.Array
    count: jax.Array
    storage: StochasticBf16 = dataclasses.field(metadata={"static": True})

    dtype: ClassVar[np.dtype] = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def size(self) -> int:
        return int(self.value.size)

    @property
    def ndim(self) -> int:
        return int(self.value.ndim)

    def load(self, dtype: Any = jnp.float32) -> jax.Array:
        return self.value.astype(dtype)

    def astype(self, dtype: Any) -> jax.Array:
        return self.load(dtype)


__all__ = ["is_stored"]  # re-exported from base, where the tree checks use it


# --------------------------------------------------------------------------- storages


Format = Literal["dynamic8", "dynamic4", "fp8"]
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Blockwise:
    """Blockwise quantized storage of a moment: 8-bit or 4-bit codes into a map, or FP8 values, with a scale per block.

    Args:
      format: ``"dynamic8"`` (8-bit codes; signed and unsigned dynamic maps, bitsandbytes and
        torchao's 8-bit optimizers), ``"dynamic4"`` (4-bit codes, two per byte; the 4-bit
        signed dynamic map for first moments and the linear map 1/16..1 for second moments,
        torchao's ``AdamW4bit``) or ``"fp8"`` (float8_e4m3fn values of the element divided by
        absmax / 448, torchao's ``AdamWFp8``).
      block_size: elements per block, > 0 (even for 4-bit codes).
      min_size: leaves with fewer elements stay in float32 (both packages: 4096). torchao also
        keeps in float32 a leaf whose size is not a multiple of the block; here, as in
        bitsandbytes, its last block is partial.
      scale_floor: the scale is at least this (torchao clips its scales at 1e-12; bitsandbytes
        does not clip, and a block of zeros is stored as zeros either way).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> storage = adaopt.Blockwise("dynamic8", min_size=0)
      >>> leaf = storage.init(jnp.zeros(300), signed=True)
      >>> leaf.codes.dtype, leaf.scale.shape  # two blocks of 256, the second one partial
      (dtype('uint8'), (2,))
    """

    format: Format = "dynamic8"
    block_size: int = 256
    min_size: int = 4096
    scale_floor: float = 0.0

    def __post_init__(self) -> None:
        if self.format not in ("dynamic8", "dynamic4", "fp8"):
            raise HyperparameterError(f"format must be 'dynamic8', 'dynamic4' or 'fp8', got {self.format!r}.")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise HyperparameterError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if self.format == "dynamic4" and self.block_size % 2:
            raise HyperparameterError(
                f"block_size must be even for 4-bit codes (two per byte, never across blocks), got {self.block_size}."
            )
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise HyperparameterError(f"min_size must be a non-negative integer, got {self.min_size!r}.")
        if not (isinstance(self.scale_floor, (int, float)) and 0 <= self.scale_floor < 1e-3):
            raise HyperparameterError(f"scale_floor must be a number in [0, 1e-3), got {self.scale_floor!r}.")

    # The map of a signed or unsigned moment (None for FP8).
    def qmap(self, signed: bool) -> np.ndarray | None:
        if self.format == "dynamic8":
            return dynamic_map(signed)
        if self.format == "dynamic4":
            return dynamic_map(True, total_bits=4, max_exponent_bits=3) if signed else linear_map(4)
        return None

    def bytes_per_element(self) -> float:
        """State bytes per element of a quantized leaf, scales included."""
        code_bytes = 0.5 if self.format == "dynamic4" else 1.0
        return code_bytes + 4.0 / self.block_size

    def quantizes(self, param: Any) -> bool:
        """Whether a leaf like ``param`` is stored quantized (else float32)."""
        return int(np.size(param)) >= max(self.min_size, 1)

    def by_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether a leaf of ``shape`` is blocked along its last axis, a multiple of the block size.

        Its blocks are then the same elements as in row-major order, and its scales keep the
        leading axes (``(*shape[:-1], shape[-1] // block_size)``), so they shard with them.
        Otherwise the leaf is flattened in row-major order (the last block may be partial) and
        its scales are one vector.
        """
        return len(shape) >= 1 and shape[-1] % self.block_size == 0

    def init(self, param: jax.Array, *, signed: bool, index: int = 0) -> jax.Array | Quantized:
        """A zero moment for ``param``: quantized if it is large enough, else zeros in its dtype (at least float32).

        ``index`` (the leaf's position in the tree) is for the storages that draw random numbers; unused here.
        """
        del index
        if jnp.issubdtype(jnp.result_type(param), jnp.complexfloating):
            raise TypeError(
                "A complex parameter's moment cannot be stored in quantized blocks: pass a float dtype (or None) for "
                "the moments of complex parameters, or train them as real pairs with adaopt.as_real_imag."
            )
        if not self.quantizes(param):
            return jnp.zeros_like(param, dtype=jnp.promote_types(jnp.result_type(param), jnp.float32))
        shape = tuple(np.shape(param))
        codes = jnp.zeros_like(param, dtype=jnp.uint8)  # the parameter's sharding
        if self.by_rows(shape):
            scale = self._blocks(codes, shape)[..., 0].astype(jnp.float32)  # sharded as the leading axes
            if self.format == "dynamic4":
                codes = codes.reshape(*shape[:-1], shape[-1] // 2, 2)[..., 0]
        else:
            scale = jnp.zeros((-(-int(np.size(param)) // self.block_size),), jnp.float32)
            if self.format == "dynamic4":
                codes = jnp.zeros((scale.size * self.block_size // 2,), jnp.uint8)
        if self.format == "fp8":
            codes = codes.astype(jnp.float8_e4m3fn)
        return Quantized(codes, scale, self, signed, shape)

    def _blocks(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """``x`` (of ``shape``, or flat) as blocks along a new last axis: by rows, or flattened and padded."""
        if self.by_rows(shape):
            return x.reshape(*shape[:-1], shape[-1] // self.block_size, self.block_size)
        flat = _unsharded(x).reshape(-1)
        pad = -flat.size % self.block_size
        return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(-1, self.block_size)

    def _unblocked(self, blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        n = int(np.prod(shape))
        flat = blocks.reshape(-1) if not self.by_rows(shape) else blocks
        if not self.by_rows(shape) and flat.size != n:
            flat = flat[:n]
        return flat.reshape(shape)

    def decode(self, leaf: Quantized, dtype: Any = jnp.float32) -> jax.Array:
        """The values of ``leaf`` in ``dtype``: each entry (or FP8 value) times its block's scale."""
        codes = leaf.codes
        if self.format == "fp8":
            values = codes.astype(dtype)
        else:
            if self.format == "dynamic4":
                codes = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], -1)
            values = _take(jnp.asarray(self.qmap(leaf.signed), dtype), codes)
        blocks = self._blocks(values, leaf.shape)
        return self._unblocked(blocks * leaf.scale.astype(dtype)[..., None], leaf.shape)

    def encode(self, value: jax.Array, leaf: Quantized) -> Quantized:
        """``value`` (any float dtype, computed in at least float32) quantized like ``leaf``."""
        dtype = jnp.promote_types(value.dtype, jnp.float32)
        blocks = self._blocks(value.astype(dtype), leaf.shape)
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        scale = (absmax / FP8_MAX if self.format == "fp8" else absmax).astype(jnp.float32)
        if self.scale_floor:
            scale = jnp.maximum(
                scale, np.float32(self.scale_floor / FP8_MAX if self.format == "fp8" else self.scale_floor)
            )
        normed = blocks / jnp.where(scale > 0, scale, 1).astype(dtype)[..., None]
        if self.format == "fp8":
            codes = _like(self._unblocked(_to_e4m3(normed), leaf.shape), leaf.codes)
            return Quantized(codes, scale, self, leaf.signed, leaf.shape)
        qmap = self.qmap(leaf.signed)
        assert qmap is not None
        index = nearest_index(jnp.clip(normed, -1, 1), qmap)
        if self.format == "dynamic4":  # two codes a byte, along the blocks (never across two)
            pairs = index.reshape(*index.shape[:-1], self.block_size // 2, 2)
            packed = (pairs[..., 0] << 4) | pairs[..., 1]
            codes = packed.reshape(leaf.codes.shape)
        else:
            codes = _like(self._unblocked(index, leaf.shape), leaf.codes)
        return Quantized(codes, scale, self, leaf.signed, leaf.shape)


def _sharding_spec(x: jax.Array) -> Any:
    """The explicit sharding in ``x``'s type (a mesh with explicit axes), or None."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    return spec if spec is not None and any(axis is not None for axis in spec) else None


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for a small replicated table, placed as ``index`` (which an explicit sharding needs said)."""
    if _sharding_spec(index) is None:
        return table[index]
    return table.at[index].get(out_sharding=jax.typeof(index).sharding)


def _unsharded(x: jax.Array) -> jax.Array:
    """``x`` gathered whole when its type carries an explicit sharding: flattening it has no sharding to keep."""
    return x if _sharding_spec(x) is None else jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` placed as ``like`` (explicit shardings), so the state keeps its type from step to step."""
    spec = _sharding_spec(like)
    return x if spec is None or _sharding_spec(x) == spec else jax.sharding.reshard(x, spec)


def _to_e4m3(x: jax.Array) -> jax.Array:
    """``x`` rounded to the nearest float8_e4m3fn (ties to even), from float32 or float64 in one rounding.

    XLA converts float64 to float8 through float32, which rounds twice: a value within float32's
    precision of a midpoint between two float8 numbers can land on the wrong one. In float64 the
    rounding to 4 significant bits (subnormal spacing 2**-9 below 2**-6) is done here, exactly.
    """
    if x.dtype != jnp.float64:
        return x.astype(jnp.float8_e4m3fn)
    _, exponent = jnp.frexp(x)
    exponent = jnp.maximum(exponent, -5)  # 2**-6 is the smallest normal: below it the spacing is fixed
    return jnp.ldexp(jnp.round(jnp.ldexp(x, 4 - exponent)), exponent - 4).astype(jnp.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class StochasticBf16:
    """bfloat16 storage with stochastic rounding: unbiased in expectation, so small EMA steps are not lost.

    Rounding to nearest loses every change smaller than half a bfloat16 step (1/256 of the
    value): a second moment with ``b2 = 0.999`` then stops moving. Rounding up with probability
    equal to the discarded fraction keeps the expectation exact (``E[round(x)] = x``). The
    random bits come from a counter kept in each leaf (:func:`counter_bits`), so the step stays
    pure under ``jit``, costs a few integer operations per element, and a checkpoint resumes the
    same draws.

    Args:
      seed: the seed of the draws (each leaf also mixes in its position in the tree).
    """

    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise HyperparameterError(f"seed must be an integer in [0, 2**32), got {self.seed!r}.")

    def init(self, param: jax.Array, *, signed: bool, index: int = 0) -> Rounded:
        del signed
        if jnp.issubdtype(jnp.result_type(param), jnp.complexfloating):
            raise TypeError(
                "A complex parameter's moment cannot be stored in bfloat16: there is no complex bfloat16. Pass "
                "float32 (stored as complex64) or None."
            )
        salt = jnp.asarray(_mix(self.seed * 0x9E3779B1 + index + 1), jnp.uint32)
        return Rounded(jnp.zeros_like(param, dtype=jnp.bfloat16), salt, jnp.zeros([], jnp.uint32), self)

    def encode(self, value: jax.Array, leaf: Rounded) -> Rounded:
        bits = counter_bits(value.shape, leaf.salt, leaf.count)
        return Rounded(stochastic_round(value, bits), leaf.salt, leaf.count + jnp.uint32(1), self)


def _mix(x: int) -> int:
    """A 32-bit integer hash (the lowbias32 finaliser), in Python: distinct salts for nearby seeds and indices."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


Storage = Blockwise | StochasticBf16

ALIASES: dict[str, Storage] = {
    "int8": Blockwise("dynamic8", block_size=256),
    "int4": Blockwise("dynamic4", block_size=128),
    "fp8": Blockwise("fp8", block_size=256),
    "bfloat16_sr": StochasticBf16(),
}


def resolve(spec: Any) -> Storage | None:
    """The storage named or given by ``spec`` (a name of :data:`ALIASES` or a storage), or None for a plain dtype."""
    if isinstance(spec, (Blockwise, StochasticBf16)):
        return spec
    if isinstance(spec, str) and spec in ALIASES:
        return ALIASES[spec]
    return None


# --------------------------------------------------------------------------- stochastic rounding


def counter_bits(shape: tuple[int, ...], salt: Any, count: Any) -> jax.Array:
    """Uniform uint32 bits of ``shape``, a pure function of (element, ``salt``, ``count``): counter-based randomness.

    Each element's position, the salt and the count are combined and passed through a 32-bit
    integer hash (lowbias32: two multiply-xorshift rounds), which is a few vectorised integer
    operations per element, against a hundred for a threefry draw on a CPU. Not for
    cryptography; its bits are uniform and independent enough to round numbers.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> bits = adaopt.counter_bits((4,), jnp.uint32(7), jnp.uint32(0))
      >>> bits.dtype, bool((bits != adaopt.counter_bits((4,), jnp.uint32(7), jnp.uint32(1))).all())
      (dtype('uint32'), True)
    """
    size = int(np.prod(shape))
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    base = jnp.asarray(count, jnp.uint32) * jnp.uint32(0x85EBCA6B) + jnp.asarray(salt, jnp.uint32)
    h = index * jnp.uint32(0x9E3779B9) + base
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def stochastic_round(x: jax.Array, bits: jax.Array) -> jax.Array:
    """``x`` rounded to bfloat16 up or down at random, with the probability that makes the expectation exact.

    The float32 bits are kept to their top 16 (rounding toward zero) and one is added to them
    with probability equal to the 16 dropped bits over 2**16 (the low 16 of ``bits``, uniform
    uint32 of ``x``'s shape: :func:`counter_bits`, or ``jax.random.bits(key, x.shape,
    jnp.uint32)``), which is the distance to the value below in units of the bfloat16 step, for
    either sign (torchao's scheme). bfloat16 values, infinities and NaN are unchanged.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> x = jnp.full(10_000, 1 + 2**-9)  # a quarter of the way from 1 to the next bfloat16, 1 + 2**-7
      >>> r = adaopt.stochastic_round(x, adaopt.counter_bits(x.shape, 0, 0))
      >>> round(float((r == 1 + 2**-7).mean()), 2)
      0.25
    """
    x32 = x.astype(jnp.float32)
    raw = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    up = (bits.astype(jnp.uint32) & jnp.uint32(0xFFFF)) < (raw & jnp.uint32(0xFFFF))
    rounded = (raw & jnp.uint32(0xFFFF0000)) + jnp.where(up, jnp.uint32(0x10000), jnp.uint32(0))
    out = jnp.where(jnp.isfinite(x32), jax.lax.bitcast_convert_type(rounded, jnp.float32), x32)
    return out.astype(jnp.bfloat16)
