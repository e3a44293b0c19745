r"""SM3: AdaGrad's accumulator covered by one accumulator per slice of each axis (rows, columns, ...).

A leaf of shape :math:`(n_1, \ldots, n_k)` keeps :math:`n_1 + \ldots + n_k` numbers in place of
AdaGrad's :math:`n_1 \cdots n_k`: one per slice along each axis (a matrix: one per row and one per
column), the cover sets of the paper. Each coordinate's second moment is the smallest accumulator
among the slices that hold it, plus its squared gradient; each accumulator is then the largest
second moment in its slice.
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
    "SM3 does not take complex parameters: its accumulators' minima and maxima have no complex form here. Got a "
    "complex leaf at {path} ({dtype}). Train complex leaves with another optimizer (optax.partition routes leaves "
    "to different optimizers)."
)


class Sm3State(NamedTuple):
    r"""State of :func:`scale_by_sm3`.

    Attributes:
      accumulators: one tree per axis index :math:`a = 0, 1, \ldots` (as many as the most axes of
        a leaf, at least one), each with the parameters' structure: at a leaf of more than
        :math:`a` axes, the accumulators :math:`\mu(a, \cdot)` of the slices along axis :math:`a`,
        a vector of ``p.shape[a]`` elements; at a 0-d leaf, in the first tree, its one accumulator
        (0-d); ``optax.MaskedNode()`` elsewhere. A leaf of shape ``(n, k)`` keeps a vector of
        ``n`` (one per row) in ``accumulators[0]`` and of ``k`` (one per column) in ``accumulators[1]``.
      mu: the momentum :math:`m_t`, mirroring the parameters; None when ``momentum`` is None.
    """

    accumulators: tuple[Updates, ...]
    mu: Updates | None


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != axis)


def _check_real(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_complex(leaf):
            raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype))


def _cover_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of a leaf's accumulators: one vector per axis, or one 0-d array for a 0-d leaf."""
    return [(n,) for n in shape] if shape else [()]


def _accumulators_of(updates: Updates, accumulators: tuple[Updates, ...]) -> list[tuple[jax.Array, ...]]:
    """Each gradient leaf's accumulators, in leaf order; a readable error where they do not cover it."""
    fix = (
        "The optimizer's state was built by `init` for other parameters: call `init` on the parameters whose "
        "gradients you pass (after changing the model, build a new optimizer state)."
    )
    treedef: Any = jax.tree.structure(updates)  # flatten_up_to: one tree per axis, MaskedNode where absent
    try:
        per_axis = [treedef.flatten_up_to(tree) for tree in accumulators]
    except ValueError:
        raise base.TreeMismatchError(
            f"The gradients do not have the structure of SM3's accumulators: expected a tree of structure\n"
            f"  {treedef}\n{fix}"
        ) from None
    per_leaf = []
    for i, (path, g) in enumerate(jax.tree_util.tree_leaves_with_path(updates)):
        wanted = _cover_shapes(jnp.shape(g))
        accs = tuple(axis[i] for axis in per_axis[: len(wanted)])
        got = [jnp.shape(a) for a in accs if not isinstance(a, optax.MaskedNode)]
        if got != wanted:
            raise base.TreeMismatchError(
                f"The gradients at {jax.tree_util.keystr(path) or 'the root'} have shape {jnp.shape(g)}, but SM3's "
                f"accumulators there have shapes {got}. {fix}"
            )
        per_leaf.append(accs)
    return per_leaf


def _init_accumulators(params: Any, dtype: Any) -> tuple[Any, ...]:
    """The trees of :attr:`Sm3State.accumulators`: zeros, each vector with the sharding of a reduction to its axis."""
    most_axes = max((jnp.ndim(p) for p in jax.tree.leaves(params)), default=0)

    def zeros(p: Any, axis: int) -> Any:
        ndim = jnp.ndim(p)
        if axis >= max(ndim, 1):
            return optax.MaskedNode()
        dtype_p = moments.state_dtype(jnp.result_type(p), dtype, real=True)
        if ndim == 0:
            return jnp.zeros_like(p, dtype=dtype_p)
        reduced = jax.eval_shape(functools.partial(jnp.sum, axis=_other_axes(ndim, axis)), p)
        return placement.zeros(reduced, p, dtype_p)

    return tuple(jax.tree.map(functools.partial(zeros, axis=a), params) for a in range(max(most_axes, 1)))


@base.check_flags
def scale_by_sm3(
    momentum: Any = 0.9,
    b2: Any = None,
    eps: Any = 1e-8,
    *,
    monotone_accumulators: bool = False,
    accumulator_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SM3's block: each coordinate scaled by the root of the smallest accumulator covering it, then momentum.

    For a leaf with axes :math:`a = 1..k`, coordinate :math:`i = (i_1, \ldots, i_k)` lies in one
    slice per axis, :math:`r = (a, i_a)`; with :math:`\mu_{t}(a, j)` the accumulator of slice
    :math:`j` of axis :math:`a`:

    .. math::
        \nu_t(i) &= \min_a \mu_{t-1}(a, i_a) + g_t(i)^2
            \quad\text{or, with } \beta_2\text{:}\quad
            \beta_2 \min_a \mu_{t-1}(a, i_a) + (1 - \beta_2)\, g_t(i)^2 \\
        \mu_t(a, j) &= \max_{i : i_a = j} \nu_t(i)
            \quad\text{(monotone: } \max\big(\mu_{t-1}(a, j), \max_{i : i_a = j} \nu_t(i)\big)\text{)} \\
        u_t &= \frac{g_t}{\sqrt{\nu_t + \epsilon}} \quad (0 \text{ where } \nu_t + \epsilon = 0), \qquad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) u_t, \qquad \text{update} = m_t

    (the momentum :math:`\beta_1` is ``momentum``; with None the update is :math:`u_t` and no
    buffer is kept). With :math:`\beta_2` None this is the paper's SM3-II: the accumulators are
    sums, and they never decrease, so ``monotone_accumulators`` changes nothing.

    0-d and 1-d leaves: a 1-d leaf's slices are its coordinates, so its accumulator is a full
    one (AdaGrad's, or an EMA of :math:`g^2` with :math:`\beta_2`; under
    ``monotone_accumulators``, the running maximum of that EMA). A 0-d leaf keeps one
    accumulator, its second moment :math:`\nu_t` itself (never a running maximum: pytorch-optimizer's rule).

    Args:
      momentum: :math:`\beta_1`, the decay of the momentum of the scaled updates, in [0, 1), or
        None for no momentum (and no buffer).
      b2: :math:`\beta_2`, the decay of an exponential moving average in place of the sums, in
        [0, 1); None: sums (the paper's).
      eps: :math:`\epsilon`, added inside the root, >= 0.
      monotone_accumulators: with ``b2``, keep each accumulator at the maximum of its past values
        and the new one (pytorch-optimizer's rule with ``beta > 0``); False replaces it (optax's).
      accumulator_dtype: storage dtype of the accumulators (default: the parameter's, at least float32).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`Sm3State`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_sm3(momentum=None, eps=0.0)
      >>> g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> state.accumulators  # the largest g^2 of each row (axis 0), and of each column (axis 1)
      (Array([ 9., 16.], dtype=float32), Array([ 9., 16.], dtype=float32))
      >>> updates  # the first step is sign(g)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)

    References:
      Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization", NeurIPS 2019,
      https://arxiv.org/abs/1901.11150.

      Reference packages: :func:`sm3` gives the arguments that reproduce optax and pytorch-optimizer.
    """
    if momentum is not None:
        base.check_decay("momentum", momentum)
    if b2 is not None:
        base.check_decay("b2", b2)
    base.check_nonnegative("eps", eps)
    moments.check_statistics_dtype("accumulator_dtype", accumulator_dtype)
    moments.check_storage("mu_dtype", mu_dtype)  # the momentum mirrors the parameters: any storage
    keep_max = monotone_accumulators and b2 is not None  # sums never decrease: the maximum would change nothing

    def init_fn(params: base.Params) -> Sm3State:
        _check_real(params)
        accumulators = _init_accumulators(params, accumulator_dtype)
        return Sm3State(accumulators, None if momentum is None else moments.init_like(params, mu_dtype))

    def update_fn(updates: Updates, state: Sm3State, params: base.Params | None = None) -> tuple[Updates, Sm3State]:
        del params
        if state.mu is not None:
            base.check_tree_match(updates, state.mu, "state")
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: the momentum
        accumulators = _accumulators_of(updates, state.accumulators)
        buffers = [None] * len(accumulators) if state.mu is None else treedef.flatten_up_to(state.mu)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            decays = tuple(None if x is None else moments.scalar(x, dtype) for x in (momentum, b2))
            return (*decays, moments.scalar(eps, dtype))

        def leaf(g: jax.Array, accs: tuple[jax.Array, ...], m: Any) -> tuple[Any, ...]:
            if g.size == 0:  # no coordinate to cover
                return (jnp.zeros_like(g), accs, m)
            present = accs if m is None else (*accs, m)
            dtype, g_compute, stats = moments.to_compute(g, *present)
            accs_compute = stats[: len(accs)]
            beta1, beta2, e = scalars(dtype)
            if g.ndim == 0:
                smallest = accs_compute[0]
            else:
                covers = [jnp.expand_dims(a, _other_axes(g.ndim, i)) for i, a in enumerate(accs_compute)]
                smallest = functools.reduce(jnp.minimum, covers)
            squared = g_compute * g_compute
            nu = smallest + squared if beta2 is None else moments.ema(squared, smallest, beta2)
            if g.ndim == 0:
                new_accs: tuple[jax.Array, ...] = (nu,)
            else:
                new_accs = tuple(jnp.max(nu, axis=_other_axes(g.ndim, i)) for i in range(g.ndim))
                if keep_max:
                    new_accs = tuple(jnp.maximum(old, new) for old, new in zip(accs_compute, new_accs, strict=True))
            u = g_compute * moments.inv_root(nu, 0, e)
            stored = tuple(new.astype(old.dtype) for new, old in zip(new_accs, accs, strict=True))
            if m is None:
                return (u.astype(g.dtype), stored, None)
            m_new = moments.ema(u, stats[-1], beta1)
            return (m_new.astype(g.dtype), stored, moments.store(m_new, m))

        outs = [leaf(*args) for args in zip(treedef.flatten_up_to(updates), accumulators, buffers, strict=True)]
        step = treedef.unflatten([o[0] for o in outs])
        new_accumulators = tuple(
            treedef.unflatten([o[1][a] if a < len(o[1]) else optax.MaskedNode() for o in outs])
            for a in range(len(state.accumulators))
        )
        mu = None if state.mu is None else treedef.unflatten([o[2] for o in outs])
        return step, Sm3State(new_accumulators, mu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def sm3(
    learning_rate: ScalarOrSchedule = 0.1,
    momentum: Any = 0.9,
    b2: Any = None,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    monotone_accumulators: bool = False,
    accumulator_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SM3: AdaGrad's step sizes with one accumulator per row and per column (per slice of each axis).

    .. math::
        g_t \leftarrow g_t + \lambda \theta_{t-1} \quad\text{(coupled decay)}, \qquad
        \theta_t = \theta_{t-1} - \eta_t\, \text{update}_t

    with the update of :func:`scale_by_sm3`; with ``decoupled_weight_decay``,
    :math:`\lambda\theta_{t-1}` is added to the update instead (and scaled by :math:`\eta_t`).

    Memory: a leaf of shape :math:`(n_1, \ldots, n_k)` keeps :math:`n_1 + \ldots + n_k`
    accumulators, and the momentum (the parameter's size) unless ``momentum`` is None.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      momentum: :math:`\beta_1`, in [0, 1), or None for no momentum buffer (optax's default
        0.9; pytorch-optimizer's 0).
      b2: :math:`\beta_2` in [0, 1) for moving averages in place of the sums; None: sums (the paper's).
      eps: :math:`\epsilon`, added inside the root, >= 0 (optax's 1e-8; pytorch-optimizer's 1e-30).
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0 (coupled L2 by default).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add :math:`\lambda\theta` to the update instead of to the gradient.
      monotone_accumulators: with ``b2``, accumulators that never decrease (see :func:`scale_by_sm3`).
      accumulator_dtype: storage dtype of the accumulators (default: the parameter's, at least float32).
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``
      with a ``TypeError``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.sm3(0.1, momentum=None)
      >>> params = jnp.zeros((2, 3))
      >>> updates, state = opt.update(jnp.ones((2, 3)), opt.init(params), params)
      >>> updates  # the first step is -learning_rate * sign(g), up to eps
      Array([[-0.1, -0.1, -0.1],
             [-0.1, -0.1, -0.1]], dtype=float32)

    References:
      Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization", NeurIPS 2019,
      https://arxiv.org/abs/1901.11150.

      Reference packages: ``optax.sm3(learning_rate, momentum)`` is this with the same numbers
      (``optax.scale_by_sm3(b1, b2, eps)``: ``momentum=b1``, ``b2`` as there, but its ``b2=1``
      is None here); optax fails on 0-d leaves (here: a full accumulator). ``pytorch_optimizer.SM3(lr,
      momentum, beta, eps)`` is this with ``b2=None`` for ``beta=0`` and ``b2=beta,
      monotone_accumulators=True`` otherwise; both place eps inside the root.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_sm3(
        momentum,
        b2,
        eps,
        monotone_accumulators=monotone_accumulators,
        accumulator_dtype=accumulator_dtype,
        mu_dtype=mu_dtype,
    )
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention="modulus",  # no real view: init refuses complex leaves by name
    )
