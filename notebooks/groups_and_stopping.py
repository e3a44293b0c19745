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
# # Parameter groups and early stopping
#
# One network, trained as torch users would set it up: no weight decay on the biases and a
# smaller learning rate for the first layer (`adaopt.param_groups`), stopped when the validation
# loss has not improved for a while, with the best epoch's parameters restored
# (`adaopt.EarlyStopping`, Keras' semantics).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adaopt

x, y = load_digits(return_X_y=True)
x = (x - x.mean(0)) / (x.std(0) + 1e-6)
# A small training split, so that the network overfits and the validation loss turns up.
x_train, x_val, y_train, y_val = (
    jnp.asarray(a) for a in train_test_split(x, y, train_size=200, random_state=0, stratify=y)
)


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["first"]["kernel"] + params["first"]["bias"])
    logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


k1, k2 = jax.random.split(jax.random.key(0))
params = {
    "first": {"kernel": jax.random.normal(k1, (64, 128)) / 8, "bias": jnp.zeros(128)},
    "out": {"kernel": jax.random.normal(k2, (128, 10)) / 11, "bias": jnp.zeros(10)},
}

# %% [markdown]
# Groups are chosen by glob patterns on the "/"-joined path of each leaf; the first group that
# matches wins and the rest keep the default group's arguments. `group_labels` shows where each
# leaf went.

# %%
groups = [
    adaopt.Group("*/bias", name="no_decay", weight_decay=0.0),  # torch: {"params": biases, "weight_decay": 0}
    adaopt.Group("first/*", name="first_layer", learning_rate=1e-3),
]
optimizer = adaopt.param_groups(adaopt.adamw, groups, learning_rate=3e-3, weight_decay=1e-2)
adaopt.group_labels(groups, params)

# %% [markdown]
# One epoch is one full-batch step here. The early-stopping state is arrays, so `update` can sit
# in the compiled step; the loop reads `should_stop` on the host.

# %%
stopper = adaopt.EarlyStopping(patience=30, min_delta=1e-4, restore_best_weights=True)


@jax.jit
def epoch(params: dict, opt_state: optax.OptState, stop_state: adaopt.EarlyStoppingState) -> tuple:
    train_loss, grads = jax.value_and_grad(loss_fn)(params, x_train, y_train)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    val_loss = loss_fn(params, x_val, y_val)
    return params, opt_state, stopper.update(stop_state, val_loss, params), train_loss, val_loss


opt_state, stop_state = optimizer.init(params), stopper.init(params)
train_losses, val_losses = [], []
for _ in range(2000):
    params, opt_state, stop_state, train_loss, val_loss = epoch(params, opt_state, stop_state)
    train_losses.append(float(train_loss))
    val_losses.append(float(val_loss))
    if stop_state.should_stop:
        break
params = stopper.final_params(stop_state, params)  # the best epoch's parameters
stopped, best = int(stop_state.stopped_epoch), int(stop_state.best_epoch)
print(f"stopped after epoch {stopped}; best validation loss {float(stop_state.best):.4f} at epoch {best}")
print(f"restored parameters: validation loss {float(loss_fn(params, x_val, y_val)):.4f}")
assert 0 < best < stopped == len(val_losses) - 1

# %%
plt.plot(train_losses, label="training loss")
plt.plot(val_losses, label="validation loss")
plt.axvline(stopped, color="gray", linestyle="--", label=f"stopped (epoch {stopped})")
plt.scatter([best], [val_losses[best]], color="red", zorder=3, label=f"best, restored (epoch {best})")
plt.yscale("log")
plt.xlabel("epoch")
plt.ylabel("cross-entropy")
plt.legend()
plt.show()
