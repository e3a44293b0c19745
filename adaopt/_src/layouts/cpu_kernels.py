"""Hand-written XLA:CPU kernels for the steps that XLA compiles poorly on a CPU: Adam and Lion with quantized moments.

XLA:CPU runs a table lookup as a scalar loop, about 1 ns per element, and an 8-bit moment needs two
per step (dequantize, quantize): AdamW with 8-bit moments takes about 4.5 times float32's step on
a CPU, with 4-bit moments 5.5 times, with FP8 (a conversion by integer arithmetic) 3.2 times, where
it should take less (8-bit moves 16 bytes per parameter instead of 28; ``benchmarks/RESULTS.md``,
"Memory of the states" and "Where the light states' steps spend their time"). The kernel in
``blockwise_adam.cc`` does a leaf's whole step in one pass over its blocks, vectorised, on XLA's
own intra-op threads, as an XLA FFI custom call.

:func:`enable_cpu_kernels` builds it with the host's C++ compiler (``$CXX``, else ``c++``) and
JAX's FFI headers, once per machine (the library is cached, keyed by its source, the compiler, the
flags, the host's instruction sets and jaxlib's version: ``$ADAOPT_CACHE_DIR``, else ``~/.cache/adaopt``) and registers it. From
then on, in this process, :func:`adaopt.scale_by_adam` (so ``adam`` and ``adamw``) and
:func:`adaopt.scale_by_lion` (``lion``) take it for a leaf when all of these hold, and XLA's step
otherwise:

- JAX's default backend is the CPU;
- the gradient is float32, and the moments are stored by one :class:`adaopt.Blockwise` storage of
  any format and block size (``mu_dtype="int8"``, ``"int4"`` or ``"fp8"``, and for Adam the same
  ``nu_dtype``), quantized (the leaf has at least ``min_size`` elements);
- Adam's second moment is Adam's (not AdaBelief's or Yogi's), with no AMSGrad maximum;
- no array of the leaf has an explicit sharding (a leaf sharded on a mesh with explicit axes keeps XLA's
  step). The kernel has no partitioning rule: under automatic sharding (shardings left to XLA, not in the
  types) XLA runs it on the whole leaf, and the moments and the step come out replicated on every
  device, the same numbers in more memory. Keep the kernels off in programs sharded that way.

The numbers are XLA's step's: the same float32 operations, with the fused multiply-adds XLA:CPU's
chunked step makes (Adam's moments as ``fma(g, 1 - b, old * b)``; Lion's moment to quantize the other form
for 8-bit and 4-bit codes) and its divisions by a block's scale and by
448 as products by their reciprocals. A block's largest magnitude leaves NaN out, starting from -inf as
XLA:CPU's reduction does, so a block of NaN alone has the scale -inf and steps NaN from then on, as in
XLA's step. In a block that mixes NaN with numbers, XLA's vectorised reduction drops the numbers before
a NaN in its lane, where the kernel keeps their maximum: the block's scale and so its other codes differ
there (its NaN coordinates are NaN on both sides); XLA's whole-leaf step of a leaf of a few blocks, only
with a lowered ``min_size``, keeps the NaN (the scale is NaN, where the kernel's is -inf), and the FP8
code of a NaN may differ in its sign bit (the same value). Bit for bit on the leaves chunked by rows at
XLA's default options (AVX-512 and AVX2 machines alike); elsewhere XLA contracts other operations (a
flat leaf's chunks, a small leaf's whole-leaf step, other optimisation options): a last bit of a moment
or a block's scale, and rarely a code one entry of the map away (``tests/test_cpu_kernels.py`` measures
both against XLA's step). The step is written over the gradient's buffer for the update pass to read,
where XLA's own step fuses the two: a training step's gradients are its own temporaries and are
overwritten in place; XLA first copies a gradient the step must keep. The kernel has no derivative (a
step through it cannot be differentiated, as a hypergradient would need) and runs a ``vmap`` of the step
lane by lane.
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
import jaxlib
import numpy as np

from adaopt._src import moments, storage
from adaopt._src.placement import explicit_spec

TARGET = "adaopt_blockwise_adam_cpu"
LION_TARGET = "adaopt_blockwise_lion_cpu"
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
def native_macros() -> str:
    """The C++ compiler's predefined macros at ``-march=native`` (this host's instruction sets: ``__AVX512F__``, ...),
    with which the kernels are built; empty without a compiler."""
    compiler = _compiler()
    if compiler is None:
        return ""
    command = [compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull]
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout


@functools.cache
def _library() -> ctypes.CDLL:
    """The kernel's shared library: built into the cache unless it is there, then loaded (once per process)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH (set CXX to one)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    # What -march=native means on this host (its instruction sets): a library built on another CPU of the same
    # architecture, in a shared cache, may use instructions this one lacks.
    native = native_macros()
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), version, native, " ".join(FLAGS), jaxlib.__version__, platform.machine()]
        ).encode()
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
    library = _library()
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.AdaoptBlockwiseAdam), platform="cpu")
    jax.ffi.register_ffi_target(LION_TARGET, jax.ffi.pycapsule(library.AdaoptBlockwiseLion), platform="cpu")


def enable_cpu_kernels() -> bool:
    """Build (once per machine) and register adaopt's XLA:CPU kernels, and use them from now on in this process.

    The kernels so far are Adam's and Lion's steps with blockwise quantized moments (``adaopt.adamw(...,
    mu_dtype="int8", nu_dtype="int8")``, ``"int4"``, ``"fp8"``, ``adaopt.lion(..., mu_dtype="int8")``): the conditions under which
    a leaf takes one are in
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


# The kernels' codes for storage.Blockwise's formats (``Format`` in ``blockwise_adam.cc``).
FORMATS = {"dynamic8": 0, "dynamic4": 1, "fp8": 2}


def _quantized_leaf(g: Any, *stored: Any, signed: tuple[bool, ...]) -> bool:
    """Whether ``g`` is float32 and ``stored`` are its moments in one blockwise storage (signed or not, in turn), on
    the CPU with the kernels on, with no explicit sharding."""
    if not _enabled or jax.default_backend() != "cpu" or jnp.result_type(g) != jnp.float32:
        return False
    if not all(isinstance(m, storage.Quantized) for m in stored):
        return False
    first = stored[0].storage
    if first.format not in FORMATS or any(m.storage != first for m in stored):
        return False
    if tuple(m.signed for m in stored) != signed or any(m.shape != tuple(np.shape(g)) for m in stored):
        return False
    return all(explicit_spec(x) is None for x in (g, *(a for m in stored for a in (m.codes, m.scale))))


def adam_kernel_applies(g: Any, m: Any, v: Any, *, second_moment: str, amsgrad: Any) -> bool:
    """Whether the leaf ``(g, m, v)`` of :func:`adaopt.scale_by_adam` takes the kernel (see the module)."""
    return second_moment == "adam" and amsgrad is None and _quantized_leaf(g, m, v, signed=(True, False))


def lion_kernel_applies(g: Any, m: Any) -> bool:
    """Whether the leaf ``(g, m)`` of :func:`adaopt.scale_by_lion` takes the kernel (see the module)."""
    return _quantized_leaf(g, m, signed=(True,))


@functools.cache
def _tables(format: storage.Format) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """A format's signed and unsigned maps, and their search tables (``storage.nearest_index``); for FP8, the values
    of the 256 codes (``storage._from_e4m3``'s, NaN's bits included) for both moments, and no search tables."""
    if format == "fp8":
        with jax.ensure_compile_time_eval():  # called while a step is traced
            codes = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)
            values = np.asarray(storage._from_e4m3(codes))
        return (values, values), (np.zeros(1, np.uint32),) * 2
    blockwise = storage.Blockwise(format)
    signed, unsigned = blockwise.qmap(True), blockwise.qmap(False)
    assert signed is not None and unsigned is not None
    return (signed, unsigned), tuple(storage._search_table(tuple(float(x) for x in q)) for q in (signed, unsigned))


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _scalars(b1: Any, b2: Any, debias1: Any, debias2: Any, eps: Any, eps_root: Any, floor: Any) -> jax.Array:
    """The kernels' scalars (``Scalars`` in ``blockwise_adam.cc``): a Python number where the step keeps one
    (``1 - b1`` is then computed in float64 and rounded once, as XLA folds it), else a float32 scalar."""
    one_minus = lambda b: 1 - b if isinstance(b, (int, float)) else 1 - _f32(b)
    return jnp.stack([_f32(x) for x in (b1, one_minus(b1), b2, one_minus(b2), debias1, debias2, eps, eps_root, floor)])


def _floor(stored: storage.Blockwise) -> np.float32:
    """The scales' floor as ``storage.Blockwise.encode`` compares it (FP8's scales are a block's maximum over 448)."""
    return np.float32(stored.scale_floor / storage.FP8_MAX if stored.format == "fp8" else stored.scale_floor)


def _call(target: str, g: jax.Array, stored: list[storage.Quantized], *args: Any, **attributes: Any) -> list[Any]:
    """The kernel ``target`` on ``g`` and the moments ``stored``: the step (over ``g``'s buffer) and the new moments
    (over theirs). The step over the gradient: a step whose gradient is its own temporary (a training step's) needs
    no new buffer; XLA copies a gradient that outlives the step (an argument it keeps) first."""
    arrays = [a for m in stored for a in (m.codes, m.scale)]  # codes: uint8, or float8_e4m3fn (read as bytes)
    call = jax.ffi.ffi_call(
        target,
        [jax.ShapeDtypeStruct(g.shape, jnp.float32), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)],
        input_output_aliases={i: i for i in range(1 + len(arrays))},
        vmap_method="sequential",
    )
    format = stored[0].storage.format
    step, *new = call(
        g,
        *arrays,
        *args,
        *(jnp.asarray(t) for tables in _tables(format) for t in tables[: len(stored)]),  # maps, then search tables
        block_size=np.int64(stored[0].storage.block_size),
        format=np.int32(FORMATS[format]),
        scale_floor=np.int32(bool(stored[0].storage.scale_floor)),
        **attributes,
    )
    return [step] + [
        storage.Quantized(codes, scale, m.storage, m.signed, m.shape)
        for m, codes, scale in zip(stored, new[::2], new[1::2], strict=True)
    ]


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
    """Adam's step of one leaf with quantized moments, by the kernel: ``(step, new m, new v)``, as XLA's step computes
    them from :func:`adaopt.scale_by_adam`'s scalars."""
    step, m_new, v_new = _call(
        TARGET,
        g,
        [m, v],
        _scalars(b1, b2, debias1, debias2, eps, eps_root, _floor(m.storage)),
        safe_divide=np.int32(not moments.keeps_positive(eps, jnp.float32)),  # moments.inv_root's choice
        eps_root=np.int32(not (isinstance(eps_root, (int, float)) and eps_root == 0)),
    )
    return step, m_new, v_new


def lion_step(g: jax.Array, m: storage.Quantized, *, b1: Any, b2: Any) -> tuple[jax.Array, storage.Quantized]:
    """Lion's step of one leaf with a quantized moment, by the kernel: ``(step, new m)``, as XLA's step computes them."""
    step, m_new = _call(
        LION_TARGET,
        g,
        [m],
        _scalars(b1, b2, 1, 1, 0, 0, _floor(m.storage)),
    )
    return step, m_new
