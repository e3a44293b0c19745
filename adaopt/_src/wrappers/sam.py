r"""SAM and ASAM: the gradient at the worst nearby point, in one training step, for any optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adaopt._src import base, moments, numerics
from adaopt._src.base import Params


def _ascent(g: jax.Array) -> jax.Array:
    """The direction of steepest ascent from ``jax.grad``'s gradient: its conjugate for a complex leaf."""
    return jnp.conj(g) if jnp.iscomplexobj(g) else g


@base.check_flags
def sam_perturbation(
    params: Params, grads: Params, rho: Any = 0.05, *, adaptive: bool = False, eta: Any = 0.0, eps: Any = 1e-12
) -> Params:
    r"""SAM's (or ASAM's) perturbation :math:`\epsilon(w)` of the parameters, from the gradient at them.

    .. math::
        \epsilon(w) = \rho \frac{T_w^2 g}{\|T_w g\| + \epsilon_0}, \qquad
        T_w = \mathrm{diag}(|w| + \eta) \;\; \text{(ASAM, adaptive=True)}, \quad T_w = I \;\; \text{(SAM)}

    with the norm over the whole tree. Computed in at least float32 and returned in each
    parameter's dtype. For a complex parameter, :math:`g` is the direction of steepest ascent,
    the conjugate of ``jax.grad``'s gradient (see :func:`as_real_imag`).

    Args:
      params: the parameters :math:`w`.
      grads: ``jax.grad``'s gradient of the loss at ``params``.
      rho: :math:`\rho` >= 0, the radius of the neighbourhood.
      adaptive: ASAM's scale-invariant neighbourhood (:math:`T_w = |w| + \eta`).
      eta: :math:`\eta` >= 0, added to :math:`|w|` by ASAM.
      eps: :math:`\epsilon_0` >= 0, added to the norm.

    Returns:
      :math:`\epsilon(w)`, a tree of the parameters' structure and dtypes (zero where the
      gradient is zero everywhere and ``eps`` is 0).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> adaopt.sam_perturbation(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]), rho=0.5)
      Array([0.3, 0.4], dtype=float32)
    """
    _check(rho, adaptive, eta, eps)
    dtype = moments.compute_dtype(*(jnp.result_type(leaf) for leaf in jax.tree.leaves(params)))

    def scaled(w: jax.Array, g: jax.Array) -> jax.Array:
        """:math:`T_w g`, the gradient in the (possibly scale-invariant) metric."""
        ascent = moments.in_precision(_ascent(g), dtype)
        if not adaptive:
            return ascent
        return moments.times(ascent, jnp.abs(moments.in_precision(w, dtype)) + moments.scalar(eta, dtype))

    weighted = jax.tree.map(scaled, params, grads)
    scale = moments.safe_divide(moments.scalar(rho, dtype), numerics.norm(weighted, dtype) + moments.scalar(eps, dtype))

    def perturbation(w: jax.Array, t_g: jax.Array) -> jax.Array:
        if adaptive:
            t_g = moments.times(t_g, jnp.abs(moments.in_precision(w, dtype)) + moments.scalar(eta, dtype))
        return moments.times(t_g, scale).astype(jnp.result_type(w))

    return jax.tree.map(perturbation, params, weighted)


def _check(rho: Any, adaptive: Any, eta: Any, eps: Any) -> None:
    base.check_nonnegative("rho", rho)
    base.check_nonnegative("eta", eta)
    base.check_nonnegative("eps", eps)
    base.check_flag("adaptive", adaptive)


@base.check_flags
def sam_value_and_grad(
    loss_fn: Callable[..., Any],
    rho: Any = 0.05,
    *,
    adaptive: bool = False,
    eta: Any = 0.0,
    eps: Any = 1e-12,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Params]]:
    r"""Like ``jax.value_and_grad(loss_fn)``, with SAM's gradient: the gradient at the worst point within :math:`\rho`.

    Sharpness-aware minimisation (SAM) descends :math:`\max_{\|\epsilon\| \le \rho} L(w + \epsilon)`;
    to first order the maximiser is :math:`\epsilon(w)` of :func:`sam_perturbation`, and the
    gradient is taken there, with :math:`\epsilon` held constant:

    .. math::
        g = \nabla L(w), \qquad \epsilon(w) = \rho \frac{T_w^2 g}{\|T_w g\| + \epsilon_0}, \qquad
        g_{\mathrm{SAM}} = \nabla L(w')\big|_{w' = w + \epsilon(w)}

    with :math:`T_w = I` (SAM) or :math:`T_w = \mathrm{diag}(|w| + \eta)` (ASAM,
    ``adaptive=True``, a neighbourhood that scales with each weight). Give
    :math:`g_{\mathrm{SAM}}` to any optimizer, with the parameters :math:`w` (weight decay
    acts on :math:`w`, not on :math:`w + \epsilon`): one jitted training step holds all of it.

    **Cost.** Each call evaluates the loss and its gradient twice, at :math:`w` and at
    :math:`w + \epsilon(w)`, one after the other: twice the compute of a plain step, and the
    memory of one more copy of the parameters and of the gradient. The loss (and ``aux``)
    returned is the first evaluation's, at :math:`w`; with a random layer (dropout), pass the
    same key to both evaluations through ``args``.

    **optax.contrib.sam** does the same with a transformation that alternates: by default
    (``opaque_mode=False``) each call of ``update`` takes one gradient, and every other call
    (``sync_period=2``) moves the parameters to the perturbed point instead of stepping, so one
    SAM step takes two training steps and the model holds the perturbed parameters between
    them (batch-norm statistics, logging and evaluation see those); ``opaque_mode=True`` keeps
    them hidden by calling a ``grad_fn`` passed to ``update``. Here the training loop stays
    one call per step, the parameters it holds are always :math:`w`, and the optimizer is
    any transformation, unchanged (its state is that optimizer's own).

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar loss (or ``(loss, aux)`` with
        ``has_aux``), differentiable in ``params``.
      rho: :math:`\rho` >= 0, the radius of the neighbourhood (0: the plain gradient).
      adaptive: ASAM's neighbourhood :math:`T_w = |w| + \eta` instead of SAM's ball.
      eta: :math:`\eta` >= 0 of ASAM (the paper's and the authors' code's 0.01;
        pytorch-optimizer's 0, this default).
      eps: :math:`\epsilon_0` >= 0, added to the norm of :math:`T_w g`.
      has_aux: ``loss_fn`` returns ``(loss, aux)``, as in ``jax.value_and_grad``.

    Returns:
      A function ``(params, *args, **kwargs) -> (value, grads)``, where ``value`` is the loss at
      ``params`` (or ``(loss, aux)``) and ``grads`` is :math:`g_{\mathrm{SAM}}` in ``jax.grad``'s
      form (the conjugate of the ascent direction for complex parameters, as ``jax.grad``).

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> loss_fn = lambda w, x: jnp.sum((w * x) ** 2)
      >>> sam_grad = jax.jit(adaopt.sam_value_and_grad(loss_fn, rho=0.1))
      >>> optimizer = adaopt.sgd(0.1, momentum=0.9)
      >>> w = jnp.array([1.0, -2.0])
      >>> state = optimizer.init(w)
      >>> loss, grads = sam_grad(w, jnp.array([1.0, 1.0]))
      >>> loss, grads.round(4)  # the gradient 2 (w + 0.1 w / |w|): at the perturbed point
      (Array(5., dtype=float32), Array([ 2.0894, -4.1789], dtype=float32))
      >>> updates, state = optimizer.update(grads, state, w)
      >>> w = adaopt.apply_updates(w, updates)

    References:
      Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently
      Improving Generalization", ICLR 2021, https://arxiv.org/abs/2010.01412.

      Kwon, Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks", ICML 2021, https://arxiv.org/abs/2102.11600.

      Reference packages: ``pytorch_optimizer.SAM(params, base_optimizer, rho, adaptive,
      perturb_eps=eps)`` (the closure protocol: gradient at :math:`w`, ``first_step``
      perturbs, the closure takes the gradient there, ``second_step`` restores :math:`w` and
      steps the base optimizer) is this with ``eta=0``, followed by that base optimizer; it
      computes the norm :math:`\|T_w g\|` in float32 whatever the parameters' dtype. The authors'
      ``ASAM(optimizer, model, rho=0.5, eta=0.01)`` (github.com/SamsungLabs/ASAM) scales only the
      parameters whose name contains ``"weight"`` by :math:`T_w` (biases by 1), where this scales
      every leaf, and adds 1e-16 to the norm: the two differ in the biases' perturbation.
    """
    _check(rho, adaptive, eta, eps)
    base.check_flag("has_aux", has_aux)
    has_aux = bool(has_aux)  # a NumPy bool too, as jax.grad takes only Python's
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    grad = jax.grad(loss_fn, has_aux=has_aux)

    @functools.wraps(loss_fn)
    def sam_fn(params: Params, *args: Any, **kwargs: Any) -> tuple[Any, Params]:
        value, grads = value_and_grad(params, *args, **kwargs)
        epsilon = jax.lax.stop_gradient(sam_perturbation(params, grads, rho, adaptive=adaptive, eta=eta, eps=eps))
        perturbed = jax.tree.map(lambda w, e: w + e, params, epsilon)
        sam_grads = grad(perturbed, *args, **kwargs)
        return value, sam_grads[0] if has_aux else sam_grads

    return sam_fn


__all__ = ["sam_perturbation", "sam_value_and_grad"]
