r"""Per-group hyperparameters, as torch users know them from ``param_groups``, on ``optax.partition``.

Parts of the parameter tree, chosen by their paths, get their own hyperparameters (learning
rate, weight decay, betas...) or a whole other optimizer; the rest form the default group. Each
group is one transformation of ``optax.partition``, which runs it on that group's leaves only
(the others are ``optax.MaskedNode`` to it), so every optimizer, wrapper and schedule of adaopt
and optax works inside a group, and ``update``'s extra arguments (``value=``) reach every group.

**The path of a leaf** is its key path joined by "/": ``{"encoder": {"w": ...}}`` gives
``"encoder/w"``, a list index gives its number (``"layers/0/bias"``), an attribute its name
(Equinox modules, dataclasses). A Flax NNX variable counts as the leaf, without its ``value``
attribute: the ``kernel`` of ``model.hidden`` in ``nnx.state(model, nnx.Param)`` (what
``nnx.Optimizer`` passes) is ``"hidden/kernel"``, as in the state's ``to_pure_dict()``. So does a
Flax linen box (``nn.Partitioned``, ``nn.LogicallyPartitioned``): ``"Dense_0/kernel"``, as unboxed.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
import optax

from adaopt._src import base, numerics

DEFAULT_GROUP = "default"

# A glob string, a compiled regular expression, a sequence of those, or a predicate (path, leaf) -> bool:
# see Group. (Any, as base.MaskOrFn: the API reference shows the rule in Group's docstring.)
Match: TypeAlias = Any

# The torch names a user of param_groups is likely to write, and what adaopt calls them.
_TORCH_NAMES = {"lr": "learning_rate", "betas": "b1 and b2", "initial_lr": "learning_rate (a schedule)"}


def path_string(path: Sequence[Any]) -> str:
    """A key path as the "/"-joined string the groups' patterns and predicates see, e.g. ``"encoder/w"`` (a Flax
    box's ``value`` left out: :func:`adaopt._src.numerics.named_path`)."""
    return numerics.path_string(path)


def _is_pattern(x: Any) -> bool:
    return isinstance(x, (str, re.Pattern))


def _pattern_matches(pattern: str | re.Pattern[str], path: str) -> bool:
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(path, pattern)
    return pattern.fullmatch(path) is not None


def _describe(match: Any) -> str:
    if isinstance(match, re.Pattern):
        return f"re.compile({match.pattern!r})"
    if isinstance(match, str):
        return repr(match)
    if callable(match):
        return f"the predicate {getattr(match, '__qualname__', match)!s}"
    return "[" + ", ".join(_describe(m) for m in match) + "]"


class Group:
    r"""One group of parameters: which leaves, and the hyperparameters or the optimizer they get.

    The leaves are chosen by ``match``, tested on each leaf's path (the key path joined by "/",
    see :mod:`adaopt._src.wrappers.param_groups`):

    - a string is a glob on the whole path, matched case-sensitively by ``fnmatch.fnmatchcase``:
      ``*`` matches any characters *including* "/", ``?`` one character, ``[ab]`` one of a set.
      ``"*/bias"`` takes every leaf named ``bias`` at any depth (not a top-level ``"bias"``:
      write ``"bias"`` or ``["bias", "*/bias"]`` for both), ``"encoder/*"`` everything under
      ``encoder``, ``"*embed*"`` every path that contains ``embed``;
    - a compiled regular expression (``re.compile(...)``) must match the whole path
      (``fullmatch``): ``re.compile(r".*/(bias|scale)")``;
    - a sequence of strings and regular expressions takes a leaf that any of them matches;
    - a predicate ``(path, leaf) -> bool`` decides from the path and the leaf's shape and dtype
      (it is given the parameter in ``init`` and the gradient in ``update``, possibly abstract
      under ``jit``: it must not read values), and returns a Python bool.

    Args:
      match: the rule, as above.
      optimizer: a whole other optimizer for these leaves (any ``optax.GradientTransformation``),
        in place of the default factory called with overrides. Not with ``**hyperparameters``.
      name: the group's key in the state's ``inner_states`` (default ``"group_<index>"``, its
        position in the list of groups); ``"default"`` is the default group's.
      **hyperparameters: arguments of the default factory that differ in this group, e.g.
        ``weight_decay=0.0`` or ``learning_rate=1e-4``; the default group's arguments fill the rest.

    Raises:
      HyperparameterError: ``match`` is not one of the forms above, both ``optimizer`` and
        hyperparameters are given, ``optimizer`` is not a gradient transformation, or ``name``
        is not a non-empty string.
    """

    __slots__ = ("hyperparameters", "match", "name", "optimizer")

    def __init__(
        self,
        match: Match,
        /,
        *,
        optimizer: optax.GradientTransformation | None = None,
        name: str | None = None,
        **hyperparameters: Any,
    ) -> None:
        _check_match(match)
        if optimizer is not None and not base.is_transformation(optimizer):
            raise base.HyperparameterError(
                f"Group({_describe(match)}): optimizer must be a gradient transformation such as adaopt.sgd(0.1), "
                f"got {optimizer!r} of type {type(optimizer).__name__}. (To change hyperparameters of the default "
                "factory, pass them as keyword arguments instead.)"
            )
        if optimizer is not None and hyperparameters:
            raise base.HyperparameterError(
                f"Group({_describe(match)}) has both an optimizer and hyperparameters {sorted(hyperparameters)}: the "
                "hyperparameters override the default factory's arguments, which an optimizer of its own does not "
                "use. Build the optimizer with them (e.g. adaopt.sgd(learning_rate=0.1)), or drop optimizer=."
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise base.HyperparameterError(f"Group name must be a non-empty string or None, got {name!r}.")
        self.match = match
        self.optimizer = optimizer
        self.name = name
        self.hyperparameters: dict[str, Any] = dict(hyperparameters)

    def matches(self, path: str, leaf: Any) -> bool:
        """Whether this group's rule takes the leaf at ``path`` (earlier groups aside)."""
        match = self.match
        if _is_pattern(match):
            return _pattern_matches(match, path)
        if callable(match):
            try:
                inspect.signature(match).bind(path, leaf)
            except TypeError:
                raise TypeError(
                    f"The predicate of Group({_describe(match)}) must take two arguments, (path, leaf): the leaf's "
                    f"path as a string ({path!r}) and the leaf, e.g. lambda path, leaf: leaf.ndim == 1."
                ) from None
            except ValueError:  # no signature to read (a builtin): the call itself will tell
                pass
            chosen = match(path, leaf)
            if not isinstance(chosen, (bool, np.bool_)):
                raise TypeError(
                    f"The predicate of Group({_describe(match)}) returned {chosen!r} of type "
                    f"{type(chosen).__name__} for the leaf at {path!r}: it must return a Python bool, decided from "
                    "the path and the leaf's shape and dtype (under jit the leaf's values are not known, and a "
                    "leaf's group must not change between steps)."
                )
            return bool(chosen)
        return any(_pattern_matches(m, path) for m in match)

    def __repr__(self) -> str:
        parts = [_describe(self.match)]
        if self.optimizer is not None:
            parts.append("optimizer=...")
        if self.name is not None:
            parts.append(f"name={self.name!r}")
        parts += [f"{k}={v!r}" for k, v in self.hyperparameters.items()]
        return f"Group({', '.join(parts)})"


def _check_match(match: Any) -> None:
    if _is_pattern(match) or callable(match):
        return
    if isinstance(match, Sequence) and match and all(_is_pattern(m) for m in match):
        return
    raise base.HyperparameterError(
        "A Group's match must be a glob string (e.g. '*/bias'), a compiled regular expression, a non-empty "
        f"sequence of those, or a predicate (path, leaf) -> bool; got {match!r} of type {type(match).__name__}."
    )


def _names(groups: Sequence[Group]) -> list[str]:
    """The groups' keys in the partition's state, in order; refuses duplicates and the default's key."""
    if isinstance(groups, Group) or not isinstance(groups, Sequence):
        raise base.HyperparameterError(
            f"groups must be a list of adaopt.Group, got {groups!r} of type {type(groups).__name__}."
        )
    for i, group in enumerate(groups):
        if not isinstance(group, Group):
            raise base.HyperparameterError(
                f"groups[{i}] must be an adaopt.Group (e.g. adaopt.Group('*/bias', weight_decay=0.0)), got "
                f"{group!r} of type {type(group).__name__}."
            )
    names = [g.name if g.name is not None else f"group_{i}" for i, g in enumerate(groups)]
    taken: dict[str, int] = {}
    for i, name in enumerate(names):
        if name == DEFAULT_GROUP:
            raise base.HyperparameterError(
                f"groups[{i}] is named {DEFAULT_GROUP!r}, the name of the default group (the leaves no group "
                "takes): choose another name."
            )
        if name in taken:
            raise base.HyperparameterError(
                f"groups[{taken[name]}] and groups[{i}] are both named {name!r}: each group needs its own name."
            )
        taken[name] = i
    return names


def _label_tree(groups: Sequence[Group], names: Sequence[str], tree: Any) -> Any:
    """The name of each leaf's group (the first whose rule takes it, else the default), in ``tree``'s form.

    A Flax NNX variable is labelled as one leaf, by its path without ``value``: the labels are a
    prefix of ``tree``, which ``optax.partition`` accepts.
    """
    values, _ = numerics.unwrap_variables(tree, "params")

    def label(path: Any, leaf: Any) -> str:
        where = path_string(path)
        for name, group in zip(names, groups, strict=True):
            if group.matches(where, leaf):
                return name
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(label, values)


def group_labels(groups: Sequence[Group], params: base.Params) -> Any:
    """Which group each leaf of ``params`` belongs to: the first of ``groups`` that takes it, else ``"default"``.

    Args:
      groups: the groups, as given to :func:`param_groups`.
      params: the parameters (or any tree of their structure: gradients, ``jax.eval_shape``'s
        shapes).

    Returns:
      A tree of ``params``' structure whose leaves are the groups' names (a Flax NNX variable's
      label stands in its place); the names are the keys of the state's ``inner_states``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"embed": jnp.zeros((10, 4)), "dense": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}
      >>> adaopt.group_labels([adaopt.Group("*/bias", name="no_decay"), adaopt.Group("embed")], params)
      {'dense': {'bias': 'no_decay', 'kernel': 'default'}, 'embed': 'group_1'}
    """
    return _label_tree(groups, _names(groups), params)


def _check_hyperparameters(factory: Callable[..., Any], given: Mapping[str, Any], where: str) -> None:
    """Refuse names that are not arguments of ``factory``, and a call that would miss a required one."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or an object without a signature: the call itself will tell
        return
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    factory_name = getattr(factory, "__name__", repr(factory))
    accepted = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        hints = [f"{n!r} is {_TORCH_NAMES[n]} here" for n in unknown if _TORCH_NAMES.get(n)]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise base.HyperparameterError(
            f"{where} names {unknown}, which {'is not an argument' if len(unknown) == 1 else 'are not arguments'} of "
            f"{factory_name}{hint}. Its arguments are {accepted}."
        )
    try:
        signature.bind(**given)
    except TypeError as error:
        raise base.HyperparameterError(
            f"{where}: {factory_name} cannot be called with {sorted(given)}: {error}."
        ) from None


def _check_every_group_takes_leaves(groups: Sequence[Group], names: Sequence[str], params: base.Params) -> None:
    """The init-time check: a group that takes no leaf is an error (a typo in a pattern, most often)."""
    values, _ = numerics.unwrap_variables(params, "params")
    leaves = [(path_string(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(values)]
    taken = {name: 0 for name in names}
    matching: dict[str, list[str]] = {name: [] for name in names}  # leaves each rule takes, earlier groups aside
    for where, leaf in leaves:
        owner = None
        for name, group in zip(names, groups, strict=True):
            if group.matches(where, leaf):
                matching[name].append(where)
                owner = owner or name
        if owner is not None:
            taken[owner] += 1
    for i, (name, group) in enumerate(zip(names, groups, strict=True)):
        if taken[name]:
            continue
        if matching[name]:
            earlier = {n: [w for w in matching[name] if w in matching[n]] for n in names[:i]}
            shadows = ", ".join(f"{n!r} (before it) takes {w}" for n, w in earlier.items() if w)
            reason = f"every leaf it matches is taken by an earlier group: {shadows}. Groups resolve by order"
        else:
            paths = [w for w, _ in leaves]
            shown = ", ".join(repr(p) for p in paths[:12]) + (f", ... ({len(paths)} leaves)" if len(paths) > 12 else "")
            reason = f"it matches no leaf; the leaves' paths are {shown or 'none (the tree has no leaves)'}"
        raise ValueError(
            f"Group {name!r} ({_describe(group.match)}) would optimise no parameter: {reason}. Fix the pattern (a "
            "glob on the whole '/'-joined path: '*/bias' for a leaf 'bias' at any depth), or pass "
            "allow_empty_groups=True to param_groups to accept a group with no leaves."
        )


@base.check_flags
def param_groups(
    default: Callable[..., optax.GradientTransformation] | optax.GradientTransformation,
    groups: Sequence[Group],
    *,
    allow_empty_groups: bool = False,
    **hyperparameters: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Different hyperparameters, or different optimizers, for parts of the parameter tree (torch's ``param_groups``).

    Every leaf belongs to exactly one group: the first of ``groups`` whose :class:`Group` rule
    takes its path (groups that overlap resolve by order), else the default group. A group
    runs

    .. math::
        \text{group } i: \quad \begin{cases}
            \text{optimizer}_i & \text{if } \texttt{Group(..., optimizer=...)} \\
            \text{default}(\texttt{**hyperparameters}, \texttt{**overrides}_i) & \text{otherwise}
        \end{cases}
        \qquad \text{default group: } \text{default}(\texttt{**hyperparameters})

    on its leaves only, with a state of its own, through ``optax.partition``: each group's
    optimizer sees a tree where the other groups' leaves are ``optax.MaskedNode`` (masks given
    as functions of the parameters, ``weight_decay_mask=fn``, are called on that tree, and
    tree-wide quantities such as a global norm are per group, as in torch where each group is
    stepped on its own). Not so in the packages of Prodigy and D-Adaptation: their one
    :math:`d` and its sums span every group, where here each group estimates its own. For a torch
    set-up whose groups differ only in weight decay (none on biases and norms), give those
    optimizers ``weight_decay_mask`` instead of groups (and D-Adapt Adam's per-group
    ``layer_scale``), which keeps one estimate for the tree.

    All optimizers are built here, so a wrong value fails now, in the factory's own check; the
    groups are resolved in ``init``, where a group that takes no leaf raises (unless
    ``allow_empty_groups``): a pattern that matches nothing is most often a typo, and training
    would otherwise silently give those leaves the default hyperparameters.

    The state is ``optax.PartitionState``: group ``name``'s state is
    ``state.inner_states[name].inner_state``, the default group's under ``"default"``. With
    ``default=adaopt.inject_hyperparams(adaopt.adamw)``, each group's hyperparameters are there
    in ``.hyperparams``, to change between steps (torch's ``param_groups[i]["lr"] = ...``).

    Args:
      default: a factory (``adaopt.adamw``, ``adaopt.inject_hyperparams(adaopt.sgd)``, any
        function returning a gradient transformation) called with ``hyperparameters`` for the
        default group and with each group's overrides merged in for the others; or an optimizer,
        used as it is for the default group (then every group needs ``optimizer=``).
      groups: the :class:`Group`\ s, first match wins.
      allow_empty_groups: accept, in ``init``, a group that takes no leaf (e.g. one config
        shared by models with and without an embedding).
      **hyperparameters: the default group's arguments of ``default``, in adaopt's names
        (``learning_rate``, ``b1``, ``b2``, ``weight_decay``, ``weight_decay_mask``...).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state ``optax.PartitionState``; its
      ``update`` passes extra arguments (``value=``) to every group.

    Raises:
      HyperparameterError: a hyperparameter (of the default group or a group) that ``default``
        does not take (its arguments are listed), overrides with an optimizer as ``default``,
        two groups of one name, or a value the factory refuses.
      ValueError: in ``init``, a group takes no leaf (see above).

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> params = {"embed": {"table": jnp.ones((5, 2))}, "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
      ...           "head": {"kernel": jnp.ones((2, 1))}}
      >>> opt = adaopt.param_groups(
      ...     adaopt.adamw,
      ...     [adaopt.Group("*/bias", weight_decay=0.0),               # torch: {"params": biases, "weight_decay": 0}
      ...      adaopt.Group("embed/*", learning_rate=1e-4),
      ...      adaopt.Group("head/*", optimizer=adaopt.sgd(0.1))],     # a whole other optimizer
      ...     learning_rate=1e-3, weight_decay=0.1)                    # the default group's arguments
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> step = lambda group, leaf: round(float(updates[group][leaf].ravel()[0]), 6)
      >>> step("dense", "bias"), step("dense", "kernel"), step("embed", "table")  # -lr * (sign(g) + decay * p)
      (-0.001, -0.0011, -0.00011)
      >>> step("head", "kernel")  # sgd: -0.1 * gradient
      -0.1

    Reproducing torch: ``torch.optim.AdamW([{"params": ..., "lr": ..., "betas": (b1, b2),
    "weight_decay": ...}, ...], lr=..., ...)`` is ``param_groups(adaopt.adamw, [Group(rule,
    learning_rate=..., b1=..., b2=..., weight_decay=...), ...], learning_rate=..., ...)`` with
    the torch defaults as the default group's arguments; ``torch.optim.SGD``'s groups likewise
    with ``adaopt.sgd`` (``momentum``, ``dampening``, ``weight_decay``, ``nesterov``); two torch
    optimizers on disjoint parameters are a ``Group(rule, optimizer=...)``; ``LambdaLR(opt,
    [f_1, ..., f_n])`` is ``learning_rate=lambda count: lr_i * f_i(count)`` in each group.
    Verified step for step in tests/test_param_groups.py (float64, 150 steps).
    """
    base.check_flag("allow_empty_groups", allow_empty_groups)
    names = _names(groups)
    transforms: dict[str, optax.GradientTransformation] = {}
    if base.is_transformation(default):
        if hyperparameters:
            raise base.HyperparameterError(
                f"param_groups got hyperparameters {sorted(hyperparameters)} with an optimizer as default: they are "
                "arguments of a factory. Pass the factory (e.g. adaopt.adamw) with them, or the optimizer alone."
            )
        overriding = [f"{n!r}" for n, g in zip(names, groups, strict=True) if g.optimizer is None]
        if overriding:
            which = f"Groups {', '.join(overriding)} have" if len(overriding) > 1 else f"Group {overriding[0]} has"
            raise base.HyperparameterError(
                f"{which} no optimizer of its own, so it overrides arguments of the default factory; but default is "
                "an optimizer, not a factory. Pass a factory (e.g. adaopt.adamw) as default, or give each group "
                "optimizer=."
            )
        build: Callable[..., optax.GradientTransformation] = lambda **_: default
    elif callable(default):
        _check_hyperparameters(default, hyperparameters, "param_groups' hyperparameters (the default group)")
        for name, group in zip(names, groups, strict=True):
            if group.optimizer is None:
                merged = {**hyperparameters, **group.hyperparameters}
                _check_hyperparameters(default, merged, f"Group {name!r} ({_describe(group.match)})")
        build = default
    else:
        raise base.HyperparameterError(
            "default must be a factory of optimizers (e.g. adaopt.adamw) or an optimizer, got "
            f"{default!r} of type {type(default).__name__}."
        )
    for name, group in zip(names, groups, strict=True):
        if group.optimizer is not None:
            transforms[name] = group.optimizer
            continue
        try:
            transforms[name] = build(**{**hyperparameters, **group.hyperparameters})
        except base.HyperparameterError as error:
            # The factory's message names the argument and the range; say which group's value it is.
            raise base.HyperparameterError(f"Group {name!r} ({_describe(group.match)}): {error}") from None
    transforms[DEFAULT_GROUP] = build(**hyperparameters)

    partitioned = optax.partition(transforms, lambda tree: _label_tree(groups, names, tree))

    def init_fn(params: base.Params) -> optax.PartitionState:
        if not allow_empty_groups:
            _check_every_group_takes_leaves(groups, names, params)
        return partitioned.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, partitioned.update)


__all__ = ["DEFAULT_GROUP", "Group", "group_labels", "param_groups", "path_string"]
