"""What adaopt's XLA:CPU options (:func:`adaopt.enable_cpu_fusion`, :func:`adaopt.enable_cpu_copy_elision`) ask of JAX:
whether it started its backends, whether it will start a CPU one, and what the running CPU compiler makes of
a probe."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def backends_started() -> bool | None:
    """Whether JAX started its backends (they start together, at the first computation), without starting them.

    JAX has no public call for this; ``jax.distributed.initialize`` asks the same private function before
    it refuses to run after the first computation. None when this JAX lacks it.
    """
    try:
        from jax._src import xla_bridge
    except ImportError:
        return None
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return None if started is None else bool(started())


def cpu_platform_requested() -> tuple[bool, str]:
    """Whether JAX will start a CPU backend (``jax_platforms``, from ``JAX_PLATFORMS``, unset or naming cpu), and the value."""
    platforms: str = getattr(jax.config, "jax_platforms", None) or ""  # JAX's documented read; untyped
    names = [name.strip().lower() for name in platforms.split(",") if name.strip()]
    return (not names or "cpu" in names), platforms


def compiled_on_cpu(fn: Callable[..., Any], n_args: int, donate_argnums: tuple[int, ...] = ()) -> str | None:
    """The optimized HLO of ``fn`` (of ``n_args`` float32 vectors of 64) as this process's CPU backend compiles it,
    from its entry computation on; None without a CPU backend.

    It compiles in a thread of its own, outside the caller's trace and mesh contexts (JAX keeps them per
    thread): a step traced under ``jax.set_mesh`` would otherwise place the probe on the mesh.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_compile, fn, n_args, donate_argnums).result()


def _compile(fn: Callable[..., Any], n_args: int, donate_argnums: tuple[int, ...]) -> str | None:
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
        return None
    x = jax.ShapeDtypeStruct((64,), np.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    hlo = jax.jit(fn, donate_argnums=donate_argnums).lower(*[x] * n_args).compile().as_text() or ""
    return hlo.split("ENTRY", 1)[-1]
