r"""GaLore: any optimizer run on a low-rank projection of each weight matrix's gradient.

Every ``update_proj_gap`` steps, each projected matrix's gradient :math:`G` (of shape
:math:`m \times n`) gives a basis of its top :math:`r` singular vectors, :math:`P`; between
refreshes, the inner optimizer sees :math:`P^\top G` (or :math:`G P^\top`), of :math:`r` rows (or
columns), and its update is mapped back by :math:`P` and scaled. The inner optimizer's state for
such a leaf has the projected shape: Adam's moments of an :math:`m \times n` matrix take
:math:`2 r \max(m, n)` numbers instead of :math:`2 m n`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from adaopt._src import base, linalg, moments, placement
from adaopt._src.base import Params, ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.optimizers.adam import scale_by_adam

ProjectionType = Literal["std", "reverse_std", "left", "right", "full"]
_TYPES = ("std", "reverse_std", "left", "right", "full")
_NO_COMPLEX = (
    "GaLore does not project complex matrices: their singular vectors are complex and the reference's projection "
    "has no complex form. Got a complex matrix at {path} ({dtype}). Leave it out with galore_mask, or train it "
    "with another optimizer (optax.partition)."
)


class GaLoreState(NamedTuple):
    r"""State of :func:`galore`.

    Attributes:
      count: the number of updates so far, a saturating int32 (the projections are refreshed
        when it is a multiple of ``update_proj_gap``, the first time at 0).
      left: the parameters' tree with, at a leaf projected from the left, its basis :math:`U`
        (:math:`m \times r`: the inner optimizer sees :math:`U^\top G`), and ``optax.MaskedNode()``
        at the other leaves.
      right: the same for the leaves projected from the right, their basis :math:`V^\top`
        (:math:`r \times n`: the inner optimizer sees :math:`G V`); a ``"full"`` projection has both.
      inner_state: the inner optimizer's state, for the projected shapes.

    On a mesh with explicit axes, :math:`U` is split as its matrix's rows, :math:`V^\top` as its columns, and the
    projected matrix (so the inner optimizer's moments) as the side that is not projected; the gradient is gathered
    whole only for the SVD of a refresh.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    left: Any
    right: Any
    inner_state: Any


def _sides(shape: tuple[int, ...], proj_type: str) -> tuple[bool, bool]:
    """Whether a matrix of ``shape`` is projected from the left, from the right (the reference's rule per type)."""
    rows, cols = shape
    if proj_type == "full":
        return True, True
    if proj_type == "std":
        proj_type = "right" if rows >= cols else "left"
    elif proj_type == "reverse_std":
        proj_type = "left" if rows >= cols else "right"
    return proj_type == "left", proj_type == "right"


def _canonical_signs(basis: jax.Array, axis: int) -> jax.Array:
    """Each singular vector of ``basis`` (its slices along ``axis``) with its largest-magnitude entry positive.

    A singular vector is defined up to its sign, which differs between SVD implementations and
    devices; the inner optimizer's moments, kept across refreshes, depend on it. Fixing it makes
    the trajectory one function of the gradients.
    """
    largest = jnp.take_along_axis(basis, jnp.expand_dims(jnp.argmax(jnp.abs(basis), axis=axis), axis), axis=axis)
    return basis * jnp.where(largest < 0, -1, 1).astype(basis.dtype)


def _bases(g: jax.Array, rank: int, left: bool, right: bool) -> tuple[jax.Array | None, jax.Array | None]:
    """The top ``rank`` left singular vectors :math:`U` (columns) and right ones :math:`V^\\top` (rows) of ``g``."""
    u, _, vh = linalg.svd(g)
    u_r = _canonical_signs(u[:, :rank], 0) if left else None
    vh_r = _canonical_signs(vh[:rank], 1) if right else None
    return u_r, vh_r


def _matmul(a: jax.Array, b: jax.Array, out: tuple[Any, Any] | None = None, like: Any = None) -> jax.Array:
    """``a @ b``; ``out``: the product's mesh axes, which JAX asks for where the contracted axis is split (the sum
    over the shards then runs as a reduction across devices)."""
    sharding = None if out is None else placement.on_mesh_of(PartitionSpec(*out), like)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST, out_sharding=sharding)


def _project(g: jax.Array, u: jax.Array | None, vh: jax.Array | None) -> jax.Array:
    """:math:`U^\\top G`, :math:`G V` or both, computed where ``g``'s shards are: the bases are split as its rows
    (:math:`U`) and columns (:math:`V^\\top`), so the projection is ``g``'s shards' products, summed across devices."""
    split = placement.explicit_spec(g) is not None
    rows, cols = placement.split_axes(g)
    low = g if u is None else _matmul(u.T, g, (None, cols) if split else None, g)
    return low if vh is None else _matmul(low, vh.T, (rows if u is None else None, None) if split else None, g)


def _project_back(low: jax.Array, u: jax.Array | None, vh: jax.Array | None) -> jax.Array:
    full = low if u is None else _matmul(u, low)
    return full if vh is None else _matmul(full, vh)


def _checked_bases(updates: Updates, state: GaLoreState) -> tuple[list[Any], list[Any]]:
    """Each gradient leaf's left and right bases, checked: the gradients have the structure of the parameters
    ``init`` saw, and each projected matrix its shape."""
    lefts, rights = base.leaves_up_to(updates, state.left), base.leaves_up_to(updates, state.right)
    for (path, g), u, vh in zip(jax.tree_util.tree_leaves_with_path(updates), lefts, rights, strict=True):
        rows = None if base.is_masked_node(u) else u.shape[0]
        cols = None if base.is_masked_node(vh) else vh.shape[1]
        if (rows is not None and jnp.shape(g)[:1] != (rows,)) or (cols is not None and jnp.shape(g)[1:] != (cols,)):
            sides = [f"{n} {side}" for n, side in ((rows, "rows"), (cols, "columns")) if n is not None]
            raise base.TreeMismatchError(
                f"The gradients at {jax.tree_util.keystr(path)} have shape {jnp.shape(g)}, but the projection "
                f"there was built for a matrix of {' and '.join(sides)}. Call init on the parameters whose "
                "gradients you pass."
            )
    return lefts, rights


def _check_sizes(rank: Any, min_dim: Any) -> None:
    base.check_integer("rank", rank, 1)
    if min_dim is not None:
        base.check_integer("min_dim", min_dim, 1)


def default_galore_mask(params: Params, rank: int, min_dim: int | None = None) -> Any:
    """The leaves :func:`galore` projects by default: matrices whose smaller side is at least ``min_dim``.

    ``min_dim`` None is ``rank + 1``: a projection that makes the matrix's statistics smaller.
    Leaves of other dimensions (biases, norms, scalars, 3-d and more) and smaller matrices are
    not projected.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"w": jnp.ones((64, 32)), "head": jnp.ones((32, 4)), "b": jnp.ones(32)}
      >>> adaopt.default_galore_mask(params, rank=8)
      {'b': False, 'head': False, 'w': True}
    """
    _check_sizes(rank, min_dim)
    floor = rank + 1 if min_dim is None else min_dim
    return jax.tree.map(lambda p: jnp.ndim(p) == 2 and min(jnp.shape(p)) >= floor, params)


def galore(
    inner: optax.GradientTransformation,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: Any = 0.25,
    proj_type: ProjectionType = "std",
    *,
    min_dim: int | None = None,
    galore_mask: base.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore around ``inner``: each projected matrix's gradient reaches it in a rank-``rank`` basis of its own.

    For a projected leaf with gradient :math:`G_t \in \mathbb{R}^{m \times n}`, at the steps
    :math:`t` (counted from 0) that are multiples of ``update_proj_gap``, the singular value
    decomposition :math:`G_t = U \Sigma V^\top` gives the bases :math:`P_L = U_{:, :r}` and
    :math:`P_R = V_{:, :r}^\top`, :math:`r = \min(\text{rank}, m, n)`, each singular vector
    signed so that its entry of largest magnitude is positive; between refreshes they are kept.
    Then

    .. math::
        R_t = P_L^\top G_t \;\text{(left)}, \quad G_t P_R^\top \;\text{(right)}, \quad
        P_L^\top G_t P_R^\top \;\text{(full)}, \qquad
        u_t = \alpha \cdot P_L\, N_t,\quad N_t P_R,\quad P_L N_t P_R

    with :math:`N_t` ``inner``'s update of :math:`R_t` and :math:`\alpha` = ``scale``. The side
    follows ``proj_type``: ``"left"``, ``"right"``, ``"full"`` (both), ``"std"`` (right for
    :math:`m \ge n`, left otherwise: the projected side is the shorter one) or
    ``"reverse_std"`` (the other). Leaves not projected (see ``galore_mask``) reach ``inner``
    as they are and its updates come back unscaled.

    The inner optimizer's state for a projected leaf has the projected shape (it is built from
    zeros of that shape, the bases being unknown before the first gradient) and is kept as it is
    across refreshes, as in the reference. An inner optimizer that reads the parameters is given
    them projected like the gradients; weight decay belongs outside (as :func:`galore_adamw`'s),
    where it decays the whole matrix. So an inner optimizer that reads the parameters' scale sees
    the part of each matrix in its gradient's subspace: Adafactor's relative step
    (``scale_parameter=True``) is then the RMS of :math:`P_L^\top W` (or :math:`W P_R^\top`), where
    ``galore_torch.GaLoreAdafactor`` takes the RMS of :math:`W`; with ``scale_parameter=False``
    the two are the same optimizer.

    Args:
      inner: the optimizer of the projected gradients, e.g. ``adaopt.scale_by_adam()``, or a
        whole one (``optax.adam(1e-3)``: its update is then scaled by ``scale`` too).
      rank: :math:`r`, the number of singular vectors kept, >= 1.
      update_proj_gap: the steps between refreshes of the bases, >= 1.
      scale: :math:`\alpha`, the factor of the projected-back updates, > 0.
      proj_type: which side of each matrix is projected (above).
      min_dim: the smallest side of a matrix that the default ``galore_mask`` projects (>= 1);
        None: ``rank + 1``.
      galore_mask: the leaves to project, a tree of booleans or a function of the parameters
        returning one; only matrices (2-d leaves, not empty) can be: others pass through to ``inner``. None:
        :func:`default_galore_mask`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GaLoreState`, passing
      ``update``'s extra arguments to ``inner``. A complex matrix chosen for projection is refused
      at ``init`` (a ``TypeError`` naming it).

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> tx = adaopt.galore(adaopt.scale_by_adam(), rank=2, update_proj_gap=10, scale=1.0)
      >>> params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
      >>> state = tx.init(params)
      >>> jax.tree.map(jnp.shape, state.inner_state.mu)  # Adam's moment of w in a rank-2 basis
      {'b': (4,), 'w': (6, 2)}
      >>> g = {"w": jnp.outer(jnp.arange(6.0), jnp.ones(4)), "b": jnp.ones(4)}
      >>> updates, state = tx.update(g, state)
      >>> updates["w"].shape, state.right["w"].shape  # projected back; the basis V^T of w
      ((6, 4), (2, 4))

    References:
      Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient LLM Training by
      Gradient Low-Rank Projection", ICML 2024, https://arxiv.org/abs/2403.03507.

      Reference packages: :func:`galore_adamw` reproduces ``galore_torch.GaLoreAdamW``;
      ``galore(adafactor(scale_parameter=False), ...)`` its ``GaLoreAdafactor`` with
      ``scale_parameter=False`` (above).
    """
    base.check_transformation("inner", inner)
    _check_sizes(rank, min_dim)
    base.check_integer("update_proj_gap", update_proj_gap, 1)
    base.check_scalar("scale", scale, low=0.0, low_open=True)
    base.check_choice("proj_type", proj_type, _TYPES)
    base.check_mask(galore_mask, "galore_mask")
    inner = base.with_extra_args(inner)

    def projected(params: Params) -> list[bool]:
        if galore_mask is None:  # a tree: never called, though it may be (an Equinox module's class is callable)
            mask = default_galore_mask(params, rank, min_dim)
        else:
            mask = base.resolve_mask(galore_mask, params, "galore_mask")
        leaves = jax.tree_util.tree_leaves_with_path(params)
        # An empty matrix has no subspace to project on: it passes through, as every leaf the mask leaves out.
        chosen = [
            bool(m) and jnp.ndim(p) == 2 and min(jnp.shape(p)) > 0
            for (_, p), m in zip(leaves, jax.tree.leaves(mask), strict=True)
        ]
        for (path, p), c in zip(leaves, chosen, strict=True):
            if c and is_complex(p):
                raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=p.dtype))
        return chosen

    def init_fn(params: Params) -> GaLoreState:
        leaves, treedef = jax.tree.flatten(params)
        left, right, low = [], [], []
        for p, chosen in zip(leaves, projected(params), strict=True):
            if not chosen:
                left.append(optax.MaskedNode())
                right.append(optax.MaskedNode())
                low.append(p)
                continue
            rows, cols = jnp.shape(p)
            r = min(rank, rows, cols)
            on_left, on_right = _sides((rows, cols), proj_type)
            dtype = moments.compute_dtype(jnp.result_type(p))
            # On a mesh: U split as the rows, V^T as the columns, the projected matrix as its full side.
            row_axis, col_axis = placement.split_axes(p)
            u_spec, vh_spec = PartitionSpec(row_axis, None), PartitionSpec(None, col_axis)
            low_spec = PartitionSpec(None if on_left else row_axis, None if on_right else col_axis)
            left.append(placement.placed(jnp.zeros((rows, r), dtype), u_spec, p) if on_left else optax.MaskedNode())
            right.append(placement.placed(jnp.zeros((r, cols), dtype), vh_spec, p) if on_right else optax.MaskedNode())
            projected_shape = (r if on_left else rows, r if on_right else cols)
            low.append(placement.placed(jnp.zeros(projected_shape, jnp.result_type(p)), low_spec, p))
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
        return GaLoreState(moments.zero_count(), unflatten(left), unflatten(right), inner.init(unflatten(low)))

    def update_fn(
        updates: Updates, state: GaLoreState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, GaLoreState]:
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: a method the stubs lack
        lefts, rights = _checked_bases(updates, state)
        refresh = state.count % update_proj_gap == 0
        new_left, new_right, low_grads, low_params = [], [], [], []
        param_leaves = [None] * len(lefts) if params is None else treedef.flatten_up_to(params)
        for g, u, vh, p in zip(jax.tree.leaves(updates), lefts, rights, param_leaves, strict=True):
            on_left, on_right = not base.is_masked_node(u), not base.is_masked_node(vh)
            if not (on_left or on_right):
                new_left.append(u)
                new_right.append(vh)
                low_grads.append(g)
                low_params.append(p)
                continue
            g_compute = g.astype(moments.compute_dtype(g.dtype))
            r = (u if on_left else vh).shape[1 if on_left else 0]
            kept = (u if on_left else None, vh if on_right else None)

            def refreshed(g_: jax.Array = g_compute, kept: Any = kept) -> Any:
                """The new bases, from the gradient gathered whole for its SVD, then placed as the old ones."""
                bases = _bases(placement.whole(g_), r, on_left, on_right)
                return tuple(
                    None if b is None else placement.sharded_like(b, k) for b, k in zip(bases, kept, strict=True)
                )

            u_new, vh_new = jax.lax.cond(refresh, refreshed, lambda: kept)
            new_left.append(u_new if on_left else u)
            new_right.append(vh_new if on_right else vh)
            low_grads.append(_project(g_compute, u_new, vh_new).astype(g.dtype))
            low_params.append(
                None
                if p is None
                else _project(placement.sharded_like(p.astype(g_compute.dtype), g), u_new, vh_new).astype(p.dtype)
            )
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
        inner_params = None if params is None else unflatten(low_params)
        low_updates, inner_state = inner.update(unflatten(low_grads), state.inner_state, inner_params, **extra_args)
        steps = []
        for n, g, u, vh in zip(
            treedef.flatten_up_to(low_updates), jax.tree.leaves(updates), new_left, new_right, strict=True
        ):
            on_left, on_right = not base.is_masked_node(u), not base.is_masked_node(vh)
            if not (on_left or on_right):
                steps.append(n)
                continue
            back = _project_back(
                n.astype(u.dtype if on_left else vh.dtype), u if on_left else None, vh if on_right else None
            )
            steps.append(placement.sharded_like(moments.scale_leaf(jnp.asarray(scale), back.astype(g.dtype)), g))
        count = moments.safe_increment(state.count)
        return unflatten(steps), GaLoreState(count, unflatten(new_left), unflatten(new_right), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DecayAfterStepState(NamedTuple):
    """State of the weight decay of :func:`galore_adamw`: the step count, for a schedule of the learning rate."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _decay_after_step(learning_rate: ScalarOrSchedule, weight_decay: Any) -> optax.GradientTransformation:
    r"""Decay the parameters *after* the step :math:`u`: :math:`\theta + u \to (\theta + u)(1 - \eta_t \lambda)`.

    As an update: :math:`(1 - \eta_t \lambda)\, u - \eta_t \lambda \theta`.
    """

    def init_fn(params: Params) -> DecayAfterStepState:
        del params
        return DecayAfterStepState(moments.zero_count())

    def update_fn(
        updates: Updates, state: DecayAfterStepState, params: Params | None = None
    ) -> tuple[Updates, DecayAfterStepState]:
        count = moments.safe_increment(state.count)
        if base.is_zero(weight_decay):
            return updates, DecayAfterStepState(count)
        params = base.require_params(params, "galore_adamw's weight decay")
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = moments.compute_dtype(u.dtype)
            shrink = jnp.asarray(rate, dtype) * moments.scalar(weight_decay, dtype)
            stepped = moments.in_precision(p, dtype) + moments.in_precision(u, dtype)
            return (moments.in_precision(u, dtype) - moments.times(stepped, shrink)).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), DecayAfterStepState(count)

    return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: Any = 0.25,
    proj_type: ProjectionType = "std",
    min_dim: int | None = None,
    galore_mask: base.MaskOrFn | None = None,
    weight_decay_mask: base.MaskOrFn | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore-AdamW: Adam on the low-rank projections of the matrices' gradients, as ``galore_torch.GaLoreAdamW``.

    .. math::
        N_t &= \frac{m_t}{1 - \beta_1^t} \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}
            \quad \text{(Adam on } R_t \text{; } \epsilon \text{ on the raw root)} \\
        \theta_t &= \big(\theta_{t-1} - \eta_t u_t\big) (1 - \eta_t \lambda)

    with :math:`R_t` the projected gradient and :math:`u_t` the update of :func:`galore` around
    that Adam (:math:`\alpha P N_t` for a projected matrix, :math:`N_t` for another leaf). The
    weight decay multiplies the parameters *after* the step, on the whole matrix.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment before its bias correction, >= 0.
      weight_decay: :math:`\lambda`, >= 0.
      rank: see :func:`galore`.
      update_proj_gap: see :func:`galore`.
      scale: see :func:`galore`.
      proj_type: see :func:`galore`.
      min_dim: see :func:`galore`.
      galore_mask: the leaves to project; see :func:`galore`.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      mu_dtype: storage of the first moment (default: the parameter's dtype, at least float32).
      nu_dtype: storage of the second moment (default: the parameter's dtype, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are seen as real pairs
      (torch's view), a trailing axis of 2: they are not matrices, and are not projected.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.galore_adamw(1e-3, rank=4, update_proj_gap=50)
      >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
      >>> state = opt.init(params)
      >>> jax.tree.map(jnp.shape, optax.tree.get(state, "nu"))  # w's moments in a rank-4 basis
      {'b': (16,), 'w': (32, 4)}

    References:
      Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient LLM Training by
      Gradient Low-Rank Projection", ICML 2024, https://arxiv.org/abs/2403.03507.

      Reference packages: ``galore_torch.GaLoreAdamW`` (1.0) with a parameter group of the
      projected matrices (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) and one of
      the others is this with the same numbers (its ``correct_bias=True``); its SVD runs in
      float32 whatever the parameters' dtype (here in the parameters' precision, at least
      float32), and it leaves the signs of the singular vectors to the SVD. Its ``"reverse_std"``
      fails on a wide matrix whose rank is its height; here it projects it. With ``"full"``, the
      off-diagonal entries of :math:`P_L^\top G P_R^\top` are rounding noise of the SVD, which
      Adam's first steps scale to about :math:`\pm 1` once it exceeds ``eps``: with large gradients
      each implementation's rounding sets those steps (1e-5 to 6e-4 apart at gradients of 1e10).
    """
    base.check_common(learning_rate, weight_decay)
    core = galore(
        scale_by_adam(b1, b2, eps, eps_on_raw_root=True, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        rank, update_proj_gap, scale, proj_type, min_dim=min_dim, galore_mask=galore_mask,
    )  # fmt: skip
    base.check_mask(weight_decay_mask)
    decay = _decay_after_step(learning_rate, weight_decay)
    masked = decay if weight_decay_mask is None else base.masked(decay, weight_decay_mask)
    stepped = optax.chain(core, base.scale_by_learning_rate(learning_rate))
    return base.assemble(stepped, None, after_decay=(masked,))


__all__ = ["GaLoreState", "default_galore_mask", "galore", "galore_adamw"]
