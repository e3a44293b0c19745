"""Every schedule against ``torch.optim.lr_scheduler``, over a whole horizon, for several draws.

torch runs its scheduler the way a training loop does: a dummy SGD optimizer with one
parameter, ``scheduler.step()`` after each ``optimizer.step()``, and the learning rate (and the
momentum, where torch cycles it) read before each optimizer step. adaopt's schedule (or the
optax schedule adaopt re-exports for that scheduler) is evaluated at counts 0..N-1, jitted and
vmapped:

- in float64 (``jax.enable_x64``, float64 counts): relative error <= 1e-12 at every step, where
  values under a thousandth of the peak are compared at 1e-15 of the peak: there torch's own
  formulas cancel (``1 + cos`` near pi, ``(end - start) * pct + start`` near the end) and carry
  more than 1e-12 of relative rounding error;
- in float32 at int32 counts (what an optimizer's step count is): error <= 1e-6 of the peak
  (float32 itself rounds gamma, pi * t / T and friends at 6e-8 relative).

Where torch has no scheduler (warmup-stable-decay), the same schedule is composed from torch's
schedulers with ``SequentialLR``; where optax's schedule is not torch's, a test shows it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.optim import lr_scheduler

import adaopt
from adaopt import HyperparameterError

DRAWS = 2
HORIZON = 2001  # the longest run compared
TOLERANCE_FLOAT64 = 1e-12
FLOOR_FLOAT64 = 1e-3  # values below FLOOR * peak are compared at TOLERANCE * FLOOR * peak
TOLERANCE_FLOAT32 = 1e-6  # relative to the peak
# optax's exponential_decay computes decay_rate ** t in float32, decay_rate rounded to float32
# first (6e-8 relative): t steps later the value is off by up to t * 6e-8 relative.
TOLERANCE_FLOAT32_POWER = 1e-4

TorchMaker = Callable[[torch.optim.Optimizer], Any]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A torch scheduler and the adaopt (or optax) schedule that must reproduce it."""

    torch: TorchMaker
    ours: Callable[[], optax.Schedule]
    steps: int
    lr: float = 1.0  # the torch optimizer's lr
    key: str = "lr"  # what torch's scheduler writes that the schedule reproduces: "lr" or "momentum"
    tolerance_float32: float = TOLERANCE_FLOAT32


def torch_sequence(pair: Pair) -> np.ndarray:
    """``param_groups[0][pair.key]`` before each of ``pair.steps`` optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=pair.lr, momentum=0.9)
    scheduler = pair.torch(opt)
    out = []
    for _ in range(pair.steps):
        out.append(float(opt.param_groups[0][pair.key]))
        p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()
    return np.asarray(out)


def evaluate(schedule: optax.Schedule, steps: int, float64: bool, *, jit: bool = False) -> np.ndarray:
    """The schedule at counts 0..steps-1: float64 counts under x64, or int32 counts in float32.

    Vmapped, and jitted only on request: over one fixed length of counts, JAX's cache of
    compiled operations serves every draw, where a jit would compile each draw anew (seconds on
    a loaded machine). ``test_jit_dtypes_and_strict_promotion`` checks that jit gives the same
    values; one-off evaluations are cheaper jitted.
    """
    assert steps <= HORIZON
    with jax.enable_x64(float64):
        counts = jnp.arange(HORIZON, dtype=jnp.float64 if float64 else jnp.int32)
        values = (jax.jit(jax.vmap(schedule)) if jit else jax.vmap(schedule))(counts)
        assert values.dtype == (jnp.float64 if float64 else jnp.float32), values.dtype
        return np.asarray(values, np.float64)[:steps]


def errors(ours64: np.ndarray, ours32: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    peak = float(np.max(np.abs(theirs)))
    assert peak > 0
    e64 = float(np.max(np.abs(ours64 - theirs) / (np.abs(theirs) + FLOOR_FLOAT64 * peak)))
    e32 = float(np.max(np.abs(ours32 - theirs))) / peak
    return e64, e32


def assert_reproduces(pair: Pair) -> None:
    theirs = torch_sequence(pair)
    assert np.ptp(theirs) > 0, "the torch schedule is constant: the comparison would prove little"
    e64, e32 = errors(evaluate(pair.ours(), pair.steps, True), evaluate(pair.ours(), pair.steps, False), theirs)
    assert e64 <= TOLERANCE_FLOAT64, f"float64 relative error {e64:.3g}"
    assert e32 <= pair.tolerance_float32, f"float32 error {e32:.3g} of the peak"


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _i(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(rng.integers(low, high + 1))


# Each draw returns a Pair from a random generator: the hyperparameters, the torch scheduler
# they configure and the schedule that must reproduce it. Python floats only (np.float64
# scalars would not be weakly typed in JAX).


def draw_step(rng: np.random.Generator) -> Pair:
    lr, step_size, gamma = _u(rng, 0.01, 1.0), _i(rng, 1, 150), _u(rng, 0.05, 0.99)
    return Pair(
        lambda opt: lr_scheduler.StepLR(opt, step_size, gamma),
        lambda: optax.exponential_decay(lr, step_size, gamma, staircase=True),
        1000,
        lr,
        tolerance_float32=TOLERANCE_FLOAT32_POWER,
    )


def draw_multistep(rng: np.random.Generator) -> Pair:
    lr, gamma = _u(rng, 0.01, 1.0), _u(rng, 0.1, 0.9)
    milestones = sorted(int(m) for m in rng.integers(0, 1000, size=_i(rng, 1, 6)))
    milestones.append(milestones[-1])  # a repeated milestone decays twice
    scales = {m: gamma ** milestones.count(m) for m in milestones}
    return Pair(
        lambda opt: lr_scheduler.MultiStepLR(opt, milestones, gamma),
        lambda: optax.piecewise_constant_schedule(lr, scales),
        1000,
        lr,
    )


def draw_constant(rng: np.random.Generator) -> Pair:
    lr, factor, total_iters = _u(rng, 0.01, 1.0), _u(rng, 0.05, 0.95), _i(rng, 1, 900)
    return Pair(
        lambda opt: lr_scheduler.ConstantLR(opt, factor, total_iters),
        lambda: optax.piecewise_constant_schedule(lr * factor, {total_iters: 1 / factor}),
        1000,
        lr,
    )


def draw_linear(rng: np.random.Generator) -> Pair:
    lr, start, total_iters = _u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0), _i(rng, 1, 900)
    end = 0.0 if rng.uniform() < 0.3 else _u(rng, 0.0, 1.0)
    return Pair(
        lambda opt: lr_scheduler.LinearLR(opt, start, end, total_iters),
        lambda: optax.linear_schedule(lr * start, lr * end, total_iters),
        1000,
        lr,
    )


def draw_exponential(rng: np.random.Generator) -> Pair:
    lr, gamma = _u(rng, 0.01, 1.0), _u(rng, 0.99, 0.9999)
    return Pair(
        lambda opt: lr_scheduler.ExponentialLR(opt, gamma),
        lambda: optax.exponential_decay(lr, 1, gamma),
        1000,
        lr,
        tolerance_float32=TOLERANCE_FLOAT32_POWER,
    )


def draw_polynomial(rng: np.random.Generator) -> Pair:
    lr, total_iters, power = _u(rng, 0.01, 1.0), _i(rng, 1, 900), _u(rng, 0.3, 3.0)
    return Pair(
        lambda opt: lr_scheduler.PolynomialLR(opt, total_iters, power),
        lambda: optax.polynomial_schedule(lr, 0.0, power, total_iters),
        1000,
        lr,
    )


def _eta_min(rng: np.random.Generator, lr: float) -> float:
    return 0.0 if rng.uniform() < 0.5 else _u(rng, 0.0, 0.5) * lr


def draw_cosine_annealing(rng: np.random.Generator) -> Pair:
    """Several half periods: torch's scheduler climbs back up after T_max."""
    lr, t_max = _u(rng, 0.01, 1.0), _i(rng, 2, 400)
    eta_min = _eta_min(rng, lr)
    return Pair(
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, t_max, eta_min),
        lambda: adaopt.cosine_annealing_schedule(lr, t_max, eta_min),
        1200,
        lr,
    )


def draw_optax_cosine_decay(rng: np.random.Generator) -> Pair:
    """optax's cosine decay is torch's CosineAnnealingLR up to T_max (not after: see below)."""
    lr, t_max = _u(rng, 0.01, 1.0), _i(rng, 2, 1000)
    eta_min = _eta_min(rng, lr)
    return Pair(
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, t_max, eta_min),
        lambda: optax.cosine_decay_schedule(lr, t_max, alpha=eta_min / lr),
        t_max + 1,
        lr,
    )


def draw_warm_restarts(rng: np.random.Generator) -> Pair:
    lr, t_0, t_mult = _u(rng, 0.01, 1.0), _i(rng, 1, 60), _i(rng, 1, 3)
    eta_min = _eta_min(rng, lr)
    return Pair(
        lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, t_0, t_mult, eta_min),
        lambda: adaopt.cosine_warm_restarts_schedule(lr, t_0, t_mult, eta_min),
        1500,
        lr,
    )


def _cyclic_arguments(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "step_size_up": _i(rng, 1, 300),
        "step_size_down": None if rng.uniform() < 0.3 else _i(rng, 0, 300),
        "gamma": _u(rng, 0.99, 1.0),
    }


def draw_cyclic(mode: str, scale_mode: str = "cycle") -> Callable[[np.random.Generator], Pair]:
    def draw(rng: np.random.Generator) -> Pair:
        base_lr = _u(rng, 0.001, 0.1)
        max_lr = base_lr + _u(rng, 0.01, 1.0)
        kw = _cyclic_arguments(rng)
        # A user's amplitude function, the same one for torch and adaopt.
        scale_fn = (lambda x: 0.5 ** (x / 7.0)) if mode == "custom" else None
        torch_mode = "triangular" if mode == "custom" else mode
        return Pair(
            lambda opt: lr_scheduler.CyclicLR(
                opt, base_lr, max_lr, mode=torch_mode, scale_fn=scale_fn, scale_mode=scale_mode,
                cycle_momentum=False, **kw,
            ),
            lambda: adaopt.cyclic_schedule(base_lr, max_lr, mode=torch_mode, scale_fn=scale_fn, scale_mode=scale_mode, **kw),  # type: ignore[arg-type]
            2000,
        )  # fmt: skip

    return draw


def draw_cyclic_momentum(rng: np.random.Generator) -> Pair:
    """torch's cycled momentum is the cyclic schedule from max_momentum to base_momentum."""
    base_m = _u(rng, 0.5, 0.9)
    max_m = base_m + _u(rng, 0.01, 0.09)
    mode = ("triangular", "triangular2", "exp_range")[_i(rng, 0, 2)]
    kw = _cyclic_arguments(rng)
    return Pair(
        lambda opt: lr_scheduler.CyclicLR(
            opt, 0.01, 0.1, mode=mode, cycle_momentum=True, base_momentum=base_m, max_momentum=max_m, **kw
        ),
        lambda: adaopt.cyclic_schedule(max_m, base_m, mode=mode, **kw),  # type: ignore[arg-type]
        2000,
        key="momentum",
    )


def _onecycle_arguments(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "pct_start": _u(rng, 0.05, 0.6),
        "anneal_strategy": ("cos", "linear")[_i(rng, 0, 1)],
        "three_phase": bool(rng.uniform() < 0.5),
    }


def draw_onecycle(rng: np.random.Generator) -> Pair:
    total, peak = _i(rng, 20, 1500), _u(rng, 0.01, 1.0)
    div, final_div = _u(rng, 2.0, 50.0), _u(rng, 10.0, 1e4)
    kw = _onecycle_arguments(rng)
    return Pair(
        lambda opt: lr_scheduler.OneCycleLR(opt, peak, total, div_factor=div, final_div_factor=final_div, **kw),
        lambda: adaopt.onecycle_schedule(total, peak, div_factor=div, final_div_factor=final_div, **kw),
        total,
    )


def draw_onecycle_momentum(rng: np.random.Generator) -> Pair:
    total, base_m = _i(rng, 20, 1500), _u(rng, 0.5, 0.9)
    max_m = base_m + _u(rng, 0.01, 0.09)
    kw = _onecycle_arguments(rng)
    return Pair(
        lambda opt: lr_scheduler.OneCycleLR(opt, 0.1, total, base_momentum=base_m, max_momentum=max_m, **kw),
        lambda: adaopt.onecycle_momentum_schedule(total, base_m, max_m, **kw),
        total,
        key="momentum",
    )


def torch_wsd(
    peak: float, total: int, warmup: int, decay: int, init: float, end: float, warmup_shape: str, decay_shape: str
) -> TorchMaker:
    """Warmup-stable-decay from torch's schedulers: SequentialLR of warmup, constant and decay.

    torch has no scheduler for a cosine warmup or a 1-sqrt decay: those two are LambdaLRs, the
    factors a torch user writes; the rest are torch's own LinearLR, ConstantLR and
    CosineAnnealingLR.
    """

    def make(opt: torch.optim.Optimizer) -> Any:
        schedulers, milestones = [], []
        if warmup > 0:
            if warmup_shape == "linear":
                schedulers.append(lr_scheduler.LinearLR(opt, init / peak, 1.0, warmup))
            else:
                schedulers.append(
                    lr_scheduler.LambdaLR(
                        opt, lambda k: (init + (peak - init) * (1 - math.cos(math.pi * k / warmup)) / 2) / peak
                    )
                )
            milestones.append(warmup)
        if total - decay > warmup:
            schedulers.append(lr_scheduler.ConstantLR(opt, 1.0, 0))
            milestones.append(total - decay)
        if decay_shape == "linear":
            schedulers.append(lr_scheduler.LinearLR(opt, 1.0, end / peak, decay))
        elif decay_shape == "cosine":
            schedulers.append(lr_scheduler.CosineAnnealingLR(opt, decay, end))
        else:
            schedulers.append(
                lr_scheduler.LambdaLR(opt, lambda k: (end + (peak - end) * (1 - math.sqrt(k / decay))) / peak)
            )
        return lr_scheduler.SequentialLR(opt, schedulers, milestones[: len(schedulers) - 1])

    return make


def draw_wsd(warmup_shape: str, decay_shape: str) -> Callable[[np.random.Generator], Pair]:
    def draw(rng: np.random.Generator) -> Pair:
        peak, total = _u(rng, 0.01, 1.0), _i(rng, 100, 1500)
        warmup = _i(rng, 0, total // 3)
        fraction = _u(rng, 0.05, 0.6)
        decay = round(fraction * total)
        init, end = _u(rng, 0.01, 0.5) * peak, (0.0 if rng.uniform() < 0.3 else _u(rng, 0.0, 0.5) * peak)
        return Pair(
            torch_wsd(peak, total, warmup, decay, init, end, warmup_shape, decay_shape),
            lambda: adaopt.warmup_stable_decay_schedule(
                peak, total, warmup, fraction, init_value=init, end_value=end,
                warmup_shape=warmup_shape, decay_shape=decay_shape,  # type: ignore[arg-type]
            ),
            total + 1,  # up to and including the end of the decay
            peak,
        )  # fmt: skip

    return draw


DRAWERS: dict[str, Callable[[np.random.Generator], Pair]] = {
    "StepLR-optax.exponential_decay": draw_step,
    "MultiStepLR-optax.piecewise_constant": draw_multistep,
    "ConstantLR-optax.piecewise_constant": draw_constant,
    "LinearLR-optax.linear_schedule": draw_linear,
    "ExponentialLR-optax.exponential_decay": draw_exponential,
    "PolynomialLR-optax.polynomial_schedule": draw_polynomial,
    "CosineAnnealingLR-cosine_annealing": draw_cosine_annealing,
    "CosineAnnealingLR-optax.cosine_decay_to_T_max": draw_optax_cosine_decay,
    "CosineAnnealingWarmRestarts-cosine_warm_restarts": draw_warm_restarts,
    "CyclicLR-triangular": draw_cyclic("triangular"),
    "CyclicLR-triangular2": draw_cyclic("triangular2"),
    "CyclicLR-exp_range": draw_cyclic("exp_range"),
    "CyclicLR-scale_fn-cycle": draw_cyclic("custom", "cycle"),
    "CyclicLR-scale_fn-iterations": draw_cyclic("custom", "iterations"),
    "CyclicLR-momentum": draw_cyclic_momentum,
    "OneCycleLR-onecycle": draw_onecycle,
    "OneCycleLR-momentum": draw_onecycle_momentum,
    **{
        f"WSD-{w}-{d}-SequentialLR": draw_wsd(w, d)
        for w in ("linear", "cosine")
        for d in ("linear", "cosine", "1-sqrt")
    },
}
# adaopt's own schedules get one draw more than the optax schedules re-exported.
CASES = [(name, draw) for name in DRAWERS for draw in range(DRAWS if "optax." in name else DRAWS + 1)]


@pytest.mark.parametrize(("name", "draw"), CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_reproduces_torch(name: str, draw: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{draw}".encode()))
    assert_reproduces(DRAWERS[name](rng))


def test_comparison_is_sharp() -> None:
    """A schedule one hyperparameter off, or with another shape, fails the comparison."""
    wrong = [
        Pair(
            lambda o: lr_scheduler.CosineAnnealingLR(o, 100, 0.0),
            lambda: adaopt.cosine_annealing_schedule(1.0, 101),
            300,
        ),
        Pair(
            lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 10, 2),
            lambda: adaopt.cosine_warm_restarts_schedule(1.0, 10),
            300,
        ),
        Pair(
            lambda o: lr_scheduler.CyclicLR(o, 0.1, 1.0, 10, mode="exp_range", gamma=0.999, cycle_momentum=False),
            lambda: adaopt.cyclic_schedule(0.1, 1.0, 10, mode="exp_range", gamma=0.9991),
            300,
        ),
        Pair(
            torch_wsd(1.0, 300, 30, 60, 0.1, 0.0, "linear", "1-sqrt"),
            lambda: adaopt.warmup_stable_decay_schedule(1.0, 300, 30, 0.2, init_value=0.1, decay_shape="cosine"),
            301,
        ),
        Pair(
            torch_wsd(1.0, 300, 30, 60, 0.1, 0.0, "linear", "linear"),
            lambda: adaopt.warmup_stable_decay_schedule(1.0, 300, 30, 0.2, init_value=0.1, warmup_shape="cosine"),
            301,
        ),
    ]
    for pair in wrong:
        theirs = torch_sequence(pair)
        e64, e32 = errors(evaluate(pair.ours(), pair.steps, True), evaluate(pair.ours(), pair.steps, False), theirs)
        assert e64 > 1e-4 and e32 > 1e-4


def test_optax_cosine_decay_stops_at_t_max_torch_does_not() -> None:
    """Past T_max torch's CosineAnnealingLR climbs back up; optax's stays at eta_min; ours follows torch."""
    pair = Pair(
        lambda o: lr_scheduler.CosineAnnealingLR(o, 50, 0.01),
        lambda: adaopt.cosine_annealing_schedule(0.5, 50, 0.01),
        200,
        0.5,
    )
    theirs = torch_sequence(pair)
    assert theirs[100] == pytest.approx(0.5, rel=1e-12)  # back at the top after 2 * T_max
    assert_reproduces(pair)
    optax_values = evaluate(optax.cosine_decay_schedule(0.5, 50, alpha=0.02), 200, True)
    np.testing.assert_allclose(optax_values[:51], theirs[:51], rtol=1e-12)
    np.testing.assert_allclose(optax_values[51:], 0.01, rtol=1e-12)


@pytest.mark.parametrize("schedule", [optax.cosine_onecycle_schedule, optax.linear_onecycle_schedule])
def test_optax_onecycle_is_not_torchs(schedule: Callable[..., optax.Schedule]) -> None:
    """optax's one-cycle schedules place the peak and the end one step later than torch's OneCycleLR."""
    total, peak = 1000, 0.5
    anneal = "cos" if schedule is optax.cosine_onecycle_schedule else "linear"
    theirs = torch_sequence(
        Pair(
            lambda o: lr_scheduler.OneCycleLR(o, peak, total, anneal_strategy=anneal, three_phase=anneal == "linear"),
            lambda: schedule(total, peak),
            total,
        )
    )
    optax_values = evaluate(schedule(total, peak), total, True, jit=True)
    assert np.max(np.abs(optax_values - theirs)) > 1e-3 * peak
    assert (np.argmax(theirs), np.argmax(optax_values)) == (0.3 * total - 1, 0.3 * total)


OURS = {
    "cosine": adaopt.cosine_annealing_schedule(1e-3, 1000, 1e-5),
    "restarts": adaopt.cosine_warm_restarts_schedule(1e-3, 10, 2, 1e-5),
    "restarts-1": adaopt.cosine_warm_restarts_schedule(1e-3, 7),
    "triangular2": adaopt.cyclic_schedule(1e-4, 1e-2, 100, mode="triangular2"),
    "exp_range": adaopt.cyclic_schedule(1e-4, 1e-2, 100, 50, mode="exp_range", gamma=0.9999),
    "onecycle": adaopt.onecycle_schedule(1000, 1e-2, three_phase=True),
    "momentum": adaopt.onecycle_momentum_schedule(1000),
    "wsd": adaopt.warmup_stable_decay_schedule(1e-3, 1000, 100, decay_shape="1-sqrt"),
}


@pytest.mark.parametrize("name", OURS)
def test_jit_dtypes_and_strict_promotion(name: str) -> None:
    """Jitted, the schedule gives its eager values; int32 counts give JAX's default float
    (float32, float64 under x64), float counts their own dtype, under strict promotion; a
    saturated int32 count gives a finite value; the derivative in the count is finite."""
    schedule = OURS[name]
    indices = [0, 1, 17, 999, 1000, HORIZON - 1]
    for float64 in (False, True):
        eager = evaluate(schedule, HORIZON, float64)[indices]

        def run(counts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            one = schedule(jnp.asarray(17.0, jnp.float32))
            return jax.vmap(schedule)(counts), one, jax.vmap(jax.grad(schedule))(counts.astype(one.dtype))

        with jax.enable_x64(float64), jax.numpy_dtype_promotion("strict"):
            counts = jnp.asarray([*indices, jnp.iinfo(jnp.int32).max], jnp.int32)
            jitted, one, slopes = jax.jit(run)(counts)
        assert jitted.dtype == (jnp.float64 if float64 else jnp.float32)
        assert one.dtype == jnp.float32  # a float count's own dtype
        assert bool(jnp.isfinite(jitted[-1])) and bool(jnp.all(jnp.isfinite(slopes[:-1])))
        scale = float(np.max(np.abs(eager)))
        rtol, atol = (1e-13, 1e-15 * scale) if float64 else (1e-5, 1e-7 * scale)
        np.testing.assert_allclose(jitted[:-1], eager, rtol=rtol, atol=atol)


def test_past_the_horizon() -> None:
    """One-cycle holds its final value; WSD holds end_value; warm restarts keep restarting."""
    onecycle = evaluate(OURS["onecycle"], HORIZON, True)
    np.testing.assert_array_equal(onecycle[999:], 1e-2 / 25 / 1e4)
    wsd = evaluate(OURS["wsd"], HORIZON, True)
    assert wsd[799] == 1e-3 and wsd[800] == 1e-3 and bool(np.all(wsd[1000:] == 0.0))
    restarts = evaluate(OURS["restarts"], HORIZON, True)  # t_0=10, t_mult=2: 10, 30, 70, ..., 1270
    assert np.flatnonzero(restarts == 1e-3).tolist() == [0, 10, 30, 70, 150, 310, 630, 1270]


def test_counts_past_float32s_integers_are_exact() -> None:
    """An int32 count past 2**24 was turned into float32 before the cycle's modulo and WSD's comparisons: the
    cyclic schedule was off by up to 1.2e-2 of its amplitude at 2**31 - 1001, and WSD decayed one step early."""
    up, down = 2000, 1000
    cyclic = adaopt.cyclic_schedule(0.0, 1.0, up, down)
    counts = np.array([2**24 + 1, 500_000_999, 2**31 - 1001, 2**31 - 1], np.int64)
    place = counts % (up + down)
    exact = np.where(place <= up, place / up, (up + down - place) / down)
    got = jax.jit(jax.vmap(cyclic))(jnp.asarray(counts, jnp.int32))
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-7)
    halving = adaopt.cyclic_schedule(0.0, 1.0, 2, mode="triangular2")  # its cycle from the exact count too
    assert float(halving(jnp.int32(2**24 + 7))) == 0.5 * 2.0 ** -(2**22 + 1)
    total = 2**24 + 1
    wsd = adaopt.warmup_stable_decay_schedule(1.0, total, decay_fraction=1 / total)  # one step of decay
    assert [float(wsd(jnp.int32(t))) for t in (total - 2, total - 1, total)] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", OURS)
def test_narrow_integer_counts(name: str) -> None:
    """An int16 or uint8 count gives the int32 count's value (a restart list in the count's dtype overflowed)."""
    schedule = OURS[name]
    counts = np.arange(0, 30_000, 997)
    want = jax.vmap(schedule)(jnp.asarray(counts, jnp.int32))
    np.testing.assert_array_equal(jax.vmap(schedule)(jnp.asarray(counts, jnp.int16)), want)
    np.testing.assert_array_equal(jax.vmap(schedule)(jnp.asarray(counts[:1], jnp.uint8)), want[:1])


@pytest.mark.parametrize("three_phase", [False, True])
def test_a_phase_of_no_length_is_at_its_end(three_phase: bool) -> None:
    """pct_start * total_steps = 1 ends the warmup at step 0 (torch: ZeroDivisionError): the peak there, then the
    decay (its start value had been given, and the peak never reached)."""
    values = np.asarray(
        [adaopt.onecycle_schedule(10, 1.0, pct_start=0.1, anneal_strategy="linear", three_phase=three_phase)(t)
         for t in range(10)]
    )  # fmt: skip
    assert values[0] == 1.0 and np.all(np.diff(values) < 0)
    np.testing.assert_allclose(values[-1], 1.0 / 25 / 1e4, atol=1e-7)  # float32's (end - start) * pct + start
    momentum = adaopt.onecycle_momentum_schedule(10, pct_start=0.1, anneal_strategy="linear")
    assert float(momentum(0)) == pytest.approx(0.85)


def test_gamma_is_checked_only_where_it_is_used() -> None:
    """torch's CyclicLR ignores gamma outside exp_range; it was refused above 1 in every mode."""
    for mode in ("triangular", "triangular2"):
        want = adaopt.cyclic_schedule(0.1, 1.0, 3, mode=mode)
        got = adaopt.cyclic_schedule(0.1, 1.0, 3, mode=mode, gamma=1.5)
        np.testing.assert_array_equal([got(t) for t in range(12)], [want(t) for t in range(12)])
    with pytest.raises(HyperparameterError, match=r"^gamma must be"):
        adaopt.cyclic_schedule(0.1, 1.0, 3, mode="exp_range", gamma=1.5)


INVALID = [
    (adaopt.cosine_annealing_schedule, {"init_value": 1.0, "t_max": 0}, "t_max"),
    (adaopt.cosine_annealing_schedule, {"init_value": 1.0, "t_max": 10.0}, "t_max"),
    (adaopt.cosine_annealing_schedule, {"init_value": 1.0, "t_max": 10, "eta_min": math.nan}, "eta_min"),
    (adaopt.cosine_annealing_schedule, {"init_value": "1", "t_max": 10}, "init_value"),
    (adaopt.cosine_warm_restarts_schedule, {"init_value": 1.0, "t_0": 0}, "t_0"),
    (adaopt.cosine_warm_restarts_schedule, {"init_value": 1.0, "t_0": 5, "t_mult": 0}, "t_mult"),
    (adaopt.cosine_warm_restarts_schedule, {"init_value": 1.0, "t_0": 5, "t_mult": 1.5}, "t_mult"),
    (adaopt.cosine_warm_restarts_schedule, {"init_value": 1.0, "t_0": True}, "t_0"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "step_size_up": 0}, "step_size_up"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "step_size_down": -1}, "step_size_down"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "mode": "sawtooth"}, "mode"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "mode": "exp_range", "gamma": 0.0}, "gamma"),
    # grows to inf, NaN
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "mode": "exp_range", "gamma": 1.5}, "gamma"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "scale_mode": "epoch"}, "scale_mode"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": 1.0, "scale_fn": 0.5}, "scale_fn"),
    (adaopt.cyclic_schedule, {"base_value": 0.1, "max_value": math.inf}, "max_value"),
    (adaopt.onecycle_schedule, {"total_steps": 0, "peak_value": 1.0}, "total_steps"),
    (adaopt.onecycle_schedule, {"total_steps": 10, "peak_value": 1.0, "pct_start": 1.5}, "pct_start"),
    (
        adaopt.onecycle_schedule,
        {"total_steps": 10, "peak_value": 1.0, "anneal_strategy": "cosine"},
        "anneal_strategy",
    ),
    (adaopt.onecycle_schedule, {"total_steps": 10, "peak_value": 1.0, "div_factor": 0.0}, "div_factor"),
    (adaopt.onecycle_schedule, {"total_steps": 10, "peak_value": 1.0, "final_div_factor": -1.0}, "final_div_factor"),
    (adaopt.onecycle_schedule, {"total_steps": 10, "peak_value": 1.0, "three_phase": 1}, "three_phase"),
    (adaopt.onecycle_momentum_schedule, {"total_steps": 10, "max_momentum": math.nan}, "max_momentum"),
    (adaopt.warmup_stable_decay_schedule, {"peak_value": 1.0, "total_steps": 0}, "total_steps"),
    (
        adaopt.warmup_stable_decay_schedule,
        {"peak_value": 1.0, "total_steps": 10, "warmup_steps": -1},
        "warmup_steps",
    ),
    (
        adaopt.warmup_stable_decay_schedule,
        {"peak_value": 1.0, "total_steps": 10, "decay_fraction": 1.2},
        "decay_fraction",
    ),
    (adaopt.warmup_stable_decay_schedule, {"peak_value": 1.0, "total_steps": 10, "warmup_steps": 9}, "warmup_steps"),
    (
        adaopt.warmup_stable_decay_schedule,
        {"peak_value": 1.0, "total_steps": 10, "warmup_shape": "1-sqrt"},
        "warmup_shape",
    ),
    (
        adaopt.warmup_stable_decay_schedule,
        {"peak_value": 1.0, "total_steps": 10, "decay_shape": "exp"},
        "decay_shape",
    ),
]


@pytest.mark.parametrize(("factory", "kwargs", "name"), INVALID, ids=[f"{f.__name__}-{n}" for f, _, n in INVALID])
def test_invalid_arguments_are_rejected(factory: Callable[..., Any], kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(HyperparameterError) as info:
        factory(**kwargs)
    message = str(info.value)
    assert name in message and repr(kwargs[name]) in message and "must be" in message, message


@pytest.mark.parametrize("factory", [adaopt.onecycle_schedule, adaopt.onecycle_momentum_schedule])
def test_three_phase_takes_a_numpy_bool(factory: Callable[..., Any]) -> None:
    """It was checked with isinstance(x, bool): np.True_ was refused."""
    for flag in (True, False):
        want, got = factory(20, 0.1, three_phase=flag), factory(20, 0.1, three_phase=np.bool_(flag))
        np.testing.assert_array_equal([got(t) for t in range(20)], [want(t) for t in range(20)])
    with pytest.raises(HyperparameterError, match=r"^three_phase must be True or False, got 'yes'"):
        factory(20, 0.1, three_phase="yes")


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: adaopt.warmup_stable_decay_schedule(0.1, 10, end_value=-1.0), "end_value"),
        (lambda: adaopt.warmup_stable_decay_schedule(0.1, 10, 2, init_value=-0.1), "init_value"),
        (lambda: adaopt.cosine_annealing_schedule(0.1, 10, eta_min=-1.0), "eta_min"),
        (lambda: adaopt.cosine_warm_restarts_schedule(0.1, 10, eta_min=-0.01), "eta_min"),
        (lambda: adaopt.cyclic_schedule(-0.1, 0.1), "base_value"),
        (lambda: adaopt.onecycle_schedule(100, -0.1), "peak_value"),
        (lambda: adaopt.onecycle_momentum_schedule(100, base_momentum=-0.5), "base_momentum"),
    ],
)
def test_a_negative_value_is_refused_when_the_schedule_is_built(build: Callable[[], Any], name: str) -> None:
    """An optimizer checks a schedule at step 0 only: warmup_stable_decay_schedule(0.1, 10, end_value=-1.0) passed,
    then stepped uphill from step 10 (w from 1.0 to 2.55 under a gradient of +1)."""
    with pytest.raises(adaopt.HyperparameterError, match=rf"^{name} must be a finite number in \[0.0, inf\)"):
        build()
