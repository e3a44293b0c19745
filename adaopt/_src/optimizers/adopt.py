"""ADOPT: Adam whose step divides the gradient by the second moment of the steps before it."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.decay import decoupled_decay
from adaopt._src.optimizers.adam import check_moments

ClipCount = Literal["update", "call"]


class AdoptState(NamedTuple):
    """State of :func:`scale_by_adopt`.

    Attributes:
      count: the number of calls to ``update`` so far (the first one only initialises
        :math:`v`), a saturating int32.
      mu: the momentum of the normalised gradients :math:`m_t`, mirroring the parameters.
      nu: the second moment :math:`v_t`, mirroring the parameters (real for complex ones).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates


def _clip(x: jax.Array, bound: jax.Array) -> jax.Array:
    """``x`` clipped to ``[-bound, bound]``; a complex coordinate keeps its phase and has its modulus clipped."""
    if not is_complex(x):
        return jnp.clip(x, -bound, bound)
    # bound >= 1 here, so the divisor is never 0; the factor is exactly 1 inside the bound.
    return moments.times(x, bound / jnp.maximum(jnp.abs(x), bound))


@base.check_flags
def scale_by_adopt(
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    *,
    clip_exponent: Any = 0.25,
    clip_count: ClipCount = "update",
    debias: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""ADOPT's block: normalise by the previous second moment, clip, then take the momentum.

    The first call only initialises :math:`v_0 = g_0^2` and returns a zero update; from the
    second call on (:math:`t = 1, 2, \dots`, the updates that move the parameters):

    .. math::
        \tilde g_t &= \mathrm{clip}\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\; c_t\Big), \qquad
        c_t = t^{p} \;\; \text{("update")} \quad\text{or}\quad (t + 1)^{p} \;\; \text{("call")} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \tilde g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad u_t = m_t

    with :math:`p` the ``clip_exponent``. With ``debias``, both averages are debiased as they go
    (heavyball's form): :math:`m_t = m_{t-1} + w_1 (\tilde g_t - m_{t-1})`,
    :math:`w_1 = (1 - \beta_1) / (1 - \beta_1^t)`, and :math:`v_t = v_{t-1} + w_2 (g_t^2 - v_{t-1})`,
    :math:`w_2 = (1 - \beta_2) / (1 - \beta_2^{t+1})` (:math:`v` averages the :math:`t + 1`
    gradients so far, the first one's included). For a complex coordinate, :math:`g_t^2` is
    :math:`|g_t|^2` and the clip bounds the modulus (the phase is kept).

    Args:
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, the floor of :math:`\sqrt{v_{t-1}}`, >= 0.
      clip_exponent: :math:`p` >= 0 of the clip bound, or None for no clipping.
      clip_count: the step count the bound is evaluated at: ``"update"`` counts the updates that
        move the parameters (the paper's :math:`t`, torch-adopt's), ``"call"`` every call
        including the first (pytorch-optimizer's, one step later).
      debias: keep both averages debiased (heavyball's ADOPT), as above.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdoptState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adopt()
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
      >>> updates  # the first call only initialises the second moment
      Array([0., 0.], dtype=float32)
      >>> updates, state = tx.update(jnp.array([0.25, -4.0]), state)
      >>> updates  # (1 - b1) * clip(g / |g_0|, 1): 0.1 * 0.5, then 0.1 * clip(-2, 1)
      Array([ 0.05, -0.1 ], dtype=float32)

    References:
      Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo,
      "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate", NeurIPS 2024,
      https://arxiv.org/abs/2411.02853.

      Reference packages: :func:`adopt` gives the arguments that reproduce torch-adopt and
      pytorch-optimizer.
    """
    check_moments(b1, b2, eps, 0.0, mu_dtype, nu_dtype)
    if clip_exponent is not None:
        base.check_nonnegative("clip_exponent", clip_exponent)
    base.check_choice("clip_count", clip_count, ("update", "call"))

    def init_fn(params: base.Params) -> AdoptState:
        return AdoptState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
        )

    def update_fn(updates: Updates, state: AdoptState, params: base.Params | None = None) -> tuple[Updates, AdoptState]:
        del params
        first = state.count == 0
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            t = count - 1 if clip_count == "update" else count
            # The first call's bound is never used: t >= 1 keeps it finite.
            bound = (
                None
                if clip_exponent is None
                else jnp.maximum(t, 1).astype(dtype) ** moments.scalar(clip_exponent, dtype)
            )
            beta1, beta2 = moments.scalar(b1, dtype), moments.scalar(b2, dtype)
            if debias:  # the averages' weights; the first call's (1 / 0 for m) is never used: s >= 1 keeps it finite
                s = jnp.maximum(count - 1, 1)
                w1 = (1 - beta1) / moments.bias_correction(b1, s, dtype)
                w2 = (1 - beta2) / moments.bias_correction(b2, count, dtype)
            else:
                w1, w2 = 1 - beta1, 1 - beta2
            return beta1, beta2, w1, w2, moments.scalar(eps, dtype), bound

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, v_compute) = moments.to_compute(g, m, v)
            beta1, beta2, w1, w2, e, bound = scalars(dtype)
            g2 = moments.abs_sq(g_compute)
            normed = moments.times(g_compute, moments.safe_divide(1, jnp.maximum(moments.root(v_compute), e)))
            if bound is not None:
                normed = _clip(normed, bound)
            if debias:
                m_later, v_later = m_compute + w1 * (normed - m_compute), v_compute + w2 * (g2 - v_compute)
            else:
                # Weighted before the square, as torch-adopt's addcmul: finite where the square overflows (1e19).
                m_later, v_later = moments.ema(normed, m_compute, beta1), moments.ema_sq(g_compute, v_compute, beta2)
            m_new = jnp.where(first, m_compute, m_later)
            v_new = jnp.where(first, g2, v_later)
            step = jnp.where(first, jnp.zeros_like(m_new), m_new)
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v)

        step, mu, nu = moments.leafwise(leaf, 3, updates, state.mu, state.nu)
        return step, AdoptState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def adopt(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    clip_exponent: Any = 0.25,
    clip_count: ClipCount = "update",
    debias: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    decay_at_first_call: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""ADOPT: Adam that converges with any :math:`\beta_2`, the current gradient out of its own denominator.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        \theta_t &= \theta_{t-1} - \eta_t \big( u_t \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \big)

    with :math:`u_t` the update of :func:`scale_by_adopt` (zero at the first call, which only
    initialises the second moment).

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1) (0.9999, the paper's).
      eps: :math:`\epsilon`, the floor of the root of the second moment, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      clip_exponent: the clip bound is the step count to this power (>= 0), or None for none.
      clip_count: ``"update"`` (the paper's and torch-adopt's count) or ``"call"``
        (pytorch-optimizer's, one step later); see :func:`scale_by_adopt`.
      debias: keep both averages debiased (heavyball's); see :func:`scale_by_adopt`.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add the decay to the step instead of to the gradient; it is then
        applied at the first call too, as pytorch-optimizer's ``weight_decouple=True`` does,
        unless ``decay_at_first_call=False``.
      decay_at_first_call: with ``decoupled_weight_decay``, decay at the first call too (which
        only initialises :math:`v`; pytorch-optimizer) or from the second (torch-adopt's
        ``decouple=True``, heavyball).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, the clip on the modulus) or ``"real_imag"`` (the
        real and imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adopt(1e-3)
      >>> params = jnp.array([1.0, 1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), state, params)
      >>> updates  # the first call does not move the parameters
      Array([-0., -0.], dtype=float32)

    References:
      Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo,
      "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate", NeurIPS 2024,
      https://arxiv.org/abs/2411.02853.

      Reference packages: the authors' ``adopt.ADOPT(lr, betas=(b1, b2), eps, weight_decay)``
      (torch-adopt) is this with the same numbers; ``pytorch_optimizer.ADOPT`` (same arguments)
      evaluates the clip bound one step later: it is this with ``clip_count="call"``, and its
      ``weight_decouple=True`` is ``decoupled_weight_decay=True``. heavyball's ``ADOPT(lr,
      betas=(b1, b2), eps, weight_decay)`` (heavyball 3.2.1) is this with ``clip_exponent=None``,
      ``debias=True``, ``decoupled_weight_decay=True`` and ``decay_at_first_call=False``.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adopt(
        b1, b2, eps, clip_exponent=clip_exponent, clip_count=clip_count, debias=debias, mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
    )  # fmt: skip
    if not decay_at_first_call and not decoupled_weight_decay:
        raise base.HyperparameterError(
            "decay_at_first_call=False concerns the decoupled decay: pass decoupled_weight_decay=True with it (the "
            "coupled decay is part of the gradient, which the first call only records)."
        )
    if decoupled_weight_decay and not decay_at_first_call:
        base.check_mask(weight_decay_mask)
        decay = decoupled_decay(
            learning_rate, weight_decay, mask=weight_decay_mask, from_second_call=True, who="adopt's weight decay"
        )
        return base.assemble(
            core, None, after_decay=(base.scale_by_learning_rate(learning_rate), decay),
            complex_convention=complex_convention,
        )  # fmt: skip
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
