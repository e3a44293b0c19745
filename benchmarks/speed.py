"""Time one full optimizer step of adaopt against optax and torch.optim, and write a Markdown report.

One step is ``update`` plus ``optax.apply_updates``, compiled with ``jax.jit`` with the
parameters and the optimizer state donated (``donate_argnums=(0, 1)``), exactly as a training
loop runs it. For each parameter tree and each optimizer the script times:

- ``adaopt``: adaopt's optimizer;
- ``optax``: optax's implementation of the same algorithm and hyperparameters;
- ``torch fused`` and ``torch foreach``: ``torch.optim``'s, ``opt.step()`` on a list of float32
  tensors whose ``.grad`` is set once ("n/a" where torch has no such implementation);
- with ``--layouts`` (by default all five), adaopt's optimizer in another layout:
  ``adaopt (multi-tensor)`` is ``adaopt.multi_tensor(optimizer)`` on the same parameter tree (the
  state of the leaves under 16,384 elements in one flat buffer per dtype), and
  ``adaopt (flat params)`` the same optimizer on ``adaopt.flatten_params(params)`` (the parameters
  and gradients kept as one flat buffer per dtype, as a training loop that unflattens the
  parameters inside its loss would hold them); ``adaopt (single pass)`` is
  ``adaopt.single_pass(optimizer)``, one kernel per large leaf for the whole step when XLA:CPU's
  multi-output fusion is on (the plain optimizer when it is off), and
  ``adaopt (single pass, multi-tensor)`` is ``adaopt.single_pass(adaopt.multi_tensor(optimizer))``
  and ``adaopt (single pass, flat params)`` ``adaopt.single_pass(optimizer)`` on the flat parameters.

JAX: the first compile is timed as the wall time of ``step.lower(...).compile()`` (each tree first
compiles one untimed step, so that no row pays for filling JAX's caches); then 2 warm-up
calls and ``--reps`` timed calls, each followed by ``jax.block_until_ready``, each feeding the
returned (donated) parameters and state into the next. The gradients are a fixed tree, not
donated. torch: 2 warm-up ``opt.step()`` calls, then ``--reps`` timed ones, with
``torch.set_num_threads`` set to the number of usable cores.

The machine's memory bandwidth is measured in the same run with streaming kernels over buffers far
larger than the caches (``--bandwidth-mb`` per buffer): in-place ``x = a * x + y`` (3 buffer sizes
moved per call) and a copy (2 sizes), in JAX (jitted, ``x`` donated) and in torch. The highest
rate, computed from median times like the optimizer rows, is the "measured bandwidth".

An optimizer step must at least read and write the parameters, read the gradients and read and
write each state buffer: 7 x 4 bytes per parameter for Adam and AdamW (two moments), 5 x 4 bytes
for RMSProp, AdaGrad and SGD with momentum (one buffer). The report gives each row's achieved
rate (those bytes / median time), its fraction of the measured bandwidth, the optimizer state
bytes per parameter (from the actual state), and adaopt's median time divided by the row's.
``muon`` (not run by default) is bound by the Newton-Schulz iteration's matrix products, not by
memory: its rows compare times, against optax's Muon given the same split of the leaves (torch's
Muon takes 2-d parameters only, so it has no row on a whole model's tree).

If JAX's default device is a GPU, JAX runs there and torch on CUDA (when torch has CUDA); the
code path is the same.

The results go between ``<!-- speed:begin -->`` and ``<!-- speed:end -->`` in ``--out``; the rest of
an existing file is kept. XLA:CPU's multi-output fusion is an option of the CPU backend, read from
``XLA_FLAGS`` when JAX starts; a run with it on (``--cpu-fusion``, which calls
``adaopt.enable_cpu_fusion()`` before JAX starts, or the option in ``XLA_FLAGS``) writes its own
section, between ``<!-- speed-multi-output-fusion:begin -->`` and ``<!-- speed-multi-output-fusion:end -->``.

``--model-steps`` times something else: whole training steps of the models of
``benchmarks/workloads.py`` (``mlp`` is the demo's model; forward, backward, ``adaopt.adam`` or
``adaopt.single_pass(adaopt.adam)``, ``apply_updates``, jitted, donated), and their forward and
backward passes alone, in pairs of fresh processes with the fusion off (``ADAOPT_CPU_FUSION=0``)
and on (``adaopt.enable_cpu_fusion()``): the option changes how every program of a process
compiles, the model's own included. It writes between ``<!-- speed-model-steps:begin -->`` and
``<!-- speed-model-steps:end -->``.

Usage::

    python -m benchmarks.speed [--trees gpt2,resnet,single,small] [--optimizers adam,sgd]
                               [--reps 10] [--out benchmarks/RESULTS.md] [--no-torch]
                               [--layouts multi-tensor,flat-params,single-pass,...|none] [--cpu-fusion]
    python -m benchmarks.speed --model-steps [mlp,conv,charlm,gpt] [--reps 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaopt
from adaopt import cpu_multi_output_fusion_enabled, flatten_params, multi_tensor, single_pass
from benchmarks.report import invocation, load_average, machine, markdown_table, usable_cores
from benchmarks.report import write_section as write_between_markers

HERE = Path(__file__).resolve().parent
SINGLE_PASS_MIN_SIZE = inspect.signature(single_pass).parameters["min_size"].default

BEGIN = "<!-- speed:begin -->"
END = "<!-- speed:end -->"
MOF_BEGIN = "<!-- speed-multi-output-fusion:begin -->"  # a run with XLA:CPU's multi-output fusion on
MOF_END = "<!-- speed-multi-output-fusion:end -->"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
DEFAULT_OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd")
WARMUP = 2
F32 = 4  # bytes per float32
IMPLS = ("adaopt", "optax", "torch fused", "torch foreach")


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    """A row of adaopt's optimizer in another layout: the row's name, how the optimizer is wrapped,
    and whether the parameters and gradients are laid out by ``adaopt.flatten_params``."""

    impl: str
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation]
    flat: bool = False


LAYOUTS = {  # --layouts -> the row
    "multi-tensor": LayoutRow("adaopt (multi-tensor)", multi_tensor),
    "flat-params": LayoutRow("adaopt (flat params)", lambda tx: tx, flat=True),
    "single-pass": LayoutRow("adaopt (single pass)", single_pass),
    "single-pass-multi-tensor": LayoutRow(
        "adaopt (single pass, multi-tensor)", lambda tx: single_pass(multi_tensor(tx))
    ),
    "single-pass-flat-params": LayoutRow("adaopt (single pass, flat params)", single_pass, flat=True),
}
COLUMNS = (
    "optimizer",
    "impl",
    "median ms",
    "min ms",
    "compile s",
    "state bytes/param",
    "bytes moved (MB)",
    "achieved GB/s",
    "% of measured bw",
    "ratio vs adaopt",
)

# A tree of shapes: nested dicts whose leaves are ShapeDtypeStructs.
Shapes = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Parameter trees.


def _leaf(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _layer_norm(width: int) -> Shapes:
    return {"scale": _leaf(width), "bias": _leaf(width)}


def _dense(fan_in: int, fan_out: int) -> Shapes:
    return {"kernel": _leaf(fan_in, fan_out), "bias": _leaf(fan_out)}


def gpt2_tree(width: int = 512, layers: int = 12, vocab: int = 32_000, context: int = 1024) -> Shapes:
    """A GPT-2-style transformer: embeddings, ``layers`` pre-LN blocks, a final layer norm."""
    tree: Shapes = {"wte": _leaf(vocab, width), "wpe": _leaf(context, width)}
    for i in range(layers):
        tree[f"h_{i}"] = {
            "ln_1": _layer_norm(width),
            "attn": {"c_attn": _dense(width, 3 * width), "c_proj": _dense(width, width)},
            "ln_2": _layer_norm(width),
            "mlp": {"c_fc": _dense(width, 4 * width), "c_proj": _dense(4 * width, width)},
        }
    tree["ln_f"] = _layer_norm(width)
    return tree


def _conv_bn(k: int, cin: int, cout: int) -> Shapes:
    return {"kernel": _leaf(k, k, cin, cout), "bn": {"scale": _leaf(cout), "bias": _leaf(cout)}}


def resnet_tree(blocks: Sequence[int] = (3, 4, 6, 3), classes: int = 1000) -> Shapes:
    """A ResNet-50-like tree: a 7x7 stem, bottleneck stages, a dense head; batch norm after every conv."""
    tree: Shapes = {"stem": _conv_bn(7, 3, 64)}
    cin = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        for b in range(count):
            block = {
                "conv1": _conv_bn(1, cin, width),
                "conv2": _conv_bn(3, width, width),
                "conv3": _conv_bn(1, width, 4 * width),
            }
            if b == 0:
                block["downsample"] = _conv_bn(1, cin, 4 * width)
            tree[f"stage{stage + 1}_block{b + 1}"] = block
            cin = 4 * width
    tree["head"] = _dense(cin, classes)
    return tree


def single_tree(size: int = 50_000_000) -> Shapes:
    """One flat leaf."""
    return {"w": _leaf(size)}


def small_tree(leaves: int = 1000, size: int = 100) -> Shapes:
    """Many tiny leaves: the step is bound by per-leaf overhead, not by memory."""
    return {f"p{i:04d}": _leaf(size) for i in range(leaves)}


TREES: dict[str, Callable[[], Shapes]] = {
    "gpt2": gpt2_tree,
    "resnet": resnet_tree,
    "single": single_tree,
    "small": small_tree,
}


def count(shapes: Shapes) -> tuple[int, int]:
    """(number of leaves, number of parameters)."""
    leaves = jax.tree.leaves(shapes)
    return len(leaves), sum(int(np.prod(s.shape)) for s in leaves)


def host_arrays(shapes: Shapes, seed: int, scale: float) -> Any:
    """A deterministic tree of float32 numpy arrays, normal with standard deviation ``scale``."""
    rng = np.random.default_rng(seed)

    def make(s: jax.ShapeDtypeStruct) -> np.ndarray:
        x = rng.standard_normal(s.shape, dtype=np.float32)
        x *= np.float32(scale)
        return x

    return jax.tree.map(make, shapes)


# ---------------------------------------------------------------------------------------------
# The optimizers: adaopt's, optax's and torch's configuration of the same algorithm.


@dataclasses.dataclass(frozen=True)
class Contender:
    """One algorithm with one set of hyperparameters, in the three libraries."""

    adaopt: Callable[[], optax.GradientTransformation]
    optax: Callable[[], optax.GradientTransformation]
    torch_class: str  # a class in torch.optim
    torch_kwargs: Mapping[str, Any]
    state_buffers: int  # per-parameter state buffers the algorithm needs

    @property
    def bytes_per_param(self) -> int:
        """Bytes a step must move per parameter: params read+write, grads read, each buffer read+write."""
        return F32 * (3 + 2 * self.state_buffers)


def _optax_muon_dimensions(params: Any) -> Any:
    """optax's Muon on the leaves ``adaopt.default_muon_mask`` gives Muon (its AdamW on the others)."""
    return jax.tree.map(lambda m: optax.contrib.MuonDimensionNumbers() if m else None, adaopt.default_muon_mask(params))


CONTENDERS: dict[str, Contender] = {
    "adam": Contender(
        adaopt=lambda: adaopt.adam(1e-3),
        optax=lambda: optax.adam(1e-3),
        torch_class="Adam",
        torch_kwargs={"lr": 1e-3},
        state_buffers=2,
    ),
    "adamw": Contender(
        adaopt=lambda: adaopt.adamw(1e-3, weight_decay=1e-2),
        optax=lambda: optax.adamw(1e-3, weight_decay=1e-2),
        torch_class="AdamW",
        torch_kwargs={"lr": 1e-3, "weight_decay": 1e-2},
        state_buffers=2,
    ),
    "rmsprop": Contender(  # decay 0.99, eps outside the root: torch's convention
        adaopt=lambda: adaopt.rmsprop(1e-3, decay=0.99, eps=1e-8),
        optax=lambda: optax.rmsprop(1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        torch_class="RMSprop",
        torch_kwargs={"lr": 1e-3, "alpha": 0.99, "eps": 1e-8},
        state_buffers=1,
    ),
    "adagrad": Contender(
        adaopt=lambda: adaopt.adagrad(1e-2),
        optax=lambda: optax.adagrad(1e-2, initial_accumulator_value=0.0, eps=1e-10),
        torch_class="Adagrad",
        torch_kwargs={"lr": 1e-2, "initial_accumulator_value": 0.0, "eps": 1e-10},
        state_buffers=1,
    ),
    "muon": Contender(  # the hidden matrices by Newton-Schulz, the rest by AdamW: one rule for both libraries
        adaopt=lambda: adaopt.muon(0.02),
        optax=lambda: optax.contrib.muon(
            0.02, beta=0.95, adam_b2=0.95, muon_weight_dimension_numbers=_optax_muon_dimensions
        ),
        torch_class="Muon",  # 2-d parameters only: n/a on a whole model's tree
        torch_kwargs={"lr": 0.02},
        state_buffers=1,  # the momentum of a matrix; its step is bound by the Newton-Schulz matmuls, not memory
    ),
    "sgd": Contender(  # heavy-ball momentum 0.9
        adaopt=lambda: adaopt.sgd(1e-2, momentum=0.9),
        optax=lambda: optax.sgd(1e-2, momentum=0.9),
        torch_class="SGD",
        torch_kwargs={"lr": 1e-2, "momentum": 0.9},
        state_buffers=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# Measurements.


@dataclasses.dataclass
class Timing:
    """The result of timing one implementation on one tree (``times`` empty when unavailable)."""

    optimizer: str
    impl: str
    times: list[float]
    compile_s: float | None = None
    state_bytes: int | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclasses.dataclass
class Bandwidth:
    framework: str
    kernel: str
    bytes_per_call: int
    times: list[float]

    @property
    def rate(self) -> float:
        """Bytes per second at the median time."""
        return self.bytes_per_call / statistics.median(self.times)

    @property
    def best_rate(self) -> float:
        return self.bytes_per_call / min(self.times)


@dataclasses.dataclass
class TreeResult:
    name: str
    leaves: int
    params: int
    timings: list[Timing]


@dataclasses.dataclass
class Report:
    bandwidths: list[Bandwidth]
    trees: list[TreeResult]
    torch_device: str | None
    load_start: str = "unknown"  # load average (1, 5, 15 min) when the run began
    load_end: str = "unknown"

    @property
    def measured_bandwidth(self) -> float:
        return max(b.rate for b in self.bandwidths)


def _free() -> None:
    gc.collect()


def _torch() -> Any:
    import torch

    return torch


def torch_device() -> str:
    """Where torch runs: CUDA when JAX runs on a GPU and torch has CUDA, else the CPU."""
    torch = _torch()
    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(usable_cores())
    return "cpu"


def _torch_sync(device: str) -> None:
    if device == "cuda":
        _torch().cuda.synchronize()


def _timed(call: Callable[[], None], reps: int) -> list[float]:
    """``reps`` timed calls after ``WARMUP`` untimed ones."""
    return time_interleaved([(call, None)], reps)[0]


Step = tuple[Callable[[], None], Callable[[], None] | None]  # a call to time, and what must run (untimed) before it


def time_interleaved(steps: Sequence[Step], reps: int) -> list[list[float]]:
    """``reps`` timed calls of each step after ``WARMUP`` untimed ones, in rounds that call each once (each round
    starting one step later): a drift of the machine's speed during the run, or a neighbour's load, reaches every
    step alike, so their ratios compare where back-to-back blocks of calls would not."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(WARMUP + reps):
        for k in range(len(steps)):
            index = (round_ + k) % len(steps)
            call, prepare = steps[index]
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            call()
            if round_ >= WARMUP:
                times[index].append(time.perf_counter() - start)
    return times


def _jax_stream(fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], n: int, reps: int) -> list[float]:
    # keep_unused: else the copy kernel drops its unused ``x``, the donation with it, and each call
    # writes into freshly allocated (page-faulting) memory.
    step = jax.jit(fn, donate_argnums=0, keep_unused=True)
    carry = {"x": jnp.ones(n, jnp.float32)}
    y = jnp.full(n, 0.5, jnp.float32)
    a = jnp.float32(0.999)

    def call() -> None:
        carry["x"] = jax.block_until_ready(step(carry["x"], y, a))

    return _timed(call, reps)


def jax_bandwidth(nbytes: int, reps: int) -> list[Bandwidth]:
    """In-place ``x = a * x + y`` and a copy ``x = a * y``, jitted, ``x`` donated."""
    n = nbytes // F32
    kernels: list[tuple[str, int, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]] = [
        ("x = a*x + y (in place)", 3, lambda x, y, a: a * x + y),
        ("x = a*y (copy)", 2, lambda x, y, a: a * y),
    ]
    results = []
    for kernel, moved, fn in kernels:
        results.append(Bandwidth("jax", kernel, moved * n * F32, _jax_stream(fn, n, reps)))
        _free()
    return results


def torch_bandwidth(nbytes: int, reps: int, device: str) -> list[Bandwidth]:
    """In-place ``x.add_(y, alpha=a)`` (one pass, like ``a*x + y``) and ``x.copy_(y)``."""
    torch = _torch()
    n = nbytes // F32
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.full((n,), 0.5, dtype=torch.float32, device=device)
    results = []
    kernels: list[tuple[str, int, Callable[[], Any]]] = [
        ("x.add_(y, alpha=a) (in place)", 3, lambda: x.add_(y, alpha=0.999)),
        ("x.copy_(y) (copy)", 2, lambda: x.copy_(y)),
    ]
    for kernel, moved, fn in kernels:

        def call(fn: Callable[[], Any] = fn) -> None:
            fn()
            _torch_sync(device)

        results.append(Bandwidth("torch", kernel, moved * n * F32, _timed(call, reps)))
    return results


def state_nbytes(state: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(state))


@dataclasses.dataclass
class Stepper:
    """One optimizer's compiled step on a tree, ready to time: ``call`` runs a step, ``prepare`` (untimed) what must
    come before each (:func:`time_interleaved`'s ``step``)."""

    call: Callable[[], None]
    prepare: Callable[[], None] | None
    compile_s: float | None
    state_bytes: int

    @property
    def step(self) -> Step:
        return self.call, self.prepare

    def timing(self, times: list[float]) -> Timing:
        return Timing("", "", times, compile_s=self.compile_s, state_bytes=self.state_bytes)


def time_jax(
    optimizer: optax.GradientTransformation,
    host_params: Any,
    grads: Any,
    reps: int,
    flat: bool = False,
) -> Timing:
    """Compile time and step times of one optimizer, donating the parameters and the state.

    ``flat``: the parameters and the gradients in the layout of ``adaopt.flatten_params``.
    """
    stepper = jax_stepper(optimizer, host_params, grads, flat)
    return stepper.timing(time_interleaved([stepper.step], reps)[0])


def jax_stepper(
    optimizer: optax.GradientTransformation,
    host_params: Any,
    grads: Any,
    flat: bool = False,
    loss: Callable[[Any, Any], jax.Array] | None = None,
) -> Stepper:
    """:func:`time_jax`'s compiled step; with a ``loss``, a whole training step: ``grads`` are then the loss's
    inputs (``loss(params, grads)``), and the gradients are computed in the step."""

    def fn(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        if loss is not None:
            grads = jax.grad(loss)(params, grads)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if flat:
        host_params, grads = flatten_params(host_params)[0], flatten_params(grads)[0]
    carry: dict[str, Any] = {"params": jax.tree.map(lambda x: jnp.array(x, copy=True), host_params)}
    carry["state"] = optimizer.init(carry["params"])
    nbytes = state_nbytes(carry["state"])
    step = jax.jit(fn, donate_argnums=(0, 1))

    def call() -> None:
        carry["params"], carry["state"] = jax.block_until_ready(step(carry["params"], carry["state"], grads))

    start = time.perf_counter()
    step.lower(carry["params"], carry["state"], grads).compile()
    return Stepper(call, None, time.perf_counter() - start, nbytes)


def split_programs(kernel: optax.GradientTransformation, tail: optax.GradientTransformation) -> tuple[Any, Any]:
    """The two jitted programs of :func:`jax_split_stepper`: ``kernel.update`` (gradients and state donated), then
    ``tail`` and ``apply_updates`` (parameters and state donated)."""

    def finish(params: Any, state: Any, updates: Any) -> tuple[Any, Any]:
        updates, state = tail.update(updates, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(kernel.update, donate_argnums=(0, 1)), jax.jit(finish, donate_argnums=(0, 1))


def jax_split_stepper(
    kernel: optax.GradientTransformation, tail: optax.GradientTransformation, host_params: Any, grads: Any
) -> Stepper:
    """The steps of ``optax.chain(kernel, tail)`` whose ``kernel`` writes its output over the gradients, as a training
    step's gradients (its own temporaries) let it: ``kernel`` jitted with the gradients donated (its updates take
    their buffers), then ``tail`` and ``apply_updates`` jitted together (one pass over the updates and the
    parameters, as one program fuses them), each step on a fresh copy of the gradients made by ``prepare``
    (untimed), which also frees the last step's spent copy (the updates): the rows that read the same gradients
    each step neither allocate nor free them, and freeing the copy's 219 MB of the GPT-2 tree (their pages given
    back to the system) took 5-6 ms of a 32 ms step.

    One program whose gradients are its arguments cannot reuse them (JAX reuses a donated argument only for an
    output of its shape, and the step's outputs are the parameters and the state): XLA copies each gradient before
    the kernel writes over it, a copy no training step makes.
    """
    carry: dict[str, Any] = {"params": jax.tree.map(lambda x: jnp.array(x, copy=True), host_params)}
    carry["kernel"], carry["tail"] = kernel.init(carry["params"]), tail.init(carry["params"])
    carry["grads"] = grads
    nbytes = state_nbytes((carry["kernel"], carry["tail"]))
    first, second = split_programs(kernel, tail)

    def fresh_grads() -> None:
        carry.pop("spent", None)
        carry["grads"] = jax.block_until_ready(jax.tree.map(lambda g: jnp.array(g, copy=True), grads))

    def call() -> None:
        # The updates (in the gradients' buffers) kept until the next prepare: freed after the timer stops.
        carry["spent"], carry["kernel"] = first(carry["grads"], carry["kernel"], carry["params"])
        carry["params"], carry["tail"] = jax.block_until_ready(second(carry["params"], carry["tail"], carry["spent"]))

    start = time.perf_counter()
    first.lower(grads, carry["kernel"], carry["params"]).compile()
    second.lower(carry["params"], carry["tail"], grads).compile()
    return Stepper(call, fresh_grads, time.perf_counter() - start, nbytes)


def torch_stepper(contender: Contender, impl: str, host_params: Any, host_grads: Any, device: str) -> Stepper | Timing:
    """``torch.optim``'s step with ``fused=True`` or ``foreach=True`` (``impl``), its first step taken; an empty
    :class:`Timing` with the reason where torch refuses it."""
    torch = _torch()
    params = [torch.from_numpy(x).to(device, copy=True) for x in jax.tree.leaves(host_params)]
    for p, g in zip(params, jax.tree.leaves(host_grads), strict=True):
        p.grad = torch.from_numpy(g).to(device, copy=True)
    try:
        opt = getattr(torch.optim, contender.torch_class)(params, **contender.torch_kwargs, **{impl: True})
        opt.step()
    except (TypeError, RuntimeError, ValueError) as error:
        return Timing("", "", [], note=f"{type(error).__name__}: {error}")

    def call() -> None:
        opt.step()
        _torch_sync(device)

    nbytes = sum(int(t.nbytes) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return Stepper(call, None, None, nbytes)


def run(
    trees: Mapping[str, Shapes],
    optimizers: Sequence[str],
    reps: int = 10,
    use_torch: bool = True,
    bandwidth_bytes: int = 512 * 2**20,
    log: Callable[[str], None] = print,
    layouts: Sequence[str] = (),
) -> Report:
    """Measure the bandwidth, then every (tree, optimizer, implementation); ``layouts``: keys of ``LAYOUTS``."""
    load_start = load_average()
    device = torch_device() if use_torch else None
    log(f"JAX device: {jax.devices()[0]}; torch device: {device or 'not run'}")
    bandwidths = jax_bandwidth(bandwidth_bytes, reps)
    if device is not None:
        bandwidths += torch_bandwidth(bandwidth_bytes, reps, device)
        _free()
    for b in bandwidths:
        log(f"bandwidth {b.framework} {b.kernel}: {b.rate / 1e9:.2f} GB/s (best {b.best_rate / 1e9:.2f})")

    results = []
    for tree_name, shapes in trees.items():
        leaves, n = count(shapes)
        log(f"[{tree_name}] {leaves} leaves, {n:,} parameters")
        host_params = host_arrays(shapes, seed=0, scale=0.02)
        host_grads = host_arrays(shapes, seed=1, scale=1e-3)
        grads = jax.tree.map(lambda x: jnp.array(x, copy=True), host_grads)
        # Not timed: the first compilation on a tree (after the caches were cleared) also fills
        # JAX's caches, which would count against whichever row came first.
        time_jax(optax.sgd(0.0), host_params, grads, reps=1)
        timings = []
        for opt_name in optimizers:
            # The optimizer's implementations compiled (or built) first, then timed in interleaved rounds.
            contender = CONTENDERS[opt_name]
            built: dict[str, Stepper | Timing] = {}
            for impl in (*IMPLS, *layouts):
                if impl.startswith("torch"):
                    if device is None:
                        continue
                    flag = impl.removeprefix("torch ")
                    built[impl] = torch_stepper(contender, flag, host_params, host_grads, device)
                elif impl in LAYOUTS:
                    layout = LAYOUTS[impl]
                    built[layout.impl] = jax_stepper(layout.wrap(contender.adaopt()), host_params, grads, layout.flat)
                else:
                    factory = contender.adaopt if impl == "adaopt" else contender.optax
                    built[impl] = jax_stepper(factory(), host_params, grads)
            steppers = {impl: s for impl, s in built.items() if isinstance(s, Stepper)}
            times = dict(zip(steppers, time_interleaved([s.step for s in steppers.values()], reps), strict=True))
            for impl, made in built.items():
                timing = made.timing(times[impl]) if isinstance(made, Stepper) else made
                timing.optimizer, timing.impl = opt_name, impl
                timings.append(timing)
                log(f"[{tree_name}] {opt_name:8s} {impl:13s} {_describe(timing, n)}")
            del built, steppers
            _free()  # the steps' parameters and states are gone with the steppers
        del host_params, host_grads, grads
        jax.clear_caches()
        _free()
        results.append(TreeResult(tree_name, leaves, n, timings))
    return Report(bandwidths, results, device, load_start, load_average())


def _describe(t: Timing, n: int) -> str:
    if not t.times:
        return f"n/a ({t.note})"
    text = f"median {t.median * 1e3:.2f} ms, min {t.best * 1e3:.2f} ms"
    if t.compile_s is not None:
        text += f", compile {t.compile_s:.2f} s"
    if t.state_bytes is not None:
        text += f", state {t.state_bytes / n:.2f} B/param"
    return text


# ---------------------------------------------------------------------------------------------
# The report.


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def bytes_moved(optimizer: str, tree: TreeResult) -> int:
    """The least one step of ``optimizer`` on ``tree`` must move (see the report's text)."""
    return CONTENDERS[optimizer].bytes_per_param * tree.params


def table_rows(tree: TreeResult, measured: float) -> Iterator[list[str]]:
    adaopt_median = {t.optimizer: t.median for t in tree.timings if t.impl == "adaopt" and t.times}
    for t in tree.timings:
        moved = bytes_moved(t.optimizer, tree)
        available = bool(t.times)
        median = t.median if available else None
        rate = moved / t.median if available else None
        ratio = adaopt_median[t.optimizer] / t.median if available and t.optimizer in adaopt_median else None
        yield [
            t.optimizer,
            t.impl,
            _cell(None if median is None else median * 1e3, ".2f"),
            _cell(t.best * 1e3 if available else None, ".2f"),
            "" if t.impl.startswith("torch") else _cell(t.compile_s, ".2f"),
            _cell(t.state_bytes / tree.params if available and t.state_bytes is not None else None, ".2f"),
            f"{moved / 1e6:.1f}",
            _cell(None if rate is None else rate / 1e9, ".2f"),
            _cell(None if rate is None else 100 * rate / measured, ".1f"),
            _cell(ratio, ".2f"),
        ]


# The targets of the speed work (benchmarks/README.md): on the large tree, the fastest adaopt row
# against optax and torch's fused step, its share of the measured bandwidth and its compile time;
# on the tree of many small leaves, how many times faster than optax and torch's fused step.
LARGE_TARGET = {"tree": "gpt2", "vs optax": 0.9, "vs torch fused": 1.0, "bandwidth": 0.8, "compile vs optax": 1.0}
SMALL_TARGET = {"tree": "small", "speed-up": 5.0}
TARGET_COLUMNS = (
    "tree",
    "optimizer",
    "fastest adaopt row",
    "median ms",
    "vs optax (time)",
    "vs torch fused (time)",
    "% of measured bw",
    "compile vs optax",
    "targets met",
)


def target_rows(report: Report) -> list[list[str]]:
    """Per optimizer, the fastest adaopt row on the targets' trees, and which targets it meets."""
    rows = []
    for tree in report.trees:
        if tree.name not in (LARGE_TARGET["tree"], SMALL_TARGET["tree"]):
            continue
        timed = {(t.optimizer, t.impl): t for t in tree.timings if t.times}
        for name in dict.fromkeys(t.optimizer for t in tree.timings):
            ours = [t for (opt, impl), t in timed.items() if opt == name and impl.startswith("adaopt")]
            optax_t, fused = timed.get((name, "optax")), timed.get((name, "torch fused"))
            if not ours or optax_t is None:
                continue
            best = min(ours, key=lambda t: t.median)
            vs_optax, vs_fused = best.median / optax_t.median, fused and best.median / fused.median
            rate = bytes_moved(name, tree) / best.median / report.measured_bandwidth
            compile_ratio = (best.compile_s or 0.0) / (optax_t.compile_s or float("inf"))
            missed = []
            if tree.name == LARGE_TARGET["tree"]:
                missed += [f"vs optax {vs_optax:.2f}x"] if vs_optax > LARGE_TARGET["vs optax"] else []
                missed += (
                    [f"vs torch fused {vs_fused:.2f}x"]
                    if vs_fused and vs_fused > LARGE_TARGET["vs torch fused"]
                    else []
                )
                missed += [f"bandwidth {100 * rate:.0f}%"] if rate < LARGE_TARGET["bandwidth"] else []
                missed += [f"compile {compile_ratio:.2f}x"] if compile_ratio > LARGE_TARGET["compile vs optax"] else []
            else:
                speed_ups = {"optax": 1 / vs_optax, "torch fused": fused and fused.median / best.median}
                missed += [f"{k} only {v:.1f}x" for k, v in speed_ups.items() if v and v < SMALL_TARGET["speed-up"]]
            rows.append(
                [
                    f"`{tree.name}`",
                    name,
                    best.impl,
                    f"{best.median * 1e3:.2f}",
                    f"{vs_optax:.2f}x",
                    "n/a" if not vs_fused else f"{vs_fused:.2f}x",
                    f"{100 * rate:.1f}",
                    f"{compile_ratio:.2f}x",
                    "yes" if not missed else "no: " + ", ".join(missed),
                ]
            )
    return rows


def render_targets(report: Report) -> list[str]:
    rows = target_rows(report)
    if not rows:
        return []
    large, small = LARGE_TARGET, SMALL_TARGET
    return [
        "### The targets",
        "",
        f"On `{large['tree']}`, the fastest adaopt row of each optimizer takes at most {large['vs optax']}x optax's time "
        f"and {large['vs torch fused']}x torch's fused step, moves at least {100 * large['bandwidth']:.0f}% of the "
        f"measured bandwidth and compiles no slower than optax; on `{small['tree']}` it is at least "
        f"{small['speed-up']:.0f}x faster than optax and torch's fused step (times are medians of this run; "
        "\"vs\" is adaopt's time divided by the other's).",
        "",
        markdown_table(TARGET_COLUMNS, rows),
        "",
    ]


def markers(section: str = "speed") -> tuple[str, str]:
    """The markers of this run's section (``--section``): its own when XLA:CPU's multi-output fusion is on."""
    name = f"{section}-multi-output-fusion" if cpu_multi_output_fusion_enabled() else section
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def render(report: Report, command: str, elapsed_s: float, section: str = "speed") -> str:
    """The Markdown section (between the markers, markers included)."""
    measured = report.measured_bandwidth
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = markers(section)
    title = "with XLA:CPU's multi-output fusion" if cpu_multi_output_fusion_enabled() else "XLA's defaults"
    named = "" if section == "speed" else f", `{section}`"  # a second run's section (speed-muon) titled apart
    parts = [begin, f"## Speed: one optimizer step{named} ({title})", ""]
    parts += [f"Finished {now}, {elapsed_s:.0f} s in all, with:", "", "```", command, "```", ""]
    parts += [f"- {key}: {value}" for key, value in machine().items()]
    parts += [
        f"- torch device: {report.torch_device or 'not run'}",
        f"- load average (1, 5, 15 min): {report.load_start} at the start, {report.load_end} at the end",
        "",
    ]
    parts += [
        "One step is `update` + `optax.apply_updates`, jitted with the parameters and the state donated;",
        "torch times `opt.step()`. Times are over the timed calls after 2 warm-up calls, the implementations of one",
        "optimizer on one tree called in turn, round after round (a drift of the machine's speed reaches them alike,",
        "so their ratios compare); compile is the",
        "wall time of the first `step.lower(...).compile()` (each tree first compiles one untimed step, so that",
        'no row pays for filling JAX\'s caches). "bytes moved" is the least a step must move',
        "(parameters read and written, gradients read, each state buffer read and written, 4 bytes each);",
        '"achieved GB/s" is that divided by the median time. "ratio vs adaopt" is adaopt\'s median time',
        "divided by the row's: above 1, adaopt is slower than that implementation. The rows `adaopt (multi-tensor)`",
        "(`adaopt.multi_tensor(optimizer)`, the same tree) and `adaopt (flat params)` (the parameters and gradients",
        "as `adaopt.flatten_params` lays them out) time adaopt's multi-tensor layouts; `adaopt (single pass)` is",
        f"`adaopt.single_pass(optimizer)`, which computes the step of each leaf of at least {SINGLE_PASS_MIN_SIZE:,} elements in one",
        "kernel when XLA:CPU's multi-output fusion is on (`--cpu-fusion`: `adaopt.enable_cpu_fusion()`), and is the plain",
        "optimizer when it is off; `adaopt (single pass, multi-tensor)` is `adaopt.single_pass(adaopt.multi_tensor(optimizer))`",
        "and `adaopt (single pass, flat params)` is `adaopt.single_pass(optimizer)` on the flat parameters.",
        "",
        "### Memory bandwidth",
        "",
    ]
    bw_rows = [
        [
            b.framework,
            f"`{b.kernel}`",
            f"{b.bytes_per_call / 1e6:.0f}",
            f"{statistics.median(b.times) * 1e3:.2f}",
            f"{b.rate / 1e9:.2f}",
            f"{b.best_rate / 1e9:.2f}",
        ]
        for b in report.bandwidths
    ]
    parts += [
        markdown_table(
            ["framework", "kernel", "bytes per call (MB)", "median ms", "GB/s (median)", "GB/s (best)"], bw_rows
        ),
        "",
        f"Measured bandwidth (highest median rate): **{measured / 1e9:.2f} GB/s**.",
        "",
    ]
    for tree in report.trees:
        parts += [f"### `{tree.name}`: {tree.leaves} leaves, {tree.params:,} parameters", ""]
        parts += [markdown_table(COLUMNS, list(table_rows(tree, measured))), ""]
        notes = {f"{t.optimizer} {t.impl}: {t.note}" for t in tree.timings if not t.times}
        parts += [f"- n/a: {note}" for note in sorted(notes)]
        if notes:
            parts.append("")
    parts += render_targets(report)
    parts.append(end)
    return "\n".join(parts) + "\n"


def write_section(path: Path, text: str, section: str = "speed") -> None:
    """Replace this run's section of ``path`` (the fused run's right after the default one), keeping the rest."""
    begin, end = markers(section)
    plain_end = f"<!-- {section}:end -->"
    write_between_markers(path, text, begin, end, after=None if end == plain_end else plain_end)


# ---------------------------------------------------------------------------------------------
# --model-steps: whole training steps of real models with XLA:CPU's multi-output fusion on and off.

MODEL_STEPS_BEGIN = "<!-- speed-model-steps:begin -->"
MODEL_STEPS_END = "<!-- speed-model-steps:end -->"
MODEL_WORKLOADS = ("mlp", "conv", "charlm", "gpt")  # mlp: the demo's model (benchmarks/demo.py)
MODEL_ROWS = ("forward + backward", "step: adam", "step: single_pass(adam)")
MODEL_BLOCK_S = 0.02  # each timed block runs enough steps to take at least this long
MODEL_STEPS_COLUMNS = (
    "model",
    "parameters",
    "what is timed",
    "fusion off (ms)",
    "fusion on (ms)",
    "on / off (time)",
    "on / off, each round",
    "kernels (multi-output) off",
    "kernels (multi-output) on",
    "compile off (s)",
    "compile on (s)",
)


def _time_interleaved(calls: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, one value per timed block of calls (a block long enough to
    hide the dispatch jitter), the blocks of the calls taken in turn so that a change in the machine's
    load falls on all of them alike."""
    per_block = {}
    for label, call in calls.items():
        for _ in range(3):
            jax.block_until_ready(call())
        start = time.perf_counter()
        jax.block_until_ready(call())
        per_block[label] = max(1, min(500, int(MODEL_BLOCK_S / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(reps):
        for label, call in calls.items():
            start = time.perf_counter()
            for _ in range(per_block[label] - 1):
                call()
            jax.block_until_ready(call())
            times[label].append((time.perf_counter() - start) / per_block[label])
    return times


def fusion_kernels(hlo: str) -> list[int]:
    """[kernels, multi-output kernels]: the fusions a compiled program calls, and those of them that write
    several buffers (what the multi-output fusion makes)."""
    calls = [line.split(" fusion(")[0] for line in hlo.splitlines() if " fusion(" in line]
    return [len(calls), sum("= (" in call for call in calls)]


def time_model_steps(models: Sequence[str], reps: int) -> dict[str, Any]:
    """Per model, the seconds per call and the compile time of its forward and backward pass alone and of
    its training step (forward, backward, ``adaopt.adam`` or ``adaopt.single_pass(adaopt.adam)`` and
    ``apply_updates``, jitted with the parameters and the state donated), on one fixed minibatch."""
    from benchmarks import workloads

    results: dict[str, Any] = {"fusion": cpu_multi_output_fusion_enabled(), "models": {}}
    for name in models:
        workload = workloads.WORKLOADS[name]()
        data = jax.tree.map(jnp.asarray, workload.data)
        batch = jnp.asarray(workload.batches(1, False)[0])
        host_params = workload.init()
        grad_fn = jax.value_and_grad(lambda p, d, b, w=workload: w.loss(p, d, b)[0])

        kernels: dict[str, list[int]] = {}

        def compiled(fn: Any, *args: Any, donate: tuple[int, ...] = ()) -> tuple[Any, float]:
            start = time.perf_counter()
            step = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            return step, time.perf_counter() - start

        params = jax.tree.map(jnp.asarray, host_params)
        fwd_bwd, compile_s = compiled(grad_fn, params, data, batch)
        calls: dict[str, Callable[[], Any]] = {MODEL_ROWS[0]: lambda: fwd_bwd(params, data, batch)}
        compiles = {MODEL_ROWS[0]: compile_s}
        kernels[MODEL_ROWS[0]] = fusion_kernels(fwd_bwd.as_text())
        for label, tx in ((MODEL_ROWS[1], adaopt.adam(1e-3)), (MODEL_ROWS[2], single_pass(adaopt.adam(1e-3)))):

            def train_step(p: Any, s: Any, d: Any, b: jax.Array, tx: optax.GradientTransformation = tx) -> Any:
                loss, grads = grad_fn(p, d, b)
                updates, s = tx.update(grads, s, p)
                return optax.apply_updates(p, updates), s, loss

            carry = {"p": jax.tree.map(lambda x: jnp.array(x, copy=True), host_params)}
            carry["s"] = tx.init(carry["p"])
            step, compiles[label] = compiled(train_step, carry["p"], carry["s"], data, batch, donate=(0, 1))
            kernels[label] = fusion_kernels(step.as_text())

            def call(step: Any = step, carry: dict[str, Any] = carry) -> Any:
                carry["p"], carry["s"], loss = step(carry["p"], carry["s"], data, batch)
                return loss

            calls[label] = call
        times = _time_interleaved(calls, reps)
        row: dict[str, Any] = {"parameters": sum(x.size for x in jax.tree.leaves(host_params))}
        row |= {
            label: {"times": times[label], "compile": compiles[label], "kernels": kernels[label]} for label in calls
        }
        results["models"][name] = row
    return results


def _model_steps_env(fusion: bool) -> dict[str, str]:
    """The environment of a child process that times with the fusion on (``enable_cpu_fusion``) or off."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f != adaopt.CPU_MULTI_OUTPUT_FUSION_FLAG]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop(adaopt.CPU_FUSION_ENV, None)
    if not fusion:
        env[adaopt.CPU_FUSION_ENV] = "0"
    return env


def run_model_steps(
    models: Sequence[str], reps: int, rounds: int, log: Callable[[str], None] = print
) -> dict[bool, list[dict[str, Any]]]:
    """Each round, one fresh process with the fusion off and one with it on (XLA reads the option when a
    process starts its CPU backend); the results of all rounds, by fusion."""
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for i in range(rounds):
        for fusion in (False, True):
            command = [sys.executable, "-m", "benchmarks.speed", "--model-steps-child", "on" if fusion else "off"]
            command += ["--model-steps", ",".join(models), "--reps", str(reps)]
            done = subprocess.run(
                command, env=_model_steps_env(fusion), capture_output=True, text=True, check=False, cwd=HERE.parent
            )
            if done.returncode != 0:
                raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["fusion"] is not fusion:
                raise RuntimeError(
                    f"the child process meant to run with the fusion {'on' if fusion else 'off'} did not"
                )
            runs[fusion].append(result)
            log(f"round {i + 1}/{rounds}, fusion {'on' if fusion else 'off'}: done")
    return runs


def model_steps_rows(runs: Mapping[bool, Sequence[Mapping[str, Any]]]) -> list[list[str]]:
    """Per model and row, the median over every block of every round, off and on, and their ratio."""
    rows = []
    for model, first in runs[False][0]["models"].items():
        for label in MODEL_ROWS:
            times = {f: [t for r in runs[f] for t in r["models"][model][label]["times"]] for f in (False, True)}
            compiles = {
                f: statistics.median(r["models"][model][label]["compile"] for r in runs[f]) for f in (False, True)
            }
            off, on = statistics.median(times[False]), statistics.median(times[True])
            each = [
                statistics.median(r_on["models"][model][label]["times"])
                / statistics.median(r_off["models"][model][label]["times"])
                for r_off, r_on in zip(runs[False], runs[True], strict=True)
            ]
            kernels = {f: runs[f][0]["models"][model][label]["kernels"] for f in (False, True)}
            rows.append(
                [
                    f"`{model}`",
                    f"{first['parameters']:,}",
                    label,
                    f"{off * 1e3:.3f}",
                    f"{on * 1e3:.3f}",
                    f"{on / off:.2f}",
                    ", ".join(f"{x:.2f}" for x in each),
                    "{} ({})".format(*kernels[False]),
                    "{} ({})".format(*kernels[True]),
                    f"{compiles[False]:.2f}",
                    f"{compiles[True]:.2f}",
                ]
            )
    return rows


def render_model_steps(runs: Mapping[bool, Sequence[Mapping[str, Any]]], command: str, elapsed_s: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rounds, reps = len(runs[False]), len(next(iter(runs[False][0]["models"].values()))[MODEL_ROWS[0]]["times"])
    parts = [MODEL_STEPS_BEGIN, "## Speed: whole training steps with XLA:CPU's multi-output fusion off and on", ""]
    parts += [f"Finished {now}, {elapsed_s:.0f} s in all, with:", "", "```", command, "```", ""]
    parts += [f"- {key}: {value}" for key, value in machine().items() if key != "XLA:CPU multi-output fusion"]
    parts += [
        "",
        "The option changes how XLA:CPU compiles every program of a process, the model's own forward and",
        "backward passes included. Each model of `benchmarks/workloads.py` (`mlp` is the demo's model) on one",
        "fixed minibatch: its forward and backward pass alone, and its whole training step (forward, backward,",
        "optimizer, `apply_updates`, jitted, parameters and state donated) with `adaopt.adam` and with",
        "`adaopt.single_pass(adaopt.adam)`. Each round runs one process with the fusion off",
        f"(`{adaopt.CPU_FUSION_ENV}=0`) and one with it on (`adaopt.enable_cpu_fusion()`); {rounds} rounds of",
        f"{reps} timed blocks of each row, a block being enough calls to take at least {MODEL_BLOCK_S * 1e3:.0f} ms, the",
        'rows\' blocks taken in turn. Times are the medians over all blocks, per call; "on / off" below 1: faster',
        "with the fusion. In a process with the fusion off, `single_pass(adam)` is the same program as `adam`: their",
        "difference there is the noise of the measurement. The kernels are the fusions the compiled program calls",
        "(in parentheses, those writing several buffers): where they agree, the fusion left the program as it was.",
        "",
        markdown_table(MODEL_STEPS_COLUMNS, model_steps_rows(runs)),
        MODEL_STEPS_END,
    ]
    return "\n".join(parts) + "\n"


def _names(text: str, known: Mapping[str, Any], what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trees", default=",".join(TREES), help="comma-separated: " + ", ".join(TREES))
    parser.add_argument(
        "--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="comma-separated: " + ", ".join(CONTENDERS)
    )
    parser.add_argument("--reps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write the results into")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim")
    parser.add_argument(
        "--section",
        default="speed",
        help="the results file's section to write (<!-- NAME:begin -->), e.g. speed-muon for a run of muon alone",
    )
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="size of each bandwidth-test buffer, MiB")
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help="adaopt's other layouts to time as well, comma-separated: " + ", ".join(LAYOUTS) + "; or none",
    )
    parser.add_argument(
        "--cpu-fusion",
        action="store_true",
        help="turn on XLA:CPU's multi-output fusion (adaopt.enable_cpu_fusion()); the run writes its own section",
    )
    parser.add_argument(
        "--model-steps",
        nargs="?",
        const=",".join(MODEL_WORKLOADS),
        default=None,
        help="instead: time whole training steps of these models (comma-separated: "
        + ", ".join(MODEL_WORKLOADS)
        + "; all when none is named) with the fusion off and on, each in processes of its own",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--model-steps: pairs of processes (fusion off, on)")
    parser.add_argument("--model-steps-child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.rounds < 1:
        parser.error("--reps and --rounds must be at least 1")
    if args.model_steps_child is not None:  # one process of --model-steps: print its timings as JSON
        if args.model_steps_child == "on":
            adaopt.enable_cpu_fusion()
        models = _names(args.model_steps or "", dict.fromkeys(MODEL_WORKLOADS), "models", parser)
        print(json.dumps(time_model_steps(models, args.reps)), flush=True)
        return 0
    if args.model_steps is not None:
        models = _names(args.model_steps, dict.fromkeys(MODEL_WORKLOADS), "models", parser)
        command = invocation("benchmarks.speed", argv)
        start = time.perf_counter()
        runs = run_model_steps(models, args.reps, args.rounds, lambda s: print(s, flush=True))
        text = render_model_steps(runs, command, time.perf_counter() - start)
        print(text, flush=True)
        write_between_markers(args.out, text, MODEL_STEPS_BEGIN, MODEL_STEPS_END)
        print(f"wrote {args.out}", flush=True)
        return 0
    if args.cpu_fusion and not adaopt.enable_cpu_fusion():
        parser.error("--cpu-fusion: XLA:CPU's multi-output fusion could not be turned on (the warning above says why)")
    trees = {name: TREES[name]() for name in _names(args.trees, TREES, "trees", parser)}
    optimizers = _names(args.optimizers, CONTENDERS, "optimizers", parser)
    layouts = [] if args.layouts.strip() == "none" else _names(args.layouts, LAYOUTS, "layouts", parser)
    command = invocation("benchmarks.speed", argv)

    start = time.perf_counter()
    report = run(
        trees,
        optimizers,
        args.reps,
        not args.no_torch,
        args.bandwidth_mb * 2**20,
        lambda s: print(s, flush=True),
        layouts,
    )
    elapsed = time.perf_counter() - start
    write_section(args.out, render(report, command, elapsed, args.section), args.section)
    print(f"total {elapsed:.1f} s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
