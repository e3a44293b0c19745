"""Adafactor: a second moment factored into row and column statistics, relative step sizes and update clipping.

A matrix's second moment is kept as the moving averages of its rows' and its columns' mean
squared gradients, :math:`n + m` numbers for :math:`n m`; their outer product, divided by their
mean, estimates each coordinate's. One function, :func:`adafactor`, reproduces the paper and the
three implementations people use (``transformers``, ``torch.optim``, ``optax``) by its arguments:
the table in its docstring gives each.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments, numerics, placement
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex

FactoredAxes = Literal["last_two", "largest_two"]
WeightDecayMode = Literal["step_size", "learning_rate", "unscaled"]

_NO_COMPLEX = (
    "Adafactor does not take complex parameters: its factored statistics and its relative step have no complex "
    "form here. Got a complex leaf at {path} ({dtype}). Train complex leaves with another optimizer (optax.partition "
    "routes leaves to different optimizers)."
)
_MASKED = optax.MaskedNode()


class AdafactorState(NamedTuple):
    """State of :func:`scale_by_adafactor`.

    ``v_row``, ``v_col`` and ``v`` each have the parameters' tree structure; a leaf that does not
    keep that statistic holds ``optax.MaskedNode()`` there (as a group's state does under
    ``optax.partition``), so every leaf has either ``v_row`` and ``v_col`` or ``v``.

    Attributes:
      count: the number of updates so far, a saturating int32.
      v_row: the row statistic :math:`R_t` of each factored leaf: the moving average of the mean
        squared gradient over the column axis, an array of the leaf's shape without that axis.
      v_col: the column statistic :math:`C_t` of each factored leaf: the moving average over the
        row axis, an array of the leaf's shape without that axis.
      v: the whole second moment :math:`V_t` of each leaf that is not factored (0-d and 1-d
        leaves, and those the rule of :func:`scale_by_adafactor` leaves whole), of its shape.
      mu: the first moment :math:`m_t` of the steps, mirroring the parameters; None without ``b1``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    v_row: Updates
    v_col: Updates
    v: Updates
    mu: Updates | None


def _check_real(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_complex(leaf):
            raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype))


def _factored_axes(
    shape: tuple[int, ...], factored: bool, rule: FactoredAxes, min_dim_size: int
) -> tuple[int, int] | None:
    """The (row, column) axes of a factored leaf of ``shape``, or None for a leaf kept whole.

    ``"last_two"``: the last two axes, the others a batch of matrices; ``"largest_two"``: the two
    largest axes (the largest holds the columns; of two of one size, the later, as optax's argsort).
    Both axes must have at least ``min_dim_size`` elements (at least 1: an empty axis is never factored).
    """
    if not factored or len(shape) < 2:
        return None
    if rule == "last_two":
        rows, cols = len(shape) - 2, len(shape) - 1
    else:
        *_, rows, cols = sorted(range(len(shape)), key=lambda axis: shape[axis])
    if min(shape[rows], shape[cols]) < max(min_dim_size, 1):
        return None
    return rows, cols


def _rms(x: jax.Array) -> jax.Array:
    """The root mean square of a leaf (0 for an empty one), with a zero derivative at 0."""
    if x.size == 0:
        return jnp.zeros([], x.dtype)
    return moments.safe_sqrt(jnp.mean(x * x))


def _inv_sqrt(x: jax.Array, positive: bool) -> jax.Array:
    """``1 / sqrt(x)``; unless ``x`` is known ``positive``, 0 where it is 0 (a statistic of zero gradients, eps = 0)."""
    return jax.lax.rsqrt(x) if positive else moments.safe_divide(1, jnp.sqrt(x))


def _divide(x: jax.Array, y: jax.Array, positive: bool) -> jax.Array:
    """``x / y``; unless ``y`` is known ``positive``, 0 where it is 0."""
    return x / y if positive else moments.safe_divide(x, y)


def _relative_step(rate: Any, t: jax.Array, relative_step: bool) -> Any:
    r""":math:`\rho_t`: ``min(rate, 1 / sqrt(t))`` with ``relative_step``, else ``rate``."""
    return jnp.minimum(rate, 1 / jnp.sqrt(t)) if relative_step else rate


def _step_size(rho: Any, param: jax.Array | None, scale_parameter: bool, eps_scale: Any) -> Any:
    r""":math:`\alpha_t = \rho_t \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))` with ``scale_parameter``, else :math:`\rho_t`."""
    if not scale_parameter or param is None:
        return rho
    return rho * jnp.maximum(eps_scale, _rms(param))


def _zeros_without(param: Any, axis: int, dtype: Any) -> jax.Array:
    """Zeros of ``param``'s shape less ``axis``, with the sharding a mean over that axis has (the step's)."""
    return placement.zeros(jax.eval_shape(lambda p: jnp.mean(p, axis=axis), param), param, dtype)


@base.check_flags
def scale_by_adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    decay_rate: Any = 0.8,
    clip_threshold: Any = 1.0,
    b1: Any = None,
    eps: Any = 1e-30,
    eps_scale: Any = 1e-3,
    *,
    relative_step: bool = True,
    scale_parameter: bool = True,
    eps_mode: moments.EpsMode = "add",
    factored: bool = True,
    factored_axes: FactoredAxes = "last_two",
    min_dim_size_to_factor: int = 1,
    decay_offset: Any = 0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adafactor's block: the gradient over its factored second moment, clipped, times a relative step size.

    At step :math:`t` (from 1), with :math:`\eta_t` the learning rate (a schedule is read at
    :math:`t - 1`) and :math:`\epsilon_1` added to :math:`g_t^2` (``eps_mode="add"``):

    .. math::
        \rho_t &= \min(\eta_t, 1/\sqrt{t}) \;\text{(relative\_step)} \quad\text{or}\quad \eta_t, \qquad
        \alpha_t = \rho_t \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1})) \;\text{(scale\_parameter)}
            \quad\text{or}\quad \rho_t \\
        \hat\beta_t &= 1 - \max(t - o, 1)^{-c} \\
        R_t &= \hat\beta_t R_{t-1} + (1 - \hat\beta_t)\, \mathrm{mean}_{cols}(g_t^2 + \epsilon_1), \qquad
        C_t = \hat\beta_t C_{t-1} + (1 - \hat\beta_t)\, \mathrm{mean}_{rows}(g_t^2 + \epsilon_1) \\
        U_t &= g_t \Big/ \sqrt{R_t C_t / \mathrm{mean}_{rows}(R_t)} \quad \text{(factored)}, \qquad
        V_t = \hat\beta_t V_{t-1} + (1 - \hat\beta_t)(g_t^2 + \epsilon_1), \quad
        U_t = g_t / \sqrt{V_t} \quad \text{(whole)} \\
        \hat U_t &= U_t / \max(1, \mathrm{RMS}(U_t) / d) \\
        u_t &= \alpha_t \hat U_t \qquad \text{or, with b1,} \qquad
            u_t = m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, \alpha_t \hat U_t

    where :math:`R_t C_t` is the outer product of the row statistic (one value per row) and the
    column statistic (one per column), and RMS is the root mean square over the whole leaf. The
    paper sums where this averages: the estimate is the same. With ``eps_mode="max"`` (torch's)
    nothing is added to :math:`g_t^2`; the row mean is floored instead and the root, with
    :math:`\hat V_t = R_t C_t / \max(\mathrm{mean}_{rows}(R_t), \epsilon_1)` (or :math:`V_t`):
    :math:`U_t = g_t / \max(\sqrt{\hat V_t}, \epsilon_1)`.

    Which leaves are factored: a leaf with at least two axes, unless ``factored=False``. Its rows
    and columns are its last two axes (``factored_axes="last_two"``, the paper's, transformers'
    and torch's: the leading axes are a batch of matrices, each with its own statistics) or its
    two largest axes (``"largest_two"``, optax's: the largest holds the columns, and the others
    are the batch); both must have at least ``min_dim_size_to_factor`` elements (optax: 128).
    0-d and 1-d leaves, leaves with an empty axis there, and the leaves this rule leaves whole
    keep the whole second moment :math:`V_t`, of their shape.

    Args:
      learning_rate: :math:`\eta_t`, a number >= 0 or a schedule ``count -> value``. With
        ``relative_step`` it caps the relative step :math:`\rho_t` (torch's ``lr``; the paper's
        and transformers' 1e-2); without, it is the step :math:`\rho_t` itself.
      decay_rate: :math:`c` in [0, 1], the exponent of the second moment's decay
        :math:`\hat\beta_t = 1 - t^{-c}` (positive: transformers' ``decay_rate=-0.8`` and torch's
        ``beta2_decay=-0.8`` are 0.8 here). The first step has :math:`\hat\beta_1 = 0`.
      clip_threshold: :math:`d > 0`, the largest RMS of the step before :math:`\alpha_t`; None: no clipping.
      b1: :math:`\beta_1` in [0, 1), the decay of a first moment of the steps :math:`\alpha_t
        \hat U_t` (no bias correction); None: no first moment, and no state for it.
      eps: :math:`\epsilon_1 \ge 0` (see ``eps_mode``); None: the machine epsilon of the leaf's
        dtype (torch's default).
      eps_scale: :math:`\epsilon_2 \ge 0`, the least parameter scale (``scale_parameter``).
      relative_step: :math:`\rho_t = \min(\eta_t, 1/\sqrt{t})`; False: :math:`\rho_t = \eta_t`.
      scale_parameter: multiply the step by :math:`\max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))`
        (then ``update`` needs the parameters).
      eps_mode: ``"add"`` (:math:`\epsilon_1` added to :math:`g_t^2`: the paper, transformers,
        optax) or ``"max"`` (floors, as torch).
      factored: factor the second moment of the leaves with two or more axes.
      factored_axes: ``"last_two"`` or ``"largest_two"`` (see above).
      min_dim_size_to_factor: an integer >= 1: a leaf is factored only when both of its factored
        axes have at least this many elements.
      decay_offset: :math:`o \ge 0`: the decay counts steps from this one (optax's, for fine-tuning):
        :math:`\hat\beta_t = 1 - \max(t - o, 1)^{-c}` (optax's is NaN for :math:`t \le o`).
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the statistics :math:`R, C, V` (default: the parameter's, at
        least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdafactorState`, whose updates are
      the steps :math:`u_t` (to be subtracted; :func:`adafactor` negates them).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adafactor(1.0, relative_step=False, scale_parameter=False)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> state.v_row["w"].shape, state.v_col["w"].shape, state.v["b"].shape
      ((3,), (2,), (2,))
      >>> grads = {"w": jnp.full((3, 2), 2.0), "b": jnp.array([0.5, -2.0])}
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["b"]  # the first step keeps only g^2 + eps: g / |g|
      Array([ 1., -1.], dtype=float32)

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML
      2018, https://arxiv.org/abs/1804.04235.

      Reference packages: :func:`adafactor` gives the arguments that reproduce transformers,
      torch and optax.
    """
    base.check_learning_rate(learning_rate)
    try:
        decay = base.concrete_scalar(decay_rate)
    except TypeError:
        decay = None  # not a number: check_scalar says so
    if decay is not None and decay < 0:
        raise base.HyperparameterError(
            f"decay_rate must be a finite number in [0.0, 1.0], got {decay_rate!r}: it is the positive exponent c of "
            "beta2_t = 1 - t^(-c) (transformers' decay_rate=-0.8 and torch's beta2_decay=-0.8 are decay_rate=0.8)."
        )
    base.check_scalar("decay_rate", decay_rate, low=0.0, high=1.0)
    if clip_threshold is not None:
        base.check_scalar("clip_threshold", clip_threshold, low=0.0, low_open=True)
    if b1 is not None:
        base.check_decay("b1", b1)
    if eps is not None:
        base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_scale", eps_scale)
    base.check_scalar("decay_offset", decay_offset, low=0.0, high=base.INT32_MAX)  # against the step count
    for name, flag in (("relative_step", relative_step), ("scale_parameter", scale_parameter), ("factored", factored)):
        base.check_choice(name, flag, (True, False))
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    base.check_choice("factored_axes", factored_axes, ("last_two", "largest_two"))
    base.check_integer("min_dim_size_to_factor", min_dim_size_to_factor, 1)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_statistics_dtype("nu_dtype", nu_dtype)

    # With eps None (a machine epsilon) or a Python number whose floor (eps, or eps^2 for "max") float32 holds, no
    # statistic, row mean or floored estimate is ever 0: no guard against dividing by 0 is needed.
    floor = eps if eps_mode == "add" or not isinstance(eps, (int, float)) else eps * eps
    positive = eps is None or (isinstance(floor, (int, float)) and floor >= float(np.finfo(np.float32).tiny))

    def plan(shape: tuple[int, ...]) -> tuple[int, int] | None:
        return _factored_axes(shape, factored, factored_axes, min_dim_size_to_factor)

    def init_fn(params: base.Params) -> AdafactorState:
        _check_real(params)
        base.check_floating(params)

        def leaf(p: Any) -> tuple[Any, Any, Any]:
            axes = plan(np.shape(p))
            if axes is None:
                return _MASKED, _MASKED, moments.init_like(p, nu_dtype, real=True)
            rows, cols = axes
            dtype = moments.state_dtype(jnp.result_type(p), nu_dtype, real=True)
            return _zeros_without(p, cols, dtype), _zeros_without(p, rows, dtype), _MASKED

        leaves, treedef = jax.tree.flatten(params)
        slots = [leaf(p) for p in leaves]
        v_row, v_col, v = (jax.tree.unflatten(treedef, [s[i] for s in slots]) for i in range(3))
        mu = None if b1 is None else moments.init_like(params, mu_dtype)
        return AdafactorState(moments.zero_count(), v_row, v_col, v, mu)

    def update_fn(
        updates: Updates, state: AdafactorState, params: base.Params | None = None
    ) -> tuple[Updates, AdafactorState]:
        if scale_parameter:
            params = base.require_params(params, "adafactor's parameter scale (scale_parameter=True)")
        if params is not None:
            base.check_tree_match(updates, params, "parameters")
        # Up to the gradients' structure: this state's MaskedNode placeholders (no statistic kept) stay per-leaf
        # values, where optax.partition's MaskedNode (another group's leaf) matches the gradients' own.
        statistics = [base.leaves_up_to(updates, s) for s in (state.v_row, state.v_col, state.v)]
        if state.mu is not None:
            base.check_tree_match(updates, state.mu, "state")
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            t = count.astype(dtype)
            rho = _relative_step(numerics.learning_rate_at(learning_rate, state.count, dtype), t, relative_step)
            exponent = moments.scalar(decay_rate, dtype)
            # Steps before the offset count as its first (optax's decay is NaN there).
            decay_t = t if base.is_zero(decay_offset) else jnp.maximum(t - moments.scalar(decay_offset, dtype), 1)
            beta2 = 1 - decay_t ** (-exponent)
            threshold = None if clip_threshold is None else moments.scalar(clip_threshold, dtype)
            beta1 = None if b1 is None else moments.scalar(b1, dtype)
            return rho, beta2, threshold, beta1, moments.scalar(eps_scale, dtype)

        def leaf(
            path: Any, g: jax.Array, p: jax.Array | None, r: Any, c: Any, v: Any, m: jax.Array | None
        ) -> tuple[Any, ...]:
            axes = plan(g.shape)
            _check_layout(path, g.shape, axes, r, c, v)
            held = [x for x in (r, c, v, m, p) if x is not None and not base.is_masked_node(x)]
            dtype = moments.compute_dtype(g.dtype, *(x.dtype for x in held))
            rho, beta2, threshold, beta1, e_scale = scalars(dtype)
            e1 = float(jnp.finfo(g.dtype).eps) if eps is None else moments.scalar(eps, dtype)
            g_compute = g.astype(dtype)
            squared = g_compute * g_compute
            if eps_mode == "add":
                squared = squared + e1
            if axes is None:
                v_new = moments.ema(squared, v.astype(dtype), beta2)
                estimate = v_new if eps_mode == "add" else jnp.maximum(v_new, e1 * e1)
                direction = g_compute * _inv_sqrt(estimate, positive)
                stats = (_MASKED, _MASKED, v_new.astype(v.dtype))
            else:
                rows, cols = axes
                r_new = moments.ema(jnp.mean(squared, axis=cols), r.astype(dtype), beta2)
                c_new = moments.ema(jnp.mean(squared, axis=rows), c.astype(dtype), beta2)
                row_mean = jnp.mean(r_new, axis=rows if rows < cols else rows - 1, keepdims=True)
                if eps_mode == "add":
                    row_factor = jnp.expand_dims(_inv_sqrt(_divide(r_new, row_mean, positive), positive), cols)
                    direction = g_compute * row_factor * jnp.expand_dims(_inv_sqrt(c_new, positive), rows)
                else:
                    outer = jnp.expand_dims(r_new, cols) * jnp.expand_dims(c_new, rows)
                    estimate = _divide(outer, jnp.expand_dims(jnp.maximum(row_mean, e1), cols), positive)
                    direction = g_compute * _inv_sqrt(jnp.maximum(estimate, e1 * e1), positive)
                stats = (r_new.astype(r.dtype), c_new.astype(c.dtype), _MASKED)
            if threshold is not None:
                direction = direction / jnp.maximum(1, _rms(direction) / threshold)
            p_compute = None if p is None else p.astype(dtype)
            step = direction * _step_size(rho, p_compute, scale_parameter, e_scale)
            if m is None:
                return step.astype(g.dtype), *stats, None
            m_new = moments.ema(step, m.astype(dtype), beta1)
            return m_new.astype(g.dtype), *stats, moments.store(m_new, m)

        with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        n = len(with_paths)
        per_leaf = zip(
            with_paths,
            [None] * n if params is None else jax.tree.leaves(params),
            *statistics,
            [None] * n if state.mu is None else jax.tree.leaves(state.mu, is_leaf=base.is_stored),
            strict=True,
        )
        outs = [leaf(path, g, p, r, c, v, m) for (path, g), p, r, c, v, m in per_leaf]
        step, v_row, v_col, v = (jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(4))
        mu = None if state.mu is None else jax.tree.unflatten(treedef, [o[4] for o in outs])
        return step, AdafactorState(count, v_row, v_col, v, mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_layout(path: Any, shape: tuple[int, ...], axes: tuple[int, int] | None, r: Any, c: Any, v: Any) -> None:
    """A gradient leaf must fit the statistics ``init`` made for its parameter: the error names the leaf and both."""
    if axes is None:
        fits = base.is_masked_node(r) and base.is_masked_node(c) and not base.is_masked_node(v) and v.shape == shape
    else:
        rows, cols = axes
        fits = (
            base.is_masked_node(v)
            and not base.is_masked_node(r)
            and r.shape == shape[:cols] + shape[cols + 1 :]
            and c.shape == shape[:rows] + shape[rows + 1 :]
        )
    if not fits:
        held = [
            f"{name} of shape {x.shape}"
            for name, x in (("v_row", r), ("v_col", c), ("v", v))
            if not base.is_masked_node(x)
        ]
        raise base.TreeMismatchError(
            f"The gradients at {jax.tree_util.keystr(path) or 'the root'} have shape {shape}, which the optimizer's "
            f"state there ({' and '.join(held)}) was not built for. The optimizer's state was built by `init` for "
            "other parameters: call `init` on the parameters whose gradients you pass (after changing the model, "
            "build a new optimizer state)."
        )


class AdafactorDecayState(NamedTuple):
    """State of Adafactor's weight decay: the step count, for the step size it is scaled by."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _decoupled_decay(
    weight_decay: Any,
    mode: WeightDecayMode,
    learning_rate: ScalarOrSchedule,
    relative_step: bool,
    scale_parameter: bool,
    eps_scale: Any,
) -> optax.GradientTransformation:
    r"""Add :math:`\lambda s_t \theta_{t-1}` to the step, with :math:`s_t` = :math:`\alpha_t`, :math:`\eta_t` or 1 by ``mode``.

    Outside the first moment, and from the parameters before the step, as each reference does.
    """

    def init_fn(params: base.Params) -> AdafactorDecayState:
        del params
        return AdafactorDecayState(moments.zero_count())

    def update_fn(
        updates: Updates, state: AdafactorDecayState, params: base.Params | None = None
    ) -> tuple[Updates, AdafactorDecayState]:
        count = moments.safe_increment(state.count)
        if base.is_zero(weight_decay):
            return updates, AdafactorDecayState(count)
        params = base.require_params(params, "adafactor's weight decay")

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, Any]:
            rate = numerics.learning_rate_at(learning_rate, state.count, dtype)
            return rate, _relative_step(rate, count.astype(dtype), relative_step)

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = moments.compute_dtype(u.dtype, p.dtype)
            p_compute = p.astype(dtype)
            coefficient = moments.scalar(weight_decay, dtype)
            if mode != "unscaled":
                rate, rho = scalars(dtype)
                scaled = rate if mode == "learning_rate" else _step_size(rho, p_compute, scale_parameter, eps_scale)
                coefficient = coefficient * scaled
            return (u.astype(dtype) + p_compute * coefficient).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), AdafactorDecayState(count)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    decay_rate: Any = 0.8,
    clip_threshold: Any = 1.0,
    b1: Any = None,
    eps: Any = 1e-30,
    eps_scale: Any = 1e-3,
    weight_decay: Any = 0.0,
    *,
    relative_step: bool = True,
    scale_parameter: bool = True,
    eps_mode: moments.EpsMode = "add",
    weight_decay_mask: base.MaskOrFn | None = None,
    weight_decay_mode: WeightDecayMode = "step_size",
    factored: bool = True,
    factored_axes: FactoredAxes = "last_two",
    min_dim_size_to_factor: int = 1,
    decay_offset: Any = 0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adafactor: factored second moments, a step relative to the parameters' scale, update clipping.

    .. math::
        \theta_t = \theta_{t-1} - u_t - \lambda s_t \theta_{t-1}, \qquad
        s_t = \alpha_t \;\text{("step\_size")}, \quad \eta_t \;\text{("learning\_rate")}, \quad
        1 \;\text{("unscaled")}

    with :math:`u_t` and :math:`\alpha_t` those of :func:`scale_by_adafactor`. At its defaults
    this is the paper's Adafactor (its Algorithms 4 and 5), with :math:`\rho_t = \min(10^{-2},
    1/\sqrt{t})`, :math:`\epsilon_1 = 10^{-30}`, :math:`\epsilon_2 = 10^{-3}`, :math:`d = 1`,
    :math:`\hat\beta_t = 1 - t^{-0.8}`, no first moment, and the last two axes factored.

    Each reference, reproduced (its other arguments renamed by the second table):

    ==================================================  ====================================================
    reference                                           adaopt
    ==================================================  ====================================================
    the paper; ``transformers`` at its defaults         ``adafactor()``
    ``transformers``, ``warmup_init=True``              ``adafactor(lambda count: 1e-6 * (count + 1))``
    ``transformers``, ``lr=eta, relative_step=False``   ``adafactor(eta, relative_step=False)``
    ``torch.optim.Adafactor(params, lr)``               ``adafactor(lr, eps=None, eps_mode="max",``
                                                        ``weight_decay_mode="learning_rate")``
    ``optax.adafactor(learning_rate)``                  ``adafactor(learning_rate, relative_step=False,``
                                                        ``factored_axes="largest_two", min_dim_size_to_factor=128,``
                                                        ``mu_dtype=jnp.float32, weight_decay_mode="unscaled")``
    ==================================================  ====================================================

    ``transformers`` is ``transformers.optimization.Adafactor``; optax's ``learning_rate=None``
    is 1.0 here.

    ===========================  ====================  =================================  ===========================
    transformers                 torch                 optax                              adaopt
    ===========================  ====================  =================================  ===========================
    ``lr``                       ``lr``                ``learning_rate``                  ``learning_rate``
    ``decay_rate=-c``            ``beta2_decay=-c``    ``decay_rate=c``                   ``decay_rate=c``
    ``clip_threshold``           ``d``                 ``clipping_threshold``             ``clip_threshold``
    ``beta1``                    (none)                ``momentum``                       ``b1``
    ``eps=(e1, e2)``             ``eps=(e1, e2)``      ``eps=e1`` (:math:`\epsilon_2` =   ``eps=e1, eps_scale=e2``
                                                       1e-3)
    ``scale_parameter``          (always)              ``multiply_by_parameter_scale``    ``scale_parameter``
    ``weight_decay``             ``weight_decay``      ``weight_decay_rate``              ``weight_decay``
    (parameter groups)           (parameter groups)    ``weight_decay_mask``              ``weight_decay_mask``
    (none)                       (none)                ``factored``,                      ``factored``,
                                                       ``min_dim_size_to_factor``,        ``min_dim_size_to_factor``,
                                                       ``decay_offset``,                  ``decay_offset``,
                                                       ``dtype_momentum``                 ``mu_dtype``
    ===========================  ====================  =================================  ===========================

    How they differ, and which argument says so: transformers scales the decay by the step size
    :math:`\alpha_t` (``weight_decay_mode="step_size"``, the default). torch caps the relative
    step by its ``lr`` and scales the decay by it (``"learning_rate"``), floors :math:`\epsilon_1`
    where the others add it (``eps_mode="max"``; its ``eps=(None, ...)`` is ``eps=None``, the
    dtype's machine epsilon), and has no first moment. optax multiplies by its learning rate
    (``relative_step=False``), factors the two largest axes of a leaf whose second-largest axis
    has at least ``min_dim_size_to_factor`` (128) elements, keeps its first moment in float32
    (``dtype_momentum``, here ``mu_dtype``), adds :math:`\lambda \theta_{t-1}` unscaled
    (``"unscaled"``; a schedule of ``weight_decay_rate`` is not reproduced), and computes
    :math:`\hat\beta_t` in float32 whatever the parameters' dtype (here in theirs), so float64
    runs agree with it to about 1e-7.

    Args:
      learning_rate: with ``relative_step`` (the default), the cap of the relative step
        :math:`\rho_t = \min(\eta_t, 1/\sqrt{t})`, 1e-2 in the paper; without, the step
        :math:`\rho_t = \eta_t` itself. A number >= 0 or a schedule ``count -> value``.
      decay_rate: :math:`c` in [0, 1]: :math:`\hat\beta_t = 1 - t^{-c}` (the paper's 0.8).
      clip_threshold: :math:`d > 0`, the clipping threshold of the step's RMS; None: no clipping.
      b1: :math:`\beta_1` in [0, 1) for a first moment of the steps; None: none (the paper's default).
      eps: :math:`\epsilon_1 \ge 0`, or None for the machine epsilon of each leaf's dtype.
      eps_scale: :math:`\epsilon_2 \ge 0`, the least parameter scale.
      weight_decay: :math:`\lambda \ge 0`.
      relative_step: :math:`\rho_t = \min(\eta_t, 1/\sqrt{t})`; False: :math:`\eta_t`.
      scale_parameter: multiply the step by :math:`\max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))`.
      eps_mode: ``"add"`` (paper, transformers, optax) or ``"max"`` (torch); see :func:`scale_by_adafactor`.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      weight_decay_mode: what scales the decay: ``"step_size"`` (:math:`\alpha_t`, transformers),
        ``"learning_rate"`` (:math:`\eta_t`, torch) or ``"unscaled"`` (optax).
      factored: factor the second moments of leaves with two or more axes.
      factored_axes: ``"last_two"`` (paper, transformers, torch) or ``"largest_two"`` (optax).
      min_dim_size_to_factor: an integer >= 1, the least size of both factored axes (optax: 128).
      decay_offset: :math:`o \ge 0`, the step the decay counts from (optax's ``decay_offset``).
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second-moment statistics (default: the parameter's, at
        least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs the parameters.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adafactor()
      >>> params = jnp.array([1.0, -2.0, 2.0, 1.0])  # RMS sqrt(2.5) = 1.5811
      >>> updates, state = opt.update(jnp.array([0.5, -2.0, 1.0, 3.0]), opt.init(params), params)
      >>> updates.round(5)  # the first step: -min(1e-2, 1) * 1.5811 * g / |g|
      Array([-0.01581,  0.01581, -0.01581, -0.01581], dtype=float32)

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML
      2018, https://arxiv.org/abs/1804.04235.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_choice("weight_decay_mode", weight_decay_mode, ("step_size", "learning_rate", "unscaled"))
    base.check_mask(weight_decay_mask)
    core = scale_by_adafactor(
        learning_rate, decay_rate, clip_threshold, b1, eps, eps_scale, relative_step=relative_step,
        scale_parameter=scale_parameter, eps_mode=eps_mode, factored=factored, factored_axes=factored_axes,
        min_dim_size_to_factor=min_dim_size_to_factor, decay_offset=decay_offset, mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
    )  # fmt: skip
    decay = _decoupled_decay(weight_decay, weight_decay_mode, learning_rate, relative_step, scale_parameter, eps_scale)
    masked = decay if weight_decay_mask is None else base.masked(decay, weight_decay_mask)
    # The core's steps already hold the learning rate: the assembly's learning rate of 1 is the sign.
    return base.assemble(core, 1.0, after_decay=(masked,), complex_convention="modulus")
