"""Schedule-Free SGD, AdamW and RAdam: interpolation and iterate averaging in place of a schedule.

One block, :func:`scale_by_schedule_free`, turns a direction (the gradient, or a preconditioned
gradient plus weight decay) into the Schedule-Free step; the optimizers differ only in the
direction they feed it (:func:`scale_by_debiased_rms` for AdamW and RAdam) and in a factor on
the learning rate (RAdam's rectification). The parameters the optimizer updates are the points
where gradients are taken (:math:`y`); the averaged iterate to evaluate (:math:`x`) comes from
:func:`schedule_free_eval_params`. This is how the authors' package (``schedulefree``) keeps its
parameters in train mode (its ``*Reference`` classes also store :math:`x` and :math:`y`; only its
``*Closure`` classes keep :math:`x` in the parameters between steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, complex_params, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.rmsprop import scale_by_debiased_rms

LearningRateFactor = Callable[[jax.Array], jax.Array]
"""A factor on the learning rate, a function of the step :math:`t` (1, 2, ...) in the scalar dtype."""


class ScheduleFreeState(NamedTuple):
    r"""State of :func:`scale_by_schedule_free`: the step count, the averaging's scalars and :math:`z`.

    The scalars are 0-d arrays in the parameters' widest float dtype (at least float32); ``z``
    mirrors the parameters.

    Attributes:
      count: :math:`t`, the number of updates so far, a saturating int32.
      b1: :math:`\beta_1`, the interpolation weight of the last step, kept for
        :func:`schedule_free_eval_params`.
      log_weight_sum: :math:`\log W_t`, the logarithm of the sum of the averaging weights so far
        (:math:`-\infty` while every weight is 0). Kept as a logarithm: :math:`W_t` grows as
        :math:`t^{r+1}`, past float32's range within a run for :math:`r` of 3 or more (the package
        sums it in Python's float64).
      lr_max: :math:`\gamma^{max}_t`, the largest learning rate so far (-1 before the first step,
        as the package).
      z: :math:`z_t`, the base sequence.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    b1: jax.Array
    log_weight_sum: jax.Array
    lr_max: jax.Array
    z: Updates

    def current_hyperparams(self) -> dict[str, jax.Array]:
        return {"lr_max": self.lr_max}


def _check_warmup_steps(warmup_steps: Any) -> None:
    """A whole number of steps >= 0: an integer, or a number with no fraction (an array under inject_hyperparams)."""
    base.check_scalar("warmup_steps", warmup_steps, low=0.0, high=base.INT32_MAX)  # against the step count
    value = base.concrete_scalar(warmup_steps)  # a real number or None (traced): check_nonnegative took the rest
    if value is not None and not value.is_integer():
        raise base.HyperparameterError(f"warmup_steps must be a finite whole number >= 0, got {warmup_steps!r}.")


def _check_interpolation(name: str, value: Any) -> None:
    # b1 = 0 would make y = z: the averaged iterate could not be recovered from y and z.
    base.check_scalar(name, value, low=0.0, high=1.0, low_open=True, high_open=True)


def radam_rectification(b2: Any, *, silent_sgd_phase: bool = True) -> LearningRateFactor:
    r"""RAdam's rectification as a factor on the learning rate, a function of the step :math:`t`.

    .. math::
        r_t = \begin{cases}
            \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
                & \rho_t > 4 \\
            0 \text{ (silent SGD phase)} \text{ or } 1 & \rho_t \le 4
        \end{cases}

    with :math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`.

    Args:
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      silent_sgd_phase: the factor while :math:`\rho_t \le 4`: 0 (True, no step) or 1 (False).

    Returns:
      A :data:`LearningRateFactor`: the function :math:`t \mapsto r_t`, for
      :func:`scale_by_schedule_free`'s ``learning_rate_factor``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> factor = adaopt.radam_rectification(0.999)
      >>> factor(jnp.asarray(4.0)), factor(jnp.asarray(5.0)) > 0  # rho_t > 4 from t = 5 at b2 = 0.999
      (Array(0., dtype=float32), Array(True, dtype=bool))

    References:
      Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
      Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265.
    """

    base.check_decay("b2", b2)

    def factor(step: jax.Array) -> jax.Array:
        dtype = step.dtype
        rho_inf, rho, _ = moments.radam_rho(b2, step, dtype)
        rectify = rho > 4
        ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        # The unused branch stays finite, so that gradients through the step do not turn NaN.
        r = jnp.sqrt(jnp.where(rectify, ratio, 1))
        return jnp.where(rectify, r, jnp.asarray(0.0 if silent_sgd_phase else 1.0, dtype))

    return factor


def scale_by_schedule_free(
    learning_rate: ScalarOrSchedule,
    b1: Any = 0.9,
    *,
    warmup_steps: Any = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    learning_rate_factor: LearningRateFactor | None = None,
    z_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""The Schedule-Free step: a direction :math:`d_t` moves :math:`z`; :math:`y` interpolates.

    The parameters are :math:`y`, where gradients are taken; :math:`d_t` is this block's input
    (the gradient, or a preconditioned gradient plus weight decay at :math:`y`). With
    :math:`k = t - 1` steps taken before this one:

    .. math::
        \gamma_t &= \eta(k) \cdot \min(1, t / T_{warmup}) \cdot \phi(t) \\
        \gamma^{max}_t &= \max(\gamma^{max}_{t-1}, \gamma_t), \qquad \gamma^{max}_0 = -1 \\
        w_t &= t^r \, (\gamma^{max}_t)^p, \qquad W_t = W_{t-1} + w_t, \qquad
            c_t = w_t / W_t \;\; (0 \text{ if } W_t = 0) \\
        z_t &= z_{t-1} - \gamma_t d_t \\
        y_t &= y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t \big(\beta_1 (1 - c_t) - 1\big) d_t

    with :math:`z_0 = y_0` (the initial parameters) and :math:`\phi` the ``learning_rate_factor``
    (1 if None). This is :math:`x_t = (1 - c_t) x_{t-1} + c_t z_t`,
    :math:`y_t = \beta_1 x_t + (1 - \beta_1) z_t` without storing :math:`x`; it is recovered
    by :func:`schedule_free_eval_params` as :math:`x_t = y_t + (1 - 1/\beta_1)(z_t - y_t)`.
    A learning rate that falls to 0 mid-run (a schedule, ``inject_hyperparams``) stops :math:`z`,
    not the parameters: the average's weights use the largest rate so far, so the average goes on
    moving toward :math:`z`, and :math:`y` with it (as in the authors' package).

    Args:
      learning_rate: :math:`\eta`, a non-negative number or a schedule ``count -> value``
        (count from 0).
      b1: :math:`\beta_1`, the interpolation between the average and :math:`z`, in (0, 1).
      warmup_steps: :math:`T_{warmup}`, a linear warmup of the learning rate (an integer >= 0).
      r: :math:`r` >= 0, polynomial weighting of the average.
      weight_lr_power: :math:`p` >= 0, the power of the largest learning rate in the weights.
      learning_rate_factor: :math:`\phi`, a function of the step :math:`t` (a float array),
        e.g. :func:`radam_rectification`.
      z_dtype: storage dtype of :math:`z` (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScheduleFreeState`; ``update``
      needs the parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_schedule_free(0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = block.init(params)
      >>> step, state = block.update(params, state, params)  # c_1 = 1: y moves to z_1 = y - 0.1 d
      >>> step, state.z
      (Array([-0.1,  0.2], dtype=float32), Array([ 0.9, -1.8], dtype=float32))

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682.

      Reference package: ``schedulefree`` 1.4.1 (https://github.com/facebookresearch/schedule_free);
      :func:`schedule_free_sgd`, :func:`schedule_free_adamw` and :func:`schedule_free_radam` give
      the arguments that reproduce its optimizers.
    """
    base.check_learning_rate(learning_rate)
    _check_interpolation("b1", b1)
    _check_warmup_steps(warmup_steps)
    base.check_nonnegative("r", r)
    base.check_nonnegative("weight_lr_power", weight_lr_power)
    base.check_dtype("z_dtype", z_dtype)
    if learning_rate_factor is not None:
        base.check_schedule("learning_rate_factor", learning_rate_factor, jnp.float32)

    def init_fn(params: base.Params) -> ScheduleFreeState:
        dtype = moments.scalar_dtype(params)
        return ScheduleFreeState(
            count=moments.zero_count(),
            b1=jnp.asarray(b1).astype(dtype),
            log_weight_sum=jnp.full([], -jnp.inf, dtype),
            lr_max=jnp.full([], -1.0, dtype),
            z=moments.init_copy(params, z_dtype),
        )

    def update_fn(
        updates: Updates, state: ScheduleFreeState, params: base.Params | None = None
    ) -> tuple[Updates, ScheduleFreeState]:
        params = base.require_params(params, "Schedule-Free")
        base.check_tree_match(updates, params, "parameters")
        dtype = state.log_weight_sum.dtype
        count = moments.safe_increment(state.count)
        step = count.astype(dtype)
        lr = numerics.learning_rate_at(learning_rate, state.count, dtype)
        if not base.is_zero(warmup_steps):
            warmup = moments.scalar(warmup_steps, dtype)
            lr = lr * jnp.where(step <= warmup, moments.safe_divide(step, warmup), 1)
        if learning_rate_factor is not None:
            lr = lr * learning_rate_factor(step)
        lr = lr.astype(dtype)  # a learning_rate_factor may return another dtype
        lr_max = jnp.maximum(state.lr_max, lr)
        # c_t = w_t / W_t in logarithms (W_t overflows float32 for r >= 3), with w_t from this step's r and p as the
        # package's: log w_t = r log t + p log lr_max; a weight of 0 (p > 0 while every rate is 0) has c = 0.
        power = moments.scalar(weight_lr_power, dtype)
        any_rate = lr_max > 0
        # No -inf enters a product or logaddexp, whose derivatives are then NaN: where(-inf) only (jax.grad through
        # steps at a rate of 0, a warmup from 0 or RAdam's SGD phase, with respect to r or weight_lr_power).
        log_lr = jnp.log(jnp.where(any_rate, lr_max, 1))
        lr_term = jnp.where(jnp.asarray(power) == 0, 0, jnp.where(any_rate, power * log_lr, -jnp.inf))
        log_weight = (moments.scalar(r, dtype) * jnp.log(step) + lr_term).astype(dtype)
        weighed = log_weight > -jnp.inf
        both = weighed & (state.log_weight_sum > -jnp.inf)
        log_weight_sum = jnp.where(
            both,
            jnp.logaddexp(jnp.where(both, state.log_weight_sum, 0), jnp.where(both, log_weight, 0)),
            jnp.where(weighed, log_weight, state.log_weight_sum),
        )
        c = jnp.where(weighed, jnp.exp(jnp.where(weighed, log_weight - log_weight_sum, 0)), 0)
        beta1 = jnp.asarray(moments.scalar(b1, dtype)).astype(dtype)
        y_lr = lr * (beta1 * (1 - c) - 1)

        def leaf(d: jax.Array, y: jax.Array, z: jax.Array) -> tuple[jax.Array, ...]:
            ldtype, d32, (y32, z32) = moments.to_compute(d, y, z)
            z_new = z32 - moments.times(d32, lr.astype(ldtype))
            u = moments.times(z32 - y32, c.astype(ldtype)) + moments.times(d32, y_lr.astype(ldtype))
            return u.astype(d.dtype), moments.store(z_new, z)

        step_tree, z = moments.leafwise(leaf, 2, updates, params, state.z)
        return step_tree, ScheduleFreeState(count, beta1, log_weight_sum, lr_max, z)

    return optax.GradientTransformation(init_fn, update_fn)


def schedule_free_eval_params(state: Any, params: base.Params) -> base.Params:
    r"""The averaged iterate :math:`x` to evaluate, from training parameters :math:`y`.

    .. math::
        x_t = y_t + (1 - 1/\beta_1)(z_t - y_t)

    (the package's ``optimizer.eval()``; training goes on from ``params``, untouched).

    Args:
      state: the optimizer's state, or any pytree holding it (an ``optax.chain``'s,
        ``inject_hyperparams``', ``MultiSteps``' ...), plain or an ``nnx.Optimizer``'s
        ``opt_state``; or holding one :class:`ScheduleFreeState` per part of the tree
        (:func:`adaopt.param_groups`, ``optax.partition``, ``optax.masked``): each leaf is then
        averaged by the state that trains it, with that state's :math:`\beta_1`, and a leaf that
        none trains (a group of another optimizer, a frozen one) is its own :math:`x = y`.
      params: the parameters being trained (:math:`y`), as a plain tree or as Flax NNX
        variables (``nnx.state(model, nnx.Param)``).

    Returns:
      :math:`x`, with the parameters' tree and dtypes, in ``params``' form: NNX ``Param``
      variables (new ones; ``params``' are untouched) for NNX parameters, ready for
      ``nnx.merge`` or ``nnx.update``.

    Raises:
      ValueError: ``state`` holds no :class:`ScheduleFreeState`, or several that train one leaf.
      TreeMismatchError: ``params`` are not the parameters the state was built for.
      TypeError: ``state`` is the ``nnx.Optimizer`` itself, not its ``opt_state``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.schedule_free_sgd(0.1, momentum=0.5)
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update(params, state, params)
      ...     params = params + updates
      >>> x = adaopt.schedule_free_eval_params(state, params)
      >>> params, jnp.round(x, 6)  # y_2, and the average x_2 = (z_1 + z_2) / 2 = (0.9 + 0.81) / 2
      (Array([0.8325], dtype=float32), Array([0.855], dtype=float32))

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682.
    """
    found = numerics.find_states(state, ScheduleFreeState)
    if not found:
        raise ValueError(
            "Expected an optimizer state holding a ScheduleFreeState, found 0: pass the state of a schedule-free "
            "optimizer (adaopt.schedule_free_sgd, _adamw or _radam)."
        )
    y, as_params = numerics.unwrap_variables(params, "params")
    paths, treedef = jax.tree_util.tree_flatten_with_path(y)
    owners = _trained_by(found, len(paths))

    def average(path: Any, y: jax.Array, owner: tuple[int, Any, jax.Array] | None) -> jax.Array:
        if owner is None:  # trained by another optimizer, or frozen: its own average
            return y
        _, z, b1 = owner
        # With complex_convention="real_imag", the state holds a complex parameter as real pairs.
        pairs = complex_params.is_complex(y) and not complex_params.is_complex(z)
        view = complex_params.to_pairs(y) if pairs else y
        if jnp.shape(view) != jnp.shape(z):
            raise base.TreeMismatchError(
                f"The parameters at {jax.tree_util.keystr(path)} have shape {jnp.shape(view)}, but the optimizer's "
                f"state there has shape {jnp.shape(z)}: pass the parameters it was built for."
            )
        dtype, y32, (z32,) = moments.to_compute(view, z)
        x = (y32 + moments.times(z32 - y32, 1 - 1 / b1.astype(dtype))).astype(view.dtype)
        return complex_params.from_pairs(x, y) if pairs else x

    x = [average(path, leaf, owner) for (path, leaf), owner in zip(paths, owners, strict=True)]
    return as_params(jax.tree.unflatten(treedef, x))


def _trained_by(found: list[ScheduleFreeState], n_leaves: int) -> list[tuple[int, Any, jax.Array] | None]:
    """For each of the parameters' ``n_leaves`` leaves, the state that trains it (its index among those found), its
    ``z`` leaf and its ``b1`` (a partitioned tree's states hold ``optax.MaskedNode`` where another part's leaves
    are); None for a leaf that none trains."""
    owners: list[tuple[int, Any, jax.Array] | None] = [None] * n_leaves
    for k, sf in enumerate(found):
        parts = jax.tree.leaves(sf.z, is_leaf=lambda x: base.is_masked_node(x) or base.is_stored(x))
        if len(parts) != n_leaves:
            raise base.TreeMismatchError(
                "The parameters do not have the structure of the optimizer's state: its ScheduleFreeState's z has "
                f"{len(parts)} leaves where the parameters have {n_leaves}: pass the parameters it was built for "
                "(under optax.flatten, the one flat vector it made of them)."
            )
        for i, part in enumerate(parts):
            if base.is_masked_node(part):
                continue
            claimed = owners[i]
            if claimed is not None:
                raise ValueError(
                    f"Two ScheduleFreeStates (number {claimed[0]} and number {k} found) both train leaf {i} of the "
                    "parameters: pass the state of one optimizer per leaf."
                )
            owners[i] = (k, part, sf.b1)
    return owners


def _schedule_free(
    direction: tuple[optax.GradientTransformation, ...],
    learning_rate: ScalarOrSchedule,
    b1: Any,
    weight_decay: Any,
    weight_decay_mask: base.MaskOrFn | None,
    complex_convention: str = "modulus",
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """Direction, weight decay at y, then the Schedule-Free step (which holds the learning rate).

    With ``complex_convention="real_imag"``, complex parameters are pairs of real ones
    (:func:`as_real_imag`) throughout, direction included.
    """
    decay = base.add_decayed_weights(weight_decay, weight_decay_mask)
    chain = optax.chain(
        base.check_gradient_tree(), *direction, decay, scale_by_schedule_free(learning_rate, b1, **options)
    )
    return complex_params.with_convention(chain, complex_convention)


def schedule_free_sgd(
    learning_rate: ScalarOrSchedule = 1.0,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    *,
    warmup_steps: Any = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    z_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-Free SGD: gradient steps on :math:`z`, gradients taken at an interpolation :math:`y`.

    .. math::
        d_t &= g_t + \lambda y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t d_t, \qquad
        y_t = y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t \big(\mu (1 - c_t) - 1\big) d_t

    with :math:`\gamma_t` (warmup) and :math:`c_t` (averaging weights) as in
    :func:`scale_by_schedule_free`. The parameters are :math:`y`; evaluate at
    :func:`schedule_free_eval_params`.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value``; with a schedule,
        the package's semantics of changing ``group['lr']`` every step.
      momentum: :math:`\mu` (the paper's :math:`\beta`), in (0, 1).
      weight_decay: :math:`\lambda` >= 0, taken at :math:`y` and added to the gradient.
      warmup_steps: length of the linear warmup (an integer >= 0).
      r: polynomial weighting of the average, >= 0.
      weight_lr_power: power of the largest learning rate in the averaging weights, >= 0.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      z_dtype: storage dtype of :math:`z`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.schedule_free_sgd(0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...     updates, state = opt.update(2 * params, state, params)  # the gradient of |params|^2
      ...     params = optax.apply_updates(params, updates)
      >>> x = adaopt.schedule_free_eval_params(state, params)  # evaluate here
      >>> bool(jnp.sum(x**2) < 1e-2)
      True

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682.

      Reference package: ``schedulefree`` 1.4.1 (https://github.com/facebookresearch/schedule_free).
      ``schedulefree.SGDScheduleFree(lr, momentum, weight_decay, warmup_steps, r,
      weight_lr_power)`` (in train mode) matches ``schedule_free_sgd(lr, momentum, weight_decay,
      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)``, and its ``eval()``
      parameters :func:`schedule_free_eval_params`; ``SGDScheduleFreeReference``, which stores
      :math:`x` and :math:`y` as well, follows the same trajectory. Per-group learning rates set
      before each ``step()`` follow ``learning_rate`` as a schedule.
      ``optax.contrib.schedule_free_sgd(lr, warmup_steps=None, b1=momentum, weight_decay,
      weight_lr_power)`` matches this with a constant learning rate, no warmup and ``r=0``, but
      not under a schedule or a warmup: it steps :math:`z` with :math:`\eta(k)` but weighs the
      average with :math:`\eta(k + 1)` (its count starts at 1, its base optimizer's at 0), and
      its warmup is such a schedule rising from 0 (its first step moves nothing, the package's
      moves by :math:`-\eta\, d_1 / T_{warmup}`). It also has no ``r`` and no decay mask, and
      keeps :math:`z` and its scalars in the parameters' own (lowest) dtype.
    """
    base.check_learning_rate(learning_rate)
    _check_interpolation("momentum", momentum)
    base.check_nonnegative("weight_decay", weight_decay)
    options = dict(warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, z_dtype=z_dtype)
    return _schedule_free((), learning_rate, momentum, weight_decay, weight_decay_mask, **options)


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    warmup_steps: Any = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    debias: Literal["moment", "learning_rate"] = "moment",
    weight_decay_mask: base.MaskOrFn | None = None,
    eps_mode: moments.EpsMode = "add",
    nu_dtype: Any = None,
    z_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-Free AdamW: Adam's second moment without momentum, with Schedule-Free averaging.

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        d_t &= \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t d_t, \qquad
        y_t = y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t \big(\beta_1 (1 - c_t) - 1\big) d_t

    with :math:`\gamma_t` and :math:`c_t` as in :func:`scale_by_schedule_free`. With
    ``debias="learning_rate"`` (the paper's experiments), :math:`d_t` divides by
    :math:`\sqrt{v_t} + \epsilon` and :math:`\gamma_t` is multiplied by
    :math:`\sqrt{1 - \beta_2^t}`, which then enters the averaging weights too.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the interpolation, in (0, 1).
      b2: decay of the second moment, in [0, 1); above 0.6 with ``silent_sgd_phase`` (else
        :math:`\rho_t \le 4` at every step, and nothing moves).
      eps: added to the root of the second moment, >= 0.
      weight_decay: :math:`\lambda` >= 0, taken at :math:`y`, added after the scaling.
      warmup_steps: the length of the linear warmup (an integer >= 0).
      r: the polynomial weighting of the average, >= 0.
      weight_lr_power: the power of the largest learning rate in the averaging weights, >= 0.
      debias: "moment" (the package's ``AdamWScheduleFree``) or "learning_rate"
        (``AdamWScheduleFreePaper``), as above.
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`, heavyball's form).
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).
      z_dtype: the storage dtype of :math:`z` (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.schedule_free_adamw(0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     updates, state = opt.update(2 * params, state, params)  # the gradient of |params|^2
      ...     params = optax.apply_updates(params, updates)
      >>> x = adaopt.schedule_free_eval_params(state, params)  # evaluate here
      >>> bool(jnp.sum(x**2) < 0.1)
      True

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682.

      Reference package: ``schedulefree`` 1.4.1 (https://github.com/facebookresearch/schedule_free).
      ``schedulefree.AdamWScheduleFree(lr, betas=(b1, b2), eps, weight_decay, warmup_steps, r,
      weight_lr_power)`` (in train mode) matches ``schedule_free_adamw(lr, b1, b2, eps,
      weight_decay, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)``, and its
      ``eval()`` parameters :func:`schedule_free_eval_params`; so does
      ``AdamWScheduleFreeReference`` (its default ``decay_at_z=False``; decay at :math:`z` is not
      offered here). ``AdamWScheduleFreePaper`` matches ``debias="learning_rate"``.
      ``optax.contrib.schedule_free_adamw(lr, warmup_steps=None, b1, b2, eps, weight_decay)``
      matches with a constant learning rate and no warmup, and differs under a schedule or a
      warmup as described in :func:`schedule_free_sgd`. ``heavyball.SFAdamW(lr, betas=(b1, b2),
      eps, weight_decay, warmup_steps=W, r, weight_lr_power)`` (its parameters, in train mode) is
      this with ``eps_mode="max"`` and ``warmup_steps=W + 1`` for ``W > 0`` (its warmup rate is
      :math:`t / (W + 1)`).
    """
    base.check_learning_rate(learning_rate)
    _check_interpolation("b1", b1)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_choice("debias", debias, ("moment", "learning_rate"))
    factor: LearningRateFactor | None = None
    if debias == "learning_rate":
        factor = lambda step: jnp.sqrt(moments.bias_correction(b2, step, step.dtype))
    direction = scale_by_debiased_rms(b2, eps, debias=debias == "moment", eps_mode=eps_mode, nu_dtype=nu_dtype)
    options = dict(warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, z_dtype=z_dtype)
    base.check_complex_convention(complex_convention)
    return _schedule_free(
        (direction,),
        learning_rate,
        b1,
        weight_decay,
        weight_decay_mask,
        complex_convention,
        learning_rate_factor=factor,
        **options,
    )


@base.check_flags
def schedule_free_radam(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    silent_sgd_phase: bool = True,
    weight_decay_mask: base.MaskOrFn | None = None,
    nu_dtype: Any = None,
    z_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-Free RAdam: Schedule-Free AdamW whose learning rate is RAdam's rectification, no warmup.

    .. math::
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
            \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        d_t &= \begin{cases}
            \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda y_{t-1} & \rho_t > 4 \\
            g_t + \lambda y_{t-1} & \rho_t \le 4
        \end{cases} \\
        \gamma_t &= \eta(k)\, r_t, \qquad z_t = z_{t-1} - \gamma_t d_t, \qquad
        y_t = y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t \big(\beta_1 (1 - c_t) - 1\big) d_t

    with :math:`r_t` from :func:`radam_rectification` (0 while :math:`\rho_t \le 4` with
    ``silent_sgd_phase``: the first 4 steps at :math:`\beta_2 = 0.999` only update :math:`v`)
    and :math:`c_t` as in :func:`scale_by_schedule_free`.

    Args:
      learning_rate: :math:`\eta`, a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the interpolation, in (0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      weight_decay: :math:`\lambda` >= 0, taken at :math:`y`, added after the scaling.
      r: the polynomial weighting of the average, >= 0.
      weight_lr_power: the power of the largest learning rate in the averaging weights, >= 0.
      silent_sgd_phase: while :math:`\rho_t \le 4`, do not move (True, the package's default)
        or take plain SGD steps (False).
      weight_decay_mask: a tree of booleans (or a function returning one) selecting decayed leaves.
      nu_dtype: the storage dtype of :math:`v` (default: the parameter's, at least float32).
      z_dtype: the storage dtype of :math:`z` (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.schedule_free_radam(0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(4):  # rho_t <= 4 for t <= 4 at b2 = 0.999: the silent SGD phase
      ...     updates, state = opt.update(2 * params, state, params)
      >>> updates
      Array([0., 0.], dtype=float32)

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682;
      Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
      Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265.

      Reference package: ``schedulefree`` 1.4.1 (https://github.com/facebookresearch/schedule_free).
      ``schedulefree.RAdamScheduleFree(lr, betas=(b1, b2), eps, weight_decay, r,
      weight_lr_power, silent_sgd_phase)`` (in train mode) matches ``schedule_free_radam(lr, b1,
      b2, eps, weight_decay, r=r, weight_lr_power=weight_lr_power,
      silent_sgd_phase=silent_sgd_phase)``, and its ``eval()`` parameters
      :func:`schedule_free_eval_params`. optax has no Schedule-Free RAdam.
    """
    base.check_learning_rate(learning_rate)
    _check_interpolation("b1", b1)
    base.check_nonnegative("weight_decay", weight_decay)
    direction = scale_by_debiased_rms(b2, eps, rectify=True, nu_dtype=nu_dtype)  # b2 checked there
    if silent_sgd_phase and isinstance(b2, (int, float)) and b2 <= 0.6:
        # rho_t rises to 2 / (1 - b2) - 1 <= 4: the silent phase never ends (as in the package)
        raise base.HyperparameterError(
            f"b2 must be above 0.6 with silent_sgd_phase=True, got {b2!r}: RAdam's rho_t never exceeds "
            "2 / (1 - b2) - 1 <= 4, so the parameters would never move. Raise b2, or pass silent_sgd_phase=False."
        )
    factor = radam_rectification(b2, silent_sgd_phase=silent_sgd_phase)
    options = dict(r=r, weight_lr_power=weight_lr_power, z_dtype=z_dtype)
    base.check_complex_convention(complex_convention)
    return _schedule_free(
        (direction,),
        learning_rate,
        b1,
        weight_decay,
        weight_decay_mask,
        complex_convention,
        learning_rate_factor=factor,
        **options,
    )
