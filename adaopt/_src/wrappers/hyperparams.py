r"""``optax.inject_hyperparams`` that knows which of a factory's arguments are not numbers.

optax injects every numeric argument as an array in the state and calls every callable one as a
schedule of the step count, unless it is named in ``static_args``. A mask function
(``weight_decay_mask=fn``) or a dtype class (``mu_dtype=jnp.bfloat16``) is callable too: optax
would call it with the step count and pass what it returns on as the mask or the dtype.
:func:`inject_hyperparams` names those arguments static by itself, from the factory's signature.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base
from adaopt._src.base import HyperparameterError

_STRUCTURAL_INT = re.compile(r"^(int|int \| None|None \| int|Optional\[int\])$")


def _annotation(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def is_static(parameter: inspect.Parameter) -> bool:
    """Whether a factory's argument is an option rather than a numeric hyperparameter, by its role.

    Static: a mask (named ``mask`` or ``*_mask``, or annotated ``MaskOrFn``), a dtype (``dtype``
    or ``*_dtype``), a boolean or string option (by its default or its annotation, ``bool``,
    ``str`` or a ``Literal``), and an integer that sets shapes (annotated ``int`` or
    ``int | None``, e.g. Prodigy's ``slice_p``). Everything else (``learning_rate``, ``b1``,
    ``weight_decay`` ...) stays injectable, as a number or as a schedule: static-ness is decided
    by the argument's name, annotation and default, never by whether the value is callable.
    """
    name, default, annotation = parameter.name, parameter.default, _annotation(parameter)
    if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return False
    if name == "mask" or name.endswith("_mask") or "MaskOrFn" in annotation:
        return True
    if name == "dtype" or name.endswith("_dtype"):
        return True
    if isinstance(default, (bool, str)) or annotation in ("bool", "str") or "Literal" in annotation:
        return True
    return bool(_STRUCTURAL_INT.match(annotation))


def static_args_of(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments of ``factory`` that :func:`is_static` finds, in the signature's order."""
    return tuple(name for name, p in inspect.signature(factory).parameters.items() if is_static(p))


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    r"""``optax.inject_hyperparams``, with the factory's non-numeric arguments static by themselves.

    The numeric hyperparameters live in ``state.hyperparams``, where they can be changed between
    steps, or follow the schedules given in their place, exactly as in optax (this calls it).
    The options are passed to ``factory`` as they are: masks (``weight_decay_mask=fn`` stays a
    function of the parameters, where optax alone would call it as a schedule of the step count
    and decay no leaf), dtypes, boolean and string options and shape-setting integers; see
    :func:`~adaopt._src.wrappers.hyperparams.is_static` for the rule, which reads the factory's signature, so it serves optax's
    factories too (``optax.adamw``'s ``mask``, ``mu_dtype``, ``nesterov``).

    Args:
      factory: a function returning a gradient transformation, e.g. ``adaopt.adamw``.
      static_args: more arguments to pass as they are, beyond those found static.
      hyperparam_dtype: the dtype of the injected float hyperparameters, a float dtype (default: the
        parameters' widest float dtype, as optax's; for adaopt's own factories at least float32,
        as their steps compute: in bfloat16, ``b2=0.999`` would be 1).

    Returns:
      A function with ``factory``'s arguments that returns an
      ``optax.GradientTransformationExtraArgs`` with state ``optax.InjectHyperparamsState``.

    Raises:
      HyperparameterError: ``factory`` is not a factory (a gradient transformation is named as one: pass
        ``adaopt.adam``, not ``adaopt.adam(1e-3)``), ``static_args`` is not a name or an iterable of names, or
        ``hyperparam_dtype`` is not a float dtype.
      ValueError: a name in ``static_args`` is not an argument of ``factory``.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
      >>> opt = adaopt.inject_hyperparams(adaopt.adamw)(
      ...     learning_rate=adaopt.linear_schedule(1e-3, 0.0, 100), weight_decay=0.1,
      ...     weight_decay_mask=decay_matrices)
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> sorted(state.hyperparams)  # the numeric hyperparameters, not the mask
      ['b1', 'b2', 'eps', 'eps_root', 'learning_rate', 'weight_decay']
      >>> state.hyperparams["weight_decay"] = jnp.asarray(0.05)  # changed between steps
      >>> updates, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> updates["w"][0, 0] < 0, updates["b"][0] == 0  # a zero gradient: only w decays
      (Array(True, dtype=bool), Array(True, dtype=bool))
    """
    _check_factory(factory)
    requested = _static_names(static_args)
    parameters = inspect.signature(factory).parameters
    unknown = sorted(requested - set(parameters))
    if unknown:
        raise ValueError(
            f"static_args names {unknown}, which are not arguments of {getattr(factory, '__name__', factory)}: "
            f"name some of {list(parameters)}."
        )
    static = tuple(name for name in parameters if name in requested or is_static(parameters[name]))
    _check_hyperparam_dtype(hyperparam_dtype)
    signature = inspect.signature(factory)
    # adaopt's factories compute in float32 at least (their states too): optax's hold half-precision states, which
    # float32 hyperparameters would promote.
    ours = getattr(factory, "__module__", "").startswith("adaopt.")
    if hyperparam_dtype is not None or not ours:
        inject = optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=hyperparam_dtype)

        @functools.wraps(factory)
        def injected_by_optax(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
            args, kwargs = _floats(signature, static, args, kwargs)
            tx = inject(*args, **kwargs)
            init = _distinct_init(tx.init)
            if hyperparam_dtype is None:
                return optax.GradientTransformationExtraArgs(init, tx.update)

            def init_fn(params: Any) -> Any:
                try:
                    return init(params)
                except base.HyperparameterError as error:  # a value the dtype rounded (b2=0.999 is 1 in bfloat16)?
                    raise _rounded(error, factory, args, kwargs, static, hyperparam_dtype) from None

            return optax.GradientTransformationExtraArgs(init_fn, tx.update)

        return injected_by_optax

    @functools.wraps(factory)
    def injected(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        args, kwargs = _floats(signature, static, args, kwargs)

        def build_in(dtype: Any) -> optax.GradientTransformationExtraArgs:
            return optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=dtype)(*args, **kwargs)

        def build(tree: Any) -> optax.GradientTransformationExtraArgs:
            # promote_types, not optax.tree.dtype(tree, "highest"), which cannot order bfloat16 and float16; a complex
            # leaf counts by its real parts' dtype (the hyperparameters are real), an integer leaf not at all.
            dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
            real = (jnp.finfo(d).dtype for d in dtypes if jnp.issubdtype(d, jnp.inexact))
            return build_in(functools.reduce(jnp.promote_types, real, jnp.dtype(jnp.float32)))

        build_in(jnp.float32)  # the arguments checked now, as optax checks them, not at init

        def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
            return build(updates if params is None else params).update(updates, state, params, **extra_args)

        return optax.GradientTransformationExtraArgs(
            _distinct_init(lambda params: build(params).init(params)), update_fn
        )

    return injected


def _floats(signature: inspect.Signature, static: tuple[str, ...], args: Any, kwargs: Any) -> tuple[Any, Any]:
    """``args`` and ``kwargs`` with the hyperparameters given as integers (``b1=0``, ``learning_rate=1``) as floats:
    optax injects an integer array, whose dtype a float set later (``state.hyperparams["b1"] = 0.5``) changes,
    compiling the step again (and failing as a ``lax.scan`` carry). The options stay as given."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return args, kwargs  # optax and the factory name the mistake

    def as_float(name: str, value: Any) -> Any:
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        return float(value) if integer and name not in static else value

    bound.arguments.update({name: as_float(name, value) for name, value in bound.arguments.items()})
    return bound.args, bound.kwargs


def _check_factory(factory: Any) -> None:
    if base.is_transformation(factory):
        raise HyperparameterError(
            f"factory must be a function returning a gradient transformation, got the gradient transformation "
            f"{factory!r}: pass the factory, adaopt.adam, not adaopt.adam(1e-3) (the hyperparameters are passed to "
            "what inject_hyperparams returns)."
        )
    if not callable(factory):
        raise HyperparameterError(
            f"factory must be a function returning a gradient transformation (adaopt.adam), got {factory!r} of type "
            f"{type(factory).__name__}."
        )


def _static_names(static_args: Any) -> set[str]:
    """``static_args`` as a set of names: one str, or an iterable of them."""
    if isinstance(static_args, str):
        return {static_args}
    names = list(static_args) if isinstance(static_args, Iterable) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise HyperparameterError(
            f"static_args must be an argument's name or an iterable of names (str), got {static_args!r}."
        )
    return set(names)


def _rounded(
    error: base.HyperparameterError, factory: Any, args: Any, kwargs: Any, static: Any, dtype: Any
) -> base.HyperparameterError:
    """``error`` with the float hyperparameters (given or default) that ``dtype`` changes named, where any does."""
    try:
        bound = inspect.signature(factory).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return error
    bound.apply_defaults()
    changed = {}
    for name, value in bound.arguments.items():
        if name not in static and isinstance(value, float) and math.isfinite(value):
            rounded = float(np.asarray(value, dtype))
            if rounded != value:
                changed[name] = rounded
    named = {name: value for name, value in changed.items() if re.search(rf"\b{name}\b", str(error))}
    changed = named or changed  # the one the error is about, where it names it
    if not changed:
        return error
    shown = ", ".join(f"{name}={bound.arguments[name]!r} to {value!r}" for name, value in changed.items())
    return base.HyperparameterError(
        f"{error} hyperparam_dtype={jnp.dtype(dtype).name} rounds the float hyperparameters, the defaults too: it took "
        f"{shown}. Use a wider hyperparam_dtype (float32), or keep them static: static_args={tuple(changed)!r}."
    )


def _check_hyperparam_dtype(hyperparam_dtype: Any) -> None:
    if hyperparam_dtype is None:
        return
    message = f"hyperparam_dtype must be a float dtype (jnp.float32) or None, got {hyperparam_dtype!r}."
    if isinstance(hyperparam_dtype, (jax.Array, np.ndarray, np.generic)):  # a value, not a dtype
        raise HyperparameterError(f"{message} For an array's dtype, pass its .dtype.")
    try:
        dtype = jnp.dtype(hyperparam_dtype)
    except (TypeError, ValueError):
        raise HyperparameterError(message) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise HyperparameterError(message)


def _distinct_init(init: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``init`` whose state holds no buffer twice: an injected hyperparameter is often also the first value of an
    estimate (D-Adaptation's d, Prodigy's, Schedule-Free's weight sum), and a donated step would donate it twice."""
    return lambda params: base.distinct_buffers(init(params), params)


__all__ = ["inject_hyperparams", "is_static", "static_args_of"]
