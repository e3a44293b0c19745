# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Memory-light optimizer states
#
# Adam keeps two float32 moments: 8 bytes per parameter on top of the parameters. adaopt stores a
# moment in any of these instead, chosen by an argument of the optimizer (`mu_dtype`, `nu_dtype`),
# the same for every optimizer that keeps moments:
#
# - `"int8"`: bitsandbytes' blockwise dynamic quantization (blocks of 256, one float32 scale each);
# - `"int4"`: torchao's 4-bit maps (blocks of 128, two codes a byte);
# - `"fp8"`: float8 E4M3 values over a per-block scale;
# - `jnp.bfloat16`, rounded to nearest, or `"bfloat16_sr"`, rounded stochastically (unbiased);
# - any `adaopt.Blockwise(...)` for other block sizes or a lower `min_size` (leaves under it stay
#   float32: 4,096 elements by default).
#
# This notebook measures what each costs in memory and in training, shows the small-update trap of
# bfloat16 *parameters* and its two remedies, and checkpoints a quantized state.

# %%
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import adaopt

x, y = load_digits(return_X_y=True)
x = jnp.asarray((x - x.mean(0)) / (x.std(0) + 1e-6), jnp.float32)
y = jnp.asarray(y)


def init_params(dtype: jnp.dtype = jnp.float32) -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    # A hidden layer of 64 x 256 = 16,384 weights: large enough to be quantized (the default min_size is 4,096).
    return {
        "hidden": (jax.random.normal(k1, (64, 256)) / 8).astype(dtype),
        "out": (jax.random.normal(k2, (256, 10)) / 16).astype(dtype),
    }


def loss_fn(params: dict) -> jax.Array:
    logits = jnp.tanh(x @ params["hidden"].astype(jnp.float32)) @ params["out"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def state_bytes(optimizer: optax.GradientTransformation, params: dict) -> int:
    """The state's bytes, from its shapes alone (nothing is allocated)."""
    return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(adaopt.abstract_state(optimizer, params)))


# %% [markdown]
# ## Bytes per parameter
#
# The state of AdamW on a GPT-2-size tree (12 blocks of width 768, a 50,257-token vocabulary: 124M
# parameters), from `adaopt.abstract_state`, which computes the state's shapes without allocating
# it. The 8-bit moments cost 1 byte per parameter plus 4 bytes of scale per block of 256: 2.03 bytes
# for both moments, against float32's 8.

# %%
width, vocab, layers = 768, 50_257, 12
gpt2 = {"wte": jax.ShapeDtypeStruct((vocab, width), jnp.float32)}
for i in range(layers):
    gpt2[f"h{i}"] = {
        "attn": jax.ShapeDtypeStruct((width, 4 * width), jnp.float32),  # qkv and the output projection
        "mlp": jax.ShapeDtypeStruct((width, 8 * width), jnp.float32),  # both MLP matrices
        "ln": jax.ShapeDtypeStruct((4 * width,), jnp.float32),
    }
n = sum(s.size for s in jax.tree.leaves(gpt2))
print(f"{n / 1e6:.0f}M parameters")
for label, dtype in [("float32", None), ("bfloat16", jnp.bfloat16), ("bfloat16_sr", "bfloat16_sr"),
                     ("fp8", "fp8"), ("int8", "int8"), ("int4", "int4")]:  # fmt: skip
    opt = adaopt.adamw(1e-3, mu_dtype=dtype, nu_dtype=dtype)
    print(f"  AdamW, {label:>11} moments: {state_bytes(opt, gpt2) / n:.3f} bytes per parameter")

# %% [markdown]
# ## Training with light moments
#
# The same AdamW, the same learning rate, on a small MLP over the digits dataset, with each storage
# of both moments. On this problem every storage ends near float32's loss; `benchmarks/light_states.py`
# compares them on five workloads at each one's tuned learning rate (RESULTS.md: int8 and bfloat16
# within 1% of float32 on all five, int4 and FP8 on two).

# %%
STEPS = 300


def train(optimizer: optax.GradientTransformation, params: dict, steps: int = STEPS) -> tuple[dict, np.ndarray]:
    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(loss)
    return params, np.asarray(losses)


storages = {"float32": None, "bfloat16": jnp.bfloat16, "bfloat16_sr": "bfloat16_sr", "fp8": "fp8",
            "int8": "int8", "int4": "int4"}  # fmt: skip
curves = {}
for label, dtype in storages.items():
    opt = adaopt.adamw(3e-3, mu_dtype=dtype, nu_dtype=dtype)
    _, curves[label] = train(opt, init_params())
    print(f"{label:>11}: final loss {curves[label][-1]:.4f}, state {state_bytes(opt, init_params())} bytes")

for label, losses in curves.items():
    plt.semilogy(losses, label=label)
plt.xlabel("step")
plt.ylabel("training loss")
plt.title("AdamW with each storage of its moments")
plt.legend()
plt.show()

# %% [markdown]
# ## bfloat16 parameters: the small-update trap
#
# A bfloat16 number has 8 significant bits: an update smaller than half the spacing around a
# weight (2^-9 to 2^-8 of its value) rounds back to the weight itself. With a small learning rate, plain
# bfloat16 parameters stop moving. Two remedies wrap the optimizer:
#
# - `adaopt.stochastic_rounding(opt)` rounds each new parameter up or down at random, with the
#   probabilities that make it right in expectation: the same memory;
# - `adaopt.master_weights(opt)` keeps a float32 copy of the parameters in the optimizer's state
#   (4 bytes per parameter): float32 training exactly.

# %%
LR = 2e-4
runs = {
    "float32 parameters": (adaopt.adamw(LR), jnp.float32),
    "bfloat16, rounded to nearest": (adaopt.adamw(LR), jnp.bfloat16),
    "bfloat16, stochastic rounding": (adaopt.stochastic_rounding(adaopt.adamw(LR)), jnp.bfloat16),
    "bfloat16, master weights": (adaopt.master_weights(adaopt.adamw(LR)), jnp.bfloat16),
}
for label, (opt, dtype) in runs.items():
    params = init_params(dtype)
    final, losses = train(opt, params, steps=600)
    moved = sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params), strict=True))
    print(f"{label:>30}: final loss {losses[-1]:.4f}, weights changed {moved} of 18944")
    plt.plot(losses, label=label)
plt.xlabel("step")
plt.ylabel("training loss")
plt.title(f"AdamW at learning rate {LR}")
plt.legend()
plt.show()

# %% [markdown]
# ## Checkpoints: bit for bit
#
# A quantized state is a pytree of arrays (codes and scales) like any other: orbax saves and
# restores it, and training resumes exactly where it stopped. The keys of the stored leaves name
# their format (`codes` for 8-bit and 4-bit, `fp8_codes` for FP8), so that restoring one format
# into another is a structure mismatch rather than a silent cast.

# %%
opt = adaopt.adamw(3e-3, mu_dtype="int8", nu_dtype="int8")
params = init_params()
state = opt.init(params)
grads = jax.grad(loss_fn)(params)
_, state = opt.update(grads, state, params)

with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, adaopt.abstract_state(opt, params))

same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True))
print("restored bit for bit:", same)
for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=adaopt.is_stored):
    if adaopt.is_stored(leaf):
        print(
            f"  {jax.tree_util.keystr(path)}: codes {leaf.codes.dtype}{list(leaf.codes.shape)}, scales {list(leaf.scale.shape)}"
        )

# %% [markdown]
# ## Speed on a CPU
#
# XLA:CPU runs a quantized moment's table lookups as scalar loops: its own int8, int4 and FP8
# steps take several times float32's. `adaopt.enable_cpu_kernels()` builds (once per machine, with
# the host's C++ compiler) hand-written kernels for AdamW's and Lion's quantized steps, and
# `adaopt.enable_cpu_copy_elision()`, called before JAX starts, lets bfloat16 moments update in
# place. With both, on the GPT-2 tree of `benchmarks/memory.py`, int4 and FP8 moments step in about
# float32's time or less in most runs, int8 in 1.0x-1.2x of it (RESULTS.md, "Memory of the states").
# Here, one leaf's step with each storage, the kernels on, its gradient a cheap function of the
# parameters made inside the step. XLA fuses that function into float32's step, which then never
# writes the gradient to memory, where the kernels read it from memory (in a training step,
# backpropagation has written it there anyway): this favours float32.

# %%
adaopt.enable_cpu_kernels()
side = 1024 if os.environ.get("ADAOPT_NOTEBOOK_QUICK") else 2048
leaf = {"w": jax.random.normal(jax.random.key(1), (side, side))}


def make_step(optimizer: optax.GradientTransformation):
    # The parameters and the state donated: updated in place, as a training step does. The gradient is made inside
    # the step, as a training step's is: a temporary the kernels may overwrite (a gradient passed in as an argument
    # would be copied first).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        grads = jax.tree.map(lambda p: 1e-2 * p + 1e-3, params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


for label, dtype in [("float32", None), ("int8", "int8"), ("int4", "int4"), ("fp8", "fp8")]:
    opt = adaopt.adamw(1e-3, mu_dtype=dtype, nu_dtype=dtype)
    step = make_step(opt)
    p = jax.tree.map(jnp.copy, leaf)
    s = opt.init(p)
    p, s = step(p, s)  # compile
    times = []
    for _ in range(10):
        start = time.perf_counter()
        p, s = jax.block_until_ready(step(p, s))
        times.append(time.perf_counter() - start)
    print(
        f"{label:>8}: {1e3 * np.median(times):6.2f} ms per step, state {state_bytes(opt, leaf) / side**2:.3f} B/param"
    )
