"""benchmarks/memory.py counts what the states hold and reads XLA's memory analysis (no timing asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import adaopt
from benchmarks import memory


def test_state_bytes_count_codes_and_scales() -> None:
    n = 512 * 256
    shapes = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32)}
    plain, light = memory.state_bytes(memory._adamw(None), shapes), memory.state_bytes(memory._adamw("int8"), shapes)
    # Two float32 moments against two of one byte per element and one float32 scale per 256.
    assert plain - light == 2 * 4 * n - 2 * (n + 4 * n // 256)


def test_compiled_peaks_are_read_from_xla() -> None:
    shapes = {"w": jax.ShapeDtypeStruct((256, 64), jnp.float32)}
    peak, temporaries = memory.optimizer_step_peak(memory._adamw(None), shapes)
    # At least the parameters, the gradients and the two moments (donated and aliased in place).
    assert peak >= 4 * 256 * 64 * 4 and temporaries >= 0


def test_kernel_tables_show_the_quantized_steps_chunk_loop() -> None:
    shapes = {"w": jax.ShapeDtypeStruct((64, 4096), jnp.float32)}  # above the chunk size: quantized in a loop
    text = memory.kernel_tables(["float32", "int8"], shapes, top=20)
    plain, light = text.split("AdamW, int8 moments")
    assert plain.startswith("AdamW, float32 moments") and "| kernel | ms per step | launches per step |" in plain
    assert "| while |" not in plain and "| while |" in light  # only the quantized step has a loop


@pytest.mark.usefixtures("cpu_kernels")
def test_the_kernel_row_is_traced_with_the_cpu_kernels_on_and_only_it() -> None:
    adaopt.disable_cpu_kernels()
    shapes = {"w": jax.ShapeDtypeStruct((64, 4096), jnp.float32)}

    def lowered(label: str) -> str:
        with memory.switched(label) as usable:
            assert usable
            tx = memory.contenders()[label]()
            return jax.jit(tx.update).lower(shapes, jax.eval_shape(tx.init, shapes), shapes).as_text()

    for name in memory.QUANTIZED:
        assert "adaopt_blockwise_adam_cpu" in lowered(memory.KERNEL.format(name))
    assert "adaopt_blockwise_adam_cpu" not in lowered("adaopt adamw (int8)") and not adaopt.cpu_kernels_enabled()


@pytest.mark.usefixtures("cpu_kernels")
def test_training_steps_take_the_matrices_gradients_from_dot_products_and_time_every_row() -> None:
    shapes = {"w": jax.ShapeDtypeStruct((64, 4096), jnp.float32), "b": jax.ShapeDtypeStruct((4096,), jnp.float32)}
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    grad = jax.make_jaxpr(jax.grad(memory.least_squares))(params, params)
    # the matrix's gradient is a dot product's output (which no optimizer's pass can take in), the vector's not
    dots = [eqn for eqn in grad.eqns if eqn.primitive.name == "dot_general"]
    assert {tuple(eqn.outvars[0].aval.shape) for eqn in dots} >= {(64, 4096)}
    rows = memory.training_rows(shapes, reps=1)
    assert [row[0] for row in rows] == list(memory.TRAINING_ROWS)
    ratios = {row[0]: row[2] for row in rows}
    assert ratios["adaopt adamw (float32)"] == ratios["adaopt lion (float32)"] == "1.00"
    assert not adaopt.cpu_kernels_enabled()  # on only while the kernel rows were traced
