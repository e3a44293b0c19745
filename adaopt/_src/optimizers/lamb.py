"""LAMB: Adam's step rescaled per leaf by the ratio of the parameter norm to the step norm."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.adam import scale_by_adam


def scale_by_trust_ratio(max_param_norm: Any = None, eps: Any = 0.0) -> optax.GradientTransformation:
    r"""Scale each leaf's update by the ratio of the parameter norm to the update norm (LAMB's trust ratio).

    .. math::
        \text{update} = \frac{\phi(\|\theta\|)}{\|u\| + \epsilon}\, u \quad (1 \text{ where either norm is } 0),
        \qquad \phi(x) = \min(x, N)

    per leaf, with :math:`u` the incoming update of the leaf and :math:`\theta` its parameter.
    Needs ``params`` in ``update``.

    Args:
      max_param_norm: :math:`N` > 0, clips the parameter norm (None: no clipping).
      eps: :math:`\epsilon` >= 0, added to the update norm.

    Returns:
      An ``optax.GradientTransformation`` (stateless) whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_trust_ratio()
      >>> params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)}
      >>> updates, _ = tx.update({"w": jnp.array([0.0, 1.0]), "b": jnp.ones(2)}, tx.init(params), params)
      >>> updates["w"], updates["b"]  # |w| / |u| = 5; a zero parameter norm leaves b's update as it is
      (Array([0., 5.], dtype=float32), Array([1., 1.], dtype=float32))

    References:
      You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch
      Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
      https://arxiv.org/abs/1904.00962.

      Reference packages: :func:`lamb` gives the arguments that reproduce optax and pytorch-optimizer.
    """
    if max_param_norm is not None:
        base.check_scalar("max_param_norm", max_param_norm, low=0.0, low_open=True)
    base.check_nonnegative("eps", eps)

    def update_fn(
        updates: Updates, state: optax.EmptyState, params: base.Params | None = None
    ) -> tuple[Updates, optax.EmptyState]:
        params = base.require_params(params, "scale_by_trust_ratio (LAMB)")

        def leaf(u: jax.Array, p: jax.Array) -> tuple[jax.Array]:
            dtype = moments.compute_dtype(u.dtype, p.dtype)
            p_norm = numerics.norm(p, dtype)
            if max_param_norm is not None:
                p_norm = jnp.minimum(p_norm, moments.scalar(max_param_norm, dtype))
            u_norm = numerics.norm(u, dtype)
            # A zero norm (either one) leaves the update as it is: ratio 1, eps or not.
            ok = (p_norm > 0) & (u_norm > 0)
            ratio = moments.safe_divide(p_norm, jnp.where(ok, u_norm + moments.scalar(eps, dtype), 0), fallback=1)
            return (moments.times(moments.in_precision(u, dtype), ratio).astype(u.dtype),)

        (scaled,) = moments.leafwise(leaf, 1, updates, params, what="parameters")
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class StepCountState(NamedTuple):
    """State of LAMB's debiasing of the whole step (``debias="step"``): the step count."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _scale_by_first_moment_correction(b1: Any) -> optax.GradientTransformation:
    """Divide the whole update by :math:`1 - \\beta_1^t` (pytorch-optimizer's LAMB debiasing)."""

    def update_fn(
        updates: Updates, state: StepCountState, params: base.Params | None = None
    ) -> tuple[Updates, StepCountState]:
        del params
        count = moments.safe_increment(state.count)
        scaled = jax.tree.map(
            lambda u: moments.over(
                moments.in_precision(u, moments.compute_dtype(u.dtype)),
                moments.bias_correction(b1, count, moments.compute_dtype(u.dtype)),
            ).astype(u.dtype),
            updates,
        )
        return scaled, StepCountState(count)

    return optax.GradientTransformation(lambda params: StepCountState(moments.zero_count()), update_fn)


def lamb(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-6,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    debias: Literal["moments", "step"] = "moments",
    max_param_norm: Any = None,
    trust_eps: Any = 0.0,
    weight_decay_mask: base.MaskOrFn | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""LAMB: layer-wise adaptive moments, for large batches.

    .. math::
        r_t &= \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda \theta_{t-1}, \qquad
        \theta_t = \theta_{t-1} - \eta_t\, c_t\, \frac{\min(\|\theta_{t-1}\|, N)}{\|r_t\| + \epsilon_{trust}}\, r_t

    per leaf (the ratio is 1 where a norm is zero). With ``debias="moments"`` (the paper's
    algorithm, and optax's), :math:`\hat m, \hat v` are the bias-corrected moments and
    :math:`c_t = 1`; with ``debias="step"`` (pytorch-optimizer's), they are the raw moments and
    :math:`c_t = 1 / (1 - \beta_1^t)`.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient :math:`\lambda` >= 0 of the decay, which enters :math:`r_t`,
        inside the trust ratio.
      debias: "moments" or "step", as above.
      max_param_norm: :math:`N`, clips the parameter norm (None: no clipping; pytorch-optimizer: 10).
      trust_eps: :math:`\epsilon_{trust}` >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.lamb(1e-3)
      >>> params = jnp.array([3.0, 4.0])
      >>> updates, state = opt.update(jnp.array([1.0, 1.0]), opt.init(params), params)
      >>> updates.round(6)  # Adam's first direction (1, 1), rescaled to the norm 5 of the parameters
      Array([-0.003536, -0.003536], dtype=float32)

    References:
      You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch
      Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
      https://arxiv.org/abs/1904.00962.

      Reference packages: ``optax.lamb`` is this with the defaults.
      ``pytorch_optimizer.Lamb(lr, betas, eps=e, weight_decay, weight_decouple=False)`` is this
      with ``eps=e, debias="step", max_param_norm=10, trust_eps=e``. (Its default
      ``weight_decouple=True`` decays the parameters before the trust ratio, outside it.)
    """
    base.check_complex_convention(complex_convention)
    base.check_common(learning_rate, weight_decay)
    base.check_choice("debias", debias, ("moments", "step"))
    base.check_nonnegative("trust_eps", trust_eps)  # named here: scale_by_trust_ratio calls it eps
    core = scale_by_adam(
        b1, b2, eps, eps_root, bias_correction=debias == "moments", mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    after = [scale_by_trust_ratio(max_param_norm, trust_eps)]
    if debias == "step":
        after.append(_scale_by_first_moment_correction(b1))
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=True,
        after_decay=tuple(after),
        complex_convention=complex_convention,
    )
