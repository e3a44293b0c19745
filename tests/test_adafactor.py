"""Adafactor against transformers, torch and optax, by the arguments of :func:`adaopt.adafactor`'s table.

``tests/test_parity.py`` runs the registry's three references on its tree, in float64 with a masked
decay and a schedule and in float32 with neither: transformers with ``relative_step=False``, torch,
optax with ``min_dim_size_to_factor=4``. Here, on a tree of a 0-d, a 1-d, two 2-d, a 3-d and a 4-d
leaf, 200 steps each (relative error <= 1e-10 in float64, 1e-4 in float32): transformers' defaults,
which are the paper's and ``adafactor()``'s, with their statistics; its relative step with
``warmup_init``, ``beta1`` and ``scale_parameter=False``; torch's floors and machine epsilon, with
its statistics, and in float32 with a decay and a schedule; optax's two largest axes, first moment
and masked decay. optax computes its second-moment decay in float32 whatever the parameters'
dtype: in float64 it is compared unpatched (to that precision) and with that decay computed in
float64 (patched in by ``tests/references._optax_adafactor``). Then which axes are factored, the
comparison's sharpness, zero gradients and the errors for bad input.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adaopt
from tests import parity, references

SPEC = adaopt.REGISTRY["adafactor"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
# "big" and "cube" have two axes of at least 6 elements (optax factors them from min_dim_size_to_factor=6,
# "cube" along its axes 0 and 2); every leaf of two or more axes is factored by transformers and torch.
SHAPES = {**parity.SHAPES, "big": (12, 10), "cube": (9, 3, 8)}
MASK = {name: len(shape) >= 2 for name, shape in SHAPES.items()}
OPTAX_MIN_DIM = 6
TORCH_OPTIONS = {"eps_mode": "max", "weight_decay_mode": "learning_rate"}
ARGUMENTS = (
    "decay_rate",
    "clip_threshold",
    "b1",
    "eps",
    "eps_scale",
    "weight_decay",
    "relative_step",
    "scale_parameter",
)


def _draw(seed: int, weight_decay: bool, *, first_moment: bool = True) -> dict[str, Any]:
    """Valid hyperparameters from the registry's ranges, a weight decay, a first moment and a learning rate."""
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["b1"] = float(rng.uniform(0.5, 0.95)) if first_moment else None
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(3e-3), np.log(3e-2))))
    return hp


def _problem(seed: int, dtype: Any) -> tuple[dict, dict]:
    return parity.random_problem(SHAPES, seed, dtype)


def _torch(name: str, hp: dict, lr: Any, params: dict, grads: dict) -> dict:
    """The reference of tests/references.py, the masked leaves decayed through a parameter group."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    names = sorted(tensors)
    groups = [
        {"params": [tensors[k] for k in names if MASK[k]], "weight_decay": hp["weight_decay"]},
        {"params": [tensors[k] for k in names if not MASK[k]], "weight_decay": 0.0},
    ]
    return parity._torch_trajectory(references.TORCH[name](groups, hp), tensors, lr, grads)


def _adafactor(hp: dict, lr: Any, **options: Any) -> optax.GradientTransformation:
    return adaopt.adafactor(lr, **{k: hp[k] for k in ARGUMENTS if k in hp}, weight_decay_mask=MASK, **options)


def _ours(hp: dict, lr: Any, params: dict, grads: dict, **options: Any) -> dict:
    return parity.run_adaopt(_adafactor(hp, lr, **options), params, grads)


def _warmup_init(count: jax.Array) -> jax.Array:
    """transformers' warmup_init: the cap of the relative step grows as 1e-6 t (t = count + 1)."""
    return 1e-6 * (count + 1)


def _schedule(peak: float, dtype: Any) -> Any:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10)
    return lambda count: schedule(jnp.asarray(count, dtype))


def _assert_close(ours: dict, theirs: dict, params: dict, dtype: Any) -> None:
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    for k in theirs:
        assert ours[k].dtype == dtype
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


def _run(tx: optax.GradientTransformation, params: dict, grads: dict) -> tuple[dict, Any]:
    """``parity.run_adaopt``'s one compiled scan, which also returns the last state (its statistics)."""

    def step(carry: tuple, g: dict) -> tuple[tuple, dict]:
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p: dict, gs: dict) -> tuple[dict, Any]:
        (_, state), trajectory = jax.lax.scan(step, (p, tx.init(p)), gs)
        return trajectory, state

    trajectory, state = run(params, grads)
    return jax.tree.map(np.asarray, trajectory), optax.tree.get(state, "AdafactorState")


def _assert_statistics(state: Any, opt: torch.optim.Optimizer, tensors: dict, names: tuple[str, str, str]) -> None:
    """The reference's statistics after the run are ours: a whole second moment for the 0-d and 1-d leaves, a row
    and a column statistic of the last two axes (the leading ones a batch) for the others. torch keeps the reduced
    axis (as 1); transformers drops it, as adaopt."""
    for k, shape in SHAPES.items():
        theirs = {name: value.numpy() for name, value in opt.state[tensors[k]].items() if torch.is_tensor(value)}
        row, col, whole = names
        if len(shape) < 2:
            assert isinstance(state.v_row[k], optax.MaskedNode) and isinstance(state.v_col[k], optax.MaskedNode)
            np.testing.assert_allclose(state.v[k], theirs[whole], rtol=1e-10, err_msg=k)
            continue
        assert isinstance(state.v[k], optax.MaskedNode)
        assert state.v_row[k].shape == shape[:-1] and state.v_col[k].shape == (*shape[:-2], shape[-1])
        np.testing.assert_allclose(state.v_row[k], theirs[row].reshape(shape[:-1]), rtol=1e-10, err_msg=k)
        np.testing.assert_allclose(state.v_col[k], theirs[col].reshape(state.v_col[k].shape), rtol=1e-10, err_msg=k)


def test_the_paper_is_adafactor_and_transformers_at_their_defaults() -> None:
    """``adafactor()`` and ``transformers.optimization.Adafactor(params)``, nothing passed to either: the
    trajectories and the statistics."""
    from transformers.optimization import Adafactor

    params, grads = _problem(1, np.float64)
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = Adafactor([tensors[k] for k in sorted(tensors)])
    theirs = parity._torch_trajectory(opt, tensors, None, grads)
    with jax.enable_x64(True):
        ours, state = _run(adaopt.adafactor(), params, grads)
    _assert_close(ours, theirs, params, np.float64)
    _assert_statistics(state, opt, tensors, ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"))


# (case, weight decay, dtype); all but the last run transformers' relative step (lr=None).
TRANSFORMERS_CASES = [
    ("warmup_init, scale_parameter=False", True, np.float64), ("b1", True, np.float32),
    ("relative_step=False", True, np.float64),
]  # fmt: skip


@pytest.mark.parametrize(("case", "weight_decay", "dtype"), TRANSFORMERS_CASES)
def test_transformers_Adafactor(case: str, weight_decay: bool, dtype: Any) -> None:
    seed = zlib.crc32(f"adafactor/transformers/{case}/{weight_decay}/{np.dtype(dtype).name}".encode())
    params, grads = _problem(seed + 1, dtype)
    hp, lr, theirs_lr = _draw(seed, weight_decay), 1e-2, None  # its relative step: the cap 1e-2 is adafactor()'s
    if case.startswith("warmup_init"):
        hp["warmup_init"], hp["scale_parameter"], hp["b1"], lr = True, False, None, _warmup_init
    elif case == "relative_step=False":
        hp["relative_step"] = False
        lr = theirs_lr = _schedule(hp["learning_rate"], dtype)
    with jax.enable_x64(dtype == np.float64):  # the schedule's rates in the case's dtype on both sides
        ours = _ours(hp, lr, params, grads)
        theirs = _torch("transformers.optimization.Adafactor", hp, theirs_lr, params, grads)
    _assert_close(ours, theirs, params, dtype)


def test_torch_optim_Adafactor_and_its_statistics() -> None:
    """Its lr caps the relative step, and it floors eps (None: the machine epsilon). No decay, a constant rate."""
    hp = {**_draw(2, False, first_moment=False), "eps": None}
    params, grads = _problem(3, np.float64)
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = references.TORCH["torch.optim.Adafactor"]([{"params": [tensors[k] for k in sorted(tensors)]}], hp)
    theirs = parity._torch_trajectory(opt, tensors, hp["learning_rate"], grads)
    with jax.enable_x64(True):
        ours, state = _run(_adafactor(hp, hp["learning_rate"], **TORCH_OPTIONS), params, grads)
    _assert_close(ours, theirs, params, np.float64)
    _assert_statistics(state, opt, tensors, ("row_var", "col_var", "variance"))


def test_torch_optim_Adafactor_in_float32_with_eps_decay_and_a_schedule() -> None:
    """tests/test_parity.py runs it in float64 with a masked decay and a schedule, in float32 with neither."""
    hp = {**_draw(8, True, first_moment=False), "eps": 1e-12}
    params, grads = _problem(9, np.float32)
    lr = _schedule(hp["learning_rate"], np.float32)
    ours = _ours(hp, lr, params, grads, **TORCH_OPTIONS)
    _assert_close(ours, _torch("torch.optim.Adafactor", hp, lr, params, grads), params, np.float32)


def test_optax_adafactor() -> None:
    """In float64: to float64's precision with its second-moment decay computed in float64 (patched in), to
    float32's without (it computes that decay in float32). The two largest axes, a first moment, a masked decay."""
    hp = {**_draw(4, True), "eps_scale": 1e-3, "min_dim_size_to_factor": OPTAX_MIN_DIM, "mu_dtype": jnp.float64}
    params, grads = _problem(5, np.float64)
    with jax.enable_x64(True):
        options = {"factored_axes": "largest_two", "min_dim_size_to_factor": OPTAX_MIN_DIM}
        lr = hp["learning_rate"]
        ours = _ours(hp, lr, params, grads, relative_step=False, weight_decay_mode="unscaled", **options)
        patched = parity.run_adaopt(references.OPTAX["optax.adafactor"](lr, hp, MASK), params, grads)
        unpatched = optax.adafactor(
            lr, OPTAX_MIN_DIM, hp["decay_rate"], clipping_threshold=hp["clip_threshold"], momentum=hp["b1"],
            dtype_momentum=jnp.float64, weight_decay_rate=hp["weight_decay"], weight_decay_mask=MASK,
        )  # fmt: skip
        unpatched = parity.run_adaopt(unpatched, params, grads)
    _assert_close(ours, patched, params, np.float64)
    assert 1e-12 < parity.relative_error(ours, unpatched) < 1e-6


def test_the_comparison_is_sharp() -> None:
    """The decay's exponent off by 1e-3 fails it."""
    hp = {**_draw(6, False, first_moment=False), "eps": None}
    params, grads = _problem(7, np.float64)
    theirs = _torch("torch.optim.Adafactor", hp, hp["learning_rate"], params, grads)
    with jax.enable_x64(True):
        off = _ours({**hp, "decay_rate": hp["decay_rate"] - 1e-3}, hp["learning_rate"], params, grads, **TORCH_OPTIONS)
    assert parity.relative_error(off, theirs) > 1e-6


@pytest.mark.parametrize(
    ("options", "layout"),
    [
        ({}, {"s": None, "b": None, "w": ((7,), (5,)), "cube": ((9, 3), (9, 8)), "conv": ((3, 2, 2), (3, 2, 2))}),
        (
            {"factored_axes": "largest_two", "min_dim_size_to_factor": 6},
            {"s": None, "b": None, "w": None, "cube": ((3, 8), (9, 3)), "big": ((10,), (12,)), "conv": None},
        ),
        ({"factored": False}, {"w": None, "cube": None, "big": None}),
        ({"min_dim_size_to_factor": 8}, {"w": None, "big": ((12,), (10,)), "cube": None}),
    ],
)
def test_which_leaves_are_factored(options: dict[str, Any], layout: dict[str, Any]) -> None:
    """``(v_row shape, v_col shape)`` of each factored leaf; None for a leaf with a whole ``v`` of its shape."""
    params = {k: jnp.ones(shape) for k, shape in {**SHAPES, "empty": (0, 3)}.items()}
    state = optax.tree.get(adaopt.adafactor(**options).init(params), "AdafactorState")
    for k, expected in {**layout, "empty": None}.items():
        if expected is None:
            assert isinstance(state.v_row[k], optax.MaskedNode) and state.v[k].shape == SHAPES.get(k, (0, 3)), k
        else:
            assert isinstance(state.v[k], optax.MaskedNode), k
            assert (state.v_row[k].shape, state.v_col[k].shape) == expected, k


def test_decay_offset_counts_the_decay_from_there() -> None:
    """optax's decay_offset: steps up to the offset keep only the last squared gradient (optax's are NaN there)."""
    tx = adaopt.scale_by_adafactor(decay_offset=2, eps=0.0, scale_parameter=False)
    grads = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    update = jax.jit(tx.update)
    state = tx.init(grads[0])
    for t in range(4):
        _, state = update(grads[t], state)
        if t == 2:  # t = 3: max(3 - 2, 1) = 1, a decay of 0
            np.testing.assert_allclose(state.v, grads[2] ** 2, rtol=1e-6)
    beta = 1 - 2.0**-0.8
    np.testing.assert_allclose(state.v, beta * grads[2] ** 2 + (1 - beta) * grads[3] ** 2, rtol=1e-6)


@pytest.mark.parametrize("eps_mode", ["add", "max"])
def test_zero_gradients_give_zero_steps_even_with_eps_zero(eps_mode: str) -> None:
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "h": jnp.ones((2, 3), jnp.bfloat16)}
    tx = adaopt.adafactor(eps=0.0, eps_mode=eps_mode, weight_decay=0.0)
    state = tx.init(params)
    grads = {**jax.tree.map(jnp.zeros_like, params), "w": jnp.zeros((3, 4)).at[0].set(1.0)}  # rows 1, 2 all zero
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.abs(updates["b"]).max()) == 0.0 and float(jnp.abs(updates["w"][1:]).max()) == 0.0
    assert float(jnp.abs(updates["w"][0]).min()) > 0 and updates["h"].dtype == jnp.bfloat16


def test_a_gradient_of_another_shape_names_the_leaf_and_the_statistics() -> None:
    tx = adaopt.scale_by_adafactor(scale_parameter=False)
    state = tx.init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['w'\] have shape \(5, 3\).*v_row of shape \(4,\)"):
        tx.update({"w": jnp.ones((5, 3)), "b": jnp.ones(3)}, state)
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['b'\] have shape \(3, 1\).*v of shape \(3,\)"):
        tx.update({"w": jnp.ones((4, 3)), "b": jnp.ones((3, 1))}, state)


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"Adafactor does not take complex parameters.*\['z'\]"):
        adaopt.adafactor().init({"z": jnp.ones((2, 2), jnp.complex64)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_threshold": 0.0}, r"clip_threshold must be a finite number in \(0.0, inf\), got 0.0"),
        ({"clip_threshold": -1.0}, "clip_threshold"),
        ({"decay_rate": -0.8}, r"decay_rate .* got -0.8: .*beta2_decay=-0.8 are decay_rate=0.8"),
        ({"decay_rate": 1.5}, r"decay_rate must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"eps": -1e-30}, "eps must"),
        ({"eps_scale": -1e-3}, "eps_scale must"),
        ({"b1": 1.0}, r"b1 must be a finite number in \[0.0, 1.0\)"),
        ({"decay_offset": -1}, "decay_offset"),
        ({"learning_rate": -1e-2}, "learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"min_dim_size_to_factor": 0}, r"min_dim_size_to_factor must be an integer in \[1, "),
        ({"min_dim_size_to_factor": 2.5}, "min_dim_size_to_factor"),
        ({"eps_mode": "clamp"}, "eps_mode must be one of"),
        ({"factored_axes": "last"}, "factored_axes must be one of"),
        ({"weight_decay_mode": "decoupled"}, "weight_decay_mode must be one of"),
        ({"mu_dtype": jnp.int8}, "mu_dtype"),
        ({"nu_dtype": "float8_e4m3fn"}, "nu_dtype"),
        ({"relative_step": "yes"}, "relative_step must be True or False"),
    ],
)
def test_bad_input_is_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=message):
        adaopt.adafactor(**kwargs)


def test_gradients_shallower_than_the_state_are_a_tree_mismatch() -> None:
    """A state built for {'a': {'x', 'y'}} given gradients {'a': g}: the gradients' tree is a prefix of the state's,
    which flattening up to it would take; refused with both structures."""
    params = {"a": {"x": jnp.ones((4, 3)), "y": jnp.ones(3)}}
    tx = adaopt.adafactor(1e-2)
    with pytest.raises(adaopt.TreeMismatchError, match="do not have the structure"):
        tx.update({"a": jnp.ones(3)}, tx.init(params), {"a": jnp.ones(3)})
