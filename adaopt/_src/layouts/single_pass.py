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

It needs the multi-output fusion, which is an XLA:CPU option read once per process, when JAX starts
its CPU backend, from the environment variable ``XLA_FLAGS``. :func:`enable_cpu_fusion`, called
before the first JAX computation, adds it; or set it before Python starts::

    XLA_FLAGS="--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"

Without it (or on another platform: GPUs fuse producers into consumers themselves) the sibling
form would compile to separate kernels that each recompute the step, several times slower than the
plain one, so :func:`single_pass` then leaves the optimizer as it is. A flag set after
the CPU backend started (in a notebook, after the first computation) is in the environment but
not in the compiler: :func:`cpu_multi_output_fusion_enabled` checks both, the second by compiling
a small probe once per process.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import jax
import optax

from adaopt._src import base, storage
from adaopt._src.layouts.xla_cpu import backends_started as _backends_started
from adaopt._src.layouts.xla_cpu import compiled_on_cpu
from adaopt._src.layouts.xla_cpu import cpu_platform_requested as _cpu_platform_requested

MULTI_OUTPUT_FUSION_OPTION = "xla_cpu_use_multi_output_fusion"
CPU_MULTI_OUTPUT_FUSION_FLAG = f"--xla_backend_extra_options={MULTI_OUTPUT_FUSION_OPTION}"
DEFAULT_MIN_SIZE = 16_384
"""Leaves of at least this many elements take the single-pass form (see :func:`single_pass`)."""


def _option_in_environment() -> str | None:
    """The value ``XLA_FLAGS`` gives the multi-output fusion option (``""`` when it has none), None when absent."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.partition("=")
        if name.lstrip("-") == "xla_backend_extra_options":
            for option in value.split(","):
                key, _, option_value = option.partition("=")
                if key == MULTI_OUTPUT_FUSION_OPTION:
                    return option_value
    return None


def flag_in_environment() -> bool:
    """Whether ``XLA_FLAGS`` in this process's environment turns on XLA:CPU's multi-output fusion.

    XLA:CPU tests whether the option is present, not its value: ``xla_cpu_use_multi_output_fusion=false``
    turns the fusion on too.
    """
    return _option_in_environment() is not None


@functools.cache
def cpu_backend_fuses_siblings() -> bool:
    """Whether this process's XLA:CPU backend runs the multi-output fusion.

    XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend: a flag set later (in a notebook,
    after the first computation) is in the environment but not in the compiler. This compiles a
    probe with two sibling outputs once per process (:func:`~adaopt._src.layouts.xla_cpu.compiled_on_cpu`)
    and looks for one kernel writing both.
    """
    entry = compiled_on_cpu(lambda x: (x * 2 + 1, x * 3 - 1), 1)
    if entry is None:
        return False
    return any(" fusion(" in line and "= (" in line.split(" fusion(")[0] for line in entry.splitlines())


def cpu_multi_output_fusion_enabled() -> bool:
    """Whether XLA:CPU's multi-output fusion is on: ``XLA_FLAGS`` asks for it and the CPU backend,
    started with it, runs it (see :func:`single_pass`)."""
    return flag_in_environment() and cpu_backend_fuses_siblings()


CPU_FUSION_ENV = "ADAOPT_CPU_FUSION"
"""The environment variable that opts out: ``ADAOPT_CPU_FUSION=0`` (or ``false``, ``off``, ``no``) keeps
:func:`enable_cpu_fusion` from adding XLA:CPU's multi-output fusion, e.g. to time XLA's defaults."""
_OFF_VALUES = ("0", "false", "off", "no")
_ON_VALUES = ("", "1", "true", "on", "yes")
_RESTART = (
    "XLA reads its options once per process, when JAX starts its CPU backend. To turn the fusion on, start a new "
    "Python process (in a notebook: restart the kernel) and call adaopt.enable_cpu_fusion() before its first JAX "
    f"computation, or set XLA_FLAGS={CPU_MULTI_OUTPUT_FUSION_FLAG} before starting Python."
)
# One text per situation in which enable_cpu_fusion leaves the fusion off or does not do what a user may expect.
_STARTED_WITHOUT = (
    "JAX's CPU backend already started without XLA:CPU's multi-output fusion, so it stays off. " + _RESTART
)
_SET_TOO_LATE = (
    "XLA_FLAGS asks for XLA:CPU's multi-output fusion, but it was set after JAX's CPU backend started, "
    "so the compiler does not run it. " + _RESTART
)
_OPTED_OUT = (
    f"{CPU_FUSION_ENV}={{value}} in the environment: adaopt.enable_cpu_fusion() leaves XLA:CPU's multi-output fusion "
    f"off as asked (unset {CPU_FUSION_ENV} to let it turn the fusion on)."
)
_NO_CPU = (
    "JAX_PLATFORMS={platforms} starts no CPU backend: XLA:CPU's multi-output fusion only changes computations "
    "on the CPU, and on other platforms adaopt.single_pass leaves the optimizer as it is. Nothing to do."
)
_DEFAULT_NOT_CPU = (
    "JAX's default backend is {platform}, and XLA:CPU's multi-output fusion only changes computations on the CPU "
    "(on other platforms adaopt.single_pass leaves the optimizer as it is): nothing to do for steps on the "
    "{platform}. JAX's CPU backend started without the fusion; for computations placed on the CPU: " + _RESTART
)
_VALUE_IS_IGNORED = (
    "XLA_FLAGS gives xla_cpu_use_multi_output_fusion the value {value!r}, but XLA:CPU only tests whether the "
    "option is present: the fusion is on. To turn it off, remove the option from XLA_FLAGS "
    f"(and set {CPU_FUSION_ENV}=0 to keep adaopt.enable_cpu_fusion() from adding it)."
)


class CpuFusionWarning(UserWarning):
    """:func:`enable_cpu_fusion` could not turn XLA:CPU's multi-output fusion on, or was asked not to; the
    message says why and what to do. Silence it with ``warnings.simplefilter("ignore", adaopt.CpuFusionWarning)``."""


def _opted_out() -> str | None:
    """The value of ``ADAOPT_CPU_FUSION`` when it asks to keep the fusion off; None otherwise."""
    value = os.environ.get(CPU_FUSION_ENV)
    if value is None or value.strip().lower() in _ON_VALUES:
        return None
    if value.strip().lower() in _OFF_VALUES:
        return value
    raise ValueError(
        f"{CPU_FUSION_ENV}={value!r} in the environment is not understood: set it to one of {_OFF_VALUES} to keep "
        f"adaopt.enable_cpu_fusion() from turning XLA:CPU's multi-output fusion on, or unset it."
    )


def _warn(message: str) -> bool:
    warnings.warn(message, CpuFusionWarning, stacklevel=3)
    return False


def enable_cpu_fusion() -> bool:
    """Turn on XLA:CPU's multi-output fusion, which :func:`single_pass` needs for one kernel per leaf.

    XLA reads its options once per process, when JAX starts its backends (at the first computation,
    or at the first call that lists the devices). Called before that, this appends
    ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion`` to the environment variable
    ``XLA_FLAGS`` (the other flags stay as they are; XLA adds up several ``--xla_backend_extra_options``)
    and returns True. Called again, or with the option already in ``XLA_FLAGS``, it changes nothing.

    Called after JAX started, it cannot: it then returns whether the running CPU backend fuses
    (it does when ``XLA_FLAGS`` had the option at the start) and, when it does not, warns with a
    :class:`CpuFusionWarning` that says what to do: call it before the first JAX computation (in a
    notebook, restart the kernel and call it in the first cell), or set ``XLA_FLAGS`` before
    starting Python. It never restarts a backend (that would invalidate every array), and it does
    not touch ``XLA_FLAGS`` then.

    It returns False, with a :class:`CpuFusionWarning` saying so, where the fusion cannot matter
    or is not wanted:

    - ``JAX_PLATFORMS`` (or ``jax.config.update("jax_platforms", ...)``) without ``cpu``: no CPU backend.
    - ``ADAOPT_CPU_FUSION=0`` (or ``false``, ``off``, ``no``) in the environment: the user's opt-out,
      respected: this call adds nothing (the fusion is then on only if ``XLA_FLAGS`` already asks for
      it, and the call returns True). XLA:CPU has no value that turns the option off, as it tests
      only its presence: ``xla_cpu_use_multi_output_fusion=false`` in ``XLA_FLAGS`` turns the fusion
      on, and this call warns so.
    - A GPU or TPU default backend that already started: the fusion only changes computations on the
      CPU; GPUs fuse producers into consumers themselves, and :func:`single_pass` compiles to the
      plain optimizer there. Called before JAX starts on such a machine, it adds the option (it
      changes nothing on the accelerator) and returns True: computations placed on the CPU get it.

    The fusion changes how XLA:CPU compiles every program of the process, the model's forward and
    backward passes included, and what it does there depends on the machine: on 2 cores of an AMD
    EPYC it made the forward and backward pass of the GPT-style model of ``benchmarks/workloads.py``
    about 1.3x slower (far more than :func:`single_pass` saves on its optimizer step); on 2 cores of
    an Intel Xeon that pass took 0.96x its time and the model's whole Adam step 0.82x, the small
    convolutional network's 0.88x, the digits MLP's about the same. Time your own training step with it on and off
    (``python -m benchmarks.speed --model-steps`` does so for those models, in fresh processes)
    before making it the default of a training script. Its companion :func:`adaopt.enable_cpu_copy_elision`
    (another XLA:CPU option, set the same way) keeps the steps of narrow moments in place.

    Returns:
      Whether XLA:CPU's multi-output fusion is on in this process, or will be when JAX starts its
      CPU backend. After a True, :func:`cpu_multi_output_fusion_enabled` is True once JAX runs.

    Raises:
      ValueError: ``ADAOPT_CPU_FUSION`` holds a value other than ``0``/``false``/``off``/``no`` or
        ``1``/``true``/``on``/``yes``.

    Example:
      At the top of a training script, before the first JAX computation:

      >>> import adaopt
      >>> fused = adaopt.enable_cpu_fusion()  # doctest: +SKIP
      >>> optimizer = adaopt.single_pass(adaopt.adamw(1e-3))  # one kernel per leaf on the CPU
    """
    opted_out = _opted_out()
    wants_cpu, platforms = _cpu_platform_requested()
    if not wants_cpu:
        return _warn(_NO_CPU.format(platforms=platforms))
    started = _backends_started()
    if not started:
        value = _option_in_environment()
        if value is None and opted_out is None:
            flags = os.environ.get("XLA_FLAGS", "").strip()
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_MULTI_OUTPUT_FUSION_FLAG}".strip()
        elif value is not None and value.strip().lower() in _OFF_VALUES:
            warnings.warn(_VALUE_IS_IGNORED.format(value=value), CpuFusionWarning, stacklevel=2)
        if started is False:
            if value is None and opted_out is not None:
                return _warn(_OPTED_OUT.format(value=opted_out))
            return True
        # A JAX that cannot say whether it started: the probe below starts the CPU backend and tells.
    if cpu_multi_output_fusion_enabled():
        return True
    try:
        jax.devices("cpu")
    except RuntimeError:  # no CPU backend, though the platforms name one (changed after the start)
        return _warn(_NO_CPU.format(platforms=platforms))
    if opted_out is not None:
        return _warn(_OPTED_OUT.format(value=opted_out))
    if jax.default_backend() != "cpu":
        return _warn(_DEFAULT_NOT_CPU.format(platform=jax.default_backend()))
    return _warn(_SET_TOO_LATE if flag_in_environment() else _STARTED_WITHOUT)


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

    Where the multi-output fusion is off, where no leaf has ``min_size`` elements, where the
    state holds blockwise-quantized moments (their step is a loop over chunks, or a CPU kernel,
    which the sibling trace would run a second time whole), or where the step is compiled for
    another platform than the CPU, ``single_pass(tx)`` behaves exactly as ``tx`` (the same
    program). Extra arguments of ``update`` that are not arrays (``monitor``'s ``record=``,
    static under ``jit``) reach both traces as they are.

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
    base.check_transformation("tx", tx)
    base.check_integer("min_size", min_size, 1)
    inner = base.with_extra_args(tx)

    def update_fn(
        updates: base.Updates, state: Any, params: base.Params | None = None, **extra: Any
    ) -> tuple[base.Updates, Any]:
        new_updates, new_state = inner.update(updates, state, params, **extra)
        if (
            not cpu_multi_output_fusion_enabled()
            or not any(leaf.size >= min_size for leaf in jax.tree.leaves(new_updates))
            or any(isinstance(x, storage.Quantized) for x in jax.tree.leaves(state, is_leaf=base.is_stored))
        ):
            # Blockwise-quantized moments: their step is a loop over chunks (or a CPU kernel), which a second trace
            # would run again whole, for no fusion.
            return new_updates, new_state
        arrays, static = base.split_extra_args(extra)  # static ones (monitor's record=) stay out of the trace

        def siblings(updates: Any, state: Any, params: Any, arrays: Any) -> Any:
            again = jax.lax.optimization_barrier((updates, state, params, arrays))
            return inner.update(again[0], again[1], again[2], **again[3], **static)[0]

        def plain(updates: Any, state: Any, params: Any, arrays: Any) -> Any:
            return new_updates

        sibling_updates = jax.lax.platform_dependent(updates, state, params, arrays, cpu=siblings, default=plain)
        chosen = jax.tree.map(lambda u, s: s if u.size >= min_size else u, new_updates, sibling_updates)
        return chosen, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
