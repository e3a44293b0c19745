"""CAME: Adafactor's factored second moment, and a factored confidence in the momentum that weighs each step.

A leaf of two or more dimensions keeps, in place of a second moment of its shape, the moving
averages of the row and column means of :math:`g^2` over its last two axes (the leading axes are
a batch of matrices); its step is the momentum divided by the root of a factored moving average
of the instability :math:`(u_t - m_t)^2`, the squared distance of the clipped update from the
momentum. A leaf of fewer than two dimensions keeps a full second moment and steps by the
momentum alone (it has no confidence statistics).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, placement
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex

_NO_COMPLEX = (
    "CAME does not take complex parameters: its factored statistics and the instability have no complex form here "
    "(and a real view would factor another matrix). Got a complex leaf at {path} ({dtype}). Train complex leaves "
    "with another optimizer (optax.partition routes leaves to different optimizers)."
)


class CameState(NamedTuple):
    r"""State of :func:`scale_by_came`.

    Every field has the parameters' tree structure; a leaf that a field does not apply to holds
    ``optax.MaskedNode()`` there (as ``optax.masked`` does), so each field costs memory only
    where it is used.

    Attributes:
      mu: the first moment :math:`m_t` of the clipped updates, mirroring the parameters.
      nu_row: for a leaf of two or more dimensions, :math:`r_t`, the moving average of the means
        of :math:`g^2 + \epsilon_1` over the last axis (shape ``p.shape[:-1]``).
      nu_col: for such a leaf, :math:`c_t`, the same over the second-to-last axis (shape
        ``p.shape[:-2] + p.shape[-1:]``).
      nu: for a leaf of fewer than two dimensions, :math:`v_t`, the full moving average of
        :math:`g^2 + \epsilon_1` (the parameter's shape).
      res_row: for a leaf of two or more dimensions, :math:`R_t`, the moving average of the means of
        the instability :math:`(u_t - m_t)^2 + \epsilon_2` over the last axis.
      res_col: for such a leaf, :math:`C_t`, the same over the second-to-last axis.
    """

    mu: Updates
    nu_row: Updates
    nu_col: Updates
    nu: Updates
    res_row: Updates
    res_col: Updates


def _is_factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def _reduced_zeros(p: Any, axis: int, dtype: Any) -> jax.Array:
    """Zeros of ``p``'s shape without ``axis``, in ``dtype``, with the sharding a reduction over that axis has."""
    return placement.zeros(jax.eval_shape(functools.partial(jnp.sum, axis=axis), p), p, dtype)


def _check_real(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_complex(leaf):
            raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype))


def _factored_inv_root(row: jax.Array, col: jax.Array) -> jax.Array:
    r"""``1 / sqrt(row col / mean(row))`` as the outer product of a row and a column factor (0 where a statistic is 0).

    The row statistics are normalised by their mean, so that the product of the row and the
    column means estimates the full matrix of second moments (Adafactor's rank-1 factoring).
    """
    row_factor = moments.inv_root(moments.safe_divide(row, jnp.mean(row, axis=-1, keepdims=True)), 0, 0)
    col_factor = moments.inv_root(col, 0, 0)
    return jnp.expand_dims(row_factor, -1) * jnp.expand_dims(col_factor, -2)


def _clip_by_rms(u: jax.Array, threshold: Any) -> jax.Array:
    """``u / max(1, RMS(u) / threshold)``: the leaf's root mean square at most ``threshold``."""
    rms = jnp.sqrt(jnp.sum(u * u)) / jnp.sqrt(jnp.asarray(u.size, u.dtype))
    return u / jnp.maximum(rms / threshold, 1)


def scale_by_came(
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = 0.9999,
    eps1: Any = 1e-30,
    eps2: Any = 1e-16,
    clip_threshold: Any = 1.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""CAME's block: a factored second moment, update clipping, momentum, and a factored confidence.

    For a leaf of two or more dimensions (the last two axes factored, the leading ones a batch):

    .. math::
        r_t &= \beta_2 r_{t-1} + (1 - \beta_2) \operatorname{mean}_{-1}(g_t^2 + \epsilon_1), \qquad
        c_t = \beta_2 c_{t-1} + (1 - \beta_2) \operatorname{mean}_{-2}(g_t^2 + \epsilon_1) \\
        u_t &= \Big(\frac{r_t}{\operatorname{mean}_{-1}(r_t)}\Big)^{-1/2} \big(c_t^{-1/2}\big)^\top \odot g_t,
        \qquad \hat u_t = \frac{u_t}{\max(1, \mathrm{RMS}(u_t) / d)}, \qquad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) \hat u_t \\
        R_t &= \beta_3 R_{t-1} + (1 - \beta_3) \operatorname{mean}_{-1}\big((\hat u_t - m_t)^2 + \epsilon_2\big),
        \qquad C_t = \beta_3 C_{t-1} + (1 - \beta_3) \operatorname{mean}_{-2}\big((\hat u_t - m_t)^2 + \epsilon_2\big) \\
        \text{update} &= \Big(\frac{R_t}{\operatorname{mean}_{-1}(R_t)}\Big)^{-1/2} \big(C_t^{-1/2}\big)^\top \odot m_t

    where :math:`\operatorname{mean}_{a}` averages over axis :math:`a` (the row statistics
    :math:`r, R` have the leaf's shape without its last axis, the column statistics :math:`c, C`
    without its second-to-last), and the outer product broadcasts over the leading axes. For a
    leaf of fewer than two dimensions (0-d and 1-d: a full second moment, no confidence):

    .. math::
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) (g_t^2 + \epsilon_1), \qquad
        u_t = g_t / \sqrt{v_t}, \qquad \hat u_t, m_t \text{ as above}, \qquad \text{update} = m_t

    :math:`\mathrm{RMS}` is the root mean square over the whole leaf. There is no bias
    correction: the clip bounds the first steps. A root of a zero statistic (a zero
    :math:`\epsilon_1` or :math:`\epsilon_2` and a zero row) gives a zero step there.

    Args:
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment's statistics, in [0, 1).
      b3: :math:`\beta_3`, the decay of the instability's statistics, in [0, 1).
      eps1: :math:`\epsilon_1`, added to :math:`g^2`, >= 0.
      eps2: :math:`\epsilon_2`, added to the instability, >= 0.
      clip_threshold: :math:`d > 0`, the largest root mean square of an update of a leaf.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment's and the instability's statistics (default:
        the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`CameState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_came()
      >>> g = jnp.ones((3, 4))
      >>> updates, state = tx.update(g, tx.init(g))
      >>> state.nu_row.shape, state.nu_col.shape  # one statistic per row and one per column
      ((3,), (4,))
      >>> updates.round(2)  # clipped u = 1, m = 0.1: m / sqrt((1 - b3) (u - m)^2), the confidence starts small
      Array([[11.11, 11.11, 11.11, 11.11],
             [11.11, 11.11, 11.11, 11.11],
             [11.11, 11.11, 11.11, 11.11]], dtype=float32)

    References:
      Luo, Ren, Zheng, Jiang, Jiang & You, "CAME: Confidence-guided Adaptive Memory Efficient
      Optimization", ACL 2023, https://arxiv.org/abs/2307.02047.

      Reference packages: :func:`came` gives the arguments that reproduce came-pytorch and
      pytorch-optimizer.
    """
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_decay("b3", b3)
    base.check_nonnegative("eps1", eps1)
    base.check_nonnegative("eps2", eps2)
    base.check_scalar("clip_threshold", clip_threshold, low=0.0, low_open=True)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_statistics_dtype("nu_dtype", nu_dtype)

    def init_fn(params: base.Params) -> CameState:
        _check_real(params)

        def stats(axis: int, factored: bool) -> Any:
            def leaf(p: Any) -> Any:
                if _is_factored(jnp.shape(p)) != factored:
                    return optax.MaskedNode()
                dtype = moments.state_dtype(jnp.result_type(p), nu_dtype, real=True)
                return _reduced_zeros(p, axis, dtype) if factored else jnp.zeros_like(p, dtype=dtype)

            return jax.tree.map(leaf, params)

        return CameState(
            mu=moments.init_like(params, mu_dtype),
            nu_row=stats(-1, True),
            nu_col=stats(-2, True),
            nu=stats(0, False),
            res_row=stats(-1, True),
            res_col=stats(-2, True),
        )

    def update_fn(updates: Updates, state: CameState, params: base.Params | None = None) -> tuple[Updates, CameState]:
        del params
        base.check_tree_match(updates, state.mu, "state")
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: the statistics, MaskedNode where absent
        fields = [treedef.flatten_up_to(tree) for tree in state]

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return tuple(moments.scalar(x, dtype) for x in (b1, b2, b3, eps1, eps2, clip_threshold))

        def leaf(g: jax.Array, m: Any, *stats: Any) -> tuple[Any, ...]:
            if g.size == 0:  # no row to average: nothing to update
                return (jnp.zeros_like(g), m, *stats)
            row, col, v, res_row, res_col = stats
            factored = _is_factored(g.shape)
            present = (row, col, res_row, res_col) if factored else (v,)
            dtype, g_compute, (m_compute, *stats_compute) = moments.to_compute(g, m, *present)
            beta1, beta2, beta3, e1, e2, threshold = scalars(dtype)
            squared = g_compute * g_compute + e1
            if factored:
                row_c, col_c, res_row_c, res_col_c = stats_compute
                row_new = moments.ema(jnp.mean(squared, axis=-1), row_c, beta2)
                col_new = moments.ema(jnp.mean(squared, axis=-2), col_c, beta2)
                u = _factored_inv_root(row_new, col_new) * g_compute
            else:
                (v_c,) = stats_compute
                v_new = moments.ema(squared, v_c, beta2)
                u = moments.inv_root(v_new, 0, 0) * g_compute
            u = _clip_by_rms(u, threshold)
            m_new = moments.ema(u, m_compute, beta1)
            if not factored:
                return (
                    m_new.astype(g.dtype),
                    moments.store(m_new, m),
                    row,
                    col,
                    v_new.astype(v.dtype),
                    res_row,
                    res_col,
                )
            instability = (u - m_new) * (u - m_new) + e2
            res_row_new = moments.ema(jnp.mean(instability, axis=-1), res_row_c, beta3)
            res_col_new = moments.ema(jnp.mean(instability, axis=-2), res_col_c, beta3)
            step = _factored_inv_root(res_row_new, res_col_new) * m_new
            return (
                step.astype(g.dtype),
                moments.store(m_new, m),
                row_new.astype(row.dtype),
                col_new.astype(col.dtype),
                v,
                res_row_new.astype(res_row.dtype),
                res_col_new.astype(res_col.dtype),
            )

        outs = [leaf(*args) for args in zip(treedef.flatten_up_to(updates), *fields, strict=True)]
        step, *new = (treedef.unflatten([o[i] for o in outs]) for i in range(7))
        return step, CameState(*new)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def came(
    learning_rate: ScalarOrSchedule = 2e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    b3: Any = 0.9999,
    eps1: Any = 1e-30,
    eps2: Any = 1e-16,
    clip_threshold: Any = 1.0,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CAME: confidence-guided adaptive memory-efficient optimization.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t (\text{update}_t + \lambda \theta_{t-1})

    with the update of :func:`scale_by_came` and decoupled weight decay :math:`\lambda` (the
    reference's); with ``decoupled_weight_decay=False``, :math:`\lambda\theta_{t-1}` is added to
    the gradient before the block instead.

    Memory: a leaf of shape :math:`(\ldots, n, k)` keeps its momentum (the parameter's size) and
    four statistics of :math:`(\ldots, n)` and :math:`(\ldots, k)` elements, in place of Adam's
    second moment of :math:`(\ldots, n, k)`; a 0-d or 1-d leaf keeps a full second moment.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1) (the paper's 0.9).
      b2: :math:`\beta_2`, the decay of the second moment's statistics, in [0, 1) (0.999).
      b3: :math:`\beta_3`, the decay of the instability's statistics, in [0, 1) (0.9999).
      eps1: :math:`\epsilon_1`, added to :math:`g^2`, >= 0 (1e-30).
      eps2: :math:`\epsilon_2`, added to the instability, >= 0 (1e-16).
      clip_threshold: :math:`d > 0`, the largest root mean square of a leaf's update (1).
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: decay the parameters by :math:`\eta_t\lambda\theta` beside the step
        (True, the reference's) or add :math:`\lambda\theta` to the gradient (False).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the statistics (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``
      with a ``TypeError``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.came(1e-3)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.array([1.0, -1.0])}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> updates["b"]  # a 1-d leaf, no confidence: -lr (1 - b1) sign(g) on the first step
      Array([-0.0001,  0.0001], dtype=float32)
      >>> updates["w"][0]  # a matrix: divided by the root of its confidence's statistics, small at first
      Array([-0.01111111, -0.01111111], dtype=float32)

    References:
      Luo, Ren, Zheng, Jiang, Jiang & You, "CAME: Confidence-guided Adaptive Memory Efficient
      Optimization", ACL 2023, https://arxiv.org/abs/2307.02047.

      Reference packages: ``came_pytorch.CAME(params, lr, eps=(eps1, eps2), clip_threshold,
      betas=(b1, b2, b3), weight_decay)`` (the authors') is this with the same numbers.
      ``pytorch_optimizer.CAME(params, lr, betas, weight_decay, weight_decouple, clip_threshold,
      eps1=eps1, eps2=eps2)`` is this with ``decoupled_weight_decay=weight_decouple``; its
      ``fixed_decay`` (a decay not scaled by the learning rate) and ``ams_bound`` (which keeps
      the running maximum of :math:`\sqrt{v}` and then takes its root again, a step of
      :math:`v^{-1/4}`) are not reproduced.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_came(b1, b2, b3, eps1, eps2, clip_threshold, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention="modulus",  # no real view: init refuses complex leaves by name
    )
