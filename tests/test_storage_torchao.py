"""8-bit, 4-bit and FP8 states against torchao's AdamW8bit, AdamW4bit, AdamWFp8 and their Adam forms (weight decay
added to the gradient), and its stochastic rounding.

torchao computes in float32 and calls ``torch.compile`` on each step; with ``TORCHDYNAMO_DISABLE=1`` (set
here, before torch is imported) the same code runs eagerly with the same numbers. Its trajectories are
compared twice: unpatched at float32's precision, and with its step (``single_param_adam``) restated in
float64 in this file, on our maps, where the two agree to float64's precision. It quantizes only the
tensors of at least 4096 elements whose size is a multiple of the block, and clips each block's scale at
1e-12: ``Blockwise(..., scale_floor=1e-12, partial_blocks=False)`` is that.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torchao.optim as torchao_optim
import torchao.optim.adam as torchao_adam
import torchao.optim.quant_utils as torchao_quant
import torchao.optim.subclass_4bit as torchao_4bit
import torchao.optim.subclass_8bit as torchao_8bit
import torchao.optim.subclass_fp8 as torchao_fp8

import adaopt
from adaopt._src import storage
from tests import parity

STEPS = 200
# One quantized leaf (4096 elements); two kept in float32: one under 4096 elements, one of 5000 (no multiple of a
# block).
SHAPES = {"a": (32, 128), "b": (96,), "c": (50, 100)}
STORAGES = {
    f"Adam{decay}{bits}": (
        getattr(torchao_optim, f"Adam{decay}{bits}"),
        adaopt.Blockwise(format, block_size=block, scale_floor=1e-12, partial_blocks=False),
    )
    for decay in ("", "W")
    for bits, format, block in (("8bit", "dynamic8", 256), ("4bit", "dynamic4", 128), ("Fp8", "fp8", 256))
} | {  # and one of its other block sizes
    "AdamW8bit(block_size=64)": (
        torchao_optim.AdamW8bit,
        adaopt.Blockwise("dynamic8", block_size=64, scale_floor=1e-12, partial_blocks=False),
    )
}


def test_maps_are_the_packages() -> None:
    np.testing.assert_allclose(
        adaopt.dynamic_map(True, total_bits=4, max_exponent_bits=3),
        np.asarray(torchao_4bit.get_qmap_signed(), np.float32),
        rtol=3e-7,
        atol=0,
    )
    np.testing.assert_array_equal(np.asarray(torchao_4bit.get_qmap_unsigned(), np.float32), adaopt.linear_map(4))
    for signed in (True, False):
        theirs = np.asarray(torchao_8bit.get_qmap_signed() if signed else torchao_8bit.get_qmap_unsigned(), np.float32)
        # Theirs come from float32 arithmetic (torch.linspace); ours are rounded once from float64.
        np.testing.assert_allclose(adaopt.dynamic_map(signed), theirs, rtol=3e-7, atol=0)


def _load64(x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torchao_8bit.OptimState8bit):
        values = x.qmap.double()[x.codes.long()]
    elif isinstance(x, torchao_4bit.OptimState4bit):
        values = x.qmap.double()[torch.stack([x.codes >> 4, x.codes & 0xF], dim=-1).long()]
    elif isinstance(x, torchao_fp8.OptimStateFp8):
        values = x.codes.double()
    else:
        return x.double()
    return (values.reshape(x.scale.numel(), -1) * x.scale.double()[:, None]).reshape(x.shape)


def _store64(x: torch.Tensor, value: torch.Tensor) -> None:
    if not isinstance(x, (torchao_8bit.OptimState8bit, torchao_4bit.OptimState4bit, torchao_fp8.OptimStateFp8)):
        x.copy_(value)
        return
    blocks = value.reshape(x.scale.numel(), -1)
    absmax = blocks.abs().amax(-1).clip(1e-12)
    if isinstance(x, torchao_fp8.OptimStateFp8):
        x.scale.copy_(absmax / torch.finfo(torch.float8_e4m3fn).max)
        # One rounding from float64 (torch's own conversion goes through float32 and rounds twice).
        normed = (blocks / x.scale.double()[:, None]).numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        x.codes.copy_(torch.from_numpy(normed).to(torch.float8_e4m3fn).reshape(x.codes.shape))
        return
    x.scale.copy_(absmax)  # float32, as theirs
    normed = (blocks / x.scale.double()[:, None]).clamp(-1, 1).reshape(-1)
    code = x.qmap.double()
    right = torch.searchsorted(code, normed, right=True).clamp(1, code.numel() - 1)
    take_right = (normed - code[right]).abs() < (normed - code[right - 1]).abs()
    codes = torch.where(take_right, right, right - 1).to(torch.uint8)
    if isinstance(x, torchao_4bit.OptimState4bit):
        codes = (codes[::2] << 4) | codes[1::2]
    x.codes.copy_(codes.reshape(x.codes.shape))


def _adam_in_float64(
    p, grad, step, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, weight_decay, eps, IS_ADAMW, BF16_SR
):  # fmt: skip
    """torchao's ``single_param_adam`` restated in float64 (its quantized states read and written at that
    precision, with nearest rounding), without amsgrad (which fails there uncompiled) as the tests run it."""
    assert max_exp_avg_sq is None and not BF16_SR
    lr, t = float(lr), float(step)
    param, g = p.double(), grad.double()
    if IS_ADAMW:
        param = param - lr * weight_decay * param
    else:
        g = g + weight_decay * param
    # torchao's lerp(m, g, 1 - b1), written as the same EMA in adaopt's order of operations: in float64 the two
    # differ in the last bit, which FP8's coarse grid turns into a different value once in a few million.
    m = beta1 * _load64(exp_avg) + (1 - beta1) * g
    v = beta2 * _load64(exp_avg_sq) + (1 - beta2) * g.square()
    _store64(exp_avg, m)
    _store64(exp_avg_sq, v)
    denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
    p.copy_(param - lr * (m / (1 - beta1**t)) / denom)


def _hyperparameters(name: str) -> dict:
    rng = np.random.default_rng(len(name))
    return {
        # torchao keeps the learning rate as a float32 tensor: draw one that float32 holds exactly.
        "lr": float(np.float32(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))),
        "b1": float(rng.uniform(0.8, 0.95)),
        "b2": float(rng.uniform(0.99, 0.999)),
        "eps": float(np.exp(rng.uniform(np.log(1e-8), np.log(1e-6)))),
        "wd": float(rng.uniform(0.0, 0.1)),
    }


def _draw(seed: int, dtype: type) -> tuple[dict, dict]:
    params, grads = parity.random_problem(SHAPES, seed, dtype, steps=STEPS)
    rng = np.random.default_rng(seed + 1)
    scales = {k: np.exp(rng.normal(size=s[:1] + (1,) * (len(s) - 1))) for k, s in SHAPES.items()}
    return params, {k: (g * scales[k]).astype(dtype) for k, g in grads.items()}


def _trajectories(name: str, dtype: type) -> tuple[dict, dict]:
    make_theirs, kind = STORAGES[name]
    hp = _hyperparameters(name)
    params, grads = _draw(len(name), dtype)
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = make_theirs(
        [tensors[k] for k in sorted(tensors)], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
        weight_decay=hp["wd"], block_size=kind.block_size,
    )  # fmt: skip
    for group in opt.param_groups:
        group["lr"] = torch.tensor(hp["lr"])  # torchao's own form: a tensor, which the trajectory loop refills
    theirs = _torchao_trajectory(opt, tensors, grads)
    factory = adaopt.adamw if name.startswith("AdamW") else adaopt.adam  # adam: the decay added to the gradient
    tx = factory(hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], mu_dtype=kind, nu_dtype=kind)
    with jax.enable_x64(dtype == np.float64):
        ours = parity.run_adaopt(tx, params, grads)
    return ours, theirs


def _torchao_trajectory(opt: torch.optim.Optimizer, tensors: dict, grads: dict) -> dict:
    names = sorted(tensors)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for t in range(STEPS):
        for k in names:
            tensors[k].grad = torch.tensor(grads[k][t])
        opt.step()
        for k in names:
            out[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_trajectory_follows_torchao_restated_in_float64(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchao_adam, "single_param_adam", _adam_in_float64)
    for module in (torchao_8bit, torchao_4bit):  # one map on both sides (ours; see test_maps_are_the_packages)
        qmap = (
            (lambda s: adaopt.dynamic_map(s))
            if module is torchao_8bit
            else (lambda s: adaopt.dynamic_map(True, total_bits=4, max_exponent_bits=3) if s else adaopt.linear_map(4))
        )
        monkeypatch.setattr(module, "get_qmap_signed", lambda q=qmap: tuple(float(v) for v in q(True)))
        monkeypatch.setattr(module, "get_qmap_unsigned", lambda q=qmap: tuple(float(v) for v in q(False)))
    ours, theirs = _trajectories(name, np.float64)
    assert parity.relative_error(ours, theirs) < 1e-10, parity.relative_error(ours, theirs)


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_trajectory_follows_torchao(name: str) -> None:
    """At its precision: float32 roundings that move a value across a midpoint change that moment by one entry
    of the map for as long as it remembers it, so the runs drift apart by a few 1e-4 (4-bit: its coarser map's
    entries are 10 times as far apart)."""
    ours, theirs = _trajectories(name, np.float32)
    tolerance = 2e-2 if name.endswith("4bit") else 2e-3
    assert parity.relative_error(ours, theirs) < tolerance, parity.relative_error(ours, theirs)


@pytest.mark.parametrize("name", sorted(STORAGES))
@pytest.mark.usefixtures("cpu_kernels")
def test_trajectory_follows_torchao_with_the_cpu_kernel(name: str) -> None:
    """The same comparison with adaopt's CPU kernel taking the quantized leaf's steps (adaopt.enable_cpu_kernels)."""
    kind = STORAGES[name][1]
    tx = adaopt.adamw(1e-3, mu_dtype=kind, nu_dtype=kind)
    params = {k: jnp.zeros(shape, jnp.float32) for k, shape in SHAPES.items()}
    assert jax.jit(tx.update).lower(params, tx.init(params), params).as_text().count("adaopt_blockwise_adam_cpu") == 1
    test_trajectory_follows_torchao(name)


def test_stochastic_rounding_draws_like_torchao() -> None:
    """Both round a float32 up to the next bfloat16 with probability equal to its 16 dropped bits over 2**16:
    over many draws each value's frequency of rounding up agrees between the two within sampling error."""
    x = np.asarray([1.0 + 2.0**-9, 1.0 + 3 * 2.0**-10, -3.0 - 2.0**-12, 0.1, -7.3e-4], np.float32)
    draws = 40_000
    torch.manual_seed(0)
    theirs = torchao_quant._fp32_to_bf16_sr(torch.tensor(x).repeat(draws, 1)).float().numpy()
    wide = jnp.broadcast_to(jnp.asarray(x), (draws, len(x)))
    ours = np.asarray(storage.stochastic_round(wide, adaopt.counter_bits(wide.shape, 1, 0))).astype(np.float32)
    down = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # one of the two neighbours
    for column in range(len(x)):
        values_theirs, values_ours = np.unique(theirs[:, column]), np.unique(ours[:, column])
        assert set(values_ours) == set(values_theirs) and len(values_ours) == 2  # the same two neighbours
        p_theirs = np.mean(theirs[:, column] == down[column])
        p_ours = np.mean(ours[:, column] == down[column])
        stderr = math.sqrt(p_theirs * (1 - p_theirs) * 2 / draws)
        assert abs(p_ours - p_theirs) < 4 * stderr, (column, p_ours, p_theirs)
