"""AdaGrad and its windowed descendant AdaDelta: steps scaled by accumulated squared gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import ScalarOrSchedule, Updates


class AdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`.

    Attributes:
      sum_of_squares: :math:`s_t`, the sum of the squared gradients, mirroring the parameters.
    """

    sum_of_squares: Updates


def scale_by_adagrad(
    initial_accumulator_value: Any = 0.0,
    eps: Any = 1e-10,
    eps_root: Any = 0.0,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdaGrad's block: each coordinate divided by the root of its accumulated squared gradients.

    .. math::
        s_t = s_{t-1} + g_t^2, \qquad \text{update} = \frac{g_t}{\sqrt{s_t + \epsilon_{root}} + \epsilon}

    A zero denominator (a zero gradient with everything else zero) gives a zero update.

    Args:
      initial_accumulator_value: :math:`s_0` >= 0.
      eps: :math:`\epsilon`, added to the root (torch's placement), >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root (optax's), >= 0.
      accumulator_dtype: storage dtype of :math:`s` (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdagradState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adagrad(eps=0.0)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (3.0, 4.0):
      ...     updates, state = tx.update(jnp.array([g]), state)
      >>> updates, state.sum_of_squares  # 4 / sqrt(9 + 16)
      (Array([0.8], dtype=float32), Array([25.], dtype=float32))

    References:
      Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization", JMLR 12, 2011, https://jmlr.org/papers/v12/duchi11a.html.

      Reference packages: :func:`adagrad` gives the arguments that reproduce torch and optax.
    """
    base.check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    base.check_nonnegative("eps", eps)
    base.check_nonnegative("eps_root", eps_root)
    moments.check_storage("accumulator_dtype", accumulator_dtype, squares=True)

    def init_fn(params: base.Params) -> AdagradState:
        return AdagradState(moments.init_like(params, accumulator_dtype, initial_accumulator_value, real=True))

    def update_fn(
        updates: Updates, state: AdagradState, params: base.Params | None = None
    ) -> tuple[Updates, AdagradState]:
        del params

        @moments.per_dtype
        def scalars(dtype: jax.numpy.dtype) -> tuple[Any, Any]:
            return moments.scalar(eps, dtype), moments.scalar(eps_root, dtype)

        def leaf(g: jax.Array, s: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (s32,) = moments.to_compute(g, s)
            s_new = s32 + moments.abs_sq(g32)
            step = moments.times(g32, moments.inv_root(s_new, *scalars(dtype)))
            return step.astype(g.dtype), moments.store(s_new, s)

        step, sums = moments.leafwise(leaf, 2, updates, state.sum_of_squares)
        return step, AdagradState(sums)

    return optax.GradientTransformation(init_fn, update_fn)


def _with_lr_decay(learning_rate: ScalarOrSchedule, lr_decay: Any) -> ScalarOrSchedule:
    """torch's Adagrad learning rate: ``learning_rate(count) / (1 + count * lr_decay)``.

    Always a schedule, so that the state's structure does not depend on ``lr_decay``'s value;
    a Python zero adds no division.
    """

    def schedule(count: jax.Array) -> jax.Array:
        # In JAX's default float dtype, the dtype ``count * lr_decay`` takes.
        rate = numerics.learning_rate_at(learning_rate, count, jnp.result_type(float))
        return rate if base.is_zero(lr_decay) else rate / (1 + count * lr_decay)

    return schedule


@base.check_flags
def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay: Any = 0.0,
    weight_decay: Any = 0.0,
    initial_accumulator_value: Any = 0.0,
    eps: Any = 1e-10,
    eps_root: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    accumulator_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGrad: each parameter's step shrinks with the sum of its squared gradients.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad\text{(coupled decay)} \\
        s_t &= s_{t-1} + g_t^2 \;(s_0 = \text{initial\_accumulator\_value}), \qquad
        \theta_t = \theta_{t-1} - \frac{\eta_t}{1 + (t - 1)\,\delta} \frac{g_t}{\sqrt{s_t + \epsilon_{root}} + \epsilon}

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      lr_decay: :math:`\delta` >= 0, torch's learning-rate decay.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0 (coupled L2 by default, as torch).
      initial_accumulator_value: :math:`s_0` >= 0.
      eps: :math:`\epsilon`, added to the root (torch's placement), >= 0.
      eps_root: :math:`\epsilon_{root}`, added inside the root (optax's), >= 0.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add :math:`\lambda\theta` to the step instead of to the gradient.
      accumulator_dtype: storage dtype of :math:`s` (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adagrad(0.1, eps=0.0)
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(jnp.array([3.0, -0.5]), opt.init(params), params)
      >>> updates  # the first step is -learning_rate * sign(g)
      Array([-0.1,  0.1], dtype=float32)

    References:
      Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization", JMLR 12, 2011, https://jmlr.org/papers/v12/duchi11a.html.

      Reference packages: ``torch.optim.Adagrad(lr, lr_decay, weight_decay,
      initial_accumulator_value, eps)`` is this with the same numbers;
      ``optax.adagrad(lr, initial_accumulator_value, eps=e)`` is this with ``eps=0, eps_root=e``.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    base.check_nonnegative("lr_decay", lr_decay)
    core = scale_by_adagrad(initial_accumulator_value, eps, eps_root, accumulator_dtype=accumulator_dtype)
    return base.assemble(
        core, _with_lr_decay(learning_rate, lr_decay), weight_decay, weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay, complex_convention=complex_convention
    )  # fmt: skip


class AdadeltaState(NamedTuple):
    r"""State of :func:`scale_by_adadelta`: the two EMAs, mirroring the parameters.

    Attributes:
      e_g: :math:`E[g^2]_t`, the EMA of the squared gradients.
      e_x: :math:`E[\Delta^2]_t`, the EMA of the squared steps.
    """

    e_g: Updates  # EMA of squared gradients
    e_x: Updates  # EMA of squared steps


def scale_by_adadelta(
    rho: Any = 0.9, eps: Any = 1e-6, *, accumulator_dtype: Any = None
) -> optax.GradientTransformation:
    r"""AdaDelta's block: the gradient scaled by the ratio of the RMS of past steps to the RMS of gradients.

    .. math::
        E[g^2]_t &= \rho E[g^2]_{t-1} + (1 - \rho) g_t^2, \qquad
        \Delta_t = \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}} g_t \\
        E[\Delta^2]_t &= \rho E[\Delta^2]_{t-1} + (1 - \rho) \Delta_t^2, \qquad
        \text{update} = \Delta_t

    Args:
      rho: :math:`\rho`, the decay of both EMAs, in [0, 1).
      eps: :math:`\epsilon`, inside both roots, >= 0.
      accumulator_dtype: storage dtype of both EMAs (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdadeltaState`.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_adadelta(rho=0.5, eps=1.0)
      >>> g = jnp.array([3.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> updates.round(6)  # sqrt(0 + 1) / sqrt(0.5 * 9 + 1) * 3
      Array([1.279204], dtype=float32)

    References:
      Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012, https://arxiv.org/abs/1212.5701.

      Reference packages: :func:`adadelta` gives the arguments that reproduce torch and optax.
    """
    base.check_decay("rho", rho)
    base.check_nonnegative("eps", eps)
    moments.check_storage("accumulator_dtype", accumulator_dtype, squares=True)

    def init_fn(params: base.Params) -> AdadeltaState:
        return AdadeltaState(
            moments.init_like(params, accumulator_dtype, real=True),
            moments.init_like(params, accumulator_dtype, real=True, moment=1),
        )

    def update_fn(
        updates: Updates, state: AdadeltaState, params: base.Params | None = None
    ) -> tuple[Updates, AdadeltaState]:
        del params

        @moments.per_dtype
        def scalars(dtype: jax.numpy.dtype) -> tuple[Any, Any]:
            return moments.scalar(rho, dtype), moments.scalar(eps, dtype)

        def leaf(g: jax.Array, e_g: jax.Array, e_x: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g32, (eg32, ex32) = moments.to_compute(g, e_g, e_x)
            r, e = scalars(dtype)
            eg_new = moments.ema_sq(g32, eg32, r)
            step = moments.times(g32, jax.numpy.sqrt(ex32 + e) * moments.inv_root(eg_new, 0.0, e))
            ex_new = moments.ema_sq(step, ex32, r)
            return step.astype(g.dtype), moments.store(eg_new, e_g), moments.store(ex_new, e_x)

        step, e_g, e_x = moments.leafwise(leaf, 3, updates, state.e_g, state.e_x)
        return step, AdadeltaState(e_g, e_x)

    return optax.GradientTransformation(init_fn, update_fn)


@base.check_flags
def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho: Any = 0.9,
    eps: Any = 1e-6,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = False,
    accumulator_dtype: Any = None,
    complex_convention: str = "modulus",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaDelta: AdaGrad over a window, with units matched by an EMA of past steps.

    .. math::
        E[g^2]_t &= \rho E[g^2]_{t-1} + (1 - \rho) g_t^2, \qquad
        \Delta_t = \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}} g_t \\
        E[\Delta^2]_t &= \rho E[\Delta^2]_{t-1} + (1 - \rho) \Delta_t^2, \qquad
        \theta_t = \theta_{t-1} - \eta_t \Delta_t

    Args:
      learning_rate: a non-negative number or a schedule (1.0 is the paper's method).
      rho: :math:`\rho`, the decay of both EMAs, in [0, 1).
      eps: :math:`\epsilon`, inside both roots, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0 (coupled L2 by default, as torch).
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: add :math:`\lambda\theta` to the step instead of to the gradient.
      accumulator_dtype: storage dtype of both EMAs (default: the parameter's, at least float32).
      complex_convention: for complex parameters, ``"modulus"`` (one second moment of
        :math:`|g|^2` per complex coordinate, as optax) or ``"real_imag"`` (the real and
        imaginary parts as two real coordinates, as torch); see :func:`as_real_imag`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.adadelta(1.0, rho=0.5, eps=1.0)
      >>> params = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([3.0]), opt.init(params), params)
      >>> updates.round(6)  # -learning_rate * scale_by_adadelta's step
      Array([-1.279204], dtype=float32)

    References:
      Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012, https://arxiv.org/abs/1212.5701.

      Reference packages: ``torch.optim.Adadelta(lr, rho, eps, weight_decay)`` and
      ``optax.adadelta(lr, rho, eps)`` are this with the same numbers.
    """
    base.check_common(learning_rate, weight_decay)
    base.check_complex_convention(complex_convention)
    core = scale_by_adadelta(rho, eps, accumulator_dtype=accumulator_dtype)
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention=complex_convention,
    )
