"""Adam-mini: Adam with one second moment per block of parameters (a head, an output neuron, a tensor).

A block's coordinates share one learning rate, the root of the moving average of their mean
squared gradient: the second moment shrinks from one number per parameter to one per block. The
blocks follow the model's structure, read from each leaf's path in the tree by a rule
(:func:`default_adam_mini_blocks`, the reference's rule on parameter names) that the user can
override, leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics, placement
from adaopt._src.base import ScalarOrSchedule, Updates


@dataclasses.dataclass(frozen=True)
class AxisBlocks:
    """Blocks of :func:`scale_by_adam_mini` along one axis of a leaf: one second moment per ``size`` consecutive indices.

    A leaf whose ``axis`` has length :math:`L` gets :math:`L / \\text{size}` second moments, each
    the mean over its ``size`` indices along ``axis`` and over every index of the other axes.
    ``AxisBlocks(0)`` is one per row (per output neuron of a torch ``Linear`` weight, of shape
    ``(out, in)``), ``AxisBlocks(-1)`` one per column (per output neuron of a Flax or Haiku
    kernel, ``(in, out)``), ``AxisBlocks(0, head_dim)`` one per attention head of a torch-layout
    query or key projection.

    Attributes:
      axis: the axis the blocks run along (negative counts from the end).
      size: the number of consecutive indices along ``axis`` in one block, >= 1; must divide
        the axis's length.
    """

    axis: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        base.check_integer("AxisBlocks.axis", self.axis, -base.INT32_MAX)
        base.check_integer("AxisBlocks.size", self.size, 1)


Blocks: TypeAlias = Any
"""How one leaf is split into blocks: ``"coordinate"`` (one second moment per coordinate, Adam's),
``"tensor"`` (one for the whole leaf) or an :class:`AxisBlocks`."""

BlockRule: TypeAlias = Any
"""``blocks`` of :func:`adam_mini`: None (:func:`default_adam_mini_blocks`), a mapping from name
patterns to :data:`Blocks`, or a function ``(name, leaf) -> Blocks | None``."""

_KINDS = ("coordinate", "tensor")

# The reference's lists of name substrings (adam-mini 1.1.1), compared with the lowercased path.
_EMBEDDING = ("embed", "embd", "wte")
_OUTPUT = ("lm_head", "output", "final_layer")
_QUERY_KEY = ("k_proj", "q_proj", "wq", "wk", "query", "key")
_VALUE = ("v_proj", "wv", "value")
_ATTENTION_OUT = ("o_proj", "wo", "attn.proj")
_MLP = ("feed_forward", "linear", "mlp")
_PLAIN_ADAM = ("bias",)
_NO_DECAY = ("norm", "ln", "bias")


class AdamMiniState(NamedTuple):
    """State of :func:`scale_by_adam_mini`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the first moment :math:`m_t`, mirroring the parameters.
      nu: the second moments :math:`v_t`, one per block, in a tree of the parameters' structure:
        a 0-d array for a ``"tensor"`` leaf, the parameter's shape for a ``"coordinate"`` one,
        and for ``AxisBlocks(axis, size)`` a vector of one entry per block (the length of
        ``axis`` over ``size``: with ``size=1``, the parameter's shape with the other axes removed).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates


def _path_name(path: tuple[Any, ...]) -> str:
    """A leaf's path as the dotted name the rules read: ``{"layers": [{"q_proj": {"weight": w}}]}`` gives
    ``"layers.0.q_proj.weight"``, torch's ``named_parameters`` name for the same module tree (a Flax box's ``.value``
    left out: linen's ``nn.Partitioned`` kernel of ``Dense_0`` is ``"Dense_0.kernel"``, no value projection)."""
    return numerics.path_string(path, ".")


def _has_any(name: str, substrings: tuple[str, ...]) -> bool:
    return any(s in name for s in substrings)


def _is_bias(name: str) -> bool:
    """The reference's ``"bias"`` substring, or Haiku's name of a bias, ``"b"``, as a module's parameter (a leaf
    named ``"b"`` at the root is the reference's: one block)."""
    return _has_any(name, _PLAIN_ADAM) or name.endswith(".b")


def _default_blocks(name: str, leaf: Any, dim: int | None, n_heads: int | None, output_axis: int) -> Blocks:
    """The default rule for one leaf; ``name`` is lowercased."""
    if _is_bias(name):
        return "coordinate"
    if jnp.ndim(leaf) != 2:
        return "tensor"
    if _has_any(name, _QUERY_KEY):
        if dim is None or n_heads is None:
            raise ValueError(
                f"Adam-mini's default rule gives the query or key projection {name!r} one second moment per "
                "attention head, which needs the head size: pass dim (the model's width) and n_heads, or give "
                f"this leaf a rule of its own in blocks (e.g. {{'{name}': 'tensor'}})."
            )
        return AxisBlocks(output_axis, dim // n_heads)
    if _has_any(name, _EMBEDDING):
        return AxisBlocks(0)
    if _has_any(name, _OUTPUT + _VALUE + _ATTENTION_OUT + _MLP):
        return AxisBlocks(output_axis)
    return "tensor"


def default_adam_mini_blocks(
    params: base.Params, *, dim: int | None = None, n_heads: int | None = None, output_axis: int = 0
) -> Any:
    """The default rule of :func:`adam_mini`: how each leaf is split into blocks, from its path and shape.

    Each leaf's path is read as a dotted, lowercased name (``{"layers": [{"q_proj": {"weight": w}}]}``
    gives ``"layers.0.q_proj.weight"``, torch's name for the same module tree; a Flax box's ``value`` attribute is
    left out) and matched against the reference's substrings, in this order:

    1. ``"bias"`` (and Haiku's ``"b"``, a module's parameter): ``"coordinate"``, plain Adam. (The reference reads
       ``"bias"`` alone: for a torch module whose parameter ``b`` is no bias, pass ``blocks={".b": "tensor"}``.)
    2. A leaf that is not a matrix (0-d, 1-d: norms' gains, scalars; 3-d and more):
       ``"tensor"``, one second moment for the leaf.
    3. Queries and keys (``"q_proj"``, ``"k_proj"``, ``"wq"``, ``"wk"``, ``"query"``,
       ``"key"``): one per attention head, ``AxisBlocks(output_axis, dim // n_heads)``; keys of
       grouped-query attention (``n_kv_heads * head_dim`` outputs) get ``n_kv_heads`` blocks.
    4. Embeddings (``"embed"``, ``"embd"``, ``"wte"``): one per token, ``AxisBlocks(0)``
       (every framework stores an embedding as ``(vocab, features)``).
    5. Outputs (``"lm_head"``, ``"output"``, ``"final_layer"``), values (``"v_proj"``,
       ``"wv"``, ``"value"``), attention projections (``"o_proj"``, ``"wo"``,
       ``"attn.proj"``) and MLPs (``"feed_forward"``, ``"linear"``, ``"mlp"``): one per output
       neuron, ``AxisBlocks(output_axis)``.
    6. Any other matrix: ``"tensor"``.

    ``output_axis`` is 0 for the ``(out, in)`` layout of torch and Equinox (the reference's rows),
    -1 for the ``(in, out)`` kernels of Flax and Haiku. On a tree without these names every leaf
    is one block, or plain Adam for a ``"bias"``. Where the reference's rule is defined (the
    matrices of a torch model, whose query and key projections take ``dim`` inputs), this is it;
    it crashes on a 1-d leaf whose name asks for rows, and averages a 3-d one over its second axis
    only. Attention kernels of three dimensions (Flax's ``MultiHeadAttention``: ``(features,
    heads, head_dim)``) are one block each here: give them ``AxisBlocks(1)`` (one per head) in
    :func:`adam_mini`'s ``blocks``.

    Args:
      params: the parameters (or gradients: only paths and shapes are read).
      dim: the model's width, needed (with ``n_heads``) when a query or key matrix is found.
      n_heads: the number of attention heads; the head size is ``dim // n_heads``.
      output_axis: the axis of a weight matrix that indexes its output neurons.

    Returns:
      A tree of the structure of ``params`` holding each leaf's blocks: ``"coordinate"``,
      ``"tensor"`` or an :class:`AxisBlocks`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"embed": jnp.ones((10, 4)), "q_proj": {"weight": jnp.ones((4, 4)), "bias": jnp.ones(4)},
      ...           "norm": jnp.ones(4), "mlp": jnp.ones((8, 4))}
      >>> blocks = adaopt.default_adam_mini_blocks(params, dim=4, n_heads=2)
      >>> blocks["embed"], blocks["q_proj"]["weight"], blocks["q_proj"]["bias"], blocks["norm"]
      (AxisBlocks(axis=0, size=1), AxisBlocks(axis=0, size=2), 'coordinate', 'tensor')
    """
    _check_heads(dim, n_heads)
    base.check_integer("output_axis", output_axis, -base.INT32_MAX)
    values, _ = numerics.unwrap_variables(params, "params")
    return jax.tree_util.tree_map_with_path(_rule(None, dim, n_heads, output_axis), values)


def adam_mini_decay_mask(params: base.Params) -> Any:
    """The reference's choice of the leaves to decay: all but those whose name holds ``"norm"``, ``"ln"`` or ``"bias"``
    (or that are Haiku's ``"b"``, a module's parameter).

    Names as in :func:`default_adam_mini_blocks` (dotted, lowercased). Pass it as
    ``weight_decay_mask`` to :func:`adam_mini` to decay as ``adam_mini.Adam_mini`` does.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> params = {"ln_f": {"weight": jnp.ones(4)}, "mlp": {"weight": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
      >>> adaopt.adam_mini_decay_mask(params)
      {'ln_f': {'weight': False}, 'mlp': {'bias': False, 'weight': True}}
    """
    values, rewrap = numerics.unwrap_variables(params, "params")
    return rewrap(
        jax.tree_util.tree_map_with_path(
            lambda path, _: not (_has_any(name := _path_name(path).lower(), _NO_DECAY) or _is_bias(name)), values
        )
    )


def _check_heads(dim: Any, n_heads: Any) -> None:
    if (dim is None) != (n_heads is None):
        raise base.HyperparameterError(
            f"dim and n_heads go together (the head size is dim // n_heads): got dim={dim!r}, n_heads={n_heads!r}."
        )
    if dim is None:
        return
    base.check_integer("dim", dim, 1)
    base.check_integer("n_heads", n_heads, 1)
    if dim % n_heads:
        raise base.HyperparameterError(
            f"n_heads must divide dim (the head size is dim // n_heads): got dim={dim!r}, n_heads={n_heads!r}."
        )


def _check_blocks_value(value: Any, where: str) -> None:
    if not (isinstance(value, AxisBlocks) or (isinstance(value, str) and value in _KINDS)):
        raise base.HyperparameterError(
            f"{where} must be 'coordinate', 'tensor' or an adaopt.AxisBlocks, got {value!r}."
        )


def _check_rule(blocks: Any) -> None:
    if blocks is None or callable(blocks):
        return
    if not isinstance(blocks, Mapping):
        raise base.HyperparameterError(
            "blocks must be None (adaopt.default_adam_mini_blocks), a mapping from name patterns to blocks, or a "
            f"function (name, leaf) -> blocks; got {blocks!r}."
        )
    for pattern, value in blocks.items():
        if not isinstance(pattern, str):
            raise base.HyperparameterError(f"blocks' patterns must be strings, got {pattern!r}.")
        _check_blocks_value(value, f"blocks[{pattern!r}]")


def _rule(blocks: BlockRule, dim: int | None, n_heads: int | None, output_axis: int) -> Callable[[Any, Any], Blocks]:
    """``(path, leaf) -> blocks``: the user's patterns or function first, the default rule for the rest."""

    def rule(path: tuple[Any, ...], leaf: Any) -> Blocks:
        name = _path_name(path)
        chosen = None
        if isinstance(blocks, Mapping):
            chosen = next((v for k, v in blocks.items() if k.lower() in name.lower()), None)
        elif blocks is not None:
            chosen = blocks(name, leaf)
            if chosen is not None:
                _check_blocks_value(chosen, f"blocks({name!r}, leaf)")
        if chosen is None:
            chosen = _default_blocks(name.lower(), leaf, dim, n_heads, output_axis)
        _check_fits(chosen, name, jnp.shape(leaf))
        return chosen

    return rule


def _leaf_blocks(rule: Callable[[Any, Any], Blocks], tree: Any) -> list[Blocks]:
    """Each leaf's blocks, in ``jax.tree.leaves`` order, named by the paths of the tree's values (a Flax NNX
    variable's path is its attribute's, without the variable's own ``value`` key)."""
    values, _ = numerics.unwrap_variables(tree)
    return [rule(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(values)]


def _check_fits(blocks: Blocks, name: str, shape: tuple[int, ...]) -> None:
    if not isinstance(blocks, AxisBlocks):
        return
    where = f"Adam-mini's blocks {blocks} for the leaf {name or 'at the root'} of shape {shape}"
    if not -len(shape) <= blocks.axis < len(shape):
        raise ValueError(f"{where}: the leaf has no axis {blocks.axis}. Give it a rule of its own in blocks.")
    if shape[blocks.axis] % blocks.size:
        raise ValueError(
            f"{where}: the axis's length {shape[blocks.axis]} is not a multiple of the block size {blocks.size}. "
            "Check dim and n_heads, or give it a rule of its own in blocks."
        )


def _block_mean(x: jax.Array, blocks: Blocks) -> jax.Array:
    """The mean of ``x`` over each block, shaped as the state's second moment (see :class:`AdamMiniState`)."""
    if blocks == "coordinate":
        return x
    if blocks == "tensor":
        return jnp.sum(x) / max(x.size, 1)
    axis = blocks.axis % x.ndim
    n_blocks = x.shape[axis] // blocks.size
    split = x.reshape((*x.shape[:axis], n_blocks, blocks.size, *x.shape[axis + 1 :]))
    total = jnp.sum(split, axis=tuple(a for a in range(split.ndim) if a != axis))
    return total / max(x.size // max(n_blocks, 1), 1)


def _times_blocks(x: jax.Array, scale: jax.Array, blocks: Blocks) -> jax.Array:
    """``x`` times each block's ``scale`` (a statistic of the second moment's shape) over the block's coordinates."""
    if not isinstance(blocks, AxisBlocks):
        return moments.times(x, scale)
    axis = blocks.axis % x.ndim
    n_blocks = x.shape[axis] // blocks.size
    # Split the axis into (block, index in block) rather than repeat the statistic: a reshape keeps a sharded
    # axis sharded, where jnp.repeat needs an output sharding under explicit mesh axes.
    split = x.reshape((*x.shape[:axis], n_blocks, blocks.size, *x.shape[axis + 1 :]))
    shape = tuple(n_blocks if a == axis else 1 for a in range(split.ndim))
    return moments.times(split, scale.reshape(shape)).reshape(x.shape)


def _block_template(p: Any, blocks: Blocks) -> jax.Array:
    """Zeros of the block statistic's shape, in ``p``'s real dtype, with the sharding a reduction of ``p`` has."""
    return placement.zeros(jax.eval_shape(lambda q: _block_mean(moments.abs_sq(q), blocks), p), p)


def scale_by_adam_mini(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    blocks: base.MaskOrFn | None = None,
    dim: int | None = None,
    n_heads: int | None = None,
    output_axis: int = 0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam-mini's block: Adam's first moment over the root of one second moment per block.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_{t,B} &= \beta_2 v_{t-1,B} + (1 - \beta_2) \frac{1}{|B|} \sum_{i \in B} g_{t,i}^2 \\
        u_{t,i} &= \frac{m_{t,i} / (1 - \beta_1^t)}{\sqrt{v_{t,B(i)} / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}

    where :math:`B(i)` is the block of coordinate :math:`i`. A leaf's blocks come from the rule:
    ``"coordinate"`` (every coordinate its own block: Adam), ``"tensor"`` (one block), or an
    :class:`AxisBlocks` (one block per ``size`` consecutive indices along an axis). For a
    complex coordinate the square is :math:`|g|^2`.

    Args:
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moments, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      blocks: the rule that splits each leaf into blocks. None: :func:`default_adam_mini_blocks`
        (with ``dim``, ``n_heads``, ``output_axis``). A mapping from name patterns to blocks
        (``{"q_proj": adaopt.AxisBlocks(-1, 64), "router": "coordinate"}``): a leaf whose dotted
        path (see :func:`default_adam_mini_blocks`) contains a pattern, compared in lower case, takes the first such
        pattern's blocks, the others the default rule's. A function ``(name, leaf) -> blocks``
        (the dotted path as it is, and the leaf, of which only the shape is read): None hands the
        leaf to the default rule.
      dim: the model's width, for the default rule's heads (with ``n_heads``).
      n_heads: the number of attention heads, for the default rule: the head size is
        ``dim // n_heads``.
      output_axis: the axis of a weight matrix that indexes its output neurons, for the default
        rule: 0 for torch's and Equinox's ``(out, in)`` layout, -1 for Flax's and Haiku's ``(in, out)``.
      mu_dtype: storage of the first moment (default: the parameter's dtype, at least float32).
      nu_dtype: storage of the second moments (default: the parameter's dtype, at least float32);
        a blockwise storage quantizes only those of at least its ``min_size`` entries.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdamMiniState`. A leaf whose blocks
      do not fit it (an axis it lacks, a length the block size does not divide) is an error at
      ``init``, naming the leaf.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adam_mini(blocks={"w": adaopt.AxisBlocks(0)})
      >>> g = {"w": jnp.array([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])}
      >>> updates, state = tx.update(g, tx.init(g))
      >>> state.nu["w"].shape  # one second moment per row
      (2,)
      >>> updates["w"].round(4)  # the first step: g over the RMS of its row (both 1), where Adam's is sign(g)
      Array([[ 1., -1.,  1., -1.],
             [ 2.,  0.,  0.,  0.]], dtype=float32)

    References:
      Zhang, Chen, Li, Zhang, Ye, Ding, Luo & Sun, "Adam-mini: Use Fewer Learning Rates To Gain
      More", ICLR 2025, https://arxiv.org/abs/2406.16793.

      Reference packages: :func:`adam_mini` gives the arguments that reproduce ``adam_mini.Adam_mini``.
    """
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_root", eps_root)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)
    _check_rule(blocks)
    _check_heads(dim, n_heads)
    base.check_integer("output_axis", output_axis, -base.INT32_MAX)
    rule = _rule(blocks, dim, n_heads, output_axis)

    def init_fn(params: base.Params) -> AdamMiniState:
        leaves, treedef = jax.tree.flatten(params)
        blocks_of = zip(leaves, _leaf_blocks(rule, params), strict=True)
        templates = jax.tree.unflatten(treedef, [_block_template(p, b) for p, b in blocks_of])
        return AdamMiniState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(templates, nu_dtype, real=True),
        )

    def update_fn(
        updates: Updates, state: AdamMiniState, params: base.Params | None = None
    ) -> tuple[Updates, AdamMiniState]:
        del params
        base.check_tree_match(updates, state.mu, "state")
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: a method the stubs lack
        named = jax.tree_util.tree_leaves_with_path(updates)
        leaf_blocks = _leaf_blocks(rule, updates)
        for (path, g), b, v in zip(named, leaf_blocks, treedef.flatten_up_to(state.nu), strict=True):
            expected = jax.eval_shape(functools.partial(_block_mean, blocks=b), g).shape
            if tuple(v.shape) != expected:
                raise base.TreeMismatchError(
                    f"Adam-mini's second moment for the leaf {_path_name(path) or 'at the root'} has shape "
                    f"{tuple(v.shape)}, but its blocks {b!r} need {expected}: the state was built by init with another "
                    "rule (blocks, dim, n_heads, output_axis) or for other parameters. Build the state with this "
                    "optimizer's init."
                )
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                moments.debias(b1, count, dtype),
                moments.debias(b2, count, dtype),
                moments.scalar(eps, dtype),
                moments.scalar(eps_root, dtype),
            )

        def leaf(g: jax.Array, m: Any, v: jax.Array, b: Blocks) -> tuple[Any, ...]:
            dtype, g_compute, (m_compute, v_compute) = moments.to_compute(g, m, v)
            beta1, beta2, debias1, debias2, e, e_root = scalars(dtype)
            m_new = moments.ema(g_compute, m_compute, beta1)
            v_new = moments.ema(_block_mean(moments.abs_sq(g_compute), b), v_compute, beta2)
            step = _times_blocks(moments.times(m_new, debias1), moments.inv_root(v_new * debias2, e, e_root), b)
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v)

        step, mu, nu = moments.leafwise(
            leaf, 3, updates, state.mu, state.nu, options=(jax.tree.unflatten(treedef, leaf_blocks),), shapes=False
        )
        return step, AdamMiniState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_mini(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    blocks: base.MaskOrFn | None = None,
    dim: int | None = None,
    n_heads: int | None = None,
    output_axis: int = 0,
    weight_decay_mask: base.MaskOrFn | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Adam-mini: AdamW with one second moment per block of parameters (per head, per output neuron, per tensor).

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big)

    with :math:`u_t` the update of :func:`scale_by_adam_mini`: Adam's, with the second moment of
    each block the moving average of its coordinates' mean squared gradient. The blocks of each
    leaf follow its path in the tree (:func:`default_adam_mini_blocks`: one per head for queries
    and keys, per token for embeddings, per output neuron for values, attention outputs, MLPs
    and the output layer, per tensor for norms and other leaves, plain Adam for biases), which
    ``blocks`` overrides.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moments, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient :math:`\lambda` of the decoupled weight decay, >= 0.
      blocks: the rule that splits each leaf into blocks; see :func:`scale_by_adam_mini`.
      dim: the model's width, for the default rule's heads (with ``n_heads``).
      n_heads: the number of attention heads (the head size is ``dim // n_heads``).
      output_axis: the axis of a weight matrix that indexes its output neurons: 0 (torch,
        Equinox) or -1 (Flax, Haiku kernels).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay; None: all (:func:`adam_mini_decay_mask` is the
        reference's choice).
      mu_dtype: storage of the first moment (default: the parameter's dtype, at least float32).
      nu_dtype: storage of the second moments (default: the parameter's dtype, at least float32);
        a blockwise storage quantizes only those of at least its ``min_size`` entries.
      complex_convention: for complex parameters, ``"modulus"`` (:math:`|g|^2` per complex
        coordinate) or ``"real_imag"`` (the real and imaginary parts as two real coordinates, a
        trailing axis of 2 that the rule sees); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adaopt
      >>> params = {"mlp": {"weight": jnp.ones((3, 2)), "bias": jnp.zeros(3)}, "norm": jnp.ones(2)}
      >>> opt = adaopt.adam_mini(1e-3)
      >>> state = opt.init(params)
      >>> jax.tree.map(jnp.shape, optax.tree.get(state, "nu"))  # per output neuron, per coordinate, per tensor
      {'mlp': {'bias': (3,), 'weight': (3,)}, 'norm': ()}

    References:
      Zhang, Chen, Li, Zhang, Ye, Ding, Luo & Sun, "Adam-mini: Use Fewer Learning Rates To Gain
      More", ICLR 2025, https://arxiv.org/abs/2406.16793.

      Reference packages: ``adam_mini.Adam_mini(model.named_parameters(), lr, betas=(b1, b2), eps,
      weight_decay, dim=dim, n_heads=n_heads)`` (the authors', 1.1.1) is this with the same
      numbers, ``weight_decay_mask=adaopt.adam_mini_decay_mask`` and the parameters in torch's
      layout and names (a tree of dicts keyed by the module names), run on one device (its
      ``n_kv_heads`` only checks that it divides ``n_heads``: the head size sets the blocks).
      Its rule differs where it is not defined, for leaves of three or more dimensions (see
      :func:`default_adam_mini_blocks`).
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adam_mini(
        b1, b2, eps, eps_root, blocks=blocks, dim=dim, n_heads=n_heads, output_axis=output_axis,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=True,
        complex_convention=complex_convention,
    )


__all__ = [
    "AdamMiniState",
    "AxisBlocks",
    "adam_mini",
    "adam_mini_decay_mask",
    "default_adam_mini_blocks",
    "scale_by_adam_mini",
]
