"""8-bit blockwise states against bitsandbytes: the maps, the codes and scales, and 200-step trajectories.

bitsandbytes computes in float32. Its CPU kernel (``quantize_blockwise`` on the CPU) finds a
code through a lookup table of the normalised value rather than the nearest entry of the map,
so its codes differ from the nearest ones wherever the value lies within the table's bin width
(2 / 65535 of the block's absmax) of a midpoint between two entries, and for every value under
about 1.5e-5 of the absmax. The trajectories are compared with that one function patched to the
nearest-entry rule its C source states (and its GPU kernel uses), restated in float32 in this
file; unpatched, one quantization from the same values is compared code for code, and every
difference is shown to lie within the table's bin width.
"""

from __future__ import annotations

import math

import bitsandbytes
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import bitsandbytes.functional as bnb_functional
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adaopt
from adaopt._src import storage
from tests import parity

STEPS = 200
# Two quantized leaves (one with a partial last block, flattened; one blocked by rows), one kept in float32 (under
# 4096 elements); in float64 also one blocked along its last two axes (rows of 768, three blocks each), whose blocks
# are the package's row-major ones.
SHAPES = {"a": (50, 100), "b": (96,), "e": (32, 256)}
SHAPES64 = {"a": (50, 100), "d": (8, 6, 128), "e": (32, 256)}
INT8 = adaopt.Blockwise("dynamic8", block_size=256, min_size=4096)
# bitsandbytes' optimizers of one state (RMSprop8bit, Adagrad8bit, SGD8bit) store it with the signed map, their
# accumulators too.
SIGNED8 = adaopt.Blockwise("dynamic8", block_size=256, min_size=4096, nonnegative_map="signed")
BIN = 2 / 65535  # the CPU kernel's lookup resolution, in units of the block's absmax


def _nearest_quantize(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise quantization as its C source states it, in float32: absmax per block, the value
    divided by it, then the nearer of the two entries around it (the left one on a tie)."""
    flat = A.reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=1).values
    normed = (blocks / absmax[:, None]).reshape(-1)[: flat.numel()]
    normed = torch.nan_to_num(normed)  # a block of zeros: any code, times a zero scale
    right = torch.searchsorted(code, normed, right=True).clamp(1, code.numel() - 1)
    left = right - 1
    take_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    return torch.where(take_right, right, left).to(torch.uint8).reshape(A.shape), absmax


def _patched_quant(A: torch.Tensor, code: torch.Tensor, absmax_out: torch.Tensor, out: torch.Tensor, blocksize: int):
    codes, absmax = _nearest_quantize(A, code, blocksize)
    out.copy_(codes)
    absmax_out.copy_(absmax)


@pytest.fixture
def nearest_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb_cpu_ops, "_quant_blockwise_fp32_direct", _patched_quant)


def _dequantize64(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    flat = qmap.double()[codes.reshape(-1).long()]
    pad = -flat.numel() % 256
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, 256) * absmax.double()[:, None]
    return blocks.reshape(-1)[: flat.numel()].reshape(codes.shape)


def _quantize64(x: torch.Tensor, qmap: torch.Tensor, absmax_out: torch.Tensor, codes_out: torch.Tensor) -> None:
    flat = x.reshape(-1)
    pad = -flat.numel() % 256
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, 256)
    absmax_out.copy_(blocks.abs().max(dim=1).values)  # stored in float32, as the package's
    scale = absmax_out.double()
    normed = torch.nan_to_num(blocks / torch.where(scale > 0, scale, 1)[:, None]).reshape(-1)[: flat.numel()]
    code = qmap.double()
    right = torch.searchsorted(code, normed, right=True).clamp(1, code.numel() - 1)
    left = right - 1
    take_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    codes_out.copy_(torch.where(take_right, right, left).to(torch.uint8).reshape(codes_out.shape))


def _update_8bit_in_float64(
    optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr,
    qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale=1.0, skip_zeros=False,
):  # fmt: skip
    """bitsandbytes' CPU 8-bit blockwise step (``_optimizer_update_8bit_blockwise_cpu``) restated in float64:
    the same dequantize, update and nearest-code quantize, with every product and sum in float64."""
    assert gnorm_scale == 1.0 and not skip_zeros
    grad, param = g.double(), p.double()
    if optimizer_name in ("momentum", "rmsprop", "adagrad"):  # one state, its weight decay added to the gradient
        state = _dequantize64(state1, absmax1, qmap1)
        grad = grad + weight_decay * param
        if optimizer_name == "momentum":
            state = grad if step == 1 else state * beta1 + grad
            p.copy_(param - lr * state)
        else:
            state = state * beta1 + grad * grad * (1 - beta1) if optimizer_name == "rmsprop" else state + grad * grad
            p.copy_(param - lr * grad / (state.sqrt() + eps))
        _quantize64(state, qmap1, absmax1, state1)
        return
    c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    if optimizer_name == "ademamix":
        m1, m2 = (_dequantize64(state1[i], absmax1[i], qmap1) for i in range(2))
    else:
        m1 = _dequantize64(state1, absmax1, qmap1)
    if weight_decay > 0:
        param = param * (1 - lr * weight_decay)
    if optimizer_name == "adam":
        v = _dequantize64(state2, absmax2, qmap2)
        m1 = m1 * beta1 + grad * (1 - beta1)
        v = v * beta2 + grad * grad * (1 - beta2)
        param = param - lr / c1 * m1 / (v.sqrt() / c2 + eps)
    elif optimizer_name == "ademamix":
        v = _dequantize64(state2, absmax2, qmap2)
        m1 = m1 * beta1 + grad * (1 - beta1)
        m2 = m2 * beta3 + grad * (1 - beta3)
        v = v * beta2 + grad * grad * (1 - beta2)
        param = param - lr * (m1 / c1 + alpha * m2) / (v.sqrt() / c2 + eps)
    elif optimizer_name == "lion":
        param = param - lr * torch.sign(m1 * beta1 + grad * (1 - beta1))
        m1 = m1 * beta2 + grad * (1 - beta2)
    else:
        raise NotImplementedError(optimizer_name)
    p.copy_(param)
    if optimizer_name == "ademamix":
        _quantize64(m1, qmap1, absmax1[0], state1[0])
        _quantize64(m2, qmap1, absmax1[1], state1[1])
    else:
        _quantize64(m1, qmap1, absmax1, state1)
    if optimizer_name in ("adam", "ademamix"):
        _quantize64(v, qmap2, absmax2, state2)


def test_maps_are_the_packages_up_to_float32_rounding() -> None:
    for signed in (True, False):
        theirs = bnb_functional.create_dynamic_map(signed=signed).numpy()
        ours = adaopt.dynamic_map(signed=signed)
        assert ours.dtype == np.float32 and ours.shape == (256,)
        # The same entries in the same order; theirs come from float32 arithmetic (torch.linspace), ours are
        # computed in float64 and rounded once, so a few dozen differ in the last bit or two.
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2, (signed, ulps.max())
        np.testing.assert_allclose(ours, theirs, rtol=3e-7, atol=0)
    # Smaller maps, as the package builds them: signed with any exponent from 1 (0 fails there), unsigned with the
    # one exponent that fills its codes (it refuses the others; ours pads them with zeros). It pads its maps with
    # zeros to 256 entries before sorting them.
    for total_bits in (2, 4, 6):
        for signed, exponent in [(True, e) for e in range(1, total_bits)] + [(False, total_bits - 1)]:
            theirs = bnb_functional.create_dynamic_map(signed, exponent, total_bits).numpy()
            ours = adaopt.dynamic_map(signed, total_bits=total_bits, max_exponent_bits=exponent)
            assert ours.shape == (2**total_bits,)
            np.testing.assert_allclose(np.sort(np.pad(ours, (0, 256 - ours.size))), theirs, rtol=3e-7, atol=0)


def test_nearest_index_is_the_nearest_entry() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1, 1, 50_000), rng.normal(size=50_000) * np.exp(rng.normal(size=50_000) * 4)])
    x = np.clip(x, -1, 1).astype(np.float32)
    for qmap, values in (
        (adaopt.dynamic_map(True), x),
        (adaopt.dynamic_map(False), np.abs(x)),
        (adaopt.dynamic_map(True, total_bits=4, max_exponent_bits=3), x),
        (storage.linear_map(4), np.abs(x)),
    ):
        distances = np.abs(values[:, None].astype(np.float64) - qmap[None, :])
        best = distances.min(axis=1, keepdims=True)
        ours = np.asarray(storage.nearest_index(jnp.asarray(values), qmap)).astype(int)
        # Nearest, up to a tie within float32 rounding of a midpoint.
        np.testing.assert_allclose(distances[np.arange(len(values)), ours], best[:, 0], rtol=1e-6, atol=1e-12)


def test_one_quantization_matches_the_package_code_for_code() -> None:
    rng = np.random.default_rng(1)
    values = (rng.normal(size=256 * 64) * np.exp(rng.normal(size=256 * 64) * 3)).astype(np.float32)
    for signed, x in ((True, values), (False, np.abs(values))):
        code = bnb_functional.create_dynamic_map(signed=signed)
        their_codes, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(torch.tensor(x), code.clone(), 256)
        nearest_codes, _ = _nearest_quantize(torch.tensor(x), code, 256)
        leaf = INT8.encode(jnp.asarray(x), INT8.init(jnp.zeros(x.shape), signed=signed))
        np.testing.assert_array_equal(np.asarray(leaf.scale), their_absmax.numpy())
        ours = np.asarray(leaf.codes)
        # The patched (nearest) rule: identical codes but at float32 ties of a midpoint (none here).
        np.testing.assert_array_equal(ours, nearest_codes.numpy())
        # The package's own CPU kernel: every difference lies within its lookup table's bin of a midpoint.
        theirs = their_codes.numpy()
        normed = (x.reshape(-1, 256) / their_absmax.numpy()[:, None]).reshape(-1)
        qmap = code.numpy()
        differ = ours != theirs
        assert differ.mean() < 0.5  # about a third for these heavy-tailed draws, mostly values under 1e-4 of absmax
        excess = np.abs(normed - qmap[theirs]) - np.abs(normed - qmap[ours])
        assert np.all(excess <= 2 * BIN + 1e-7), excess.max()


def _bnb_trajectory(make, params: dict, grads: dict, lr: float) -> tuple[dict, dict]:
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = make([tensors[k] for k in sorted(tensors)])
    trajectory = parity._torch_trajectory(opt, tensors, lr, grads)
    return trajectory, {k: opt.state[tensors[k]] for k in tensors}


def _draw(seed: int, dtype: type, shapes: dict) -> tuple[dict, dict]:
    params, grads = parity.random_problem(shapes, seed, dtype, steps=STEPS)
    # Gradients of mixed scales across the rows, as a model's are: the blocks' dynamic range matters.
    rng = np.random.default_rng(seed + 1)
    scales = {k: np.exp(rng.normal(size=s[:1] + (1,) * (len(s) - 1))) for k, s in shapes.items()}
    return params, {k: (g * scales[k]).astype(dtype) for k, g in grads.items()}


def _hyperparameters(name: str) -> dict:
    rng = np.random.default_rng(len(name))
    return {
        "lr": float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2)))),
        "b1": float(rng.uniform(0.8, 0.95)),
        "b2": float(rng.uniform(0.99, 0.999)),
        "b3": float(rng.uniform(0.99, 0.9999)),
        "alpha": float(rng.uniform(1.0, 8.0)),
        "eps": float(np.exp(rng.uniform(np.log(1e-8), np.log(1e-6)))),
        "wd": float(rng.uniform(0.0, 0.1)),
    }


CASES = {
    "Adam8bit": (
        # Its weight decay is decoupled (p *= 1 - lr * wd), as AdamW8bit's.
        lambda hp: lambda ps: bitsandbytes.optim.Adam8bit(
            ps, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"]
        ),
        lambda hp: adaopt.adam(
            hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], decoupled_weight_decay=True,
            mu_dtype=INT8, nu_dtype=INT8,
        ),
    ),
    "AdamW8bit": (
        lambda hp: lambda ps: bitsandbytes.optim.AdamW8bit(
            ps, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"]
        ),
        lambda hp: adaopt.adamw(hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], mu_dtype=INT8, nu_dtype=INT8),
    ),
    "Lion8bit": (
        lambda hp: lambda ps: bitsandbytes.optim.Lion8bit(ps, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), weight_decay=hp["wd"]),
        lambda hp: adaopt.lion(hp["lr"], hp["b1"], hp["b2"], weight_decay=hp["wd"], mu_dtype=INT8),
    ),
    "AdEMAMix8bit": (
        lambda hp: lambda ps: bitsandbytes.optim.AdEMAMix8bit(
            ps, lr=hp["lr"], betas=(hp["b1"], hp["b2"], hp["b3"]), alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["wd"]
        ),
        lambda hp: adaopt.ademamix(
            hp["lr"], hp["b1"], hp["b2"], hp["b3"], hp["alpha"], hp["eps"], weight_decay=hp["wd"],
            decoupled_weight_decay=True, mu_dtype=INT8, nu_dtype=INT8,
        ),
    ),
    "AdEMAMix8bit warmups": (  # alpha and beta3 warmed up over their own numbers of steps (within the 200)
        lambda hp: lambda ps: bitsandbytes.optim.AdEMAMix8bit(
            ps, lr=hp["lr"], betas=(hp["b1"], hp["b2"], hp["b3"]), alpha=hp["alpha"], eps=hp["eps"],
            weight_decay=hp["wd"], t_alpha=60, t_beta3=150,
        ),
        lambda hp: adaopt.ademamix(
            hp["lr"], hp["b1"], hp["b2"], hp["b3"], hp["alpha"], hp["eps"], weight_decay=hp["wd"],
            alpha_warmup_steps=60, b3_warmup_steps=150, decoupled_weight_decay=True, mu_dtype=INT8, nu_dtype=INT8,
        ),
    ),
    "RMSprop8bit": (
        lambda hp: lambda ps: bitsandbytes.optim.RMSprop8bit(
            ps, lr=hp["lr"], alpha=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"]
        ),
        lambda hp: adaopt.rmsprop(hp["lr"], hp["b2"], hp["eps"], weight_decay=hp["wd"], nu_dtype=SIGNED8),
    ),
    "Adagrad8bit": (
        lambda hp: lambda ps: bitsandbytes.optim.Adagrad8bit(ps, lr=hp["lr"], eps=hp["eps"], weight_decay=hp["wd"]),
        lambda hp: adaopt.adagrad(hp["lr"], eps=hp["eps"], weight_decay=hp["wd"], accumulator_dtype=SIGNED8),
    ),
    "SGD8bit": (  # its CPU kernel has no dampening and no Nesterov momentum
        lambda hp: lambda ps: bitsandbytes.optim.SGD8bit(ps, lr=hp["lr"], momentum=hp["b1"], weight_decay=hp["wd"]),
        lambda hp: adaopt.sgd(hp["lr"], momentum=hp["b1"], weight_decay=hp["wd"], accumulator_dtype=INT8),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_follows_bitsandbytes_restated_in_float64(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides in float64 (the scales in float32) and on one map (ours: the package's differs in the last bit
    of a few entries, see above): no rounding moves a code, so the runs agree to float64's precision."""
    monkeypatch.setattr(bnb_functional, "optimizer_update_8bit_blockwise", _update_8bit_in_float64)
    monkeypatch.setattr(
        bnb_functional, "create_dynamic_map", lambda signed=True, **_: torch.tensor(adaopt.dynamic_map(signed=signed))
    )
    hp = _hyperparameters(name)
    theirs_factory, ours_factory = CASES[name]
    params, grads = _draw(len(name), np.float64, SHAPES64)
    theirs, _ = _bnb_trajectory(theirs_factory(hp), params, grads, hp["lr"])
    with jax.enable_x64(True):
        ours, _ = _run_ours(ours_factory(hp), params, grads)
    assert parity.relative_error(ours, theirs) < 1e-10, parity.relative_error(ours, theirs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_follows_bitsandbytes(name: str, nearest_quantizer: None) -> None:
    hp = _hyperparameters(name)
    theirs_factory, ours_factory = CASES[name]
    params, grads = _draw(len(name), np.float32, SHAPES)
    theirs, their_state = _bnb_trajectory(theirs_factory(hp), params, grads, hp["lr"])
    ours, our_state = _run_ours(ours_factory(hp), params, grads)
    # In float32 the two sides round the moments' arithmetic differently (operation order, fused multiply-adds),
    # and a rounding that moves a value across a midpoint changes that moment by one entry of the map (about 1%
    # of its block's absmax) for as long as the moment remembers it: AdEMAMix's slow moment, weighted by alpha,
    # for 1 / (1 - b3) steps; Lion's sign flips where the moment is near zero. The runs then stay within a few
    # 1e-4 of each other (the float64 comparison above shows that nothing else differs).
    tolerance = 2e-3
    assert parity.relative_error(ours, theirs) < tolerance, parity.relative_error(ours, theirs)

    # The final states: the same leaves quantized, the same scales, and the same codes but for the few (under 2%;
    # all but a few in a thousand by one entry) that such roundings moved.
    moments = _moments(our_state)
    assert sorted(moments) == ["a", "e"] and all(isinstance(m, adaopt.Quantized) for ms in moments.values() for m in ms)
    assert not torch.is_tensor(their_state["b"].get("absmax1"))  # under 4096 elements: float32 on both sides
    for k, ms in moments.items():
        st = their_state[k]
        if name.startswith("AdEMAMix8bit"):  # ours: the fast moment, the second moment, the slow moment
            stacked = [st["state1"][0], st["state2"], st["state1"][1]]
            scales = [st["absmax1"][0], st["absmax2"], st["absmax1"][1]]
        else:
            stacked = [st["state1"]] + ([st["state2"]] if "state2" in st else [])
            scales = [st["absmax1"]] + ([st["absmax2"]] if "absmax2" in st else [])
        assert len(stacked) == len(ms)
        for m, codes, scale in zip(ms, stacked, scales, strict=True):
            # Ours keep a row-blocked leaf's scales per row (the same blocks): compare in row-major order.
            scale_error = np.abs(np.asarray(m.scale).reshape(-1) / scale.numpy() - 1)
            steps = np.abs(np.asarray(m.codes).reshape(-1).astype(int) - codes.numpy().reshape(-1).astype(int))
            assert scale_error.max() < 10 * tolerance
            assert np.mean(steps > 0) < 0.05 and np.mean(steps > 1) < 0.01, (np.mean(steps > 0), np.mean(steps > 1))


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "Lion8bit"])
@pytest.mark.usefixtures("cpu_kernels")
def test_trajectory_follows_bitsandbytes_with_the_cpu_kernel(name: str, nearest_quantizer: None) -> None:
    """The same comparison with adaopt's CPU kernel taking the quantized leaves' steps (adaopt.enable_cpu_kernels)."""
    params, grads = _draw(len(name), np.float32, SHAPES)
    ours = CASES[name][1](_hyperparameters(name))
    text = jax.jit(ours.update).lower(jax.tree.map(lambda g: g[0], grads), ours.init(params), params).as_text()
    target = "adaopt_blockwise_lion_cpu" if name == "Lion8bit" else "adaopt_blockwise_adam_cpu"
    assert text.count(target) == 2  # the two quantized leaves, "a" and "e"
    test_trajectory_follows_bitsandbytes(name, nearest_quantizer)


def _run_ours(tx, params: dict, grads: dict) -> tuple[dict, dict]:
    def step(carry, g):
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        return (p, s), p

    (_, state), trajectory = jax.jit(lambda p, gs: jax.lax.scan(step, (p, tx.init(p)), gs))(params, grads)
    return jax.tree.map(np.asarray, trajectory), state


def _moments(state) -> dict[str, list]:
    """The quantized moments of each leaf, in the order the optimizer's state holds them."""
    found: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=adaopt.is_stored):
        if isinstance(leaf, adaopt.Quantized):
            found.setdefault(path[-1].key, []).append(leaf)
    return found
