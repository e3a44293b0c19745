"""Sophia against the authors' SophiaG and pytorch-optimizer's SophiaH, step for step; the Hessian estimators.

SophiaG (sophia-opt) takes its estimate as ``p.grad`` at ``update_hessian()``: both sides get the
same sampled gradients :math:`\\hat g` (adaopt the estimate :math:`B \\hat g^2`, as
:func:`adaopt.gnb_hessian_diagonal` returns it) every ``update_interval`` steps, on random
gradients. SophiaH draws its Hutchinson vectors from torch's RNG: the test makes its draw return
the vectors of :func:`adaopt.hutchinson_hessian_diagonal` (by its documented recipe), and both
sides run a real nonlinear loss, each at its own iterates, SophiaH with its own Hessian-vector
products through ``loss.backward(create_graph=True)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import sophia_opt
import torch

import adaopt
from benchmarks import learning_rates
from tests import parity

SPEC = adaopt.REGISTRY["sophia"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
BATCH = 256  # SophiaG's bs


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp: dict[str, Any] = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = learning_rates.TUNED["sophia"] * float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["update_interval"] = int(rng.integers(1, 11))
    return hp


def _schedule(hp: dict, dtype: Any, schedule: bool) -> tuple[Any, list[float] | None]:
    """adaopt's learning rate (a schedule evaluated in the case's dtype) and torch's per-step values. Call under x64."""
    if not schedule:
        return hp["learning_rate"], None
    peak = hp["learning_rate"]
    base = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10)
    rate = lambda count: base(jnp.asarray(count, dtype))
    return rate, [float(rate(t)) for t in range(parity.STEPS)]


def _groups(tensors: dict, hp: dict) -> list[dict[str, Any]]:
    names = sorted(tensors)
    return [
        {"params": [tensors[k] for k in names if parity.DECAY_MASK[k]], "weight_decay": hp["weight_decay"]},
        {"params": [tensors[k] for k in names if not parity.DECAY_MASK[k]], "weight_decay": 0.0},
    ]


# SophiaG: the same estimates, random gradients.

G_CASES = [(False, np.float64, False), (True, np.float64, True), (True, np.float32, False)]


def _sophia_g_problem(seed: int, dtype: Any) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in parity.SHAPES.items()}
    grads = {k: rng.normal(size=(parity.STEPS, *s)).astype(dtype) for k, s in parity.SHAPES.items()}
    sampled = {k: (0.1 * rng.normal(size=(parity.STEPS, *s))).astype(dtype) for k, s in parity.SHAPES.items()}
    return params, grads, sampled


def _run_with_estimates(tx: optax.GradientTransformation, params: dict, grads: dict, estimates: dict) -> dict:
    """The trajectory, the estimate of step t given as ``hessian=`` a function (evaluated every update_interval)."""

    def step(carry: tuple, inputs: tuple) -> tuple[tuple, dict]:
        p, s = carry
        g, estimate = inputs
        updates, s = tx.update(g, s, p, hessian=lambda _: estimate)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p: dict, gs: dict, es: dict) -> dict:
        return jax.lax.scan(step, (p, tx.init(p)), (gs, es))[1]

    return jax.tree.map(np.asarray, run(params, grads, estimates))


def _sophia_g(hp: dict, params: dict, grads: dict, sampled: dict, rates: list[float] | None) -> dict:
    names = sorted(params)
    tensors = {k: torch.tensor(params[k]) for k in names}
    opt = sophia_opt.SophiaG(
        _groups(tensors, hp), lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), rho=hp["gamma"],
        weight_decay=hp["weight_decay"],
    )  # fmt: skip
    trajectory: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for t in range(parity.STEPS):
        for group in opt.param_groups:
            group["lr"] = rates[t] if rates else hp["learning_rate"]
        if t % hp["update_interval"] == 0:  # the authors refresh after step t - 1: the same for step t
            for k in names:
                tensors[k].grad = torch.tensor(sampled[k][t])
            opt.update_hessian()
        for k in names:
            tensors[k].grad = torch.tensor(grads[k][t])
        opt.step(bs=BATCH)
        for k in names:
            trajectory[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def _adaopt_g(hp: dict, lr: Any, **overrides: Any) -> optax.GradientTransformation:
    kwargs = {
        "b1": hp["b1"], "b2": hp["b2"], "gamma": hp["gamma"], "eps": 1e-15, "eps_mode": "add", "clip": 1.0,
        "weight_decay": hp["weight_decay"], "update_interval": hp["update_interval"],
        "weight_decay_mask": parity.DECAY_MASK, **overrides,
    }  # fmt: skip
    return adaopt.sophia(lr, **kwargs)


@pytest.mark.parametrize(("weight_decay", "dtype", "schedule"), G_CASES, ids=lambda x: str(getattr(x, "__name__", x)))
def test_matches_sophia_opt_SophiaG(weight_decay: bool, dtype: Any, schedule: bool) -> None:
    seed = zlib.crc32(f"sophia/SophiaG/{weight_decay}/{np.dtype(dtype).name}/{schedule}".encode())
    hp = _draw(seed, weight_decay)
    params, grads, sampled = _sophia_g_problem(seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        lr, rates = _schedule(hp, dtype, schedule)
        estimates = {k: BATCH * jnp.asarray(v) ** 2 for k, v in sampled.items()}  # gnb_hessian_diagonal's B g^2
        ours = _run_with_estimates(_adaopt_g(hp, lr), params, grads, estimates)
        signs = _run_with_estimates(_adaopt_g(hp, lr, update_interval=10**6), params, grads, estimates)
    theirs = _sophia_g(hp, params, grads, sampled, rates)
    for k in parity.SHAPES:
        assert ours[k].dtype == dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2, "the reference barely moved the parameters"
    assert parity.relative_error(ours, theirs) <= TOLERANCE[dtype], hp
    # The estimates matter: refreshed only at the first step, the trajectory is another one.
    assert parity.relative_error(signs, theirs) > 1e-3


# SophiaH: its own Hutchinson products on a real loss, its draws read from adaopt's vectors.

H_SHAPES = {"w": (4, 3), "b": (3,), "s": ()}
H_DECAY = {"w": True, "b": False, "s": False}


def _loss_terms(p: dict, x: Any, y: Any, tanh: Callable[[Any], Any]) -> Any:
    fit = tanh(x @ p["w"] + p["b"]) - y
    return (fit**2).mean() + 0.05 * (p["w"] ** 2).sum() * p["s"] ** 2 + 0.1 * p["s"] ** 4


def _h_problem(seed: int, dtype: Any) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in H_SHAPES.items()}
    data = {
        "x": rng.normal(size=(parity.STEPS, 8, 4)).astype(dtype),
        "y": rng.normal(size=(parity.STEPS, 8, 3)).astype(dtype),
    }
    return params, data


def _rademacher(key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
    return jax.random.rademacher(key, shape, jnp.int32).astype(dtype)


def _hutchinson_vectors(params: dict, key: jax.Array, num_samples: int, distribution: str) -> list[dict]:
    """The vectors of adaopt.hutchinson_hessian_diagonal, by its docstring's recipe."""
    sampler = _rademacher if distribution == "rademacher" else jax.random.normal
    return [optax.tree.random_like(k, params, sampler) for k in jax.random.split(key, num_samples)]


@contextmanager
def _torch_draws(queue: list[np.ndarray], distribution: str) -> Iterator[None]:
    """SophiaH's ``torch.randint_like(p, 0, 2) * 2 - 1`` (or ``torch.randn_like(p)``) returns the queue's next vector."""
    name = "randint_like" if distribution == "rademacher" else "randn_like"
    original = getattr(torch, name)

    def draw(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        z = torch.tensor(queue.pop(0), dtype=p.dtype)
        assert z.shape == p.shape
        return (z + 1) / 2 if distribution == "rademacher" else z

    setattr(torch, name, draw)
    try:
        yield
    finally:
        setattr(torch, name, original)


H_CASES = [
    ("rademacher", 1, False, True, np.float64, False),
    ("gaussian", 2, True, True, np.float64, True),
    ("rademacher", 1, True, False, np.float64, False),
    ("rademacher", 2, True, True, np.float32, False),
]


@pytest.mark.parametrize(("distribution", "num_samples", "weight_decay", "decoupled", "dtype", "schedule"), H_CASES)
def test_matches_pytorch_optimizer_SophiaH(
    distribution: str, num_samples: int, weight_decay: bool, decoupled: bool, dtype: Any, schedule: bool
) -> None:
    seed = zlib.crc32(f"sophia/SophiaH/{distribution}/{weight_decay}/{decoupled}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, data = _h_problem(seed + 1, dtype)
    key = jax.random.key(seed % 2**31)
    interval = hp["update_interval"]
    with jax.enable_x64(dtype == np.float64):
        lr, rates = _schedule(hp, dtype, schedule)
        tx = adaopt.sophia(
            lr, hp["b1"], hp["b2"], 1.0, hp["eps"], hp["weight_decay"], clip=hp["clip"], update_interval=interval,
            weight_decay_mask=H_DECAY, decoupled_weight_decay=decoupled,
        )  # fmt: skip

        def step(carry: tuple, inputs: tuple) -> tuple[tuple, dict]:
            p, s = carry
            x, y, t = inputs
            loss = lambda q: _loss_terms(q, x, y, jnp.tanh)
            estimate = lambda q: adaopt.hutchinson_hessian_diagonal(
                loss, q, jax.random.fold_in(key, t), num_samples=num_samples, distribution=distribution
            )
            updates, s = tx.update(jax.grad(loss)(p), s, p, hessian=estimate)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        run = jax.jit(
            lambda p: jax.lax.scan(step, (p, tx.init(p)), (data["x"], data["y"], jnp.arange(parity.STEPS)))[1]
        )
        ours = jax.tree.map(np.asarray, run(params))
        # The vectors SophiaH reads at its refreshes, in its order: sample by sample, its parameters in group order.
        order = [k for decayed in (True, False) for k in sorted(H_SHAPES) if H_DECAY[k] == decayed]
        queue = [
            np.asarray(z[k])
            for t in range(0, parity.STEPS, interval)
            for z in _hutchinson_vectors(params, jax.random.fold_in(key, t), num_samples, distribution)
            for k in order
        ]

    tensors = {k: torch.tensor(params[k], requires_grad=True) for k in H_SHAPES}
    groups = [
        {"params": [tensors[k] for k in order if H_DECAY[k]], "weight_decay": hp["weight_decay"]},
        {"params": [tensors[k] for k in order if not H_DECAY[k]], "weight_decay": 0.0},
    ]
    opt = pytorch_optimizer.SophiaH(
        groups, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), weight_decouple=decoupled, p=hp["clip"],
        update_period=interval, num_samples=num_samples, hessian_distribution=distribution, eps=hp["eps"],
    )  # fmt: skip
    theirs: dict[str, list[np.ndarray]] = {k: [] for k in H_SHAPES}
    with _torch_draws(queue, distribution):
        for t in range(parity.STEPS):
            for group in opt.param_groups:
                group["lr"] = rates[t] if rates else hp["learning_rate"]
            for tensor in tensors.values():
                tensor.grad = None
            loss = _loss_terms(tensors, torch.tensor(data["x"][t]), torch.tensor(data["y"][t]), torch.tanh)
            loss.backward(create_graph=True)
            opt.step()
            for k in H_SHAPES:
                theirs[k].append(tensors[k].detach().numpy().copy())
    assert not queue, "SophiaH drew another number of vectors than adaopt computed"
    stacked = {k: np.stack(v) for k, v in theirs.items()}
    moved = parity.relative_error(stacked, {k: np.broadcast_to(params[k], stacked[k].shape) for k in stacked})
    assert moved > 1e-2
    assert parity.relative_error(ours, stacked) <= TOLERANCE[dtype], hp


# The estimators.


def _quadratic(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a + a.T


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(distribution: str) -> None:
    """On a quadratic 0.5 p'Ap: the mean of 4000 estimates is diag(A) within 4 standard errors (the variance is
    sum_j!=i A_ij^2 for Rademacher vectors, plus 2 A_ii^2 for Gaussian ones)."""
    a = _quadratic(6, 0)
    with jax.enable_x64(True):
        loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
        keys = jax.random.split(jax.random.key(1), 4000)
        draws = np.asarray(
            jax.vmap(lambda k: adaopt.hutchinson_hessian_diagonal(loss, jnp.ones(6), k, distribution=distribution))(
                keys
            )
        )
    off_diagonal = (a**2).sum(axis=1) - np.diag(a) ** 2
    variance = off_diagonal + (2 * np.diag(a) ** 2 if distribution == "gaussian" else 0.0)
    standard_error = np.sqrt(variance / len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - np.diag(a)) <= 4 * standard_error)
    np.testing.assert_allclose(draws.var(axis=0), variance, rtol=0.15)  # the spread is the predicted one
    if distribution == "rademacher":  # a +-1 vector: z_i^2 = 1, so the estimate is A_ii + sum_j!=i A_ij z_i z_j
        assert not np.allclose(draws, np.diag(a))


def test_hutchinson_is_the_explicit_hessian_vector_product() -> None:
    """On a nonlinear loss of a tree: the mean of z * (H z) over the documented vectors, H from jax.hessian."""
    params, data = _h_problem(3, np.float64)
    with jax.enable_x64(True):
        loss = lambda p: _loss_terms(p, data["x"][0], data["y"][0], jnp.tanh)
        key = jax.random.key(4)
        estimate = adaopt.hutchinson_hessian_diagonal(loss, params, key, num_samples=3)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        hessian = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(flat))
        vectors = [
            np.asarray(jax.flatten_util.ravel_pytree(z)[0]) for z in _hutchinson_vectors(params, key, 3, "rademacher")
        ]
        assert all(set(np.unique(z)) == {-1.0, 1.0} for z in vectors)
        explicit = np.mean([z * (hessian @ z) for z in vectors], axis=0)
        np.testing.assert_allclose(
            np.asarray(jax.flatten_util.ravel_pytree(estimate)[0]), explicit, rtol=1e-12, atol=1e-14
        )


def test_gnb_is_the_batch_size_times_the_squared_sampled_gradient() -> None:
    """Softmax regression, logits X W: the sampled labels are jax.random.categorical's, the gradient
    X'(softmax - onehot)/B; and over many keys the mean is the Gauss-Newton diagonal mean_b x_bi^2 p_bj (1 - p_bj)."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(16, 3)), 0.5 * rng.normal(size=(3, 4))
    with jax.enable_x64(True):
        logits_fn = lambda v: jnp.asarray(x) @ v
        key = jax.random.key(6)
        estimate = np.asarray(adaopt.gnb_hessian_diagonal(logits_fn, jnp.asarray(w), key))
        labels = np.asarray(jax.random.categorical(key, logits_fn(jnp.asarray(w))))
        keys = jax.random.split(jax.random.key(7), 4000)
        draws = np.asarray(jax.vmap(lambda k: adaopt.gnb_hessian_diagonal(logits_fn, jnp.asarray(w), k))(keys))
    probs = np.exp(x @ w) / np.exp(x @ w).sum(axis=1, keepdims=True)
    grad = x.T @ (probs - np.eye(4)[labels]) / len(x)
    np.testing.assert_allclose(estimate, len(x) * grad**2, rtol=1e-10)
    gauss_newton = (x[:, :, None] ** 2 * (probs * (1 - probs))[:, None, :]).mean(axis=0)
    standard_error = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - gauss_newton) <= 4 * standard_error)


# How the estimate reaches the jitted step.


def test_a_hessian_function_runs_only_every_update_interval_calls() -> None:
    """Evaluated at counts 0, 3, 6 of 8 jitted calls (a debug callback counts the runs), compiled once;
    the EMA changes only there."""
    runs: list[int] = []
    traces = 0
    tx = adaopt.sophia(0.01, update_interval=3)

    def estimate(p: jax.Array) -> jax.Array:
        jax.debug.callback(lambda: runs.append(1))
        return 2.0 * jnp.ones_like(p)

    @jax.jit
    def step(p: jax.Array, s: Any) -> tuple[jax.Array, Any]:
        nonlocal traces
        traces += 1
        updates, s = tx.update(p - 1.0, s, p, hessian=estimate)
        return optax.apply_updates(p, updates), s

    params, state = jnp.zeros(3), tx.init(jnp.zeros(3))
    nus = []
    for _ in range(8):
        params, state = step(params, state)
        nus.append(float(optax.tree.get(state, "nu")[0]))
    jax.effects_barrier()
    assert traces == 1
    assert len(runs) == 3
    changed = [i for i in range(8) if nus[i] != (nus[i - 1] if i else 0.0)]
    assert changed == [0, 3, 6]


def test_without_an_estimate_the_step_is_the_clipped_sign() -> None:
    tx = adaopt.scale_by_sophia(clip=0.5)
    g = jnp.array([0.3, -2.0, 0.0])
    updates, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(np.asarray(updates), [0.5, -0.5, 0.0])
    assert float(jnp.sum(state.nu)) == 0.0


@pytest.mark.parametrize("eps_mode", ["max", "add"])
def test_a_zero_denominator_takes_the_clipped_sign_as_SophiaH(eps_mode: str) -> None:
    """eps = 0 with curvature estimates of 0 and, for "max" (SophiaH's form), negative ones: the denominator is 0
    there, and SophiaH's m / 0 clips to c sign(m). 50 steps, float64, estimates given to both sides."""
    rng = np.random.default_rng(7)
    steps, shape, lr, clip = 50, (6, 5), 0.01, 0.5
    grads = rng.normal(size=(steps, *shape))
    signs = rng.choice([-1.0, 0.0, 1.0] if eps_mode == "max" else [0.0, 1.0], size=(steps, *shape))
    estimates = np.abs(rng.normal(size=(steps, *shape))) * signs
    params = rng.normal(size=shape)
    with jax.enable_x64(True):
        tx = optax.chain(adaopt.scale_by_sophia(0.9, 0.99, gamma=1.0, eps=0.0, clip=clip, eps_mode=eps_mode),
                         optax.scale(-lr))  # fmt: skip
        p, state = jnp.asarray(params), tx.init(jnp.asarray(params))
        ours = []
        for t in range(steps):
            u, state = tx.update(jnp.asarray(grads[t]), state, p, hessian=jnp.asarray(estimates[t]))
            p = optax.apply_updates(p, u)
            ours.append(np.asarray(p))
    if eps_mode == "add":  # SophiaH floors; with no negative estimate, max(h, 0) and h + 0 agree
        assert (estimates >= 0).all()
    tensor = torch.tensor(params)
    opt = pytorch_optimizer.SophiaH([tensor], lr=lr, betas=(0.9, 0.99), p=clip, eps=0.0, update_period=1)
    for t in range(steps):
        tensor.grad = torch.tensor(grads[t])
        opt.step(hessian=[torch.tensor(estimates[t])])
        np.testing.assert_allclose(ours[t], tensor.numpy(), rtol=0, atol=1e-12)


def test_a_tree_estimate_refreshes_at_every_call_and_must_mirror_the_gradients() -> None:
    tx = adaopt.scale_by_sophia(b2=0.5, update_interval=100)
    g = {"w": jnp.ones(2)}
    _, state = tx.update(g, tx.init(g), hessian={"w": jnp.full(2, 4.0)})
    _, state = tx.update(g, state, hessian={"w": jnp.full(2, 4.0)})
    np.testing.assert_allclose(np.asarray(state.nu["w"]), [3.0, 3.0])
    with pytest.raises(adaopt.TreeMismatchError, match="Hessian estimates"):
        tx.update(g, state, hessian={"v": jnp.ones(2)})


def test_an_equinox_module_of_estimates_is_a_tree_though_callable() -> None:
    """Equinox parameters give an Equinox module of estimates (callable: the module's own ``__call__``): it refreshes
    the EMA as the same estimates in a plain tree do, where it was once called as a function of the parameters; a
    ``jax.tree_util.Partial`` holding arrays stays a function."""
    import equinox as eqx

    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = lambda p: jnp.sum(eqx.combine(p, static)(jnp.ones(3)) ** 2)
    grads = jax.grad(loss)(params)
    estimate = adaopt.hutchinson_hessian_diagonal(loss, params, jax.random.key(1))
    assert callable(estimate)
    tx = adaopt.sophia(1e-2, b2=0.5)
    updates, state = tx.update(grads, tx.init(params), params, hessian=estimate)
    plain = lambda module: {"weight": module.weight, "bias": module.bias}
    want, want_state = tx.update(plain(grads), tx.init(plain(params)), plain(params), hessian=plain(estimate))
    nu, want_nu = optax.tree.get(state, "nu"), optax.tree.get(want_state, "nu")
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(getattr(nu, name), want_nu[name])
        np.testing.assert_array_equal(getattr(updates, name), want[name])
    assert float(jnp.sum(nu.weight)) != 0.0
    # A function bound to arrays (a key) is still a function, called on the parameters.
    as_function = jax.tree_util.Partial(
        lambda key, p: adaopt.hutchinson_hessian_diagonal(loss, p, key), jax.random.key(1)
    )
    _, function_state = tx.update(grads, tx.init(params), params, hessian=as_function)
    np.testing.assert_array_equal(optax.tree.get(function_state, "nu").weight, nu.weight)


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"Sophia does not take complex parameters.*\['w'\]"):
        adaopt.sophia().init({"w": jnp.ones(3, jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"gamma": -1.0}, "gamma"), ({"clip": -0.5}, "clip"), ({"eps_mode": "floor"}, "eps_mode"),
        ({"update_interval": 0}, "update_interval"), ({"update_interval": 2.5}, "update_interval"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.sophia(**kwargs)
    with pytest.raises(adaopt.HyperparameterError, match="num_samples"):
        adaopt.hutchinson_hessian_diagonal(lambda p: jnp.sum(p), jnp.ones(2), jax.random.key(0), num_samples=0)
