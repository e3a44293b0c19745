"""Steps in place on XLA:CPU: the copies of donated buffers that a step reads twice, elided.

A jitted training step donates the parameters and the optimizer state, so that XLA writes the new
values over the old ones. When one of those buffers has a second reader besides the kernel that
overwrites it, XLA must run that reader first. XLA:CPU's copy insertion, by default, cannot prove
an order it may use and copies the whole buffer first instead (an extra read and write of it, and
a fresh allocation every step). Moments stored narrower than the computation hit this on every
leaf: with bfloat16 moments (rounded to nearest or stochastically), the update reads the old
moment while the moment's own kernel overwrites it in place, so the step copies both moments of
every leaf first: the step's peak memory is then float32 Adam's, and its time about twice that.

XLA has the precise analysis (region-based live ranges, which its GPU compiler runs by default)
behind an XLA:CPU option, ``--xla_cpu_copy_insertion_use_region_analysis=true``, read once per
process from ``XLA_FLAGS`` when JAX starts its CPU backend. :func:`enable_cpu_copy_elision` adds it
before that; the copies then go, and the numbers stay the same (XLA orders the readers first).
Measured figures are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

from adaopt._src.layouts.xla_cpu import backends_started as _backends_started
from adaopt._src.layouts.xla_cpu import compiled_on_cpu
from adaopt._src.layouts.xla_cpu import cpu_platform_requested as _cpu_platform_requested

COPY_ELISION_OPTION = "xla_cpu_copy_insertion_use_region_analysis"
CPU_COPY_ELISION_FLAG = f"--{COPY_ELISION_OPTION}=true"

_TRUE, _FALSE = ("true", "1"), ("false", "0")  # what XLA accepts (any case); it aborts at "yes", "t", ...

_HOW = (
    "XLA reads its options once per process, when JAX starts its CPU backend. To turn the elision on, start a new "
    "Python process (in a notebook: restart the kernel) and call adaopt.enable_cpu_copy_elision() before its first "
    f"JAX computation, or set XLA_FLAGS={CPU_COPY_ELISION_FLAG} before starting Python."
)
_STARTED_WITHOUT = (
    "JAX's CPU backend already started without XLA:CPU's region-based copy elision: a step that reads a donated "
    "buffer before overwriting it (bfloat16 moments) still copies that buffer whole. " + _HOW
)
_SET_TOO_LATE = (
    f"XLA_FLAGS asks for {CPU_COPY_ELISION_FLAG}, but it was set after JAX's CPU backend started, so the compiler "
    "does not run it. " + _HOW
)
_USER_SAYS_NO = (
    f"XLA_FLAGS sets {COPY_ELISION_OPTION}={{value}}: adaopt.enable_cpu_copy_elision() leaves the elision off, as "
    "asked (remove that flag to let it turn the elision on)."
)
_NOT_UNDERSTOOD = (
    f"XLA_FLAGS sets {COPY_ELISION_OPTION}={{value!r}}, which XLA refuses (it takes true, false, 1 or 0): JAX would "
    "fail to start. Set it to true or false, or remove it."
)
_NO_CPU = (
    "JAX_PLATFORMS={platforms} starts no CPU backend, and the copy elision only changes computations on the CPU. "
    "Nothing to do."
)
_DEFAULT_NOT_CPU = (
    "JAX's default backend is {platform}, and this option only changes computations on the CPU: nothing to do for "
    "steps on the {platform}. JAX's CPU backend started without the elision; for computations placed on the CPU: "
    + _HOW
)


class CpuCopyElisionWarning(UserWarning):
    """:func:`enable_cpu_copy_elision` could not turn the copy elision on, or was asked not to; the message says
    why and what to do. Silence it with ``warnings.simplefilter("ignore", adaopt.CpuCopyElisionWarning)``."""


def _value_in_environment() -> str | None:
    """The value ``XLA_FLAGS`` gives the option (the last one given, as XLA reads them), None when absent."""
    value = None
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, sep, text = flag.partition("=")
        if name.lstrip("-") == COPY_ELISION_OPTION:
            value = text if sep else "true"  # a boolean flag given bare is true
    return value


@functools.cache
def cpu_backend_elides_copies() -> bool:
    """Whether this process's XLA:CPU backend elides the copy of a donated buffer read before it is overwritten.

    Compiles a probe once per process (:func:`~adaopt._src.layouts.xla_cpu.compiled_on_cpu`: a donated
    ``p`` read by a sum and overwritten by ``p + g``) and looks for a copy in it. False when there is no
    CPU backend.
    """
    entry = compiled_on_cpu(lambda p, g: (p + g, jnp.sum(p)), 2, donate_argnums=(0,))
    return entry is not None and " copy(" not in entry


def enable_cpu_copy_elision() -> bool:
    """Turn on XLA:CPU's region-based copy elision, so that the steps of narrow (bfloat16) moments run in place.

    Called before JAX starts its backends (before the first computation, or the first call that
    lists the devices), this appends ``--xla_cpu_copy_insertion_use_region_analysis=true`` to the
    environment variable ``XLA_FLAGS`` (the other flags stay as they are) and returns True.
    Called again, or with the option already in ``XLA_FLAGS``, it changes nothing; an explicit
    ``=false`` there is the user's choice, kept (with a :class:`CpuCopyElisionWarning`).

    Called after JAX started, it cannot change the running compiler: it returns whether the CPU
    backend elides the copies (it does when ``XLA_FLAGS`` had the option at the start), and when
    it does not, warns with a :class:`CpuCopyElisionWarning` that says what to do (call it
    before the first JAX computation, in a notebook after restarting the kernel, or set
    ``XLA_FLAGS`` before starting Python). It never restarts a backend.

    What it changes (``benchmarks/RESULTS.md`` has the measured figures): XLA:CPU copies a donated
    buffer whole, every step, when a kernel reads it besides the one that overwrites it. AdamW's
    step with bfloat16 moments (rounded to nearest or stochastically) then copies both moments of
    every leaf first; with the elision, XLA runs the readers first instead, and the step holds no
    copy. The numbers are the same. The option is XLA's own (its GPU compiler runs this analysis
    by default); it only changes computations on the CPU.

    Returns:
      Whether the copy elision is on in this process, or will be when JAX starts its CPU backend.

    Example:
      At the top of a training script, before the first JAX computation:

      >>> import adaopt
      >>> elided = adaopt.enable_cpu_copy_elision()  # doctest: +SKIP
    """
    wants_cpu, platforms = _cpu_platform_requested()
    if not wants_cpu:
        return _warn(_NO_CPU.format(platforms=platforms))
    value = _value_in_environment()
    if value is not None and value.strip().lower() not in _TRUE + _FALSE:
        raise ValueError(_NOT_UNDERSTOOD.format(value=value))
    user_says_no = value is not None and value.strip().lower() in _FALSE
    started = _backends_started()
    if not started:
        if value is None:
            flags = os.environ.get("XLA_FLAGS", "").strip()
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_COPY_ELISION_FLAG}".strip()
        if started is False:
            return _warn(_USER_SAYS_NO.format(value=value)) if user_says_no else True
        # A JAX that cannot say whether it started: the probe below starts the CPU backend and tells.
    if cpu_backend_elides_copies():
        return True
    try:
        jax.devices("cpu")
    except RuntimeError:  # no CPU backend, though the platforms name one
        return _warn(_NO_CPU.format(platforms=platforms))
    if user_says_no:
        return _warn(_USER_SAYS_NO.format(value=value))
    if jax.default_backend() != "cpu":
        return _warn(_DEFAULT_NOT_CPU.format(platform=jax.default_backend()))
    return _warn(_STARTED_WITHOUT if value is None else _SET_TOO_LATE)


def _warn(message: str) -> bool:
    warnings.warn(message, CpuCopyElisionWarning, stacklevel=3)
    return False
