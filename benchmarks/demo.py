"""Train a small MLP on scikit-learn's digits with every optimizer in adaopt's registry.

The model is a 64 -> 64 -> 10 tanh MLP written in plain JAX (the parameters are a dict of
arrays). The 1797 digits are split 80/20 (stratified, ``random_state=0``) and standardised
with the training split's statistics. Every optimizer starts from the same initial parameters
and sees the same deterministic sequence of minibatches of 128, for a fixed number of steps.
Each optimizer is built with its defaults plus the learning rate tuned for these workloads
(:mod:`benchmarks.learning_rates`); the tuning-free ones (learning-rate-free and loss-driven methods)
run at their defaults, untouched. Beside the registry, AdamW runs with memory-light moments
(``STORAGE_VARIANTS``: 8-bit and 4-bit blocks, bfloat16 with stochastic rounding, for every leaf)
at AdamW's learning rate; the table's state B/param column shows what each saves. Every step
passes the minibatch loss as ``update(..., value=loss)`` (the loss-driven methods use it), and
Sophia (``NEEDS_HESSIAN``) Hutchinson's estimate of its Hessian diagonal as ``hessian=``; a
method that compares losses between steps (bold driver) gets the full training set each step;
Schedule-Free is evaluated at its averaged parameters. Run as a script, it first turns on XLA:CPU's
copy elision (:func:`adaopt.enable_cpu_copy_elision`), as a CPU training script should.

Training runs in jitted chunks of ``--chunk`` steps (``jax.lax.scan``); after each chunk the
full training loss and the test accuracy are evaluated. The script prints two tables, the
optimizers with a tuned learning rate and the tuning-free ones beside tuned Adam, and writes a
two-panel plot (training loss, test accuracy) for each: ``<out>/digits_mlp.png`` and
``<out>/digits_mlp_tuning_free.png``.

Usage::

    python -m benchmarks.demo [--steps 1500] [--optimizers adam,sgd] [--out demo_output]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import adaopt
from adaopt import Capability, OptimizerSpec
from benchmarks import learning_rates, light_states, workloads

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Params = dict[str, jax.Array]

TARGET_ACCURACY = 0.95
HIDDEN = 64
PLOT_NAME = "digits_mlp.png"
TUNING_FREE_PLOT_NAME = "digits_mlp_tuning_free.png"
BASELINE = "adam"  # shown beside the tuning-free methods, at its tuned learning rate
# AdamW with memory-light moments (every leaf stored so: the MLP's leaves are all small), at AdamW's learning rate:
# the state B/param column shows what they save, the loss and accuracy what they cost.
STORAGE_VARIANTS = ("adamw_int8", "adamw_int4", "adamw_bf16_sr")


class Data(TypedDict):
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


class Result(TypedDict):
    name: str
    learning_rate: float
    tuning_free: bool  # run at its defaults, no learning rate tuned
    steps: list[int]  # the steps at which the model was evaluated (0, chunk, 2 * chunk, ...)
    train_loss: list[float]  # full training-set loss at those steps
    test_accuracy: list[float]  # test accuracy at those steps
    final_train_loss: float
    final_test_accuracy: float
    steps_to_target: int | None  # first evaluated step with test accuracy >= TARGET_ACCURACY
    compile_s: float  # tracing and compiling the chunk function(s)
    train_s: float  # running all chunks and evaluations, after compilation
    state_bytes_per_param: float  # the optimizer state's bytes over the number of parameters


def load_data() -> Data:
    """The digits split 80/20 (stratified), standardised with the training split's statistics."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # constant (always blank) pixels
    return Data(
        x_train=jnp.asarray((x_tr - mean) / std, dtype=jnp.float32),
        y_train=jnp.asarray(y_tr, dtype=jnp.int32),
        x_test=jnp.asarray((x_te - mean) / std, dtype=jnp.float32),
        y_test=jnp.asarray(y_te, dtype=jnp.int32),
    )


def init_mlp(key: jax.Array, sizes: Sequence[int] = (64, HIDDEN, 10)) -> Params:
    """LeCun-normal weights and zero biases for a dense network with the given layer sizes.

    The weights come from one flat ``jax.random.normal`` draw, cut up on the host: one small
    XLA compilation instead of one per layer shape (seconds on CPU).
    """
    shapes = list(itertools.pairwise(sizes))
    flat = np.asarray(jax.random.normal(key, (sum(a * b for a, b in shapes),), jnp.float32))
    params: Params = {}
    offset = 0
    for i, (fan_in, fan_out) in enumerate(shapes):
        w = flat[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out) / math.sqrt(fan_in)
        params[f"w{i}"] = jnp.asarray(w, jnp.float32)
        params[f"b{i}"] = jnp.asarray(np.zeros(fan_out, np.float32))
        offset += fan_in * fan_out
    return params


def forward(params: Params, x: jax.Array) -> jax.Array:
    """The logits: tanh hidden layers, linear output."""
    n_layers = len(params) // 2
    for i in range(n_layers - 1):
        x = jnp.tanh(x @ params[f"w{i}"] + params[f"b{i}"])
    return x @ params[f"w{n_layers - 1}"] + params[f"b{n_layers - 1}"]


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def evaluate(params: Params, data: Data) -> tuple[jax.Array, jax.Array]:
    """Full training-set loss and test accuracy."""
    train_loss = loss_fn(params, data["x_train"], data["y_train"])
    accuracy = (forward(params, data["x_test"]).argmax(axis=-1) == data["y_test"]).mean()
    return train_loss, accuracy


def batch_indices(n_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of shape ``(steps, batch_size)``: one fixed-seed permutation per epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n_train // batch_size
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(n_train)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps].astype(np.int32)


def make_chunk_fn(spec: OptimizerSpec, opt: optax.GradientTransformation) -> jax.stages.Wrapped:
    """A jitted function running ``len(idx)`` steps of ``opt`` (``spec``'s) with ``lax.scan``; returns the minibatch
    losses, and the key of the next chunk's Hessian estimates (Sophia's; unused by the others)."""

    def chunk(
        params: Params, opt_state: Any, key: jax.Array, x: jax.Array, y: jax.Array, idx: jax.Array
    ) -> tuple[Params, Any, jax.Array, jax.Array]:
        def step(carry: tuple[Params, Any, jax.Array], batch: jax.Array) -> tuple[tuple[Params, Any, Any], jax.Array]:
            p, s, key = carry
            key, probe = jax.random.split(key)
            loss, grads = jax.value_and_grad(loss_fn)(p, x[batch], y[batch])
            extras = workloads.update_extras(spec, lambda q: loss_fn(q, x[batch], y[batch]), probe)
            # params: LAMB needs them; value: the loss-driven methods; hessian=: Sophia's estimates
            updates, s = opt.update(grads, s, p, value=loss, **extras)
            return (adaopt.apply_updates(p, updates), s, key), loss

        (params, opt_state, key), losses = jax.lax.scan(step, (params, opt_state, key), idx)
        return params, opt_state, key, losses

    return jax.jit(chunk)


def evaluation_point(params: Params, opt_state: Any, averaged: bool) -> Params:
    """Where the model is evaluated: Schedule-Free's averaged parameters, else the parameters."""
    return adaopt.schedule_free_eval_params(opt_state, params) if averaged else params


def chunk_sizes(steps: int, chunk: int) -> list[int]:
    """``steps`` cut into chunks of ``chunk`` steps, the last one possibly shorter."""
    full, rest = divmod(steps, chunk)
    return [chunk] * full + ([rest] if rest else [])


def choices() -> list[adaopt.OptimizerSpec]:
    """The registry's entries, in registry order, then AdamW with each of ``STORAGE_VARIANTS``' storages."""
    return [*adaopt.REGISTRY.values(), *(light_states.variant_spec(name) for name in STORAGE_VARIANTS)]


def select(names: Sequence[str] | None) -> list[adaopt.OptimizerSpec]:
    """The entries of :func:`choices` named (all when ``names`` is None), in that order."""
    specs = choices()
    if names is None:
        return specs
    unknown = sorted(set(names) - {spec.name for spec in specs})
    if unknown:
        raise KeyError(f"Unknown optimizer(s) {unknown}; the demo has {[spec.name for spec in specs]}.")
    return [spec for spec in specs if spec.name in names]


def full_batch_note(specs: Sequence[adaopt.OptimizerSpec]) -> str:
    """The sentence that says which optimizers trained on the full training split (Capability.FULL_BATCH)."""
    if not specs:
        return ""
    names = ", ".join(spec.name for spec in specs)
    return (
        f"Trained on the full training split each step (they compare the loss, or the gradients' signs, between "
        f"steps): {names}."
    )


def tuned_rate(spec: adaopt.OptimizerSpec) -> float:
    """The learning rate of benchmarks/learning_rates.py (AdamW's for a storage variant)."""
    return learning_rates.TUNED[light_states.BASELINE if spec.name in STORAGE_VARIANTS else spec.name]


def run(
    names: Sequence[str] | None = None,
    steps: int = 1500,
    *,
    chunk: int = 50,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[Result]:
    """Train the MLP with each named optimizer (all when ``names`` is None); one result per optimizer.

    Interrupted (Ctrl-C), it says so and returns the results of the optimizers that finished.
    """
    if steps < 1 or chunk < 1:
        raise ValueError(f"steps and chunk must be positive, got steps={steps}, chunk={chunk}.")
    specs = select(names)
    data = load_data()
    params0 = init_mlp(jax.random.key(seed))
    n_train = data["x_train"].shape[0]
    minibatches = jnp.asarray(batch_indices(n_train, steps, batch_size, seed))
    full_batches = jnp.broadcast_to(jnp.arange(n_train, dtype=jnp.int32), (steps, n_train))
    sizes = chunk_sizes(steps, chunk)
    bounds = np.cumsum([0, *sizes])
    eval_fn = jax.jit(evaluate).lower(params0, data).compile()  # shared by all optimizers

    results: list[Result] = []
    # disable=None: no bar where stderr is no terminal (a CI log), where its redraws would be thousands of lines.
    bar = tqdm(total=len(specs) * len(sizes), disable=None if progress else True, unit="chunk", dynamic_ncols=True)
    try:
        for spec in specs:
            bar.set_description(f"{spec.name:>9}")
            bar.set_postfix_str("compiling")  # not the previous optimizer's loss
            rate = tuned_rate(spec)
            opt = spec.factory(learning_rate=rate)
            params, opt_state = params0, opt.init(params0)
            state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
            jitted = make_chunk_fn(spec, opt)
            key = jax.random.key(seed)
            idx = full_batches if Capability.FULL_BATCH in spec.capabilities else minibatches
            averaged = Capability.AVERAGED_ITERATES in spec.capabilities

            t0 = time.perf_counter()
            compiled = {
                n: jitted.lower(params, opt_state, key, data["x_train"], data["y_train"], idx[:n]).compile()
                for n in sorted(set(sizes))
            }
            compile_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            loss0, acc0 = eval_fn(evaluation_point(params, opt_state, averaged), data)
            train_loss, test_accuracy = [float(loss0)], [float(acc0)]
            for n, start in zip(sizes, bounds[:-1], strict=True):
                params, opt_state, key, _ = compiled[n](
                    params, opt_state, key, data["x_train"], data["y_train"], idx[start : start + n]
                )
                loss, acc = eval_fn(evaluation_point(params, opt_state, averaged), data)
                train_loss.append(float(loss))
                test_accuracy.append(float(acc))
                bar.set_postfix(loss=f"{train_loss[-1]:.2e}", acc=f"{test_accuracy[-1]:.3f}")
                bar.update()
            train_s = time.perf_counter() - t0

            evaluated = [int(s) for s in bounds]
            reached = [s for s, a in zip(evaluated, test_accuracy, strict=True) if a >= TARGET_ACCURACY]
            results.append(
                Result(
                    name=spec.name,
                    learning_rate=rate,
                    tuning_free=Capability.TUNING_FREE in spec.capabilities,
                    steps=evaluated,
                    train_loss=train_loss,
                    test_accuracy=test_accuracy,
                    final_train_loss=train_loss[-1],
                    final_test_accuracy=test_accuracy[-1],
                    steps_to_target=reached[0] if reached else None,
                    compile_s=compile_s,
                    train_s=train_s,
                    state_bytes_per_param=state_bytes / sum(x.size for x in jax.tree.leaves(params0)),
                )
            )
    except KeyboardInterrupt:
        bar.close()
        print(f"\nInterrupted: {len(results)} of {len(specs)} optimizers finished.", file=sys.stderr)
    finally:
        bar.close()
    return results


def format_table(results: Sequence[Result]) -> str:
    """Plain-text table, sorted by final test accuracy (descending; ties keep registry order)."""
    header = [
        "optimizer", "lr", "train loss", "test acc", f"steps to {TARGET_ACCURACY:.0%}", "state B/param", "compile s",
        "train s",
    ]  # fmt: skip
    ordered = sorted(results, key=lambda r: -r["final_test_accuracy"])  # stable: ties keep registry order
    rows = [
        [
            r["name"],
            f"{r['learning_rate']:g}",
            f"{r['final_train_loss']:.2e}",
            f"{r['final_test_accuracy']:.2%}",
            "—" if r["steps_to_target"] is None else str(r["steps_to_target"]),
            f"{r['state_bytes_per_param']:.2f}",
            f"{r['compile_s']:.2f}",
            f"{r['train_s']:.2f}",
        ]
        for r in ordered
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def plot(results: Sequence[Result], path: Path, title: str) -> Path:
    """Two panels, training loss (log scale) and test accuracy against the step; one line per optimizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")  # 10 colours; the next 10 optimizers repeat them dashed
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(results):
        kw: dict[str, Any] = {"color": cmap(i % 10), "linestyle": styles[(i // 10) % len(styles)], "lw": 1.6}
        ax_loss.plot(r["steps"], r["train_loss"], label=r["name"], **kw)
        ax_acc.plot(r["steps"], r["test_accuracy"], label=r["name"], **kw)
    ax_loss.set_yscale("log", nonpositive="mask")  # a loss of exactly 0 (float32) ends the line, not a drop
    ax_loss.set(xlabel="step", ylabel="training loss (full training split)", title="Training loss")
    ax_acc.axhline(TARGET_ACCURACY, color="grey", lw=0.8, ls=":")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy", ylim=(0.8, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
    ax_acc.legend(loc="lower right", ncol=3, fontsize="small", title="optimizer")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1500, help="training steps per optimizer (default 1500)")
    parser.add_argument("--chunk", type=int, default=50, help="steps per jitted chunk / evaluation (default 50)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    parser.add_argument("--optimizers", type=str, default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.chunk < 1:
        parser.error("--steps and --chunk must be positive")
    if args.optimizers is not None:
        args.optimizers = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        known = [spec.name for spec in choices()]
        unknown = [n for n in args.optimizers if n not in known]
        if unknown or not args.optimizers:
            parser.error(f"unknown optimizer(s) {unknown}; choose from {','.join(known)}")
    try:  # now, not after the training
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ".write-test").touch()
        (args.out / ".write-test").unlink()
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write the plots there ({error.strerror or error})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    results = run(args.optimizers, args.steps, chunk=args.chunk, progress=not args.no_progress)
    interrupted = len(results) < len(select(args.optimizers))
    tuned = [r for r in results if not r["tuning_free"]]
    free = [r for r in results if r["tuning_free"]]
    model = f"digits MLP 64-64-10, {args.steps} steps of batch 128"
    platform = f", on {jax.devices()[0].platform}"
    sections = [(tuned, f"{model}: tuned learning rates (benchmarks/learning_rates.py)", PLOT_NAME)] if tuned else []
    if free:
        baseline = [r for r in tuned if r["name"] == BASELINE]
        title = f"{model}: tuning-free methods at their defaults, beside {BASELINE} at its tuned learning rate"
        sections.append((free + baseline, title, TUNING_FREE_PLOT_NAME))
    for rows, title, plot_name in sections:
        print()
        print(f"{title.replace(model, model + platform)}:")
        print(format_table(rows))
        path = plot(rows, args.out / plot_name, title)
        print(f"Plot written to {path}")
    print()
    print(
        f"Rows sorted by final test accuracy. Steps to {TARGET_ACCURACY:.0%}: first evaluation (every "
        f"{args.chunk} steps) at which test accuracy reached it. 'train s' excludes compilation, "
        "timed separately under 'compile s'; it includes the per-chunk evaluations. "
        + full_batch_note([spec for spec in select(args.optimizers) if Capability.FULL_BATCH in spec.capabilities])
    )
    missed = [r["name"] for r in results if r["steps_to_target"] is None]
    if missed:
        print(f"Never reached {TARGET_ACCURACY:.0%} test accuracy: {', '.join(missed)}")
    print(f"Total wall time {time.perf_counter() - start:.1f} s (after imports)")
    return 130 if interrupted else 0  # a shell's code for an interrupt


if __name__ == "__main__":
    adaopt.enable_cpu_copy_elision()  # before JAX starts: the bfloat16 moments' steps in place, without copies
    sys.exit(main())
