"""Checkpoints across meshes: the state an optimizer would build on placed parameters, as a restore target.

A checkpoint of ``(params, opt_state)`` written on one mesh restores on another (fewer devices,
other axes, one device, one process instead of several) when the restore is told each leaf's
shape, dtype and new sharding. The parameters' targets are the user's to give; the state's follow
from them: every leaf that mirrors a parameter (a moment, an accumulator, the codes and scales
of 8-bit blocks) takes that parameter's placement, and the rest (step counts, global estimates,
matrix preconditioners) is replicated. :func:`abstract_state` computes that tree without
allocating it, for ``orbax.checkpoint``'s restore or for ``jax.jit(optimizer.init,
out_shardings=...)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


def _placement(params: Any) -> Mesh | SingleDeviceSharding | None:
    """The one mesh (or the one device) that every leaf of ``params`` is placed on; None when none is placed."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("abstract_state: params has no array leaves, so there is no placement to give the state.")
    if all(getattr(leaf, "sharding", None) is None for _, leaf in leaves):
        return None
    meshes: dict[Any, str] = {}
    for path, leaf in leaves:
        where = f"params{jax.tree_util.keystr(path)}"
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            if not isinstance(sharding.mesh, Mesh):
                raise ValueError(
                    f"abstract_state: {where} is placed on an abstract mesh ({sharding.mesh}); a restore needs devices: "
                    "build its NamedSharding from a jax.sharding.Mesh (jax.make_mesh)."
                )
            meshes.setdefault(sharding.mesh, where)
        elif isinstance(sharding, SingleDeviceSharding):
            meshes.setdefault(sharding, where)
        else:
            raise ValueError(
                f"abstract_state: {where} has sharding {sharding!r}; give every parameter a NamedSharding or one device: "
                "a placed jax.Array, or jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))."
            )
    if len(meshes) > 1:
        placements = "; ".join(f"{where} on {mesh}" for mesh, where in meshes.items())
        raise ValueError(
            f"abstract_state: the parameters are placed on {len(meshes)} different meshes or devices ({placements}); "
            "the state's placement follows one mesh: place every parameter on the same one."
        )
    (placement,) = meshes
    return placement


def _check_divides(name: str, x: Any) -> None:
    """A parameter's mesh axes divide its dimensions (JAX shards evenly only): else an error naming the leaf."""
    sizes = dict(zip(x.sharding.mesh.axis_names, x.sharding.mesh.axis_sizes, strict=True))
    for dim, entry in enumerate(x.sharding.spec):
        axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        shards = math.prod(sizes[a] for a in axes)
        if x.shape[dim] % shards:
            raise ValueError(
                f"abstract_state: {name} of shape {x.shape} is placed with {x.sharding.spec}, whose axes "
                f"{axes} split its dimension {dim} ({x.shape[dim]}) into {shards} parts, which does not divide it. "
                "Give it a placement whose axes divide its dimensions (or replicate that dimension)."
            )


def abstract_state(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """The state ``optimizer.init(params)`` builds, as ``jax.ShapeDtypeStruct`` leaves with shardings: a restore target.

    ``params`` gives the parameters' shapes, dtypes and placements on the mesh to restore onto:
    placed arrays, or ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, every one with a
    ``NamedSharding`` of one ``Mesh``, or all on one device; or none of them placed (``jax.eval_shape``'s
    structs), and then the state's leaves have no sharding either (orbax restores them on the default
    device). Nothing is allocated: ``init`` is traced
    (``jax.eval_shape``) on the parameters as typed by the mesh's axes made explicit, so that each
    state leaf gets the sharding that adaopt's state takes under sharding in types, the one a
    jitted step keeps (tests/test_sharding.py): a leaf that mirrors a parameter (moments,
    accumulators, 8-bit codes and their block scales along the axes they keep) is placed as that
    parameter, everything else (counts, scalars, matrix preconditioners) replicated; a wrapper
    that places the state itself (``adaopt.shard_states``' slices along a data axis) is followed.
    The shardings returned are on the mesh given, with its own axis types. On a mesh whose axes are
    ``Auto``, where ``jax.jit(optimizer.init)`` leaves the state's placement to XLA (which
    replicates zeros), ``jax.jit(optimizer.init, out_shardings=jax.tree.map(lambda s: s.sharding,
    abstract_state(optimizer, params)))`` places a fresh state the same way.

    Args:
      optimizer: the optimizer whose state is checkpointed (the same structure as the one saved:
        the same transformation, storages and wrappers; its numeric hyperparameters may differ).
      params: the parameters' targets on the new mesh (or the placed parameters themselves).

    Returns:
      The tree of ``optimizer.init(params)``, each array leaf a ``jax.ShapeDtypeStruct`` of the
      state's shape and dtype (int8 codes stay uint8, bfloat16 moments bfloat16, counters
      uint32) with its sharding on the parameters' mesh or device (none for unplaced parameters).

    Raises:
      ValueError: a parameter without a ``NamedSharding`` or a single device beside placed ones, on an
        abstract mesh, or parameters on several meshes; each message names the leaf. And whatever ``init``
        raises on the mesh given (``adaopt.shard_states`` on a mesh whose data axis is not
        ``Explicit``: :class:`adaopt.MeshAxisError`), as it does on the mesh made explicit.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
      >>> params = {"w": jax.ShapeDtypeStruct((4, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))}
      >>> state = adaopt.abstract_state(adaopt.scale_by_adam(mu_dtype="bfloat16"), params)
      >>> state.mu["w"].dtype, state.mu["w"].sharding.spec, state.count.sharding.spec
      (dtype(bfloat16), P('data', None), P())

      With orbax: ``checkpointer.restore(path, (params, adaopt.abstract_state(optimizer, params)))``
      restores ``(params, opt_state)`` saved on any mesh onto this one.
    """
    placement = _placement(params)
    if placement is None:  # shapes alone (jax.eval_shape's): the state's shapes alone, placed where it is restored
        return jax.eval_shape(optimizer.init, params)
    if isinstance(placement, SingleDeviceSharding):
        shapes = jax.eval_shape(optimizer.init, params)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), shapes)

    mesh = placement
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        _check_divides(f"params{jax.tree_util.keystr(path)}", x)
    if any(t != AxisType.Explicit for t in mesh.axis_types):
        # init traced on the mesh as it is first: what it refuses there (shard_states' data axis must be Explicit)
        # it must refuse here too, not give a target that no init on this mesh builds.
        with jax.set_mesh(mesh):
            jax.eval_shape(optimizer.init, params)
    # Under explicit axes every array traced has its sharding in its type: the state's placement is what init
    # computes, not a guess of XLA's propagation.
    explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
    typed = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(explicit, x.sharding.spec)), params
    )
    with jax.set_mesh(explicit):
        shapes = jax.eval_shape(optimizer.init, typed)

    def placed(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        # A leaf built from no parameter (a step count) has no sharding in its type: it is replicated.
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(placed, shapes)
