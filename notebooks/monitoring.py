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
# # Watching the step sizes
#
# `adaopt.monitor` wraps any optimizer and records, inside its state and without leaving `jit`,
# what the optimizer actually did: per layer the effective learning rate `|update| / |gradient|`,
# the spread of Adam's per-coordinate rates, the update/parameter ratio, the gradient norm before
# and after clipping, the moments' sizes and the learning rate the schedule chose. Here it watches
# AdamW with clipping and a warmup-cosine schedule train a small MLP, and the records go to a CSV
# file and to TensorBoard.

# %%
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from sklearn.datasets import load_digits

import adaopt

x, y = load_digits(return_X_y=True)
x = jnp.asarray((x - x.mean(0)) / (x.std(0) + 1e-6), jnp.float32)
y = jnp.asarray(y)


def loss_fn(params: dict) -> jax.Array:
    logits = jnp.tanh(x @ params["hidden"]["kernel"]) @ params["out"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


k1, k2 = jax.random.split(jax.random.key(0))
params = {
    "hidden": {"kernel": jax.random.normal(k1, (64, 32)) / 8},
    "out": {"kernel": jax.random.normal(k2, (32, 10)) / 6},
}

# %% [markdown]
# The monitor records every 10 steps; `record_norm` is a probe placed after the clipping. The
# training loop reads the records on those steps and hands them to the writers.

# %%
EVERY = 10
optimizer = adaopt.monitor(
    optax.chain(
        optax.clip_by_global_norm(1.0),
        adaopt.record_norm("clipped_grad_norm"),
        adaopt.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-2, 20, 200), weight_decay=1e-4),
    ),
    every=EVERY,
)
state = optimizer.init(params)


@jax.jit
def train_step(params: dict, state: adaopt.MonitorState) -> tuple:
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


logdir = Path(tempfile.mkdtemp())
with adaopt.CsvWriter(logdir / "records.csv") as csv_writer, adaopt.TensorBoardWriter(logdir / "tb") as tb_writer:
    for step in range(200):
        params, state, loss = train_step(params, state)
        if step % EVERY == 0:
            records = {"loss": float(loss), **adaopt.read_records(state)}
            csv_writer.write(step, records)
            tb_writer.write(step, records)
print(f"final loss {float(loss):.3f}; TensorBoard files: {sorted(p.name[:20] for p in (logdir / 'tb').iterdir())}")

# %% [markdown]
# The CSV file's first rows, a few of its columns (all of them: `adaopt.load_records`):

# %%
rows = adaopt.load_records(logdir / "records.csv")
columns = ["loss", "grad_norm", "clipped_grad_norm", "hyperparams/learning_rate", "effective_lr/hidden/kernel"]
print(f"{'step':>5}" + "".join(f"{c[-26:]:>28}" for c in columns))
for step, records in rows[:6]:
    print(f"{step:>5}" + "".join(f"{records[c]:>28.4g}" for c in columns))

# %% [markdown]
# The effective learning rate `|u| / |g|` of each layer is not the schedule's rate: Adam divides
# by the gradients' running RMS, so as the gradients shrink during training its steps stay the
# size the schedule sets and `|u| / |g|` grows far above it. `rate_rms` shows the same for the
# per-coordinate rates `|u_i| / |g_i|`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
adaopt.plot_records(rows, ["effective_lr/*", "hyperparams/learning_rate"], ax=axes[0], logy=True)
adaopt.plot_records(rows, ["rate_rms/*"], ax=axes[1], logy=True)
axes[0].set_title("effective learning rate |u| / |g|")
axes[1].set_title("RMS of the per-coordinate rates |u_i| / |g_i|")
plt.tight_layout()
plt.show()
