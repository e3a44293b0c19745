"""AdEMAMix: Adam's step plus a slow EMA of the gradients, for gradients many thousands of steps old."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.adam import check_moments


class AdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the fast first moment :math:`m_1`, mirroring the parameters.
      nu: the second moment :math:`v`, mirroring the parameters (real for complex ones).
      mu_slow: the slow first moment :math:`m_2`, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    mu_slow: Updates


def _warmups(warmup_steps: Any, alpha_warmup_steps: Any, b3_warmup_steps: Any, b1: Any, b3: Any) -> tuple[Any, Any]:
    """The checked warmup lengths of alpha and beta3 (each its own, else ``warmup_steps``; None for none)."""
    for name, steps in (
        ("warmup_steps", warmup_steps),
        ("alpha_warmup_steps", alpha_warmup_steps),
        ("b3_warmup_steps", b3_warmup_steps),
    ):
        if steps is not None:
            base.check_scalar(name, steps, low=1.0, high=base.INT32_MAX)  # a number of steps
    alpha_steps = warmup_steps if alpha_warmup_steps is None else alpha_warmup_steps
    b3_steps = warmup_steps if b3_warmup_steps is None else b3_warmup_steps
    if b3_steps is not None:
        # beta3's warmup interpolates log(b1) and log(b3): both must be finite.
        base.check_scalar("b1 (with a warmup of b3)", b1, low=0.0, high=1.0, low_open=True, high_open=True)
        base.check_scalar("b3 (with a warmup of b3)", b3, low=0.0, high=1.0, low_open=True, high_open=True)
    return alpha_steps, b3_steps


def _log(b: Any, dtype: Any) -> Any:
    """ln(b): of a Python number in float64, then rounded (in float32, ln(0.9999) computed from 0.9999 rounded to
    float32 is off by 3e-4 of itself: the references compute it in float64), else in ``dtype``."""
    if isinstance(b, (int, float)):
        return moments.scalar(float(np.log(b)), dtype)
    return jnp.log(jnp.asarray(b, dtype))


def scale_by_ademamix(
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = 0.9999,
    alpha: Any = 5.0,
    eps: Any = 1e-8,
    *,
    warmup_steps: Any = None,
    alpha_warmup_steps: Any = None,
    b3_warmup_steps: Any = None,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdEMAMix's block: Adam's debiased fast moment plus :math:`\alpha` times a slow one, over Adam's root.

    .. math::
        m_{1,t} &= \beta_1 m_{1,t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        m_{2,t} = \beta_{3,t} m_{2,t-1} + (1 - \beta_{3,t}) g_t \\
        u_t &= \frac{m_{1,t} / (1 - \beta_1^t) + \alpha_t m_{2,t}}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    Without warmups, :math:`\alpha_t = \alpha` and :math:`\beta_{3,t} = \beta_3`; with
    :math:`T_\alpha` = ``alpha_warmup_steps`` and :math:`T_{\beta_3}` = ``b3_warmup_steps`` (each
    ``warmup_steps`` unless given), they warm up as in the paper:

    .. math::
        \alpha_t = \min(t \alpha / T_\alpha, \alpha), \qquad
        \beta_{3,t} = \min\Big(\exp\Big(\frac{\ln\beta_1 \ln\beta_3}
            {(1 - t/T_{\beta_3}) \ln\beta_3 + (t/T_{\beta_3}) \ln\beta_1}\Big), \beta_3\Big)

    (the half-life of :math:`\beta_{3,t}` grows linearly from :math:`\beta_1`'s to :math:`\beta_3`'s).
    The slow moment is not debiased. For a complex coordinate, :math:`g_t^2` is :math:`|g_t|^2`.

    Args:
      b1: :math:`\beta_1`, the decay of the fast first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      b3: :math:`\beta_3`, the decay of the slow first moment, in [0, 1).
      alpha: :math:`\alpha` >= 0, the weight of the slow moment.
      eps: :math:`\epsilon`, added to the debiased root of the second moment, >= 0.
      warmup_steps: :math:`T \ge 1`, the steps over which :math:`\alpha` and :math:`\beta_3` warm
        up (the paper's :math:`T_{\alpha,\beta_3}`), or None for none; a warmup of :math:`\beta_3`
        needs :math:`0 < \beta_1` and :math:`0 < \beta_3`.
      alpha_warmup_steps: :math:`T_\alpha \ge 1`, the steps of :math:`\alpha`'s warmup alone, in
        place of ``warmup_steps`` (the paper's code's ``alpha_warmup``, bitsandbytes' ``t_alpha``).
      b3_warmup_steps: :math:`T_{\beta_3} \ge 1`, the steps of :math:`\beta_3`'s warmup alone, in
        place of ``warmup_steps`` (``beta3_warmup``, bitsandbytes' ``t_beta3``).
      eps_mode: ``"add"`` (:math:`\epsilon` added to the debiased root) or ``"max"`` (that root
        floored at :math:`\epsilon`, heavyball's form).
      mu_dtype: storage dtype of both first moments (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdemamixState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_ademamix(alpha=5.0)
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(4)  # sign(g) * (1 + alpha * (1 - b3)), up to eps
      Array([ 1.0005, -1.0005], dtype=float32)

    References:
      Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", ICLR 2025,
      https://arxiv.org/abs/2409.03137.

      Reference packages: :func:`ademamix` gives the arguments that reproduce pytorch-optimizer.
    """
    check_moments(b1, b2, eps, 0.0, mu_dtype, nu_dtype)
    base.check_decay("b3", b3)
    base.check_nonnegative("alpha", alpha)
    alpha_steps, b3_steps = _warmups(warmup_steps, alpha_warmup_steps, b3_warmup_steps, b1, b3)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))

    def init_fn(params: base.Params) -> AdemamixState:
        return AdemamixState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            mu_slow=moments.init_like(params, mu_dtype, moment=1),
        )

    def update_fn(
        updates: Updates, state: AdemamixState, params: base.Params | None = None
    ) -> tuple[Updates, AdemamixState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            beta1, beta3, a = moments.scalar(b1, dtype), moments.scalar(b3, dtype), moments.scalar(alpha, dtype)
            if alpha_steps is not None:
                a = jnp.minimum(count.astype(dtype) / moments.scalar(alpha_steps, dtype) * a, a)
            if b3_steps is not None:
                progress = count.astype(dtype) / moments.scalar(b3_steps, dtype)
                log1, log3 = _log(b1, dtype), _log(b3, dtype)
                beta3 = jnp.minimum(jnp.exp(log1 * log3 / ((1 - progress) * log3 + progress * log1)), beta3)
            inv_root_debias2 = jnp.sqrt(moments.debias(b2, count, dtype))
            return (
                beta1,
                moments.scalar(b2, dtype),
                beta3,
                a,
                moments.debias(b1, count, dtype),
                inv_root_debias2,
                moments.scalar(eps, dtype),
            )

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array, m_slow: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, v_compute, slow_compute) = moments.to_compute(g, m, v, m_slow)
            beta1, beta2, beta3, a, debias1, inv_root_debias2, e = scalars(dtype)
            m_new = moments.ema(g_compute, m_compute, beta1)
            v_new = moments.ema_sq(g_compute, v_compute, beta2)
            slow_new = moments.ema(g_compute, slow_compute, beta3)
            numerator = moments.times(m_new, debias1) + moments.times(slow_new, a)
            denominator = moments.with_eps(moments.root(v_new) * inv_root_debias2, e, eps_mode)
            step = moments.times(numerator, moments.safe_divide(1, denominator))
            return (
                step.astype(g.dtype),
                moments.store(m_new, m),
                moments.store(v_new, v),
                moments.store(slow_new, m_slow),
            )

        step, mu, nu, mu_slow = moments.leafwise(leaf, 4, updates, state.mu, state.nu, state.mu_slow)
        return step, AdemamixState(count, mu, nu, mu_slow)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def ademamix(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = 0.9999,
    alpha: Any = 5.0,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    warmup_steps: Any = None,
    alpha_warmup_steps: Any = None,
    b3_warmup_steps: Any = None,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AdEMAMix: Adam plus a slow EMA of the gradients (:math:`\beta_3` near 1), weighted by :math:`\alpha`.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        \theta_t &= \theta_{t-1} - \eta_t \big( u_t \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \big)

    with :math:`u_t` the update of :func:`scale_by_ademamix`. The paper warms up :math:`\alpha`
    and :math:`\beta_3` over the whole run (``warmup_steps`` = the number of steps) and decays
    the weights decoupled (``decoupled_weight_decay=True``).

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the fast first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      b3: :math:`\beta_3`, the decay of the slow first moment, in [0, 1).
      alpha: :math:`\alpha` >= 0, the weight of the slow moment.
      eps: :math:`\epsilon`, added to the debiased root of the second moment, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      warmup_steps: the steps over which :math:`\alpha` and :math:`\beta_3` warm up, or None.
      alpha_warmup_steps: the steps of :math:`\alpha`'s warmup alone, in place of ``warmup_steps``.
      b3_warmup_steps: the steps of :math:`\beta_3`'s warmup alone, in place of ``warmup_steps``.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add the decay to the step instead of to the gradient.
      eps_mode: ``"add"`` or ``"max"``; see :func:`scale_by_ademamix`.
      mu_dtype: storage dtype of both first moments (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.ademamix(1e-3, warmup_steps=10_000, decoupled_weight_decay=True, weight_decay=0.1)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * (sign(g) + 0.1 * params), up to eps and alpha_1 = alpha / T
      Array([-0.0011,  0.0009], dtype=float32)

    References:
      Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", ICLR 2025,
      https://arxiv.org/abs/2409.03137.

      Reference packages: ``pytorch_optimizer.AdEMAMix(lr, betas=(b1, b2, b3), alpha, t_alpha_beta3=warmup_steps,
      eps, weight_decay, weight_decouple=decoupled_weight_decay)`` is this with the same numbers (its
      ``fixed_decay`` is not reproduced); ``bitsandbytes.optim.AdEMAMix(lr, betas=(b1, b2, b3), alpha,
      t_alpha=alpha_warmup_steps, t_beta3=b3_warmup_steps, eps, weight_decay)`` and its ``AdEMAMix8bit``
      (``mu_dtype="int8", nu_dtype="int8"``) are this with ``decoupled_weight_decay=True``.
      ``heavyball.AdEMAMix(lr, betas=(b1, b2, b3), alpha, eps, weight_decay)`` (its decay decoupled) is this with
      ``eps_mode="max"``, ``decoupled_weight_decay=True`` and no warmup; its warmups compute
      :math:`\ln(\beta + 10^{-8})`, which moves the trajectory by about 1e-7.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_ademamix(
        b1,
        b2,
        b3,
        alpha,
        eps,
        warmup_steps=warmup_steps,
        alpha_warmup_steps=alpha_warmup_steps,
        b3_warmup_steps=b3_warmup_steps,
        eps_mode=eps_mode,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
    )
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
