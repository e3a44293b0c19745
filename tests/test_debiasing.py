"""Debiasing in float32 as torch computes it in float64: ``1 - beta ** t`` and RAdam's rho.

torch computes a decay's powers on the host, from the Python float, in float64. Computed in
float32 from the decay rounded to float32, ``1 - 0.9999 ** t`` is 2e-4 off relative, and RAdam's
``rho_t`` (a difference of two numbers near ``2 / (1 - b2)``) several units off, which moved the
step at which the rectification starts. The float32 steps here follow torch's float32 steps (its
moments in float32, its scalars in float64); float64 steps keep torch's own formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adaopt
from adaopt._src import moments
from tests import parity

DECAYS = [0.0, 0.3, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999]
COUNTS = np.arange(1, 5001)


def _exact_power(decay: float, counts: np.ndarray) -> np.ndarray:
    """``decay ** t`` in float64 (to 1e-16 relative, as ``exp`` of a float64 logarithm)."""
    return np.exp(counts * math.log(decay)) if decay > 0 else np.zeros(len(counts))


@pytest.mark.parametrize("array", [False, True], ids=["python", "array"])
def test_bias_correction_in_float32_is_the_float64_value(array: bool) -> None:
    """``1 - decay ** t`` in float32 within 5e-7 relative of its float64 value, for a Python or an array decay
    (the array's own float32 value the decay)."""
    counts = jnp.asarray(COUNTS, jnp.int32)
    for decay in DECAYS:
        value = jnp.float32(decay) if array else decay
        got = np.asarray(jax.jit(lambda c, d=value: moments.bias_correction(d, c, jnp.float32))(counts))
        exact = (
            -np.expm1(COUNTS * math.log(float(np.float32(decay)) if array else decay))
            if decay
            else np.ones(len(COUNTS))
        )
        np.testing.assert_allclose(got, exact, rtol=5e-7, err_msg=f"decay {decay}")
    zero = moments.bias_correction(0.0, jnp.zeros([], jnp.int32), jnp.float32)
    assert float(zero) == 0.0  # 1 - 0 ** 0, where 0 * log 0 would be NaN


@pytest.mark.parametrize("array", [False, True], ids=["python", "array"])
def test_radam_rho_in_float32_has_no_cancellation(array: bool) -> None:
    """RAdam's rho_t in float32 within 3e-6 of its float64 value (relative to max(1, rho)) at every count, where
    the difference of float32 numbers near 2 / (1 - b2) was off by units."""
    counts = jnp.asarray(COUNTS, jnp.int32)
    for decay in DECAYS:
        value = jnp.float32(decay) if array else decay
        rho_inf, rho, _ = jax.jit(lambda c, d=value: moments.radam_rho(d, c, jnp.float32))(counts)
        b2 = float(np.float32(decay)) if array else decay
        if b2 == 0:
            exact = np.ones(len(COUNTS))
        else:
            # In float64 by the cancellation-free form, checked against the direct form where that is exact enough.
            power = _exact_power(b2, COUNTS)
            exact = (2 / (1 - b2) - 1) - 2 * COUNTS * power / -np.expm1(COUNTS * math.log(b2))
        np.testing.assert_allclose(float(rho_inf), 2 / (1 - b2) - 1, rtol=1e-6)
        error = np.abs(np.asarray(rho, np.float64) - exact) / np.maximum(1, np.abs(exact))
        assert error.max() < 3e-6, f"decay {decay}: {error.max():.2e} at count {COUNTS[error.argmax()]}"


def _torch_updates(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], grads: np.ndarray) -> np.ndarray:
    """torch's update at each step, exactly: the parameter is set to 0 before each step (the steps compared
    here do not depend on it). torch's default dtype is the gradients' (the dtype of NAdam's ``mu_product``)."""
    dtype = torch.from_numpy(grads).dtype
    with parity.default_dtype(dtype):
        param = torch.nn.Parameter(torch.zeros(grads.shape[1:], dtype=dtype))
        opt = make([param])
        out = []
        for g in grads:
            with torch.no_grad():
                param.zero_()
            param.grad = torch.from_numpy(g.copy())
            opt.step()
            out.append(param.detach().numpy().copy())
    return np.stack(out)


def _updates(tx: optax.GradientTransformation, grads: np.ndarray) -> np.ndarray:
    step = jax.jit(tx.update)
    params = jnp.zeros(grads.shape[1:], grads.dtype)
    state = tx.init(params)
    out = []
    for g in grads:
        u, state = step(jnp.asarray(g), state, params)
        out.append(np.asarray(u))
    return np.stack(out)


# (adaopt, torch, tolerance in float32): the largest error of a step over the largest coordinate of torch's step.
CASES: dict[str, tuple[Callable[[float, float], Any], Callable[[float, float], Any], float]] = {
    "adam": (
        lambda b1, b2: adaopt.adam(1e-3, b1, b2),
        lambda b1, b2: lambda ps: torch.optim.Adam(ps, 1e-3, betas=(b1, b2)),
        1e-5,
    ),
    "amsgrad": (
        lambda b1, b2: adaopt.amsgrad(1e-3, b1, b2),
        lambda b1, b2: lambda ps: torch.optim.Adam(ps, 1e-3, betas=(b1, b2), amsgrad=True),
        1e-5,
    ),
    "nadam": (
        lambda b1, b2: adaopt.nadam(1e-3, b1, b2),
        lambda b1, b2: lambda ps: torch.optim.NAdam(ps, 1e-3, betas=(b1, b2)),
        1e-5,
    ),
    "radam": (
        lambda b1, b2: adaopt.radam(1e-3, b1, b2),
        lambda b1, b2: lambda ps: torch.optim.RAdam(ps, 1e-3, betas=(b1, b2)),
        2e-4,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_steps_follow_torch_with_long_averages(name: str, dtype: Any) -> None:
    """200 steps of each with b2 up to 0.99999 (and b1 0.9999) follow torch's steps: in float32 to 1e-5 of its
    largest coordinate (RAdam 2e-4: its rectification amplifies rho's float32 rounding near its start), in float64
    to 1e-12. Debiased from float32 powers, Adam's first steps were 1e-4 off and RAdam's rectified from step 2."""
    make, make_torch, tolerance = CASES[name]
    grads = np.random.default_rng(0).standard_normal((200, 6, 5)).astype(dtype)
    for b1, b2 in [(0.9, 0.999), (0.9, 0.9999), (0.9, 0.99999), (0.9999, 0.999)]:
        with jax.enable_x64(dtype == np.float64):
            ours = _updates(make(b1, b2), grads)
        theirs = _torch_updates(make_torch(b1, b2), grads)
        error = np.max(np.abs(ours - theirs), axis=(1, 2)) / np.max(np.abs(theirs), axis=(1, 2))
        limit = tolerance if dtype == np.float32 else 1e-12
        assert error.max() < limit, f"b1={b1}, b2={b2}: {error.max():.2e} at step {error.argmax() + 1}"
