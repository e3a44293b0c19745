"""COCOB-Backprop: per-coordinate coin betting, SGD with no learning rate to tune."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, complex_params, moments
from adaopt._src.base import ScalarOrSchedule, Updates


class CocobState(NamedTuple):
    r"""State of :func:`scale_by_cocob`; every field but the count mirrors the parameters.

    Attributes:
      count: the number of updates so far, a saturating int32.
      reference: :math:`w_1`, the parameters at the first update (the bets' origin), each in its
        own dtype.
      neg_grad_sum: :math:`\theta`, the sum of the negative gradients.
      max_grad: :math:`L`, the largest :math:`|g|` seen (from ``eps``).
      abs_grad_sum: :math:`G`, the sum of :math:`|g|`.
      reward: :math:`R`, the wealth won by the bets, clamped at 0.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    reference: Updates
    neg_grad_sum: Updates
    max_grad: Updates
    abs_grad_sum: Updates
    reward: Updates


def scale_by_cocob(alpha: Any = 100.0, eps: Any = 1e-8) -> optax.GradientTransformation:
    r"""COCOB-Backprop's block: the update that moves the parameters to the next coin bet.

    Per coordinate, with :math:`g_t` the incoming update (the gradient) and :math:`w_t` the
    parameters passed to ``update``:

    .. math::
        w_1 &= \text{the parameters at the first update} \\
        L_t &= \max(L_{t-1}, |g_t|), \quad L_0 = \epsilon \\
        G_t &= G_{t-1} + |g_t| \\
        R_t &= \max\big(R_{t-1} - g_t (w_t - w_1),\ 0\big) \\
        \theta_t &= \theta_{t-1} - g_t \\
        \text{update} &= w_1 + \frac{\theta_t}{L_t \max(G_t + L_t,\ \alpha L_t)} (L_t + R_t) - w_t

    (the bet is 0 where :math:`L_t \max(\cdot) = 0`, i.e. with ``eps=0`` before the first
    non-zero gradient of a coordinate). Needs ``params`` in ``update``.

    Args:
      alpha: :math:`\alpha` >= 0; the denominator is at least :math:`\alpha L_t^2`, which damps
        the first bets: roughly a number of warm-up steps.
      eps: :math:`\epsilon` >= 0, the initial :math:`L_0`; 0 is the paper's initialisation.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`CocobState`; ``update`` needs the
      parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_cocob(alpha=10.0, eps=0.0)
      >>> params = jnp.zeros(2)
      >>> state = block.init(params)
      >>> step, state = block.update(jnp.array([2.0, -1.0]), state, params)
      >>> step  # theta L / (L max(G + L, alpha L)) = -g / (alpha |g|)
      Array([-0.1,  0.1], dtype=float32)

    References:
      Orabona & Tommasi, "Training Deep Networks without Learning Rates Through Coin Betting",
      NeurIPS 2017, https://arxiv.org/abs/1705.07795, Algorithm 2 (COCOB-Backprop).

      Reference package: the authors' ``parameterfree`` (https://github.com/bremen79/parameterfree);
      :func:`cocob` gives the arguments that reproduce its ``COCOB``.
    """
    base.check_nonnegative("alpha", alpha)
    base.check_nonnegative("eps", eps)

    def init_fn(params: base.Params) -> CocobState:
        return CocobState(
            count=moments.zero_count(),
            reference=moments.init_copy(params, keep_dtype=True),
            neg_grad_sum=moments.init_like(params),
            max_grad=moments.init_like(params, fill=eps, real=True),
            abs_grad_sum=moments.init_like(params, real=True),
            reward=moments.init_like(params, real=True),
        )

    def update_fn(updates: Updates, state: CocobState, params: base.Params | None = None) -> tuple[Updates, CocobState]:
        params = base.require_params(params, "cocob")
        first = state.count == 0

        def leaf(g: jax.Array, w: jax.Array, w1: jax.Array, *acc: jax.Array) -> tuple[jax.Array, ...]:
            # The reference is taken at the first update (as the authors' package does), so
            # parameters loaded between init and the first step are the origin of the bets.
            w1 = jnp.where(first, w, w1)
            dtype, g32, (w32, w1_32, theta, big_l, big_g, reward) = moments.to_compute(g, w, w1, *acc)
            abs_g = jnp.abs(g32)
            big_l = jnp.maximum(big_l, abs_g)
            big_g = big_g + abs_g
            reward = jnp.maximum(reward - moments.real_product(g32, w32 - w1_32), 0)
            theta = theta - g32
            den = big_l * jnp.maximum(big_g + big_l, moments.scalar(alpha, dtype) * big_l)
            nonzero = den != 0  # the package's order of operations: ((reward + L) * theta) / den
            bet = jnp.where(nonzero, moments.over(moments.times(theta, reward + big_l), jnp.where(nonzero, den, 1)), 0)
            step = w1_32 + bet - w32
            new = (theta, big_l, big_g, reward)
            return (step.astype(g.dtype), w1, *(x.astype(a.dtype) for x, a in zip(new, acc, strict=True)))

        base.check_tree_match(updates, params, "parameters")
        trees = (state.reference, state.neg_grad_sum, state.max_grad, state.abs_grad_sum, state.reward)
        step, *new = moments.leafwise(leaf, 6, updates, params, *trees)
        return step, CocobState(moments.safe_increment(state.count), *new)

    return optax.GradientTransformation(init_fn, update_fn)


def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: Any = 100.0,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""COCOB-Backprop: per-coordinate coin betting, with no step size to tune.

    Each coordinate bets a fraction of the wealth its past bets won on the sign of the next
    negative gradient; the parameters are the bets, measured from the first parameters
    :math:`w_1`. With :math:`\tilde g_t` the (weighted) gradient:

    .. math::
        \tilde g_t &= \eta_t \,(g_t + \lambda w_t) \\
        L_t &= \max(L_{t-1}, |\tilde g_t|), \quad L_0 = \epsilon \\
        G_t &= G_{t-1} + |\tilde g_t| \\
        R_t &= \max\big(R_{t-1} - \tilde g_t (w_t - w_1),\ 0\big) \\
        \theta_t &= \theta_{t-1} - \tilde g_t \\
        w_{t+1} &= w_1 + \frac{\theta_t}{L_t \max(G_t + L_t,\ \alpha L_t)} (L_t + R_t)

    The learning rate weights the gradients (the losses :math:`\eta_t f_t`), as optax does: the
    update is invariant to a constant :math:`\eta` (up to :math:`\epsilon`), and a schedule
    changes how much each step's gradient counts. It is not a multiplier of the step, so
    ``learning_rate=0`` leaves the state as it is and the parameters at the current bet.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``
        weighting the gradients (default 1).
      alpha: :math:`\alpha` >= 0, the warm-up of the bets (default 100, the paper's).
      eps: :math:`\epsilon` >= 0, the initial :math:`L_0` (default 1e-8); 0 is the paper's
        Algorithm 2 exactly.
      weight_decay: :math:`\lambda` >= 0, an L2 penalty added to the gradient (coupled).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      complex_convention: for complex parameters, ``"modulus"`` (a bet per complex coordinate:
        :math:`|g|` in the sums and maxima, a real reward :math:`\mathrm{Re}(\bar g (w - w_1))`,
        the bet along :math:`\theta`) or ``"real_imag"`` (a bet per real and imaginary part);
        see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.cocob()
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.array([1.0, -2.0])}, state, params)
      >>> updates["w"]  # the first bet: -g / (alpha |g|) * |g|, i.e. -sign(g) / alpha
      Array([-0.01,  0.01], dtype=float32)

    References:
      Orabona & Tommasi, "Training Deep Networks without Learning Rates Through Coin Betting",
      NeurIPS 2017, https://arxiv.org/abs/1705.07795, Algorithm 2 (COCOB-Backprop). It
      initialises :math:`L_{0} = 0`, :math:`G_0 = R_0 = \theta_0 = 0` and has neither learning
      rate nor decay: ``cocob(eps=0)`` with a constant learning rate and ``weight_decay=0`` is
      Algorithm 2; :math:`L`, :math:`G`, :math:`R`, :math:`\theta` and :math:`w_{t+1}` above are
      its lines, in its order.

      Reference package: the authors' ``parameterfree`` (https://github.com/bremen79/parameterfree).
      ``parameterfree.COCOB(params, alpha, eps, weight_decay)`` starts :math:`L_0 = \epsilon`
      (as their original TensorFlow code, with 1e-8) and adds :math:`\lambda w_t` to the
      gradient per parameter group: ``cocob(1.0, alpha, eps, weight_decay)`` (or any constant
      learning rate: it has none) follows the same trajectory.
      ``optax.contrib.cocob(learning_rate, alpha, eps, weight_decay, mask)`` is this with the
      same arguments, schedules included: it also adds the decay first and multiplies the
      gradient by the learning rate before the betting. It takes :math:`w_1` at ``init``,
      this at the first ``update`` (the same parameters unless they are replaced in between).
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    chain = optax.chain(
        base.check_gradient_tree(),
        base.add_decayed_weights(weight_decay, weight_decay_mask),
        base.scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha, eps),
    )
    return complex_params.with_convention(chain, complex_convention)
