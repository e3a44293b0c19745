"""Muon against its references, step for step, and what it does with every kind of leaf.

The references run Newton–Schulz in bfloat16. For the float64 and float32 comparisons their own
iteration is patched in the test: its source, with the bfloat16 cast replaced by a copy in the
gradient's dtype (the author's ``muon.zeropower_via_newtonschulz5``, torch's
``torch.optim._muon._zeropower_via_newtonschulz``). ``ns_dtype=jnp.bfloat16`` is compared with the
unpatched packages within bfloat16's precision.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import heavyball
import jax
import jax.numpy as jnp
import muon as muon_package
import numpy as np
import optax
import pytest
import torch
import torch.optim._muon as torch_muon

import adaopt
from tests import parity, references  # references: heavyball runs eager

SPEC = adaopt.REGISTRY["muon"]
TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}
# The author's package takes ndim >= 2 (3-d: a batch of matrices); "embed" goes to the auxiliary AdamW.
PACKAGE_SHAPES = {"w": (16, 8), "t": (2, 6, 4), "embed": (12, 4), "b": (8,), "s": ()}
TORCH_SHAPES = {"w": (16, 8), "u": (6, 10)}  # torch.optim.Muon takes 2-d parameters only


@contextmanager
def _newton_schulz_in_the_gradients_dtype() -> Iterator[None]:
    """Both references' Newton–Schulz, from their own source, with ``.bfloat16()`` replaced by ``.clone()``."""
    originals = [
        (muon_package, "zeropower_via_newtonschulz5"),
        (torch_muon, "_zeropower_via_newtonschulz"),
    ]
    saved = [getattr(module, name) for module, name in originals]
    try:
        for module, name in originals:
            source = inspect.getsource(getattr(module, name))
            assert source.count(".bfloat16()") == 1, f"{module.__name__}.{name} changed: review this patch"
            namespace = dict(vars(module))
            exec(source.replace(".bfloat16()", ".clone()"), namespace)
            setattr(module, name, namespace[name])
        yield
    finally:
        for (module, name), original in zip(originals, saved, strict=True):
            setattr(module, name, original)


def _draw(seed: int, weight_decay: bool) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(3e-3), np.log(3e-2))))
    hp["adam_learning_rate"] = float(np.exp(rng.uniform(np.log(1e-4), np.log(3e-3))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    hp["adam_weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    return hp


def _torch_run(opt: torch.optim.Optimizer, tensors: dict, grads: dict, lr: Any = None) -> dict:
    names = sorted(tensors)
    trajectory: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for t in range(len(grads[names[0]])):
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = float(lr(t))
        for k in names:
            tensors[k].grad = torch.tensor(grads[k][t])  # a fresh tensor: the package changes p.grad in place
        opt.step()
        for k in names:
            trajectory[k].append(tensors[k].detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def _package(hp: dict, params: dict, grads: dict) -> dict:
    """``muon.SingleDeviceMuonWithAuxAdam`` with adaopt's default rule for the groups."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    matrices = adaopt.default_muon_mask(params)
    opt = muon_package.SingleDeviceMuonWithAuxAdam(
        [
            {
                "params": [tensors[k] for k in sorted(tensors) if matrices[k]], "use_muon": True,
                "lr": hp["learning_rate"], "momentum": hp["momentum"], "weight_decay": hp["weight_decay"],
            },
            {
                "params": [tensors[k] for k in sorted(tensors) if not matrices[k]], "use_muon": False,
                "lr": hp["adam_learning_rate"], "betas": (hp["adam_b1"], hp["adam_b2"]), "eps": hp["adam_eps"],
                "weight_decay": hp["adam_weight_decay"],
            },
        ]
    )  # fmt: skip
    return _torch_run(opt, tensors, grads)


def _torch(hp: dict, params: dict, grads: dict, lr: Any = None, **options: Any) -> dict:
    """``torch.optim.Muon``; ``lr``, a schedule, overrides the learning rate at every step."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = torch.optim.Muon(
        [tensors[k] for k in sorted(tensors)], lr=hp["learning_rate"], weight_decay=hp["weight_decay"],
        momentum=hp["momentum"], eps=hp["eps"], **options,
    )  # fmt: skip
    return _torch_run(opt, tensors, grads, lr)


def _adaopt_package(hp: dict, **options: Any) -> optax.GradientTransformation:
    keys = ("learning_rate", "momentum", "weight_decay", "adam_learning_rate", "adam_b1", "adam_b2", "adam_eps")
    return adaopt.muon(**{k: hp[k] for k in keys}, adam_weight_decay=hp["adam_weight_decay"], **options)


def _adaopt_torch(hp: dict, lr: Any = None, **options: Any) -> optax.GradientTransformation:
    keys = ("learning_rate", "momentum", "weight_decay", "eps")
    return adaopt.muon(
        **{**{k: hp[k] for k in keys}, **({"learning_rate": lr} if lr else {})}, eps_mode="max", **options
    )


PACKAGE_CASES = [(False, np.float64), (True, np.float64), (True, np.float32)]


@pytest.mark.parametrize(("weight_decay", "dtype"), PACKAGE_CASES, ids=lambda x: str(getattr(x, "__name__", x)))
def test_matches_muon_SingleDeviceMuonWithAuxAdam(weight_decay: bool, dtype: Any) -> None:
    """The author's package: Muon on the hidden matrices (a 3-d leaf as a batch), AdamW on an embedding, a bias, a scalar."""
    seed = zlib.crc32(f"muon/package/{weight_decay}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(PACKAGE_SHAPES, seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        ours = parity.run_adaopt(_adaopt_package(hp), params, grads)
    with _newton_schulz_in_the_gradients_dtype():
        theirs = _package(hp, params, grads)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[dtype]


TORCH_CASES = [
    ("original", True, False, np.float64, False),
    ("match_rms_adamw", True, True, np.float64, True),
    ("original", False, True, np.float64, False),
    ("match_rms_adamw", True, True, np.float32, False),
]


@pytest.mark.parametrize(("adjust_lr", "nesterov", "weight_decay", "dtype", "schedule"), TORCH_CASES)
def test_matches_torch_optim_Muon(
    adjust_lr: str, nesterov: bool, weight_decay: bool, dtype: Any, schedule: bool
) -> None:
    seed = zlib.crc32(f"muon/torch/{adjust_lr}/{nesterov}/{weight_decay}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(TORCH_SHAPES, seed + 1, dtype)
    peak = hp["learning_rate"]
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10) if schedule else None
    with jax.enable_x64(dtype == np.float64):
        # optax evaluates a schedule in float32 at an int32 count: evaluated in the case's dtype, as torch sees it.
        rate = (lambda c: lr(jnp.asarray(c, dtype))) if lr else None
        tx = _adaopt_torch(hp, rate, nesterov=nesterov, adjust_lr=adjust_lr)
        ours = parity.run_adaopt(tx, params, grads)
    with _newton_schulz_in_the_gradients_dtype():
        theirs = _torch(hp, params, grads, lr, nesterov=nesterov, adjust_lr_fn=adjust_lr)
    assert parity.relative_error(ours, theirs) <= TOLERANCE[dtype]


def test_the_comparison_is_sharp() -> None:
    """A momentum off by 1e-4 fails it; and the patched references agree with each other."""
    hp = _draw(0, True)
    hp["adam_weight_decay"] = hp["weight_decay"]
    params, grads = parity.random_problem({"w": (16, 8)}, 1, np.float64, steps=50)
    with _newton_schulz_in_the_gradients_dtype():
        theirs = _torch(hp, params, grads)
        package = _package({**hp, "eps": 1e-7}, params, grads)
        with_eps = _torch({**hp, "eps": 1e-7}, params, grads)
    with jax.enable_x64(True):
        off = parity.run_adaopt(_adaopt_torch({**hp, "momentum": hp["momentum"] - 1e-4}), params, grads)
    assert parity.relative_error(off, theirs) > 1e-6
    # norm + eps (the package) and max(norm, eps) (torch): alike to float64's tolerance, not bitwise.
    assert 0 < parity.relative_error(package, with_eps) < TOLERANCE[np.float64]


def test_bfloat16_iteration_follows_the_unpatched_references() -> None:
    """``ns_dtype=jnp.bfloat16`` against the packages as they ship (float32 parameters, bfloat16 iteration).

    torch rounds once per addmm, as adaopt does: the same trajectory to float32's precision (the
    float32 iteration is off by bfloat16's). The author's package rounds after each product and
    each sum: within bfloat16's precision.
    """
    hp = _draw(1, True)
    params, grads = parity.random_problem(TORCH_SHAPES, 2, np.float32, steps=10)
    theirs = _torch(hp, params, grads)
    assert (
        parity.relative_error(parity.run_adaopt(_adaopt_torch(hp, ns_dtype=jnp.bfloat16), params, grads), theirs) < 1e-5
    )
    assert parity.relative_error(parity.run_adaopt(_adaopt_torch(hp), params, grads), theirs) > 1e-5
    params, grads = parity.random_problem(PACKAGE_SHAPES, 2, np.float32, steps=10)
    ours = parity.run_adaopt(_adaopt_package(hp, ns_dtype=jnp.bfloat16), params, grads)
    assert parity.relative_error(ours, _package(hp, params, grads)) < 3e-3


def test_newton_schulz_is_optax_s_with_eps_added() -> None:
    """``optax.contrib.scale_by_muon`` without momentum is this block with ``eps_mode="add"`` and no shape scaling
    (its other differences, debiased momentum and scaling by fan-out over fan-in, are in ``adaopt.muon``'s docstring)."""
    with jax.enable_x64(True):
        g = jnp.asarray(np.random.default_rng(3).normal(size=(16, 8)))
        theirs_tx = optax.contrib.scale_by_muon(beta=0.0, eps=1e-8, nesterov=False)
        ours_tx = adaopt.scale_by_muon(0.0, nesterov=False, eps=1e-8, adjust_lr=None)
        theirs, _ = theirs_tx.update(g, theirs_tx.init(g))
        ours, _ = ours_tx.update(g, ours_tx.init(g))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10, atol=1e-12)


# What each kind of leaf does.


def test_the_default_rule_routes_each_kind_of_leaf() -> None:
    params = {
        "embed": {"embedding": jnp.ones((1000, 8))},  # very large, 2-d: an embedding, to AdamW
        "wte": jnp.ones((50, 8)),
        "blocks": [{"attn": {"kernel": jnp.ones((8, 8))}, "norm": {"scale": jnp.ones(8)}}],
        "conv": jnp.ones((3, 3, 4, 4)),  # 4-d: a batch of 4x4 matrices, to Muon
        "bias": jnp.ones(8),  # 1-d
        "temperature": jnp.ones(()),  # 0-d
        "lm_head": {"kernel": jnp.ones((8, 50))},
        "value_head": jnp.ones((8, 1)),
        "column": jnp.ones((8, 1)),  # one axis longer than 1: a vector
        "bn": {"scale": jnp.ones((1, 1, 1, 8))},  # Haiku's batch-norm gain: a vector
        "frozen": None,
    }
    assert adaopt.default_muon_mask(params) == {
        "embed": {"embedding": False}, "wte": False,
        "blocks": [{"attn": {"kernel": True}, "norm": {"scale": False}}],
        "conv": True, "bias": False, "temperature": False, "lm_head": {"kernel": False}, "value_head": False,
        "column": False, "bn": {"scale": False}, "frozen": None,
    }  # fmt: skip


def test_the_default_rule_reads_flat_dotted_names() -> None:
    """A flat dictionary keyed by torch's named_parameters() (as the README's torch recipe builds) or Haiku's module
    names routes its heads and embeddings as the nested tree does."""
    params = {
        "lm_head.weight": jnp.ones((50, 8)),
        "head.weight": jnp.ones((5, 8)),
        "classifier.weight": jnp.ones((5, 8)),
        "transformer.wte.weight": jnp.ones((50, 8)),
        "value_head.weight": jnp.ones((1, 8)),
        "blocks.0.attn.c_attn.weight": jnp.ones((24, 8)),
        "net/~/linear_0": {"w": jnp.ones((8, 8))},
        "model/token_embed": {"embeddings": jnp.ones((50, 8))},
        "overhead.weight": jnp.ones((8, 8)),
    }
    assert adaopt.default_muon_mask(params) == {
        "lm_head.weight": False, "head.weight": False, "classifier.weight": False, "transformer.wte.weight": False,
        "value_head.weight": False, "blocks.0.attn.c_attn.weight": True, "net/~/linear_0": {"w": True},
        "model/token_embed": {"embeddings": False}, "overhead.weight": True,
    }  # fmt: skip


STACKED = {  # a linen model scanned over 6 layers, with Flax's attention; Llama's head; BERT's hidden output layer
    "ScanBlock_0": {
        "LayerNorm_0": {"scale": jnp.ones((6, 16)), "bias": jnp.ones((6, 16))},
        "Dense_0": {"kernel": jnp.ones((6, 16, 32)), "bias": jnp.ones((6, 32))},
        "attn": {"query": {"kernel": jnp.ones((6, 16, 4, 4)), "bias": jnp.ones((6, 4, 4))}},
    },
    "h.0.ln_1.weight": jnp.ones((2, 16)),
    "model.layers.0.input_layernorm.weight": jnp.ones((2, 16)),  # stacked torch-style
    "mlp/~/linear_0": {"w": jnp.ones((16, 16)), "b": jnp.ones((2, 16))},
    "output.weight": jnp.ones((50, 16)),
    "bert.encoder.layer.0.attention.output.dense.weight": jnp.ones((16, 16)),
    "lnk": {"weight": jnp.ones((16, 16))},
}
STACKED_MUON = {
    "ScanBlock_0": {
        "LayerNorm_0": {"scale": False, "bias": False},
        "Dense_0": {"kernel": True, "bias": False},
        "attn": {"query": {"kernel": True, "bias": False}},
    },
    "h.0.ln_1.weight": False, "model.layers.0.input_layernorm.weight": False,
    "mlp/~/linear_0": {"w": True, "b": False}, "output.weight": False,
    "bert.encoder.layer.0.attention.output.dense.weight": True, "lnk": {"weight": True},
}  # fmt: skip


def test_biases_and_norms_stay_vectors_whatever_their_shape() -> None:
    """Stacked for a scan over layers, (layers, d), or Flax's (heads, head_dim) attention biases, biases and norms'
    gains had two dimensions longer than 1 and went to Muon (each layer's bias orthogonalised against the others');
    Llama's head, "output.weight", went there too."""
    assert adaopt.default_muon_mask(STACKED) == STACKED_MUON


def test_an_nnx_variable_is_named_by_its_attribute() -> None:
    """An NNX state's leaf paths end in the variable's .value, which hid the leaf's name (its attention biases,
    (heads, head_dim), went to Muon) and its module's (the head "output")."""
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16, decode=False, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.output = nnx.Linear(16, 50, rngs=rngs)

    mask = adaopt.default_muon_mask(nnx.state(Model(nnx.Rngs(0)), nnx.Param))
    chosen = {jax.tree_util.keystr(path): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in chosen.items() if v} == {
        f"['attn']['{m}']['kernel'].value" for m in ("query", "key", "value", "out")
    }


def test_auxiliary_leaves_take_exactly_adamw() -> None:
    """0-d, 1-d and embedding leaves: adaopt.adamw's steps, with Muon's matrices beside them."""
    params, grads = parity.random_problem({"embed": (30, 4), "b": (4,), "s": (), "w": (4, 4)}, 4, np.float32, steps=5)
    ours = parity.run_adaopt(adaopt.muon(0.02, adam_learning_rate=1e-3, weight_decay=0.1), params, grads)
    aux = {k: params[k] for k in ("embed", "b", "s")}
    adamw = parity.run_adaopt(adaopt.adamw(1e-3, 0.9, 0.95, 1e-10, weight_decay=0.1), aux, {k: grads[k] for k in aux})
    for k in aux:
        np.testing.assert_array_equal(ours[k], adamw[k])


def test_a_3d_leaf_is_a_batch_of_matrices() -> None:
    params, grads = parity.random_problem({"t": (3, 6, 4)}, 5, np.float32, steps=4)
    batched = parity.run_adaopt(adaopt.muon(0.02), params, grads)
    for i in range(3):
        single = parity.run_adaopt(adaopt.muon(0.02), {"t": params["t"][i]}, {"t": grads["t"][:, i]})
        np.testing.assert_allclose(batched["t"][:, i], single["t"], rtol=1e-6, atol=1e-7)


def test_matrix_axes_read_a_leaf_in_any_layout() -> None:
    """A Flax (in, out) kernel with MatrixAxes(inputs=-2, outputs=-1) steps as torch's (out, in) transpose does by
    default (the shape scale of a wide matrix included), and an attention kernel (in, heads, head_dim) as the
    (heads * head_dim, in) matrix, or per head; mixed in one tree through a function of the parameters."""
    shapes = {"dense": (6, 12), "query": (8, 2, 3), "heads": (8, 2, 3)}
    params, grads = parity.random_problem(shapes, 7, np.float32, steps=4)
    views = {
        "dense": adaopt.MatrixAxes(inputs=-2, outputs=-1),
        "query": adaopt.MatrixAxes(inputs=0, outputs=(1, 2)),
        "heads": adaopt.MatrixAxes(inputs=0, outputs=2),
    }
    # Under muon the function sees Muon's leaves, the others optax.MaskedNode: mapped over, they stay so.
    by_name = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: views[path[0].key], tree)
    ours = parity.run_adaopt(adaopt.muon(0.02, matrix_view=by_name), params, grads)
    torch_layout = {
        "dense": (lambda x: x.T, lambda y: y.T),
        "query": (lambda x: x.reshape(8, 6).T, lambda y: y.T.reshape(8, 2, 3)),
        "heads": (lambda x: x.transpose(1, 2, 0), lambda y: y.transpose(2, 0, 1)),  # (heads, head_dim, in)
    }
    for name, (to_torch, back) in torch_layout.items():
        theirs = parity.run_adaopt(
            adaopt.muon(0.02), {name: to_torch(params[name])}, {name: np.stack([to_torch(g) for g in grads[name]])}
        )
        np.testing.assert_allclose(ours[name], np.stack([back(y) for y in theirs[name]]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"out of range for the leaf at \['w'\]"):
        adaopt.scale_by_muon(matrix_view=adaopt.MatrixAxes(inputs=0, outputs=2)).init({"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match="names an axis twice"):
        adaopt.scale_by_muon(matrix_view=adaopt.MatrixAxes(inputs=0, outputs=-2)).init({"w": jnp.ones((3, 4))})
    with pytest.raises(adaopt.HyperparameterError, match="inputs must be an axis"):
        adaopt.MatrixAxes(inputs=(), outputs=0)
    with pytest.raises(adaopt.HyperparameterError, match="matrix_view"):
        adaopt.muon(matrix_view="rows")


def test_a_users_mask_overrides_the_rule() -> None:
    """Everything to AdamW: adaopt.adamw's trajectory; a 1-d leaf sent to Muon: a clear error."""
    params, grads = parity.random_problem({"w": (6, 4), "b": (4,)}, 6, np.float32, steps=3)
    none = parity.run_adaopt(adaopt.muon(1e-3, muon_mask=lambda p: jax.tree.map(lambda _: False, p)), params, grads)
    adamw = parity.run_adaopt(adaopt.adamw(1e-3, 0.9, 0.95, 1e-10, weight_decay=0.0), params, grads)
    np.testing.assert_array_equal(none["w"], adamw["w"])
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(4,\)"):
        adaopt.muon(muon_mask={"w": True, "b": True}).init(params)


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"Muon does not take complex parameters.*\['w'\]"):
        adaopt.muon().init({"w": jnp.ones((3, 3), jnp.complex64)})


# heavyball's MuonAdamW: every leaf of two or more axes (flattened to a matrix) by Muon, the others by its Adam.

HEAVYBALL_SHAPES = {"w": (16, 8), "t": (4, 3, 2), "embed": (12, 4), "b": (8,), "s": ()}
HEAVYBALL = {
    "eps": 1e-7, "eps_mode": "max", "nesterov_form": "add", "matrix_view": "flatten",
    "ns_coefficients": adaopt.HEAVYBALL_NS_COEFFICIENTS, "adam_eps": 1e-8, "adam_eps_mode": "max",
}  # fmt: skip


def _heavyball(hp: dict, params: dict, grads: dict, cls: Any = None) -> dict:
    """``heavyball.MuonAdamW`` (or ``cls``), eager, its state and scalars in float64."""
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    with parity.default_dtype(torch.float64):
        opt = references.heavyball_optimizer(
            cls or heavyball.MuonAdamW, [tensors[k] for k in sorted(tensors)], lr=hp["learning_rate"],
            betas=(hp["momentum"], hp["adam_b2"]), weight_decay=hp["weight_decay"],
        )  # fmt: skip
        return _torch_run(opt, tensors, grads)


def _adaopt_heavyball(hp: dict, **options: Any) -> optax.GradientTransformation:
    return adaopt.muon(
        hp["learning_rate"], hp["momentum"], hp["weight_decay"], adam_b1=hp["momentum"], adam_b2=hp["adam_b2"],
        muon_mask=lambda tree: jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree), **{**HEAVYBALL, **options},
    )  # fmt: skip


def test_matches_heavyball_MuonAdamW() -> None:
    """Its Newton-Schulz runs in the parameters' dtype (float64 here): the comparison is exact to rounding."""
    hp = _draw(zlib.crc32(b"muon/heavyball"), True)
    params, grads = parity.random_problem(HEAVYBALL_SHAPES, 11, np.float64)
    theirs = _heavyball(hp, params, grads)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(_adaopt_heavyball(hp), params, grads)
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2
    assert parity.relative_error(ours, theirs) <= 1e-10


@pytest.mark.parametrize(
    "flipped",
    [{"nesterov_form": "lerp"}, {"matrix_view": "batch"}, {"ns_coefficients": (3.4445, -4.775, 2.0315)},
     {"adam_eps_mode": "add"}],
    ids=lambda d: next(iter(d)),
)  # fmt: skip
def test_each_heavyball_option_is_needed(flipped: dict) -> None:
    hp = {**_draw(zlib.crc32(b"muon/heavyball"), True), "adam_b2": 0.9}
    params, grads = parity.random_problem(HEAVYBALL_SHAPES, 12, np.float64, steps=60)
    grads = {k: g * (1e-4 if k in ("b", "s") else 1.0) for k, g in grads.items()}  # small: Adam's eps floor shows
    theirs = _heavyball(hp, params, grads)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(_adaopt_heavyball(hp, **flipped), params, grads)
    assert parity.relative_error(ours, theirs) > 1e-8


def test_matches_heavyball_Muon() -> None:
    """heavyball's Muon: its 0-d and 1-d leaves take the momentum and look-ahead alone (``aux="momentum"``)."""
    hp = _draw(zlib.crc32(b"muon/heavyball-muon"), True)
    params, grads = parity.random_problem(HEAVYBALL_SHAPES, 13, np.float64)
    theirs = _heavyball(hp, params, grads, heavyball.Muon)
    with jax.enable_x64(True):
        ours = parity.run_adaopt(_adaopt_heavyball(hp, aux="momentum", adam_learning_rate=None), params, grads)
        adamw = parity.run_adaopt(_adaopt_heavyball(hp), params, grads)
    assert parity.relative_error(ours, theirs) <= 1e-10
    assert parity.relative_error(adamw, theirs) > 1e-6  # the auxiliary AdamW is not what it does


def test_a_coefficient_schedule_runs_one_triple_per_iteration() -> None:
    """Five equal triples are the single triple; a schedule of the wrong length is refused."""
    x = jax.random.normal(jax.random.key(0), (6, 4))
    single = adaopt.newton_schulz(x, (3.4445, -4.775, 2.0315), 5)
    np.testing.assert_array_equal(adaopt.newton_schulz(x, [(3.4445, -4.775, 2.0315)] * 5, 5), single)
    assert not np.allclose(adaopt.newton_schulz(x, adaopt.HEAVYBALL_NS_COEFFICIENTS, 5), single, atol=1e-3)
    with pytest.raises(adaopt.HyperparameterError, match="ns_steps is 4"):
        adaopt.muon(ns_coefficients=adaopt.HEAVYBALL_NS_COEFFICIENTS, ns_steps=4)


def test_no_iteration_is_the_normalised_momentum() -> None:
    """ns_steps = 0 (allowed, [0, 99]) takes X_0 = M / ||M||: the update is the momentum scaled to unit norm."""
    g = {"w": jax.random.normal(jax.random.key(1), (6, 4))}
    tx = adaopt.scale_by_muon(momentum=0.9, nesterov=False, ns_steps=0, eps=0.0, adjust_lr=None)
    updates, _ = tx.update(g, tx.init(g))
    momentum = 0.1 * g["w"]  # the first step's momentum, (1 - 0.9) g
    np.testing.assert_allclose(updates["w"], momentum / jnp.linalg.norm(momentum), rtol=1e-6)


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ns_steps": 2.5}, "ns_steps"), ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"adjust_lr": "match_rms"}, "adjust_lr"), ({"eps_mode": "clamp"}, "eps_mode"),
        ({"ns_dtype": jnp.int8}, "ns_dtype"), ({"momentum": 0.0}, "nesterov"),
        ({"nesterov_form": "sum"}, "nesterov_form"), ({"matrix_view": "reshape"}, "matrix_view"),
        ({"adam_eps_mode": "clamp"}, "adam_eps_mode"), ({"aux": "sgd"}, "aux"), ({"ns_coefficients": ((1.0, 2.0, 3.0), (1.0,))}, "ns_coefficients"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.muon(**kwargs)
