"""The whole-tree helpers: sums, norms and distances over every leaf, a schedule's value at a step
count, and finding one state inside a nested optimizer state.

Reductions run on ``optax.tree`` after an explicit cast to the dtype they accumulate in (the
state's scalar dtype, :func:`adaopt._src.moments.scalar_dtype`), so a bfloat16 leaf is summed in
float32 and a float64 tree in float64, in the order of the tree's leaves.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

from adaopt._src import moments


def learning_rate_at(learning_rate: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """The value of ``learning_rate`` (a number or a schedule ``count -> value``) at ``count``, a 0-d array of ``dtype``."""
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(value).astype(dtype)


def tree_sum(tree: Any, dtype: Any) -> jax.Array:
    """The sum of every element of every leaf, accumulated in ``dtype``; 0 for a tree with no leaves."""
    return jnp.asarray(optax.tree.sum(optax.tree.cast(tree, dtype)), dtype)


def sum_of_squares(tree: Any, dtype: Any) -> jax.Array:
    """The squared norm of the tree taken as one vector, accumulated in ``dtype``; 0 for no leaves."""
    return jnp.asarray(optax.tree.norm(optax.tree.cast(tree, dtype), squared=True), dtype)


def norm(tree: Any, dtype: Any) -> jax.Array:
    """The norm of the tree taken as one vector, in ``dtype``, with a zero derivative at 0 (see :func:`moments.safe_sqrt`)."""
    return moments.safe_sqrt(sum_of_squares(tree, dtype))


def squared_distance(tree: Any, other: Any, dtype: Any) -> jax.Array:
    """``||tree - other||^2`` over the whole tree, each difference taken in ``dtype``."""
    return sum_of_squares(optax.tree.sub(optax.tree.cast(tree, dtype), optax.tree.cast(other, dtype)), dtype)


def vdot(tree: Any, other: Any, dtype: Any) -> jax.Array:
    """The inner product of two real trees of one structure, taken as vectors, in ``dtype``.

    A sum of elementwise products, not ``optax.tree.vdot``: its ``dot_general`` refuses operands
    sharded along the contracted axis on a mesh with explicit axes.
    """
    return tree_sum(jax.tree.map(jnp.multiply, optax.tree.cast(tree, dtype), optax.tree.cast(other, dtype)), dtype)


S = TypeVar("S")


def find_state(state: Any, state_type: type[S], fix: str) -> S:
    """The one ``state_type`` held anywhere in ``state`` (a chain's, ``inject_hyperparams``', ``MultiSteps``'...).

    Found by the state's class name with ``optax.tree.get_all_with_path``. No match, or more than
    one, raises a ``ValueError`` that says how many were found and ends with ``fix``.
    """
    found = [node for _, node in optax.tree.get_all_with_path(state, state_type.__name__)]
    found = [node for node in found if isinstance(node, state_type)]
    if len(found) != 1:
        raise ValueError(
            f"Expected an optimizer state holding exactly one {state_type.__name__}, found {len(found)}: {fix}"
        )
    return found[0]
