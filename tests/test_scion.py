"""Scion against pytorch-optimizer's SCION and SCIONLight, step for step, and what it does with every kind of leaf.

The references run Newton–Schulz in bfloat16 (``zero_power_via_newton_schulz_5``'s default dtype).
For the float64 and float32 comparisons the test runs their own iteration in the gradient's dtype
(the function that ``pytorch_optimizer.optimizer.scion`` calls, given ``dtype=grad.dtype``);
``ns_dtype=jnp.bfloat16`` is compared with the unpatched package within bfloat16's precision.
Each leaf is its own torch parameter group, with its norm, its radius and its decay.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import pytorch_optimizer.optimizer.scion as torch_scion
import torch
from pytorch_optimizer.optimizer.scion import LMONorm

import adaopt
from adaopt import ScionNorm
from tests import parity

SPEC = adaopt.REGISTRY["scion"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
SHAPES = {
    "w": (16, 8), "u": (6, 10), "conv": (4, 3, 2, 2), "b": (8,), "s": (),
    "embed": (12, 4), "head": (5, 8), "r": (6, 4), "i": (3, 3),
}  # fmt: skip
DECAYED = {k: k not in ("b", "s") for k in SHAPES}

# Each leaf's norm on both sides: (adaopt's ScionNorm, the reference's norm_type and norm_kwargs).
AUTO = {
    "w": (ScionNorm("spectral"), LMONorm.AUTO, {}),
    "u": (ScionNorm("spectral"), LMONorm.AUTO, {}),
    "conv": (ScionNorm("spectral_conv"), LMONorm.AUTO, {}),
    "b": (ScionNorm("bias_rms"), LMONorm.AUTO, {}),
    "s": (ScionNorm("bias_rms"), LMONorm.AUTO, {}),
    "embed": (ScionNorm("col", transpose=True), LMONorm.COL, {"transpose": True}),
    "head": (ScionNorm("sign"), LMONorm.SIGN, {}),
    "r": (ScionNorm("row"), LMONorm.ROW, {}),
    "i": (ScionNorm("identity"), LMONorm.NONE, {}),
}
OPTIONS = {
    "w": (ScionNorm("spectral", normalize=False, max_scale=True), LMONorm.SPECTRAL, {"normalize": False, "max_scale": True}),
    "u": (ScionNorm("spectral", max_scale=True), LMONorm.SPECTRAL, {"max_scale": True}),
    "conv": (ScionNorm("spectral_conv"), LMONorm.SPECTRALCONV, {}),
    "b": (ScionNorm("bias_rms"), LMONorm.BIAS, {}),
    "s": (ScionNorm("bias_rms"), LMONorm.BIAS, {}),
    "embed": (ScionNorm("col", normalize=True), LMONorm.COL, {"normalized": True}),
    "head": (ScionNorm("sign", normalize=False), LMONorm.SIGN, {"normalize": False}),
    "r": (ScionNorm("row", normalize=False, transpose=True), LMONorm.ROW, {"normalized": False, "transpose": True}),
    "i": (ScionNorm("identity"), LMONorm.NONE, {}),
}  # fmt: skip
LAYOUTS = {"auto": AUTO, "options": OPTIONS}


@contextmanager
def _newton_schulz_in_the_gradients_dtype() -> Iterator[None]:
    """The reference's own Newton–Schulz, run in the dtype of the matrix it is given instead of bfloat16."""
    original = torch_scion.zero_power_via_newton_schulz_5

    def in_its_dtype(g: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return original(g, *args, **{**kwargs, "dtype": g.dtype})

    torch_scion.zero_power_via_newton_schulz_5 = in_its_dtype
    try:
        yield
    finally:
        torch_scion.zero_power_via_newton_schulz_5 = original


def _draw(seed: int, weight_decay: bool, layout: str) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp: dict[str, Any] = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(6e-3), np.log(6e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["scales"] = {k: float(rng.uniform(0.5, 3.0)) if layout == "options" else 1.0 for k in SHAPES}
    return hp


def _reference(
    name: str, hp: dict, layout: str, params: dict, grads: dict, lr: list[float] | None = None, *,
    constrained: bool = False,
    decoupled: bool = True, foreach: bool | None = None,
) -> dict:  # fmt: skip
    """``pytorch_optimizer.SCION`` or ``SCIONLight``, one group per leaf; SCIONLight's gradients accumulate in p.grad.

    Under ``constrained`` every group is constrained (and ignores its weight decay).
    """
    names = sorted(params)
    tensors = {k: torch.tensor(params[k]) for k in names}
    groups = [
        {
            "params": [tensors[k]], "norm_type": LAYOUTS[layout][k][1], "norm_kwargs": LAYOUTS[layout][k][2],
            "scale": hp["radius"] * hp["scales"][k], "weight_decay": hp["weight_decay"] if DECAYED[k] else 0.0,
        }
        for k in names
    ]  # fmt: skip
    cls = pytorch_optimizer.SCIONLight if name == "pytorch_optimizer.SCIONLight" else pytorch_optimizer.SCION
    opt = cls(
        groups, lr=hp["learning_rate"], momentum=1.0 - hp["momentum"], constraint=constrained,
        weight_decouple=decoupled, foreach=foreach,
    )  # fmt: skip
    trajectory: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for t in range(len(grads[names[0]])):
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr[t]
        for k in names:
            g = torch.tensor(grads[k][t])
            if name == "pytorch_optimizer.SCIONLight" and tensors[k].grad is not None:
                tensors[k].grad.add_(g)  # what backward() does to a buffer that is never zeroed
            else:
                tensors[k].grad = g
        opt.step()
        for k in names:
            trajectory[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def _adaopt(name: str, hp: dict, layout: str, lr: Any = None, **options: Any) -> optax.GradientTransformation:
    norms = {k: ScionNorm(**{**vars(LAYOUTS[layout][k][0]), "scale": hp["scales"][k]}) for k in SHAPES}
    form = "sum" if name == "pytorch_optimizer.SCIONLight" else "ema"
    return adaopt.scion(
        hp["learning_rate"] if lr is None else lr, hp["momentum"], hp["radius"],
        0.0 if options.get("constrained") else hp["weight_decay"],
        norms=norms, momentum_form=form, weight_decay_mask=None if options.get("constrained") else DECAYED, **options,
    )  # fmt: skip


# (reference, weight decay, decoupled, constrained, layout, dtype, schedule, foreach)
CASES = [
    ("pytorch_optimizer.SCION", False, True, False, "auto", np.float64, False, None),
    ("pytorch_optimizer.SCION", True, True, False, "options", np.float64, True, None),
    ("pytorch_optimizer.SCION", True, False, False, "auto", np.float64, False, False),
    ("pytorch_optimizer.SCION", True, True, True, "options", np.float64, False, None),
    ("pytorch_optimizer.SCION", True, True, False, "auto", np.float32, True, None),
    ("pytorch_optimizer.SCIONLight", False, True, False, "auto", np.float64, False, None),
    ("pytorch_optimizer.SCIONLight", True, False, False, "options", np.float64, True, None),
    ("pytorch_optimizer.SCIONLight", True, True, True, "auto", np.float64, False, False),
    ("pytorch_optimizer.SCIONLight", True, True, False, "options", np.float32, False, None),
]
IDS = [
    f"{n.split('.')[-1]}-{'wd' if w else 'nowd'}-{'decoupled' if d else 'coupled'}-{'constrained' if c else 'free'}-"
    f"{layout}-{np.dtype(t).name}-{'schedule' if s else 'constant'}-foreach{f}"
    for n, w, d, c, layout, t, s, f in CASES
]


@pytest.mark.parametrize(
    ("name", "weight_decay", "decoupled", "constrained", "layout", "dtype", "schedule", "foreach"), CASES, ids=IDS
)
def test_matches_pytorch_optimizer(
    name: str, weight_decay: bool, decoupled: bool, constrained: bool, layout: str, dtype: Any, schedule: bool,
    foreach: bool | None,
) -> None:  # fmt: skip
    """200 steps of random gradients, every norm of the package on a leaf of its own, drawn hyperparameters."""
    seed = zlib.crc32(f"scion/{name}/{weight_decay}/{decoupled}/{constrained}/{layout}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay, layout)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    peak = hp["learning_rate"]
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        # optax evaluates a schedule in float32 at an int32 count: evaluated in the case's dtype, as torch sees it.
        rate = (lambda c: lr(jnp.asarray(c, dtype))) if lr else None
        tx = _adaopt(name, hp, layout, rate, constrained=constrained, decoupled_weight_decay=decoupled)
        ours = parity.run_adaopt(tx, params, grads)
        rates = [float(rate(t)) for t in range(parity.STEPS)] if rate else None
    with _newton_schulz_in_the_gradients_dtype():
        theirs = _reference(
            name, hp, layout, params, grads, rates, constrained=constrained, decoupled=decoupled, foreach=foreach
        )
    for k in SHAPES:
        assert ours[k].dtype == dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2, "the reference barely moved the parameters"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} vs {name} with {hp}"


def test_the_comparison_is_sharp() -> None:
    """A momentum off by 1e-4, or SCIONLight's sum for SCION's average, fails it; the decay matters under constraint=False."""
    hp = _draw(0, True, "auto")
    params, grads = parity.random_problem(SHAPES, 1, np.float64, steps=50)
    with _newton_schulz_in_the_gradients_dtype():
        theirs = _reference("pytorch_optimizer.SCION", hp, "auto", params, grads)
    with jax.enable_x64(True):
        off = parity.run_adaopt(
            _adaopt("pytorch_optimizer.SCION", {**hp, "momentum": hp["momentum"] - 1e-4}, "auto"), params, grads
        )
        light = parity.run_adaopt(_adaopt("pytorch_optimizer.SCIONLight", hp, "auto"), params, grads)
        undecayed = parity.run_adaopt(
            _adaopt("pytorch_optimizer.SCION", {**hp, "weight_decay": 0.0}, "auto"), params, grads
        )
    for wrong in (off, light, undecayed):
        assert parity.relative_error(wrong, theirs) > 1e-6


def test_bfloat16_iteration_follows_the_unpatched_reference() -> None:
    """``ns_dtype=jnp.bfloat16`` against the package as it ships, float32 parameters: within bfloat16's precision,
    and nearer to it than the float32 iteration is."""
    hp = _draw(2, True, "auto")
    params, grads = parity.random_problem(SHAPES, 3, np.float32, steps=10)
    theirs = _reference("pytorch_optimizer.SCION", hp, "auto", params, grads)
    bf16 = parity.relative_error(
        parity.run_adaopt(_adaopt("pytorch_optimizer.SCION", hp, "auto", ns_dtype=jnp.bfloat16), params, grads), theirs
    )
    f32 = parity.relative_error(
        parity.run_adaopt(_adaopt("pytorch_optimizer.SCION", hp, "auto"), params, grads), theirs
    )
    assert bf16 < 1e-3
    assert bf16 < f32


# What each kind of leaf does.


def test_the_default_rule_gives_each_kind_of_leaf_its_norm() -> None:
    params = {
        "embed": {"embedding": jnp.ones((1000, 8))},
        "wte": jnp.ones((50, 8)),
        "blocks": [{"attn": {"kernel": jnp.ones((8, 8))}, "norm": {"scale": jnp.ones(8)}}],
        "conv": jnp.ones((3, 3, 4, 4)),
        "bias": jnp.ones(8),
        "temperature": jnp.ones(()),
        "lm_head": {"kernel": jnp.ones((8, 50))},
        "value_head": jnp.ones((8, 1)),
        "column": jnp.ones((8, 1)),  # one axis longer than 1: a vector
        "bn": {"scale": jnp.ones((1, 1, 1, 8))},  # Haiku's batch-norm gain: a vector
        "frozen": None,
    }
    column = ScionNorm("col", transpose=True)
    assert adaopt.default_scion_norms(params) == {
        "embed": {"embedding": column}, "wte": column,
        "blocks": [{"attn": {"kernel": "spectral"}, "norm": {"scale": "bias_rms"}}],
        "conv": "spectral", "bias": "bias_rms", "temperature": "bias_rms", "lm_head": {"kernel": "sign"},
        "value_head": "sign", "column": "bias_rms", "bn": {"scale": ScionNorm("bias_rms", axis=-1)}, "frozen": None,
    }  # fmt: skip
    # The whole model in one jitted step, None leaf included.
    opt = adaopt.scion(0.01)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert updates["frozen"] is None
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_the_default_rule_reads_flat_dotted_names() -> None:
    params = {
        "lm_head.weight": jnp.ones((50, 8)),
        "wte.weight": jnp.ones((50, 8)),
        "h.0.mlp.c_fc.weight": jnp.ones((8, 8)),
    }
    norms = adaopt.default_scion_norms(params)
    assert norms == {
        "lm_head.weight": "sign",
        "wte.weight": ScionNorm("col", transpose=True),
        "h.0.mlp.c_fc.weight": "spectral",
    }


def test_biases_and_norms_stay_vectors_whatever_their_shape() -> None:
    """The leaves default_muon_mask leaves to AdamW by their names take "bias_rms" over their last axis (stacked
    biases, norms' gains and Flax's (heads, head_dim) attention biases were "spectral"); Llama's "output.weight" is
    a head."""
    from tests.test_muon import STACKED, STACKED_MUON

    norms = adaopt.default_scion_norms(STACKED)
    expected = jax.tree.map(lambda muon: "spectral" if muon else ScionNorm("bias_rms", axis=-1), STACKED_MUON)
    expected["output.weight"] = "sign"
    assert norms == expected


def test_stacked_biases_take_each_layers_step_on_its_own() -> None:
    """A (layers, d) stack of biases by the default rule: each layer's step is that layer's bias_rms step (the RMS
    over the first axis mixed the layers: each feature normalised across them); a Haiku (1, 1, 1, C) gain's step is
    the (C,) gain's (it was sign(d): the RMS of one element)."""
    rng = np.random.default_rng(3)
    grads = {
        "blocks": {"bias": rng.normal(size=(3, 8)) * np.array([[1.0], [10.0], [0.1]])},
        "bn": {"scale": rng.normal(size=(1, 1, 1, 8))},
    }
    params = jax.tree.map(np.zeros_like, grads)
    opt = adaopt.scion(0.1, momentum=0.0)
    with jax.enable_x64(True):
        updates, _ = opt.update(grads, opt.init(params), params)
        for layer in range(3):
            single = {"bias": grads["blocks"]["bias"][layer]}
            want, _ = opt.update(single, opt.init(jax.tree.map(np.zeros_like, single)), single)
            np.testing.assert_allclose(updates["blocks"]["bias"][layer], want["bias"], rtol=1e-14)
        gain = {"scale": grads["bn"]["scale"].reshape(8)}
        want, _ = opt.update(gain, opt.init(gain), gain)
        np.testing.assert_allclose(updates["bn"]["scale"].reshape(8), want["scale"], rtol=1e-14)
    with pytest.raises(
        ValueError, match=r"'bias_rms' at \['b'\] takes its RMS over axis 1, but the leaf has shape \(4,\)"
    ):
        adaopt.scion(0.1, norms={"b": ScionNorm("bias_rms", axis=1)}).init({"b": jnp.ones(4)})
    with pytest.raises(adaopt.HyperparameterError, match="axis is an option of the 'bias_rms' norm, not of 'sign'"):
        ScionNorm("sign", axis=0)


def test_in_out_kernels_take_torchs_steps_transposed() -> None:
    """Flax's and Haiku's (in, out) kernels read as torch's (out, in) had their shape factor sqrt(A / B) inverted (4x
    on a 16 -> 64 layer) and a head's sign step divided by the vocabulary instead of the inputs; with in_out=True
    the steps are torch layout's, transposed."""
    import functools

    shapes = {"h.w": (64, 16), "h.b": (64,), "embed": (50, 16), "lm_head": (50, 64)}
    params, grads = parity.random_problem(shapes, 7, np.float64)
    flip = lambda tree: {k: np.swapaxes(v, -1, -2) if k in ("h.w", "lm_head") else v for k, v in tree.items()}
    flax_norms = functools.partial(adaopt.default_scion_norms, in_out=True)
    assert flax_norms(flip(params))["lm_head"] == ScionNorm("sign", transpose=True)
    with jax.enable_x64(True):
        torch_layout = parity.run_adaopt(adaopt.scion(0.02, weight_decay=0.1), params, grads)
        flax_layout = parity.run_adaopt(
            adaopt.scion(0.02, weight_decay=0.1, norms=flax_norms), flip(params), flip(grads)
        )
        unaware = parity.run_adaopt(adaopt.scion(0.02, weight_decay=0.1), flip(params), flip(grads))
    assert parity.relative_error(flip(flax_layout), torch_layout) <= 1e-14
    assert parity.relative_error(flip(unaware), torch_layout) > 1e-2


def test_a_3d_spectral_leaf_is_a_batch_of_matrices() -> None:
    params, grads = {"t": np.ones((3, 6, 4), np.float32)}, {"t": np.random.default_rng(5).normal(size=(4, 3, 6, 4))}
    grads = {"t": grads["t"].astype(np.float32)}
    batched = parity.run_adaopt(adaopt.scion(0.02), params, grads)
    for i in range(3):
        single = parity.run_adaopt(adaopt.scion(0.02), {"t": params["t"][i]}, {"t": grads["t"][:, i]})
        np.testing.assert_allclose(batched["t"][:, i], single["t"], rtol=1e-6, atol=1e-6)


def test_sum_and_average_agree_for_a_scale_free_norm() -> None:
    """sign(d / (1 - beta)) = sign(d): SCIONLight's sum and SCION's average give one trajectory for a sign-normed leaf."""
    params, grads = parity.random_problem(SHAPES, 6, np.float64, steps=20)
    leaf = {"head": params["head"]}, {"head": grads["head"]}
    with jax.enable_x64(True):
        ema = parity.run_adaopt(adaopt.scion(0.01, 0.8, norms={"head": "sign"}), *leaf)
        total = parity.run_adaopt(adaopt.scion(0.01, 0.8, norms={"head": "sign"}, momentum_form="sum"), *leaf)
    np.testing.assert_array_equal(ema["head"], total["head"])


def test_a_norm_that_does_not_fit_the_leaf_is_refused_at_init() -> None:
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"'spectral'.*\['b'\] has shape \(3,\)"):
        adaopt.scion(norms={"w": "spectral", "b": "spectral"}).init(params)
    with pytest.raises(ValueError, match=r"'sign' \(normalized\).*\['b'\]"):
        adaopt.scion(norms={"w": "spectral", "b": "sign"}).init(params)
    adaopt.scion(norms={"w": "spectral", "b": ScionNorm("sign", normalize=False)}).init(params)


def test_an_unnormalised_sign_steps_vectors_and_scalars() -> None:
    """ScionNorm("sign", normalize=False) takes any shape, as its check says: its step read the leaf's second
    dimension first (an IndexError on a vector or a scalar)."""
    params = {"b": jnp.zeros(3), "s": jnp.zeros(())}
    grads = {"b": jnp.asarray([0.5, -2.0, 1.0]), "s": jnp.asarray(-3.0)}
    tx = adaopt.scion(0.1, norms={"b": ScionNorm("sign", normalize=False), "s": ScionNorm("sign", normalize=False)})
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in params:  # one magnitude, against the gradient's signs
        u = np.atleast_1d(np.asarray(updates[k]))
        np.testing.assert_array_equal(np.sign(u), -np.sign(np.atleast_1d(np.asarray(grads[k]))))
        np.testing.assert_allclose(np.abs(u), np.abs(u[0]), rtol=1e-6)
        assert abs(u[0]) > 0


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"Scion does not take complex parameters.*\['w'\]"):
        adaopt.scion().init({"w": jnp.ones((3, 3), jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"radius": 0.0}, "radius"), ({"momentum_form": "light"}, "momentum_form"), ({"ns_steps": 2.5}, "ns_steps"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"), ({"ns_dtype": jnp.int8}, "ns_dtype"),
        ({"constrained": True, "weight_decay": 0.1}, "weight_decay"), ({"ns_eps": -1.0}, "ns_eps"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.scion(**kwargs)
    for bad, name in (({"kind": "nuclear"}, "kind"), ({"kind": "sign", "scale": -1.0}, "scale")):
        with pytest.raises(adaopt.HyperparameterError, match=name):
            ScionNorm(**bad)
