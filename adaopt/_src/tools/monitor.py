r"""Monitoring: the step sizes an optimizer actually takes, recorded inside its state without leaving ``jit``.

:func:`monitor` wraps any optimizer (adaopt's or optax's) and, every ``every`` steps, writes into
its state what a practitioner looks at: per leaf (or per group of leaves) the effective learning
rate, the spread of the per-coordinate rates and the update/parameter ratio; the gradient norm it
received and any norm a :func:`record_norm` probe saw inside the chain (after clipping); the RMS
and largest magnitude of every state field that mirrors the parameters (the moments); the
learning rate a schedule or a loss-driven method chose and the estimates of the tuning-free
methods (:func:`current_hyperparams`); and ``optax.apply_if_finite``'s counts of skipped
non-finite steps. On the other steps a ``jax.lax.cond`` skips every reduction. :func:`read_records`
brings the records to the host as a ``dict[str, float]`` for the writers of
:mod:`adaopt._src.tools.writers`.

What a state exposes to :func:`current_hyperparams` is declared once, next to the state's
definition: a ``current_hyperparams`` method of its NamedTuple (the protocol
:class:`adaopt._src.base.HoldsHyperparams`). The table below covers optax's own states, which
cannot declare anything; no optimizer of adaopt is named here.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from adaopt._src import base, complex_params, moments, numerics, placement
from adaopt._src.base import Params, Updates
from adaopt._src.wrappers import param_groups

# ---------------------------------------------------------------------------------------------
# Walking a nested state.


def path_name(path: Sequence[Any]) -> str:
    """A tree path as the name of a record: ``"layers/0/kernel"`` (param_groups' path, which its patterns
    read too); ``"params"`` for the root itself."""
    return param_groups.path_string(path) or "params"


def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every node of ``tree`` (inner nodes and leaves), each with its path, parents first."""
    yield path, tree
    children, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    if len(children) == 1 and children[0][1] is tree:  # a leaf: flattening gives itself back
        return
    for child_path, child in children:
        yield from _nodes(child, path + tuple(child_path))


def _qualified(found: list[tuple[tuple[Any, ...], str, Any]]) -> dict[str, Any]:
    """``{name: value}``: a name found once stays bare; one found in several places is prefixed by each place's path."""
    counts: dict[str, int] = {}
    for _, name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    out = {}
    for path, name, value in found:
        out[name if counts[name] == 1 else f"{path_name(path)}/{name}"] = value
    return out


# What optax's states hold, read here because they cannot declare it themselves (adaopt's
# states do, through base.HoldsHyperparams). Looked up by type: a missing contrib state is skipped.
def _injected(state: Any) -> dict[str, Any]:
    return {
        name: value
        for name, value in sorted(state.hyperparams.items())  # sorted, as jax rebuilds a dict
        if isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(jnp.result_type(value), jnp.number)
    }


_OPTAX_HYPERPARAMS: dict[str, Callable[[Any], dict[str, jax.Array]]] = {
    "InjectHyperparamsState": _injected,
    "InjectStatefulHyperparamsState": _injected,
    "ReduceLROnPlateauState": lambda s: {"plateau_scale": s.scale},
    "ProdigyState": lambda s: {"d": s.estim_lr},
    "DAdaptAdamWState": lambda s: {"d": s.estim_lr},
    "MechanicState": lambda s: {"scale": jnp.sum(s.s, axis=-1)},
    "DoGState": lambda s: {"distance": s.max_dist},
    "DoWGState": lambda s: {"distance": moments.safe_sqrt(s.estim_sq_dist)},
}
_OPTAX_TYPES = {
    state_type: _OPTAX_HYPERPARAMS[name]
    for module in (optax, optax.contrib)
    for name in _OPTAX_HYPERPARAMS
    if isinstance(state_type := getattr(module, name, None), type)
}


def _hyperparams_of(node: Any) -> dict[str, jax.Array] | None:
    declared = base.held_hyperparams(node)
    if declared is not None:
        return declared
    reader = _OPTAX_TYPES.get(type(node))
    return None if reader is None else reader(node)


def _skip_counts_of(node: Any) -> dict[str, jax.Array] | None:
    if isinstance(node, optax.ApplyIfFiniteState):
        return {"total": node.total_notfinite, "consecutive": node.notfinite_count}
    return None


def _found(state: Any, reader: Callable[[Any], dict[str, jax.Array] | None]) -> dict[str, jax.Array]:
    return _qualified(
        [(path, name, value) for path, node in _nodes(state) for name, value in (reader(node) or {}).items()]
    )


def current_hyperparams(state: Any) -> dict[str, jax.Array]:
    r"""The step-size quantities an optimizer's state holds now, by name, from wherever they sit in it.

    One accessor for every optimizer, however nested its state (``optax.chain``,
    ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, :func:`monitor`, the wrappers;
    an ``nnx.Optimizer``'s ``opt_state`` too):

    - ``"learning_rate"``: the rate a schedule applied at the last step (every adaopt optimizer
      given a schedule), the rate a loss-driven method chose (bold driver, hypergradient descent,
      reduce-on-plateau, with its ``"plateau_scale"``), and each hyperparameter
      ``inject_hyperparams`` holds, under its own name (``"learning_rate"``, ``"b1"``,
      ``"weight_decay"`` ...);
    - the estimates of the tuning-free methods: ``"d"`` (Prodigy, D-Adaptation), ``"distance"``
      and ``"step_size"`` (DoG, DoWG), ``"scale"`` (Mechanic), ``"lr_max"`` (Schedule-Free), and
      Polyak's ``"step_size"``.

    A constant learning rate given as a Python number is not in the state (it is the number you
    gave); COCOB's step sizes are per coordinate, not a number. A name found in several places
    is prefixed by each place's path in the state (``"0/learning_rate"``, ``"inner_state/learning_rate"``).
    Each state type declares what it exposes next to its definition (a ``current_hyperparams``
    method; see :class:`adaopt._src.base.HoldsHyperparams`); optax's states are read by a table
    in this module.

    Args:
      state: any optimizer state, plain or an ``nnx.Optimizer``'s ``opt_state``; inside ``jit``
        or outside.

    Returns:
      ``{name: array}``, 0-d arrays (with a leading batch axis for a state built under ``vmap``).

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.adam(optax.linear_schedule(1e-2, 0.0, 10))
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> _, state = opt.update(jnp.ones(3), state, params)
      >>> _, state = opt.update(jnp.ones(3), state, params)
      >>> print(f"{float(adaopt.current_hyperparams(state)['learning_rate']):.4f}")  # the rate of step 1
      0.0090
    """
    values, _ = numerics.unwrap_variables(state)
    return _found(values, _hyperparams_of)


# ---------------------------------------------------------------------------------------------
# Probes of a norm inside a chain.

_RECORDING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("adaopt_monitor_recording", default=None)


class NormProbeState(NamedTuple):
    """State of :func:`record_norm`: its name (a static key) and the norm it last recorded.

    Attributes:
      norms: ``{name: norm}``, one 0-d array in the parameters' widest float dtype (at least float32).
    """

    norms: dict[str, jax.Array]


def record_norm(name: str) -> optax.GradientTransformation:
    r"""An identity transformation that records the norm of the updates passing through it.

    Place it in a chain where a norm is wanted, e.g. after clipping: :func:`monitor` collects it
    under ``name`` when it records (its other steps skip the norm).
    Outside a monitor it records at every step. The updates pass unchanged.

    Args:
      name: the record's name, a non-empty string (e.g. ``"clipped_grad_norm"``).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`NormProbeState`.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.monitor(
      ...     optax.chain(optax.clip_by_global_norm(1.0), adaopt.record_norm("clipped_grad_norm"), adaopt.sgd(0.1))
      ... )
      >>> params = jnp.zeros(2)
      >>> _, state = opt.update(jnp.array([3.0, 4.0]), opt.init(params), params)
      >>> records = adaopt.read_records(state)
      >>> records["grad_norm"], records["clipped_grad_norm"]
      (5.0, 1.0)
    """
    if not isinstance(name, str) or not name:
        raise base.HyperparameterError(f"name must be a non-empty string, got {name!r}.")

    def init_fn(params: Params) -> NormProbeState:
        return NormProbeState({name: jnp.zeros([], moments.scalar_dtype(params))})

    def update_fn(updates: Updates, state: NormProbeState, params: Params | None = None) -> tuple[Updates, Any]:
        del params
        previous = state.norms[name]
        # Outside a monitor, None: record at every step. Inside, the monitor says whether this step records.
        value = previous if _RECORDING.get() is False else numerics.norm(updates, previous.dtype)
        return updates, NormProbeState({name: value.astype(previous.dtype)})

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# The records.


@jax.tree_util.register_pytree_with_keys_class
class Records:
    """A monitor's records: their names (static, part of the tree's structure) and their values in one vector.

    One array rather than one per record: a step of a large model would otherwise return
    hundreds of small buffers. ``records["grad_norm"]`` reads one; :func:`read_records` reads
    them all to the host.

    Attributes:
      names: the records' names, in the order of ``values``.
      values: their values, a vector (with leading batch axes under ``vmap``).
    """

    __slots__ = ("names", "values")

    def __init__(self, names: tuple[str, ...], values: Any) -> None:
        self.names = names
        self.values = values

    def tree_flatten_with_keys(self) -> tuple[tuple[tuple[Any, Any], ...], tuple[str, ...]]:
        return ((jax.tree_util.GetAttrKey("values"), self.values),), self.names

    @classmethod
    def tree_unflatten(cls, names: tuple[str, ...], children: Sequence[Any]) -> Records:
        return cls(names, *children)

    def __getitem__(self, name: str) -> jax.Array:
        return self.values[..., self.names.index(name)]

    def __repr__(self) -> str:
        return f"Records({len(self.names)} names, values={self.values!r})"


class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      recorded_at: the update (counted from 0) the records were taken at; -1 before the first.
      inner_state: the state of the monitored optimizer.
      records: the :class:`Records`.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    recorded_at: jax.Array
    inner_state: optax.OptState
    records: Records


GroupsSpec = str | Callable[[Any], Any] | Mapping[str, str | Sequence[str]] | None
_STATS = ("grad_norm", "effective_lr", "rate_rms", "update_ratio")


def _labels(groups: GroupsSpec, tree: Any) -> list[str]:
    """The group of each leaf of ``tree`` (in the order of its leaves)."""
    paths = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if groups == "leaves":
        return paths
    if callable(groups):
        treedef: Any = jax.tree.structure(tree)
        labels = treedef.flatten_up_to(groups(tree))
        if not all(isinstance(label, str) for label in labels):
            raise TypeError(
                f"groups(params) must return a tree of strings with the parameters' structure, got {labels}."
            )
        return labels
    assert isinstance(groups, Mapping)
    patterns = {label: [p] if isinstance(p, str) else list(p) for label, p in groups.items()}
    out = []
    for path in paths:
        match = [label for label, ps in patterns.items() if any(fnmatch.fnmatchcase(path, p) for p in ps)]
        out.append(match[0] if match else "other")
    return out


def _check_groups(groups: Any) -> None:
    """``monitor``'s ``groups``, or a :class:`HyperparameterError` naming it (and the group whose patterns are wrong)."""
    # An array of names is none of these (and == "leaves" would compare it element by element).
    if not (groups is None or (isinstance(groups, str) and groups == "leaves") or callable(groups)):
        if not isinstance(groups, Mapping):
            raise base.HyperparameterError(
                f"groups must be 'leaves', a mapping of group names to path patterns, a function of the parameters "
                f"returning a tree of group names, or None; got {groups!r}."
            )
        for label, patterns in groups.items():
            several = isinstance(patterns, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in patterns)
            if not isinstance(label, str) or not (isinstance(patterns, str) or several):
                raise base.HyperparameterError(
                    f"groups must map each group's name (a str) to a path pattern (a str, such as 'layers/*') or a "
                    f"list of them; got {label!r}: {patterns!r}."
                )


def _field_leaf(x: Any) -> bool:
    return base.is_stored(x) or base.is_masked_node(x)


def _mirrored(value: Any, reference: Any, grouped: bool) -> list[tuple[Any, Any]]:
    """The pairs (state leaf, parameter leaf) of a state field that holds one entry per parameter leaf, of the
    parameter's shape (a moment; a complex parameter's may be its real view, ``complex_convention="real_imag"``),
    else none. In a group's state (``grouped``: under an ``optax.MaskedState``, as ``param_groups``' and
    ``optax.masked``'s), ``optax.MaskedNode`` stands for the other groups' leaves: those are left out. Elsewhere it
    stands for a statistic kept in another field (GaLore's bases, Adafactor's factored moments): no mirror."""
    is_leaf = _field_leaf if grouped else base.is_stored
    structure: Any = jax.tree.structure(value, is_leaf=is_leaf)
    if structure != jax.tree.structure(reference):
        return []
    pairs = [
        (v, r)
        for v, r in zip(jax.tree.leaves(value, is_leaf=is_leaf), jax.tree.leaves(reference), strict=True)
        if not base.is_masked_node(v)
    ]
    inexact = all(base.is_stored(v) or jnp.issubdtype(jnp.result_type(v), jnp.inexact) for v, _ in pairs)
    return pairs if inexact and all(complex_params.mirrors(v, r) for v, r in pairs) else []


def _kept_elsewhere(node: Any, field: str) -> bool:
    """Whether another field of ``node`` holds a statistic where ``field`` holds ``optax.MaskedNode`` (Adafactor's
    factored moments, where its whole one is masked): ``field`` is then part of a statistic, not a group's moment."""
    treedef: Any = jax.tree.structure(getattr(node, field), is_leaf=_field_leaf)
    masked = [base.is_masked_node(v) for v in jax.tree.leaves(getattr(node, field), is_leaf=_field_leaf)]
    for other in node._fields:
        value = getattr(node, other)
        if other != field and jax.tree.structure(value, is_leaf=_field_leaf) == treedef:
            leaves = jax.tree.leaves(value, is_leaf=_field_leaf)
            if any(m and not base.is_masked_node(v) for m, v in zip(masked, leaves, strict=True)):
                return True
    return False


def _state_fields(inner_state: Any, reference: Any) -> dict[str, Any]:
    nodes = list(_nodes(inner_state))
    groups = [path for path, node in nodes if isinstance(node, optax.MaskedState)]
    found = []
    for path, node in nodes:
        if not (isinstance(node, tuple) and hasattr(node, "_fields")) or isinstance(node, MonitorState):
            continue
        grouped = any(path[: len(group)] == group for group in groups)
        for field in node._fields:
            if _mirrored(getattr(node, field), reference, grouped) and not (grouped and _kept_elsewhere(node, field)):
                found.append((path, field, getattr(node, field)))
    return _qualified(found)


def _probes(inner_state: Any) -> dict[str, jax.Array]:
    return {
        name: value
        for _, node in _nodes(inner_state)
        if isinstance(node, NormProbeState)
        for name, value in node.norms.items()
    }


# The sums each leaf contributes to its group's statistics, the columns of a leaf's row of sums.
_SUMS = (
    "g_sq",
    "u_sq",
    "p_sq",
    "rate_sq",  # the sum of (|u_i| / |g_i|)^2 over the coordinates with g_i != 0
    "nonzero",  # the number of those coordinates
)

# Leaves under this many coordinates are reduced together, packed into one vector: one reduction
# per statistic for all of them, where one each would make the compiled step's instructions (and
# XLA's compile time, which grows faster than their number) scale with the number of leaves.
PACKED_SIZE = 1 << 16


def _squared(x: Any, dtype: Any) -> jax.Array:
    """``|x|^2`` in the statistics' real ``dtype``."""
    return moments.abs_sq(moments.in_precision(jnp.asarray(x), dtype)).astype(dtype)


def _sum(terms: Callable[..., jax.Array], *operands: Any) -> jax.Array:
    """The sum of ``terms(*operands)`` over all its coordinates, in one pass over the operands.

    Each reduction reads its own aliases of its operands (an optimization barrier, which copies
    nothing) and takes its constants among them: XLA:CPU then fuses every term into its own
    reduction. Shared, its common subexpressions (``g * g`` of two statistics, a broadcast constant)
    are computed once into arrays as large as the leaf, and written out, which made a recording step
    several times slower than the reads it needs (``benchmarks/monitor.py``). For the same reason
    the terms avoid comparisons and selects: XLA:CPU's fast reductions take neither.
    """
    return jnp.sum(terms(*jax.lax.optimization_barrier(operands)))


def _largest(terms: Callable[..., jax.Array], *operands: Any) -> jax.Array:
    """The largest of ``terms(*operands)`` (all >= 0) over all its coordinates, 0 for none; as :func:`_sum`."""
    return jnp.max(terms(*jax.lax.optimization_barrier(operands)), initial=0)


def _present(g: jax.Array, big: jax.Array, one: jax.Array, dtype: Any) -> jax.Array:
    """1 where ``g^2 > 0`` in ``dtype``, else 0 (NaN for NaN), by arithmetic: two products by ``big`` lift the
    least subnormal above 1. The inner ``minimum`` keeps XLA from folding them into one product by ``big * big``
    (inf: 0 * inf is NaN)."""
    return jnp.minimum(jnp.minimum(_squared(g, dtype) * big, one) * big, one)


def _rate_sq(g: jax.Array, u: jax.Array, big: jax.Array, one: jax.Array, dtype: Any) -> jax.Array:
    """``(u / g)^2`` where ``g^2 > 0``, else 0."""
    mask = _present(g, big, one, dtype)
    return _squared(u, dtype) / (_squared(g, dtype) + (one - mask)) * mask


def _constants(dtype: Any) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(jnp.finfo(dtype).max, dtype), jnp.ones([], dtype)


def _leaf_sums(g: jax.Array, u: Any, p: Any, dtype: Any) -> jax.Array:
    """The sums of one leaf (a row of :data:`_SUMS`), each one reduction fused with its terms."""
    squared = lambda x: _squared(x, dtype)
    zero = jnp.zeros([], dtype)
    constants = _constants(dtype)
    return jnp.stack(
        [
            _sum(squared, g),
            zero if u is None else _sum(squared, u),
            zero if p is None else _sum(squared, p),
            zero if u is None else _sum(functools.partial(_rate_sq, dtype=dtype), g, u, *constants),
            _sum(functools.partial(_present, dtype=dtype), g, *constants),
        ]
    )


def _packed_leaf_sums(gs: list[Any], us: list[Any], ps: list[Any], dtype: Any) -> jax.Array:
    """The rows of :func:`_leaf_sums` of small leaves, packed into one vector: one segment sum of all their terms.

    On a mesh with explicit axes each small leaf is gathered whole first (a concatenation takes one
    sharding): a few small all-gathers, where each leaf reduced alone would need an all-reduce.
    """
    # Each leaf's |x|^2 packed (real: complex and real leaves side by side, whatever the promotion rules).
    packed = lambda xs: jnp.concatenate(
        [
            jnp.ravel(_squared(placement.whole(jnp.asarray(g if x is None else x)), dtype))
            for g, x in zip(gs, xs, strict=True)
        ]
    )
    # A missing update or parameter counts as zero: its coordinates are masked out of those sums.
    kept = lambda xs: jnp.concatenate(
        [jnp.full([np.size(g)], x is not None, dtype) for g, x in zip(gs, xs, strict=True)]
    )
    g_sq, u_sq, p_sq = packed(gs), packed(us), packed(ps)
    big, one = _constants(dtype)
    present = jnp.minimum(jnp.minimum(g_sq * big, one) * big, one)  # _present's, from the squares
    terms = [g_sq, u_sq * kept(us), p_sq * kept(ps), u_sq / (g_sq + (one - present)) * present * kept(us), present]
    segments = np.repeat(np.arange(len(gs)), [np.size(g) for g in gs])
    return jax.ops.segment_sum(jnp.stack(terms, axis=-1), segments, num_segments=len(gs), indices_are_sorted=True)


def _all_leaf_sums(gs: list[Any], us: list[Any], ps: list[Any], dtype: Any) -> tuple[jax.Array, np.ndarray]:
    """The rows of :func:`_leaf_sums` of every leaf (the small ones packed), and the leaf of each row."""
    small = [i for i, g in enumerate(gs) if np.size(g) < PACKED_SIZE]
    large = [i for i, g in enumerate(gs) if np.size(g) >= PACKED_SIZE]
    rows = [_leaf_sums(gs[i], us[i], ps[i], dtype)[None] for i in large]
    if small:
        rows.append(_packed_leaf_sums([gs[i] for i in small], [us[i] for i in small], [ps[i] for i in small], dtype))
    sums = jnp.concatenate(rows) if rows else jnp.zeros([0, len(_SUMS)], dtype)
    return sums, np.asarray(large + small, int)


def _group_stats(sums: jax.Array) -> dict[str, jax.Array]:
    """The statistics of groups from their sums (a row of :data:`_SUMS` each): a vector per statistic."""
    g_sq, u_sq, p_sq, rate_sq, nonzero = (sums[:, i] for i in range(len(_SUMS)))
    u_norm, g_norm = moments.root(u_sq), moments.root(g_sq)
    return {
        "grad_norm": g_norm,
        "update_norm": u_norm,
        "effective_lr": moments.safe_divide(u_norm, g_norm),
        "rate_rms": moments.root(moments.safe_divide(rate_sq, nonzero)),
        "update_ratio": moments.safe_divide(u_norm, moments.root(p_sq)),
    }


def _field_stats(value: Any, reference: Any, dtype: Any) -> jax.Array:
    """The RMS and the largest magnitude of a state field over all its coordinates (small leaves packed).

    A complex parameter's real view (``complex_convention="real_imag"``) is read as the complex numbers it holds:
    the coordinates counted, and the magnitudes, are the parameter's (for a second moment, of (re^2, im^2) pairs).
    """
    # A stored leaf is decoded once, into an array both reductions read.
    leaves = []
    for x, r in _mirrored(value, reference, grouped=True):  # a field _state_fields found
        x = moments.load(x, jnp.float32)
        leaves.append(complex_params.from_pairs(x, r) if complex_params.is_real_view(x, r) else x)
    size = sum(int(np.size(x)) for x in leaves)
    squared = lambda x: _squared(x, dtype)
    magnitude = lambda x: jnp.abs(moments.in_precision(jnp.asarray(x), dtype)).astype(dtype)
    large = [x for x in leaves if np.size(x) >= PACKED_SIZE]
    total = sum((_sum(squared, x) for x in large), jnp.zeros([], dtype))
    maxima = [_largest(magnitude, x) for x in large]
    small = [placement.whole(jnp.asarray(x)) for x in leaves if np.size(x) < PACKED_SIZE]
    if small:  # their squares and magnitudes packed: real, complex leaves beside real ones under any promotion
        total = total + _sum(lambda s: s, jnp.concatenate([jnp.ravel(squared(x)) for x in small]))
        maxima.append(_largest(lambda m: m, jnp.concatenate([jnp.ravel(magnitude(x)) for x in small])))
    largest = jnp.max(jnp.stack([jnp.zeros([], dtype), *maxima]))
    return jnp.stack([moments.root(total / max(size, 1)), largest])


def _measure(
    grads: Updates, updates: Updates, params: Params | None, inner_state: Any, groups: GroupsSpec, dtype: Any
) -> tuple[list[str], jax.Array]:
    """Every record's name, and their values in one vector, in the order :func:`monitor` keeps them."""
    treedef: Any = jax.tree.structure(grads)
    g_leaves = treedef.flatten_up_to(grads)
    u_leaves = treedef.flatten_up_to(updates)
    if params is not None:
        base.check_tree_match(grads, params, "parameters")
    p_leaves = [None] * len(g_leaves) if params is None else treedef.flatten_up_to(params)
    sums, leaf_of_row = _all_leaf_sums(g_leaves, u_leaves, p_leaves, dtype)
    names: list[str] = []
    chunks: list[jax.Array] = []

    def add(new_names: list[str], values: Any) -> None:
        names.extend(new_names)
        chunks.append(jnp.reshape(jnp.asarray(values).astype(dtype), [len(new_names)]))

    for stat, value in _group_stats(jnp.sum(sums, axis=0, keepdims=True)).items():
        add([stat], value)
    if groups is not None:
        labels = _labels(groups, grads)
        order = list(dict.fromkeys(labels))  # the groups, in the order of their first leaves
        group_of_row = np.asarray([order.index(labels[leaf]) for leaf in leaf_of_row], int)
        by_group = _group_stats(jax.ops.segment_sum(sums, group_of_row, num_segments=len(order)))
        for stat in _STATS:
            add([f"{stat}/{label}" for label in order], by_group[stat])
    for name, value in _probes(inner_state).items():
        if name in names:
            raise ValueError(f"record_norm({name!r}) takes the name of one of the monitor's own records: rename it.")
        add([name], value)
    for name, value in _state_fields(inner_state, grads).items():
        add([f"state/{name}/rms", f"state/{name}/max"], _field_stats(value, grads, dtype))
    for prefix, reader in (("hyperparams", _hyperparams_of), ("nonfinite", _skip_counts_of)):
        for name, value in _found(inner_state, reader).items():
            add([f"{prefix}/{name}"], value)
    return names, jnp.concatenate(chunks)


def monitor(
    optimizer: optax.GradientTransformation,
    *,
    every: int = 10,
    groups: GroupsSpec = "leaves",
) -> optax.GradientTransformationExtraArgs:
    r"""Record what the optimizer does every ``every`` steps, inside its state and without leaving ``jit``.

    The updates are ``optimizer``'s; only the state grows (:class:`MonitorState`). A step with
    ``record=False`` is the unmonitored program, bit for bit. A recording step compiles the
    optimizer's step together with the statistics, and XLA may round it differently in the last
    bit (a multiply-add fused in one program and not in the other; so may ``apply_updates`` in a
    larger jitted step): on recording steps, and in the cond form, which compiles the step inside
    its branches, also on eager calls, updates and parameters can differ from the unmonitored
    ones by an ulp.
    At updates :math:`t = 0, k, 2k, \dots` (:math:`k` = ``every``) it records, from the
    gradient :math:`g` it was given, the update :math:`u` returned and the parameters :math:`p`,
    over the whole tree and over each group :math:`G` of leaves (named ``stat/group``):

    .. math::
        \text{grad\_norm} = \|g_G\|, \quad
        \text{effective\_lr} = \frac{\|u_G\|}{\|g_G\|}, \quad
        \text{rate\_rms} = \sqrt{\frac{1}{|I|} \sum_{i \in I} \Big(\frac{|u_i|}{|g_i|}\Big)^2}, \quad
        \text{update\_ratio} = \frac{\mathrm{rms}(u_G)}{\mathrm{rms}(p_G)}

    with :math:`I` the coordinates of :math:`G` where :math:`g_i \ne 0` (where :math:`g_i^2`, in the
    statistics' dtype, is not 0: a float32 gradient below 1e-19 in magnitude counts as zero), and 0
    for a ratio whose denominator is 0 (a zero gradient, no parameters given, an empty leaf). For plain SGD both
    rates are the learning rate; for Adam, ``rate_rms`` shows the spread of its per-coordinate
    rates. Also recorded: ``update_norm`` (whole tree); each :func:`record_norm` probe in the
    chain under its name; ``state/<field>/rms`` and ``state/<field>/max`` for every state field
    that mirrors the parameters (``mu``, ``nu`` ...; a stored 8-bit moment is decoded);
    ``hyperparams/<name>`` for each value of :func:`current_hyperparams`; and
    ``nonfinite/total`` and ``nonfinite/consecutive`` from ``optax.apply_if_finite``'s counters.
    Statistics are computed in the parameters' widest float dtype, at least float32 (bfloat16 and
    float16 leaves too). A non-finite gradient shows: a NaN coordinate makes its group's norms and
    rates NaN (an infinite one, its norm infinite), and the whole tree's with them. Between
    recordings a ``jax.lax.cond`` skips every reduction (under ``vmap`` with a batched step count,
    the cond becomes a select that computes both branches, each with the optimizer's step).

    **The fast form: two compiled steps.** The ``jax.lax.cond`` keeps one program, but it costs
    every step something: the optimizer's step runs inside it, so its updates are written out
    (they can no longer fuse into ``apply_updates``), and on a CPU, unless
    :func:`adaopt.enable_cpu_copy_elision` is on, XLA copies the new state out of the cond.
    Measured on the GPT-2 tree (``benchmarks/monitor.py``), that makes a step 2 to 4 times
    slower. Pass ``record=True`` or ``record=False`` to ``update`` instead (a Python bool, static:
    the step is compiled twice, with ``static_argnames``): a step with ``record=False`` is exactly
    the unmonitored step, and one with ``record=True`` measures without a cond; ``every`` is then
    unused, and the loop decides (``record=i % 10 == 0``)::

        step = jax.jit(train_step, static_argnames="record", donate_argnums=(0, 1))
        for i, batch in enumerate(batches):
            params, opt_state = step(params, opt_state, batch, record=i % 10 == 0)

    Args:
      optimizer: any ``optax.GradientTransformation`` (adaopt's, optax's, a chain); ``update``'s
        extra arguments (``value=loss``) are passed to it.
      every: record every ``every``-th update, starting with the first; an integer >= 1. The
        updates counted are the monitor's own calls: around ``optax.MultiSteps(opt, k)`` they are
        the micro-steps, all but the last of every ``k`` of which return a zero update (``every=k``
        would record only those); put the monitor inside, ``optax.MultiSteps(adaopt.monitor(opt, every=m), k)``,
        to record every ``m``-th accumulated step.
      groups: ``"leaves"`` (default: each leaf, named by its path, e.g. ``"layers/0/kernel"``);
        a mapping ``{group: pattern or patterns}`` of ``fnmatch`` patterns on those paths (a leaf
        goes to the first group it matches, else to ``"other"``); a function of the parameters
        returning a tree of group names (as ``optax.partition``'s labels); or None for the whole
        tree only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MonitorState`; read its
      records with :func:`read_records`. Its ``update`` takes ``record=None`` (record every
      ``every`` updates, through a cond), or ``record=True`` / ``False`` (static: record now, or not).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.monitor(adaopt.sgd(0.1), every=10)
      >>> params = {"w": jnp.ones(3), "b": jnp.zeros(1)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3), "b": jnp.ones(1)}, state, params)
      >>> records = adaopt.read_records(state)
      >>> round(records["effective_lr"], 6), round(records["rate_rms/w"], 6), round(records["update_ratio/w"], 6)
      (0.1, 0.1, 0.1)
    """
    base.check_transformation("optimizer", optimizer)
    base.check_integer("every", every, 1)
    _check_groups(groups)
    inner = base.with_extra_args(optimizer)

    def init_fn(params: Params) -> MonitorState:
        inner_state = inner.init(params)
        dtype = moments.scalar_dtype(params)
        found: list[str] = []
        # Named as in update, which sees arrays: an nnx.Optimizer initialises with its variables.
        plain_params, _ = numerics.unwrap_variables(base.fast(params), "params")
        plain_state, _ = numerics.unwrap_variables(inner_state)

        def measure_at_init() -> jax.Array:
            names, values = _measure(plain_params, plain_params, plain_params, plain_state, groups, dtype)
            found.extend(names)
            return values

        jax.eval_shape(measure_at_init)  # the names only: nothing is computed
        names = tuple(found)
        records = Records(names, jnp.zeros([len(names)], dtype))
        return MonitorState(moments.zero_count(), jnp.full([], -1, jnp.int32), inner_state, records)

    def update_fn(
        updates: Updates,
        state: MonitorState,
        params: Params | None = None,
        *,
        record: bool | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, MonitorState]:
        grads = updates
        if record is not None and not isinstance(record, bool):
            raise TypeError(
                f"record must be True, False or None (a Python bool, static under jit: compile the step with "
                f"static_argnames), got {record!r}."
            )
        recording: Any = state.count % every == 0 if record is None else record

        def inner_update(recording: bool, inner_state: Any) -> tuple[Updates, Any]:
            token = _RECORDING.set(recording)
            try:
                return inner.update(grads, inner_state, params, **extra_args)
            finally:
                _RECORDING.reset(token)

        old = state.records

        def measure(updates: Updates, inner_state: Any) -> jax.Array:
            # The statistics read the finished updates and state: fused into their producers, XLA:CPU
            # recomputes the update inside each reduction, several times slower.
            # Around lookahead, the fast weights' updates and parameters: those the gradients were taken at.
            g, u, p, s = jax.lax.optimization_barrier((grads, base.fast(updates), base.fast(params), inner_state))
            names, values = _measure(g, u, p, s, groups, old.values.dtype)
            if tuple(names) != old.names:
                raise ValueError(
                    "The optimizer's state changed its structure since init: the monitor's records were "
                    f"{old.names}, now {tuple(names)}."
                )
            return values

        inner_state = state.inner_state
        if record is None:
            # The whole step is in the cond, each branch taking it from the step's inputs. Given the
            # step's results instead, the cond reads the donated parameters after the step overwrote
            # them, so XLA:CPU copies them every step, recording or not, and writes out the parts of
            # the update that both the cond and apply_updates read (Adam's denominator).
            def with_records() -> tuple[jax.Array, Updates, Any]:
                updates, new_state = inner_update(True, inner_state)
                return measure(updates, new_state), updates, new_state

            def without() -> tuple[jax.Array, Updates, Any]:
                return old.values, *inner_update(False, inner_state)

            values, updates, inner_state = jax.lax.cond(recording, with_records, without)
        else:
            updates, inner_state = inner_update(record, inner_state)
            values = measure(updates, inner_state) if record else old.values
        recorded_at = jnp.where(recording, state.count, state.recorded_at)
        new_state = MonitorState(
            moments.safe_increment(state.count), recorded_at, inner_state, Records(old.names, values)
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def read_records(state: Any, index: int | tuple[int, ...] | None = None) -> dict[str, float]:
    """The records of the :func:`monitor` inside ``state``, on the host: ``{name: value}``.

    They are those of the last recording step (``MonitorState.recorded_at``), all 0 before the
    first. A host round trip: call it outside ``jit``, when you write the records.

    Args:
      state: the monitor's state, or any state holding exactly one (a chain's, an
        ``nnx.Optimizer``'s ``opt_state``).
      index: for a state built under ``vmap`` (records with leading batch axes), which one to read.

    Returns:
      ``{name: float}`` in the monitor's order of records.

    Raises:
      ValueError: ``state`` holds no monitor's state or several, or batched records without an ``index``.
    """
    found = numerics.find_state(
        state, MonitorState, "wrap the optimizer in adaopt.monitor(...) and pass its state (or one that holds it)."
    )
    values = np.asarray(jax.device_get(found.records.values))
    if index is not None:
        axes, batch = len(index) if isinstance(index, tuple) else 1, values.shape[:-1]
        if axes > len(batch):
            raise ValueError(
                f"index={index!r} reads {axes} batch axes, but the records have {len(batch)} (batch shape {batch})"
                + (": drop index=, the state was not built under vmap." if not batch else ".")
            )
        values = values[index]
    if values.ndim != 1:
        raise ValueError(
            f"The records have batch axes (shape {values.shape[:-1]}), from a state built under vmap: pass index= "
            "to read one of them."
        )
    return {name: float(value) for name, value in zip(found.records.names, values, strict=True)}


__all__ = [
    "MonitorState",
    "NormProbeState",
    "Records",
    "current_hyperparams",
    "monitor",
    "read_records",
    "record_norm",
]
