"""What adaopt's XLA:CPU options (:func:`adaopt.enable_cpu_fusion`, :func:`adaopt.enable_cpu_copy_elision`) ask of JAX:
whether it started its backends, and whether it will start a CPU one."""

from __future__ import annotations

import jax


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
