"""optax's building blocks that users chain adaopt's optimizers with, their arguments checked when built.

optax takes any argument and fails, or trains wrongly, later: ``clip_by_global_norm(0.0)`` zeroes
every update (Hugging Face's ``max_grad_norm=0`` means no clipping) and a negative norm reverses
them; ``MultiSteps(opt, np.int64(4))`` takes the NumPy integer for a schedule and fails at the first
step ("not callable"); ``chain(clip, adaopt.adam)``, the factory in place of an optimizer, fails at
``init`` with an AttributeError. Each of these builds optax's own transformation (the same
object, state and numbers), with its arguments checked as adaopt's factories check theirs.

Two faults of optax's ``MultiSteps`` are mended: a non-finite micro-gradient stayed in its
accumulator for good (each new cycle restarted from ``0 * acc``: NaN; mended in the class here),
and, a class rather than an ``optax.GradientTransformationExtraArgs``, it lost ``update``'s extra
arguments (``value=``, ``hessian=``) inside ``apply_if_finite``, ``chain`` or any wrapper, so the
loss-driven optimizers failed and Sophia's Hessian average stayed 0 (mended in
``base.with_extra_args``, through which every wrapper takes its inner optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from adaopt._src import base


def chain(*transformations: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*transformations)``: apply them in order, each to the updates of the one before.

    Args:
      *transformations: gradient transformations (an adaopt or optax optimizer, ``clip_by_global_norm(1.0)``, ...);
        a factory passed in place of one (``adaopt.adam``, not ``adaopt.adam(1e-3)``) is named as such.

    Returns:
      optax's chain of them.

    Example:
      >>> import adaopt
      >>> tx = adaopt.chain(adaopt.clip_by_global_norm(1.0), adaopt.adamw(1e-3))
    """
    if not transformations:
        raise base.HyperparameterError(
            "chain needs at least one transformation (optax.identity() is the one that does nothing)."
        )
    for index, transformation in enumerate(transformations):
        base.check_transformation(f"chain's argument {index}", transformation)
    return optax.chain(*map(base.with_extra_args, transformations))


def clip(max_delta: Any) -> optax.GradientTransformation:
    """``optax.clip(max_delta)``: each coordinate of the updates clipped to ``[-max_delta, max_delta]``.

    Args:
      max_delta: the bound, a finite number > 0.

    Returns:
      optax's transformation.
    """
    base.check_scalar("max_delta", max_delta, low=0.0, low_open=True)
    return optax.clip(max_delta)


def clip_by_global_norm(max_norm: Any) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)``: the updates scaled down to a global norm of at most ``max_norm``.

    Args:
      max_norm: the largest global norm, a finite number > 0 (to train without clipping, leave the
        transformation out of the chain: 0 would zero every update).

    Returns:
      optax's transformation.
    """
    base.check_scalar("max_norm", max_norm, low=0.0, low_open=True)
    return optax.clip_by_global_norm(max_norm)


def apply_if_finite(inner: optax.GradientTransformation, max_consecutive_errors: int) -> optax.GradientTransformation:
    """``optax.apply_if_finite(inner, max_consecutive_errors)``: a step with non-finite updates is skipped.

    Args:
      inner: the optimizer whose steps are checked.
      max_consecutive_errors: skipped steps in a row after which the next non-finite step is applied, an
        integer >= 0.

    Returns:
      optax's transformation.
    """
    base.check_transformation("inner", inner)
    base.check_integer("max_consecutive_errors", max_consecutive_errors, 0)
    return optax.apply_if_finite(base.with_extra_args(inner), int(max_consecutive_errors))


class MultiSteps(optax.MultiSteps):
    """``optax.MultiSteps``: gradients accumulated over ``every_k_schedule`` calls, one step of ``opt`` on them.

    optax's class itself, its arguments checked: ``opt`` a gradient transformation, ``every_k_schedule`` an
    integer >= 1 (a NumPy integer too) or a function of the step count. Each cycle's accumulation starts
    afresh from its first micro-gradient (in optax's, a NaN one stayed in the accumulator for every later
    cycle; the step of its own cycle is NaN in both: ``should_skip_update_fn=optax.skip_not_finite`` skips
    it), and ``gradient_transformation()`` passes ``update``'s extra arguments on.

    Example:
      >>> import adaopt
      >>> tx = adaopt.MultiSteps(adaopt.adamw(1e-3), every_k_schedule=4)
    """

    def __init__(self, opt: optax.GradientTransformation, every_k_schedule: Any, *args: Any, **kwargs: Any) -> None:
        base.check_transformation("opt", opt)
        if not callable(every_k_schedule):
            base.check_integer("every_k_schedule", every_k_schedule, 1)
            every_k_schedule = int(every_k_schedule)
        super().__init__(opt, every_k_schedule, *args, **kwargs)
        accumulate: Callable[..., Any] = self._acc_update  # type: ignore[has-type]  # optax's running mean (or sum)
        self._acc_update = lambda grad, acc, *, n_acc: jnp.where(n_acc == 0, grad, accumulate(grad, acc, n_acc=n_acc))

    def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
        return base.with_extra_args(self)


__all__ = ["MultiSteps", "apply_if_finite", "chain", "clip", "clip_by_global_norm"]
