"""Mechanic: a wrapper that learns the scale of any optimizer's steps by coin betting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments, numerics
from adaopt._src.base import Updates

Variant = Literal["pytorch", "optax"]
DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class MechanicState(NamedTuple):
    r"""State of :func:`mechanic`: the inner optimizer's, the reference point, and per-beta scalars.

    The per-beta quantities are tuples of 0-d arrays (one per beta), in the parameters' widest
    float dtype (at least float32); ``sum(s)`` is the scale applied to the inner steps.

    Attributes:
      count: the number of updates so far, a saturating int32 (the package's ``iter_count``).
      inner_state: the state of the optimizer whose steps are scaled.
      reference: :math:`x_{ref}`, the parameters at the first update, each in its own dtype.
      delta: :math:`\Delta_t`, the sum of the inner steps (None unless ``store_delta``).
      s: the scales :math:`s_i`, one per beta.
      max_product: :math:`m`, the running maximum of :math:`|h|`, one per beta.
      sum_squared_products: :math:`v`, the discounted sum of :math:`h^2`, one per beta.
      reward: :math:`r`, the wealth won by the scale (clamped at 0 for "pytorch"), one per beta.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    inner_state: optax.OptState
    reference: Updates
    delta: Updates | None
    s: tuple[jax.Array, ...]
    max_product: tuple[jax.Array, ...]
    sum_squared_products: tuple[jax.Array, ...]
    reward: tuple[jax.Array, ...]

    def current_hyperparams(self) -> dict[str, jax.Array]:
        """The scale applied to the inner steps, ``max(sum(s), 0)``."""
        return {"scale": jnp.maximum(sum(self.s), 0)}


@base.check_flags
def mechanic(
    inner: optax.GradientTransformation,
    s_decay: Any = 0.01,
    betas: Sequence[float] = DEFAULT_BETAS,
    s_init: Any = 1e-8,
    eps: Any = 1e-8,
    *,
    store_delta: bool = False,
    variant: Variant = "pytorch",
) -> optax.GradientTransformationExtraArgs:
    r"""Mechanic: learn the scale of ``inner``'s steps, so its learning rate need not be tuned.

    The parameters are :math:`x_{t+1} = x_{ref} + S_{t+1} \Delta_{t+1}`, the sum
    :math:`\Delta` of ``inner``'s steps :math:`u_t` scaled by :math:`S = \sum_i s_i`, where each
    :math:`s_i` is a coin-betting learner with its own decay :math:`\beta_i`. Per update, with
    :math:`g_t` the gradient and :math:`x_t` the parameters passed to ``update``
    (:math:`S_1 = 0` for "pytorch", :math:`n s_{init}` for "optax"):

    .. math::
        u_t &= \text{inner.update}(g_t, x_t) \\
        \Delta_t &= (x_t - x_{ref}) / (S_t + \epsilon)
            \quad (\text{or the stored } \Delta_t \text{ if store\_delta}) \\
        y_t &= x_t + u_t \;(\text{"pytorch"}) \quad\text{or}\quad x_t \;(\text{"optax"}) \\
        h_t &= \Big\langle \Delta_t,\ g_t + \lambda S_t \frac{\|g_t\|}{\|y_t\| + \epsilon} y_t \Big\rangle
            \quad (\text{global inner product and norms, all leaves}) \\
        m_t &= \max(\beta m_{t-1},\ |h_t|) \;(m_0 = 10^{-6}) \quad\text{or}\quad
            \max(\beta m_{t-1},\ |h_t| + \epsilon) \;(m_0 = 0,\ \text{"optax"}) \\
        v_t &= \beta^2 v_{t-1} + h_t^2 \\
        r_t &= \max(\beta r_{t-1} - s_t h_t,\ 0) \quad\text{or}\quad
            \beta r_{t-1} - s_t \,\mathrm{clip}(h_t, -m_{t-1}, m_{t-1}) \;(\text{"optax"}) \\
        W_t &= m_t s_{init} / n + r_t \quad (\max(r_t, 0) \text{ for "optax"}) \\
        s_{t+1} &= W_t / (\sqrt{v_t} + \epsilon), \qquad S_{t+1} = \max\big(\textstyle\sum_i s_{t+1,i},\ 0\big) \\
        \Delta_{t+1} &= \Delta_t + u_t, \qquad
        \text{update} = x_{ref} + S_{t+1} \Delta_{t+1} - x_t

    with the vectors over betas taken elementwise, :math:`n` the number of betas and
    :math:`x_{ref}` the parameters at the first update.

    Args:
      inner: the optimizer whose steps are scaled, e.g. ``adaopt.sgd(1.0)``; its learning rate
        (or schedule) sets the shape of the steps, Mechanic their scale. An inner learning
        rate of 0 does not freeze the parameters: :math:`S` still changes what
        :math:`x_{ref} + S \Delta` is. Complex parameters follow ``inner``'s complex convention
        (Mechanic's inner products are real ones, the same under both).
      s_decay: :math:`\lambda` >= 0, the weight-decay-like term of :math:`h_t` (not the inner
        optimizer's weight decay).
      betas: the decays :math:`\beta_i`, each in [0, 1), one learner per beta.
      s_init: :math:`s_{init}` > 0, sets the initial scale (an underestimate is safe).
      eps: :math:`\epsilon` > 0.
      store_delta: keep :math:`\Delta_t` in the state (one more copy of the parameters) instead
        of recomputing it from :math:`x_t - x_{ref}`. Recomputing loses precision in float32
        while :math:`S_t` is small; where :math:`S_t |u_t|` stays under half an ulp of the
        parameters (a tiny ``s_init`` or inner learning rate), float32 parameters never move.
      variant: "pytorch" (the authors' package, the default) or "optax" (``optax.contrib.mechanize``);
        they differ where the equations above say.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MechanicState`; its
      ``update`` needs ``params`` and passes extra arguments on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> opt = adaopt.mechanic(adaopt.sgd(1.0))
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> float(sum(state.s))  # the first scale: sum(betas) * 1e-6 * s_init / (n * eps)
      9.81...e-07

    References:
      Cutkosky, Defazio & Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023,
      https://arxiv.org/abs/2306.00144.

      Reference package: the authors' ``mechanic_pytorch``
      (https://github.com/optimizedlearning/mechanic).
      ``mechanic_pytorch.mechanize(Base, s_decay, betas, s_init, eps, store_delta)(params,
      **base_kwargs)`` matches ``mechanic(base(**base_kwargs), s_decay, betas, s_init, eps,
      store_delta=store_delta)`` where ``base`` is adaopt's match of the torch optimizer ``Base``
      (``adaopt.sgd`` for ``torch.optim.SGD``, ``adaopt.adam`` for ``Adam``, ``adaopt.adamw`` for
      ``AdamW``). Its ``log_func`` and ``log_every`` have no counterpart: the logged value is
      ``sum(state.s)``, its ``iter_count`` is ``state.count``. The package evaluates the decay
      term at the parameters after the inner step (:math:`y_t = x_t + u_t`); the paper writes
      :math:`x_t`, as optax does.
      ``optax.contrib.mechanize(base, weight_decay, eps, s_init, num_betas)`` matches
      ``mechanic(base, s_decay=weight_decay, betas=tuple(1 - 0.1**i for i in range(1, num_betas + 1)),
      s_init=s_init, eps=eps, variant="optax")`` (its ``s_init`` defaults to 1e-6, this to the
      package's 1e-8); it keeps its scalars in the parameters' narrowest dtype, this in the widest.
    """
    base.check_transformation("inner", inner)
    base.check_nonnegative("s_decay", s_decay)
    base.check_scalar("s_init", s_init, low=0.0, low_open=True)
    base.check_scalar("eps", eps, low=0.0, low_open=True)
    base.check_choice("variant", variant, ("pytorch", "optax"))
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not betas:
        raise base.HyperparameterError(f"betas must be a non-empty sequence of numbers in [0, 1), got {betas!r}.")
    for i, beta in enumerate(betas):
        base.check_decay(f"betas[{i}]", beta)
    n = len(betas)
    pytorch = variant == "pytorch"
    inner_tx = base.with_extra_args(inner)

    def init_fn(params: base.Params) -> MechanicState:
        dtype = moments.scalar_dtype(params)
        scalars: Callable[[Any], tuple[jax.Array, ...]] = lambda fill: tuple(jnp.asarray(fill, dtype) for _ in range(n))
        return MechanicState(
            count=moments.zero_count(),
            inner_state=inner_tx.init(params),
            reference=moments.init_copy(params, keep_dtype=True),
            delta=moments.init_like(params) if store_delta else None,
            s=scalars(0.0) if pytorch else tuple(jnp.asarray(s_init, dtype) for _ in range(n)),
            max_product=scalars(1e-6 if pytorch else 0.0),
            sum_squared_products=scalars(0.0),
            reward=scalars(0.0),
        )

    def update_fn(
        updates: Updates, state: MechanicState, params: base.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, MechanicState]:
        params = base.require_params(params, "mechanic")
        base.check_tree_match(updates, params, "parameters")
        steps, inner_state = inner_tx.update(updates, state.inner_state, params, **extra_args)
        first = state.count == 0
        s_old, m_old, v_old, r_old = (
            jnp.stack(x) for x in (state.s, state.max_product, state.sum_squared_products, state.reward)
        )
        dtype = s_old.dtype
        e = moments.scalar(eps, dtype)
        s_sum = jnp.sum(s_old)

        def offset(x: jax.Array, ref: jax.Array, *delta: jax.Array) -> tuple[jax.Array, ...]:
            """The reference point (taken at the first update) and Delta_t, in the leaf's compute dtype."""
            ref = jnp.where(first, x, ref)
            if store_delta:
                return ref, moments.in_precision(delta[0], moments.compute_dtype(x.dtype, delta[0].dtype))
            cdt = moments.compute_dtype(x.dtype)
            difference = moments.in_precision(x, cdt) - moments.in_precision(ref, cdt)
            return ref, moments.over(difference, (s_sum + e).astype(cdt))

        delta_trees = (state.delta,) if store_delta else ()
        reference, delta_prev = moments.leafwise(offset, 2, params, state.reference, *delta_trees)

        def point(x: jax.Array, u: jax.Array) -> jax.Array:
            cdt = moments.compute_dtype(x.dtype, u.dtype)
            x_c = moments.in_precision(x, cdt)
            return x_c + moments.in_precision(u, cdt) if pytorch else x_c

        points = jax.tree.map(point, params, steps)
        grad_norm = numerics.norm(updates, dtype)
        point_norm = numerics.norm(points, dtype)
        coef = moments.scalar(s_decay, dtype) * s_sum * grad_norm / (point_norm + e)

        def product(d: jax.Array, g: jax.Array, y: jax.Array) -> jax.Array:
            cdt = moments.compute_dtype(d.dtype, g.dtype, y.dtype)
            c = moments.in_precision
            return jnp.sum(moments.real_product(c(d, cdt), c(g, cdt) + moments.times(c(y, cdt), coef.astype(cdt))))

        h = numerics.tree_sum(jax.tree.map(product, delta_prev, updates, points), dtype)

        beta = jnp.asarray(betas, dtype)
        v = beta**2 * v_old + h**2
        if pytorch:
            m = jnp.maximum(beta * m_old, jnp.abs(h))
            r = jnp.maximum(beta * r_old - s_old * h, 0)
            wealth = m * moments.scalar(s_init, dtype) / n + r
        else:
            m = jnp.maximum(beta * m_old, jnp.abs(h) + e)
            r = beta * r_old - jnp.clip(h, -m_old, m_old) * s_old
            wealth = moments.scalar(s_init, dtype) / n * m + jnp.maximum(r, 0)
        s = wealth / (moments.safe_sqrt(v) + e)
        scale = jnp.maximum(jnp.sum(s), 0)

        def finish(g: jax.Array, x: jax.Array, u: jax.Array, ref: jax.Array, d: jax.Array) -> tuple[jax.Array, ...]:
            cdt = moments.compute_dtype(x.dtype, d.dtype, u.dtype)
            c = moments.in_precision
            d_new = c(d, cdt) + c(u, cdt)
            x_new = c(ref, cdt) + moments.times(d_new, scale.astype(cdt))
            return (x_new - c(x, cdt)).astype(g.dtype), d_new

        out, d_new = moments.leafwise(finish, 2, updates, params, steps, reference, delta_prev)
        delta = jax.tree.map(lambda a, old: a.astype(old.dtype), d_new, state.delta) if store_delta else None
        unstack = lambda a: tuple(a[i] for i in range(n))
        return out, MechanicState(
            moments.safe_increment(state.count),
            inner_state,
            reference,
            delta,
            unstack(s),
            unstack(m),
            unstack(v),
            unstack(r),
        )

    # Its inner products are real ones (Re(conj(a) b)): complex parameters follow the inner optimizer's convention.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
