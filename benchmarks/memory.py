"""Memory of the optimizer states and the speed of the light ones, in one run, written to a Markdown report.

Four tables:

- **State bytes per parameter** of every registry optimizer at its defaults and of AdamW with each
  storage of its moments (``mu_dtype`` / ``nu_dtype``: float32, bfloat16, ``"bfloat16_sr"``,
  ``"int8"``, ``"int4"``, ``"fp8"``), beside optax's Adam and Adafactor, on the GPT-2 tree of
  ``benchmarks/speed.py`` (``jax.eval_shape`` of ``init``: nothing is allocated).
- **Peak memory of a compiled step**, from XLA's own analysis of the compiled program
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased, with the
  parameters and the state donated): the optimizer step of the GPT-2 tree, and a whole training
  step (loss, gradients, update) of the convergence suite's char-level transformer.
- **Step time** of AdamW on the GPT-2 tree with each storage, against adaopt's float32 AdamW and
  optax's ``adamw`` in the same run: medians of ``--reps`` timed steps, taken in rounds that step every row
  once (``speed.time_interleaved``: a drift of the machine's speed reaches all rows alike; ``update`` +
  ``apply_updates``, jitted, parameters and state donated; the CPU kernels' rows as a training step runs them,
  the kernel writing over the gradients, then one pass for the rest and the update: ``speed.jax_split_stepper``),
  and the bytes a step must move per parameter (read the parameter, the gradient and the state,
  write the parameter and the state: 12 + 2 x state bytes).
- **A whole training step** on the GPT-2 tree (``least_squares``' gradients, which come out of dot
  products as a model's do, the update and ``apply_updates`` in one program) with the light states,
  each with what makes it fast (the kernels, the copy elision's column), against float32's, timed the
  same way (``--no-training`` leaves it out).

The peaks and the step times are measured twice, with XLA's defaults and with XLA:CPU's copy
elision (:func:`adaopt.enable_cpu_copy_elision`, an option read when JAX starts: a child process
measures that column), beside each other; ``--copy-elision off`` or ``on`` measures one of them only.

``--kernels`` prints something else, and writes nothing: where AdamW's step with each storage spends
its time, XLA's kernels by name with their milliseconds and launches per step, from a
``jax.profiler`` trace of a few steps (:func:`benchmarks.report.kernel_times`).

Usage::

    python -m benchmarks.memory [--reps 5] [--out benchmarks/RESULTS.md] [--no-timing | --no-training]
                                [--copy-elision both]
    python -m benchmarks.memory --kernels [float32,int8] [--top 12]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaopt
from benchmarks import monitor, report, speed, workloads
from benchmarks.report import load_average, machine, markdown_table
from benchmarks.report import write_section as write_between_markers

BEGIN = "<!-- memory:begin -->"
END = "<!-- memory:end -->"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"

STORAGES: dict[str, Any] = {
    "float32": None,
    "bfloat16": jnp.bfloat16,
    "bfloat16_sr": "bfloat16_sr",
    "int8": "int8",
    "int4": "int4",
    "fp8": "fp8",
}


ADAMW_LR, ADAMW_DECAY, LION_LR = 1e-3, 1e-2, 1e-4
"""The rows' hyperparameters (Lion's decay: none), which the CPU kernels' rows split in two (:func:`kernel_split`)."""


def _adamw(storage: Any) -> optax.GradientTransformation:
    return adaopt.adamw(ADAMW_LR, weight_decay=ADAMW_DECAY, mu_dtype=storage, nu_dtype=storage)


QUANTIZED = ("int8", "int4", "fp8")
KERNEL = "adaopt adamw ({}, CPU kernel)"
LION_KERNEL = "adaopt lion (int8, CPU kernel)"
KERNEL_ROWS = (*(KERNEL.format(name) for name in QUANTIZED), LION_KERNEL)
"""The rows whose steps are traced with ``adaopt.enable_cpu_kernels()``: AdamW's with quantized moments, Lion's with
int8 moments."""


def kernel_split(label: str) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """A kernel row's optimizer as the transformation that takes the kernel and the rest (decoupled weight decay and
    the learning rate, as in the row's ``adaopt.adamw`` or ``adaopt.lion``): ``speed.jax_split_stepper``'s two parts."""
    if label == LION_KERNEL:
        return adaopt.scale_by_lion(mu_dtype="int8"), optax.scale(-LION_LR)
    storage = label.split("(")[1].split(",")[0]
    kernel = adaopt.scale_by_adam(mu_dtype=storage, nu_dtype=storage)
    return kernel, optax.chain(optax.add_decayed_weights(ADAMW_DECAY), optax.scale(-ADAMW_LR))


def contenders() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The optimizers of the peak-memory and timing tables, by label."""
    rows: dict[str, Callable[[], optax.GradientTransformation]] = {}
    for name, storage in STORAGES.items():
        rows[f"adaopt adamw ({name})"] = lambda s=storage: _adamw(s)
        if name in QUANTIZED:
            rows[KERNEL.format(name)] = lambda s=storage: _adamw(s)
    rows["adaopt lion (float32)"] = lambda: adaopt.lion(LION_LR)
    rows["adaopt lion (int8)"] = lambda: adaopt.lion(LION_LR, mu_dtype="int8")
    rows[LION_KERNEL] = lambda: adaopt.lion(LION_LR, mu_dtype="int8")
    rows["adaopt adafactor"] = lambda: adaopt.adafactor()
    rows["adaopt came"] = lambda: adaopt.came(2e-4)
    rows["adaopt adam_mini"] = lambda: adaopt.adam_mini(1e-3)
    rows["optax adamw"] = lambda: optax.adamw(ADAMW_LR)
    rows["optax adafactor"] = lambda: optax.adafactor(1e-2)
    return rows


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(tx: optax.GradientTransformation, shapes: Any) -> int:
    """Bytes of ``tx``'s state for parameters of ``shapes``, without allocating it."""
    return _nbytes(jax.eval_shape(tx.init, shapes))


def bytes_per_parameter_rows(shapes: Any) -> list[list[str]]:
    n = speed.count(shapes)[1]
    rows = []
    for spec in adaopt.REGISTRY.values():
        rows.append([f"`{spec.name}`", "defaults", f"{state_bytes(spec.make(), shapes) / n:.3f}"])
    for name, storage in STORAGES.items():
        rows.append(["`adamw`", f"`{name}` moments", f"{state_bytes(_adamw(storage), shapes) / n:.3f}"])
    rows.append(["optax `adam`", "defaults", f"{state_bytes(optax.adam(1e-3), shapes) / n:.3f}"])
    rows.append(["optax `adafactor`", "defaults", f"{state_bytes(optax.adafactor(1e-2), shapes) / n:.3f}"])
    return rows


def _peak(compiled: Any) -> tuple[int, int]:
    """(peak bytes, temporaries) of a compiled program, from XLA's memory analysis."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(peak), int(m.temp_size_in_bytes)


def optimizer_step_peak(tx: optax.GradientTransformation, shapes: Any) -> tuple[int, int]:
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, shapes)
    return _peak(jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile())


def split_step_peak(label: str, shapes: Any) -> tuple[int, int]:
    """A kernel row's step as ``speed.jax_split_stepper`` runs it: the larger of its two programs' (peak, temporaries),
    each peak with the arrays that stay alive outside that program (the parameters while the kernel runs, which it
    does not read; the kernel's state while the rest runs)."""
    kernel, tail = kernel_split(label)
    update, finish = speed.split_programs(kernel, tail)
    kernel_state, tail_state = jax.eval_shape(kernel.init, shapes), jax.eval_shape(tail.init, shapes)
    first = _peak(update.lower(shapes, kernel_state, shapes).compile())
    second = _peak(finish.lower(shapes, tail_state, shapes).compile())
    aside = (state_bytes(tail, shapes) + _nbytes(shapes), state_bytes(kernel, shapes))
    return max((first[0] + aside[0], first[1]), (second[0] + aside[1], second[1]))


def training_step_peak(tx: optax.GradientTransformation, workload: workloads.Workload) -> tuple[int, int]:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), workload.init())
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), workload.batches(1, False))
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), workload.data)

    def step(params: Any, state: Any, data: Any, batch: Any) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: workload.loss(p, data, batch)[0])(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    return _peak(jax.jit(step, donate_argnums=(0, 1)).lower(params, state, data, batch).compile())


@contextlib.contextmanager
def switched(label: str) -> Iterator[bool]:
    """The CPU kernels on while a row of :data:`KERNEL_ROWS` is traced; yields False for it if they cannot be built,
    or off a CPU (where the kernels do not apply)."""
    if label not in KERNEL_ROWS:
        yield True
        return
    if jax.default_backend() != "cpu":
        yield False
        return
    on = adaopt.enable_cpu_kernels()
    try:
        yield on
    finally:
        adaopt.disable_cpu_kernels()


def peak_rows(shapes: Any) -> list[list[str]]:
    lm = workloads.char_lm()
    rows = []
    for label, make in contenders().items():
        with switched(label) as usable:
            if not usable:
                continue
            tree_peak, tree_temp = (
                split_step_peak(label, shapes) if label in KERNEL_ROWS else optimizer_step_peak(make(), shapes)
            )
            lm_peak, lm_temp = training_step_peak(make(), lm)
        rows.append(
            [
                label,
                f"{tree_peak / 2**20:.1f}",
                f"{tree_temp / 2**20:.1f}",
                f"{lm_peak / 2**10:.0f}",
                f"{lm_temp / 2**10:.0f}",
            ]
        )
    return rows


def _medians(steppers: dict[str, speed.Stepper], reps: int) -> dict[str, float]:
    """Each stepper's median step, the steppers timed in interleaved rounds (:func:`speed.time_interleaved`)."""
    times = speed.time_interleaved([stepper.step for stepper in steppers.values()], reps)
    return {label: statistics.median(t) for label, t in zip(steppers, times, strict=True)}


def _float32_base(label: str, medians: dict[str, float]) -> float:
    """The median of the same optimizer's float32 row (adaopt's AdamW for optax's)."""
    return medians.get(label.split(" (")[0] + " (float32)", medians["adaopt adamw (float32)"])


def timing_rows(shapes: Any, reps: int) -> list[list[str]]:
    n = speed.count(shapes)[1]
    host_params = speed.host_arrays(shapes, seed=0, scale=0.02)
    grads = jax.tree.map(jnp.asarray, speed.host_arrays(shapes, seed=1, scale=1e-3))
    # Every row compiled first (the kernel rows traced with the kernels on), then timed in interleaved rounds.
    steppers: dict[str, speed.Stepper] = {}
    for label, make in contenders().items():
        with switched(label) as usable:
            if not ("adamw" in label or "lion" in label) or not usable:
                continue
            if label in KERNEL_ROWS:
                steppers[label] = speed.jax_split_stepper(*kernel_split(label), host_params, grads)
            else:
                steppers[label] = speed.jax_stepper(make(), host_params, grads)
    medians = _medians(steppers, reps)
    state_per_param = {label: stepper.state_bytes / n for label, stepper in steppers.items()}
    del steppers
    speed._free()
    rows = []
    for label, median in medians.items():
        base = _float32_base(label, medians)
        moved = 12 + 2 * state_per_param[label]
        rows.append(
            [label, f"{median * 1e3:.1f}", f"{median / base:.2f}", f"{state_per_param[label]:.3f}", f"{moved:.1f}",
             f"{moved * n / median / 1e9:.1f}"]
        )  # fmt: skip
    return rows


TRAINING_ROWS = (
    "adaopt adamw (float32)",
    "adaopt adamw (bfloat16)",
    "adaopt adamw (bfloat16_sr)",
    *(KERNEL.format(name) for name in QUANTIZED),
    "adaopt lion (float32)",
    LION_KERNEL,
)
"""The rows of the training-step table: the light states with what makes them fast (the copy elision's column for
bfloat16, the kernels for the quantized ones), beside float32."""


def least_squares(params: Any, inputs: Any) -> jax.Array:
    """A loss over the GPT-2 tree whose matrices' gradients come out of dot products, as a model's do (so that no
    optimizer can fuse their computation into its own pass), for little compute: ``0.5 |x W^T|^2`` summed over the
    matrices ``W`` with ``x`` four rows of the leaf's input, ``0.5 |b - x|^2`` over the vectors."""
    total = jnp.float32(0.0)
    for w, x in zip(jax.tree.leaves(params), jax.tree.leaves(inputs), strict=True):
        total += 0.5 * jnp.sum((x[:4] @ w.T) ** 2) if w.ndim == 2 else 0.5 * jnp.sum((w - x) ** 2)
    return total


def training_rows(shapes: Any, reps: int) -> list[list[str]]:
    """:data:`TRAINING_ROWS`' training steps on the GPT-2 tree (:func:`least_squares`' gradients, the update and
    ``apply_updates`` in one program, parameters and state donated), timed in interleaved rounds: the median and the
    ratio over the same optimizer's float32 step."""
    host_params = speed.host_arrays(shapes, seed=0, scale=0.02)
    inputs = jax.tree.map(jnp.asarray, speed.host_arrays(shapes, seed=1, scale=0.02))
    makers = contenders()
    steppers: dict[str, speed.Stepper] = {}
    for label in TRAINING_ROWS:
        with switched(label) as usable:
            if usable:
                steppers[label] = speed.jax_stepper(makers[label](), host_params, inputs, loss=least_squares)
    medians = _medians(steppers, reps)
    del steppers
    speed._free()
    return [
        [label, f"{median * 1e3:.1f}", f"{median / _float32_base(label, medians):.2f}"]
        for label, median in medians.items()
    ]


PEAK_HEADER = ["GPT-2 step peak (MiB)", "its temporaries (MiB)", "charlm step peak (KiB)", "its temporaries (KiB)"]
TIMING_HEADER = ["median (ms)", "/ adaopt float32", "state bytes / param", "bytes moved / param", "achieved GB/s"]
TRAINING_HEADER = ["training step, median (ms)", "/ float32"]


def measure(args: argparse.Namespace, shapes: Any) -> dict[str, list[list[str]]]:
    """The rows of the peaks and (unless ``--no-timing``) the step times (unless ``--no-training`` too the training
    steps'), in this process."""
    rows = {"peaks": peak_rows(shapes)}
    if not args.no_timing:
        rows["timing"] = timing_rows(shapes, args.reps)
        if not args.no_training:
            rows["training"] = training_rows(shapes, args.reps)
    return rows


def measure_elided(args: argparse.Namespace) -> dict[str, list[list[str]]]:
    """:func:`measure` in a child process that turns the copy elision on before JAX starts."""
    rows: dict[str, list[list[str]]] = report.measured_in_child(
        "benchmarks.memory",
        ["--reps", str(args.reps)]
        + (["--no-timing"] if args.no_timing else [])
        + (["--no-training"] if args.no_training else []),
    )
    return rows


def render(args: argparse.Namespace, shapes: Any) -> str:
    leaves, n = speed.count(shapes)
    runs = report.copy_elision_runs(args.copy_elision, lambda: measure(args, shapes), lambda: measure_elided(args))
    labels = [row[0] for row in runs[0][1]["peaks"]]
    state = report.copy_elision_state(args.copy_elision)
    lines = [
        BEGIN,
        "## Memory of the states",
        "",
        f"`{report.invocation('benchmarks.memory')}`, "
        f"{datetime.date.today().isoformat()}; load average {load_average()}.",
        "",
        markdown_table(["", ""], [[k, v] for k, v in (machine() | {"XLA:CPU copy elision": state}).items()]),
        "",
        f"### State bytes per parameter (GPT-2 tree: {leaves} leaves, {n / 1e6:.1f} M parameters)",
        "",
        markdown_table(["optimizer", "configuration", "state bytes / parameter"], bytes_per_parameter_rows(shapes)),
        "",
        "### Peak memory of a compiled step (XLA's memory analysis; parameters and state donated)",
        "",
        "The GPT-2 tree's optimizer step (update and apply; the CPU kernels' rows: the larger of the two programs "
        "their step times run, below), and a whole training step of the char-level transformer (`charlm`: loss, "
        "gradients, update).",
        "",
        markdown_table(*report.side_by_side(labels, PEAK_HEADER, [(suffix, rows["peaks"]) for suffix, rows in runs])),
    ]
    if not args.no_timing:
        timed = [row[0] for row in runs[0][1]["timing"]]
        lines += [
            "",
            f"### The step of AdamW (and Lion) with each storage on the GPT-2 tree (median of {args.reps})",
            "",
            "`/ adaopt float32`: over the same optimizer's float32 step (adaopt's AdamW for optax's) measured the same "
            "way, in the same process. The rows' steps are timed in rounds that step every row once (each round "
            "starting one row later), so that a change of the machine's speed during the run reaches all rows alike.",
            "",
            markdown_table(
                *report.side_by_side(
                    timed,
                    TIMING_HEADER,
                    [(suffix, rows["timing"]) for suffix, rows in runs],
                    ["median (ms)", "/ adaopt float32", "achieved GB/s"],  # the bytes are the same
                )
            ),
            "",
            f"`{KERNEL.format('...')}`, `{LION_KERNEL}`: traced with `adaopt.enable_cpu_kernels()`, their quantized "
            "leaves' steps by adaopt's XLA:CPU kernels. Each writes the step over the gradient for the update pass to "
            "read (XLA's own step fuses the two), as a training step's gradients, its own temporaries, let it. Their "
            "rows time two programs one after the other: the transformation that takes the kernel (`scale_by_adam`, "
            "`scale_by_lion`) with the gradients donated (a fresh copy of them for each rep, made before its timer "
            "starts, and freed after it stops, as the other rows' gradients are never allocated or freed), and the rest of the optimizer (decoupled weight decay, the learning rate) with `apply_updates`, "
            "one pass, as a training step runs them. In one program whose gradients are its arguments XLA copies "
            "each gradient before the kernel writes over it (JAX reuses a donated argument only for an output of its "
            "shape), a copy a training step does not make. The other rows time one program.",
        ]
    if not args.no_timing and not args.no_training:
        lines += [
            "",
            f"### A whole training step on the GPT-2 tree (median of {args.reps})",
            "",
            "The gradients of a least-squares loss (`least_squares`: four rows of input through each matrix, so that "
            "each matrix's gradient comes out of a dot product, as a model's does, and no optimizer can fuse its "
            "computation into its own pass), the update and `apply_updates` in one program, parameters and state "
            "donated; the rows timed in interleaved rounds. The kernels' rows write their steps over the gradients, "
            "the step's own temporaries. `/ float32`: over the same optimizer's float32 training step.",
            "",
            markdown_table(
                *report.side_by_side(
                    [row[0] for row in runs[0][1]["training"]],
                    TRAINING_HEADER,
                    [(suffix, rows["training"]) for suffix, rows in runs],
                    TRAINING_HEADER,
                )
            ),
        ]
    lines.append(END)
    return "\n".join(lines)


def kernel_tables(storages: list[str], shapes: Any, top: int) -> str:
    """For each storage of ``STORAGES`` named, the ``top`` kernels of AdamW's step on ``shapes`` (:func:`report.kernel_times`)."""
    host_params = speed.host_arrays(shapes, seed=0, scale=0.02)
    grads = jax.tree.map(jnp.asarray, speed.host_arrays(shapes, seed=1, scale=1e-3))
    parts = []
    for name in storages:
        stepper = monitor.Stepper(_adamw(STORAGES[name]), host_params, grads)
        for _ in range(speed.WARMUP):
            stepper.block(1)
        wall = statistics.median(stepper.block(1) for _ in range(5))
        kernels = report.kernel_times(lambda stepper=stepper: stepper.block(1))
        rows = [[kernel, f"{ms:.2f}", str(n)] for kernel, ms, n in kernels[:top]]
        parts += [f"AdamW, {name} moments: {wall * 1e3:.1f} ms per step (median of 5)", ""]
        parts += [markdown_table(["kernel", "ms per step", "launches per step"], rows), ""]
        del stepper
        speed._free()
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-timing", action="store_true", help="only the byte counts and the compiled peaks")
    parser.add_argument(
        "--no-training", action="store_true", help="time the optimizer's steps only, not the whole training steps"
    )
    parser.add_argument(
        "--kernels",
        nargs="?",
        const=",".join(STORAGES),
        default=None,
        help="instead: print the kernels of AdamW's step with these storages (comma-separated: "
        + ", ".join(STORAGES)
        + "; all when none is named)",
    )
    parser.add_argument("--top", type=int, default=12, help="--kernels: the slowest kernels shown per storage")
    report.add_copy_elision_arguments(parser)
    args = parser.parse_args(argv)
    report.start_copy_elision(parser, args)
    shapes = speed.gpt2_tree()
    if args.kernels is not None:
        unknown = sorted(set(args.kernels.split(",")) - set(STORAGES))
        if unknown:
            parser.error(f"--kernels: unknown storages {unknown}; known: {', '.join(STORAGES)}")
        print(kernel_tables(args.kernels.split(","), shapes, args.top))
        return
    if args.rows_json is not None:
        args.rows_json.write_text(json.dumps(measure(args, shapes)))
        return
    section = render(args, shapes)
    write_between_markers(args.out, section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
