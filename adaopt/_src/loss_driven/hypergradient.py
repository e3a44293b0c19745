"""Hypergradient descent: the learning rate itself descends the loss, for SGD, Nesterov SGD and Adam.

One wrapper, :func:`hypergradient`, turns any direction transformation (the identity, momentum,
Adam's moments) into its hypergradient form: it keeps the previous direction :math:`d_{t-1}`,
moves the learning rate by the derivative of the loss with respect to it, and applies the rate
itself. :func:`sgd_hd`, :func:`sgdn_hd` and :func:`adam_hd` are the paper's three algorithms.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.adam import scale_by_adam
from adaopt._src.optimizers.sgd import scale_by_momentum


class HypergradientState(NamedTuple):
    r"""State of :func:`hypergradient`: the learned learning rate, the previous direction and the inner state.

    Attributes:
      count: the number of updates so far, a saturating int32.
      learning_rate: the rate :math:`\alpha_t` of the last step (:math:`\alpha_0` before the first).
      adaptation: what the hypergradient has learned on top of the given rate :math:`\eta_t`: the
        offset :math:`\delta_t` (additive rule, starts at 0) or the factor :math:`\rho_t`
        (multiplicative rule, starts at 1).
      direction: :math:`d_{t-1}`, one copy of the parameters' size.
      inner_state: the state of the wrapped direction transformation.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    learning_rate: jax.Array
    adaptation: jax.Array
    direction: Updates
    inner_state: optax.OptState

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"learning_rate": self.learning_rate}


@base.check_flags
def hypergradient(
    inner: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    hyper_lr: Any,
    multiplicative: bool = False,
    *,
    per_leaf_update: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap a direction transformation so that its learning rate descends the loss by its hypergradient.

    With :math:`g_t` the incoming gradient, :math:`d_t` the direction ``inner`` computes from it
    (before the learning rate) and :math:`\eta_t` the given ``learning_rate``:

    .. math::
        h_t &= -\, g_t \cdot d_{t-1} \qquad (= \partial f(\theta_{t-1}) / \partial \alpha_{t-1};\ d_0 = 0) \\
        \delta_t &= \delta_{t-1} - \beta\, h_t, \qquad \alpha_t = \eta_t + \delta_t
            \qquad \text{(additive rule; } \delta_0 = 0) \\
        \rho_t &= \rho_{t-1} \Big(1 - \beta\, \frac{h_t}{\|g_t\|\,\|d_{t-1}\|}\Big), \qquad
            \alpha_t = \eta_t\, \rho_t \qquad \text{(multiplicative rule; } \rho_0 = 1,
            \text{ the fraction is 0 where a norm is 0)} \\
        d_t &= \mathrm{inner}(g_t) \\
        \text{update}_t &= -\alpha_t\, d_t

    With a constant :math:`\eta` the additive rule is the paper's
    :math:`\alpha_t = \alpha_{t-1} - \beta h_t` from :math:`\alpha_0 = \eta`, and the
    multiplicative one is :math:`\alpha_t = \alpha_{t-1}(1 + \beta \cos(g_t, d_{t-1}))`. A
    schedule :math:`\eta_t` is followed, with the learned offset (or factor) on top of it.

    With ``per_leaf_update=True`` (additive rule only), the rate moves after each leaf, in the
    tree's leaf order, and each leaf steps with the rate reached so far, as the authors' torch
    ``AdamHD`` does parameter tensor by parameter tensor: leaf :math:`i` steps with
    :math:`\eta_t + \delta_{t-1} - \beta \sum_{j \le i} h_{t,j}`; the rate after the step is the
    same as without it.

    The hypergradient costs one copy of the parameters' size (the previous direction) and one
    global dot product per step (three reductions with the multiplicative rule), accumulated in
    the state's scalar dtype (the parameters' widest float, at least float32). The learning rate
    lives in the state: ``learning_rate`` only sets where it starts (and, as a schedule, the base
    it follows), so changing it through ``inject_hyperparams`` after ``init`` shifts the rate by
    the change (additive rule) or scales it (multiplicative rule) but keeps what was learned. The
    wrapper applies the learning rate itself: chain nothing that rescales after it.

    Args:
      inner: the direction transformation, e.g. ``optax.identity()`` (SGD),
        :func:`adaopt.scale_by_momentum` (heavy-ball or Nesterov) or
        :func:`adaopt.scale_by_adam`. Extra arguments of ``update`` are passed on to it.
      learning_rate: the initial learning rate :math:`\eta` (>= 0; 0 works: the hypergradient
        raises it), or a schedule ``count -> value``.
      hyper_lr: :math:`\beta`, the hypergradient learning rate, >= 0 (additive rule; 0 recovers
        the inner algorithm), or in [0, 1) (multiplicative rule, which keeps the rate's sign).
      multiplicative: use the multiplicative rule (Martínez Rubio, 2017), whose :math:`\beta` is
        dimensionless: the rate changes by at most a factor :math:`1 \pm \beta` per step.
      per_leaf_update: move the rate after each leaf (see above), the authors' ``AdamHD``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`HypergradientState`.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.hypergradient(optax.identity(), learning_rate=0.1, hyper_lr=0.01)
      >>> params = jnp.array([1.0, 2.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update(params, state)  # the gradient of |x|^2 / 2
      ...     params = params + updates
      >>> state.learning_rate  # 0.1 + 0.01 * (0.9 * 1 + 1.8 * 2): raised, as the gradients agree
      Array(0.145, dtype=float32)

    References:
      Baydin, Cornish, Martínez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with
      Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782 (the additive rule,
      Algorithms 1 to 3).

      Martínez Rubio, "Convergence Analysis of an Adaptive Method of Gradient Descent", MSc
      thesis, University of Oxford, 2017 (the multiplicative rule, which the paper cites).

      Reference package: the authors' torch code, https://github.com/gbaydin/hypergradient-descent;
      :func:`sgd_hd` and :func:`adam_hd` give the arguments that reproduce its ``SGDHD`` and ``AdamHD``.
    """
    base.check_transformation("inner", inner)
    base.check_learning_rate(learning_rate)
    if multiplicative:
        base.check_scalar("hyper_lr", hyper_lr, low=0.0, high=1.0, high_open=True)
        if per_leaf_update:
            raise base.HyperparameterError(
                "per_leaf_update=True requires the additive rule (multiplicative=False), got multiplicative=True."
            )
    else:
        base.check_nonnegative("hyper_lr", hyper_lr)
    inner_tx = base.with_extra_args(inner)

    def init_fn(params: base.Params) -> HypergradientState:
        dtype = moments.scalar_dtype(params)
        count = moments.zero_count()
        return HypergradientState(
            count=count,
            learning_rate=numerics.learning_rate_at(learning_rate, count, dtype),
            adaptation=jnp.asarray(1.0 if multiplicative else 0.0, dtype),
            direction=moments.init_like(params),
            inner_state=inner_tx.init(params),
        )

    def update_fn(
        updates: Updates, state: HypergradientState, params: base.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, HypergradientState]:
        dtype = state.learning_rate.dtype
        beta = moments.scalar(hyper_lr, dtype)
        eta = numerics.learning_rate_at(learning_rate, state.count, dtype)
        base.check_tree_match(updates, state.direction, "hypergradient state")
        if per_leaf_update:
            h_tree = jax.tree.map(lambda g, d: -numerics.vdot(g, d, dtype), updates, state.direction)
            h_leaves = jax.tree.leaves(h_tree)
            h = numerics.tree_sum(h_leaves, dtype)
        else:
            h = -numerics.vdot(updates, state.direction, dtype)
        if multiplicative:
            norms = numerics.norm(updates, dtype) * numerics.norm(state.direction, dtype)
            adaptation = state.adaptation * (1 - beta * moments.safe_divide(h, norms))
            alpha = eta * adaptation
        else:
            adaptation = state.adaptation - beta * h
            alpha = eta + adaptation

        direction, inner_state = inner_tx.update(updates, state.inner_state, params, **extra_args)
        base.check_tree_match(
            direction,
            state.direction,
            "previous direction (`inner` must return a tree of the gradients' structure)",
            subject="directions computed by `inner`",
        )
        if per_leaf_update:
            # The rate reached after each leaf, in the tree's leaf order (the authors' AdamHD).
            partial = jnp.cumsum(jnp.stack(h_leaves)) if h_leaves else jnp.zeros([0], dtype)
            rates = list(eta + state.adaptation - beta * partial)
            flat, treedef = jax.tree.flatten(direction)
            steps = jax.tree.unflatten(treedef, [moments.scale_leaf(-r, d) for r, d in zip(rates, flat, strict=True)])
        else:
            steps = jax.tree.map(lambda d: moments.scale_leaf(-alpha, d), direction)
        stored = jax.tree.map(lambda d, old: d.astype(old.dtype), direction, state.direction)
        new_state = HypergradientState(moments.safe_increment(state.count), alpha, adaptation, stored, inner_state)
        return steps, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@base.check_flags
def sgd_hd(
    learning_rate: ScalarOrSchedule = 1e-3,
    hyper_lr: Any = 1e-3,
    momentum: Any = None,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    nesterov: bool = False,
    multiplicative: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD-HD: stochastic gradient descent whose learning rate follows its hypergradient.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        h_t &= -\, g_t \cdot d_{t-1}, \qquad \alpha_t = \alpha_{t-1} - \beta h_t \;(\alpha_0 = \eta) \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t \;(b_1 = g_1), \qquad
        d_t = g_t \;(\mu = 0), \quad b_t, \quad\text{or}\quad g_t + \mu b_t \;\text{(nesterov)} \\
        \theta_t &= \theta_{t-1} - \alpha_t d_t

    (the learning rate is :func:`hypergradient`'s; with a schedule, :math:`\alpha_t = \eta_t + \delta_t`).

    Args:
      learning_rate: the initial learning rate :math:`\alpha_0` (the paper's experiments: 1e-3),
        or a schedule the learned offset is added to.
      hyper_lr: :math:`\beta` >= 0; the paper's experiments use 1e-3 (the authors' ``SGDHD``
        defaults to 1e-6). With ``multiplicative=True``, in [0, 1).
      momentum: :math:`\mu` in [0, 1), or None for plain SGD-HD with no momentum buffer. A
        number, even 0, keeps one, so that the state's structure does not depend on the value.
      dampening: :math:`\tau` in [0, 1], torch's dampening of the momentum.
      weight_decay: coupled (L2) decay coefficient, >= 0, added to the gradient before the
        hypergradient, as the authors' code does.
      nesterov: Nesterov momentum (requires ``momentum > 0`` and no dampening): Algorithm 2.
      multiplicative: the multiplicative rule of :func:`hypergradient`.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      accumulator_dtype: storage dtype of the momentum buffer (default: the parameter's, at least
        float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: :class:`HypergradientState` inside a chain).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.sgd_hd(learning_rate=0.1, hyper_lr=0.01)
      >>> params = jnp.array([1.0, 2.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update(params, state, params)  # the gradient of |x|^2 / 2
      ...     params = params + updates
      >>> state[-1].learning_rate  # the rate rose: consecutive gradients agree
      Array(0.145, dtype=float32)

    References:
      Baydin, Cornish, Martínez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with
      Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782, Algorithm 1 (SGD-HD)
      and, with ``nesterov=True``, Algorithm 2 (SGDN-HD).

      Reference package: the authors' torch ``SGDHD(lr, momentum, dampening, weight_decay,
      nesterov, hypergrad_lr)`` (https://github.com/gbaydin/hypergradient-descent) follows the
      same trajectory with ``hyper_lr=hypergrad_lr`` and the same other numbers (it takes a single
      parameter group: decay on every parameter).
    """
    base.check_learning_rate(learning_rate)
    base.check_nonnegative("weight_decay", weight_decay)
    moments.check_storage("accumulator_dtype", accumulator_dtype)
    base.check_nesterov(momentum, nesterov)
    if momentum is None:
        base.check_scalar("dampening", dampening, low=0.0, high=1.0)
        inner: optax.GradientTransformation = optax.identity()
    else:
        inner = scale_by_momentum(momentum, dampening, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
    # A wrapper of the direction (adaopt.cautious) wraps it here: the rate then learns from the step taken.
    core = hypergradient(base.wrapped_core(inner, False), learning_rate, hyper_lr, multiplicative)
    # The hypergradient's inner products are real ones, and SGD is linear: both conventions agree.
    return base.assemble(core, None, weight_decay, weight_decay_mask, complex_convention="modulus", wrap_core=False)


@base.check_flags
def sgdn_hd(
    learning_rate: ScalarOrSchedule = 1e-3,
    hyper_lr: Any = 1e-3,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    *,
    multiplicative: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGDN-HD: SGD with Nesterov momentum whose learning rate follows its hypergradient.

    .. math::
        h_t = -\, g_t \cdot d_{t-1}, \quad \alpha_t = \alpha_{t-1} - \beta h_t, \quad
        b_t = \mu b_{t-1} + g_t, \quad d_t = g_t + \mu b_t, \quad \theta_t = \theta_{t-1} - \alpha_t d_t

    (:func:`sgd_hd` with ``nesterov=True`` and no dampening).

    Args:
      learning_rate: the initial learning rate :math:`\alpha_0` (the paper's experiments: 1e-3),
        or a schedule the learned offset is added to.
      hyper_lr: :math:`\beta` >= 0 (the paper's experiments: 1e-3). With ``multiplicative=True``,
        in [0, 1).
      momentum: :math:`\mu` in (0, 1) (the paper's 0.9).
      weight_decay: coupled (L2) decay coefficient, >= 0, added to the gradient before the
        hypergradient.
      multiplicative: the multiplicative rule of :func:`hypergradient`.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      accumulator_dtype: storage dtype of the momentum buffer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: :class:`HypergradientState` inside a chain).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.sgdn_hd(learning_rate=0.1, hyper_lr=0.01, momentum=0.9)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([2.0]), opt.init(params), params)
      >>> updates  # the first step: -0.1 * (g + 0.9 * g)
      Array([-0.38], dtype=float32)

    References:
      Baydin, Cornish, Martínez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with
      Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782, Algorithm 2.

      Reference package: the authors' torch ``SGDHD(lr, momentum, nesterov=True, weight_decay,
      hypergrad_lr)`` (https://github.com/gbaydin/hypergradient-descent) follows the same
      trajectory with ``hyper_lr=hypergrad_lr`` and the same other numbers.
    """
    base.check_decay("momentum", momentum)
    if base.is_zero(momentum):
        raise base.HyperparameterError("sgdn_hd needs momentum in (0, 1), got momentum=0.")
    return sgd_hd(
        learning_rate, hyper_lr, momentum, 0.0, weight_decay, nesterov=True, multiplicative=multiplicative,
        weight_decay_mask=weight_decay_mask, accumulator_dtype=accumulator_dtype,
    )  # fmt: skip


class DebiasedStepState(NamedTuple):
    """State of the debiasing block of :func:`adam_hd`: the step count."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _scale_by_debiased_step(b1: Any, b2: Any) -> optax.GradientTransformation:
    r"""Multiply the whole step by :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)` (old torch Adam's debiasing)."""

    def update_fn(
        updates: Updates, state: DebiasedStepState, params: base.Params | None = None
    ) -> tuple[Updates, DebiasedStepState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def factor(dtype: jnp.dtype) -> jax.Array:
            return jnp.sqrt(moments.bias_correction(b2, count, dtype)) / moments.bias_correction(b1, count, dtype)

        scaled = jax.tree.map(lambda u: moments.scale_leaf(factor(moments.compute_dtype(u.dtype)), u), updates)
        return scaled, DebiasedStepState(count)

    return optax.GradientTransformation(lambda params: DebiasedStepState(moments.zero_count()), update_fn)


@base.check_flags
def adam_hd(
    learning_rate: ScalarOrSchedule = 1e-3,
    hyper_lr: Any = 1e-7,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    multiplicative: bool = False,
    eps_before_debias: bool = True,
    per_leaf_update: bool = True,
    weight_decay_mask: base.MaskOrFn | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Adam-HD: Adam whose learning rate follows its hypergradient.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        h_t &= -\, g_t \cdot d_{t-1}, \qquad \alpha_t = \alpha_{t-1} - \beta h_t \;(\alpha_0 = \eta) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        d_t &= \frac{m_t}{\sqrt{v_t} + \epsilon} \cdot \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \;\text{(eps\_before\_debias, the authors' code)} \quad\text{or}\quad
            \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} \;\text{(the paper's)} \\
        \theta_t &= \theta_{t-1} - \alpha_t d_t

    where, with ``per_leaf_update`` (the default, as the authors' code), the rate moves leaf by
    leaf within a step (see :func:`hypergradient`).

    Args:
      learning_rate: the initial learning rate :math:`\alpha_0` (the paper's experiments: 1e-3),
        or a schedule the learned offset is added to.
      hyper_lr: :math:`\beta` >= 0; the paper's experiments use 1e-7 (1e-8 for VGG on
        CIFAR-10), the authors' ``AdamHD`` defaults to 1e-8. With ``multiplicative=True``, in [0, 1).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      weight_decay: coupled (L2) decay coefficient, >= 0, added to the gradient before the
        hypergradient, as the authors' code does.
      multiplicative: the multiplicative rule of :func:`hypergradient` (implies
        ``per_leaf_update=False``).
      eps_before_debias: add eps to :math:`\sqrt{v_t}` before the bias correction, as the
        authors' code (and torch's Adam before 1.0) does; False gives the paper's Algorithm 3,
        which is :func:`adaopt.adam`'s step.
      per_leaf_update: move the rate after each leaf, as the authors' code does per parameter
        tensor; False moves it once per step with the global :math:`h_t`, as the paper writes it.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: :class:`HypergradientState` inside a chain).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adam_hd(learning_rate=1e-3, hyper_lr=1e-7)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> updates["w"].round(6)  # the first step is -learning_rate * sign(g), up to eps
      Array([-0.001, -0.001, -0.001], dtype=float32)

    References:
      Baydin, Cornish, Martínez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with
      Hypergradient Descent", ICLR 2018, https://arxiv.org/abs/1703.04782, Algorithm 3.

      Reference package: the authors' torch ``AdamHD(lr, betas=(b1, b2), eps, weight_decay,
      hypergrad_lr)`` (https://github.com/gbaydin/hypergradient-descent) follows the same
      trajectory with ``hyper_lr=hypergrad_lr``, the defaults ``eps_before_debias=True,
      per_leaf_update=True``, the parameters in the same order as the tree's leaves, and a single
      parameter group (torch keeps one learning rate per group). Its per-tensor update makes a
      leaf's step depend on the leaves before it; ``per_leaf_update=False`` removes that
      dependence on the tree's order.
    """
    base.check_learning_rate(learning_rate)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_complex_convention(complex_convention)
    if eps_before_debias:
        inner: optax.GradientTransformation = optax.chain(
            scale_by_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
            _scale_by_debiased_step(b1, b2),
        )
    else:
        inner = scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    core = hypergradient(  # a wrapper of the direction wraps it here, as sgd_hd's
        base.wrapped_core(inner, False), learning_rate, hyper_lr, multiplicative,
        per_leaf_update=per_leaf_update and not multiplicative,
    )  # fmt: skip
    return base.assemble(  # core applies the learning rate
        core, None, weight_decay, weight_decay_mask, complex_convention=complex_convention, wrap_core=False
    )
