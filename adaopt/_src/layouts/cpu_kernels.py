"""Hand-written XLA:CPU kernels for the steps that XLA compiles poorly on a CPU: Adam with 8-bit moments.

XLA:CPU runs a table lookup as a scalar loop, about 1 ns per element, and an 8-bit moment needs two
per step (dequantize, quantize): AdamW with 8-bit moments takes about 5 times float32's step on
a CPU, where it should take less (it moves 16 bytes per parameter instead of 28;
``benchmarks/RESULTS.md``, "Where the light states' steps spend their time"). The kernel in
``blockwise_adam.cc`` does a leaf's whole step in one pass over its blocks, vectorised, on XLA's
own intra-op threads, as an XLA FFI custom call.

:func:`enable_cpu_kernels` builds it with the host's C++ compiler (``$CXX``, else ``c++``) and
JAX's FFI headers, once per machine (the library is cached, keyed by its source, the compiler, the
flags and jaxlib's version: ``$ADAOPT_CACHE_DIR``, else ``~/.cache/adaopt``) and registers it. From
then on, in this process, :func:`adaopt.scale_by_adam` (so ``adam`` and ``adamw``) takes it for a
leaf when all of these hold, and XLA's step otherwise:

- JAX's default backend is the CPU;
- the gradient is float32, and both moments are stored by one ``Blockwise("dynamic8")`` storage
  (``mu_dtype="int8"``, ``nu_dtype="int8"``), quantized (the leaf has at least ``min_size`` elements);
- the second moment is Adam's (not AdaBelief's or Yogi's), with no AMSGrad maximum;
- no array of the leaf has an explicit sharding (a leaf sharded on a mesh with explicit axes keeps XLA's
  step). The kernel has no partitioning rule: under automatic sharding (shardings left to XLA, not in the
  types) XLA runs it on the whole leaf, and the moments and the step come out replicated on every
  device, the same numbers in more memory. Keep the kernels off in programs sharded that way.

The numbers are XLA's step's: the same float32 operations, with the fused multiply-adds XLA:CPU's
chunked step makes (one form for the moments it quantizes, the other for the moments the step reads)
and its division by a block's scale as a product by the reciprocal; a block's largest magnitude leaves
NaN out, as XLA:CPU's reduction does. A program compiled otherwise (XLA's whole-leaf step of a small
leaf, other optimisation options) may contract elsewhere: a last bit of a moment, and rarely a code one
entry of the map away (``tests/test_cpu_kernels.py`` measures both against XLA's step). The step is
written over the gradient's buffer for the update pass to read, where XLA's own step fuses the two: a
training step's gradients are its own temporaries and are overwritten in place; XLA first copies a
gradient the step must keep. The kernel has no derivative (a step through it cannot be
differentiated, as a hypergradient would need) and runs a ``vmap`` of the step lane by lane.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaopt._src import storage
from adaopt._src.placement import explicit_spec

TARGET = "adaopt_blockwise_adam_cpu"
SOURCE = Path(__file__).with_name("blockwise_adam.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")

_enabled = False


class CpuKernelWarning(UserWarning):
    """The CPU kernels could not be built or registered: the optimizers keep XLA's steps."""


def _cache_dir() -> Path:
    configured = os.environ.get("ADAOPT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaopt"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def _library() -> ctypes.CDLL:
    """The kernel's shared library: built into the cache unless it is there, then loaded (once per process)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH (set CXX to one)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), version, " ".join(FLAGS), jax.__version__, platform.machine()]).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"blockwise_adam-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as folder:
            built = Path(folder) / path.name
            command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr[-4000:]}")
            os.replace(built, path)  # atomic: another process building the same key finds a whole file
    return ctypes.CDLL(str(path))


@functools.cache
def _register() -> None:
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(_library().AdaoptBlockwiseAdam), platform="cpu")


def enable_cpu_kernels() -> bool:
    """Build (once per machine) and register adaopt's XLA:CPU kernels, and use them from now on in this process.

    The one kernel so far is Adam's step with 8-bit blockwise moments (``adaopt.adamw(..., mu_dtype="int8",
    nu_dtype="int8")``): the conditions under which a leaf takes it are in
    :mod:`adaopt._src.layouts.cpu_kernels`. Unlike the XLA options, it can be called at any time: steps
    traced afterwards use the kernel (a step compiled before keeps XLA's).

    Returns:
      Whether the kernels are on. False, with a :class:`CpuKernelWarning` that says why, when there is
      no C++ compiler or the build fails; the optimizers then keep XLA's steps.

    Example:
      >>> import adaopt
      >>> on = adaopt.enable_cpu_kernels()  # doctest: +SKIP
    """
    global _enabled
    try:
        _register()
    except (RuntimeError, OSError, AttributeError) as error:
        warnings.warn(f"adaopt's CPU kernels are off: {error}", CpuKernelWarning, stacklevel=2)
        return False
    _enabled = True
    return True


def disable_cpu_kernels() -> None:
    """Stop using the CPU kernels in steps traced from now on (they stay registered)."""
    global _enabled
    _enabled = False


def cpu_kernels_enabled() -> bool:
    """Whether :func:`enable_cpu_kernels` turned the kernels on in this process (and nothing turned them off)."""
    return _enabled


def adam_kernel_applies(g: Any, m: Any, v: Any, *, second_moment: str, amsgrad: Any) -> bool:
    """Whether the leaf ``(g, m, v)`` of :func:`adaopt.scale_by_adam` takes the 8-bit kernel (see the module)."""
    if not _enabled or second_moment != "adam" or amsgrad is not None or jax.default_backend() != "cpu":
        return False
    if not (isinstance(m, storage.Quantized) and isinstance(v, storage.Quantized)):
        return False
    if m.storage != v.storage or m.storage.format != "dynamic8" or not m.signed or v.signed:
        return False
    if jnp.result_type(g) != jnp.float32 or tuple(np.shape(g)) != m.shape or m.shape != v.shape:
        return False
    return all(explicit_spec(x) is None for x in (g, m.codes, m.scale, v.codes, v.scale))


@functools.cache
def _tables() -> tuple[np.ndarray, ...]:
    """The signed and unsigned 8-bit maps and their search tables (``storage.nearest_index``)."""
    maps = [storage.dynamic_map(True), storage.dynamic_map(False)]
    searches = [storage._search_table(tuple(float(x) for x in q)) for q in maps]
    return (*maps, *searches)


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def adam_step(
    g: jax.Array,
    m: storage.Quantized,
    v: storage.Quantized,
    *,
    b1: Any,
    b2: Any,
    debias1: Any,
    debias2: Any,
    eps: Any,
    eps_root: Any,
) -> tuple[jax.Array, storage.Quantized, storage.Quantized]:
    """Adam's step of one leaf with 8-bit moments, by the kernel: ``(step, new m, new v)``, as XLA's step computes them.

    The scalars are those of :func:`adaopt.scale_by_adam`'s step: a Python number where it keeps one
    (``1 - b1`` is then computed in float64 and rounded once, as XLA folds it), else a float32 scalar.
    """
    one_minus = lambda b: 1 - b if isinstance(b, (int, float)) else 1 - _f32(b)
    scalars = jnp.stack(
        [
            _f32(x)
            for x in (b1, one_minus(b1), b2, one_minus(b2), debias1, debias2, eps, eps_root, m.storage.scale_floor)
        ]
    )
    floor = m.storage.scale_floor
    safe = not (isinstance(eps, (int, float)) and eps > 0)  # moments.inv_root's choice
    with_root = not (isinstance(eps_root, (int, float)) and eps_root == 0)
    call = jax.ffi.ffi_call(
        TARGET,
        (
            jax.ShapeDtypeStruct(g.shape, jnp.float32),
            jax.ShapeDtypeStruct(m.codes.shape, m.codes.dtype),
            jax.ShapeDtypeStruct(m.scale.shape, m.scale.dtype),
            jax.ShapeDtypeStruct(v.codes.shape, v.codes.dtype),
            jax.ShapeDtypeStruct(v.scale.shape, v.scale.dtype),
        ),
        # The step over the gradient, the moments in place: a step whose gradient is its own temporary (a training
        # step's) needs no new buffer; XLA copies a gradient that outlives the step (an argument it keeps) first.
        input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
        vmap_method="sequential",
    )
    step, m_codes, m_scale, v_codes, v_scale = call(
        g,
        m.codes,
        m.scale,
        v.codes,
        v.scale,
        scalars,
        *(jnp.asarray(t) for t in _tables()),
        block_size=np.int64(m.storage.block_size),
        safe_divide=np.int32(safe),
        eps_root=np.int32(with_root),
        scale_floor=np.int32(bool(floor)),
    )
    return (
        step,
        storage.Quantized(m_codes, m_scale, m.storage, m.signed, m.shape),
        storage.Quantized(v_codes, v_scale, v.storage, v.signed, v.shape),
    )
