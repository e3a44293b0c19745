"""Stochastic gradient descent with (heavy-ball or Nesterov) momentum and dampening."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates


class MomentumState(NamedTuple):
    """State of :func:`scale_by_momentum`.

    Attributes:
      count: the number of updates so far, a saturating int32 (the first step sets the buffer).
      trace: the momentum buffer :math:`b_t`, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    trace: Updates  # the momentum buffer, mirroring the parameters


@base.check_flags
def scale_by_momentum(
    momentum: Any = 0.9,
    dampening: Any = 0.0,
    *,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Momentum as torch defines it: the first step's buffer is the gradient itself.

    .. math::
        b_1 = g_1, \qquad b_t = \mu b_{t-1} + (1 - \tau) g_t, \qquad
        \text{update} = g_t + \mu b_t \;\text{(nesterov)} \quad\text{or}\quad b_t

    Args:
      momentum: :math:`\mu`, in [0, 1).
      dampening: :math:`\tau`, in [0, 1]; ignored when the momentum is 0 (as torch ignores it).
      nesterov: use Nesterov's momentum (requires dampening 0, as torch does).
      accumulator_dtype: storage dtype of the buffer (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MomentumState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_momentum(0.5, dampening=0.5)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (2.0, 2.0):
      ...     updates, state = tx.update(jnp.array([g]), state)
      ...     print(updates)  # b_1 = g_1, then 0.5 * 2 + 0.5 * 2
      [2.]
      [2.]

    References:
      Polyak, "Some methods of speeding up the convergence of iteration methods", USSR
      Computational Mathematics and Mathematical Physics 4(5), 1964,
      https://doi.org/10.1016/0041-5553(64)90137-5 (heavy-ball momentum).

      Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum in deep
      learning", ICML 2013, https://proceedings.mlr.press/v28/sutskever13.html (Nesterov's form).

      Reference packages: :func:`sgd` gives the arguments that reproduce torch and optax.
    """
    base.check_decay("momentum", momentum)
    base.check_scalar("dampening", dampening, low=0.0, high=1.0)
    moments.check_storage("accumulator_dtype", accumulator_dtype)
    if nesterov and base.known_nonzero(dampening):
        raise base.HyperparameterError(f"nesterov=True requires dampening=0, got dampening={dampening!r}.")
    # With no dampening, mu * 0 + g already gives the first step's buffer g, and g needs no
    # multiplication by 1 - 0 (a Python zero: one operation less per leaf to trace and compile).
    # A momentum of 0 takes no dampening either: torch's SGD is then plain SGD, whatever its dampening.
    damped = not (base.is_zero(dampening) or base.is_zero(momentum))

    def init_fn(params: base.Params) -> MomentumState:
        return MomentumState(moments.zero_count(), moments.init_like(params, accumulator_dtype))

    def update_fn(
        updates: Updates, state: MomentumState, params: base.Params | None = None
    ) -> tuple[Updates, MomentumState]:
        del params

        first_step = state.count == 0

        @moments.per_dtype
        def scalars(dtype: jax.numpy.dtype) -> tuple[Any, Any]:
            mu, tau = moments.scalar(momentum, dtype), moments.scalar(dampening, dtype)
            if not isinstance(mu, (int, float)):  # an array momentum may be 0 (a sweep's): no dampening there
                tau = jax.numpy.where(mu == 0, jax.numpy.zeros([], dtype), tau)
            return mu, 1 - tau

        def leaf(g: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (b32,) = moments.to_compute(g, b)
            mu, undamped = scalars(dtype)
            b_new = moments.times(b32, mu) + (moments.times(g32, undamped) if damped else g32)
            if damped:
                b_new = jax.numpy.where(first_step, g32, b_new)
            step = g32 + moments.times(b_new, mu) if nesterov else b_new
            return step.astype(g.dtype), moments.store(b_new, b)

        step, trace = moments.leafwise(leaf, 2, updates, state.trace)
        return step, MomentumState(moments.safe_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def sgd(
    learning_rate: ScalarOrSchedule = 1e-3,
    momentum: Any = None,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    nesterov: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic gradient descent, with optional momentum, dampening and Nesterov momentum.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad\text{(coupled decay)} \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t \;(b_1 = g_1), \qquad
        \theta_t = \theta_{t-1} - \eta_t \,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value``.
      momentum: :math:`\mu` in [0, 1), or None for plain SGD with no state. A number, even 0,
        keeps a momentum buffer, so that the state's structure does not depend on the value; at 0
        the dampening is ignored, as torch ignores it (its steps are plain SGD's).
      dampening: :math:`\tau` in [0, 1].
      weight_decay: coefficient :math:`\lambda` >= 0 (coupled L2 by default, as torch).
      nesterov: Nesterov momentum.
      weight_decay_mask: tree of booleans (or a function returning one) selecting decayed leaves.
      decoupled_weight_decay: add :math:`\lambda\theta` to the step instead of to the gradient.
      accumulator_dtype: storage dtype of the momentum buffer.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.sgd(0.1, momentum=0.9)
      >>> params = jnp.array([1.0])
      >>> updates, _ = opt.update(jnp.array([2.0]), opt.init(params), params)
      >>> updates
      Array([-0.2], dtype=float32)

    References:
      Polyak, "Some methods of speeding up the convergence of iteration methods", USSR
      Computational Mathematics and Mathematical Physics 4(5), 1964,
      https://doi.org/10.1016/0041-5553(64)90137-5 (heavy-ball momentum).

      Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum in deep
      learning", ICML 2013, https://proceedings.mlr.press/v28/sutskever13.html (Nesterov's form).

      Reference packages: ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)`` is
      this with the same numbers (its ``momentum=0`` is ``None`` here); ``optax.sgd(lr, momentum,
      nesterov)`` is this with no dampening or decay. Complex parameters need no convention: the
      step is linear in the gradient.
    """
    base.check_common(learning_rate, weight_decay)
    moments.check_storage("accumulator_dtype", accumulator_dtype)
    base.check_nesterov(momentum, nesterov)
    if momentum is None:
        base.check_scalar("dampening", dampening, low=0.0, high=1.0)
        core: optax.GradientTransformation = optax.identity()
    else:
        core = scale_by_momentum(momentum, dampening, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention="modulus",  # linear in the gradient: both conventions are this
    )
