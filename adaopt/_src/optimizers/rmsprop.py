"""RMSProp: steps scaled by an EMA of squared gradients, optionally centered and with momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, storage
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.optimizers.sgd import scale_by_momentum


class RmsState(NamedTuple):
    r"""State of :func:`scale_by_rms`.

    Attributes:
      nu: :math:`v_t`, the EMA of the squared gradients, mirroring the parameters.
      mu: :math:`\bar g_t`, the EMA of the gradients when centered, else None.
    """

    nu: Updates  # EMA of squared gradients
    mu: Updates | None = None  # EMA of gradients when centered, else None


class DebiasedRmsState(NamedTuple):
    """State of :func:`scale_by_debiased_rms`: the step count and the second moment.

    Attributes:
      count: :math:`t`, the number of updates so far, a saturating int32.
      nu: :math:`v_t`, the second moment, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    nu: Updates


@base.check_flags
def scale_by_debiased_rms(
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    debias: bool = True,
    rectify: bool = False,
    eps_mode: moments.EpsMode = "add",
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Divide by the root of the (bias-corrected) second moment: Adam's step without momentum.

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \text{update} &= \begin{cases}
            g_t \,/\, \big(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\big) & \text{debias} \\
            g_t \,/\, \big(\sqrt{v_t} + \epsilon\big) & \text{otherwise} \\
            g_t & \text{rectify and } \rho_t \le 4 \text{ (RAdam's SGD phase)}
        \end{cases}

    Args:
      b2: decay of the second moment, in [0, 1).
      eps: added to the root, >= 0.
      debias: divide the second moment by :math:`1 - \beta_2^t`.
      rectify: pass the gradient through unscaled while RAdam's :math:`\rho_t \le 4`.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`, heavyball's form).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DebiasedRmsState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> block = adaopt.scale_by_debiased_rms(eps=0.0)
      >>> step, state = block.update(jnp.array([2.0, -0.5]), block.init(jnp.zeros(2)))
      >>> step  # the first debiased step is sign(g), up to rounding
      Array([ 0.99999..., -0.99999...], dtype=float32)

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
      NeurIPS 2024, https://arxiv.org/abs/2405.15682 (the direction of Schedule-Free AdamW).

      Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
      Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265 (the rectified phase).
    """
    base.check_decay("b2", b2)
    base.check_nonnegative("eps", eps)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    moments.check_storage("nu_dtype", nu_dtype)

    def init_fn(params: base.Params) -> DebiasedRmsState:
        return DebiasedRmsState(moments.zero_count(), moments.init_like(params, nu_dtype, real=True))

    def update_fn(
        updates: Updates, state: DebiasedRmsState, params: base.Params | None = None
    ) -> tuple[Updates, DebiasedRmsState]:
        del params
        count = moments.safe_increment(state.count)

        def leaf(g: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (v32,) = moments.to_compute(g, v)
            v_new = moments.ema_sq(g32, v32, moments.scalar(b2, dtype))
            bc2 = moments.bias_correction(b2, count, dtype) if debias else 1
            step = moments.times(g32, moments.inv_root(v_new / bc2, moments.scalar(eps, dtype), 0, eps_mode))
            if rectify:
                _, rho, _ = moments.radam_rho(b2, count, dtype)
                step = jnp.where(rho > 4, step, g32)
            return step.astype(g.dtype), moments.store(v_new, v)

        step, nu = moments.leafwise(leaf, 2, updates, state.nu)
        return step, DebiasedRmsState(count, nu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def scale_by_rms(
    decay: Any = 0.99,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    centered: bool = False,
    initial_scale: Any = 0.0,
    eps_mode: moments.EpsMode = "add",
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""RMSProp's block: each coordinate divided by the root of an EMA of its squared gradients.

    .. math::
        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \;\text{(centered)}, \quad
        \text{update} = \frac{g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon}

    (:math:`\bar g_t = 0` when not centered).

    Args:
      decay: :math:`\alpha` in [0, 1) (torch's ``alpha``).
      eps: :math:`\epsilon`, added to the root (torch's placement), >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root (optax's), >= 0.
      centered: divide by the root of the variance rather than of the second moment.
      initial_scale: :math:`v_0` >= 0.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`).
      nu_dtype: storage dtype of both EMAs (default: the parameter's, at least float32): a dtype, ``"bfloat16_sr"``
        or an :class:`adaopt.Blockwise`. Centered, not blockwise codes: their rounding, about 1% of a block's
        largest value, exceeds a coordinate's variance, the difference of the two EMAs, wherever the gradients
        are steady. A variance rounded below 0 is taken as 0; in bfloat16 (a rounding of 2**-8 of each EMA) that
        happens where it is below about 1% of the second moment, and the step is then ``g / eps``: keep
        float32 moments for centered RMSProp on such gradients.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`RmsState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_rms(decay=0.75, eps=0.0)
      >>> g = jnp.array([2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates, state.nu  # 2 / sqrt(0.25 * 4)
      (Array([2.], dtype=float32), Array([1.], dtype=float32))

    References:
      Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", Lecture 6e, 2012,
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf.

      Graves, "Generating Sequences With Recurrent Neural Networks", 2013,
      https://arxiv.org/abs/1308.0850 (centered).

      Reference packages: :func:`rmsprop` gives the arguments that reproduce torch and optax.
    """
    base.check_decay("decay", decay)
    base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_root", eps_root)
    base.check_nonnegative("initial_scale", initial_scale)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    moments.check_storage("nu_dtype", nu_dtype)
    if centered and isinstance(storage.resolve(nu_dtype), storage.Blockwise):
        raise base.HyperparameterError(
            f"nu_dtype={nu_dtype!r} with centered=True: the centered step divides by the root of the variance "
            "v - m^2, the difference of the two EMAs, which a block's rounding (about 1% of its largest value) "
            "exceeds where the gradients are steady: the steps blow up or turn NaN. Store them as float32, bfloat16 "
            "or 'bfloat16_sr' (relative roundings), or use centered=False."
        )

    def init_fn(params: base.Params) -> RmsState:
        mu = moments.init_like(params, nu_dtype) if centered else None
        return RmsState(moments.init_like(params, nu_dtype, initial_scale, real=True), mu)

    def update_fn(updates: Updates, state: RmsState, params: base.Params | None = None) -> tuple[Updates, RmsState]:
        del params

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, Any, Any]:
            return moments.scalar(decay, dtype), moments.scalar(eps, dtype), moments.scalar(eps_root, dtype)

        def leaf(g: jax.Array, v: jax.Array, *m: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (v32, *m32) = moments.to_compute(g, v, *m)
            alpha, e, e_root = scalars(dtype)
            v_new = moments.ema_sq(g32, v32, alpha)
            m_new = tuple(moments.ema(g32, x, alpha) for x in m32)
            # At least 0: v >= m^2 holds exactly, not always after their roundings (a stored moment's, float32's).
            variance = jnp.maximum(v_new - moments.abs_sq(m_new[0]), 0) if centered else v_new
            step = moments.times(g32, moments.inv_root(variance, e, e_root, eps_mode))
            return (step.astype(g.dtype), moments.store(v_new, v), *(moments.store(x, m[0]) for x in m_new))

        trees = (state.nu, state.mu) if centered else (state.nu,)
        out = moments.leafwise(leaf, 2 + centered, updates, *trees)
        return out[0], RmsState(out[1], out[2] if centered else None)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    decay: Any = 0.99,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    momentum: Any = None,
    *,
    centered: bool = False,
    eps_root: Any = 0.0,
    initial_scale: Any = 0.0,
    nesterov: bool = False,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    bias_correction: bool = False,
    eps_mode: moments.EpsMode = "add",
    nu_dtype: Any = None,
    accumulator_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp, as torch defines it: optional centering, momentum on the scaled gradient.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad\text{(coupled decay)} \\
        v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2, \qquad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \;\text{(centered, else 0)} \\
        b_t &= \mu b_{t-1} + \frac{g_t}{\sqrt{v_t - \bar g_t^2 + \epsilon_{root}} + \epsilon}, \qquad
        \theta_t = \theta_{t-1} - \eta_t b_t

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      decay: :math:`\alpha` in [0, 1) (torch's ``alpha``).
      eps: :math:`\epsilon`, added to the root (torch's placement), >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0 (coupled L2 by default, as torch).
      momentum: :math:`\mu` in [0, 1), or None for no momentum buffer. A number, even 0, keeps
        one, so that the state's structure does not depend on the value.
      centered: divide by the root of the variance rather than of the second moment.
      eps_root: :math:`\epsilon_{root}`, added inside the root (optax's placement), >= 0.
      initial_scale: :math:`v_0` >= 0.
      nesterov: Nesterov momentum on the scaled gradient (optax's option; requires ``momentum > 0``).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add :math:`\lambda\theta` to the step instead of to the gradient.
      bias_correction: divide :math:`v_t` by :math:`1 - \alpha^t`, as Adam does
        (:func:`scale_by_debiased_rms`; not with ``centered``, ``eps_root`` or ``initial_scale``).
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root, torch's) or ``"max"`` (the root
        floored at :math:`\epsilon`, heavyball's).
      nu_dtype: storage dtype of the EMAs :math:`v` and :math:`\bar g`.
      accumulator_dtype: storage dtype of the momentum buffer :math:`b`.
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.rmsprop(0.01, decay=0.75, eps=0.0)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([2.0]), opt.init(params), params)
      >>> updates  # -learning_rate * 2 / sqrt(0.25 * 4)
      Array([-0.02], dtype=float32)

    References:
      Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", Lecture 6e, 2012,
      https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf.

      Graves, "Generating Sequences With Recurrent Neural Networks", 2013,
      https://arxiv.org/abs/1308.0850 (centered).

      Reference packages: ``torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum,
      centered)`` is this with the same numbers (its ``momentum=0`` is ``None`` here, and
      ``complex_convention="real_imag"``); ``optax.rmsprop(lr, decay, eps=e, centered,
      momentum)`` is this with ``eps=0, eps_root=e``. heavyball's ``RMSprop(lr, betas=(_, decay),
      eps, weight_decay)``, "debiased RMSprop", is this with ``bias_correction=True,
      eps_mode="max", decoupled_weight_decay=True`` and no momentum.
    """
    base.check_common(learning_rate, weight_decay)
    moments.check_storage("accumulator_dtype", accumulator_dtype)
    base.check_complex_convention(complex_convention)
    if bias_correction:
        others = {"centered": centered, "eps_root": eps_root, "initial_scale": initial_scale}
        taken = [name for name, value in others.items() if base.known_nonzero(value)]
        if taken:
            raise base.HyperparameterError(
                f"rmsprop(bias_correction=True) debiases an EMA started at 0 around 0: it does not take {taken} "
                f"(got {', '.join(f'{k}={others[k]!r}' for k in taken)}). Leave them at their defaults."
            )
        core = scale_by_debiased_rms(decay, eps, eps_mode=eps_mode, nu_dtype=nu_dtype)
    else:
        core = scale_by_rms(
            decay, eps, eps_root, centered=centered, initial_scale=initial_scale, eps_mode=eps_mode, nu_dtype=nu_dtype
        )
    base.check_nesterov(momentum, nesterov)
    if momentum is not None:
        core = optax.chain(core, scale_by_momentum(momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype))
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
