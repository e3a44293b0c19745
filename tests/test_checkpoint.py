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

from adaopt._src.registry import OPTIMIZERS, OptimizerSpec


def _loss(params: dict) -> jax.Array:
    return jnp.sum(jnp.sin(params["w"]) ** 2) + jnp.sum((params["b"] - 1.0) ** 2)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
def test_resume_is_bitwise_identical(spec: OptimizerSpec, tmp_path: pathlib.Path) -> None:
    schedule = optax.warmup_cosine_decay_schedule(0.0, spec.learning_rate, 3, 10)
    tx = spec.make(learning_rate=schedule)

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(_loss)(p)
        updates, s = tx.update(grads, s, p, value=loss)
        return optax.apply_updates(p, updates), s

    params: Any = {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "b": jnp.zeros(4), "frozen": None}
    state = tx.init(params)

    straight = (params, state)
    for _ in range(10):
        straight = step(*straight)

    resumed = (params, state)
    for _ in range(5):
        resumed = step(*resumed)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", resumed)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: resumed))
    assert jax.tree.structure(restored) == jax.tree.structure(resumed)
    for _ in range(5):
        restored = step(*restored)

    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(straight), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
