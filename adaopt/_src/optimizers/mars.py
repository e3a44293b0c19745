"""MARS: variance reduction for adaptive optimizers, a scaled gradient correction fed to AdamW, Lion or Shampoo."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.optimizers.adam import check_moments
from adaopt._src.preconditioned.muon import NS_COEFFICIENTS, newton_schulz

MarsType = Literal["adamw", "lion", "shampoo"]
_NO_COMPLEX = (
    "mars_type='shampoo' orthogonalises matrices by Newton–Schulz, which has no complex form here: got a complex "
    "leaf of two or more dimensions at {path} ({dtype}). Pass complex_convention='real_imag' (the real and "
    "imaginary parts as a real matrix, as pytorch-optimizer does) or another mars_type."
)


class MarsState(NamedTuple):
    """State of :func:`scale_by_mars`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the first moment :math:`m_t` (of the corrected gradients, or of the gradients on
        AdamW's leaves), mirroring the parameters.
      nu: the second moment :math:`v_t`, mirroring the parameters (real for complex ones).
      last_grad: the previous gradient :math:`g_{t-1}` (0 before the first), mirroring the parameters.
      nu_max: the running maximum of :math:`v_t` with ``amsgrad``, else None.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    last_grad: Updates
    nu_max: Updates | None


def _is_mars_leaf(x: Any, optimize_1d: bool) -> bool:
    """Whether a leaf takes MARS's corrected step (two or more dimensions, or all with optimize_1d) or AdamW's."""
    return optimize_1d or jnp.ndim(x) >= 2


def _shampoo_scale(shape: tuple[int, ...]) -> float:
    """pytorch-optimizer's :math:`\\sqrt{\\max(1, A / B)}` from the first two axes (of the leaf, not of its matrix view)."""
    return math.sqrt(max(1.0, shape[0] / shape[1])) if shape[1] else 1.0


@base.check_flags
def scale_by_mars(
    b1: Any = 0.95,
    b2: Any = 0.99,
    gamma: Any = 0.025,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    mars_type: MarsType = "adamw",
    optimize_1d: bool = False,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.95,
    adam_learning_rate_factor: Any = 1.0,
    amsgrad: bool = False,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""MARS's block: a scaled gradient correction, clipped per tensor, preconditioned by AdamW, Lion or Shampoo.

    On a leaf of two or more dimensions (every leaf with ``optimize_1d``):

    .. math::
        c_t &= g_t + \gamma \frac{\beta_1}{1 - \beta_1} (g_t - g_{t-1}), \qquad
        c_t \leftarrow c_t / \max(1, \|c_t\|) \quad (g_0 = 0;\ \text{the norm of the tensor}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) c_t \\
        u_t &= \begin{cases}
            \dfrac{m_t / (1 - \beta_1^t)}{(\sqrt{v_t + \epsilon_{root}} + \epsilon) / \sqrt{1 - \beta_2^t}},
            \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) c_t^2 & \text{"adamw"} \\
            \mathrm{sign}(m_t) & \text{"lion"} \\
            \sqrt{\max(1, A / B)}\; \mathrm{NS}\big(m_t / (1 - \beta_1)\big) & \text{"shampoo"}
        \end{cases}

    with NS the Newton–Schulz iteration of :func:`newton_schulz` (5 steps, its :math:`\epsilon`
    the ``eps``, as a floor of the norm) on the leaf seen as an :math:`A \times (\text{the rest})`
    matrix, :math:`A, B` its first two axes; a 0-d or 1-d leaf under "shampoo" takes the "adamw"
    step. Every other leaf (0-d and 1-d without ``optimize_1d``) takes AdamW's step with
    :math:`\beta_1, \beta_2` = ``adam_b1``, ``adam_b2`` and the plain gradient in place of
    :math:`c_t`, times ``adam_learning_rate_factor``. ``amsgrad`` puts the running maximum of
    :math:`v_t` in the denominators. For a complex coordinate, the square is :math:`|\cdot|^2`
    and the sign is the phase :math:`m / |m|`.

    Args:
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      gamma: :math:`\gamma` >= 0, the strength of the gradient correction.
      eps: :math:`\epsilon`, added to the root of the second moment before its debiasing (and
        the floor of Newton–Schulz's norm), >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      mars_type: the preconditioner of the corrected momentum: ``"adamw"``, ``"lion"`` or ``"shampoo"``.
      optimize_1d: give 0-d and 1-d leaves MARS's step too, instead of AdamW's.
      adam_b1: :math:`\beta_1` of the AdamW leaves, in [0, 1).
      adam_b2: :math:`\beta_2` of the AdamW leaves, in [0, 1).
      adam_learning_rate_factor: the AdamW leaves' learning rate over the others', >= 0.
      amsgrad: divide by the running maximum of the second moment.
      ns_dtype: the dtype of the Newton–Schulz iteration; None: the compute dtype;
        ``jnp.bfloat16`` runs it as pytorch-optimizer does.
      mu_dtype: storage dtype of the first moment and the previous gradient (default: the
        parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MarsState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_mars(mars_type="lion")
      >>> g = {"w": jnp.array([[0.5, -2.0]]), "b": jnp.array([0.5, -2.0])}
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates["w"], updates["b"].round(4)  # Lion's sign on the matrix, AdamW on the bias
      (Array([[ 1., -1.]], dtype=float32), Array([ 1., -1.], dtype=float32))

    References:
      Yuan, Liu, Wu, Zhou, Gu & Yang, "MARS: Unleashing the Power of Variance Reduction for
      Training Large Models", ICML 2025, https://arxiv.org/abs/2411.10438.

      Reference packages: :func:`mars` gives the arguments that reproduce pytorch-optimizer.
    """
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    base.check_nonnegative("gamma", gamma)
    base.check_choice("mars_type", mars_type, ("adamw", "lion", "shampoo"))
    base.check_decay("adam_b1", adam_b1)
    base.check_decay("adam_b2", adam_b2)
    base.check_nonnegative("adam_learning_rate_factor", adam_learning_rate_factor)
    base.check_dtype("ns_dtype", ns_dtype)

    def init_fn(params: base.Params) -> MarsState:
        if mars_type == "shampoo":
            for path, leaf in jax.tree_util.tree_leaves_with_path(params):
                if is_complex(leaf) and jnp.ndim(leaf) >= 2:
                    raise TypeError(_NO_COMPLEX.format(path=jax.tree_util.keystr(path) or "the root", dtype=leaf.dtype))
        return MarsState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, real=True),
            last_grad=moments.init_like(params, mu_dtype, moment=1),
            nu_max=moments.init_like(params, nu_dtype, real=True) if amsgrad else None,
        )

    def update_fn(updates: Updates, state: MarsState, params: base.Params | None = None) -> tuple[Updates, MarsState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> dict[str, Any]:
            beta1 = moments.scalar(b1, dtype)
            return {
                "mars": (
                    beta1,
                    moments.scalar(b2, dtype),
                    jnp.sqrt(moments.bias_correction(b2, count, dtype)) * moments.debias(b1, count, dtype),
                    1,
                ),
                "adam": (
                    moments.scalar(adam_b1, dtype),
                    moments.scalar(adam_b2, dtype),
                    jnp.sqrt(moments.bias_correction(adam_b2, count, dtype)) * moments.debias(adam_b1, count, dtype),
                    moments.scalar(adam_learning_rate_factor, dtype),
                ),
                "correction": moments.scalar(gamma, dtype) * beta1 / (1 - beta1),
                "inv_one_minus_b1": 1 / (1 - beta1),
                "eps": moments.scalar(eps, dtype),
                "eps_root": moments.scalar(eps_root, dtype),
            }

        def adam_step(
            m_new: jax.Array, v_compute: jax.Array, vmax_compute: jax.Array | None, x: jax.Array, s: dict[str, Any],
            path: str,
        ) -> tuple[jax.Array, jax.Array, jax.Array | None]:  # fmt: skip
            _, beta2, debiased_root, factor = s[path]
            v_new = moments.ema_sq(x, v_compute, beta2)
            vmax_new = None if vmax_compute is None else jnp.maximum(vmax_compute, v_new)
            inside = v_new if vmax_new is None else vmax_new
            scale = moments.safe_divide(debiased_root * factor, moments.root(inside + s["eps_root"]) + s["eps"])
            return moments.times(m_new, scale), v_new, vmax_new

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array, last: jax.Array, *vmax: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, v_compute, last_compute, *vmax_compute) = moments.to_compute(
                g, m, v, last, *vmax
            )
            s = scalars(dtype)
            vmax_in = vmax_compute[0] if vmax_compute else None
            if not _is_mars_leaf(g, optimize_1d):
                m_new = moments.ema(g_compute, m_compute, s["adam"][0])
                step, v_new, vmax_new = adam_step(m_new, v_compute, vmax_in, g_compute, s, "adam")
            else:
                c = g_compute + moments.times(g_compute - last_compute, s["correction"])
                norm = jnp.sqrt(jnp.sum(moments.abs_sq(c)))
                c = moments.over(c, jnp.maximum(norm, 1))
                m_new = moments.ema(c, m_compute, s["mars"][0])
                v_new, vmax_new = v_compute, vmax_in
                if mars_type == "lion":
                    step = jnp.sign(m_new)
                elif mars_type == "shampoo" and g.ndim >= 2:
                    matrix = moments.times(m_new, s["inv_one_minus_b1"]).reshape(g.shape[0], math.prod(g.shape[1:]))
                    ortho = newton_schulz(matrix, NS_COEFFICIENTS, 5, eps, eps_mode="max", dtype=ns_dtype)
                    step = (ortho.astype(dtype) * _shampoo_scale(g.shape)).reshape(g.shape)
                else:
                    step, v_new, vmax_new = adam_step(m_new, v_compute, vmax_in, c, s, "mars")
            out = [
                step.astype(g.dtype),
                moments.store(m_new, m),
                moments.store(v_new, v),
                moments.store(g_compute, last),
            ]
            return (*out, *(() if vmax_new is None else (moments.store(vmax_new, vmax[0]),)))

        trees = (state.mu, state.nu, state.last_grad) + ((state.nu_max,) if amsgrad else ())
        out = moments.leafwise(leaf, 4 + amsgrad, updates, *trees)
        return out[0], MarsState(count, out[1], out[2], out[3], out[4] if amsgrad else None)

    return optax.GradientTransformation(init_fn, update_fn)


def _route_mask(weight_decay_mask: base.MaskOrFn | None, optimize_1d: bool, mars_leaves: bool) -> Any:
    """The decay mask of one kind of leaf (MARS's or AdamW's), within the user's ``weight_decay_mask``."""

    def mask(tree: Any) -> Any:
        route = jax.tree.map(lambda x: _is_mars_leaf(x, optimize_1d) == mars_leaves, tree)
        user = weight_decay_mask(tree) if callable(weight_decay_mask) else weight_decay_mask
        if user is None:
            return route
        base.check_mask_leaves(user)
        base.check_tree_match(tree, user, base.per_leaf_option("weight_decay_mask"), subject="parameters", shapes=False)
        return jax.tree.map(lambda u, r: bool(u) and r, user, route)

    return mask


@base.check_flags
def mars(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: Any = 0.95,
    b2: Any = 0.99,
    gamma: Any = 0.025,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    mars_type: MarsType = "adamw",
    optimize_1d: bool = False,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.95,
    adam_learning_rate_factor: Any = 1.0,
    adam_weight_decay: Any = None,
    eps_root: Any = 0.0,
    amsgrad: bool = False,
    ns_dtype: Any = None,
    weight_decay_mask: base.MaskOrFn | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""MARS (Make vAriance Reduction Shine): a variance-reduced gradient correction in AdamW, Lion or Shampoo.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big) \quad \text{(MARS's leaves)},
        \qquad
        \theta_t = \theta_{t-1} - \rho\, \eta_t \big( u_t + \lambda_{1d} \theta_{t-1} \big) \quad \text{(AdamW's)}

    with :math:`u_t` the update of :func:`scale_by_mars` (on AdamW's leaves before its factor
    :math:`\rho` = ``adam_learning_rate_factor``). MARS's leaves are those of two or more
    dimensions, or all with ``optimize_1d``; AdamW's the 0-d and 1-d others. The decay is
    decoupled, :math:`\theta \leftarrow (1 - \eta_t\lambda)\theta` before the step.

    Args:
      learning_rate: :math:`\eta_t`, a non-negative number or a schedule ``count -> value``.
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      gamma: :math:`\gamma` >= 0, the strength of the gradient correction.
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      weight_decay: :math:`\lambda` >= 0, the decoupled decay of MARS's leaves (of every leaf
        unless ``adam_weight_decay`` sets AdamW's own).
      mars_type: ``"adamw"``, ``"lion"`` or ``"shampoo"`` (see :func:`scale_by_mars`).
      optimize_1d: give 0-d and 1-d leaves MARS's step too.
      adam_b1: :math:`\beta_1` of the AdamW leaves, in [0, 1).
      adam_b2: :math:`\beta_2` of the AdamW leaves, in [0, 1).
      adam_learning_rate_factor: :math:`\rho` >= 0, the AdamW leaves' learning rate over
        ``learning_rate`` (a schedule scales both).
      adam_weight_decay: :math:`\lambda_{1d}` >= 0, the AdamW leaves' decay; None: ``weight_decay``.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0 (pytorch-optimizer's is 1e-15).
      amsgrad: divide by the running maximum of the second moment (pytorch-optimizer's ``ams_bound``).
      ns_dtype: the dtype of "shampoo"'s Newton–Schulz iteration (see :func:`scale_by_mars`).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay, by ``weight_decay`` or ``adam_weight_decay`` whichever
        applies (a torch parameter group without decay is ``weight_decay=0, weight_decay_1d=0``:
        pytorch-optimizer decays its 1-d leaves by ``weight_decay_1d``, 0.1 by default).
      mu_dtype: storage dtype of the first moment and the previous gradient (default: the
        parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (:math:`|\cdot|^2` and the phase
        per complex coordinate) or ``"real_imag"`` (the real and imaginary parts as two real
        coordinates, as pytorch-optimizer: a complex vector is then a real matrix, a MARS leaf);
        see :func:`as_real_imag`. ``"shampoo"`` refuses complex matrices under ``"modulus"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.mars(3e-3, mars_type="lion", weight_decay=0.1)
      >>> params = {"w": jnp.ones((1, 2))}
      >>> updates, state = opt.update({"w": jnp.array([[0.5, -2.0]])}, opt.init(params), params)
      >>> updates["w"]  # -lr * (sign(m) + 0.1 * params)
      Array([[-0.0033,  0.0027]], dtype=float32)

    References:
      Yuan, Liu, Wu, Zhou, Gu & Yang, "MARS: Unleashing the Power of Variance Reduction for
      Training Large Models", ICML 2025, https://arxiv.org/abs/2411.10438.

      Reference packages: ``pytorch_optimizer.MARS(lr, betas=(b1, b2), gamma, mars_type,
      optimize_1d, lr_1d=adam_learning_rate_factor * lr, betas_1d=(adam_b1, adam_b2), eps,
      weight_decay, weight_decay_1d=adam_weight_decay, ams_bound=amsgrad)`` is this with
      ``eps_root=1e-15``; its defaults differ in ``weight_decay_1d=0.1`` (pass
      ``adam_weight_decay=0.1``) and its ``lr_1d=3e-3`` is absolute (the factor is
      ``lr_1d / lr`` at construction, then follows the schedule). Its "shampoo" runs
      Newton–Schulz in bfloat16 (``ns_dtype=jnp.bfloat16``). Not reproduced: its coupled decay
      (``weight_decouple=False`` adds the decay to the gradient after the step used it, so that
      it enters only the next step's correction through the stored gradient), ``fixed_decay``
      and ``cautious`` (``adaopt.cautious`` masks the whole direction: the same for "adamw", not
      for "lion", whose sign drops the rescaling, nor for "shampoo").
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    if adam_weight_decay is not None:
        base.check_nonnegative("adam_weight_decay", adam_weight_decay)
    base.check_mask(weight_decay_mask)
    core = scale_by_mars(
        b1, b2, gamma, eps, eps_root, mars_type=mars_type, optimize_1d=optimize_1d, adam_b1=adam_b1,
        adam_b2=adam_b2, adam_learning_rate_factor=adam_learning_rate_factor, amsgrad=amsgrad, ns_dtype=ns_dtype,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    aux_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
    # AdamW's leaves step by factor * (u + decay * theta): the core applied the factor to u.
    aux_factor = adam_learning_rate_factor
    scaled_aux_decay = 0.0 if base.is_zero(aux_decay) else aux_decay * aux_factor
    aux = base.add_decayed_weights(scaled_aux_decay, _route_mask(weight_decay_mask, optimize_1d, mars_leaves=False))
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        _route_mask(weight_decay_mask, optimize_1d, mars_leaves=True),
        decoupled_weight_decay=True,
        after_decay=(aux,),
        complex_convention=complex_convention,
    )
