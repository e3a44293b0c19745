"""adaopt's optimizers train real models in Flax NNX, Flax linen, Haiku and Equinox.

Each test trains a 64 -> 32 -> 10 tanh MLP on scikit-learn's digits (an 80/20 stratified split
with ``random_state=0``, standardised with the training split's statistics) on a fixed sequence
of minibatches of 128, with a jitted training step, and checks that the full training loss fell
well below its start and that the test accuracy is high: targets an optimizer that did nothing
(loss ~2.3, accuracy ~0.1) or diverged cannot meet. The four framework tests use AdamW chained
after gradient clipping, with a warmup-cosine schedule; the NNX test is also run for every
optimizer in ``adaopt.REGISTRY`` at its tuned learning rate (``learning_rates.make(spec)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import adaopt
from adaopt import Capability, OptimizerSpec
from benchmarks import learning_rates

HIDDEN = 32
N_CLASSES = 10
BATCH = 128
STEPS = 400  # the framework tests, with the warmup-cosine schedule
REGISTRY_STEPS = 500  # every registry optimizer at its constant tuned learning rate
PEAK_LR = 1e-2
WARMUP = 40

# Targets. A model that did not train has a loss of ~2.3 and an accuracy of ~0.1.
MAX_TRAIN_LOSS = 0.15
MIN_TEST_ACCURACY = 0.93
MIN_REGISTRY_TEST_ACCURACY = 0.85


class Digits(NamedTuple):
    x_train: np.ndarray  # (1437, 64) float32, standardised
    y_train: np.ndarray  # (1437,) int32
    x_test: np.ndarray  # (360, 64) float32, standardised with the training statistics
    y_test: np.ndarray  # (360,) int32


@functools.cache
def _digits() -> Digits:
    """The digits, split 80/20 (stratified, ``random_state=0``) and standardised; loaded once per session."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)
    return Digits(
        x_train=scaler.transform(x_train).astype(np.float32),
        y_train=y_train.astype(np.int32),
        x_test=scaler.transform(x_test).astype(np.float32),
        y_test=y_test.astype(np.int32),
    )


@functools.cache
def _batches(steps: int) -> np.ndarray:
    """Minibatch indices of shape ``(steps, BATCH)``: a fixed-seed permutation per epoch, remainder dropped."""
    n_train = _digits().x_train.shape[0]
    rng = np.random.default_rng(0)
    per_epoch = n_train // BATCH
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(n_train)[: per_epoch * BATCH] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, BATCH)[:steps].astype(np.int32)


def _schedule() -> optax.Schedule:
    return adaopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=PEAK_LR, warmup_steps=WARMUP, decay_steps=STEPS, end_value=PEAK_LR / 100
    )


def _tx() -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm at 1, on a warmup-cosine schedule."""
    return adaopt.chain(adaopt.clip_by_global_norm(1.0), adaopt.adamw(_schedule(), weight_decay=1e-4))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits: jax.Array, labels: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


def _check_trained(
    initial_loss: float,
    final_loss: float,
    test_accuracy: float,
    *,
    max_loss: float = MAX_TRAIN_LOSS,
    min_accuracy: float = MIN_TEST_ACCURACY,
) -> None:
    assert np.isfinite(final_loss), f"the training loss is {final_loss}"
    assert initial_loss > 1.5, f"the untrained model already has a training loss of {initial_loss:.3f}"
    assert final_loss < initial_loss / 5, f"the training loss fell only from {initial_loss:.3f} to {final_loss:.3f}"
    assert final_loss < max_loss, f"training loss {final_loss:.4f} >= {max_loss} (start: {initial_loss:.3f})"
    assert test_accuracy >= min_accuracy, f"test accuracy {test_accuracy:.4f} < {min_accuracy}"


# --- Flax NNX ---------------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, N_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def _nnx_loss(model: NnxMLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return _cross_entropy(model(x), y)


@nnx.jit
def _nnx_train_step(model: NnxMLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, x[batch], y[batch])
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _nnx_train_steps(model: NnxMLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, batches: jax.Array) -> None:
    """``len(batches)`` training steps in one compiled loop."""

    def body(i: jax.Array, carry: tuple[NnxMLP, nnx.Optimizer]) -> tuple[NnxMLP, nnx.Optimizer]:
        model, optimizer = carry
        batch = batches[i]
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, x[batch], y[batch])
        optimizer.update(model, grads, value=loss)  # the loss-driven optimizers need it, the others ignore it
        return model, optimizer

    nnx.fori_loop(0, batches.shape[0], body, (model, optimizer))


@nnx.jit
def _nnx_logits(model: NnxMLP, x: jax.Array) -> jax.Array:
    return model(x)


def test_flax_nnx() -> None:
    data = _digits()
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    initial_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    for batch in _batches(STEPS):
        _nnx_train_step(model, optimizer, x, y, batch)
    assert int(optimizer.step[...]) == STEPS
    final_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    _check_trained(initial_loss, final_loss, _accuracy(_nnx_logits(model, jnp.asarray(data.x_test)), data.y_test))


@pytest.mark.parametrize("layout", ["multi_tensor", "single_pass"])
@pytest.mark.usefixtures("fusion_on")
def test_flax_nnx_with_the_speed_layouts(layout: str) -> None:
    """``nnx.Optimizer`` holds the state of ``multi_tensor`` (the hidden kernel apart, the other
    leaves packed) and of ``single_pass`` (traced in its sibling form, as with the fusion on)."""
    adamw = adaopt.adamw(_schedule(), weight_decay=1e-4)
    if layout == "multi_tensor":
        tx = adaopt.chain(adaopt.clip_by_global_norm(1.0), adaopt.multi_tensor(adamw, min_size=64 * HIDDEN))
    else:
        tx = adaopt.single_pass(adaopt.chain(adaopt.clip_by_global_norm(1.0), adamw), min_size=1)
    data = _digits()
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    initial_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    _nnx_train_steps(model, optimizer, x, y, jnp.asarray(_batches(STEPS)))
    final_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    _check_trained(initial_loss, final_loss, _accuracy(_nnx_logits(model, jnp.asarray(data.x_test)), data.y_test))


@pytest.mark.parametrize("kind", ["dynamic8", "dynamic4", "fp8", "bfloat16_sr"])
def test_flax_nnx_with_stored_moments(kind: str) -> None:
    """Quantized and stochastically rounded moments in ``nnx.Optimizer``: five steps equal the same optimizer's
    steps on the plain parameters (a variable holding a whole stored leaf came back from the first update as a
    dict of its fields, and the second update failed)."""
    storage = kind if kind == "bfloat16_sr" else adaopt.Blockwise(kind, block_size=64, min_size=64)
    make = lambda: adaopt.adamw(1e-2, mu_dtype=storage, nu_dtype=storage)
    data = _digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = NnxMLP(nnx.Rngs(0))
    graphdef, template = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(template)
    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    tx = make()
    state = tx.init(params)

    @jax.jit
    def plain_step(params: Any, state: Any, batch: jax.Array) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            variables = jax.tree.map(lambda v: v, template)  # a fresh State to fill with the pure values
            nnx.replace_by_pure_dict(variables, p)
            return _nnx_loss(nnx.merge(graphdef, variables), x[batch], y[batch])

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for batch in _batches(5):
        _nnx_train_step(model, optimizer, x, y, batch)
        params, state = plain_step(params, state, batch)
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), trained, params)


@pytest.mark.parametrize("spec", list(adaopt.REGISTRY.values()), ids=list(adaopt.REGISTRY))
def test_flax_nnx_every_registry_optimizer(spec: OptimizerSpec) -> None:
    data = _digits()
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, learning_rates.make(spec), wrt=nnx.Param)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    initial_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    batches = _batches(REGISTRY_STEPS)
    if Capability.FULL_BATCH in spec.capabilities:  # it compares losses between steps: give it the same objective
        batches = np.broadcast_to(np.arange(x.shape[0], dtype=np.int32), (REGISTRY_STEPS, x.shape[0]))
    _nnx_train_steps(model, optimizer, x, y, jnp.asarray(batches))
    final_loss = float(_cross_entropy(_nnx_logits(model, x), y))
    test_accuracy = _accuracy(_nnx_logits(model, jnp.asarray(data.x_test)), data.y_test)
    # A looser loss target than the framework tests': no schedule, and a fixed step budget for all.
    _check_trained(initial_loss, final_loss, test_accuracy, max_loss=0.3, min_accuracy=MIN_REGISTRY_TEST_ACCURACY)


# --- Flax linen -------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(N_CLASSES)(jnp.tanh(nn.Dense(HIDDEN)(x)))


def test_flax_linen() -> None:
    data = _digits()
    model = LinenMLP()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    params = model.init(jax.random.key(0), x[:1])["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=_tx())

    @jax.jit
    def train_step(state: train_state.TrainState, batch: jax.Array) -> tuple[train_state.TrainState, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            return _cross_entropy(state.apply_fn({"params": params}, x[batch]), y[batch])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    logits = jax.jit(lambda params, inputs: model.apply({"params": params}, inputs))
    initial_loss = float(_cross_entropy(logits(state.params, x), y))
    for batch in _batches(STEPS):
        state, _ = train_step(state, batch)
    assert int(state.step) == STEPS
    final_loss = float(_cross_entropy(logits(state.params, x), y))
    _check_trained(initial_loss, final_loss, _accuracy(logits(state.params, jnp.asarray(data.x_test)), data.y_test))


# --- Haiku ------------------------------------------------------------------------------------------


def _haiku_mlp(x: jax.Array) -> jax.Array:
    return hk.nets.MLP([HIDDEN, N_CLASSES], activation=jnp.tanh)(x)


def test_haiku() -> None:
    data = _digits()
    network = hk.without_apply_rng(hk.transform(_haiku_mlp))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    params = network.init(jax.random.key(0), x[:1])
    tx = _tx()
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params: hk.Params, opt_state: Any, batch: jax.Array) -> tuple[hk.Params, Any, jax.Array]:
        def loss_fn(params: hk.Params) -> jax.Array:
            return _cross_entropy(network.apply(params, x[batch]), y[batch])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return adaopt.apply_updates(params, updates), opt_state, loss

    logits = jax.jit(network.apply)
    initial_loss = float(_cross_entropy(logits(params, x), y))
    for batch in _batches(STEPS):
        params, opt_state, _ = train_step(params, opt_state, batch)
    final_loss = float(_cross_entropy(logits(params, x), y))
    _check_trained(initial_loss, final_loss, _accuracy(logits(params, jnp.asarray(data.x_test)), data.y_test))


# --- Equinox ----------------------------------------------------------------------------------------


def test_equinox() -> None:
    data = _digits()
    model = eqx.nn.MLP(64, N_CLASSES, HIDDEN, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    tx = _tx()
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model: eqx.nn.MLP, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        return _cross_entropy(jax.vmap(model)(inputs), labels)

    @eqx.filter_jit
    def train_step(model: eqx.nn.MLP, opt_state: Any, batch: jax.Array) -> tuple[eqx.nn.MLP, Any, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x[batch], y[batch])
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    evaluate: Callable[[eqx.nn.MLP, jax.Array], jax.Array] = eqx.filter_jit(lambda m, inputs: jax.vmap(m)(inputs))
    initial_loss = float(_cross_entropy(evaluate(model, x), y))
    for batch in _batches(STEPS):
        model, opt_state, _ = train_step(model, opt_state, batch)
    final_loss = float(_cross_entropy(evaluate(model, x), y))
    _check_trained(initial_loss, final_loss, _accuracy(evaluate(model, jnp.asarray(data.x_test)), data.y_test))


def test_an_equinox_mask_is_a_tree_though_callable() -> None:
    """A weight-decay mask built over Equinox parameters (``jax.tree.map`` of a module) is an Equinox module, which is
    callable: it was called as a mask function and ran the model on the parameters. It decays as the same mask given
    as a function does; a GaLore mask, Scion's norms and D-Adaptation's layer scales likewise."""
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    masks = jax.tree.map(lambda p: p.ndim > 1, params), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    norms = adaopt.default_scion_norms(params), adaopt.default_scion_norms
    scales = jax.tree.map(lambda p: 0.5, params), lambda p: jax.tree.map(lambda x: 0.5, p)
    assert callable(masks[0]) and callable(norms[0]) and callable(scales[0])
    for make, pair in (
        (lambda mask: adaopt.adamw(1e-2, weight_decay=0.1, weight_decay_mask=mask), masks),
        (lambda mask: adaopt.galore(adaopt.adam(1e-2), rank=1, galore_mask=mask), masks),
        (lambda given: adaopt.scion(1e-2, norms=given), norms),
        (lambda given: adaopt.dadapt_adam(layer_scale=given), scales),
    ):
        steps = []
        for given in pair:
            tx = make(given)
            updates, _ = tx.update(params, tx.init(params), params)
            steps.append(jax.tree.leaves(updates))
        for got, want in zip(*steps, strict=True):
            np.testing.assert_array_equal(got, want)
