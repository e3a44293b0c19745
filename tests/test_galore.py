"""GaLore against galore-torch's GaLoreAdamW, step for step, and what the wrapper does with each leaf.

``galore_torch.GaLoreAdamW`` computes each projection's SVD in float32 whatever the gradient's
dtype, and takes the singular vectors' signs as the SVD returns them; adaopt computes the SVD in
the gradient's precision and signs each singular vector so that its largest-magnitude entry is
positive. The test patches the package's ``GaLoreProjector.get_orthogonal_matrix``: its own
source, with the float32 cast (``.float()``) replaced by a float64 one (``.double()``) for the
float64 comparison and left as it is for the float32 one, followed in both by adaopt's sign
convention (restated here in torch). So float64 compares the same computation in float64
(<= 1e-8 relative), and float32 compares with the package's own float32 SVD (<= 1e-4).

The problem: two matrices, one tall (right projection under "std") and one wide (left), a bias
and a scalar (not projected, in a group without ``rank``), rank 3, the projection refreshed every
25 steps (8 times in 200 steps), the learning rate and the decay drawn at random.
"""

from __future__ import annotations

import inspect
import itertools
import textwrap
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import galore_torch
import galore_torch.galore_projector as galore_projector
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from tests import parity, test_sharding

SPEC = adaopt.REGISTRY["galore_adamw"]
TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}
SHAPES = {"tall": (12, 7), "wide": (6, 10), "b": (7,), "s": ()}
MATRICES = ("tall", "wide")
RANK, GAP = 3, 25


def _signed(basis: torch.Tensor, dim: int) -> torch.Tensor:
    """adaopt's sign convention: each singular vector (a slice along ``dim``) with its largest-magnitude entry positive."""
    largest = torch.gather(basis, dim, basis.abs().argmax(dim=dim, keepdim=True))
    return basis * torch.where(largest < 0, -1.0, 1.0).to(basis.dtype)


@contextmanager
def _projector(float64: bool) -> Iterator[None]:
    """GaLoreProjector.get_orthogonal_matrix from its own source (in float64 with ``float64``), then signed."""
    cls = galore_projector.GaLoreProjector
    original = cls.get_orthogonal_matrix
    function = original
    if float64:
        source = textwrap.dedent(inspect.getsource(original))
        assert source.count(".float()") == 1, "GaLoreProjector.get_orthogonal_matrix changed: review this patch"
        namespace = dict(vars(galore_projector))
        exec(source.replace(".float()", ".double()"), namespace)
        function = namespace["get_orthogonal_matrix"]

    def signed(self: Any, weights: torch.Tensor, rank: int, type: str) -> Any:
        out = function(self, weights, rank, type)
        if type == "left":
            return _signed(out, 0)
        if type == "right":
            return _signed(out, 1)
        return [_signed(out[0], 0), _signed(out[1], 1)]

    cls.get_orthogonal_matrix = signed  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.get_orthogonal_matrix = original  # type: ignore[method-assign]


def _draw(seed: int, weight_decay: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["scale"] = float(rng.uniform(0.25, 2.0))
    return hp


def _theirs(hp: dict, params: dict, grads: dict, proj_type: str, lr: Any) -> dict:
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    projection = {"rank": RANK, "update_proj_gap": GAP, "scale": hp["scale"], "proj_type": proj_type}
    opt = galore_torch.GaLoreAdamW(
        [
            {"params": [tensors[k] for k in MATRICES], "weight_decay": hp["weight_decay"], **projection},
            {"params": [tensors[k] for k in sorted(tensors) if k not in MATRICES], "weight_decay": 0.0},
        ],
        lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], no_deprecation_warning=True,
    )  # fmt: skip
    return parity._torch_trajectory(opt, tensors, lr, grads)


def _ours(hp: dict, params: dict, grads: dict, proj_type: str, lr: Any, **options: Any) -> dict:
    matrices = {k: k in MATRICES for k in params}
    tx = adaopt.galore_adamw(
        lr, hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"], rank=RANK, update_proj_gap=GAP, scale=hp["scale"],
        proj_type=proj_type, galore_mask=matrices, weight_decay_mask=matrices, **options,
    )  # fmt: skip
    return parity.run_adaopt(tx, params, grads)


def _schedule(peak: float, dtype: Any) -> Any:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10)
    return lambda count: schedule(jnp.asarray(count, dtype))


# Every projection type in float64 (std with decay and a schedule); std in float32 with the package's own SVD.
CASES = [
    ("std", True, True, np.float64),
    ("reverse_std", True, False, np.float64),
    ("left", False, False, np.float64),
    ("right", True, False, np.float64),
    ("full", False, False, np.float64),
    ("std", True, False, np.float32),
]


@pytest.mark.parametrize(
    ("proj_type", "weight_decay", "schedule", "dtype"), CASES, ids=lambda x: str(getattr(x, "__name__", x))
)
def test_matches_galore_torch_GaLoreAdamW(proj_type: str, weight_decay: bool, schedule: bool, dtype: Any) -> None:
    seed = zlib.crc32(f"galore/{proj_type}/{weight_decay}/{schedule}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        lr = _schedule(hp["learning_rate"], dtype) if schedule else hp["learning_rate"]
        ours = _ours(hp, params, grads, proj_type, lr)
        with _projector(float64=dtype == np.float64):
            theirs = _theirs(hp, params, grads, proj_type, lr)
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2, "the reference barely moved the parameters"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} with {hp}"


@pytest.mark.parametrize(("b1", "proj_type"), [(None, "std"), (0.9, "reverse_std")])
def test_matches_galore_torch_GaLoreAdafactor_without_the_parameter_scale(b1: float | None, proj_type: str) -> None:
    """Adafactor's relative step (no learning rate) inside GaLore, as GaLoreAdafactor with ``scale_parameter=False``;
    with it, the two read the parameters' RMS of different matrices (galore's docstring), and part."""
    scale = 0.5
    params, grads = parity.random_problem(SHAPES, 11, np.float64)
    matrices = {k: k in MATRICES for k in params}
    ours, theirs = {}, {}
    for scale_parameter in (False, True):
        with jax.enable_x64(True):
            inner = adaopt.adafactor(b1=b1, scale_parameter=scale_parameter)
            tx = adaopt.galore(
                inner, rank=RANK, update_proj_gap=GAP, scale=scale, proj_type=proj_type, galore_mask=matrices
            )
            ours[scale_parameter] = parity.run_adaopt(tx, params, grads)
        tensors = {k: torch.tensor(v) for k, v in params.items()}
        projection = {"rank": RANK, "update_proj_gap": GAP, "scale": scale, "proj_type": proj_type}
        with _projector(float64=True):
            opt = galore_torch.GaLoreAdafactor(
                [
                    {"params": [tensors[k] for k in MATRICES], **projection},
                    {"params": [tensors[k] for k in sorted(tensors) if k not in MATRICES]},
                ],
                beta1=b1, scale_parameter=scale_parameter,
            )  # fmt: skip
            theirs[scale_parameter] = parity._torch_trajectory(opt, tensors, None, grads)
    assert parity.relative_error(ours[False], theirs[False]) < 1e-10, parity.relative_error(ours[False], theirs[False])
    assert parity.relative_error(ours[True], theirs[True]) > 1e-4


def test_the_comparison_sees_the_refreshes() -> None:
    """Sharp: refreshing the projection every 26 steps instead of 25 is far from the reference."""
    hp = _draw(0, False)
    params, grads = parity.random_problem(SHAPES, 1, np.float64)
    with jax.enable_x64(True):
        matrices = {k: k in MATRICES for k in params}
        tx = adaopt.galore_adamw(
            hp["learning_rate"], hp["b1"], hp["b2"], hp["eps"], rank=RANK, update_proj_gap=GAP + 1,
            scale=hp["scale"], galore_mask=matrices,
        )  # fmt: skip
        ours = parity.run_adaopt(tx, params, grads)
        with _projector(float64=True):
            theirs = _theirs(hp, params, grads, "std", hp["learning_rate"])
    assert parity.relative_error(ours, theirs) > 1e-6


def test_the_inner_state_has_the_projected_shapes_and_the_rest_passes_through() -> None:
    params = {"w": jnp.zeros((16, 8)), "wide": jnp.zeros((6, 12)), "head": jnp.zeros((8, 3)), "b": jnp.zeros(8)}
    tx = adaopt.galore(adaopt.scale_by_adam(), rank=3, update_proj_gap=10, scale=1.0)
    state = tx.init(params)
    assert jax.tree.map(jnp.shape, state.inner_state.mu) == {
        "w": (16, 3),  # tall: projected from the right
        "wide": (3, 12),  # wide: from the left
        "head": (8, 3),  # its smaller side is not above the rank: as it is
        "b": (8,),
    }
    # Unprojected leaves get exactly the inner optimizer's updates.
    rng = np.random.default_rng(0)
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    updates, _ = jax.jit(tx.update)(grads, state)
    plain, _ = adaopt.scale_by_adam().update(grads, adaopt.scale_by_adam().init(params))
    for k in ("head", "b"):
        np.testing.assert_allclose(updates[k], plain[k], rtol=1e-6)
    # A projected update lies in the span of the gradient's top singular vectors.
    u, _, _ = np.linalg.svd(np.asarray(grads["wide"]))
    top = u[:, :3]
    np.testing.assert_allclose(top @ (top.T @ np.asarray(updates["wide"])), updates["wide"], atol=1e-5)


@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_an_empty_matrix_the_mask_chooses_passes_through(proj_type: str) -> None:
    """A (0, 3) matrix chosen by galore_mask has no subspace: its (empty) update is the inner optimizer's, and
    the other matrix is projected as without it (the SVD of an empty matrix failed in the first update)."""
    params = {"w": jnp.ones((6, 4)), "e": jnp.zeros((0, 3))}
    tx = adaopt.galore_adamw(1e-3, rank=2, update_proj_gap=1, proj_type=proj_type, galore_mask={"w": True, "e": True})
    alone = adaopt.galore_adamw(1e-3, rank=2, update_proj_gap=1, proj_type=proj_type, galore_mask={"w": True})
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32), "e": jnp.zeros((0, 3))}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}), {"w": params["w"]})
    assert updates["e"].shape == (0, 3)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_the_projection_is_refreshed_every_gap_steps_only() -> None:
    tx = adaopt.galore(optax.identity(), rank=2, update_proj_gap=3, scale=1.0)
    params = {"w": jnp.zeros((6, 5))}
    state = tx.init(params)
    rng = np.random.default_rng(1)
    bases = []
    for _ in range(7):
        _, state = tx.update({"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}, state)
        bases.append(np.asarray(state.right["w"]))
    changed = [not np.array_equal(a, b) for a, b in itertools.pairwise(bases)]
    assert changed == [False, False, True, False, False, True]  # counts 3 and 6 refresh


def test_the_signs_are_canonical() -> None:
    """The same gradient, negated: the same basis (the singular vectors' signs do not follow the SVD's)."""
    tx = adaopt.galore(optax.identity(), rank=3, update_proj_gap=1, scale=1.0, proj_type="full")
    g = jnp.asarray(np.random.default_rng(2).normal(size=(7, 5)), jnp.float32)
    state = tx.init({"w": g})
    _, a = tx.update({"w": g}, state)
    _, b = tx.update({"w": -g}, state)
    np.testing.assert_allclose(a.left["w"], b.left["w"], atol=1e-6)
    np.testing.assert_allclose(a.right["w"], b.right["w"], atol=1e-6)
    for basis, axis in ((np.asarray(a.left["w"]), 0), (np.asarray(a.right["w"]), 1)):
        index = np.expand_dims(np.argmax(np.abs(basis), axis=axis), axis)
        assert np.all(np.take_along_axis(basis, index, axis=axis) > 0)


def test_under_jit_it_compiles_once() -> None:
    tx = adaopt.galore_adamw(1e-3, rank=2, update_proj_gap=2)
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    for _ in range(5):
        _, state = step(params, state, params)
    assert step._cache_size() == 1


def test_complex_matrices_are_refused_naming_the_leaf() -> None:
    params = {"z": jnp.ones((4, 4), jnp.complex64)}
    with pytest.raises(TypeError, match=r"complex matrix at \['z'\]"):
        adaopt.galore(optax.identity(), rank=2).init(params)


def test_a_gradient_of_another_shape_is_a_clear_error() -> None:
    tx = adaopt.galore(optax.identity(), rank=2, update_proj_gap=1, scale=1.0)
    state = tx.init({"w": jnp.ones((6, 4))})
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['w'\] have shape \(6, 5\).*a matrix of 4 columns"):
        tx.update({"w": jnp.ones((6, 5))}, state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be an integer in \[1, "),
        ({"update_proj_gap": 0}, r"update_proj_gap must be an integer in \[1, "),
        ({"scale": 0.0}, r"scale must be a finite number in \(0.0, inf\), got 0.0"),
        ({"proj_type": "svd"}, r"proj_type must be one of \('std', 'reverse_std', 'left', 'right', 'full'\)"),
        ({"min_dim": 0}, r"min_dim must be an integer in \[1, "),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=match):
        adaopt.galore_adamw(**kwargs)


@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_sharded_matrices_are_projected_where_their_shards_are(proj_type: str) -> None:
    """On the (4, 2) mesh of tests/test_sharding.py (a matrix split by rows, one by rows and columns): the bases are
    split as the matrix's rows (U) and columns (V^T), the projected gradient and the inner optimizer's moments as the
    side that is not projected, so that only the SVD gathers a gradient whole. The steps are the unsharded ones, in
    float64: in float32 the sums across shards round otherwise, and Adam's first steps make sign-sized steps of the
    full projection's off-diagonal entries, rounding noise (1e-3 of the displacement apart; 4e-14 in float64)."""
    tx = adaopt.galore_adamw(1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, proj_type=proj_type)
    host = {k: x.astype(np.float64) for k, x in test_sharding._host_params().items()}
    mesh = test_sharding._mesh()
    with jax.enable_x64(True):
        _, want, _ = test_sharding._train(tx, jax.device_put(host, jax.devices()[0]))
        with jax.set_mesh(mesh):
            shardings = {k: NamedSharding(mesh, spec) for k, spec in test_sharding.SPECS.items()}
            _, got, state = test_sharding._train(tx, jax.device_put(host, shardings))
    on_left, on_right = {"std": (False, True), "left": (True, False), "full": (True, True)}[proj_type]  # tall ones
    bases, moments = (optax.tree.get(state, "left"), optax.tree.get(state, "right")), optax.tree.get(state, "nu")
    for k in ("w", "k"):
        rows, cols = (*test_sharding.SPECS[k], None, None)[:2]
        placed = {
            "U": (bases[0][k], P(rows, None) if on_left else None),
            "V^T": (bases[1][k], P(None, cols) if on_right else None),
            "nu": (moments[k], P(None if on_left else rows, None if on_right else cols)),
        }
        for name, (x, spec) in placed.items():
            assert (spec is None) == isinstance(x, optax.MaskedNode), (k, name)
            if spec is not None:
                assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), (k, name, x.sharding.spec)
    for k in want:
        assert got[k].sharding.is_equivalent_to(shardings[k], got[k].ndim)
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10, atol=1e-12)


def test_the_default_mask_of_an_equinox_module_is_not_called() -> None:
    """The default mask is a tree of the parameters' structure: for an Equinox module, a module of booleans, whose
    class is callable. It was called as a mask function (the model's forward pass on booleans)."""
    import equinox as eqx

    model = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = adaopt.galore_adamw(1e-2, rank=2, min_dim=2)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(4)) ** 2))(model)
    updates, state = tx.update(grads, tx.init(params), params)
    projected = [leaf for leaf in jax.tree.leaves(state) if np.shape(leaf) in ((2, 8), (8, 2), (2, 4), (4, 2))]
    assert projected and all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
