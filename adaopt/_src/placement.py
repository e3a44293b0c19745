"""Where an array lives under a mesh with explicit axes (sharding in types): reading it, and placing one array as another.

At the bottom of the package (it imports nothing of adaopt's), so that the storages of the
moments and the whole-tree helpers share it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding in ``x``'s type under a mesh with explicit axes (sharding in types), else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(sharding, NamedSharding) or mesh is None or mesh.empty:
        return None
    return sharding if AxisType.Explicit in mesh.axis_types else None


def placed_like(x: Any, like: Any) -> Any:
    """``x`` resharded to the explicit sharding of ``like`` (replicated included) where the two differ, else ``x``."""
    sharding = explicit_sharding(like)
    if sharding is None or explicit_sharding(x) == sharding:
        return x
    return jax.sharding.reshard(x, sharding)


def explicit_spec(x: jax.Array) -> Any:
    """The partition spec of ``x`` when a mesh with explicit axes shards it, else None."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return None if spec is None or all(axis is None for axis in spec) else spec


def split_axes(x: Any) -> tuple[Any, ...]:
    """The mesh axes that split each axis of ``x`` under a mesh with explicit axes, one entry per axis (None: not
    split; all None for an array off such a mesh)."""
    spec = tuple(explicit_spec(x) or ())
    return (*spec, *(None,) * (jnp.ndim(x) - len(spec)))


def concrete_sharding(x: Any) -> NamedSharding | None:
    """The ``NamedSharding`` of an array placed on a mesh outside ``jit`` (a traced one has none, an array on one
    device none either), whatever the mesh's axis types."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    return x.sharding if isinstance(x.sharding, NamedSharding) else None


def _concrete_mesh(x: Any) -> Mesh | None:
    """The mesh of a placed array outside ``jit``: where a spec alone is placed outside a mesh context
    (``jax.set_mesh``), which JAX's ``reshard`` and ``jax.eval_shape``'s abstract meshes need."""
    mesh = getattr(concrete_sharding(x), "mesh", None)
    return mesh if isinstance(mesh, Mesh) else None


def on_mesh_of(spec: PartitionSpec, like: Any) -> PartitionSpec | NamedSharding:
    """``spec`` on the mesh of ``like``: its concrete mesh eagerly, the abstract mesh of its type under ``jit`` (a spec
    alone needs a mesh context, ``jax.set_mesh``, which a jitted step need not be in), else ``spec``."""
    mesh: Any = _concrete_mesh(like)
    if mesh is None:
        typed = getattr(getattr(jax.typeof(like), "sharding", None), "mesh", None)
        mesh = typed if typed is not None and not typed.empty and AxisType.Explicit in typed.axis_types else None
    return spec if mesh is None else NamedSharding(mesh, spec)


def reshard(x: jax.Array, spec: PartitionSpec, like: Any) -> jax.Array:
    """``x`` resharded to ``spec``, on the concrete mesh of ``like`` where it has one (eagerly, outside a mesh context)."""
    return jax.sharding.reshard(x, on_mesh_of(spec, like))


def zeros(struct: Any, like: Any, dtype: Any = None) -> jax.Array:
    """Zeros of the shape and sharding of ``struct``, ``jax.eval_shape``'s result of a function of ``like`` (a state's
    statistic placed as the step computes it), in ``dtype`` (default: ``struct``'s).

    Outside ``jit`` that result is typed on an abstract mesh, which arrays cannot be placed on outside a mesh context:
    they are placed on ``like``'s mesh then, so that ``init`` runs eagerly as under ``jit``.
    """
    sharding = getattr(struct, "sharding", None)
    mesh = _concrete_mesh(like)
    if mesh is not None and isinstance(sharding, NamedSharding):
        dtype = struct.dtype if dtype is None else dtype
        return jnp.zeros(struct.shape, dtype, device=NamedSharding(mesh, sharding.spec))
    return jnp.zeros_like(struct, dtype=dtype)


def placed(x: jax.Array, spec: PartitionSpec, like: Any) -> jax.Array:
    """``x`` placed as ``spec`` on the mesh of ``like`` (a statistic of ``like`` split as one of its axes), or replicated
    there where ``like`` is not split (as a jitted ``init`` places a new array, eagerly too)."""
    return replicated(x, like) if explicit_spec(like) is None else reshard(x, spec, like)


def replicated(x: jax.Array, like: Any) -> jax.Array:
    """``x`` replicated on the mesh of ``like``, a placed array, outside ``jit`` (under it a new array is replicated
    already): a state's matrices made eagerly are placed as a jitted ``init`` places them, not on one device."""
    mesh = _concrete_mesh(like)
    return x if mesh is None else jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


def whole(x: jax.Array) -> jax.Array:
    """``x`` gathered whole on every device when a mesh with explicit axes shards it, else ``x``.

    For the matrix methods (Newton–Schulz, an SVD) whose products over a sharded axis are
    ambiguous to JAX's explicit sharding: one all-gather per leaf and step, the work replicated.
    Under automatic sharding (no sharding in the types) XLA chooses the communication.
    """
    return x if explicit_spec(x) is None else reshard(x, PartitionSpec(), x)


def sharded_like(y: jax.Array, x: jax.Array) -> jax.Array:
    """``y`` with the explicit sharding of ``x`` (a result placed as its input), or ``y`` as it is (already placed so,
    or ``x`` replicated)."""
    spec = explicit_spec(x)
    return y if spec is None or explicit_spec(y) == spec else reshard(y, spec, x)
