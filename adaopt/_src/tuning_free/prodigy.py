r"""Prodigy: D-Adaptation's Adam with a faster-growing distance estimate (no learning rate to tune).

Prodigy estimates the distance :math:`d` to a solution from the correlation of the gradients
with the distance travelled from the initial point :math:`\theta_0`, which it keeps, weighting
recent steps more than D-Adapt Adam does (:mod:`adaopt._src.tuning_free.dadapt`, whose machinery it shares).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.tuning_free import dadapt


class ProdigyState(NamedTuple):
    r"""State of :func:`scale_by_prodigy`: the estimate :math:`d`, its running sums, the moments and the initial point.

    With ``slice_p > 1``, ``s`` and ``p0`` hold every ``slice_p``-th entry of each flattened
    parameter (flat vectors, without the parameter's sharding); otherwise every per-parameter
    field mirrors the parameters.

    Attributes:
      count: the calls of ``update``, the learning-rate schedule's step (a saturating int32).
      step: :math:`k`, the steps taken (a skipped step does not count); drives the bias correction.
      d: the distance estimate :math:`d_k`, in the parameters' widest float dtype (at least float32).
      d_max: :math:`d^{\max}`, the largest estimate so far.
      numerator: :math:`r_k`, the weighted sum of :math:`\langle g, \theta_0 - \theta \rangle`.
      mu: :math:`m`, the package's ``exp_avg`` (kept whatever ``b1``, so that the structure does not depend on it).
      nu: :math:`v`, the package's ``exp_avg_sq``.
      s: :math:`s_k`, the weighted sum of gradients.
      p0: :math:`\theta_0`, the initial point.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    step: jax.Array
    d: jax.Array
    d_max: jax.Array
    numerator: jax.Array
    mu: Updates
    nu: Updates
    s: Updates
    p0: Updates

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"d": self.d}


def _check(b1: Any, b2: Any, b3: Any, eps: Any, d_coef: Any, slice_p: Any) -> None:
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    if b3 is not None:
        base.check_decay("b3", b3)
    base.check_scalar("eps", eps, low=0.0, low_open=True)
    base.check_scalar("d_coef", d_coef, low=0.0, low_open=True)
    if slice_p is None:
        return
    if isinstance(slice_p, jax.core.Tracer):
        raise base.HyperparameterError(
            f"slice_p sets the shapes of the state: it must be a Python integer, got {slice_p!r}. "
            "Under inject_hyperparams, name it static: inject_hyperparams(prodigy, static_args=('slice_p',))."
        )
    if isinstance(slice_p, bool) or not isinstance(slice_p, (int, np.integer)) or slice_p < 1:
        raise base.HyperparameterError(f"slice_p must be None or an integer in [1, inf), got {slice_p!r}.")


@base.check_flags
def scale_by_prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = None,
    eps: Any = 1e-8,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: Any = 1e-6,
    d_coef: Any = 1.0,
    growth_rate: Any = math.inf,
    slice_p: int | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Prodigy's block: the whole step :math:`\theta_{t-1} - \theta_t`, learning rate included.

    With :math:`\eta_t` the learning rate, :math:`k` the number of steps taken so far,
    :math:`\beta_3` = ``b3`` (default :math:`\sqrt{\beta_2}`) and every sum over the whole tree
    (over every ``slice_p``-th entry of each flattened leaf for :math:`r` and :math:`s`):

    .. math::
        c_k &= \sqrt{1 - \beta_2^{k+1}} / (1 - \beta_1^{k+1}) \;\text{(bias\_correction, else 1)}, \qquad
        \gamma_k = d_k \eta_t c_k \\
        r_k &= \beta_3 r_{k-1} + \tfrac{d_k}{d_0} \gamma_k \langle g_t, \theta_0 - \theta_{t-1} \rangle \\
        m_k &= \beta_1 m_{k-1} + (1 - \beta_1) d_k g_t, \qquad
        v_k = \beta_2 v_{k-1} + (1 - \beta_2) d_k^2 g_t^2 \\
        s_k &= \beta_3 s_{k-1} + \tfrac{d_k}{d_0} \gamma_k g_t
            \quad (\tfrac{d_k}{d_0} d_k g_t \text{ with safeguard\_warmup}) \\
        \hat d_k &= \text{d\_coef} \cdot r_k / \|s_k\|_1, \qquad
        d'_k = \max(d_k, \hat d_k) \text{ if } d_k = d_0 \text{ else } d_k \\
        d^{\max}_k &= \max(d^{\max}_{k-1}, \hat d_k), \qquad
        d_{k+1} = \min(d^{\max}_k, \text{growth\_rate} \cdot d'_k) \\
        \text{update} &= \gamma_k \Big( \frac{m_k}{\sqrt{v_k} + d_{k+1} \epsilon} + \lambda \theta_{t-1} \Big)
            \qquad \Big( \gamma_k \frac{d_{k+1} g_t}{\sqrt{v_k} + d_{k+1} \epsilon} + \dots
            \text{ when } \beta_1 = 0 \Big)

    with :math:`\lambda` the decoupled weight decay on the masked leaves. A step with
    :math:`\eta_t = 0`, or with :math:`\|s_k\|_1 = 0` (no gradient seen yet), is skipped as
    the package skips it: the update is zero and :math:`d, d^{\max}, r, k` stay; the moments
    and :math:`s` still move when :math:`\eta_t > 0`.

    Args:
      learning_rate: multiplies the estimated step size (1: the method's own); a number or a
        schedule ``count -> value`` (count from 0, every call of ``update``).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1) (0 takes the package's momentum-free step).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      b3: :math:`\beta_3`, the decay of :math:`r` and :math:`s`, in [0, 1); None for
        :math:`\sqrt{\beta_2}`.
      eps: :math:`\epsilon` > 0, added to :math:`\sqrt{v}` after scaling by :math:`d_{k+1}`.
      weight_decay: decoupled weight decay :math:`\lambda` >= 0, scaled by :math:`\gamma_k`;
        chain ``optax.add_decayed_weights`` before this block for the coupled (L2) form.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the decayed leaves (None: all of them).
      bias_correction: use :math:`c_k` (the package's ``use_bias_correction``).
      safeguard_warmup: leave :math:`\eta_t` out of :math:`s` (for warm-up schedules).
      d0: the initial estimate :math:`d_0` > 0.
      d_coef: a factor > 0 on :math:`\hat d`.
      growth_rate: the cap on the growth of :math:`d` per step, in [1, inf] (inf: no cap).
      slice_p: estimate :math:`d` from every ``slice_p``-th entry of each flattened parameter
        only: None or 1 (the default, exact Prodigy: every entry) or a Python integer (~11 saves
        memory; a static argument under ``inject_hyperparams``).
      mu_dtype: the storage dtype of :math:`m` (default: the parameter's, at least float32).
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ProdigyState`; its update is to be
      subtracted (``prodigy`` negates it). ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_prodigy()
      >>> params = jnp.array([1.0, -2.0])
      >>> state = block.init(params)
      >>> step, state = block.update(params, state, params)  # no distance travelled yet: r = 0
      >>> print(state.d, state.numerator)
      1e-06 0.0

    References:
      Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML
      2024, https://arxiv.org/abs/2306.06101 (Prodigy's Adam version).

      Reference package: ``prodigyopt`` (https://github.com/konstmish/prodigy); :func:`prodigy`
      gives the arguments that reproduce its ``Prodigy``.
    """
    base.check_learning_rate(learning_rate)
    _check(b1, b2, b3, eps, d_coef, slice_p)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_mask(weight_decay_mask)
    dadapt.check_d0(d0)
    dadapt.check_growth_rate(growth_rate)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)
    decoupled = not base.is_zero(weight_decay)
    stride = 1 if slice_p is None else int(slice_p)

    def sliced(x: jax.Array) -> jax.Array:
        return x if stride == 1 else x.ravel()[::stride]

    def init_fn(params: base.Params) -> ProdigyState:
        if decoupled:
            dadapt.decay_mask(weight_decay_mask, params)  # checked now, not at the first step
        dtype = moments.scalar_dtype(params)
        kept = jax.tree.map(sliced, params)  # the parameters themselves when slice_p is None or 1
        return ProdigyState(
            count=moments.zero_count(),
            step=moments.zero_count(),
            d=jnp.asarray(d0).astype(dtype),
            d_max=jnp.asarray(d0).astype(dtype),
            numerator=jnp.zeros([], dtype),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            s=moments.init_like(kept),
            p0=moments.init_copy(kept),
        )

    def update_fn(
        updates: Updates, state: ProdigyState, params: base.Params | None = None
    ) -> tuple[Updates, ProdigyState]:
        params = base.require_params(params, "prodigy")
        dtype = state.d.dtype
        lr = numerics.learning_rate_at(learning_rate, state.count, dtype)
        active = lr > 0
        k1 = state.step + 1
        bc = (
            jnp.sqrt(moments.bias_correction(b2, k1, dtype)) / moments.bias_correction(b1, k1, dtype)
            if bias_correction
            else 1
        )
        d, first_d = state.d, moments.scalar(d0, dtype)
        dlr = d * lr * bc
        beta3 = dadapt.scalar_sqrt(b2, dtype) if b3 is None else b3
        s_rate = (d / first_d) * (d if safeguard_warmup else dlr)

        def new_moments(g32: jax.Array, v32: jax.Array, m32: jax.Array, cd: Any) -> tuple[jax.Array, jax.Array]:
            dd = d.astype(cd)
            v_new = moments.ema_sq(g32, v32, moments.scalar(b2, cd), dd * dd)
            m_new = moments.ema(moments.times(g32, dd), m32, moments.scalar(b1, cd))
            return dadapt.gate(active, v_new, v32), dadapt.gate(active, m_new, m32)

        def accumulate(
            g: jax.Array, p: jax.Array, p0: jax.Array, s: jax.Array, v: jax.Array, m: jax.Array
        ) -> tuple[jax.Array, ...]:
            cd, g32, (p32, p032, s32, v32, m32) = moments.to_compute(g, p, p0, s, v, m)
            gs = sliced(g32)
            dot = jnp.sum(moments.real_product(gs, p032 - sliced(p32)))
            v_new, m_new = new_moments(g32, v32, m32, cd)
            s_new = moments.times(s32, moments.scalar(beta3, cd)) + moments.times(gs, s_rate.astype(cd))
            return (
                moments.store(dadapt.gate(active, s_new, s32), s),
                moments.store(v_new, v),
                dot,
                jnp.where(active, jnp.sum(jnp.abs(s_new)), 0),
                moments.store(m_new, m),
            )

        if stride != 1:  # p0 and s hold slices of each leaf: check the shapes of the whole-leaf trees alone
            base.check_tree_match(updates, params, "parameters")
            for tree in (state.nu, state.mu):
                base.check_tree_match(updates, tree, "state")
        out = moments.leafwise(
            accumulate, 5, updates, params, state.p0, state.s, state.nu, state.mu, what="state",
            shapes=stride == 1,
        )  # fmt: skip
        s, nu, dots, l1s, mu = out
        numerator = beta3 * state.numerator + (d / first_d) * dlr * numerics.tree_sum(dots, dtype)
        d_denom = numerics.tree_sum(l1s, dtype)
        taken = d_denom != 0
        d_hat = moments.scalar(d_coef, dtype) * moments.safe_divide(numerator, d_denom)
        d_grown = jnp.where(d == first_d, dadapt.grown(d, d_hat), d)
        d_max = dadapt.grown(state.d_max, d_hat)
        d_new = dadapt.capped(d_max, d_grown, growth_rate)
        decay = (dadapt.decay_mask(weight_decay_mask, params),) if decoupled else ()

        def step(g: jax.Array, p: jax.Array, v: jax.Array, m: jax.Array, *selected: Any) -> tuple[jax.Array]:
            # From the old moments, recomputed: the new ones before they were stored (rounded, quantized).
            cd, g32, (p32, v32, m32) = moments.to_compute(g, p, v, m)
            v_new, m_new = new_moments(g32, v32, m32, cd)
            dn, gamma = d_new.astype(cd), dlr.astype(cd)
            denominator = moments.root(v_new) + dn * moments.scalar(eps, cd)
            momentum_free = moments.times(moments.over_nonzero(g32, denominator), gamma * dn)
            if base.is_zero(b1):
                u = momentum_free
            else:
                u = moments.times(moments.over_nonzero(m_new, denominator), gamma)
                if not isinstance(b1, (int, float)):  # an injected b1 of 0 takes the package's momentum-free step
                    u = jnp.where(moments.scalar(b1, cd) > 0, u, momentum_free)
            if selected:
                decay = moments.times(dadapt.decay_term(p32, selected[0], weight_decay, cd), gamma)
                u = dadapt.decay_then_step(p32, decay, u)
            return (jnp.where(taken, u, 0).astype(g.dtype),)

        (result,) = moments.leafwise(step, 1, updates, params, state.nu, state.mu, options=decay, what="state")
        return result, ProdigyState(
            count=moments.safe_increment(state.count),
            step=jnp.where(taken, moments.safe_increment(state.step), state.step),
            d=dadapt.gate(taken, d_new, d),
            d_max=dadapt.gate(taken, d_max, state.d_max),
            numerator=dadapt.gate(taken, numerator, state.numerator),
            mu=mu,
            nu=nu,
            s=s,
            p0=state.p0,
        )

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = None,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: Any = 1e-6,
    d_coef: Any = 1.0,
    growth_rate: Any = math.inf,
    slice_p: int | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Prodigy: Adam whose step size :math:`d_k \eta_t` is estimated on the fly (no learning rate to tune).

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(if not decoupled)} \\
        \theta_t &= \theta_{t-1} - d_k \eta_t c_k \Big( \frac{m_k}{\sqrt{v_k} + d_{k+1} \epsilon}
            \;[+\, \lambda \theta_{t-1} \text{ if decoupled, the default}] \Big)

    with :math:`m_k, v_k, d_k, c_k` as in :func:`scale_by_prodigy`.

    Half-precision parameters: the first steps, of about ``d0`` (1e-6), are far under the spacing of
    bfloat16 (float16) numbers, so alone they never move and :math:`d_k` never grows; wrap the
    optimizer in :func:`master_weights` (a float32 copy that takes the steps).

    Args:
      learning_rate: multiplies the estimated step size; keep 1 unless the method is unstable
        (a schedule, e.g. cosine decay from 1, helps). A number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      b3: :math:`\beta_3`, the decay of :math:`r` and :math:`s`, in [0, 1); None for
        :math:`\sqrt{\beta_2}`.
      eps: :math:`\epsilon` > 0, added to :math:`\sqrt{v}` after scaling by :math:`d_{k+1}`.
      weight_decay: the coefficient :math:`\lambda` >= 0.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the leaves to decay (None: all of them).
      decoupled_weight_decay: decay the weights beside the step, scaled by :math:`d_k \eta_t c_k`
        (AdamW style, the package's default ``decouple=True``), or add the decay to the gradient.
      bias_correction: use :math:`c_k` (the package's ``use_bias_correction``).
      safeguard_warmup: leave :math:`\eta_t` out of :math:`s` (for warm-up schedules).
      d0: the initial estimate :math:`d_0` > 0.
      d_coef: a factor > 0 on :math:`\hat d`.
      growth_rate: the cap on the growth of :math:`d` per step, in [1, inf] (inf: no cap).
      slice_p: estimate :math:`d` from every ``slice_p``-th entry of each flattened parameter
        only (None or 1: every entry; a Python integer such as 11 saves memory).
      mu_dtype: the storage dtype of :math:`m` (default: the parameter's, at least float32).
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, :math:`|s|` the modulus, inner products
        :math:`\mathrm{Re}(\bar g \cdot (x_0 - x))`) or ``"real_imag"`` (the real and imaginary
        parts as two real coordinates); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.prodigy()  # no learning rate to tune
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(100):  # minimise sum(x^2) / 2, whose gradient is x
      ...     updates, state = opt.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params).max() < 0.05)
      True

    References:
      Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML
      2024, https://arxiv.org/abs/2306.06101 (Prodigy's Adam version).

      Reference package: ``prodigyopt`` 1.1.2 (https://github.com/konstmish/prodigy).
      ``prodigyopt.Prodigy(lr, betas=(b1, b2), beta3=b3, eps, weight_decay, decouple,
      use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate, slice_p)`` follows the
      same trajectory as ``prodigy(learning_rate=lr, b1, b2, b3, eps, weight_decay,
      decoupled_weight_decay=decouple, bias_correction=use_bias_correction, ...)`` with the other
      arguments by the same names. adaopt follows the package where it departs from the paper's
      algorithm: :math:`r` and :math:`s` drop the :math:`1 - \beta_3` factors and are scaled by
      :math:`1 / d_0` (which leaves :math:`\hat d` unchanged), and the package adds ``d_coef``,
      ``growth_rate``, ``safeguard_warmup``, ``slice_p``, an optional bias correction, and the
      rule for :math:`d'_k` (while :math:`d_k = d_0`, the growth cap applies to
      :math:`\max(d_0, \hat d_k)`). The package's ``fsdp_in_use`` has no counterpart: sums over
      sharded arrays are global under ``jit``. The package keeps ``p0`` of an all-zero parameter
      as a 0-d zero, to save memory; adaopt keeps the zeros (the same numbers). The package's
      :math:`d` is one for all its parameter groups: groups that differ in weight decay are
      ``weight_decay_mask`` here (:func:`adaopt.param_groups` would give each group its own
      :math:`d`). Where a group's ``lr`` is 0 while others' are not, the package still applies
      that group's stale step; adaopt has one learning rate for the tree.
      ``optax.contrib.prodigy`` is this with ``bias_correction=True`` and an unmasked decay, for
      a learning rate that is never 0 (optax does not skip steps).
    """
    dadapt.check_common(learning_rate, weight_decay, d0, growth_rate)
    base.check_complex_convention(complex_convention)
    core = scale_by_prodigy(
        learning_rate, b1, b2, b3, eps,
        weight_decay=weight_decay if decoupled_weight_decay else 0.0, weight_decay_mask=weight_decay_mask,
        bias_correction=bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
        growth_rate=growth_rate, slice_p=slice_p, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    return base.assemble(core, 1.0, coupled, weight_decay_mask, complex_convention=complex_convention)
