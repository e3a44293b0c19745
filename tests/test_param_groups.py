"""adaopt.param_groups against torch's parameter groups, step for step in float64; the group rules
(globs, regular expressions, predicates, order), None leaves, Flax NNX states, masks, inject_hyperparams
inside groups, extra arguments, and the errors at construction and at init.

Each parity test runs 150 steps of the same gradients through adaopt (one compiled scan) and
torch (parameters in float64) and compares the whole parameter trajectories to 1e-10, relative.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import adaopt
from adaopt import Group
from tests.parity import random_problem, relative_error, run_adaopt

STEPS = 150
TOLERANCE = 1e-10
# Flat names of a small network's leaves, nested at the "/" for adaopt (its paths are these names).
SHAPES = {"embed/table": (6, 3), "encoder/w": (3, 5), "encoder/b": (5,), "head/w": (5, 2), "head/b": (2,)}
BIASES = ["encoder/b", "head/b"]


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        outer, inner = name.split("/")
        nested.setdefault(outer, {})[inner] = value
    return nested


def _flat(nested: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{outer}/{inner}": v for outer, leaves in nested.items() for inner, v in leaves.items()}


@functools.cache
def _problem(seed: int) -> tuple[dict, dict]:
    """float64 parameters and STEPS gradients per leaf, flat names."""
    return random_problem(SHAPES, seed, np.float64, STEPS)


def _adaopt(tx: optax.GradientTransformation, seed: int) -> dict[str, np.ndarray]:
    params, grads = _problem(seed)
    with jax.enable_x64(True):
        return _flat(run_adaopt(tx, _nest(params), _nest(grads)))


TorchSetup = Callable[[dict[str, torch.Tensor]], tuple[list[torch.optim.Optimizer], list[Any]]]


def _torch(setup: TorchSetup, seed: int) -> dict[str, np.ndarray]:
    """The trajectory of torch's optimizers (and schedulers, stepped after them) built by ``setup``."""
    params, grads = _problem(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's scalar state (AdamW's step) in float64, as ours
    try:
        tensors = {k: torch.tensor(v) for k, v in params.items()}
        optimizers, schedulers = setup(tensors)
        trajectory: dict[str, list[np.ndarray]] = {k: [] for k in tensors}
        for t in range(STEPS):
            for k, tensor in tensors.items():
                tensor.grad = torch.tensor(grads[k][t])
            for opt in optimizers:
                opt.step()
            for scheduler in schedulers:
                scheduler.step()
            for k, tensor in tensors.items():
                trajectory[k].append(tensor.detach().numpy().copy())
    finally:
        torch.set_default_dtype(previous)
    return {k: np.stack(v) for k, v in trajectory.items()}


def _draw(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    log_uniform = lambda low, high: float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return {
        "lr": log_uniform(1e-3, 3e-2),
        "lr2": log_uniform(1e-4, 3e-3),
        "b1": float(rng.uniform(0.8, 0.95)),
        "b2": float(rng.uniform(0.95, 0.999)),
        "b1_2": float(rng.uniform(0.5, 0.8)),
        "b2_2": float(rng.uniform(0.9, 0.95)),
        "eps": log_uniform(1e-8, 1e-4),
        "wd": float(rng.uniform(0.05, 0.2)),
        "wd2": float(rng.uniform(0.2, 0.5)),
        "momentum": float(rng.uniform(0.5, 0.95)),
        "momentum2": float(rng.uniform(0.1, 0.5)),
        "dampening": float(rng.uniform(0.05, 0.3)),
    }


def _seed(name: str) -> int:
    return zlib.crc32(f"param_groups/{name}".encode())


# --- torch.optim.AdamW with three groups: lr, weight decay and betas differ --------------------------


def _adamw_groups(hp: dict[str, float], bias_rule: str = "*/b") -> optax.GradientTransformation:
    return adaopt.param_groups(
        adaopt.adamw,
        [
            Group(bias_rule, weight_decay=0.0),
            Group("embed/*", learning_rate=hp["lr2"], b1=hp["b1_2"], b2=hp["b2_2"], weight_decay=hp["wd2"]),
        ],
        learning_rate=hp["lr"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
    )


@functools.cache
def _torch_adamw_groups(seed: int) -> dict[str, np.ndarray]:
    hp = _draw(seed)

    def setup(t: dict[str, torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        groups = [
            {"params": [t[k] for k in BIASES], "weight_decay": 0.0},
            {
                "params": [t["embed/table"]],
                "lr": hp["lr2"],
                "betas": (hp["b1_2"], hp["b2_2"]),
                "weight_decay": hp["wd2"],
            },
            {"params": [t["encoder/w"], t["head/w"]]},
        ]
        opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"])
        return [opt], []

    return _torch(setup, seed)


@functools.cache
def _adaopt_adamw_groups(seed: int) -> dict[str, np.ndarray]:
    return _adaopt(_adamw_groups(_draw(seed)), seed)


def test_adamw_groups_match_torch() -> None:
    seed = _seed("adamw")
    ours = _adaopt_adamw_groups(seed)
    assert ours["encoder/w"].dtype == np.float64
    assert relative_error(ours, _torch_adamw_groups(seed)) <= TOLERANCE


def test_the_comparison_sees_the_groups() -> None:
    """Biases decayed (the rule on the weights instead): far from torch's trajectory."""
    seed = _seed("adamw")
    ours = _adaopt(_adamw_groups(_draw(seed), bias_rule="*/w"), seed)
    assert relative_error(ours, _torch_adamw_groups(seed)) > 1e-3


def test_masks_inside_groups_equal_groups() -> None:
    """weight_decay_mask in place of the bias group: a function of the parameters in the default group (it
    is called on the group's tree, other groups' leaves masked out) and a tree of the whole parameters in
    the embedding's group. The same steps bit for bit, so torch's too."""
    seed = _seed("adamw")
    hp = _draw(seed)
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tree = _nest({k: len(s) > 1 for k, s in SHAPES.items()})
    embed = Group(
        "embed/*", learning_rate=hp["lr2"], b1=hp["b1_2"], b2=hp["b2_2"], weight_decay=hp["wd2"], weight_decay_mask=tree
    )
    common = {"learning_rate": hp["lr"], "b1": hp["b1"], "b2": hp["b2"], "eps": hp["eps"], "weight_decay": hp["wd"]}
    ours = _adaopt(adaopt.param_groups(adaopt.adamw, [embed], weight_decay_mask=matrices, **common), seed)
    expected = _adaopt_adamw_groups(seed)
    for k in SHAPES:
        np.testing.assert_array_equal(ours[k], expected[k], err_msg=k)


# --- torch.optim.SGD with momentum groups ---------------------------------------------------------------


def test_sgd_momentum_groups_match_torch() -> None:
    """A regular expression and a predicate as rules; groups differing in lr, momentum (none at all in
    one), dampening, Nesterov and coupled weight decay."""
    seed = _seed("sgd")
    hp = _draw(seed)
    tx = adaopt.param_groups(
        adaopt.sgd,
        [
            Group(re.compile(r".*/b"), learning_rate=hp["lr2"] * 10, momentum=None, weight_decay=0.0),
            Group(
                lambda path, leaf: path.startswith("head") and leaf.ndim == 2,
                momentum=hp["momentum2"],
                dampening=0.0,
                nesterov=True,
            ),
        ],
        learning_rate=hp["lr"] * 10,
        momentum=hp["momentum"],
        dampening=hp["dampening"],
        weight_decay=hp["wd"],
    )

    def setup(t: dict[str, torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        groups = [
            {"params": [t[k] for k in BIASES], "lr": hp["lr2"] * 10, "momentum": 0.0, "weight_decay": 0.0},
            {"params": [t["head/w"]], "momentum": hp["momentum2"], "dampening": 0.0, "nesterov": True},
            {"params": [t["embed/table"], t["encoder/w"]]},
        ]
        opt = torch.optim.SGD(
            groups, lr=hp["lr"] * 10, momentum=hp["momentum"], dampening=hp["dampening"], weight_decay=hp["wd"]
        )
        return [opt], []

    assert relative_error(_adaopt(tx, seed), _torch(setup, seed)) <= TOLERANCE


# --- a group on another optimizer: two torch optimizers on disjoint parameters ----------------------------


def test_a_group_with_its_own_optimizer_matches_two_torch_optimizers() -> None:
    seed = _seed("two optimizers")
    hp = _draw(seed)
    sgd = adaopt.sgd(hp["lr"] * 10, hp["momentum"], weight_decay=hp["wd"])
    tx = adaopt.param_groups(
        adaopt.adamw,
        [Group("head/*", optimizer=sgd)],
        learning_rate=hp["lr"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["wd2"],
    )

    def setup(t: dict[str, torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        head = [t["head/w"], t["head/b"]]
        rest = [t["embed/table"], t["encoder/w"], t["encoder/b"]]
        adamw = torch.optim.AdamW(rest, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd2"])
        return [adamw, torch.optim.SGD(head, lr=hp["lr"] * 10, momentum=hp["momentum"], weight_decay=hp["wd"])], []

    assert relative_error(_adaopt(tx, seed), _torch(setup, seed)) <= TOLERANCE


# --- a learning-rate schedule per group: torch's LambdaLR with one lambda per group -----------------------


def test_a_schedule_per_group_matches_lambda_lr() -> None:
    seed = _seed("lambda")
    hp = _draw(seed)
    decay = lambda count: 1.0 / (1.0 + 0.05 * count)
    exponential = lambda count: 0.98**count
    tx = adaopt.param_groups(
        adaopt.adamw,
        [
            Group("*/b", weight_decay=0.0),  # the default group's schedule
            Group("embed/*", learning_rate=lambda count: hp["lr2"] * exponential(count), weight_decay=hp["wd2"]),
        ],
        learning_rate=lambda count: hp["lr"] * decay(count),
        weight_decay=hp["wd"],
    )

    def setup(t: dict[str, torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        groups = [
            {"params": [t[k] for k in BIASES], "weight_decay": 0.0},
            {"params": [t["embed/table"]], "lr": hp["lr2"], "weight_decay": hp["wd2"]},
            {"params": [t["encoder/w"], t["head/w"]]},
        ]
        opt = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["wd"])
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, [decay, exponential, decay])]

    assert relative_error(_adaopt(tx, seed), _torch(setup, seed)) <= TOLERANCE


# --- inject_hyperparams inside groups: per-group learning rates changed between steps --------------------


def test_inject_hyperparams_in_groups_matches_torch_lr_changes() -> None:
    """adaopt.inject_hyperparams as the factory and optax.inject_hyperparams as a group's optimizer; after
    half the steps, each group's learning rate is set in the state, as torch's ``group["lr"] = ...``."""
    seed = _seed("inject")
    hp = _draw(seed)
    head = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"] * 10, momentum=hp["momentum"])
    tx = adaopt.param_groups(
        adaopt.inject_hyperparams(adaopt.adamw),
        [Group("head/*", name="head", optimizer=head), Group("*/b", name="no_decay", weight_decay=0.0)],
        learning_rate=hp["lr"],
        weight_decay=hp["wd"],
    )
    new_lr = {"no_decay": hp["lr2"], "default": hp["lr"] / 3, "head": hp["lr"]}
    half = STEPS // 2
    params, grads = _problem(seed)
    with jax.enable_x64(True):

        @jax.jit
        def run(p: dict, s: Any, gs: dict) -> tuple[tuple[dict, Any], dict]:
            def step(carry: tuple, g: dict) -> tuple[tuple, dict]:
                p, s = carry
                updates, s = tx.update(g, s, p)
                p = optax.apply_updates(p, updates)
                return (p, s), p

            return jax.lax.scan(step, (p, s), gs)

        p = _nest(params)
        first, second = jax.tree.map(lambda g: g[:half], _nest(grads)), jax.tree.map(lambda g: g[half:], _nest(grads))
        (p, state), before = run(p, tx.init(p), first)
        for name, lr in new_lr.items():
            state.inner_states[name].inner_state.hyperparams["learning_rate"] = jnp.asarray(lr)
        _, after = run(p, state, second)
        before, after = _flat(before), _flat(after)
        ours = {k: np.concatenate([before[k], after[k]]) for k in SHAPES}

    class SetLr:
        """A 'scheduler' that sets the groups' learning rates once, after the first half."""

        def __init__(self, opt: torch.optim.Optimizer, rates: list[float]) -> None:
            self.opt, self.rates, self.steps = opt, rates, 0

        def step(self) -> None:
            self.steps += 1
            if self.steps == half:
                for group, rate in zip(self.opt.param_groups, self.rates, strict=True):
                    group["lr"] = rate

    def setup(t: dict[str, torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        adamw = torch.optim.AdamW(
            [{"params": [t["encoder/b"]], "weight_decay": 0.0}, {"params": [t["embed/table"], t["encoder/w"]]}],
            lr=hp["lr"],
            weight_decay=hp["wd"],
        )
        sgd = torch.optim.SGD([t["head/w"], t["head/b"]], lr=hp["lr"] * 10, momentum=hp["momentum"])
        return [adamw, sgd], [SetLr(adamw, [new_lr["no_decay"], new_lr["default"]]), SetLr(sgd, [new_lr["head"]])]

    theirs = _torch(setup, seed)
    assert relative_error(ours, theirs) <= TOLERANCE
    assert not np.allclose(ours["head/w"][-1], theirs["head/w"][half - 1])  # the second half moved


# --- the rules, None leaves, Flax NNX, extra arguments ----------------------------------------------------


def _params() -> dict:
    return _nest({k: jnp.ones(s) for k, s in SHAPES.items()})


def test_groups_resolve_by_order() -> None:
    bias, head = Group("*/b", name="bias"), Group("head/*", name="head")
    assert adaopt.group_labels([bias, head], _params()) == {
        "embed": {"table": "default"},
        "encoder": {"w": "default", "b": "bias"},
        "head": {"w": "head", "b": "bias"},
    }
    assert adaopt.group_labels([head, bias], _params())["head"] == {"w": "head", "b": "head"}
    # A sequence of patterns takes what any of them matches; a glob's * crosses "/".
    either = Group(["embed/*", re.compile(r"head/\w")], name="either")
    assert adaopt.group_labels([either, Group("*b", name="ends_in_b")], _params()) == {
        "embed": {"table": "either"},
        "encoder": {"w": "default", "b": "ends_in_b"},
        "head": {"w": "either", "b": "either"},
    }


def test_none_leaves_under_jit() -> None:
    """A None leaf stays None and changes nothing else: the same steps as without it."""
    tx = adaopt.param_groups(adaopt.sgd, [Group("*/b", weight_decay=0.0)], learning_rate=0.1, weight_decay=0.5)
    params = _params()
    with_none = {**params, "encoder": {**params["encoder"], "frozen": None}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    grads_none = {**grads, "encoder": {**grads["encoder"], "frozen": None}}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    expected, _ = step(grads, tx.init(params), params)
    updates, _ = step(grads_none, tx.init(with_none), with_none)
    assert updates["encoder"]["frozen"] is None
    assert jax.tree.structure(updates) == jax.tree.structure(with_none)
    np.testing.assert_array_equal(updates["encoder"]["b"], expected["encoder"]["b"])
    assert float(updates["encoder"]["w"][0, 0]) != float(updates["encoder"]["b"][0])  # decayed vs not


class _NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        ones = nnx.initializers.ones  # no random initialisation to compile: the gradients are random
        self.embed = nnx.Embed(7, 4, embedding_init=ones, rngs=rngs)
        self.hidden = nnx.Linear(4, 3, kernel_init=ones, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(3, 2, kernel_init=ones, rngs=rngs)])


def test_flax_nnx_paths_and_steps() -> None:
    """nnx.Optimizer's Param state is grouped by the paths of its pure dict ('hidden/bias', no 'value'),
    and steps as the same optimizer on the pure dicts."""
    model = _NnxModel(nnx.Rngs(0))
    groups = [Group("*/bias", name="bias", weight_decay=0.0), Group("embed/*", name="embed", learning_rate=1e-3)]
    tx = adaopt.param_groups(adaopt.adamw, groups, learning_rate=1e-2, weight_decay=0.1)
    state = nnx.state(model, nnx.Param)
    labels = adaopt.group_labels(groups, state)
    assert labels["hidden"]["bias"] == "bias" and labels["blocks"][0]["bias"] == "bias"
    assert labels["embed"]["embedding"] == "embed" and labels["hidden"]["kernel"] == "default"

    pure = state.to_pure_dict()
    pure_state = tx.init(pure)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    update = nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))
    pure_update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), nnx.state(model, nnx.Param))
        update(optimizer, model, grads)
        updates, pure_state = pure_update(grads.to_pure_dict(), pure_state, pure)
        pure = optax.apply_updates(pure, updates)
    got = nnx.state(model, nnx.Param).to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, pure)


def test_flax_linen_boxes_are_grouped_by_their_attributes() -> None:
    """A linen ``nn.Partitioned`` leaf's path is its attribute's, as unboxed: ``"*/bias"`` missed the boxed bias
    (``Dense_0/bias/value``), which then trained at the default group's rate."""
    import flax.linen as nn

    params = {"Dense_0": {"bias": nn.Partitioned(jnp.zeros(4), names=("model",)), "kernel": jnp.zeros((3, 4))},
              "Dense_1": {"bias": nn.LogicallyPartitioned(jnp.zeros(4), names=("mlp",))}}  # fmt: skip
    groups = [Group("*/bias", name="bias", learning_rate=0.0)]
    labels = nn.unbox(adaopt.group_labels(groups, params))
    assert labels == {"Dense_0": {"bias": "bias", "kernel": "default"}, "Dense_1": {"bias": "bias"}}
    tx = adaopt.param_groups(adaopt.sgd, groups, learning_rate=1.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    updates = nn.unbox(updates)
    assert float(jnp.abs(updates["Dense_0"]["bias"]).max()) == 0.0 == float(jnp.abs(updates["Dense_1"]["bias"]).max())
    assert float(updates["Dense_0"]["kernel"][0, 0]) == -1.0


def test_extra_arguments_reach_the_groups() -> None:
    """polyak_sgd raises without value=: the group on it gets the loss."""
    tx = adaopt.param_groups(adaopt.sgd, [Group("head/*", optimizer=adaopt.polyak_sgd())], learning_rate=0.1)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, value=jnp.asarray(2.0))
    assert float(updates["head"]["w"][0, 0]) < 0 and float(updates["embed"]["table"][0, 0]) == pytest.approx(-0.1)


def test_a_transformation_of_another_class_is_an_optimizer() -> None:
    """An object with init and update that is no optax type, as a group's optimizer and as the default: taken as one
    (the wrappers tell it so), where it was refused as no gradient transformation."""
    from tests.test_range_test import _OwnTransformation

    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    want = adaopt.param_groups(adaopt.sgd(0.1), [Group("head/*", optimizer=adaopt.sgd(0.5))])
    got = adaopt.param_groups(
        _OwnTransformation(adaopt.sgd(0.1)), [Group("head/*", optimizer=_OwnTransformation(adaopt.sgd(0.5)))]
    )
    for a, b in zip(
        jax.tree.leaves(got.update(grads, got.init(params), params)[0]),
        jax.tree.leaves(want.update(grads, want.init(params), params)[0]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# --- errors -------------------------------------------------------------------------------------------------


def test_refuses_bad_groups_when_built() -> None:
    error = adaopt.HyperparameterError
    with pytest.raises(error, match=r"names \['betas', 'lr'\], which are not arguments of adamw \('betas' is b1 and "):
        adaopt.param_groups(adaopt.adamw, [Group("*/b", lr=0.1, betas=(0.9, 0.99))])
    with pytest.raises(error, match=r"the default group\) names \['momentum'\], which is not an argument of adamw"):
        adaopt.param_groups(adaopt.adamw, [], momentum=0.9)
    with pytest.raises(error, match=r"Group\('\*/b'\) has both an optimizer and hyperparameters \['weight_decay'\]"):
        Group("*/b", optimizer=adaopt.sgd(), weight_decay=0.0)
    with pytest.raises(error, match=r"optimizer must be a gradient transformation .* got <function sgd"):
        Group("*/b", optimizer=adaopt.sgd)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"match must be a glob string .* got 3 of type int"):
        Group(3)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"groups\[0\] and groups\[1\] are both named 'x'"):
        adaopt.param_groups(adaopt.adamw, [Group("a", name="x"), Group("b", name="x")])
    with pytest.raises(error, match=r"groups\[0\] is named 'default'"):
        adaopt.param_groups(adaopt.adamw, [Group("a", name="default")])
    with pytest.raises(error, match=r"Group 'group_0' has no optimizer of its own.* default is an optimizer"):
        adaopt.param_groups(adaopt.adamw(), [Group("a", weight_decay=0.0)])
    with pytest.raises(
        error, match=r"Group 'group_0' \('\*/b'\): weight_decay must be a finite number in \[0.0, inf\)"
    ):
        adaopt.param_groups(adaopt.adamw, [Group("*/b", weight_decay=-1.0)])
    with pytest.raises(error, match=r"groups must be a list of adaopt.Group"):
        adaopt.param_groups(adaopt.adamw, Group("*/b"))  # type: ignore[arg-type]


def test_refuses_a_group_without_leaves_at_init() -> None:
    params = _params()
    with pytest.raises(ValueError, match=r"Group 'group_0' \('b'\) would optimise no parameter: it matches no leaf; "
                       r"the leaves' paths are 'embed/table', 'encoder/b'"):  # fmt: skip
        adaopt.param_groups(adaopt.adamw, [Group("b", weight_decay=0.0)]).init(params)
    shadowed = [Group("*/b", name="bias"), Group("head/*", name="head"), Group("head/b", name="late")]
    with pytest.raises(ValueError, match=r"'late' .* every leaf it matches is taken by an earlier group: 'bias' "
                       r"\(before it\) takes \['head/b'\]"):  # fmt: skip
        adaopt.param_groups(adaopt.adamw, shadowed).init(params)
    state = adaopt.param_groups(adaopt.adamw, shadowed, allow_empty_groups=True).init(params)
    assert set(state.inner_states) == {"bias", "head", "late", "default"}
    with pytest.raises(TypeError, match=r"returned Array\(.* it must return a Python bool"):
        adaopt.param_groups(adaopt.adamw, [Group(lambda path, leaf: jnp.all(leaf > 0))]).init(params)
