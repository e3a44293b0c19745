"""MARS's options beyond the registry's parity runs, step for step against ``pytorch_optimizer.MARS``.

``tests/test_parity.py`` compares ``mars_type="adamw"`` and ``"lion"`` at their defaults (the 1-d
leaves, out of the decay mask, on AdamW). Here: ``optimize_1d``, ``amsgrad`` (its
``ams_bound``), the 1-d leaves' own decay and learning-rate factor, ``"shampoo"`` and complex
parameters. "shampoo" runs Newton–Schulz in bfloat16 in the reference: in float64 and float32
its ``zero_power_via_newton_schulz_5`` is called with ``dtype=`` the gradient's (patched in the
test); ``ns_dtype=jnp.bfloat16`` is compared with the unpatched package within bfloat16's precision.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer.optimizer.mars as reference_mars
import torch

import adaopt
from tests import parity, references

SPEC = adaopt.REGISTRY["mars"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
KEYS = ("b1", "b2", "gamma", "eps", "adam_b1", "adam_b2", "adam_learning_rate_factor", "weight_decay")


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["adam_weight_decay"] = float(rng.uniform(1e-3, 0.2)) if weight_decay else 0.0
    return hp


def _schedule(peak: float, dtype: Any) -> Any:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10)
    # Evaluated in the case's dtype, as torch is given it.
    return lambda count: schedule(jnp.asarray(count, dtype))


def _theirs(hp: dict, params: dict, grads: dict, lr: Any) -> dict:
    """Every leaf in one group, decayed (MARS's leaves by weight_decay, AdamW's by adam_weight_decay)."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = [{"params": [tensors[k] for k in sorted(tensors)], "weight_decay": hp["weight_decay"]}]
    opt = references.TORCH["pytorch_optimizer.MARS"](groups, hp)
    return parity._torch_trajectory(opt, tensors, lr, grads)


def _ours(hp: dict, params: dict, grads: dict, lr: Any, **options: Any) -> dict:
    options = {k: hp[k] for k in ("mars_type", "optimize_1d", "amsgrad") if k in hp} | options
    tx = adaopt.mars(
        lr, **{k: hp[k] for k in KEYS}, adam_weight_decay=hp["adam_weight_decay"], eps_root=1e-15, **options
    )
    return parity.run_adaopt(tx, params, grads)


def _run(label: str, dtype: Any, options: dict[str, Any], schedule: bool, weight_decay: bool = True) -> tuple:
    seed = zlib.crc32(f"mars/{label}/{np.dtype(dtype).name}".encode())
    hp = {**_draw(seed, weight_decay), **options}
    params, grads = parity.random_problem(parity.SHAPES, seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        lr = _schedule(hp["learning_rate"], dtype) if schedule else hp["learning_rate"]
        ours = _ours(hp, params, grads, lr)
        theirs = _theirs(hp, params, grads, lr)
    return ours, theirs, params


OPTION_CASES = [
    ("adamw-1d", {"optimize_1d": True}, np.float64, False, True),
    ("adamw-ams", {"amsgrad": True}, np.float64, True, True),
    ("adamw-ams-nowd", {"amsgrad": True}, np.float64, False, False),
    ("lion-1d-ams", {"mars_type": "lion", "optimize_1d": True, "amsgrad": True}, np.float64, False, True),
    ("lion", {"mars_type": "lion"}, np.float32, True, True),
    ("adamw-1d-ams", {"optimize_1d": True, "amsgrad": True}, np.float32, True, True),
]


@pytest.mark.parametrize(
    ("label", "options", "dtype", "schedule", "weight_decay"),
    OPTION_CASES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_options_match_pytorch_optimizer_MARS(
    label: str, options: dict[str, Any], dtype: Any, schedule: bool, weight_decay: bool
) -> None:
    ours, theirs, params = _run(label, dtype, options, schedule, weight_decay)
    assert parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs}) > 1e-3
    assert parity.relative_error(ours, theirs) <= TOLERANCE[dtype]


def _ns_in(dtype: Any) -> Any:
    original = reference_mars.zero_power_via_newton_schulz_5

    def patched(g: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return original(g, **kwargs, dtype=dtype or g.dtype)

    return patched


SHAMPOO_CASES = [
    ("shampoo", {}, np.float64, True),
    ("shampoo-1d-ams", {"optimize_1d": True, "amsgrad": True}, np.float64, False),
    ("shampoo-f32", {}, np.float32, True),
]


@pytest.mark.parametrize(
    ("label", "options", "dtype", "schedule"), SHAMPOO_CASES, ids=lambda x: x if isinstance(x, str) else ""
)
def test_shampoo_matches_pytorch_optimizer_MARS(
    label: str, options: dict[str, Any], dtype: Any, schedule: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tall matrix, a vector, a scalar and a 4-d kernel (its matrix (3, 8), scaled by sqrt(3 / 2) from its first two axes)."""
    monkeypatch.setattr(reference_mars, "zero_power_via_newton_schulz_5", _ns_in(None))
    ours, theirs, _ = _run(label, dtype, {"mars_type": "shampoo", **options}, schedule)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[dtype]


def test_bfloat16_iteration_follows_the_unpatched_reference() -> None:
    hp = {**_draw(3, True), "mars_type": "shampoo"}
    params, grads = parity.random_problem(parity.SHAPES, 4, np.float32)
    theirs = _theirs(hp, params, grads, hp["learning_rate"])
    bf16 = _ours(hp, params, grads, hp["learning_rate"], ns_dtype=jnp.bfloat16)
    f32 = _ours(hp, params, grads, hp["learning_rate"])
    assert parity.relative_error(bf16, theirs) < 1e-4 < parity.relative_error(f32, theirs)


@pytest.mark.parametrize("mars_type", ["adamw", "lion"])
def test_real_imag_matches_pytorch_optimizer_MARS_on_complex_parameters(mars_type: str) -> None:
    """pytorch-optimizer views a complex tensor as real pairs before routing it: a complex vector is a MARS leaf."""
    seed = zlib.crc32(f"mars/complex/{mars_type}".encode())
    hp = {**_draw(seed, True), "mars_type": mars_type}
    params, grads = parity.random_problem(parity.SHAPES, seed + 1, np.complex128, complex_=True)
    with jax.enable_x64(True):
        ours = _ours(hp, params, grads, hp["learning_rate"], complex_convention="real_imag")
        modulus = _ours(hp, params, grads, hp["learning_rate"])
    theirs = _theirs(hp, params, grads, hp["learning_rate"])
    assert parity.relative_error(ours, theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(modulus, theirs) > 1e-6


def test_shampoo_refuses_complex_matrices_under_modulus() -> None:
    with pytest.raises(TypeError, match=r"complex.*\['w'\].*real_imag"):
        adaopt.mars(mars_type="shampoo").init({"w": jnp.ones((3, 2), jnp.complex64), "b": jnp.ones(2, jnp.complex64)})
    adaopt.mars(mars_type="shampoo", complex_convention="real_imag").init({"w": jnp.ones((3, 2), jnp.complex64)})


def test_the_comparison_is_sharp() -> None:
    """gamma off by 1e-4 fails it, and so does the 1-d leaves' learning-rate factor off by 1e-4."""
    hp = _draw(5, True)
    params, grads = parity.random_problem(parity.SHAPES, 6, np.float64)
    theirs = _theirs(hp, params, grads, hp["learning_rate"])
    with jax.enable_x64(True):
        assert parity.relative_error(_ours(hp, params, grads, hp["learning_rate"]), theirs) <= TOLERANCE[np.float64]
        for key in ("gamma", "adam_learning_rate_factor"):
            off = _ours({**hp, key: hp[key] + 1e-4}, params, grads, hp["learning_rate"])
            assert parity.relative_error(off, theirs) > 1e-7, key


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mars_type": "sgd"}, "mars_type"), ({"gamma": -0.1}, "gamma"), ({"adam_b1": 1.0}, "adam_b1"),
        ({"adam_b2": -0.5}, "adam_b2"), ({"adam_learning_rate_factor": -1.0}, "adam_learning_rate_factor"),
        ({"adam_weight_decay": -1.0}, "adam_weight_decay"), ({"ns_dtype": jnp.int8}, "ns_dtype"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.mars(**kwargs)


def test_cautious_adamw_matches_pytorch_optimizer_MARS_cautious() -> None:
    """``adaopt.cautious(adaopt.mars)`` with ``mars_type="adamw"`` is pytorch-optimizer's ``MARS(cautious=True)``,
    as the registry's note says (float64, decay and a schedule); plain MARS is not."""
    seed = zlib.crc32(b"mars/cautious/float64")
    hp = _draw(seed, True)
    params, grads = parity.random_problem(parity.SHAPES, seed + 1, np.float64)
    with jax.enable_x64(True):
        lr = _schedule(hp["learning_rate"], np.float64)
        kwargs = {k: hp[k] for k in KEYS} | {"adam_weight_decay": hp["adam_weight_decay"], "eps_root": 1e-15}
        ours = parity.run_adaopt(adaopt.cautious(adaopt.mars)(learning_rate=lr, **kwargs), params, grads)
        plain = _ours(hp, params, grads, lr)
        tensors = {k: torch.tensor(v) for k, v in params.items()}
        groups = [
            {"params": [tensors[k] for k in sorted(tensors)], "weight_decay": hp["weight_decay"], "cautious": True}
        ]
        theirs = parity._torch_trajectory(references.TORCH["pytorch_optimizer.MARS"](groups, hp), tensors, lr, grads)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[np.float64]
    assert parity.relative_error(plain, theirs) > 1e-6
