"""Scion: the momentum of each leaf mapped through the linear minimisation oracle of a norm chosen for its role.

:func:`scale_by_scion` is the block; :func:`scion` adds the learning rate, the weight decay and
the constrained (conditional-gradient) variant. Which norm each leaf gets (spectral for hidden
matrices, a column norm for embeddings, sign for output heads, RMS for biases) is a rule on the
tree's paths and shapes, :func:`default_scion_norms`, or one of the user's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex

# The path rule (one rule for what an embedding or a head is) and the gathering of sharded matrices are Muon's.
from adaopt._src.preconditioned.muon import (
    NS_COEFFICIENTS,
    Coefficients,
    _on_whole_matrices,
    check_ns_coefficients,
    is_vector_path,
    matrix_axes,
    newton_schulz,
    path_names,
    plain_coefficients,
)
from adaopt._src.preconditioned.muon import _is_auxiliary_path as _is_embedding_or_head_path

NormKind = Literal["spectral", "spectral_conv", "sign", "col", "row", "bias_rms", "identity"]
MomentumForm = Literal["ema", "sum"]
_KINDS = ("spectral", "spectral_conv", "sign", "col", "row", "bias_rms", "identity")
_MIN_NDIM = {"spectral": 2, "spectral_conv": 3, "sign": 0, "col": 2, "row": 2, "bias_rms": 0, "identity": 0}
_MAX_NDIM = {"col": 2, "row": 2}
_DEFAULT_NORMALIZE = {"spectral": True, "sign": True, "col": False, "row": True}
_EMBEDDING_SUBSTRINGS = ("embed", "embd")
_EMBEDDING_KEYS = ("wte", "wpe")
_NO_COMPLEX = (
    "Scion does not take complex parameters: its norms' oracles (Newton–Schulz, sign, column and row norms) have no "
    "complex form here. Got a complex leaf at {path} ({dtype}). Train complex leaves with another optimizer "
    "(optax.partition routes leaves to different optimizers)."
)


@dataclasses.dataclass(frozen=True)
class ScionNorm:
    r"""The norm of one leaf and its options: the leaf's step is :math:`-\rho\, s\, \mathrm{lmo}(d)`.

    The kinds (a leaf of shape :math:`(A, B)`, rows :math:`A` = fan-out and columns :math:`B` =
    fan-in in torch's ``(out, in)`` layout; :math:`\mathrm{NS}` is :func:`newton_schulz`):

    - ``"spectral"``: :math:`\sqrt{A/B}\,\mathrm{NS}(d)` (``normalize=False``: :math:`\sqrt{A}`;
      ``max_scale``: the factor at least 1). A leaf of three or more dimensions is a batch of
      matrices over its leading axes.
    - ``"spectral_conv"``: a convolution kernel :math:`(A, B, k_1, \dots)`, orthogonalised as the
      :math:`A \times B k_1 \cdots` matrix, times :math:`\sqrt{A/B} / (k_1 \cdots)`.
    - ``"sign"``: :math:`\mathrm{sign}(d) / B` with :math:`B` the second axis (``normalize=False``:
      :math:`\mathrm{sign}(d)`, any shape).
    - ``"col"``: each column over its RMS, :math:`d_{:j} / (\|d_{:j}\|_2 / \sqrt{A} + \epsilon)`
      (``normalize=True``: the RMS times :math:`B`); 2-d only.
    - ``"row"``: each row over its norm, :math:`d_{i:} / (\|d_{i:}\|_2 \sqrt{B} + \epsilon)`
      (``normalize=False``: without :math:`\sqrt{B}`); 2-d only.
    - ``"bias_rms"``: :math:`d / (\mathrm{RMS}_0(d) + \epsilon)`, the RMS over the first axis
      (a 0-d leaf: :math:`d / (|d| + \epsilon)`), or over ``axis``: ``axis=-1`` normalises each
      row of a ``(layers, d)`` stack of biases, or a Haiku ``(1, 1, 1, C)`` gain, on its own.
    - ``"identity"``: :math:`d` itself (no norm: SGD with momentum).

    ``transpose`` swaps the two axes of a ``"col"`` or ``"row"`` leaf first: an embedding
    stored ``(vocab, features)`` is the ``(features, vocab)`` map of a one-hot input. For a
    ``"spectral"`` or ``"sign"`` leaf it reads the last two axes as ``(in, out)``, Flax's and
    Haiku's kernels, where the kinds above read torch's ``(out, in)``: :math:`A` and :math:`B`
    swap (the orthogonalised matrix is the same).

    Attributes:
      kind: one of the kinds above.
      scale: :math:`s`, this leaf's radius relative to the optimizer's ``radius``, > 0.
      normalize: the kind's normalisation; None: its default (True, except for ``"col"``).
      max_scale: for ``"spectral"``, bound the shape factor below by 1.
      transpose: for ``"col"`` and ``"row"``, swap the axes first; for ``"spectral"`` and
        ``"sign"``, an ``(in, out)`` matrix.
      eps: :math:`\epsilon` of ``"col"``, ``"row"`` and ``"bias_rms"``, >= 0.
      axis: for ``"bias_rms"``, the axis of the RMS; None: the first (the reference's).

    Example:
      >>> import adaopt
      >>> adaopt.ScionNorm("sign", scale=60.0)  # an output head at 60 times the radius
      ScionNorm(kind='sign', scale=60.0, normalize=None, max_scale=False, transpose=False, eps=1e-08, axis=None)
    """

    kind: NormKind
    scale: float = 1.0
    normalize: bool | None = None
    max_scale: bool = False
    transpose: bool = False
    eps: float = 1e-8
    axis: int | None = None

    def __post_init__(self) -> None:
        base.check_choice("kind", self.kind, _KINDS)
        base.check_scalar("scale", self.scale, low=0.0, low_open=True)
        base.check_nonnegative("eps", self.eps)
        base.check_flag("normalize", self.normalize, optional=True)
        base.check_flag("max_scale", self.max_scale)
        base.check_flag("transpose", self.transpose)
        if self.axis is not None:
            if self.kind != "bias_rms":
                raise base.HyperparameterError(f"axis is an option of the 'bias_rms' norm, not of {self.kind!r}.")
            base.check_integer("axis", self.axis, -64, 63)
            base.as_python(self, axis=int)

    @property
    def normalized(self) -> bool:
        return _DEFAULT_NORMALIZE.get(self.kind, False) if self.normalize is None else self.normalize


def _as_norm(norm: Any) -> ScionNorm:
    return norm if isinstance(norm, ScionNorm) else ScionNorm(norm)


def _is_embedding_path(path: tuple[Any, ...]) -> bool:
    names = path_names(path)
    return any(s in n for n in names for s in _EMBEDDING_SUBSTRINGS) or any(n in _EMBEDDING_KEYS for n in names)


def _vector_norm(x: Any) -> Any:
    """``"bias_rms"`` over a leaf's last axis when it has two or more and the last is longer than 1 (biases stacked
    over layers or heads, Haiku's ``(1, 1, 1, C)`` gains: each row on its own), else over its first (a ``(d, 1)``
    column, 0-d and 1-d leaves)."""
    shape = jnp.shape(x)
    return ScionNorm("bias_rms", axis=-1) if len(shape) >= 2 and shape[-1] > 1 else "bias_rms"


def default_scion_norms(params: base.Params, *, in_out: bool = False) -> Any:
    """The default rule of :func:`scion`: the norm of each leaf, by its path and shape.

    - 0-d and 1-d leaves (biases, norms' gains, scalars), and biases and norms' parameters by their
      names whatever their shape (stacked over layers, Flax's ``(heads, head_dim)`` attention biases;
      the names of :func:`default_muon_mask`): ``"bias_rms"``, over the last axis where there are two
      or more and the last is longer than 1 (``ScionNorm("bias_rms", axis=-1)``: each layer's or
      head's bias on its own).
    - Embeddings (a key containing ``"embed"`` or ``"embd"``, or equal to ``"wte"`` or ``"wpe"``):
      ``ScionNorm("col", transpose=True)``, each token's vector over its RMS.
    - Output heads (a key equal to ``"head"``, ``"lm_head"`` or ``"classifier"``, or ending in
      ``"_head"``, or ``"output"`` as the leaf's key or its module's): ``"sign"``.
    - Other leaves with fewer than two dimensions longer than 1 (Haiku's ``(1, 1, 1, C)`` gains, a
      ``(d, 1)`` column): ``"bias_rms"`` over their long axis, as above.
    - Every other leaf of two or more dimensions: ``"spectral"`` (three or more: a batch of
      matrices over the leading axes).

    With ``in_out=True`` the matrices are Flax's and Haiku's ``(in, out)`` kernels: their
    ``"spectral"`` and ``"sign"`` norms are ``ScionNorm(kind, transpose=True)`` (embeddings are
    ``(vocab, features)`` in every framework), for ``scion(norms=functools.partial(
    adaopt.default_scion_norms, in_out=True))``.

    Keys are compared in lower case and split at ``"."`` and ``"/"``, as in :func:`default_muon_mask`. This follows the paper's
    recommendations for a transformer (with the radius of a head, 60 times the hidden one's in
    the authors' GPT runs, left to the user: ``ScionNorm("sign", scale=60.0)``).

    Args:
      params: the parameters (or gradients: only paths and shapes are read).
      in_out: the matrices are ``(in, out)``, not torch's ``(out, in)``.

    Returns:
      A tree with the structure of ``params`` whose leaves are norm kinds or :class:`ScionNorm`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"embed": jnp.ones((10, 4)), "mlp": {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, "head": jnp.ones((3, 4))}
      >>> norms = adaopt.default_scion_norms(params)
      >>> norms["mlp"], norms["head"], norms["embed"].kind
      ({'b': 'bias_rms', 'w': 'spectral'}, 'sign', 'col')
    """

    def rule(path: tuple[Any, ...], x: Any) -> Any:
        if jnp.ndim(x) < 2 or is_vector_path(path):
            return _vector_norm(x)
        if _is_embedding_path(path) and jnp.ndim(x) == 2:
            return ScionNorm("col", transpose=True)
        if _is_embedding_or_head_path(path):
            return ScionNorm("sign", transpose=True) if in_out else "sign"
        if matrix_axes(x) < 2:
            return _vector_norm(x)
        return ScionNorm("spectral", transpose=True) if in_out else "spectral"

    base.check_flag("in_out", in_out)
    return jax.tree_util.tree_map_with_path(rule, params)


def _resolve_norms(norms: base.MaskOrFn | None, tree: Any) -> Any:
    chosen = norms(tree) if base.is_function_of(norms, tree) else norms
    chosen = default_scion_norms(tree) if chosen is None else chosen
    base.check_tree_match(tree, chosen, base.per_leaf_option("norms"), subject="parameters", shapes=False)

    def as_norm(path: Any, norm: Any) -> ScionNorm:
        try:
            return _as_norm(norm)
        except base.HyperparameterError as error:
            raise base.HyperparameterError(f"norms{jax.tree_util.keystr(path)}: {error}") from None

    return jax.tree_util.tree_map_with_path(as_norm, chosen, is_leaf=lambda x: isinstance(x, ScionNorm))


def _check_leaves(tree: Any, norms: Any) -> None:
    for (path, leaf), norm in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(norms), strict=True):
        where = jax.tree_util.keystr(path) or "the root"
        if is_complex(leaf):
            raise TypeError(_NO_COMPLEX.format(path=where, dtype=jnp.result_type(leaf)))
        ndim = jnp.ndim(leaf)
        low = 2 if norm.kind == "sign" and norm.normalized else _MIN_NDIM[norm.kind]
        high = _MAX_NDIM.get(norm.kind, ndim)
        if norm.axis is not None and ndim and not -ndim <= norm.axis < ndim:
            raise ValueError(
                f"The Scion norm 'bias_rms' at {where} takes its RMS over axis {norm.axis}, but the leaf has shape "
                f"{jnp.shape(leaf)}."
            )
        if not low <= ndim <= high:
            wanted = f"{low}" if low == high else f"at least {low}"
            raise ValueError(
                f"The Scion norm {norm.kind!r}{' (normalized)' if norm.kind == 'sign' else ''} needs a leaf of {wanted} "
                f"dimensions, but the leaf at {where} has shape {jnp.shape(leaf)}. Give it another norm in `norms` "
                "(adaopt.default_scion_norms gives 0-d and 1-d leaves 'bias_rms')."
            )


def _ratio(a: int, b: int) -> float:
    """``a / b``, and 1 for an empty side (the leaf is empty: the factor multiplies nothing)."""
    return a / b if a and b else 1.0


def _spectral_factor(norm: ScionNorm, rows: int, cols: int) -> float:
    factor = math.sqrt(_ratio(rows, cols)) if norm.normalized else math.sqrt(rows)
    return max(1.0, factor) if norm.max_scale else factor


def _lmo(norm: ScionNorm, d: jax.Array, orthogonalise: Any) -> jax.Array:
    """The oracle's direction for ``d`` (in the compute dtype), before the radius."""
    kind, shape = norm.kind, d.shape
    if kind == "identity":
        return d
    if kind == "sign":
        if not norm.normalized:  # any shape (a vector's, a scalar's: no input dimension to read)
            return jnp.sign(d)
        inputs = shape[0] if norm.transpose else shape[1]
        return jnp.sign(d) / inputs if inputs else jnp.sign(d)
    if kind == "bias_rms":
        axis = 0 if norm.axis is None else norm.axis
        rms = jnp.abs(d) if d.ndim == 0 else jnp.sqrt(jnp.mean(d * d, axis=axis, keepdims=True))
        return d / (rms + norm.eps)
    if kind in ("col", "row"):
        x = d.T if norm.transpose else d
        rows, cols = x.shape
        if kind == "col":
            size = jnp.sqrt(jnp.sum(x * x, axis=0, keepdims=True)) / math.sqrt(max(rows, 1))
            size = size * cols if norm.normalized else size
        else:
            size = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
            size = size * math.sqrt(cols) if norm.normalized else size
        x = x / (size + norm.eps)
        return x.T if norm.transpose else x
    if kind == "spectral_conv":
        flat = orthogonalise(d.reshape(shape[0], -1)).reshape(shape).astype(d.dtype)
        return flat * (math.sqrt(_ratio(shape[0], shape[1])) / math.prod(shape[2:]))
    rows, cols = (shape[-1], shape[-2]) if norm.transpose else (shape[-2], shape[-1])
    return orthogonalise(d).astype(d.dtype) * _spectral_factor(norm, rows, cols)


class ScionState(NamedTuple):
    """State of :func:`scale_by_scion`.

    Attributes:
      mu: the momentum :math:`d_t` of each leaf, mirroring the parameters.
    """

    mu: Updates


def _check_scion(momentum: Any, radius: Any, momentum_form: Any, ns_steps: Any, ns_coefficients: Any, ns_eps: Any,
                 ns_dtype: Any, mu_dtype: Any) -> None:  # fmt: skip
    base.check_decay("momentum", momentum)
    base.check_scalar("radius", radius, low=0.0, low_open=True)
    base.check_choice("momentum_form", momentum_form, ("ema", "sum"))
    base.check_integer("ns_steps", ns_steps, 0, 99)
    check_ns_coefficients(ns_coefficients, ns_steps)
    base.check_nonnegative("ns_eps", ns_eps)
    base.check_dtype("ns_dtype", ns_dtype)
    moments.check_storage("mu_dtype", mu_dtype)


def scale_by_scion(
    momentum: Any = 0.9,
    radius: Any = 1.0,
    *,
    norms: base.MaskOrFn | None = None,
    momentum_form: MomentumForm = "ema",
    ns_steps: int = 5,
    ns_coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    ns_eps: Any = 1e-7,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Scion's block: the momentum of each leaf through its norm's linear minimisation oracle, times the radius.

    .. math::
        d_t &= \beta\, d_{t-1} + (1 - \beta)\, g_t \;\text{("ema")} \quad\text{or}\quad
        \beta\, d_{t-1} + g_t \;\text{("sum")} \\
        u_t &= \rho\, s\, \mathrm{lmo}(d_t)

    with :math:`\mathrm{lmo}` and the leaf's relative radius :math:`s` from its :class:`ScionNorm`
    (the oracle of the unit ball is :math:`-\mathrm{lmo}`: the step of :func:`scion` is
    :math:`-\eta u_t`). Newton–Schulz (the ``"spectral"`` norms) is :func:`newton_schulz` with
    :math:`\max(\|d\|_F, \epsilon_{NS})` as the normaliser.

    Args:
      momentum: :math:`\beta`, the decay of the momentum, in [0, 1) (the references' ``momentum``
        is :math:`1 - \beta`).
      radius: :math:`\rho`, the radius of every leaf's norm ball, > 0.
      norms: each leaf's norm: a tree with the parameters' structure whose leaves are kinds
        (``"spectral"``, ``"sign"`` ...) or :class:`ScionNorm`, a function of the parameters
        returning one, or None for :func:`default_scion_norms`.
      momentum_form: ``"ema"`` (SCION's average) or ``"sum"`` (SCIONLight's: its momentum lives
        in the gradient buffers, which keep adding the new gradient).
      ns_steps: number of Newton–Schulz iterations, in [0, 99].
      ns_coefficients: the iteration's coefficients :math:`(a, b, c)`, or one triple per iteration.
      ns_eps: :math:`\epsilon_{NS}`, the floor of the Frobenius norm, >= 0.
      ns_dtype: the dtype of the iteration; None: the compute dtype (float32, float64 for
        float64 parameters); ``jnp.bfloat16`` runs it as the reference does.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScionState`. Complex parameters,
      and a leaf whose shape its norm does not take, are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_scion(momentum=0.0, norms={"w": "sign", "b": "bias_rms"})
      >>> g = {"w": jnp.array([[3.0, -0.5]]), "b": jnp.array([2.0, -2.0])}
      >>> updates, _ = tx.update(g, tx.init(g))
      >>> updates["w"], updates["b"].round(6)  # sign / fan-in; the bias over its RMS
      (Array([[ 0.5, -0.5]], dtype=float32), Array([ 1., -1.], dtype=float32))

    References:
      Pethick, Xie, Erdogan, Antonakopoulos, Silveti-Falls & Cevher, "Training Deep Learning
      Models with Norm-Constrained LMOs", ICML 2025, https://arxiv.org/abs/2502.07529.
    """
    _check_scion(momentum, radius, momentum_form, ns_steps, ns_coefficients, ns_eps, ns_dtype, mu_dtype)
    ns_coefficients = plain_coefficients(ns_coefficients)

    def orthogonalise(x: jax.Array) -> jax.Array:
        return _on_whole_matrices(
            lambda y: newton_schulz(y, ns_coefficients, ns_steps, ns_eps, eps_mode="max", dtype=ns_dtype), x
        )

    def init_fn(params: base.Params) -> ScionState:
        _check_leaves(params, _resolve_norms(norms, params))
        return ScionState(mu=moments.init_like(params, mu_dtype))

    def update_fn(updates: Updates, state: ScionState, params: base.Params | None = None) -> tuple[Updates, ScionState]:
        del params
        leaf_norms = _resolve_norms(norms, updates)

        def leaf(g: jax.Array, d: jax.Array, norm: ScionNorm) -> tuple[jax.Array, jax.Array]:
            dtype, g_compute, (d_compute,) = moments.to_compute(g, d)
            beta = moments.scalar(momentum, dtype)
            fresh = g_compute if momentum_form == "sum" else moments.times(g_compute, 1 - beta)
            d_new = moments.times(d_compute, beta) + fresh
            step = _lmo(norm, d_new, orthogonalise) * (moments.scalar(radius, dtype) * norm.scale)
            return step.astype(g.dtype), moments.store(d_new, d)

        out = moments.leafwise(leaf, 2, updates, state.mu, options=(leaf_norms,))
        return out[0], ScionState(out[1])

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def scion(
    learning_rate: ScalarOrSchedule = 1e-3,
    momentum: Any = 0.9,
    radius: Any = 1.0,
    weight_decay: Any = 0.0,
    *,
    norms: base.MaskOrFn | None = None,
    constrained: bool = False,
    momentum_form: MomentumForm = "ema",
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    ns_eps: Any = 1e-7,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scion: steepest descent in a norm chosen per layer, through each norm's linear minimisation oracle.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        \theta_t &= \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big) \quad
        \text{(unconstrained, decoupled decay: the default)} \\
        \theta_t &= (1 - \eta_t)\, \theta_{t-1} - \eta_t u_t \quad \text{(constrained)}

    with :math:`u_t` from :func:`scale_by_scion`. Unconstrained (uSCG in the paper) is steepest
    descent in the norms; constrained (SCG, the conditional gradient) keeps the parameters in the
    norm ball of radius :math:`\rho s`: its decay is the learning rate itself.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``
        (in [0, 1] for the constrained variant).
      momentum: :math:`\beta`, the decay of the momentum, in [0, 1) (the references'
        ``momentum`` is :math:`1 - \beta`).
      radius: :math:`\rho`, the radius of the norm balls, > 0 (the references' ``scale``).
      weight_decay: :math:`\lambda`, >= 0; must be 0 when ``constrained``.
      norms: each leaf's norm (see :func:`scale_by_scion`); None: :func:`default_scion_norms`.
      constrained: the conditional-gradient variant (the references' ``constraint=True``).
      momentum_form: ``"ema"`` (SCION) or ``"sum"`` (SCIONLight); see :func:`scale_by_scion`.
      weight_decay_mask: the leaves that decay (with ``constrained``: that are kept in the
        ball), a tree of booleans or a function of the parameters returning one; None: all.
      decoupled_weight_decay: True (the default) decays the parameters, scaled by the learning
        rate; False adds the decay to the gradient, before the momentum.
      ns_steps: see :func:`scale_by_scion`.
      ns_coefficients: see :func:`scale_by_scion`.
      ns_eps: see :func:`scale_by_scion`.
      ns_dtype: see :func:`scale_by_scion`.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"w": jnp.eye(2), "b": jnp.zeros(2)}
      >>> opt = adaopt.scion(0.1, momentum=0.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]]), "b": jnp.array([1.0, -1.0])}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> updates["w"].round(1), updates["b"].round(3)  # about -0.1 times the orthogonal factor; a bias's RMS sign
      (Array([[-0.1, -0. ],
             [-0. , -0.1]], dtype=float32), Array([-0.1,  0.1], dtype=float32))

    References:
      Pethick, Xie, Erdogan, Antonakopoulos, Silveti-Falls & Cevher, "Training Deep Learning
      Models with Norm-Constrained LMOs", ICML 2025, https://arxiv.org/abs/2502.07529.

      Reference packages: ``pytorch_optimizer.SCION(lr, momentum=1 - β, constraint, norm_type,
      norm_kwargs, scale=radius, weight_decay, weight_decouple)`` is this with one parameter
      group per norm (its ``LMONorm.SPECTRAL``, ``SPECTRALCONV``, ``SIGN``, ``COL``, ``ROW``,
      ``BIAS``, ``NONE`` are ``"spectral"``, ``"spectral_conv"``, ``"sign"``, ``"col"``,
      ``"row"``, ``"bias_rms"``, ``"identity"``; ``AUTO`` is ``"bias_rms"`` for 0-d and 1-d,
      ``"spectral"`` for 2-d and ``"spectral_conv"`` for 3-d and 4-d leaves; an explicit
      ``SPECTRAL`` on a 3-d or 4-d leaf is there one matrix, its first axis by the rest, where
      ``"spectral"`` here is a batch of matrices over the leading axes); its Newton–Schulz
      runs in bfloat16 (``ns_dtype=jnp.bfloat16``). ``SCIONLight`` is this with
      ``momentum_form="sum"``, its gradients accumulated into the buffers (never zeroed) as it is
      meant to be run. Both ignore ``weight_decay`` when ``constraint=True``; their ``init()``,
      which redraws the parameters, has no counterpart here.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_mask(norms, "norms")
    base.check_mask(weight_decay_mask)
    if constrained:
        decay = base.concrete_scalar(weight_decay)
        if decay is not None and decay != 0:
            raise base.HyperparameterError(
                f"weight_decay must be 0 (in [0.0, 0.0]) with constrained=True, got {weight_decay!r}: the constrained "
                "variant decays the parameters by the learning rate itself, theta <- (1 - lr) * theta - lr * u."
            )
    core = scale_by_scion(
        momentum, radius, norms=norms, momentum_form=momentum_form, ns_steps=ns_steps,
        ns_coefficients=ns_coefficients, ns_eps=ns_eps, ns_dtype=ns_dtype, mu_dtype=mu_dtype,
    )  # fmt: skip
    return base.assemble(
        core,
        learning_rate,
        1.0 if constrained else weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=constrained or decoupled_weight_decay,
        complex_convention="modulus",
    )
