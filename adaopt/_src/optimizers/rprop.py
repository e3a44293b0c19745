"""Rprop: a step size per coordinate, grown while its gradient keeps its sign and shrunk when the sign flips."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.decay import decoupled_decay


class RpropState(NamedTuple):
    """State of :func:`scale_by_rprop`.

    Attributes:
      count: the number of updates so far, a saturating int32 (for a schedule of the learning rate).
      factors: each coordinate's step size over the learning rate, :math:`f_t`, mirroring the parameters.
      prev: the previous gradient, zero where its sign flipped, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    factors: Updates
    prev: Updates


def _check_rprop(eta_minus: Any, eta_plus: Any, min_step_size: Any, max_step_size: Any) -> None:
    base.check_scalar("eta_minus", eta_minus, low=0.0, high=1.0, low_open=True, high_open=True)
    base.check_scalar("eta_plus", eta_plus, low=1.0, low_open=True)
    base.check_nonnegative("min_step_size", min_step_size)
    base.check_scalar("max_step_size", max_step_size, low=0.0, low_open=True)
    if all(isinstance(x, (int, float)) for x in (min_step_size, max_step_size)) and min_step_size > max_step_size:
        raise base.HyperparameterError(
            f"min_step_size ({min_step_size}) must not exceed max_step_size ({max_step_size})."
        )


def scale_by_rprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    eta_minus: Any = 0.5,
    eta_plus: Any = 1.2,
    min_step_size: Any = 1e-6,
    max_step_size: Any = 50.0,
) -> optax.GradientTransformation:
    r"""Rprop's block, learning rate and sign included: each coordinate moves by its own step size.

    With :math:`p_t = g_t \, \tilde g_{t-1}` (:math:`\tilde g_0 = 0`):

    .. math::
        f_t &= \mathrm{clip}\big(f_{t-1} \cdot \{\eta_+ \text{ if } p_t > 0;\;
            \eta_- \text{ if } p_t < 0;\; 1 \text{ otherwise}\},\;
            s_{\min} / \eta_t,\; s_{\max} / \eta_t\big), \qquad f_0 = 1 \\
        \tilde g_t &= 0 \text{ where } p_t < 0, \text{ else } g_t, \qquad
        u_t = -\eta_t f_t \,\mathrm{sign}(\tilde g_t)

    so each coordinate's step size :math:`\eta_t f_t` starts at the learning rate and stays in
    :math:`[s_{\min}, s_{\max}]`; after a sign flip the coordinate rests one step. Only the signs
    of the gradients matter, so Rprop wants the same (full-batch) objective at every step. With a
    constant learning rate this is torch's and optax's Rprop, whose learning rate is the initial
    step size; a schedule scales every coordinate's step size over time. A NaN gradient gives a
    NaN update and leaves the step sizes as they were.

    Args:
      learning_rate: :math:`\eta_t`, the initial step size, a non-negative number or a schedule
        ``count -> value``; a rate of 0 moves nothing (it scales every step size).
      eta_minus: :math:`\eta_-`, the factor of a step size whose gradient flipped sign, in (0, 1).
      eta_plus: :math:`\eta_+`, the factor of one whose gradient kept its sign, > 1.
      min_step_size: :math:`s_{\min} \ge 0`, the smallest step size.
      max_step_size: :math:`s_{\max} > 0`, the largest.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`RpropState`; its updates are the
      steps themselves (learning rate and sign applied).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_rprop(0.1)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, 1.0], [1.0, -1.0], [1.0, -1.0]):
      ...     updates, state = tx.update(jnp.array(g), state)
      >>> updates.round(4)  # 0.1 * 1.2 * 1.2 on the first; 0.1 * 0.5 on the second, after a rest
      Array([-0.144, 0.05 ], dtype=float32)

    References:
      Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP
      Algorithm", ICNN 1993, https://doi.org/10.1109/ICNN.1993.298623.

      Reference packages: :func:`rprop` gives the arguments that reproduce torch and optax.
    """
    base.check_learning_rate(learning_rate)
    _check_rprop(eta_minus, eta_plus, min_step_size, max_step_size)

    def init_fn(params: base.Params) -> RpropState:
        return RpropState(moments.zero_count(), moments.init_like(params, fill=1.0), moments.init_like(params))

    def update_fn(updates: Updates, state: RpropState, params: base.Params | None = None) -> tuple[Updates, RpropState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            rate = numerics.learning_rate_at(learning_rate, state.count, dtype)
            # A rate of 0 moves nothing: its bounds are then those of a rate of 1, never used.
            scale = jnp.where(rate > 0, rate, 1)
            low, high = moments.scalar(min_step_size, dtype) / scale, moments.scalar(max_step_size, dtype) / scale
            return rate, moments.scalar(eta_minus, dtype), moments.scalar(eta_plus, dtype), low, high

        def leaf(g: jax.Array, f: jax.Array, prev: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (f_compute, prev_compute) = moments.to_compute(g, f, prev)
            rate, minus, plus, low, high = scalars(dtype)
            # The signs' product: the values' own flushes to 0 on XLA:CPU where it is subnormal (|g| below 1e-19
            # in float32), and the factors would then never adapt.
            product = jnp.sign(g_compute) * jnp.sign(prev_compute)
            factor = jnp.where(product > 0, plus, jnp.where(product < 0, minus, jnp.ones([], dtype)))
            f_new = jnp.clip(f_compute * factor, low, high)  # a NaN product compares false: factor 1
            kept = jnp.where(product < 0, jnp.zeros_like(g_compute), g_compute)
            step = -(rate * f_new) * jnp.sign(kept)
            return step.astype(g.dtype), moments.store(f_new, f), moments.store(kept, prev)

        step, factors, prev = moments.leafwise(leaf, 3, updates, state.factors, state.prev)
        return step, RpropState(count, factors, prev)

    return optax.GradientTransformation(init_fn, update_fn)


def rprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    eta_minus: Any = 0.5,
    eta_plus: Any = 1.2,
    min_step_size: Any = 1e-6,
    max_step_size: Any = 50.0,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rprop (resilient backpropagation): per-coordinate step sizes adapted by the signs of successive gradients.

    Each coordinate moves by its own step size in the direction opposite its gradient's sign; the
    step size grows by :math:`\eta_+` while the gradient keeps its sign and shrinks by
    :math:`\eta_-` when it flips (see :func:`scale_by_rprop`). The magnitudes of the gradients are
    ignored, which makes it robust to their scale and suited to full-batch training. Complex
    parameters are two real coordinates each (torch's convention).

    Args:
      learning_rate: the initial step size (torch's ``lr``), a non-negative number or a schedule that
        scales every coordinate's step size over time; 0 moves nothing (torch's ``lr=0`` is an
        initial step size its first step clamps up to ``min_step_size``, and moves).
      eta_minus: the factor of a step size whose gradient flipped sign, in (0, 1).
      eta_plus: the factor of one whose gradient kept its sign, > 1.
      min_step_size: the smallest step size, >= 0.
      max_step_size: the largest step size, > 0.
      weight_decay: :math:`\lambda` >= 0 of a decoupled decay, :math:`\theta \leftarrow \theta - \eta_t
        \lambda \theta` beside the step (torch's Rprop has none; an L2 term in the gradient would
        act only through its sign).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.rprop(0.1)
      >>> params = jnp.array([3.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(60):  # the gradient of |params|^2: full batch, as Rprop wants
      ...     updates, state = opt.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.max(jnp.abs(params)) < 1e-3)
      True

    References:
      Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP
      Algorithm", ICNN 1993, https://doi.org/10.1109/ICNN.1993.298623.

      Reference packages: ``torch.optim.Rprop(lr, etas=(eta_minus, eta_plus),
      step_sizes=(min_step_size, max_step_size))`` is this with the same numbers, at a constant
      positive learning rate (torch reads it once, as the initial step size). ``optax.rprop`` (0.2.8)
      differs: each call returns the previous call's step (zero at the first call, and zero
      where the sign flips), one call late.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_mask(weight_decay_mask)
    core = scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size)
    decay = decoupled_decay(learning_rate, weight_decay, mask=weight_decay_mask, who="rprop's weight decay")
    return base.assemble(core, None, after_decay=(decay,), complex_convention="real_imag")
