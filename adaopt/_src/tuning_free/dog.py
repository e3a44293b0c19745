"""Learning-rate-free step sizes from the distance travelled: DoG, layer-wise LDoG and DoWG.

DoG and DoWG set the step size from two running statistics: the largest distance of the iterates
from the initial point, and a (weighted) sum of squared gradient norms. DoG takes these over the
whole parameter tree, LDoG over each leaf separately; both are one block, :func:`scale_by_dog`.
Their authors recommend evaluating the polynomial-decay average of the iterates, kept by the
wrapper :func:`adaopt.polynomial_decay_averaging` (in :mod:`adaopt._src.wrappers.averaging`) and
read with :func:`adaopt.averaged_params`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import Params, ScalarOrSchedule, Updates


def _leaves(updates: Updates, params: Params | None, init_params: Params, who: str) -> tuple[list, list, list]:
    """The leaves of the gradients, the parameters and the initial point, in the same order."""
    params = base.require_params(params, who)
    base.check_tree_match(updates, params, "parameters")
    base.check_tree_match(updates, init_params, "state")
    return jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(init_params)


class DoGEstimate(NamedTuple):
    r"""DoG's running statistics of one block: the whole tree (DoG) or one leaf (LDoG).

    Attributes:
      max_distance: :math:`\bar r_t`, the largest distance from the initial point so far.
      sum_sq_grads: :math:`G_t`, ``eps`` plus the sum of the squared gradient norms so far.
    """

    max_distance: jax.Array
    sum_sq_grads: jax.Array


class DoGState(NamedTuple):
    """State of :func:`scale_by_dog`: the step count, the initial point and the running statistics.

    ``estimate`` is one :class:`DoGEstimate` of 0-d arrays for DoG, and for LDoG a tuple of them,
    one per leaf in the order of ``jax.tree.leaves(params)``. A tuple rather than a tree that
    mirrors the parameters: per-leaf scalars are not per-coordinate state (they stay replicated
    under sharding), and Flax NNX wraps each leaf of a mirroring tree in a variable, which a
    record of two scalars cannot be.

    Attributes:
      count: the number of updates so far, a saturating int32 (the schedule's step).
      init_params: :math:`x_0`, a copy of the parameters in their own dtypes.
      estimate: the statistics of the whole tree (DoG), or a tuple of one per leaf (LDoG).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    init_params: Params
    estimate: DoGEstimate | tuple[DoGEstimate, ...]

    def current_hyperparams(self) -> dict[str, jax.Array]:
        r"""The distance :math:`\bar r_t` and the step size before the learning rate, :math:`\bar r_t / \sqrt{G_t}`,
        of the whole tree (DoG), or of each leaf by its index in ``jax.tree.leaves(params)`` (LDoG)."""
        if isinstance(self.estimate, DoGEstimate):
            estimates, suffixes = [self.estimate], [""]
        else:
            estimates, suffixes = list(self.estimate), [f"/{i}" for i in range(len(self.estimate))]
        out = {}
        for estimate, suffix in zip(estimates, suffixes, strict=True):
            out[f"distance{suffix}"] = estimate.max_distance
            out[f"step_size{suffix}"] = moments.safe_divide(
                estimate.max_distance, moments.safe_sqrt(estimate.sum_sq_grads)
            )
        return out


@base.check_flags
def scale_by_dog(
    learning_rate: ScalarOrSchedule = 1.0,
    reps_rel: Any = 1e-6,
    eps: Any = 1e-8,
    *,
    init_eta: Any = None,
    layer_wise: bool = False,
) -> optax.GradientTransformation:
    r"""DoG's block: scale the gradient by :math:`\eta_t = c_t\, \bar r_t / \sqrt{G_t}` (a positive step).

    At step :math:`t = 0, 1, \dots`, with parameters :math:`x_t` and gradient :math:`g_t`:

    .. math::
        \bar r_{-1} &= \texttt{reps\_rel}\,(1 + \|x_0\|) \;\;(0 \text{ if init\_eta is given}),
            \qquad G_{-1} = \epsilon \\
        \bar r_t &= \max(\bar r_{t-1}, \|x_t - x_0\|) \\
        G_t &= G_{t-1} + \|g_t\|^2 \\
        \eta_t &= c_t\, \bar r_t / \sqrt{G_t} \quad (\eta_0 = \texttt{init\_eta} \text{ if given}) \\
        u_t &= \eta_t\, g_t

    where :math:`c_t` is ``learning_rate`` at step ``t``. The norms are over the whole tree, or,
    with ``layer_wise``, over each leaf, which then has its own :math:`\bar r, G, \eta`.
    :math:`\eta_t` is 0 while :math:`G_t = 0` (possible only with ``eps = 0``).

    Args:
      learning_rate: :math:`c_t`, a non-negative number or a schedule ``count -> value``.
      reps_rel: :math:`\bar r_{-1}` relative to :math:`1 + \|x_0\|`, > 0.
      eps: the initial value of :math:`G`, >= 0.
      init_eta: None, or the first step size :math:`\eta_0` (> 0), which then ignores
        ``learning_rate`` and ``reps_rel``.
      layer_wise: LDoG: one step size per leaf.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DoGState`; ``update`` needs the
      parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_dog(reps_rel=0.1, eps=0.0)
      >>> params = jnp.array([0.0, 0.0])
      >>> state = block.init(params)
      >>> step, state = block.update(jnp.array([3.0, 4.0]), state, params)
      >>> step  # eta_0 = 0.1 * (1 + |x_0|) / |g_0| = 0.1 / 5, times g
      Array([0.06, 0.08], dtype=float32)

    References:
      Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
      Schedule", ICML 2023, https://arxiv.org/abs/2302.12022.

      Reference package: ``dog-optimizer`` (https://github.com/formll/dog); :func:`dog` and
      :func:`ldog` give the arguments that reproduce its ``DoG`` and ``LDoG``.
    """
    base.check_learning_rate(learning_rate)
    base.check_scalar("reps_rel", reps_rel, low=0.0, low_open=True)
    base.check_nonnegative("eps", eps)
    if init_eta is not None:
        base.check_scalar("init_eta", init_eta, low=0.0, low_open=True)

    def initial_estimate(leaves: Sequence[jax.Array], dtype: Any) -> DoGEstimate:
        if init_eta is None:
            rbar = moments.scalar(reps_rel, dtype) * (1 + numerics.norm(leaves, dtype))
        else:
            rbar = jnp.zeros([], dtype)
        return DoGEstimate(jnp.asarray(rbar, dtype), jnp.asarray(moments.scalar(eps, dtype), dtype))

    def init_fn(params: Params) -> DoGState:
        estimate: DoGEstimate | tuple[DoGEstimate, ...]
        if layer_wise:
            base.check_floating(params)
            leaves = jax.tree.leaves(params)
            estimate = tuple(initial_estimate([p], moments.compute_dtype(jnp.result_type(p))) for p in leaves)
        else:
            estimate = initial_estimate(jax.tree.leaves(params), moments.scalar_dtype(params))
        return DoGState(moments.zero_count(), moments.init_copy(params, keep_dtype=True), estimate)

    def step_size(
        est: DoGEstimate,
        grads: Sequence[jax.Array],
        params: Sequence[jax.Array],
        init_params: Sequence[jax.Array],
        count: jax.Array,
    ) -> tuple[jax.Array, DoGEstimate]:
        dtype = est.max_distance.dtype
        rbar = jnp.maximum(est.max_distance, moments.safe_sqrt(numerics.squared_distance(params, init_params, dtype)))
        sum_sq = est.sum_sq_grads + numerics.sum_of_squares(grads, dtype)
        rate = numerics.learning_rate_at(learning_rate, count, dtype)
        eta = moments.safe_divide(rate * rbar, moments.safe_sqrt(sum_sq))
        if init_eta is not None:
            eta = jnp.where(count == 0, moments.scalar(init_eta, dtype), eta)
        return eta, DoGEstimate(rbar, sum_sq)

    def update_fn(updates: Updates, state: DoGState, params: Params | None = None) -> tuple[Updates, DoGState]:
        flat, flat_params, flat_init = _leaves(updates, params, state.init_params, "DoG")
        estimate: DoGEstimate | tuple[DoGEstimate, ...]
        if layer_wise:
            per_leaf = cast(tuple[DoGEstimate, ...], state.estimate)
            pairs = [
                step_size(est, [g], [p], [x0], state.count)
                for est, g, p, x0 in zip(per_leaf, flat, flat_params, flat_init, strict=True)
            ]
            etas = [eta for eta, _ in pairs]
            estimate = tuple(est for _, est in pairs)
        else:
            eta, estimate = step_size(cast(DoGEstimate, state.estimate), flat, flat_params, flat_init, state.count)
            etas = [eta] * len(flat)
        new_updates = jax.tree.unflatten(
            jax.tree.structure(updates), [moments.scale_leaf(eta, g) for g, eta in zip(flat, etas, strict=True)]
        )
        return new_updates, DoGState(moments.safe_increment(state.count), state.init_params, estimate)

    return optax.GradientTransformation(init_fn, update_fn)


def _dog(
    learning_rate: ScalarOrSchedule,
    reps_rel: Any,
    eps: Any,
    weight_decay: Any,
    init_eta: Any,
    weight_decay_mask: base.MaskOrFn | None,
    layer_wise: bool,
) -> optax.GradientTransformationExtraArgs:
    base.check_common(learning_rate, weight_decay)
    core = scale_by_dog(learning_rate, reps_rel, eps, init_eta=init_eta, layer_wise=layer_wise)
    # The learning rate multiplies the step inside the block (with init_eta the package's first
    # step ignores it); the assembly adds the coupled decay and the sign.
    return base.assemble(
        core, 1.0, weight_decay, weight_decay_mask, complex_convention="modulus"
    )  # norms and real inner products of a step linear in the gradient: both conventions agree


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    reps_rel: Any = 1e-6,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    init_eta: Any = None,
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DoG (Distance over Gradients): SGD whose step size is the distance travelled over the root gradient sum.

    At step :math:`t = 0, 1, \dots`, with norms over the whole parameter tree:

    .. math::
        g_t &\leftarrow g_t + \lambda x_t \quad \text{(coupled decay)} \\
        \bar r_t &= \max(\bar r_{t-1}, \|x_t - x_0\|), \qquad
            \bar r_{-1} = \texttt{reps\_rel}\,(1 + \|x_0\|) \\
        G_t &= G_{t-1} + \|g_t\|^2, \qquad G_{-1} = \epsilon \\
        \eta_t &= c_t\, \bar r_t / \sqrt{G_t} \\
        x_{t+1} &= x_t - \eta_t\, g_t

    With ``init_eta``, :math:`\bar r_{-1} = 0` and :math:`\eta_0 = \texttt{init\_eta}`
    (not multiplied by :math:`c_0`). The authors recommend evaluating the averaged iterates of
    :func:`polynomial_decay_averaging` (``gamma=8``), as DoG has no decaying schedule.

    Half-precision parameters: a first step of ``reps_rel`` of their scale is far under the spacing
    of bfloat16 (float16) numbers, so alone they never move and :math:`\bar r_t` never grows; wrap
    the optimizer in :func:`master_weights` (a float32 copy that takes the steps).

    Args:
      learning_rate: :math:`c_t`, a multiplier of the step size (the paper's ``c``; 1 is
        recommended), a non-negative number or a schedule ``count -> value``.
      reps_rel: the initial distance :math:`r_\epsilon` relative to :math:`1 + \|x_0\|`, > 0:
        small enough for a harmless first step (1e-6; the authors suggest 1e-4 with batch norm).
      eps: added to the sum of squared gradient norms, >= 0.
      weight_decay: :math:`\lambda` >= 0, added to the gradient before the statistics.
      init_eta: None, or the first step size (> 0), replacing ``reps_rel``.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
      >>> opt = adaopt.dog()
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> for _ in range(200):  # the step grows from reps_rel-sized to the problem's scale
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-6)
      True

    References:
      Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
      Schedule", ICML 2023, https://arxiv.org/abs/2302.12022.

      Reference package: the authors' ``dog-optimizer`` 1.0.3 (https://github.com/formll/dog).
      ``dog.DoG(params, reps_rel, lr=c, weight_decay, eps, init_eta)`` with every parameter in
      one group is ``dog(learning_rate=c, reps_rel, eps, weight_decay, init_eta=init_eta)`` with
      the same numbers; ``lr`` set in the group before each step is a schedule. (Its statistics
      are per parameter group, so a decay mask, which torch expresses with groups, has no exact
      counterpart there; adding ``weight_decay * p`` to the masked gradients before its step, as
      it adds its own decay, reproduces this.) Unlike the package, ``learning_rate = 0`` is
      allowed and ``eps = 0`` with a zero gradient gives a zero step, not an error.
      ``optax.contrib.dog(learning_rate, ("heuristic", reps_rel), eps, weight_decay, mask)`` is
      this without ``init_eta`` (its ``("learning_rate", eta0)`` multiplies the first step by
      the learning rate).
    """
    return _dog(learning_rate, reps_rel, eps, weight_decay, init_eta, weight_decay_mask, layer_wise=False)


def ldog(
    learning_rate: ScalarOrSchedule = 1.0,
    reps_rel: Any = 1e-6,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    init_eta: Any = None,
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LDoG: layer-wise DoG, one DoG step size per leaf of the parameter tree.

    For each leaf :math:`i` separately (norms over that leaf):

    .. math::
        g_t &\leftarrow g_t + \lambda x_t \quad \text{(coupled decay)} \\
        \bar r_{t,i} &= \max(\bar r_{t-1,i}, \|x_{t,i} - x_{0,i}\|), \qquad
            \bar r_{-1,i} = \texttt{reps\_rel}\,(1 + \|x_{0,i}\|) \\
        G_{t,i} &= G_{t-1,i} + \|g_{t,i}\|^2, \qquad G_{-1,i} = \epsilon \\
        \eta_{t,i} &= c_t\, \bar r_{t,i} / \sqrt{G_{t,i}} \\
        x_{t+1,i} &= x_{t,i} - \eta_{t,i}\, g_{t,i}

    With ``init_eta``, every leaf's :math:`\bar r_{-1,i} = 0` and :math:`\eta_{0,i} = \texttt{init\_eta}`.

    Args:
      learning_rate: :math:`c_t`, a multiplier of every leaf's step size (1 is recommended), a
        non-negative number or a schedule ``count -> value``.
      reps_rel: each leaf's initial distance relative to :math:`1 + \|x_{0,i}\|`, > 0.
      eps: the initial value of each leaf's :math:`G`, >= 0.
      weight_decay: :math:`\lambda` >= 0, added to the gradient before the statistics.
      init_eta: None, or every leaf's first step size (> 0), replacing ``reps_rel``.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)
      >>> opt = adaopt.ldog()
      >>> params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> state = opt.init(params)
      >>> for _ in range(200):  # each leaf's step grows to its own scale
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-6)
      True

    References:
      Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
      Schedule", ICML 2023, https://arxiv.org/abs/2302.12022, section 4 (L-DoG).

      Reference package: the authors' ``dog-optimizer`` 1.0.3 (https://github.com/formll/dog).
      ``dog.LDoG(params, reps_rel, lr=c, weight_decay, eps, init_eta)`` is
      ``ldog(learning_rate=c, reps_rel, eps, weight_decay, init_eta=init_eta)`` with the same
      numbers, its parameter groups giving the decay mask (its statistics are per tensor, so
      groups change nothing else).
    """
    return _dog(learning_rate, reps_rel, eps, weight_decay, init_eta, weight_decay_mask, layer_wise=True)


class DoWGState(NamedTuple):
    r"""State of :func:`scale_by_dowg`, with ``optax.contrib``'s field names.

    Attributes:
      init_params: :math:`x_0`, a copy of the parameters in their own dtypes.
      weighted_sq_norm_grads: :math:`v_t`, the weighted sum of squared gradient norms.
      estim_sq_dist: :math:`\bar r_t^2`, the largest squared distance from :math:`x_0` so far.
    """

    init_params: Params
    weighted_sq_norm_grads: jax.Array
    estim_sq_dist: jax.Array

    def current_hyperparams(self) -> dict[str, jax.Array]:
        r"""The distance estimate :math:`\bar r_t`."""
        return {"distance": moments.safe_sqrt(self.estim_sq_dist)}


def scale_by_dowg(init_estim_sq_dist: Any = None, eps: Any = 1e-4) -> optax.GradientTransformation:
    r"""DoWG's block: scale the gradient by :math:`\eta_t = \bar r_t^2 / (\sqrt{v_t} + \epsilon)` (a positive step).

    .. math::
        \bar r_{-1}^2 &= \texttt{init\_estim\_sq\_dist} \;(\epsilon \text{ if None}), \qquad v_{-1} = 0 \\
        \bar r_t^2 &= \max(\bar r_{t-1}^2, \|x_t - x_0\|^2) \\
        v_t &= \bar r_t^2 \|g_t\|^2 + v_{t-1} \\
        \eta_t &= \bar r_t^2 / (\sqrt{v_t} + \epsilon) \\
        u_t &= \eta_t\, g_t

    with norms over the whole tree; :math:`\eta_t` is 0 while :math:`\sqrt{v_t} + \epsilon = 0`.

    Args:
      init_estim_sq_dist: the initial squared distance :math:`r_\epsilon^2` (> 0), or None for
        ``eps``.
      eps: added to :math:`\sqrt{v_t}`, >= 0; > 0 when ``init_estim_sq_dist`` is None.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DoWGState`; ``update`` needs the
      parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_dowg(init_estim_sq_dist=1.0, eps=0.0)
      >>> params = jnp.array([0.0, 0.0])
      >>> state = block.init(params)
      >>> step, state = block.update(jnp.array([3.0, 4.0]), state, params)
      >>> step  # eta_0 = r^2 / sqrt(r^2 |g|^2) = 1 / 5, times g
      Array([0.6, 0.8], dtype=float32)

    References:
      Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
      Gradient Descent Method", NeurIPS 2023, https://arxiv.org/abs/2305.16284, Algorithm 1.

      :func:`dowg` gives the arguments that reproduce Algorithm 1 and ``optax.contrib.dowg``.
    """
    base.check_nonnegative("eps", eps)
    if init_estim_sq_dist is None:
        if base.is_zero(eps):
            raise base.HyperparameterError(
                f"eps must be in (0, inf] when init_estim_sq_dist is None (eps is then the initial squared "
                f"distance, and 0 would never move), got {eps!r}; give init_estim_sq_dist > 0 to use eps = 0."
            )
    else:
        base.check_scalar("init_estim_sq_dist", init_estim_sq_dist, low=0.0, low_open=True)

    def init_fn(params: Params) -> DoWGState:
        dtype = moments.scalar_dtype(params)
        initial = eps if init_estim_sq_dist is None else init_estim_sq_dist
        return DoWGState(
            init_params=moments.init_copy(params, keep_dtype=True),
            weighted_sq_norm_grads=jnp.zeros([], dtype),
            estim_sq_dist=jnp.asarray(moments.scalar(initial, dtype), dtype),
        )

    def update_fn(updates: Updates, state: DoWGState, params: Params | None = None) -> tuple[Updates, DoWGState]:
        _, flat_params, flat_init = _leaves(updates, params, state.init_params, "DoWG")
        dtype = state.estim_sq_dist.dtype
        estim_sq_dist = jnp.maximum(state.estim_sq_dist, numerics.squared_distance(flat_params, flat_init, dtype))
        weighted = estim_sq_dist * numerics.sum_of_squares(updates, dtype) + state.weighted_sq_norm_grads
        eta = moments.safe_divide(estim_sq_dist, moments.safe_sqrt(weighted) + moments.scalar(eps, dtype))
        new_updates = jax.tree.map(lambda g: moments.scale_leaf(eta, g), updates)
        return new_updates, DoWGState(state.init_params, weighted, estim_sq_dist)

    return optax.GradientTransformation(init_fn, update_fn)


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: Any = None,
    eps: Any = 1e-4,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DoWG (Distance over Weighted Gradients): DoG with gradients weighted by the squared distance.

    At step :math:`t = 0, 1, \dots`, with norms over the whole parameter tree:

    .. math::
        g_t &\leftarrow g_t + \lambda x_t \quad \text{(coupled decay)} \\
        \bar r_t^2 &= \max(\bar r_{t-1}^2, \|x_t - x_0\|^2), \qquad
            \bar r_{-1}^2 = \texttt{init\_estim\_sq\_dist} \;(\epsilon \text{ if None}) \\
        v_t &= \bar r_t^2 \|g_t\|^2 + v_{t-1}, \qquad v_{-1} = 0 \\
        \eta_t &= \bar r_t^2 / (\sqrt{v_t} + \epsilon) \\
        x_{t+1} &= x_t - c_t\, \eta_t\, g_t

    Args:
      learning_rate: :math:`c_t`, a multiplier of the step (1 is the method), a non-negative
        number or a schedule ``count -> value``.
      init_estim_sq_dist: :math:`r_\epsilon^2`, the initial squared distance estimate (> 0), or
        None to use ``eps``.
      eps: added to :math:`\sqrt{v_t}` (and the initial squared distance when
        ``init_estim_sq_dist`` is None), >= 0.
      weight_decay: :math:`\lambda` >= 0, added to the gradient before the statistics.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
      >>> opt = adaopt.dowg()
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-3)
      True

    References:
      Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
      Gradient Descent Method", NeurIPS 2023, https://arxiv.org/abs/2305.16284, Algorithm 1.

      Reference implementations: the paper has no package of its own.
      ``dowg(1.0, init_estim_sq_dist=r_eps**2, eps=0.0)`` is Algorithm 1 exactly: unconstrained
      (so the projection is the identity), it keeps
      :math:`\bar r_t = \max(\|x_t - x_0\|, \bar r_{t-1})` from :math:`\bar r_{-1} = r_\epsilon`,
      :math:`v_t = v_{t-1} + \bar r_t^2 \|\nabla f(x_t)\|^2` from :math:`v_{-1} = 0`, and
      :math:`\eta_t = \bar r_t^2 / \sqrt{v_t}`: the same recursion, kept here (as in optax) in
      squared distances, with no :math:`\epsilon` in the denominator and an explicit
      :math:`r_\epsilon`. ``optax.contrib.dowg(learning_rate, init_estim_sq_dist, eps,
      weight_decay, mask)`` is ``dowg`` with the same arguments, and the defaults are its: it
      starts from :math:`r_\epsilon^2 = \epsilon = 10^{-4}` and adds :math:`\epsilon` to
      :math:`\sqrt{v_t}`.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_dowg(init_estim_sq_dist, eps)
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, complex_convention="modulus"
    )  # norms and real inner products of a step linear in the gradient: both conventions agree
