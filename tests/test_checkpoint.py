"""Optimizer state checkpoints with orbax and resumes bit for bit."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import adaopt
from adaopt import REGISTRY, OptimizerSpec
from benchmarks import learning_rates


def _loss(params: dict) -> jax.Array:
    return jnp.sum(jnp.sin(params["w"]) ** 2) + jnp.sum((params["b"] - 1.0) ** 2)


def _assert_resumes_bitwise(tx: Any, params: Any, loss: Any, path: pathlib.Path) -> None:
    """Ten jitted steps straight, and five, a checkpoint, a restore and five more: the same bits."""

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p, value=value)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    straight = (params, state)
    for _ in range(10):
        straight = step(*straight)

    resumed = (params, state)
    for _ in range(5):
        resumed = step(*resumed)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "ckpt", resumed)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path / "ckpt", jax.eval_shape(lambda: resumed))
    assert jax.tree.structure(restored) == jax.tree.structure(resumed)
    for _ in range(5):
        restored = step(*restored)

    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(straight), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _params() -> Any:
    return {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "b": jnp.zeros(4), "frozen": None}


@pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
def test_resume_is_bitwise_identical(spec: OptimizerSpec, tmp_path: pathlib.Path) -> None:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rates.TUNED[spec.name], 3, 10)
    _assert_resumes_bitwise(learning_rates.make(spec, learning_rate=schedule), _params(), _loss, tmp_path)


@pytest.mark.parametrize("layout", ["multi_tensor", "single_pass", "flatten_params"])
@pytest.mark.usefixtures("fusion_on")
def test_the_speed_layouts_resume_bitwise(layout: str, tmp_path: pathlib.Path) -> None:
    """The state of ``multi_tensor`` (w, 12 elements, apart; b packed), of ``single_pass`` (traced in
    its sibling form, as with the fusion on) and of an optimizer of flat parameters."""
    adam = adaopt.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10))
    if layout == "multi_tensor":
        _assert_resumes_bitwise(adaopt.multi_tensor(adam, min_size=12), _params(), _loss, tmp_path)
    elif layout == "single_pass":
        _assert_resumes_bitwise(adaopt.single_pass(adam, min_size=1), _params(), _loss, tmp_path)
    else:
        flat, unflatten = adaopt.flatten_params(_params())
        _assert_resumes_bitwise(adam, flat, lambda p: _loss(unflatten(p)), tmp_path)


@pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)
def test_a_checkpoint_restores_across_hyperparameter_values_and_inject_hyperparams(
    spec: OptimizerSpec, tmp_path: pathlib.Path
) -> None:
    """The state's structure depends on no numeric value: a state written with every hyperparameter
    at the low end of its range (zeros included) and no weight decay restores into the optimizer
    at the high end with decay, and into its inject_hyperparams form, which then step from it."""

    def numeric(at: float) -> dict[str, Any]:
        return {
            "learning_rate": learning_rates.TUNED[spec.name],
            **{k: r.sample(at) for k, r in spec.hyperparameters.items()},
        }

    params = {k: v for k, v in _params().items() if v is not None}
    plain = spec.factory(**numeric(0.0), weight_decay=0.0)
    decayed = spec.factory(**numeric(0.99), weight_decay=0.1)
    injected = adaopt.inject_hyperparams(spec.factory)(**numeric(0.99), weight_decay=0.1)
    written = plain.update(jax.grad(_loss)(params), plain.init(params), params, value=_loss(params))[1]
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", written)
    checkpointer.wait_until_finished()
    for tx, wrap in ((decayed, lambda s: s), (injected, lambda s: injected.init(params)._replace(inner_state=s))):
        target = jax.eval_shape(lambda tx=tx: tx.init(params))
        inner_target = target.inner_state if tx is injected else target
        restored = checkpointer.restore(tmp_path / "ckpt", inner_target)
        assert jax.tree.structure(restored) == jax.tree.structure(inner_target)
        updates, _ = tx.update(jax.grad(_loss)(params), wrap(restored), params, value=_loss(params))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_equinox_serialisation_restores_float8_codes_with_the_readmes_filter(tmp_path: pathlib.Path) -> None:
    """``eqx.tree_serialise_leaves`` writes float8 codes as raw bytes, which its default reader refuses; the
    README's ``filter_spec`` reads them back bit for bit (int8 codes and scales through it too)."""
    import equinox as eqx

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 128)), jnp.float32)}
    tx = adaopt.adamw(1e-2, mu_dtype="fp8", nu_dtype="int8")
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(params, state, params)
        params = optax.apply_updates(params, updates)
    assert {x.dtype for x in jax.tree.leaves(state)} >= {jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.uint8)}
    path = tmp_path / "state.eqx"
    eqx.tree_serialise_leaves(path, state)
    with pytest.raises(RuntimeError, match="changed type"):
        eqx.tree_deserialise_leaves(path, tx.init(params))

    def spec(f: Any, x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jnp.asarray(np.load(f).view(x.dtype))
        return eqx.default_deserialise_filter_spec(f, x)

    restored = eqx.tree_deserialise_leaves(path, tx.init(params), filter_spec=spec)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype
        assert (got.shape, np.asarray(got).tobytes()) == (want.shape, np.asarray(want).tobytes())
