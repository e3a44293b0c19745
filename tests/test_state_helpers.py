"""The helpers that read or change an optimizer state take it in every framework's form.

``schedule_free_eval_params``, ``averaged_params`` and ``ReduceOnPlateau.observe`` read an
``nnx.Optimizer``'s ``opt_state`` (whose leaves are NNX variables) as well as the plain states
of Flax linen, Haiku and Equinox, and return what they compute in the form they were given. One
small optimizer holds all three states: a Schedule-Free AdamW under iterate averaging, then the
plateau scale.
"""

from __future__ import annotations

from typing import Any

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

import adaopt

B1 = 0.9
PATIENCE = 1
FACTOR = 0.5
BASE_LR = 1e-2
STEPS = 3


def _plateau() -> adaopt.ReduceOnPlateau:
    return adaopt.reduce_on_plateau(BASE_LR, factor=FACTOR, patience=PATIENCE)


def _tx(plateau: adaopt.ReduceOnPlateau) -> optax.GradientTransformationExtraArgs:
    inner = adaopt.schedule_free_adamw(BASE_LR, b1=B1, warmup_steps=0)
    return adaopt.chain(adaopt.polynomial_decay_averaging(inner, gamma=0.0), plateau)


def _expected_eval(state: Any, params: Any) -> Any:
    """``y + (1 - 1/b1)(z - y)`` from the plain state's ``z`` and ``b1``, written out."""
    (z,) = optax.tree.get_all_with_path(state, "z")
    (b1,) = optax.tree.get_all_with_path(state, "b1")
    return jax.tree.map(lambda y, z_: y + (1 - 1 / b1[1]) * (z_ - y), params, z[1])


def _plateau_state(state: Any) -> adaopt.ReduceOnPlateauState:
    (found,) = [node for _, node in optax.tree.get_all_with_path(state, "ReduceOnPlateauState")]
    return found


def _assert_close(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)


# Flax NNX.


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.norm = nnx.BatchNorm(2, rngs=rngs)  # a variable that is not a parameter

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.linear(x))


X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def _nnx_loss(model: NnxModel) -> jax.Array:
    return jnp.mean(model(X) ** 2)


@nnx.jit
def _nnx_step(model: NnxModel, optimizer: nnx.Optimizer) -> jax.Array:
    loss, grads = nnx.value_and_grad(_nnx_loss)(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def nnx_trained() -> tuple[NnxModel, nnx.Optimizer, adaopt.ReduceOnPlateau]:
    model = NnxModel(nnx.Rngs(0))
    plateau = _plateau()
    optimizer = nnx.Optimizer(model, _tx(plateau), wrt=nnx.Param)
    for _ in range(STEPS):
        _nnx_step(model, optimizer)
    return model, optimizer, plateau


def test_nnx_eval_params_come_back_as_the_params_variables(nnx_trained: Any) -> None:
    model, optimizer, _ = nnx_trained
    params = nnx.state(model, nnx.Param)
    before = nnx.as_pure(params)
    x = adaopt.schedule_free_eval_params(optimizer.opt_state, params)
    # The form given: an nnx.State of new Param variables; the model's own are untouched.
    assert jax.tree.structure(x) == jax.tree.structure(params)
    assert all(type(v) is nnx.Param for v in jax.tree.leaves(x, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    _assert_close(nnx.as_pure(nnx.state(model, nnx.Param)), before)
    _assert_close(nnx.as_pure(x), _expected_eval(nnx.as_pure(optimizer.opt_state), before))
    assert not np.allclose(nnx.as_pure(x)["linear"]["kernel"], before["linear"]["kernel"])
    # Pure parameters give pure ones; the form follows `params`, whatever the state's.
    _assert_close(adaopt.schedule_free_eval_params(optimizer.opt_state, before), nnx.as_pure(x))
    _assert_close(adaopt.schedule_free_eval_params(nnx.as_pure(optimizer.opt_state), params), x)
    # What an evaluation does with them: a model at x, beside the one being trained.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    evaluated = nnx.merge(graphdef, x, rest)
    _assert_close(nnx.as_pure(nnx.state(evaluated, nnx.Param)), nnx.as_pure(x))


def test_nnx_eval_params_under_nnx_jit(nnx_trained: Any) -> None:
    model, optimizer, _ = nnx_trained

    @nnx.jit
    def eval_loss(model: NnxModel, optimizer: nnx.Optimizer) -> jax.Array:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = adaopt.schedule_free_eval_params(optimizer.opt_state, params)
        return _nnx_loss(nnx.merge(graphdef, x, rest))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eager = _nnx_loss(nnx.merge(graphdef, adaopt.schedule_free_eval_params(optimizer.opt_state, params), rest))
    np.testing.assert_allclose(eval_loss(model, optimizer), eager, rtol=1e-6)


def test_nnx_averaged_params_are_the_state_values(nnx_trained: Any) -> None:
    model, optimizer, _ = nnx_trained
    average = adaopt.averaged_params(optimizer.opt_state)
    want = adaopt.averaged_params(nnx.as_pure(optimizer.opt_state))
    _assert_close(average, want)
    assert not any(isinstance(v, nnx.Variable) for v in jax.tree.leaves(average))
    # nnx.update writes them into a model.
    copy = nnx.clone(model)
    nnx.update(copy, average)
    _assert_close(nnx.as_pure(nnx.state(copy, nnx.Param)), want)


def _bad_losses(n: int) -> list[float]:
    return [1.0] + [2.0] * n  # one evaluation, then no improvement


def test_nnx_observe_round_trips_into_the_optimizer() -> None:
    """Assigning observe's result back into ``opt_state``, eagerly and inside ``nnx.jit``, reduces
    the learning rate after ``PATIENCE + 1`` bad evaluations, and the next ``update`` steps with
    the reduced scale."""
    model = NnxModel(nnx.Rngs(0))
    plateau = _plateau()
    optimizer = nnx.Optimizer(model, _tx(plateau), wrt=nnx.Param)
    _nnx_step(model, optimizer)

    @nnx.jit
    def observe(optimizer: nnx.Optimizer, loss: jax.Array) -> None:
        optimizer.opt_state = plateau.observe(optimizer.opt_state, loss)

    losses = _bad_losses(PATIENCE + 1)
    optimizer.opt_state = plateau.observe(optimizer.opt_state, losses[0])  # eager
    assert isinstance(_plateau_state(optimizer.opt_state).learning_rate, nnx.Variable)
    for loss in losses[1:]:
        observe(optimizer, jnp.asarray(loss))
    state = _plateau_state(nnx.as_pure(optimizer.opt_state))
    np.testing.assert_allclose(state.learning_rate, BASE_LR * FACTOR, rtol=1e-6)
    np.testing.assert_allclose(state.scale, FACTOR, rtol=1e-6)
    # The optimizer keeps training from the observed state: its step count moves on.
    count = int(optimizer.step[...])
    _nnx_step(model, optimizer)
    assert int(optimizer.step[...]) == count + 1
    assert float(_plateau_state(nnx.as_pure(optimizer.opt_state)).scale) == pytest.approx(FACTOR)


def test_nnx_observe_with_nnx_update() -> None:
    model = NnxModel(nnx.Rngs(0))
    plateau = _plateau()
    optimizer = nnx.Optimizer(model, _tx(plateau), wrt=nnx.Param)
    for loss in _bad_losses(PATIENCE + 1):
        nnx.update(optimizer.opt_state, nnx.state(plateau.observe(optimizer.opt_state, loss)))
    np.testing.assert_allclose(_plateau_state(nnx.as_pure(optimizer.opt_state)).scale, FACTOR, rtol=1e-6)


def test_the_nnx_optimizer_itself_is_refused_with_the_fix(nnx_trained: Any) -> None:
    model, optimizer, plateau = nnx_trained
    params = nnx.state(model, nnx.Param)
    for call in (
        lambda: adaopt.schedule_free_eval_params(optimizer, params),
        lambda: adaopt.averaged_params(optimizer),
        lambda: plateau.observe(optimizer, 1.0),
    ):
        with pytest.raises(TypeError, match=r"optimizer\.opt_state"):
            call()


def test_eval_params_of_other_parameters_name_the_parameters(nnx_trained: Any) -> None:
    model, optimizer, _ = nnx_trained
    with pytest.raises(adaopt.TreeMismatchError) as info:
        adaopt.schedule_free_eval_params(optimizer.opt_state, nnx.state(model))  # batch statistics too
    message = str(info.value)
    assert message.startswith("The parameters do not have the structure of the optimizer's state")
    assert "gradients" not in message and "update" not in message
    assert "pass the parameters it was built for" in message


# Flax linen, Haiku and Equinox keep plain states: the same helpers, the same results.


def _train_plain(loss: Any, params: Any) -> tuple[Any, Any, adaopt.ReduceOnPlateau]:
    plateau = _plateau()
    tx = _tx(plateau)
    state = tx.init(params)
    step = jax.jit(lambda p, s: _plain_step(tx, loss, p, s))
    for _ in range(STEPS):
        params, state = step(params, state)
    return params, state, plateau


def _plain_step(tx: Any, loss: Any, params: Any, state: Any) -> tuple[Any, Any]:
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _check_plain(params: Any, state: Any, plateau: adaopt.ReduceOnPlateau) -> Any:
    x = adaopt.schedule_free_eval_params(state, params)
    _assert_close(x, _expected_eval(state, params))
    average = adaopt.averaged_params(state)
    assert jax.tree.structure(average) == jax.tree.structure(params)
    for loss in _bad_losses(PATIENCE + 1):
        state = plateau.observe(state, loss)
    np.testing.assert_allclose(_plateau_state(state).scale, FACTOR, rtol=1e-6)
    return state


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2)(x)


def test_linen_train_state() -> None:
    module = LinenModel()
    variables = module.init(jax.random.key(0), X)
    plateau = _plateau()
    ts = train_state.TrainState.create(apply_fn=module.apply, params=variables["params"], tx=_tx(plateau))
    loss = lambda p: jnp.mean(module.apply({"params": p}, X) ** 2)
    for _ in range(STEPS):
        ts = ts.apply_gradients(grads=jax.grad(loss)(ts.params))
    opt_state = _check_plain(ts.params, ts.opt_state, plateau)
    ts = ts.replace(opt_state=opt_state).apply_gradients(grads=jax.grad(loss)(ts.params))
    assert int(ts.step) == STEPS + 1


def test_haiku() -> None:
    model = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x)))
    params = model.init(jax.random.key(0), X)
    _check_plain(*_train_plain(lambda p: jnp.mean(model.apply(p, X) ** 2), params))


def test_equinox() -> None:
    """Equinox's filtered parameters hold None where the model has no array: the result too."""
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(X) ** 2)
    params, state, plateau = _train_plain(loss, params)
    _check_plain(params, state, plateau)
    evaluated = eqx.combine(adaopt.schedule_free_eval_params(state, params), static)
    assert isinstance(evaluated, eqx.nn.MLP)
