"""Stochastic Polyak step sizes (SPS, SPS-max): the step that would reach the known minimum of a linear model of the loss."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates

Variant = Literal["sps", "sps+"]


class PolyakState(NamedTuple):
    r"""State of :func:`scale_by_polyak`: the Polyak step size of the last update (telemetry only).

    Attributes:
      step_size: :math:`\gamma_t` of the last update (0 before the first), in the parameters'
        widest float dtype, at least float32.
    """

    step_size: jax.Array

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"step_size": self.step_size}


def _check_polyak(c: Any, f_min: Any, max_learning_rate: Any, eps: Any, variant: Any) -> None:
    base.check_scalar("c", c, low=0.0, low_open=True)
    base.check_scalar("f_min", f_min)
    if max_learning_rate is not None:
        base.check_nonnegative("max_learning_rate", max_learning_rate)
    base.check_nonnegative("eps", eps)
    base.check_choice("variant", variant, ("sps", "sps+"))


def scale_by_polyak(
    c: Any = 0.5,
    f_min: Any = 0.0,
    max_learning_rate: Any = None,
    eps: Any = 0.0,
    *,
    variant: Variant = "sps",
) -> optax.GradientTransformationExtraArgs:
    r"""Scale the gradient by the stochastic Polyak step size; ``update`` needs ``value=`` (the loss).

    .. math::
        \Delta_t &= f_t - f^\star \quad\text{or}\quad \max(f_t - f^\star, 0) \;\text{("sps+")} \\
        \gamma_t &= \min\Big(\frac{\Delta_t}{c\,\|g_t\|^2 + \epsilon},\ \gamma_{\max}\Big)
            \quad (0 \text{ where the denominator is } 0) \\
        \text{update}_t &= \gamma_t\, g_t

    with :math:`f_t` the loss at the current parameters (of the same batch as :math:`g_t`),
    :math:`\|g_t\|^2` summed over all leaves in the state's dtype (the parameters' widest float,
    at least float32), and no cap when ``max_learning_rate`` is None. A loss of NaN or
    :math:`-\infty` (or :math:`+\infty` without a cap) gives :math:`\gamma_t = 0`, no step: one
    such loss made the parameters NaN for good.

    Args:
      c: :math:`c > 0` (the paper's theory and experiments on convex problems: 1/2).
      f_min: :math:`f^\star`, a lower bound of the loss (0 for non-negative losses that
        interpolate the data).
      max_learning_rate: :math:`\gamma_{\max} \ge 0` (SPS-max), or None (SPS).
      eps: :math:`\epsilon \ge 0`, added to the denominator.
      variant: "sps", or "sps+" to clip a negative gap (a loss below ``f_min``) at 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`PolyakState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_polyak(c=0.5)
      >>> g = jnp.array([2.0, -4.0])  # the gradient of |x|^2 at x = (1, -2), where the loss is 5
      >>> updates, state = tx.update(g, tx.init(g), value=5.0)
      >>> state.step_size, updates  # 5 / (0.5 * 20) = 0.5
      (Array(0.5, dtype=float32), Array([ 1., -2.], dtype=float32))

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, "Stochastic Polyak Step-size for SGD: An
      Adaptive Learning Rate for Fast Convergence", AISTATS 2021, https://arxiv.org/abs/2002.10542
      (SPS and SPS-max).

      Garrigos, Gower & Schaipp, "Function Value Learning: Adaptive Learning Rates Based on the
      Polyak Stepsize and Function Splitting in ERM", 2023, https://arxiv.org/abs/2307.14528
      ("sps+").

      Reference packages: :func:`polyak_sgd` gives the arguments that reproduce
      ``optax.polyak_sgd`` and the authors' torch ``Sps``.
    """
    _check_polyak(c, f_min, max_learning_rate, eps, variant)

    def init_fn(params: base.Params) -> PolyakState:
        return PolyakState(jnp.zeros([], moments.scalar_dtype(params)))

    def update_fn(
        updates: Updates,
        state: PolyakState,
        params: base.Params | None = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[Updates, PolyakState]:
        del params, extra_args
        dtype = state.step_size.dtype
        f = base.loss_value(value, dtype, "polyak_sgd")
        grad_sq_norm = numerics.sum_of_squares(updates, dtype)
        gap = f - moments.scalar(f_min, dtype)
        if variant == "sps+":
            gap = jnp.maximum(gap, 0)
        denominator = moments.scalar(c, dtype) * grad_sq_norm + moments.scalar(eps, dtype)
        step_size = moments.safe_divide(gap, denominator).astype(dtype)
        if max_learning_rate is not None:
            step_size = jnp.minimum(step_size, moments.scalar(max_learning_rate, dtype))
        step_size = jnp.where(jnp.isfinite(step_size), step_size, 0)  # a NaN or infinite loss: no step
        return jax.tree.map(lambda g: moments.scale_leaf(step_size, g), updates), PolyakState(step_size)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def polyak_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    c: Any = 0.5,
    f_min: Any = 0.0,
    max_learning_rate: Any = 1.0,
    eps: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    variant: Variant = "sps",
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with the stochastic Polyak step size: SPS-max, or SPS with ``max_learning_rate=None``.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        \gamma_t &= \min\Big(\frac{f_t - f^\star}{c\,\|g_t\|^2 + \epsilon},\ \gamma_{\max}\Big), \qquad
        \theta_t = \theta_{t-1} - \eta_t\, \gamma_t\, g_t

    (:func:`scale_by_polyak`, then the learning rate :math:`\eta_t`). Pass the loss of the
    batch the gradient comes from: ``update(grads, state, params, value=loss)``. The Polyak step
    is exact for the loss passed: with ``weight_decay``, include
    :math:`\tfrac{\lambda}{2}\|\theta\|^2` in it (and in ``f_min``), or put the regularization
    into the loss and leave ``weight_decay`` at 0.

    Args:
      learning_rate: :math:`\eta_t`, a factor on the Polyak step (1: the paper's method), or a
        schedule ``count -> value`` (e.g. a decaying one for losses that do not interpolate).
      c: :math:`c > 0`; 1/2 is the paper's choice for convex problems (the authors' code default).
      f_min: :math:`f^\star`, a lower bound of the loss; 0 (the default) suits non-negative
        losses of models that interpolate the data. Too high a value stalls, too low a value
        overshoots: on problems that do not interpolate, use the minimum if it is known, or
        SPS-max with a decaying learning rate.
      max_learning_rate: :math:`\gamma_{\max} \ge 0` (SPS-max; 1 as in optax), or None (SPS, uncapped:
        with a loss that does not reach ``f_min``, the step grows without bound as the gradient
        vanishes near the minimum).
      eps: added to the denominator, >= 0.
      weight_decay: coupled (L2) decay coefficient :math:`\lambda` >= 0, added to the gradient.
      variant: "sps" or "sps+" (clip a loss below ``f_min`` to a zero step).
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``value=``.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> f = lambda x: jnp.sum(x**2)  # minimum 0: one Polyak step with c = 1/2 solves it
      >>> opt = adaopt.polyak_sgd()
      >>> x = jnp.array([1.0, -2.0])
      >>> loss, grad = jax.value_and_grad(f)(x)
      >>> updates, state = opt.update(grad, opt.init(x), x, value=loss)
      >>> x + updates
      Array([0., 0.], dtype=float32)

    References:
      Loizou, Vaswani, Laradji & Lacoste-Julien, "Stochastic Polyak Step-size for SGD: An
      Adaptive Learning Rate for Fast Convergence", AISTATS 2021, https://arxiv.org/abs/2002.10542
      (SPS and SPS-max).

      Garrigos, Gower & Schaipp, "Function Value Learning: Adaptive Learning Rates Based on the
      Polyak Stepsize and Function Splitting in ERM", 2023, https://arxiv.org/abs/2307.14528
      ("sps+").

      Reference packages: ``optax.polyak_sgd(max_learning_rate=M, scaling=s, f_min, eps=e,
      variant)`` with a constant ``s`` is this with ``learning_rate=1, c=s, max_learning_rate=s * M,
      eps=e / s`` and the same ``f_min``, ``variant``: optax applies ``scaling`` to the gradient
      before it measures its norm, so its step is :math:`\min(\Delta / (s\|g\|^2 + e/s), sM)\, g`,
      not the :math:`s \min(\Delta / (\|g\|^2 + e), M)\, g` its docstring states (the two agree for
      ``s = 1``); and it gives a zero step when :math:`s^2\|g\|^2 + e` is at most float64's machine
      epsilon, where this takes the step unless the denominator is exactly 0. The authors' torch
      ``Sps(c, eta_max, adapt_flag="constant", eps)`` (https://github.com/IssamLaradji/sps) is this
      with ``variant="sps+"``, ``max_learning_rate=eta_max`` and the same ``c``, ``eps``, except that
      it takes no step when :math:`\|g\| < 10^{-8}`.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_polyak(c, f_min, max_learning_rate, eps, variant=variant)
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, complex_convention="modulus"
    )  # norms and real inner products of a step linear in the gradient: both conventions agree
