"""The Adam family: Adam, AdamW, AMSGrad, AdaBelief, Yogi, Adamax, NAdam, NAdamW, RAdam.

Adam, AMSGrad, AdaBelief and Yogi differ only in how the second moment is updated (and
AMSGrad in a running maximum of it): one block, :func:`scale_by_adam`, holds them all. Adamax,
NAdam and RAdam change the step itself and have blocks of their own built on the same moments.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.layouts import cpu_kernels

SecondMoment = Literal["adam", "belief", "yogi"]
AmsgradMax = Literal["raw", "debiased"]


class AdamState(NamedTuple):
    """State of :func:`scale_by_adam` (and of :func:`scale_by_radam`): the step count and the moments.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the first moment :math:`m_t`, mirroring the parameters.
      nu: the second moment :math:`v_t`, mirroring the parameters.
      nu_max: AMSGrad's running maximum of the second moment, or None without AMSGrad.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    nu_max: Updates | None = None  # AMSGrad's running maximum of the second moment, else None


def check_moments(b1: Any, b2: Any, eps: Any, eps_root: Any, mu_dtype: Any, nu_dtype: Any) -> None:
    """The arguments every optimizer of two EMAs shares: the decays, the epsilons and the moments' dtypes."""
    base.check_decay("b1", b1)
    base.check_decay("b2", b2)
    base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_root", eps_root)
    moments.check_storage("mu_dtype", mu_dtype)
    moments.check_storage("nu_dtype", nu_dtype)


@base.check_flags
def scale_by_adam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    second_moment: SecondMoment = "adam",
    amsgrad: AmsgradMax | None = None,
    bias_correction: bool = True,
    initial_accumulator_value: Any = 0.0,
    eps_on_raw_root: bool = False,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescale updates by Adam's moments; the one block behind Adam, AMSGrad, AdaBelief and Yogi.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \begin{cases}
            \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 & \text{adam} \\
            \beta_2 v_{t-1} + (1 - \beta_2) (g_t - m_t)^2 + \epsilon_{root} & \text{belief} \\
            v_{t-1} - (1 - \beta_2)\,\mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2 & \text{yogi}
        \end{cases} \\
        \hat v_t &= \begin{cases}
            v_t / (1 - \beta_2^t) & \\
            \max_{s \le t} v_s / (1 - \beta_2^t) & \text{amsgrad="raw" (torch)} \\
            \max_{s \le t} \big(v_s / (1 - \beta_2^s)\big) & \text{amsgrad="debiased" (optax)}
        \end{cases} \\
        u_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
        \quad\text{or, with eps\_mode="max",}\quad
        \frac{m_t / (1 - \beta_1^t)}{\max(\sqrt{\hat v_t + \epsilon_{root}}, \epsilon)}

    (for "belief", :math:`\epsilon_{root}` is accumulated into :math:`v_t` and not added again;
    with ``eps_on_raw_root``, :math:`\epsilon` is :math:`\epsilon / \sqrt{1 - \beta_2^t}`: added to the
    root of the raw :math:`v_t` before the bias correction, Hugging Face's ``AdamW``).
    Dividing by :math:`1 - \beta^t` is done as a multiplication by its reciprocal, computed once
    per step (:func:`adaopt._src.moments.debias`), here and in the other blocks of this module.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      eps_root: added inside the root, >= 0.
      second_moment: "adam", "belief" (AdaBelief) or "yogi".
      amsgrad: None, or which running maximum to keep: "raw" (torch) or "debiased" (optax).
      bias_correction: divide the moments by :math:`1 - \beta^t`; False gives the AMSGrad
        paper's update.
      initial_accumulator_value: initial value of both moments (Yogi's starts at 1e-6).
      eps_on_raw_root: add :math:`\epsilon` to :math:`\sqrt{v_t}` before its bias correction,
        :math:`\frac{m_t}{1 - \beta_1^t} \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}`
        (Hugging Face's ``AdamW``, which GaLore's package copies).
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root: torch, optax) or ``"max"`` (the root
        floored at :math:`\epsilon`: heavyball's Adam-type optimizers).
      mu_dtype: storage dtype of the first moment; None keeps the parameter's, widened to
        float32 for half precision.
      nu_dtype: storage dtype of the second moment (and of AMSGrad's maximum); None keeps the
        parameter's, widened to float32 for half precision.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdamState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adam()
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(4)  # the first direction is sign(g), up to eps and float32's 1 - 0.999
      Array([ 1., -1.], dtype=float32)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980.

      Reference packages: :func:`adam`, :func:`amsgrad`, :func:`adabelief` and :func:`yogi` give
      the arguments that reproduce torch, optax and pytorch-optimizer.
    """
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    base.check_choice("second_moment", second_moment, ("adam", "belief", "yogi"))
    base.check_choice("amsgrad", amsgrad, (None, "raw", "debiased"))
    base.check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))
    eps_in_root = 0.0 if second_moment == "belief" else eps_root

    def init_fn(params: base.Params) -> AdamState:
        return AdamState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype, initial_accumulator_value),
            nu=moments.init_like(params, nu_dtype, initial_accumulator_value, real=True),
            nu_max=moments.init_like(params, nu_dtype, real=True) if amsgrad else None,
        )

    def update_fn(updates: Updates, state: AdamState, params: base.Params | None = None) -> tuple[Updates, AdamState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            debias1 = moments.debias(b1, count, dtype) if bias_correction else 1
            debias2 = moments.debias(b2, count, dtype) if bias_correction else 1
            e, e_root = moments.scalar(eps, dtype), moments.scalar(eps_in_root, dtype)
            if eps_on_raw_root:
                e = e * jnp.sqrt(debias2)
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                debias1,
                debias2,
                e,
                e_root,
                moments.scalar(eps_root, dtype),
            )

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array, *v_max: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (m32, v32) = moments.to_compute(g, m, v)
            beta1, beta2, debias1, debias2, e, e_root, belief_root = scalars(dtype)
            m_new = moments.ema(g32, m32, beta1)
            if second_moment == "adam":
                v_new = moments.ema_sq(g32, v32, beta2)
            elif second_moment == "belief":
                v_new = moments.ema_sq(g32 - m_new, v32, beta2) + belief_root
            else:
                g2 = moments.abs_sq(g32)
                v_new = v32 - (1 - beta2) * jnp.sign(v32 - g2) * g2
            new_max: tuple[jax.Array, ...] = ()
            if amsgrad is None:
                v_hat = v_new * debias2
            elif amsgrad == "raw":
                running = jnp.maximum(v_max[0].astype(dtype), v_new)
                v_hat = running * debias2
                new_max = (moments.store(running, v),)
            else:
                v_hat = jnp.maximum(v_max[0].astype(dtype), v_new * debias2)
                new_max = (moments.store(v_hat, v),)
            step = moments.times(moments.times(m_new, debias1), moments.inv_root(v_hat, e, e_root, eps_mode))
            return (step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v), *new_max)

        def native(g: jax.Array, m: Any, v: Any, *v_max: Any) -> tuple[Any, ...] | None:
            """The leaf's step by adaopt's CPU kernel where it applies (quantized moments), else None."""
            if eps_mode != "add" or not cpu_kernels.adam_kernel_applies(
                g, m, v, second_moment=second_moment, amsgrad=amsgrad
            ):
                return None
            beta1, beta2, debias1, debias2, e, e_root, _ = scalars(jnp.float32)
            return cpu_kernels.adam_step(
                g, m, v, b1=beta1, b2=beta2, debias1=debias1, debias2=debias2, eps=e, eps_root=e_root
            )

        leaf.native = native  # type: ignore[attr-defined]  # read by storage.step_leaf
        trees = (state.mu, state.nu) + ((state.nu_max,) if amsgrad else ())
        out = moments.leafwise(leaf, 3 + bool(amsgrad), updates, *trees)
        return out[0], AdamState(count, out[1], out[2], out[3] if amsgrad else None)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Adam: steps scaled per parameter by bias-corrected first and second moments.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta_t \Big( \frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
            \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \Big)

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add the decay to the step (AdamW) instead of to the gradient (L2).
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root, as above) or ``"max"`` (the root
        floored at :math:`\epsilon`, heavyball's form); see :func:`scale_by_adam`.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adam(1e-3)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> updates["w"].round(6)  # the first step is -learning_rate * sign(g), up to eps
      Array([-0.001, -0.001, -0.001], dtype=float32)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980.

      Reference packages: ``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay)`` is this
      with the same numbers; ``optax.adam`` is this with ``weight_decay=0``.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adam(b1, b2, eps, eps_root, eps_mode=eps_mode, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 1e-2,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW: :func:`adam` with decoupled weight decay, scaled by the learning rate.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \Big( \frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon} + \lambda \theta_{t-1} \Big)

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient :math:`\lambda` of the decoupled decay, >= 0; 0.01 by default, as in torch.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root, as above) or ``"max"`` (the root
        floored at :math:`\epsilon`, heavyball's form); see :func:`scale_by_adam`.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adamw(1e-3, weight_decay=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * (sign(g) + 0.1 * params), up to eps
      Array([-0.0011, -0.0008], dtype=float32)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
      https://arxiv.org/abs/1711.05101.

      Reference packages: ``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay)`` and
      ``optax.adamw`` (same arguments) follow the same trajectory; ``heavyball.AdamW`` (the same
      arguments) is this with ``eps_mode="max"``.
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root, weight_decay,
        weight_decay_mask=weight_decay_mask, decoupled_weight_decay=True, eps_mode=eps_mode, mu_dtype=mu_dtype,
        nu_dtype=nu_dtype, complex_convention=complex_convention,
    )  # fmt: skip


@base.check_flags
def amsgrad(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    max_of: AmsgradMax = "raw",
    bias_correction: bool = True,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AMSGrad: Adam whose second moment never decreases (a running maximum).

    .. math::
        \hat v_t = \max_{s \le t} v_s / (1 - \beta_2^t) \;\text{("raw")} \quad\text{or}\quad
        \max_{s \le t} \frac{v_s}{1 - \beta_2^s} \;\text{("debiased")}, \qquad
        \theta_t = \theta_{t-1} - \eta_t \frac{m_t / (1 - \beta_1^t)}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      max_of: "raw", the maximum of the raw second moments, then debiased, as
        ``torch.optim.Adam(amsgrad=True)``; or "debiased", the maximum of debiased moments, as
        ``optax.amsgrad``.
      bias_correction: False gives the paper's Algorithm 2 (no bias correction at all), as
        ``optax.scale_by_amsgrad(bias_correction_mu=False, bias_correction_nu=False)``.
      decoupled_weight_decay: add the decay to the step instead of to the gradient.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, adaopt
      >>> opt = adaopt.amsgrad(1e-3)
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> for g in (1.0, 0.0):  # the second moment decays; its maximum does not
      ...     updates, state = opt.update(jnp.array([g]), state, params)
      >>> optax.tree.get(state, "nu"), optax.tree.get(state, "nu_max")
      (Array([0.000999], dtype=float32), Array([0.001], dtype=float32))

    References:
      Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018,
      https://openreview.net/forum?id=ryQu7f-RZ.

      Reference packages: ``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay,
      amsgrad=True)`` is this with ``max_of="raw"`` and the same numbers; ``optax.amsgrad`` is
      this with ``max_of="debiased"``, ``eps_root`` as optax's and no decay.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    base.check_choice("max_of", max_of, ("raw", "debiased"))
    core = scale_by_adam(
        b1, b2, eps, eps_root, amsgrad=max_of, bias_correction=bias_correction, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


@base.check_flags
def adabelief(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-16,
    eps_root: Any = 1e-16,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBelief: Adam with the variance of the gradient around its EMA (the "belief").

    .. math::
        s_t = \beta_2 s_{t-1} + (1 - \beta_2)(g_t - m_t)^2 + \epsilon_{root}, \qquad
        \theta_t = \theta_{t-1} - \eta_t \Big( \frac{m_t / (1 - \beta_1^t)}{\sqrt{s_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda \theta_{t-1} \Big)

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, accumulated into :math:`s_t` at every step, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: decoupled by default, as in the authors' package; False adds the
        decay to the gradient.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adabelief(1e-3)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(params), params)
      >>> updates.round(6)  # the first belief is (0.9 g)^2: a step of learning_rate / 0.9
      Array([-0.001111], dtype=float32)

    References:
      Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief Optimizer:
      Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020,
      https://arxiv.org/abs/2010.07468.

      Reference packages: ``pytorch_optimizer.AdaBelief(lr, betas, eps=e, weight_decay,
      weight_decouple=decoupled_weight_decay)`` is this with ``eps=e``, ``eps_root=e``; its
      ``fixed_decay``, ``rectify`` (with ``n_sma_threshold`` and ``degenerated_to_sgd``) and
      ``ams_bound`` are not reproduced. ``optax.adabelief`` is this with the same eps, eps_root and
      no decay.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adam(b1, b2, eps, eps_root, second_moment="belief", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


@base.check_flags
def yogi(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-3,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    initial_accumulator_value: Any = 1e-6,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Yogi: Adam whose second moment moves additively, by at most :math:`(1 - \beta_2) g^2`.

    .. math::
        v_t = v_{t-1} - (1 - \beta_2)\,\mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2, \qquad
        \theta_t = \theta_{t-1} - \eta_t \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}

    with both moments starting at ``initial_accumulator_value``.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      initial_accumulator_value: the initial value of both moments, >= 0.
      decoupled_weight_decay: decoupled by default; False adds the decay to the gradient.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.yogi(1e-2)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(params), params)
      >>> updates.round(5)  # about -learning_rate: eps = 1e-3 takes a little off
      Array([-0.00999], dtype=float32)

    References:
      Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex Optimization",
      NeurIPS 2018, https://papers.nips.cc/paper/8186-adaptive-methods-for-nonconvex-optimization.

      Reference packages: ``pytorch_optimizer.Yogi(lr, betas, initial_accumulator, weight_decay,
      eps, weight_decouple=decoupled_weight_decay)`` and ``optax.yogi`` are this with the same
      numbers; pytorch-optimizer's ``fixed_decay`` is not reproduced.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adam(
        b1, b2, eps, eps_root, second_moment="yogi", initial_accumulator_value=initial_accumulator_value,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


class AdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: the step count, the first moment and the weighted infinity norm.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the first moment :math:`m_t`, mirroring the parameters.
      nu: the exponentially weighted infinity norm :math:`u_t`, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates  # exponentially weighted infinity norm


def scale_by_adamax(
    b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, *, mu_dtype: Any = None, nu_dtype: Any = None
) -> optax.GradientTransformation:
    r"""Adamax's block: the step divided by an exponentially weighted infinity norm.

    .. math::
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \qquad
        \text{update} = \frac{m_t / (1 - \beta_1^t)}{u_t} \quad (0 \text{ where } u_t = 0)

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: added to :math:`|g_t|` inside the maximum, >= 0.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the infinity norm (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdamaxState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adamax()
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(6)  # the first direction is sign(g), up to eps
      Array([ 1., -1.], dtype=float32)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980. Section 7.

      Reference packages: :func:`adamax` gives the arguments that reproduce torch and optax.
    """
    check_moments(b1, b2, eps, 0.0, mu_dtype, nu_dtype)

    def init_fn(params: base.Params) -> AdamaxState:
        return AdamaxState(
            moments.zero_count(), moments.init_like(params, mu_dtype), moments.init_like(params, nu_dtype, real=True)
        )

    def update_fn(
        updates: Updates, state: AdamaxState, params: base.Params | None = None
    ) -> tuple[Updates, AdamaxState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                moments.scalar(eps, dtype),
                moments.debias(b1, count, dtype),
            )

        def leaf(g: jax.Array, m: jax.Array, u: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (m32, u32) = moments.to_compute(g, m, u)
            beta1, beta2, e, debias1 = scalars(dtype)
            m_new = moments.ema(g32, m32, beta1)
            u_new = jnp.maximum(beta2 * u32, jnp.abs(g32) + e)
            step = moments.times(moments.times(m_new, debias1), moments.safe_divide(1, u_new))
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(u_new, u)

        step, mu, nu = moments.leafwise(leaf, 3, updates, state.mu, state.nu)
        return step, AdamaxState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""Adamax: Adam with the infinity norm in place of the second moment.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
        \theta_t = \theta_{t-1} - \eta_t \frac{m_t}{(1 - \beta_1^t)\, u_t}

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the infinity norm, in [0, 1).
      eps: :math:`\epsilon`, added to :math:`|g_t|` inside the maximum, >= 0.
      weight_decay: coefficient of the weight decay, >= 0 (coupled by default, as in torch).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add the decay to the step instead of to the gradient.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the infinity norm (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adamax(2e-3)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([3.0]), opt.init(params), params)
      >>> updates.round(6)  # the first step is -learning_rate * sign(g), up to eps
      Array([-0.002], dtype=float32)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, https://arxiv.org/abs/1412.6980. Section 7.

      Reference packages: ``torch.optim.Adamax(lr, betas=(b1, b2), eps, weight_decay)`` and
      ``optax.adamax`` (which also puts eps inside the maximum) are this with the same numbers.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


class NadamState(NamedTuple):
    r"""State of :func:`scale_by_nadam`: the step count, the product of the momentum schedule and the moments.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu_product: :math:`\Pi_t`, the product of the momentum schedule up to this step.
      mu: the first moment :math:`m_t`, mirroring the parameters.
      nu: the second moment :math:`v_t`, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu_product: jax.Array  # product of the momentum schedule up to this step
    mu: Updates
    nu: Updates


def scale_by_nadam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    momentum_decay: Any = 4e-3,
    *,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""NAdam's block: Nesterov momentum on Adam, with Dozat's momentum schedule.

    .. math::
        \mu_t &= \beta_1 \big(1 - \tfrac12 \cdot 0.96^{t \psi}\big) \;(\text{or } \beta_1 \text{ if } \psi
            \text{ is None}), \qquad \Pi_t = \textstyle\prod_{s \le t} \mu_s \\
        \text{update} &= \frac{1}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
            \Big( \frac{1 - \mu_t}{1 - \Pi_t} g_t + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} m_t \Big)

    Args:
      b1: :math:`\beta_1`, the decay of the first moment and the base of the momentum schedule,
        in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      momentum_decay: :math:`\psi` >= 0 of the momentum schedule (torch's 4e-3), or None for a
        constant momentum ``b1`` (optax's).
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`, heavyball's form).
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`NadamState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_nadam(momentum_decay=None)
      >>> g = jnp.array([1.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> round(float(updates[0]), 4)  # g + 0.9 m / (1 - 0.81): the look-ahead of Nesterov's momentum
      1.4737

    References:
      Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop,
      https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ.

      Reference packages: :func:`nadam` gives the arguments that reproduce torch and optax.
    """
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    if momentum_decay is not None:
        base.check_nonnegative("momentum_decay", momentum_decay)
    base.check_choice("eps_mode", eps_mode, ("add", "max"))

    def schedule(step: jax.Array, dtype: Any) -> jax.Array:
        beta1 = moments.scalar(b1, dtype)
        if momentum_decay is None:
            return jnp.asarray(beta1, dtype)
        return beta1 * (1 - 0.5 * 0.96 ** (step.astype(dtype) * moments.scalar(momentum_decay, dtype)))

    def init_fn(params: base.Params) -> NadamState:
        return NadamState(
            moments.zero_count(),
            jnp.ones([], moments.scalar_dtype(params)),
            moments.init_like(params, mu_dtype),
            moments.init_like(params, nu_dtype, real=True),
        )

    def update_fn(updates: Updates, state: NadamState, params: base.Params | None = None) -> tuple[Updates, NadamState]:
        del params
        count = moments.safe_increment(state.count)
        mu_product = state.mu_product * schedule(count, state.mu_product.dtype)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            mu_t, mu_next = schedule(count, dtype), schedule(moments.safe_increment(count), dtype)  # no wrap at the cap
            product = mu_product.astype(dtype)
            e, e_root = moments.scalar(eps, dtype), moments.scalar(eps_root, dtype)
            debias2 = moments.debias(b2, count, dtype)
            return mu_t, mu_next, product, moments.scalar(b1, dtype), moments.scalar(b2, dtype), debias2, e, e_root

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (m32, v32) = moments.to_compute(g, m, v)
            mu_t, mu_next, product, beta1, beta2, debias2, e, e_root = scalars(dtype)
            m_new = moments.ema(g32, m32, beta1)
            v_new = moments.ema_sq(g32, v32, beta2)
            scale = moments.inv_root(v_new * debias2, e, e_root, eps_mode)
            step = moments.times(
                moments.times(g32, (1 - mu_t) / (1 - product))
                + moments.times(m_new, mu_next / (1 - product * mu_next)),
                scale,
            )
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v)

        step, mu, nu = moments.leafwise(leaf, 3, updates, state.mu, state.nu)
        return step, NadamState(count, mu_product, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    momentum_decay: Any = 4e-3,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""NAdam: Adam with Nesterov momentum (:func:`scale_by_nadam`'s update times the learning rate).

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        \theta_t &= \theta_{t-1} - \eta_t \Big( \frac{1}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
            \Big( \frac{1 - \mu_t}{1 - \Pi_t} g_t + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} m_t \Big)
            \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \Big)

    with :math:`\mu_t` and :math:`\Pi_t` as in :func:`scale_by_nadam`.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      momentum_decay: :math:`\psi` of the momentum schedule (torch's default 4e-3); None keeps
        the momentum at ``b1``, which is optax's ``nadam``.
      decoupled_weight_decay: add the decay to the step (NAdamW) instead of to the gradient.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`, heavyball's form); see :func:`scale_by_nadam`.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.nadam(2e-3, momentum_decay=None)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * 1.4737 (see scale_by_nadam)
      Array([-0.002947], dtype=float32)

    References:
      Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop,
      https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ.

      Reference packages: ``torch.optim.NAdam(lr, betas=(b1, b2), eps, weight_decay,
      momentum_decay)`` is this with the same numbers (``decoupled_weight_decay`` as torch's
      flag); ``optax.nadam`` is this with ``momentum_decay=None``.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_nadam(
        b1, b2, eps, eps_root, momentum_decay, eps_mode=eps_mode, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )


def nadamw(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 1e-2,
    *,
    momentum_decay: Any = 4e-3,
    weight_decay_mask: base.MaskOrFn | None = None,
    eps_mode: moments.EpsMode = "add",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""NAdamW: :func:`nadam` with decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \Big( \frac{1}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
            \Big( \frac{1 - \mu_t}{1 - \Pi_t} g_t + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} m_t \Big)
            + \lambda \theta_{t-1} \Big)

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient :math:`\lambda` of the decoupled decay, >= 0 (0.01 by default).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      momentum_decay: :math:`\psi` of the momentum schedule (torch's default 4e-3); None keeps
        the momentum at ``b1``, which is optax's ``nadamw``.
      eps_mode: ``"add"`` (:math:`\epsilon` added to the root) or ``"max"`` (the root floored at
        :math:`\epsilon`, heavyball's form); see :func:`scale_by_nadam`.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.nadamw(2e-3, weight_decay=0.5, momentum_decay=None)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * (1.4737 + 0.5 * params)
      Array([-0.003947], dtype=float32)

    References:
      Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop,
      https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ.

      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
      https://arxiv.org/abs/1711.05101.

      Reference packages: ``torch.optim.NAdam(..., decoupled_weight_decay=True)`` is this with
      the same numbers; ``optax.nadamw`` is this with ``momentum_decay=None``;
      ``heavyball.NAdam(..., decoupled_weight_decay=True)`` with ``eps_mode="max"``.
    """
    return nadam(
        learning_rate, b1, b2, eps, eps_root, weight_decay, momentum_decay=momentum_decay,
        weight_decay_mask=weight_decay_mask, decoupled_weight_decay=True, eps_mode=eps_mode, mu_dtype=mu_dtype,
        nu_dtype=nu_dtype, complex_convention=complex_convention,
    )  # fmt: skip


@base.check_flags
def scale_by_radam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    threshold: Any = 5.0,
    *,
    eps_before_debias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""RAdam's block: Adam's step rectified by the variance of its adaptive learning rate.

    .. math::
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \qquad
        r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
        \text{update} &= \begin{cases}
            \hat m_t\, r_t\, \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t + \epsilon_{root}} + \epsilon}
                & \rho_t > \text{threshold},\ \texttt{eps\_before\_debias} \text{ (torch)} \\
            \hat m_t\, r_t\, \dfrac{1}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}
                & \rho_t > \text{threshold},\ \text{otherwise (optax)} \\
            \hat m_t & \rho_t \le \text{threshold}
        \end{cases}

    with :math:`\hat m_t = m_t / (1 - \beta_1^t)`.

    Args:
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      threshold: rectify once :math:`\rho_t` exceeds it (>= 4; the paper's 5).
      eps_before_debias: add eps to :math:`\sqrt{v_t}` before the bias correction, as torch
        does; False gives optax's placement.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdamState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_radam()
      >>> g = jnp.array([0.5, -2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(4)  # rho_1 = 1 <= 5: the first steps are the debiased momentum, unscaled
      Array([ 0.5, -2. ], dtype=float32)

    References:
      Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
      Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265.

      Reference packages: :func:`radam` gives the arguments that reproduce torch and optax.
    """
    check_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    base.check_scalar("threshold", threshold, low=4.0)

    def init_fn(params: base.Params) -> AdamState:
        return AdamState(
            moments.zero_count(), moments.init_like(params, mu_dtype), moments.init_like(params, nu_dtype, real=True)
        )

    def update_fn(updates: Updates, state: AdamState, params: base.Params | None = None) -> tuple[Updates, AdamState]:
        del params
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            rho_inf, rho, bc2 = moments.radam_rho(b2, count, dtype)
            rectify = rho > moments.scalar(threshold, dtype)
            rho = jnp.where(rectify, rho, rho_inf)  # keeps the unused branch finite for jax.grad
            r = jnp.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            e, e_root = moments.scalar(eps, dtype), moments.scalar(eps_root, dtype)
            return (
                moments.scalar(b1, dtype),
                moments.scalar(b2, dtype),
                1 / bc2,
                jnp.sqrt(bc2),
                moments.debias(b1, count, dtype),
                rectify,
                r,
                e,
                e_root,
            )

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (m32, v32) = moments.to_compute(g, m, v)
            beta1, beta2, debias2, sqrt_bc2, debias1, rectify, r, e, e_root = scalars(dtype)
            m_new = moments.ema(g32, m32, beta1)
            v_new = moments.ema_sq(g32, v32, beta2)
            m_hat = moments.times(m_new, debias1)
            if eps_before_debias:
                adaptive = sqrt_bc2 * moments.inv_root(v_new, e, e_root)
            else:
                adaptive = moments.inv_root(v_new * debias2, e, e_root)
            step = jnp.where(rectify, moments.times(moments.times(m_hat, r), adaptive), m_hat)
            return step.astype(g.dtype), moments.store(m_new, m), moments.store(v_new, v)

        step, mu, nu = moments.leafwise(leaf, 3, updates, state.mu, state.nu)
        return step, AdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    threshold: Any = 5.0,
    eps_before_debias: bool = True,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""RAdam: Adam with a rectified adaptive learning rate (:func:`scale_by_radam`), no warmup needed.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay, the default)} \\
        \theta_t &= \theta_{t-1} - \eta_t \big( u_t \;[+\, \lambda \theta_{t-1} \text{ if decoupled}] \big)

    with :math:`u_t` the update of :func:`scale_by_radam`.

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, the decay of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to the root of the second moment, >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      threshold: rectify once :math:`\rho_t` exceeds it (>= 4; the paper's 5).
      eps_before_debias: add eps to :math:`\sqrt{v_t}` before the bias correction, as torch
        does; False gives optax's placement.
      decoupled_weight_decay: add the decay to the step instead of to the gradient.
      mu_dtype: storage dtype of the first moment (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the second moment (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.radam(1e-3)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([0.5, -2.0]), opt.init(params), params)
      >>> updates  # the first steps are SGD with the debiased momentum
      Array([-0.0005,  0.002 ], dtype=float32)

    References:
      Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive Learning Rate and
      Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265.

      Reference packages: ``torch.optim.RAdam(lr, betas=(b1, b2), eps, weight_decay,
      decoupled_weight_decay)`` is this with the same numbers; ``optax.radam`` is this with
      ``eps_before_debias=False``.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_radam(
        b1, b2, eps, eps_root, threshold, eps_before_debias=eps_before_debias, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
