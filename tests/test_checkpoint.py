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
