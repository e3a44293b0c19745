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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch
from pytorch_optimizer.optimizer import soap as soap_module

import adaopt
from adaopt._src.preconditioned.soap import merge_small_dims
from tests import parity

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
    names = sorted(tensors)
    decayed = [k for k in names if mask is None or mask[k]]
    groups = [
        {"params": [tensors[k] for k in decayed], "weight_decay": hp["weight_decay"]},
        {"params": [tensors[k] for k in names if k not in decayed], "weight_decay": 0.0},
    ]
    opt = pytorch_optimizer.SOAP(
        [g for g in groups if g["params"]], lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]),
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


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"SOAP does not take complex parameters.*\['w'\]"):
        adaopt.soap().init({"w": jnp.ones((3, 3), jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"precondition_frequency": 0}, "precondition_frequency"), ({"max_precondition_dim": 2.5}, "max_precondition_dim"),
        ({"data_format": "nchw"}, "data_format"), ({"shampoo_beta": 1.0}, "shampoo_beta"),
        ({"b2": 1.0}, "b2"), ({"eps": -1.0}, "eps"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.soap(**kwargs)
