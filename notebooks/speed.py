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
# # A fast optimizer step on the CPU
#
# An optimizer step on a large model is bound by memory traffic: Adam must read the parameters,
# the gradients and both moments and write three of them back. By default XLA:CPU runs one kernel
# per output buffer, which reads the gradient and the moments twice. Turning on XLA:CPU's
# multi-output fusion and wrapping the optimizer in `adaopt.single_pass` gives one kernel per
# leaf. XLA reads its options once, when JAX starts its CPU backend, so `adaopt.enable_cpu_fusion()`
# comes before the first JAX computation (in a notebook, in the first cell; called too late, it
# warns and says what to do).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import adaopt

adaopt.enable_cpu_fusion()  # importing JAX starts nothing: the first computation is below
print("multi-output fusion on:", adaopt.cpu_multi_output_fusion_enabled())

# %% [markdown]
# A transformer-shaped parameter tree (4 layers of width 512 and a 16k vocabulary: 21M
# parameters in 34 leaves, each layer norm and bias a small leaf), and one jitted step that
# updates it with its buffers donated, as a training loop runs it.

# %%
# The test suite executes this notebook with ADAOPT_NOTEBOOK_QUICK set: a 16x smaller tree, fewer repetitions.
quick = bool(os.environ.get("ADAOPT_NOTEBOOK_QUICK"))
width, layers, vocab = (128, 4, 4_096) if quick else (512, 4, 16_384)
reps = 3 if quick else 20
shapes = {"embed": (vocab, width), "final_norm": (width,)}
for i in range(layers):
    shapes |= {
        f"layer{i}/norm1": (width,),
        f"layer{i}/qkv": (width, 3 * width),
        f"layer{i}/qkv_bias": (3 * width,),
        f"layer{i}/proj": (width, width),
        f"layer{i}/norm2": (width,),
        f"layer{i}/up": (width, 4 * width),
        f"layer{i}/up_bias": (4 * width,),
        f"layer{i}/down": (4 * width, width),
    }
rng = np.random.default_rng(0)
host_params = {k: rng.normal(0.0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
grads = {k: jnp.asarray(rng.normal(0.0, 1e-3, s).astype(np.float32)) for k, s in shapes.items()}
n_params = sum(x.size for x in host_params.values())
print(f"{len(shapes)} leaves, {n_params:,} parameters")


def time_step(optimizer: optax.GradientTransformation, params: dict, grads: dict, reps: int = reps) -> float:
    """Median seconds of one jitted update + apply, parameters and state donated."""

    def step(params: dict, state: optax.OptState, grads: dict) -> tuple[dict, optax.OptState]:
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.array, params)
    state = optimizer.init(params)
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, grads))
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


# %% [markdown]
# The same Adam four ways: optax's, adaopt's, adaopt's in one pass, and adaopt's in one pass over
# parameters laid out flat by `adaopt.flatten_params` (a training loop then calls `unflatten`
# inside its loss). The bytes Adam must move are 7 x 4 per parameter.

# %%
flat_params, unflatten = adaopt.flatten_params(host_params)
flat_grads, _ = adaopt.flatten_params(grads)
rows = {
    "optax": time_step(optax.adam(1e-3), host_params, grads),
    "adaopt": time_step(adaopt.adam(1e-3), host_params, grads),
    "adaopt single_pass": time_step(adaopt.single_pass(adaopt.adam(1e-3)), host_params, grads),
    "single_pass, flat params": time_step(adaopt.single_pass(adaopt.adam(1e-3)), flat_params, flat_grads),
}
moved = 7 * 4 * n_params
for name, seconds in rows.items():
    print(f"{name:26s} {seconds * 1e3:7.2f} ms  {moved / seconds / 1e9:6.1f} GB/s")

fig, ax = plt.subplots(figsize=(6, 2.5))
ax.barh(list(rows), [moved / s / 1e9 for s in rows.values()])
ax.invert_yaxis()
ax.set_xlabel("GB/s moved by one Adam step (higher is faster)")
plt.tight_layout()
plt.show()

# %% [markdown]
# Same steps either way: the single-pass form computes the same operations on the same values
# (up to fused multiply-adds, which depend on where XLA's kernels start and end).

# %%
tx, fast = adaopt.adam(1e-3), adaopt.single_pass(adaopt.adam(1e-3))
p_plain = p_fast = jax.tree.map(jnp.asarray, host_params)
s_plain, s_fast = tx.init(p_plain), fast.init(p_fast)
for _ in range(3):
    u, s_plain = jax.jit(tx.update)(grads, s_plain, p_plain)
    p_plain = optax.apply_updates(p_plain, u)
    u, s_fast = jax.jit(fast.update)(grads, s_fast, p_fast)
    p_fast = optax.apply_updates(p_fast, u)
gap = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_fast), strict=True)
)
print(f"largest difference after 3 steps: {gap:.1e}")
assert gap < 1e-6
