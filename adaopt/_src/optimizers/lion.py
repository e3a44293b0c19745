"""Lion: the sign of an interpolation between the gradient and its momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates


class LionState(NamedTuple):
    mu: Updates


def scale_by_lion(b1: Any = 0.9, b2: Any = 0.99, *, mu_dtype: Any = None) -> optax.GradientTransformation:
    r"""Lion's block: update :math:`\mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t)`, then
    :math:`m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t`."""
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_dtype("mu_dtype", mu_dtype)

    def init_fn(params: base.Params) -> LionState:
        return LionState(moments.init_like(params, mu_dtype))

    def update_fn(updates: Updates, state: LionState, params: base.Params | None = None) -> tuple[Updates, LionState]:
        del params

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, Any]:
            return moments.scalar(b1, dtype), moments.scalar(b2, dtype)

        def leaf(g: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (m32,) = moments.to_compute(g, m)
            beta1, beta2 = scalars(dtype)
            step = jnp.sign(moments.ema(g32, m32, beta1))
            m_new = moments.ema(g32, m32, beta2)
            return step.astype(g.dtype), m_new.astype(m.dtype)

        step, mu = moments.leafwise(leaf, 2, updates, state.mu)
        return step, LionState(mu)

    return optax.GradientTransformation(init_fn, update_fn)


def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: Any = 0.9,
    b2: Any = 0.99,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Lion (EvoLved Sign Momentum): every coordinate moves by exactly the learning rate.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( \mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t)
            + \lambda \theta_{t-1} \big), \qquad m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

    Args:
      learning_rate: a non-negative number or a schedule (typically 3-10x smaller than Adam's).
      b1, b2: interpolation and momentum decays in [0, 1).
      weight_decay, weight_decay_mask: decoupled decay (the paper's), as :func:`adaopt.adamw`.
      decoupled_weight_decay: False adds the decay to the gradient instead.
      mu_dtype: storage dtype of the momentum.

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    ``pytorch_optimizer.Lion(lr, betas, weight_decay)`` and ``optax.lion`` match.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_lion(b1, b2, mu_dtype=mu_dtype)
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay=decoupled_weight_decay
    )
