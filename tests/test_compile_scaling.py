"""A step's compiled program grows linearly with the number of leaves, where its update reads a whole-tree scalar.

Prodigy's and D-Adaptation's estimates, Polyak's and DoG's step sizes, Mechanic's scale, the hypergradient, the
schedule-free weights: each is a sum over every leaf that every leaf's update then reads. Summed as a chain of
scalar additions, XLA fused the whole chain into each leaf's kernel, so the compiled program (and its compile time:
400 leaves, 40 s) grew with the square of the number of leaves (``numerics.total``). The size of XLA's optimized
program is measured here, not the time: the same numbers on any machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import adaopt
from adaopt import Capability

WHOLE_TREE = (Capability.GLOBAL_STEP_SIZE, Capability.TUNING_FREE, Capability.NEEDS_VALUE)
SPECS = [spec for spec in adaopt.REGISTRY.values() if any(c in spec.capabilities for c in WHOLE_TREE)]


def _program_lines(tx: optax.GradientTransformation, leaves: int, needs_value: bool) -> int:
    """Lines of XLA's optimized program of one step (update and apply) on ``leaves`` small leaves."""
    params = {f"w{i:04d}": jnp.full((3,), 0.1 * (i + 1)) for i in range(leaves)}
    extra = {"value": jnp.float32(1.0)} if needs_value else {}

    def step(params: dict, state: object) -> tuple[dict, object]:
        updates, state = tx.update(params, state, params, **extra)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step).lower(params, tx.init(params)).compile()
    return len(compiled.as_text().splitlines())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_the_compiled_step_grows_linearly_with_the_leaves(spec: adaopt.OptimizerSpec) -> None:
    needs_value = Capability.NEEDS_VALUE in spec.capabilities
    small, large = (_program_lines(spec.make(), n, needs_value) for n in (24, 96))
    # Four times the leaves: four times the program, and a constant; the chain in every kernel made it ~16x.
    assert large < 5 * small, (small, large)


def test_a_total_under_vmap_on_a_mesh_with_explicit_axes() -> None:
    """A mapped leaf's sum is placed along the mapped axis, an unmapped one's is not: stacking them raised JAX's
    sharding error, where the chain of additions broadcast them. total() adds them one by one there."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from adaopt._src import numerics

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.arange(16.0).reshape(16, 1), NamedSharding(mesh, P("data")))
        total = jax.jit(jax.vmap(lambda a, b: numerics.tree_sum([a, b], jnp.float32), in_axes=(0, None)))
        result = total(x, jnp.ones(3))
    assert result.sharding.spec == P("data")
    assert jnp.array_equal(result, jnp.arange(16.0) + 3)
