r"""D-Adaptation: Adam, SGD and AdaGrad whose step size is estimated, not tuned.

Each method keeps an estimate :math:`d` of the distance from the initial point to a solution,
a lower bound built from global sums over the whole parameter tree (dot products of the
gradients with accumulated steps, norms of the accumulated steps); the step size is
:math:`d` times the learning rate, which stays at 1 unless the method is unstable. The
learning rate enters the accumulators themselves, so it is an argument of each block, not a
factor applied after it: a schedule scales the steps and the accumulated quantities exactly as
the reference package does when its parameter group's ``lr`` changes each step. The package's
sums, like these, span all its parameter groups: groups that differ only in weight decay are a
``weight_decay_mask`` here (and D-Adapt Adam's per-group scale its ``layer_scale``), not
:func:`adaopt.param_groups`, which would give each group an estimate of its own.

Each leaf's share of a global sum is reduced inside the leaf's step (one pass over its state);
the shares are added with :func:`adaopt._src.numerics.tree_sum`. The machinery of the family
(the capped growth of :math:`d`, decoupled weight decay inside a block, the skipped step) lives
here; :mod:`adaopt._src.tuning_free.prodigy` builds on it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics, storage
from adaopt._src.base import ScalarOrSchedule, Updates

ADAGRAD_INITIAL_ACCUMULATOR = 1e-6  # dadaptation's DAdaptAdaGrad starts its accumulator here (hard-coded)


# ---------------------------------------------------------------------------------------------
# The machinery shared by the D-Adaptation family (and Prodigy).


def scalar_sqrt(x: Any, dtype: Any) -> Any:
    """The square root of a hyperparameter, computed as the packages compute it.

    Args:
      x: the hyperparameter, a Python number or an array (a traced one under ``inject_hyperparams``).
      dtype: the dtype of the root of an array.

    Returns:
      ``x ** 0.5``, a Python float for a Python number, else a 0-d array of ``dtype``.
    """
    if isinstance(x, (int, float)):
        return x**0.5
    return jnp.sqrt(jnp.asarray(x).astype(dtype))


def grown(d: jax.Array, candidate: jax.Array) -> jax.Array:
    """The larger of the current estimate and a candidate, as the packages' Python ``max(d, candidate)``: a NaN
    candidate (sums that overflowed, inf / inf) leaves ``d``, where ``jnp.maximum`` would make it NaN for good."""
    return jnp.where(candidate > d, candidate, d)


def capped(candidate: jax.Array, d: jax.Array, growth_rate: Any) -> jax.Array:
    """The candidate estimate, capped at ``growth_rate`` times the current one.

    Args:
      candidate: the new estimate of :math:`d`, a 0-d array.
      d: the current estimate, a 0-d array.
      growth_rate: the cap on the ratio, in [1, inf]; an infinite one (the default) caps nothing.

    Returns:
      ``min(candidate, growth_rate * d)``, in ``d``'s dtype.
    """
    if isinstance(growth_rate, (int, float)):
        return candidate if math.isinf(growth_rate) else jnp.minimum(candidate, growth_rate * d)
    rate = jnp.asarray(growth_rate).astype(d.dtype)
    finite = jnp.isfinite(rate)
    # The inner where keeps d * inf out of the unused branch, so that gradients stay finite.
    return jnp.where(finite, jnp.minimum(candidate, d * jnp.where(finite, rate, 1)), candidate)


def check_growth_rate(growth_rate: Any) -> None:
    """Raise ``HyperparameterError`` unless ``growth_rate`` is a number in [1, inf], infinity (no cap) included.

    Args:
      growth_rate: the multiplicative cap on the growth of :math:`d` per step; a traced value
        is not checked.
    """
    valid = "[1.0, inf] (inf: no cap)"
    try:
        value = base.concrete_scalar(growth_rate)
    except TypeError:
        raise base.HyperparameterError(
            f"growth_rate must be a real number in {valid}, got {growth_rate!r} of type {type(growth_rate).__name__}."
        ) from None
    if value is not None and not value >= 1.0:  # NaN fails too
        raise base.HyperparameterError(f"growth_rate must be a number in {valid}, got {growth_rate!r}.")


def check_d0(d0: Any) -> None:
    """Raise ``HyperparameterError`` unless ``d0``, the initial estimate of :math:`d`, is a finite number > 0.

    Args:
      d0: the initial estimate; a traced value is not checked.
    """
    base.check_scalar("d0", d0, low=0.0, low_open=True)


def decay_mask(weight_decay_mask: base.MaskOrFn | None, params: base.Params) -> Any:
    """The tree of booleans selecting the decayed leaves.

    Args:
      weight_decay_mask: a tree of booleans, a function of the parameters returning one, or None.
      params: the parameters.

    Returns:
      The mask, a tree with the parameters' structure; all True when ``weight_decay_mask`` is None.
    """
    if weight_decay_mask is None:
        return jax.tree.map(lambda _: True, params)
    mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
    base.check_mask_leaves(mask)
    return mask


def decay_term(p: jax.Array, selected: Any, weight_decay: Any, dtype: Any) -> Any:
    r"""One leaf's decoupled weight decay :math:`\lambda p`, where its mask selects it.

    Args:
      p: the parameter leaf, in ``dtype``.
      selected: the leaf's mask entry, a Python bool or a boolean array.
      weight_decay: :math:`\lambda`, a Python number or an array.
      dtype: the compute dtype of the leaf.

    Returns:
      ``weight_decay * p`` where selected, else 0 (a Python 0 for an unselected leaf).
    """
    if isinstance(selected, bool):
        return moments.times(p, moments.scalar(weight_decay, dtype)) if selected else 0
    return jnp.where(jnp.asarray(selected), moments.times(p, moments.scalar(weight_decay, dtype)), 0)


def decay_then_step(p: jax.Array, decay: Any, step: jax.Array) -> jax.Array:
    """What to subtract from ``p`` for a decay then a step, rounded as the packages' ``p -= decay; p -= step``.

    Where the decay is non-zero the result is ``p - ((p - decay) - step)``: subtracted from ``p``,
    it gives the packages' two roundings exactly, so float32 runs agree bit for bit (one rounding
    would differ in the last bit, and the first, tiny steps feed the estimate of d). The update
    then carries the rounding of ``p``, as the packages' own ``p_new - p`` does.

    Args:
      p: the parameter leaf, in its compute dtype.
      decay: the decay to subtract first (see :func:`decay_term`), an array or a Python 0.
      step: the step to subtract next.

    Returns:
      ``step + decay``, rounded as described.
    """
    return jnp.where(decay != 0, p - ((p - decay) - step), step + decay)


def gate(keep: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """The new value where a step is taken, the old one where it is skipped.

    Args:
      keep: a boolean, whether the step is taken.
      new: the value after the step.
      old: the value before it.

    Returns:
      ``new`` if ``keep`` else ``old``.
    """
    return jnp.where(keep, new, old)


def check_common(learning_rate: Any, weight_decay: Any, d0: Any, growth_rate: Any) -> None:
    """Validate the hyperparameters every optimizer of the family has.

    Args:
      learning_rate: a non-negative number or a schedule.
      weight_decay: a number >= 0.
      d0: the initial estimate of :math:`d`, > 0.
      growth_rate: the cap on the growth of :math:`d` per step, in [1, inf].
    """
    base.check_common(learning_rate, weight_decay)
    check_d0(d0)
    check_growth_rate(growth_rate)


# ---------------------------------------------------------------------------------------------
# D-Adapt Adam.


class DAdaptAdamState(NamedTuple):
    r"""State of :func:`scale_by_dadapt_adam`: the estimate :math:`d`, its running sums and the moments.

    Attributes:
      count: the calls of ``update``, the learning-rate schedule's step (a saturating int32).
      step: :math:`k`, the steps taken (a skipped step does not count); drives the bias correction.
      d: the distance estimate :math:`d_k`, in the parameters' widest float dtype (at least float32).
      numerator: :math:`r_k`, the weighted sum of :math:`\langle g, s / (\sqrt{v} + \epsilon) \rangle`.
      mu: :math:`m`, the package's ``exp_avg`` (it already holds the step size :math:`d_k \eta_t c_k`).
      nu: :math:`v`, the package's ``exp_avg_sq``.
      s: the weighted sum of steps :math:`s_k`.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    step: jax.Array
    d: jax.Array
    numerator: jax.Array
    mu: Updates
    nu: Updates
    s: Updates

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"d": self.d}


@base.check_flags
def scale_by_dadapt_adam(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    bias_correction: bool = False,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
    layer_scale: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""D-Adapt Adam's block: the whole step :math:`\theta_{t-1} - \theta_t`, learning rate included.

    With :math:`\eta_t` the learning rate, :math:`k` the number of steps taken so far and
    :math:`\rho` the leaf's layer scale (1 by default), every sum running over the whole tree:

    .. math::
        c_k &= \sqrt{1 - \beta_2^{k+1}} / (1 - \beta_1^{k+1}) \;\text{(bias\_correction, else 1)}, \qquad
        \gamma_k = d_k \eta_t c_k \\
        a_k &= \gamma_k \textstyle\sum \rho \langle g_t, s_{k-1} / (\sqrt{v_{k-1}} + \epsilon) \rangle \\
        m_k &= \beta_1 m_{k-1} + (1 - \beta_1) \rho \gamma_k g_t, \qquad
        v_k = \beta_2 v_{k-1} + (1 - \beta_2) g_t^2, \qquad
        s_k = \sqrt{\beta_2} s_{k-1} + (1 - \sqrt{\beta_2}) \gamma_k g_t \\
        r_k &= \sqrt{\beta_2} r_{k-1} + (1 - \sqrt{\beta_2}) a_k, \qquad
        \ell_k = \textstyle\sum \rho \|s_k\|_1 \\
        \hat d_k &= \frac{r_k}{(1 - \sqrt{\beta_2}) \ell_k}, \qquad
        d_{k+1} = \max\big(d_k, \min(\hat d_k, \text{growth\_rate} \cdot d_k)\big) \\
        \text{update} &= \frac{m_k}{\sqrt{v_k} + \epsilon} + \gamma_k \lambda \theta_{t-1}
            \quad (\lambda \text{: the decoupled weight decay, on the masked leaves})

    A step with :math:`\eta_t = 0`, or with :math:`\ell_k = 0` (no gradient seen yet), is
    skipped as the package skips it: the update is zero and :math:`d, r, k` stay; the moments
    still move when :math:`\eta_t > 0`.

    Args:
      learning_rate: multiplies the estimated step size (1: the method's own); a number or a
        schedule ``count -> value`` (count from 0, every call of ``update``).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to :math:`\sqrt{v}`, > 0.
      weight_decay: decoupled weight decay :math:`\lambda` (>= 0), scaled by :math:`\gamma_k`;
        chain ``optax.add_decayed_weights`` before this block for the coupled (L2) form.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the decayed leaves (None: all of them).
      bias_correction: use :math:`c_k` (the package's ``use_bias_correction``).
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{k+1} / d_k`, in [1, inf] (inf: no cap).
      layer_scale: :math:`\rho`, None (1 everywhere) or a tree of non-negative numbers with the
        parameters' structure (or a function of the parameters returning one): the package's
        per-parameter-group ``layer_scale``.
      mu_dtype: the storage dtype of :math:`m` (default: the parameter's, at least float32).
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DAdaptAdamState`; its update is to
      be subtracted (``dadapt_adam`` negates it). ``update`` needs ``params`` when
      ``weight_decay`` is not 0 or ``layer_scale`` is a function.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_dadapt_adam()
      >>> params = jnp.array([1.0, -2.0])
      >>> state = block.init(params)
      >>> step, state = block.update(params, state)  # the first step only builds s: d stays d0
      >>> print(state.d, state.step)
      1e-06 1

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt Adam, Adam with D-Adaptation).

      Reference package: ``dadaptation`` (https://github.com/facebookresearch/dadaptation);
      :func:`dadapt_adam` gives the arguments that reproduce its ``DAdaptAdam``.
    """
    base.check_learning_rate(learning_rate)
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_scalar("eps", eps, low=0.0, low_open=True)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_mask(weight_decay_mask)
    check_d0(d0)
    check_growth_rate(growth_rate)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)
    if layer_scale is not None and not callable(layer_scale):
        for value in jax.tree.leaves(layer_scale):
            base.check_nonnegative("layer_scale", value)
    decoupled = not base.is_zero(weight_decay)

    def init_fn(params: base.Params) -> DAdaptAdamState:
        if decoupled:
            decay_mask(weight_decay_mask, params)  # checked now, not at the first step
        if layer_scale is not None:  # a tree of the parameters' structure, a function's too, checked now
            scales = layer_scale(params) if base.is_function_of(layer_scale, params) else layer_scale
            what = base.per_leaf_option("layer_scale")
            base.check_tree_match(params, scales, what, subject="parameters", shapes=False)
            for value in jax.tree.leaves(scales):
                if not isinstance(value, jax.core.Tracer):
                    base.check_nonnegative("layer_scale", value)
        dtype = moments.scalar_dtype(params)
        return DAdaptAdamState(
            count=moments.zero_count(),
            step=moments.zero_count(),
            d=jnp.asarray(d0).astype(dtype),
            numerator=jnp.zeros([], dtype),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            s=moments.init_like(params),
        )

    def update_fn(
        updates: Updates, state: DAdaptAdamState, params: base.Params | None = None
    ) -> tuple[Updates, DAdaptAdamState]:
        dtype = state.d.dtype
        lr = numerics.learning_rate_at(learning_rate, state.count, dtype)
        active = lr > 0
        k1 = state.step + 1
        bc = (
            jnp.sqrt(moments.bias_correction(b2, k1, dtype)) / moments.bias_correction(b1, k1, dtype)
            if bias_correction
            else 1
        )
        d = state.d
        dlr = d * lr * bc
        sqrt_b2 = scalar_sqrt(b2, dtype)
        scales = (
            ()
            if layer_scale is None
            else (layer_scale(params) if base.is_function_of(layer_scale, params) else layer_scale,)
        )

        def new_moments(g32: jax.Array, m32: jax.Array, v32: jax.Array, cd: Any, rho: Any) -> tuple[jax.Array, ...]:
            m_new = moments.ema(moments.times(g32, rho * dlr.astype(cd)), m32, moments.scalar(b1, cd))
            v_new = moments.ema_sq(g32, v32, moments.scalar(b2, cd))
            return gate(active, m_new, m32), gate(active, v_new, v32)

        def accumulate(g: jax.Array, m: jax.Array, v: jax.Array, s: jax.Array, *r: Any) -> tuple[jax.Array, ...]:
            cd, g32, (m32, v32, s32) = moments.to_compute(g, m, v, s)
            rho = moments.scalar(r[0], cd) if r else 1
            gamma, e, sb2 = dlr.astype(cd), moments.scalar(eps, cd), moments.scalar(sqrt_b2, cd)
            ratio = moments.over_nonzero(s32, moments.root(v32) + e)
            if isinstance(v, storage.Quantized):
                # A coordinate stored as 0 is under its block's resolution, not unseen (its s is not 0): divided by
                # eps it would add g s / eps, growing D with the square of the gradients' scale. It adds nothing.
                ratio = jnp.where(v32 > 0, ratio, 0)
            dot = rho * jnp.sum(moments.real_product(g32, ratio))
            m_new, v_new = new_moments(g32, m32, v32, cd, rho)
            s_new = moments.ema(moments.times(g32, gamma), s32, sb2)
            l1 = rho * jnp.sum(jnp.abs(s_new))
            return (
                moments.store(m_new, m),
                moments.store(v_new, v),
                moments.store(gate(active, s_new, s32), s),
                dot,
                jnp.where(active, l1, 0),
            )

        mu, nu, s, dots, l1s = moments.leafwise(accumulate, 5, updates, state.mu, state.nu, state.s, options=scales)
        numerator = moments.ema(dlr * numerics.tree_sum(dots, dtype), state.numerator, sqrt_b2)
        sk_l1 = numerics.tree_sum(l1s, dtype)
        taken = sk_l1 != 0
        d_hat = moments.safe_divide(numerator, (1 - sqrt_b2) * sk_l1)
        d_new = grown(d, capped(d_hat, d, growth_rate))

        decay_trees: tuple[Any, ...] = ()
        mask: tuple[Any, ...] = ()
        if decoupled:
            decay_trees = (base.require_params(params, "dadapt_adam with decoupled weight decay"),)
            mask = (decay_mask(weight_decay_mask, params),)

        def step(g: jax.Array, m: jax.Array, v: jax.Array, *rest: Any) -> tuple[jax.Array]:
            # From the old moments, recomputed: the new ones before they were stored (rounded, quantized).
            cd, g32, (m32, v32) = moments.to_compute(g, m, v)
            left = list(rest)  # the parameter (decoupled decay), then the options: the layer's scale, the decay mask
            p = left.pop(0) if decay_trees else None
            rho = moments.scalar(left.pop(0), cd) if scales else 1
            m_new, v_new = new_moments(g32, m32, v32, cd, rho)
            u = moments.over_nonzero(m_new, moments.root(v_new) + moments.scalar(eps, cd))
            if p is not None:
                p32 = moments.in_precision(p, cd)
                u = decay_then_step(p32, moments.times(decay_term(p32, left[0], weight_decay, cd), dlr.astype(cd)), u)
            return (jnp.where(taken, u, 0).astype(g.dtype),)

        (out,) = moments.leafwise(step, 1, updates, state.mu, state.nu, *decay_trees, options=(*scales, *mask))
        return out, DAdaptAdamState(
            count=moments.safe_increment(state.count),
            step=jnp.where(taken, moments.safe_increment(state.step), state.step),
            d=gate(taken, d_new, d),
            numerator=gate(taken, numerator, state.numerator),
            mu=mu,
            nu=nu,
            s=s,
        )

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def dadapt_adam(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    bias_correction: bool = False,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
    layer_scale: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapt Adam: Adam whose step size :math:`d_k \eta_t` is estimated on the fly (no learning rate to tune).

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        \theta_t &= \theta_{t-1} - \Big( \frac{m_k}{\sqrt{v_k} + \epsilon}
            \;[+\, d_k \eta_t c_k \lambda \theta_{t-1} \text{ if decoupled}] \Big)

    with :math:`m_k, v_k, d_k, c_k` as in :func:`scale_by_dadapt_adam` (:math:`m_k` already
    carries the step size :math:`d_k \eta_t c_k`).

    Args:
      learning_rate: multiplies the estimated step size; keep 1 unless the method is unstable.
        A number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to :math:`\sqrt{v}`, > 0.
      weight_decay: the coefficient :math:`\lambda` >= 0.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the leaves to decay (None: all of them).
      decoupled_weight_decay: decay the weights by :math:`d_k \eta_t c_k \lambda \theta` beside the
        step (AdamW style, the package's ``decouple=True``) instead of adding
        :math:`\lambda \theta` to the gradient.
      bias_correction: use :math:`c_k` (the package's ``use_bias_correction``).
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{k+1} / d_k`, in [1, inf] (inf: no cap).
      layer_scale: :math:`\rho`, None (1 everywhere) or a tree of non-negative numbers with the
        parameters' structure (or a function of the parameters returning one).
      mu_dtype: the storage dtype of :math:`m` (default: the parameter's, at least float32).
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, :math:`|s|` the modulus, real inner products) or
        ``"real_imag"`` (the real and imaginary parts as two real coordinates); see
        :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` when the decay
      is decoupled.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.dadapt_adam()  # no learning rate to tune
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(100):  # minimise sum(x^2) / 2, whose gradient is x
      ...     updates, state = opt.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params).max() < 0.05)
      True

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt Adam, Adam with D-Adaptation).

      Reference package: ``dadaptation`` 3.2 (https://github.com/facebookresearch/dadaptation).
      ``dadaptation.DAdaptAdam(lr, betas=(b1, b2), eps, weight_decay, decouple, use_bias_correction,
      d0, growth_rate)``, with ``layer_scale`` set per parameter group (one :math:`d` for all the
      groups: a weight decay that differs by group is ``weight_decay_mask`` here), follows the same
      trajectory as ``dadapt_adam(learning_rate=lr, b1, b2, eps, weight_decay,
      decoupled_weight_decay=decouple, bias_correction=use_bias_correction, d0=d0,
      growth_rate=growth_rate)`` (the package's ``log_every`` only logs; read :math:`d` from the
      state). Where a parameter group's ``lr`` is 0 while others' are not, the package still
      applies the stale step of that group; adaopt has one learning rate for the tree.
      ``optax.contrib.dadapt_adamw`` is this with ``decoupled_weight_decay=True,
      bias_correction=True`` and no mask, for a learning rate that is never 0 (optax does not
      skip steps).
    """
    check_common(learning_rate, weight_decay, d0, growth_rate)
    base.check_complex_convention(complex_convention)
    core = scale_by_dadapt_adam(
        learning_rate, b1, b2, eps,
        weight_decay=weight_decay if decoupled_weight_decay else 0.0, weight_decay_mask=weight_decay_mask,
        bias_correction=bias_correction, d0=d0, growth_rate=growth_rate, layer_scale=layer_scale,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    return base.assemble(core, 1.0, coupled, weight_decay_mask, complex_convention=complex_convention)


# ---------------------------------------------------------------------------------------------
# D-Adapt SGD.


class DAdaptSGDState(NamedTuple):
    r"""State of :func:`scale_by_dadapt_sgd`: the estimate :math:`d`, its running sums and the initial point.

    Attributes:
      count: the calls of ``update``, the learning-rate schedule's step (a saturating int32).
      step: :math:`k`, the steps taken (a skipped step does not count).
      d: the distance estimate :math:`d_k`, in the parameters' widest float dtype (at least float32).
      numerator: :math:`r_k`, the sum of :math:`\gamma_k \langle g, s_{k-1} \rangle`.
      g0_norm: :math:`G`, the norm of the first step's gradient (before weight decay, as the package).
      s: :math:`s_k`, the sum of the steps :math:`\gamma_k g`.
      x0: :math:`\theta_0`, the initial point.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    step: jax.Array
    d: jax.Array
    numerator: jax.Array
    g0_norm: jax.Array
    s: Updates
    x0: Updates

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"d": self.d}


def scale_by_dadapt_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: Any = 0.0,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
) -> optax.GradientTransformation:
    r"""D-Adapt SGD's block (dual averaging): the update :math:`\theta_{t-1} - \theta_t`, learning rate included.

    With :math:`\eta_t` the learning rate, :math:`k` the number of steps taken so far, every
    sum and norm running over the whole tree:

    .. math::
        G &= \|g_{t_0}\|_2 \;\text{(the first step's raw gradient, before weight decay)}, \qquad
        \gamma_k = d_k \eta_t / G, \qquad g_t \leftarrow g_t + \lambda \theta_{t-1} \\
        r_k &= r_{k-1} + \gamma_k \langle g_t, s_{k-1} \rangle, \qquad
        s_k = s_{k-1} + \gamma_k g_t \\
        \hat d_k &= 2 r_k / \|s_k\|_2, \qquad
        d_{k+1} = \max\big(d_k, \min(\hat d_k, \text{growth\_rate} \cdot d_k)\big) \\
        z_k &= \theta_0 - s_k, \qquad
        \text{update} = \theta_{t-1} - \theta_t = (1 - \mu)\,(\theta_{t-1} - z_k)

    so that :math:`\theta_t = \mu \theta_{t-1} + (1 - \mu) z_k`. A step with
    :math:`\eta_t = 0`, :math:`G = 0` or :math:`s_k = 0` is skipped: the update is zero and
    :math:`d, r, k` stay (the package raises an error there instead).

    Args:
      learning_rate: multiplies the estimated step size; a number or a schedule ``count -> value``
        (count from 0, every call of ``update``).
      momentum: :math:`\mu` in [0, 1), an average of the iterates (0: none).
      weight_decay: the coupled decay :math:`\lambda` >= 0, added to the gradient after :math:`G`
        is measured.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the leaves to decay (None: all of them).
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{k+1} / d_k`, in [1, inf] (inf: no cap).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DAdaptSGDState`; its update is to be
      subtracted (``dadapt_sgd`` negates it). ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_dadapt_sgd()
      >>> params = jnp.array([3.0, -4.0])
      >>> state = block.init(params)
      >>> step, state = block.update(params, state, params)
      >>> float(state.g0_norm)  # the norm of the first gradient
      5.0

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt SGD by dual averaging; the momentum is the package's).

      Reference package: ``dadaptation`` (https://github.com/facebookresearch/dadaptation);
      :func:`dadapt_sgd` gives the arguments that reproduce its ``DAdaptSGD``.
    """
    base.check_learning_rate(learning_rate)
    base.check_decay("momentum", momentum)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_mask(weight_decay_mask)
    check_d0(d0)
    check_growth_rate(growth_rate)
    decayed = not base.is_zero(weight_decay)

    def init_fn(params: base.Params) -> DAdaptSGDState:
        if decayed:
            decay_mask(weight_decay_mask, params)  # checked now, not at the first step
        dtype = moments.scalar_dtype(params)
        return DAdaptSGDState(  # each field its own buffer: the state is donated whole
            count=moments.zero_count(),
            step=moments.zero_count(),
            d=jnp.asarray(d0).astype(dtype),
            numerator=jnp.zeros([], dtype),
            g0_norm=jnp.zeros([], dtype),
            s=moments.init_like(params),
            x0=moments.init_copy(params),
        )

    def update_fn(
        updates: Updates, state: DAdaptSGDState, params: base.Params | None = None
    ) -> tuple[Updates, DAdaptSGDState]:
        params = base.require_params(params, "dadapt_sgd")
        dtype = state.d.dtype
        lr = numerics.learning_rate_at(learning_rate, state.count, dtype)
        active = lr > 0
        g0_norm = jnp.where(state.step == 0, numerics.norm(updates, dtype), state.g0_norm)
        d = state.d
        dlr = moments.safe_divide(d * lr, g0_norm)
        mask = (decay_mask(weight_decay_mask, params),) if decayed else ()

        def accumulate(g: jax.Array, p: jax.Array, s: jax.Array, *selected: Any) -> tuple[jax.Array, ...]:
            cd, g32, (p32, s32) = moments.to_compute(g, p, s)
            if selected:
                g32 = g32 + decay_term(p32, selected[0], weight_decay, cd)
            gamma = dlr.astype(cd)
            dot = jnp.sum(moments.real_product(g32, s32))
            s_new = s32 + moments.times(g32, gamma)
            squares = jnp.sum(moments.abs_sq(s_new))
            return moments.store(gate(active, s_new, s32), s), dot, jnp.where(active, squares, 0)

        s, dots, squares = moments.leafwise(
            accumulate, 3, updates, params, state.s, options=mask, what="parameters and state"
        )
        numerator = state.numerator + dlr * numerics.tree_sum(dots, dtype)
        sk_sq = numerics.tree_sum(squares, dtype)
        taken = (sk_sq != 0) & (g0_norm != 0)
        d_hat = moments.safe_divide(2 * numerator, moments.safe_sqrt(sk_sq))
        d_new = grown(d, capped(d_hat, d, growth_rate))
        ck = 1 - moments.scalar(momentum, dtype)

        def step(g: jax.Array, p: jax.Array, s: jax.Array, x0: jax.Array) -> tuple[jax.Array]:
            cd, _, (p32, s32, x032) = moments.to_compute(g, p, s, x0)
            z = x032 - s32
            u = moments.times(p32 - z, moments.scalar(ck, cd))
            return (jnp.where(taken, u, 0).astype(g.dtype),)

        (out,) = moments.leafwise(step, 1, updates, params, s, state.x0, what="parameters and state")
        return out, DAdaptSGDState(
            count=moments.safe_increment(state.count),
            step=jnp.where(taken, moments.safe_increment(state.step), state.step),
            d=gate(taken, d_new, d),
            numerator=gate(taken, numerator, state.numerator),
            g0_norm=g0_norm,
            s=s,
            x0=state.x0,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def dadapt_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapt SGD: dual averaging with a step size :math:`d_k \eta_t / \|g_{t_0}\|` estimated on the fly.

    .. math::
        \theta_t = \mu \theta_{t-1} + (1 - \mu) (\theta_0 - s_k), \qquad
        s_k = s_{k-1} + \frac{d_k \eta_t}{\|g_{t_0}\|} (g_t + \lambda \theta_{t-1})

    with :math:`d_k` as in :func:`scale_by_dadapt_sgd`.

    Args:
      learning_rate: multiplies the estimated step size; keep 1 unless the method is unstable.
        A number or a schedule ``count -> value`` (count from 0).
      momentum: :math:`\mu` in [0, 1), an average of the iterates (0: none).
      weight_decay: the coupled decay :math:`\lambda` >= 0.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the leaves to decay (None: all of them).
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{k+1} / d_k`, in [1, inf] (inf: no cap).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.dadapt_sgd()  # no learning rate to tune
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(100):  # minimise sum(x^2) / 2, whose gradient is x
      ...     updates, state = opt.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params).max() < 0.05)
      True

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt SGD by dual averaging; the momentum is the package's).

      Reference package: ``dadaptation`` 3.2 (https://github.com/facebookresearch/dadaptation).
      ``dadaptation.DAdaptSGD(lr, momentum, weight_decay, d0, growth_rate)`` follows the same
      trajectory as ``dadapt_sgd(learning_rate=lr, momentum, weight_decay, d0=d0,
      growth_rate=growth_rate)``, with two caveats of the package: it applies the first
      parameter group's ``weight_decay`` to every group (so it matches only an unmasked decay),
      and it raises an error at a step with learning rate 0 (adaopt skips that step, the
      package's intent). Like the package, :math:`\|g_{t_0}\|` is the norm of the raw gradient,
      before weight decay.
    """
    check_common(learning_rate, weight_decay, d0, growth_rate)
    core = scale_by_dadapt_sgd(
        learning_rate, momentum, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask, d0=d0,
        growth_rate=growth_rate,
    )  # fmt: skip
    return base.assemble(
        core, 1.0, complex_convention="modulus"
    )  # norms and real inner products of a step linear in the gradient: both conventions agree


# ---------------------------------------------------------------------------------------------
# D-Adapt AdaGrad.


class DAdaptAdaGradState(NamedTuple):
    r"""State of :func:`scale_by_dadapt_adagrad`: the estimate :math:`d`, the accumulators and the initial point.

    Attributes:
      count: the calls of ``update``, the learning-rate schedule's step (a saturating int32).
      d: the distance estimate :math:`d_t`, in the parameters' widest float dtype (at least float32).
      gsq_weighted: :math:`q_t`, the sum of :math:`\gamma_t^2 \langle g^2, 1 / (\sqrt{\alpha_t} + \epsilon) \rangle`.
      alpha: :math:`\alpha_t`, the sum of squared gradients, from :math:`10^{-6}`.
      s: :math:`s_t`, the sum of the steps :math:`\gamma_t g`.
      x0: :math:`\theta_0`, the initial point.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    d: jax.Array
    gsq_weighted: jax.Array
    alpha: Updates
    s: Updates
    x0: Updates

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"d": self.d}


def scale_by_dadapt_adagrad(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: Any = 0.0,
    eps: Any = 1e-6,
    *,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
) -> optax.GradientTransformation:
    r"""D-Adapt AdaGrad's block (dual averaging): the update :math:`\theta_{t-1} - \theta_t`.

    With :math:`\eta_t` the learning rate, :math:`\gamma_t = d_t \eta_t`, every sum and norm over
    the whole tree, and :math:`\alpha_0 = 10^{-6}` (the package's constant):

    .. math::
        \alpha_t &= \alpha_{t-1} + g_t^2, \qquad s_t = s_{t-1} + \gamma_t g_t, \qquad
        w_t = 1 / (\sqrt{\alpha_t} + \epsilon) \\
        q_t &= q_{t-1} + \gamma_t^2 \textstyle\sum w_t g_t^2, \qquad
        \hat d_t = \frac{\sum w_t s_t^2 - q_t}{\|s_t\|_1} \\
        d_{t+1} &= \max\big(d_t, \min(\hat d_t, \text{growth\_rate} \cdot d_t)\big)
            \;\text{(if } \eta_t > 0\text{, else } d_t) \\
        z_t &= \theta_0 - w_t s_t, \qquad
        \text{update} = \theta_{t-1} - \theta_t = (1 - \mu)\,(\theta_{t-1} - z_t)

    :math:`\alpha` takes every gradient, even at :math:`\eta_t = 0`; a step with
    :math:`\|s_t\|_1 = 0` is skipped (zero update, :math:`d, q` stay). Because the iterate is
    :math:`\theta_0 - w_t s_t`, a zero learning rate does not freeze the parameters: new
    gradients still grow :math:`\alpha_t` and so shrink the distance travelled.

    Args:
      learning_rate: multiplies the estimated step size; a number or a schedule ``count -> value``
        (count from 0, every call of ``update``).
      momentum: :math:`\mu` in [0, 1), an average of the iterates (0: none).
      eps: :math:`\epsilon`, added to :math:`\sqrt{\alpha}`, > 0.
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{t+1} / d_t`, in [1, inf] (inf: no cap).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DAdaptAdaGradState`; its update is
      to be subtracted (``dadapt_adagrad`` negates it). ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_dadapt_adagrad()
      >>> params = jnp.array([1.0, -2.0])
      >>> state = block.init(params)
      >>> step, state = block.update(params, state, params)
      >>> state.alpha  # 1e-6 + g^2
      Array([1.000001, 4.000001], dtype=float32)

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt AdaGrad, dual averaging).

      Reference package: ``dadaptation`` (https://github.com/facebookresearch/dadaptation);
      :func:`dadapt_adagrad` gives the arguments that reproduce its ``DAdaptAdaGrad``.
    """
    base.check_learning_rate(learning_rate)
    base.check_decay("momentum", momentum)
    base.check_scalar("eps", eps, low=0.0, low_open=True)
    check_d0(d0)
    check_growth_rate(growth_rate)

    def init_fn(params: base.Params) -> DAdaptAdaGradState:
        dtype = moments.scalar_dtype(params)
        return DAdaptAdaGradState(
            count=moments.zero_count(),
            d=jnp.asarray(d0).astype(dtype),
            gsq_weighted=jnp.zeros([], dtype),
            alpha=moments.init_like(params, fill=ADAGRAD_INITIAL_ACCUMULATOR, real=True),
            s=moments.init_like(params),
            x0=moments.init_copy(params),
        )

    def update_fn(
        updates: Updates, state: DAdaptAdaGradState, params: base.Params | None = None
    ) -> tuple[Updates, DAdaptAdaGradState]:
        params = base.require_params(params, "dadapt_adagrad")
        dtype = state.d.dtype
        lr = numerics.learning_rate_at(learning_rate, state.count, dtype)
        d = state.d
        dlr = d * lr

        def accumulate(g: jax.Array, a: jax.Array, s: jax.Array) -> tuple[jax.Array, ...]:
            cd, g32, (a32, s32) = moments.to_compute(g, a, s)
            g2 = moments.abs_sq(g32)
            a_new = a32 + g2
            denominator = jnp.sqrt(a_new) + moments.scalar(eps, cd)
            s_new = s32 + moments.times(g32, dlr.astype(cd))
            g_sq = jnp.sum(g2 / denominator)
            sk_sq = jnp.sum(moments.abs_sq(s_new) / denominator)
            return moments.store(a_new, a), moments.store(s_new, s), g_sq, sk_sq, jnp.sum(jnp.abs(s_new))

        alpha, s, g_sqs, sk_sqs, l1s = moments.leafwise(accumulate, 5, updates, state.alpha, state.s)
        skl1 = numerics.tree_sum(l1s, dtype)
        taken = skl1 != 0
        gsq_weighted = state.gsq_weighted + dlr * dlr * numerics.tree_sum(g_sqs, dtype)
        d_hat = moments.safe_divide(numerics.tree_sum(sk_sqs, dtype) - gsq_weighted, skl1)
        d_new = jnp.where(lr > 0, grown(d, capped(d_hat, d, growth_rate)), d)
        ck = 1 - moments.scalar(momentum, dtype)

        def step(g: jax.Array, p: jax.Array, a: jax.Array, s: jax.Array, x0: jax.Array) -> tuple[jax.Array]:
            cd, _, (p32, a32, s32, x032) = moments.to_compute(g, p, a, s, x0)
            z = x032 - moments.over_nonzero(s32, jnp.sqrt(a32) + moments.scalar(eps, cd))
            u = moments.times(p32 - z, moments.scalar(ck, cd))
            return (jnp.where(taken, u, 0).astype(g.dtype),)

        (out,) = moments.leafwise(step, 1, updates, params, alpha, s, state.x0, what="parameters and state")
        return out, DAdaptAdaGradState(
            count=moments.safe_increment(state.count),
            d=gate(taken, d_new, d),
            gsq_weighted=gate(taken, gsq_weighted, state.gsq_weighted),
            alpha=alpha,
            s=s,
            x0=state.x0,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def dadapt_adagrad(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: Any = 0.0,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    d0: Any = 1e-6,
    growth_rate: Any = math.inf,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""D-Adapt AdaGrad: dual-averaged AdaGrad with a step size :math:`d_t \eta_t` estimated on the fly.

    .. math::
        g_t \leftarrow g_t + \lambda \theta_{t-1}, \qquad
        \theta_t = \mu \theta_{t-1} + (1 - \mu) \Big( \theta_0 - \frac{s_t}{\sqrt{\alpha_t} + \epsilon} \Big)

    with :math:`s_t, \alpha_t, d_t` as in :func:`scale_by_dadapt_adagrad`.

    Args:
      learning_rate: multiplies the estimated step size; keep 1 unless the method is unstable.
        A number or a schedule ``count -> value`` (count from 0).
      momentum: :math:`\mu` in [0, 1), an average of the iterates (0: none).
      eps: :math:`\epsilon`, added to :math:`\sqrt{\alpha}`, > 0.
      weight_decay: the coupled decay :math:`\lambda` >= 0.
      weight_decay_mask: a tree of booleans, or a function of the parameters returning one,
        selecting the leaves to decay (None: all of them).
      d0: the initial estimate :math:`d_0` > 0.
      growth_rate: the cap on :math:`d_{t+1} / d_t`, in [1, inf] (inf: no cap).
      complex_convention: for complex parameters, ``"modulus"`` (AdaGrad's sums of
        :math:`|g|^2` per complex coordinate, :math:`|s|` the modulus) or ``"real_imag"`` (the real
        and imaginary parts as two real coordinates); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.dadapt_adagrad()  # no learning rate to tune
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(100):  # minimise sum(x^2) / 2, whose gradient is x
      ...     updates, state = opt.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> float(optax.tree.get(state, "d")) > 0.1  # the distance estimate, grown from d0 = 1e-6
      True

    References:
      Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
      https://arxiv.org/abs/2301.07733 (D-Adapt AdaGrad, dual averaging).

      Reference package: ``dadaptation`` 3.2 (https://github.com/facebookresearch/dadaptation).
      ``dadaptation.DAdaptAdaGrad(lr, momentum, weight_decay, eps, d0, growth_rate)`` follows the
      same trajectory as ``dadapt_adagrad(learning_rate=lr, momentum, eps, weight_decay, d0=d0,
      growth_rate=growth_rate)`` for dense gradients (its sparse-gradient path has no JAX
      counterpart). Its running totals of :math:`\sum w s^2` and :math:`\|s\|_1` are
      recomputed here each step (equal in exact arithmetic).
    """
    check_common(learning_rate, weight_decay, d0, growth_rate)
    base.check_complex_convention(complex_convention)
    core = scale_by_dadapt_adagrad(learning_rate, momentum, eps, d0=d0, growth_rate=growth_rate)
    return base.assemble(core, 1.0, weight_decay, weight_decay_mask, complex_convention=complex_convention)
