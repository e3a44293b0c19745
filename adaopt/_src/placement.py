"""Where an array lives under a mesh with explicit axes (sharding in types): reading it, and placing one array as another.

At the bottom of the package (it imports nothing of adaopt's), so that the storages of the
moments and the whole-tree helpers share it.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding


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


def whole(x: jax.Array) -> jax.Array:
    """``x`` gathered whole on every device when a mesh with explicit axes shards it, else ``x``.

    For the matrix methods (Newton–Schulz, an SVD) whose products over a sharded axis are
    ambiguous to JAX's explicit sharding: one all-gather per leaf and step, the work replicated.
    Under automatic sharding (no sharding in the types) XLA chooses the communication.
    """
    return x if explicit_spec(x) is None else jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def sharded_like(y: jax.Array, x: jax.Array) -> jax.Array:
    """``y`` with the explicit sharding of ``x`` (a result placed as its input), or ``y`` as it is.

    ``y`` already placed so (or ``x`` replicated) is returned as it is: no resharding, which needs a mesh
    in context (``jax.set_mesh``) where a leaf is placed outside ``jit``.
    """
    spec = explicit_spec(x)
    return y if spec is None or explicit_spec(y) == spec else jax.sharding.reshard(y, spec)
