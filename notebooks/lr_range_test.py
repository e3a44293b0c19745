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
# # Finding the learning rate: the range test
#
# Train for up to a hundred steps at a learning rate that grows from tiny to far too large, and read off
# where the loss falls fastest (Smith, 2017). `adaopt.range_test` runs the whole test as one
# compiled loop, stops when the loss takes off, and records what torch-lr-finder records.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import adaopt

x, y = load_digits(return_X_y=True)
x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
batches = (jnp.asarray(x[:1792]).reshape(28, 64, 64), jnp.asarray(y[:1792]).reshape(28, 64))  # 28 batches of 64


def loss_fn(params: dict, batch: tuple) -> jax.Array:
    inputs, labels = batch
    logits = jnp.tanh(inputs @ params["w1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


k1, k2 = jax.random.split(jax.random.key(0))
params = {"w1": jax.random.normal(k1, (64, 32)) / 8, "w2": jax.random.normal(k2, (32, 10)) / 6}

# %% [markdown]
# Pass the optimizer's factory: it is built with a schedule that gives each step its learning
# rate, as torch-lr-finder sets the parameter group's `lr` before each step.

# %%
result = adaopt.range_test(loss_fn, params, adaopt.adam, batches, start_lr=1e-5, end_lr=100.0, num_iter=100)
print(f"the loss diverged at iteration {result.diverged_at}, learning rate {result.learning_rates[-1]:.2g}")
print(f"suggested learning rate: {result.suggest_lr():.2g}")

# %% [markdown]
# The smoothed loss against the learning rate; the red dot marks the steepest descent.

# %%
result.plot()
plt.show()

# %% [markdown]
# A short run at the suggestion, and at ten times it:


# %%
@jax.jit
def train(learning_rate: jax.Array, steps: int = 200) -> jax.Array:
    tx = adaopt.adam(learning_rate)

    def step(carry: tuple, k: jax.Array) -> tuple:
        p, state = carry
        grads = jax.grad(loss_fn)(p, jax.tree.map(lambda a: a[k % 28], batches))
        updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return loss_fn(p, (x, y))


for lr in (result.suggest_lr(), 10 * result.suggest_lr()):
    print(f"learning rate {lr:.2g}: loss {float(train(lr)):.3f} after 200 steps")
