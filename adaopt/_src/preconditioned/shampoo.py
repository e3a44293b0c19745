"""Shampoo: a Kronecker-factored preconditioner per block of each leaf, grafted onto a diagonal method's step size.

The scalable form of Anil et al. (the distributed Shampoo of Google Research, as pytorch-optimizer's
``ScalableShampoo`` ports it): small axes merged, large axes cut into blocks, one statistic
:math:`S = \\mathrm{EMA}(G_{(i)} G_{(i)}^\\top)` per block and preconditioned axis, inverse roots
recomputed every few steps (by a coupled Newton iteration or an eigendecomposition), the step's
norm taken from SGD, AdaGrad or RMSProp (grafting), and momentum on top.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, linalg, moments, numerics, placement
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.preconditioned.soap import (
    axis_statistics,
    check_real,
    merge_small_dims,
    per_leaf,
    rotate,
)

Graft = Literal["none", "sgd", "adagrad", "rmsprop", "sqrtn"]
PreconditionedAxes = Literal["all", "input", "output"]
RootMethod = Literal["newton", "eigh"]
_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-16  # the grafting's guard against a zero Shampoo direction, the reference's


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A leaf seen by Shampoo: the merged view, its preconditioned axes, and its blocks.

    ``blocks`` lists, in C order over the view's axes, each block's start and size per axis;
    each block has one statistic per preconditioned axis (block-major order).
    """

    view: tuple[int, ...]
    selected: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def preconditioned(self) -> bool:
        return bool(self.blocks)

    def factor_sizes(self) -> list[int]:
        return [block[i][1] for block in self.blocks for i in self.selected]


def _plan(
    shape: tuple[int, ...], *, block_size: int, merge: bool, axes: PreconditionedAxes, skip_rank_lt: int,
    max_dim: int, precondition_1d: bool,
) -> _Plan:  # fmt: skip
    view = merge_small_dims(shape, block_size) if merge else tuple(shape)
    skip = len(shape) < skip_rank_lt or any(d > max_dim for d in shape) or math.prod(shape) == 0
    # One axis (a 1-d leaf, or every axis merged into one): the reference has no preconditioner for it.
    if skip or len(shape) == 0 or (len(view) == 1 and not precondition_1d):
        return _Plan(tuple(shape), (), ())
    rank = len(view)
    selected = {"all": range(rank), "input": range(rank - 1), "output": range(rank - 1, rank)}[axes]
    if not selected:
        return _Plan(tuple(shape), (), ())
    # Each axis in blocks of block_size (start, size), the last one shorter.
    splits = [tuple((s, min(block_size, d - s)) for s in range(0, d, block_size)) for d in view]
    return _Plan(view, tuple(selected), tuple(itertools.product(*splits)))


def _power_iteration_start(n: int) -> np.ndarray:
    """A fixed start vector for the power iteration (distributed Shampoo's seed)."""
    return np.random.RandomState(1729).uniform(-1.0, 1.0, n)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def largest_eigenvalue(matrix: jax.Array, iterations: int = 100) -> jax.Array:
    """The largest eigenvalue of each symmetric PSD matrix of ``matrix`` (its last two axes) by ``iterations`` steps
    of power iteration from a fixed start, at least 1e-16."""
    v = jnp.broadcast_to(jnp.asarray(_power_iteration_start(matrix.shape[-1]), matrix.dtype), matrix.shape[:-1])
    tiny = jnp.finfo(matrix.dtype).tiny

    def body(_: int, v: jax.Array) -> jax.Array:
        mv = _matmul(matrix, v[..., None])[..., 0]
        return mv / jnp.maximum(jnp.linalg.norm(mv, axis=-1, keepdims=True), tiny)

    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.maximum(jnp.sum(v * _matmul(matrix, v[..., None])[..., 0], axis=-1), 1e-16)


def inverse_root_newton(
    matrix: jax.Array,
    p: int,
    ridge_epsilon: Any = 1e-6,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-3,
    max_error_ratio: float = 1.2,
) -> jax.Array:
    r""":math:`(S + \epsilon \lambda_{max} I)^{-1/p}` of each matrix of ``matrix`` (its last two axes) by the coupled
    Newton iteration of Guo & Higham (2006).

    .. math::
        z &= \frac{1 + p}{2 \|S\|_F}, \quad X_0 = z^{1/p} I, \quad M_0 = z S \\
        T_k &= \big(1 + \tfrac{1}{p}\big) I - \tfrac{1}{p} M_k, \quad X_{k+1} = X_k T_k, \quad M_{k+1} = T_k^p M_k

    until :math:`\max|M_{k+1} - I| \le` ``tolerance`` (returning :math:`X_{k+1}`), or the error grows
    by more than ``max_error_ratio`` (returning :math:`X_k`), at most ``max_iterations`` times;
    each matrix of a batch stops by itself. :math:`\lambda_{max}` comes from
    :func:`largest_eigenvalue`. A 1 x 1 matrix is :math:`(s + \epsilon \max(s, 10^{-16}))^{-1/p}`.
    A scan of ``max_iterations`` whose steps are skipped once every matrix has stopped: reverse-mode
    differentiable (a while loop is not), and as fast.
    """
    n = matrix.shape[-1]
    if n == 1:
        return (matrix + ridge_epsilon * jnp.maximum(matrix, 1e-16)) ** (-1.0 / p)
    identity = jnp.eye(n, dtype=matrix.dtype)
    matrix = matrix + (largest_eigenvalue(matrix) * ridge_epsilon)[..., None, None] * identity
    z = ((1 + p) / (2 * jnp.linalg.norm(matrix, axis=(-2, -1))))[..., None, None]
    alpha = -1.0 / p

    def error_of(m: jax.Array) -> jax.Array:
        return jnp.max(jnp.abs(m - identity), axis=(-2, -1))

    def iterate(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        root, m, previous, done = carry
        m_i = (1.0 - alpha) * identity + alpha * m
        new_root = _matmul(root, m_i)
        new_m = _matmul(_matrix_power(m_i, p), m)
        error = error_of(new_m)
        diverged = error > previous * max_error_ratio
        frozen = jnp.logical_or(done, diverged)[..., None, None]
        root = jnp.where(frozen, root, new_root)
        m = jnp.where(done[..., None, None], m, new_m)
        previous = jnp.where(done, previous, error)
        return root, m, previous, done | diverged | (error <= tolerance)

    def body(carry: tuple[jax.Array, ...], _: Any) -> tuple[tuple[jax.Array, ...], None]:
        return jax.lax.cond(jnp.all(carry[3]), lambda c: c, iterate, carry), None

    m0 = matrix * z
    start: tuple[jax.Array, ...] = (identity * z ** (1.0 / p), m0, error_of(m0), jnp.zeros(matrix.shape[:-2], bool))
    return jax.lax.scan(body, start, None, length=max_iterations)[0][0]


def _matrix_power(x: jax.Array, p: int) -> jax.Array:
    """``x ** p`` by repeated squaring (torch.linalg.matrix_power's order of products)."""
    result = None
    z = x
    while p > 0:
        if p & 1:
            result = z if result is None else _matmul(result, z)
        p >>= 1
        if p:
            z = _matmul(z, z)
    assert result is not None
    return result


def inverse_root_eigh(matrix: jax.Array, p: int) -> jax.Array:
    r""":math:`S^{-1/p}` of each symmetric matrix of ``matrix`` from its eigendecomposition (no ridge), as the
    reference's SVD: :math:`V \,\mathrm{diag}(\mathrm{sign}(\lambda) |\lambda|^{-1/p})\, V^\top`."""
    values, vectors = linalg.eigh(matrix)
    powered = jnp.sign(values) * jnp.abs(values) ** (-1.0 / p)
    return _matmul(vectors * powered[..., None, :], jnp.swapaxes(vectors, -1, -2))


def _lerp(a: jax.Array, b: jax.Array, weight: Any) -> jax.Array:
    """torch's ``a.lerp(b, weight)``, with its two formulas either side of weight 0.5."""
    return jnp.where(weight < 0.5, a + weight * (b - a), b - (b - a) * (1 - weight))


class ShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      momentum: the momentum of the grafted Shampoo directions, mirroring the parameters.
      graft_momentum: the momentum of the grafting method's directions, mirroring the parameters.
      graft_nu: the grafting method's accumulator of squared gradients (AdaGrad's sum, RMSProp's
        EMA; zeros for the others), mirroring the parameters.
      statistics: one tuple per parameter leaf (in the order of ``jax.tree.leaves``) of the
        statistics :math:`S` (block-major, one per block and preconditioned axis); empty for
        leaves without a preconditioner.
      roots: the inverse roots :math:`S^{-1/e}` of ``statistics``, like it (identities until the
        first computation).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    momentum: Updates
    graft_momentum: Updates
    graft_nu: Updates
    statistics: Any
    roots: Any


def _check_shampoo(
    b1: Any, b2: Any, diagonal_eps: Any, matrix_eps: Any, graft: Any, preconditioned_axes: Any, root_method: Any,
    integers: dict[str, tuple[Any, int]],
) -> None:  # fmt: skip
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_nonnegative("diagonal_eps", diagonal_eps)
    base.check_nonnegative("matrix_eps", matrix_eps)
    base.check_choice("graft", graft, ("none", "sgd", "adagrad", "rmsprop", "sqrtn"))
    base.check_choice("preconditioned_axes", preconditioned_axes, ("all", "input", "output"))
    base.check_choice("root_method", root_method, ("newton", "eigh"))
    for name, (value, low) in integers.items():
        base.check_integer(name, value, low)


@base.check_flags
def scale_by_shampoo(
    b1: Any = 0.9,
    b2: Any = 0.999,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    moving_average_for_momentum: bool = False,
    nesterov: bool = True,
    graft: Graft = "sgd",
    start_preconditioning_step: int = 25,
    preconditioning_compute_steps: int = 1000,
    statistics_compute_steps: int = 1,
    block_size: int = 512,
    skip_preconditioning_rank_lt: int = 1,
    no_preconditioning_for_layers_with_dim_gt: int = 8192,
    shape_interpretation: bool = True,
    preconditioned_axes: PreconditionedAxes = "all",
    sum_statistics: bool = False,
    precondition_1d: bool = False,
    inverse_exponent_override: int = 0,
    diagonal_eps: Any = 1e-10,
    matrix_eps: Any = 1e-6,
    root_method: RootMethod = "newton",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Shampoo's block: blockwise Kronecker-factored preconditioning, grafting, momentum.

    At step :math:`t = 1, 2, \dots`, for each leaf (:math:`\times_i` multiplies axis :math:`i` of a
    block by a matrix; :math:`w = 1 - \beta_1` with ``moving_average_for_momentum``, else 1):

    .. math::
        S_{b,i} &\leftarrow \beta_2 S_{b,i} + (1 - \beta_2)\, G_{b(i)} G_{b(i)}^\top
            \;\text{(or } S_{b,i} + G_{b(i)} G_{b(i)}^\top \text{ with sum\_statistics)}
            \quad\text{(every statistics\_compute\_steps; } S_{b,i} = \epsilon_m I \text{ at first)} \\
        P_{b,i} &= S_{b,i}^{-1/e} \quad\text{(every preconditioning\_compute\_steps; } I \text{ before)} \\
        d_t &= \mathrm{graft}(g_t), \qquad s_t = \big(g_{b} \times_i P_{b,i}\big)_b \cdot
            \frac{\|d_t\|}{\|\cdot\| + 10^{-16}} \;\text{(grafted; } s_t = d_t \text{ without a preconditioner)} \\
        d_t, s_t &\leftarrow d_t + \lambda \theta_{t-1},\; s_t + \lambda \theta_{t-1} \quad\text{(coupled decay)} \\
        m_t &= \beta_1 m_{t-1} + w\, s_t, \qquad \bar m_t = \beta_1 \bar m_{t-1} + w\, d_t \\
        u_t &= m_t \;\text{if } t \ge \text{start\_preconditioning\_step, else } \bar m_t;
            \quad u_t \leftarrow \beta_1 u_t + w\,(s_t \text{ or } d_t) \;\text{(Nesterov)}

    with :math:`e` = ``inverse_exponent_override`` or twice the number of preconditioned axes, and
    :math:`\mathrm{graft}(g)` = :math:`g` ("sgd", "none"), :math:`g / (\sqrt{\sum g^2} + \epsilon_d)`
    ("adagrad"), :math:`g / (\sqrt{\mathrm{EMA}_{\beta_2}(g^2)} + \epsilon_d)` ("rmsprop") or
    :math:`\mathrm{sign}(g)` ("sqrtn"); "none" does not rescale :math:`s_t`. The moving averages
    of ``moving_average_for_momentum`` are torch's ``lerp``.

    What each leaf does: with ``shape_interpretation``, consecutive axes are merged while their
    product is at most ``block_size`` (a leaf whose axes all merge into one, a 0-d or a short
    1-d leaf, then has no preconditioner, nor does one of fewer than
    ``skip_preconditioning_rank_lt`` axes or with an axis above
    ``no_preconditioning_for_layers_with_dim_gt``); every axis longer than ``block_size`` is cut
    into blocks of ``block_size`` (the last one shorter), each block with its own statistics; a
    3-d+ leaf has one statistic per (merged) axis. ``preconditioned_axes`` ``"input"`` skips the
    last axis, ``"output"`` keeps only it. A leaf without a preconditioner takes the grafting
    method's step.

    Args:
      b1: :math:`\beta_1`, the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the statistics and of RMSProp's grafting, in [0, 1).
      weight_decay: :math:`\lambda` of the coupled decay (added after the preconditioning), >= 0.
      weight_decay_mask: which leaves the coupled decay acts on (a tree of booleans or a
        function of the parameters); None: all.
      learning_rate: None (the rate is applied after this block), or :math:`\eta_t` (a number or
        a schedule of the count) multiplying :math:`d_t` and :math:`s_t` before the decay and the
        momentum (pytorch-optimizer's ``decoupled_learning_rate=False``).
      moving_average_for_momentum: :math:`w = 1 - \beta_1` instead of 1.
      nesterov: Nesterov's momentum.
      graft: the method whose step norm the Shampoo direction takes: ``"sgd"``, ``"adagrad"``,
        ``"rmsprop"`` (Adam's second moment, without debiasing), ``"sqrtn"`` (sign) or ``"none"``.
      start_preconditioning_step: the first step of the Shampoo direction (before: the grafting
        method's), an integer >= 1.
      preconditioning_compute_steps: recompute the inverse roots every this many steps (>= 1).
      statistics_compute_steps: add to the statistics every this many steps (>= 1).
      block_size: the largest block (and the bound of the merging), an integer >= 1.
      skip_preconditioning_rank_lt: leaves of fewer axes have no preconditioner (>= 0).
      no_preconditioning_for_layers_with_dim_gt: leaves with a longer axis have none (>= 1).
      shape_interpretation: merge small consecutive axes.
      preconditioned_axes: ``"all"``, ``"input"`` (all but the last axis) or ``"output"`` (the last).
      sum_statistics: add to the statistics (:math:`S \leftarrow S + G G^\top`, the original
        Shampoo's) instead of taking their moving average with :math:`\beta_2`.
      precondition_1d: give a leaf seen as one axis (a 1-d leaf, or a leaf whose axes all merge
        into one) a full statistic for it, as the original Shampoo does (the reference has none).
      inverse_exponent_override: :math:`e` when > 0; 0: twice the preconditioned axes.
      diagonal_eps: :math:`\epsilon_d` of the grafting, >= 0.
      matrix_eps: :math:`\epsilon_m`: the statistics' start, and the Newton iteration's ridge
        (relative to the largest eigenvalue), >= 0. With 0 and ``root_method="eigh"`` a statistic
        that is still rank-deficient (fewer steps than its size, a gradient of low rank) has no
        inverse root: its rounding-level eigenvalues are inverted, and the steps follow rounding.
      root_method: ``"newton"`` (the coupled Newton iteration of Guo & Higham, stopped at a
        residual of 1e-3, with a ridge of :math:`\epsilon_m` times the largest eigenvalue found by
        100 steps of power iteration) or ``"eigh"`` (an eigendecomposition, no ridge).
      mu_dtype: storage of the two momenta (default: the parameter's dtype, at least float32), a dtype
        or a storage (``"int8"``, ``"bfloat16_sr"``, an :class:`adaopt.Blockwise`, ...).
      nu_dtype: storage of the grafting's accumulator of squared gradients, likewise.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ShampooState`. Complex parameters
      are refused at ``init``. Under a mesh with explicit axes each leaf is gathered for its
      statistics; the statistics and roots are replicated.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_shampoo(0.0, 0.0, start_preconditioning_step=1, preconditioning_compute_steps=1,
      ...                              shape_interpretation=False, graft="none", nesterov=False, matrix_eps=0.0,
      ...                              root_method="eigh")
      >>> g = jnp.array([[4.0, 0.0], [0.0, 1.0]])
      >>> updates, _ = tx.update(g, tx.init(g))
      >>> updates  # (G G^T)^(-1/4) G (G^T G)^(-1/4): the orthogonal factor of G
      Array([[1., 0.],
             [0., 1.]], dtype=float32)

    References:
      Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018,
      https://arxiv.org/abs/1802.09568; Anil, Gupta, Koren, Regan & Singer, "Scalable Second Order
      Optimization for Deep Learning", 2020, https://arxiv.org/abs/2002.09018; Agarwal, Anil,
      Hazan, Koren & Zhang, "Disentangling Adaptive Gradient Methods from Learning Rates", 2020,
      https://arxiv.org/abs/2002.11803 (grafting).

      Reference packages: :func:`shampoo` gives the arguments that reproduce pytorch-optimizer.
    """
    integers = {
        "start_preconditioning_step": (start_preconditioning_step, 1),
        "preconditioning_compute_steps": (preconditioning_compute_steps, 1),
        "statistics_compute_steps": (statistics_compute_steps, 1),
        "block_size": (block_size, 1),
        "skip_preconditioning_rank_lt": (skip_preconditioning_rank_lt, 0),
        "no_preconditioning_for_layers_with_dim_gt": (no_preconditioning_for_layers_with_dim_gt, 1),
        "inverse_exponent_override": (inverse_exponent_override, 0),
    }
    _check_shampoo(b1, b2, diagonal_eps, matrix_eps, graft, preconditioned_axes, root_method, integers)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)
    base.check_nonnegative("weight_decay", weight_decay)
    base.check_mask(weight_decay_mask)
    if learning_rate is not None:
        base.check_learning_rate(learning_rate)

    def plan(shape: tuple[int, ...]) -> _Plan:
        return _plan(
            shape, block_size=block_size, merge=shape_interpretation, axes=preconditioned_axes,
            skip_rank_lt=skip_preconditioning_rank_lt, max_dim=no_preconditioning_for_layers_with_dim_gt,
            precondition_1d=precondition_1d,
        )  # fmt: skip

    def exponent(p_plan: _Plan) -> int:
        return inverse_exponent_override if inverse_exponent_override > 0 else 2 * len(p_plan.selected)

    def init_fn(params: base.Params) -> ShampooState:
        check_real(params, "Shampoo")
        if not base.is_zero(weight_decay):
            base.resolve_mask(weight_decay_mask, params)

        def matrices(p: jax.Array, fill: float) -> tuple[jax.Array, ...]:
            dtype = moments.compute_dtype(jnp.result_type(p))
            factors = plan(jnp.shape(p)).factor_sizes()
            return tuple(placement.replicated(fill * jnp.eye(n, dtype=dtype), p) for n in factors)

        return ShampooState(
            count=moments.zero_count(),
            momentum=moments.init_like(params, mu_dtype),
            graft_momentum=moments.init_like(params, mu_dtype, moment=1),
            graft_nu=moments.init_like(params, nu_dtype, real=True),
            statistics=tuple(matrices(p, matrix_eps) for p in jax.tree.leaves(params)),
            roots=tuple(matrices(p, 1.0) for p in jax.tree.leaves(params)),
        )

    def update_fn(
        updates: Updates, state: ShampooState, params: base.Params | None = None
    ) -> tuple[Updates, ShampooState]:
        for mirror in (state.momentum, state.graft_momentum, state.graft_nu):
            base.check_tree_match(updates, mirror, "state")
        decayed = not base.is_zero(weight_decay)
        if decayed:
            params = base.require_params(params, "shampoo's coupled weight decay")
            base.check_tree_match(updates, params, "parameters")
        leaves = jax.tree.leaves(updates)
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: the mask's and parameters' leaves
        mask = base.resolve_mask(weight_decay_mask, params) if decayed else None
        masks = [True] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
        param_leaves = treedef.flatten_up_to(params) if decayed else [None] * len(leaves)
        count = moments.safe_increment(state.count)
        t = count
        preconditioning = t >= start_preconditioning_step
        add_statistics = t % statistics_compute_steps == 0
        compute_roots = t % preconditioning_compute_steps == 0

        inner_rate = (
            None
            if learning_rate is None
            else numerics.learning_rate_at(learning_rate, state.count, moments.scalar_dtype(updates))
        )

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            beta1, beta2 = moments.scalar(b1, dtype), moments.scalar(b2, dtype)
            w = 1 - beta1 if moving_average_for_momentum else 1.0
            return beta1, beta2, w, moments.scalar(diagonal_eps, dtype), moments.scalar(weight_decay, dtype)

        def root(statistic: jax.Array, e: int) -> jax.Array:
            if root_method == "eigh":
                return inverse_root_eigh(statistic, e)
            return inverse_root_newton(statistic, e, moments.scalar(matrix_eps, statistic.dtype))

        old_stats, old_roots = per_leaf(state.statistics, leaves), per_leaf(state.roots, leaves)
        plans = [plan(g.shape) for g in leaves]

        # Pass 1: the statistics of every block, then every inverse root at once (one cond for the tree).
        views: list[list[jax.Array] | None] = []
        all_stats = []
        for g, p_plan, stats in zip(leaves, plans, old_stats, strict=True):
            if not p_plan.preconditioned:
                views.append(None)
                all_stats.append(tuple(stats))
                continue
            dtype = moments.compute_dtype(g.dtype)
            beta2 = scalars(dtype)[1]
            view = placement.whole(g.astype(dtype)).reshape(p_plan.view)
            blocks = [view[tuple(slice(s, s + n) for s, n in block)] for block in p_plan.blocks]
            new_stats = [
                (stats[j * len(p_plan.selected) + i] + outer)
                if sum_statistics
                else stats[j * len(p_plan.selected) + i] * beta2 + (1 - beta2) * outer
                for j, block in enumerate(blocks)
                for i, outer in enumerate(axis_statistics(block, p_plan.selected))
            ]
            views.append(blocks)
            all_stats.append(tuple(jnp.where(add_statistics, n, o) for n, o in zip(new_stats, stats, strict=True)))
        exponents = [exponent(p_plan) for p_plan in plans]
        all_roots = jax.lax.cond(
            compute_roots,
            lambda stats_: _grouped_roots(stats_, exponents, root),
            lambda stats_: [tuple(r) for r in old_roots],
            all_stats,
        )

        # Pass 2: each leaf's direction, grafting, decay and momentum.
        outs = []
        for g, m, gm, nu, p_plan, blocks, roots, p, decay_leaf in zip(
            leaves,
            treedef.flatten_up_to(state.momentum),
            treedef.flatten_up_to(state.graft_momentum),
            treedef.flatten_up_to(state.graft_nu),
            plans,
            views,
            all_roots,
            param_leaves,
            masks,
            strict=True,
        ):
            dtype, g_c, (m_c, gm_c, nu_c) = moments.to_compute(g, m, gm, nu)
            beta1, beta2, w, e_d, wd = scalars(dtype)
            if graft == "adagrad":
                nu_c = nu_c + g_c * g_c
            elif graft == "rmsprop":
                nu_c = nu_c * beta2 + (1 - beta2) * (g_c * g_c)
            if graft in ("adagrad", "rmsprop"):
                graft_direction = g_c / (jnp.sqrt(nu_c) + e_d)
            elif graft == "sqrtn":
                graft_direction = jnp.sign(g_c)
            else:
                graft_direction = g_c
            if blocks is not None:
                rank = len(p_plan.selected)
                preconditioned = [
                    rotate(block, roots[j * rank : (j + 1) * rank], p_plan.selected) for j, block in enumerate(blocks)
                ]
                direction = placement.sharded_like(_merge_blocks(preconditioned, p_plan).reshape(g.shape), g)
            else:
                direction = graft_direction
            if inner_rate is not None:
                rate = inner_rate.astype(dtype)
                graft_direction, direction = graft_direction * rate, direction * rate
            if graft != "none":
                direction = direction * (jnp.linalg.norm(graft_direction) / (jnp.linalg.norm(direction) + _NORM_EPS))
            if decayed and decay_leaf:
                p_c = p.astype(dtype)
                graft_direction = graft_direction + wd * p_c
                direction = direction + wd * p_c
            m_c = _lerp(m_c, direction, w) if moving_average_for_momentum else m_c * beta1 + direction
            gm_c = gm_c * beta1 + w * graft_direction
            step = jnp.where(preconditioning, m_c, gm_c)
            if nesterov:
                current = jnp.where(preconditioning, direction, graft_direction)
                step = _lerp(step, current, w) if moving_average_for_momentum else step * beta1 + current
            outs.append((step.astype(g.dtype), moments.store(m_c, m), moments.store(gm_c, gm), moments.store(nu_c, nu)))

        def tree(items: list[Any]) -> Any:
            return jax.tree.unflatten(treedef, items)

        steps, momentum, graft_momentum, graft_nu = (tree([o[i] for o in outs]) for i in range(4))
        return steps, ShampooState(count, momentum, graft_momentum, graft_nu, tuple(all_stats), tuple(all_roots))

    return optax.GradientTransformation(init_fn, update_fn)


def _grouped_roots(stats: list[tuple[jax.Array, ...]], exponents: list[int], root: Any) -> list[tuple[jax.Array, ...]]:
    """Every leaf's inverse roots, the statistics of one size, dtype and exponent stacked and computed together
    (one batched iteration per group, not one per block)."""
    groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for leaf, (leaf_stats, e) in enumerate(zip(stats, exponents, strict=True)):
        for k, x in enumerate(leaf_stats):
            groups.setdefault((x.shape[0], x.dtype, e), []).append((leaf, k))
    out: list[list[Any]] = [list(leaf_stats) for leaf_stats in stats]
    for (_, _, e), members in groups.items():
        stacked = jnp.stack([stats[leaf][k] for leaf, k in members])
        roots = root(stacked, e)
        for n, (leaf, k) in enumerate(members):
            out[leaf][k] = roots[n]
    return [tuple(x) for x in out]


def _merge_blocks(blocks: list[jax.Array], p_plan: _Plan) -> jax.Array:
    """The blocks (C order over the view's axes) concatenated back into the view."""
    splits = [len({block[axis] for block in p_plan.blocks}) for axis in range(len(p_plan.view))]
    parts = blocks
    for axis in reversed(range(len(p_plan.view))):
        n = splits[axis]
        parts = [jnp.concatenate(parts[k : k + n], axis=axis) for k in range(0, len(parts), n)]
    return parts[0]


@base.check_flags
def shampoo(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    decoupled_learning_rate: bool = True,
    moving_average_for_momentum: bool = False,
    nesterov: bool = True,
    graft: Graft = "sgd",
    start_preconditioning_step: int = 25,
    preconditioning_compute_steps: int = 1000,
    statistics_compute_steps: int = 1,
    block_size: int = 512,
    skip_preconditioning_rank_lt: int = 1,
    no_preconditioning_for_layers_with_dim_gt: int = 8192,
    shape_interpretation: bool = True,
    preconditioned_axes: PreconditionedAxes = "all",
    sum_statistics: bool = False,
    precondition_1d: bool = False,
    inverse_exponent_override: int = 0,
    diagonal_eps: Any = 1e-10,
    matrix_eps: Any = 1e-6,
    root_method: RootMethod = "newton",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo (scalable form): blockwise Kronecker-factored preconditioning grafted onto SGD's, AdaGrad's or
    RMSProp's step size.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( u_t \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \big)

    with :math:`u_t` the update of :func:`scale_by_shampoo`, whose coupled decay (the default)
    is added to the preconditioned and grafted directions before the momentum.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the statistics (and RMSProp's grafting), in [0, 1).
      weight_decay: :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: decay the parameters (AdamW's form) instead of adding
        :math:`\lambda \theta` to the directions.
      decoupled_learning_rate: True (the default) multiplies the momentum's update by
        :math:`\eta_t`; False multiplies the directions by it before the momentum (and the
        coupled decay, added after, is not scaled by it): then
        :math:`\theta_t = \theta_{t-1} - u_t \;[-\, \eta_t \lambda \theta_{t-1} \text{ if decoupled}]`.
      moving_average_for_momentum: see :func:`scale_by_shampoo`.
      nesterov: see :func:`scale_by_shampoo`.
      graft: see :func:`scale_by_shampoo`.
      start_preconditioning_step: see :func:`scale_by_shampoo`.
      preconditioning_compute_steps: see :func:`scale_by_shampoo`.
      statistics_compute_steps: see :func:`scale_by_shampoo`.
      block_size: see :func:`scale_by_shampoo`.
      skip_preconditioning_rank_lt: see :func:`scale_by_shampoo`.
      no_preconditioning_for_layers_with_dim_gt: see :func:`scale_by_shampoo`.
      shape_interpretation: see :func:`scale_by_shampoo`.
      preconditioned_axes: see :func:`scale_by_shampoo`.
      sum_statistics: see :func:`scale_by_shampoo`.
      precondition_1d: see :func:`scale_by_shampoo`.
      inverse_exponent_override: see :func:`scale_by_shampoo`.
      diagonal_eps: see :func:`scale_by_shampoo`.
      matrix_eps: see :func:`scale_by_shampoo`.
      root_method: see :func:`scale_by_shampoo`.
      mu_dtype: see :func:`scale_by_shampoo`.
      nu_dtype: see :func:`scale_by_shampoo`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.shampoo(1e-2, start_preconditioning_step=1, preconditioning_compute_steps=1,
      ...                      shape_interpretation=False)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.array([3.0, -4.0])}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> updates["b"]  # no preconditioner for a 1-d leaf: SGD with Nesterov's momentum, -lr (1 + b1) g
      Array([-0.057,  0.076], dtype=float32)

    References:
      Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018,
      https://arxiv.org/abs/1802.09568; Anil, Gupta, Koren, Regan & Singer, "Scalable Second Order
      Optimization for Deep Learning", 2020, https://arxiv.org/abs/2002.09018.

      Reference packages: ``pytorch_optimizer.ScalableShampoo(lr, betas=(b1, b2), weight_decay,
      decoupled_weight_decay, moving_average_for_momentum, nesterov, start_preconditioning_step,
      preconditioning_compute_steps, statistics_compute_steps, block_size,
      skip_preconditioning_rank_lt, no_preconditioning_for_layers_with_dim_gt,
      shape_interpretation, inverse_exponent_override, diagonal_eps, matrix_eps)`` (pytorch-optimizer
      4.1.0) is this with the same arguments and defaults, its ``graft_type`` (a
      ``LayerWiseGrafting``) as ``graft``, its ``pre_conditioner_type`` (a ``PreConditionerType``)
      as ``preconditioned_axes`` and ``use_svd=True`` as ``root_method="eigh"``; its power
      iteration starts from a random vector (here a fixed one: the same eigenvalue). With
      ``pre_conditioner_type`` ``INPUT`` or ``OUTPUT`` it fails (a stack of blocks of different
      sizes) where every block's statistic has one shape but the blocks do not (a 6 x 5 matrix
      in blocks of 4); this runs there.

      ``pytorch_optimizer.Shampoo(lr, matrix_eps)`` (the original algorithm, at its defaults
      ``momentum=0``, ``weight_decay=0``, ``preconditioning_compute_steps=1``) is this with
      ``b1=0, sum_statistics=True, graft="none", nesterov=False, start_preconditioning_step=1,
      preconditioning_compute_steps=1, shape_interpretation=False, precondition_1d=True,
      root_method="eigh"`` and ``block_size`` and ``no_preconditioning_for_layers_with_dim_gt``
      above every axis. Its momentum (the gradient mixed with the previous preconditioned step
      before the statistics), its weight decay (added before the statistics) and its zero inverse
      roots before the first computation (``preconditioning_compute_steps > 1``) are not reproduced.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_shampoo(
        b1, b2, weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        learning_rate=None if decoupled_learning_rate else learning_rate,
        weight_decay_mask=None if decoupled_weight_decay else weight_decay_mask,
        moving_average_for_momentum=moving_average_for_momentum, nesterov=nesterov, graft=graft,
        start_preconditioning_step=start_preconditioning_step,
        preconditioning_compute_steps=preconditioning_compute_steps,
        statistics_compute_steps=statistics_compute_steps, block_size=block_size,
        skip_preconditioning_rank_lt=skip_preconditioning_rank_lt,
        no_preconditioning_for_layers_with_dim_gt=no_preconditioning_for_layers_with_dim_gt,
        shape_interpretation=shape_interpretation, preconditioned_axes=preconditioned_axes,
        sum_statistics=sum_statistics, precondition_1d=precondition_1d,
        inverse_exponent_override=inverse_exponent_override, diagonal_eps=diagonal_eps, matrix_eps=matrix_eps,
        root_method=root_method, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    if not decoupled_learning_rate:
        # The rate is inside the core; the decoupled decay is eta_t * lambda * theta, and the sign is flipped last.
        decay = (
            (lambda count: learning_rate(count) * weight_decay)
            if callable(learning_rate)
            else learning_rate * weight_decay
        )
        return base.assemble(
            core, None, decay if decoupled_weight_decay else 0.0, weight_decay_mask if decoupled_weight_decay else None,
            decoupled_weight_decay=True, after_decay=(optax.scale(-1.0),), complex_convention="modulus",
        )  # fmt: skip
    if not decoupled_weight_decay:
        return base.assemble(core, learning_rate, complex_convention="modulus")
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay=True, complex_convention="modulus"
    )
