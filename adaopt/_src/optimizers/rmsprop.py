"""RMSProp: steps scaled by an EMA of squared gradients, optionally centered and with momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.sgd import scale_by_momentum


class RmsState(NamedTuple):
    nu: Updates  # EMA of squared gradients
    mu: Updates | None = None  # EMA of gradients when centered, else None


def scale_by_rms(
    decay: Any = 0.99,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    centered: bool = False,
    initial_scale: Any = 0.0,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""RMSProp's block.

    .. math::
        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \;\text{(centered)}, \quad
        \text{update} = \frac{g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon}

    (:math:`\bar g_t = 0` when not centered).
    """
    base.check_decay("decay", decay)
    base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_root", eps_root)
    base.check_nonnegative("initial_scale", initial_scale)
    base.check_dtype("nu_dtype", nu_dtype)

    def init_fn(params: base.Params) -> RmsState:
        mu = moments.init_like(params, nu_dtype) if centered else None
        return RmsState(moments.init_like(params, nu_dtype, initial_scale), mu)

    def update_fn(updates: Updates, state: RmsState, params: base.Params | None = None) -> tuple[Updates, RmsState]:
        del params

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, Any, Any]:
            return moments.scalar(decay, dtype), moments.scalar(eps, dtype), moments.scalar(eps_root, dtype)

        def leaf(g: jax.Array, v: jax.Array, *m: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (v32, *m32) = moments.to_compute(g, v, *m)
            alpha, e, e_root = scalars(dtype)
            v_new = moments.ema(g32 * g32, v32, alpha)
            m_new = tuple(moments.ema(g32, x, alpha) for x in m32)
            variance = v_new - m_new[0] * m_new[0] if centered else v_new
            step = g32 * moments.inv_root(variance, e, e_root)
            return (step.astype(g.dtype), v_new.astype(v.dtype), *(x.astype(v.dtype) for x in m_new))

        trees = (state.nu, state.mu) if centered else (state.nu,)
        out = moments.leafwise(leaf, 2 + centered, updates, *trees)
        return out[0], RmsState(out[1], out[2] if centered else None)

    return optax.GradientTransformation(init_fn, update_fn)


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    decay: Any = 0.99,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    momentum: Any = 0.0,
    *,
    centered: bool = False,
    eps_root: Any = 0.0,
    initial_scale: Any = 0.0,
    nesterov: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    nu_dtype: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp, as torch defines it: optional centering, momentum on the scaled gradient.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad\text{(coupled decay)} \\
        v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2, \qquad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \;\text{(centered, else 0)} \\
        b_t &= \mu b_{t-1} + \frac{g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon}, \qquad
        \theta_t = \theta_{t-1} - \eta_t b_t

    Args:
      learning_rate: a non-negative number or a schedule.
      decay: :math:`\alpha` in [0, 1) (torch's ``alpha``).
      eps: added to the root (torch); eps_root: added inside it (optax's default placement).
      weight_decay, weight_decay_mask, decoupled_weight_decay: as :func:`adaopt.sgd`.
      momentum: :math:`\mu` in [0, 1); 0 keeps no buffer.
      centered: divide by the root of the variance rather than of the second moment.
      initial_scale: initial value of :math:`v`.
      nesterov: Nesterov momentum on the scaled gradient (optax's option).
      nu_dtype, accumulator_dtype: storage dtypes of the moments and of the momentum buffer.

    Reference: Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012; Graves,
    "Generating Sequences With Recurrent Neural Networks", 2013 (centered).
    ``torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum, centered)`` matches this with
    the same numbers; ``optax.rmsprop(lr, decay, eps=e, centered, momentum)`` matches ``eps=0,
    eps_root=e``.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_rms(decay, eps, eps_root, centered=centered, initial_scale=initial_scale, nu_dtype=nu_dtype)
    if not base.is_zero(momentum):
        core = optax.chain(core, scale_by_momentum(momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype))
    elif nesterov:
        raise base.HyperparameterError("nesterov=True requires momentum > 0, got momentum=0.")
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay=decoupled_weight_decay
    )
