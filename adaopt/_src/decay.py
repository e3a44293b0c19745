"""Decoupled weight decay in the forms the reference packages differ in: before or after the step, from the first
call or from the second (optimizers whose first call only initialises their state)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates

DecayForm = Literal["stepped", "decoupled"]


class DecayState(NamedTuple):
    """State of :func:`decoupled_decay`: the step count, for a schedule of the learning rate."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def decoupled_decay(
    learning_rate: ScalarOrSchedule,
    weight_decay: Any,
    form: DecayForm = "decoupled",
    *,
    mask: base.MaskOrFn | None = None,
    from_second_call: bool = False,
    who: str = "decoupled weight decay",
) -> optax.GradientTransformation:
    r"""Decay the parameters apart from the gradient, after the learning rate has scaled the update :math:`u`.

    ``"decoupled"``: :math:`u \leftarrow u - \eta_t \lambda \theta` (AdamW's: the parameters before the
    step are decayed); ``"stepped"``: :math:`u \leftarrow u - \eta_t \lambda (\theta + u)`, so that
    :math:`\theta + u = (\theta + u_{\text{before}})(1 - \eta_t \lambda)` (the stepped parameters are).
    ``mask``: the leaves decayed (a tree of booleans, or a function of the parameters returning one;
    None: all). ``from_second_call``: no decay at the first call. Computed in the update's compute dtype (at
    least float32; complex for complex leaves), returned in its own; ``who`` names the optimizer
    in the error for missing parameters.
    """

    def init_fn(params: base.Params) -> DecayState:
        del params
        return DecayState(moments.zero_count())

    def update_fn(updates: Updates, state: DecayState, params: base.Params | None = None) -> tuple[Updates, DecayState]:
        count = moments.safe_increment(state.count)
        if base.is_zero(weight_decay):
            return updates, DecayState(count)
        params = base.require_params(params, who)
        dtype = moments.scalar_dtype(updates)
        factor = numerics.learning_rate_at(learning_rate, state.count, dtype) * moments.scalar(weight_decay, dtype)
        if from_second_call:
            factor = jnp.where(state.count == 0, 0, factor)

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            compute = moments.compute_dtype(u.dtype)
            u_compute, p_compute = moments.in_precision(u, compute), moments.in_precision(p, compute)
            decayed = p_compute + u_compute if form == "stepped" else p_compute
            return (u_compute - decayed * factor.astype(compute)).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), DecayState(count)

    decay = optax.GradientTransformation(init_fn, update_fn)
    return decay if mask is None else base.masked(decay, mask)
