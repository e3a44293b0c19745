"""The shared math of every optimizer: moments, bias correction, safe roots and dtypes.

An algorithm module composes these; it never re-writes an EMA or a bias correction. Each
optimizer's per-leaf step is a function of arrays run by :func:`leafwise`, which checks the
gradient tree against the state, upcasts half precision to float32 for the arithmetic, and
keeps the update in the gradient's dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import optax

from adaopt._src import placement, storage
from adaopt._src.base import (
    PER_LEAF_OPTIONS,
    HyperparameterError,
    check_dtype,
    check_floating,
    check_tree_match,
    is_masked_node,
)
from adaopt._src.complex_params import is_complex

safe_increment = optax.safe_increment
"""Add one to an int32 step count, saturating at its maximum instead of overflowing."""


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The real dtype the arithmetic runs in: float64 if any of ``dtypes`` has 8-byte components, else float32.

    Chosen by the width of a real component (a complex64 is two float32s), not by promotion,
    so it holds under strict dtype promotion. A complex array computes in the complex dtype of
    this precision (:func:`in_precision`); scalars (bias corrections, step sizes) stay real.
    """
    widest = max((_component_bytes(d) for d in dtypes), default=4)
    return jnp.dtype(jnp.float64 if widest >= 8 else jnp.float32)


def _component_bytes(dtype: Any) -> int:
    d = jnp.dtype(dtype)
    return d.itemsize // 2 if jnp.issubdtype(d, jnp.complexfloating) else d.itemsize


def complex_of(dtype: Any) -> jnp.dtype:
    """The complex dtype whose components are ``dtype`` (float32 -> complex64, float64 -> complex128)."""
    return jnp.dtype(jnp.complex128 if _component_bytes(dtype) >= 8 else jnp.complex64)


def in_precision(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` cast to the real ``dtype``, or to its complex counterpart if ``x`` is complex (never a silent real cast)."""
    return x.astype(complex_of(dtype) if is_complex(x) else dtype)


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2``, real: ``x * x`` for a real array, ``re^2 + im^2`` for a complex one."""
    if is_complex(x):
        return jnp.real(x) * jnp.real(x) + jnp.imag(x) * jnp.imag(x)
    return x * x


def state_dtype(param_dtype: Any, requested: Any = None, *, real: bool = False) -> jnp.dtype:
    """A moment's storage dtype: ``requested`` if given, else the parameter's, at least float32.

    Half-precision parameters keep float32 moments by default: a float16 second moment
    underflows for gradients under 2.4e-4, and the step it divides would blow up. A complex
    parameter's moment is complex (of the requested precision) unless it is ``real`` (a second
    moment of ``|g|^2``, a running maximum).
    """
    dtype = compute_dtype(param_dtype) if requested is None else jnp.dtype(requested)
    if not is_complex(param_dtype) or real:
        return dtype
    if jnp.dtype(dtype).itemsize < 4:
        raise ValueError(
            f"A complex parameter's moment cannot be stored in {jnp.dtype(dtype).name}: there is no complex dtype of "
            "that precision. Pass float32 or float64 (stored as complex64 or complex128), or None."
        )
    return complex_of(dtype)


def check_storage(name: str, spec: Any, *, squares: bool | None = None) -> None:
    """A moment's ``*_dtype`` argument: None, a floating dtype of at least 16 bits, or a storage (:func:`init_like`).
    A state of squared gradients (``squares``; by default ``nu_dtype``'s) cannot be float16 (:func:`state_dtype`)."""
    if storage.resolve(spec) is not None:
        return
    try:
        check_dtype(name, spec, squares=name == "nu_dtype" if squares is None else squares)
    except HyperparameterError as error:
        raise HyperparameterError(
            f"{error} It may also name a storage: {', '.join(map(repr, storage.ALIASES))}, or be an "
            "adaopt.Blockwise or adaopt.StochasticBf16."
        ) from None


def check_statistics_dtype(name: str, dtype: Any) -> None:
    """The dtype of a factored optimizer's statistics of squared gradients (Adafactor's and CAME's row and column
    means, SM3's accumulators of its covers): a float of at least bfloat16's range, or None; no storage."""
    if storage.resolve(dtype) is not None:
        raise HyperparameterError(
            f"{name}={dtype!r}: the factored statistics (a matrix's row and column statistics, a small leaf's "
            "whole one) are few, and stay floats: pass bfloat16, float32 or None. The momentum, mu_dtype, takes "
            "any storage."
        )
    check_dtype(name, dtype, squares=True)


def scalar_dtype(params: Any) -> jnp.dtype:
    """The dtype of a state's scalars (step-size estimates, products): the parameters' widest float, at least float32."""
    check_floating(params)
    return compute_dtype(*(jnp.result_type(p) for p in jax.tree.leaves(params)))


def init_like(params: Any, dtype: Any = None, fill: Any = 0.0, *, real: bool = False, moment: int = 0) -> Any:
    """A moment tree mirroring ``params``, filled with ``fill``, in :func:`state_dtype` (``real`` passes through).

    ``dtype`` may also name a storage (``"int8"``, ``"int4"``, ``"fp8"``, ``"bfloat16_sr"``) or be
    one (:class:`adaopt.Blockwise`, :class:`adaopt.StochasticBf16`): each leaf is then stored by it,
    with the unsigned map for a ``real`` moment (a second moment of ``|g|^2``, a running maximum:
    never negative) and the signed map otherwise. An optimizer with two moments of one kind gives each
    its own ``moment`` (0, 1, ...), so that stochastic rounding draws their bits apart; a leaf's index
    is its position in the whole tree, another group's leaves (``optax.MaskedNode``) counted.
    """
    check_floating(params)
    kind = storage.resolve(dtype)
    if kind is not None:
        # The stored leaves stand where the parameters' values stand, outside any Flax NNX variable: an
        # nnx.Optimizer wraps their arrays one by one, where a variable holding a whole stored leaf came back
        # from its update as a dict of its fields.
        from adaopt._src import numerics  # here: numerics imports this module

        values, _ = numerics.unwrap_variables(params, "params")
        leaves, treedef = jax.tree.flatten(values, is_leaf=is_masked_node)
        stored = [
            p if is_masked_node(p) else _init_stored(kind, p, fill, signed=not real, index=i, moment=moment)
            for i, p in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, stored)
    # full_like keeps each parameter's sharding (and Flax metadata) on its moments.
    return jax.tree.map(
        lambda p: jnp.full_like(p, fill, dtype=state_dtype(jnp.result_type(p), dtype, real=real)), params
    )


def _init_stored(kind: storage.Storage, p: Any, fill: Any, *, signed: bool, index: int, moment: int) -> Any:
    leaf = kind.init(p, signed=signed, index=index, moment=moment)
    is_zero = isinstance(fill, (int, float)) and fill == 0
    # full_like: the value to encode keeps the parameter's sharding, as the encoded leaf does.
    return leaf if is_zero else store(jnp.full_like(p, fill, dtype=jnp.float32), leaf)


def load(x: Any, dtype: Any = None) -> jax.Array:
    """A moment leaf's values: the array itself, or the values a storage holds (in ``dtype``, default float32)."""
    if storage.is_stored(x):
        return x.load(jnp.float32 if dtype is None else dtype)
    return x


def store(value: jax.Array, like: Any) -> Any:
    """``value`` as the next value of the moment leaf ``like``: through its storage, or cast to its dtype."""
    if storage.is_stored(like):
        return like.storage.encode(value, like)
    return value.astype(like.dtype)


def init_copy(params: Any, dtype: Any = None, *, keep_dtype: bool = False) -> Any:
    """A copy of ``params`` for the state (an initial point, a running average), each leaf in :func:`state_dtype`.

    With ``keep_dtype``, each leaf stays in its parameter's own dtype: a reference point that is
    only read back (an initial point, the origin of bets) is exact there, and a wider copy of a
    half-precision parameter would only cost memory. A copy, so that donating the parameters'
    and the state's buffers together is safe; each leaf keeps its parameter's sharding (and Flax
    metadata), like :func:`init_like`.
    """
    if keep_dtype:
        return jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return jax.tree.map(lambda z, p: z + p.astype(z.dtype), init_like(params, dtype), params)


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def scalar(x: Any, dtype: Any) -> Any:
    """A hyperparameter in the arithmetic's dtype: Python numbers stay weakly typed."""
    if isinstance(x, (int, float)):
        return x
    return jnp.asarray(x).astype(dtype)


T = TypeVar("T")


def per_dtype(fn: Callable[[jnp.dtype], T]) -> Callable[[jnp.dtype], T]:
    """``fn(dtype)``, computed once per compute dtype and shared by every leaf of that dtype.

    For the scalars of a step (hyperparameters cast to the compute dtype, bias corrections):
    computed inside the per-leaf function they are traced once per leaf, and a tree of a
    thousand leaves then traces, lowers and compiles thousands of copies of the same scalar
    arithmetic. Wrap the function inside ``update`` (the cache must not outlive one trace).
    """
    return functools.cache(fn)


def real_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Re(conj(a) * b)`` elementwise: ``a * b`` for real arrays, the real inner product of two complex numbers."""
    if is_complex(a) or is_complex(b):
        return jnp.real(a) * jnp.real(b) + jnp.imag(a) * jnp.imag(b)
    return a * b


def times(x: jax.Array, factor: Any) -> jax.Array:
    """``x * factor`` for a real ``factor`` (a number or an array), ``x`` real or complex.

    A complex ``x`` is scaled part by part, so the product needs no complex multiplication and
    no implicit promotion of the real factor (which strict dtype promotion refuses).
    """
    if isinstance(factor, (int, float)) or not is_complex(x):
        return x * factor
    return jax.lax.complex(jnp.real(x) * factor, jnp.imag(x) * factor)


def over(x: jax.Array, divisor: Any) -> jax.Array:
    """``x / divisor`` for a real ``divisor``, ``x`` real or complex (part by part, as :func:`times`)."""
    if isinstance(divisor, (int, float)) or not is_complex(x):
        return x / divisor
    return jax.lax.complex(jnp.real(x) / divisor, jnp.imag(x) / divisor)


def over_nonzero(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """:func:`over`, with 0 where ``divisor`` is 0: ``sqrt(v) + eps`` when ``v`` is 0 and ``eps`` (times a small
    estimate) is below the dtype's smallest normal number, so 0 there."""
    nonzero = divisor != 0
    return jnp.where(nonzero, over(x, jnp.where(nonzero, divisor, 1)), 0)


def ema(new: jax.Array, old: jax.Array, decay: Any) -> jax.Array:
    """Exponential moving average: ``decay * old + (1 - decay) * new``."""
    return times(old, decay) + times(new, 1 - decay)


def ema_sq(x: jax.Array, old: jax.Array, decay: Any, scale: Any = 1) -> jax.Array:
    """:func:`ema` of ``scale * |x|^2``, the weight applied before the square is complete: ``decay * old + ((scale *
    (1 - decay)) * x) * x``, part by part for a complex ``x`` (torch's ``old.mul_(decay).addcmul_(x, x, value=scale *
    (1 - decay))``).

    Finite while the weighted square is: a float32 gradient of 1e19 has a square of inf, but ``(1e-3 * x) * x`` is
    1e35, so a second moment follows torch's to the same gradients (rather than freezing the coordinate at inf).
    """
    weight = scale * (1 - decay)
    if is_complex(x):
        re, im = jnp.real(x), jnp.imag(x)
        return times(old, decay) + ((weight * re) * re + (weight * im) * im)
    return times(old, decay) + (weight * x) * x


def log_decay(decay: Any, dtype: Any) -> Any:
    """``log(decay)`` for a decay in [0, 1]: a Python number's in float64 (``-inf`` for 0), an array's as
    ``log1p(decay - 1)`` in ``dtype`` (``decay - 1`` is exact for a decay in [0.5, 1])."""
    if isinstance(decay, (int, float)):
        return math.log(decay) if decay > 0 else -math.inf
    return jnp.log1p(jnp.asarray(decay).astype(dtype) - 1)


def _plain_power(decay: Any, dtype: Any) -> bool:
    """Whether a decay's powers are ``decay ** count`` as written: in float64 (torch's, from the Python float),
    and for a Python 0 (``0 ** 0`` is 1, where ``0 * log 0`` is NaN)."""
    return jnp.finfo(dtype).bits >= 64 or (isinstance(decay, (int, float)) and decay == 0)


def decay_power(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``decay ** count``: in float64 as torch computes it, in a narrower dtype as ``exp(count * log(decay))``
    (see :func:`bias_correction`)."""
    if _plain_power(decay, dtype):
        return scalar(decay, dtype) ** count.astype(dtype)
    return jnp.exp(count.astype(dtype) * log_decay(decay, dtype))


def bias_correction(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay ** count``, the factor that debiases a zero-initialised EMA after ``count`` steps.

    In float64 as torch computes it. In a narrower dtype, where torch still computes it in float64
    (on the host), ``-expm1(count * log(decay))``, to the dtype's precision relative to torch's
    value: ``1 - decay ** count`` there, from a decay rounded to float32, loses the digits of
    ``1 - decay`` (2e-4 of ``1 - 0.9999``), which the subtraction keeps (RAdam's rectification
    started steps early from it).
    """
    if _plain_power(decay, dtype):
        return 1 - decay_power(decay, count, dtype)
    return -jnp.expm1(count.astype(dtype) * log_decay(decay, dtype))


def debias(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 / (1 - decay ** count)``: a zero-initialised EMA times this is debiased.

    One division per step: multiplying every element by it is cheaper than dividing every
    element by :func:`bias_correction` (XLA:CPU makes the same rewrite by itself only sometimes).
    """
    return 1 / bias_correction(decay, count, dtype)


@jax.custom_jvp
def root(x: jax.Array) -> jax.Array:
    """``jnp.sqrt(x)``, the same values, with a zero derivative where ``x`` is 0 (not an infinite one).

    A second moment is 0 where a coordinate's gradient has always been exactly 0 (a padded input, an unused
    embedding row), and yet it is a function of the parameters and hyperparameters: ``jax.grad`` through the
    step then multiplies the root's infinite derivative by the moment's zero one, NaN for a hypergradient
    whose true value is finite. The zero derivative at 0 is the limit of the whole step's. NaN stays NaN (a
    norm of a NaN gradient must show it; :func:`safe_sqrt` maps it to 0).
    """
    return jnp.sqrt(x)


@root.defjvp
def _root_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = jnp.sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, t / (2 * jnp.where(positive, y, 1)), jnp.zeros_like(t))


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0``, with 0 and a zero (not infinite) derivative at ``x = 0``, so ``jax.grad`` stays finite."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def safe_divide(numerator: Any, denominator: jax.Array, fallback: Any = 0) -> jax.Array:
    """``numerator / denominator``, and ``fallback`` where the denominator is 0 (nothing seen yet, eps = 0).

    The division never sees a zero, so ``jax.grad`` through it stays finite too.
    """
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), fallback)


EpsMode = Literal["add", "max"]
"""Where eps enters a root's denominator: ``"add"``, :math:`\\sqrt{x} + \\epsilon`; ``"max"``,
:math:`\\max(\\sqrt{x}, \\epsilon)` (heavyball's form)."""


def with_eps(root: Any, eps: Any, eps_mode: EpsMode) -> Any:
    """A denominator from a root: ``root + eps`` (``"add"``) or ``max(root, eps)`` (``"max"``)."""
    return root + eps if eps_mode == "add" else jnp.maximum(root, eps)


def inv_root(nu: jax.Array, eps: Any, eps_root: Any, eps_mode: EpsMode = "add") -> jax.Array:
    """``1 / (sqrt(nu + eps_root) + eps)`` (``eps_mode="add"``) or ``1 / max(sqrt(nu + eps_root), eps)`` (``"max"``),
    with 0 where that denominator is 0 (a zero gradient)."""
    inside = nu if isinstance(eps_root, (int, float)) and eps_root == 0 else nu + eps_root  # no "+ 0" per leaf
    denominator = with_eps(root(inside), eps, eps_mode)
    if keeps_positive(eps, denominator.dtype):
        return 1 / denominator
    return safe_divide(1, denominator)


def keeps_positive(eps: Any, dtype: Any) -> bool:
    """Whether ``eps`` is a Python number that stays positive in ``dtype``: at least its smallest normal number (a
    smaller one rounds to 0 there, or to a subnormal that XLA:CPU flushes to 0), so that ``x + eps`` is never 0."""
    return isinstance(eps, (int, float)) and eps >= float(jnp.finfo(dtype).tiny)


def radam_rho(b2: Any, count: jax.Array, dtype: Any) -> tuple[Any, jax.Array, jax.Array]:
    r"""RAdam's :math:`\rho_\infty = 2 / (1 - \beta_2) - 1`, :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`
    and the bias correction :math:`1 - \beta_2^t`, at step ``count`` (from 1), in ``dtype``.

    In float64 as torch computes them. In a narrower dtype :math:`\rho_t` is the difference of two
    numbers near :math:`2 / (1 - \beta_2)` (2e4 for 0.9999), whose rounding moved the step at which
    the rectification starts (torch computes it in float64); with :math:`L = -\log \beta_2` and
    :math:`x = tL` it is computed without that cancellation as

    .. math::
        \rho_t = \Big(\frac{2}{1 - \beta_2} - 1 - \frac{2}{L}\Big) + \frac{2}{L}\Big(1 - \frac{x}{e^x - 1}\Big),

    each bracket by its series where its terms are small.
    """
    one_minus = (1 - b2) if isinstance(b2, (int, float)) else 1 - scalar(b2, dtype)  # exact for b2 in [0.5, 1]
    rho_inf = 2 / one_minus - 1
    bc2 = bias_correction(b2, count, dtype)
    t = count.astype(dtype)
    if _plain_power(b2, dtype):
        return rho_inf, rho_inf - 2 * t * decay_power(b2, count, dtype) / bc2, bc2
    log_b2 = -log_decay(b2, dtype)
    if isinstance(b2, (int, float)):  # in float64, where the cancellation costs nothing that float32 keeps
        head: Any = rho_inf - 2 / log_b2
    else:
        e = one_minus
        head = jnp.where(e < 0.05, e / 6 + e**2 / 12 + e**3 * (19 / 360), rho_inf - 2 / log_b2)
    x = t * log_b2
    small = jnp.minimum(x, 0.5)
    large = jnp.clip(x, 0.5, 80.0)  # e^80 is finite in float32; the bracket is 1 to its precision there
    tail = jnp.where(
        x < 0.5, small / 2 - small**2 / 12 + small**4 / 720 - small**6 / 30240, 1 - large / jnp.expm1(large)
    )
    return rho_inf, head + 2 / log_b2 * tail, bc2


def scale_leaf(factor: jax.Array, g: jax.Array) -> jax.Array:
    """``factor * g`` in the leaf's compute dtype, returned in ``g``'s dtype (a step size times a direction)."""
    dtype = compute_dtype(g.dtype)
    return times(in_precision(g, dtype), jnp.asarray(factor).astype(dtype)).astype(g.dtype)


LeafFn = Callable[..., Sequence[jax.Array]]


def leafwise(
    fn: LeafFn,
    n_out: int,
    updates: Any,
    *trees: Any,
    options: Sequence[Any] = (),
    what: str = "state",
    subject: str = "gradients",
    shapes: bool = True,
) -> tuple[Any, ...]:
    """Apply ``fn(g, *leaves, *option_leaves) -> (out_0, ..., out_{n_out-1})`` leaf by leaf.

    Every tree in ``trees`` (the optimizer's ``what``) must mirror ``updates`` (the ``subject``):
    the same structure and, with ``shapes`` (off for a state that holds slices of each leaf),
    the same shape at each leaf; a mismatch raises an error that says where. A moment held by a
    storage reaches ``fn`` whole (read it with :func:`load` or :func:`to_compute`, write it with
    :func:`store`). The trees in
    ``options`` hold one value per leaf (a decay mask, a layer scale): their structure is
    checked, not their shapes. Returns ``n_out`` trees with ``updates``' structure.

    Under ``jit``, a leaf's quantized moments are computed and stored chunk by chunk where ``fn``
    computes them elementwise (:func:`adaopt._src.storage.step_leaf`): the same operations, with a
    float32 working set of a few chunks instead of whole leaves.
    """
    for tree in trees:
        check_tree_match(updates, tree, what, subject=subject, shapes=shapes)
    for tree in options:
        check_tree_match(updates, tree, PER_LEAF_OPTIONS, subject=subject, shapes=False)
    trees = (*trees, *options)
    flat, treedef = jax.tree.flatten(updates)
    leaves = [jax.tree.leaves(tree, is_leaf=storage.is_stored) for tree in trees]
    outs = storage.step_leaves(fn, zip(flat, *leaves, strict=True))
    return tuple(jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(n_out))


def to_compute(g: jax.Array, *states: jax.Array) -> tuple[jnp.dtype, jax.Array, tuple[jax.Array, ...]]:
    """Upcast a gradient leaf and its state leaves to one compute precision; complex arrays stay complex.

    Returns the real compute dtype (for the step's scalars) and the cast arrays (a stored moment
    is read back first: :func:`load`, placed as the gradient: codes stored flat and replicated on a
    mesh with explicit axes decode replicated, which a ``jnp.where`` with the sharded gradient's
    arrays refuses).
    """
    dtype = compute_dtype(g.dtype, *(s.dtype for s in states))
    return (
        dtype,
        in_precision(g, dtype),
        tuple(
            placement.placed_like(load(s, dtype), g) if storage.is_stored(s) else in_precision(s, dtype) for s in states
        ),
    )
