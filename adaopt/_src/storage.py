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

Layout and sharding: a leaf is blocked in row-major order, and along its trailing axes where they hold
whole blocks (:meth:`adaopt.Blockwise.lead_axes`): a leaf whose last axis is a multiple of the block
size is blocked along that axis, a (768, 12, 64) attention kernel along its last two merged (three
blocks of 256 in each of its 768 rows), a (3, 3, 64, 128) convolution's along its last two likewise. Its
codes (8-bit, FP8) have its shape, 4-bit codes its leading axes and the trailing ones merged and halved,
and its scales its leading axes and one entry per block of the trailing ones, so all of them shard with
the parameter's leading axes (created with its sharding, and kept there step after step), and with the
first trailing axis where each of its shards holds whole blocks: a block never straddles two shards.
Where a shard would split blocks (a later axis sharded, or shards of the first trailing axis shorter
than a block or no multiple of it), the trailing axes are gathered for the blocks, the leading axes stay
split, the scales shard with them, and the codes are placed back as the parameter. A leaf whose size is
no multiple of the block size is flattened, its last block partial, with one vector of scales; under an
explicit sharding it is gathered for its blocks and its codes placed back as the parameter (8-bit and
FP8 codes, of its shape; 4-bit codes, a flat vector of half its size, are replicated, as the scales).

Memory of a step: a quantized state saves memory between steps only if the step does not
dequantize every leaf at once. Under ``jit``, each leaf larger than ``chunk_size`` elements has
its new moments computed and quantized in a loop over chunks of whole blocks (``step_leaf`` in this module),
the leaves one after the other, and its step computed from the codes directly, fused with what
follows (the learning rate, ``optax.apply_updates``): the compiled step holds the parameters, the
gradients, the state, a copy of one leaf's old codes and a few float32 chunks (AdamW with 8-bit
moments on a 55 M-parameter tree: about two thirds of float32 AdamW's peak, see
``benchmarks/RESULTS.md``). The loop keeps the blocks and layouts above: by rows, each chunk is
whole rows of the leaf, taken strided across its leading axes, so a sharding of the leading or
last axes stays where it is; a leaf with an explicit sharding, a float64 leaf, and moments that
are not computed coordinate by coordinate (Adafactor's, MARS's clipped ones) are computed whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from adaopt._src.base import (
    HyperparameterError,
    StoredLeaf,
    as_python,
    check_integer,
    is_integer,
    is_real,
    is_stored,
)
from adaopt._src.placement import explicit_spec, reshard, sharded_like, split_axes, whole

# --------------------------------------------------------------------------- maps


def dynamic_map(signed: bool, *, total_bits: int = 8, max_exponent_bits: int = 7) -> np.ndarray:
    r"""The dynamic quantization map (Dettmers, 2015): ``2**total_bits`` sorted float32 values in [-1, 1] or [0, 1].

    Decade :math:`i` (:math:`10^{i - e + 1}`, :math:`i = 0..e-1` for ``max_exponent_bits``
    :math:`e`) holds the midpoints of an even split of [0.1, 1] into :math:`2^{i + b - e}` parts
    (signed, both signs; :math:`b` = ``total_bits`` - 1) or :math:`2^{i + b - e + 1}` parts
    (unsigned), scaled by the decade; 0 and 1 complete the map. The values are computed in
    float64 and rounded once to float32. bitsandbytes (``create_dynamic_map``) and torchao build
    the same values in float32 arithmetic (``torch.linspace``), so some entries of theirs (72 of
    the signed map's 256, 100 of the unsigned map's) differ from these by 1 or 2 units in the last
    place; no entry is closer to another entry than to its counterpart here.

    Example:
      >>> import adaopt
      >>> m = adaopt.dynamic_map(signed=True)
      >>> m.shape, round(float(m.min()), 6), float(m.max()), int((m == 0).sum())
      ((256,), -0.992969, 1.0, 1)
    """
    check_integer("total_bits", total_bits, 1, 16)
    # A larger exponent overfills the map: more than 2**total_bits values.
    check_integer("max_exponent_bits", max_exponent_bits, 0, total_bits - 1)
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
    check_integer("total_bits", total_bits, 1, 16)
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


@functools.cache
def _search_table(qmap: tuple[float, ...]) -> np.ndarray:
    """For each float32 prefix (top 16 bits): :func:`_lookup`'s guess and the one float32 midpoint of its range, as a uint32.

    The index of the entry nearest to a float32 ``x`` (ties to the lower one) is the number of
    midpoints, rounded to float32, below ``x``: those below ``x``'s range (the guess), plus one if
    ``x`` is above the midpoint inside the range. Each range holds at most one of these maps'
    rounded midpoints (checked here), and two floats of one range compare as their low 16 bits,
    in reverse for negative floats, so one lookup and one integer comparison find it. Bits 0-7
    hold the guess, bits 8-23 the midpoint's low 16 bits (complemented in a negative range), or
    0xFFFF, which no float of the range exceeds, where the range holds none.
    """
    midpoints, guess = _lookup(qmap)
    bits = midpoints[:-1].astype(np.float32).view(np.uint32)
    prefix, low = bits >> 16, bits & 0xFFFF
    if len(np.unique(prefix)) != len(prefix):
        raise ValueError(
            "A map with two float32 midpoints between floats sharing their top 16 bits needs a finer table."
        )
    threshold = np.full(1 << 16, 0xFFFF, np.uint32)
    threshold[prefix] = np.where(prefix >> 15, low ^ 0xFFFF, low)
    return guess.astype(np.uint32) | (threshold << 8)


def nearest_index(x: jax.Array, qmap: np.ndarray) -> jax.Array:
    """The index (uint8) of the entry of the sorted ``qmap`` nearest to each ``x`` (ties to the lower one).

    Float32 ``x`` is compared with the midpoints rounded to float32 (where bitsandbytes compares
    the two distances in float32: the same up to a tie within rounding), in one lookup of
    :func:`_search_table` by its top 16 bits and one comparison of its low 16 bits; float64 ``x``
    with the exact midpoints, from :func:`_lookup`'s guess.
    """
    key = tuple(float(v) for v in qmap)
    if x.dtype != jnp.float64:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        low = (bits & 0xFFFF) ^ ((bits >> 31) * np.uint32(0xFFFF))  # a negative float's order reversed
        # entry - low * 256 keeps the guess in its low 8 bits and is negative (wraps) iff low > the threshold:
        # the entry read once, so that XLA:CPU fuses the lookup into its one consumer.
        y = _take(jnp.asarray(_search_table(key)), bits >> 16) - (low << 8)
        return ((y & 0xFF) + (y >> 31)).astype(jnp.uint8)
    midpoints, guess = _lookup(key)
    prefix = jax.lax.shift_right_logical(
        jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32), jnp.uint32(16)
    )
    # x rounded to float32 may have crossed one midpoint upward
    index = jnp.maximum(_take(jnp.asarray(guess), prefix).astype(jnp.int32) - 1, 0)
    mids = jnp.asarray(midpoints)
    for _ in range(3):
        index = index + (x > _take(mids, index))
    return index.astype(jnp.uint8)


# --------------------------------------------------------------------------- stored leaves


@dataclasses.dataclass(frozen=True)
class Quantized(StoredLeaf):
    """A moment leaf stored in blocks: ``codes`` and one float32 ``scale`` per block.

    Reads as an array of ``shape`` and ``dtype`` float32: ``load`` dequantizes it, ``astype``
    dequantizes and casts, so an optimizer's step reads it like any moment.

    Attributes:
      codes: uint8 indices into the map (8-bit: the leaf's shape; 4-bit: two per byte, the leading
        axes and the trailing ones merged and halved, or flat), or the float8 values (FP8, the leaf's shape).
      scale: float32 per block: its largest magnitude (FP8: that divided by 448); the leading
        axes and one per block of the trailing ones, or one vector (:meth:`Blockwise.lead_axes`).
      storage: the :class:`Blockwise` storage that wrote it.
      signed: whether the signed map is used (first moments) or the unsigned one.
      shape: the leaf's shape.

    As a pytree its children are ``codes`` and ``scale``, under the keys ``codes`` (8-bit and 4-bit)
    or ``fp8_codes`` (FP8): a checkpoint's paths tell the formats apart, so restoring FP8 values into
    an 8-bit state, or the reverse (arrays of one shape and one byte each, which orbax would cast
    silently), is a structure mismatch. The other fields are static.
    """

    codes: jax.Array
    scale: jax.Array
    storage: Blockwise
    signed: bool
    shape: tuple[int, ...]

    dtype: ClassVar[np.dtype] = np.dtype(np.float32)

    @property
    def fp8_codes(self) -> jax.Array:
        """``codes``, by the name of their key path for FP8."""
        return self.codes

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


def _quantized_children(leaf: Quantized) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    codes = jax.tree_util.GetAttrKey("fp8_codes" if leaf.storage.format == "fp8" else "codes")
    children = ((codes, leaf.codes), (jax.tree_util.GetAttrKey("scale"), leaf.scale))
    return children, (leaf.storage, leaf.signed, leaf.shape)


def _quantized_flat(leaf: Quantized) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    children, static = _quantized_children(leaf)
    return tuple(child for _, child in children), static


jax.tree_util.register_pytree_with_keys(
    Quantized, _quantized_children, lambda static, children: Quantized(*children, *static), _quantized_flat
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rounded(StoredLeaf):
    """A moment leaf stored in bfloat16 with stochastic rounding: the values and the counter of its draws.

    Attributes:
      value: the bfloat16 values.
      salt: a uint32 that tells this leaf's draws from every other leaf's (from the seed, its position and
        whether it is a first or a second moment; a running maximum stored through the second moment's leaf,
        as AMSGrad's, shares that leaf's draws, so the two round alike where they are equal).
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
MAX_BLOCK_SIZE = 1 << 24  # elements a block's scale may cover: 64 MiB of float32
DEFAULT_CHUNK_SIZE = 1 << 17
"""Elements of a leaf quantized at a time under ``jit`` (:attr:`Blockwise.chunk_size`): 512 KiB of float32 per array of a
chunk, which stay in a core's second-level cache; smaller chunks spend more time in the loop's own overhead."""


@dataclasses.dataclass(frozen=True)
class Blockwise:
    r"""Blockwise quantized storage of a moment: 8-bit or 4-bit codes into a map, or FP8 values, with a scale per block.

    Args:
      format: ``"dynamic8"`` (8-bit codes; signed and unsigned dynamic maps, bitsandbytes and
        torchao's 8-bit optimizers), ``"dynamic4"`` (4-bit codes, two per byte; the 4-bit
        signed dynamic map for first moments and the linear map 1/16..1 for second moments,
        torchao's ``AdamW4bit``) or ``"fp8"`` (float8_e4m3fn values of the element divided by
        absmax / 448, torchao's ``AdamWFp8``).
      block_size: elements per block, in [1, 2**24] (even for 4-bit codes).
      min_size: leaves with fewer elements stay in float32 (both packages: 4096).
      partial_blocks: whether a leaf whose size is no multiple of the block size is quantized, its last
        block partial (bitsandbytes'), or kept in float32 (False: torchao's).
      scale_floor: the scale is at least this (torchao clips its scales at 1e-12; bitsandbytes
        does not clip, and a block of zeros is stored as zeros either way).
      chunk_size: under ``jit``, a larger leaf's new moments are computed and quantized this many
        elements at a time (rounded to whole blocks), so that a step's float32 working set is a few
        chunks rather than whole leaves (``adaopt._src.storage.step_leaf``); None computes each leaf whole. The
        operations, and so the numbers, do not depend on it (up to where XLA:CPU contracts
        ``a * b + c`` into fused multiply-adds, which depends on its kernels).
      nonnegative_map: the map of the moments that are never negative (second moments, accumulators, running
        maxima) for 8-bit and 4-bit codes: ``"unsigned"`` (the unsigned dynamic map, or the linear one for 4-bit:
        bitsandbytes' two-moment optimizers, torchao's) or ``"signed"``, the map of the first moments, half of whose
        codes such a moment leaves unused (bitsandbytes' ``RMSprop8bit`` and ``Adagrad8bit`` store their
        accumulator so). FP8 values have no map.

    As in bitsandbytes and torchao, a coordinate of a second moment far below its block's
    largest (a gradient that shrank, or one leaf's quiet coordinates) is stored as 0: its next
    Adam step divides by :math:`\sqrt{(1 - \beta_2) g^2}` alone, up to :math:`1 / \sqrt{1 - \beta_2}`
    times float32's step while its first moment is not 0. Smaller blocks, or ``min_size`` above
    the leaves that see such gradients, bound it.

    A NaN (from a NaN gradient) is not kept as float32 moments keep it: XLA's vectorised maximum of a block may
    leave it out, and its code is then that of a number (the block's other values stored as usual), or keep it,
    and the whole block is NaN. The step that met it is NaN either way. Skip such steps with
    ``optax.apply_if_finite``, which keeps a stored state as it was, bit for bit.

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
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    nonnegative_map: Literal["unsigned", "signed"] = "unsigned"
    partial_blocks: bool = True

    def __post_init__(self) -> None:
        # A str: an array (of formats) would compare element by element.
        if not isinstance(self.format, str) or self.format not in ("dynamic8", "dynamic4", "fp8"):
            raise HyperparameterError(f"format must be 'dynamic8', 'dynamic4' or 'fp8', got {self.format!r}.")
        if not is_integer(self.block_size) or not 0 < self.block_size <= MAX_BLOCK_SIZE:
            # A leaf is padded to a whole block: a block far larger than any leaf would allocate its padding.
            raise HyperparameterError(
                f"block_size must be an integer in [1, {MAX_BLOCK_SIZE}], got {self.block_size!r}."
            )
        if self.format == "dynamic4" and self.block_size % 2:
            raise HyperparameterError(
                f"block_size must be even for 4-bit codes (two per byte, never across blocks), got {self.block_size}."
            )
        if not is_integer(self.min_size) or self.min_size < 0:
            raise HyperparameterError(f"min_size must be a non-negative integer, got {self.min_size!r}.")
        if not (is_real(self.scale_floor) and 0 <= self.scale_floor < 1e-3):
            raise HyperparameterError(f"scale_floor must be a number in [0, 1e-3), got {self.scale_floor!r}.")
        if self.chunk_size is not None and (not is_integer(self.chunk_size) or self.chunk_size <= 0):
            raise HyperparameterError(
                f"chunk_size must be a positive integer (elements) or None (whole leaves), got {self.chunk_size!r}."
            )
        if not isinstance(self.nonnegative_map, str) or self.nonnegative_map not in ("unsigned", "signed"):
            raise HyperparameterError(f"nonnegative_map must be 'unsigned' or 'signed', got {self.nonnegative_map!r}.")
        if not isinstance(self.partial_blocks, (bool, np.bool_)):
            raise HyperparameterError(f"partial_blocks must be True or False, got {self.partial_blocks!r}.")
        if self.format == "fp8" and self.nonnegative_map != "unsigned":
            raise HyperparameterError(
                "nonnegative_map chooses among the maps of 8-bit and 4-bit codes; FP8 stores values, with no map: "
                "leave it 'unsigned'."
            )
        as_python(
            self, format=str, block_size=int, min_size=int, scale_floor=float, chunk_size=int, partial_blocks=bool
        )

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
        size = int(np.size(param))
        return size >= max(self.min_size, 1) and (self.partial_blocks or size % self.block_size == 0)

    def lead_axes(self, shape: tuple[int, ...]) -> int | None:
        """The leading axes that a leaf of ``shape`` keeps in its blocks' layout, or None where it is flattened.

        The blocks are the leaf's elements in row-major order, ``block_size`` at a time. Where the trailing axes
        ``shape[k:]`` hold a multiple of the block size, every block lies in one entry of the leading axes
        ``shape[:k]``: the leaf is blocked along its trailing axes, merged, for the largest such ``k`` (the last
        axis alone where it is a multiple of the block size), its scales have the shape ``(*shape[:k], w //
        block_size)`` and its 4-bit codes ``(*shape[:k], w // 2)``, ``w`` the trailing axes' size, so that they
        shard with the leading axes, and with axis ``k`` where each of its shards holds whole blocks. Where no
        ``k`` does (the leaf's size is no multiple of the block size: its last block is partial), the leaf is
        flattened and padded, its scales and 4-bit codes vectors.
        """
        n = math.prod(shape)
        if n % self.block_size:
            return None
        return next((k for k in range(len(shape) - 1, -1, -1) if math.prod(shape[k:]) % self.block_size == 0), None)

    def by_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether a leaf of ``shape`` is blocked along its last axis alone, a multiple of the block size."""
        return len(shape) >= 1 and shape[-1] % self.block_size == 0

    def init(self, param: jax.Array, *, signed: bool, index: int = 0, moment: int = 0) -> jax.Array | Quantized:
        """A zero moment for ``param``: quantized if it is large enough, else zeros in its dtype (at least float32).

        ``signed``: whether the moment may be negative (then stored with the signed map; else with the map
        ``nonnegative_map`` names). ``index`` (the leaf's position in the tree) and ``moment`` (which of an
        optimizer's moments of one kind) are for the storages that draw random numbers; unused here.
        """
        del index, moment
        if jnp.issubdtype(jnp.result_type(param), jnp.complexfloating):
            raise TypeError(
                "A complex parameter's moment cannot be stored in quantized blocks: pass a float dtype (or None) for "
                "the moments of complex parameters, or train them as real pairs with adaopt.as_real_imag."
            )
        if not self.quantizes(param):
            return jnp.zeros_like(param, dtype=jnp.promote_types(jnp.result_type(param), jnp.float32))
        shape = tuple(np.shape(param))
        signed = signed or self.nonnegative_map == "signed"
        codes = jnp.zeros_like(param, dtype=jnp.uint8)  # the parameter's sharding
        lead = self.lead_axes(shape)
        if lead is not None:
            scale = self._blocks(codes, shape)[..., 0].astype(jnp.float32)  # sharded as the leading axes
            if self.format == "dynamic4":  # a byte for two: a shard of odd length is gathered (as for blocks)
                merged = _trailing(codes, lead, 2).reshape(*shape[:lead], -1)
                codes = merged.reshape(*shape[:lead], -1, 2)[..., 0]  # in two steps, for a sharded merged axis
        else:
            scale = jnp.zeros((-(-int(np.size(param)) // self.block_size),), jnp.float32)
            if self.format == "dynamic4":
                codes = jnp.zeros((scale.size * self.block_size // 2,), jnp.uint8)
        if self.format == "fp8":
            codes = codes.astype(jnp.float8_e4m3fn)
        return Quantized(codes, scale, self, signed, shape)

    def _gathered(self, x: jax.Array, shape: tuple[int, ...], per_element: int = 1) -> jax.Array:
        """``x`` (of ``shape``, or of its leading axes and its trailing ones merged, ``per_element`` elements an entry
        of the merged axis: 2 for 4-bit codes) with what its blocks need gathered: the trailing axes where a shard
        would split blocks (:func:`_trailing`), or the whole of a flattened leaf."""
        lead = self.lead_axes(shape)
        return whole(x) if lead is None else _trailing(x, lead, self.block_size // per_element)

    def _blocks(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """``x`` (of ``shape``, of its leading axes and its trailing ones merged, or flat) as blocks along a new last
        axis: along the trailing axes (:meth:`lead_axes`), or flattened and padded."""
        lead = self.lead_axes(shape)
        x = self._gathered(x, shape)
        if lead is not None:
            merged = x.reshape(*shape[:lead], -1)
            return merged.reshape(*shape[:lead], -1, self.block_size)  # in two steps, for a sharded merged axis
        flat = x.reshape(-1)  # flattened: no sharding to keep
        pad = -flat.size % self.block_size
        return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(-1, self.block_size)

    def _unblocked(self, blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        lead = self.lead_axes(shape)
        flat = blocks.reshape(*blocks.shape[:-2], -1)  # the trailing axes merged, or the padded leaf
        if lead is None:
            flat = flat[: math.prod(shape)]
        return flat.reshape(shape)

    def decode(self, leaf: Quantized, dtype: Any = jnp.float32) -> jax.Array:
        """The values of ``leaf`` in ``dtype``: each entry (or FP8 value) times its block's scale."""
        # Where a shard would split blocks, the codes are gathered (a byte, or half a byte, an element), not the
        # values their blocks need (four bytes and more).
        codes = self._gathered(leaf.codes, leaf.shape, 2 if self.format == "dynamic4" else 1)
        qmap = self.qmap(leaf.signed)
        if qmap is None:
            values = _from_e4m3(codes).astype(dtype)
        elif self.format == "dynamic4":  # both entries of a byte in one lookup, in their order in memory
            pairs = np.stack([qmap[np.arange(256) >> 4], qmap[np.arange(256) & 0xF]], axis=-1)
            values = _take(jnp.asarray(pairs, dtype), codes).reshape(*codes.shape[:-1], -1)
        else:
            values = _take(jnp.asarray(qmap, dtype), codes)
        blocks = self._blocks(values, leaf.shape)
        return sharded_like(self._unblocked(blocks * leaf.scale.astype(dtype)[..., None], leaf.shape), leaf.codes)

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
        normed = _over(blocks, jnp.where(scale > 0, scale, 1).astype(dtype))
        if self.format == "fp8":
            codes = sharded_like(self._unblocked(_to_e4m3(normed), leaf.shape), leaf.codes)
            return Quantized(codes, scale, self, leaf.signed, leaf.shape)
        qmap = self.qmap(leaf.signed)
        assert qmap is not None
        index = nearest_index(jnp.clip(normed, -1, 1), qmap)
        if self.format == "dynamic4":  # two codes a byte, along the blocks (never across two)
            pairs = index.reshape(*index.shape[:-1], self.block_size // 2, 2)
            packed = (pairs[..., 0] << 4) | pairs[..., 1]
            codes = sharded_like(packed.reshape(leaf.codes.shape), leaf.codes)
        else:
            codes = sharded_like(self._unblocked(index, leaf.shape), leaf.codes)
        return Quantized(codes, scale, self, leaf.signed, leaf.shape)


def _over(blocks: jax.Array, divisor: jax.Array) -> jax.Array:
    """``blocks`` divided by their blocks' ``divisor``, also where its reciprocal is subnormal.

    XLA divides by a broadcast as a product by the divisor's reciprocal (the CPU kernels too), and XLA:CPU flushes a
    subnormal one to 0: a block whose largest value was above ``2**126`` (a float32 second moment of a gradient
    above 1e20) came out as zeros. There both are divided by 4 first (exactly: the block's values below
    ``2**-124``, which flush, have the code of 0 either way)."""
    dtype = divisor.dtype
    large = divisor > np.asarray(1 / np.finfo(dtype).smallest_normal, dtype)
    # The quarter as a value, not a constant: XLA would cancel a constant's two products.
    quarter = jnp.where(large, np.asarray(0.25, dtype), np.asarray(1, dtype))
    return (blocks * quarter[..., None]) / (divisor * quarter)[..., None]


def _take_placed(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for a small replicated table, placed as ``index`` (which an explicit sharding needs said)."""
    # Every index is in range (codes, prefixes, the guesses): no clamping or fill.
    spec = explicit_spec(index)
    if spec is None:
        return table.at[index].get(mode="promise_in_bounds")
    rows = jax.sharding.PartitionSpec(*spec, *(None,) * (table.ndim - 1))  # a table of rows: each whole
    return table.at[index].get(mode="promise_in_bounds", out_sharding=jax.typeof(index).sharding.update(spec=rows))


@jax.custom_batching.custom_vmap
def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    """:func:`_take_placed`, and under ``vmap`` the same lookup of the batched indices: inside a ``vmap`` the indices'
    type leaves out the mapped axis, so a population split across a mesh's devices gave the gather no placement."""
    return _take_placed(table, index)


@_take.def_vmap
def _take_batched(axis_size: int, in_batched: list[bool], table: jax.Array, index: jax.Array) -> tuple[jax.Array, bool]:
    del axis_size
    if in_batched[0]:  # a table per member: not one of the storages'
        return jax.vmap(_take_placed, in_axes=(0, 0 if in_batched[1] else None))(table, index), True
    return _take(table, index), in_batched[1]  # elementwise in the indices: the batched ones, mapped axis and all


def _trailing(x: jax.Array, lead: int, block_size: int) -> jax.Array:
    """``x`` with its axes from ``lead`` on gathered if their shards would split blocks of ``block_size`` in row-major
    order (a shard of an axis after ``lead``, or shards of axis ``lead`` that hold no whole number of blocks), its
    leading axes as they are: the blocks, their scales and so the state's shapes are those of one device on any mesh,
    and the codes are placed back as the parameter."""
    axes = split_axes(x)
    if all(a is None for a in axes[lead:]):
        return x
    if all(a is None for a in axes[lead + 1 :]):
        names = axes[lead] if isinstance(axes[lead], tuple) else (axes[lead],)
        shards = math.prod(jax.typeof(x).sharding.mesh.shape[name] for name in names)
        # A mesh axis of one device is dropped (for free): JAX would place it on the axis of the blocks' elements
        # where the trailing axes hold one block.
        per_shard, rest = x.shape[lead] // shards, math.prod(x.shape[lead + 1 :])
        if shards > 1 and x.shape[lead] % shards == 0 and per_shard * rest % block_size == 0:
            return x
    return reshard(x, jax.sharding.PartitionSpec(*axes[:lead], *(None,) * (x.ndim - lead)), x)


def _to_e4m3(x: jax.Array) -> jax.Array:
    """``x`` rounded to the nearest float8_e4m3fn (ties to even), from float32 or float64 in one rounding.

    XLA converts float64 to float8 through float32, which rounds twice: a value within float32's
    precision of a midpoint between two float8 numbers can land on the wrong one. In float64 the
    rounding to 4 significant bits (subnormal spacing 2**-9 below 2**-6) is done here, exactly.
    """
    if x.dtype != jnp.float64:
        return jax.lax.bitcast_convert_type(_e4m3_bits(x), jnp.float8_e4m3fn)
    _, exponent = jnp.frexp(x)
    exponent = jnp.maximum(exponent, -5)  # 2**-6 is the smallest normal: below it the spacing is fixed
    return jnp.ldexp(jnp.round(jnp.ldexp(x, 4 - exponent)), exponent - 4).astype(jnp.float8_e4m3fn)


def _e4m3_bits(x: jax.Array) -> jax.Array:
    """The bits (uint8) of float32 ``x`` rounded to float8_e4m3fn, ties to even: ``x.astype(float8_e4m3fn)`` bit for
    bit, every float32 included, in integer arithmetic (XLA:CPU converts element by element in a slow routine).

    From 2**-6 (the smallest normal) the float32 mantissa is rounded to 3 bits (adding 0x7FFFF and the kept
    bits' last one, then dropping 20) and the exponent rebiased from 127 to 7; below it the spacing is
    2**-9, so the code is ``round(|x| * 512)``; above 464 (halfway to 480, which the format lacks) and for
    infinities and NaN it is NaN (0x7F), with the sign bit of ``x``.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    normal = ((magnitude + np.uint32(0x7FFFF) + ((magnitude >> 20) & np.uint32(1))) >> 20) - np.uint32(120 << 3)
    subnormal = jnp.round(jax.lax.bitcast_convert_type(magnitude, jnp.float32) * np.float32(512)).astype(jnp.uint32)
    code = jnp.where(magnitude < np.uint32(0x3C800000), subnormal, normal)  # 2**-6
    code = jnp.where(magnitude > np.uint32(0x43E80000), np.uint32(0x7F), code)  # 464
    return (code | ((bits >> 24) & np.uint32(0x80))).astype(jnp.uint8)


def _from_e4m3(codes: jax.Array) -> jax.Array:
    """float8_e4m3fn ``codes`` as float32, bit for bit ``codes.astype(float32)``, in integer arithmetic (see
    :func:`_e4m3_bits`): exponent rebiased from 7 to 127 and mantissa shifted into place; below the
    smallest normal, the 3 mantissa bits times 2**-9; NaN as XLA's quiet NaN, with its sign."""
    bits = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
    sign = (bits & np.uint32(0x80)) << 24
    magnitude = bits & np.uint32(0x7F)
    normal = jax.lax.bitcast_convert_type(sign | ((magnitude + np.uint32(120 << 3)) << 20), jnp.float32)
    small = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32) * np.float32(2**-9), jnp.uint32)
    value = jnp.where(magnitude < np.uint32(8), jax.lax.bitcast_convert_type(sign | small, jnp.float32), normal)
    nan = jax.lax.bitcast_convert_type(sign | np.uint32(0x7FC00000), jnp.float32)
    return jnp.where(magnitude == np.uint32(0x7F), nan, value)


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
        if not is_integer(self.seed) or not 0 <= self.seed < 2**32:
            raise HyperparameterError(f"seed must be an integer in [0, 2**32), got {self.seed!r}.")
        as_python(self, seed=int)

    def init(self, param: jax.Array, *, signed: bool, index: int = 0, moment: int = 0) -> Rounded:
        if jnp.issubdtype(jnp.result_type(param), jnp.complexfloating):
            raise TypeError(
                "A complex parameter's moment cannot be stored in bfloat16: there is no complex bfloat16. Pass "
                "float32 (stored as complex64) or None."
            )
        # A first moment (signed) and a second (unsigned) of the same leaf draw apart, and so do two moments of
        # one kind (``moment``: AdEMAMix's fast and slow averages): shared bits would round both up together.
        salt = jnp.asarray(
            _mix(self.seed * 0x9E3779B1 + 2 * index + (1 if signed else 2) + moment * 0x632BE5AB), jnp.uint32
        )
        return Rounded(jnp.zeros_like(param, dtype=jnp.bfloat16), salt, jnp.zeros([], jnp.uint32), self)

    def encode(self, value: jax.Array, leaf: Rounded) -> Rounded:
        bits = counter_bits(value.shape, leaf.salt, leaf.count)
        return Rounded(stochastic_round(value, bits), leaf.salt, leaf.count + jnp.uint32(1), self)


def _mix(x: int) -> int:
    """A 32-bit integer hash of a Python integer (:func:`_lowbias32`): distinct salts for nearby seeds and indices."""
    return int(_lowbias32(np.asarray([x & 0xFFFFFFFF], np.uint32))[0])


def _lowbias32(h: Any) -> Any:
    """The lowbias32 integer hash of uint32 ``h`` (a NumPy or JAX array), elementwise: a bijection of 32-bit words."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


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


# --------------------------------------------------------------------------- chunked steps

# Primitives that act on each coordinate alone, shared with adaopt.multi_tensor (which inspects a whole update the
# same way). An allow list fails safe: anything else on a leaf-sized array (a reduction, a gather, an iota, a
# random draw) keeps the leaf's step whole.
POINTWISE_PRIMITIVES = frozenset(
    {
        "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "bitcast_convert_type",
        "cbrt", "ceil", "clamp", "clz", "complex", "conj", "convert_element_type", "copy", "copy_p", "cos",
        "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt",
        "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min", "mul",
        "ne", "neg", "nextafter", "not", "or", "population_count", "pow", "real", "reduce_precision", "rem",
        "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sin",
        "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
    }
)  # fmt: skip
# Calls whose body is inspected, and evaluated inline, in turn.
_CALLS = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "remat2", "checkpoint"}
)


def step_leaves(fn: Callable[..., Sequence[Any]], leaves: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """:func:`step_leaf` for each leaf's arguments in turn, each leaf's loop after the previous one's.

    XLA schedules independent work in any order (XLA:CPU for concurrency, by default): every leaf's
    buffers would be allocated at once. Each loop's new buffers start from a value of the previous
    loop's results instead (:meth:`_Chunks.run`), so that one leaf's are live at a time.
    """
    outs, after = [], None
    for args in leaves:
        out, chunked = _step_leaf(fn, args, after)
        outs.append(out)
        after = chunked if chunked else after
    return outs


def step_leaf(fn: Callable[..., Sequence[Any]], args: Sequence[Any]) -> list[Any]:
    """One leaf's step, ``fn(*args)``, with the moments it quantizes computed and stored chunk by chunk when it can be.

    Computed whole, a quantized moment's step holds several float32 copies of the leaf at once: the
    dequantized moments, the new moments (the blocks' maxima read them before their codes are
    searched), for every leaf of the tree, since nothing orders the leaves. Instead, under ``jit``:

    - the new quantized moments are computed by the operations of ``fn``, re-evaluated from its
      traced program (``jax.make_jaxpr``) on chunks of whole blocks, ``chunk_size`` elements at a
      time (:class:`_Chunks`), in a loop that writes each chunk's codes and scales in place of the
      old ones and keeps a copy of those (one or half a byte per element): the float32 working set is
      a few chunks;
    - ``fn`` then runs on the whole leaf, from the copies of the old codes, for its outputs that are
      not quantized moments (the step, per-leaf statistics); the compiler drops what it computes for
      the quantized ones, so the step reads the codes directly and fuses with whatever follows (the
      learning rate, ``apply_updates``).

    Each coordinate goes through the same operations, and a block's scale and codes depend on its
    own elements only, so the stored moments are the same numbers (XLA:CPU contracts ``a * b + c``
    into fused multiply-adds within its kernels, which the loop does not change). The loop is taken
    only where that holds: where the part of ``fn`` that computes the quantized moments is elementwise
    (only the primitives of ``POINTWISE_PRIMITIVES`` on leaf-sized arrays: not Adafactor's factored moments,
    for instance), computes in float32 (a float64 leaf keeps the whole step, as its moments are
    dequantized in float64), has no explicit sharding (a sharded leaf keeps its own blocks, see the
    module's docstring), and when the leaf is larger than a chunk; elsewhere, and run op by op
    outside ``jit``, the step is ``fn(*args)``.

    A ``fn`` may carry a hand-written kernel of its step as its attribute ``native``, a function of the
    same arguments that returns the same outputs, or None for a leaf it does not handle
    (:func:`adaopt.enable_cpu_kernels`): where it returns them, they are the leaf's step.
    """
    return _step_leaf(fn, args, None)[0]


def _step_leaf(fn: Callable[..., Sequence[Any]], args: Sequence[Any], after: Any) -> tuple[list[Any], list[Any]]:
    """:func:`step_leaf` with its loop after ``after``'s arrays are computed; also returns the chunked moments."""
    native = getattr(fn, "native", None)  # a hand-written kernel for some leaves (adaopt.enable_cpu_kernels)
    if native is not None and (out := native(*args)) is not None:
        return list(out), []
    outs = list(fn(*args))
    g = args[0]
    targets = [k for k, o in enumerate(outs) if isinstance(o, Quantized) and not any(o is a for a in args)]
    if not targets or not isinstance(g, jax.core.Tracer):
        return outs, []
    shape = tuple(np.shape(g))
    quantized = [a for a in args if isinstance(a, Quantized)]
    stored = [outs[k] for k in targets] + quantized
    if any(q.shape != shape or q.storage.chunk_size is None for q in stored):
        return outs, []
    chunks = _Chunks.of(shape, [q.storage for q in stored])
    if chunks is None:
        return outs, []
    kinds = [_kind(a, shape) for a in args]
    leaf_arrays = [a.value if kind == "rounded" else a for a, kind in zip(args, kinds, strict=True) if kind]
    arrays = [x for a in leaf_arrays for x in ((a.codes, a.scale) if isinstance(a, Quantized) else (a,))]
    if any(explicit_spec(x) is not None for x in arrays):
        return outs, []
    if any(not isinstance(a, Quantized) and not _narrow(a) for a in leaf_arrays):
        return outs, []
    program = _traced_moments(fn, args, kinds, targets, shape)
    if program is None:
        return outs, []
    new, copies = chunks.run(program, args, kinds, [outs[k] for k in targets], after)
    if copies:  # the step from the old codes' copies: see _Chunks.run
        outs = list(fn(*(copies.get(j, a) for j, a in enumerate(args))))
    for k, q in zip(targets, new, strict=True):
        outs[k] = q
    return outs, new


def _kind(x: Any, shape: tuple[int, ...]) -> str | None:
    """How an argument of a leaf's step is cut into chunks: a quantized moment, a bfloat16 one, an array of the
    leaf's shape, or nothing (a scalar, an option, None: passed whole)."""
    if isinstance(x, Quantized):
        return "quantized"
    if isinstance(x, Rounded):
        return "rounded" if x.shape == shape else None
    if isinstance(x, (jax.Array, np.ndarray)) and np.shape(x) == shape:
        return "array"
    return None


def _narrow(x: Any) -> bool:
    """Whether the step computes in float32 with ``x``: a real dtype of at most 32 bits."""
    dtype = jnp.dtype(jnp.result_type(x))
    return dtype.itemsize <= 4 and not jnp.issubdtype(dtype, jnp.complexfloating)


@dataclasses.dataclass(frozen=True)
class _Program:
    """The operations that compute a leaf's quantized moments from its arrays (a jaxpr and its constants), and its shape."""

    jaxpr: Any
    consts: list[Any]
    shape: tuple[int, ...]


def _traced_moments(
    fn: Callable[..., Sequence[Any]], args: Sequence[Any], kinds: list[str | None], targets: list[int], shape: tuple
) -> _Program | None:
    """``fn``'s quantized outputs as a program of the leaf's arrays (dequantized), or None if it is not elementwise.

    ``fn`` is traced again with each quantized moment replaced by its float32 values, so that ``store``
    returns the values it would quantize; the scalars it closes over (hyperparameters, bias corrections
    of this step) become the program's constants.
    """

    def values(*chunked: Any) -> list[Any]:
        it = iter(chunked)
        outs = fn(*(next(it) if kind else a for a, kind in zip(args, kinds, strict=True)))
        return [outs[k] for k in targets]

    avals = [
        jax.ShapeDtypeStruct(shape, jnp.float32 if kind == "quantized" else (a.value if kind == "rounded" else a).dtype)
        for a, kind in zip(args, kinds, strict=True)
        if kind
    ]
    try:
        closed = jax.make_jaxpr(values)(*avals)
    except Exception:  # fn needs the stored leaves themselves (their methods, their arrays): it keeps its whole step
        return None
    if any(np.shape(out) != shape for out in closed.out_avals):
        return None
    if not _elementwise(closed.jaxpr, shape, list(closed.jaxpr.outvars)):
        return None
    return _Program(closed.jaxpr, list(closed.consts), shape)


def _live(jaxpr: Any, outvars: list[Any]) -> tuple[list[Any], set[Any]]:
    """The equations of ``jaxpr`` that ``outvars`` depend on, in order, and the variables they read."""
    live = {v for v in outvars if isinstance(v, jax.extend.core.Var)}
    needed = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            needed.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, jax.extend.core.Var))
    return needed[::-1], live


def _sub_jaxpr(eqn: Any) -> Any:
    """The body of a call equation (a ``ClosedJaxpr`` or ``Jaxpr``), or None."""
    for value in eqn.params.values():
        if isinstance(value, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
            return value
    return None


def _elementwise(jaxpr: Any, shape: tuple[int, ...], outvars: list[Any]) -> bool:
    """Whether what ``outvars`` need of ``jaxpr`` acts coordinate by coordinate on its arrays of ``shape``.

    Equations with no array of ``shape`` (scalars of the step) are evaluated as they are; arrays of
    ``shape`` may only meet elementwise primitives, scalars, broadcasts of a single value and calls whose
    bodies qualify in turn; a constant of ``shape`` (an array closed over) cannot be cut into chunks.
    """
    needed, live = _live(jaxpr, outvars)
    if any(np.shape(v.aval) == shape for v in jaxpr.constvars if v in live):
        return False
    for eqn in needed:
        if eqn.effects:
            return False
        shapes = [np.shape(v.aval) for v in (*eqn.invars, *eqn.outvars)]
        if shape not in shapes:
            continue
        name = eqn.primitive.name
        if name in POINTWISE_PRIMITIVES:
            if any(s not in (shape, ()) for s in shapes):
                return False
        elif name == "broadcast_in_dim":
            if shapes[-1] != shape or (int(np.prod(shapes[0])) != 1 and shapes[0] != shape):
                return False
        elif name in _CALLS:
            body = _sub_jaxpr(eqn)
            if body is None:
                return False
            inner = getattr(body, "jaxpr", body)
            if not _elementwise(inner, shape, list(inner.outvars)):
                return False
        else:
            return False
    return True


def _evaluate(jaxpr: Any, consts: list[Any], inputs: list[Any], shape: tuple[int, ...], chunk: tuple[int, ...]) -> list:
    """``jaxpr``'s outputs from ``inputs``, its arrays of the leaf's ``shape`` replaced by arrays of the ``chunk``'s."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, inputs, strict=True))
    needed, _ = _live(jaxpr, list(jaxpr.outvars))
    for eqn in needed:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and any(np.shape(v.aval) == shape for v in (*eqn.invars, *eqn.outvars)):
            body = _sub_jaxpr(eqn)
            inner, inner_consts = (body.jaxpr, list(body.consts)) if hasattr(body, "jaxpr") else (body, [])
            outs = _evaluate(inner, inner_consts, invals, shape, chunk)
        elif name == "broadcast_in_dim" and np.shape(eqn.outvars[0].aval) == shape:
            x = invals[0]
            outs = [x if np.shape(x) == chunk else jax.lax.broadcast_in_dim(jnp.reshape(x, ()), chunk, ())]
        else:
            result = eqn.primitive.bind(*invals, **eqn.params)
            outs = list(result) if eqn.primitive.multiple_results else [result]
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jax.extend.core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """How a leaf is cut into chunks of whole blocks for every storage that holds one of its moments.

    Two layouts:

    - by rows, where every storage blocks the leaf ``(*lead, L)`` along its last axis: the arrays of the
      leaf (gradient, codes, scales) are viewed as ``(rows, Q, width)``, the leading axes split into
      ``rows`` (a divisor of their product) by ``Q``, and chunk ``i`` is ``[:, i * size : (i + 1) * size]``:
      ``rows * size`` rows of the leaf, strided, each whole. A sharding of the leading axes over
      ``rows``' divisors, or of the last one, stays where it is.
    - flat, otherwise: the arrays are raveled in row-major order (each storage's blocks are consecutive
      elements there too) and chunk ``i`` is ``size`` units of ``unit`` elements (a common multiple of the
      block sizes), from ``i * size * unit``.

    ``loops`` chunks are computed in a loop; what is left (the last rows, the last units and a partial
    block) is computed after it.
    """

    shape: tuple[int, ...]
    rows: int  # 0 for the flat layout
    size: int
    loops: int
    unit: int

    @classmethod
    def of(cls, shape: tuple[int, ...], storages: list[Blockwise]) -> _Chunks | None:
        """The chunks of a leaf of ``shape`` for ``storages`` (their smallest ``chunk_size``), or None if it is one."""
        budget = min(s.chunk_size for s in storages if s.chunk_size is not None)
        n = int(np.prod(shape))
        if n <= budget:
            return None
        width = shape[-1]
        lead = n // width if width else 0
        if len(shape) >= 2 and lead >= 2 and all(s.by_rows(shape) for s in storages):
            rows = _divisor_at_most(lead, max(1, budget // width))
            size = max(1, budget // (rows * width))
            return cls(shape, rows, size, lead // rows // size, 0)
        unit = int(np.lcm.reduce([s.block_size for s in storages]))
        size = max(1, budget // unit)
        loops = n // unit // size
        return cls(shape, 0, size, loops, unit) if loops else None

    def chunk_shape(self, tail: bool) -> tuple[int, ...]:
        if self.rows:  # rows of the leaf, whole: no unit axis, whose layout XLA:CPU would copy within kernels
            q = int(np.prod(self.shape[:-1])) // self.rows
            return (self.rows * (q - self.loops * self.size if tail else self.size), self.shape[-1])
        n = int(np.prod(self.shape))
        return (n - self.loops * self.size * self.unit if tail else self.size * self.unit,)

    def per_unit(self, storage: Blockwise | None, part: str = "codes") -> int:
        """Elements per unit of the flat layout of the leaf's values (``storage`` None) or of a storage's ``part``."""
        if storage is None:
            return self.unit
        if part == "scale":
            return self.unit // storage.block_size
        return self.unit // 2 if storage.format == "dynamic4" else self.unit

    def view(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.rows, -1, x.shape[-1]) if self.rows else x.reshape(-1)

    def _span(self, i: Any, per_unit: int) -> tuple[int, Any, int]:
        """(axis, start, length) of chunk ``i`` of a view, or of what the loop leaves when ``i`` is None."""
        axis, length = (1, self.size) if self.rows else (0, self.size * per_unit)
        return axis, (self.loops * length if i is None else i * length), length

    def take(self, view: jax.Array, i: Any, per_unit: int) -> jax.Array:
        axis, start, length = self._span(i, per_unit)
        if i is None:
            chunk = jax.lax.slice_in_dim(view, start, view.shape[axis], axis=axis)
        else:
            chunk = jax.lax.dynamic_slice_in_dim(view, start, length, axis=axis)
        return chunk.reshape(-1, view.shape[-1]) if self.rows else chunk

    def put(self, view: jax.Array, chunk: jax.Array, i: Any, per_unit: int) -> jax.Array:
        axis, start, _ = self._span(i, per_unit)
        chunk = _bits(chunk).reshape(self.rows, -1, view.shape[-1]) if self.rows else _bits(chunk).reshape(-1)
        return jax.lax.dynamic_update_slice_in_dim(view, chunk, start, axis=axis)

    def run(
        self, program: _Program, args: Sequence[Any], kinds: list[str | None], targets: list[Quantized], after: Any
    ) -> tuple[list[Quantized], dict[int, Quantized]]:
        """The quantized moments ``targets`` (as ``fn`` computed them whole) computed chunk by chunk instead.

        Each target's codes and scales are written in place of those of a quantized argument of the
        same layout where there is one (a chunk is read before it is overwritten, and never again).
        That argument's old codes and scales are copied chunk by chunk on the way (they are 1 or
        1/2 byte per element, a quarter or an eighth of its float32 values) and returned by argument
        index: the step is computed from the copies, after the loop, so nothing else reads the
        arrays the loop overwrites (else XLA would copy them whole before the loop, at any time).
        The buffers the loop fills start from a value of ``after`` (the previous leaf's new moments),
        which their contents do not depend on (every element is written) but which keeps XLA from
        allocating them before the previous leaf's loop is done.
        """
        free = [j for j, kind in enumerate(kinds) if kind == "quantized"]
        seeds: list[int | None] = []
        for t in targets:
            same = [j for j in free if _same_layout(args[j], t)]
            match = next((j for j in same if (args[j].storage, args[j].signed) == (t.storage, t.signed)), None)
            match = same[0] if match is None and same else match
            if match is not None:
                free.remove(match)
            seeds.append(match)
        seeded = [j for j in seeds if j is not None]
        # A value computed by the previous leaf's loop, to start the buffers from.
        anchor = None if after is None else after[0].scale.reshape(-1)[0]

        def blank(x: jax.Array) -> jax.Array:
            """A buffer for ``x``'s values (FP8 codes as their bits, see :func:`_bits`)."""
            dtype = _bits(x).dtype
            return jnp.zeros(x.shape, dtype) if anchor is None else jnp.broadcast_to(anchor.astype(dtype), x.shape)

        def bits(x: jax.Array) -> jax.Array:
            """FP8 codes as their bits, converted after the previous leaf's loop (not before every loop, at once)."""
            if x.dtype != jnp.float8_e4m3fn:
                return x
            if anchor is None:
                return _bits(x)
            always = jax.lax.bitcast_convert_type(anchor, jnp.uint32) <= np.uint32(0xFFFFFFFF)  # true, not folded
            return jnp.where(always, _bits(x), blank(x))

        carries = (
            tuple(
                (self.view(blank(t.codes)), self.view(blank(t.scale)))
                if j is None
                else (self.view(bits(args[j].codes)), self.view(args[j].scale))
                for t, j in zip(targets, seeds, strict=True)
            ),
            tuple((self.view(blank(args[j].codes)), self.view(blank(args[j].scale))) for j in seeded),
        )
        # The arguments read, not overwritten: quantized ones (codes, scales), and arrays of the leaf's shape.
        read: dict[int, tuple[jax.Array, jax.Array]] = {
            j: (self.view(bits(args[j].codes)), self.view(args[j].scale))
            for j, kind in enumerate(kinds)
            if kind == "quantized" and j not in seeded
        }
        arrays = {
            j: self.view(args[j].value if kind == "rounded" else args[j])
            for j, kind in enumerate(kinds)
            if kind in ("rounded", "array")
        }

        def step(i: Any, carries: tuple) -> tuple:
            written, copies = carries
            chunk = self.chunk_shape(tail=i is None)
            inputs, kept = [], list(copies)
            for j, kind in enumerate(kinds):
                if kind == "quantized":
                    a = args[j]
                    per_code, per_scale = self.per_unit(a.storage), self.per_unit(a.storage, "scale")
                    if j in seeded:
                        # Copied, then read back from the copy: every read of the chunk of the buffer that is
                        # then overwritten precedes the write by data (else XLA copies the buffer each pass).
                        c = seeded.index(j)
                        codes, scale = written[seeds.index(j)]
                        kept[c] = (
                            self.put(copies[c][0], self.take(codes, i, per_code), i, per_code),
                            self.put(copies[c][1], self.take(scale, i, per_scale), i, per_scale),
                        )
                        codes, scale = kept[c]
                    else:
                        codes, scale = read[j]
                    leaf = Quantized(
                        _from_bits(self.take(codes, i, per_code), a.codes.dtype),
                        self.take(scale, i, per_scale),
                        a.storage,
                        a.signed,
                        chunk,
                    )
                    inputs.append(leaf.load(jnp.float32))
                elif kind:
                    inputs.append(self.take(arrays[j], i, self.unit))
            values = _evaluate(program.jaxpr, program.consts, inputs, program.shape, chunk)
            new = []
            for (codes, scale), value, t in zip(written, values, targets, strict=True):
                per_code, per_scale = self.per_unit(t.storage), self.per_unit(t.storage, "scale")
                like = Quantized(  # for its layout: encode reads no values of it
                    jnp.zeros(self.take(codes, i, per_code).shape, t.codes.dtype),
                    jnp.zeros(self.take(scale, i, per_scale).shape, scale.dtype),
                    t.storage,
                    t.signed,
                    chunk,
                )
                q = t.storage.encode(value, like)
                new.append((self.put(codes, q.codes, i, per_code), self.put(scale, q.scale, i, per_scale)))
            return tuple(new), tuple(kept)

        if self.loops:
            carries = jax.lax.fori_loop(0, self.loops, step, carries)
        if int(np.prod(self.chunk_shape(tail=True))):
            carries = step(None, carries)
        written, copies = carries
        new = [
            Quantized(
                _from_bits(codes.reshape(t.codes.shape), t.codes.dtype),
                scale.reshape(t.scale.shape),
                t.storage,
                t.signed,
                t.shape,
            )
            for (codes, scale), t in zip(written, targets, strict=True)
        ]
        old = {
            j: Quantized(
                _from_bits(codes.reshape(args[j].codes.shape), args[j].codes.dtype),
                scale.reshape(args[j].scale.shape),
                args[j].storage,
                args[j].signed,
                args[j].shape,
            )
            for (codes, scale), j in zip(copies, seeded, strict=True)
        }
        return new, old


def _bits(x: jax.Array) -> jax.Array:
    """FP8 codes as uint8 bits, anything else as it is: XLA:CPU holds no float8 array in a loop (it converts it
    to float16 whole, before the loop) and updates float8 slices through float16."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8) if x.dtype == jnp.float8_e4m3fn else x


def _from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _same_layout(a: Quantized, b: Quantized) -> bool:
    """Whether ``a``'s codes and scales could hold ``b``'s: the same shapes and dtypes."""
    return (a.codes.shape, a.codes.dtype, a.scale.shape) == (b.codes.shape, b.codes.dtype, b.scale.shape)


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    best = 1
    d = 1
    while d * d <= n:
        if n % d == 0:
            for x in (d, n // d):
                if best < x <= cap:
                    best = x
        d += 1
    return best


# --------------------------------------------------------------------------- stochastic rounding


def counter_bits(shape: tuple[int, ...], salt: Any, count: Any) -> jax.Array:
    """Uniform uint32 bits of ``shape``, a pure function of (element, ``salt``, ``count``): counter-based randomness.

    The salt and the count are hashed into one offset (a scalar, once), which is added to each
    element's position in the flattened array, and the sum passes through a 32-bit integer hash
    (lowbias32: two multiply-xorshift rounds). Two multiplies and a few shifts per element,
    against a hundred operations for a threefry draw on a CPU; the hash is a bijection, so the
    elements of one draw never share their bits. Not for cryptography; its bits are uniform and
    independent enough to round numbers.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> bits = adaopt.counter_bits((4,), jnp.uint32(7), jnp.uint32(0))
      >>> bits.dtype, bool((bits != adaopt.counter_bits((4,), jnp.uint32(7), jnp.uint32(1))).all())
      (dtype('uint32'), True)
    """
    size = int(np.prod(shape))
    offset = _lowbias32(_lowbias32(jnp.asarray(count, jnp.uint32)) ^ jnp.asarray(salt, jnp.uint32))
    return _lowbias32(jax.lax.iota(jnp.uint32, size).reshape(shape) + offset)


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
    # The top 16 bits are the bfloat16 value: taken as they are, not through XLA's conversion to bfloat16 (a second
    # rounding, of bits already rounded), which on XLA:CPU took more time than the rest of the step. Adding one
    # carries into the exponent where it must (the largest finite values round up to infinity, as a float32 sum
    # would); an infinity has no dropped bits and stays; a NaN keeps its sign and is made quiet, so that a payload
    # in the dropped bits alone does not leave an infinity.
    top = (raw >> 16) + up.astype(jnp.uint32)
    top = jnp.where(jnp.isnan(x32), (raw >> 16) | jnp.uint32(0x40), top)
    return jax.lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)
