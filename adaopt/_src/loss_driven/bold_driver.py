"""Bold driver: the learning rate grows while the loss falls and is cut when it rises, optionally undoing the step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates


class BoldDriverState(NamedTuple):
    r"""State of :func:`scale_by_bold_driver`: the learned rate and the loss it is compared with.

    Attributes:
      count: the number of updates so far, a saturating int32.
      learning_rate: the current rate :math:`\eta_t m_t` (:math:`\eta_0` before the first step).
      scale: :math:`m_t`, the product of the increases and decreases so far.
      previous_value: the loss at the point the last step started from.
      compare: whether the next loss is compared with it (not on the first step, nor right after
        an undo).
      previous_update: the update last applied, one copy of the parameters' size (``undo=True``
        only, else None).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    learning_rate: jax.Array
    scale: jax.Array
    previous_value: jax.Array
    compare: jax.Array
    previous_update: Updates | None = None

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"learning_rate": self.learning_rate}


def _check_factors(increase: Any, decrease: Any) -> None:
    base.check_scalar("increase", increase, low=1.0)
    base.check_scalar("decrease", decrease, low=0.0, high=1.0, low_open=True)


@base.check_flags
def scale_by_bold_driver(
    learning_rate: ScalarOrSchedule = 1e-2,
    increase: Any = 1.05,
    decrease: Any = 0.5,
    *,
    undo: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale the direction by a learning rate that the loss drives up while it falls and down when it rises.

    ``update(d_t, state, params, value=f_t)`` takes the direction :math:`d_t` (the gradient, or
    any block's output) and the loss :math:`f_t = f(\theta_{t-1})` at the current parameters:

    .. math::
        r_t &= [\text{compare} \wedge \neg(f_t \le f_{\text{prev}})] \qquad
            \text{(the loss rose; a non-finite loss counts as a rise)} \\
        m_t &= m_{t-1} \cdot \begin{cases}
            \text{decrease} & r_t \\ \text{increase} & \text{compare} \wedge f_t < f_{\text{prev}} \\
            1 & \text{otherwise (a tie, the first step, the step after an undo)} \end{cases}
            \qquad (m_0 = 1) \\
        \text{update}_t &= \begin{cases}
            -\,\text{update}_{t-1} & r_t \wedge \text{undo} \quad\text{(back to } \theta_{t-2}) \\
            -\,\eta_t m_t\, d_t & \text{otherwise} \end{cases} \\
        f_{\text{prev}} &\leftarrow f_t, \quad \text{compare} \leftarrow \text{true}
            \qquad \text{unless } r_t \wedge \text{undo} \text{ (then compare} \leftarrow \text{false)}

    A non-finite :math:`f_t` is never :math:`f_{\text{prev}}`: the last finite loss stays the one
    compared with (none before it: the next finite loss starts the comparisons), so a NaN or an
    infinity is one rise, not a rise and then a fall. A tie (a loss that stays exactly where it was:
    zero at an exact fit, a plateau of a piecewise-constant loss) leaves the rate as it is, and an
    increase that would make the rate :math:`\eta_t m_t` overflow is not taken: the rate stays
    finite (it grew without bound while the loss stayed at 0, until :math:`\infty \cdot 0` made the
    parameters NaN).

    With ``undo=True`` a rise costs a step: the step returns to the previous point (up to
    rounding) and the next one starts from there with the decreased rate, without comparing.
    The state then keeps the last applied update: one extra copy of the parameters' size, in
    their dtype. This block applies the learning rate itself and must be the last one in a
    chain, so that the update it reverts is the one that was applied; blocks before it (e.g.
    Adam's moments) have already seen the rejected gradient.

    The loss should be the full objective (include any regularization) and measured on the
    same data from step to step (full batch, or an average over many batches): a noisy loss
    rises often by chance and drives the rate down.

    Args:
      learning_rate: the initial learning rate :math:`\eta` (>= 0), or a schedule ``count -> value``
        that the learned factor :math:`m_t` multiplies.
      increase: factor applied while the loss falls, >= 1 (Battiti: 1.05 to 1.1).
      decrease: factor applied when it rises, in (0, 1] (Battiti: 0.5).
      undo: revert the last step when the loss rises (the default).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`BoldDriverState`, whose
      ``update`` requires ``value=``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_bold_driver(0.5, increase=2.0, decrease=0.25)
      >>> g = jnp.array([1.0])
      >>> state = tx.init(g)
      >>> for loss in [2.0, 1.0, 3.0]:  # the first is not compared; a fall; a rise, undone
      ...     updates, state = tx.update(g, state, value=loss)
      ...     print(updates, state.learning_rate)
      [-0.5] 0.5
      [-1.] 1.0
      [1.] 0.25

    References:
      Vogl, Mangis, Rigler, Zink & Alkon, "Accelerating the convergence of the back-propagation
      method", Biological Cybernetics 59, 1988, https://doi.org/10.1007/BF00332914 (with the undo).

      Battiti, "Accelerated backpropagation learning: two optimization methods", Complex Systems 3,
      1989 (the name "bold driver").

      There is no reference package to match; its tests check the rule itself.
    """
    base.check_learning_rate(learning_rate)
    _check_factors(increase, decrease)

    def init_fn(params: base.Params) -> BoldDriverState:
        dtype = moments.scalar_dtype(params)
        count = moments.zero_count()
        return BoldDriverState(
            count=count,
            learning_rate=numerics.learning_rate_at(learning_rate, count, dtype),
            scale=jnp.ones([], dtype),
            previous_value=jnp.zeros([], dtype),
            compare=jnp.zeros([], jnp.bool_),
            # In the parameters' own dtype: the undo replays the applied update exactly.
            previous_update=jax.tree.map(jnp.zeros_like, params) if undo else None,
        )

    def update_fn(
        updates: Updates,
        state: BoldDriverState,
        params: base.Params | None = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[Updates, BoldDriverState]:
        del params, extra_args
        dtype = state.scale.dtype
        f = base.loss_value(value, dtype, "bold_driver")
        finite = jnp.isfinite(f)
        fell = state.compare & finite & (f < state.previous_value)
        rose = state.compare & ~(finite & (f <= state.previous_value))  # NaN and both infinities: a rise
        factor = jnp.where(rose, moments.scalar(decrease, dtype), jnp.where(fell, moments.scalar(increase, dtype), 1))
        rate = numerics.learning_rate_at(learning_rate, state.count, dtype)
        scale = state.scale * factor.astype(dtype)
        scale = jnp.where(jnp.isfinite(rate * scale), scale, state.scale)  # an increase past the float's range: none
        alpha = rate * scale
        revert = rose if undo else jnp.zeros([], jnp.bool_)

        def leaf(d: jax.Array, *previous: jax.Array) -> tuple[jax.Array, ...]:
            step = moments.scale_leaf(-alpha, d)
            if not undo:
                return (step,)
            step = jnp.where(revert, -previous[0].astype(d.dtype), step)
            return step, step.astype(previous[0].dtype)

        if undo:
            steps, applied = moments.leafwise(leaf, 2, updates, state.previous_update)
        else:
            (steps,), applied = moments.leafwise(leaf, 1, updates), None
        # A non-finite loss counts as a rise, and is never the loss the next one is compared with: the last
        # finite one stays (none before it: the next loss starts the comparisons).
        new_state = BoldDriverState(
            count=moments.safe_increment(state.count),
            learning_rate=alpha,
            scale=scale,
            previous_value=jnp.where(revert | ~finite, state.previous_value, f),
            compare=~revert & (finite | state.compare),
            previous_update=applied,
        )
        return steps, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@base.check_flags
def bold_driver(
    learning_rate: ScalarOrSchedule = 1e-2,
    increase: Any = 1.05,
    decrease: Any = 0.5,
    weight_decay: Any = 0.0,
    *,
    undo: bool = True,
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Bold driver: gradient descent whose learning rate grows while the loss falls and is cut when it rises.

    .. math::
        m_t = m_{t-1} \cdot \begin{cases} \text{increase} & f_t < f_{t-1} \\
            1 & f_t = f_{t-1} \\ \text{decrease} & \text{otherwise} \end{cases}, \qquad
        \theta_t = \theta_{t-1} - \eta_t m_t\, (g_t + \lambda \theta_{t-1})
        \quad\text{or, after a rise with undo,}\quad \theta_t = \theta_{t-2}

    (exactly as :func:`scale_by_bold_driver`, applied to the gradient; :math:`m_1 = 1`, and the
    step after an undo keeps :math:`m`). Pass the loss at the current parameters to every
    update: ``update(grads, state, params, value=loss)``.

    Args:
      learning_rate: the initial learning rate (>= 0), or a schedule that the learned factor
        multiplies.
      increase: factor while the loss falls, >= 1.
      decrease: factor when it rises, in (0, 1].
      weight_decay: coupled (L2) decay coefficient :math:`\lambda` >= 0, added to the gradient. The
        rule compares the losses you pass: include :math:`\tfrac{\lambda}{2}\|\theta\|^2` in them to
        drive the rate by the regularised objective.
      undo: revert the step that made the loss rise (the default, as in Vogl et al.; costs one copy
        of the parameters' size). Without it a step that overshoots into a worse region is kept:
        full-batch training of a small MLP on digits then runs away (loss 2.4 -> 3.7e4 in 800 steps
        from the default rate), where with it the loss goes to 0.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``value=``.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> f = lambda x: jnp.sum(x**2)
      >>> opt = adaopt.bold_driver(1.5, undo=True)  # too large: each step overshoots
      >>> x = jnp.array([1.0])
      >>> state = opt.init(x)
      >>> for _ in range(3):
      ...     loss, grad = jax.value_and_grad(f)(x)
      ...     updates, state = opt.update(grad, state, x, value=loss)
      ...     x = x + updates
      ...     print(x, state[-1].learning_rate)
      [-2.] 1.5
      [1.] 0.75
      [-0.5] 0.75

    References:
      Vogl, Mangis, Rigler, Zink & Alkon, "Accelerating the convergence of the back-propagation
      method", Biological Cybernetics 59, 1988, https://doi.org/10.1007/BF00332914 (with the undo).

      Battiti, "Accelerated backpropagation learning: two optimization methods", Complex Systems 3,
      1989 (the name "bold driver").

      There is no reference package to match; its tests check the rule itself.
    """
    base.check_nonnegative("weight_decay", weight_decay)
    core = scale_by_bold_driver(learning_rate, increase, decrease, undo=undo)
    # Norms and real inner products of a step linear in the gradient: both conventions agree. With the undo, no
    # wrapper of the direction (adaopt.cautious): the undo replays the step the core returned, which a mask changes.
    return base.assemble(core, None, weight_decay, weight_decay_mask, complex_convention="modulus", wrap_core=not undo)
