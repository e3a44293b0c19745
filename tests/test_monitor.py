"""adaopt.monitor and adaopt.current_hyperparams: the records are the quantities they name, computed
by hand here from the gradients, the updates and the optimizer's own state; recorded every `every`
steps only; the updates are the unmonitored optimizer's bit for bit, with no recompilation; and it
runs under jit, vmap, optax.chain, apply_if_finite, MultiSteps and Flax NNX's nnx.Optimizer."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaopt
from adaopt._src import base, numerics
from adaopt._src.tools import monitor as monitor_module

LR = 0.05


def _params(dtype: Any = jnp.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "layers": [{"kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype), "bias": jnp.zeros(3, dtype)}],
        "scale": jnp.asarray(1.5, dtype),
        "empty": jnp.zeros((0, 2), dtype),
        "head": jnp.asarray(rng.normal(size=3), dtype),
    }


def _grads(step: int, dtype: Any = jnp.float32) -> dict:
    """Gradients that change with the step, with exact zeros in the kernel (not counted in rate_rms)."""
    rng = np.random.default_rng(100 + step)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), _params(dtype))
    grads["layers"][0]["kernel"] = grads["layers"][0]["kernel"].at[0].set(0)
    return grads


def _run(tx: optax.GradientTransformation, steps: int, dtype: Any = jnp.float32, **extra: Any) -> tuple[list, Any]:
    params = _params(dtype)
    state = tx.init(params)
    all_updates = []
    for i in range(steps):
        updates, state = _jit_update(tx)(_grads(i, dtype), state, params, **extra)
        all_updates.append(updates)
        params = optax.apply_updates(params, updates)
    return all_updates, state


@functools.cache
def _jit_update(tx: optax.GradientTransformation) -> Any:
    return jax.jit(tx.update)


def _norm(x: Any) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(x))))


# ---- The records are the quantities they name. ----

SGD = adaopt.monitor(adaopt.sgd(LR), every=1)


def test_sgd_records_its_learning_rate() -> None:
    """For SGD, |u| / |g| and every per-coordinate rate are the learning rate, per leaf and overall."""
    _, state = _run(SGD, 2)
    records = adaopt.read_records(state)
    for name in ("effective_lr", "rate_rms", "effective_lr/layers/0/kernel", "rate_rms/head", "rate_rms/scale"):
        np.testing.assert_allclose(records[name], LR, rtol=1e-6, err_msg=name)
    # A zero-size leaf has no rate (0, not NaN); the gradient norm is the one received at step 1.
    assert records["effective_lr/empty"] == 0.0 and records["rate_rms/empty"] == 0.0
    np.testing.assert_allclose(records["grad_norm"], _norm(_grads(1)), rtol=1e-6)
    np.testing.assert_allclose(records["grad_norm/head"], _norm(_grads(1)["head"]), rtol=1e-6)


# Leaves are reduced one by one (PACKED_SIZE 0), all packed into one vector (the default, for this
# small tree), or some of each (the kernel, of 12 coordinates, alone).
PACKINGS = pytest.mark.parametrize("packed_size", [0, 5, monitor_module.PACKED_SIZE], ids=["alone", "mixed", "packed"])


@PACKINGS
def test_update_ratio_and_moments_of_adam_match_a_hand_computation_from_its_state(
    packed_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 3 steps: Adam's update rebuilt from the state's mu, nu and count gives rate_rms (over the
    coordinates with g != 0), the update/parameter ratio and the moments' RMS and max."""
    monkeypatch.setattr(monitor_module, "PACKED_SIZE", packed_size)
    b1, b2, eps = 0.9, 0.999, 1e-8
    tx = adaopt.monitor(adaopt.adam(LR, b1, b2, eps), every=1)
    params = _params()
    state = tx.init(params)
    for i in range(3):
        previous = params
        updates, state = _jit_update(tx)(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    records = adaopt.read_records(state)
    adam = numerics.find_state(state, adaopt.AdamState, "")
    t = int(adam.count)
    mu, nu = (np.asarray(x["layers"][0]["kernel"], np.float64) for x in (adam.mu, adam.nu))
    u = LR * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    g = np.asarray(_grads(2)["layers"][0]["kernel"], np.float64)
    rates = np.abs(u[g != 0]) / np.abs(g[g != 0])
    assert rates.size == 9  # the zero row is left out
    np.testing.assert_allclose(records["rate_rms/layers/0/kernel"], np.sqrt(np.mean(rates**2)), rtol=1e-5)
    np.testing.assert_allclose(
        records["effective_lr/layers/0/kernel"], np.linalg.norm(u) / np.linalg.norm(g), rtol=1e-5
    )
    p = np.asarray(previous["layers"][0]["kernel"], np.float64)
    np.testing.assert_allclose(
        records["update_ratio/layers/0/kernel"], np.linalg.norm(u) / np.linalg.norm(p), rtol=1e-5
    )
    # Adam's rates differ by coordinate: their RMS is not the ratio of the norms.
    assert abs(records["rate_rms/layers/0/kernel"] - records["effective_lr/layers/0/kernel"]) > 1e-3
    all_nu = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(adam.nu)])
    np.testing.assert_allclose(records["state/nu/rms"], np.sqrt(np.mean(all_nu**2)), rtol=1e-5)
    np.testing.assert_allclose(records["state/nu/max"], np.max(np.abs(all_nu)), rtol=1e-6)
    assert records["update_ratio/empty"] == 0.0  # no parameters: 0, not NaN


def test_the_moments_of_parameter_groups_and_masked_optimizers_are_recorded() -> None:
    """A group's moment (``param_groups``, ``optax.masked``) holds ``optax.MaskedNode`` at the other groups' leaves:
    it was not taken for a field that mirrors the parameters, and no moment was recorded. Each group's RMS and max are
    over its own leaves."""
    grouped = adaopt.param_groups(adaopt.adamw, [adaopt.Group("head", weight_decay=0.0)], learning_rate=LR)
    _, state = _run(adaopt.monitor(grouped, every=1), 2)
    records = adaopt.read_records(state)
    for group in ("default", "group_0"):
        adam = numerics.find_state(state.inner_state.inner_states[group], adaopt.AdamState, "")
        leaves = [x for x in jax.tree.leaves(adam.mu) if not isinstance(x, optax.MaskedNode)]
        mu = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])
        (prefix,) = {
            k.removesuffix("/rms") for k in records if re.fullmatch(f"state/inner_states/{group}/.*/mu/rms", k)
        }
        np.testing.assert_allclose(records[f"{prefix}/rms"], np.sqrt(np.mean(mu**2)), rtol=1e-5)
        np.testing.assert_allclose(records[f"{prefix}/max"], np.max(np.abs(mu)), rtol=1e-6)
    mask = jax.tree.map(lambda p: p.ndim > 1, _params())
    _, state = _run(adaopt.monitor(optax.masked(adaopt.adam(LR), mask), every=1), 1)
    assert {"state/mu/rms", "state/mu/max", "state/nu/rms", "state/nu/max"} <= set(adaopt.read_records(state))


def test_a_statistic_kept_elsewhere_is_no_moment() -> None:
    """``optax.MaskedNode`` outside a group, or beside a field that holds the statistic there, is no other group's
    leaf: Adafactor's whole second moment holds only its unfactored leaves (the factored ones are in ``v_row`` and
    ``v_col``), GaLore's bases only its projected matrices; neither is recorded as a moment of the parameters. In a
    group of unfactored leaves only (the default group below), ``v`` is that group's whole second moment."""
    moments = lambda tx: {n for n in adaopt.read_records(_run(adaopt.monitor(tx, every=1), 1)[1]) if "state/" in n}
    assert not moments(adaopt.adafactor(LR))
    assert not moments(adaopt.galore(adaopt.scale_by_adam(), rank=4, min_dim=2, proj_type="left"))
    grouped = moments(adaopt.param_groups(adaopt.adafactor, [adaopt.Group("layers/*")], learning_rate=LR))
    assert grouped == {"state/v/rms", "state/v/max"}  # the default group's: "layers/0/kernel" is factored


def test_records_only_every_k_steps() -> None:
    tx = adaopt.monitor(adaopt.adam(LR), every=3)
    params = _params()
    state = tx.init(params)
    seen = []
    for i in range(7):
        _, state = _jit_update(tx)(_grads(i), state, params)
        seen.append((int(state.recorded_at), adaopt.read_records(state)["grad_norm"]))
    assert [at for at, _ in seen] == [0, 0, 0, 3, 3, 3, 6]
    for i, (at, grad_norm) in enumerate(seen):
        np.testing.assert_allclose(grad_norm, _norm(_grads(at)), rtol=1e-6, err_msg=f"step {i}")
    assert _jit_update(tx)._cache_size() == 1  # type: ignore[attr-defined]  # no recompilation


@pytest.mark.parametrize(
    "make",
    [
        lambda: adaopt.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=0.1),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), adaopt.record_norm("clipped"), adaopt.lion(1e-3)),
    ],
    ids=["adamw_schedule", "optax_chain"],
)
def test_updates_are_the_unmonitored_ones_bit_for_bit(make: Any) -> None:
    plain, _ = _run(make(), 4)
    monitored, state = _run(adaopt.monitor(make(), every=2, groups=None), 4)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(monitored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert adaopt.read_records(state)["grad_norm"] > 0


def test_a_static_record_choice_records_when_told_and_keeps_the_updates() -> None:
    """update(..., record=True / False): two programs without a cond; the loop decides, ``every`` is unused."""
    make = lambda: optax.chain(optax.clip_by_global_norm(2.0), adaopt.record_norm("clipped"), adaopt.adam(LR))
    plain, _ = _run(make(), 3)
    tx = adaopt.monitor(make(), every=1)
    update = jax.jit(tx.update, static_argnames="record")
    params, state = _params(), tx.init(_params())
    for i, record in enumerate((True, False, False)):
        updates, state = update(_grads(i), state, params, record=record)
        for a, b in zip(jax.tree.leaves(plain[i]), jax.tree.leaves(updates), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, updates)
        records = adaopt.read_records(state)
        assert int(state.recorded_at) == 0  # the records are those of step 0, the one told to record
        np.testing.assert_allclose(records["grad_norm"], _norm(_grads(0)), rtol=1e-6)
        np.testing.assert_allclose(records["clipped"], 2.0, rtol=1e-6)
    assert update._cache_size() == 2  # type: ignore[attr-defined]  # one program per choice
    with pytest.raises(TypeError, match="record must be True, False or None"):
        tx.update(_grads(0), state, params, record=jnp.asarray(True))


def test_a_probe_records_the_clipped_norm_on_recording_steps_only() -> None:
    tx = adaopt.monitor(
        optax.chain(optax.clip_by_global_norm(2.0), adaopt.record_norm("clipped_grad_norm"), adaopt.sgd(LR)),
        every=2,
    )
    params = _params()
    state = tx.init(params)
    clipped = []
    for i in range(3):
        _, state = _jit_update(tx)(_grads(i), state, params)
        clipped.append(adaopt.read_records(state)["clipped_grad_norm"])
    assert _norm(_grads(0)) > 2.0
    np.testing.assert_allclose(clipped, [2.0, 2.0, 2.0], rtol=1e-6)
    # The probe's own state holds the value of the last recording step (step 1's was skipped).
    probe = numerics.find_state(state, adaopt.NormProbeState, "")
    np.testing.assert_allclose(float(probe.norms["clipped_grad_norm"]), 2.0, rtol=1e-6)
    # Outside a monitor the probe records every step: the norm after clipping.
    plain = adaopt.record_norm("n")
    _, probe_state = plain.update({"a": jnp.array([3.0, 4.0])}, plain.init({"a": jnp.zeros(2)}))
    assert float(probe_state.norms["n"]) == 5.0


def test_groups_by_pattern_and_by_function() -> None:
    grads = _grads(0)
    by_pattern = adaopt.monitor(
        adaopt.sgd(LR), every=1, groups={"matrices": "layers/*/kernel", "vectors": ["*bias", "head"]}
    )
    _, state = jax.jit(by_pattern.update)(grads, by_pattern.init(_params()), _params())
    records = adaopt.read_records(state)
    np.testing.assert_allclose(records["grad_norm/matrices"], _norm(grads["layers"][0]["kernel"]), rtol=1e-6)
    np.testing.assert_allclose(
        records["grad_norm/vectors"], _norm([grads["layers"][0]["bias"], grads["head"]]), rtol=1e-6
    )
    np.testing.assert_allclose(records["grad_norm/other"], _norm([grads["scale"], grads["empty"]]), rtol=1e-6)
    assert not any(name.endswith("/head") for name in records)  # per group, not per leaf

    labels = lambda p: jax.tree.map(lambda x: "big" if np.size(x) > 3 else "small", p)
    by_function = adaopt.monitor(adaopt.sgd(LR), every=1, groups=labels)
    _, state = jax.jit(by_function.update)(grads, by_function.init(_params()), _params())
    assert {n for n in adaopt.read_records(state) if n.startswith("grad_norm/")} == {"grad_norm/big", "grad_norm/small"}

    whole = adaopt.monitor(adaopt.sgd(LR), every=1, groups=None)
    assert not any("/" in name for name in whole.init(_params()).records.names)


# ---- The accessor: one for every state. ----


def test_current_hyperparams_reports_the_schedules_rate() -> None:
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    # Through optax.MultiSteps and a monitor, which records it too.
    tx = adaopt.monitor(optax.MultiSteps(adaopt.adamw(schedule), every_k_schedule=1), every=1, groups=None)
    _, state = _run(tx, 3)
    assert float(adaopt.current_hyperparams(state)["learning_rate"]) == pytest.approx(float(schedule(2)))
    assert adaopt.read_records(state)["hyperparams/learning_rate"] == pytest.approx(float(schedule(2)))


def test_scale_by_learning_rate_with_a_schedule_is_optax_bit_for_bit() -> None:
    schedule = optax.cosine_decay_schedule(0.1, 5)
    for dtype in (jnp.float32, jnp.bfloat16):
        ours, theirs = base.scale_by_learning_rate(schedule), optax.scale_by_learning_rate(schedule)
        s1, s2 = ours.init(_params(dtype)), theirs.init(_params(dtype))
        for i in range(4):
            u1, s1 = _jit_update(ours)(_grads(i, dtype), s1)
            u2, s2 = _jit_update(theirs)(_grads(i, dtype), s2)
            for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert int(s1.count) == int(s2.count) == 4
        assert float(s1.learning_rate) == pytest.approx(float(schedule(3)))


def test_current_hyperparams_reports_loss_driven_rates() -> None:
    losses = [jnp.asarray(v) for v in (3.0, 2.0, 1.0, 5.0)]
    tx = adaopt.bold_driver(0.1, increase=1.5, decrease=0.5)
    params = _params()
    state = tx.init(params)
    for value in losses:
        _, state = _jit_update(tx)(_grads(0), state, params, value=value)
    reported = float(adaopt.current_hyperparams(state)["learning_rate"])
    assert reported == pytest.approx(float(numerics.find_state(state, adaopt.BoldDriverState, "").learning_rate))
    assert reported == pytest.approx(0.1 * 1.5 * 1.5 * 0.5)

    plateau = optax.chain(adaopt.sgd(1.0), adaopt.reduce_on_plateau(0.2, factor=0.5, patience=0))
    state = plateau.init(params)
    for value in losses:
        _, state = _jit_update(plateau)(_grads(0), state, params, value=value)
    found = adaopt.current_hyperparams(state)
    assert float(found["plateau_scale"]) == pytest.approx(0.5)
    assert float(found["learning_rate"]) == pytest.approx(0.1)


@pytest.mark.parametrize("make", [adaopt.prodigy, adaopt.dadapt_adam], ids=["prodigy", "dadapt_adam"])
def test_current_hyperparams_reports_d(make: Any) -> None:
    tx = adaopt.monitor(make(), every=1, groups=None)
    params = _params()
    state = tx.init(params)
    for _ in range(4):  # one gradient throughout: the distance travelled, and d, grow
        updates, state = _jit_update(tx)(_grads(0), state, params)
        params = optax.apply_updates(params, updates)
    d = float(adaopt.current_hyperparams(state)["d"])
    own = numerics.find_state(state, adaopt.ProdigyState if make is adaopt.prodigy else adaopt.DAdaptAdamState, "")
    assert d == float(own.d) and d > 1e-6  # grown from d0 = 1e-6
    assert adaopt.read_records(state)["hyperparams/d"] == pytest.approx(d)


def test_current_hyperparams_reports_injected_values_and_qualifies_repeated_names() -> None:
    schedule = optax.exponential_decay(0.5, 1, 0.5)
    tx = adaopt.inject_hyperparams(adaopt.adamw)(learning_rate=schedule, b1=0.8)
    _, state = _run(tx, 3)
    found = adaopt.current_hyperparams(state)
    assert float(found["learning_rate"]) == pytest.approx(0.125)  # the rate of the last step, 2
    assert float(found["b1"]) == pytest.approx(0.8)
    # Two rates in one chain: each is named by its place in the state.
    both = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.3), adaopt.sgd(schedule))
    names = set(adaopt.current_hyperparams(both.init(_params())))
    assert names == {"0/learning_rate", "1/3/learning_rate"}  # optax.chain's 0; adaopt.sgd's chain, block 3


def test_nonfinite_steps_are_counted() -> None:
    tx = adaopt.monitor(optax.apply_if_finite(adaopt.sgd(LR), 5), every=1, groups=None)
    params = _params()
    state = tx.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, _grads(0))
    for grads in (_grads(0), bad, bad, _grads(1)):
        _, state = _jit_update(tx)(grads, state, params)
        if grads is bad:  # the gradient's NaN shows in its norm; the step skipped: a zero update
            records = adaopt.read_records(state)
            assert np.isnan(records["grad_norm"]) and records["update_norm"] == 0.0
    records = adaopt.read_records(state)
    assert records["nonfinite/total"] == 2.0 and records["nonfinite/consecutive"] == 0.0


@PACKINGS
def test_a_nonfinite_gradient_shows_in_every_statistic_it_enters(
    packed_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One NaN coordinate makes its leaf's norms, rates and moments NaN (not 0, not skipped); the other leaf stays
    finite; an infinite coordinate makes the norm infinite."""
    monkeypatch.setattr(monitor_module, "PACKED_SIZE", packed_size)
    tx = adaopt.monitor(adaopt.adam(LR), every=1)
    params = {"a": jnp.ones(3), "b": jnp.ones(6)}  # mixed: b alone, a packed
    state = tx.init(params)
    _, state = tx.update({"a": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.arange(1.0, 7.0)}, state, params)
    records = adaopt.read_records(state)
    for name in ("grad_norm", "effective_lr", "rate_rms", "update_ratio"):
        assert np.isnan(records[f"{name}/a"]) and np.isnan(records[name]), name
        assert np.isfinite(records[f"{name}/b"]) and records[f"{name}/b"] > 0, name
    for name in ("update_norm", "state/mu/rms", "state/mu/max", "state/nu/rms", "state/nu/max"):
        assert np.isnan(records[name]), name
    sgd = adaopt.monitor(adaopt.sgd(LR), every=1)
    _, state = sgd.update({"a": jnp.array([1.0, jnp.inf, 0.0]), "b": jnp.ones(6)}, sgd.init(params), params)
    assert adaopt.read_records(state)["grad_norm/a"] == np.inf


# ---- Where it runs. ----


def test_under_vmap_each_configuration_has_its_records() -> None:
    def run(learning_rate: jax.Array) -> adaopt.MonitorState:
        tx = adaopt.monitor(adaopt.inject_hyperparams(adaopt.sgd)(learning_rate=learning_rate), every=1, groups=None)
        params = _params()
        return tx.update(_grads(0), tx.init(params), params)[1]

    state = jax.jit(jax.vmap(run))(jnp.array([0.1, 0.2, 0.4]))
    for i, lr in enumerate((0.1, 0.2, 0.4)):
        assert adaopt.read_records(state, index=i)["effective_lr"] == pytest.approx(lr)
    with pytest.raises(ValueError, match="index="):
        adaopt.read_records(state)
    with pytest.raises(ValueError, match=r"reads 2 batch axes, but the records have 1 \(batch shape \(3,\)\)"):
        adaopt.read_records(state, index=(0, 1))
    with pytest.raises(ValueError, match=r"have 0 \(batch shape \(\)\): drop index=, the state was not built"):
        adaopt.read_records(jax.tree.map(lambda x: x[0], state), index=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_none_and_zero_leaves_give_finite_records(dtype: Any) -> None:
    params = {**_params(dtype), "frozen": None}
    grads = {**_grads(0, dtype), "frozen": None}
    grads["head"] = jnp.zeros(3, dtype)  # a zero gradient: ratios 0, not NaN
    tx = adaopt.monitor(adaopt.sgd(LR), every=1)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert state.records.values.dtype == jnp.float32
    records = adaopt.read_records(state)
    assert all(np.isfinite(v) for v in records.values())
    assert records["effective_lr/head"] == 0.0 and records["rate_rms/head"] == 0.0
    np.testing.assert_allclose(records["rate_rms/layers/0/kernel"], LR, rtol=1e-2)  # LR rounded to the dtype


def test_flax_nnx_optimizer() -> None:
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaopt.monitor(adaopt.sgd(LR), every=1), wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Linear, optimizer: nnx.Optimizer, x: jax.Array) -> None:
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer, jnp.ones((3, 4)))
    records = adaopt.read_records(optimizer.opt_state)
    np.testing.assert_allclose(records["effective_lr/kernel"], LR, rtol=1e-6)
    assert records["grad_norm"] > 0


# ---- Errors. ----


def test_errors_name_the_argument_and_the_fix() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"every must be an integer in \[1"):
        adaopt.monitor(adaopt.sgd(LR), every=0)
    with pytest.raises(adaopt.HyperparameterError, match="groups must be"):
        adaopt.monitor(adaopt.sgd(LR), groups=3)  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match="non-empty string"):
        adaopt.record_norm("")
    with pytest.raises(ValueError, match=r"adaopt.monitor\(...\)"):
        adaopt.read_records(adaopt.sgd(LR).init(_params()))
    tx = adaopt.monitor(optax.chain(adaopt.record_norm("grad_norm"), adaopt.sgd(LR)))
    with pytest.raises(ValueError, match="rename it"):
        tx.init(_params())


def test_the_recording_program_grows_with_the_leaves_like_the_step_itself() -> None:
    """On 200 small leaves the program that records is under twice the size of Adam's own (counted in operations
    of the lowered program), and the cond form, which holds the step twice, under three times: the statistics of
    small leaves are packed and those of groups vectorised. Reduced leaf by leaf, it was 4.6 times Adam's, and
    XLA's compile time grows faster than that (15 s for 300 leaves, where 1.2 s now)."""
    params = {f"l{i}": jnp.zeros((10, 10)) for i in range(200)}

    def size(tx: optax.GradientTransformation, **record: Any) -> int:
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, **record))
        return update.lower(params, tx.init(params), params).as_text().count(" = ")

    plain = size(adaopt.adam(1e-3))
    assert size(adaopt.monitor(adaopt.adam(1e-3)), record=True) < 2 * plain
    assert size(adaopt.monitor(adaopt.adam(1e-3))) < 3 * plain


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ({"g": 1}, r"got 'g': 1\."),
        ({"g": ["layers/*", 2]}, r"got 'g': \['layers/\*', 2\]\."),
        ({1: "layers/*"}, r"got 1: 'layers/\*'\."),
        (np.array(["a", "b"]), r"^groups must be 'leaves', a mapping .*got array"),
        ("leaf", r"^groups must be 'leaves'"),
    ],
)
def test_bad_groups_are_named_when_built(groups: Any, match: str) -> None:
    """A mapping's values were read at the first recording ('int' object is not iterable), an array failed with
    its ambiguous truth value."""
    with pytest.raises(adaopt.HyperparameterError, match=match):
        adaopt.monitor(adaopt.adam(1e-3), groups=groups)
    adaopt.monitor(adaopt.adam(1e-3), groups={"g": "layers/*", "h": ("a", "b"), "s": {"c", "d"}})
