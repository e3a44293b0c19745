"""LaProp: the momentum of RMSProp-normalised gradients (Adam with the momentum and the normalisation swapped)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.decay import DecayForm, decoupled_decay
from adaopt._src.optimizers.adam import check_moments


class LapropState(NamedTuple):
    """State of :func:`scale_by_laprop`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the momentum of the normalised gradients times the learning rate, mirroring the parameters.
      nu: the second moment :math:`v_t`, mirroring the parameters (real for complex ones).
      lr_avg: the EMA :math:`\\bar\\eta_t` of the learning rates (with :math:`\\beta_1`), a scalar.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    lr_avg: jax.Array


def _rate(learning_rate: ScalarOrSchedule, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def scale_by_laprop(
    learning_rate: ScalarOrSchedule = 4e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-15,
    eps_root: Any = 0.0,
    *,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""LaProp's block, learning rate and sign included: the rate enters the momentum, as in the paper.

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        \bar\eta_t = \beta_1 \bar\eta_{t-1} + (1 - \beta_1) \eta_t \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, \eta_t \frac{g_t}{(\sqrt{v_t + \epsilon_{root}} + \epsilon) / \sqrt{1 - \beta_2^t}} \\
        u_t &= -\frac{\eta_t}{\bar\eta_t} m_t \quad (0 \text{ where } \bar\eta_t = 0)

    With a constant rate, :math:`\eta_t / \bar\eta_t = 1 / (1 - \beta_1^t)`, Adam's debiasing;
    under a schedule, the momentum keeps each step's own rate, and a rate of 0 freezes the
    parameters (pytorch-optimizer then steps by :math:`m_t` instead). For a complex coordinate,
    :math:`g_t^2` is :math:`|g_t|^2`.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment before its debiasing, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root before its debiasing, above) or
        ``"max"`` (the debiased root :math:`\sqrt{(v_t + \epsilon_{root}) / (1 - \beta_2^t)}`
        floored at :math:`\epsilon`, heavyball's form).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`LapropState`; its updates are
      the steps themselves (learning rate and sign applied).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_laprop(1e-3)
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(6)  # -learning_rate * sign(g), up to eps
      Array([-0.001,  0.001], dtype=float32)

    References:
      Ziyin, Wang & Ueda, "LaProp: Separating Momentum and Adaptivity in Adam",
      https://arxiv.org/abs/2002.04839.

      Reference packages: :func:`laprop` gives the arguments that reproduce pytorch-optimizer.
    """
    base.check_learning_rate(learning_rate)
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))

    def init_fn(params: base.Params) -> LapropState:
        return LapropState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            lr_avg=jnp.zeros([], moments.scalar_dtype(params)),
        )

    def update_fn(
        updates: Updates, state: LapropState, params: base.Params | None = None
    ) -> tuple[Updates, LapropState]:
        del params
        count = moments.safe_increment(state.count)
        rate = jnp.asarray(_rate(learning_rate, state.count), state.lr_avg.dtype)
        lr_avg = moments.ema(rate, state.lr_avg, moments.scalar(b1, state.lr_avg.dtype))
        step_size = moments.safe_divide(rate, lr_avg)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                jnp.sqrt(moments.bias_correction(b2, count, dtype)),
                rate.astype(dtype),
                step_size.astype(dtype),
                moments.scalar(eps, dtype),
                moments.scalar(eps_root, dtype),
            )

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, v_compute) = moments.to_compute(g, m, v)
            beta1, beta2, root_bc2, lr, size, e, e_root = scalars(dtype)
            v_new = moments.ema_sq(g_compute, v_compute, beta2)
            # (1 - b1) * lr * g / denominator, with the denominator's debiasing as a product.
            root = moments.safe_sqrt(v_new + e_root)
            if eps_mode == "add":
                scale = moments.safe_divide(root_bc2, root + e)
            else:
                scale = moments.safe_divide(1, jnp.maximum(root / root_bc2, e))
            m_new = moments.times(m_compute, beta1) + moments.times(g_compute, (1 - beta1) * lr * scale)
            step = moments.times(m_new, -size)
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v)

        step, mu, nu = moments.leafwise(leaf, 3, updates, state.mu, state.nu)
        return step, LapropState(count, mu, nu, lr_avg)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def laprop(
    learning_rate: ScalarOrSchedule = 4e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-15,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    weight_decay_mode: DecayForm = "stepped",
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""LaProp: momentum over RMSProp-normalised gradients, so that :math:`\beta_1` and :math:`\beta_2` are independent.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        \theta_t &= (\theta_{t-1} + u_t)(1 - \eta_t \lambda) \quad \text{(decoupled decay, the default)} \\
        \theta_t &= \theta_{t-1} (1 - \eta_t \lambda) + u_t \quad \text{(decoupled, weight\_decay\_mode="decoupled")}

    with :math:`u_t` the step of :func:`scale_by_laprop` (the decoupled decay acts on the
    parameters after the step, as in pytorch-optimizer).

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0 (pytorch-optimizer's is 1e-15).
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: True (the default) decays the parameters apart from the gradient;
        False adds the decay to the gradient.
      weight_decay_mode: with ``decoupled_weight_decay``, ``"stepped"`` decays the stepped
        parameters (pytorch-optimizer), ``"decoupled"`` the previous ones, as AdamW does (heavyball).
      eps_mode: ``"add"`` or ``"max"``; see :func:`scale_by_laprop`.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.laprop(1e-3)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * sign(g), up to eps
      Array([-0.001,  0.001], dtype=float32)

    References:
      Ziyin, Wang & Ueda, "LaProp: Separating Momentum and Adaptivity in Adam",
      https://arxiv.org/abs/2002.04839.

      Reference packages: ``pytorch_optimizer.LaProp(lr, betas=(b1, b2), eps, weight_decay,
      foreach=False)`` is this with ``eps_root=1e-15`` (its foreach path, taken by default for
      real parameters, computes the debiasing step size in float32). Its coupled decay
      (``weight_decouple=False``) changes the gradient after it was used, so does nothing.
      ``heavyball.LaProp(lr, betas=(b1, b2), weight_decay)`` is this with ``eps=1e-8`` (it floors
      the root there whatever its ``eps``), ``eps_mode="max"`` and
      ``weight_decay_mode="decoupled"``, at a constant rate (it takes the rate out of the momentum).
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    base.check_choice("weight_decay_mode", weight_decay_mode, ("stepped", "decoupled"))
    if weight_decay_mode != "stepped" and not decoupled_weight_decay:
        raise base.HyperparameterError(
            f"weight_decay_mode={weight_decay_mode!r} is a form of the decoupled decay: pass "
            "decoupled_weight_decay=True with it, or leave it at 'stepped'."
        )
    core = scale_by_laprop(
        learning_rate, b1, b2, eps, eps_root, eps_mode=eps_mode, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    if not decoupled_weight_decay:
        return base.assemble(core, None, weight_decay, weight_decay_mask, complex_convention=complex_convention)
    base.check_mask(weight_decay_mask)
    decay = decoupled_decay(
        learning_rate, weight_decay, weight_decay_mode, mask=weight_decay_mask, who="laprop's decoupled weight decay"
    )
    return base.assemble(core, None, after_decay=(decay,), complex_convention=complex_convention)
