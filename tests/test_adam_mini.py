"""Adam-mini against the authors' package on a transformer's names, and its rule of blocks leaf by leaf.

``tests/test_parity.py`` runs the registry's comparison with ``adam_mini.Adam_mini`` on parity's
tree, whose names select no block of its rule (one second moment per tensor). Here the tree is a
small transformer layer with torch's names and ``(out, in)`` layout: an embedding (one second
moment per token), query and key projections of 4 heads of size 2 with grouped-query keys (2 kv
heads: one per head), value, output and MLP projections and an output layer (one per output
neuron), biases (plain Adam), norms and a scalar (one per tensor). ``Adam_mini`` takes the dotted
names as written here; adaopt reads the same names from the paths of the nested tree built from
them. The package computes in the parameters' dtype: float64 and float32 are both compared
as they are, 200 steps, the whole trajectory.
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
from adam_mini import Adam_mini
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from adaopt import AxisBlocks
from tests import parity, test_sharding

SPEC = adaopt.REGISTRY["adam_mini"]
TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}
DIM, N_HEADS = 8, 4  # head size 2
SHAPES = {
    "model.embed_tokens.weight": (11, 8),
    "model.layers.0.input_norm.weight": (8,),
    "model.layers.0.attn.q_proj.weight": (8, 8),
    "model.layers.0.attn.q_proj.bias": (8,),
    "model.layers.0.attn.k_proj.weight": (4, 8),  # 2 kv heads
    "model.layers.0.attn.v_proj.weight": (4, 8),
    "model.layers.0.attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.up.weight": (16, 8),
    "model.layers.0.mlp.up.bias": (16,),
    "model.layers.0.mlp.down.weight": (8, 16),
    "model.norm.weight": (8,),
    "model.logit_scale": (),
    "lm_head.weight": (11, 8),
}
# The blocks of the reference's rule for each name above, for adaopt's default rule to meet.
EXPECTED_BLOCKS = {
    "model.embed_tokens.weight": AxisBlocks(0),
    "model.layers.0.input_norm.weight": "tensor",
    "model.layers.0.attn.q_proj.weight": AxisBlocks(0, 2),
    "model.layers.0.attn.q_proj.bias": "coordinate",
    "model.layers.0.attn.k_proj.weight": AxisBlocks(0, 2),
    "model.layers.0.attn.v_proj.weight": AxisBlocks(0),
    "model.layers.0.attn.o_proj.weight": AxisBlocks(0),
    "model.layers.0.mlp.up.weight": AxisBlocks(0),
    "model.layers.0.mlp.up.bias": "coordinate",
    "model.layers.0.mlp.down.weight": AxisBlocks(0),
    "model.norm.weight": "tensor",
    "model.logit_scale": "tensor",
    "lm_head.weight": AxisBlocks(0),
}


def nest(flat: dict[str, Any]) -> Any:
    """The nested tree of dotted names: dicts by key, lists where every key is an index."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if all(k.isdigit() for k in node):
            return [lists(node[k]) for k in sorted(node, key=int)]
        return {k: lists(v) for k, v in node.items()}

    return lists(tree)


def flatten(tree: Any) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(p, simple=True, separator="."): v for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _draw(seed: int, weight_decay: bool) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    hp = {name: r.sample(float(rng.uniform())) for name, r in SPEC.hyperparameters.items()}
    hp["learning_rate"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-2))))
    hp["weight_decay"] = float(rng.uniform(1e-3, 0.1)) if weight_decay else 0.0
    return hp


def _theirs(hp: dict, params: dict, grads: dict, lr: Any) -> dict:
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}  # it skips requires_grad=False
    opt = Adam_mini(
        list(tensors.items()), lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], dim=DIM, n_heads=N_HEADS, n_kv_heads=2, verbose=False,
    )  # fmt: skip
    return parity._torch_trajectory(opt, tensors, lr, grads)


def _ours(hp: dict, params: dict, grads: dict, lr: Any, **options: Any) -> dict:
    tx = adaopt.adam_mini(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], dim=DIM, n_heads=N_HEADS,
        weight_decay_mask=adaopt.adam_mini_decay_mask, **options,
    )  # fmt: skip
    return flatten(parity.run_adaopt(tx, nest(params), nest(grads)))


def _schedule(peak: float, dtype: Any) -> Any:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, 20, parity.STEPS, peak / 10)
    return lambda count: schedule(jnp.asarray(count, dtype))


# Three random draws: with weight decay and a schedule, and without either, in float64; float32 with decay.
CASES = [(True, True, np.float64), (False, False, np.float64), (True, False, np.float32)]


@pytest.mark.parametrize(("weight_decay", "schedule", "dtype"), CASES, ids=lambda x: str(getattr(x, "__name__", x)))
def test_matches_adam_mini_Adam_mini(weight_decay: bool, schedule: bool, dtype: Any) -> None:
    seed = zlib.crc32(f"adam_mini/{weight_decay}/{schedule}/{np.dtype(dtype).name}".encode())
    hp = _draw(seed, weight_decay)
    params, grads = parity.random_problem(SHAPES, seed + 1, dtype)
    with jax.enable_x64(dtype == np.float64):
        lr = _schedule(hp["learning_rate"], dtype) if schedule else hp["learning_rate"]
        ours = _ours(hp, params, grads, lr)
        theirs = _theirs(hp, params, grads, lr)
    assert sorted(ours) == sorted(theirs)
    moved = parity.relative_error(theirs, {k: np.broadcast_to(params[k], theirs[k].shape) for k in theirs})
    assert moved > 1e-2, "the reference barely moved the parameters"
    error = parity.relative_error(ours, theirs)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} with {hp}"


def test_the_comparison_sees_the_heads() -> None:
    """Sharp: one second moment per row (not per head) of the queries and keys is far from the reference."""
    hp = _draw(0, False)
    params, grads = parity.random_problem(SHAPES, 1, np.float64)
    with jax.enable_x64(True):
        rows = {"q_proj": AxisBlocks(0), "k_proj": AxisBlocks(0)}
        ours = _ours(hp, params, grads, hp["learning_rate"], blocks=rows)
    theirs = _theirs(hp, params, grads, hp["learning_rate"])
    assert parity.relative_error(ours, theirs) > 1e-6


def test_default_rule_is_the_references_on_a_transformers_names() -> None:
    params = nest({k: jnp.zeros(s) for k, s in SHAPES.items()})
    assert flatten(adaopt.default_adam_mini_blocks(params, dim=DIM, n_heads=N_HEADS)) == EXPECTED_BLOCKS
    state = optax.tree.get(adaopt.adam_mini(dim=DIM, n_heads=N_HEADS).init(params), "nu")
    shapes = {k: v.shape for k, v in flatten(state).items()}
    assert shapes["model.layers.0.attn.q_proj.weight"] == (4,)  # one per head
    assert shapes["model.layers.0.attn.k_proj.weight"] == (2,)  # one per kv head
    assert shapes["model.embed_tokens.weight"] == (11,) and shapes["lm_head.weight"] == (11,)
    assert shapes["model.layers.0.mlp.up.bias"] == (16,) and shapes["model.norm.weight"] == ()
    decayed = flatten(adaopt.adam_mini_decay_mask(params))
    assert {k for k, v in decayed.items() if not v} == {
        "model.layers.0.input_norm.weight",
        "model.layers.0.attn.q_proj.bias",
        "model.layers.0.mlp.up.bias",
        "model.norm.weight",
    }


def test_flax_layout_is_the_transposed_trajectory() -> None:
    """Flax's (in, out) kernels with output_axis=-1 follow torch's (out, in) with output_axis=0, transposed;
    an embedding is (vocab, features) in both."""
    hp = _draw(3, True)
    params, grads = parity.random_problem(SHAPES, 4, np.float64)
    transposed = {k: np.ndim(v) == 2 and "embed" not in k for k, v in params.items()}
    flip = lambda tree, steps: {k: np.swapaxes(v, -1, -2) if transposed[k] else v for k, v in tree.items()}
    with jax.enable_x64(True):
        torch_layout = _ours(hp, params, grads, hp["learning_rate"])
        flax_layout = _ours(hp, flip(params, False), flip(grads, True), hp["learning_rate"], output_axis=-1)
    assert parity.relative_error(flip(flax_layout, True), torch_layout) <= 1e-14
    assert any(transposed.values())


def test_rules_override_the_default_leaf_by_leaf() -> None:
    params = {"attn": {"query": {"kernel": jnp.zeros((8, 4, 2))}}, "mlp": {"kernel": jnp.zeros((8, 16))}}
    # A pattern for Flax's 3-d attention kernels (features, heads, head_dim); the MLP keeps the default rule.
    by_pattern = adaopt.adam_mini(blocks={"QUERY": AxisBlocks(1)}, output_axis=-1).init(params)
    nu = optax.tree.get(by_pattern, "nu")
    assert nu["attn"]["query"]["kernel"].shape == (4,) and nu["mlp"]["kernel"].shape == (16,)
    seen = []

    def rule(name: str, leaf: Any) -> Any:
        seen.append((name, jnp.shape(leaf)))
        return "coordinate" if name.startswith("mlp") else None

    nu = optax.tree.get(adaopt.adam_mini(blocks=rule).init(params), "nu")
    assert nu["mlp"]["kernel"].shape == (8, 16) and nu["attn"]["query"]["kernel"].shape == ()  # 3-d: one block
    assert seen == [("attn.query.kernel", (8, 4, 2)), ("mlp.kernel", (8, 16))]


def test_blocks_of_one_coordinate_are_adam() -> None:
    params, grads = parity.random_problem({"w": (5, 3), "b": (3,)}, 5, np.float64)
    with jax.enable_x64(True):
        mini = parity.run_adaopt(adaopt.adam_mini(1e-2, blocks={"": "coordinate"}, weight_decay=0.1), params, grads)
        adamw = parity.run_adaopt(adaopt.adamw(1e-2, weight_decay=0.1), params, grads)
    assert parity.relative_error(mini, adamw) <= 1e-14


def test_nnx_variables_are_named_by_their_attributes() -> None:
    """An NNX state's paths end in the variable's ``value``: the rule must not read it as a "value" projection."""
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.mlp = nnx.Linear(4, 6, rngs=rngs)
            self.proj = nnx.Linear(6, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    blocks = adaopt.default_adam_mini_blocks(nnx.state(model, nnx.Param), output_axis=-1)
    assert blocks["mlp"]["kernel"] == AxisBlocks(-1) and blocks["proj"]["kernel"] == "tensor"
    assert blocks["mlp"]["bias"] == "coordinate"


def test_linen_boxes_are_named_by_their_attributes() -> None:
    """A linen ``nn.Partitioned`` (or ``nn.LogicallyPartitioned``) leaf's path ends in the box's ``value``: every boxed
    kernel was read as a "value" projection, one second moment per row where the unboxed kernel has one."""
    import flax.linen as nn

    kernel, bias = jnp.ones((6, 4)), jnp.ones(4)
    boxed = {"Dense_0": {"kernel": nn.Partitioned(kernel, names=(None, "model")), "bias": nn.Partitioned(bias, ("m",))},
             "Dense_1": {"kernel": nn.LogicallyPartitioned(kernel, names=("embed", "mlp"))}}  # fmt: skip
    plain = nn.unbox(boxed)
    assert nn.unbox(adaopt.default_adam_mini_blocks(boxed)) == adaopt.default_adam_mini_blocks(plain)
    assert adaopt.default_adam_mini_blocks(plain)["Dense_0"] == {"kernel": "tensor", "bias": "coordinate"}
    tx = adaopt.adam_mini(1e-2)
    shapes = jax.tree.map(jnp.shape, optax.tree.get(tx.init(boxed), "nu"))
    assert nn.unbox(shapes) == jax.tree.map(jnp.shape, optax.tree.get(tx.init(plain), "nu"))


def test_haikus_biases_are_biases() -> None:
    """Haiku names a bias "b": it took one second moment for the whole leaf and was decayed."""
    params = {"mlp/~/linear_0": {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}, "layer_norm": {"scale": jnp.ones(4)}}
    blocks = adaopt.default_adam_mini_blocks(params, output_axis=-1)
    assert blocks["mlp/~/linear_0"] == {"w": AxisBlocks(-1), "b": "coordinate"}
    assert adaopt.adam_mini_decay_mask(params) == {
        "mlp/~/linear_0": {"w": True, "b": False},
        "layer_norm": {"scale": False},
    }


def test_queries_without_the_head_size_are_an_error_naming_the_leaf() -> None:
    params = {"layer": {"q_proj": {"weight": jnp.zeros((8, 8))}}}
    with pytest.raises(ValueError, match=r"'layer\.q_proj\.weight'.*pass dim .* and n_heads"):
        adaopt.adam_mini().init(params)
    with pytest.raises(
        ValueError, match=r"layer\.q_proj\.weight of shape \(8, 8\).*not a multiple of the block size 3"
    ):
        adaopt.adam_mini(blocks={"q_proj": AxisBlocks(0, 3)}).init(params)
    with pytest.raises(ValueError, match=r"has no axis 2"):
        adaopt.adam_mini(blocks={"q_proj": AxisBlocks(2)}).init(params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 8}, r"dim and n_heads go together"),
        ({"dim": 8, "n_heads": 3}, r"n_heads must divide dim.*dim=8, n_heads=3"),
        ({"dim": 0, "n_heads": 1}, r"dim must be an integer in \[1, "),
        ({"blocks": "tensor"}, r"blocks must be None"),
        (
            {"blocks": {"q": "head"}},
            r"blocks\['q'\] must be 'coordinate', 'tensor' or an adaopt.AxisBlocks, got 'head'",
        ),
        ({"output_axis": 0.5}, r"output_axis must be an integer"),
        ({"nu_dtype": jnp.int8}, r"nu_dtype must be a floating dtype"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=match):
        adaopt.adam_mini(**kwargs)


def test_axis_blocks_are_checked() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"AxisBlocks.size must be an integer in \[1, "):
        AxisBlocks(0, 0)


def test_a_state_of_another_rule_is_a_clear_error() -> None:
    params = {"mlp": jnp.zeros((4, 3))}
    state = adaopt.adam_mini().init(params)  # one second moment per row
    other = adaopt.adam_mini(blocks={"mlp": "tensor"})
    with pytest.raises(adaopt.TreeMismatchError, match=r"leaf mlp has shape \(4,\), but its blocks 'tensor' need \(\)"):
        other.update(params, state, params)


def test_blocks_of_sharded_leaves_keep_the_sharding_of_their_axis() -> None:
    """On the (4, 2) mesh of tests/test_sharding.py: one second moment per row of a leaf sharded by rows, and per
    pair of columns of one sharded by rows and columns, are sharded along that axis; the steps are the unsharded ones."""
    tx = adaopt.adam_mini(1e-2, blocks={"w": AxisBlocks(0), "k": AxisBlocks(1, 2)})
    _, want, _ = test_sharding._train(tx, jax.device_put(test_sharding._host_params(), jax.devices()[0]))
    mesh = test_sharding._mesh()
    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, spec) for k, spec in test_sharding.SPECS.items()}
        init, got, state = test_sharding._train(tx, jax.device_put(test_sharding._host_params(), shardings))
        for when in (init, state):
            nu = optax.tree.get(when, "nu")
            assert nu["w"].shape == (64,) and nu["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
            assert nu["k"].shape == (4,) and nu["k"].sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 1)
    for k in want:
        assert got[k].sharding.is_equivalent_to(shardings[k], got[k].ndim)
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-6)


def test_second_moments_of_blocks_take_a_storage() -> None:
    """A per-row second moment long enough for the blockwise storage is quantized; the first step is float32's."""
    storage = adaopt.Blockwise("dynamic8", block_size=64, min_size=64)
    params = {"mlp": jnp.zeros((64, 3)), "norm": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(size=p.shape), jnp.float32), params)
    plain, stored = adaopt.adam_mini(1e-2), adaopt.adam_mini(1e-2, mu_dtype=storage, nu_dtype=storage)
    state = stored.init(params)
    nu = optax.tree.get(state, "nu")
    assert isinstance(nu["mlp"], adaopt.Quantized) and nu["mlp"].shape == (64,)  # one per row
    assert not adaopt.is_stored(nu["norm"])  # one number: under min_size
    u_stored, state = stored.update(grads, state, params)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(u_stored), jax.tree.leaves(u_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert isinstance(optax.tree.get(state, "nu")["mlp"], adaopt.Quantized)
