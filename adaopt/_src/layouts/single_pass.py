"""One pass over memory per step on XLA:CPU: the state and the update computed as siblings.

An optimizer step reads the gradients, the parameters and the state and writes the parameters and
the state back; at the memory-bandwidth limit it passes once over each buffer (Adam: read p, g,
m, v and write p, m, v, seven passes). XLA:CPU emits one kernel per output buffer by default, so
the step runs three kernels per Adam leaf, and the parameter's kernel reads the gradient and the
moments a second time (ten passes instead of seven). XLA:CPU has a multi-output fusion pass,
off by default, that merges kernels reading the same inputs; turned on, it merges the kernels of
m and v, but the parameter's kernel reads the new m and v they write (a producer and its consumer,
which it does not merge): nine passes.

:func:`single_pass` makes the three siblings. It computes the new state from the inputs, and the
update again from the same inputs passed through ``lax.optimization_barrier`` (which keeps XLA
from merging the two computations back into one before fusion): the parameter's kernel then
reads p, g, m, v like the state's kernels, and the multi-output fusion merges the three into one
kernel per leaf that reads each input once and writes each output once. Each output is computed
by the same operations on the same values as without the wrapper.

It needs the multi-output fusion, which is an XLA:CPU option read once, when JAX starts its CPU
backend, from the environment variable ``XLA_FLAGS``::

    XLA_FLAGS="--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"

Without it (or on another platform: GPUs fuse producers into consumers themselves) the sibling
form would compile to separate kernels that each recompute the step, several times slower than the
plain one, so :func:`single_pass` then leaves the optimizer as it is. A flag set after
the CPU backend started (in a notebook, after the first computation) is in the environment but
not in the compiler: :func:`cpu_multi_output_fusion_enabled` checks both, the second by compiling
a small probe once per process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import jax
import numpy as np
import optax

from adaopt._src import base

MULTI_OUTPUT_FUSION_OPTION = "xla_cpu_use_multi_output_fusion"
CPU_MULTI_OUTPUT_FUSION_FLAG = f"--xla_backend_extra_options={MULTI_OUTPUT_FUSION_OPTION}"
DEFAULT_MIN_SIZE = 16_384
"""Leaves of at least this many elements take the single-pass form (see :func:`single_pass`)."""


def flag_in_environment() -> bool:
    """Whether ``XLA_FLAGS`` in this process's environment turns on XLA:CPU's multi-output fusion."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in flags:
        name, _, value = flag.partition("=")
        if name.lstrip("-") == "xla_backend_extra_options":
            options = {option.partition("=")[0]: option.partition("=")[2] for option in value.split(",")}
            if MULTI_OUTPUT_FUSION_OPTION in options:
                return options[MULTI_OUTPUT_FUSION_OPTION].lower() not in ("false", "0")
    return False


@functools.cache
def cpu_backend_fuses_siblings() -> bool:
    """Whether this process's XLA:CPU backend runs the multi-output fusion.

    XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend: a flag set later (in a notebook,
    after the first computation) is in the environment but not in the compiler. This compiles a
    probe with two sibling outputs once per process and looks for one kernel writing both. It
    runs in a thread of its own, outside the caller's trace and mesh contexts (JAX keeps them per
    thread): a step traced under ``jax.set_mesh`` would otherwise place the probe on the mesh.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_probe_fuses_siblings).result()


def _probe_fuses_siblings() -> bool:
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
        return False
    x = jax.ShapeDtypeStruct((64,), np.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    hlo = jax.jit(lambda x: (x * 2 + 1, x * 3 - 1)).lower(x).compile().as_text() or ""
    entry = hlo.split("ENTRY", 1)[-1]
    return any(" fusion(" in line and "= (" in line.split(" fusion(")[0] for line in entry.splitlines())


def cpu_multi_output_fusion_enabled() -> bool:
    """Whether XLA:CPU's multi-output fusion is on: ``XLA_FLAGS`` asks for it and the CPU backend,
    started with it, runs it (see :func:`single_pass`)."""
    return flag_in_environment() and cpu_backend_fuses_siblings()


def single_pass(
    tx: optax.GradientTransformation, *, min_size: int = DEFAULT_MIN_SIZE
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its update and its new state computed as siblings, for one pass over memory on XLA:CPU.

    Wrap the whole optimizer (a chain included) and apply the updates in the same jitted step:
    with XLA:CPU's multi-output fusion on (``XLA_FLAGS`` as in the module's docstring), the
    parameter, the state and the update of each leaf of at least ``min_size`` elements are then
    computed by one kernel that reads each buffer once. Combined with :func:`adaopt.flatten_params`
    (a few buffers, so fewer per-buffer costs) it is adaopt's fastest CPU step; the measured
    figures, against optax and torch's fused optimizers, are in ``benchmarks/RESULTS.md``.

    The state and the updates are those of ``tx``, by the same operations on the same values;
    under ``jit`` the last bit may differ, as XLA:CPU contracts ``a * b + c`` into fused
    multiply-adds depending on where its kernels start and end. ``update`` traces ``tx.update``
    twice when a leaf is large enough; what each trace does not need is dropped.

    It pays for elementwise optimizers on large leaves (the Adam family, RMSProp, AdaGrad, SGD,
    Lion). Smaller leaves, bound by per-buffer costs rather than by bandwidth, gain little and
    compile longer in the sibling form, so leaves under ``min_size`` keep the plain form; for many
    small leaves use :func:`adaopt.multi_tensor` or :func:`adaopt.flatten_params`. An optimizer
    with reductions over the tree computes them twice, which can cost more than the fusion
    saves (Prodigy on the ResNet-style tree of ``benchmarks/speed.py``; ``benchmarks/RESULTS.md``).

    Where the multi-output fusion is off, where no leaf has ``min_size`` elements, or where the
    step is compiled for another platform than the CPU, ``single_pass(tx)`` behaves exactly as
    ``tx`` (the same program).

    Args:
      tx: any gradient transformation; extra arguments of ``update`` (``value=``) pass through.
      min_size: leaves of at least this many elements take the single-pass form (>= 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``tx``'s ``init`` and state.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> tx = adaopt.adamw(1e-3)
      >>> opt = adaopt.single_pass(tx, min_size=4)
      >>> params = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)}
      >>> state = opt.init(params)  # the state of adamw itself
      >>> ours, _ = jax.jit(opt.update)(params, state, params)
      >>> theirs, _ = jax.jit(tx.update)(params, state, params)
      >>> bool(jnp.allclose(ours["w"], theirs["w"], rtol=1e-6))
      True
    """
    base.check_integer("min_size", min_size, 1)
    inner = optax.with_extra_args_support(tx)

    def update_fn(
        updates: base.Updates, state: Any, params: base.Params | None = None, **extra: Any
    ) -> tuple[base.Updates, Any]:
        new_updates, new_state = inner.update(updates, state, params, **extra)
        if not cpu_multi_output_fusion_enabled() or not any(
            leaf.size >= min_size for leaf in jax.tree.leaves(new_updates)
        ):
            return new_updates, new_state

        def siblings(updates: Any, state: Any, params: Any, extra: Any) -> Any:
            again = jax.lax.optimization_barrier((updates, state, params, extra))
            return inner.update(again[0], again[1], again[2], **again[3])[0]

        def plain(updates: Any, state: Any, params: Any, extra: Any) -> Any:
            return new_updates

        sibling_updates = jax.lax.platform_dependent(updates, state, params, extra, cpu=siblings, default=plain)
        chosen = jax.tree.map(lambda u, s: s if u.size >= min_size else u, new_updates, sibling_updates)
        return chosen, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
