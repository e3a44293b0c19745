r"""Half-precision parameters that still learn: stochastic rounding of the step, or float32 master weights.

A bfloat16 parameter near 1 changes only in steps of :math:`2^{-7}`: ``optax.apply_updates``
rounds :math:`p + u` to the nearest bfloat16, so every update under :math:`2^{-8}` is lost, and a
model trained with a small learning rate (or late in a decaying schedule) stops moving while its
float32 twin keeps learning. Two remedies, each a wrapper of any optimizer:

- :func:`stochastic_rounding` returns the update that takes each bfloat16 parameter to
  :math:`p + u` rounded *up or down at random* (:func:`adaopt.stochastic_round`), which is
  :math:`p + u` in expectation: no extra memory but a key;
- :func:`master_weights` keeps a float32 copy of each half-precision parameter in the state,
  applies the updates to it, and returns the update that takes the parameter to that copy
  rounded to nearest: 4 bytes per parameter, exact float32 training.

Float32 and float64 leaves pass through both unchanged. A float16 leaf keeps nearest rounding
under :func:`stochastic_rounding` (its rounding is to a 10-bit mantissa, not a truncation of
float32's bits) and takes a master copy under :func:`master_weights`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, storage
from adaopt._src.base import Params, Updates


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_rounding`.

    Attributes:
      inner: the wrapped optimizer's state.
      count: the steps so far (uint32), the counter of the rounding's draws (:func:`adaopt.counter_bits`).
    """

    inner: Any
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _is_half(x: Any) -> bool:
    return jnp.dtype(jnp.result_type(x)) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _landing(p: jax.Array, target: jax.Array, float32_updates: bool) -> jax.Array:
    """The update that ``optax.apply_updates`` turns into ``target`` from ``p`` (both half precision).

    In ``p``'s dtype (the default) the difference is exact where the step does not more than double or
    halve ``p`` (Sterbenz); where a weight crosses zero or shrinks further in one step it is rounded,
    and the parameter lands one rounding away. In float32 (``float32_updates``) it is exact wherever the
    two exponents are less than 16 apart, and ``optax.apply_updates``, which adds in float32 and rounds
    to ``p``'s dtype, lands on ``target``.
    """
    difference = target.astype(jnp.float32) - p.astype(jnp.float32)
    difference = jnp.where(target == p, jnp.zeros_like(difference), difference)  # an infinite p stays: not inf - inf
    return difference if float32_updates else difference.astype(p.dtype)


@base.check_flags
def stochastic_rounding(
    inner: optax.GradientTransformation, *, seed: int = 0, float32_updates: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Round each bfloat16 parameter's step stochastically, so that small updates are kept in expectation.

    For a bfloat16 parameter :math:`p` and the wrapped optimizer's update :math:`u`, the update
    returned is :math:`\mathrm{sr}(p + u) - p`, where :math:`p + u` is computed in float32 and
    :math:`\mathrm{sr}` rounds it to one of its two bfloat16 neighbours with the probabilities
    that make :math:`E[\mathrm{sr}(x)] = x` (torchao's ``bf16_stochastic_round``); applied with
    ``optax.apply_updates``, the parameter lands on :math:`\mathrm{sr}(p + u)` (one rounding away
    where a weight crosses zero in one step, unless ``float32_updates``). Other leaves' updates pass
    through. ``update`` needs the parameters and passes its extra arguments on.

    Args:
      inner: the optimizer whose steps are rounded (any optax or adaopt transformation).
      seed: the seed of the rounding's draws, an integer in [0, 2**32); with the step count kept in the
        state, it makes the draws pure functions of the state (a checkpoint resumes the same draws).
      float32_updates: return a half-precision leaf's update in float32, the exact difference to
        where it lands, for ``optax.apply_updates`` (which keeps the parameter's dtype): exact also
        where a weight crosses zero or more than halves in one step, where the default (the
        parameter's dtype, as every optimizer's update) rounds the difference. Optax's conditional
        wrappers (``apply_if_finite``, ``conditionally_mask``) and ``equinox.apply_updates`` (a plain
        sum, which would promote the parameter) need the default.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`StochasticRoundingState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> params = jnp.ones(10_000, jnp.bfloat16)
      >>> tx = adaopt.stochastic_rounding(optax.sgd(1.0))
      >>> updates, _ = tx.update(jnp.full_like(params, 1e-3), tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)  # each 1 or 1 - 2**-8, 0.999 on average
      >>> round(float(new.astype(jnp.float32).mean()), 3)
      0.999
    """
    base.check_transformation("inner", inner)
    inner = base.with_extra_args(inner)
    base.check_integer("seed", seed, 0, 2**32 - 1)
    seed = int(seed)  # a NumPy integer would overflow in the salt's arithmetic below

    def init_fn(params: Params) -> StochasticRoundingState:
        return StochasticRoundingState(inner.init(params), jnp.zeros([], jnp.uint32))

    def update_fn(
        updates: Updates, state: StochasticRoundingState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, StochasticRoundingState]:
        params = base.require_params(params, "stochastic_rounding")
        steps, inner_state = inner.update(updates, state.inner, params, **extra)
        leaves, treedef = jax.tree.flatten(params)
        step_leaves = jax.tree.leaves(steps)

        def leaf(p: jax.Array, u: jax.Array, index: int) -> jax.Array:
            if jnp.result_type(p) != jnp.bfloat16:
                return u
            bits = storage.counter_bits(p.shape, jnp.uint32((seed * 0x9E3779B1 + index) & 0xFFFFFFFF), state.count)
            target = storage.stochastic_round(p.astype(jnp.float32) + _as_float32(u), bits)
            return _landing(p, target, float32_updates)

        out = [leaf(p, u, i) for i, (p, u) in enumerate(zip(leaves, step_leaves, strict=True))]
        return jax.tree.unflatten(treedef, out), StochasticRoundingState(inner_state, state.count + jnp.uint32(1))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _as_float32(u: jax.Array) -> jax.Array:
    """``u`` in float32 with the rounding of its own dtype kept: XLA may compute a half-precision update in float32
    and drop the rounding (its excess precision), and then not in every program alike (with a mesh or without)."""
    info = jnp.finfo(u.dtype)
    if info.bits >= 32:
        return u.astype(jnp.float32)
    return jax.lax.reduce_precision(u.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


class MasterWeightsState(NamedTuple):
    """State of :func:`master_weights`.

    Attributes:
      master: a float32 copy of each half-precision parameter (``optax.MaskedNode()`` at the others).
      inner: the wrapped optimizer's state, initialised on the float32 view of the parameters.
    """

    master: Any
    inner: Any


@base.check_flags
def master_weights(
    inner: optax.GradientTransformation, *, float32_updates: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Train half-precision parameters through a float32 copy kept in the optimizer's state.

    The wrapped optimizer sees float32 parameters and gradients (the master copy where the
    parameter is bfloat16 or float16, the parameter itself elsewhere) and its update is added to
    the copy in float32; the update returned takes the half-precision parameter to the new copy
    rounded to nearest (one rounding away where a weight crosses zero in one step, unless
    ``float32_updates``). The copy is part of the state, so it is checkpointed and restored with it.
    ``update`` needs the parameters and passes its extra arguments on. The parameters must move by its updates
    alone: a wrapper that moves them itself goes outside it (``master_weights(lookahead(...))``; the other order
    is refused, since the next step would undo each synchronisation).

    Args:
      inner: the optimizer that trains the float32 copy.
      float32_updates: as in :func:`stochastic_rounding`: a half-precision leaf's update in float32,
        the exact difference to the rounded copy, for ``optax.apply_updates`` only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MasterWeightsState`.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> params = jnp.ones(3, jnp.bfloat16)
      >>> tx = adaopt.master_weights(optax.sgd(1e-3))
      >>> state = tx.init(params)
      >>> for _ in range(5):
      ...     updates, state = tx.update(jnp.ones(3, jnp.bfloat16), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params  # 0.995 rounded to bfloat16: alone, bfloat16 would have stayed at 1
      Array([0.996094, 0.996094, 0.996094], dtype=bfloat16)
      >>> [round(float(m), 6) for m in state.master]
      [0.995, 0.995, 0.995]
    """
    base.check_transformation("inner", inner)
    inner = base.with_extra_args(inner)

    def master_view(master: Any, params: Params) -> Any:
        return jax.tree.map(
            lambda m, p: p if base.is_masked_node(m) else m,
            master,
            params,
            is_leaf=base.is_masked_node,
        )

    def init_fn(params: Params) -> MasterWeightsState:
        master = jax.tree.map(lambda p: p.astype(jnp.float32) if _is_half(p) else optax.MaskedNode(), params)
        return MasterWeightsState(master, inner.init(master_view(master, params)))

    def update_fn(
        updates: Updates, state: MasterWeightsState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, MasterWeightsState]:
        params = base.require_params(params, "master_weights")
        at = base.fast(params)  # the weights the gradients were taken at (lookahead's fast ones)
        base.check_tree_match(updates, at, "parameters")
        view = master_view(state.master, params)
        grads = jax.tree.map(lambda g, p: g.astype(jnp.float32) if _is_half(p) else g, updates, at)
        steps, inner_state = inner.update(grads, state.inner, view, **extra)
        masked = base.is_masked_node
        master = jax.tree.map(
            lambda m, u: m if masked(m) else m + u.astype(jnp.float32), state.master, steps, is_leaf=masked
        )
        out = jax.tree.map(
            lambda m, u, p: u if masked(m) else _landing(p, m.astype(p.dtype), float32_updates),
            master,
            steps,
            params,
            is_leaf=masked,
        )
        return out, MasterWeightsState(master, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
