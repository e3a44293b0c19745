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
# # Hyperparameter sweeps in one compiled program
#
# `adaopt.sweep` trains many configurations of an optimizer at once: the factory is called inside
# the compiled training loop with each trial's hyperparameters as traced numbers, and `jax.vmap`
# runs the trials side by side. Here: AdamW's learning rate and `b2` on a small MLP, random
# search with successive halving, then the table and a plot.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import adaopt

x, y = load_digits(return_X_y=True)
x = jnp.asarray((x - x.mean(0)) / (x.std(0) + 1e-6), jnp.float32)
y = jnp.asarray(y)


def loss_fn(params: dict, batch: jax.Array) -> jax.Array:
    """Cross-entropy of a 64-32-10 tanh MLP on the rows ``batch`` of the digits."""
    logits = jnp.tanh(x[batch] @ params["w1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[batch]).mean()


def eval_fn(params: dict) -> jax.Array:
    return loss_fn(params, jnp.arange(len(y)))


k1, k2 = jax.random.split(jax.random.key(0))
init = {"w1": jax.random.normal(k1, (64, 32)) / 8, "w2": jax.random.normal(k2, (32, 10)) / 6}
steps = 400
batches = np.random.default_rng(0).integers(0, len(y), size=(steps, 64))  # one minibatch of rows per step

# %% [markdown]
# Sixteen configurations drawn from the search space; every 100 steps the better half goes on
# from its current parameters and state, the rest stop (16, 8, 4, then 2 trials to the end). A
# cosine schedule decays each trial's learning rate over the budget.

# %%
space = {"learning_rate": adaopt.Range(1e-4, 1e-1, log=True), "b2": [0.95, 0.99, 0.999]}
configs = adaopt.random_configs(space, 16, seed=0)
result = adaopt.sweep(
    adaopt.adamw, configs, loss_fn, init, batches,
    eval_fn=eval_fn, eval_every=50, halve_every=100,
    schedule=lambda lr: optax.cosine_decay_schedule(lr, steps),
)  # fmt: skip
print(result.table())
print("best:", result.best_config, f"loss {result.best_metric:.4f}")

# %% [markdown]
# The final metric of each trial against its learning rate (the colour: the steps it was
# trained before halving stopped it; circled: the best), and every trial's curve.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
result.plot(ax=left)
result.plot("curves", ax=right)
right.set_yscale("log")
plt.show()
assert result.best_metric < 0.5 * float(eval_fn(init))
