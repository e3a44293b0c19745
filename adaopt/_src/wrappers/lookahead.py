r"""Lookahead that passes ``update``'s extra arguments (the loss ``value=``) to the fast optimizer.

Every adaopt optimizer takes extra keyword arguments in ``update`` (the loss-driven ones need
``value=``), and so must what wraps one. Checked against the installed optax (0.2.8) by calling
``update(..., value=loss)`` through each wrapper around :func:`adaopt.polyak_sgd`, which needs
the loss: ``optax.chain``, ``named_chain``, ``MultiSteps``, ``apply_if_finite``, ``masked``,
``partition`` (``multi_transform``), ``inject_hyperparams``, ``flatten``,
``with_extra_args_support``, ``contrib.mechanize`` and ``contrib.schedule_free`` pass it on, as
does :func:`adaopt.polynomial_decay_averaging`. ``optax.lookahead``'s ``update`` takes no extra
argument (a ``TypeError`` for ``value=``), nor does ``optax.contrib.sam``'s: use
:func:`lookahead` here in place of the first.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from adaopt._src import base
from adaopt._src.base import Params, Updates
from adaopt._src.wrappers.precision import MasterWeightsState


def lookahead(
    fast_optimizer: optax.GradientTransformation,
    sync_period: int,
    slow_step_size: Any,
    reset_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.lookahead``, with ``update``'s extra arguments (``value=``) passed to ``fast_optimizer``.

    The fast parameters :math:`\phi` take ``fast_optimizer``'s steps; every ``sync_period``
    steps, the slow parameters :math:`\theta` move toward them and the fast ones restart there:

    .. math::
        \theta \leftarrow \theta + \alpha (\phi - \theta), \qquad \phi \leftarrow \theta

    with :math:`\alpha` = ``slow_step_size``. The step is ``optax.lookahead``'s own, computed by
    it: the same state (``optax.LookaheadState``), the same parameters
    (``optax.LookaheadParams``: compute the gradients at ``params.fast``, evaluate at
    ``params.slow``) and the same updates, bit for bit. Do not change the updates before
    applying them, or the fast and slow parameters fall out of step.

    The parameters in a torch Lookahead: ``pytorch_optimizer.Lookahead(optimizer, k, alpha,
    pullback_momentum="none")`` keeps the fast weights in the model, which are ``params.fast``
    here at every step, and the slow weights in its state (``state[p]["slow_params"]``, loaded
    into the model for evaluation by ``backup_and_load_cache``), which are ``params.slow``; after
    a synchronisation the two are equal, the new slow weights. With ``sync_period=k``,
    ``slow_step_size=alpha`` and ``fast_optimizer`` its inner optimizer's adaopt form
    (``adaopt.adamw`` for ``torch.optim.AdamW``, ``adaopt.sgd`` for ``torch.optim.SGD``), both
    follow the same trajectory (tests/test_lookahead.py: 200 steps, to 1e-10 in float64).
    Its ``pullback_momentum="reset"`` and ``"pullback"`` change the inner optimizer's momentum at
    a synchronisation, which optax's ``reset_state`` (every state re-initialised) does not match.

    Gradient accumulation goes inside: ``lookahead(optax.MultiSteps(fast, k_acc).gradient_transformation(),
    ...)``, whose skipped micro-steps count toward ``sync_period``. ``optax.MultiSteps`` around a
    lookahead (optax's too) fails: it builds zeros of the gradients' tree where the
    ``LookaheadParams`` pair is expected.

    Args:
      fast_optimizer: the optimizer of the inner loop, e.g. ``adaopt.adam(1e-3)`` or one that
        needs the loss, ``adaopt.polyak_sgd()``.
      sync_period: fast steps between synchronisations :math:`k`, an integer >= 1.
      slow_step_size: :math:`\alpha`, in [0, 1].
      reset_state: re-initialise ``fast_optimizer``'s state at each synchronisation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params,
      **extra_args)`` takes ``optax.LookaheadParams`` as ``params`` and passes
      ``extra_args`` (e.g. ``value=loss``, the loss at the fast parameters) to
      ``fast_optimizer``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.lookahead(adaopt.polyak_sgd(), sync_period=2, slow_step_size=0.5)
      >>> params = optax.LookaheadParams.init_synced(jnp.array([2.0]))
      >>> state = opt.init(params)
      >>> loss_fn = lambda p: jnp.sum(p**2) / 2
      >>> for _ in range(2):
      ...     loss, grads = jax.value_and_grad(loss_fn)(params.fast)
      ...     updates, state = opt.update(grads, state, params, value=loss)
      ...     params = optax.apply_updates(params, updates)
      >>> params.slow  # the Polyak step reaches 0 in one step: halfway there, after the sync
      Array([1.], dtype=float32)

    References:
      Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
      NeurIPS 2019, https://arxiv.org/abs/1907.08610.
    """
    base.check_transformation("fast_optimizer", fast_optimizer)
    base.check_integer("sync_period", sync_period, 1)
    base.check_scalar("slow_step_size", slow_step_size, low=0.0, high=1.0)
    base.check_flag("reset_state", reset_state)
    fast = base.with_extra_args(fast_optimizer)

    def with_extra_args(extra_args: dict[str, Any]) -> optax.GradientTransformation:
        """optax's lookahead around ``fast``, whose ``update`` is given ``extra_args``."""

        def fast_update(updates: Updates, state: Any, params: Params | None = None) -> tuple[Updates, Any]:
            return fast.update(updates, state, params, **extra_args)

        return optax.lookahead(
            optax.GradientTransformation(fast.init, fast_update), sync_period, slow_step_size, reset_state
        )

    def init_fn(params: Params) -> optax.LookaheadState:
        state = with_extra_args({}).init(_lookahead_params(params))
        masters = jax.tree.leaves(state.fast_state, is_leaf=lambda x: isinstance(x, MasterWeightsState))
        if any(isinstance(x, MasterWeightsState) for x in masters):
            raise base.HyperparameterError(
                "lookahead(master_weights(...)): a synchronisation moves the fast weights outside the float32 master "
                "copy, whose next step would put them back where they were. Keep the master copy of the weights "
                "lookahead leaves: master_weights(lookahead(...))."
            )
        return state

    def update_fn(
        updates: Updates, state: optax.LookaheadState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, optax.LookaheadState]:
        params = _lookahead_params(base.require_params(params, "lookahead"))
        return with_extra_args(extra_args).update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _lookahead_params(params: Any) -> optax.LookaheadParams:
    if not isinstance(params, optax.LookaheadParams):
        raise TypeError(
            f"lookahead keeps fast and slow parameters: pass optax.LookaheadParams.init_synced(params) to init and "
            f"update (and the gradients at its .fast), got {type(params).__name__}."
        )
    return params


__all__ = ["lookahead"]
