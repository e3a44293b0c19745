"""PSGD Kron: Li's preconditioned SGD with a Kronecker-factored whitening preconditioner, fitted online.

Each leaf keeps one factor :math:`Q_i` per axis, upper triangular (or diagonal, for long axes,
vectors and where memory is saved), so that :math:`P = \\bigotimes_i Q_i^\\top Q_i` approximates
the inverse square root of the momentum's covariance. The factors are not computed from
statistics but fitted by one step of a descent on the Lie group of triangular matrices each time
the preconditioner is updated, against a random probe: no matrix root, no eigendecomposition, and
the cost of a few triangular products and solves per axis. This is the form of Evan Walters'
``psgd_jax.kron`` (psgd-jax 0.2.9), which ports Xi-Lin Li's ``psgd_torch``, and matches it step
for step (tests/test_psgd_kron.py).

Other implementations, read in their source (not reproduced here):

- ``kron_torch.Kron`` (kron-torch 0.3.3, the same author's torch port) views a 3-d+ leaf as a
  matrix by default (``merge_dims=True``), decays only leaves of two or more axes, evaluates the
  probability schedule at the step before (from 0), rebalances on a coin of Python's ``random``,
  bounds the spectral norm from the column of largest norm only, solves its triangular systems in
  float32, keeps the factors in float32 by default, and adds 1e-12 to the RMS of the clip. Its
  probes come from torch's generator: it is compared in distribution.
- ``pytorch_optimizer.Kron`` (pytorch-optimizer 4.1.0) does not add the damping
  :math:`\\sqrt{\\epsilon_{32}}\\, \\mathrm{mean}|x|\\, v` to the momentum it fits the factors to,
  evaluates the schedule at the step before, guards the normalisers with bfloat16's smallest
  normal number whatever the dtype, solves in float32, adds 1e-6 to the RMS of the clip, decays
  only leaves of two or more axes, and fixes the preconditioner's step size and initial scale
  (0.1 and 1) in its parameter groups' defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, linalg, moments, placement
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.preconditioned.soap import check_real, per_leaf

MemorySaveMode = Literal["one_diag", "all_diag"]
MatmulPrecision = Literal["default", "high", "highest", "bfloat16", "tensorfloat32", "float32"]
_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32", None)
_LETTERS = string.ascii_lowercase + string.ascii_uppercase
_MAX_AXES = 13  # the reference's einsum expressions use three letters per axis, out of 52
_BALANCE_PROBABILITY = 0.01  # the chance that an update first rebalances a leaf's factors, the reference's
_CLIP_RMS = 1.1  # the preconditioned step's RMS is about 1: larger ones are scaled down to this
_DEFAULT_SEED = 5318008  # psgd-jax's fixed key


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 500
) -> base.Schedule:
    r"""psgd-jax's default probability of updating the preconditioner: flat, then an exponential anneal.

    .. math::
        p(t) = \min\big(\max(p_{max}\, e^{-\lambda (t - t_0)},\, p_{min}),\, p_{max}\big)

    With the defaults, every step updates the preconditioner for the first 500 steps, and the
    rate falls to one update in about 33 steps by step 4000. The preconditioner is learned early;
    afterwards rare updates keep it current at a fraction of the cost.

    Args:
      max_prob: :math:`p_{max}`, the probability before ``flat_start`` (and the cap).
      min_prob: :math:`p_{min}`, the floor.
      decay: :math:`\lambda`, the rate of the anneal.
      flat_start: :math:`t_0`, the step where the anneal starts.

    Returns:
      A schedule ``t -> p(t)``, evaluated at the step :math:`t = 1, 2, \dots` of the update.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.precond_update_prob_schedule()
      >>> [round(float(schedule(t)), 3) for t in (1, 500, 1000, 4000, 10000)]
      [1.0, 1.0, 0.607, 0.03, 0.03]
    """
    for name, value in (("max_prob", max_prob), ("min_prob", min_prob)):
        base.check_scalar(name, value, low=0.0, high=1.0, low_open=True)
    base.check_nonnegative("decay", decay)
    base.check_scalar("flat_start", flat_start, high=base.INT32_MAX)  # against the step count

    def schedule(n: Any) -> jax.Array:
        # The reference's expression, with the step made a float of JAX's default float dtype first (the dtype that
        # standard promotion gives its int32 step times a Python float; strict promotion refuses the product).
        n = jnp.asarray(n).astype(jnp.result_type(float))
        return jnp.minimum(jnp.maximum(max_prob * jnp.exp(-decay * (n - flat_start)), min_prob), max_prob)

    return schedule


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How PSGD Kron sees a leaf: which of its axes has a triangular factor (the others a diagonal one).

    A 0-d leaf has one scalar factor; an empty leaf none.
    """

    shape: tuple[int, ...]
    triangular: tuple[bool, ...]

    @property
    def preconditioned(self) -> bool:
        return math.prod(self.shape) > 0

    @property
    def factors(self) -> int:
        """How many factors the leaf has (a 0-d leaf: its scalar one)."""
        return max(len(self.shape), 1) if self.preconditioned else 0

    def diagonal_axes(self) -> list[int]:
        """The positions of the diagonal factors (0 for a 0-d leaf's scalar)."""
        if not self.preconditioned:
            return []
        return [0] if not self.shape else [i for i, t in enumerate(self.triangular) if not t]

    @functools.cached_property
    def expressions(self) -> tuple[str, tuple[str, ...], str]:
        """The einsum expressions of :math:`A = h \\times_i Q_i`, of each :math:`A_{(i)} A_{(i)}^\\top` (a vector for
        a diagonal factor) and of :math:`m \\times_i Q_i^\\top Q_i` (the reference's, letter for letter, so
        that the contraction order is the same)."""
        n = len(self.shape)
        if n == 0:
            return ",->", (",->",), ",,->"
        factors_a, operand_a, out_a = [], "", ""
        statistics = []
        first, second, operand_p, out_p = [], [], "", ""
        for i, triangular in enumerate(self.triangular):
            a, b, c = _LETTERS[i], _LETTERS[i + 13], _LETTERS[i + 26]
            left = "".join(b if j == i else _LETTERS[j] for j in range(n))
            if triangular:
                right = "".join(c if j == i else _LETTERS[j] for j in range(n))
                statistics.append(f"{left},{right}->{b}{c}")
                factors_a.append(a + b)
                operand_a, out_a = operand_a + b, out_a + a
                first.append(a + b)
                second.append(a + c)
                operand_p, out_p = operand_p + c, out_p + b
            else:
                statistics.append(f"{left},{left}->{b}")
                factors_a.append(a)
                operand_a, out_a = operand_a + a, out_a + a
                first.append(b)
                second.append(b)
                operand_p, out_p = operand_p + b, out_p + b
        expr_a = ",".join(factors_a) + "," + operand_a + "->" + out_a
        expr_p = ",".join(first) + "," + ",".join(second) + "," + operand_p + "->" + out_p
        return expr_a, tuple(statistics), expr_p


def _plan(
    shape: tuple[int, ...], max_size: int, min_ndim: int, memory_save_mode: MemorySaveMode | None
) -> _Plan:  # fmt: skip
    """The reference's rule: an axis is diagonal if it has size 1, is longer than ``max_size``, the leaf has fewer
    than ``min_ndim`` axes, or ``memory_save_mode`` says so ("one_diag": the longest axis, the last of equals)."""
    if memory_save_mode == "all_diag":
        chosen = set(range(len(shape)))
    elif memory_save_mode == "one_diag" and shape:
        chosen = {int(np.argsort(shape)[::-1][0])}
    else:
        chosen = set()
    triangular = tuple(
        not (d == 1 or d > max_size or len(shape) < min_ndim or i in chosen) for i, d in enumerate(shape)
    )
    return _Plan(tuple(shape), triangular)


def _add_tiny(x: jax.Array) -> jax.Array:
    return x + jnp.finfo(x.dtype).tiny


def _largest(x: jax.Array) -> jax.Array:
    """``jnp.max(x)``, the same value, differentiated through the one entry that ``jnp.argmax`` picks.

    ``jnp.max``'s derivative finds the maximum by comparing the operand with the result: where XLA computes the
    operand twice (in two fusions, one with a fused multiply-add, as XLA:CPU does at its optimization level 0) the
    copies differ in the last bit, the derivative counts no maximum and divides by that 0, and a hypergradient
    through the factors' normalisers is infinite or NaN.
    """
    flat = jnp.ravel(x)
    return flat[jnp.argmax(flat)]


def _norm_lower_bound(a: jax.Array) -> jax.Array:
    r"""A cheap lower bound of the spectral norm of a square matrix :math:`A`, within a factor of about
    :math:`\sqrt 2` of it (Li's): :math:`\|x^\top A\|` for :math:`x` the normalised product of :math:`A` with its
    column (or row) of largest norm, in units of :math:`\max |A_{ij}|`; 0 for a zero matrix."""
    max_abs = _largest(jnp.abs(a))

    def calc(a: jax.Array) -> jax.Array:
        a = a / max_abs
        aa = a * a
        sum0, sum1 = jnp.sum(aa, axis=0), jnp.sum(aa, axis=1)
        i, j = jnp.argmax(sum0, 0), jnp.argmax(sum1, 0)
        value0 = jax.lax.dynamic_index_in_dim(sum0, i, 0, keepdims=False)
        value1 = jax.lax.dynamic_index_in_dim(sum1, j, 0, keepdims=False)

        def by_column() -> jax.Array:
            x = jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False) @ a
            return max_abs * jnp.linalg.norm((x / jnp.linalg.norm(x)) @ a.T)

        def by_row() -> jax.Array:
            x = a @ jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False)
            return max_abs * jnp.linalg.norm(a.T @ (x / jnp.linalg.norm(x)))

        return jax.lax.cond(value0 > value1, by_column, by_row)

    return jax.lax.cond(max_abs > 0, calc, lambda _: max_abs, a)


def _solve_triangular_right(x: jax.Array, q: jax.Array) -> jax.Array:
    """``x @ inv(q)`` for an upper-triangular ``q``, over the last axis of ``x`` (a triangular solve: a product's cost)."""
    rows = x.reshape(-1, x.shape[-1])  # the rows of x @ inv(q) are independent: one system
    return linalg.solve_upper_right(q, rows).reshape(x.shape)


def _probe_solve(qs: Sequence[jax.Array], v: jax.Array) -> jax.Array:
    r""":math:`B = v \times_i Q_i^{-\top}`: each axis in turn, moved to the end and solved against its factor."""
    order = v.ndim
    axes = list(range(order))
    b = jnp.transpose(v, axes[1:] + axes[:1])
    for i, q in enumerate(qs):
        b = b / q if q.ndim < 2 else _solve_triangular_right(b, q)
        if i < order - 1:
            b = jnp.swapaxes(b, i, order - 1)
    return b


def _fit_factors(
    qs: Sequence[jax.Array], h: jax.Array, b: jax.Array, plan: _Plan, learning_rate: Any
) -> list[jax.Array]:  # fmt: skip
    """One step of each factor towards whitening ``h`` (the probed momentum), from the same :math:`A` and :math:`B`."""
    expr_a, statistics, _ = plan.expressions
    a = jnp.einsum(expr_a, *qs, h)
    new = []
    for expr, q in zip(statistics, qs, strict=True):
        term1, term2 = jnp.einsum(expr, a, a), jnp.einsum(expr, b, b)
        step = (term1 - term2) * learning_rate
        if q.ndim < 2:
            step = step * q / _add_tiny(_largest(jnp.abs(term1 + term2)))
        else:
            step = jnp.triu(step) / _add_tiny(_norm_lower_bound(term1 + term2))
            step = step @ q
        new.append(q - step)
    return new


def _fitted(
    plan: _Plan, dtype: jnp.dtype, learning_rate: Any, key: jax.Array, x: jax.Array, *qs: jax.Array
) -> list[jax.Array]:  # fmt: skip
    """One leaf's factors fitted to its input ``x`` (the momentum or the gradient) probed with noise drawn from ``key``:
    :func:`_fit_factors` in ``dtype``, the new factors in the old ones' dtypes."""
    v = jax.random.normal(key, x.shape, x.dtype)
    damping = jnp.sqrt(jnp.finfo(jnp.float32).eps).astype(x.dtype)
    h = x + damping * jnp.mean(jnp.abs(x)) * v
    qs_work = [q.astype(dtype) for q in qs]
    b = _probe_solve(qs_work, v.astype(dtype))
    fitted = _fit_factors(qs_work, h.astype(dtype), b, plan, moments.scalar(learning_rate, dtype))
    return [q_new.astype(q.dtype) for q_new, q in zip(fitted, qs, strict=True)]


def _balanced(qs: Sequence[jax.Array]) -> list[jax.Array]:
    """The factors rescaled to equal largest entries, their Kronecker product unchanged (up to the float32 rounding of
    the scales, which the reference computes in float32 whatever the factors' dtype)."""
    norms = jnp.array([_largest(jnp.abs(q)) for q in qs], dtype=jnp.float32)
    geometric_mean = jnp.prod(norms) ** (1 / len(norms))
    scales = geometric_mean / norms
    return [q * scales[i].astype(q.dtype) for i, q in enumerate(qs)]


class PsgdKronState(NamedTuple):
    """State of :func:`scale_by_psgd_kron`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      seed: the seed of the draws (a uint32): step :math:`t`'s come from
        ``jax.random.fold_in(jax.random.PRNGKey(seed), t - 1)``, as psgd-jax's.
      update_counter: the steps since the preconditioner was last updated, an int32.
      mu: the momentum :math:`m_t`, mirroring the parameters (stored by ``mu_dtype``).
      triangular: one tuple per parameter leaf (in the order of ``jax.tree.leaves``) of its
        upper-triangular factors :math:`Q_i` (:math:`d_i \\times d_i`), by axis; replicated on a mesh.
      diagonal: one tree per axis position :math:`k`, mirroring the parameters, holding each
        leaf's diagonal factor of axis :math:`k` (a vector, sharded as that axis; a 0-d leaf's
        scalar factor at :math:`k = 0`) or ``optax.MaskedNode()`` where that axis has a triangular
        factor or does not exist.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    seed: jax.Array
    update_counter: jax.Array
    mu: Updates
    triangular: Any
    diagonal: tuple[Any, ...]


def _check_psgd_kron(
    b1: Any, preconditioner_update_probability: Any, max_size_triangular: Any, min_ndim_triangular: Any,
    memory_save_mode: Any, preconditioner_lr: Any, preconditioner_init_scale: Any, mu_dtype: Any, precond_dtype: Any,
    precond_update_precision: Any, precond_grads_precision: Any, seed: Any,
) -> None:  # fmt: skip
    base.check_decay("b1", b1)
    if not callable(preconditioner_update_probability):
        base.check_scalar(
            "preconditioner_update_probability", preconditioner_update_probability, low=0.0, high=1.0, low_open=True
        )
    base.check_integer("max_size_triangular", max_size_triangular, 0)
    base.check_integer("min_ndim_triangular", min_ndim_triangular, 0)
    base.check_choice("memory_save_mode", memory_save_mode, (None, "one_diag", "all_diag"))
    base.check_scalar("preconditioner_lr", preconditioner_lr, low=0.0, low_open=True)
    base.check_scalar("preconditioner_init_scale", preconditioner_init_scale, low=0.0, low_open=True)
    moments.check_storage("mu_dtype", mu_dtype)
    base.check_dtype("precond_dtype", precond_dtype)
    base.check_choice("precond_update_precision", precond_update_precision, _PRECISIONS)
    base.check_choice("precond_grads_precision", precond_grads_precision, _PRECISIONS)
    base.check_integer("seed", seed, 0, 2**32 - 1)


def _axis_sharded(x: jax.Array, like: jax.Array, axis: int) -> jax.Array:
    """A diagonal factor ``x`` of axis ``axis`` of ``like``, placed as that axis of ``like`` under an explicit mesh."""
    if x.ndim == 0:
        return x
    return placement.placed(x, jax.sharding.PartitionSpec(placement.split_axes(like)[axis]), like)


@base.check_flags
def scale_by_psgd_kron(
    b1: Any = 0.9,
    preconditioner_update_probability: ScalarOrSchedule | None = None,
    *,
    max_size_triangular: int = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: Literal["one_diag", "all_diag"] | None = None,
    momentum_into_precond_update: bool = True,
    preconditioner_lr: Any = 0.1,
    preconditioner_init_scale: Any = 1.0,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    precond_update_precision: MatmulPrecision | None = "tensorfloat32",
    precond_grads_precision: MatmulPrecision | None = None,
    seed: int = _DEFAULT_SEED,
) -> optax.GradientTransformation:
    r"""PSGD Kron's block: momentum, preconditioned by Kronecker factors fitted to whiten it, clipped in RMS.

    At step :math:`t = 1, 2, \dots`, for each leaf with factors :math:`Q_1, \dots, Q_k` (one per
    axis; :math:`\times_i` multiplies axis :math:`i` by a matrix, a diagonal factor elementwise):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad \hat m_t = m_t / (1 - \beta_1^t) \\
        c_t &= c_{t-1} + 1; \quad \text{if } c_t \ge 1 / p(t): \; c_t = 0 \text{ and the factors are updated:} \\
        &\quad h = x + \sqrt{\epsilon_{32}}\, \mathrm{mean}|x|\, v, \quad
            x = \hat m_t \text{ (or } g_t\text{)}, \; v \sim \mathcal N(0, I) \\
        &\quad A = h \times_i Q_i, \qquad B = v \times_i Q_i^{-\top} \\
        &\quad Q_i \leftarrow Q_i - \eta_p \frac{\mathrm{triu}(A_{(i)} A_{(i)}^\top - B_{(i)} B_{(i)}^\top)}
            {\| A_{(i)} A_{(i)}^\top + B_{(i)} B_{(i)}^\top \|_{lb}} Q_i
            \;\text{(triangular; diagonal: the diagonals, over their max)} \\
        n_t &= \hat m_t \times_i Q_i^\top Q_i, \qquad u_t = n_t / \max\big(1, \mathrm{RMS}(n_t) / 1.1\big)

    :math:`\epsilon_{32}` is float32's machine epsilon, :math:`\|\cdot\|_{lb}` Li's cheap lower bound of
    the spectral norm (within a factor of about :math:`\sqrt 2`; plus the dtype's smallest normal number), and
    :math:`A_{(i)}` the leaf unfolded along axis :math:`i`. The preconditioner
    :math:`\bigotimes_i Q_i^\top Q_i` tends to the inverse square root of the covariance of
    :math:`h`. The counter :math:`c_t` makes the updates regular, one every :math:`\lceil 1/p \rceil`
    steps (the reference's "probability" is deterministic); before the probe is drawn, with
    probability 0.01, each leaf's factors are rescaled to equal largest entries (their product
    unchanged). The first :math:`Q_i` are :math:`s^{1/k} I` with :math:`s` the init scale.

    What each leaf does: a 2-d leaf has a triangular factor per axis, except an axis of size 1
    or longer than ``max_size_triangular`` (an embedding's vocabulary), which has a diagonal one;
    a 3-d+ leaf is one tensor with a factor per axis (convolutions, stacked layers), at most 13
    axes; a 1-d leaf has a diagonal factor (below ``min_ndim_triangular`` axes); a 0-d leaf a
    scalar one; an empty leaf none. ``memory_save_mode="one_diag"`` makes each leaf's longest
    axis diagonal, ``"all_diag"`` every axis.

    Args:
      b1: :math:`\beta_1`, the momentum, in [0, 1); 0 preconditions the gradient itself.
      preconditioner_update_probability: :math:`p`, in (0, 1], or a schedule of the step
        :math:`t` (from 1); None: :func:`precond_update_prob_schedule`'s default, psgd-jax's.
        (``inject_hyperparams`` evaluates a schedule given here itself, at its count: from 0.)
      max_size_triangular: a longer axis gets a diagonal factor, an integer >= 0.
      min_ndim_triangular: a leaf with fewer axes gets diagonal factors only, an integer >= 0.
      memory_save_mode: None, ``"one_diag"`` or ``"all_diag"`` (see above).
      momentum_into_precond_update: fit the factors to the momentum :math:`\hat m_t` (True) or
        to the gradient :math:`g_t`.
      preconditioner_lr: :math:`\eta_p`, the factors' step size, > 0. A leaf whose momentum is
        exactly 0 (its gradients 0 for as long as the momentum remembers) grows its factors by
        :math:`1 + \eta_p` at each preconditioner update, as the reference's do: after a long
        zero phase the steps start large (NaN in float32 after thousands of updates at 0.3).
      preconditioner_init_scale: :math:`s`, the initial preconditioner's scale, > 0.
      mu_dtype: how the momentum is stored: a dtype or a storage (``"int8"``, ...); default the
        parameter's, at least float32.
      precond_dtype: the factors' dtype; default the parameter's, at least float32. The
        arithmetic runs in the wider of it and the gradient's.
      precond_update_precision: the matmul precision of the factors' update (as
        ``jax.default_matmul_precision``); float64 ignores it.
      precond_grads_precision: the matmul precision of preconditioning the momentum.
      seed: the seed of the probes and of the rebalancing's coin, an integer in [0, 2**32);
        psgd-jax's fixed one by default. Kept in the state (:class:`PsgdKronState`).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PsgdKronState`. Complex parameters
      are refused at ``init``. Under a mesh with explicit axes each leaf is gathered for the
      products; the triangular factors are replicated, the diagonal ones sharded as their axis.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_psgd_kron(0.0, preconditioner_update_probability=1.0)
      >>> scales = jnp.array([10.0, 1.0, 0.1])  # gradients of noise, its scale 100 times larger on the first axis
      >>> state = tx.init(scales)
      >>> step = jax.jit(tx.update)
      >>> for key in jax.random.split(jax.random.key(0), 500):
      ...     _, state = step(scales * jax.random.normal(key, (3,)), state)
      >>> whitened = state.diagonal[0] ** 2 * scales  # Q^T Q is 1 / scales: preconditioned, the noise is white
      >>> bool(jnp.all((0.5 < whitened) & (whitened < 2.0)))
      True

    References:
      Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018,
      https://arxiv.org/abs/1512.04202; Li, "Black Box Lie Group Preconditioners for SGD", 2022,
      https://arxiv.org/abs/2211.04422.

      Reference packages: :func:`psgd_kron` gives the arguments that reproduce psgd-jax.
    """
    probability = precond_update_prob_schedule() if preconditioner_update_probability is None else (
        preconditioner_update_probability
    )  # fmt: skip
    _check_psgd_kron(
        b1, probability, max_size_triangular, min_ndim_triangular, memory_save_mode, preconditioner_lr,
        preconditioner_init_scale, mu_dtype, precond_dtype, precond_update_precision, precond_grads_precision, seed,
    )  # fmt: skip
    # jax.default_matmul_precision takes the built-in str only, not a NumPy one (np.str_, from an array of options).
    update_precision, grads_precision = (
        str(p) if isinstance(p, str) else p for p in (precond_update_precision, precond_grads_precision)
    )

    def plan(shape: tuple[int, ...]) -> _Plan:
        return _plan(shape, max_size_triangular, min_ndim_triangular, memory_save_mode)

    def factor_dtype(p: Any) -> jnp.dtype:
        return moments.compute_dtype(jnp.result_type(p)) if precond_dtype is None else jnp.dtype(precond_dtype)

    def init_fn(params: base.Params) -> PsgdKronState:
        check_real(params, "PSGD Kron")
        leaves, treedef = jax.tree.flatten(params)
        plans = []
        for path, p in jax.tree_util.tree_leaves_with_path(params):
            if jnp.ndim(p) > _MAX_AXES:
                raise ValueError(
                    f"PSGD Kron gives each axis of a leaf a factor, at most {_MAX_AXES} axes, but the leaf at "
                    f"{jax.tree_util.keystr(path) or 'the root'} has shape {jnp.shape(p)}. Reshape it (merge axes) "
                    "before the optimizer, or train it with another (optax.partition routes leaves)."
                )
            plans.append(plan(jnp.shape(p)))

        def first_factor(p: Any, p_plan: _Plan, axis: int, triangular: bool) -> jax.Array:
            """:math:`s^{1/k} I` (or its diagonal), :math:`k` the leaf's axes (a 0-d leaf's scalar: :math:`s`)."""
            dtype, ndim = factor_dtype(p), len(p_plan.shape)
            scale = moments.scalar(preconditioner_init_scale, dtype)
            scale = scale ** (1 / ndim) if ndim else scale
            if triangular:
                return placement.replicated(scale * jnp.eye(p_plan.shape[axis], dtype=dtype), p)
            return _axis_sharded(scale * jnp.ones(p_plan.shape[axis] if ndim else (), dtype=dtype), p, axis)

        triangular = [
            tuple(first_factor(p, p_plan, axis, True) for axis in range(p_plan.factors)
                  if axis not in p_plan.diagonal_axes())
            for p, p_plan in zip(leaves, plans, strict=True)
        ]  # fmt: skip
        diagonal = [
            jax.tree.unflatten(
                treedef,
                [
                    first_factor(p, p_plan, k, False) if k in p_plan.diagonal_axes() else optax.MaskedNode()
                    for p, p_plan in zip(leaves, plans, strict=True)
                ],
            )
            for k in range(_slots(plans))
        ]
        return PsgdKronState(
            count=moments.zero_count(),
            seed=jnp.asarray(seed, jnp.uint32),
            update_counter=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            triangular=tuple(triangular),
            diagonal=tuple(diagonal),
        )

    def update_fn(
        updates: Updates, state: PsgdKronState, params: base.Params | None = None
    ) -> tuple[Updates, PsgdKronState]:
        del params
        base.check_tree_match(updates, state.mu, "state")
        leaves = jax.tree.leaves(updates)
        treedef: Any = jax.tree.structure(updates)  # flatten_up_to: the state's mirrors' leaves
        mus = treedef.flatten_up_to(state.mu)
        triangular = per_leaf(state.triangular, leaves)
        diagonal = [treedef.flatten_up_to(slot) for slot in state.diagonal]
        plans = [plan(g.shape) for g in leaves]
        count = moments.safe_increment(state.count)
        key = jax.random.fold_in(jax.random.PRNGKey(state.seed), state.count)
        p_t = probability(count) if callable(probability) else probability

        # The momentum, debiased, in each leaf's compute dtype (then whole on every device, for the products).
        momenta, inputs, new_mus = [], [], []
        for g, m in zip(leaves, mus, strict=True):
            dtype, g_compute, (m_compute,) = moments.to_compute(g, m)
            m_new = moments.ema(g_compute, m_compute, moments.scalar(b1, dtype))
            new_mus.append(moments.store(m_new, m))
            m_hat = m_new / moments.bias_correction(b1, count, dtype)
            momenta.append(placement.whole(m_hat))
            inputs.append(momenta[-1] if momentum_into_precond_update else placement.whole(g_compute))

        def factors_of(i: int) -> list[jax.Array]:
            """Leaf ``i``'s factors, by axis, whole."""
            tri, diagonal_axes = iter(triangular[i]), plans[i].diagonal_axes()
            return [
                placement.whole(diagonal[axis][i]) if axis in diagonal_axes else next(tri)
                for axis in range(plans[i].factors)
            ]

        def work_dtype(i: int) -> jnp.dtype:
            return moments.compute_dtype(momenta[i].dtype, factor_dtype(leaves[i]))

        def update_factors(key: jax.Array, all_qs: list[list[jax.Array]]) -> list[list[jax.Array]]:
            with jax.default_matmul_precision(update_precision):
                key, subkey = jax.random.split(key)
                balance = jax.random.uniform(subkey) < _BALANCE_PROBABILITY
                all_qs = jax.lax.cond(
                    balance, lambda qs: [_balanced(q) if len(q) > 1 else q for q in qs], lambda qs: qs, all_qs
                )
                key, subkey = jax.random.split(key)
                probe_keys = jax.random.split(subkey, len(leaves))
                new: list[list[jax.Array]] = list(all_qs)
                # Leaves of one plan and dtypes (a model's repeated layers) take one program, looped over them: the
                # same operations as for each leaf alone, each with its own probe, compiled once instead of per leaf.
                groups: dict[Any, list[int]] = {}
                for i, (x, qs, p_plan) in enumerate(zip(inputs, all_qs, plans, strict=True)):
                    if p_plan.preconditioned:
                        kind = (p_plan, x.dtype, work_dtype(i), tuple((q.shape, q.dtype) for q in qs))
                        groups.setdefault(kind, []).append(i)
                for (p_plan, _, dtype, _), members in groups.items():
                    fit = functools.partial(_fitted, p_plan, dtype, preconditioner_lr)
                    if len(members) == 1:
                        (i,) = members
                        new[i] = fit(probe_keys[i], inputs[i], *all_qs[i])
                        continue
                    stacked = [jnp.stack(arrays) for arrays in zip(*(all_qs[i] for i in members), strict=True)]
                    xs = jnp.stack([inputs[i] for i in members])
                    fitted = jax.lax.map(
                        lambda args, fit=fit: fit(*args), (probe_keys[np.asarray(members)], xs, *stacked)
                    )
                    for position, i in enumerate(members):
                        new[i] = [q[position] for q in fitted]
                return new

        counter = moments.safe_increment(state.update_counter)
        threshold = 1 / p_t
        do_update = counter.astype(jnp.result_type(threshold)) >= threshold  # the reference's promotion, explicit
        counter = jnp.where(do_update, 0, counter)
        key, subkey = jax.random.split(key)
        all_qs = [factors_of(i) for i in range(len(leaves))]
        all_qs = jax.lax.cond(do_update, update_factors, lambda _, qs: qs, subkey, all_qs)

        steps = []
        with jax.default_matmul_precision(grads_precision):
            for i, (g, m_hat, qs, p_plan) in enumerate(zip(leaves, momenta, all_qs, plans, strict=True)):
                if p_plan.preconditioned:
                    dtype = work_dtype(i)
                    qs_work = [q.astype(dtype) for q in qs]
                    direction = jnp.einsum(p_plan.expressions[2], *qs_work, *qs_work, m_hat.astype(dtype))
                else:
                    direction = m_hat
                rms = jnp.sqrt(jnp.mean(moments.abs_sq(direction)))
                direction = direction / jnp.maximum(1.0, rms / _CLIP_RMS)
                steps.append(placement.sharded_like(direction.astype(g.dtype), g))

        new_triangular = []
        new_diagonal: list[list[Any]] = [list(slot) for slot in diagonal]
        for i, (g, qs, p_plan) in enumerate(zip(leaves, all_qs, plans, strict=True)):
            diagonal_axes = p_plan.diagonal_axes()
            new_triangular.append(tuple(q for axis, q in enumerate(qs) if axis not in diagonal_axes))
            for axis in diagonal_axes:
                new_diagonal[axis][i] = _axis_sharded(qs[axis], g, axis)
        unflat = treedef.unflatten
        return unflat(steps), PsgdKronState(
            count=count,
            seed=state.seed,
            update_counter=counter,
            mu=unflat(new_mus),
            triangular=tuple(new_triangular),
            diagonal=tuple(unflat(slot) for slot in new_diagonal),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _slots(plans: Sequence[_Plan]) -> int:
    """How many trees of diagonal factors the state holds: one per axis position that has one in some leaf."""
    return max((axis + 1 for p_plan in plans for axis in p_plan.diagonal_axes()), default=0)


@base.check_flags
def psgd_kron(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    preconditioner_update_probability: ScalarOrSchedule | None = None,
    max_size_triangular: int = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: Literal["one_diag", "all_diag"] | None = None,
    momentum_into_precond_update: bool = True,
    preconditioner_lr: Any = 0.1,
    preconditioner_init_scale: Any = 1.0,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    precond_update_precision: MatmulPrecision | None = "tensorfloat32",
    precond_grads_precision: MatmulPrecision | None = None,
    seed: int = _DEFAULT_SEED,
) -> optax.GradientTransformationExtraArgs:
    r"""PSGD Kron: SGD with momentum, preconditioned by Kronecker factors fitted online to whiten it.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big)

    with :math:`u_t` the update of :func:`scale_by_psgd_kron` (about unit RMS, as Adam's) and the
    decay added after the preconditioner, so that the learning rate scales both (AdamW's form).

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``
        (count from 0).
      b1: :math:`\beta_1`, the momentum, in [0, 1).
      weight_decay: :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      preconditioner_update_probability: see :func:`scale_by_psgd_kron`.
      max_size_triangular: see :func:`scale_by_psgd_kron`.
      min_ndim_triangular: see :func:`scale_by_psgd_kron`.
      memory_save_mode: see :func:`scale_by_psgd_kron`.
      momentum_into_precond_update: see :func:`scale_by_psgd_kron`.
      preconditioner_lr: see :func:`scale_by_psgd_kron`.
      preconditioner_init_scale: see :func:`scale_by_psgd_kron`.
      mu_dtype: see :func:`scale_by_psgd_kron`.
      precond_dtype: see :func:`scale_by_psgd_kron`.
      precond_update_precision: see :func:`scale_by_psgd_kron`.
      precond_grads_precision: see :func:`scale_by_psgd_kron`.
      seed: see :func:`scale_by_psgd_kron`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Complex parameters are refused at ``init``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.psgd_kron(1e-3)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
      >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.array([3.0, -4.0])}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> updates["b"].round(5)  # -lr times the preconditioned momentum, its RMS clipped to 1.1
      Array([-0.001  ,  0.00119], dtype=float32)

    References:
      Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018,
      https://arxiv.org/abs/1512.04202; Li, "Black Box Lie Group Preconditioners for SGD", 2022,
      https://arxiv.org/abs/2211.04422.

      Reference packages: ``psgd_jax.kron.kron(learning_rate, b1, weight_decay, weight_decay_mask,
      preconditioner_update_probability, max_size_triangular, min_ndim_triangular,
      memory_save_mode, momentum_into_precond_update, preconditioner_lr,
      preconditioner_init_scale, mu_dtype, precond_dtype, precond_update_precision,
      precond_grads_precision)`` (psgd-jax 0.2.9) is this with the same arguments and defaults,
      step for step: its probes come from ``jax.random.fold_in(jax.random.PRNGKey(5318008), t - 1)``,
      this ``seed``'s default. Its default ``precond_dtype=None`` keeps the factors in JAX's default
      float (float64 under x64, whatever the parameters' dtype); here they take the parameters'
      (at least float32): pass ``precond_dtype`` to either to have the same. With a ``mu_dtype``
      narrower than the gradients it multiplies the stored momentum by ``b1`` in that dtype (a
      weakly typed product) before adding the gradient's share; here the momentum is read back
      into the wider dtype first, which differs by that rounding. Its ``scanned_layers``
      (a ``vmap`` of the preconditioner over the first axis of marked leaves, or a ``lax.map``)
      is not reproduced: here every leaf, a stack of layers included, is one tensor with a factor
      per axis (psgd-jax's ``scanned_layers=None``); give each layer its own leaf to precondition
      the layers apart. Its ``flax.linen.Partitioned`` boxes are not
      unboxed here: pass the arrays.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_psgd_kron(
        b1, preconditioner_update_probability, max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode,
        momentum_into_precond_update=momentum_into_precond_update, preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
        precond_update_precision=precond_update_precision, precond_grads_precision=precond_grads_precision, seed=seed,
    )  # fmt: skip
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay=True, complex_convention="modulus"
    )
