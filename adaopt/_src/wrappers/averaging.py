"""Iterate averaging: a wrapper that keeps an average of any optimizer's iterates in its state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import Params, Updates


class PolynomialAverageState(NamedTuple):
    r"""State of :func:`polynomial_decay_averaging`: the count, the average and the wrapped optimizer's state.

    Attributes:
      count: :math:`t`, the number of averaged iterates, a saturating int32.
      average: :math:`\bar x_t`, the averaged parameters, mirroring the parameters.
      inner_state: the state of the wrapped optimizer.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    average: Params
    inner_state: Any


def polynomial_decay_averaging(
    inner: optax.GradientTransformation, gamma: Any = 8.0, *, average_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Keep the polynomial-decay average of the iterates of ``inner`` in the state.

    The updates are ``inner``'s, unchanged; after the :math:`t`-th update (:math:`t = 1, 2, \dots`),
    with :math:`x_t` the parameters that update produces (``apply_updates(params, updates)``):

    .. math::
        w_t &= (1 + \gamma) / (t + \gamma) \\
        \bar x_t &= (1 - w_t)\, \bar x_{t-1} + w_t\, x_t, \qquad \bar x_0 = x_0

    so :math:`\bar x_1 = x_1`, :math:`\gamma = 0` is the uniform average of :math:`x_1, \dots, x_t`,
    and a larger :math:`\gamma` forgets old iterates faster. Read the average with
    :func:`averaged_params`.

    Args:
      inner: the optimizer whose iterates are averaged.
      gamma: :math:`\gamma` >= 0 (8 in the DoG paper and package).
      average_dtype: storage dtype of the average (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`PolynomialAverageState`;
      ``update`` needs the parameters and passes extra arguments on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.polynomial_decay_averaging(adaopt.dog(), gamma=8.0)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> adaopt.averaged_params(state)["w"].shape
      (3,)

    References:
      Shamir & Zhang, "Stochastic Gradient Descent for Non-smooth Optimization: Convergence
      Results and Optimal Averaging Schemes", ICML 2013, https://arxiv.org/abs/1212.1824;
      recommended with DoG by Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend", ICML 2023,
      https://arxiv.org/abs/2302.12022.

      Reference package: ``dog-optimizer`` 1.0.3 (https://github.com/formll/dog).
      ``dog.PolynomialDecayAverager(model, gamma)``, stepped after each optimizer step, keeps the
      same average in ``averaged_model`` as ``polynomial_decay_averaging(inner, gamma)``.
    """
    base.check_transformation("inner", inner)
    base.check_nonnegative("gamma", gamma)
    base.check_dtype("average_dtype", average_dtype)
    wrapped = base.with_extra_args(inner)

    def init_fn(params: Params) -> PolynomialAverageState:
        return PolynomialAverageState(
            moments.zero_count(), moments.init_copy(params, average_dtype), wrapped.init(params)
        )

    def update_fn(
        updates: Updates, state: PolynomialAverageState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, PolynomialAverageState]:
        params = base.require_params(params, "polynomial_decay_averaging")
        updates, inner_state = wrapped.update(updates, state.inner_state, params, **extra_args)
        count = moments.safe_increment(state.count)

        def leaf(x: jax.Array, average: jax.Array) -> tuple[jax.Array]:
            dtype = moments.compute_dtype(x.dtype, average.dtype)
            g = moments.scalar(gamma, dtype)
            weight = (1 + g) / (count.astype(dtype) + g)
            x, average_c = moments.in_precision(x, dtype), moments.in_precision(average, dtype)
            return (moments.ema(x, average_c, 1 - weight).astype(average.dtype),)

        (average,) = moments.leafwise(
            leaf, 1, optax.apply_updates(params, updates), state.average, what="averaged parameters"
        )
        return updates, PolynomialAverageState(count, average, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(state: Any) -> Params:
    r"""The average :math:`\bar x_t` kept by :func:`polynomial_decay_averaging`, found anywhere in ``state``.

    Args:
      state: the state of the wrapper itself, or of anything that holds it (``chain``,
        ``inject_hyperparams``, ``MultiSteps``), holding exactly one
        :class:`PolynomialAverageState`; plain or an ``nnx.Optimizer``'s ``opt_state``.

    Returns:
      The average, with the parameters' tree (each leaf in the average's storage dtype). From
      an ``nnx.Optimizer``'s state, the arrays without the optimizer's variable wrappers (an
      ``nnx.State`` of arrays, which ``nnx.merge`` and ``nnx.update`` take as parameters).

    Raises:
      ValueError: ``state`` holds no :class:`PolynomialAverageState`, or more than one.
      TypeError: ``state`` is the ``nnx.Optimizer`` itself, not its ``opt_state``.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = optax.chain(optax.clip(1.0), adaopt.polynomial_decay_averaging(optax.sgd(0.5), gamma=0.0))
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):  # x_1 = 0.5, x_2 = 0: their uniform average
      ...     updates, state = opt.update(jnp.array([1.0]), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> adaopt.averaged_params(state)
      Array([0.25], dtype=float32)
    """
    fix = "build the optimizer with adaopt.polynomial_decay_averaging(optimizer), once, and pass its state."
    return numerics.find_state(state, PolynomialAverageState, fix).average
