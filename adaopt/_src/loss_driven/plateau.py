r"""Reduce the learning rate when the loss stops improving, exactly as torch's ``ReduceLROnPlateau``.

A transformation chained after an optimizer: it multiplies the updates by its current scale
and reads the loss as the extra argument ``value=`` of ``update``. The decision logic is
torch's, line for line, on the learning rate itself (so ``min_lr`` and ``eps`` are in learning
rate units, as in torch), and the scale is that learning rate over the base learning rate of
the optimizer it follows.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import Updates


class ReduceOnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`: torch's scheduler state, as arrays.

    The floats are in the parameters' widest float dtype, at least float32 (float64 parameters
    give torch's float64 learning rates exactly); a loss is cast to it.

    Attributes:
      scale: ``learning_rate / base_learning_rate``, which multiplies the updates.
      learning_rate: torch's ``param_groups[i]["lr"]``: the effective learning rate.
      best: the best evaluation so far (torch's ``best``).
      num_bad: evaluations without improvement (torch's ``num_bad_epochs``).
      cooldown_counter: evaluations of cooldown left (torch's ``cooldown_counter``).
      count: the losses accumulated into the current evaluation.
      value_sum: their sum.
    """

    scale: jax.Array
    learning_rate: jax.Array
    best: jax.Array
    num_bad: jax.Array
    cooldown_counter: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    value_sum: jax.Array

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"learning_rate": self.learning_rate, "plateau_scale": self.scale}


class ReduceOnPlateau(optax.GradientTransformationExtraArgs):
    """The transformation :func:`reduce_on_plateau` returns, with :meth:`observe` for evaluation losses."""

    def observe(self, state: Any, value: Any) -> Any:
        """Feed one loss (e.g. an evaluation loss between epochs) to the plateau state inside ``state``.

        Args:
          state: the state of this transformation, or of any chain, ``inject_hyperparams`` or
            ``MultiSteps`` that holds it (exactly one :class:`ReduceOnPlateauState`), plain or
            an ``nnx.Optimizer``'s ``opt_state``.
          value: the loss, a scalar.

        Returns:
          ``state`` with its :class:`ReduceOnPlateauState` updated as by ``update(...,
          value=value)``, the rest untouched, in ``state``'s form: for an ``nnx.Optimizer``'s
          state, new variables to assign back, ``optimizer.opt_state = plateau.observe(
          optimizer.opt_state, loss)`` (also inside ``nnx.jit``). Pure and jittable.

        Raises:
          ValueError: ``state`` holds no :class:`ReduceOnPlateauState`, or more than one.
          TypeError: ``state`` is the ``nnx.Optimizer`` itself, not its ``opt_state``.
        """
        values, rewrap = numerics.unwrap_variables(state)
        numerics.find_state(
            values,
            ReduceOnPlateauState,
            "pass to observe the optimizer state that contains this transformation's state (or that state itself).",
        )

        def feed(s: Any) -> Any:
            return self.update({}, s, value=value)[1] if isinstance(s, ReduceOnPlateauState) else s

        return rewrap(jax.tree.map(feed, values, is_leaf=_is_plateau_state))


def _is_plateau_state(x: Any) -> bool:
    return isinstance(x, ReduceOnPlateauState)


def reduce_on_plateau(
    base_learning_rate: Any = 1.0,
    *,
    mode: Literal["min", "max"] = "min",
    factor: Any = 0.1,
    patience: Any = 10,
    threshold: Any = 1e-4,
    threshold_mode: Literal["rel", "abs"] = "rel",
    cooldown: Any = 0,
    min_lr: Any = 0.0,
    eps: Any = 1e-8,
    accumulation_size: Any = 1,
) -> ReduceOnPlateau:
    r"""Scale the updates down by ``factor`` when the loss has not improved for ``patience`` evaluations.

    Chain it after an optimizer; ``update(updates, state, params, value=loss)`` multiplies the
    updates by the current scale :math:`s = \eta / \eta_0`, then takes the loss into account
    for the next update (as torch's ``scheduler.step(loss)`` after ``optimizer.step()``). Every
    ``accumulation_size`` losses, their mean :math:`v` is one evaluation, decided as torch does:

    .. math::
        \text{better} &= \begin{cases}
            v < b\,(1 - \theta) & \text{min, rel} \qquad v < b - \theta \quad \text{min, abs} \\
            v > b\,(1 + \theta) & \text{max, rel} \qquad v > b + \theta \quad \text{max, abs}
        \end{cases} \\
        b &\leftarrow v \text{ if better}, \qquad n \leftarrow 0 \text{ if better else } n + 1 \\
        \text{if } c > 0 &: \quad c \leftarrow c - 1, \quad n \leftarrow 0 \\
        \text{if } n > \text{patience} &: \quad \eta' = \max(\eta\,\phi, \eta_{min}), \quad
            \eta \leftarrow \eta' \text{ if } \eta - \eta' > \epsilon, \quad
            c \leftarrow \text{cooldown}, \quad n \leftarrow 0

    with :math:`b` the best loss (starting at :math:`+\infty`, or :math:`-\infty` for "max"),
    :math:`n` the evaluations without improvement, :math:`c` the cooldown counter,
    :math:`\phi` = ``factor``, :math:`\theta` = ``threshold``, and the learning rate
    :math:`\eta` starting at :math:`\eta_0` = ``base_learning_rate``. Each update leaf is
    multiplied by :math:`s` in its compute dtype (float32 for half precision and float32 leaves).

    Args:
      base_learning_rate: the learning rate of the optimizer this is chained after (torch's
        ``lr``), > 0. ``min_lr`` and ``eps`` are in its units; with the default 1.0 they are a
        floor on the scale and the smallest change of scale. (Under a schedule, the scale
        multiplies the scheduled rate, and ``base_learning_rate`` is the reference the floor
        ``min_lr`` is measured against.)
      mode: "min" (the loss should go down) or "max" (a metric that should go up).
      factor: the reduction, ``new_lr = lr * factor``, in [0, 1).
      patience: evaluations without improvement tolerated; the ``patience + 1``-th reduces.
      threshold: the improvement that counts, >= 0, relative or absolute (``threshold_mode``).
      threshold_mode: "rel" or "abs".
      cooldown: evaluations after a reduction during which bad evaluations are not counted.
      min_lr: the floor of the learning rate, >= 0.
      eps: a reduction by no more than ``eps`` is skipped, >= 0.
      accumulation_size: losses averaged into one evaluation, an integer >= 1: 1 when the
        value is an evaluation loss; larger to smooth minibatch losses fed at every step.

    Returns:
      A :class:`ReduceOnPlateau` (an ``optax.GradientTransformationExtraArgs``) with state
      :class:`ReduceOnPlateauState`, whose ``update`` takes ``value=`` (None or omitted: no
      evaluation this step) and whose ``observe(state, loss)`` feeds an evaluation loss
      between steps.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> plateau = adaopt.reduce_on_plateau(1e-2, factor=0.5, patience=1)
      >>> opt = adaopt.chain(adaopt.sgd(1e-2), plateau)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> for loss in [3.0, 2.0, 2.0, 2.0, 2.0]:  # stalls after the second step
      ...     updates, state = opt.update({"w": jnp.ones(2)}, state, params, value=loss)
      >>> round(float(state[1].learning_rate), 6), float(state[1].scale)
      (0.005, 0.5)
      >>> state = plateau.observe(state, 1.0)  # an evaluation loss between steps

    References:
      There is no paper: the rule is torch's scheduler,
      https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.ReduceLROnPlateau.html.

      Reference package: torch's ``ReduceLROnPlateau(optimizer, mode, factor, patience, threshold,
      threshold_mode, cooldown, min_lr, eps)`` with ``optimizer`` at ``lr=base_learning_rate``,
      stepped with each loss after ``optimizer.step()``, gives the learning rates
      ``state.learning_rate`` (the same floats, in float64). It differs from
      ``optax.contrib.reduce_on_plateau``, which reduces after ``patience`` bad evaluations
      (torch: ``patience + 1``), applies a new scale to the update of the loss that triggered it
      (torch: from the next update), combines ``rtol`` and ``atol`` as
      :math:`v < (1 - \text{rtol}) b - \text{atol}`, has no "max" mode, no ``eps`` and a
      ``min_scale`` relative to the base learning rate.
    """
    base.check_scalar("base_learning_rate", base_learning_rate, low=0.0, low_open=True)
    base.check_choice("mode", mode, ("min", "max"))
    base.check_scalar("factor", factor, low=0.0, high=1.0, high_open=True)
    _check_count("patience", patience, 0)
    base.check_nonnegative("threshold", threshold)
    base.check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
    _check_count("cooldown", cooldown, 0)
    base.check_nonnegative("min_lr", min_lr)
    base.check_nonnegative("eps", eps)
    _check_count("accumulation_size", accumulation_size, 1)

    def init_fn(params: base.Params) -> ReduceOnPlateauState:
        dtype = moments.scalar_dtype(params)
        lr = jnp.asarray(base_learning_rate).astype(dtype)
        return ReduceOnPlateauState(
            scale=jnp.ones([], dtype),
            learning_rate=lr,
            best=jnp.asarray(jnp.inf if mode == "min" else -jnp.inf, dtype),
            num_bad=jnp.zeros([], jnp.int32),
            cooldown_counter=jnp.zeros([], jnp.int32),
            count=jnp.zeros([], jnp.int32),
            value_sum=jnp.zeros([], dtype),
        )

    def is_better(current: jax.Array, best: jax.Array) -> jax.Array:
        dtype = best.dtype
        if threshold_mode == "rel":
            # torch multiplies by (1 - threshold) computed first, in Python: keep that rounding.
            rel = 1.0 - threshold if mode == "min" else threshold + 1.0
            bound = best * moments.scalar(rel, dtype)
        else:
            bound = (
                best - moments.scalar(threshold, dtype) if mode == "min" else best + moments.scalar(threshold, dtype)
            )
        return current < bound if mode == "min" else current > bound

    def decide(state: ReduceOnPlateauState, current: jax.Array) -> ReduceOnPlateauState:
        dtype = state.learning_rate.dtype
        better = is_better(current, state.best)
        best = jnp.where(better, current, state.best)
        num_bad = jnp.where(better, 0, moments.safe_increment(state.num_bad))
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        num_bad = jnp.where(in_cooldown, 0, num_bad)
        reduce = num_bad > patience
        lr = state.learning_rate
        new_lr = jnp.maximum(lr * moments.scalar(factor, dtype), moments.scalar(min_lr, dtype))
        lr = jnp.where(reduce & (lr - new_lr > moments.scalar(eps, dtype)), new_lr, lr)
        return ReduceOnPlateauState(
            scale=lr / moments.scalar(base_learning_rate, dtype),
            learning_rate=lr,
            best=best,
            num_bad=jnp.where(reduce, 0, num_bad).astype(jnp.int32),
            cooldown_counter=jnp.where(reduce, cooldown, cooldown_counter).astype(jnp.int32),
            count=jnp.zeros_like(state.count),
            value_sum=jnp.zeros_like(state.value_sum),
        )

    def observe(state: ReduceOnPlateauState, value: Any) -> ReduceOnPlateauState:
        value = jnp.asarray(value)
        if value.ndim != 0:
            raise ValueError(f"value must be a scalar loss, got an array of shape {value.shape}.")
        total = state.value_sum + value.astype(state.value_sum.dtype)
        count = moments.safe_increment(state.count)
        accumulated = state._replace(count=count, value_sum=total)
        decided = decide(state, total / count.astype(total.dtype))
        ready = count >= accumulation_size
        return jax.tree.map(lambda d, a: jnp.where(ready, d, a), decided, accumulated)

    def update_fn(
        updates: Updates,
        state: ReduceOnPlateauState,
        params: base.Params | None = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[Updates, ReduceOnPlateauState]:
        del params, extra_args

        scaled = jax.tree.map(lambda g: moments.scale_leaf(state.scale, g), updates)
        return scaled, state if value is None else observe(state, value)

    return ReduceOnPlateau(init_fn, update_fn)


def _check_count(name: str, value: Any, low: int) -> None:
    """An integer hyperparameter: a Python or NumPy integer, a 0-d integer array (as
    ``inject_hyperparams`` passes), or a traced one (unchecked)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        value = int(value)
    base.check_integer(name, value, low)


__all__ = ["ReduceOnPlateau", "ReduceOnPlateauState", "reduce_on_plateau"]
