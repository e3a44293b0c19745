r"""Early stopping on a validation metric, with the semantics of Keras' ``EarlyStopping``, as a pure state.

The user computes the metric (there is no ``monitor`` name) and passes it once per epoch (or
per evaluation) to :meth:`EarlyStopping.update`; the state says when to stop and keeps the best
parameters. Everything is arrays in a NamedTuple, so the whole training, epochs and stopping
included, can run inside ``jax.lax.scan`` or ``jax.lax.while_loop``, or in a Python loop that
reads ``bool(state.should_stop)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adaopt._src import base, moments


class EarlyStoppingState(NamedTuple):
    """State of :class:`EarlyStopping`: Keras' callback attributes, as arrays.

    Attributes:
      epoch: the values seen so far, a saturating int32; the next value is epoch ``epoch``
        (counted from 0, as Keras' ``epoch`` argument). Frozen once stopped.
      wait: Keras' ``wait``: monitored epochs since the last one that reset it.
      best: the best value so far (Keras' ``best``), in the default float dtype (float32, or
        float64 under ``jax_enable_x64``); ``+inf`` ("min") or ``-inf`` ("max") before the first.
      best_epoch: the epoch of ``best``; -1 until an epoch is monitored (Keras: 0).
      should_stop: True from the epoch that stops training on (Keras' ``model.stop_training``).
      stopped_epoch: the epoch that stopped training; -1 while it has not (Keras: 0).
      best_params: the parameters passed with ``best`` (Keras' ``best_weights``), or None without
        ``restore_best_weights``; the parameters given to ``init`` until an epoch is monitored.
    """

    epoch: jax.Array
    wait: jax.Array
    best: jax.Array
    best_epoch: jax.Array
    should_stop: jax.Array
    stopped_epoch: jax.Array
    best_params: base.Params | None


def _check_count(name: str, value: Any) -> None:
    """An integer >= 0; a traced one (the stopper built under ``vmap`` over its settings) is not checked."""
    if not isinstance(value, jax.core.Tracer):
        base.check_integer(name, value, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    r"""Stop training when a validation metric has stopped improving: Keras' ``EarlyStopping``, as a pure state.

    Feed one value per epoch, ``state = stopper.update(state, value, params)``, with ``params``
    the parameters that gave ``value``. For epoch :math:`e` (the number of values fed before)
    with value :math:`v`, nothing happens while :math:`e <` ``start_from_epoch`` (the epoch is
    not monitored: no count, no best) or once stopped (the state is frozen). Otherwise, with
    :math:`\delta` = ``min_delta``, the improvement test on a reference :math:`r` is

    .. math::
        \text{better}(v, r) = \begin{cases} v + \delta < r & \text{mode "min"} \\
                                            v - \delta > r & \text{mode "max"} \end{cases}

    (strict: a change of exactly :math:`\delta` is no improvement; a NaN value never is), and

    .. math::
        \text{wait} &\leftarrow \text{wait} + 1 \\
        \text{improved} &= (\text{no epoch monitored yet}) \;\lor\; \text{better}(v, \text{best}) \\
        \text{if improved} &: \quad \text{best} \leftarrow v, \quad \text{best epoch} \leftarrow e, \quad
            \text{best params} \leftarrow \text{params}, \quad
            \text{wait} \leftarrow 0 \text{ if baseline is None or better}(v, \text{baseline}) \\
        \text{else if wait} \ge \text{patience} &: \quad \text{stop at epoch } e

    So the first monitored epoch is always the best so far (a NaN or infinite value too, as in Keras 3, whose
    first reference is None); training stops at the first epoch
    that does not improve on the best when ``patience`` epochs (counting it) have passed since
    the wait was last reset (``patience`` 0 and 1 both stop at the first epoch without
    improvement); an epoch that improves never stops training. ``baseline`` only decides whether
    an improvement resets the wait: improvements that do not beat it still become the best (and
    its parameters) but keep counting, so a run that never beats the baseline stops at the first
    epoch without improvement once ``patience`` epochs have been monitored.

    When training ends (it stopped, or the loop ran out), :meth:`final_params` gives the
    parameters to keep, as Keras' ``on_train_end``: with ``restore_best_weights``, those of the
    best epoch (even when no epoch beat the baseline: the best of those seen), unless no epoch
    was monitored; otherwise, and without ``restore_best_weights``, the last parameters.

    Comparisons run in the state's float dtype (float32, or float64 under ``jax_enable_x64``):
    Keras' JAX backend compares in float32 after computing ``v - min_delta`` in Python's float64,
    so values within float32 rounding of a tie may decide differently; on values and
    ``min_delta`` that float32 holds exactly, the two agree exactly (tests/test_early_stopping.py).

    The numeric settings (``min_delta``, ``patience``, ``baseline``, ``start_from_epoch``) may
    also be traced arrays, e.g. to ``vmap`` one training loop over several patiences; ``mode``,
    ``restore_best_weights`` and whether there is a ``baseline`` shape the program. All settings
    are keyword-only (Keras' order starts with ``monitor``, which has no place here).

    Args:
      min_delta: :math:`\delta` >= 0, the change that counts as an improvement (Keras takes
        ``abs(min_delta)``; here a negative one is refused).
      patience: epochs without improvement tolerated, an integer >= 0 (see above).
      mode: "min" (a loss) or "max" (an accuracy). Keras' "auto" guesses from the metric's
        name, which is not given here.
      baseline: None, or the value an improvement must beat (by :math:`\delta`) to reset the wait.
      restore_best_weights: keep the best epoch's parameters in the state (memory: one copy of
        the parameters), for :meth:`final_params`.
      start_from_epoch: epochs not monitored at the start (a warm-up), an integer >= 0.

    Raises:
      HyperparameterError: an argument out of range or of the wrong type.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> stopper = adaopt.EarlyStopping(patience=2, restore_best_weights=True)
      >>> params = jnp.zeros(1)
      >>> state = stopper.init(params)
      >>> for epoch, val_loss in enumerate([3.0, 2.0, 2.5, 2.1, 1.0]):
      ...     params = jnp.full(1, float(epoch))  # what training made of them this epoch
      ...     state = stopper.update(state, val_loss, params)
      ...     if state.should_stop:
      ...         break
      >>> int(state.stopped_epoch), int(state.best_epoch), float(state.best)
      (3, 1, 2.0)
      >>> stopper.final_params(state, params)  # the best epoch's parameters
      Array([1.], dtype=float32)

    References:
      Keras' callback, https://keras.io/api/callbacks/early_stopping/: ``keras.callbacks.
      EarlyStopping(min_delta, patience, mode, baseline, restore_best_weights, start_from_epoch)``
      (keras 3), fed the same values as ``logs[monitor]``, stops at the same epoch, with the same
      best epoch and restores the same weights.
    """

    min_delta: Any = 0.0
    patience: int = 0
    mode: Literal["min", "max"] = "min"
    baseline: Any = None
    restore_best_weights: bool = False
    start_from_epoch: int = 0

    def __post_init__(self) -> None:
        base.check_nonnegative("min_delta", self.min_delta)
        _check_count("patience", self.patience)
        base.check_choice("mode", self.mode, ("min", "max"))
        if self.baseline is not None:
            base.check_scalar("baseline", self.baseline)
        base.check_flag("restore_best_weights", self.restore_best_weights)
        _check_count("start_from_epoch", self.start_from_epoch)

    def init(self, params: base.Params | None = None) -> EarlyStoppingState:
        """The state before the first epoch.

        Args:
          params: the parameters (any pytree); needed with ``restore_best_weights``, whose state
            holds a copy of them.

        Returns:
          An :class:`EarlyStoppingState`.
        """
        if self.restore_best_weights:
            params = base.require_params(params, "EarlyStopping(restore_best_weights=True).init")
        worst = jnp.inf if self.mode == "min" else -jnp.inf
        minus_one = jnp.full([], -1, jnp.int32)
        return EarlyStoppingState(
            epoch=moments.zero_count(),
            wait=moments.zero_count(),
            best=jnp.asarray(worst, jnp.zeros([]).dtype),
            best_epoch=minus_one,
            should_stop=jnp.zeros([], bool),
            stopped_epoch=minus_one,
            best_params=jax.tree.map(jnp.array, params) if self.restore_best_weights else None,
        )

    def _better(self, value: jax.Array, reference: Any) -> jax.Array:
        delta = jnp.asarray(self.min_delta, value.dtype)
        return value + delta < reference if self.mode == "min" else value - delta > reference

    def update(self, state: EarlyStoppingState, value: Any, params: base.Params | None = None) -> EarlyStoppingState:
        """Take one epoch's metric into account (see the class's docstring for the rule).

        Pure and jittable: no Python control flow on ``value``; call it inside ``jax.lax.scan``
        over epochs, or jit it (``jax.jit(stopper.update)``: the stopper is a frozen dataclass,
        its settings are compiled in).

        Args:
          state: the state from :meth:`init` or the previous ``update``.
          value: the epoch's metric, a scalar (cast to the state's float dtype).
          params: the parameters that gave ``value`` (needed with ``restore_best_weights``), with
            the structure of those given to ``init``.

        Returns:
          The new state; unchanged once ``state.should_stop`` is True.
        """
        value = jnp.asarray(value, state.best.dtype)
        if np.ndim(value) != 0:
            raise ValueError(f"EarlyStopping.update takes one value per epoch, a scalar; got shape {np.shape(value)}.")
        if self.restore_best_weights:
            params = base.require_params(params, "EarlyStopping(restore_best_weights=True).update")
            got: Any = jax.tree.structure(params)
            want = jax.tree.structure(state.best_params)
            if got != want:
                raise base.TreeMismatchError(
                    "EarlyStopping.update got parameters of another tree structure than those given to init:\n"
                    f"  {want}\nbut got\n  {got}\n"
                    "Pass the parameters in the form init received them (after changing the model, call init again)."
                )
        epoch = state.epoch
        monitored = (epoch >= self.start_from_epoch) & ~state.should_stop
        improved = (state.best_epoch < 0) | self._better(value, state.best)
        beats_baseline = True if self.baseline is None else self._better(value, self.baseline)
        reset = improved & beats_baseline
        wait = jnp.where(reset, 0, state.wait + 1)
        stop = ~improved & (wait >= self.patience)

        def if_monitored(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(monitored, new, old)

        best_params = state.best_params
        if best_params is not None:
            best_params = jax.tree.map(lambda p, b: jnp.where(monitored & improved, p, b), params, best_params)
        return EarlyStoppingState(
            epoch=jnp.where(state.should_stop, epoch, moments.safe_increment(epoch)),
            wait=if_monitored(wait, state.wait),
            best=if_monitored(jnp.where(improved, value, state.best), state.best),
            best_epoch=if_monitored(jnp.where(improved, epoch, state.best_epoch), state.best_epoch),
            should_stop=state.should_stop | (monitored & stop),
            stopped_epoch=if_monitored(jnp.where(stop, epoch, state.stopped_epoch), state.stopped_epoch),
            best_params=best_params,
        )

    def final_params(self, state: EarlyStoppingState, params: base.Params) -> base.Params:
        """The parameters to keep when training ends, as Keras' ``on_train_end``.

        Args:
          state: the last state.
          params: the last parameters (those of the last epoch fed to ``update``).

        Returns:
          With ``restore_best_weights``, ``state.best_params`` once an epoch was monitored,
          else ``params``; without it, ``params``. Jittable (a select, not a branch).
        """
        if state.best_params is None:
            return params
        return jax.tree.map(lambda b, p: jnp.where(state.best_epoch >= 0, b, p), state.best_params, params)


__all__ = ["EarlyStopping", "EarlyStoppingState"]
