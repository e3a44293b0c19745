"""benchmarks/monitor.py runs its rows on a tiny tree (no timing asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import monitor


def test_rows_time_every_contender_against_adamw() -> None:
    rows = monitor.run({"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}, reps=1, block=2)
    assert [row[0] for row in rows] == list(monitor.contenders())
    assert rows[0][3] == "1.000"  # AdamW against itself
    assert all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)
