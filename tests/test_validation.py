"""Bad hyperparameters fail loudly when the optimizer is built, naming the argument, value and range."""

from __future__ import annotations

import fractions
import inspect
import math
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import adaopt
from adaopt import REGISTRY, Capability, OptimizerSpec
from adaopt._src import base
from benchmarks import learning_rates

# Hyperparameters that are decay rates of a moving average: valid in [0, 1).
DECAYS = {"b1", "b2", "decay", "rho", "momentum"}


def _arguments(spec: OptimizerSpec) -> list[str]:
    names = ["learning_rate", *spec.hyperparameters]
    return [*names, "weight_decay"] if Capability.WEIGHT_DECAY in spec.capabilities else names


CASES = [
    (spec, name, bad)
    for spec in REGISTRY.values()
    for name in _arguments(spec)
    for bad in [-1.0, math.nan, math.inf, "0.1", True, [0.1], *([1.0, 1.5] if name in DECAYS else [])]
]


@pytest.mark.parametrize(("spec", "name", "bad"), CASES, ids=[f"{s.name}-{n}-{b!r}" for s, n, b in CASES])
def test_invalid_hyperparameter_is_rejected_at_construction(spec: OptimizerSpec, name: str, bad: Any) -> None:
    with pytest.raises(ValueError) as info:
        spec.make(**{name: bad})
    message = str(info.value)
    assert name in message, message
    assert repr(bad) in message, message
    assert "must be" in message and ("[" in message or "(" in message), message


def test_wrong_type_is_also_a_type_error() -> None:
    with pytest.raises(TypeError, match="learning_rate"):
        adaopt.adam(learning_rate="fast")  # type: ignore[arg-type]
    # A Fraction is a number to Python, not to JAX: refused by name, not in the step.
    with pytest.raises(adaopt.HyperparameterError, match=r"b1 must be a real number .* of type Fraction"):
        adaopt.adam(b1=fractions.Fraction(9, 10))  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
@given(value=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_learning_rate_valid_exactly_when_nonnegative_and_finite_in_float32(spec: OptimizerSpec, value: float) -> None:
    if 0 <= value < 2.0**128 - 2.0**103:  # the float64 numbers that float32 rounds to a finite number
        spec.make(learning_rate=value)
    else:
        with pytest.raises(adaopt.HyperparameterError, match="learning_rate"):
            spec.make(learning_rate=value)


@given(b1=st.floats(-2, 2), b2=st.floats(-2, 2), eps=st.floats(-1, 1))
def test_adam_betas_and_eps(b1: float, b2: float, eps: float) -> None:
    valid = 0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0
    if valid:
        adaopt.adam(1e-3, b1, b2, eps)
    else:
        with pytest.raises(adaopt.HyperparameterError):
            adaopt.adam(1e-3, b1, b2, eps)


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
@given(data=st.data())
def test_drawn_valid_hyperparameters_build(spec: OptimizerSpec, data: st.DataObject) -> None:
    values = {name: r.sample(data.draw(st.floats(0, 1, exclude_max=True))) for name, r in spec.hyperparameters.items()}
    spec.make(**values)


def test_schedules_and_arrays_are_accepted() -> None:
    adaopt.adam(adaopt.linear_schedule(1e-3, 0.0, 100))
    adaopt.adam(jnp.asarray(1e-3), b1=jnp.asarray(0.9))


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_an_integer_parameter_is_refused_at_init_naming_it(spec: OptimizerSpec) -> None:
    """An integer leaf would take no step, or a truncated one: every optimizer refuses it at init, naming the leaf
    (plain SGD too, which keeps no state: its float updates were truncated by optax.apply_updates)."""
    params = {"w": jnp.ones((4, 3)), "n": jnp.zeros((4, 3), jnp.int32)}
    tx = learning_rates.make(spec)
    with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
        tx.init(params)


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_an_integer_gradient_is_refused_at_update_naming_it(spec: OptimizerSpec) -> None:
    """An integer gradient of a float parameter: some optimizers computed in its dtype and returned integer updates,
    truncated to 0 (Adagrad, Rprop, Schedule-Free, the hypergradient methods); every one now refuses it, naming it."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = {"w": jnp.ones((4, 3)), "b": jnp.asarray([1, 2, 3], jnp.int32)}
    tx = learning_rates.make(spec)
    with pytest.raises(TypeError, match=r"gradient at \['b'\] has dtype int32"):
        tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))


EPS_NAMES = ("eps", "adam_eps", "trust_eps", "ns_eps", "eps1", "eps2", "diagonal_eps", "matrix_eps", "eps_scale")


EPS_ARGUMENTS = [(s, n) for s in REGISTRY.values() for n in inspect.signature(s.factory).parameters if n in EPS_NAMES]


@pytest.mark.parametrize("spec, name", EPS_ARGUMENTS, ids=[f"{s.name}-{n}" for s, n in EPS_ARGUMENTS])
def test_an_eps_that_float32_flushes_to_zero_never_makes_a_nan(spec: OptimizerSpec, name: str) -> None:
    """1e-40 is positive, so a range check passes it, but in float32 it is subnormal, which XLA:CPU flushes to 0 (and
    1e-300 rounds to 0): a zero gradient then divided 0 by 0, and a tiny one (its square under float32's range)
    stepped -inf. Each such eps steps as eps = 0 does, with 0 where the denominator is 0."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    tx = spec.factory(learning_rate=learning_rates.TUNED[spec.name], **{name: 1e-40})
    state = tx.init(params)
    for g in (0.0, 1e-25, 1e-25, 0.0):
        updates, state = tx.update(jax.tree.map(lambda x: jnp.full_like(x, g), params), state, params, value=1.0)
        assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), f"gradient {g}: {updates}"


_LEARNING_RATES = [spec for spec in REGISTRY.values() if "learning_rate" in inspect.signature(spec.factory).parameters]


@pytest.mark.parametrize("spec", _LEARNING_RATES, ids=[spec.name for spec in _LEARNING_RATES])
def test_a_learning_rate_beyond_float32s_range_is_refused(spec: OptimizerSpec) -> None:
    """1e39 is a finite float, so a range check passed it, and every float32 step then took it as inf: the parameters
    went to inf or NaN at the first update. The largest float64 that float32 rounds to its largest number is accepted,
    the next one (which it rounds to inf) refused."""
    with pytest.raises(adaopt.HyperparameterError, match="learning_rate=1e\\+39 is beyond float32's range"):
        spec.factory(learning_rate=1e39)
    overflow = 2.0**128 - 2.0**103
    with np.errstate(over="ignore"):  # the cast to float32 says it overflows
        assert np.isinf(np.float32(overflow)) and np.isfinite(np.float32(np.nextafter(overflow, 0)))
    spec.factory(learning_rate=np.nextafter(overflow, 0))
    with pytest.raises(adaopt.HyperparameterError, match="beyond float32's range"):
        spec.factory(learning_rate=overflow)


@pytest.mark.parametrize("value", [jnp.int32, np.float32(0.5), jnp.asarray([1.0, 2.0]), 0.5])
def test_moment_dtype_must_be_floating(value: Any) -> None:
    """An integer dtype, or a value (whose dtype jnp.dtype reads: np.float32(0.5) was taken for float32)."""
    with pytest.raises(ValueError, match="mu_dtype must be a floating dtype"):
        adaopt.adam(mu_dtype=value)


_NARROW = (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float4_e2m1fn)
# Every dtype argument of every registry optimizer, each with one of the narrow floats in turn.
_DTYPE_ARGUMENTS = [
    (spec, name)
    for spec in REGISTRY.values()
    for name in inspect.signature(spec.factory).parameters
    if name.endswith("_dtype")
]
_NARROW_CASES = [(spec, name, _NARROW[i % len(_NARROW)]) for i, (spec, name) in enumerate(_DTYPE_ARGUMENTS)]


@pytest.mark.parametrize(
    ("spec", "name", "dtype"), _NARROW_CASES, ids=[f"{s.name}-{n}-{jnp.dtype(d).name}" for s, n, d in _NARROW_CASES]
)
def test_an_eight_bit_float_cannot_hold_a_moment(spec: OptimizerSpec, name: str, dtype: Any) -> None:
    """float8 moments turn Adam into NaN or noise within tens of steps: refused at construction, with what to use."""
    with pytest.raises(adaopt.HyperparameterError, match=rf"{name} cannot be {jnp.dtype(dtype).name}.*bfloat16"):
        learning_rates.make(spec, **{name: dtype})


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (adaopt.sgd, {"momentum": 0.0, "nesterov": True}, "nesterov"),
        (adaopt.sgd, {"nesterov": True}, "nesterov"),
        (adaopt.rmsprop, {"nesterov": True}, "nesterov"),
        (adaopt.sgd_hd, {"momentum": 0.0, "nesterov": True}, "nesterov"),
        (adaopt.sgd, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "dampening"),
        (adaopt.amsgrad, {"max_of": "largest"}, "max_of"),
        (adaopt.lamb, {"debias": "never"}, "debias"),
        (adaopt.radam, {"threshold": 3.0}, "threshold"),
        (adaopt.lamb, {"max_param_norm": 0.0}, "max_param_norm"),
        (adaopt.lamb, {"trust_eps": -1.0}, "trust_eps"),
        (adaopt.sgd, {"dampening": 1.5}, "dampening"),
        (adaopt.rmsprop, {"bias_correction": True, "centered": True}, "centered"),
        (adaopt.rmsprop, {"bias_correction": True, "eps_root": 1e-8}, "eps_root"),
        (adaopt.adamw, {"eps_mode": "floor"}, "eps_mode"),
        (adaopt.nadamw, {"eps_mode": "floor"}, "eps_mode"),
        (adaopt.ademamix, {"eps_mode": "floor"}, "eps_mode"),
        (adaopt.laprop, {"eps_mode": "floor"}, "eps_mode"),
        (adaopt.laprop, {"weight_decay_mode": "before"}, "weight_decay_mode"),
        (adaopt.laprop, {"weight_decay_mode": "decoupled", "decoupled_weight_decay": False}, "decoupled_weight_decay"),
        (adaopt.adopt, {"decay_at_first_call": False}, "decoupled_weight_decay=True"),
        (adaopt.rmsprop, {"eps_mode": "floor"}, "eps_mode"),
        (adaopt.schedule_free_adamw, {"eps_mode": "floor"}, "eps_mode"),
    ],
)
def test_inconsistent_options(factory: Any, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if Capability.TUNING_FREE in s.capabilities], ids=lambda s: s.name
)
def test_tuning_free_methods_are_measured_at_the_factory_defaults(spec: OptimizerSpec) -> None:
    """What the benchmarks and tests run for a tuning-free method is what a user gets by calling it with no arguments."""
    default = inspect.signature(spec.factory).parameters["learning_rate"].default
    tuned = learning_rates.TUNED[spec.name]
    assert tuned == default, f"{spec.name}: measured at {tuned}, factory default {default}"


def test_every_registry_optimizer_has_a_tuned_learning_rate() -> None:
    assert sorted(learning_rates.TUNED) == sorted(REGISTRY)


def test_an_infinite_bound_is_printed_open() -> None:
    """The range in the message is the one enforced: no finite value equals inf, so inf is excluded."""
    with pytest.raises(
        adaopt.HyperparameterError, match=r"^learning_rate must be a finite number in \[0\.0, inf\), got inf\.$"
    ):
        adaopt.adam(learning_rate=math.inf)
    with pytest.raises(adaopt.HyperparameterError, match=r"^b1 must be a finite number in \[0\.0, 1\.0\), got 1\.0\.$"):
        adaopt.adam(b1=1.0)


def test_a_tree_mismatch_names_what_it_was_compared_with() -> None:
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    tx = adaopt.adam(1e-3)
    state = tx.init(params)
    wrong = {"a": jnp.ones(2)}
    with pytest.raises(
        adaopt.TreeMismatchError, match=r"(?s)structure of the optimizer's parameters.*given as `params`"
    ):
        tx.update(wrong, state, params)
    with pytest.raises(adaopt.TreeMismatchError, match=r"(?s)structure of the optimizer's state.*built by `init`"):
        tx.update(wrong, state)
    wrong_shape = {"a": jnp.ones(2), "b": jnp.ones(4)}
    with pytest.raises(
        adaopt.TreeMismatchError, match=r"\['b'\] have shape \(4,\), but the optimizer's state there has shape \(3,\)"
    ):
        tx.update(wrong_shape, state)


def test_prodigy_with_sliced_statistics_still_checks_the_shapes() -> None:
    """p0 and s hold every slice_p-th coordinate: the check of shapes falls to the whole-leaf trees."""
    params = {"a": jnp.ones((4, 4))}
    tx = adaopt.prodigy(slice_p=3)
    state = tx.init(params)
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)  # the slices themselves are not a mismatch
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['a'\] have shape \(4, 3\)"):
        tx.update({"a": jnp.ones((4, 3))}, state, params)


@pytest.mark.parametrize(
    ("factory", "mask", "match"),
    [
        (adaopt.adamw, {"w": True}, r"per-leaf option weight_decay_mask:"),  # a leaf missing
        (adaopt.adamw, lambda p: {"w": True, "b": True, "s": None}, r"per-leaf option weight_decay_mask:"),
        (adaopt.adamw, {"w": jnp.array([True, False]), "b": True, "s": True}, r"weight_decay_mask\['w'\] must be a"),
        (adaopt.lion, {"w": "yes", "b": "no", "s": True}, r"weight_decay_mask\['b'\] must be a boolean"),
        (adaopt.adan, "w", r"weight_decay_mask must be None, a tree of booleans.*got 'w'"),
        (adaopt.adamw, {"w": True, "b": {"x": True}, "s": True}, r"per-leaf option weight_decay_mask:"),
        (adaopt.adafactor, {"w": 1.0, "b": True, "s": True}, r"weight_decay_mask\['w'\] must be a boolean"),
    ],
)
def test_a_weight_decay_mask_unlike_the_parameters_is_named(factory: Any, mask: Any, match: str) -> None:
    """The mask's structure and its boolean leaves are checked at init (optax's own error named neither)."""
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "s": jnp.ones(())}
    with pytest.raises((adaopt.HyperparameterError, adaopt.TreeMismatchError), match=match):
        factory(1e-2, weight_decay=0.1, weight_decay_mask=mask).init(params)


def test_a_weight_decay_mask_may_be_a_prefix_of_the_parameters() -> None:
    """As optax.masked takes it: one value for a subtree, and 0 or 1 for False or True."""
    params = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "dec": {"w": jnp.ones((3, 2))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    full = {"enc": {"w": True, "b": True}, "dec": {"w": False}}
    whole = adaopt.adamw(1e-2, weight_decay=0.1, weight_decay_mask=full)
    want, _ = whole.update(grads, whole.init(params), params)
    for mask in ({"enc": True, "dec": False}, lambda p: {"enc": True, "dec": False}, {"enc": 1, "dec": 0}):
        tx = adaopt.adamw(1e-2, weight_decay=0.1, weight_decay_mask=mask)
        got, _ = tx.update(grads, tx.init(params), params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("weight_decay", [0.1, jnp.asarray(0.1)], ids=["number", "array"])
@pytest.mark.parametrize("factory", [adaopt.adamw, adaopt.adam, adaopt.sgd])
def test_weight_decay_without_the_parameters_says_so_in_adaopts_words(factory: Any, weight_decay: Any) -> None:
    """Decoupled or coupled, a number (optax's block) or an array: the one text of every adaopt optimizer that needs
    the parameters, not optax's own (which the number's block gave)."""
    tx = factory(1e-2, weight_decay=weight_decay)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"^weight decay \(weight_decay > 0\) needs the parameters: call update"):
        tx.update(params, tx.init(params))


def test_a_state_that_is_not_the_optimizers_is_named() -> None:
    """No state (init's result not kept), the arguments swapped, another optimizer's state: optax's chain said "no
    len()", "has to be the same in chain", "'MomentumState' object has no attribute 'mu'"."""
    params = {"w": jnp.ones(3)}
    tx = adaopt.adam(1e-2)
    cases = [
        (None, "None as its state"),
        (params, "a dict as its state"),
        (adaopt.sgd(0.1, momentum=0.9).init(params), "a state holding MomentumState where this optimizer keeps"),
        (adaopt.inject_hyperparams(adaopt.adam)(1e-2).init(params), "a Inject[A-Za-z]*HyperparamsState as its state"),
    ]
    for state, got in cases:
        with pytest.raises(TypeError, match=rf"^update got {got}.*Pass the state its init made"):
            tx.update(params, state, params)
    with pytest.raises(adaopt.TreeMismatchError):  # wrong gradients keep their own error
        tx.update({"v": jnp.ones(3)}, tx.init(params), params)


FLAGS = [
    (spec, name)
    for spec in REGISTRY.values()
    for name, p in inspect.signature(spec.factory).parameters.items()
    if str(p.annotation) in ("bool", "bool | None")
]


@pytest.mark.parametrize(("spec", "name"), FLAGS, ids=[f"{s.name}-{n}" for s, n in FLAGS])
def test_a_flag_is_a_boolean(spec: OptimizerSpec, name: str) -> None:
    """The string "False" is true, 2 and an array fail deep in the step: each is refused naming the flag."""
    for bad in ("False", 2, np.array([True, False])):
        with pytest.raises(adaopt.HyperparameterError, match=rf"^{name} must be True,? (or False|False or None), got"):
            spec.factory(**{name: bad})


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (adaopt.adafactor, "decay_offset"),
        (adaopt.schedule_free_sgd, "warmup_steps"),
        (adaopt.ademamix, "warmup_steps"),
        (adaopt.ademamix, "alpha_warmup_steps"),
        (adaopt.ademamix, "b3_warmup_steps"),
        (adaopt.precond_update_prob_schedule, "flat_start"),
    ],
)
def test_a_count_beyond_the_step_counter_is_refused(factory: Any, name: str) -> None:
    """Compared with the int32 step count: beyond it, the step failed with JAX's overflow error."""
    with pytest.raises(adaopt.HyperparameterError, match=rf"^{name} must be a finite number in .*, 2147483647\]"):
        factory(**{name: 2**40})


WRAPPERS = {
    "master_weights": lambda inner: adaopt.master_weights(inner),
    "stochastic_rounding": lambda inner: adaopt.stochastic_rounding(inner),
    "monitor": lambda inner: adaopt.monitor(inner),
    "lookahead": lambda inner: adaopt.lookahead(inner, sync_period=5, slow_step_size=0.5),
    "multi_tensor": lambda inner: adaopt.multi_tensor(inner),
    "single_pass": lambda inner: adaopt.single_pass(inner),
    "mechanic": lambda inner: adaopt.mechanic(inner),
    "hypergradient": lambda inner: adaopt.hypergradient(inner, learning_rate=1e-3, hyper_lr=1e-4),
    "shard_states": lambda inner: adaopt.shard_states(inner),
    "polynomial_decay_averaging": lambda inner: adaopt.polynomial_decay_averaging(inner),
    "galore": lambda inner: adaopt.galore(inner),
    "scale_by_cautious_mask": lambda inner: adaopt.scale_by_cautious_mask(inner),
    "as_real_imag": lambda inner: adaopt.as_real_imag(inner),
}


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_wrapper_refuses_what_is_not_a_gradient_transformation(name: str) -> None:
    """None, or the factory in place of what it builds (adaopt.adam for adaopt.adam(1e-3)), failed at init with an
    AttributeError; each is refused when the wrapper is built, naming the argument."""
    with pytest.raises(adaopt.HyperparameterError, match=r"must be a gradient transformation .*got None"):
        WRAPPERS[name](None)
    with pytest.raises(adaopt.HyperparameterError, match=r"adam is a function: pass what it returns"):
        WRAPPERS[name](adaopt.adam)
    WRAPPERS[name](adaopt.adam(1e-3))  # a transformation is taken


def test_cautious_refuses_what_is_neither_a_factory_nor_a_transformation() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"optimizer must be an adaopt factory .*got None"):
        adaopt.cautious(None)  # type: ignore[arg-type]


def test_stochastic_rounding_takes_every_32_bit_seed() -> None:
    """Its docstring says [0, 2**32), as StochasticBf16's: seeds above 2**31 - 1 were refused."""
    adaopt.stochastic_rounding(adaopt.adam(1e-3), seed=2**32 - 1)
    with pytest.raises(adaopt.HyperparameterError, match=r"seed must be an integer in \[0, 4294967295\]"):
        adaopt.stochastic_rounding(adaopt.adam(1e-3), seed=2**32)


PARAMS = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (adaopt.cosine_annealing_schedule, r"fails on a step count: TypeError.*pass the schedule it returns"),
        (optax.cosine_decay_schedule, r"fails on a step count: TypeError.*pass the schedule it returns"),
        (adaopt.sgd, r"fails on a step count.*an optimizer is no schedule"),
        (lambda count: jnp.ones(3), r"returns shape \(3,\) and dtype float32"),
        (lambda count: count < 3, r"returns shape \(\) and dtype bool"),
        (lambda count: "0.1", r"fails on a step count"),
    ],
)
def test_a_callable_learning_rate_must_be_a_schedule(schedule: Any, match: str) -> None:
    """Any callable was taken as a schedule and failed at the first step (or broadcast a vector): it is traced once
    when the optimizer is built."""
    with pytest.raises(adaopt.HyperparameterError, match=rf"^learning_rate must be a schedule.*{match}"):
        adaopt.adam(learning_rate=schedule)
    with pytest.raises(adaopt.HyperparameterError, match=r"^adam_learning_rate must be a schedule"):
        adaopt.muon(1e-3, adam_learning_rate=schedule)


def test_schedules_of_every_kind_are_still_accepted() -> None:
    for schedule in (
        optax.cosine_decay_schedule(0.1, 100),
        adaopt.cosine_annealing_schedule(0.1, 100),
        adaopt.onecycle_schedule(100, 0.1),
        lambda count: 0.1,
        lambda count: 1,
        lambda count: jnp.float32(0.1) * 0.99**count,
        lambda count: 0.1 if count < 10 else 0.01,  # reads the count in Python: runs without jit
    ):
        tx = adaopt.adam(learning_rate=schedule)
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize("bad", [math.nan, -1.0, True, np.array([0.1, 0.2]), [0.1], "abc"])
def test_scale_by_shampoo_checks_its_learning_rate_as_shampoo(bad: Any) -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"^learning_rate must be a"):
        adaopt.shampoo(learning_rate=bad)
    with pytest.raises(adaopt.HyperparameterError, match=r"^learning_rate must be a"):
        adaopt.scale_by_shampoo(learning_rate=bad)


def test_schedule_free_learning_rate_factor_must_be_a_function() -> None:
    for bad in (0.5, "abc"):
        with pytest.raises(adaopt.HyperparameterError, match=r"^learning_rate_factor must be a schedule"):
            adaopt.scale_by_schedule_free(1e-3, learning_rate_factor=bad)
    adaopt.scale_by_schedule_free(1e-3, learning_rate_factor=adaopt.radam_rectification(0.999))


FLOAT_MASK = lambda params: params  # a tree of float arrays, not of booleans


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: adaopt.mars(weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
        (lambda: adaopt.muon(1e-3, muon_mask=FLOAT_MASK), "muon_mask"),
        (lambda: adaopt.muon(1e-3, weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
        (lambda: adaopt.galore(adaopt.adam(1e-3), galore_mask=FLOAT_MASK), "galore_mask"),
        (lambda: adaopt.galore_adamw(galore_mask=FLOAT_MASK), "galore_mask"),
        (lambda: adaopt.scale_by_prodigy(weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
        (lambda: adaopt.scale_by_dadapt_adam(weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
        (lambda: adaopt.scale_by_dadapt_sgd(weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
        (lambda: adaopt.scale_by_shampoo(weight_decay=0.1, weight_decay_mask=FLOAT_MASK), "weight_decay_mask"),
    ],
)
def test_a_mask_function_returning_floats_is_named_at_init(build: Any, name: str) -> None:
    """It failed with an array's "ambiguous truth value" (or decayed silently: scale_by_prodigy)."""
    tx = build()
    with pytest.raises(adaopt.HyperparameterError, match=rf"^{name}\['b'\] must be a boolean .*shape \(4,\)"):
        tx.init(PARAMS)


@pytest.mark.parametrize(
    "factory",
    [
        adaopt.adam,
        adaopt.scale_by_prodigy,
        adaopt.scale_by_dadapt_adam,
        adaopt.scale_by_dadapt_sgd,
        adaopt.scale_by_shampoo,
    ],
)
@pytest.mark.parametrize("mask", [0, 1, 2.5, "abc", True, np.bool_(False)])
def test_a_mask_that_is_one_value_is_refused_when_built(factory: Any, mask: Any) -> None:
    """0 was taken (as False), False refused; the scale_by_* blocks took any mask until init or the first step."""
    with pytest.raises(adaopt.HyperparameterError, match=r"^weight_decay_mask must be None, a tree of booleans"):
        factory(weight_decay=0.1, weight_decay_mask=mask)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: adaopt.muon(1e-2, muon_mask={"a": True}), "muon_mask"),
        (lambda: adaopt.muon(1e-2, matrix_view=lambda p: {"a": "flatten"}), "matrix_view"),
        (lambda: adaopt.galore_adamw(1e-2, galore_mask={"a": True}), "galore_mask"),
        (lambda: adaopt.scion(norms={"a": "spectral"}), "norms"),
        (lambda: adaopt.dadapt_adam(layer_scale=0.5), "layer_scale"),
    ],
)
def test_a_per_leaf_option_unlike_the_parameters_is_named(make: Any, name: str) -> None:
    """Each was called "per-leaf options (weight_decay_mask, layer_scale)"; D-Adapt Adam's layer_scale failed only
    at the first step."""
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones(4)}
    with pytest.raises(adaopt.TreeMismatchError, match=rf"per-leaf option {name}:"):
        make().init(params)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: adaopt.radam_rectification(1.0), r"^b2 must be a finite number in \[0.0, 1.0\), got 1.0"),
        (lambda: adaopt.radam_rectification(float("nan")), r"^b2 must be .*got nan"),  # a factor of 0 forever
        (lambda: adaopt.newton_schulz(jnp.ones((3, 3)), steps=-1), r"^steps must be an integer in \[0, 99\]"),
        (lambda: adaopt.newton_schulz(jnp.ones((3, 3)), eps=-1.0), r"^eps must be a finite number in \[0.0, inf\)"),
        (lambda: adaopt.newton_schulz(jnp.ones((3, 3)), dtype=jnp.int32), r"^dtype must be a floating dtype"),
        (lambda: adaopt.newton_schulz(jnp.ones(3)), r"x must have 2 or more dimensions, got shape \(3,\)"),
        (
            lambda: adaopt.scion(norms={"w": "spectrall", "b": "bias_rms"}).init(
                {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
            ),
            r"^norms\['w'\]: kind must be one of .*got 'spectrall'",
        ),
    ],
)
def test_public_helpers_name_a_bad_argument(call: Any, match: str) -> None:
    """Each was taken: a ZeroDivisionError, NaN or zero factors, non-finite matrices, an IndexError, or a norm's
    typo that did not say which leaf."""
    with pytest.raises(adaopt.HyperparameterError, match=match):
        call()


def test_a_group_predicate_of_one_argument_is_named() -> None:
    groups = [adaopt.Group(lambda path: path == "w", weight_decay=0.0)]
    with pytest.raises(TypeError, match=r"must take two arguments, \(path, leaf\)"):
        adaopt.param_groups(adaopt.adamw, groups, learning_rate=1e-3).init({"w": jnp.ones(3)})


def test_a_layer_scale_function_is_checked_like_a_tree() -> None:
    with pytest.raises(
        adaopt.HyperparameterError, match=r"^layer_scale must be a finite number in \[0.0, inf\), got -1"
    ):
        adaopt.dadapt_adam(layer_scale=lambda p: jax.tree.map(lambda _: -1.0, p)).init(PARAMS)


def test_a_mask_tree_unlike_the_parameters_is_named_at_shampoos_init() -> None:
    tx = adaopt.scale_by_shampoo(weight_decay=0.1, weight_decay_mask={"a": True})
    with pytest.raises(adaopt.TreeMismatchError, match=r"per-leaf option weight_decay_mask:"):
        tx.init(PARAMS)


@pytest.mark.parametrize("factory", [adaopt.muon, adaopt.scion])
def test_newton_schulz_coefficients_may_be_an_array(factory: Any) -> None:
    def run(coefficients: Any) -> Any:
        tx = factory(1e-2, ns_coefficients=coefficients)
        updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
        return updates

    want = run((3.4445, -4.775, 2.0315))
    for coefficients in (np.array((3.4445, -4.775, 2.0315)), np.array([(3.4445, -4.775, 2.0315)] * 5)):
        for a, b in zip(jax.tree.leaves(run(coefficients)), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(adaopt.HyperparameterError, match=r"^ns_coefficients must be a tuple of three"):
        factory(1e-2, ns_coefficients=np.array([1.0, 2.0]))


def test_string_options_take_numpy_strings_and_an_int_is_no_flag() -> None:
    tx = adaopt.psgd_kron(precond_update_precision=np.str_("tensorfloat32"), precond_grads_precision=np.str_("high"))
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    for value in (1, 0):
        with pytest.raises(adaopt.HyperparameterError, match=rf"^merge_dims must be one of .*got {value}\."):
            adaopt.soap(merge_dims=value)
        with pytest.raises(adaopt.HyperparameterError, match=r"^factored must be True or False"):
            adaopt.adafactor(factored=value)
    adaopt.soap(merge_dims=np.bool_(True))


FLAG_WRAPPERS = {
    "lookahead": lambda flag: adaopt.lookahead(adaopt.adam(1e-3), 2, 0.5, reset_state=flag),
    "param_groups": lambda flag: adaopt.param_groups(
        adaopt.adam, [adaopt.Group("b")], allow_empty_groups=flag, learning_rate=1e-3
    ),
    "sam_adaptive": lambda flag: adaopt.sam_value_and_grad(lambda p: jnp.sum(p**2), adaptive=flag),
    "sam_has_aux": lambda flag: adaopt.sam_value_and_grad(lambda p: (jnp.sum(p**2), None), has_aux=flag),
    "sam_perturbation": lambda flag: adaopt.sam_perturbation(jnp.ones(2), jnp.ones(2), adaptive=flag),
}


@pytest.mark.parametrize("name", FLAG_WRAPPERS)
def test_a_wrappers_flag_takes_a_numpy_bool(name: str) -> None:
    """Flags checked with isinstance(x, bool) refused np.True_ (read from an array of options)."""
    FLAG_WRAPPERS[name](np.bool_(True))
    FLAG_WRAPPERS[name](np.bool_(False))
    with pytest.raises(adaopt.HyperparameterError, match=r"must be True or False, got 'no'"):
        FLAG_WRAPPERS[name]("no")


def test_a_schedule_that_reads_the_count_in_python_is_taken() -> None:
    """Indexed by the count, or NumPy on it: tracing fails (not with a ConcretizationTypeError), so the schedule is
    called once on a concrete 0 instead, as it runs without jit."""
    rates = [0.1, 0.05, 0.01]
    adaopt.adam(lambda count: rates[min(int(count), 2)])
    adaopt.adam(lambda count: 0.1 * np.cos(count / 100))


class _ClassFactory:
    """A class used as a factory: its instances are the transformations; it has init and update as methods."""

    def __init__(self, learning_rate: float = 0.1) -> None:
        self.learning_rate = learning_rate

    def init(self, params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(self, updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda g: -self.learning_rate * g, updates), state


def test_a_class_is_a_factory_not_a_transformation() -> None:
    injected = adaopt.inject_hyperparams(_ClassFactory)(learning_rate=0.5)
    state = injected.init({"w": jnp.ones(2)})
    updates, _ = injected.update({"w": jnp.ones(2)}, state)
    np.testing.assert_allclose(updates["w"], -0.5)
    with pytest.raises(adaopt.HyperparameterError, match="must be a gradient transformation"):
        adaopt.monitor(_ClassFactory)  # type: ignore[arg-type]
    adaopt.monitor(_ClassFactory())  # type: ignore[arg-type]


def test_an_empty_mask_tree_is_a_tree() -> None:
    """{} (for no parameters) and optax.MaskedNode are trees, not one value."""
    base.check_mask({})
    base.check_mask(optax.MaskedNode())
    with pytest.raises(adaopt.HyperparameterError, match="got the single value True"):
        base.check_mask(True)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: adaopt.clip_by_global_norm(0.0), r"^max_norm must be a finite number in \(0.0, inf\), got 0.0"),
        (lambda: adaopt.clip_by_global_norm(-1.0), r"^max_norm must be"),  # reversed every update
        (lambda: adaopt.clip(float("nan")), r"^max_delta must be"),  # NaN parameters
        (lambda: adaopt.MultiSteps(adaopt.adam(1e-3), 0), r"^every_k_schedule must be an integer in \[1,"),
        (lambda: adaopt.apply_if_finite(adaopt.adam(1e-3), None), r"^max_consecutive_errors must be an integer"),
        (lambda: adaopt.chain(adaopt.clip(1.0), adaopt.adam), r"^chain's argument 1 must be a gradient .*adam"),
        (lambda: adaopt.chain(), r"^chain needs at least one transformation"),  # optax's unpacking error
    ],
)
def test_optaxs_building_blocks_check_their_arguments(call: Any, match: str) -> None:
    """optax took each: zeroed, reversed or NaN updates, no step ever, a comparison with None in the step, an
    AttributeError at init."""
    with pytest.raises(adaopt.HyperparameterError, match=match):
        call()


def test_optaxs_building_blocks_are_optaxs() -> None:
    """The same transformations and numbers; a NumPy integer is a number of steps, not a schedule."""
    params, grads = {"w": jnp.arange(3.0)}, {"w": jnp.asarray([3.0, -4.0, 12.0])}
    for ours, theirs in [
        (adaopt.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        (adaopt.clip(2.0), optax.clip(2.0)),
        (adaopt.chain(adaopt.clip(2.0), optax.sgd(0.1)), optax.chain(optax.clip(2.0), optax.sgd(0.1))),
        (adaopt.apply_if_finite(optax.sgd(0.1), 2), optax.apply_if_finite(optax.sgd(0.1), 2)),
    ]:
        got, _ = ours.update(grads, ours.init(params), params)
        want, _ = theirs.update(grads, theirs.init(params), params)
        np.testing.assert_array_equal(got["w"], want["w"])
    multi = adaopt.MultiSteps(optax.sgd(1.0), np.int64(2))
    assert isinstance(multi, optax.MultiSteps)
    state = multi.init(params)
    first, state = multi.update(grads, state, params)
    second, state = multi.update(grads, state, params)
    assert not np.any(first["w"]) and np.array_equal(second["w"], -grads["w"])


def test_multisteps_starts_each_cycle_afresh_and_passes_extra_arguments_on() -> None:
    """optax's kept a NaN micro-gradient in its accumulator for every later cycle (0 * NaN); inside apply_if_finite or
    chain it dropped value= (the loss-driven optimizers failed) and hessian= (Sophia's average stayed 0)."""
    params = {"w": jnp.zeros(2)}
    for use_grad_mean, want in [(True, [-3.0, -1.0]), (False, [-6.0, -2.0])]:
        multi = adaopt.MultiSteps(optax.sgd(1.0), 2, use_grad_mean=use_grad_mean)
        state = multi.init(params)
        for g in ([jnp.nan, 1.0], [1.0, 1.0], [2.0, 1.0], [4.0, 1.0]):
            updates, state = multi.update({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_array_equal(updates["w"], want)  # the second cycle's step, finite
    grads, value = {"w": jnp.asarray([3.0, 4.0])}, jnp.asarray(5.0)
    want, _ = adaopt.polyak_sgd().update(grads, adaopt.polyak_sgd().init(params), params, value=value)
    for tx in (
        adaopt.apply_if_finite(adaopt.MultiSteps(adaopt.polyak_sgd(), 1), 3),
        adaopt.chain(adaopt.clip(10.0), adaopt.MultiSteps(adaopt.polyak_sgd(), 1)),
        optax.apply_if_finite(adaopt.MultiSteps(adaopt.polyak_sgd(), 1).gradient_transformation(), 3),
    ):
        updates, _ = tx.update(grads, tx.init(params), params, value=value)
        np.testing.assert_array_equal(updates["w"], want["w"])


@pytest.mark.parametrize(
    ("schedule", "shown"), [(lambda count: -1e-3, "-0.001"), (lambda count: jnp.nan, "nan")], ids=["negative", "nan"]
)
@pytest.mark.parametrize("factory", [adaopt.adam, adaopt.sgd, adaopt.prodigy])
def test_a_schedule_that_starts_below_zero_or_non_finite_is_refused(factory: Any, schedule: Any, shown: str) -> None:
    """Taken, it stepped uphill or made the parameters NaN from the first step (inject_hyperparams refused it)."""
    with pytest.raises(
        adaopt.HyperparameterError, match=rf"^learning_rate must be a schedule of finite values >= 0.* {shown}\."
    ):
        factory(learning_rate=schedule)
    factory(learning_rate=lambda count: 1e-3 if count < 10 else 1e-4)  # read in Python: run once, eagerly


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: adaopt.dynamic_map(True, total_bits=0), r"^total_bits must be an integer in \[1, 16\], got 0"),
        # An exponent of total_bits or more makes a map of more than 2**total_bits values.
        (lambda: adaopt.dynamic_map(False, max_exponent_bits=8), r"^max_exponent_bits must be .* \[0, 7\], got 8"),
        (lambda: adaopt.linear_map(0), r"^total_bits must be an integer in \[1, 16\], got 0"),
        (lambda: adaopt.default_galore_mask({}, rank=0), r"^rank must be an integer in \[1,"),
        (lambda: adaopt.default_galore_mask({}, rank=4, min_dim=0), r"^min_dim must be an integer in \[1,"),
    ],
)
def test_maps_and_the_galore_mask_check_their_sizes(call: Any, match: str) -> None:
    """Taken before: an empty linear map, a map of 257 values for 8-bit codes, every matrix projected at rank 0."""
    with pytest.raises(adaopt.HyperparameterError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: adaopt.adam(learning_rate=2**40), "learning_rate"),
        (lambda: adaopt.sgd(0.1, weight_decay=2**33), "weight_decay"),
        (lambda: adaopt.adam(1e-3, eps=np.int64(2**31)), "eps"),
    ],
)
def test_an_integer_beyond_int32_as_a_real_hyperparameter_is_named(call: Any, name: str) -> None:
    """Taken, the first step failed in JAX with an OverflowError naming an argument "x" or "y"."""
    with pytest.raises(adaopt.HyperparameterError, match=rf"^{name}=.* beyond int32.s range.* {name}=\d+\.0\.$"):
        call()
    params = {"w": jnp.ones(3)}
    tx = adaopt.adam(learning_rate=float(2**40))  # as a float it steps
    assert np.isfinite(np.asarray(tx.update(params, tx.init(params), params)[0]["w"])).all()


def test_a_multisteps_inside_adaopts_wrappers_gets_the_extra_arguments() -> None:
    """Each wrapper took its inner optimizer through optax.with_extra_args_support, which dropped value= for a
    MultiSteps (a class, not a GradientTransformationExtraArgs): Polyak inside it failed for want of the loss."""
    params, grads, value = {"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([3.0, 4.0])}, jnp.asarray(5.0)
    for wrap in (
        adaopt.cautious,
        lambda inner: adaopt.galore(inner, rank=1),
    ):
        tx = wrap(adaopt.MultiSteps(adaopt.polyak_sgd(), 1))
        updates, _ = tx.update(grads, tx.init(params), params, value=value)
        assert np.all(np.isfinite(np.asarray(updates["w"]))) and np.any(np.asarray(updates["w"]) != 0)
