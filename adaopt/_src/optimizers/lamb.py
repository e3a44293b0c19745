"""LAMB: Adam's step rescaled per leaf by the ratio of the parameter norm to the step norm."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.adam import scale_by_adam


def scale_by_trust_ratio(max_param_norm: Any = None, eps: Any = 0.0) -> optax.GradientTransformation:
    r"""Scale each leaf's update :math:`u` by :math:`\phi(\|\theta\|) / (\|u\| + \epsilon)`.

    :math:`\phi` clips the parameter norm at ``max_param_norm`` (None: no clipping); the ratio
    is 1 where either norm is zero. Needs ``params`` in ``update``.
    """
    if max_param_norm is not None:
        base.check_scalar("max_param_norm", max_param_norm, low=0.0, low_open=True)
    base.check_nonnegative("eps", eps)

    def update_fn(
        updates: Updates, state: optax.EmptyState, params: base.Params | None = None
    ) -> tuple[Updates, optax.EmptyState]:
        if params is None:
            raise ValueError("scale_by_trust_ratio (LAMB) needs the parameters: call update(grads, state, params).")

        def leaf(u: jax.Array, p: jax.Array) -> tuple[jax.Array]:
            dtype = moments.compute_dtype(u.dtype, p.dtype)
            u32 = u.astype(dtype)
            p_norm = jnp.linalg.norm(p.astype(dtype).ravel())
            if max_param_norm is not None:
                p_norm = jnp.minimum(p_norm, moments.scalar(max_param_norm, dtype))
            u_norm = jnp.linalg.norm(u32.ravel())
            ok = (p_norm > 0) & (u_norm > 0)
            ratio = jnp.where(ok, p_norm / jnp.where(ok, u_norm + moments.scalar(eps, dtype), 1), 1)
            return ((u32 * ratio).astype(u.dtype),)

        (scaled,) = moments.leafwise(leaf, 1, updates, params, what="parameters")
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class StepCountState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _scale_by_first_moment_correction(b1: Any) -> optax.GradientTransformation:
    """Divide the whole update by :math:`1 - \\beta_1^t` (pytorch-optimizer's LAMB debiasing)."""

    def update_fn(
        updates: Updates, state: StepCountState, params: base.Params | None = None
    ) -> tuple[Updates, StepCountState]:
        del params
        count = moments.safe_increment(state.count)
        scaled = jax.tree.map(
            lambda u: (
                u.astype(moments.compute_dtype(u.dtype))
                / moments.bias_correction(b1, count, moments.compute_dtype(u.dtype))
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
      learning_rate, b1, b2, eps, eps_root, weight_decay, weight_decay_mask, mu_dtype,
        nu_dtype: as :func:`adaopt.adamw`; the decay enters :math:`r_t`, inside the trust ratio.
      debias: "moments" or "step", as above.
      max_param_norm: :math:`N`, clips the parameter norm (None: no clipping; pytorch-optimizer: 10).
      trust_eps: :math:`\epsilon_{trust}` >= 0.

    Reference: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020. ``optax.lamb`` matches the defaults.
    ``pytorch_optimizer.Lamb(lr, betas, eps=e, weight_decay, weight_decouple=False)`` matches
    ``eps=e, debias="step", max_param_norm=10, trust_eps=e``. (Its default
    ``weight_decouple=True`` decays the parameters before the trust ratio, outside it.)
    """
    base.check_common(learning_rate, weight_decay)
    base.check_choice("debias", debias, ("moments", "step"))
    core = scale_by_adam(
        b1, b2, eps, eps_root, bias_correction=debias == "moments", mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    after = [scale_by_trust_ratio(max_param_norm, trust_eps)]
    if debias == "step":
        after.append(_scale_by_first_moment_correction(b1))
    return base.assemble(
        core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay=True, after_decay=tuple(after)
    )
