"""Muon: the momentum of each weight matrix, orthogonalised by a Newton–Schulz iteration.

:func:`scale_by_muon` is the block for matrices; :func:`muon` routes every leaf of a model,
the hidden matrices to that block and the rest (embeddings, heads, biases, norms, scalars) to an
auxiliary AdamW, by the rule of :func:`default_muon_mask` or one of the user's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments, numerics, placement
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.optimizers import adam

AdjustLr = Literal["original", "match_rms_adamw"]
NesterovForm = Literal["lerp", "add"]
MatrixView = Literal["batch", "flatten"]
ViewSpec = Any  # a MatrixView, a MatrixAxes, or a function of the parameters returning a tree of either
Coefficients = tuple[float, float, float]
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
"""The quintic Newton–Schulz coefficients of the reference implementations."""
HEAVYBALL_NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
"""heavyball's five iterations, each with its own coefficients (``ns_coefficients`` of :func:`scale_by_muon`)."""


@dataclasses.dataclass(frozen=True)
class MatrixAxes:
    r"""Which axes of a leaf are its layer's inputs and which its outputs: how Muon makes matrices of it.

    The leaf is read as a batch of matrices of (the outputs' sizes' product) rows by (the inputs')
    columns, over its other axes: torch's ``(out, in)`` layout, whose rows and columns give
    ``adjust_lr="original"``'s :math:`\sqrt{\max(1, \text{fan-out} / \text{fan-in})}`. The default
    view (``matrix_view="batch"``) is ``MatrixAxes(inputs=-1, outputs=-2)``, torch's; Flax, Haiku and
    optax keep a dense kernel as ``(in, out)``: ``MatrixAxes(inputs=-2, outputs=-1)``.

    Attributes:
      inputs: the input axis, or axes (a tuple), of the leaf; negative counts from the end.
      outputs: the output axis, or axes; none of them among ``inputs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> query = adaopt.MatrixAxes(inputs=0, outputs=(1, 2))  # Flax's attention kernel (in, heads, head_dim)
      >>> per_head = adaopt.MatrixAxes(inputs=0, outputs=2)  # (in, heads, head_dim): one (head_dim, in) matrix a head
      >>> tx = adaopt.scale_by_muon(matrix_view=query)
      >>> tx.update(jnp.ones((8, 2, 4)), tx.init(jnp.ones((8, 2, 4))))[0].shape
      (8, 2, 4)
    """

    inputs: int | tuple[int, ...]
    outputs: int | tuple[int, ...]

    def __post_init__(self) -> None:
        is_axis = base.is_integer
        for name in ("inputs", "outputs"):
            axes = getattr(self, name)
            axes = (axes,) if is_axis(axes) else axes
            if not isinstance(axes, (tuple, list)) or not axes or not all(is_axis(a) for a in axes):
                raise base.HyperparameterError(
                    f"MatrixAxes' {name} must be an axis (an int) or a non-empty tuple of axes, got {getattr(self, name)!r}."
                )
            object.__setattr__(self, name, tuple(int(a) for a in axes))

    def permutation(self, ndim: int, where: str) -> tuple[tuple[int, ...], int, int]:
        """The axes in the order (batch, outputs, inputs), and how many outputs and inputs, for a leaf of ``ndim``."""
        inputs, outputs = cast(tuple[int, ...], self.inputs), cast(tuple[int, ...], self.outputs)
        if any(not -ndim <= a < ndim for a in inputs + outputs):
            raise ValueError(
                f"matrix_view {self} names an axis out of range for the leaf at {where}, which has {ndim} dimensions."
            )
        inputs, outputs = tuple(a % ndim for a in inputs), tuple(a % ndim for a in outputs)
        if len(set(inputs + outputs)) != len(inputs + outputs):
            raise ValueError(f"matrix_view {self} names an axis twice for the leaf at {where}.")
        batch = tuple(a for a in range(ndim) if a not in inputs + outputs)
        return batch + outputs + inputs, len(outputs), len(inputs)


def plain_coefficients(ns_coefficients: Any) -> Any:
    """``ns_coefficients`` with its arrays (NumPy's, concrete JAX ones) as tuples of Python floats: a ``(3,)`` array is
    one triple, a ``(steps, 3)`` array one per iteration. Anything else is returned as it is, for the check."""
    if isinstance(ns_coefficients, (np.ndarray, np.generic, jax.Array)) and not isinstance(
        ns_coefficients, jax.core.Tracer
    ):
        ns_coefficients = np.asarray(ns_coefficients).tolist()
    if isinstance(ns_coefficients, (tuple, list)):
        return tuple(plain_coefficients(x) for x in ns_coefficients)
    return ns_coefficients


def check_ns_coefficients(ns_coefficients: Any, ns_steps: Any) -> None:
    """``ns_coefficients``: one triple (a, b, c) of real numbers for every iteration, or one triple per iteration;
    arrays as :func:`plain_coefficients` reads them."""
    ns_coefficients = plain_coefficients(ns_coefficients)

    def is_triple(x: Any) -> bool:
        return isinstance(x, (tuple, list)) and len(x) == 3 and not any(isinstance(v, (tuple, list)) for v in x)

    triples = [ns_coefficients] if is_triple(ns_coefficients) else ns_coefficients
    empty = not triples and ns_steps != 0  # no iteration has no coefficients
    if not isinstance(triples, (tuple, list)) or empty or not all(is_triple(t) for t in triples):
        raise base.HyperparameterError(
            "ns_coefficients must be a tuple of three real numbers (a, b, c), or one such tuple per Newton-Schulz "
            f"iteration, got {ns_coefficients!r}."
        )
    if not is_triple(ns_coefficients) and len(triples) != ns_steps:
        raise base.HyperparameterError(
            f"ns_coefficients gives {len(triples)} iterations' coefficients, but ns_steps is {ns_steps!r}: give one "
            "triple per iteration, or one triple for all."
        )
    for i, triple in enumerate(triples):
        for j, coefficient in enumerate(triple):
            base.check_scalar(
                f"ns_coefficients[{i}][{j}]" if len(triples) > 1 else f"ns_coefficients[{j}]", coefficient
            )


def _schedule(coefficients: Any, steps: int) -> list[Coefficients]:
    """Each of the ``steps`` iterations' (a, b, c), as floats (checked by :func:`check_ns_coefficients`)."""
    coefficients = plain_coefficients(coefficients)
    check_ns_coefficients(coefficients, steps)
    if len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)):
        return [tuple(float(x) for x in coefficients)] * steps  # type: ignore[list-item]
    return [tuple(float(x) for x in triple) for triple in coefficients]  # type: ignore[misc]


# Path keys that name an embedding or an output head: leaves under them go to the auxiliary AdamW. "output" only as
# the module that holds the leaf (Llama's and torchtitan's head, "output.weight"): BERT's "attention.output.dense"
# holds hidden matrices.
_AUX_SUBSTRINGS = ("embed", "embd")
_AUX_KEYS = ("wte", "wpe", "head", "lm_head", "classifier")
_AUX_HOLDERS = ("output",)
# Leaves that are vectors whatever their shape: a bias or a norm's gain or shift by its own name (Flax's, Haiku's,
# torch's), or anything under a norm's module (GPT-2's ln_1, Flax's LayerNorm_0, Llama's input_layernorm). Stacked
# for a scan over layers they are (layers, d), and Flax's attention biases are (heads, head_dim).
_VECTOR_NAMES = ("bias", "b", "scale", "offset")
_NORM_KEY = re.compile(r"norm|^ln($|[_\d])")
_NO_COMPLEX = (
    "Muon does not take complex parameters: its Newton–Schulz iteration has no complex form here, and a real "
    "view would orthogonalise another matrix. Got a complex leaf at {path} ({dtype}). Train complex leaves with "
    "another optimizer (optax.partition routes leaves to different optimizers)."
)


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`.

    Attributes:
      mu: the momentum :math:`m_t` of each matrix, mirroring the parameters.
    """

    mu: Updates


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute)).lower()
    return str(key).lower()


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The names on a leaf's path, in lower case, each key split at ``"."`` and ``"/"``: a flat dictionary keyed
    by torch's ``named_parameters()`` (``"lm_head.weight"``) or Haiku's modules (``"mlp/~/linear_0"``) names its
    modules as a nested one does. A Flax box's ``.value`` (an NNX variable's, linen's ``nn.Partitioned``'s), the last
    key of its leaf, is left out: the leaf is named by its attribute (``"bias"``)."""
    return [part for key in numerics.named_path(path) for part in re.split(r"[./]", _key_name(key)) if part]


def matrix_axes(x: Any) -> int:
    """How many axes of ``x`` are longer than 1: a leaf is a matrix for the default rules when two are (Haiku keeps a
    norm's gain as ``(1, 1, 1, C)``: a vector)."""
    return sum(n > 1 for n in jnp.shape(x))


def _is_auxiliary_path(path: tuple[Any, ...]) -> bool:
    """Whether a key on the path names an embedding or an output head."""
    names = path_names(path)
    return (
        any(s in n for n in names for s in _AUX_SUBSTRINGS)
        or any(n in _AUX_KEYS or n.endswith("_head") for n in names)
        or any(n in _AUX_HOLDERS for n in names[-2:])
    )


def is_vector_path(path: tuple[Any, ...]) -> bool:
    """Whether the path names a bias or a norm's parameter: ``"bias"``, ``"b"``, ``"scale"`` or ``"offset"`` as the
    leaf's own key, or a key containing ``"norm"`` or starting ``"ln"`` and a digit, ``"_"`` or nothing (``"ln_f"``)."""
    names = path_names(path)
    return bool(names) and (names[-1] in _VECTOR_NAMES or any(_NORM_KEY.search(n) for n in names))


def default_muon_mask(params: base.Params) -> Any:
    """The default rule of :func:`muon`: which leaves are hidden matrices (True) and go to Muon.

    A leaf goes to Muon when it has two or more dimensions longer than 1 and no key on its path
    names an embedding or an output head: a key containing ``"embed"`` or ``"embd"``, or equal to
    ``"wte"``, ``"wpe"``, ``"head"``, ``"lm_head"`` or ``"classifier"``, or ending in ``"_head"``,
    or ``"output"`` as the leaf's key or its module's (Llama's ``"output.weight"``); nor a bias or a
    norm's parameter: ``"bias"``, ``"b"``, ``"scale"`` or ``"offset"`` as the leaf's own key, or a key
    containing ``"norm"`` or starting ``"ln"`` and ``"_"``, a digit or nothing (``"ln_f"``), which
    are vectors whatever their shape (stacked over layers for a scan, ``(layers, d)``; Flax's
    attention biases, ``(heads, head_dim)``). Keys are compared in lower case, each split at ``"."``
    and ``"/"``: a flat ``{"lm_head.weight": ...}`` from torch's ``named_parameters()`` is routed as
    a nested tree. Everything else goes to the auxiliary AdamW: 0-d and 1-d leaves (biases, norms,
    gains, scalars), leaves whose other dimensions are all 1 (Haiku's ``(1, 1, 1, C)`` batch-norm
    gains, a ``(d, 1)`` column), and embeddings and heads, whatever their size. The references
    route by ``ndim >= 2`` (torch's Muon takes 2-D parameters only); pass a mask to send a
    ``(1, C)`` leaf to Muon.

    Args:
      params: the parameters (or gradients: only paths and shapes are read).

    Returns:
      A tree of booleans with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"embed": jnp.ones((10, 4)), "mlp": {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}}
      >>> adaopt.default_muon_mask(params)
      {'embed': False, 'mlp': {'b': False, 'w': True}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: matrix_axes(x) >= 2 and not _is_auxiliary_path(path) and not is_vector_path(path), params
    )


def _shape_scale(shape: tuple[int, ...], adjust_lr: AdjustLr | None) -> float:
    """The references' scaling of an orthogonalised matrix of ``shape`` (rows A, columns B: the last two axes)."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols)) if cols else 1.0
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def newton_schulz(
    x: jax.Array,
    coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    *,
    eps_mode: moments.EpsMode = "add",
    dtype: Any = None,
) -> jax.Array:
    r"""Orthogonalise each matrix of ``x`` (its last two axes) by the references' quintic Newton–Schulz iteration.

    .. math::
        X_0 = G / (\|G\|_F + \epsilon) \;\text{("add")} \;\text{or}\; G / \max(\|G\|_F, \epsilon)
        \;\text{("max")}, \qquad
        A = X_k X_k^\top, \quad X_{k+1} = a X_k + (b A + c A^2) X_k

    on the wide orientation of each matrix (a tall one is transposed and back), in ``dtype``
    (None: the compute dtype of ``x``, float32 or float64), with a zero matrix mapped to zero.
    Returned in that dtype. ``coefficients``: one :math:`(a, b, c)` for every iteration, or one
    per iteration (``steps`` of them).
    """
    base.check_integer("steps", steps, 0, 99)
    base.check_nonnegative("eps", eps)
    base.check_dtype("dtype", dtype)
    if jnp.ndim(x) < 2:
        raise base.HyperparameterError(
            f"newton_schulz orthogonalises matrices (the last two axes of x): x must have 2 or more dimensions, got "
            f"shape {jnp.shape(x)}."
        )
    schedule = _schedule(coefficients, steps)
    dtype = moments.compute_dtype(x.dtype) if dtype is None else jnp.dtype(dtype)
    # Products accumulate in float32 at least and are rounded to ``dtype`` once per product-and-sum,
    # as torch's addmm does in bfloat16; float32 and float64 at full precision (accelerators
    # default to bfloat16 passes).
    accumulate = jnp.dtype(jnp.float64) if dtype.itemsize >= 8 else jnp.dtype(jnp.float32)
    precision = None if dtype.itemsize < 4 else jax.lax.Precision.HIGHEST

    def matmul(u: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.matmul(u, v, precision=precision, preferred_element_type=accumulate)

    tall = x.shape[-2] > x.shape[-1]
    x = x.astype(dtype)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    wide = x.astype(accumulate)
    norm = jnp.sqrt(jnp.sum(wide * wide, axis=(-2, -1), keepdims=True)).astype(dtype)
    eps_value = moments.scalar(eps, dtype)
    denominator = moments.with_eps(norm, eps_value, eps_mode)
    x = moments.safe_divide(x, denominator).astype(dtype)
    for a, b, c in schedule:
        gram = matmul(x, jnp.swapaxes(x, -1, -2)).astype(dtype)
        gram_update = (b * gram.astype(accumulate) + c * matmul(gram, gram)).astype(dtype)
        x = (a * x.astype(accumulate) + matmul(gram_update, x)).astype(dtype)
    return jnp.swapaxes(x, -1, -2) if tall else x


def _on_whole_matrices(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``fn(x)`` on ``x`` gathered whole (:func:`adaopt._src.placement.whole`), with ``x``'s sharding back.

    Newton–Schulz multiplies the matrix by its transpose: over a sharded axis a sum of partial
    products would need a reduction per multiplication; one all-gather per leaf and step does instead.
    """
    return placement.sharded_like(fn(placement.whole(x)), x)


def _check_view(matrix_view: Any, *, per_leaf: bool = False) -> None:
    """A view: ``"batch"``, ``"flatten"`` or a :class:`MatrixAxes`; or (not ``per_leaf``) a function giving them."""
    if isinstance(matrix_view, MatrixAxes) or (callable(matrix_view) and not per_leaf):
        return
    if not (isinstance(matrix_view, str) and matrix_view in ("batch", "flatten")):
        what = "a leaf's view from the matrix_view function" if per_leaf else "matrix_view"
        raise base.HyperparameterError(
            f"{what} must be 'batch', 'flatten' or an adaopt.MatrixAxes"
            f"{'' if per_leaf else ', or a function of the parameters giving one a leaf'}, got {matrix_view!r}."
        )


def _views(matrix_view: ViewSpec, tree: Any) -> Any:
    """The view of each leaf of ``tree``: ``matrix_view`` itself, or the tree its function gives."""
    if isinstance(matrix_view, (MatrixAxes, str)):
        return jax.tree.map(lambda _: matrix_view, tree)
    views = matrix_view(tree)
    base.check_tree_match(tree, views, base.per_leaf_option("matrix_view"), subject="parameters", shapes=False)
    for view in jax.tree.leaves(views):
        _check_view(view, per_leaf=True)
    return views


def _as_matrices(view: MatrixView | MatrixAxes, shape: tuple[int, ...], where: str) -> tuple[Any, tuple[int, ...]]:
    """A leaf of ``shape`` as matrices: the permutation of its axes first (None: none) and the shape to reshape to,
    the matrices' rows and columns last."""
    if view == "batch":
        return None, shape
    if view == "flatten":
        return None, (shape[0], math.prod(shape[1:]))
    perm, n_out, n_in = view.permutation(len(shape), where)
    dims = [shape[a] for a in perm]
    batch = dims[: len(dims) - n_out - n_in]
    return perm, (*batch, math.prod(dims[len(batch) : len(batch) + n_out]), math.prod(dims[len(dims) - n_in :]))


def _check_muon(
    momentum: Any, nesterov: bool, ns_steps: Any, ns_coefficients: Any, eps: Any, eps_mode: Any, adjust_lr: Any,
    ns_dtype: Any, mu_dtype: Any,
) -> None:  # fmt: skip
    base.check_decay("momentum", momentum)
    base.check_nesterov(momentum, nesterov)
    base.check_integer("ns_steps", ns_steps, 0, 99)
    check_ns_coefficients(ns_coefficients, ns_steps)
    base.check_nonnegative("eps", eps)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    base.check_choice("adjust_lr", adjust_lr, ("original", "match_rms_adamw", None))
    base.check_dtype("ns_dtype", ns_dtype)
    moments.check_storage("mu_dtype", mu_dtype)


def _check_real(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_complex(leaf):
            raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype))


@base.check_flags
def scale_by_muon(
    momentum: Any = 0.95,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    eps: Any = 1e-7,
    eps_mode: moments.EpsMode = "add",
    adjust_lr: AdjustLr | None = "original",
    nesterov_form: NesterovForm = "lerp",
    matrix_view: ViewSpec = "batch",
    ns_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Orthogonalise the momentum of each matrix by Newton–Schulz, scaled by its shape: Muon's block.

    .. math::
        m_t &= \mu\, m_{t-1} + (1 - \mu)\, g_t \\
        G_t &= g_t + \mu (m_t - g_t) \;\text{(Nesterov, "lerp")}, \quad g_t + m_t \;\text{("add")}
        \quad\text{or}\quad m_t \\
        u_t &= s(A, B)\, \mathrm{NS}(G_t), \qquad
        s = \begin{cases}
            \sqrt{\max(1, A / B)} & \text{"original"} \\
            0.2 \sqrt{\max(A, B)} & \text{"match\_rms\_adamw"} \\
            1 & \text{None}
        \end{cases}

    with :func:`newton_schulz` as NS and :math:`A \times B` the matrix's shape (its last two axes).

    Every leaf must have two or more dimensions: by default a leaf of three or more is a batch of
    matrices over its leading axes (each orthogonalised, normalised and scaled by itself, as the
    author's package does for 3-d leaves; ``matrix_view`` chooses otherwise), or, with
    ``matrix_view="flatten"``, one matrix (its first axis
    by the product of the others, scaled by that matrix's shape: heavyball's view, which its
    ``MuonAdamW`` follows on 4-d kernels). The author's package (0.1.0) means that view for 4-d
    convolution kernels but cannot run one: it adds the flattened update to the 4-d parameter (a
    shape error), and takes the shape scale from the kernel's last two axes, not from
    (out, in·h·w). :func:`muon` routes the other leaves elsewhere.

    Args:
      momentum: :math:`\mu`, the decay of the momentum, in [0, 1).
      nesterov: orthogonalise the Nesterov look-ahead (the references' default) instead of
        :math:`m_t`.
      ns_steps: number of Newton–Schulz iterations, in [0, 99].
      ns_coefficients: the iteration's coefficients :math:`(a, b, c)`, or one triple per iteration
        (``ns_steps`` of them), e.g. :data:`HEAVYBALL_NS_COEFFICIENTS`.
      eps: :math:`\epsilon` of the normalisation, >= 0.
      eps_mode: ``"add"`` (:math:`\|G\|_F + \epsilon`: the author's package, optax) or ``"max"``
        (:math:`\max(\|G\|_F, \epsilon)`: ``torch.optim.Muon``).
      adjust_lr: the shape scaling :math:`s`: ``"original"`` (the author's package, torch's
        default), ``"match_rms_adamw"`` (Moonlight's consistent RMS: the update's RMS near
        AdamW's) or None.
      nesterov_form: the look-ahead: ``"lerp"``, :math:`g_t + \mu (m_t - g_t)` (the author's
        package, torch, optax), or ``"add"``, :math:`g_t + m_t` (heavyball's).
      matrix_view: how a leaf is matrices: ``"batch"`` (a leaf of three or more axes is a batch of
        matrices over its last two, rows its outputs: torch's ``(out, in)``), ``"flatten"`` (one
        matrix, its first axis by the rest), a :class:`MatrixAxes` (which axes are the layer's
        inputs and which its outputs: ``MatrixAxes(inputs=-2, outputs=-1)`` for Flax's and
        Haiku's ``(in, out)`` kernels, so that ``adjust_lr="original"`` scales by fan-out over
        fan-in as torch's layout does), or a function of the parameters (under :func:`muon`, of
        Muon's leaves, the others ``optax.MaskedNode``) returning a tree of these, one a leaf.
      ns_dtype: the dtype of the iteration; None: the compute dtype (float32, float64 for
        float64 parameters); ``jnp.bfloat16`` runs it as the reference packages do.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MuonState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_muon(ns_steps=25, ns_coefficients=(1.5, -0.5, 0.0), adjust_lr=None)
      >>> g = jnp.array([[3.0, 0.0], [0.0, 0.5]])
      >>> updates, _ = tx.update(g, tx.init(g))
      >>> updates.round(3)  # the cubic iteration converges to the orthogonal factor
      Array([[1., 0.],
             [0., 1.]], dtype=float32)

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
      https://kellerjordan.github.io/posts/muon/.
    """
    _check_muon(momentum, nesterov, ns_steps, ns_coefficients, eps, eps_mode, adjust_lr, ns_dtype, mu_dtype)
    base.check_choice("nesterov_form", nesterov_form, ("lerp", "add"))
    _check_view(matrix_view)
    coefficients = _schedule(ns_coefficients, ns_steps)

    def check_leaves(params: base.Params) -> None:
        _check_real(params)
        views = jax.tree.leaves(_views(matrix_view, params))
        for (path, leaf), view in zip(jax.tree_util.tree_leaves_with_path(params), views, strict=True):
            where = jax.tree_util.keystr(path) or "the root"
            if jnp.ndim(leaf) < 2:
                raise ValueError(
                    f"scale_by_muon orthogonalises matrices, but the leaf at {where} has shape {jnp.shape(leaf)}. Give "
                    "it leaves of two or more dimensions; adaopt.muon routes 0-d and 1-d leaves (and embeddings and "
                    "heads) to an auxiliary AdamW."
                )
            _as_matrices(view, jnp.shape(leaf), where)

    def orthogonalised(direction: jax.Array, g: jax.Array, view: MatrixView | MatrixAxes) -> jax.Array:
        perm, shape = _as_matrices(view, g.shape, "a leaf")

        def orthogonalise(x: jax.Array) -> jax.Array:
            y = x if perm is None else jnp.transpose(x, perm)
            ortho = newton_schulz(y.reshape(shape), coefficients, ns_steps, eps, eps_mode=eps_mode, dtype=ns_dtype)
            ortho = ortho.reshape(y.shape)
            return ortho if perm is None else jnp.transpose(ortho, tuple(int(a) for a in np.argsort(perm)))

        return _on_whole_matrices(orthogonalise, direction).astype(direction.dtype) * _shape_scale(shape, adjust_lr)

    return _momentum_transform(
        momentum, nesterov, nesterov_form, mu_dtype, orthogonalised, check_leaves,
        options=lambda tree: (_views(matrix_view, tree),),
    )  # fmt: skip


def _look_ahead(g: jax.Array, m: jax.Array, beta: jax.Array, nesterov: bool, form: NesterovForm) -> jax.Array:
    """The direction Muon orthogonalises: the new momentum, or Nesterov's look-ahead in ``form``."""
    if not nesterov:
        return m
    return g + beta * (m - g) if form == "lerp" else g + m


def _momentum_transform(
    momentum: Any,
    nesterov: bool,
    nesterov_form: NesterovForm,
    mu_dtype: Any,
    finish: Callable[..., jax.Array] | None = None,
    check_leaves: Callable[[base.Params], None] | None = None,
    options: Callable[[Updates], tuple[Any, ...]] = lambda _: (),
) -> optax.GradientTransformation:
    """Muon's momentum and look-ahead, each leaf's direction then through ``finish(direction, gradient, *option)``
    (:func:`scale_by_muon`'s orthogonalisation, ``options`` its trees of one value per leaf), or as it is: heavyball's
    Muon on its 0-d and 1-d leaves."""

    def init_fn(params: base.Params) -> MuonState:
        if check_leaves is not None:
            check_leaves(params)
        return MuonState(mu=moments.init_like(params, mu_dtype))

    def update_fn(updates: Updates, state: MuonState, params: base.Params | None = None) -> tuple[Updates, MuonState]:
        del params

        def leaf(g: jax.Array, m: jax.Array, *option: Any) -> tuple[jax.Array, jax.Array]:
            dtype, g_compute, (m_compute,) = moments.to_compute(g, m)
            beta = moments.scalar(momentum, dtype)
            m_new = moments.ema(g_compute, m_compute, beta)
            direction = _look_ahead(g_compute, m_new, beta, nesterov, nesterov_form)
            step = direction if finish is None else finish(direction, g, *option)
            return step.astype(g.dtype), moments.store(m_new, m)

        out = moments.leafwise(leaf, 2, updates, state.mu, options=options(updates))
        return out[0], MuonState(out[1])

    return optax.GradientTransformation(init_fn, update_fn)


def _labels(muon_mask: base.MaskOrFn | None, weight_decay_mask: base.MaskOrFn | None) -> Callable[[Any], Any]:
    """The partition's labels: "muon" or "adam", each "_decayed" or not (so each group's decay is a fixed number)."""

    def labels(tree: Any) -> Any:
        _check_real(tree)
        matrices = base.resolve_mask(muon_mask, tree, "muon_mask")
        matrices = default_muon_mask(tree) if matrices is None else matrices
        decayed = base.resolve_mask(weight_decay_mask, tree)
        decayed = jax.tree.map(lambda _: True, tree) if decayed is None else decayed
        return jax.tree.map(lambda m, d: ("muon" if m else "adam") + ("_decayed" if d else ""), matrices, decayed)

    return labels


@base.check_flags
def muon(
    learning_rate: ScalarOrSchedule = 0.02,
    momentum: Any = 0.95,
    weight_decay: Any = 0.0,
    *,
    adam_learning_rate: ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.95,
    adam_eps: Any = 1e-10,
    adam_weight_decay: Any = None,
    adam_eps_mode: moments.EpsMode = "add",
    aux: Literal["adamw", "momentum"] = "adamw",
    muon_mask: base.MaskOrFn | None = None,
    weight_decay_mask: base.MaskOrFn | None = None,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    eps: Any = 1e-7,
    eps_mode: moments.EpsMode = "add",
    adjust_lr: AdjustLr | None = "original",
    nesterov_form: NesterovForm = "lerp",
    matrix_view: ViewSpec = "batch",
    ns_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Muon for the hidden matrices, AdamW for every other leaf: a whole model's optimizer.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big)

    with :math:`u_t` from :func:`scale_by_muon` on the leaves that ``muon_mask`` selects (by
    default :func:`default_muon_mask`: leaves of two or more dimensions longer than 1 that are not
    embeddings or heads), and :math:`u_t` the Adam direction with ``adam_*`` hyperparameters (and
    :math:`\eta_t`, :math:`\lambda` the ``adam_learning_rate``, ``adam_weight_decay``) on the
    others: 0-d and 1-d leaves, embeddings and heads of any size. A leaf of three or more
    dimensions sent to Muon is a batch of matrices over its leading axes. The decay is
    decoupled and scaled by the learning rate, not by the shape scaling (as the references:
    :math:`\theta \leftarrow (1 - \eta\lambda)\theta` before the step).

    Args:
      learning_rate: :math:`\eta`, Muon's learning rate: a non-negative number or a schedule.
      momentum: Muon's momentum, in [0, 1).
      weight_decay: :math:`\lambda`, the decoupled weight decay, >= 0 (of every leaf, unless
        ``adam_weight_decay`` sets the auxiliary leaves' own).
      adam_learning_rate: the auxiliary AdamW's learning rate; None: ``learning_rate``.
      adam_b1: the auxiliary AdamW's first-moment decay, in [0, 1).
      adam_b2: the auxiliary AdamW's second-moment decay, in [0, 1).
      adam_eps: the auxiliary AdamW's eps (outside the root), >= 0.
      adam_weight_decay: the auxiliary leaves' decay, >= 0; None: ``weight_decay``.
      adam_eps_mode: the auxiliary AdamW's ``eps_mode`` (:func:`adaopt.adamw`).
      aux: what the leaves outside ``muon_mask`` take: ``"adamw"`` (the references') or
        ``"momentum"``, Muon's momentum and look-ahead without the orthogonalisation, at
        ``adam_learning_rate`` and ``adam_weight_decay`` (heavyball's ``Muon``; the other
        ``adam_*`` arguments are then unused).
      muon_mask: which leaves go to Muon: a tree of booleans with the parameters' structure,
        a function of the parameters returning one, or None for :func:`default_muon_mask`.
      weight_decay_mask: which leaves decay (a tree of booleans or a function of the
        parameters); None: all.
      nesterov: see :func:`scale_by_muon`.
      ns_steps: see :func:`scale_by_muon`.
      ns_coefficients: see :func:`scale_by_muon`.
      eps: see :func:`scale_by_muon`.
      eps_mode: see :func:`scale_by_muon`.
      adjust_lr: see :func:`scale_by_muon`.
      nesterov_form: see :func:`scale_by_muon`.
      matrix_view: see :func:`scale_by_muon`. Convolution kernels go to Muon by the default mask: give
        them the view of a layer, ``"flatten"`` for torch's ``(out, in, h, w)`` (heavyball's, and the
        author's intent), ``MatrixAxes(inputs=(0, 1, 2), outputs=3)`` for Flax's ``(h, w, in, out)``;
        the default ``"batch"`` orthogonalises each ``h x w`` filter (torch's layout) or each
        position's ``in x out`` matrix (Flax's) on its own.
      ns_dtype: see :func:`scale_by_muon`.
      mu_dtype: storage dtype of Muon's momentum and AdamW's first moment.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a pair: an empty state and an
      ``optax.PartitionState`` with groups ``"muon"``, ``"adam"`` (leaves out of ``weight_decay_mask``) and
      ``"muon_decayed"``, ``"adam_decayed"``; each group's state holds ``optax.MaskedNode()``
      in place of the leaves of the others. Complex parameters are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
      >>> opt = adaopt.muon(0.02, adam_learning_rate=3e-4)
      >>> grads = {"embed": jnp.ones((10, 4)), "w": jnp.eye(4), "b": jnp.ones(4)}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> round(float(updates["w"][0, 0]), 4), round(float(updates["b"][0]), 6)  # Muon, then AdamW
      (-0.0153, -0.0003)

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
      https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM
      Training", 2025, https://arxiv.org/abs/2502.16982 (``adjust_lr="match_rms_adamw"``).

      Reference packages: the author's ``muon.SingleDeviceMuonWithAuxAdam`` (muon-optimizer
      0.1.0: groups ``use_muon=True`` with ``lr, momentum, weight_decay`` and ``use_muon=False``
      with ``lr=adam_learning_rate, betas=(adam_b1, adam_b2), eps=adam_eps, weight_decay``) is
      this at the defaults, its auxiliary groups' ``lr`` given: the package's own default for it is
      3e-4, where ``adam_learning_rate=None`` here is ``learning_rate`` (as in optax's Muon), so
      pass ``adam_learning_rate=3e-4`` for the package's; ``torch.optim.Muon(lr, weight_decay, momentum, nesterov,
      ns_coefficients, eps, ns_steps, adjust_lr_fn)`` (2-d parameters only) is ``scale_by_muon``'s
      leaves with ``eps_mode="max"`` (its ``adjust_lr_fn=None`` means ``"original"``, which is
      ``adjust_lr="original"`` here; ``adjust_lr=None`` is no scaling). Both run Newton–Schulz in bfloat16: ``ns_dtype=jnp.bfloat16``
      follows them within bfloat16's precision, and the default follows them exactly once their
      iteration runs in float64. ``optax.contrib.muon`` differs: it debiases the momentum
      (:math:`m_t / (1 - \mu^t)`), adds eps = 1e-8, scales by :math:`\sqrt{\max(1, B/A)}` (fan-out
      over fan-in of a (in, out) kernel: the transpose of torch's (out, in) rule), sends every 2-d
      leaf (embeddings too) to Muon, and its AdamW's default betas are (0.9, 0.999); its
      Newton–Schulz iteration is this one's with ``eps_mode="add"``. heavyball's
      ``MuonAdamW(lr, betas=(b1, b2), weight_decay)`` (heavyball 3.2.1) is this with
      ``momentum=b1``, ``adam_b1=b1``, ``adam_b2=b2``, ``adam_eps=1e-8``, ``adam_eps_mode="max"``,
      ``eps_mode="max"``, ``nesterov_form="add"``, ``matrix_view="flatten"``,
      ``ns_coefficients=HEAVYBALL_NS_COEFFICIENTS`` and every leaf of two or more axes in
      ``muon_mask`` (embeddings and heads too); its ``Muon(lr, betas=(b1, _), weight_decay)`` is
      that with ``aux="momentum"``.
    """
    base.check_common(learning_rate, weight_decay)
    if adam_learning_rate is not None:
        base.check_learning_rate(adam_learning_rate, "adam_learning_rate")
    base.check_decay("adam_b1", adam_b1)
    base.check_decay("adam_b2", adam_b2)
    base.check_nonnegative("adam_eps", adam_eps)
    base.check_choice("adam_eps_mode", adam_eps_mode, ("add", "max"))
    base.check_choice("aux", aux, ("adamw", "momentum"))
    if adam_weight_decay is not None:
        base.check_nonnegative("adam_weight_decay", adam_weight_decay)
    base.check_mask(muon_mask, "muon_mask")
    base.check_mask(weight_decay_mask)
    core = scale_by_muon(
        momentum, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps,
        eps_mode=eps_mode, adjust_lr=adjust_lr, nesterov_form=nesterov_form, matrix_view=matrix_view,
        ns_dtype=ns_dtype, mu_dtype=mu_dtype,
    )  # fmt: skip
    aux_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    aux_decay = weight_decay if adam_weight_decay is None else adam_weight_decay

    def muon_group(decay: Any) -> optax.GradientTransformationExtraArgs:
        return base.assemble(core, learning_rate, decay, decoupled_weight_decay=True, complex_convention="modulus")

    def adam_group(decay: Any) -> optax.GradientTransformationExtraArgs:
        if aux == "momentum":
            plain = _momentum_transform(momentum, nesterov, nesterov_form, mu_dtype)
            return base.assemble(plain, aux_lr, decay, decoupled_weight_decay=True, complex_convention="modulus")
        return adam.adamw(
            aux_lr, adam_b1, adam_b2, adam_eps, weight_decay=decay, eps_mode=adam_eps_mode, mu_dtype=mu_dtype
        )

    groups = {
        "muon": muon_group(0.0),
        "muon_decayed": muon_group(weight_decay),
        "adam": adam_group(0.0),
        "adam_decayed": adam_group(aux_decay),
    }
    # The gradients are checked against the parameters before the labels are read from them.
    return optax.chain(base.check_gradient_tree(), optax.partition(groups, _labels(muon_mask, weight_decay_mask)))
