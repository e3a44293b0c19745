"""Hypergradient descent (SGD-HD, SGDN-HD, Adam-HD) against the authors' algorithm, step for step, and at work.

The reference is the authors' torch code (github gbaydin/hypergradient-descent, ``hypergrad/sgd_hd.py``
and ``hypergrad/adam_hd.py``, MIT licence; the registry's ``hypergradient-descent:SGDHD``,
``hypergradient-descent:SGDHD(nesterov=True)`` and ``hypergradient-descent:AdamHD``), which is not on
PyPI (the PyPI package named ``hypergrad`` is unrelated bilevel-optimisation code). ``SGDHDReference`` and
``AdamHDReference`` below restate its ``step`` in today's torch, operation for operation
(``SGDHD``: one flat vector, the learning rate moved by ``hypergrad_lr * dot(grad, grad_prev)``
before the step, ``grad_prev`` the direction after momentum; ``AdamHD``: the learning rate moved
parameter tensor by parameter tensor, eps added to ``sqrt(v)`` before the bias correction); they
follow the authors' code bit for bit. 200 steps on a tree of several leaves with fresh random
gradients, four random draws of hyperparameters per run (weight decay off and on, on one
parameter group as ``SGDHD`` requires), in float64 (relative error <= 1e-10) and float32 (<= 1e-5).

The demonstration: Adam-HD started from a learning rate 10x too small or 10x too large ends, on
minibatch logistic regression on the digits, within 3x of the suboptimality that Adam reaches at
its best learning rate, where Adam at those two rates is far worse.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from sklearn.datasets import load_digits

import adaopt
from adaopt import HypergradientState, adam_hd, hypergradient, sgd_hd, sgdn_hd
from tests import parity, problems, steps
from tests.parity import SHAPES, STEPS

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}


# ---- The authors' algorithm, restated in torch. ----


class SGDHDReference(torch.optim.Optimizer):
    """The authors' ``SGDHD.step``, restated: one parameter group, treated as one flat vector."""

    def __init__(
        self,
        params: Any,
        lr: float,
        hypergrad_lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)  # fmt: skip
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("SGDHD takes a single parameter group")

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        params = group["params"]
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        if group["weight_decay"] != 0:
            grad = grad.add(torch.cat([p.reshape(-1) for p in params]), alpha=group["weight_decay"])
        state = self.state[params[0]]  # the authors keep the global state on the first parameter
        grad_prev = state.get("grad_prev", torch.zeros_like(grad))
        group["lr"] = group["lr"] + group["hypergrad_lr"] * torch.dot(grad, grad_prev)
        momentum = group["momentum"]
        if momentum != 0:
            if "momentum_buffer" not in state:
                buf = grad.clone()
            else:
                buf = state["momentum_buffer"].mul(momentum).add(grad, alpha=1 - group["dampening"])
            state["momentum_buffer"] = buf
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        state["grad_prev"] = grad
        offset = 0
        for p in params:
            p.add_(grad[offset : offset + p.numel()].view_as(p), alpha=-float(group["lr"]))
            offset += p.numel()


class AdamHDReference(torch.optim.Optimizer):
    """The authors' ``AdamHD.step``, restated: the learning rate moves tensor by tensor, per group."""

    def __init__(
        self,
        params: Any,
        lr: float,
        hypergrad_lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=betas, eps=eps, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                grad = p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if t > 1:
                    h = torch.dot(grad.view(-1), torch.div(m, v.sqrt().add(group["eps"])).view(-1))
                    h = h * math.sqrt(1 - b2 ** (t - 1)) / (1 - b1 ** (t - 1))
                    group["lr"] = group["lr"] + group["hypergrad_lr"] * h
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.addcdiv_(m, v.sqrt().add(group["eps"]), value=-float(step_size))


def torch_trajectory(make: Any, params: dict, grads: dict, dtype: Any) -> tuple[dict, np.ndarray]:
    """Run a reference on one parameter group (tensors in sorted-name order, the tree's leaf order).

    Unlike ``parity.run_torch``, which writes ``group["lr"]`` before every step, this leaves the
    learning rate to the optimizer. Returns the trajectory and the learning rate after each step.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        names = sorted(params)
        tensors = {k: torch.tensor(params[k]) for k in names}
        opt = make([tensors[k] for k in names])
        trajectory: dict[str, list] = {k: [] for k in names}
        rates = []
        for t in range(STEPS):
            for k in names:
                tensors[k].grad = torch.tensor(grads[k][t])
            opt.step()
            for k in names:
                trajectory[k].append(tensors[k].detach().numpy().copy())
            rates.append(float(opt.param_groups[0]["lr"]))
        return {k: np.stack(v) for k, v in trajectory.items()}, np.asarray(rates)
    finally:
        torch.set_default_dtype(previous)


def _reference(family: str, hp: dict) -> Any:
    """The reference optimizer of a family, from hyperparameters in adaopt's names."""
    if family == "adam_hd":
        return lambda ps: AdamHDReference(
            ps, hp["learning_rate"], hp["hyper_lr"], (hp["b1"], hp["b2"]), hp["eps"], hp["weight_decay"]
        )
    return lambda ps: SGDHDReference(
        ps, hp["learning_rate"], hp["hyper_lr"], hp["momentum"], hp["dampening"], hp["weight_decay"],
        nesterov=family == "sgdn_hd",
    )  # fmt: skip


# ---- Parity. ----

DRAWS = 4  # per family and dtype: weight decay off, on, off, on (and for SGD: no momentum, then momentum)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _draw(family: str, i: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    hp = {"weight_decay": float(rng.uniform(1e-3, 0.1)) if i % 2 else 0.0}
    if family == "adam_hd":
        return {
            **hp,
            "learning_rate": _log_uniform(rng, 3e-3, 3e-2),
            "hyper_lr": _log_uniform(rng, 2e-5, 2e-4),
            "b1": float(rng.uniform(0.5, 0.95)),
            "b2": float(rng.uniform(0.9, 0.999)),
            "eps": _log_uniform(rng, 1e-8, 1e-4),
        }
    heavy_ball = family == "sgdn_hd" or i >= 2
    return {
        **hp,
        "learning_rate": _log_uniform(rng, 3e-3, 3e-2),
        "hyper_lr": _log_uniform(rng, 2e-5, 2e-4) if heavy_ball else _log_uniform(rng, 1e-4, 1e-3),
        "momentum": float(rng.uniform(0.5, 0.95)) if heavy_ball else 0.0,
        "dampening": float(rng.uniform(0.0, 0.5)) if family == "sgd_hd" and heavy_ball else 0.0,
    }


def _adaopt(family: str, hp: dict[str, Any]) -> optax.GradientTransformation:
    if family == "adam_hd":
        return adam_hd(hp["learning_rate"], hp["hyper_lr"], hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"])
    if family == "sgdn_hd":
        return sgdn_hd(hp["learning_rate"], hp["hyper_lr"], hp["momentum"], hp["weight_decay"])
    return sgd_hd(hp["learning_rate"], hp["hyper_lr"], hp["momentum"], hp["dampening"], hp["weight_decay"])


def _problem(dtype: Any, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *shape)).astype(dtype) for k, shape in SHAPES.items()}
    return params, grads


def _hypergradient_state(state: Any) -> HypergradientState:
    if isinstance(state, HypergradientState):
        return state
    return next(x for x in state if isinstance(x, HypergradientState))


def _trajectory(tx: optax.GradientTransformation, params: dict, grads: dict) -> tuple[dict, jax.Array]:
    """The parameters and the state's learning rate after each step, in one scan."""

    def step(carry: tuple, g: dict) -> tuple[tuple, tuple]:
        p, s = carry
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, _hypergradient_state(s).learning_rate)

    _, (trajectory, rates) = jax.lax.scan(step, (params, tx.init(params)), grads)
    return trajectory, rates


@functools.partial(jax.jit, static_argnames="family")
def _run_ours(family: str, hp: dict, params: dict, grads: dict) -> tuple[dict, jax.Array]:
    """Every draw of a family in one compiled program: the hyperparameters are traced and vmapped.

    With momentum traced, SGD-HD always keeps a buffer; at momentum 0 (and dampening 0) it is the
    gradient itself, so the no-momentum draws still test plain SGD-HD.
    """
    return jax.vmap(lambda h, p, g: _trajectory(_adaopt(family, h), p, g))(hp, params, grads)


RUNS = [(family, np.float64) for family in ("sgd_hd", "sgdn_hd", "adam_hd")] + [
    (family, np.float32) for family in ("sgd_hd", "adam_hd")
]


@pytest.mark.parametrize(("family", "dtype"), RUNS, ids=[f"{f}-{np.dtype(d).name}" for f, d in RUNS])
def test_matches_the_authors_algorithm(family: str, dtype: Any) -> None:
    seed = zlib.crc32(f"{family}/{np.dtype(dtype).name}".encode())
    draws = [_draw(family, i, seed + i) for i in range(DRAWS)]
    problems = [_problem(dtype, seed + 100 + i) for i in range(DRAWS)]
    theirs = [torch_trajectory(_reference(family, hp), p, g, dtype) for hp, (p, g) in zip(draws, problems, strict=True)]
    with jax.enable_x64(dtype == np.float64):
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), dtype), *trees)
        ours, our_rates = jax.tree.map(
            np.asarray,
            _run_ours(family, stack(draws), stack([p for p, _ in problems]), stack([g for _, g in problems])),
        )

    for i, (hp, (params, _), (trajectory, rates)) in enumerate(zip(draws, problems, theirs, strict=True)):
        mine = {k: v[i] for k, v in ours.items()}
        assert all(v.dtype == dtype for v in mine.values())
        moved = parity.relative_error(
            trajectory, {k: np.broadcast_to(params[k], v.shape) for k, v in trajectory.items()}
        )
        assert moved > 1e-3, f"the reference barely moved the parameters with {hp}"
        assert np.ptp(rates) > 0.05 * hp["learning_rate"], f"the hypergradient barely moved the rate with {hp}"
        error = parity.relative_error(mine, trajectory)
        assert error <= TOLERANCE[dtype], f"relative error {error:.3g} with {hp}"
        rate_error = np.max(np.abs(our_rates[i] - rates)) / np.max(np.abs(rates))
        assert rate_error <= 10 * TOLERANCE[dtype], f"learning rates off by {rate_error:.3g} with {hp}"


def test_parity_is_sharp_for_the_per_leaf_rate_and_eps_placement() -> None:
    """Adam-HD's two departures from the paper's form each show against the authors' code."""
    hp = _draw("adam_hd", 0, 7)
    params, grads = _problem(np.float64, 8)
    theirs, _ = torch_trajectory(_reference("adam_hd", hp), params, grads, np.float64)
    args = (hp["learning_rate"], hp["hyper_lr"], hp["b1"], hp["b2"], hp["eps"])
    variants = (adam_hd(*args, per_leaf_update=False), adam_hd(*args, eps_before_debias=False))
    with jax.enable_x64(True):
        global_rate, paper_eps = jax.tree.map(
            np.asarray, jax.jit(lambda p, g: [_trajectory(tx, p, g)[0] for tx in variants])(params, grads)
        )
    assert parity.relative_error(global_rate, theirs) > 1e-8
    assert parity.relative_error(paper_eps, theirs) > 1e-8


# ---- The rules themselves. ----


def test_hyper_lr_zero_is_the_inner_algorithm() -> None:
    """With beta = 0 the wrappers are SGD, Nesterov SGD and Adam (the paper's form), schedules included."""
    params, grads = _problem(np.float64, 3)
    grads = jax.tree.map(lambda g: g[:50], grads)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, 20, 50)
    with jax.enable_x64(True):
        lr = lambda count: schedule(jnp.asarray(count, jnp.float64))
        pairs = [
            (sgd_hd(lr, 0.0, 0.9, 0.1), adaopt.sgd(lr, 0.9, 0.1)),
            (sgdn_hd(lr, 0.0, 0.8), adaopt.sgd(lr, 0.8, nesterov=True)),
            (adam_hd(lr, 0.0, eps_before_debias=False, weight_decay=0.01), adaopt.adam(lr, weight_decay=0.01)),
        ]

        def final(tx: optax.GradientTransformation) -> dict:
            def step(carry: tuple, g: dict) -> tuple[tuple, None]:
                p, s = carry
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(step, (params, tx.init(params)), grads)[0][0]

        ends = jax.jit(lambda: [(final(ours), final(plain)) for ours, plain in pairs])()
    for ours_end, plain_end in ends:
        assert parity.relative_error(jax.tree.map(np.asarray, ours_end), jax.tree.map(np.asarray, plain_end)) <= 1e-12
        assert parity.relative_error(jax.tree.map(np.asarray, plain_end), params) > 1e-3


def test_schedule_is_followed_with_the_learned_offset_on_top() -> None:
    """alpha_t = eta_t + delta_t: the same offsets as with a constant rate, the schedule added."""
    with jax.enable_x64(True):
        params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
        grads = [{"w": jnp.asarray([0.3, -0.1, 0.2]) * (t + 1)} for t in range(4)]
        eta = [0.1, 0.05, 0.2, 0.0]
        schedule = lambda count: jnp.asarray(eta)[count]
        tx = sgd_hd(schedule, 0.5)
        state = tx.init(params)
        d_prev = np.zeros(3)
        delta = 0.0
        for t, g in enumerate(grads):
            updates, state = tx.update(g, state, params)
            delta += 0.5 * float(np.dot(np.asarray(g["w"]), d_prev))
            np.testing.assert_allclose(np.asarray(updates["w"]), -(eta[t] + delta) * np.asarray(g["w"]), rtol=1e-14)
            np.testing.assert_allclose(float(state[-1].learning_rate), eta[t] + delta, rtol=1e-14)
            d_prev = np.asarray(g["w"])


def test_multiplicative_rule() -> None:
    """rho_t = rho_{t-1} (1 + beta cos(g_t, d_{t-1})), step for step against numpy, on SGD with momentum."""
    params, grads = _problem(np.float64, 4)
    lr, beta, mu = 0.01, 0.5, 0.6
    names = sorted(params)
    with jax.enable_x64(True):
        tx = hypergradient(adaopt.scale_by_momentum(mu), lr, beta, multiplicative=True)
        ours, rates = jax.tree.map(np.asarray, jax.jit(functools.partial(_trajectory, tx))(params, grads))
    theta = np.concatenate([params[k].ravel() for k in names])
    buf, d_prev, alpha = np.zeros_like(theta), np.zeros_like(theta), lr
    expected_rates = []
    for t in range(STEPS):
        g = np.concatenate([grads[k][t].ravel() for k in names])
        norms = np.linalg.norm(g) * np.linalg.norm(d_prev)
        alpha *= 1 + beta * (g @ d_prev / norms if norms > 0 else 0.0)
        buf = mu * buf + g
        theta = theta - alpha * buf
        d_prev = buf
        expected_rates.append(alpha)
    final = np.concatenate([ours[k][-1].ravel() for k in names])
    np.testing.assert_allclose(final, theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rates, expected_rates, rtol=1e-10)
    assert max(expected_rates) / min(expected_rates) > 1.5, "the rule barely moved the rate"
    assert min(expected_rates) > 0


def test_grad_through_the_multiplicative_rule() -> None:
    """d(loss after 3 steps)/d(learning rate) is finite and right, though the first step has d_0 = 0."""
    with jax.enable_x64(True):
        params = {"w": jnp.full((3, 2), 0.3), "v": jnp.asarray([0.5, -0.2])}
        loss = lambda p: jnp.sum(jnp.tanh(p["w"] @ p["v"]) ** 2) + jnp.sum(p["v"] ** 2)

        @jax.jit
        def after(lr: jax.Array) -> jax.Array:
            tx = sgd_hd(lr, 0.05, momentum=0.5, multiplicative=True)
            p, s = params, tx.init(params)
            for _ in range(3):
                u, s = tx.update(jax.grad(loss)(p), s, p)
                p = optax.apply_updates(p, u)
            return loss(p)

        lr, h = jnp.asarray(0.05), 1e-6
        numeric = (after(lr + h) - after(lr - h)) / (2 * h)
        np.testing.assert_allclose(float(jax.grad(after)(lr)), float(numeric), rtol=1e-6)


def test_state_exposes_the_rate_it_applied() -> None:
    tx = sgd_hd(0.05, 0.01)
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    state = tx.init(params)
    assert float(state[-1].learning_rate) == pytest.approx(0.05)
    for t in range(3):
        g = jax.tree.map(lambda x, t=t: x * (0.5 + t), params)
        updates, state = tx.update(g, state, params)
        alpha = state[-1].learning_rate
        for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(np.asarray(u), -float(alpha) * np.asarray(x), rtol=1e-6)
    assert float(alpha) > 0.05, "aligned gradients must raise the rate"


# ---- The demonstration on a real problem. ----

L2 = 1e-3
BATCH, TRAIN_STEPS = 32, 2000


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, float]:
    """Standardised digits and the minimum of the L2-regularised logistic loss (L-BFGS, float64)."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x.astype(np.float32), y, problems.optimal_softmax_regression_loss(x, y, L2)


def _logistic_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return problems.softmax_regression_loss(params, x, y, L2)


def _suboptimality(runs: dict[str, tuple[Any, list[float]]]) -> dict[str, np.ndarray]:
    """Minibatch training from each rate, all in one compiled program: f - f* averaged over the last 10% of steps.

    ``runs`` maps a name to an optimizer factory and the rates to start it from; the full-batch
    loss is measured every 10 steps.
    """
    x_np, y_np, f_star = _digits()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    def train(make: Any, lr: jax.Array) -> jax.Array:
        tx = make(lr)
        params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

        def step(carry: tuple, t: jax.Array) -> tuple[tuple, None]:
            p, s = carry
            batch = jax.random.randint(jax.random.fold_in(jax.random.key(0), t), (BATCH,), 0, x.shape[0])
            u, s = tx.update(jax.grad(_logistic_loss)(p, x[batch], y[batch]), s, p)
            return (optax.apply_updates(p, u), s), None

        def ten_steps(carry: tuple, t: jax.Array) -> tuple[tuple, jax.Array]:
            carry, _ = jax.lax.scan(step, carry, 10 * t + jnp.arange(10))
            return carry, _logistic_loss(carry[0], x, y)

        _, losses = jax.lax.scan(ten_steps, (params, tx.init(params)), jnp.arange(TRAIN_STEPS // 10))
        return jnp.mean(losses[-TRAIN_STEPS // 100 :])

    def all_runs() -> dict[str, jax.Array]:
        return {
            name: jax.vmap(functools.partial(train, make))(jnp.asarray(rates)) for name, (make, rates) in runs.items()
        }

    return {name: np.asarray(gap) - f_star for name, gap in jax.jit(all_runs)().items()}


def test_adam_hd_forgives_a_learning_rate_10x_off() -> None:
    """The same beta from both starts (additive rule; and the multiplicative rule, beta = 0.1)."""
    grid = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # the middle one must be Adam's best, so both ends are 10x off
    off = [grid[0], grid[-1]]
    gaps = _suboptimality(
        {
            "adam": (adaopt.adam, grid),
            "additive": (lambda lr: adam_hd(lr, 1e-2), off),
            "multiplicative": (lambda lr: adam_hd(lr, 0.1, multiplicative=True), off),
        }
    )
    adam_gaps = gaps["adam"]
    assert int(np.argmin(adam_gaps)) == 2, f"Adam's best rate moved: {dict(zip(grid, adam_gaps, strict=True))}"
    tuned = adam_gaps[2]
    report = f"Adam over {grid}: {adam_gaps}; Adam-HD from {off}: {gaps['additive']} (additive), "
    report += f"{gaps['multiplicative']} (multiplicative)"
    assert np.all(adam_gaps[[0, -1]] >= 5 * tuned), report
    assert np.all(gaps["additive"] <= 3 * tuned), report
    assert np.all(gaps["multiplicative"] <= 3 * tuned), report


# ---- Every optimizer here reduces a real loss; jit, dtypes and validation. ----


def test_paper_defaults_train_from_a_small_rate() -> None:
    """From the paper's alpha_0 = 1e-3, full batch: the rate rises and the loss falls most of the way to its minimum."""
    x_np, y_np, f_star = _digits()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    optimizers = {"sgd_hd": sgd_hd(1e-3, 1e-3), "sgdn_hd": sgdn_hd(1e-3, 1e-3), "adam_hd": adam_hd(1e-3, 1e-5)}
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def run(tx: optax.GradientTransformation) -> tuple[jax.Array, jax.Array]:
        def step(carry: tuple, _: None) -> tuple[tuple, None]:
            p, s = carry
            u, s = tx.update(jax.grad(_logistic_loss)(p, x, y), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
        return _logistic_loss(p, x, y), _hypergradient_state(s).learning_rate

    results = jax.jit(lambda: {name: run(tx) for name, tx in optimizers.items()})()
    start = float(_logistic_loss(params, x, y))
    for name, (loss, rate) in results.items():
        assert float(rate) > 3e-3, f"{name}: the rate stayed at {float(rate):.3g}"
        assert float(loss) - f_star < 0.1 * (start - f_star), f"{name}: loss {float(loss):.4f} from {start:.4f}"


FACTORIES = {
    "sgd_hd": lambda: sgd_hd(0.01, 1e-3, momentum=0.9, weight_decay=0.01),
    "sgdn_hd_multiplicative": lambda: sgdn_hd(0.01, 0.02, multiplicative=True),
    "adam_hd": lambda: adam_hd(1e-3, 1e-7),
    "adam_hd_paper": lambda: adam_hd(1e-3, 1e-7, eps_before_debias=False, per_leaf_update=False),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jit_compiles_once(name: str) -> None:
    steps.assert_compiles_once_and_descends(FACTORIES[name]())


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_zero_gradient_is_finite(name: str, dtype: Any) -> None:
    state = steps.assert_half_precision_steps_are_finite(FACTORIES[name](), dtype)
    assert jnp.isfinite(state[-1].learning_rate)


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (sgd_hd, {"learning_rate": -1.0}, "learning_rate"),
        (sgd_hd, {"hyper_lr": -1e-3}, "hyper_lr"),
        (sgd_hd, {"hyper_lr": math.nan}, "hyper_lr"),
        (sgd_hd, {"hyper_lr": 1.0, "multiplicative": True}, "hyper_lr"),
        (sgd_hd, {"momentum": 1.0}, "momentum"),
        (sgd_hd, {"weight_decay": -0.1}, "weight_decay"),
        (sgd_hd, {"nesterov": True}, "nesterov"),
        (sgdn_hd, {"momentum": 0.0}, "momentum"),
        (adam_hd, {"b2": 1.0}, "b2"),
        (adam_hd, {"eps": -1.0}, "eps"),
        (adam_hd, {"hyper_lr": "1e-7"}, "hyper_lr"),
        (hypergradient, {"inner": optax.identity(), "learning_rate": 0.1, "hyper_lr": math.inf}, "hyper_lr"),
        (
            hypergradient,
            {"inner": optax.identity(), "learning_rate": 0.1, "hyper_lr": 0.1, "multiplicative": True,
             "per_leaf_update": True},
            "per_leaf_update",
        ),
    ],
)  # fmt: skip
def test_bad_hyperparameters_are_rejected(factory: Any, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)
