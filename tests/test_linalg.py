"""adaopt._src.linalg: the matrix methods' LAPACK calls, one matrix at a time on the CPU.

The results equal the batched kernels' (leading axes, ``vmap``, both, shared arguments), their
reverse-mode derivatives are the kernels', and the program that hangs with jaxlib's batched
kernels (several batched triangular solves at once under ``vmap``) finishes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaopt._src import linalg


def _matrices(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64)
    return x @ jnp.swapaxes(x, -1, -2) + shape[-1] * jnp.eye(shape[-1])  # symmetric, well conditioned


def _upper(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    return jnp.triu(jax.random.normal(jax.random.key(seed), shape, jnp.float64)) + 4 * jnp.eye(shape[-1])


CASES = {
    "eigh": (linalg.eigh, functools.partial(jnp.linalg.eigh, symmetrize_input=False), lambda s: (_matrices(s),)),
    "qr": (linalg.qr, jnp.linalg.qr, lambda s: (_matrices(s),)),
    "svd": (linalg.svd, functools.partial(jnp.linalg.svd, full_matrices=False), lambda s: (_matrices(s),)),
    "solve": (
        linalg.solve_upper_right,
        functools.partial(jax.lax.linalg.triangular_solve, left_side=False, lower=False),
        lambda s: (_upper(s), _matrices(s, 2)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_batches_equal_the_batched_kernels(name: str) -> None:
    ours, kernel, make = CASES[name]
    with jax.enable_x64(True):
        for shape in [(5, 5), (3, 5, 5), (2, 3, 5, 5)]:
            args = make(shape)
            expected = kernel(*args)
            results = [ours(*args), jax.jit(ours)(*args)]
            if len(shape) >= 3:
                results.append(jax.jit(jax.vmap(ours))(*args))  # the mapped axis, and the rest of the batch
            if len(shape) == 4:
                results.append(jax.vmap(jax.vmap(ours))(*args))
            for got in results:
                for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
                    assert g.shape == e.shape
                    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_a_shared_argument_under_vmap_and_leading_axes() -> None:
    """The triangular factor shared by a batch of right-hand sides (an unbatched argument), and the reverse."""
    with jax.enable_x64(True):
        a, b = _upper((4, 4)), jax.random.normal(jax.random.key(3), (6, 3, 4), jnp.float64)
        kernel = functools.partial(jax.lax.linalg.triangular_solve, left_side=False, lower=False)
        expected = jax.vmap(kernel, in_axes=(None, 0))(a, b)
        np.testing.assert_allclose(jax.vmap(linalg.solve_upper_right, in_axes=(None, 0))(a, b), expected, rtol=1e-12)
        np.testing.assert_allclose(linalg.solve_upper_right(a, b), expected, rtol=1e-12)  # b's leading axis
        many = _upper((6, 4, 4))
        expected = jax.vmap(kernel, in_axes=(0, None))(many, b[0])
        np.testing.assert_allclose(
            jax.vmap(linalg.solve_upper_right, in_axes=(0, None))(many, b[0]), expected, rtol=1e-12
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_reverse_mode_derivatives_are_the_kernels(name: str) -> None:
    ours, kernel, make = CASES[name]

    def loss(fn: object, *args: jax.Array) -> jax.Array:
        out = fn(*args)  # type: ignore[operator]
        # Functions of the outputs that do not depend on the eigen/singular vectors' signs.
        if name == "eigh":
            return jnp.sum(out[0] ** 2) + jnp.sum((out[1] @ jnp.swapaxes(out[1], -1, -2)) ** 2)
        if name == "svd":
            return jnp.sum(out[1] ** 3)
        if name == "qr":
            return jnp.sum(jnp.abs(out[1]))
        return jnp.sum(jnp.sin(out))

    with jax.enable_x64(True):
        args = make((3, 5, 5))
        expected = jax.grad(functools.partial(loss, kernel), argnums=tuple(range(len(args))))(*args)
        got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=tuple(range(len(args)))))(*args)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_bad_batches_are_refused() -> None:
    with jax.enable_x64(True), pytest.raises(ValueError, match="Batch axes differ"):
        linalg.solve_upper_right(_upper((2, 4, 4)), _matrices((3, 4, 4)))


# Eight batched triangular solves per step of a vmapped scan: with jaxlib's batched kernel, on a
# 2-thread pool, two run at once and wait for each other for good (every run on a 2-core machine with XLA's
# default flags; the suite's cheaper codegen flags schedule it otherwise, so the script runs without them).
_HANGS_WITH_BATCHED_KERNELS = """
import jax, jax.numpy as jnp
from adaopt._src import linalg
dim, leaves = 64, 8
def step(qs, _):
    return [q + 1e-3 * jnp.triu(linalg.solve_upper_right(q, jnp.eye(dim) + 0.01 * q)) for q in qs], None
def train(scale):
    qs = [jnp.eye(dim) * scale * (i + 1) + 0.01 * jnp.triu(jnp.ones((dim, dim))) for i in range(leaves)]
    return sum(o.sum() for o in jax.lax.scan(step, qs, None, length=50)[0])
for r in range(3):
    jax.block_until_ready(jax.jit(jax.vmap(train))(jnp.arange(1.0, 8.0) * (1 + r)))
print("finished")
"""


def test_concurrent_batched_solves_under_vmap_finish() -> None:
    script = textwrap.dedent(_HANGS_WITH_BATCHED_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # XLA's default schedule, as users run it
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]
