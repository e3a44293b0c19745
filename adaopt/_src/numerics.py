"""The whole-tree helpers: sums, norms and distances over every leaf, a schedule's value at a step
count, finding one state inside a nested optimizer state, and reading a tree whose leaves are
Flax NNX variables (an ``nnx.Optimizer``'s ``opt_state``, ``nnx.state(model, nnx.Param)``).

Reductions sum each leaf after an explicit cast to the dtype they accumulate in (the state's scalar
dtype, :func:`adaopt._src.moments.scalar_dtype`), so a bfloat16 leaf is summed in float32 and a
float64 tree in float64, then the leaves' sums as one reduction (:func:`total`).
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

from adaopt._src import moments


def learning_rate_at(learning_rate: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """The value of ``learning_rate`` (a number or a schedule ``count -> value``) at ``count``, a 0-d array of ``dtype``."""
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(value).astype(dtype)


try:  # what jnp.stack raises for operands placed apart on a mesh with explicit axes (JAX has no public name for it)
    from jax._src.core import ShardingTypeError as _ShardingTypeError
except ImportError:  # pragma: no cover
    _ShardingTypeError = ()  # type: ignore[assignment,misc]

# The width of the rows that total() reduces the scalars in.
TOTAL_ROW = 128


def total(scalars: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """The sum of ``scalars`` (a leaf's partial sum each), in ``dtype``: one reduction of them as rows of a matrix.

    Not a chain of scalar additions (Python's ``sum``, ``optax.tree.sum``): XLA fuses that chain into every
    kernel that reads the total, and when each leaf's step reads it (Prodigy's and D-Adaptation's estimates,
    Polyak's step size) each leaf's kernel holds a chain as long as the tree, so the step compiles in time
    quadratic in the number of leaves (400 leaves: 40 s on XLA:CPU). XLA's simplifier turns the reduction of a
    vector of scalars into that chain too; the rows of a matrix it keeps as one reduction.
    """
    scalars = [jnp.asarray(x, dtype) for x in scalars]
    if len(scalars) <= 1:
        return scalars[0] if scalars else jnp.zeros([], dtype)
    try:
        stacked = jnp.stack(scalars)
    except _ShardingTypeError:  # under vmap on a mesh with explicit axes, a mapped leaf's sum and another's
        return functools.reduce(operator.add, scalars)  # are placed apart: added one by one, as they broadcast
    rows = jnp.pad(stacked, (0, -len(scalars) % TOTAL_ROW)).reshape(-1, TOTAL_ROW)
    return jnp.sum(jnp.sum(rows, axis=0))


def tree_sum(tree: Any, dtype: Any) -> jax.Array:
    """The sum of every element of every leaf, accumulated in ``dtype``; 0 for a tree with no leaves."""
    return total([jnp.sum(x) for x in jax.tree.leaves(optax.tree.cast(tree, dtype))], dtype)


def _in_precision(tree: Any, dtype: Any) -> Any:
    """Each leaf in ``dtype``, a complex leaf in its complex counterpart (never a silent real cast)."""
    return jax.tree.map(lambda x: moments.in_precision(jnp.asarray(x), dtype), tree)


def sum_of_squares(tree: Any, dtype: Any) -> jax.Array:
    """The squared norm of the tree taken as one real vector (``|x|^2`` for complex leaves), in ``dtype``; 0 for no leaves."""
    return total([jnp.sum(moments.abs_sq(x)) for x in jax.tree.leaves(_in_precision(tree, dtype))], dtype)


def norm(tree: Any, dtype: Any) -> jax.Array:
    """The norm of the tree taken as one vector, in ``dtype``, with a zero derivative at 0 (see :func:`moments.safe_sqrt`)."""
    return moments.safe_sqrt(sum_of_squares(tree, dtype))


def squared_distance(tree: Any, other: Any, dtype: Any) -> jax.Array:
    """``||tree - other||^2`` over the whole tree, each difference taken in ``dtype``."""
    return sum_of_squares(optax.tree.sub(_in_precision(tree, dtype), _in_precision(other, dtype)), dtype)


def vdot(tree: Any, other: Any, dtype: Any) -> jax.Array:
    r"""The real inner product of two trees of one structure, taken as vectors, in ``dtype``.

    A complex leaf counts as its real and imaginary parts: :math:`\mathrm{Re}(\bar a b)`. A sum of
    elementwise products, not ``optax.tree.vdot``: its ``dot_general`` refuses operands sharded
    along the contracted axis on a mesh with explicit axes.
    """
    return tree_sum(jax.tree.map(moments.real_product, _in_precision(tree, dtype), _in_precision(other, dtype)), dtype)


T = TypeVar("T")
S = TypeVar("S")


def named_path(path: Sequence[Any]) -> tuple[Any, ...]:
    """A leaf's key path without the ``value`` attribute of a box that holds it: Flax linen's ``nn.Partitioned`` and
    ``nn.LogicallyPartitioned`` (``params["Dense_0"]["kernel"].value``), or an NNX variable in a tree not unwrapped.
    The leaf is named by the key that holds the box (``Dense_0/kernel``), as in the unboxed tree (``nn.unbox``)."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def path_string(path: Sequence[Any], separator: str = "/") -> str:
    """A leaf's :func:`named_path` as a string, its keys joined by ``separator``: ``"encoder/layers/0/w"``."""
    return jax.tree_util.keystr(named_path(path), simple=True, separator=separator)


def _nnx_variable_types() -> tuple[type, ...]:
    """Flax NNX's variable classes, or none when the program has not imported ``flax.nnx`` (then
    no tree can hold one, and adaopt does not import Flax itself)."""
    # vars(), not getattr: recent Flax keeps VariableState as a deprecated alias of Variable.
    namespace = vars(sys.modules.get("flax.nnx", sys))
    return tuple(namespace[name] for name in ("Variable", "VariableState") if isinstance(namespace.get(name), type))


def _raise_if_nnx_optimizer(tree: Any, name: str) -> None:
    optimizer_type = getattr(sys.modules.get("flax.nnx"), "Optimizer", None)
    if optimizer_type is not None and isinstance(tree, optimizer_type):
        raise TypeError(
            f"{name} is an nnx.Optimizer: pass its state, `optimizer.opt_state`. adaopt's helpers read and "
            "return optimizer states, plain or NNX, never the optimizer object."
        )


def _variable_value(variable: Any) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def unwrap_variables(tree: T, name: str = "state") -> tuple[Any, Callable[[Any], T]]:
    """``tree`` with each Flax NNX variable replaced by its value, and the way back to ``tree``'s form.

    An ``nnx.Optimizer`` keeps its state as ``OptArray``/``OptVariable`` variables and
    ``nnx.state(model, nnx.Param)`` holds ``Param`` variables: the math reads their values, and a
    helper returns its result in the form it was given. A tree without variables (optax's own
    states, linen's, Haiku's, Equinox's) comes back as it is.

    Args:
      tree: any pytree, with or without NNX variables.
      name: the argument ``tree`` was passed as, for the error when it is an ``nnx.Optimizer``.

    Returns:
      ``(values, rewrap)``: the tree of values, and a function that takes a tree of the values'
      structure (e.g. an updated state) and returns it in ``tree``'s form: new variables of the
      same types and metadata (the ones in ``tree`` are not changed), or the tree itself when
      ``tree`` held none.

    Raises:
      TypeError: ``tree`` is an ``nnx.Optimizer`` rather than its ``opt_state``.
    """
    _raise_if_nnx_optimizer(tree, name)
    variable_types = _nnx_variable_types()
    is_variable = lambda x: isinstance(x, variable_types)
    if not variable_types or not any(map(is_variable, jax.tree.leaves(tree, is_leaf=is_variable))):
        return tree, lambda values: values
    values = jax.tree.map(lambda x: _variable_value(x) if is_variable(x) else x, tree, is_leaf=is_variable)
    treedef = jax.tree.structure(tree)

    def rewrap(new_values: Any) -> T:
        # A variable is a pytree node whose one child is its value: the same leaves, in order.
        return jax.tree.unflatten(treedef, jax.tree.leaves(new_values))

    return values, rewrap


def find_states(state: Any, state_type: type[S]) -> list[S]:
    """Every ``state_type`` held anywhere in ``state`` (a chain's, ``inject_hyperparams``', ``optax.partition``'s...).

    Found by the state's class name with ``optax.tree.get_all_with_path``, in ``state``'s values
    (:func:`unwrap_variables`: an ``nnx.Optimizer``'s ``opt_state`` is read as a plain state).
    """
    state, _ = unwrap_variables(state)
    found = [node for _, node in optax.tree.get_all_with_path(state, state_type.__name__)]
    return [node for node in found if isinstance(node, state_type)]


def find_state(state: Any, state_type: type[S], fix: str) -> S:
    """The one ``state_type`` held anywhere in ``state`` (:func:`find_states`).

    No match, or more than one, raises a ``ValueError`` that says how many were found and ends
    with ``fix``.
    """
    found = find_states(state, state_type)
    if len(found) != 1:
        raise ValueError(
            f"Expected an optimizer state holding exactly one {state_type.__name__}, found {len(found)}: {fix}"
        )
    return found[0]
