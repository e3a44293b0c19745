"""adaopt.inject_hyperparams keeps each factory's options static by itself (a mask function stays a
function of the parameters, a dtype a dtype), the numbers injectable (a schedule stays a schedule);
plain optax.inject_hyperparams with a mask function is refused with the fix."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import Capability, OptimizerSpec
from adaopt._src.wrappers.hyperparams import static_args_of

WEIGHT_DECAY = 0.5


def _params() -> dict:
    """Small values: a tuning-free method's first steps (~1e-6) and their decay stay above float32's resolution."""
    return {"w": jnp.linspace(-1e-2, 1e-2, 6).reshape(3, 2), "v": jnp.array([5e-3, -2.5e-3])}


def _loss(p: dict) -> jax.Array:
    """Separable (w's decay does not change v's gradients), and a leaf's decay is not a multiple of its
    gradient (a scale-free method would take the same steps with and without it)."""
    return jnp.sum(jnp.tanh(p["w"] - 2e-2) ** 2) + jnp.sum((p["v"] - 1e-2) ** 2)


def _steps(spec: OptimizerSpec) -> int:
    """Steps that move the parameters: a Capability.DELAYED_START optimizer's first updates are zero."""
    return 9 if Capability.DELAYED_START in spec.capabilities else 3


def _run(tx: optax.GradientTransformation, steps: int) -> dict:
    params = _params()
    state = tx.init(params)
    for _ in range(steps):
        value, grads = jax.value_and_grad(_loss)(params)
        updates, state = tx.update(grads, state, params, value=value)
        params = optax.apply_updates(params, updates)
    return params


def _close(a: Any, b: Any) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6))


class RecordingMask:
    """Decays the matrices only, and records the tree structure of every argument it is called with."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, params: Any) -> Any:
        self.calls.append(jax.tree.structure(params))
        return jax.tree.map(lambda p: p.ndim > 1, params)


@pytest.mark.parametrize("spec", adaopt.REGISTRY.values(), ids=lambda s: s.name)
def test_every_registry_optimizer_has_its_options_static(spec: OptimizerSpec) -> None:
    """Read from the signature: masks, dtypes, flags and string options static, the numbers injected
    (tests/test_contract.py steps every registry optimizer under adaopt.inject_hyperparams)."""
    static = set(static_args_of(spec.factory))
    parameters = inspect.signature(spec.factory).parameters
    assert {n for n in parameters if n.endswith(("_mask", "_dtype"))} <= static
    assert {n for n, p in parameters.items() if isinstance(p.default, (bool, str))} <= static
    assert "learning_rate" not in static and not static & set(spec.hyperparameters)
    state = adaopt.inject_hyperparams(spec.factory)().init(_params())
    assert "learning_rate" in state.hyperparams
    assert not any(k.endswith(("_mask", "_dtype")) for k in state.hyperparams)


def _configurations(spec: OptimizerSpec) -> list[dict[str, Any]]:
    """The hyperparameters' midpoints, each reference's arguments there, and each flag flipped there."""
    middle = {name: r.sample(0.5) for name, r in spec.hyperparameters.items()}
    flags = [n for n, p in inspect.signature(spec.factory).parameters.items() if isinstance(p.default, bool)]
    return [
        middle,
        *(reference.adaopt_kwargs(middle) for reference in spec.references),
        *({**middle, n: not inspect.signature(spec.factory).parameters[n].default} for n in flags),
    ]


@pytest.mark.parametrize("spec", adaopt.REGISTRY.values(), ids=lambda s: s.name)
def test_what_the_factory_takes_it_takes_injected(spec: OptimizerSpec) -> None:
    """Checks that refuse a nonzero option refused the injected zero (an array): sgd(nesterov=True) and sgd_hd's
    "requires dampening=0", rmsprop(bias_correction=True)'s eps_root and initial_scale."""
    taken = 0
    for kwargs in _configurations(spec):
        try:
            spec.factory(**kwargs)
        except adaopt.HyperparameterError:
            continue  # a flag that needs another option
        adaopt.inject_hyperparams(spec.factory)(**kwargs).init(_params())
        taken += 1
    assert taken >= 1


def test_a_hyperparameter_the_dtype_rounds_out_of_range_is_named_with_the_dtype() -> None:
    """bfloat16 rounds Adam's default b2=0.999 to 1: the refusal named b2=1, which the user never gave."""
    with pytest.raises(adaopt.HyperparameterError, match=r"hyperparam_dtype=bfloat16 .* b2=0.999 to 1.0\. .*\('b2',\)"):
        adaopt.inject_hyperparams(adaopt.adam, hyperparam_dtype=jnp.bfloat16)(1e-3).init(_params())
    adaopt.inject_hyperparams(adaopt.adam, hyperparam_dtype=jnp.bfloat16, static_args="b2")(1e-3).init(_params())


def test_an_injected_nonzero_option_is_still_refused() -> None:
    adaopt.rmsprop(1e-3, bias_correction=True, centered=np.False_)  # a NumPy False is no option taken
    with pytest.raises(adaopt.HyperparameterError, match=r"requires dampening=0, got dampening=Array\(0.5"):
        adaopt.inject_hyperparams(adaopt.sgd)(momentum=0.9, dampening=0.5, nesterov=True).init(_params())
    with pytest.raises(adaopt.HyperparameterError, match=r"does not take \['eps_root'\]"):
        adaopt.inject_hyperparams(adaopt.rmsprop)(bias_correction=True, eps_root=1e-8).init(_params())


# The mask function's path through inject_hyperparams, in each kind of optimizer: per-coordinate,
# with a global step size, needing the parameters, with a delayed start, routed by optax.partition.
WEIGHT_DECAY_SPECS = [adaopt.REGISTRY[n] for n in ("adamw", "sgd", "prodigy", "schedule_free_adamw", "adopt", "muon")]


@pytest.mark.parametrize("spec", WEIGHT_DECAY_SPECS, ids=lambda s: s.name)
def test_a_mask_function_decays_only_the_masked_leaves(spec: OptimizerSpec) -> None:
    """Against the same injected optimizer decaying no leaf and every leaf (the step of injected
    and fixed hyperparameters is compared by tests/test_contract.py)."""
    injected = adaopt.inject_hyperparams(spec.factory)
    steps = _steps(spec)
    mask = RecordingMask()
    masked = _run(injected(weight_decay=WEIGHT_DECAY, weight_decay_mask=mask), steps)
    # The factory was given the function, which was called with the parameters, never the step count.
    assert mask.calls and all(s == jax.tree.structure(_params()) for s in mask.calls)
    undecayed = _run(injected(weight_decay=0.0), steps)
    all_decayed = _run(injected(weight_decay=WEIGHT_DECAY), steps)
    # Exact comparisons: the decays are small, the runs deterministic.
    assert not np.array_equal(masked["w"], undecayed["w"])  # w decays
    if Capability.GLOBAL_STEP_SIZE in spec.capabilities:  # decaying w rescales v's steps too
        assert not np.array_equal(masked["v"], all_decayed["v"]) or not np.array_equal(masked["w"], all_decayed["w"])
    else:
        np.testing.assert_array_equal(masked["v"], undecayed["v"])  # v does not
        assert not np.array_equal(masked["v"], all_decayed["v"])  # which the mask made the difference for


def test_a_schedule_stays_a_schedule() -> None:
    schedule = adaopt.linear_schedule(1e-2, 0.0, 4)
    opt = adaopt.inject_hyperparams(adaopt.adamw)(learning_rate=schedule, weight_decay_mask=RecordingMask())
    params = _params()
    state = opt.init(params)
    for t in range(2):  # the state holds the value the update at count t used
        _, state = opt.update(jax.grad(_loss)(params), state, params)
        np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(t), rtol=1e-6)
    assert float(state.hyperparams["learning_rate"]) < 1e-2


def test_a_dtype_class_stays_a_dtype() -> None:
    """``jnp.bfloat16`` is callable: optax alone would call it as a schedule."""
    opt = adaopt.inject_hyperparams(adaopt.adam)(mu_dtype=jnp.bfloat16)
    state = opt.init(_params())
    (mu,) = [node for _, node in optax.tree.get_all_with_path(state, "mu")]
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(mu))


def test_optax_factories_too() -> None:
    mask = RecordingMask()
    injected = _run(adaopt.inject_hyperparams(optax.adamw)(1e-2, weight_decay=WEIGHT_DECAY, mask=mask), 3)
    fixed = _run(optax.adamw(1e-2, weight_decay=WEIGHT_DECAY, mask=mask), 3)
    assert all(_close(a, b) for a, b in zip(jax.tree.leaves(injected), jax.tree.leaves(fixed), strict=True))


def test_plain_optax_inject_hyperparams_with_a_mask_function_is_refused() -> None:
    tx = optax.inject_hyperparams(adaopt.adamw)(weight_decay=WEIGHT_DECAY, weight_decay_mask=RecordingMask())
    with pytest.raises(adaopt.HyperparameterError) as info:
        tx.init(_params())
    message = str(info.value)
    assert "weight_decay_mask" in message and "adaopt.inject_hyperparams" in message
    assert "static_args=('weight_decay_mask',)" in message
    # With the argument named static, optax's own works.
    optax.inject_hyperparams(adaopt.adamw, static_args=("weight_decay_mask",))(weight_decay_mask=RecordingMask()).init(
        _params()
    )


def test_unknown_static_args_are_refused() -> None:
    with pytest.raises(ValueError, match=r"static_args names \['mask'\], which are not arguments of adamw"):
        adaopt.inject_hyperparams(adaopt.adamw, static_args=("mask",))


def test_half_precision_parameters_get_float32_hyperparameters() -> None:
    """A bfloat16 model's hyperparameters in bfloat16 would round b2 = 0.999 to 1 (optax's default dtype): at least
    float32, so the injected step is the plain one; float64 parameters keep float64 ones."""
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: (p * 0.3 + 0.1).astype(p.dtype), params)
    injected = adaopt.inject_hyperparams(adaopt.adamw)(learning_rate=1e-2, b2=0.999, weight_decay=0.1)
    state = injected.init(params)
    assert state.hyperparams["b2"].dtype == jnp.float32 and float(state.hyperparams["b2"]) == np.float32(0.999)
    plain = adaopt.adamw(1e-2, b2=0.999, weight_decay=0.1)
    p_inj, p_plain, s_inj, s_plain = params, params, state, plain.init(params)
    for _ in range(3):
        u_inj, s_inj = injected.update(grads, s_inj, p_inj)
        u_plain, s_plain = plain.update(grads, s_plain, p_plain)
        p_inj, p_plain = optax.apply_updates(p_inj, u_inj), optax.apply_updates(p_plain, u_plain)
    for k in params:
        assert p_inj[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(p_inj[k], np.float32), np.asarray(p_plain[k], np.float32))
    with jax.enable_x64(True):
        wide = injected.init(jax.tree.map(lambda p: p.astype(jnp.float64), params))
        assert wide.hyperparams["b2"].dtype == jnp.float64
    # A bfloat16 number given as a hyperparameter is a number like any other.
    adaopt.adam(jnp.asarray(1e-2, jnp.bfloat16), b1=jnp.asarray(0.5, jnp.bfloat16))


def test_optaxs_factories_keep_optaxs_dtype() -> None:
    """optax's optimizers hold half-precision states for half-precision parameters: float32 hyperparameters would
    promote them (a scan's carry would change type), so theirs stay in the parameters' dtype, as in optax."""
    params = jnp.ones(4, jnp.bfloat16)
    tx = adaopt.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    state = tx.init(params)
    updates, new_state = tx.update(params, state, params)
    assert updates.dtype == jnp.bfloat16 and state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    assert [x.dtype for x in jax.tree.leaves(new_state)] == [x.dtype for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("factory", [adaopt.sgd, optax.sgd])
def test_hyperparameters_given_as_integers_are_injected_as_floats(factory: Any) -> None:
    """learning_rate=1, momentum=0 were injected as integer arrays: setting 0.5 later changed their dtype (a step
    compiled again; a lax.scan's carry refused). Floats of the hyperparameters' dtype; the options stay as given."""
    params = {"w": jnp.ones(3)}
    opt = adaopt.inject_hyperparams(factory)(learning_rate=1, momentum=0)
    state = opt.init(params)
    assert {"learning_rate", "momentum"} <= set(state.hyperparams)
    assert all(v.dtype == jnp.float32 for v in state.hyperparams.values()), state.hyperparams

    def body(state: Any, lr: jax.Array) -> tuple[Any, jax.Array]:
        state.hyperparams["learning_rate"] = lr
        updates, state = opt.update(params, state, params)
        return state, updates["w"][0]

    _, steps = jax.lax.scan(body, state, jnp.asarray([0.5, 0.25]))
    np.testing.assert_allclose(np.asarray(steps), [-0.5, -0.25])


def test_an_integer_hyperparameter_dtype_is_refused() -> None:
    with pytest.raises(adaopt.HyperparameterError, match="hyperparam_dtype must be a float dtype"):
        adaopt.inject_hyperparams(adaopt.adamw, hyperparam_dtype=jnp.int32)


@pytest.mark.parametrize("factory", [adaopt.prodigy, optax.contrib.prodigy], ids=["adaopt", "optax"])
def test_an_injected_state_can_be_donated(factory: Any) -> None:
    """Prodigy's injected d0 is also its estimate's first value: the state held that array twice, and a step
    donating the state failed ("Attempt to donate the same buffer twice"), optax's own inject_hyperparams too."""
    tx = adaopt.inject_hyperparams(factory)(learning_rate=1.0)
    params = {"w": jnp.ones((3, 2)), "s": jnp.asarray(2.0)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(jax.tree.map(jnp.sin, params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, tx.init(params))
    params, state = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_bfloat16_and_float16_leaves_in_one_tree() -> None:
    """optax.tree.dtype(tree, "highest") cannot order bfloat16 and float16; their promotion (float32) is the
    hyperparameters' dtype."""
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3, jnp.float16)}
    tx = adaopt.inject_hyperparams(adaopt.adamw)(learning_rate=1e-2)
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    updates, _ = tx.update(params, state, params)
    assert {k: u.dtype for k, u in updates.items()} == {"a": jnp.bfloat16, "b": jnp.float16}


def test_plain_optax_inject_hyperparams_of_an_integer_option_says_what_to_do() -> None:
    """optax injects Muon's ns_steps as an array: refused, naming the wrapper that keeps it static."""
    with pytest.raises(adaopt.HyperparameterError, match=r"ns_steps.*adaopt.inject_hyperparams\(factory\)"):
        optax.inject_hyperparams(adaopt.muon)(learning_rate=0.02).init({"w": jnp.ones((4, 4))})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factory": None}, r"^factory must be a function returning a gradient transformation .*got None"),
        ({"factory": adaopt.adam(1e-3)}, r"^factory must be .*pass the factory, adaopt.adam, not adaopt.adam\(1e-3\)"),
        ({"static_args": None}, r"^static_args must be an argument's name or an iterable of names .*got None"),
        ({"static_args": 5}, r"^static_args must be .*got 5"),
        ({"static_args": ["b1", 2]}, r"^static_args must be .*got \['b1', 2\]"),
        ({"hyperparam_dtype": "abc"}, r"^hyperparam_dtype must be a float dtype .*got 'abc'"),
        ({"hyperparam_dtype": 2.5}, r"^hyperparam_dtype must be a float dtype .*got 2.5"),
        ({"hyperparam_dtype": "int32"}, r"^hyperparam_dtype must be a float dtype .*got 'int32'"),
        ({"hyperparam_dtype": jnp.asarray(0.5)}, r"^hyperparam_dtype must be a float dtype .*pass its .dtype"),
    ],
)
def test_bad_arguments_are_named_when_injected(kwargs: dict[str, Any], match: str) -> None:
    """Each failed with Python's own error (None is not callable, 'int' object is not iterable, data type 'abc' not
    understood), or, for an array as the dtype, at the first step."""
    kwargs = {"factory": adaopt.adam, **kwargs}
    with pytest.raises(adaopt.HyperparameterError, match=match):
        adaopt.inject_hyperparams(**kwargs)


def test_hyperparam_dtype_takes_a_dtype_in_any_spelling() -> None:
    for dtype in ("float32", np.float32, jnp.float32, np.dtype("float32")):
        adaopt.inject_hyperparams(adaopt.adam, hyperparam_dtype=dtype)(learning_rate=1e-3)
    adaopt.inject_hyperparams(adaopt.adam, static_args=("b1",))(learning_rate=1e-3)
    adaopt.inject_hyperparams(adaopt.adam, static_args="b1")(learning_rate=1e-3)
