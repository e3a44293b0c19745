"""SOAP against pytorch_optimizer.SOAP, step for step, and what it does with every kind of leaf.

The reference runs its QR decomposition in float32 whatever the parameters' dtype. For the float64
comparisons its ``get_orthogonal_matrix_qr`` is patched in the test: its own source, with the
float32 cast replaced by a copy in the parameters' dtype. The unpatched package is compared in
float64 to float32's precision, and in float32 as it is.

Eigenvectors are defined up to sign, and within a repeated eigenvalue up to any rotation. SOAP's
step does not depend on the signs (each basis column enters twice, or squared, and the QR refresh
is Householder's, which ignores them), but the first call's statistic
:math:`G G^\\top` of one gradient has rank at most the other axes' size: an axis longer than that
has a repeated zero eigenvalue, whose eigenvectors LAPACK (torch's, and JAX's) may choose
differently, and the trajectories would part. The shapes are chosen so that every factor's null
space has dimension 0 or 1 (an axis at most one longer than the product of the others), where the
basis is unique up to sign: the comparison is then exact to rounding.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import heavyball
import heavyball.utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch
from pytorch_optimizer.optimizer import soap as soap_module

import adaopt
from adaopt._src.preconditioned.soap import _refresh_basis, merge_small_dims, merge_trailing_dims
from tests import parity, problems, references  # references: heavyball runs eager

SPEC = adaopt.REGISTRY["soap"]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
MAX_DIM = 8
# A matrix (a null space of dimension 1 on its left), biases, a scalar, a 3-d tensor, and a leaf with
# an axis above max_precondition_dim (12 > 8: the identity on it). With precondition_1d, the 2-vector
# (a null space of dimension 1) gets a factor, the 10-vector (> 8) none.
SHAPES = {"w": (6, 5), "b": (2,), "long": (10,), "s": (), "t": (2, 3, 4), "e": (12, 4)}
DECAY_MASK = {"w": True, "b": False, "long": False, "s": False, "t": True, "e": True}
# merge_dims: (2, 2, 5) -> (4, 5); the 4-d leaf (2, 1, 2, 5) -> (4, 5) as NCHW, or, as NHWC, (2, 5, 1, 2)
# -> (2, 5, 2). 1-d leaves of 2 to 8 elements would fail in the reference (it reshapes them to [1]).
SHAPES_MERGE = {"t": (2, 2, 5), "c": (2, 1, 2, 5), "long": (10,), "s": ()}


@contextmanager
def _qr_in_the_parameters_dtype() -> Iterator[None]:
    """pytorch_optimizer.SOAP's ``get_orthogonal_matrix_qr``, from its source, with the float32 cast removed."""
    name = "get_orthogonal_matrix_qr"
    original = getattr(pytorch_optimizer.SOAP, name)
    source = inspect.getsource(original)
    assert source.count("power_iter.to(torch.float32)") == 1, "SOAP.get_orthogonal_matrix_qr changed: review this patch"
    namespace = dict(vars(soap_module))
    indented = "\n".join(line[4:] for line in source.splitlines())
    exec(indented.replace("power_iter.to(torch.float32)", "power_iter.clone()"), namespace)
    setattr(pytorch_optimizer.SOAP, name, namespace[name])
    try:
        yield
    finally:
        setattr(pytorch_optimizer.SOAP, name, original)


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp: dict[str, Any] = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["precondition_frequency"] = int(rng.integers(2, 15))
    return hp


def _torch(hp: dict, params: dict, grads: dict, lr: Any, mask: dict | None, **options: Any) -> dict:
    """``pytorch_optimizer.SOAP``, the decayed leaves in a group of their own; ``lr``: a schedule or None."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = parity.decay_groups(tensors, hp["weight_decay"], mask)
    opt = pytorch_optimizer.SOAP(
        groups, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]),
        shampoo_beta=hp["shampoo_beta"], eps=hp["eps"], precondition_frequency=hp["precondition_frequency"],
        max_precondition_dim=MAX_DIM, **options,
    )  # fmt: skip
    return parity._torch_trajectory(opt, tensors, hp["learning_rate"] if lr is None else lr, grads)


def _adaopt(hp: dict, lr: Any, mask: dict | None, **options: Any) -> optax.GradientTransformation:
    return adaopt.soap(
        hp["learning_rate"] if lr is None else lr, hp["b1"], hp["b2"], hp["shampoo_beta"], hp["eps"],
        hp["weight_decay"], weight_decay_mask=mask, precondition_frequency=hp["precondition_frequency"],
        max_precondition_dim=MAX_DIM, **options,
    )  # fmt: skip


# (name, shapes, options, weight decay, schedule, dtype)
CASES = [
    ("defaults", SHAPES, {}, True, True, np.float64),
    ("precondition_1d", SHAPES, {"precondition_1d": True}, False, False, np.float64),
    ("normalized-uncorrected", SHAPES, {"normalize_gradient": True, "correct_bias": False}, True, False, np.float64),
    ("merge_dims", SHAPES_MERGE, {"merge_dims": True}, True, False, np.float64),
    ("merge_dims-channels_last", SHAPES_MERGE, {"merge_dims": True, "data_format": "channels_last"}, False, True, np.float64),
    ("defaults", SHAPES, {}, True, True, np.float32),
]  # fmt: skip


def _compare(name: str, shapes: dict, options: dict, weight_decay: bool, schedule: bool, dtype: Any) -> float:
    label = f"soap/{name}/{weight_decay}/{schedule}/{np.dtype(dtype).name}"
    seed = zlib.crc32(label.encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(shapes, seed + 1, dtype)
    mask = {k: DECAY_MASK.get(k, True) for k in shapes} if weight_decay else None
    peak = hp["learning_rate"]
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        # optax evaluates a schedule in float32 at an int32 count: both sides evaluate it in the case's dtype.
        rate = (lambda c: lr(jnp.asarray(c, dtype))) if lr else None
        ours = parity.run_adaopt(_adaopt(hp, rate, mask, **options), params, grads)
        with _qr_in_the_parameters_dtype():
            theirs = _torch(hp, params, grads, rate, mask, **options)
    for k in shapes:
        assert ours[k].dtype == dtype
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    return parity.relative_error(ours, theirs)


@pytest.mark.parametrize(
    ("name", "shapes", "options", "weight_decay", "schedule", "dtype"),
    CASES,
    ids=[
        f"{c[0]}-{'wd' if c[3] else 'nowd'}-{'schedule' if c[4] else 'constant'}-{np.dtype(c[5]).name}" for c in CASES
    ],
)
def test_matches_pytorch_optimizer_SOAP(
    name: str, shapes: dict, options: dict, weight_decay: bool, schedule: bool, dtype: Any
) -> None:
    error = _compare(name, shapes, options, weight_decay, schedule, dtype)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


def test_the_unpatched_reference_agrees_to_its_float32_qr() -> None:
    """As it ships, in float64: its float32 QR leaves the trajectory within float32's precision, not float64's
    (the QR's float32 rounding makes a slightly different basis, which the next power iteration carries on)."""
    hp = _draw(7, True)
    params, grads = parity.random_problem(SHAPES, 8, np.float64, steps=100)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(_adaopt(hp, None, None), params, grads)
    error = parity.relative_error(ours, _torch(hp, params, grads, None, None))
    assert 1e-13 < error < 1e-6


def test_the_comparison_is_sharp() -> None:
    """A shampoo_beta off by 1e-4 fails it."""
    hp = _draw(3, True)
    params, grads = parity.random_problem(SHAPES, 4, np.float64, steps=60)  # float64's tolerance is 1e-10
    with jax.enable_x64(True):
        off = parity.run_adaopt(_adaopt({**hp, "shampoo_beta": hp["shampoo_beta"] - 1e-4}, None, None), params, grads)
    with _qr_in_the_parameters_dtype():
        theirs = _torch(hp, params, grads, None, None)
    assert parity.relative_error(off, theirs) > 1e-8


# heavyball's SOAP, a second reference: the options that reproduce it (see adaopt.soap's docstring).

HEAVYBALL = {
    "eps_mode": "max", "refresh_count": "call", "shift_power_iteration": True, "weight_decay_mode": "decoupled",
}  # fmt: skip
# Every factor's null space after the first gradient of dimension 0 or 1 (see the module's docstring), with
# heavyball's merging: (5, 2, 2, 1) -> (5, 4); (2, 2, 5) stays (its last axis would merge into the first two by
# pytorch-optimizer's rule); (4, 2, 2) -> (4, 4); (12, 4): the identity on the 12 (> 8).
HEAVYBALL_SHAPES = {"w": (6, 5), "b": (2,), "c": (5, 2, 2, 1), "t": (2, 2, 5), "u": (4, 2, 2), "e": (12, 4)}


def _heavyball(hp: dict, params: dict, grads: dict, lr: Any, mask: dict | None, **options: Any) -> dict:
    """``heavyball.SOAP``, eager, its state in the parameters' dtype, the decayed leaves in a group of their own."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    groups = parity.decay_groups(tensors, hp["weight_decay"], mask)
    dtype = next(iter(tensors.values())).dtype
    with parity.default_dtype(dtype):
        opt = references.heavyball_optimizer(
            heavyball.SOAP, groups, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]),
            shampoo_beta=hp["shampoo_beta"], eps=hp["eps"], precondition_frequency=hp["precondition_frequency"],
            max_precond_dim=MAX_DIM, **options,
        )  # fmt: skip
        return parity._torch_trajectory(opt, tensors, hp["learning_rate"] if lr is None else lr, grads)


def _heavyball_draw(seed: int, weight_decay: bool, large_eps: bool) -> dict[str, Any]:
    """A draw of :func:`_draw` with a power-of-two frequency (heavyball counts other frequencies' refreshes in
    floating point, which moves some by a call) and, with ``large_eps``, an eps that often floors the root."""
    hp = _draw(seed, weight_decay)
    rng = np.random.default_rng(seed + 1)
    hp["precondition_frequency"] = int(rng.choice([1, 2, 4]))
    if large_eps:
        hp["eps"] = float(np.exp(rng.uniform(np.log(0.1), np.log(1.0))))
    return hp


def _compare_heavyball(
    hp: dict, options: dict, ours_options: dict, weight_decay: bool, schedule: bool, dtype: Any, seed: int,
    steps: int = parity.STEPS,
) -> float:  # fmt: skip
    params, grads = parity.random_problem(HEAVYBALL_SHAPES, seed, dtype, steps)
    mask = {k: k != "b" for k in HEAVYBALL_SHAPES} if weight_decay else None
    peak = hp["learning_rate"]
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, 20, steps, peak / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        rate = (lambda c: lr(jnp.asarray(c, dtype))) if lr else None
        ours = parity.run_adaopt(_adaopt(hp, rate, mask, **ours_options), params, grads)
        theirs = _heavyball(hp, params, grads, rate, mask, **options)
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-3, "the reference barely moved the parameters; the comparison would prove nothing"
    return parity.relative_error(ours, theirs)


# (name, heavyball's options, adaopt's merge_dims, weight decay, schedule, large eps, dtype)
HEAVYBALL_CASES = [
    ("defaults", {}, "trailing", True, True, False, np.float64),
    ("eps-floors", {}, "trailing", True, False, True, np.float64),
    ("unmerged-precondition_1d", {"merge_dims": False, "precondition_1d": True}, False, False, False, False, np.float64),
    ("defaults", {}, "trailing", True, False, False, np.float32),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "options", "merge", "weight_decay", "schedule", "large_eps", "dtype"),
    HEAVYBALL_CASES,
    ids=[f"{c[0]}-{'wd' if c[3] else 'nowd'}-{'schedule' if c[4] else 'constant'}-{np.dtype(c[6]).name}"
         for c in HEAVYBALL_CASES],
)  # fmt: skip
def test_matches_heavyball_SOAP(
    name: str, options: dict, merge: Any, weight_decay: bool, schedule: bool, large_eps: bool, dtype: Any
) -> None:
    seed = zlib.crc32(f"soap-heavyball/{name}/{np.dtype(dtype).name}".encode())
    hp = _heavyball_draw(seed, weight_decay, large_eps)
    ours_options = {**HEAVYBALL, "merge_dims": merge, "precondition_1d": options.get("precondition_1d", False)}
    error = _compare_heavyball(hp, options, ours_options, weight_decay, schedule, dtype, seed + 2)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} with {hp}"


@pytest.mark.parametrize(
    "flipped",
    [{"eps_mode": "add"}, {"refresh_count": "update"}, {"weight_decay_mode": "stepped"}, {"merge_dims": True}],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)  # fmt: skip
def test_each_heavyball_option_is_needed(flipped: dict) -> None:
    """With any one of the options back at the authors' choice, the float64 trajectories part (the eps draw
    floors the root often, the frequency is 2). ``shift_power_iteration`` moves these full-rank factors'
    trajectories by about 1e-10 only: the next test shows what it does."""
    seed = zlib.crc32(b"soap-heavyball/needed")
    hp = {**_heavyball_draw(seed, True, True), "precondition_frequency": 2}
    options = {**HEAVYBALL, "merge_dims": "trailing", **flipped}
    error = _compare_heavyball(hp, {}, options, True, False, np.float64, seed, steps=40)
    assert error > 1e-8, f"relative error {error:.3g}: the option {flipped} made no difference"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_shifted_refresh_is_heavyballs(dtype: Any) -> None:
    """On a rank-deficient factor (rank 3 of 7), the refreshed basis of ``shift_power_iteration`` equals heavyball's
    ``get_orthogonal_matrix_QR`` (which leaves the columns in their slots and fixes their signs: compared in our
    order, up to sign). Without the shift, the columns beyond the rank are QR's completion of rounding noise: they
    differ from heavyball's entirely. With it, their precision is the dtype's epsilon over the shift (float64:
    over 1e-8; float32: over 64 * 7 * its epsilon): 1e-8 and 6e-4 here, the other columns to rounding."""
    rng = np.random.default_rng(5)
    g = rng.normal(size=(7, 3))
    statistic, old = (g @ g.T).astype(dtype), np.linalg.qr(rng.normal(size=(7, 7)))[0].astype(dtype)
    q = [torch.tensor(old)]
    with parity.default_dtype(q[0].dtype):
        heavyball.utils.get_orthogonal_matrix_QR([torch.tensor(statistic)], q)
    theirs = q[0].numpy()
    with jax.enable_x64(dtype == np.float64):
        for shift, tolerance in ((True, {np.float64: 1e-7, np.float32: 3e-3}[dtype]), (False, None)):
            ours, order = (np.asarray(x) for x in _refresh_basis(jnp.asarray(statistic), jnp.asarray(old), shift))
            in_our_order = theirs[:, order]
            signs = np.sign(np.sum(ours * in_our_order, axis=0))
            error = np.max(np.abs(ours * signs - in_our_order))
            if shift:
                assert error < tolerance, error
            else:
                assert error > 0.1, error


def test_leaves_that_merge_into_a_vector_take_the_1d_rule_as_in_heavyball() -> None:
    """``merge_dims="trailing"`` makes (5, 1) and (3, 1, 1) vectors, without a factor (no ``precondition_1d``), as
    heavyball does; ``"consecutive"`` keeps the one merged axis's factor (pytorch-optimizer fails there)."""
    shapes = {"v": (5, 1), "x": (3, 1, 1)}
    for merge, factors in (("trailing", []), (True, [(5, 5)])):
        state = adaopt.soap(merge_dims=merge, max_precondition_dim=MAX_DIM).init({"v": jnp.ones((5, 1))})
        assert _factor_shapes(state, "v") == {"v": factors}
    seed = zlib.crc32(b"soap-heavyball/vectors")
    hp = _heavyball_draw(seed, True, True)
    params, grads = parity.random_problem(shapes, seed, np.float64, steps=50)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(_adaopt(hp, None, None, **HEAVYBALL, merge_dims="trailing"), params, grads)
        theirs = _heavyball(hp, params, grads, None, None)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[np.float64]


def test_merge_trailing_dims_is_heavyballs_rule() -> None:
    """The rule of heavyball's ``dim_merger``, on shapes of every kind, against the package itself."""
    rng = np.random.default_rng(0)
    shapes = [(128, 64, 3, 3), (3, 4, 5), (5, 1), (2, 3, 2100), (6, 1, 1, 7), (4, 9, 1, 2)]
    shapes += [tuple(int(d) for d in rng.integers(1, 12, size=rng.integers(2, 6))) for _ in range(40)]
    for shape in shapes:
        for max_dim in (4, 8, 12, 1024):
            expected = tuple(heavyball.utils.dim_merger(torch.zeros(shape), max_dim).shape)
            assert merge_trailing_dims(shape, max_dim) == expected, (shape, max_dim)


# What each kind of leaf does.


def _factor_shapes(state: Any, names: Any) -> dict[str, list[tuple[int, ...]]]:
    """The factors' shapes of each leaf of a dict of parameters (leaves in sorted key order)."""
    soap_state = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, adaopt.SoapState))
                      if isinstance(s, adaopt.SoapState))  # fmt: skip
    return {k: [x.shape for x in v] for k, v in zip(sorted(names), soap_state.statistics, strict=True)}


def test_each_kind_of_leaf_gets_its_factors() -> None:
    params = {
        "w": jnp.ones((6, 5)), "b": jnp.ones(5), "s": jnp.ones(()), "t": jnp.ones((2, 3, 4)),
        "embed": jnp.ones((100, 4)), "one": jnp.ones((1, 7)), "empty": jnp.ones((0, 3)),
    }  # fmt: skip
    assert _factor_shapes(adaopt.soap(max_precondition_dim=50).init(params), params) == {
        "w": [(6, 6), (5, 5)], "b": [], "s": [], "t": [(2, 2), (3, 3), (4, 4)], "embed": [(4, 4)],
        "one": [(7, 7)], "empty": [],
    }  # fmt: skip
    assert _factor_shapes(adaopt.soap(precondition_1d=True).init({"b": jnp.ones(5)}), "b") == {"b": [(5, 5)]}
    merged = adaopt.soap(merge_dims=True, max_precondition_dim=8).init({"c": jnp.ones((2, 1, 2, 5))})
    assert _factor_shapes(merged, "c") == {"c": [(4, 4), (5, 5)]}
    nhwc = adaopt.soap(merge_dims=True, max_precondition_dim=8, data_format="channels_last")
    assert _factor_shapes(nhwc.init({"c": jnp.ones((2, 1, 2, 5))}), "c") == {"c": [(2, 2), (5, 5), (2, 2)]}
    # The reference's rule, except that one merged axis stays one axis (it reshapes to [1] and fails).
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (1024, 2048, 12)
    assert merge_small_dims((7, 5), 100) == (35,)


def test_leaves_without_factors_take_adams_step_from_the_second_call() -> None:
    """0-d and 1-d leaves (and any leaf with no preconditioned axis): Adam's steps on the gradients after the first
    (eps = 0: SOAP adds eps to the undebiased root)."""
    params, grads = parity.random_problem({"b": (5,), "s": (), "embed": (12, 1)}, 9, np.float64, steps=30)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(adaopt.soap(1e-2, 0.9, 0.99, eps=0.0, weight_decay=0.0, max_precondition_dim=8),
                                 params, grads)  # fmt: skip
        later = {k: v[1:] for k, v in grads.items()}
        adam = parity.run_adaopt(adaopt.adam(1e-2, 0.9, 0.99, eps=0.0), params, later)
    for k in params:
        np.testing.assert_array_equal(ours[k][0], params[k])
        np.testing.assert_allclose(ours[k][1:], adam[k], rtol=1e-12, atol=1e-14)


def test_a_3d_leaf_is_preconditioned_along_every_axis() -> None:
    """A 3-d leaf is not a batch of matrices: its step differs from the steps of its slices run apart."""
    params, grads = parity.random_problem({"t": (2, 3, 4)}, 10, np.float64, steps=5)
    with jax.enable_x64(True):
        whole = parity.run_adaopt(adaopt.soap(1e-2, weight_decay=0.0), params, grads)
        first = parity.run_adaopt(adaopt.soap(1e-2, weight_decay=0.0), {"t": params["t"][0]}, {"t": grads["t"][:, 0]})
    assert np.max(np.abs(whole["t"][:, 0] - first["t"])) > 1e-6


@pytest.mark.parametrize("eps_mode", ["add", "max"])
def test_eps_0_gives_a_zero_step_where_nothing_was_seen(eps_mode: str) -> None:
    """A coordinate whose gradients are all 0 has a zero second moment: with eps = 0 its step is 0, as Adam's."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    grads = {"w": jnp.asarray([[1.0, 0.5], [0.2, -0.3], [0.1, 0.4]]), "b": jnp.asarray([0.0, 1.0])}
    tx = adaopt.soap(1e-2, eps=0.0, eps_mode=eps_mode, weight_decay=0.0)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), updates
        assert float(updates["b"][0]) == 0.0


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"SOAP does not take complex parameters.*\['w'\]"):
        adaopt.soap().init({"w": jnp.ones((3, 3), jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"precondition_frequency": 0}, "precondition_frequency"), ({"max_precondition_dim": 2.5}, "max_precondition_dim"),
        ({"data_format": "nchw"}, "data_format"), ({"shampoo_beta": 1.0}, "shampoo_beta"),
        ({"b2": 1.0}, "b2"), ({"eps": -1.0}, "eps"), ({"merge_dims": "leading"}, "merge_dims"),
        ({"eps_mode": "floor"}, "eps_mode"), ({"refresh_count": "step"}, "refresh_count"),
        ({"weight_decay_mode": "adamw"}, "weight_decay_mode"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.soap(**kwargs)


def test_a_stored_rotated_second_moment_trains_as_float32_and_blockwise_first_moments_are_refused() -> None:
    """The rotated second moment in 8-bit blocks (small ones, so that the matrix's is quantized too) and the
    first moment in stochastically rounded bfloat16 end within 2% of float32's loss (1.1% here), through ten
    refreshes of the bases (which permute the stored second moment). Blockwise codes for the first moment are
    refused: rotated into the eigenbasis, their roundings reach directions of tiny second moment (in 8-bit
    blocks of 64 this problem ends at 26 times float32's loss)."""
    blocks = adaopt.Blockwise("dynamic8", block_size=64, min_size=64)
    plain, _ = problems.least_squares_run(adaopt.soap(3e-2, precondition_frequency=5))
    light, state = problems.least_squares_run(
        adaopt.soap(3e-2, precondition_frequency=5, mu_dtype="bfloat16_sr", nu_dtype=blocks)
    )
    stored = [x for x in jax.tree.leaves(state, is_leaf=adaopt.is_stored) if adaopt.is_stored(x)]
    assert sorted(type(x).__name__ for x in stored) == ["Quantized", "Quantized", "Rounded", "Rounded"]
    assert float(plain[-1]) < 0.2 * float(plain[0])
    assert abs(float(light[-1]) / float(plain[-1]) - 1) < 0.02, (float(light[-1]), float(plain[-1]))
    for refused in (blocks, "int8", "int4", "fp8"):
        with pytest.raises(adaopt.HyperparameterError, match="SOAP keeps its first moment in the parameters' coord"):
            adaopt.soap(mu_dtype=refused)
