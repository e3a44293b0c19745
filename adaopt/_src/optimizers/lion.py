"""Lion: the sign of an interpolation between the gradient and its momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.layouts import cpu_kernels


class LionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Attributes:
      mu: the momentum :math:`m_t`, mirroring the parameters.
    """

    mu: Updates


def scale_by_lion(b1: Any = 0.9, b2: Any = 0.99, *, mu_dtype: Any = None) -> optax.GradientTransformation:
    r"""Lion's block: the sign of an interpolation between the gradient and its momentum.

    .. math::
        \text{update} = \mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t), \qquad
        m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

    Args:
      b1: :math:`\beta_1`, the interpolation of the update, in [0, 1).
      b2: :math:`\beta_2`, the decay of the momentum, in [0, 1).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`LionState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_lion()
      >>> g = jnp.array([0.5, -2.0, 0.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates
      Array([ 1., -1.,  0.], dtype=float32)

    References:
      Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of
      Optimization Algorithms", NeurIPS 2023, https://arxiv.org/abs/2302.06675.

      Reference packages: :func:`lion` gives the arguments that reproduce pytorch-optimizer and optax.
    """
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    moments.check_storage("mu_dtype", mu_dtype)

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
            return step.astype(g.dtype), moments.store(m_new, m)

        def native(g: jax.Array, m: Any) -> tuple[Any, ...] | None:
            """The leaf's step by adaopt's CPU kernel where it applies (a quantized moment), else None."""
            if not cpu_kernels.lion_kernel_applies(g, m):
                return None
            beta1, beta2 = scalars(jnp.float32)
            return cpu_kernels.lion_step(g, m, b1=beta1, b2=beta2)

        leaf.native = native  # type: ignore[attr-defined]  # read by storage.step_leaf
        step, mu = moments.leafwise(leaf, 2, updates, state.mu)
        return step, LionState(mu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: Any = 0.9,
    b2: Any = 0.99,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Lion (EvoLved Sign Momentum): every coordinate moves by exactly the learning rate.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( \mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t)
            + \lambda \theta_{t-1} \big), \qquad m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

    Args:
      learning_rate: a non-negative number or a schedule (typically 3-10x smaller than Adam's).
      b1: :math:`\beta_1`, the interpolation of the update, in [0, 1).
      b2: :math:`\beta_2`, the decay of the momentum, in [0, 1).
      weight_decay: coefficient :math:`\lambda` >= 0 of the decoupled decay (the paper's).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: True (the default) adds :math:`\lambda\theta` to the step; False
        adds it to the gradient instead.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (the sign of a complex
        coordinate is its phase :math:`g / |g|`, as optax) or ``"real_imag"`` (the sign of each
        real and imaginary part); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.lion(1e-4)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), opt.init(params), params)
      >>> updates  # -learning_rate * sign(...)
      Array([-0.0001,  0.0001], dtype=float32)

    References:
      Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of
      Optimization Algorithms", NeurIPS 2023, https://arxiv.org/abs/2302.06675.

      Reference packages: ``pytorch_optimizer.Lion(lr, betas=(b1, b2), weight_decay,
      weight_decouple=decoupled_weight_decay)`` and ``optax.lion`` are this with the same numbers;
      pytorch-optimizer's ``fixed_decay`` (a decay not scaled by the learning rate) is not reproduced.
    """
    base.check_complex_convention(complex_convention)
    base.check_common(learning_rate, weight_decay)
    core = scale_by_lion(b1, b2, mu_dtype=mu_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
