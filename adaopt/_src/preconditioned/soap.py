"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker-factored preconditioner.

Each leaf is viewed as a tensor (a matrix, a 3-d+ tensor, optionally with small axes merged);
every axis of that view no larger than ``max_precondition_dim`` keeps a statistic
:math:`L_i = \\mathrm{EMA}(G_{(i)} G_{(i)}^\\top)` and an orthogonal basis :math:`Q_i` of its
eigenvectors. Adam's second moment runs on the gradient rotated into that basis; the first moment
runs on the gradient itself and is rotated in and out. The basis is found by ``eigh`` once, then
refreshed every ``precondition_frequency`` steps by one step of power iteration and a QR
decomposition, as the paper's algorithm and its reference implementation do.

The per-axis helpers here (``merge_small_dims``, ``AxisPlan``, ``rotate``, ``axis_statistics``)
serve Shampoo too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, linalg, moments, placement, storage
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.decay import DecayForm, decoupled_decay

DataFormat = Literal["channels_first", "channels_last"]
MergeRule = Literal["consecutive", "trailing"]
RefreshCount = Literal["update", "call"]
_HIGHEST = jax.lax.Precision.HIGHEST
_EIGH_SHIFT = 1e-30  # the reference adds 1e-30 * I before its eigh; negligible, kept for exactness
_NO_COMPLEX = (
    "{who} does not take complex parameters: its Kronecker factors and their eigenbases have no complex form "
    "here. Got a complex leaf at {path} ({dtype}). Train complex leaves with another optimizer (optax.partition "
    "routes leaves to different optimizers)."
)


def check_real(tree: Any, who: str) -> None:
    """Refuse complex leaves with the one message of the Kronecker-factored methods."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_complex(leaf):
            raise TypeError(
                _NO_COMPLEX.format(who=who, path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype)
            )


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive axes while their product stays at most ``max_dim`` (pytorch-optimizer's rule).

    Example:
      >>> from adaopt._src.preconditioned.soap import merge_small_dims
      >>> merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024)
      (1024, 2048, 12)
    """
    merged: list[int] = []
    product = 1
    for d in shape:
        product *= d
        if product > max_dim:
            merged.append(product // d)
            product = d
    merged.append(product)
    return tuple(merged)


def merge_trailing_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Keep the first axis; merge the others from the last backwards while their product stays at most
    ``max_dim`` (heavyball's rule: a convolution's kernel axes join its fan-in, never its fan-out). Axes of
    size 1 vanish; an axis larger than ``max_dim`` stays alone.

    Example:
      >>> from adaopt._src.preconditioned.soap import merge_trailing_dims
      >>> merge_trailing_dims((128, 64, 3, 3), 1024), merge_trailing_dims((3, 4, 5), 12)
      ((128, 576), (3, 4, 5))
    """
    if len(shape) < 2:
        return tuple(shape)
    merged: list[int] = []
    product = 1
    for d in reversed(shape[1:]):
        if product * d <= max_dim:
            product *= d
        elif product > 1:
            merged.append(product)
            product = d
        else:
            merged.append(d)
    if product > 1:
        merged.append(product)
    return (shape[0], *reversed(merged))


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """How a leaf is seen by a Kronecker-factored method: the view's shape and the axes with a factor.

    Attributes:
      shape: the leaf's shape.
      channels_last: whether a 4-d leaf is permuted from NHWC to NCHW before the view.
      view: the shape of the (permuted, merged) view.
      axes: the axes of the view that have a factor.
    """

    shape: tuple[int, ...]
    channels_last: bool
    view: tuple[int, ...]
    axes: tuple[int, ...]

    @staticmethod
    def of(
        shape: tuple[int, ...], max_dim: int, *, merge: bool | MergeRule, precondition_1d: bool, channels_last: bool
    ) -> AxisPlan:
        """The plan of a leaf of ``shape``: 0-d and empty leaves have no factor; a 1-d leaf one only with
        ``precondition_1d``; an axis of size 1 none (its basis would be :math:`\\pm 1`). ``merge``: False, True
        or ``"consecutive"`` (:func:`merge_small_dims`), ``"trailing"`` (:func:`merge_trailing_dims`)."""
        if len(shape) == 0 or math.prod(shape) == 0:
            return AxisPlan(shape, False, shape, ())
        if len(shape) == 1:
            axes = (0,) if precondition_1d and 1 < shape[0] <= max_dim else ()
            return AxisPlan(shape, False, shape, axes)
        permute = bool(merge) and channels_last and len(shape) == 4
        seen = (shape[0], shape[3], shape[1], shape[2]) if permute else shape
        if not merge:
            view = tuple(seen)
        else:
            view = (merge_trailing_dims if merge == "trailing" else merge_small_dims)(seen, max_dim)
        if merge == "trailing" and len(view) == 1:  # (5, 1) -> (5,): a vector, as heavyball treats it
            return AxisPlan(shape, permute, view, (0,) if precondition_1d and 1 < view[0] <= max_dim else ())
        return AxisPlan(shape, permute, view, tuple(i for i, d in enumerate(view) if 1 < d <= max_dim))

    def to_view(self, x: jax.Array) -> jax.Array:
        if self.channels_last:
            x = jnp.transpose(x, (0, 3, 1, 2))
        return x.reshape(self.view)

    def from_view(self, x: jax.Array) -> jax.Array:
        if self.channels_last:
            n, h, w, c = self.shape
            return jnp.transpose(x.reshape(n, c, h, w), (0, 2, 3, 1))
        return x.reshape(self.shape)


def rotate(x: jax.Array, bases: Sequence[jax.Array], axes: Sequence[int], *, inverse: bool = False) -> jax.Array:
    r"""``x`` with each of its ``axes`` multiplied by the matching basis: :math:`Q_i^\top` (into the basis) or
    :math:`Q_i` (``inverse``, back out of it); the other axes are left as they are.

    Axis by axis, in order, each contraction moving its axis to the end, as the reference does.
    """
    factors = dict(zip(axes, bases, strict=True))
    for i in range(x.ndim):
        if i in factors:
            x = jnp.tensordot(x, factors[i], axes=([0], [1 if inverse else 0]), precision=_HIGHEST)
        else:
            x = jnp.moveaxis(x, 0, -1)
    return x


def axis_statistics(x: jax.Array, axes: Sequence[int]) -> list[jax.Array]:
    r""":math:`G_{(i)} G_{(i)}^\top` for each of ``axes``: ``x`` contracted with itself over every other axis."""
    out = []
    for i in axes:
        others = [j for j in range(x.ndim) if j != i]
        out.append(jnp.tensordot(x, x, axes=(others, others), precision=_HIGHEST))
    return out


def per_leaf(factors: Any, leaves: Sequence[Any]) -> list[Any]:
    """A state's per-leaf tuples of matrices (one tuple per leaf, in the order of ``jax.tree.leaves``), checked
    against the gradients' leaves.

    Kept as a flat tuple, not in a tree of the parameters' structure: a wrapper that treats every
    subtree mirroring the parameters as per-parameter arrays (Flax NNX's ``nnx.Optimizer``) would
    otherwise wrap a tuple of matrices as one value.
    """
    factors = list(factors)
    if len(factors) != len(leaves):
        raise base.TreeMismatchError(
            f"The optimizer's state holds matrices for {len(factors)} parameter leaves, but the gradients have "
            f"{len(leaves)} leaves. The state was built by `init` for other parameters: call `init` on the parameters "
            "whose gradients you pass (after changing the model, build a new optimizer state)."
        )
    return factors


def eigenbasis(statistic: jax.Array) -> jax.Array:
    """The eigenvectors of a symmetric ``statistic``, by decreasing eigenvalue (``eigh`` reads its lower triangle)."""
    shifted = statistic + _EIGH_SHIFT * jnp.eye(statistic.shape[0], dtype=statistic.dtype)
    _, vectors = linalg.eigh(shifted)
    return vectors[:, ::-1]


def _refresh_basis(statistic: jax.Array, basis: jax.Array, shift: bool = False) -> tuple[jax.Array, jax.Array]:
    """One power-iteration step and a QR decomposition; returns the new basis and the order of the old columns.

    The columns of :math:`L Q` are sorted by the estimated eigenvalues :math:`\\mathrm{diag}(Q^\\top L Q)`,
    largest first, before the QR (Householder, so the result does not depend on the signs of the
    old columns). ``shift``: the step is taken with :math:`L + c I`, :math:`c` = the largest
    estimate's magnitude times :math:`\\max(10^{-8}, \\min(64\\, d\\, \\epsilon_{\\text{dtype}}, 1/8))`
    (heavyball's lift of a rank-deficient :math:`L`'s null space above rounding noise).
    """
    product = jnp.matmul(statistic, basis, precision=_HIGHEST)
    estimates = jnp.sum(basis * product, axis=0)
    if shift:
        lift = max(1e-8, min(64 * statistic.shape[-1] * float(jnp.finfo(statistic.dtype).eps), 0.125))
        magnitude = jnp.maximum(jnp.max(jnp.abs(estimates)), jnp.finfo(statistic.dtype).tiny)
        product = product + (lift * magnitude).astype(statistic.dtype) * basis
    order = jnp.argsort(-estimates)
    new, _ = linalg.qr(product[:, order])
    return new, order


class SoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Attributes:
      count: the number of calls to ``update`` so far (the first one only initialises the
        preconditioner), a saturating int32.
      mu: the first moment :math:`m_t` (of the gradients, not rotated), mirroring the parameters.
      nu: the second moment :math:`v_t` of the rotated gradients, mirroring the parameters.
      statistics: one tuple per parameter leaf (in the order of ``jax.tree.leaves``) of the factors
        :math:`L_i` (:math:`d_i \\times d_i`), one per preconditioned axis of its view (empty for 0-d
        and 1-d leaves by default).
      bases: the eigenbases :math:`Q_i`, like ``statistics``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    statistics: Any
    bases: Any


def _check_soap(
    b1: Any, b2: Any, shampoo_beta: Any, eps: Any, precondition_frequency: Any, max_precondition_dim: Any,
    data_format: Any, merge_dims: Any, eps_mode: Any, refresh_count: Any,
) -> None:  # fmt: skip
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    if shampoo_beta is not None:
        base.check_decay("shampoo_beta", shampoo_beta)
    base.check_nonnegative("eps", eps)
    base.check_integer("precondition_frequency", precondition_frequency, 1)
    base.check_integer("max_precondition_dim", max_precondition_dim, 1)
    base.check_choice("data_format", data_format, ("channels_first", "channels_last"))
    base.check_choice("merge_dims", merge_dims, (False, True, "consecutive", "trailing"))
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    base.check_choice("refresh_count", refresh_count, ("update", "call"))


@base.check_flags
def scale_by_soap(
    b1: Any = 0.95,
    b2: Any = 0.95,
    shampoo_beta: Any = None,
    eps: Any = 1e-8,
    *,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    merge_dims: bool | MergeRule = False,
    precondition_1d: bool = False,
    correct_bias: bool = True,
    normalize_gradient: bool = False,
    data_format: DataFormat = "channels_first",
    eps_mode: moments.EpsMode = "add",
    refresh_count: RefreshCount = "update",
    shift_power_iteration: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SOAP's block: Adam's moments in the eigenbasis of each leaf's Kronecker factors.

    The first call only initialises the factors and their bases (its update is zero):
    :math:`L_i = (1 - \beta_s) G_{(i)} G_{(i)}^\top`, :math:`Q_i` = the eigenvectors of
    :math:`L_i`, by decreasing eigenvalue. At every later call, :math:`s = 1, 2, \dots`
    (:math:`\times_i` multiplies axis :math:`i` of the leaf's view by a matrix):

    .. math::
        \tilde g_s &= g_s \times_i Q_i^\top, \qquad
        m_s = \beta_1 m_{s-1} + (1 - \beta_1) g_s, \qquad
        v_s = \beta_2 v_{s-1} + (1 - \beta_2) \tilde g_s^2 \\
        n_s &= \Big( \frac{m_s \times_i Q_i^\top}{\sqrt{v_s} + \epsilon} \Big) \times_i Q_i
        \;\text{(eps\_mode="add")}, \qquad
        n_s = \Big( \frac{\hat m_s \times_i Q_i^\top}{\max(\sqrt{\hat v_s}, \epsilon)} \Big) \times_i Q_i
        \;\text{("max")},
        \qquad n_s \leftarrow \frac{n_s}{\sqrt{\mathrm{mean}(n_s^2)} + \epsilon} \;\text{(normalize\_gradient)} \\
        u_s &= \frac{\sqrt{1 - \beta_2^s}}{1 - \beta_1^s} \, n_s \;\text{("add" with correct\_bias; else } n_s) \\
        L_i &\leftarrow \beta_s L_i + (1 - \beta_s) G_{(i)} G_{(i)}^\top
        \quad\text{(after the step, with } G = g_s)

    (:math:`\hat m_s = m_s / (1 - \beta_1^s)`, :math:`\hat v_s = v_s / (1 - \beta_2^s)`, or :math:`m_s, v_s`
    without ``correct_bias``) and, when :math:`s` (``refresh_count="update"``; :math:`s + 1`, the calls
    counting the first, with ``"call"``) is a multiple of ``precondition_frequency``, each basis is refreshed by
    one step of power iteration: the columns of :math:`L_i Q_i` sorted by
    :math:`\mathrm{diag}(Q_i^\top L_i Q_i)` (largest first), :math:`Q_i` their QR factor, and
    :math:`v_s` permuted along axis :math:`i` in the same order. :math:`G_{(i)}` is the view
    unfolded along axis :math:`i`; :math:`\beta_s` is ``shampoo_beta`` (None: :math:`\beta_2`).

    What each leaf does: a 2-d leaf has a left and a right factor; a 3-d+ leaf one per axis (with
    ``merge_dims``, consecutive axes whose product is at most ``max_precondition_dim`` are merged
    first, after a 4-d NHWC leaf is permuted to NCHW with ``data_format="channels_last"``); an
    axis larger than ``max_precondition_dim`` (an embedding's vocabulary) or of size 1 has none
    (the identity); a 1-d leaf has one only with ``precondition_1d``; a 0-d leaf none. A leaf
    with no factor gets Adam's step (with the moments above and the first call skipped).

    Args:
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      shampoo_beta: :math:`\beta_s`, the decay of the factors, in [0, 1); None: ``b2``.
      eps: :math:`\epsilon`, added to :math:`\sqrt{v_s}` (and to the RMS with
        ``normalize_gradient``), >= 0.
      precondition_frequency: refresh the bases every this many steps, an integer >= 1.
      max_precondition_dim: an axis longer than this has no factor, an integer >= 1.
      merge_dims: merge small axes before choosing the factors: False; True or ``"consecutive"``
        (consecutive axes while their product is at most ``max_precondition_dim``,
        pytorch-optimizer's rule); ``"trailing"`` (the first axis kept, the others merged from the
        last backwards while their product is at most ``max_precondition_dim``; axes of size 1
        dropped: heavyball's rule, which joins a convolution's kernel axes to its fan-in; a leaf
        that becomes a vector, such as (5, 1), is then treated as a 1-d leaf).
      precondition_1d: give 1-d leaves (biases, norms) a full factor too.
      correct_bias: Adam's bias corrections of the step size.
      normalize_gradient: divide each leaf's direction by its RMS.
      data_format: ``"channels_first"`` or ``"channels_last"`` (NHWC 4-d leaves are viewed as
        NCHW for the merging).
      eps_mode: ``"add"`` (eps added to the root of the raw second moment, the debiasing applied
        as one step size: the authors', pytorch-optimizer) or ``"max"`` (the debiased moments, eps
        a floor of their root: heavyball).
      refresh_count: what ``precondition_frequency`` counts: ``"update"``, the updates (the
        authors'), or ``"call"``, the calls including the first, which only initialises (heavyball).
      shift_power_iteration: take the refresh's power-iteration step with :math:`L_i + c I`,
        :math:`c` a small multiple of its largest estimated eigenvalue (heavyball's safeguard for a
        rank-deficient :math:`L_i`; same eigenvectors, a slightly different step).
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32), or
        ``"bfloat16_sr"``; blockwise codes are refused (rotated into the eigenbasis, their roundings
        land on directions of tiny second moment).
      nu_dtype: storage of the rotated second moment: a dtype or any storage (``"int8"``,
        ``"bfloat16_sr"``, an :class:`adaopt.Blockwise`, ...; its blocks are of the rotated
        coordinates, which a refresh permutes before they are stored again).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SoapState`. Complex parameters are
      refused at ``init``. Under a mesh with explicit axes each leaf is gathered for the
      products with itself; the factors and bases are replicated.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_soap()
      >>> g = jnp.array([[3.0, 0.0], [0.0, 0.5]])
      >>> state = tx.init(g)
      >>> updates, state = tx.update(g, state)
      >>> updates  # the first call only initialises the preconditioner
      Array([[0., 0.],
             [0., 0.]], dtype=float32)
      >>> updates, state = tx.update(g, state)
      >>> updates.round(3)  # in the eigenbasis, each coordinate moves by one unit (Adam's first step)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and
      Stabilizing Shampoo using Adam", 2024, https://arxiv.org/abs/2409.11321.

      Reference packages: :func:`soap` gives the arguments that reproduce pytorch-optimizer.
    """
    _check_soap(
        b1, b2, shampoo_beta, eps, precondition_frequency, max_precondition_dim, data_format, merge_dims, eps_mode,
        refresh_count,
    )  # fmt: skip
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)
    if isinstance(storage.resolve(mu_dtype), storage.Blockwise):
        raise base.HyperparameterError(
            f"mu_dtype={mu_dtype!r}: SOAP keeps its first moment in the parameters' coordinates and rotates it into "
            "the eigenbasis for each step, where a block's rounding (about 1% of its largest value) lands on "
            "directions whose second moment is tiny and is divided by its root: the steps blow up. Store it as "
            "bfloat16 or 'bfloat16_sr' (relative roundings); nu_dtype, the rotated second moment, takes any storage."
        )
    beta_s = b2 if shampoo_beta is None else shampoo_beta

    def plan(shape: tuple[int, ...]) -> AxisPlan:
        return AxisPlan.of(
            shape, max_precondition_dim, merge=merge_dims, precondition_1d=precondition_1d,
            channels_last=data_format == "channels_last",
        )  # fmt: skip

    def init_fn(params: base.Params) -> SoapState:
        check_real(params, "SOAP")

        def factors(p: jax.Array) -> tuple[jax.Array, ...]:
            p_plan = plan(jnp.shape(p))
            dtype = moments.compute_dtype(jnp.result_type(p))
            return tuple(placement.replicated(jnp.zeros((p_plan.view[i],) * 2, dtype), p) for i in p_plan.axes)

        statistics = tuple(factors(p) for p in jax.tree.leaves(params))
        return SoapState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            statistics=statistics,
            bases=jax.tree.map(jnp.zeros_like, statistics),
        )

    def update_fn(updates: Updates, state: SoapState, params: base.Params | None = None) -> tuple[Updates, SoapState]:
        del params
        base.check_tree_match(updates, state.mu, "state")
        base.check_tree_match(updates, state.nu, "state")
        leaves = jax.tree.leaves(updates)
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: the moments' leaves
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        stats, bases = per_leaf(state.statistics, leaves), per_leaf(state.bases, leaves)
        plans = [plan(g.shape) for g in leaves]
        count = moments.safe_increment(state.count)
        s = jnp.maximum(state.count, 1)  # the moments' step, s = 1, 2, ... (the first call's is unused)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            """The betas, eps, the moments' debiasing factors (1 without correct_bias), and the step size that
            applies them with ``eps_mode="add"``."""
            one = jnp.ones([], dtype)
            if not correct_bias:
                return moments.scalar(b1, dtype), moments.scalar(b2, dtype), moments.scalar(eps, dtype), one, one, one
            d1, d2 = moments.debias(b1, s, dtype), moments.debias(b2, s, dtype)
            size = jnp.sqrt(moments.bias_correction(b2, s, dtype)) * d1 if eps_mode == "add" else one
            return moments.scalar(b1, dtype), moments.scalar(b2, dtype), moments.scalar(eps, dtype), d1, d2, size

        def rotated_step(m_rotated: jax.Array, v: jax.Array, e: jax.Array, d1: jax.Array, d2: jax.Array) -> jax.Array:
            """Adam's direction in the eigenbasis: ``"add"``, eps on the raw root (the debiasing is the step
            size); ``"max"``, the debiased moments, eps a floor of their root."""
            if eps_mode == "max":
                m_rotated, v = m_rotated * d1, v * d2
            # 0 where the denominator is 0 (eps = 0 and a coordinate that never saw a gradient), as Adam's.
            return moments.safe_divide(m_rotated, moments.with_eps(moments.root(v), e, eps_mode))

        def views(g: jax.Array, p_plan: AxisPlan) -> tuple[jnp.dtype, jax.Array]:
            dtype = moments.compute_dtype(g.dtype)
            return dtype, p_plan.to_view(placement.whole(g).astype(dtype))

        def updated_statistics(view: jax.Array, p_plan: AxisPlan, old: Sequence[jax.Array]) -> list[jax.Array]:
            beta = moments.scalar(beta_s, view.dtype)
            return [moments.ema(new, o, beta) for new, o in zip(axis_statistics(view, p_plan.axes), old, strict=True)]

        def first_call() -> tuple[Any, ...]:
            """The factors from the first gradient and their eigenbases; the moments untouched, a zero update."""
            new_stats, new_bases = [], []
            for g, p_plan, old in zip(leaves, plans, stats, strict=True):
                _, view = views(g, p_plan)
                statistic = updated_statistics(view, p_plan, old)
                new_stats.append(tuple(statistic))
                new_bases.append(tuple(eigenbasis(x) for x in statistic))
            # The zero steps placed as later_call's: zeros_like of a gradient closed over eagerly under jax.set_mesh (a
            # constant in the cond) has no sharding in its type.
            zeros = [placement.sharded_like(jnp.zeros_like(g), g) for g in leaves]
            return zeros, list(mus), list(nus), new_stats, new_bases

        def later_call() -> tuple[Any, ...]:
            """Adam's moments in the eigenbases, the step, the factors, and the bases refreshed every k steps."""
            steps, new_nus, new_stats = [], [], []
            for g, m, v, p_plan, old, basis in zip(leaves, mus, nus, plans, stats, bases, strict=True):
                dtype, view = views(g, p_plan)
                beta1, beta2, e, d1, d2, size = scalars(dtype)
                m_view = p_plan.to_view(placement.whole(moments.load(m, dtype)).astype(dtype))
                v_view = p_plan.to_view(placement.whole(moments.load(v, dtype)).astype(dtype))
                rotated = rotate(view, basis, p_plan.axes)
                m_view = moments.ema(view, m_view, beta1)
                v_view = moments.ema(rotated * rotated, v_view, beta2)
                direction = rotate(
                    rotated_step(rotate(m_view, basis, p_plan.axes), v_view, e, d1, d2),
                    basis,
                    p_plan.axes,
                    inverse=True,
                )
                if normalize_gradient:
                    direction = direction / (jnp.sqrt(jnp.mean(direction * direction)) + e)
                steps.append((size * direction, m_view))
                new_nus.append(v_view)
                new_stats.append(updated_statistics(view, p_plan, old))
            counted = s if refresh_count == "update" else count  # count: the calls so far, this one included
            refreshed = jax.lax.cond(counted % precondition_frequency == 0, refresh, keep, new_nus, new_stats, bases)
            new_nus, new_bases = refreshed
            out_steps = [
                placement.sharded_like(p_plan.from_view(step).astype(g.dtype), g)
                for (step, _), p_plan, g in zip(steps, plans, leaves, strict=True)
            ]
            out_mus = [
                _stored(p_plan.from_view(m_view), m, g)
                for (_, m_view), p_plan, m, g in zip(steps, plans, mus, leaves, strict=True)
            ]
            out_nus = [
                _stored(p_plan.from_view(v_view), v, g)
                for v_view, p_plan, v, g in zip(new_nus, plans, nus, leaves, strict=True)
            ]
            return out_steps, out_mus, out_nus, [tuple(x) for x in new_stats], new_bases

        def refresh(nus_: list[jax.Array], stats_: list[Any], bases_: list[Any]) -> tuple[list[Any], list[Any]]:
            out_nus, out_bases = [], []
            for v_view, p_plan, statistic, basis in zip(nus_, plans, stats_, bases_, strict=True):
                new = []
                for axis, l_i, q_i in zip(p_plan.axes, statistic, basis, strict=True):
                    q_new, order = _refresh_basis(l_i, q_i, shift_power_iteration)
                    v_view = jnp.take(v_view, order, axis=axis)
                    new.append(q_new)
                out_nus.append(v_view)
                out_bases.append(tuple(new))
            return out_nus, out_bases

        def keep(nus_: list[jax.Array], stats_: list[Any], bases_: list[Any]) -> tuple[list[Any], list[Any]]:
            del stats_
            return list(nus_), [tuple(b) for b in bases_]

        out = jax.lax.cond(state.count == 0, first_call, later_call)
        steps_out, mu_out, nu_out, stats_out, bases_out = out
        unflat = treedef.unflatten
        return unflat(steps_out), SoapState(count, unflat(mu_out), unflat(nu_out), tuple(stats_out), tuple(bases_out))

    return optax.GradientTransformation(init_fn, update_fn)


def _stored(value: jax.Array, like: Any, g: jax.Array) -> Any:
    """A moment's new ``value`` (computed whole) stored as ``like`` was: placed as it, in its dtype, or through its
    storage from the value placed as the gradient ``g`` (the moments mirror the parameters, as ``g``)."""
    if base.is_stored(like):
        return moments.store(placement.sharded_like(value, g), like)
    return placement.sharded_like(value.astype(like.dtype), like)


@base.check_flags
def soap(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: Any = 0.95,
    b2: Any = 0.95,
    shampoo_beta: Any = None,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-2,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    merge_dims: bool | MergeRule = False,
    precondition_1d: bool = False,
    correct_bias: bool = True,
    normalize_gradient: bool = False,
    data_format: DataFormat = "channels_first",
    eps_mode: moments.EpsMode = "add",
    refresh_count: RefreshCount = "update",
    shift_power_iteration: bool = False,
    weight_decay_mode: DecayForm = "stepped",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner, with decoupled weight decay.

    .. math::
        \theta_t = \big( \theta_{t-1} - \eta_t u_t \big) (1 - \eta_t \lambda)
        \quad\text{("stepped")}, \qquad
        \theta_t = \theta_{t-1} (1 - \eta_t \lambda) - \eta_t u_t \quad\text{("decoupled")}

    with :math:`u_t` the update of :func:`scale_by_soap`, from the second call on (the first only
    initialises the preconditioner, and moves nothing).

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``
        (count from 0, the first call's rate unused).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      shampoo_beta: the decay of the Kronecker factors, in [0, 1); None: ``b2``.
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      weight_decay: :math:`\lambda`, the decoupled weight decay, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      precondition_frequency: see :func:`scale_by_soap`.
      max_precondition_dim: see :func:`scale_by_soap`.
      merge_dims: see :func:`scale_by_soap`.
      precondition_1d: see :func:`scale_by_soap`.
      correct_bias: see :func:`scale_by_soap`.
      normalize_gradient: see :func:`scale_by_soap`.
      data_format: see :func:`scale_by_soap`.
      eps_mode: see :func:`scale_by_soap`.
      refresh_count: see :func:`scale_by_soap`.
      shift_power_iteration: see :func:`scale_by_soap`.
      weight_decay_mode: ``"stepped"`` (the stepped parameters decayed: the authors',
        pytorch-optimizer) or ``"decoupled"`` (the previous parameters decayed, as AdamW does:
        heavyball).
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32), or
        ``"bfloat16_sr"`` (see :func:`scale_by_soap`).
      nu_dtype: storage of the rotated second moment: a dtype or any storage (``"int8"``, ...).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.soap(3e-3)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
      >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params)  # the first call moves nothing
      >>> float(jnp.abs(updates["w"]).max())
      0.0
      >>> updates, state = opt.update(grads, state, params)
      >>> updates["b"].round(5)  # a 1-d leaf takes Adam's step: -lr * sign(g), then the decay
      Array([-0.00303, -0.00303], dtype=float32)

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and
      Stabilizing Shampoo using Adam", 2024, https://arxiv.org/abs/2409.11321.

      Reference packages: ``pytorch_optimizer.SOAP(lr, betas=(b1, b2), shampoo_beta, weight_decay,
      precondition_frequency, max_precondition_dim, merge_dims, precondition_1d, correct_bias,
      normalize_gradient, data_format, eps)`` (pytorch-optimizer 4.1.0) is this with the same
      arguments and defaults, once its QR decomposition, which it runs in float32 whatever the
      parameters' dtype, runs in theirs. Its ``merge_dims=True`` fails on a 1-d leaf of 2 to
      ``max_precondition_dim`` elements and on a leaf whose axes all merge into one (it reshapes to
      ``[1]``); here such a leaf is a vector, preconditioned as one axis.

      ``heavyball.SOAP(lr, betas=(b1, b2), shampoo_beta, eps, weight_decay, precondition_frequency,
      max_precond_dim, merge_dims=True, precondition_1d)`` (heavyball 3.2.1, its defaults otherwise)
      is this with ``eps_mode="max"``, ``refresh_count="call"``, ``shift_power_iteration=True``,
      ``weight_decay_mode="decoupled"``, ``merge_dims="trailing"`` (``False`` for its
      ``merge_dims=False``) and ``max_precondition_dim=max_precond_dim``. It keeps the factors'
      average debiased and the first moment in the eigenbasis (rotated when the basis is refreshed),
      and leaves the refreshed basis's columns in place: the same numbers in exact arithmetic. Three
      things of its own remain: it counts the refreshes by adding ``1 / precondition_frequency`` per
      call in floating point, which for a frequency that is not a power of two moves some refreshes
      by a call (3: calls 3, 7, 9, 12, 16, ...); it computes its learning rate and the factors'
      debiasing in torch's default dtype (float32 unless changed: ``torch.set_default_dtype``), which
      moves float64 parameters by about 1e-9; and a factor that is rank-deficient after the first
      gradient (an axis at least two longer than the product of the others) has eigenvectors that
      LAPACK chooses, so the trajectories part there, as with any two implementations.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_mask(weight_decay_mask)
    base.check_choice("weight_decay_mode", weight_decay_mode, ("stepped", "decoupled"))
    core = scale_by_soap(
        b1, b2, shampoo_beta, eps, precondition_frequency=precondition_frequency,
        max_precondition_dim=max_precondition_dim, merge_dims=merge_dims, precondition_1d=precondition_1d,
        correct_bias=correct_bias, normalize_gradient=normalize_gradient, data_format=data_format,
        eps_mode=eps_mode, refresh_count=refresh_count, shift_power_iteration=shift_power_iteration,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    decay = decoupled_decay(
        learning_rate, weight_decay, weight_decay_mode, mask=weight_decay_mask, from_second_call=True,
        who="soap's decoupled weight decay",
    )  # fmt: skip
    return base.assemble(
        core, None, after_decay=(base.scale_by_learning_rate(learning_rate), decay), complex_convention="modulus"
    )
