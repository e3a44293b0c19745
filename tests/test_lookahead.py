"""adaopt.lookahead: optax.lookahead's step exactly, with ``value=`` passed to the fast optimizer;
the optax wrappers that pass ``update``'s extra arguments on, as the module's docstring says; and
pytorch_optimizer.Lookahead step for step (fast and slow weights)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch

import adaopt
from adaopt import Capability, OptimizerSpec

SYNC = 2
ALPHA = 0.5
STEPS = 5  # two synchronisations and a fast step after them


def _loss(p: dict) -> jax.Array:
    return jnp.sum(jnp.tanh(p["w"] @ p["v"]) ** 2) + jnp.sum(p["v"] ** 2)


def _params() -> dict:
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "v": jnp.array([0.5, -0.25])}


def _run(tx: optax.GradientTransformation, steps: int = STEPS, **extra: Any) -> optax.LookaheadParams:
    """Gradients at the fast parameters; ``value=`` the loss there when ``extra`` asks for it."""
    params = optax.LookaheadParams.init_synced(_params())
    state = tx.init(params)
    for _ in range(steps):
        value, grads = jax.value_and_grad(_loss)(params.fast)
        updates, state = tx.update(grads, state, params, **({"value": value} if extra.get("value") else {}))
        params = optax.apply_updates(params, updates)
    return params


def _assert_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# adaopt.lookahead runs optax.lookahead's step: one optimizer of each kind of state shows it
# (per-coordinate, a scalar step size, the parameters needed, a delayed start, partitioned groups).
WITHOUT_VALUE = [adaopt.REGISTRY[n] for n in ("adam", "sgd", "prodigy", "schedule_free_adamw", "adopt", "muon")]
NEEDS_VALUE = [s for s in adaopt.REGISTRY.values() if Capability.NEEDS_VALUE in s.capabilities]


@pytest.mark.parametrize("spec", WITHOUT_VALUE, ids=lambda s: s.name)
def test_matches_optax_lookahead(spec: OptimizerSpec) -> None:
    """Bit for bit, for optimizers that need no loss (which optax.lookahead can wrap)."""
    # A Capability.DELAYED_START optimizer's first updates are zero: run past them.
    steps = STEPS + 6 if Capability.DELAYED_START in spec.capabilities else STEPS
    ours = _run(adaopt.lookahead(spec.make(), SYNC, ALPHA), steps)
    _assert_equal(ours, _run(optax.lookahead(spec.make(), SYNC, ALPHA), steps))
    assert not np.array_equal(ours.slow["w"], _params()["w"])  # the slow parameters moved


def test_matches_optax_lookahead_with_reset_state() -> None:
    tx = lambda: optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    _assert_equal(
        _run(adaopt.lookahead(tx(), SYNC, ALPHA, reset_state=True)),
        _run(optax.lookahead(tx(), SYNC, ALPHA, reset_state=True)),
    )


@pytest.mark.parametrize("spec", NEEDS_VALUE, ids=lambda s: s.name)
def test_passes_value_to_the_fast_optimizer(spec: OptimizerSpec) -> None:
    """Before the first synchronisation, the fast parameters follow the plain optimizer given the
    same losses; at it, the slow ones move ``ALPHA`` of the way to them."""
    start = _params()
    fast = start
    tx = spec.make()
    state = tx.init(fast)
    for _ in range(SYNC):
        value, grads = jax.value_and_grad(_loss)(fast)
        updates, state = tx.update(grads, state, fast, value=value)
        fast = optax.apply_updates(fast, updates)
    ours = _run(adaopt.lookahead(spec.make(), SYNC, ALPHA), steps=SYNC, value=True)
    want = jax.tree.map(lambda s, f: s + ALPHA * (f - s), start, fast)
    for got, expected in ((ours.slow, want), (ours.fast, want)):
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7), got, expected)
    assert not np.allclose(ours.slow["w"], start["w"])


def test_refuses_bad_arguments_when_built() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"sync_period must be an integer in \[1, "):
        adaopt.lookahead(adaopt.sgd(), 0, ALPHA)
    with pytest.raises(adaopt.HyperparameterError, match=r"slow_step_size must be a finite number in \[0.0, 1.0\]"):
        adaopt.lookahead(adaopt.sgd(), SYNC, 1.5)


def test_plain_parameters_are_a_clear_error() -> None:
    """A plain tree where the fast and slow parameters belong names optax.LookaheadParams (optax's own failed on an
    attribute of the dict)."""
    tx = adaopt.lookahead(adaopt.sgd(0.1), SYNC, ALPHA)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"LookaheadParams\.init_synced"):
        tx.init(params)
    state = tx.init(optax.LookaheadParams.init_synced(params))
    with pytest.raises(TypeError, match="got dict"):
        tx.update(params, state, params)


# What the module's docstring says of optax's wrappers, around an optimizer that needs value=.

POLYAK = adaopt.polyak_sgd
PASS_VALUE_ON: dict[str, Callable[[], optax.GradientTransformation]] = {
    "chain": lambda: optax.chain(optax.clip(1.0), POLYAK()),
    "named_chain": lambda: optax.named_chain(("polyak", POLYAK())),
    "MultiSteps": lambda: optax.MultiSteps(POLYAK(), every_k_schedule=1),
    "apply_if_finite": lambda: optax.apply_if_finite(POLYAK(), max_consecutive_errors=2),
    "masked": lambda: optax.masked(POLYAK(), {"w": True, "v": True}),
    "partition": lambda: optax.partition({"a": POLYAK()}, {"w": "a", "v": "a"}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(POLYAK)(),
    "flatten": lambda: optax.flatten(POLYAK()),
    "with_extra_args_support": lambda: optax.with_extra_args_support(POLYAK()),
    "contrib.schedule_free": lambda: optax.contrib.schedule_free(POLYAK(), 1.0),
    "contrib.mechanize": lambda: optax.contrib.mechanize(POLYAK()),
    "adaopt.polynomial_decay_averaging": lambda: adaopt.polynomial_decay_averaging(POLYAK()),
}


@pytest.mark.parametrize("make", PASS_VALUE_ON.values(), ids=PASS_VALUE_ON.keys())
def test_optax_wrappers_that_pass_value_on(make: Callable[[], optax.GradientTransformation]) -> None:
    """polyak_sgd raises without the loss: a wrapper that dropped value= would fail here."""
    params = _params()
    tx = make()
    value, grads = jax.value_and_grad(_loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params, value=value)
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


def test_optax_lookahead_takes_no_value() -> None:
    """If optax's lookahead learns to pass value=, adaopt.lookahead's docstring must say so."""
    params = optax.LookaheadParams.init_synced(_params())
    tx = optax.lookahead(POLYAK(), SYNC, ALPHA)
    with pytest.raises(TypeError, match="value"):
        tx.update(_params(), tx.init(params), params, value=jnp.asarray(1.0))


# Step for step against pytorch_optimizer.Lookahead (pullback_momentum="none"), around torch.optim.AdamW
# and SGD with momentum. Its model holds the fast weights, which are optax's params.fast at every step
# (after a synchronisation both are the new slow weights); its state's slow_params are params.slow.

PARITY_STEPS = 200
SHAPES = {"w": (7, 5), "b": (5,), "s": (), "conv": (3, 2, 2, 2)}
DECAYED = {"w": True, "b": False, "s": False, "conv": True}
INNER: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "AdamW": (
        lambda hp, mask: adaopt.adamw(
            hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], weight_decay_mask=mask
        ),
        lambda groups, hp: torch.optim.AdamW(groups, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"]),
    ),
    "SGD": (
        lambda hp, mask: adaopt.sgd(hp["lr"], hp["momentum"], weight_decay=hp["wd"], weight_decay_mask=mask),
        lambda groups, hp: torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"]),
    ),
}


def _draw_lookahead(inner: str, weight_decay: bool, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "k": int(rng.integers(2, 11)),
        "alpha": float(rng.uniform(0.2, 0.8)),
        "lr": float(np.exp(rng.uniform(np.log(3e-3), np.log(3e-2)))) * (1.0 if inner == "AdamW" else 3.0),
        "b1": float(rng.uniform(0.5, 0.99)),
        "b2": float(rng.uniform(0.9, 0.9999)),
        "eps": float(np.exp(rng.uniform(np.log(1e-8), np.log(1e-3)))),
        "momentum": float(rng.uniform(0.0, 0.95)),
        "wd": float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0,
    }


def _lookahead_adaopt(inner: str, hp: dict, params: dict, grads: dict) -> tuple[dict, dict]:
    """(fast, slow) parameter trajectories of adaopt.lookahead, in one compiled scan."""
    tx = adaopt.lookahead(INNER[inner][0](hp, DECAYED if hp["wd"] else None), hp["k"], hp["alpha"])

    @jax.jit
    def run(p: dict, gs: dict) -> optax.LookaheadParams:
        def step(carry: tuple, g: dict) -> tuple[tuple, optax.LookaheadParams]:
            p, s = carry
            updates, s = tx.update(g, s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        start = optax.LookaheadParams.init_synced(p)
        return jax.lax.scan(step, (start, tx.init(start)), gs)[1]

    trajectory = run(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    return jax.tree.map(np.asarray, trajectory.fast), jax.tree.map(np.asarray, trajectory.slow)


def _lookahead_torch(inner: str, hp: dict, params: dict, grads: dict) -> tuple[dict, dict]:
    """(the model's parameters, the state's slow_params) after each pytorch_optimizer.Lookahead step."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = [
        {"params": [tensors[k] for k in SHAPES if DECAYED[k]], "weight_decay": hp["wd"]},
        {"params": [tensors[k] for k in SHAPES if not DECAYED[k]], "weight_decay": 0.0},
    ]
    opt = pytorch_optimizer.Lookahead(
        INNER[inner][1](groups, hp), k=hp["k"], alpha=hp["alpha"], pullback_momentum="none"
    )
    fast: dict[str, list] = {k: [] for k in SHAPES}
    slow: dict[str, list] = {k: [] for k in SHAPES}
    for t in range(PARITY_STEPS):
        for k in SHAPES:
            tensors[k].grad = torch.tensor(grads[k][t])
        opt.step()
        for k in SHAPES:
            fast[k].append(tensors[k].numpy().copy())
            slow[k].append(opt.state[tensors[k]]["slow_params"].numpy().copy())
    return {k: np.stack(v) for k, v in fast.items()}, {k: np.stack(v) for k, v in slow.items()}


def _relative_error(ours: dict, theirs: dict) -> float:
    return max(float(np.max(np.abs(ours[k] - theirs[k])) / np.max(np.abs(theirs[k]))) for k in theirs)


LOOKAHEAD_CASES = [(np.float64, True), (np.float64, False), (np.float32, True)]
LOOKAHEAD_RUNS = [(inner, case, draw) for inner in INNER for case in LOOKAHEAD_CASES for draw in range(2)]


@pytest.mark.parametrize(
    ("inner", "case", "draw"),
    LOOKAHEAD_RUNS,
    ids=[f"{i}-{np.dtype(c[0]).name}-{'wd' if c[1] else 'nowd'}-{d}" for i, c, d in LOOKAHEAD_RUNS],
)
def test_matches_pytorch_optimizer_lookahead(inner: str, case: tuple, draw: int) -> None:
    dtype, weight_decay = case
    seed = zlib.crc32(f"lookahead/{inner}/{np.dtype(dtype).name}/{weight_decay}/{draw}".encode())
    hp = _draw_lookahead(inner, weight_decay, seed)
    rng = np.random.default_rng(seed + 1)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(PARITY_STEPS, *s)).astype(dtype) for k, s in SHAPES.items()}
    with jax.enable_x64(dtype == np.float64):
        fast, slow = _lookahead_adaopt(inner, hp, params, grads)
    torch_fast, torch_slow = _lookahead_torch(inner, hp, params, grads)
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    assert fast["w"].dtype == dtype
    assert _relative_error(fast, torch_fast) <= tolerance, f"fast weights, {hp}"
    assert _relative_error(slow, torch_slow) <= tolerance, f"slow weights, {hp}"
    # The slow weights move only at synchronisations, where the fast ones restart from them (up to
    # rounding: optax computes the two from the same difference by two formulas).
    synced = np.arange(hp["k"] - 1, PARITY_STEPS, hp["k"])
    np.testing.assert_allclose(slow["w"][synced], fast["w"][synced], rtol=tolerance, atol=tolerance)
    assert not np.allclose(slow["w"][synced[0]], params["w"])
    between = slow["w"][synced[0] : synced[1]]
    np.testing.assert_array_equal(between, np.broadcast_to(between[0], between.shape))


def test_the_lookahead_comparison_sees_alpha() -> None:
    """alpha off by 0.05 on one side fails it: the synchronisations are compared, not only the fast steps."""
    hp = _draw_lookahead("SGD", True, 0)
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(PARITY_STEPS, *s)) for k, s in SHAPES.items()}
    with jax.enable_x64(True):
        fast, slow = _lookahead_adaopt("SGD", {**hp, "alpha": hp["alpha"] + 0.05}, params, grads)
    torch_fast, torch_slow = _lookahead_torch("SGD", hp, params, grads)
    assert _relative_error(slow, torch_slow) > 1e-3 and _relative_error(fast, torch_fast) > 1e-3


def _lookahead_run(tx: optax.GradientTransformation, params: Any, steps: int) -> tuple[Any, Any, list]:
    """``steps`` jitted steps of ``tx`` on lookahead parameters, the gradients taken at the fast weights."""
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state, updates = tx.init(params), []
    for t in range(steps):
        grads = jax.tree.map(lambda x: (x + t).astype(x.dtype), jax.grad(_loss)(params.fast))
        u, state = step(grads, state, params)
        params = optax.apply_updates(params, u)
        updates.append((grads, u))
    return params, state, updates


def test_monitor_and_master_weights_take_lookahead_parameters() -> None:
    """Around lookahead the gradients are the fast weights' and the parameters a LookaheadParams: the monitor measured
    them against each other (a tree mismatch at the first update) and master_weights cast the gradients by them. The
    monitor now records the fast weights' updates, its updates lookahead's own; master_weights on bfloat16 keeps
    float32 copies of both weights that follow lookahead on float32, and returns the parameters rounded from them."""
    params = {"w": jnp.asarray([[0.5, -1.0], [2.0, 0.3]]), "v": jnp.asarray([1.0, -0.5])}
    synced = optax.LookaheadParams.init_synced(params)
    inner = lambda: adaopt.lookahead(adaopt.adamw(1e-2, weight_decay=0.1), SYNC, ALPHA)
    plain, _, _ = _lookahead_run(inner(), synced, STEPS)

    monitored, state, updates = _lookahead_run(adaopt.monitor(inner(), every=1), synced, STEPS)
    grads, last = updates[-1]
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(monitored), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    records = adaopt.read_records(state)
    np.testing.assert_allclose(records["grad_norm"], float(optax.tree.norm(grads)), rtol=1e-6)
    np.testing.assert_allclose(records["update_norm"], float(optax.tree.norm(last.fast)), rtol=1e-6)

    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), synced)
    rounded, state, _ = _lookahead_run(adaopt.master_weights(inner()), half, STEPS)
    for master, full, out in zip(
        jax.tree.leaves(state.master), jax.tree.leaves(plain), jax.tree.leaves(rounded), strict=True
    ):
        np.testing.assert_allclose(np.asarray(master), np.asarray(full), rtol=2e-2)  # gradients at bfloat16 weights
        np.testing.assert_array_equal(np.asarray(out), np.asarray(master.astype(jnp.bfloat16)))
