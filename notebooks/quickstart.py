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
# # adaopt quickstart
#
# Three things in three code cells: train a model with several adaopt optimizers, read the curves,
# and check one optimizer against its reference implementation step for step.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
from sklearn.datasets import load_digits

import adaopt

x, y = load_digits(return_X_y=True)
x = jnp.asarray((x - x.mean(0)) / (x.std(0) + 1e-6), jnp.float32)
y = jnp.asarray(y)


def loss_fn(params: dict) -> jax.Array:
    logits = jnp.tanh(x @ params["w1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


k1, k2 = jax.random.split(jax.random.key(0))
init = {"w1": jax.random.normal(k1, (64, 32)) / 8, "w2": jax.random.normal(k2, (32, 10)) / 6}

# %% [markdown]
# Every optimizer is an optax transformation, so one training loop serves them all. The
# registry builds each one (`spec.make`) with the learning rate that suits this data, chosen below.


# %%
def train(optimizer: optax.GradientTransformation, steps: int = 300) -> np.ndarray:
    def step(carry: tuple, _: None) -> tuple:
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps))(init)
    return np.asarray(losses)


# Learning rates that suit this problem (each factory's own default is a safe start, not a tuned value).
rates = {"sgd": 0.5, "adam": 3e-3, "adabelief": 3e-3, "lion": 1e-3, "lamb": 5e-3}
curves = {name: train(adaopt.REGISTRY[name].make(learning_rate=lr)) for name, lr in rates.items()}
for name, losses in curves.items():
    plt.semilogy(losses, label=name)
plt.xlabel("step")
plt.ylabel("training loss")
plt.legend()
plt.show()
assert all(losses[-1] < 0.2 * losses[0] for losses in curves.values())

# %% [markdown]
# The same hyperparameters in `torch.optim.Adam` follow the same trajectory. Here in float64,
# for 100 steps on fresh random gradients:

# %%
rng = np.random.default_rng(0)
start, grads = rng.normal(size=(5, 3)), rng.normal(size=(100, 5, 3))

with jax.enable_x64(True):
    tx = adaopt.adam(1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
    p, state = jnp.asarray(start), tx.init(jnp.asarray(start))
    ours = []
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
        ours.append(np.asarray(p))

q = torch.tensor(start)
reference = torch.optim.Adam([q], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
theirs = []
for g in grads:
    q.grad = torch.tensor(g)
    reference.step()
    theirs.append(q.detach().numpy().copy())

error = np.max(np.abs(np.array(ours) - np.array(theirs))) / np.max(np.abs(np.array(theirs)))
print(f"largest relative difference over 100 steps: {error:.1e}")
assert error < 1e-12
