"""Optimizer states split across a data-parallel mesh axis (ZeRO stages 1 and 2), around any optimizer.

In data-parallel training each device holds the whole parameters and, with them, the whole
optimizer state: Adam's two moments are twice the model again on every device. ZeRO
(Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
SC 2020) splits the state instead: each of the :math:`n` devices along the data axis keeps and
updates :math:`1/n` of it, and the updated slices are gathered back into whole updates.
:func:`shard_states` does that for any optimizer, on a mesh with explicit axes (JAX's
"sharding in types", the default of ``jax.make_mesh``):

- every state leaf that mirrors a parameter (moments, accumulators, momentum, averaged or slow
  weights, 8-bit and FP8 codes) gets the parameter's sharding with the data axis
  added on the parameter's first dimension that no other axis shards and that it divides (a
  (50257, 768) embedding on 8 devices: the second; a row-parallel (3072, 768) weight sharded
  ``P("model", None)``: the second). A dimension another axis shards (tensor parallelism) is not
  split further: the state that does not mirror the parameter (factored statistics) keeps that axis
  alone there, which the gradient's slices would not match. A quantized moment's scales and 4-bit codes
  (its leading axes, then one axis of the blocks of its trailing ones) are split on the same
  dimension where it is a leading one, or the first trailing one with whole blocks in each slice;
- the gradients (and the parameters) are resharded to those slices as the step starts, whatever
  their own placement (gradients reduce-scattered already included), so each
  device computes the update of its slice only; inside one jitted training step, this is where
  the compiler can turn the gradients' all-reduce into a reduce-scatter (ZeRO-2: no device holds
  the whole summed gradient);
- the updates are resharded back to the gradients' sharding (an all-gather) for
  ``optax.apply_updates``.

The arithmetic of each coordinate is unchanged, so elementwise optimizers give the updates of the
unsplit state, bit for bit (in one program with ``optax.apply_updates`` the parameters may differ by
a last bit: XLA:CPU fuses ``p + lr * u`` into a fused multiply-add where the update is not gathered
first); optimizers that reduce over a leaf or the tree (norms, LAMB's trust ratios, the
tuning-free estimates) reduce over the slices, which may sum in another order (the last bits).
State that does not mirror a parameter keeps the sharding the optimizer gives it: factored
statistics (Adafactor's row and column means), preconditioner matrices (Shampoo, SOAP: their
roots need whole matrices) and scalars. A parameter whose sharding already uses the axis (fully
sharded, FSDP-style), smaller than ``min_size``, or with no dimension free of other axes that the axis
divides keeps its own sharding for its state (replicated over the axis): :func:`zero_plan` lists each
leaf's choice.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adaopt._src import base, complex_params, placement, storage

DEFAULT_MIN_SIZE = 1
"""By default every leaf with a dimension the axis divides is split: the scalars of the state are the only
replicated bytes (``benchmarks/zero.py`` measures the bytes per device)."""


class MeshAxisError(ValueError):
    """The parameters are not on a mesh with explicit axes that has the axis to split the states along."""


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one entry of a partition spec (None, a name or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec(sharding: NamedSharding, ndim: int) -> list[tuple[str, ...]]:
    spec = tuple(sharding.spec)
    return [_axes(entry) for entry in (*spec, *(None,) * (ndim - len(spec)))]


def _axis_size(sharding: Any, axis: str) -> int:
    return int(dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes, strict=True))[axis])


def _split_dim(x: Any, axis: str, min_size: int) -> int | None:
    """The dimension of ``x`` (a parameter or a gradient) whose state slices take ``axis``, or None (kept as is)."""
    sharding = placement.explicit_sharding(x)
    if sharding is None or axis not in sharding.mesh.axis_names or x.ndim == 0 or x.size < min_size:
        return None
    spec = _spec(sharding, x.ndim)
    if any(axis in entry for entry in spec):
        return None  # already split along the axis (fully sharded parameters)
    size = _axis_size(sharding, axis)
    for dim, entry in enumerate(spec):
        if not entry and x.shape[dim] % size == 0:
            return dim
    return None


def _with_axis(x: jax.Array, dim: int, axis: str, like: Any = None) -> jax.Array:
    """``x`` resharded as ``like`` (default: itself) with ``axis`` added on dimension ``dim``."""
    sharding = placement.explicit_sharding(x if like is None else like)
    assert sharding is not None
    spec = _spec(sharding, x.ndim)
    if axis not in spec[dim]:
        spec[dim] = (*spec[dim], axis)
    entries = [None if not e else e[0] if len(e) == 1 else e for e in spec]
    target = NamedSharding(sharding.mesh, PartitionSpec(*entries))
    return x if placement.explicit_sharding(x) == target else jax.sharding.reshard(x, target)


def _is_held(x: Any) -> bool:
    """A leaf of a state walked parameter by parameter: a stored moment, or another group's ``MaskedNode``."""
    return base.is_stored(x) or base.is_masked_node(x)


def _per_parameter(node: Any, params: Any) -> bool:
    """Whether ``node`` holds one leaf per parameter (``MaskedNode`` for another group's), one of them at least of its
    parameter's shape (:func:`_mirrors`): a moment tree, whose other leaves (GaLore's projected moments, factored
    statistics) keep their placement."""
    structure: Any = jax.tree.structure(node, is_leaf=_is_held)
    if structure != jax.tree.structure(params, is_leaf=base.is_masked_node):
        return False
    held, leaves = jax.tree.leaves(node, is_leaf=_is_held), jax.tree.leaves(params, is_leaf=base.is_masked_node)
    return any(_mirrors(s, p) for s, p in zip(held, leaves, strict=True))


def _mirrors(leaf: Any, param: Any) -> bool:
    """Whether a state leaf mirrors ``param``: of its shape (a stored moment's, a complex parameter's real view)."""
    return not (base.is_masked_node(leaf) or base.is_masked_node(param)) and complex_params.mirrors(leaf, param)


def _split_leaf(leaf: Any, param: Any, dim: int | None, axis: str) -> Any:
    """A state leaf mirroring ``param`` with ``axis`` added on ``dim``; a stored leaf's arrays likewise where they
    share the parameter's leading dimensions up to ``dim`` (codes, scales per block of trailing axes), the others
    as they are."""
    if dim is None or base.is_masked_node(leaf):
        return leaf
    size = _axis_size(placement.explicit_sharding(param), axis)

    def split(x: Any) -> Any:
        if placement.explicit_sharding(x) is None:
            return x
        if isinstance(leaf, storage.Quantized) and np.shape(x) != leaf.shape:
            # Scales (and 4-bit codes): the leaf's leading axes, then one axis of its trailing ones' blocks, split
            # where each slice holds whole blocks (storage.Blockwise.lead_axes); a flattened leaf's stay whole.
            lead = leaf.storage.lead_axes(leaf.shape)
            if lead is None or dim > lead or (dim == lead and np.shape(x)[lead] % size):
                return x
            return _with_axis(x, dim, axis)
        # A complex parameter's real view (complex_convention="real_imag") is split as the parameter
        # (a stored view's codes too, of its shape s + (2,)).
        pairs = complex_params.is_complex(param) and not complex_params.is_complex(x) and np.ndim(x) == param.ndim + 1
        if (np.ndim(x) != param.ndim and not pairs) or np.shape(x)[: dim + 1] != param.shape[: dim + 1]:
            return x
        return _with_axis(x, dim, axis)

    return jax.tree.map(split, leaf) if base.is_stored(leaf) else split(leaf)


def _split_state(state: Any, params: Any, axis: str, min_size: int) -> Any:
    """``state`` with its leaves that mirror ``params`` split along ``axis``, the others as they are."""
    leaves = jax.tree.leaves(params, is_leaf=base.is_masked_node)  # optax.masked's MaskedNode too, as the state's
    dims = [None if base.is_masked_node(p) else _split_dim(p, axis, min_size) for p in leaves]

    def per_parameter(node: Any) -> bool:
        return _per_parameter(node, params)

    def place(node: Any) -> Any:
        if not per_parameter(node):
            return node
        held = jax.tree.leaves(node, is_leaf=_is_held)
        split = [
            _split_leaf(s, p, d, axis) if _mirrors(s, p) else s for s, p, d in zip(held, leaves, dims, strict=True)
        ]
        return jax.tree.unflatten(jax.tree.structure(node, is_leaf=_is_held), split)

    return jax.tree.map(place, state, is_leaf=per_parameter)


def _check_mesh(params: Any, axis: str) -> None:
    """At init: the parameters are on a mesh with explicit axes that has ``axis`` (else a clear error). The first leaf
    on such a mesh decides; parameters placed (outside jit) on meshes of automatic axes alone are named as such."""
    leaves = jax.tree.leaves_with_path(params)
    explicit = [(path, s) for path, leaf in leaves if (s := placement.explicit_sharding(leaf)) is not None]
    named = explicit or [(path, s) for path, leaf in leaves if (s := placement.concrete_sharding(leaf)) is not None]
    if not named:
        raise MeshAxisError(
            f"shard_states(axis={axis!r}) splits the optimizer state along a mesh axis, but no parameter is placed "
            "on a mesh with explicit axes. Place the parameters first, e.g. mesh = jax.make_mesh((8,), "
            f"({axis!r},)); params = jax.device_put(params, NamedSharding(mesh, PartitionSpec())), and call init "
            "with them (or under jax.set_mesh(mesh))."
        )
    path, sharding = named[0]
    if axis not in sharding.mesh.axis_names:
        raise MeshAxisError(
            f"shard_states(axis={axis!r}): the parameter {jax.tree_util.keystr(path)} is on a mesh with axes "
            f"{tuple(sharding.mesh.axis_names)}, which has no axis {axis!r}. Pass the name of the mesh's "
            "data-parallel axis as `axis`."
        )
    kind = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True))[axis]
    if kind != jax.sharding.AxisType.Explicit:
        raise MeshAxisError(
            f"shard_states(axis={axis!r}): the mesh's axis {axis!r} is of type {kind.name}; the states are split "
            "along an explicit axis only. Make it explicit: jax.make_mesh(..., axis_types=(AxisType.Explicit, "
            "...)) (jax.make_mesh's default)."
        )


def zero_plan(params: Any, axis: str = "data", *, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """Which dimension of each parameter :func:`shard_states` splits its state along, or None where it keeps the
    parameter's sharding (already split along ``axis``, smaller than ``min_size``, or no dimension that no other
    axis shards and ``axis`` divides).

    Args:
      params: the parameters as placed on the mesh (arrays, or ``jax.ShapeDtypeStruct``\\ s with shardings).
      axis: the data-parallel axis of their mesh.
      min_size: as in :func:`shard_states`.

    Returns:
      A tree of the parameters' structure with an int or None for each leaf.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = jax.device_put({"emb": jnp.zeros((5, 4)), "b": jnp.zeros(())}, NamedSharding(mesh, P()))
      >>> adaopt.zero_plan(params)
      {'b': None, 'emb': 0}
    """
    base.check_integer("min_size", min_size, 1)
    return jax.tree.map(lambda p: _split_dim(p, axis, min_size), params)


def shard_states(
    optimizer: optax.GradientTransformation, axis: str = "data", *, min_size: int = DEFAULT_MIN_SIZE
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` with its state split across the mesh axis ``axis`` (ZeRO-1/2; see the module's docstring).

    Use it for data-parallel training on a mesh with explicit axes: the parameters replicated (or sharded
    along other axes, e.g. tensor-parallel), the batch split along ``axis``. Call ``init`` with the placed
    parameters (eagerly or under ``jit``) and ``update`` inside the jitted step that computes the gradients,
    so that the compiler sees the whole exchange. The state has ``optimizer``'s structure and values (a
    checkpoint restores into either), only its placement differs.

    Args:
      optimizer: any gradient transformation; extra arguments of ``update`` (``value=``) pass through.
      axis: the name of the data-parallel mesh axis to split the states along.
      min_size: parameters with fewer elements keep their state whole on every device (>= 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``optimizer``'s state.

    Raises:
      MeshAxisError: at ``init``, when no parameter is on a mesh with explicit axes, or the mesh has no
        axis ``axis``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = jax.device_put({"w": jnp.ones((4, 3))}, NamedSharding(mesh, P()))
      >>> opt = adaopt.shard_states(adaopt.adam(1e-2))
      >>> state = opt.init(params)
      >>> optax.tree.get(state, "mu")["w"].sharding.spec
      P('data', None)
    """
    base.check_transformation("optimizer", optimizer)
    base.check_integer("min_size", min_size, 1)
    if not isinstance(axis, str) or not axis:
        raise base.HyperparameterError(f"`axis` must be the name of a mesh axis (a non-empty str), got {axis!r}.")
    inner = base.with_extra_args(optimizer)

    def init_fn(params: base.Params) -> Any:
        _check_mesh(params, axis)
        return _split_state(inner.init(params), params, axis, min_size)

    def update_fn(
        updates: base.Updates, state: Any, params: base.Params | None = None, **extra: Any
    ) -> tuple[base.Updates, Any]:
        reference = updates if params is None else base.fast(params)  # lookahead's gradients: its fast weights'

        def split(x: Any, like: Any) -> Any:  # x placed as like's slices, whatever its own placement
            dim = _split_dim(like, axis, min_size)
            return x if dim is None else _with_axis(x, dim, axis, like)

        sliced = jax.tree.map(split, updates, reference)
        sliced_params = None if params is None else jax.tree.map(split, params, params)
        new_updates, new_state = inner.update(sliced, state, sliced_params, **extra)
        # The updates go back to the gradients' placement (an all-gather; lookahead's, of both weights, to the
        # parameters'), the state stays where init put it.
        back = params if isinstance(new_updates, optax.LookaheadParams) else updates
        return jax.tree.map(placement.placed_like, new_updates, back), jax.tree.map(
            placement.placed_like, new_state, state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
