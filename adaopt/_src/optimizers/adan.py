"""Adan: Adam's moments plus a moment of the gradient differences (Nesterov's look-ahead without the extra gradient)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.adam import check_moments

WeightDecayMode = Literal["proximal", "decoupled"]


class AdanState(NamedTuple):
    """State of :func:`scale_by_adan`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the first moment :math:`m_t` of the gradients, mirroring the parameters.
      mu_diff: the moment :math:`n_t` of the gradient differences, mirroring the parameters.
      nu: the second moment :math:`v_t` of the look-ahead gradients, mirroring the parameters
        (real for complex ones).
      prev_grad: the previous gradient :math:`g_{t-1}`, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    mu_diff: Updates
    nu: Updates
    prev_grad: Updates


def scale_by_adan(
    b1: Any = 0.98,
    b2: Any = 0.92,
    b3: Any = 0.99,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    diff_weight: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adan's block: debiased moments of the gradients and of their differences over the root of a look-ahead moment.

    .. math::
        \Delta_t &= g_t - g_{t-1} \quad (\Delta_1 = 0) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        n_t = \beta_2 n_{t-1} + (1 - \beta_2) \Delta_t \\
        v_t &= \beta_3 v_{t-1} + (1 - \beta_3) (g_t + w \Delta_t)^2 \\
        u_t &= \frac{m_t / (1 - \beta_1^t) + w\, n_t / (1 - \beta_2^t)}
            {\sqrt{v_t / (1 - \beta_3^t) + \epsilon_{root}} + \epsilon}

    with :math:`w = \beta_2` (the paper's :math:`1 - \beta_2` in its notation, where each
    :math:`\beta` is one minus this one) unless ``diff_weight`` sets it. The first step has no
    previous gradient: its difference is 0, as in the paper and both reference packages. For a
    complex coordinate, the square is :math:`|\cdot|^2`.

    Args:
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the moment of the differences, in [0, 1).
      b3: :math:`\beta_3`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the debiased root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      diff_weight: :math:`w` >= 0, the weight of the gradient difference in the look-ahead and
        in the step; None: :math:`\beta_2` (the paper's). ``optax.adan`` uses :math:`1 - \beta_2`.
      mu_dtype: storage dtype of the two first moments and of the previous gradient (default:
        the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdanState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adan()
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(4)  # no difference yet: Adam's first step, sign(g) up to eps
      Array([ 1., -1.], dtype=float32)

    References:
      Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
      Optimizing Deep Models", IEEE TPAMI 2024, https://arxiv.org/abs/2208.06677.

      Reference packages: :func:`adan` gives the arguments that reproduce pytorch-optimizer and optax.
    """
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    base.check_decay("b3", b3)
    if diff_weight is not None:
        base.check_nonnegative("diff_weight", diff_weight)
    weight = b2 if diff_weight is None else diff_weight

    def init_fn(params: base.Params) -> AdanState:
        return AdanState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            mu_diff=moments.init_like(params, mu_dtype, moment=1),
            nu=moments.init_like(params, nu_dtype, real=True),
            prev_grad=moments.init_like(params, mu_dtype, moment=2),
        )

    def update_fn(updates: Updates, state: AdanState, params: base.Params | None = None) -> tuple[Updates, AdanState]:
        del params
        first = state.count == 0
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                moments.scalar(b3, dtype),
                moments.scalar(weight, dtype),
                moments.debias(b1, count, dtype),
                moments.scalar(weight, dtype) * moments.debias(b2, count, dtype),
                moments.debias(b3, count, dtype),
                moments.scalar(eps, dtype),
                moments.scalar(eps_root, dtype),
            )

        def leaf(g: jax.Array, m: jax.Array, n: jax.Array, v: jax.Array, prev: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, n_compute, v_compute, prev_compute) = moments.to_compute(g, m, n, v, prev)
            beta1, beta2, beta3, w, debias1, w_debias2, debias3, e, e_root = scalars(dtype)
            diff = jnp.where(first, jnp.zeros_like(g_compute), g_compute - prev_compute)
            m_new = moments.ema(g_compute, m_compute, beta1)
            n_new = moments.ema(diff, n_compute, beta2)
            v_new = moments.ema_sq(g_compute + moments.times(diff, w), v_compute, beta3)
            numerator = moments.times(m_new, debias1) + moments.times(n_new, w_debias2)
            step = moments.times(numerator, moments.inv_root(v_new * debias3, e, e_root))
            return (
                step.astype(g.dtype),
                moments.store(m_new, m),
                moments.store(n_new, n),
                moments.store(v_new, v),
                moments.store(g_compute, prev),
            )

        step, mu, mu_diff, nu, prev_grad = moments.leafwise(
            leaf, 5, updates, state.mu, state.mu_diff, state.nu, state.prev_grad
        )
        return step, AdanState(count, mu, mu_diff, nu, prev_grad)

    return optax.GradientTransformation(init_fn, update_fn)


def _clip_by_global_norm(max_norm: Any, eps: Any) -> optax.GradientTransformation:
    r"""``g * min(1, max_norm / (||g|| + eps))`` over the whole tree (pytorch-optimizer's Adan clip: eps in the denominator)."""

    def update_fn(updates: Updates, state: Any, params: base.Params | None = None) -> tuple[Updates, Any]:
        del params
        dtype = moments.scalar_dtype(updates)
        total = numerics.norm(updates, dtype)
        factor = jnp.minimum(moments.scalar(max_norm, dtype) / (total + moments.scalar(eps, dtype)), 1)
        return jax.tree.map(lambda g: moments.scale_leaf(factor, g), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class ProximalDecayState(NamedTuple):
    """State of Adan's proximal weight decay: the step count, for a schedule of the learning rate."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _proximal_decay(learning_rate: ScalarOrSchedule, weight_decay: Any) -> optax.GradientTransformation:
    r"""The proximal step of the decay after the step :math:`u`: :math:`\theta + u \to (\theta + u) / (1 + \eta_t \lambda)`.

    As an update: :math:`(u - \eta_t \lambda \theta) / (1 + \eta_t \lambda)`.
    """

    def init_fn(params: base.Params) -> ProximalDecayState:
        del params
        return ProximalDecayState(moments.zero_count())

    def update_fn(
        updates: Updates, state: ProximalDecayState, params: base.Params | None = None
    ) -> tuple[Updates, ProximalDecayState]:
        count = moments.safe_increment(state.count)
        if base.is_zero(weight_decay):
            return updates, ProximalDecayState(count)
        params = base.require_params(params, "adan's proximal weight decay")
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = moments.compute_dtype(u.dtype)
            shrink = jnp.asarray(rate, dtype) * moments.scalar(weight_decay, dtype)
            u_compute = moments.in_precision(u, dtype)
            decayed = u_compute - moments.times(moments.in_precision(p, dtype), shrink)
            return moments.over(decayed, 1 + shrink).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), ProximalDecayState(count)

    return optax.GradientTransformation(init_fn, update_fn)


def adan(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.98,
    b2: Any = 0.92,
    b3: Any = 0.99,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    eps_root: Any = 0.0,
    diff_weight: Any = None,
    max_grad_norm: Any = None,
    weight_decay_mask: base.MaskOrFn | None = None,
    weight_decay_mode: WeightDecayMode = "proximal",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Adan: adaptive Nesterov momentum, from the moments of the gradients and of their differences.

    .. math::
        g_t &\leftarrow g_t \min\Big(1, \frac{c}{\|g_t\| + \epsilon}\Big) \quad
            \text{(with max\_grad\_norm } c\text{; the norm of the whole tree)} \\
        \theta_t &= \frac{\theta_{t-1} - \eta_t u_t}{1 + \eta_t \lambda} \quad \text{("proximal", the default)}
            \qquad \text{or} \qquad
        \theta_t = \theta_{t-1} - \eta_t (u_t + \lambda \theta_{t-1}) \quad \text{("decoupled")}

    with :math:`u_t` the update of :func:`scale_by_adan`.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1) (the paper's 0.98).
      b2: :math:`\beta_2`, the decay of the moment of the differences, in [0, 1) (0.92).
      b3: :math:`\beta_3`, the decay of the second moment, in [0, 1) (0.99).
      eps: :math:`\epsilon`, added to the debiased root of the second moment (and to the
        gradient norm of the clip), >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      diff_weight: the weight of the gradient difference, >= 0; None: ``b2`` (see :func:`scale_by_adan`).
      max_grad_norm: :math:`c > 0`, clip the gradients to this global norm first; None: no clip.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      weight_decay_mode: ``"proximal"`` (the paper's proximal step, dividing the stepped
        parameters) or ``"decoupled"`` (AdamW's, multiplying the parameters by
        :math:`1 - \eta_t\lambda` before the step).
      mu_dtype: storage dtype of the first moments and the previous gradient (default: the
        parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|\cdot|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adan(1e-3, weight_decay=0.5)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), opt.init(params), params)
      >>> updates.round(6)  # (1 - 0.001 sign(g)) / (1 + 0.001 * 0.5) - 1
      Array([-0.001499,  0.0005  ], dtype=float32)

    References:
      Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
      Optimizing Deep Models", IEEE TPAMI 2024, https://arxiv.org/abs/2208.06677.

      Reference packages: ``pytorch_optimizer.Adan(lr, betas=(b1, b2, b3), eps, weight_decay,
      weight_decouple, max_grad_norm)`` is this with the same numbers,
      ``weight_decay_mode="proximal"`` for its default ``weight_decouple=False`` and
      ``"decoupled"`` for ``True``; ``max_grad_norm=0`` there is None here. Its clip sums the
      squared norms in float32 (then the clipped trajectory agrees to float32's precision).
      Its ``adanorm``, ``adanorm_r`` and ``use_gc`` options are not reproduced. ``optax.adan(lr,
      b1, b2, b3, eps, eps_root, weight_decay)`` weighs the difference by :math:`1 - \beta_2`
      where the paper (in optax's convention for :math:`\beta_2`) has :math:`\beta_2`: it is this
      with ``diff_weight=1 - b2``, ``weight_decay_mode="decoupled"`` and its ``eps_root=1e-8``
      (its docstring's proximal step is not what it computes).
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    base.check_choice("weight_decay_mode", weight_decay_mode, ("proximal", "decoupled"))
    if max_grad_norm is not None:
        base.check_scalar("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
    core = scale_by_adan(b1, b2, b3, eps, eps_root, diff_weight=diff_weight, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    if max_grad_norm is not None:
        core = optax.chain(_clip_by_global_norm(max_grad_norm, eps), core)
    if weight_decay_mode == "decoupled":
        return base.assemble(
            core,
            learning_rate,
            weight_decay,
            weight_decay_mask,
            decoupled_weight_decay=True,
            complex_convention=complex_convention,
        )
    base.check_mask(weight_decay_mask)
    decay = _proximal_decay(learning_rate, weight_decay)
    masked = decay if weight_decay_mask is None else base.masked(decay, weight_decay_mask)
    stepped = optax.chain(core, base.scale_by_learning_rate(learning_rate))
    return base.assemble(stepped, None, after_decay=(masked,), complex_convention=complex_convention)
