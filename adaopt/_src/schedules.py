r"""Learning-rate schedules that optax lacks, with the exact semantics of their torch counterparts.

A schedule is a pure function ``count -> value`` (count from 0: the value for the first update),
jittable and vmappable, evaluated at a traced int32 step count as optax's are. It computes in the
count's floating dtype; an integer count is converted to JAX's default float dtype: float32, or
float64 under ``jax.enable_x64``. A float64 count under ``jax.enable_x64`` reproduces torch's
(float64) learning rates to about 1e-13.

Where optax already has the schedule, use optax's (re-exported under ``adaopt.``). For a torch
optimizer built with ``lr=lr`` and ``scheduler.step()`` called after every ``optimizer.step()``,
``tests/test_schedules.py`` checks each of these correspondences step by step:

- ``StepLR(step_size, gamma)``: ``optax.exponential_decay(lr, step_size, gamma, staircase=True)``.
- ``MultiStepLR(milestones, gamma)``: ``optax.piecewise_constant_schedule(lr, {m: gamma ** k})``,
  ``k`` the multiplicity of ``m`` in ``milestones``.
- ``ConstantLR(factor, total_iters)``:
  ``optax.piecewise_constant_schedule(lr * factor, {total_iters: 1 / factor})``.
- ``LinearLR(start_factor, end_factor, total_iters)``:
  ``optax.linear_schedule(lr * start_factor, lr * end_factor, total_iters)``.
- ``ExponentialLR(gamma)``: ``optax.exponential_decay(lr, 1, gamma)``.
- ``PolynomialLR(total_iters, power)``: ``optax.polynomial_schedule(lr, 0.0, power, total_iters)``.
- ``CosineAnnealingLR(T_max, eta_min)``: :func:`cosine_annealing_schedule`;
  ``optax.cosine_decay_schedule`` is the same only up to ``T_max`` (torch's does not stop there).
- ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)``: :func:`cosine_warm_restarts_schedule`.
- ``CyclicLR``: :func:`cyclic_schedule`, for the learning rate and the cycled momentum.
- ``OneCycleLR``: :func:`onecycle_schedule` and :func:`onecycle_momentum_schedule`; optax's
  one-cycle schedules place the phases one step later.
- ``SequentialLR(schedulers, milestones)``: ``optax.join_schedules(schedules, milestones)``.
- ``LambdaLR(lr_lambda)``: ``lambda count: lr * lr_lambda(count)``, with a jittable ``lr_lambda``.
- ``MultiplicativeLR(lr_lambda)``: the product :math:`\prod_{1 \le s \le t} f(s)` has no general
  closed form (a schedule cannot loop over past steps): write the product's closed form as a
  ``LambdaLR`` (a constant ``f`` is ``ExponentialLR``).
- ``ReduceLROnPlateau``: :func:`adaopt.reduce_on_plateau`, a transformation (it needs the loss).
- no torch scheduler: warmup-stable-decay, :func:`warmup_stable_decay_schedule`.

``gamma=0`` in ``StepLR`` / ``ExponentialLR`` is the one case optax's ``exponential_decay``
treats differently (it returns a constant schedule).

The values these schedules take (``init_value``, ``eta_min``, ``end_value``, the momenta ...) are
learning rates and momenta: a negative one is refused when the schedule is built, where an optimizer,
which checks a schedule's value at step 0 only, would have stepped uphill once the schedule crossed
zero. optax's schedules are optax's: ``linear_schedule(1e-3, -1e-3, 10)`` goes negative unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from adaopt._src import base, moments
from adaopt._src.base import HyperparameterError, Schedule

CyclicMode = Literal["triangular", "triangular2", "exp_range"]
AnnealStrategy = Literal["cos", "linear"]
WarmupShape = Literal["linear", "cosine"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]


def _float(count: Any) -> jax.Array:
    """The count as a float array: its own dtype if floating, else JAX's default float dtype."""
    t = jnp.asarray(count)
    if jnp.issubdtype(t.dtype, jnp.floating):
        return t
    return t.astype(jnp.result_type(float))


def _count(count: Any) -> jax.Array:
    """The count as an array, an integer one of fewer than 32 bits widened to int32: the schedules' step numbers (up
    to ``2**31 - 1``) then hold in its arithmetic, which stays in integers (exact) where it can."""
    t = jnp.asarray(count)
    if jnp.issubdtype(t.dtype, jnp.integer) and t.dtype.itemsize < 4:
        return t.astype(jnp.int32)
    return t


def _is_integer(t: jax.Array) -> bool:
    return bool(jnp.issubdtype(t.dtype, jnp.integer))


def cosine_annealing_schedule(init_value: Any, t_max: int, eta_min: Any = 0.0) -> Schedule:
    r"""Cosine annealing from ``init_value`` to ``eta_min`` over ``t_max`` steps, and back, periodically.

    .. math::
        \eta_t = \eta_{min} + \frac{(\eta_0 - \eta_{min}) \left(1 + \cos(\pi\, t / T_{max})\right)}{2}

    for every :math:`t \ge 0`: past ``t_max`` the rate climbs back to ``init_value`` at
    ``2 * t_max`` (a period of ``2 * t_max``), as torch's scheduler does. The count is reduced
    modulo ``2 * t_max`` first, so float32 keeps its accuracy on long runs.

    Args:
      init_value: the value at count 0 (torch: the optimizer's ``lr``).
      t_max: the half period, an integer >= 1 (torch's ``T_max``).
      eta_min: the value at ``t_max`` (torch's ``eta_min``).

    Returns:
      A schedule ``count -> value``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.cosine_annealing_schedule(0.1, t_max=10, eta_min=0.01)
      >>> [round(float(schedule(t)), 6) for t in (0, 5, 10, 15, 20)]
      [0.1, 0.055, 0.01, 0.055, 0.1]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
      https://arxiv.org/abs/1608.03983.

      Reference package: torch's ``CosineAnnealingLR(opt, T_max, eta_min)`` with
      ``lr=init_value``. Its recursive update telescopes to this closed form;
      ``optax.cosine_decay_schedule(init_value, t_max, alpha=eta_min / init_value)`` is the same
      up to ``t_max`` and then stays at ``eta_min``.
    """
    base.check_scalar("init_value", init_value, low=0.0)
    base.check_integer("t_max", t_max, 1)
    base.check_scalar("eta_min", eta_min, low=0.0)

    period = 2 * t_max

    def schedule(count: Any) -> jax.Array:
        t = _count(count)
        t = _float(jnp.mod(t, period) if period <= base.INT32_MAX else t)  # an int32 count never gets there
        return eta_min + (init_value - eta_min) * (1 + jnp.cos(jnp.pi * t / t_max)) / 2

    return schedule


def cosine_warm_restarts_schedule(init_value: Any, t_0: int, t_mult: int = 1, eta_min: Any = 0.0) -> Schedule:
    r"""SGDR: cosine annealing from ``init_value`` to ``eta_min``, restarted with periods ``t_0 * t_mult^i``.

    .. math::
        \eta_t = \eta_{min} + \frac{(\eta_0 - \eta_{min}) \left(1 + \cos(\pi\, T_{cur} / T_i)\right)}{2},
        \qquad T_i = T_0\, m^i, \quad T_{cur} = t - T_0 \frac{m^i - 1}{m - 1}

    where :math:`i` is the number of restarts before :math:`t` (:math:`T_{cur} = t \bmod T_0`
    when :math:`m = 1`). A restart sets the value back to ``init_value``; ``eta_min`` itself is
    never reached. The restarts are found by integer comparisons, exactly, also for float counts.

    Args:
      init_value: the value at each restart (torch: the optimizer's ``lr``).
      t_0: the first period, an integer >= 1 (torch's ``T_0``).
      t_mult: the factor by which each period grows, an integer >= 1 (torch's ``T_mult``).
      eta_min: the floor the cosine approaches (torch's ``eta_min``).

    Returns:
      A schedule ``count -> value``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.cosine_warm_restarts_schedule(1.0, t_0=2, t_mult=2)
      >>> [round(float(schedule(t)), 6) for t in range(7)]
      [1.0, 0.5, 1.0, 0.853553, 0.5, 0.146447, 1.0]

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
      https://arxiv.org/abs/1608.03983.

      Reference package: torch's ``CosineAnnealingWarmRestarts(opt, T_0, T_mult, eta_min)`` with
      ``lr=init_value``, stepped once per update (its ``step(epoch)`` form with fractional epochs
      is not covered).
    """
    base.check_scalar("init_value", init_value, low=0.0)
    base.check_integer("t_0", t_0, 1)
    base.check_integer("t_mult", t_mult, 1)
    base.check_scalar("eta_min", eta_min, low=0.0)
    starts, periods = [0], [t_0]
    if t_mult > 1:
        while starts[-1] + periods[-1] <= base.INT32_MAX:
            starts.append(starts[-1] + periods[-1])
            periods.append(periods[-1] * t_mult)

    def schedule(count: Any) -> jax.Array:
        t = _count(count)
        if t_mult == 1:
            t_cur, t_i = _float(jnp.mod(t, t_0)), float(t_0)
        else:
            # The restart index by comparisons against the (exact, integer) restart steps.
            ts = jnp.asarray(starts, t.dtype)
            n = jnp.sum(t[..., None] >= ts[1:], axis=-1)
            t_cur = _float(t - ts[n])
            t_i = jnp.asarray(periods, t_cur.dtype)[n]  # type: ignore[assignment]
        return eta_min + (init_value - eta_min) * (1 + jnp.cos(jnp.pi * t_cur / t_i)) / 2

    return schedule


def cyclic_schedule(
    base_value: Any,
    max_value: Any,
    step_size_up: Any = 2000,
    step_size_down: Any = None,
    mode: CyclicMode = "triangular",
    gamma: Any = 1.0,
    scale_fn: Callable[[jax.Array], jax.Array] | None = None,
    scale_mode: Literal["cycle", "iterations"] = "cycle",
) -> Schedule:
    r"""Cyclical learning rates (CLR): triangles between ``base_value`` and ``max_value``.

    .. math::
        \tau &= t \bmod (u + d), \qquad c = 1 + (t - \tau) / (u + d), \qquad
        s = \begin{cases} \tau / u & \tau \le u \\ (u + d - \tau) / d & \text{otherwise} \end{cases} \\
        \eta_t &= \eta_{base} + (\eta_{max} - \eta_{base})\, s\, \sigma, \qquad
        \sigma = \begin{cases} 1 & \text{triangular} \\ 2^{-(c - 1)} & \text{triangular2} \\
            \gamma^t & \text{exp\_range} \\ \texttt{scale\_fn}(c \text{ or } t) & \text{custom}
        \end{cases}

    with :math:`u`, :math:`d` the steps up and down, :math:`c` the cycle (from 1) and
    :math:`\tau` the step within it. The amplitude :math:`\sigma` is a function of the cycle
    (triangular, triangular2) or of the step (exp_range). Torch computes the position in the
    cycle as :math:`x = 1 + t/(u + d) - c`, with :math:`s = x / r` or :math:`(x - 1)/(r - 1)`,
    :math:`r = u/(u + d)`: the same values, which lose bits as :math:`t` grows.

    Args:
      base_value: the value at the start of each cycle (torch's ``base_lr``).
      max_value: the value at the top of the first cycle (torch's ``max_lr``); it may be
        below ``base_value``, which gives torch's cycled momentum (see below).
      step_size_up: steps from the bottom to the top of a cycle, > 0.
      step_size_down: steps from the top back to the bottom, >= 0; None: ``step_size_up``.
      mode: "triangular", "triangular2" (the amplitude halves each cycle) or "exp_range"
        (it decays by ``gamma`` each step); ignored when ``scale_fn`` is given.
      gamma: the decay of "exp_range", in (0, 1] (the other modes ignore it).
      scale_fn: a custom amplitude, a jittable function of the cycle (a float, from 1) or of
        the step, whose values lie in [0, 1].
      scale_mode: what ``scale_fn`` takes: "cycle" or "iterations".

    Returns:
      A schedule ``count -> value``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.cyclic_schedule(0.1, 0.5, step_size_up=2, mode="triangular2")
      >>> [round(float(schedule(t)), 6) for t in range(9)]
      [0.1, 0.3, 0.5, 0.3, 0.1, 0.2, 0.3, 0.2, 0.1]

    References:
      Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
      https://arxiv.org/abs/1506.01186.

      Reference package: torch's ``CyclicLR(opt, base_lr, max_lr, step_size_up, step_size_down,
      mode, gamma, scale_fn, scale_mode)``. With ``cycle_momentum=True`` (torch's default) torch
      also cycles the momentum (or Adam's ``beta1``): that is this schedule with
      ``base_value=max_momentum`` and ``max_value=base_momentum``, e.g. as ``b1`` through
      ``optax.inject_hyperparams``.
    """
    base.check_scalar("base_value", base_value, low=0.0)
    base.check_scalar("max_value", max_value, low=0.0)
    base.check_scalar("step_size_up", step_size_up, low=0.0, low_open=True)
    if step_size_down is not None:
        base.check_scalar("step_size_down", step_size_down, low=0.0)
    if scale_fn is None:
        base.check_choice("mode", mode, ("triangular", "triangular2", "exp_range"))
    elif not callable(scale_fn):
        raise HyperparameterError(f"scale_fn must be None or a callable, got {scale_fn!r}.")
    base.check_choice("scale_mode", scale_mode, ("cycle", "iterations"))
    log_gamma: Any = 0.0
    if scale_fn is None and mode == "exp_range":  # the other modes ignore gamma, as torch's do
        # A gamma above 1 grows the amplitude without bound (torch allows it): inf * 0 is NaN within a million steps.
        base.check_scalar("gamma", gamma, low=0.0, low_open=True, high=1.0)
        # gamma ** t as exp(t log gamma), log gamma from the float64 gamma: in float32 this keeps
        # the relative error near 1e-7 where rounding gamma to float32 first would give t * 3e-8.
        log_gamma = jnp.log(gamma) if isinstance(gamma, jax.core.Tracer) else math.log(float(gamma))
    up = float(step_size_up)
    down = float(step_size_down) if step_size_down is not None else up
    total = up + down
    # A whole number of steps per cycle: an integer count's place in its cycle is found in integers.
    period = int(total) if total.is_integer() and total <= base.INT32_MAX else None

    def amplitude(cycle: jax.Array, t: jax.Array) -> Any:
        if scale_fn is not None:
            return scale_fn(cycle if scale_mode == "cycle" else t)
        if mode == "triangular":
            return 1.0
        if mode == "triangular2":
            return 1 / (2.0 ** (cycle - 1))
        return jnp.exp(t * log_gamma)

    def schedule(count: Any) -> jax.Array:
        c = _count(count)
        t = _float(c)
        # The step within the cycle, exactly for an integer count and a whole period (torch's 1 + t / (u + d) - c
        # loses bits as t grows, and so would t mod (u + d) in float32 past 2**24): x / r = pos / u and
        # (x - 1) / (r - 1) = (u + d - pos) / d.
        if period is not None and _is_integer(c):
            offset = jnp.mod(c, period)
            pos, cycle = _float(offset), _float((c - offset) // period) + 1
        else:
            pos = jnp.mod(t, total)
            cycle = (t - pos) / total + 1
        fraction = jnp.where(pos <= up, pos / up, (total - pos) / (down or 1.0))
        return base_value + (max_value - base_value) * fraction * amplitude(cycle, t)

    return schedule


def _onecycle(
    total_steps: int,
    pct_start: Any,
    anneal_strategy: AnnealStrategy,
    three_phase: bool,
    values: Sequence[tuple[Any, Any]],
) -> Schedule:
    """Torch's OneCycleLR phase machine: interpolate ``values[i]`` over phase ``i``."""
    base.check_integer("total_steps", total_steps, 1)
    base.check_scalar("pct_start", pct_start, low=0.0, high=1.0)
    base.check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    base.check_flag("three_phase", three_phase)
    # Torch's phase ends: the step at which each phase reaches its end value.
    if three_phase:
        ends = [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2, total_steps - 1.0]
    else:
        ends = [float(pct_start * total_steps) - 1, total_steps - 1.0]
    starts = [0.0, *ends[:-1]]

    def anneal(start: Any, end: Any, pct: jax.Array) -> jax.Array:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: Any) -> jax.Array:
        # Torch stops at total_steps; from the last step of the cycle on, hold its value.
        t = _float(jnp.clip(jnp.asarray(count), 0, total_steps - 1))
        value: jax.Array | None = None
        for start, end, (v0, v1) in reversed(list(zip(starts, ends, values, strict=True))):
            # A phase of zero length (where torch divides by zero) is at its end: the step at which a phase reaches
            # its end value is its end (torch's end_step), so a warmup of pct_start * total_steps = 1 gives the peak
            # at step 0.
            if end > start:
                phase = anneal(v0, v1, (t - start) / (end - start))
            else:
                phase = jnp.broadcast_to(jnp.asarray(v1, t.dtype), t.shape)
            value = phase if value is None else jnp.where(t <= end, phase, value)
        assert value is not None
        return value

    return schedule


def onecycle_schedule(
    total_steps: int,
    peak_value: Any,
    pct_start: Any = 0.3,
    anneal_strategy: AnnealStrategy = "cos",
    div_factor: Any = 25.0,
    final_div_factor: Any = 1e4,
    three_phase: bool = False,
) -> Schedule:
    r"""The 1cycle policy, as torch's ``OneCycleLR``: up to ``peak_value``, then down far below the start.

    With :math:`\eta_{init} = \eta_{peak} / \text{div\_factor}`, :math:`\eta_{min} = \eta_{init} /
    \text{final\_div\_factor}`, :math:`p = \text{pct\_start}`, :math:`T` = ``total_steps``, and
    the interpolation :math:`a(u, v, \rho) = v + (u - v)(1 + \cos \pi\rho)/2` ("cos") or
    :math:`u + (v - u)\rho` ("linear"):

    .. math::
        \eta_t = \begin{cases}
            a(\eta_{init}, \eta_{peak}, t / e_1) & t \le e_1 = pT - 1 \\
            a(\eta_{peak}, \eta_{min}, (t - e_1) / (T - 1 - e_1)) & \text{otherwise}
        \end{cases}

    and with ``three_phase``: up over :math:`[0, e_1]`, back to :math:`\eta_{init}` over
    :math:`[e_1, e_2 = 2pT - 2]`, then down to :math:`\eta_{min}` over :math:`[e_2, T - 1]`.
    The value at :math:`T - 1` is held from there on (torch's ``OneCycleLR`` extrapolates its last
    phase at ``T``, to a negative rate with ``"linear"``, and refuses to step past ``T``). A phase of
    no length (:math:`pT = 1`, where torch divides by zero) is at its end value: the peak at step 0.

    Args:
      total_steps: the length of the cycle, an integer >= 1.
      peak_value: the top of the cycle (torch's ``max_lr``).
      pct_start: the fraction of the cycle spent going up, in [0, 1].
      anneal_strategy: "cos" or "linear".
      div_factor: the start is ``peak_value / div_factor``, > 0.
      final_div_factor: the end is ``peak_value / div_factor / final_div_factor``, > 0.
      three_phase: come back to the start value before the final decay (the paper's version).

    Returns:
      A schedule ``count -> value``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.onecycle_schedule(11, 1.0, pct_start=0.5, anneal_strategy="linear",
      ...                                     div_factor=10.0, final_div_factor=10.0)
      >>> [round(float(schedule(t)), 4) for t in (0, 2, 4, 6, 8, 10, 20)]
      [0.1, 0.5, 0.9, 0.73, 0.37, 0.01, 0.01]

    References:
      Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using Large
      Learning Rates", 2017, https://arxiv.org/abs/1708.07120.

      Reference package: torch's ``OneCycleLR(opt, max_lr=peak_value, total_steps, pct_start,
      anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
      three_phase=three_phase)``. ``optax.cosine_onecycle_schedule`` and
      ``optax.linear_onecycle_schedule`` reach the peak one step later (at
      ``int(pct_start * T)``) and the end value at ``T`` instead of ``T - 1``; the linear one
      also fixes the second phase's end at ``pct_final``. With ``cycle_momentum=True`` (torch's
      default) torch also cycles the momentum: :func:`onecycle_momentum_schedule`.
    """
    base.check_scalar("peak_value", peak_value, low=0.0)
    base.check_scalar("div_factor", div_factor, low=0.0, low_open=True)
    base.check_scalar("final_div_factor", final_div_factor, low=0.0, low_open=True)
    initial = peak_value / div_factor
    final = initial / final_div_factor
    if three_phase:
        values = [(initial, peak_value), (peak_value, initial), (initial, final)]
    else:
        values = [(initial, peak_value), (peak_value, final)]
    return _onecycle(total_steps, pct_start, anneal_strategy, three_phase, values)


def onecycle_momentum_schedule(
    total_steps: int,
    base_momentum: Any = 0.85,
    max_momentum: Any = 0.95,
    pct_start: Any = 0.3,
    anneal_strategy: AnnealStrategy = "cos",
    three_phase: bool = False,
) -> Schedule:
    r"""The momentum of the 1cycle policy: down from ``max_momentum`` while the rate goes up, and back.

    The phases of :func:`onecycle_schedule`, interpolating ``max_momentum`` to
    ``base_momentum`` over the first and back over the second (with ``three_phase``, held at
    ``max_momentum`` over the third). With :math:`a` and :math:`e_1 = pT - 1` as in
    :func:`onecycle_schedule`:

    .. math::
        m_t = \begin{cases}
            a(m_{max}, m_{base}, t / e_1) & t \le e_1 \\
            a(m_{base}, m_{max}, (t - e_1) / (T - 1 - e_1)) & \text{otherwise}
        \end{cases}

    and with ``three_phase``: down over :math:`[0, e_1]`, back up over
    :math:`[e_1, e_2 = 2pT - 2]`, then :math:`m_{max}` over :math:`[e_2, T - 1]`.

    Args:
      total_steps: the length of the cycle, an integer >= 1.
      base_momentum: the momentum at the peak learning rate.
      max_momentum: the momentum at the start and the end.
      pct_start: the fraction of the cycle spent going up (the momentum going down), in [0, 1].
      anneal_strategy: "cos" or "linear".
      three_phase: come back to ``max_momentum`` before the final phase, as
        :func:`onecycle_schedule` comes back to its start value.

    Returns:
      A schedule ``count -> value``, e.g. Adam's ``b1`` through ``optax.inject_hyperparams``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.onecycle_momentum_schedule(11, pct_start=0.5, anneal_strategy="linear")
      >>> [round(float(schedule(t)), 4) for t in (0, 4, 10)]
      [0.95, 0.8611, 0.95]

    References:
      Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using Large
      Learning Rates", 2017, https://arxiv.org/abs/1708.07120.

      Reference package: the ``momentum`` (or ``betas[0]``) that torch's ``OneCycleLR(opt, ...,
      cycle_momentum=True, base_momentum, max_momentum)`` writes into the optimizer at each step.
    """
    base.check_scalar("base_momentum", base_momentum, low=0.0)
    base.check_scalar("max_momentum", max_momentum, low=0.0)
    values = [(max_momentum, base_momentum), (base_momentum, max_momentum)]
    if three_phase:
        values.append((max_momentum, max_momentum))
    return _onecycle(total_steps, pct_start, anneal_strategy, three_phase, values)


def warmup_stable_decay_schedule(
    peak_value: Any,
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: Any = 0.2,
    *,
    init_value: Any = 0.0,
    end_value: Any = 0.0,
    warmup_shape: WarmupShape = "linear",
    decay_shape: DecayShape = "linear",
) -> Schedule:
    r"""Warmup-stable-decay (WSD, "trapezoidal"): warm up, hold ``peak_value``, then cool down at the end.

    With :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`D` =
    ``round(decay_fraction * T)`` steps of decay starting at :math:`S = T - D`, and
    :math:`p = (t - S) / D`:

    .. math::
        \eta_t = \begin{cases}
            \eta_{init} + (\eta_{peak} - \eta_{init})\, w(t / W) & t < W \\
            \eta_{peak} & W \le t < S \\
            \eta_{end} + (\eta_{peak} - \eta_{end})\, d(p) & S \le t < T \\
            \eta_{end} & t \ge T
        \end{cases}

    with the warmup :math:`w(x) = x` ("linear") or :math:`(1 - \cos \pi x) / 2` ("cosine"),
    and the decay :math:`d(p) = 1 - p` ("linear"), :math:`(1 + \cos \pi p) / 2` ("cosine") or
    :math:`1 - \sqrt{p}` ("1-sqrt", Hägele et al. 2024).

    Args:
      peak_value: the value of the stable phase.
      total_steps: the length of the schedule, an integer >= 1; ``end_value`` from there on.
      warmup_steps: the length of the warmup, an integer >= 0.
      decay_fraction: the fraction of ``total_steps`` spent decaying, in [0, 1]
        (``decay_fraction = D / total_steps`` gives exactly ``D`` steps).
      init_value: the value at count 0 (when ``warmup_steps > 0``).
      end_value: the value the decay reaches at ``total_steps``.
      warmup_shape: "linear" or "cosine".
      decay_shape: "linear", "cosine" or "1-sqrt".

    Returns:
      A schedule ``count -> value``.

    Example:
      >>> import adaopt
      >>> schedule = adaopt.warmup_stable_decay_schedule(1.0, total_steps=10, warmup_steps=2,
      ...                                                decay_fraction=0.4, decay_shape="1-sqrt")
      >>> [round(float(schedule(t)), 4) for t in range(11)]
      [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.2929, 0.134, 0.0]

    References:
      Hu et al., "MiniCPM: Unveiling the Potential of Small Language Models with Scalable
      Training Strategies", 2024, https://arxiv.org/abs/2404.06395 (the schedule).

      Hägele, Bakouch, Kosson, Ben Allal, Von Werra & Jaggi, "Scaling Laws and Compute-Optimal
      Training Beyond Fixed Training Durations", NeurIPS 2024, https://arxiv.org/abs/2405.18392
      (the "1-sqrt" cooldown).

      Reference package: torch has no WSD scheduler; ``SequentialLR`` of
      ``LinearLR(start_factor=init/peak, total_iters=W)``, ``ConstantLR(factor=1.0)`` and
      ``LinearLR(end_factor=end/peak, total_iters=D)`` ("linear"),
      ``CosineAnnealingLR(T_max=D, eta_min=end)`` ("cosine") or a ``LambdaLR`` ("1-sqrt") with
      milestones ``[W, T - D]`` is the same schedule up to ``T``.
    """
    base.check_scalar("peak_value", peak_value, low=0.0)
    base.check_integer("total_steps", total_steps, 1)
    base.check_integer("warmup_steps", warmup_steps, 0)
    base.check_scalar("decay_fraction", decay_fraction, low=0.0, high=1.0)
    base.check_scalar("init_value", init_value, low=0.0)
    base.check_scalar("end_value", end_value, low=0.0)
    base.check_choice("warmup_shape", warmup_shape, ("linear", "cosine"))
    base.check_choice("decay_shape", decay_shape, ("linear", "cosine", "1-sqrt"))
    decay_steps = round(float(decay_fraction) * total_steps)
    if warmup_steps + decay_steps > total_steps:
        raise HyperparameterError(
            f"warmup_steps + decay_steps must be at most total_steps={total_steps}, got warmup_steps="
            f"{warmup_steps} and decay_steps=round(decay_fraction * total_steps)={decay_steps} "
            f"(decay_fraction={decay_fraction!r}): shorten the warmup or the decay."
        )
    decay_start = total_steps - decay_steps

    def schedule(count: Any) -> jax.Array:
        t = _count(count)  # compared as it is: an int32 count past 2**24 is exact there, not in float32
        x = _float(t) / max(warmup_steps, 1)
        w = x if warmup_shape == "linear" else (1 - jnp.cos(jnp.pi * x)) / 2
        p = jnp.clip(_float(t - decay_start) / max(decay_steps, 1), 0.0, 1.0)
        if decay_shape == "linear":
            d = 1 - p
        elif decay_shape == "cosine":
            d = (1 + jnp.cos(jnp.pi * p)) / 2
        else:
            d = 1 - moments.safe_sqrt(p)
        warm = init_value + (peak_value - init_value) * w
        decay = end_value + (peak_value - end_value) * d
        value = jnp.where(t < decay_start, peak_value, decay)
        value = jnp.where(t < warmup_steps, warm, value)
        return jnp.where(t >= total_steps, end_value, value)

    return schedule


__all__ = [
    "cosine_annealing_schedule",
    "cosine_warm_restarts_schedule",
    "cyclic_schedule",
    "onecycle_momentum_schedule",
    "onecycle_schedule",
    "warmup_stable_decay_schedule",
]
