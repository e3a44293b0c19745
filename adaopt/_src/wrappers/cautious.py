r"""Cautious masking: keep the coordinates of an optimizer's direction that agree in sign with the gradient."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from adaopt._src import base, moments
from adaopt._src.base import Params, Updates

UpdatesAre = Literal["steps", "directions"]


def _mask_leaf(u: jax.Array | None, g: jax.Array | None, descent: bool) -> jax.Array | None:
    """``u`` times the rescaled agreement mask of one tensor, in at least float32, returned in ``u``'s dtype."""
    if u is None or g is None:
        return u
    dtype = moments.compute_dtype(u.dtype, g.dtype)
    u_compute, g_compute = moments.in_precision(u, dtype), moments.in_precision(g, dtype)
    agreement = moments.real_product(u_compute, g_compute)
    mask = ((-agreement if descent else agreement) > 0).astype(dtype)
    # numel / (count + 1): the mean step size is kept, and a tensor with no agreeing coordinate gets 0.
    mask = mask * (u.size / (jnp.sum(mask) + 1))
    return moments.times(u_compute, mask).astype(u.dtype)


def scale_by_cautious_mask(
    inner: optax.GradientTransformation, *, updates_are: UpdatesAre = "directions"
) -> optax.GradientTransformationExtraArgs:
    r"""``inner`` with each tensor of its updates masked where it disagrees in sign with the gradient, then rescaled.

    For each leaf (tensor) of :math:`n` coordinates, with :math:`u` the update of ``inner``
    and :math:`g` the gradient it was given:

    .. math::
        \phi_i = \mathbb{1}[\,\mathrm{Re}(\bar u_i g_i) > 0\,], \qquad
        u_i \leftarrow u_i \, \phi_i \, \frac{n}{1 + \sum_j \phi_j}

    for ``updates_are="directions"`` (the updates point along the gradient, as a ``scale_by_*``
    block's before the learning rate); for ``"steps"`` (they descend, as a complete optimizer's),
    the agreement is :math:`\mathrm{Re}(\bar u_i g_i) < 0`. For a real coordinate
    :math:`\mathrm{Re}(\bar u_i g_i) = u_i g_i`; a complex one agrees when the angle between
    :math:`u_i` and :math:`g_i` is below 90 degrees (optax's and adaopt's ``"modulus"``
    convention); seen as real pairs (:func:`as_real_imag`), each part has its own sign and
    counts in :math:`n`. A zero-size leaf stays empty; None leaves pass through.

    Args:
      inner: the transformation whose updates are masked.
      updates_are: ``"directions"`` or ``"steps"``, as above.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state, passing ``update``'s
      extra arguments (``value=``) to ``inner``.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> tx = adaopt.scale_by_cautious_mask(adaopt.scale_by_lion())
      >>> g = jnp.array([1.0, -2.0, 3.0])
      >>> state = tx.init(g)
      >>> updates, state = tx.update(g, state)  # sign(g) agrees everywhere: 3 / (3 + 1)
      >>> updates
      Array([ 0.75, -0.75,  0.75], dtype=float32)
      >>> updates, state = tx.update(jnp.array([-0.05, 0.5, 3.0]), state)  # sign: [1, 1, 1]
      >>> updates  # the first coordinate disagrees: 3 / (2 + 1) for the others
      Array([0., 1., 1.], dtype=float32)

    References:
      Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of Code",
      https://arxiv.org/abs/2411.16085 (the rescaling :math:`n / (1 + \sum\phi)` is
      pytorch-optimizer's ``apply_cautious``).
    """
    base.check_transformation("inner", inner)
    base.check_choice("updates_are", updates_are, ("steps", "directions"))
    inner = base.with_extra_args(inner)
    descent = updates_are == "steps"

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra_args: Any) -> tuple[Updates, Any]:
        new, state = inner.update(updates, state, params, **extra_args)
        masked = jax.tree.map(lambda u, g: _mask_leaf(u, g, descent), new, updates, is_leaf=lambda x: x is None)
        return masked, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _factory_name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__name__", repr(factory))


def cautious(
    optimizer: Callable[..., optax.GradientTransformation] | optax.GradientTransformation,
    *,
    updates_are: UpdatesAre = "steps",
) -> Any:
    r"""The cautious form of an optimizer (C-AdamW, C-Lion, ...): its direction masked where it disagrees with the gradient.

    Given an adaopt factory (``adaopt.adamw``), returns a factory with the same arguments whose
    optimizers mask the direction only, before the weight decay and the learning rate:

    .. math::
        d_t &= \text{the optimizer's direction (e.g. AdamW's } \hat m_t / (\sqrt{\hat v_t} + \epsilon)) \\
        \phi_{t,i} &= \mathbb{1}[\,d_{t,i}\, g_{t,i} > 0\,], \qquad
        \tilde d_t = d_t \odot \phi_t \, \frac{n}{1 + \sum_i \phi_{t,i}} \quad \text{(per tensor of } n \text{ coordinates)} \\
        \theta_t &= \theta_{t-1} - \eta_t (\tilde d_t + \lambda \theta_{t-1})

    for decoupled weight decay :math:`\lambda` (it is left unmasked), where :math:`g_t` is the
    gradient given to the direction (with coupled L2 decay, :math:`g_t + \lambda\theta_{t-1}`).
    Every adaopt factory chains its direction (its ``scale_by_*`` core) with the weight decay
    and the learning rate in one assembly; the returned factory runs ``optimizer`` with that
    assembly masking the core, so it works for every adaopt optimizer, under
    ``adaopt.inject_hyperparams(adaopt.cautious(adaopt.adamw))`` too (not the other way
    round: ``inject_hyperparams`` builds its optimizer later, at ``init`` and ``update``). A
    core that applies the learning rate and the sign itself (LaProp's, Polyak's) is masked where
    its step descends along the gradient; hypergradient descent's direction is masked inside the
    learner of its rate, which then learns from the step taken. The bold driver with its undo is
    refused: the undo replays the step its core returned. Per tensor: a zero-size
    leaf stays empty, a scalar keeps :math:`1/2` of an agreeing step. Complex parameters
    follow the optimizer's ``complex_convention``: ``"modulus"`` keeps a complex coordinate
    when :math:`\mathrm{Re}(\bar d_i g_i) > 0` (the angle to the gradient is below 90
    degrees), ``"real_imag"`` masks the real and imaginary parts as two coordinates (torch's
    ``view_as_real``, and pytorch-optimizer's).

    Given a gradient transformation (``optax.adamw(1e-3)``, or any chain), returns it with its
    whole update masked (:func:`scale_by_cautious_mask`): weight decay included, if it has any.
    Its updates are taken as steps (they descend); pass ``updates_are="directions"`` for a block
    whose updates point along the gradient (``optax.scale_by_adam()`` before a learning rate).

    Args:
      optimizer: an adaopt factory (``adaopt.adamw``, ``adaopt.lion``, ...), or a gradient
        transformation.
      updates_are: for a gradient transformation, ``"steps"`` or ``"directions"``, as above;
        ignored for a factory (its assembly says which).

    Returns:
      For a factory, a factory with its signature (call it with the same arguments); for a
      gradient transformation, an ``optax.GradientTransformationExtraArgs`` with its state.

    Raises:
      HyperparameterError: ``updates_are`` is neither choice, or ``optimizer`` is neither a factory nor a gradient
        transformation.
      TypeError: when the returned factory is called, if ``optimizer`` built its optimizer
        without adaopt's assembly (an optax factory; Schedule-Free and COCOB, whose update is
        not a direction times a learning rate; the bold driver with ``undo=True``, whose undo
        replays its own step;
        a factory that builds it later, as ``inject_hyperparams``): there is no direction to mask
        apart from the decay. The message says what to pass instead.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> c_adamw = adaopt.cautious(adaopt.adamw)
      >>> opt = c_adamw(learning_rate=0.1, weight_decay=0.5)
      >>> params = jnp.array([1.0, 1.0, 1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([1.0, -1.0, 2.0]), state, params)
      >>> updates.round(4)  # -0.1 * (3/4 * sign(g) + 0.5 * params): each direction agrees with g
      Array([-0.125,  0.025, -0.125], dtype=float32)

    References:
      Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of Code",
      https://arxiv.org/abs/2411.16085.

      Reference packages: pytorch-optimizer's ``cautious=True`` (rescaled by
      :math:`n / (1 + \sum\phi)`, its ``apply_cautious``) is this around the factory that
      reproduces each optimizer: ``cautious(lion)`` for ``Lion(cautious=True)``,
      ``cautious(laprop)`` for ``LaProp(cautious=True, foreach=False)``, ``cautious(adopt)``
      (``clip_count="call"``) for ``ADOPT(cautious=True)`` (it compares the sign with the
      clipped normalised gradient, which has the gradient's sign). Its ``AdEMAMix(cautious=True)``
      masks the fast moment alone, before adding :math:`\alpha` times the slow one: it is
      ``cautious(ademamix)`` with ``alpha=0``, and differs from it for :math:`\alpha > 0`. Its
      ``AdaFactor(cautious=True)`` masks only with a first moment (``beta1`` set): without one it
      is plain AdaFactor, where ``cautious(adafactor)`` with ``b1=None`` masks nothing (the step
      has the gradient's signs) but still rescales by :math:`n / (1 + n)`.
    """
    if base.is_transformation(optimizer):
        return scale_by_cautious_mask(optimizer, updates_are=updates_are)
    if not callable(optimizer):
        raise base.HyperparameterError(
            f"optimizer must be an adaopt factory (adaopt.adamw) or a gradient transformation (adaopt.adamw(1e-3)), "
            f"got {optimizer!r} of type {type(optimizer).__name__}."
        )
    base.check_choice("updates_are", updates_are, ("steps", "directions"))
    factory = optimizer

    @functools.wraps(factory)
    def cautious_factory(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        masked = 0

        def mask_core(core: optax.GradientTransformation, is_step: bool) -> optax.GradientTransformation:
            nonlocal masked
            masked += 1
            return scale_by_cautious_mask(core, updates_are="steps" if is_step else "directions")

        with base.wrapping_cores(mask_core):
            tx = factory(*args, **kwargs)
        if not masked:
            name = _factory_name(factory)
            raise TypeError(
                f"adaopt.cautious({name}) masks the direction of the optimizer that adaopt's assembly builds, but "
                f"{name} built its optimizer without it: an optax factory, a method whose update is not a direction "
                "times a learning rate (Schedule-Free, COCOB), one whose state replays its step (the bold driver's undo), "
                "or one that builds it later (inject_hyperparams). Pass the optimizer itself, adaopt.cautious(optax.adamw(1e-3)), to mask its "
                "whole update (weight decay included), or put cautious inside: "
                "adaopt.inject_hyperparams(adaopt.cautious(adaopt.adamw))."
            )
        return tx

    return cautious_factory


__all__ = ["cautious", "scale_by_cautious_mask"]
