"""Shampoo against pytorch_optimizer.ScalableShampoo, step for step, and what it does with every kind of leaf.

The reference's Newton iteration adds a ridge proportional to the largest eigenvalue, which its
power iteration estimates from ``torch.randn``: when the two largest eigenvalues are close, 100
iterations leave an estimate that depends on the start (a relative difference of 1e-10 in the
trajectory). The test patches the reference's ``power_iteration``, from its own source, to start
from adaopt's fixed vector. An inverse root is a function of the matrix, not of the choice of its
eigenvectors, so repeated eigenvalues need no care here (unlike SOAP's eigenbases).
"""

from __future__ import annotations

import functools
import inspect
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
import torch
from pytorch_optimizer.optimizer.utils import matrix as matrix_module
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting
from pytorch_optimizer.optimizer.utils.partition import PreConditionerType

import adaopt
from adaopt._src.preconditioned import shampoo as shampoo_module
from tests import parity, problems

SPEC = adaopt.REGISTRY["shampoo"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
BLOCK = 4
# With block_size 4: the matrix merges to (1, 6, 5) in blocks of 4 (4 blocks, 12 statistics); the bias
# (5,) to (1, 5) in two blocks; the scalar and a short vector (3,) merge into one axis (no
# preconditioner); the 3-d tensor stays (2, 3, 4); the last leaf has an axis of 12 (blocks of 4).
SHAPES = {"w": (6, 5), "b": (5,), "v": (3,), "s": (), "t": (2, 3, 4), "e": (12, 4)}
DECAY_MASK = {"w": True, "b": False, "v": False, "s": False, "t": True, "e": True}
GRAFTS = {
    "none": LayerWiseGrafting.NONE,
    "sgd": LayerWiseGrafting.SGD,
    "adagrad": LayerWiseGrafting.ADAGRAD,
    "rmsprop": LayerWiseGrafting.RMSPROP,
    "sqrtn": LayerWiseGrafting.SQRTN,
}
AXES = {"all": PreConditionerType.ALL, "input": PreConditionerType.INPUT, "output": PreConditionerType.OUTPUT}


@contextmanager
def _power_iteration_from_adaopts_start() -> Iterator[None]:
    """The reference's ``power_iteration``, from its source, starting from adaopt's vector instead of torch.randn."""
    original = matrix_module.power_iteration
    source = inspect.getsource(original)
    random_start = "torch.randn(mat_g.shape[0], dtype=mat_g.dtype, device=mat_g.device)"
    assert source.count(random_start) == 1, "pytorch_optimizer's power_iteration changed: review this patch"
    namespace = dict(vars(matrix_module))
    namespace["_start"] = shampoo_module._power_iteration_start
    fixed_start = "torch.tensor(_start(mat_g.shape[0]), dtype=mat_g.dtype, device=mat_g.device)"
    exec(source.replace(random_start, fixed_start), namespace)
    matrix_module.power_iteration = namespace["power_iteration"]
    try:
        yield
    finally:
        matrix_module.power_iteration = original


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp: dict[str, Any] = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["start_preconditioning_step"] = int(rng.integers(1, 30))
    hp["preconditioning_compute_steps"] = int(rng.integers(1, 12))
    return hp


def _torch(hp: dict, params: dict, grads: dict, lr: Any, mask: dict | None, options: dict) -> dict:
    """``pytorch_optimizer.ScalableShampoo``, the decayed leaves in a group of their own; ``lr``: a schedule or None."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = parity.decay_groups(tensors, hp["weight_decay"], mask)
    options = dict(options)
    graft = GRAFTS[options.pop("graft", "sgd")]
    axes = AXES[options.pop("preconditioned_axes", "all")]
    use_svd = options.pop("root_method", "newton") == "eigh"
    opt = pytorch_optimizer.ScalableShampoo(
        groups, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]),
        matrix_eps=hp["matrix_eps"], diagonal_eps=hp["diagonal_eps"],
        start_preconditioning_step=hp["start_preconditioning_step"],
        preconditioning_compute_steps=hp["preconditioning_compute_steps"], block_size=BLOCK, graft_type=graft,
        pre_conditioner_type=axes, use_svd=use_svd, **options,
    )  # fmt: skip
    return parity._torch_trajectory(opt, tensors, hp["learning_rate"] if lr is None else lr, grads)


def _adaopt(hp: dict, lr: Any, mask: dict | None, options: dict) -> optax.GradientTransformation:
    return adaopt.shampoo(
        hp["learning_rate"] if lr is None else lr, hp["b1"], hp["b2"], hp["weight_decay"], weight_decay_mask=mask,
        matrix_eps=hp["matrix_eps"], diagonal_eps=hp["diagonal_eps"],
        start_preconditioning_step=hp["start_preconditioning_step"],
        preconditioning_compute_steps=hp["preconditioning_compute_steps"], block_size=BLOCK, **options,
    )  # fmt: skip


# (name, options, weight decay, schedule, dtype); graft='none' is the original Shampoo's test below
CASES = [
    ("sgd-newton", {}, True, True, np.float64),
    ("adagrad-eigh-input-skips", {"graft": "adagrad", "root_method": "eigh", "preconditioned_axes": "input",
                                  "shape_interpretation": False, "skip_preconditioning_rank_lt": 3,
                                  "no_preconditioning_for_layers_with_dim_gt": 10}, False, False, np.float64),
    ("rmsprop-average-decoupled-output", {"graft": "rmsprop", "moving_average_for_momentum": True, "nesterov": False,
                                          "decoupled_weight_decay": True, "preconditioned_axes": "output",
                                          "statistics_compute_steps": 2, "inverse_exponent_override": 2}, True, True, np.float64),
    ("sqrtn-average-nesterov-rate-inside-decoupled-decay", {"graft": "sqrtn", "moving_average_for_momentum": True,
                                                            "decoupled_learning_rate": False,
                                                            "decoupled_weight_decay": True}, True, True, np.float64),
]  # fmt: skip
# float32 runs once, against the original Shampoo (test_matches_pytorch_optimizer_Shampoo): the reference costs
# about 3 s per 200 steps, and the float32 rounding of the grafted steps is no different here.


@pytest.mark.parametrize(
    ("name", "options", "weight_decay", "schedule", "dtype"),
    CASES,
    ids=[
        f"{c[0]}-{'wd' if c[2] else 'nowd'}-{'schedule' if c[3] else 'constant'}-{np.dtype(c[4]).name}" for c in CASES
    ],
)
def test_matches_pytorch_optimizer_ScalableShampoo(
    name: str, options: dict, weight_decay: bool, schedule: bool, dtype: Any
) -> None:
    seed = zlib.crc32(f"shampoo/{name}/{weight_decay}/{schedule}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    mask = DECAY_MASK if weight_decay else None
    peak = hp["learning_rate"]
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        # optax evaluates a schedule in float32 at an int32 count: both sides evaluate it in the case's dtype.
        rate = (lambda c: lr(jnp.asarray(c, dtype))) if lr else None
        ours = parity.run_adaopt(_adaopt(hp, rate, mask, options), params, grads)
        with _power_iteration_from_adaopts_start():
            theirs = _torch(hp, params, grads, rate, mask, options)
    for k in SHAPES:
        assert ours[k].dtype == dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


# pytorch_optimizer.Shampoo (the original algorithm) at its defaults: momentum 0, no weight decay, roots every step.
ORIGINAL = next(ref for ref in SPEC.references if ref.name == "pytorch_optimizer.Shampoo")


@pytest.mark.parametrize(("schedule", "dtype"), [(True, np.float64), (False, np.float32)], ids=["float64", "float32"])
def test_matches_pytorch_optimizer_Shampoo(schedule: bool, dtype: Any) -> None:
    """Full-matrix statistics summed from matrix_eps * I, 1-d leaves with a full one (the power -1/2), 0-d leaves SGD's."""
    seed = zlib.crc32(f"shampoo/original/{np.dtype(dtype).name}".encode())
    rng = np.random.default_rng(seed)
    lr = float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-2))))
    # float32 resolves a ridge of matrix_eps on statistics of order 1 only above its rounding (1.2e-7): a smaller
    # one is lost in the sums, and the roots of the near-null directions then amplify rounding on either side.
    matrix_eps = float(10 ** rng.uniform(-8, -4) if dtype == np.float64 else 10 ** rng.uniform(-5, -4))
    params, grads = parity.random_problem({"w": (6, 5), "b": (5,), "s": (), "t": (2, 3, 4)}, seed + 1, dtype)
    schedule_fn = optax.warmup_cosine_decay_schedule(0.0, lr, 20, parity.STEPS, lr / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        rate = (lambda c: schedule_fn(jnp.asarray(c, dtype))) if schedule_fn else lr
        tx = adaopt.shampoo(rate, **ORIGINAL.adaopt_kwargs({"matrix_eps": matrix_eps}))
        ours = parity.run_adaopt(tx, params, grads)
        tensors = {k: torch.tensor(v) for k, v in params.items()}
        names = sorted(tensors)
        opt = pytorch_optimizer.Shampoo([tensors[k] for k in names], lr=lr, matrix_eps=matrix_eps)
        theirs: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for t in range(parity.STEPS):
            for group in opt.param_groups:
                group["lr"] = float(rate(t)) if callable(rate) else lr
            for k in names:
                tensors[k].grad = torch.tensor(grads[k][t])
            opt.step()
            for k in names:
                theirs[k].append(tensors[k].detach().numpy().copy())
    trajectory = {k: np.stack(v) for k, v in theirs.items()}
    error = parity.relative_error(ours, trajectory)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


def test_the_comparison_is_sharp() -> None:
    """A b2 off by 1e-4 fails it; the unpatched reference (a random start of its power iteration) agrees to 1e-8."""
    hp = {**_draw(5, True), "start_preconditioning_step": 3, "preconditioning_compute_steps": 2}
    params, grads = parity.random_problem(SHAPES, 6, np.float64, steps=40)
    with jax.enable_x64(True):
        off = parity.run_adaopt(_adaopt({**hp, "b2": hp["b2"] - 1e-4}, None, None, {}), params, grads)
        ours = parity.run_adaopt(_adaopt(hp, None, None, {}), params, grads)
    with _power_iteration_from_adaopts_start():
        theirs = _torch(hp, params, grads, None, None, {})
    assert parity.relative_error(off, theirs) > 1e-8
    torch.manual_seed(0)
    assert parity.relative_error(ours, _torch(hp, params, grads, None, None, {})) < 1e-8


# What each kind of leaf does.


def _statistic_shapes(tx: optax.GradientTransformation, params: dict) -> dict[str, list[tuple[int, ...]]]:
    state = next(
        s for s in jax.tree.leaves(tx.init(params), is_leaf=lambda x: isinstance(x, adaopt.ShampooState))
        if isinstance(s, adaopt.ShampooState)
    )  # fmt: skip
    return {k: [x.shape for x in v] for k, v in zip(sorted(params), state.statistics, strict=True)}


def test_each_kind_of_leaf_gets_its_statistics() -> None:
    params = {
        "w": jnp.ones((6, 5)), "b": jnp.ones(5), "s": jnp.ones(()), "t": jnp.ones((2, 3, 4)),
        "embed": jnp.ones((100, 4)), "empty": jnp.ones((0, 3)),
    }  # fmt: skip
    # Merging with block_size 4: (6, 5) -> (1, 6, 5), blocks of (1, 4|2, 4|1); (5,) -> (1, 5), blocks of (1, 4|1);
    # a 0-d leaf has none; (2, 3, 4) -> (2, 3, 4); the embedding's 100 > 50: none.
    merged = adaopt.shampoo(block_size=4, no_preconditioning_for_layers_with_dim_gt=50)
    assert _statistic_shapes(merged, params) == {
        "w": [(1, 1), (4, 4), (4, 4), (1, 1), (4, 4), (1, 1), (1, 1), (2, 2), (4, 4), (1, 1), (2, 2), (1, 1)],
        "b": [(1, 1), (4, 4), (1, 1), (1, 1)], "s": [], "t": [(2, 2), (3, 3), (4, 4)], "embed": [], "empty": [],
    }  # fmt: skip
    # Without merging: a 1-d leaf has none; the default block_size (512) keeps every axis whole; "input" skips the last.
    whole = adaopt.shampoo(shape_interpretation=False, preconditioned_axes="input")
    assert _statistic_shapes(whole, params) == {
        "w": [(6, 6)], "b": [], "s": [], "t": [(2, 2), (3, 3)], "embed": [(100, 100)], "empty": [],
    }  # fmt: skip
    # precondition_1d (the original Shampoo's full matrix for a vector); a 0-d leaf still has none.
    vectors = adaopt.shampoo(shape_interpretation=False, precondition_1d=True)
    assert _statistic_shapes(vectors, {"b": jnp.ones(5), "s": jnp.ones(())}) == {"b": [(5, 5)], "s": []}
    # At the defaults (block_size 512), the axes of a small matrix merge into one: no preconditioner.
    assert _statistic_shapes(adaopt.shampoo(), {"w": jnp.ones((6, 5))}) == {"w": []}


def test_leaves_without_a_preconditioner_take_the_grafting_methods_step() -> None:
    """AdaGrad grafting with momentum: the step of a 1-d leaf is AdaGrad's direction under Nesterov momentum."""
    params, grads = parity.random_problem({"b": (5,)}, 11, np.float64, steps=20)
    lr, b1, eps = 1e-2, 0.9, 1e-10
    with jax.enable_x64(True):
        ours = parity.run_adaopt(adaopt.shampoo(lr, b1, graft="adagrad", diagonal_eps=eps), params, grads)
    p, accumulator, momentum = params["b"].copy(), np.zeros(5), np.zeros(5)
    for t in range(20):
        g = grads["b"][t]
        accumulator += g * g
        d = g / (np.sqrt(accumulator) + eps)
        momentum = b1 * momentum + d
        p = p - lr * (b1 * momentum + d)
        np.testing.assert_allclose(ours["b"][t], p, rtol=1e-12)


def test_newton_and_eigh_give_the_inverse_root() -> None:
    with jax.enable_x64(True):
        rng = np.random.default_rng(12)
        a = rng.normal(size=(6, 9))
        s = jnp.asarray(a @ a.T)
        values, vectors = np.linalg.eigh(np.asarray(s))
        exact = (vectors * values ** (-1 / 4)) @ vectors.T
        np.testing.assert_allclose(np.asarray(shampoo_module.inverse_root_eigh(s, 4)), exact, rtol=1e-9, atol=1e-12)
        newton = shampoo_module.inverse_root_newton(s, 4, 0.0, tolerance=1e-12)
        np.testing.assert_allclose(np.asarray(newton), exact, rtol=1e-6, atol=1e-9)


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"Shampoo does not take complex parameters.*\['w'\]"):
        adaopt.shampoo().init({"w": jnp.ones((3, 3), jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"graft": "adam"}, "graft"), ({"root_method": "svd"}, "root_method"),
        ({"preconditioned_axes": "left"}, "preconditioned_axes"), ({"block_size": 0}, "block_size"),
        ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
        ({"preconditioning_compute_steps": 1.5}, "preconditioning_compute_steps"), ({"b2": 1.0}, "b2"),
        ({"matrix_eps": -1.0}, "matrix_eps"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.shampoo(**kwargs)


@pytest.mark.parametrize("graft", ["rmsprop", "adagrad"])
def test_stored_momenta_and_grafting_accumulator_train_as_float32(graft: str) -> None:
    """Both momenta and the grafting's accumulator in 8-bit blocks (small ones, so that the matrix's are quantized
    too) end within 1% of float32's loss, through the roots' recomputations, and the state holds them stored."""
    blocks = adaopt.Blockwise("dynamic8", block_size=64, min_size=64)
    make = functools.partial(
        adaopt.shampoo, 3e-2, graft=graft, start_preconditioning_step=5, preconditioning_compute_steps=5
    )
    plain, _ = problems.least_squares_run(make())
    light, state = problems.least_squares_run(make(mu_dtype=blocks, nu_dtype=blocks))
    stored = [x for x in jax.tree.leaves(state, is_leaf=adaopt.is_stored) if isinstance(x, adaopt.Quantized)]
    assert len(stored) == 6  # two leaves, three moments each
    assert float(plain[-1]) < 0.2 * float(plain[0])
    assert abs(float(light[-1]) / float(plain[-1]) - 1) < 0.01, (float(light[-1]), float(plain[-1]))
