"""adaopt.sam_value_and_grad against pytorch_optimizer.SAM (and ASAM, adaptive=True), step for step on a
small MLP, each side at its own iterates, around torch.optim.SGD (momentum, L2) and torch.optim.AdamW.

pytorch-optimizer computes the norm of the gradient in float32 whatever the parameters' dtype: in
float64 the comparison runs with that one function patched to float64 (<= 1e-10), and as it ships
(at float32's precision of the norm); in float32, as it ships."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_optimizer.optimizer.sam as torch_sam
import torch

import adaopt

STEPS = 200
SIZES = {"w1": (4, 8), "b1": (8,), "w2": (8, 1), "b2": (1,)}  # a 4-8-1 tanh network
DECAYED = {"w1": True, "b1": False, "w2": True, "b2": False}
BATCH, BATCHES = 16, 4

# Base optimizers: (adaopt factory, torch class, torch arguments), from drawn hyperparameters.
BASES: dict[str, tuple[Callable[..., Any], Any, Callable[[dict], dict]]] = {
    "SGD": (
        lambda hp, mask: adaopt.sgd(hp["lr"], hp["momentum"], weight_decay=hp["wd"], weight_decay_mask=mask),
        torch.optim.SGD,
        lambda hp: {"lr": hp["lr"], "momentum": hp["momentum"]},
    ),
    "AdamW": (
        lambda hp, mask: adaopt.adamw(
            hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], weight_decay_mask=mask
        ),
        torch.optim.AdamW,
        lambda hp: {"lr": hp["lr"], "betas": (hp["b1"], hp["b2"]), "eps": hp["eps"]},
    ),
}


def _draw(base: str, adaptive: bool, weight_decay: bool, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {
        # ASAM's neighbourhood scales with |w|: its radius is larger (the paper uses 10x SAM's).
        "rho": float(rng.uniform(0.5, 2.0) if adaptive else rng.uniform(0.02, 0.2)),
        "eps": float(np.exp(rng.uniform(np.log(1e-8), np.log(1e-6)))),
        "wd": float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0,
        "momentum": float(rng.uniform(0.0, 0.9)),
        "b1": float(rng.uniform(0.5, 0.95)),
        "b2": float(rng.uniform(0.9, 0.999)),
    }
    hp["lr"] = float(np.exp(rng.uniform(np.log(0.02), np.log(0.1)))) * (0.1 if base == "AdamW" else 1.0)
    return hp


def _problem(dtype: Any, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Start parameters and BATCHES minibatches of a smooth regression target."""
    rng = np.random.default_rng(seed)
    params = {k: (rng.normal(size=s) / np.sqrt(s[0] if len(s) > 1 else 4)).astype(dtype) for k, s in SIZES.items()}
    x = rng.normal(size=(BATCHES, BATCH, 4)).astype(dtype)
    y = (np.sin(x @ np.array([1.0, -2.0, 0.5, 1.5])) + 0.1 * rng.normal(size=(BATCHES, BATCH)))[..., None]
    return params, x, y.astype(dtype)


def _loss(p: dict, x: Any, y: Any) -> Any:
    """The same network in JAX and in torch (``tanh`` and ``mean`` come from the arrays' module)."""
    lib = torch if isinstance(x, torch.Tensor) else jnp
    h = lib.tanh(x @ p["w1"] + p["b1"])
    return lib.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def _run_adaopt(base: str, hp: dict, adaptive: bool, params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    mask = DECAYED if hp["wd"] else None
    optimizer = BASES[base][0](hp, mask)
    sam_grad = adaopt.sam_value_and_grad(_loss, hp["rho"], adaptive=adaptive, eps=hp["eps"])

    @jax.jit
    def run(p: dict) -> dict:
        def step(carry: tuple, t: jax.Array) -> tuple[tuple, dict]:
            p, s = carry
            _, grads = sam_grad(p, jnp.asarray(x)[t % BATCHES], jnp.asarray(y)[t % BATCHES])
            updates, s = optimizer.update(grads, s, p)
            p = adaopt.apply_updates(p, updates)
            return (p, s), p

        return jax.lax.scan(step, (p, optimizer.init(p)), jnp.arange(STEPS))[1]

    return jax.tree.map(np.asarray, run(jax.tree.map(jnp.asarray, params)))


def _run_torch(base: str, hp: dict, adaptive: bool, params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """pytorch_optimizer.SAM's closure protocol: the gradient at w, then step(closure)."""
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [tensors[k] for k in SIZES if DECAYED[k]], "weight_decay": hp["wd"]},
        {"params": [tensors[k] for k in SIZES if not DECAYED[k]], "weight_decay": 0.0},
    ]
    _, cls, kwargs = BASES[base]
    opt = torch_sam.SAM(groups, cls, rho=hp["rho"], adaptive=adaptive, perturb_eps=hp["eps"], **kwargs(hp))
    trajectory: dict[str, list] = {k: [] for k in SIZES}
    for t in range(STEPS):
        xb, yb = torch.tensor(x[t % BATCHES]), torch.tensor(y[t % BATCHES])

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(tensors, xb, yb)
            loss.backward()
            return loss

        closure()
        opt.step(closure)
        for k in SIZES:
            trajectory[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def _norm_in_float64(param_groups: Any, device: Any = None, *, weight_adaptive: bool = False) -> torch.Tensor:
    """pytorch-optimizer's ``get_global_gradient_norm`` (the squared norm, ASAM's |w|-weighted one
    included) with its sum in the gradients' dtype instead of float32."""
    grads = []
    for group in param_groups:
        adaptive = weight_adaptive and group.get("adaptive", False)
        grads += [p.grad * p.abs() if adaptive else p.grad for p in group["params"] if p.grad is not None]
    return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)


def _relative_error(ours: dict, theirs: dict) -> float:
    return max(float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in theirs)


def _compare(base: str, adaptive: bool, weight_decay: bool, dtype: Any, seed: int, patch: bool) -> tuple[float, float]:
    """(relative error between the trajectories, how far the reference moved from the start)."""
    hp = _draw(base, adaptive, weight_decay, seed)
    params, x, y = _problem(dtype, seed)
    with jax.enable_x64(dtype == np.float64):
        ours = _run_adaopt(base, hp, adaptive, params, x, y)
    original = torch_sam.get_global_gradient_norm
    torch_sam.get_global_gradient_norm = _norm_in_float64 if patch else original
    try:
        theirs = _run_torch(base, hp, adaptive, params, x, y)
    finally:
        torch_sam.get_global_gradient_norm = original
    for k in SIZES:
        assert ours[k].dtype == dtype
    moved = _relative_error({k: np.broadcast_to(params[k], theirs[k].shape) for k in SIZES}, theirs)
    return _relative_error(ours, theirs), moved


# (dtype, reference's norm patched to float64, tolerance)
PRECISIONS = [(np.float64, True, 1e-10), (np.float64, False, 1e-6), (np.float32, False, 1e-4)]
RUNS = [
    (base, adaptive, weight_decay, precision, draw)
    for base in BASES
    for adaptive in (False, True)
    for weight_decay in (True, False)
    for precision in PRECISIONS
    for draw in (0,)  # one draw per combination, each combination's own
    # Every combination against the reference with its norm patched to float64; the unpatched float64
    # reference and float32 once per base optimizer each (SAM for one, ASAM for the other), with weight decay.
    if precision[1] or (weight_decay and adaptive == ((base == "SGD") == (precision[0] == np.float64)))
]


def _label(base: str, adaptive: bool, wd: bool, precision: tuple, draw: int) -> str:
    dtype, patched, _ = precision
    norm = "-norm64" if patched else ""
    return f"{'ASAM' if adaptive else 'SAM'}-{base}-{'wd' if wd else 'nowd'}-{np.dtype(dtype).name}{norm}-{draw}"


@pytest.mark.parametrize(
    ("base", "adaptive", "weight_decay", "precision", "draw"), RUNS, ids=[_label(*r) for r in RUNS]
)
def test_matches_pytorch_optimizer_sam(
    base: str, adaptive: bool, weight_decay: bool, precision: tuple, draw: int
) -> None:
    dtype, patched, tolerance = precision
    seed = zlib.crc32(f"sam/{base}/{adaptive}/{weight_decay}/{draw}".encode())
    error, moved = _compare(base, adaptive, weight_decay, dtype, seed, patched)
    assert moved > 1e-2, "the reference barely moved the parameters; the comparison would prove nothing"
    assert error <= tolerance, f"relative error {error:.3g}"


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_the_comparison_sees_rho(adaptive: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """rho off by 10% on one side fails the comparison: the perturbation matters to the trajectory (60 steps show it)."""
    monkeypatch.setattr(f"{__name__}.STEPS", 60)
    seed = zlib.crc32(f"sam/SGD/{adaptive}/True/0".encode())
    hp = _draw("SGD", adaptive, True, seed)
    params, x, y = _problem(np.float64, seed)
    with jax.enable_x64(True):
        ours = _run_adaopt("SGD", {**hp, "rho": 1.1 * hp["rho"]}, adaptive, params, x, y)
    original = torch_sam.get_global_gradient_norm
    torch_sam.get_global_gradient_norm = _norm_in_float64
    try:
        theirs = _run_torch("SGD", hp, adaptive, params, x, y)
    finally:
        torch_sam.get_global_gradient_norm = original
    assert _relative_error(ours, theirs) > 1e-5


# The function itself.


def _quadratic(p: dict, scale: jax.Array) -> tuple[jax.Array, dict]:
    loss = jnp.sum(scale * p["w"] ** 2) + jnp.sum(p["b"] ** 2) / 2
    return loss, {"w_norm": jnp.linalg.norm(p["w"])}


def test_value_aux_and_gradient_at_the_perturbed_point() -> None:
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(3.0)}
    scale = jnp.array([1.0, 2.0, 3.0])
    fn = jax.jit(adaopt.sam_value_and_grad(_quadratic, rho=0.1, has_aux=True))
    (loss, aux), grads = fn(params, scale)
    np.testing.assert_allclose(loss, _quadratic(params, scale)[0])
    np.testing.assert_allclose(aux["w_norm"], np.linalg.norm(params["w"]))
    g = jax.grad(lambda p: _quadratic(p, scale)[0])(params)
    norm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gi: w + 0.1 * gi / norm, params, g)
    expected = jax.grad(lambda p: _quadratic(p, scale)[0])(perturbed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, expected)
    # rho = 0: the plain gradient.
    _, plain = adaopt.sam_value_and_grad(_quadratic, rho=0.0, has_aux=True)(params, scale)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), plain, g)


def test_asam_perturbation_with_eta() -> None:
    w = jnp.array([2.0, -1.0, 0.0])
    g = jnp.array([1.0, 1.0, 1.0])
    e = adaopt.sam_perturbation(w, g, rho=0.5, adaptive=True, eta=0.1, eps=0.0)
    t = np.abs(np.asarray(w)) + 0.1
    np.testing.assert_allclose(e, 0.5 * t**2 * g / np.linalg.norm(t * g), rtol=1e-6)


def test_complex_parameters_move_uphill() -> None:
    """For a complex parameter the perturbation follows the ascent direction (the conjugate of jax.grad's)."""
    z = jnp.array([1.0 + 1.0j, -0.5j], jnp.complex64)
    loss = lambda z: jnp.sum(jnp.abs(z) ** 2)
    e = adaopt.sam_perturbation(z, jax.grad(loss)(z), rho=0.1)
    assert e.dtype == jnp.complex64
    np.testing.assert_allclose(e, 0.1 * z / jnp.linalg.norm(z), rtol=1e-6)  # radially outward: uphill
    assert loss(z + e) > loss(z)


def test_half_precision_zero_size_and_zero_gradient() -> None:
    params = {"w": jnp.ones(3, jnp.bfloat16), "empty": jnp.zeros((0, 2))}
    loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2) + jnp.sum(p["empty"])
    _, grads = adaopt.sam_value_and_grad(loss, rho=0.05)(params)
    assert grads["w"].dtype == jnp.bfloat16 and grads["empty"].shape == (0, 2)
    assert np.all(np.asarray(grads["w"], np.float32) > 2.0)  # 2 (w + e), e > 0
    flat = lambda p: jnp.sum(p["w"].astype(jnp.float32)) * 0.0
    _, zero = adaopt.sam_value_and_grad(flat, rho=0.05, eps=0.0)(params)
    assert np.all(np.isfinite(np.asarray(zero["w"], np.float32)))


def test_refuses_bad_arguments() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"rho must be a finite number in \[0.0, inf\)"):
        adaopt.sam_value_and_grad(_quadratic, rho=-0.1)
    with pytest.raises(adaopt.HyperparameterError, match="eta must be"):
        adaopt.sam_value_and_grad(_quadratic, adaptive=True, eta=float("nan"))
    with pytest.raises(adaopt.HyperparameterError, match="adaptive must be True or False"):
        adaopt.sam_value_and_grad(_quadratic, adaptive="yes")  # type: ignore[arg-type]
