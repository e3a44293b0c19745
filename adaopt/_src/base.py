"""Types, hyperparameter validation and the assembly shared by every optimizer."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import complex_params

Params: TypeAlias = optax.Params
Updates: TypeAlias = optax.Updates
Schedule: TypeAlias = optax.Schedule
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule
MaskOrFn: TypeAlias = Any  # a pytree of booleans matching the parameters, or a callable returning one


class HyperparameterError(ValueError, TypeError):
    """A hyperparameter is out of range or of the wrong type.

    A ``ValueError`` (and, for wrong types, also a ``TypeError``), raised when the optimizer is
    built, never inside the training loop.
    """


class TreeMismatchError(ValueError):
    """A tree passed to ``update`` (or to a helper that reads the state) does not mirror the one it must: another
    structure, or a leaf of another shape.

    The message names what was compared (the parameters, the optimizer's state), where a shape
    differs (the leaf's path and both shapes) and the fix.
    """


def concrete_scalar(value: Any) -> float | None:
    """The value as a Python float, or None when it is traced (inject_hyperparams, vmap, grad)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, (int, float)):  # not any numbers.Real: a Fraction passes here and fails in the step
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        dtype = np.asarray(value).dtype
        numeric = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)  # bfloat16 included
        if np.ndim(value) != 0 or not numeric:
            raise TypeError
        return float(np.asarray(value))
    raise TypeError


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The interval as it is: an infinite end is always open (``[0.0, inf)``), since values must be finite."""
    lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    return f"{lo}, {hi}"


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``HyperparameterError`` unless ``value`` is a finite real number in the given interval, and finite in
    float32 (the steps of float32 and bfloat16 parameters take it in float32).

    Traced values (under ``inject_hyperparams``, ``vmap`` or ``grad``) are not checked: they
    were checked, as concrete numbers, when the optimizer was first built.
    """
    valid = _interval(low, high, low_open, high_open)
    try:
        x = concrete_scalar(value)
    except TypeError:
        raise HyperparameterError(
            f"{name} must be a real number in {valid}, got {value!r} of type {type(value).__name__}."
        ) from None
    if x is None:
        return
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        raise HyperparameterError(f"{name} must be a finite number in {valid}, got {value!r}.")
    if abs(x) >= FLOAT32_OVERFLOW:
        # Checked here, where the parameters' dtype is not known yet: in a float32 (or bfloat16) step it is inf.
        raise HyperparameterError(
            f"{name}={value!r} is beyond float32's range (it rounds to inf in float32, whose largest number is "
            f"{float(np.finfo(np.float32).max):.6g}): a float32 or bfloat16 step would take it as inf."
        )
    if is_integer(value) and not -INT32_MAX - 1 <= value <= INT32_MAX:
        # JAX takes a Python integer as int32 (without x64): the step would fail with an OverflowError.
        raise HyperparameterError(
            f"{name}={value!r} is an integer beyond int32's range, which JAX cannot take into a step: give it as "
            f"a float, {name}={float(value)!r}."
        )


INT32_MAX = int(np.iinfo(np.int32).max)
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
"""The smallest magnitude that rounds to inf in float32 (its largest number, 2**128 - 2**104, plus half a step)."""


def is_integer(x: Any) -> bool:
    """A Python or NumPy integer (one read from a config array); ``True`` is not one."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
    """A Python or NumPy real number, an integer or a float; ``True`` is not one."""
    return is_integer(x) or isinstance(x, (float, np.floating))


def as_python(config: Any, **kinds: type) -> None:
    """Store the fields ``kinds`` names of a frozen, checked ``config`` as Python values of those types, numbers or a
    str (a NumPy scalar read from a config array is one: the configuration then hashes, prints and compares as it
    is written); None stays None."""
    for name, kind in kinds.items():
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, kind(value))


def check_integer(name: str, value: Any, low: int, high: int = INT32_MAX) -> None:
    """Raise ``HyperparameterError`` unless ``value`` is an integer (not a bool) in [low, high]."""
    if not is_integer(value) or not low <= value <= high:
        hint = (
            f" An array here is what optax.inject_hyperparams makes of an integer option: it sets shapes or loop "
            f"counts and must stay a Python int. Use adaopt.inject_hyperparams(factory), which keeps it static, or "
            f"optax.inject_hyperparams(factory, static_args=({name!r},))."
            if isinstance(value, jax.Array) and name.isidentifier()
            else ""
        )
        raise HyperparameterError(f"{name} must be an integer in [{low}, {high}], got {value!r}.{hint}")


def check_nonnegative(name: str, value: Any) -> None:
    check_scalar(name, value, low=0.0)


def check_decay(name: str, value: Any) -> None:
    """A decay rate of an exponential moving average: 0 <= value < 1."""
    check_scalar(name, value, low=0.0, high=1.0, high_open=True)


def check_learning_rate(learning_rate: Any, name: str = "learning_rate") -> None:
    """A non-negative number, or a schedule (a callable from the step count to a real scalar: :func:`check_schedule`)."""
    if callable(learning_rate):
        check_schedule(name, learning_rate)
        _check_schedule_start(name, learning_rate)
        return
    check_nonnegative(name, learning_rate)


def _check_schedule_start(name: str, schedule: Any) -> None:
    """Raise ``HyperparameterError`` where the schedule's value at step 0 is negative or not finite (a step uphill, or
    NaN parameters, from the first update); one that fails when run eagerly is left to its first step."""
    try:
        value = concrete_scalar(schedule(jnp.zeros([], jnp.int32)))
    except Exception:  # traced or failing eagerly: check_schedule has traced it already
        return
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise HyperparameterError(
            f"{name} must be a schedule of finite values >= 0, got one whose value at step 0 is {value!r}."
        )


def check_schedule(name: str, schedule: Any, step_dtype: Any = jnp.int32) -> None:
    """Raise ``HyperparameterError`` unless ``schedule`` maps the step count (an int32 scalar, optax's) to a real
    scalar: a schedule's factory (``optax.cosine_decay_schedule`` for ``optax.cosine_decay_schedule(0.1, 1000)``),
    an optimizer's, or a schedule of another shape would otherwise fail at the first step, or broadcast.

    The schedule is traced once (``jax.eval_shape``: nothing is computed); one that reads the count's value in
    Python (``0.1 if count < 10 else 0.01``) is called once on a count of 0 instead, as it runs without ``jit``.
    ``step_dtype``: the dtype of the count it is given (a float for Schedule-Free's ``learning_rate_factor``).
    """
    expected = f"{name} must be a schedule: a function of the step count returning a real scalar"
    if not callable(schedule):
        raise HyperparameterError(f"{expected}, got {schedule!r} of type {type(schedule).__name__}.")
    count = jnp.zeros([], step_dtype)
    try:
        try:
            out: Any = jax.eval_shape(schedule, count)
        except (
            jax.errors.ConcretizationTypeError,  # a branch on the count (TracerBoolConversionError too)
            jax.errors.TracerIntegerConversionError,  # an index by it
            jax.errors.TracerArrayConversionError,  # NumPy on it
        ):
            out = schedule(count)
    except Exception as error:
        named = getattr(schedule, "__qualname__", "")
        hint = (
            f" If {named} builds a schedule, pass the schedule it returns, built with its arguments "
            "(optax.cosine_decay_schedule(0.1, 1000), not optax.cosine_decay_schedule); an optimizer is no schedule."
            if named and "<lambda>" not in named
            else ""
        )
        raise HyperparameterError(
            f"{expected}; {schedule!r} fails on a step count: {type(error).__name__}: {error}.{hint}"
        ) from error
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return
    dtype = getattr(out, "dtype", None)
    real = dtype is not None and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    if not real or np.shape(out) != ():
        got = f"shape {np.shape(out)} and dtype {dtype}" if dtype is not None else f"{type(out).__name__} {out!r}"
        raise HyperparameterError(f"{expected}; {schedule!r} returns {got} for a step count.")


def check_dtype(name: str, dtype: Any, *, squares: bool = False) -> None:
    """A floating dtype of at least 16 bits, or None; not float16 for a state of squared gradients (``squares``)."""
    if dtype is None:
        return
    # A value is not its dtype (jnp.dtype reads an array's or a NumPy scalar's): np.float32(0.5) was taken for float32.
    if isinstance(dtype, (bool, int, float, complex, np.generic, np.ndarray, jax.Array)):
        raise HyperparameterError(f"{name} must be a floating dtype or None, got the value {dtype!r}.")
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise HyperparameterError(f"{name} must be a floating dtype or None, got {dtype!r}.") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise HyperparameterError(f"{name} must be a floating dtype or None, got {dtype!r}.")
    if d.itemsize < 2:
        raise HyperparameterError(
            f"{name} cannot be {d.name}: an 8-bit float has too few mantissa bits (and, for e4m3, too small a range) "
            "to hold a moment, which then turns the step into NaN or noise. Use bfloat16 for half the memory of "
            "float32, or None (the parameter's dtype, at least float32)."
        )
    if squares and d == jnp.float16:
        raise HyperparameterError(
            f"{name} cannot be float16: it holds squared gradients, and float16's smallest normal number (6.1e-5) is "
            "the square of 7.8e-3: smaller gradients' squares lose their digits or become 0, and the step that "
            "divides by their root blows up. Use bfloat16 (float32's range) for half the memory of float32, or None."
        )


def check_nesterov(momentum: Any, nesterov: bool) -> None:
    """Nesterov's look-ahead needs a momentum: None (no buffer) or a Python 0 with ``nesterov=True`` is refused."""
    if nesterov and (momentum is None or is_zero(momentum)):
        raise HyperparameterError(f"nesterov=True requires a momentum > 0, got momentum={momentum!r}.")


def is_transformation(value: Any) -> bool:
    """Whether ``value`` is a gradient transformation: an object (not a class) with ``init`` and ``update`` methods."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "init", None))
        and callable(getattr(value, "update", None))
    )


def with_extra_args(transformation: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.with_extra_args_support``, which also passes ``update``'s extra arguments (``value=``, ``hessian=``) to an
    ``optax.MultiSteps``: a class, not a ``GradientTransformationExtraArgs``, whose extra arguments optax drops."""
    if isinstance(transformation, optax.MultiSteps):
        return optax.GradientTransformationExtraArgs(transformation.init, transformation.update)
    return optax.with_extra_args_support(transformation)


def check_transformation(name: str, value: Any) -> None:
    """Raise ``HyperparameterError`` unless ``value`` is a gradient transformation (an object with ``init`` and
    ``update`` methods, as ``optax.GradientTransformation``); a factory passed in its place is named as one."""
    if is_transformation(value):
        return
    hint = (
        f" {getattr(value, '__qualname__', 'It')} is a function: pass what it returns, built with its "
        "hyperparameters (adaopt.adam(1e-3), not adaopt.adam)."
        if callable(value)
        else ""
    )
    raise HyperparameterError(
        f"{name} must be a gradient transformation (an optax.GradientTransformation, with init and update), "
        f"got {value!r} of type {type(value).__name__}.{hint}"
    )


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    # An array is no choice (and `in` would compare it element by element); nor is 1 the choice True (1 == True).
    is_bool = lambda x: isinstance(x, (bool, np.bool_))
    if isinstance(value, (np.ndarray, jax.Array, list, dict, set)) or not any(
        value == choice and is_bool(value) == is_bool(choice) for choice in choices
    ):
        raise HyperparameterError(f"{name} must be one of {choices}, got {value!r}.")


_FLAG_ANNOTATIONS = {"bool": False, "bool | None": True, "None | bool": True}  # whether None is allowed too


def check_flags(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``factory`` refusing a non-boolean at each of its arguments annotated ``bool`` (``bool | None``: or None).

    A flag is read for its truth, where a string ``"False"``, a 2 or an array would pass unnoticed (or fail deep
    inside the step): each is a :class:`HyperparameterError` naming the argument when the factory is called.
    """
    signature = inspect.signature(factory)
    written = {
        name: p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        for name, p in signature.parameters.items()
    }
    flags = {name: _FLAG_ANNOTATIONS[text] for name, text in written.items() if text in _FLAG_ANNOTATIONS}

    @functools.wraps(factory)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError:  # arguments the factory does not take: its own error, which names it
            return factory(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in flags:
                check_flag(name, value, optional=flags[name])
        return factory(*args, **kwargs)

    return checked


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is True or False (``optional``: or None), else a :class:`HyperparameterError` naming ``name``."""
    if not (isinstance(value, (bool, np.bool_)) or (value is None and optional)):
        raise HyperparameterError(
            f"{name} must be {'True, False or None' if optional else 'True or False'}, got {value!r}."
        )


PER_LEAF_OPTIONS = "per-leaf options (weight_decay_mask, layer_scale)"


def per_leaf_option(name: str) -> str:
    """What :func:`check_tree_match` calls the tree an argument ``name`` gave, one entry per parameter leaf."""
    return f"per-leaf option {name}"


def _fix_for(what: str, subject: str) -> str:
    if what == PER_LEAF_OPTIONS:
        return "Give each of them one entry per parameter leaf, in a tree of the parameters' structure."
    if what.startswith("per-leaf option "):
        return "Give it one entry per parameter leaf, in a tree of the parameters' structure (or a function of them)."
    if what == "parameters":
        return f"Pass the {subject} of the parameters given as `params`, with the same tree structure and shapes."
    if subject == "parameters":
        return (
            f"The optimizer's {what} was built by `init` for other parameters: pass the parameters it was built for, "
            "as `init` received them (after changing the model, build a new optimizer state)."
        )
    return (
        f"The optimizer's {what} was built by `init` for other parameters: call `init` on the parameters whose "
        f"{subject} you pass (after changing the model, build a new optimizer state)."
    )


class StoredLeaf:
    """A state leaf held by a storage (quantized blocks, stochastically rounded bfloat16; see ``storage.py``).

    Several arrays to JAX, one leaf mirroring one parameter to the tree checks of this package.
    """

    __slots__ = ()


def is_stored(x: Any) -> bool:
    """True for a :class:`StoredLeaf`: use as ``is_leaf`` to walk a state tree parameter by parameter."""
    return isinstance(x, StoredLeaf)


def is_masked_node(x: Any) -> bool:
    """True for ``optax.MaskedNode``, another group's leaf (``optax.masked``, ``optax.partition``): use as ``is_leaf``
    to keep it one leaf where it stands for a parameter."""
    return isinstance(x, optax.MaskedNode)


def check_tree_match(tree: Any, reference: Any, what: str, *, subject: str = "gradients", shapes: bool = True) -> None:
    """Raise a readable ``TreeMismatchError`` when ``tree`` (the ``subject``) does not mirror ``reference`` (the ``what``).

    The tree structures must be equal and, with ``shapes``, each leaf's shape too (a leaf of the
    wrong shape would otherwise fail inside the arithmetic, or broadcast silently). A stored
    moment in ``reference`` counts as one leaf. Runs at trace time only.
    """
    got: Any = jax.tree.structure(tree)
    want = jax.tree.structure(reference, is_leaf=is_stored)
    if got != want:
        raise TreeMismatchError(
            f"The {subject} do not have the structure of the optimizer's {what}: expected a tree of structure\n"
            f"  {want}\nbut got\n  {got}\n{_fix_for(what, subject)}"
        )
    if not shapes:
        return
    for (path, leaf), expected in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference, is_leaf=is_stored), strict=True
    ):
        if np.shape(leaf) != np.shape(expected):
            raise TreeMismatchError(
                f"The {subject} at {jax.tree_util.keystr(path) or 'the root'} have shape {np.shape(leaf)}, but the "
                f"optimizer's {what} there has shape {np.shape(expected)}. {_fix_for(what, subject)}"
            )


def leaves_up_to(updates: Any, tree: Any, what: str = "state") -> list[Any]:
    """``tree``'s subtrees at the leaves of ``updates``, in order: a state whose own placeholders for "nothing kept
    for this leaf" are ``optax.MaskedNode`` objects, told apart from the empty ``MaskedNode`` nodes that
    ``optax.masked`` and ``optax.partition`` put in place of other groups' leaves (both in the gradients and in
    the state). A tree of another structure is a :class:`TreeMismatchError`."""
    structure: Any = jax.tree.structure(updates)
    try:
        parts = structure.flatten_up_to(tree)
    except (ValueError, TypeError):
        parts = None
    # flatten_up_to takes the gradients as a prefix: a subtree of the state where they have a leaf is a mismatch too.
    if parts is None or not all(
        is_masked_node(x) or jax.tree_util.treedef_is_leaf(jax.tree.structure(x)) for x in parts
    ):
        raise TreeMismatchError(
            f"The gradients do not have the structure of the optimizer's {what}: expected a tree of structure\n"
            f"  {jax.tree.structure(tree, is_leaf=is_masked_node)}\nbut got\n"
            f"  {jax.tree.structure(updates, is_leaf=is_masked_node)}\nCall init on the parameters whose gradients "
            "you pass."
        )
    return parts


def require_params(params: Params | None, who: str) -> Params:
    """``params``, or the one error for an ``update`` that needs the parameters and was not given them."""
    if params is None:
        raise ValueError(f"{who} needs the parameters: call update(grads, state, params).")
    return params


def fast(tree: Any) -> Any:
    """The weights a gradient is taken at: ``tree.fast`` for ``optax.LookaheadParams`` (:func:`adaopt.lookahead`'s
    parameters, and its updates), else ``tree``."""
    return tree.fast if isinstance(tree, optax.LookaheadParams) else tree


def _buffers(x: jax.Array) -> set[tuple[int, int]]:
    """Where ``x``'s data lives: its shards' devices and buffer addresses (its identity where they cannot be read)."""
    try:
        return {(shard.device.id, shard.data.unsafe_buffer_pointer()) for shard in x.addressable_shards}
    except Exception:  # a backend without the addresses
        return {(-1, id(x))}


def distinct_buffers(state: Any, params: Any = None) -> Any:
    """``state`` with each array leaf that shares its buffer with an earlier leaf, or with a leaf of ``params``, copied.

    An ``init`` run outside ``jit`` may put one array in two places (an injected hyperparameter that is also the
    initial value of an estimate, one zero for two sums): donating such a state (``jax.jit(...,
    donate_argnums=...)``) then fails, "Attempt to donate the same buffer twice". A jitted ``init`` returns distinct
    buffers anyway; traced leaves are left as they are.
    """
    live = lambda x: isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_deleted()
    seen: set[tuple[int, int]] = set()
    for x in jax.tree.leaves(params):
        if live(x):
            seen |= _buffers(x)

    def distinct(x: Any) -> Any:
        if not live(x):  # traced, deleted (donated: nothing to copy), or not an array
            return x
        where = _buffers(x)
        if where & seen:
            x = jnp.array(x, copy=True)
            where = _buffers(x)
        seen.update(where)
        return x

    return jax.tree.map(distinct, state)


def split_extra_args(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``update``'s extra arguments as (arrays, the others): what may be traced (a loss ``value=``), and what must stay
    as it is (``monitor``'s ``record=True``, static under ``jit``), for a wrapper that traces the update again."""
    numbers = (jax.Array, np.ndarray, np.generic, int, float, complex)  # a Python loss too: traced, not a cache key
    arrays = {k: v for k, v in extra.items() if isinstance(v, numbers) and not isinstance(v, bool)}
    return arrays, {k: v for k, v in extra.items() if k not in arrays}


def check_floating(params: Any, what: str = "parameter") -> None:
    """A clear error for an integer or boolean parameter, which would take no step (or a truncated one), or (``what``
    "gradient") an integer or boolean gradient, whose updates some optimizers computed in its integer dtype."""
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.dtype(p.dtype) if hasattr(p, "dtype") else jnp.result_type(p)
        if not jnp.issubdtype(dtype, jnp.inexact):
            why = (
                "an integer one cannot take a fractional step. Cast it, or keep it out of the optimized tree."
                if what == "parameter"
                else "an integer one would make integer, truncated updates. Cast it to its parameter's dtype."
            )
            raise TypeError(
                f"The {what} at {jax.tree_util.keystr(path) or 'the root'} has dtype {dtype.name}: optimizers take "
                f"floating-point (or complex) {what}s, and {why}"
            )


def check_gradient_tree() -> optax.GradientTransformation:
    """A stateless first block: the parameters must be floating point (checked by ``init``), the gradients floating
    point and of their tree structure.

    Runs at trace time only, so it costs nothing in the compiled step; it gives stateless
    optimizers (plain SGD) the same clear errors as the others.
    """

    def init_fn(params: Params) -> optax.EmptyState:
        check_floating(params)
        return optax.EmptyState()

    def update_fn(updates: Updates, state: optax.EmptyState, params: Params | None = None) -> tuple[Updates, Any]:
        check_floating(updates, "gradient")
        if params is not None:
            check_tree_match(updates, params, "parameters")
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def is_zero(value: Any) -> bool:
    """True only for a Python number equal to zero.

    Arrays, even concrete ones, count as non-zero: ``inject_hyperparams`` passes arrays to
    ``init`` and tracers to ``update``, and both must build the same chain and state.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def known_nonzero(value: Any) -> bool:
    """True where ``value`` is known not to be zero: a nonzero Python number, or a concrete array with a nonzero entry.

    For the checks that refuse a nonzero option: ``inject_hyperparams`` passes a Python 0 to ``init`` as a concrete
    array (refused by ``not is_zero``), and a tracer, whose value is not known, passes.
    """
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (int, float, np.number, np.bool_, np.ndarray, jax.Array)):
        return bool(np.any(np.asarray(value) != 0))
    return value is not None and value is not False


def _in_dtype_of(value: Any, update: jax.Array) -> Any:
    """A hyperparameter for multiplying ``update``: a Python number stays weakly typed, an array
    (from ``inject_hyperparams``, ``vmap``, ``grad`` or a schedule) takes the update's dtype."""
    return value if isinstance(value, (int, float)) else jnp.asarray(value, update.dtype)


class HoldsHyperparams(Protocol):
    """A state that holds step-size quantities: a scheduled or learned learning rate, a distance estimate.

    The one declaration of what a state exposes, written next to the state's definition (a
    method of its NamedTuple), which ``adaopt.current_hyperparams`` and ``adaopt.monitor`` read
    in any nested state: the tools keep no list of optimizers.
    """

    def current_hyperparams(self) -> dict[str, jax.Array]:
        """The quantities by name (``"learning_rate"``, ``"d"`` ...), each an array of the state (0-d, or batched under vmap)."""
        ...


def held_hyperparams(node: Any) -> dict[str, jax.Array] | None:
    """What ``node`` declares through :class:`HoldsHyperparams`, or None for a node that declares nothing."""
    if getattr(type(node), "current_hyperparams", None) is None:
        return None
    return dict(node.current_hyperparams())


class LearningRateState(NamedTuple):
    """State of the learning-rate step of adaopt's optimizers under a schedule: optax's step count and the rate applied.

    Attributes:
      count: the number of updates so far, a saturating int32 (the schedule's step).
      learning_rate: the schedule's value at the last update (at 0 before the first), in the
        dtype the schedule returns, at least float32; telemetry only, the step never reads it.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    learning_rate: jax.Array

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"learning_rate": self.learning_rate}


def _schedule_value(schedule: Schedule, count: jax.Array) -> jax.Array:
    """``schedule(count)`` as a strongly typed array of at least float32 (a weak type would change the state's type)."""
    value = jnp.asarray(schedule(count))
    return value.astype(jnp.float64 if value.dtype == jnp.float64 else jnp.float32)


def scale_by_schedule(learning_rate: Schedule, *, flip_sign: bool = True) -> optax.GradientTransformation:
    """``optax.scale_by_learning_rate`` of a schedule, the same updates, keeping the rate it applied.

    Each update is multiplied by the schedule's value cast to its dtype, exactly as optax does;
    the state (:class:`LearningRateState`) adds that value to optax's count, so a monitor or
    ``adaopt.current_hyperparams`` can report the learning rate of every step.
    """
    sign = -1 if flip_sign else 1

    def init_fn(params: Params) -> LearningRateState:
        del params
        count = jnp.zeros([], jnp.int32)
        return LearningRateState(count, _schedule_value(learning_rate, count))

    def update_fn(updates: Updates, state: LearningRateState, params: Params | None = None) -> tuple[Updates, Any]:
        del params
        value = learning_rate(state.count)
        step_size = sign * value
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        applied = jnp.asarray(value).astype(state.learning_rate.dtype)
        return updates, LearningRateState(optax.safe_increment(state.count), applied)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> optax.GradientTransformation:
    """``optax.scale_by_learning_rate``, with every update kept in its own dtype.

    optax casts a schedule's value to each update's dtype but multiplies by a fixed learning rate
    as it is: one given as an array (``inject_hyperparams`` passes one; ``vmap`` and ``grad`` over
    the learning rate trace one) would turn bfloat16 and float16 updates into float32 ones, or
    fail under strict dtype promotion. Here it is cast like a schedule's value. A schedule's
    state also keeps the rate it applied (:func:`scale_by_schedule`).
    """
    if callable(learning_rate):
        return scale_by_schedule(learning_rate, flip_sign=flip_sign)
    if isinstance(learning_rate, (int, float)):
        return optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)

    def update_fn(updates: Updates, state: Any, params: Params | None = None) -> tuple[Updates, Any]:
        del params
        step_size = -learning_rate if flip_sign else learning_rate
        return jax.tree.map(lambda g: _in_dtype_of(step_size, g) * g, updates), state

    return optax.GradientTransformation(optax.scale(1.0).init, update_fn)


def is_function_of(value: Any, tree: Any) -> TypeGuard[Callable[..., Any]]:
    """Whether ``value``, a function of ``tree`` or a tree mirroring it (a mask, Sophia's Hessian estimates), is the
    function: callable, and not a tree of ``tree``'s structure with no callable leaf. An Equinox module is callable
    (its ``__call__``): a mask or estimates built by ``jax.tree.map`` over Equinox parameters are such a module, and
    calling one as a function of the parameters ran the model on them."""
    if not callable(value):
        return False
    leaves, treedef = jax.tree.flatten(value)
    mirrored: Any = jax.tree.structure(tree)  # Any: the stubs give PyTreeDef no __eq__
    return not (bool(mirrored == treedef) and not any(callable(leaf) for leaf in leaves))


def check_mask(mask: Any, name: str = "weight_decay_mask") -> None:
    """Refuse a mask that is one value rather than a tree or a function: a number or a string (``0`` decays as
    ``False`` would), and one boolean, what ``optax.inject_hyperparams`` makes of a mask function.

    optax calls every callable argument as a schedule of the step count, so a function of the
    parameters, given the count, returns one boolean: a mask that silently decays all leaves or none.
    """
    leaves = jax.tree.leaves(mask)
    if mask is None or callable(mask) or not (len(leaves) == 1 and leaves[0] is mask):  # a tree (an empty one too)
        return
    expected = (
        f"{name} must be None, a tree of booleans with the parameters' structure, or a function of the parameters "
        "returning one"
    )
    if not (
        isinstance(mask, (bool, np.bool_))
        or (isinstance(mask, (np.ndarray, jax.Array)) and mask.ndim == 0 and mask.dtype == np.bool_)
    ):
        raise HyperparameterError(f"{expected}; got {mask!r} of type {type(mask).__name__}.")
    raise HyperparameterError(
        f"{expected}; got the single value {mask!r}. optax.inject_hyperparams makes this of a "
        "mask function, which it calls as a schedule of the step count: use adaopt.inject_hyperparams(factory), "
        f"which keeps masks static, or optax.inject_hyperparams(factory, static_args=('{name}',)). "
        "(To decay no leaf, pass weight_decay=0.)"
    )


def resolve_mask(mask: MaskOrFn | None, params: Any, name: str = "weight_decay_mask") -> Any:
    """The tree of booleans ``mask`` gives for ``params`` (a tree, or a function of the parameters returning one),
    checked: booleans (:func:`check_mask_leaves`) in the parameters' structure, leaf for leaf; None for None."""
    chosen = mask(params) if is_function_of(mask, params) else mask
    if chosen is not None:
        check_mask_leaves(chosen, name)
        check_tree_match(params, chosen, per_leaf_option(name), subject="parameters", shapes=False)
    return chosen


def check_mask_leaves(mask: Any, name: str = "weight_decay_mask") -> None:
    """Raise ``HyperparameterError`` naming ``name`` and the leaf's path unless every leaf of ``mask`` (a tree, what
    a mask function returned) is a boolean: a Python or NumPy bool, a 0-d boolean array, or 0 / 1 (optax reads the
    truth). An array of floats would otherwise fail with its "ambiguous truth value" deep inside ``init``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask, is_leaf=is_masked_node):
        if is_masked_node(leaf):  # another group's leaf (optax.partition)
            continue
        scalar = isinstance(leaf, (np.ndarray, jax.Array)) and leaf.ndim == 0 and leaf.dtype == np.bool_
        as_int = isinstance(leaf, (int, np.integer)) and leaf in (0, 1)
        if not (isinstance(leaf, (bool, np.bool_)) or scalar or as_int):
            shown = f"an array of shape {leaf.shape} and dtype {leaf.dtype}" if hasattr(leaf, "dtype") else repr(leaf)
            raise HyperparameterError(
                f"{name}{jax.tree_util.keystr(path)} must be a boolean (one per parameter leaf), got {shown}. "
                "A mask function returns a tree of booleans, e.g. lambda params: jax.tree.map(lambda p: p.ndim > 1, "
                "params)."
            )


def masked(
    inner: optax.GradientTransformation, mask: MaskOrFn, name: str = "weight_decay_mask"
) -> optax.GradientTransformation:
    """``optax.masked(inner, mask)``, the mask checked against the tree it is applied to: the tree's structure (or a
    prefix of it) and a boolean at each leaf, else an error naming ``name`` (optax's own is about tree_map's
    prefixes, or an array's ambiguous truth value)."""

    held = is_masked_node  # another group's leaf (optax.partition): one leaf here
    leafy = lambda tree: jax.tree.map(lambda x: 0 if held(x) else x, tree, is_leaf=held)

    def resolved(tree: Any) -> Any:
        chosen = mask(tree) if is_function_of(mask, tree) else mask
        check_mask_leaves(chosen, name)
        try:  # a prefix of the tree is a mask too (one value for a subtree), as optax.masked takes it
            jax.tree.map(lambda m, subtree: m, chosen, leafy(tree), is_leaf=held)
        except ValueError:
            check_tree_match(leafy(tree), leafy(chosen), per_leaf_option(name), subject="parameters", shapes=False)
            raise
        return chosen

    return optax.masked(inner, resolved)


def add_decayed_weights(weight_decay: Any, mask: MaskOrFn | None = None) -> optax.GradientTransformation:
    """``optax.add_decayed_weights``, with every update kept in its own dtype.

    optax adds ``weight_decay * params`` as it is: a weight decay given as an array
    (``inject_hyperparams`` passes one for every numeric hyperparameter) would turn bfloat16 and
    float16 updates into float32 ones. Here it is cast to each update's dtype. Same state.

    A Python zero (see :func:`is_zero`) adds no operation to the step but keeps the block and its
    state: the state's structure then does not depend on the decay's value, so a checkpoint
    restores into the optimizer built with another decay, or under ``inject_hyperparams``.
    """
    check_mask(mask)
    if not is_zero(weight_decay) and (callable(weight_decay) or isinstance(weight_decay, (int, float))):
        plain = optax.add_decayed_weights(weight_decay)

        def plain_update(updates: Updates, state: Any, params: Params | None = None) -> tuple[Updates, Any]:
            return plain.update(updates, state, require_params(params, "weight decay (weight_decay > 0)"))

        tx = optax.GradientTransformation(plain.init, plain_update)
        return tx if mask is None else masked(tx, mask)

    def update_fn(updates: Updates, state: Any, params: Params | None = None) -> tuple[Updates, Any]:
        if is_zero(weight_decay):
            return updates, state
        require_params(params, "weight decay (weight_decay > 0)")
        new = jax.tree.map(
            lambda g, p: None if g is None else g + _in_dtype_of(weight_decay, g) * p,
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        return new, state

    tx = optax.GradientTransformation(optax.add_decayed_weights(0.0).init, update_fn)
    return tx if mask is None else masked(tx, mask)


CoreWrapper = Callable[[optax.GradientTransformation, bool], optax.GradientTransformation]
"""``wrapper(core, is_step) -> core``: what :func:`wrapping_cores` does to each core :func:`assemble` chains.
``is_step`` is True for a core that applies the learning rate and the sign itself (its updates
descend, as the parameters' steps), False for one whose updates point along the gradient."""

_CORE_WRAPPERS: contextvars.ContextVar[tuple[CoreWrapper, ...]] = contextvars.ContextVar("core_wrappers", default=())


@contextlib.contextmanager
def wrapping_cores(wrapper: CoreWrapper) -> Iterator[None]:
    """While active, every core that :func:`assemble` chains is ``wrapper(core, is_step)`` instead.

    A wrapper of the direction alone (``adaopt.cautious``) runs a factory inside this: the weight
    decay and the learning rate that ``assemble`` chains around the core stay outside it.
    """
    token = _CORE_WRAPPERS.set((*_CORE_WRAPPERS.get(), wrapper))
    try:
        yield
    finally:
        _CORE_WRAPPERS.reset(token)


def wrapped_core(core: optax.GradientTransformation, is_step: bool) -> optax.GradientTransformation:
    """``core`` wrapped by the active :func:`wrapping_cores` wrappers, innermost first (``is_step``: see
    :data:`CoreWrapper`); for a factory whose direction is not the core it assembles (hypergradient descent's
    direction, inside the learner of its learning rate)."""
    for wrapper in reversed(_CORE_WRAPPERS.get()):
        core = wrapper(core, is_step)
    return core


def assemble(
    core: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule | None,
    weight_decay: Any = 0.0,
    weight_decay_mask: MaskOrFn | None = None,
    *,
    decoupled_weight_decay: bool = False,
    after_decay: tuple[optax.GradientTransformation, ...] = (),
    complex_convention: str | None = None,
    wrap_core: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Chain an optimizer's core with weight decay and the (negated) learning rate.

    Coupled decay (L2, torch's ``weight_decay``) adds ``weight_decay * params`` to the gradient
    before ``core``; decoupled decay (AdamW's) adds it to ``core``'s output, so the learning
    rate scales both. ``after_decay`` blocks run between the decay and the learning rate. A
    ``learning_rate`` of None adds no learning-rate block: the core applies the rate (and the
    sign) itself, as the loss-driven methods that learn it do. ``complex_convention`` is
    ``"modulus"`` for a core with complex math of its own; ``"real_imag"``, or None for a core
    without, views complex parameters as real pairs (:func:`complex_params.as_real_imag`).
    Inside :func:`wrapping_cores`, ``core`` is wrapped first (:func:`wrapped_core`), unless
    ``wrap_core`` is False: a core that wrapped its own direction already, or that no wrapper may
    change (its state keeps the step it returned).
    """
    if wrap_core:
        core = wrapped_core(core, learning_rate is None)
    decay = add_decayed_weights(weight_decay, weight_decay_mask)
    blocks = [check_gradient_tree(), *(() if decoupled_weight_decay else (decay,)), core]
    blocks += [*((decay,) if decoupled_weight_decay else ()), *after_decay]
    if learning_rate is not None:
        blocks.append(scale_by_learning_rate(learning_rate))
    chain = optax.chain(*blocks)

    def not_this_optimizers(state: Any, updates: Updates) -> str | None:
        """What makes ``state`` another's than this optimizer's (``opt.init``'s), or None."""
        if hasattr(state, "_fields") or not isinstance(state, (tuple, list)) or len(state) != len(blocks):
            # A chain's state is a plain tuple: a NamedTuple is a wrapper's (inject_hyperparams') or a block's.
            entries = f" of {len(state)} entries" if type(state) in (tuple, list) else ""
            return f"{'None' if state is None else f'a {type(state).__name__}{entries}'} as its state"
        try:
            kinds = [type(s) for s in jax.eval_shape(chain.init, updates)]
        except Exception:  # the gradients themselves are wrong: the error they raised says so
            return None
        wrong = [(s, k) for s, k in zip(state, kinds, strict=True) if type(s) is not k]
        return (
            f"a state holding {type(wrong[0][0]).__name__} where this optimizer keeps {wrong[0][1].__name__}"
            if wrong
            else None
        )

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra_args: Any) -> Any:
        try:
            return chain.update(updates, state, params, **extra_args)
        except (AttributeError, TypeError, ValueError) as error:
            # optax's chain takes len() of None (a state never made), or reads a field another optimizer's state lacks.
            got = not_this_optimizers(state, updates)
            if got is None:
                raise
            raise TypeError(
                f"update got {got}: not this optimizer's state (a tuple of {len(blocks)} block states). Pass "
                "the state its init made (state = opt.init(params)), then each update's new one, as update(grads, "
                "state, params)."
            ) from error

    chained = optax.GradientTransformationExtraArgs(chain.init, update_fn)
    return complex_params.with_convention(chained, complex_convention)


def check_complex_convention(complex_convention: Any) -> None:
    check_choice("complex_convention", complex_convention, complex_params.CONVENTIONS)


def check_common(learning_rate: Any, weight_decay: Any) -> None:
    check_learning_rate(learning_rate)
    check_nonnegative("weight_decay", weight_decay)


Factory = Callable[..., optax.GradientTransformationExtraArgs]


def loss_value(value: Any, dtype: Any, who: str) -> jax.Array:
    """The loss passed as ``update(..., value=loss)``, as a 0-d array in ``dtype``; a clear error if missing or not scalar."""
    if value is None:
        raise ValueError(
            f"{who} needs the loss at the current parameters: call update(grads, state, params, value=loss)."
        )
    value = jnp.asarray(value)
    if value.ndim != 0:
        raise ValueError(f"{who} needs a scalar loss as value=, got an array of shape {value.shape}.")
    return value.astype(dtype)
