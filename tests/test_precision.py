"""bfloat16 parameters: stochastic rounding of the step and float32 master weights, against plain rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from tests import problems


def _bf16(tree: dict) -> dict:
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def test_small_steps_stall_in_bfloat16_and_are_kept_by_both_remedies() -> None:
    """Logistic regression from 1 (bfloat16 steps of 2**-7 there) with Adam at 1e-3: rounded to nearest, every
    step under half a bfloat16 step is lost and the loss stops far above float32's; stochastically rounded or
    through a float32 master copy, it ends where float32 ends."""
    loss, start, best = problems.binary_logistic_regression()
    start = jax.tree.map(lambda x: jnp.ones_like(x), start)
    steps = 1500
    gap = {}
    for name, params, tx in (
        ("float32", start, adaopt.adam(1e-3)),
        ("bfloat16", _bf16(start), adaopt.adam(1e-3)),
        ("stochastic", _bf16(start), adaopt.stochastic_rounding(adaopt.adam(1e-3))),
        ("master", _bf16(start), adaopt.master_weights(adaopt.adam(1e-3))),
    ):
        final = problems.train(tx, loss, params, steps)
        assert all(x.dtype == params[k].dtype for k, x in final.items())
        gap[name] = float(loss(final)) - best
    assert gap["bfloat16"] > 5 * gap["float32"], gap
    assert gap["master"] < 1.2 * gap["float32"] + 1e-3, gap
    assert gap["stochastic"] < 1.5 * gap["float32"] + 2e-3, gap


def test_master_weights_train_the_float32_trajectory_exactly() -> None:
    """The master copy follows float32 training bit for bit; the parameters are it, rounded to nearest."""
    rng = np.random.default_rng(0)
    start = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "s": jnp.asarray(0.5, jnp.float32)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), start) for _ in range(20)]
    inner = adaopt.adamw(1e-2, weight_decay=0.1)
    tx = adaopt.master_weights(inner)
    p16 = _bf16(start)
    state = tx.init(p16)
    start_master = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    # The master starts from the bfloat16 parameters: run float32 from the same point.
    p32, s32 = start_master, inner.init(start_master)
    for g in grads:
        g = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), g)  # the gradients bfloat16 gives
        u32, s32 = inner.update(g, s32, p32)
        p32 = optax.apply_updates(p32, u32)
        u16, state = tx.update(_bf16(g), state, p16)
        p16 = optax.apply_updates(p16, u16)
    for k in p32:
        np.testing.assert_array_equal(np.asarray(state.master[k]), np.asarray(p32[k]))
        np.testing.assert_array_equal(np.asarray(p16[k]), np.asarray(p32[k].astype(jnp.bfloat16)))


def test_lookahead_goes_inside_the_master_copy() -> None:
    """master_weights(lookahead(...)) keeps both the fast and the slow weights in float32: their float32 trajectory
    bit for bit. lookahead(master_weights(...)) let the next step undo each synchronisation (the fast weights went
    back to the master copy, not to the slow weights): refused."""
    start = jnp.asarray(np.random.default_rng(1).normal(size=(6,)), jnp.bfloat16)
    inner = adaopt.lookahead(adaopt.sgd(0.25, momentum=0.5), sync_period=3, slow_step_size=0.5)
    p32 = optax.LookaheadParams.init_synced(start.astype(jnp.float32))
    p16 = optax.LookaheadParams.init_synced(start)
    tx = adaopt.master_weights(inner)
    s32, s16 = inner.init(p32), tx.init(p16)
    for _ in range(10):
        g = (p32.fast - 3.0).astype(jnp.bfloat16)  # a quadratic's gradient, at the float32 fast weights
        u32, s32 = inner.update(g.astype(jnp.float32), s32, p32)
        p32 = optax.apply_updates(p32, u32)
        u16, s16 = tx.update(g, s16, p16)
        p16 = optax.apply_updates(p16, u16)
    for ours, theirs in zip(jax.tree.leaves(s16.master), jax.tree.leaves(p32), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_array_equal(np.asarray(p16.slow), np.asarray(p32.slow.astype(jnp.bfloat16)))
    wrong = adaopt.lookahead(adaopt.master_weights(adaopt.sgd(0.25)), sync_period=3, slow_step_size=0.5)
    with pytest.raises(adaopt.HyperparameterError, match=r"master_weights\(lookahead\(\.\.\.\)\)"):
        wrong.init(p16)


def test_float32_leaves_pass_through() -> None:
    params = {"w": jnp.ones(3), "h": jnp.ones(3, jnp.bfloat16)}
    g = jax.tree.map(jnp.ones_like, params)
    for tx in (adaopt.stochastic_rounding(optax.sgd(0.1)), adaopt.master_weights(optax.sgd(0.1))):
        updates, state = tx.update(g, tx.init(params), params)
        np.testing.assert_array_equal(np.asarray(updates["w"]), -0.1 * np.ones(3, np.float32))
        assert updates["h"].dtype == jnp.bfloat16  # the parameter's dtype, as every optimizer's update
    assert isinstance(state.master["w"], optax.MaskedNode) and state.master["h"].dtype == jnp.float32


@pytest.mark.parametrize("wrapper", [adaopt.master_weights, adaopt.stochastic_rounding])
def test_a_weight_crossing_zero_lands_on_its_target_with_float32_updates(wrapper) -> None:
    """A step from 2**-10 to -2**-18 (both bfloat16 numbers): their difference has no bfloat16, so an update in the
    parameter's dtype lands at -2**-17 (the default, documented); float32_updates lands on the target."""
    params = jnp.full(64, 2.0**-10, jnp.bfloat16) * jnp.asarray(np.arange(1, 65) % 2 * 2 - 1, jnp.bfloat16)
    target = -(2.0**-18) * np.sign(np.asarray(params, np.float32))
    grads = params.astype(jnp.float32) - jnp.asarray(target)  # sgd(1): p - g = target (float32 gradients, exact)
    assert np.array_equal(np.asarray(params, np.float32) - np.asarray(grads), target)
    for float32_updates in (False, True):
        tx = wrapper(optax.sgd(1.0), float32_updates=float32_updates)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert updates.dtype == (jnp.float32 if float32_updates else jnp.bfloat16)
        landed = optax.apply_updates(params, updates)
        assert landed.dtype == jnp.bfloat16
        if float32_updates:
            np.testing.assert_array_equal(np.asarray(landed, np.float32), target)
        else:  # one rounding of the difference away (0 or twice the target)
            assert not (np.asarray(landed, np.float32) == target).any()


def test_half_precision_updates_fit_optaxs_conditional_wrappers() -> None:
    """apply_if_finite's branches must agree in type: the default updates are in the parameters' dtype."""
    params = jnp.ones(8, jnp.bfloat16)
    for wrapper in (adaopt.master_weights, adaopt.stochastic_rounding):
        tx = optax.apply_if_finite(wrapper(optax.sgd(0.1)), 3)
        updates, _ = jax.jit(tx.update)(jnp.ones(8, jnp.bfloat16), tx.init(params), params)
        assert updates.dtype == jnp.bfloat16


def test_stochastic_steps_are_unbiased_and_resume_from_a_checkpoint() -> None:
    """4096 bfloat16 ones stepping by -1e-4 (an eightieth of their spacing) 200 times: the mean lands on
    0.98 within its standard error; and the draws come from the state's key, so a state replays the same steps."""
    params = jnp.ones(4096, jnp.bfloat16)
    tx = adaopt.stochastic_rounding(optax.sgd(1e-4))
    step = jax.jit(lambda p, s: tx.update(jnp.ones_like(p), s, p))
    state = tx.init(params)
    for _ in range(200):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    values = np.asarray(params.astype(jnp.float32), np.float64)
    assert abs(values.mean() - 0.98) < 4 * values.std() / np.sqrt(values.size) + 1e-6
    replay_a, replay_b = step(params, state)[0], step(params, jax.tree.map(jnp.copy, state))[0]
    np.testing.assert_array_equal(np.asarray(replay_a), np.asarray(replay_b))


@pytest.mark.parametrize("float32_updates", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_an_infinite_weight_stays_where_apply_updates_keeps_it(dtype, float32_updates: bool) -> None:
    """A parameter at +-inf took the update inf - inf = NaN from both wrappers, where optax.apply_updates keeps it
    (p + finite u)."""
    params = jnp.asarray([np.inf, -np.inf, 1.0, 0.0], dtype)
    plain = optax.apply_updates(params, jnp.full_like(params, -1e-3))
    for tx in (
        adaopt.stochastic_rounding(optax.sgd(1e-3), float32_updates=float32_updates),
        adaopt.master_weights(optax.sgd(1e-3), float32_updates=float32_updates),
    ):
        updates, _ = jax.jit(tx.update)(jnp.ones_like(params), tx.init(params), params)
        landed = np.asarray(optax.apply_updates(params, updates), np.float32)
        np.testing.assert_array_equal(landed[:2], np.asarray(plain, np.float32)[:2])
        assert np.isfinite(landed[2:]).all()


def test_a_numpy_seed_draws_as_its_python_value() -> None:
    """seed=np.int32(5) passed the check and then overflowed (NumPy 2's scalar arithmetic) in the first update."""
    params = jnp.ones(256, jnp.bfloat16)
    steps = []
    for seed in (5, np.int32(5), np.uint32(5)):
        tx = adaopt.stochastic_rounding(optax.sgd(1e-3), seed=seed)
        steps.append(np.asarray(tx.update(jnp.ones_like(params), tx.init(params), params)[0], np.float32))
    np.testing.assert_array_equal(steps[1], steps[0])
    np.testing.assert_array_equal(steps[2], steps[0])


def test_need_the_parameters() -> None:
    for tx in (adaopt.stochastic_rounding(optax.sgd(0.1)), adaopt.master_weights(optax.sgd(0.1))):
        with pytest.raises(ValueError, match="needs the parameters"):
            tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    with pytest.raises(adaopt.HyperparameterError, match="seed"):
        adaopt.stochastic_rounding(optax.sgd(0.1), seed=-1)


def test_stochastic_rounding_lands_alike_on_a_mesh_and_on_one_device() -> None:
    """The inner step's bfloat16 update is rounded to bfloat16 in every program: XLA computes it in float32 and may
    keep that excess precision in one program and not another (here: replicated on a mesh against one device)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (16, 24), "v": (40,)}
    host = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def run(put):
        tx = adaopt.stochastic_rounding(adaopt.adam(1e-3))

        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = {k: put(v) for k, v in host.items()}
        s = tx.init(p)
        for g in grads:
            p, s = step(p, s, {k: put(v) for k, v in g.items()})
        return {k: np.asarray(v.astype(jnp.float32)) for k, v in p.items()}

    alone = run(lambda v: jnp.asarray(v, jnp.bfloat16))
    with jax.set_mesh(mesh):
        placed = run(lambda v: jax.device_put(jnp.asarray(v, jnp.bfloat16), NamedSharding(mesh, P())))
    for k in shapes:
        np.testing.assert_array_equal(placed[k], alone[k])
