"""Sophia: momentum over an EMA of a diagonal Hessian estimate, clipped per coordinate.

The estimate reaches the pure transformation as an extra argument of ``update``:
``update(grads, state, params, hessian=h)``, with ``h`` a tree of estimates (the EMA is
refreshed at this call) or a function of the parameters returning one (evaluated, inside the
compiled step, only every ``update_interval`` calls). :func:`hutchinson_hessian_diagonal` and
:func:`gnb_hessian_diagonal` compute the paper's two estimates from a loss with an explicit key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import ScalarOrSchedule, Updates
from adaopt._src.complex_params import is_complex
from adaopt._src.optimizers.adam import check_moments

Distribution = Literal["rademacher", "gaussian"]
_NO_COMPLEX = (
    "Sophia does not take complex parameters: a diagonal Hessian estimate of a complex parameter has no form here. "
    "Got a complex leaf at {path} ({dtype}). Train complex leaves with another optimizer (optax.partition routes "
    "leaves to different optimizers)."
)


class SophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`.

    Attributes:
      count: the number of updates so far, a saturating int32.
      mu: the momentum :math:`m_t`, mirroring the parameters.
      nu: the EMA :math:`h_t` of the diagonal Hessian estimates, mirroring the parameters.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates


def _check_real(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if is_complex(leaf):
            where = jax.tree_util.keystr(path) or "the root"
            raise TypeError(_NO_COMPLEX.format(path=where, dtype=jnp.result_type(leaf)))


def scale_by_sophia(
    b1: Any = 0.965,
    b2: Any = 0.99,
    gamma: Any = 0.04,
    eps: Any = 1e-12,
    *,
    clip: Any = 1.0,
    eps_mode: moments.EpsMode = "max",
    update_interval: int = 10,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia's block: the momentum over the scaled Hessian EMA, clipped per coordinate.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        h_t &= \beta_2 h_{t-1} + (1 - \beta_2)\, \hat h_t \quad \text{(at a call with an estimate
        } \hat h_t \text{; else } h_t = h_{t-1}) \\
        u_t &= \mathrm{clip}\big(m_t / D_t,\; [-c, c]\big), \qquad
        D_t = \max(\gamma h_t, \epsilon) \;\text{("max")} \quad\text{or}\quad \gamma h_t + \epsilon
        \;\text{("add")}

    The estimate is the extra argument ``hessian`` of ``update``: a tree mirroring the
    parameters (an Equinox module of arrays too, though callable) refreshes :math:`h` at that
    call; a function ``params -> tree`` is evaluated only
    at the calls whose count (from 0) is a multiple of ``update_interval`` (a ``lax.cond`` in the
    compiled step: the other calls never compute it); None (or no argument) keeps :math:`h`.
    Before any estimate, :math:`h = 0` and the update is :math:`c\,\mathrm{sign}(m_t)` (where
    :math:`|m_t| \ge c\epsilon`), as the references do; so is it wherever :math:`D_t = 0` (``eps=0``
    with no curvature, or ``"max"`` with a negative one): :math:`m_t / 0` clipped, or 0 where
    :math:`m_t = 0` (the references' 0 / 0 is NaN there).

    Args:
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the Hessian EMA, in [0, 1) (per refresh).
      gamma: :math:`\gamma`, the scale of the Hessian (the paper's and SophiaG's ``rho``), >= 0.
      eps: :math:`\epsilon`, the floor (or addend) of the denominator, >= 0.
      clip: :math:`c`, the bound of each coordinate of the update, >= 0.
      eps_mode: ``"max"`` (the paper, pytorch-optimizer's SophiaH) or ``"add"`` (SophiaG). With
        Hutchinson's estimate, which can be negative, use ``"max"``: with ``"add"`` a negative
        :math:`\gamma h + \epsilon` turns the step uphill (bounded by the clip).
      update_interval: the period, in calls, of a ``hessian`` given as a function, >= 1.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the Hessian EMA (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SophiaState`; its
      ``update`` takes ``hessian=`` (and ignores other extra arguments).

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_sophia(b1=0.0, b2=0.0, gamma=1.0, clip=1.0)
      >>> g = jnp.array([0.5, -2.0, 0.1])
      >>> updates, state = tx.update(g, tx.init(g), hessian=jnp.array([1.0, 4.0, 0.0]))
      >>> updates  # m / h, clipped to [-1, 1]; no curvature: the clipped sign
      Array([ 0.5, -0.5,  1. ], dtype=float32)

    References:
      Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training", ICLR 2024, https://arxiv.org/abs/2305.14342.
    """
    check_moments(b1, b2, eps, 0.0, mu_dtype, nu_dtype)
    base.check_nonnegative("gamma", gamma)
    base.check_nonnegative("clip", clip)
    base.check_choice("eps_mode", eps_mode, ("max", "add"))
    base.check_integer("update_interval", update_interval, 1)

    def init_fn(params: base.Params) -> SophiaState:
        _check_real(params)
        return SophiaState(
            count=moments.zero_count(),
            mu=moments.init_like(params, mu_dtype),
            nu=moments.init_like(params, nu_dtype, moment=1),
        )

    def refreshed(nu: Updates, estimate: Any, updates: Updates) -> Updates:
        base.check_tree_match(estimate, updates, "parameters", subject="Hessian estimates")

        def leaf(e: jax.Array, h: jax.Array) -> jax.Array:
            dtype = moments.compute_dtype(e.dtype, h.dtype)
            return moments.store(moments.ema(e.astype(dtype), h.astype(dtype), moments.scalar(b2, dtype)), h)

        return jax.tree.map(leaf, estimate, nu)

    def update_fn(
        updates: Updates,
        state: SophiaState,
        params: base.Params | None = None,
        *,
        hessian: Any = None,
        **extra_args: Any,
    ) -> tuple[Updates, SophiaState]:
        del extra_args
        base.check_tree_match(updates, state.nu, "state")
        nu = state.nu
        if base.is_function_of(hessian, updates):
            params = base.require_params(params, "sophia's hessian= function")
            estimate_fn: Callable[[Any], Any] = hessian
            nu = jax.lax.cond(
                state.count % update_interval == 0,
                lambda h: refreshed(h, estimate_fn(params), updates),
                lambda h: h,
                nu,
            )
        elif hessian is not None:
            nu = refreshed(nu, hessian, updates)
        count = moments.safe_increment(state.count)

        @moments.per_dtype
        def scalars(dtype: jnp.dtype) -> tuple[Any, ...]:
            return tuple(moments.scalar(x, dtype) for x in (b1, gamma, eps, clip))

        def leaf(g: jax.Array, m: jax.Array, h: jax.Array) -> tuple[jax.Array, ...]:
            dtype, g_compute, (m_compute, h_compute) = moments.to_compute(g, m, h)
            beta1, scale, e, bound = scalars(dtype)
            m_new = moments.ema(g_compute, m_compute, beta1)
            curvature = scale * h_compute
            denominator = moments.with_eps(curvature, e, eps_mode)
            # A zero denominator (eps = 0 with no curvature, or "max" with a negative one) takes the bound: m / 0 is
            # infinite, clipped to c sign(m), as the references compute it (0 where m is 0, where they give NaN).
            ratio = moments.safe_divide(m_new, denominator, fallback=bound * jnp.sign(m_new))
            step = jnp.clip(ratio, -bound, bound)
            return step.astype(g.dtype), moments.store(m_new, m)

        step, mu = moments.leafwise(leaf, 2, updates, state.mu, nu)
        return step, SophiaState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@base.check_flags
def sophia(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: Any = 0.965,
    b2: Any = 0.99,
    gamma: Any = 0.04,
    eps: Any = 1e-12,
    weight_decay: Any = 0.0,
    *,
    clip: Any = 1.0,
    eps_mode: moments.EpsMode = "max",
    update_interval: int = 10,
    weight_decay_mask: base.MaskOrFn | None = None,
    decoupled_weight_decay: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia: a clipped Newton-like step on a diagonal Hessian estimate refreshed every few steps.

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled decay)} \\
        \theta_t &= \theta_{t-1} - \eta_t \big( u_t + \lambda \theta_{t-1} \big) \quad
        \text{(decoupled decay, the default)}

    with :math:`u_t` from :func:`scale_by_sophia`. Pass the estimate as
    ``update(grads, state, params, hessian=...)``: a tree (refreshes now) or a function of the
    parameters (refreshed every ``update_interval`` calls inside the compiled step), e.g.
    ``hessian=lambda p: adaopt.hutchinson_hessian_diagonal(loss, p, key)`` (Sophia-H) or
    ``hessian=lambda p: adaopt.gnb_hessian_diagonal(logits, p, key)`` (Sophia-G), with a fresh
    ``key`` per step (``jax.random.fold_in(key, step)``).

    Args:
      learning_rate: a non-negative number or a schedule ``count -> value`` (count from 0).
      b1: :math:`\beta_1`, the decay of the momentum, in [0, 1).
      b2: :math:`\beta_2`, the decay of the Hessian EMA per refresh, in [0, 1).
      gamma: :math:`\gamma`, the scale of the Hessian (the paper's :math:`\rho`), >= 0.
      eps: :math:`\epsilon`, the floor of the denominator, >= 0.
      weight_decay: coefficient of the weight decay :math:`\lambda`, >= 0.
      clip: :math:`c`, the bound of each coordinate of :math:`u_t`, >= 0.
      eps_mode: ``"max"`` (:math:`\max(\gamma h, \epsilon)`) or ``"add"`` (:math:`\gamma h + \epsilon`).
      update_interval: the period, in calls, of a ``hessian`` given as a function, >= 1.
      weight_decay_mask: a tree of booleans (or a function of the parameters returning one)
        that selects the leaves to decay.
      decoupled_weight_decay: True (the default) decays the parameters by
        :math:`\eta_t\lambda`; False adds the decay to the gradient, before the momentum.
      mu_dtype: storage dtype of the momentum (default: the parameter's, at least float32).
      nu_dtype: storage dtype of the Hessian EMA (default: the parameter's, at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``hessian=``.
      Complex parameters are refused at ``init``.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> loss = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * p**2)
      >>> opt = adaopt.sophia(0.1, gamma=1.0, clip=10.0, update_interval=1)
      >>> params = jnp.array([1.0, 1.0])
      >>> hessian = lambda p: adaopt.hutchinson_hessian_diagonal(loss, p, jax.random.key(0))
      >>> updates, state = opt.update(jax.grad(loss)(params), opt.init(params), params, hessian=hessian)
      >>> updates.round(6)  # -lr (1 - b1) g / ((1 - b2) diag(H)): the same for both coordinates
      Array([-0.35, -0.35], dtype=float32)

    References:
      Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training", ICLR 2024, https://arxiv.org/abs/2305.14342.

      Reference packages: the authors' ``sophia_opt.SophiaG(lr, betas=(b1, b2), rho,
      weight_decay)`` (sophia-opt 0.2.2) is this with ``eps=1e-15, eps_mode="add"``, ``gamma=rho``
      and the estimate :math:`B \hat g \odot \hat g` of :func:`gnb_hessian_diagonal` (its
      ``update_hessian()`` averages the square of ``p.grad``, :math:`\hat g`, and ``step(bs=B)``
      multiplies ``rho`` by :math:`B`); its ``update_hessian()`` after step :math:`t` is this
      refresh at step :math:`t + 1`. The authors' training loop calls it after steps :math:`k - 1,
      2k - 1, \dots`: refreshes at calls :math:`k, 2k, \dots`, not at call 0 (where a function
      given as ``hessian`` is first evaluated): to reproduce it pass the estimate as a tree at
      those calls and None at the others. ``pytorch_optimizer.SophiaH(lr, betas, weight_decay, p,
      update_period, num_samples, hessian_distribution, eps)`` is this with ``gamma=1, clip=p,
      update_interval=update_period`` and :func:`hutchinson_hessian_diagonal` (its default
      distribution is ``"gaussian"``). ``optax.contrib.sophia`` differs: it debiases the momentum
      and refreshes :math:`h` after computing the step with the previous one.
    """
    base.check_common(learning_rate, weight_decay)
    core = scale_by_sophia(
        b1, b2, gamma, eps, clip=clip, eps_mode=eps_mode, update_interval=update_interval,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype,
    )  # fmt: skip
    return base.assemble(
        core,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        decoupled_weight_decay=decoupled_weight_decay,
        complex_convention="modulus",
    )


def _random_vectors(key: jax.Array, params: Any, distribution: Distribution) -> Any:
    if distribution == "gaussian":
        return optax.tree.random_like(key, params, jax.random.normal)
    return optax.tree.random_like(
        key, params, lambda k, shape, dtype: jax.random.rademacher(k, shape, jnp.int32).astype(dtype)
    )


def hutchinson_hessian_diagonal(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    num_samples: int = 1,
    distribution: Distribution = "rademacher",
) -> Any:
    r"""Hutchinson's unbiased estimate of the Hessian's diagonal: :math:`\frac1n \sum_i z_i \odot (\nabla^2 L\, z_i)`.

    Each :math:`z_i` is ``optax.tree.random_like(k_i, params, sampler)`` for ``k_i`` in
    ``jax.random.split(key, num_samples)``, with Rademacher entries (:math:`\pm 1`, the paper's:
    ``jax.random.rademacher(k, shape, jnp.int32)`` cast to the parameter's dtype) or standard
    normal ones (``jax.random.normal``); each Hessian-vector product is one forward-over-reverse pass
    (``jax.jvp`` of ``jax.grad``), never the Hessian itself.

    Args:
      loss_fn: the loss, a function of the parameters alone returning a scalar (close over the
        batch).
      params: the point, a tree of real arrays.
      key: a PRNG key (use a fresh one at every refresh).
      num_samples: the number :math:`n` of vectors averaged, >= 1.
      distribution: ``"rademacher"`` or ``"gaussian"``.

    Returns:
      A tree like ``params``: the estimate, in the parameters' dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> loss = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * p**2)
      >>> adaopt.hutchinson_hessian_diagonal(loss, jnp.zeros(2), jax.random.key(0))  # exact for a diagonal Hessian
      Array([ 2., 20.], dtype=float32)

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
      smoothing splines", 1989; Sophia's Algorithm 1, https://arxiv.org/abs/2305.14342.
    """
    base.check_integer("num_samples", num_samples, 1)
    base.check_choice("distribution", distribution, ("rademacher", "gaussian"))
    total = None
    for sample_key in jax.random.split(key, num_samples):
        z = _random_vectors(sample_key, params, distribution)
        hvp = jax.jvp(jax.grad(loss_fn), (params,), (z,))[1]
        product = jax.tree.map(jnp.multiply, z, hvp)
        total = product if total is None else jax.tree.map(jnp.add, total, product)
    return jax.tree.map(lambda x: x / num_samples, total)


def gnb_hessian_diagonal(logits_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array) -> Any:
    r"""The Gauss–Newton–Bartlett estimate of the Hessian's diagonal for a softmax cross-entropy: :math:`B\, \hat g \odot \hat g`.

    .. math::
        \hat y_b \sim \mathrm{softmax}(f(\theta, x_b)), \qquad
        \hat g = \nabla_\theta \frac1B \sum_{b=1}^B \ell_{CE}\big(f(\theta, x_b), \hat y_b\big)

    with the labels drawn from the model's own predictions (``jax.random.categorical(key,
    logits)``, the logits held constant for the draw): its expectation is the diagonal of the
    Gauss–Newton matrix of the mean loss.

    Args:
      logits_fn: the model on the batch, a function of the parameters alone returning logits of
        shape ``(..., classes)``; the :math:`B` examples are all the leading positions.
      params: the point, a tree of real arrays.
      key: a PRNG key (use a fresh one at every refresh).

    Returns:
      A tree like ``params``: the estimate, in the parameters' dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> estimate = adaopt.gnb_hessian_diagonal(lambda w: x @ w, jnp.zeros((2, 3)), jax.random.key(0))
      >>> estimate.shape, bool(jnp.all(estimate >= 0))
      ((2, 3), True)

    References:
      Liu, Li, Hall, Liang & Ma, "Sophia", Algorithm 2, https://arxiv.org/abs/2305.14342.
    """

    def sampled_loss(p: Any) -> jax.Array:
        logits = logits_fn(p)
        labels = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))

    batch = 1
    for size in jax.eval_shape(logits_fn, params).shape[:-1]:
        batch *= size
    return jax.tree.map(lambda g: batch * g * g, jax.grad(sampled_loss)(params))
