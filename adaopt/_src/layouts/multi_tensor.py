"""Multi-tensor layouts: a tree of many small leaves stepped as one flat buffer per dtype.

A jitted step over a parameter tree pays for every leaf twice: the runtime handles each input
and output buffer (on XLA:CPU a few microseconds each, more than the arithmetic of a leaf of a
few thousand elements), and XLA:CPU, which has no multi-output fusion, runs at least one kernel
per output buffer (Adam: the parameter, m and v, three kernels per leaf). On a tree of a
thousand small leaves that overhead is almost the whole step. Two explicit layouts remove it:

- :func:`multi_tensor` wraps an elementwise optimizer and keeps its state as one flat buffer
  per dtype for all leaves under ``min_size`` elements (larger leaves keep their own buffers,
  and their shardings). The parameters stay a tree: the gradients are packed (one concatenate
  per dtype) and the updates unpacked in each step. The state buffers and the state kernels of
  the small leaves go; those of the parameters stay.
- :func:`flatten_params` is for code that can keep its parameters flat: one buffer per dtype
  (and the large leaves as they are), unflattened inside the loss. The optimizer then steps a
  tree of a few leaves; any optimizer, elementwise or not, works on it (per-leaf statistics
  such as LAMB's trust ratios are then computed per buffer).

Neither changes an elementwise optimizer's arithmetic: each coordinate goes through the same
operations, so trajectories equal the tree-shaped optimizer's: bit for bit op by op, and to the
last bit or so under ``jit``, where XLA:CPU contracts ``a * b + c`` into fused multiply-adds
according to where its kernels start and end, which the layout moves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adaopt._src import base, complex_params, placement, storage

DEFAULT_MIN_SIZE = 16_384
"""Leaves of at least this many elements keep their own buffers.

About where packing stops paying on a CPU: packing moves about 12 extra bytes per element (the
gradient concatenated, the flat update written) to save one buffer's fixed cost, which is worth
as much time as moving some tens of thousands of elements at the memory bandwidth
(``benchmarks/RESULTS.md``).
"""


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` replicated where its type carries a sharding: the packed leaves, sharded each their own
    way, are concatenated into one replicated buffer (small leaves: little to copy)."""
    sharding = placement.explicit_sharding(x)
    if sharding is None or sharding.is_fully_replicated:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


class FlatTree(NamedTuple):
    """A tree in the multi-tensor layout: one flat buffer per dtype for the small leaves, the large as they are.

    A plain pytree of arrays (it checkpoints as one), built by :func:`flatten_params` or, for
    the gradients, parameters and state of :func:`multi_tensor`, by its layout.
    """

    buffers: dict[str, jax.Array]  # dtype name -> the small leaves of that dtype, raveled and concatenated
    leaves: tuple[jax.Array, ...]  # leaves of at least min_size elements, in tree order


class NotElementwiseError(ValueError):
    """The optimizer wrapped by :func:`multi_tensor` mixes coordinates (norms, dot products, per-leaf statistics)."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    shape: tuple[int, ...]
    dtype: str
    size: int
    offset: int  # into buffers[dtype]; -1 for a large leaf


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of a tree lives in its :class:`FlatTree`: static, built from shapes and dtypes only."""

    treedef: Any
    slots: tuple[_Slot, ...]
    sizes: tuple[tuple[str, int], ...]  # (dtype name, elements) of each buffer, sorted by dtype name

    @classmethod
    def of(cls, tree: Any, min_size: int | None = DEFAULT_MIN_SIZE) -> Layout:
        """The layout of ``tree``: leaves under ``min_size`` elements packed (every leaf if None)."""
        leaves, treedef = jax.tree.flatten(tree)
        sizes: dict[str, int] = {}
        slots = []
        for leaf in leaves:
            shape = tuple(int(d) for d in np.shape(leaf))
            dtype = jnp.dtype(jnp.result_type(leaf)).name
            size = math.prod(shape)
            if min_size is not None and size >= min_size:
                slots.append(_Slot(shape, dtype, size, -1))
            else:
                slots.append(_Slot(shape, dtype, size, sizes.get(dtype, 0)))
                sizes[dtype] = sizes.get(dtype, 0) + size
        return cls(treedef, tuple(slots), tuple(sorted(sizes.items())))

    def pack(self, tree: Any) -> FlatTree:
        """``tree`` (of this layout's structure and shapes) as a :class:`FlatTree`: one concatenate per buffer.

        The buffers are keyed by the layout's dtypes and hold ``tree``'s own values, uncast (float32
        gradients packed along bfloat16 parameters' layout stay float32).
        """
        leaves = self.treedef.flatten_up_to(tree)
        parts: dict[str, list[jax.Array]] = {dtype: [] for dtype, _ in self.sizes}
        dtypes: dict[str, Any] = {}
        large = []
        for slot, leaf in zip(self.slots, leaves, strict=True):
            if slot.offset < 0:
                large.append(leaf)
                continue
            dtypes.setdefault(slot.dtype, jnp.result_type(leaf))
            if slot.size:
                parts[slot.dtype].append(jnp.ravel(_replicated(leaf)))  # replicated first: a split axis may not ravel
        buffers = {}
        for dtype, size in self.sizes:
            if len(parts[dtype]) == 1:
                buffers[dtype] = parts[dtype][0]
            elif parts[dtype]:
                buffers[dtype] = jnp.concatenate(parts[dtype])
            else:  # only zero-size leaves of this dtype
                buffers[dtype] = jnp.zeros([size], dtypes[dtype])
        return FlatTree(buffers, tuple(large))

    def unpack(self, flat: FlatTree) -> Any:
        """The tree of this layout from ``flat`` (whose buffers may have other dtypes than the layout's).

        Linear, and differentiable in both modes. Two implementations of the same slicing, for
        the compiler's sake: XLA:CPU compiles every distinct kernel separately, and a static slice
        at each leaf's offset makes each leaf's kernels distinct (a thousand leaves then compile a
        thousand kernels, the cost of ``optax.flatten``). The values are read with
        dynamic slices at offsets XLA cannot see as constants (:meth:`_offsets`), so the kernels
        of all leaves of one shape are one kernel, compiled once; derivatives use ``lax.split``,
        whose transpose is one concatenate per buffer (a dynamic slice's would be a full-size
        buffer per leaf).
        """

        @jax.custom_jvp
        def unpack(flat: FlatTree) -> Any:
            return self._read(flat, self._offsets(flat))

        @unpack.defjvp
        def unpack_jvp(primals: tuple[FlatTree], tangents: tuple[FlatTree]) -> tuple[Any, Any]:
            return unpack(primals[0]), self._split(tangents[0])

        return unpack(flat)

    def _read(self, flat: FlatTree, offsets: list[jax.Array | None]) -> Any:
        large = iter(flat.leaves)
        leaves = []
        for slot, offset in zip(self.slots, offsets, strict=True):
            if slot.offset < 0:
                leaves.append(next(large))
            elif slot.size == 0:
                leaves.append(jnp.zeros(slot.shape, flat.buffers[slot.dtype].dtype))
            elif offset is None:
                part = jax.lax.slice(flat.buffers[slot.dtype], (slot.offset,), (slot.offset + slot.size,))
                leaves.append(part.reshape(slot.shape))
            else:
                part = jax.lax.dynamic_slice(flat.buffers[slot.dtype], (offset,), (slot.size,))
                leaves.append(part.reshape(slot.shape))
        return jax.tree.unflatten(self.treedef, leaves)

    def _split(self, flat: FlatTree) -> Any:
        large = iter(flat.leaves)
        pieces = {}
        for dtype, _ in self.sizes:
            sizes = [s.size for s in self.slots if s.offset >= 0 and s.dtype == dtype]
            pieces[dtype] = iter(jax.lax.split(flat.buffers[dtype], sizes))
        leaves = [next(large) if s.offset < 0 else next(pieces[s.dtype]).reshape(s.shape) for s in self.slots]
        return jax.tree.unflatten(self.treedef, leaves)

    def _offsets(self, flat: FlatTree) -> list[jax.Array | None]:
        """Each packed leaf's offset as an int32 scalar that XLA cannot constant-fold.

        Both branches of the conditional return the same constants, so its predicate (read from
        the data) does not matter; XLA keeps a conditional whose predicate it cannot evaluate,
        and each offset reaches its slice as a separate buffer rather than a constant.
        """
        indices = [i for i, s in enumerate(self.slots) if s.offset >= 0 and s.size]
        nonempty = [b for b in flat.buffers.values() if b.size]
        if len(indices) < 2 or not nonempty:
            return [None] * len(self.slots)
        constants = tuple(np.int32(self.slots[i].offset) for i in indices)

        def branch() -> tuple[jax.Array, ...]:
            return tuple(jnp.asarray(c) for c in constants)

        if isinstance(nonempty[0], jax.core.Tracer):
            predicate = jax.lax.stop_gradient(nonempty[0][0]) > 0
            values = jax.lax.cond(predicate, branch, branch)
        else:  # run op by op: the offsets are arguments of the compiled slice already
            values = branch()
        out: list[jax.Array | None] = [None] * len(self.slots)
        for i, value in zip(indices, values, strict=True):
            out[i] = value
        return out


def flatten_params(params: Any, *, min_size: int | None = None) -> tuple[FlatTree, Callable[[FlatTree], Any]]:
    """Parameters in the multi-tensor layout, and the function that gives the tree back.

    ``flat, unflatten = flatten_params(params)``: ``flat`` holds one flat buffer per dtype (no
    promotion: bfloat16 leaves stay bfloat16), and, if ``min_size`` is given, the leaves of at
    least ``min_size`` elements as they are (their shardings kept, and no copy of a large matrix
    in the loss). Keep ``flat`` as the parameters, call ``unflatten`` inside the loss, and the
    optimizer steps a tree of a few leaves. ``unflatten`` is linear and differentiable in both
    modes: its gradient is one concatenate per dtype. It reads the leaves at offsets XLA cannot
    see as constants, so a training step over many leaves of few shapes compiles about as fast
    as the tree-shaped one (static slices, as ``ravel_pytree``'s, make a distinct kernel per
    leaf, which XLA:CPU compiles one by one).

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> flat, unflatten = adaopt.flatten_params(params)
      >>> def loss(flat, x):
      ...     p = unflatten(flat)
      ...     return jnp.sum((x @ p["w"] + p["b"]) ** 2)
      >>> opt = adaopt.adam(1e-2)
      >>> state = opt.init(flat)
      >>> grads = jax.grad(loss)(flat, jnp.ones((4, 3)))
      >>> updates, state = opt.update(grads, state, flat)
      >>> flat = optax.apply_updates(flat, updates)
      >>> unflatten(flat)["w"].shape
      (3, 2)

    Differs from ``jax.flatten_util.ravel_pytree``: one buffer per dtype instead of one vector
    promoted to a common dtype, large leaves optionally kept apart, a result that is a pytree
    (:class:`FlatTree`) any optax transformation accepts, and the compilation above. With the
    parameters flat, per-leaf statistics (LAMB's trust ratios, LDoG) span a whole buffer.

    Args:
      params: a pytree of arrays.
      min_size: leaves of at least this many elements stay separate; None packs every leaf.

    Returns:
      ``(flat, unflatten)``: the :class:`FlatTree` and a function from such a tree (the
      parameters, their gradients or updates) to the original structure.
    """
    if min_size is not None:
        base.check_integer("min_size", min_size, 1)
    layout = Layout.of(params, min_size)

    return layout.pack(params), layout.unpack


class MultiTensorState(NamedTuple):
    """State of :func:`multi_tensor`: the wrapped optimizer's state over the packed parameters (:class:`FlatTree`)."""

    inner: Any


# The primitives known to act on each coordinate alone. An allow list fails safe: a primitive
# missing here (a reduction, a collective, a gather, a position-dependent iota or random draw)
# makes multi_tensor refuse the optimizer instead of silently changing its result.
_ELEMENTWISE = storage.POINTWISE_PRIMITIVES | {
    # Calls and control flow: their bodies are inspected in turn.
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
    "remat", "checkpoint", "cond", "while",
    # Placement only.
    "sharding_constraint", "mesh_cast", "reshard", "optimization_barrier",
}  # fmt: skip
# Shape changes keep each coordinate's value apart as long as they only add or drop unit axes
# (or broadcast a single value): the size is kept, or the operand has one element.
_RESHAPING = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims"})


def _size(var: Any) -> int:
    return math.prod(getattr(var.aval, "shape", ()))


def _subjaxprs(value: Any) -> list[Any]:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _subjaxprs(v)]
    return []


def _not_elementwise_op(jaxpr: Any) -> str | None:
    """The first primitive in ``jaxpr`` (or a sub-jaxpr) not known to act coordinate by coordinate on an array.

    Equations on scalars only (a bias correction, a learning rate) are elementwise whatever they do.
    """
    for eqn in jaxpr.eqns:
        sizes = [_size(v) for v in (*eqn.invars, *eqn.outvars)]
        name = eqn.primitive.name
        if max(sizes, default=1) > 1 and name not in _ELEMENTWISE:
            operand = _size(eqn.invars[0]) if eqn.invars else 0
            if name not in _RESHAPING or operand not in (1, _size(eqn.outvars[0])):
                return name
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                found = _not_elementwise_op(sub)
                if found:
                    return found
    return None


def multi_tensor(
    tx: optax.GradientTransformation, *, min_size: int = DEFAULT_MIN_SIZE
) -> optax.GradientTransformationExtraArgs:
    r"""Step an elementwise optimizer over one flat buffer per dtype for all small leaves.

    .. math::
        \mathrm{flat}(g) &= \big(\mathrm{concat}\{\mathrm{ravel}(g_i) : |g_i| < \text{min\_size},
            \ \mathrm{dtype}(g_i) = d\}\big)_d \;\cup\; \{g_i : |g_i| \ge \text{min\_size}\} \\
        (u, s_t) &= \mathrm{tx.update}(\mathrm{flat}(g), s_{t-1}, \mathrm{flat}(\theta)), \qquad
        \text{updates} = \mathrm{flat}^{-1}(u)

    Every coordinate goes through the same arithmetic as under ``tx`` alone, so the trajectory is
    the same (under ``jit``, up to XLA's fused multiply-adds, which depend on kernel boundaries);
    what changes is the number of buffers and kernels of a step. On a tree of many
    small leaves (1000 leaves of 100 floats) the state of the small leaves becomes one buffer per
    dtype per state field, and the state's kernels one per field (Adam: 2 in place of 2000);
    the parameters and gradients keep one buffer each per leaf. Leaves of at least ``min_size``
    elements keep their own state buffers (with their shardings). For code that can keep its
    parameters flat, :func:`flatten_params` removes the per-leaf cost altogether.

    Only for elementwise optimizers, whose step for a coordinate depends only on that
    coordinate's gradient, state and parameter (SGD, Adam and its variants, RMSProp, AdaGrad,
    Lion, ...), with moments in float32, float16 or bfloat16: ``init`` raises
    :class:`NotElementwiseError` for a moment stored in blocks (``"int8"``, ``"int4"``, ``"fp8"``)
    or rounded stochastically (``"bfloat16_sr"``), whose scales and draws belong to one leaf. The first ``update`` inspects the wrapped update and raises
    :class:`NotElementwiseError` if it combines coordinates: per-leaf statistics (LAMB's trust
    ratios, LDoG) would be computed over a whole buffer, and whole-tree norms (DoG, Prodigy,
    ``optax.clip_by_global_norm``) summed in another order; the update is checked on the leaves
    too, so that an optimizer that decides by a leaf's shape (Muon's matrices, Adafactor's
    factored axes, SOAP), elementwise on a packed vector, is refused. Chain such blocks outside the
    wrapper: ``optax.chain(optax.clip_by_global_norm(1.0), adaopt.multi_tensor(adaopt.adam(1e-3)))``.
    A ``weight_decay_mask`` given to the wrapped optimizer would be matched against the packed
    tree; apply masked decay outside instead, e.g. for AdamW:
    ``optax.chain(adaopt.multi_tensor(adaopt.adam(1.0)), optax.add_decayed_weights(wd, mask),
    optax.scale_by_learning_rate(lr))``.

    Differs from ``optax.flatten``, which ravels every leaf into one vector promoted to a common
    dtype and unpacks with static slices: here large leaves stay apart (their shardings and no
    copies of large matrices), dtypes are kept, non-elementwise optimizers are refused, and the
    unpacking compiles once per leaf shape rather than once per leaf (on a tree of many leaves,
    the difference between seconds and minutes of compilation on XLA:CPU).

    Args:
      tx: the optimizer to wrap; extra arguments of ``update`` (``value=``) are passed through.
      min_size: leaves of at least this many elements keep their own state buffers (>= 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MultiTensorState`.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.multi_tensor(adaopt.adam(1e-3))
      >>> params = {f"b{i}": jnp.zeros(3) for i in range(4)} | {"w": jnp.zeros((200, 100))}
      >>> state = opt.init(params)
      >>> mu = optax.tree.get(state.inner, "mu")  # Adam's first moment: the four small leaves in one buffer, w apart
      >>> mu.buffers["float32"].shape, [leaf.shape for leaf in mu.leaves]
      ((12,), [(200, 100)])
      >>> updates, state = opt.update(params, state, params)
      >>> updates["w"].shape
      (200, 100)
    """
    base.check_transformation("tx", tx)
    base.check_integer("min_size", min_size, 1)
    inner = base.with_extra_args(tx)
    checked: set[Hashable] = set()

    def check(
        grads: FlatTree, state: Any, params: FlatTree | None, extra: dict[str, Any], leaves: tuple[Any, Any]
    ) -> None:
        """The update is elementwise on the packed buffers, and on the leaves themselves (``leaves``: the gradients
        and parameters unpacked): an optimizer that decides by a leaf's shape (Muon's matrices, Adafactor's factored
        axes, GaLore's projected matrices) takes an elementwise path on a packed buffer and another on the leaf."""
        arrays, static = base.split_extra_args(extra)
        avals = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), (grads, state, params, arrays))
        key = (jax.tree.structure(avals), tuple(jax.tree.leaves(avals)), repr(sorted(static.items())))
        if key in checked:
            return
        update = lambda g, s, p, e: inner.update(g, s, p, **e, **static)
        op = _not_elementwise_op(jax.make_jaxpr(update)(grads, state, params, arrays).jaxpr)
        unpacked_grads, unpacked_params = leaves
        if op is None:
            try:
                shapes = jax.eval_shape(inner.init, unpacked_grads if unpacked_params is None else unpacked_params)
            except (ValueError, TypeError):  # a per-leaf option made for the packed tree: nothing to compare
                shapes = None
            if shapes is not None:
                traced = jax.make_jaxpr(update)(unpacked_grads, shapes, unpacked_params, arrays)
                op = _not_elementwise_op(traced.jaxpr)
        if op is not None:
            raise NotElementwiseError(
                f"adaopt.multi_tensor needs an elementwise optimizer (each coordinate's step depending only on that "
                f"coordinate's gradient, state and parameter), but the wrapped update applies `{op}`, which is not known to act coordinate by "
                "coordinate, to per-parameter arrays: packing leaves into one buffer could change its result (per-leaf statistics such as LAMB's "
                "trust ratios would span a whole buffer; whole-tree norms would be summed in another order; a matrix's own "
                "step would become a vector's). Use it without multi_tensor, or wrap only its elementwise part, e.g. "
                "optax.chain(optax.clip_by_global_norm(1.0), adaopt.multi_tensor(adaopt.adam(1e-3)))."
                + (
                    " With complex parameters, complex_convention='real_imag' (and rprop, which has no other) views "
                    "each as real pairs, a stack the check cannot follow: use complex_convention='modulus', or keep the "
                    "complex leaves out of multi_tensor."
                    if "stack" in op and any(complex_params.is_complex(x) for x in jax.tree.leaves(unpacked_grads))
                    else ""
                )
            )
        checked.add(key)

    def init_fn(params: base.Params) -> MultiTensorState:
        layout = Layout.of(params, min_size)
        packed = layout.pack(params)
        try:
            inner_state = inner.init(packed)
        except (ValueError, TypeError) as error:
            raise base.TreeMismatchError(
                f"The optimizer wrapped by adaopt.multi_tensor failed on the packed parameters ({error}). A tree given to "
                "it at construction (a weight_decay_mask, a per-leaf option) must match the packed tree, not the "
                "parameters: apply masked weight decay outside the wrapper, e.g. optax.chain(adaopt.multi_tensor("
                "adaopt.adam(1.0)), optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))."
            ) from error
        stored = [x for x in jax.tree.leaves(inner_state, is_leaf=base.is_stored) if base.is_stored(x)]
        if stored:
            raise NotElementwiseError(
                f"adaopt.multi_tensor packs small leaves into one buffer, but the wrapped optimizer stores a moment with "
                f"{stored[0].storage!r} (mu_dtype/nu_dtype): its blocks' scales, or its stochastic rounding's draws, "
                "belong to one leaf, and packing would change the step. Give the optimizer float32, float16 or bfloat16 "
                "moments under multi_tensor, or use this storage without multi_tensor."
            )
        return MultiTensorState(inner_state)

    def update_fn(
        updates: base.Updates, state: MultiTensorState, params: base.Params | None = None, **extra_args: Any
    ) -> tuple[base.Updates, MultiTensorState]:
        if params is not None:
            base.check_tree_match(updates, params, "parameters")
        # The parameters' layout, as init's: gradients of another dtype (float32 for bfloat16 parameters) share it.
        layout = Layout.of(updates if params is None else params, min_size)
        grads = layout.pack(updates)
        flat_params = None if params is None else layout.pack(params)
        check(grads, state.inner, flat_params, extra_args, (updates, params))
        flat_updates, inner_state = inner.update(grads, state.inner, flat_params, **extra_args)
        new_updates = jax.tree.map(placement.placed_like, layout.unpack(flat_updates), updates)
        return new_updates, MultiTensorState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
