"""``single_pass``: the same steps as the wrapped optimizer, in one XLA:CPU kernel per leaf when multi-output fusion is on.

XLA:CPU reads its options when JAX starts its CPU backend, so the tests with the fusion on run
in a fresh Python process started with ``XLA_FLAGS``; the others run here, where it is off, and
trace the wrapper's sibling form as with the fusion on (the ``fusion_on`` fixture of conftest.py),
which is then compiled without the fusion: the numbers must still agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import REGISTRY, cpu_multi_output_fusion_enabled
from adaopt._src.layouts import single_pass as single_pass_module
from adaopt._src.layouts.single_pass import CPU_MULTI_OUTPUT_FUSION_FLAG, flag_in_environment
from benchmarks import learning_rates

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd", "lamb", "prodigy", "polyak_sgd")
STEPS = 20


def tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((30, 7)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "s": jnp.asarray(0.5, jnp.float32),
        "half": jnp.asarray(rng.standard_normal(6), jnp.bfloat16),
        "empty": jnp.zeros((0, 3), jnp.float32),
        "none": None,
    }


def run(tx: optax.GradientTransformation, params: Any, steps: int = STEPS) -> Any:
    """The parameters and state after ``steps`` jitted steps on deterministic gradients, with the loss as value=."""

    @jax.jit
    def step(p: Any, s: Any, k: jax.Array) -> tuple[Any, Any]:
        g = jax.tree.map(lambda x: jnp.sin(3 * x + k).astype(x.dtype), p)
        updates, s = tx.update(g, s, p, value=1.0 + 1.0 / (1.0 + k))
        return optax.apply_updates(p, updates), s

    p, s = params, tx.init(params)
    for k in range(steps):
        p, s = step(p, s, jnp.float32(k))
    return p, s


def assert_trees_close(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "flags, enabled",
    [
        ("", False),
        (CPU_MULTI_OUTPUT_FUSION_FLAG, True),
        ("--xla_force_host_platform_device_count=8 " + CPU_MULTI_OUTPUT_FUSION_FLAG, True),
        ("--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true,other=1", True),
        ("--xla_backend_extra_options=other,xla_cpu_use_multi_output_fusion", True),
        # XLA:CPU tests the option's presence, not its value (a fresh process with this flag fuses).
        ("--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=false", True),
        ("--xla_backend_extra_options=xla_cpu_use_thunk_runtime", False),
    ],
)
def test_the_flag_is_read_from_xla_flags(monkeypatch: pytest.MonkeyPatch, flags: str, enabled: bool) -> None:
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert flag_in_environment() is enabled


def test_a_flag_set_after_the_backend_started_is_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's backend started without the fusion: a flag set now changes nothing (the
    sibling form would compile to 3x slower kernels without the fusion)."""
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {CPU_MULTI_OUTPUT_FUSION_FLAG}")
    assert flag_in_environment() and not cpu_multi_output_fusion_enabled()
    tx = adaopt.adam(1e-2)
    params = {"w": jnp.ones((200, 100))}
    state = tx.init(params)
    plain = jax.make_jaxpr(tx.update)(params, state, params)
    assert str(jax.make_jaxpr(adaopt.single_pass(tx, min_size=1).update)(params, state, params)) == str(plain)


@pytest.mark.parametrize("fusion, min_size", [(False, 1), (True, 211)], ids=["fusion-off", "no-large-leaf"])
def test_without_the_fusion_or_a_large_leaf_it_is_the_optimizer_itself(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fusion: bool, min_size: int
) -> None:
    """The fusion off, or on with every leaf under ``min_size`` (the largest of ``tree()`` has 210 elements)."""
    if fusion:
        request.getfixturevalue("fusion_on")
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    tx = adaopt.adam(1e-2)
    params = tree()
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    plain = jax.make_jaxpr(tx.update)(grads, state, params)
    wrapped = jax.make_jaxpr(adaopt.single_pass(tx, min_size=min_size).update)(grads, state, params)
    assert str(plain) == str(wrapped)


@pytest.mark.parametrize("min_size", [0, -3, 2.5, "1"])
def test_min_size_is_checked(min_size: Any) -> None:
    with pytest.raises(adaopt.HyperparameterError, match="min_size"):
        adaopt.single_pass(adaopt.adam(1e-2), min_size=min_size)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.usefixtures("fusion_on")
def test_sibling_form_follows_the_optimizer(name: str) -> None:
    """Traced as on a CPU with the fusion on (compiled here without it): the same trajectory and state.

    ``w`` (210 elements) takes the single-pass form, the smaller leaves the plain one.
    """
    spec = REGISTRY[name]
    params = tree()
    wrapped = adaopt.single_pass(learning_rates.make(spec), min_size=200)
    grads = jax.tree.map(jnp.ones_like, params)
    jaxpr = str(jax.make_jaxpr(wrapped.update)(grads, wrapped.init(params), params, value=1.0))
    assert "optimization_barrier" in jaxpr and "platform_index" in jaxpr
    # The last bits may differ: XLA:CPU contracts a * b + c into fused multiply-adds kernel by kernel.
    assert_trees_close(run(wrapped, params), run(learning_rates.make(spec), params), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fusion_on")
def test_sibling_form_chains_differentiates_and_vmaps() -> None:
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda x: 0.3 * x + 0.1, params)

    def loss_after_step(lr: jax.Array, wrap: bool) -> jax.Array:
        tx = optax.chain(optax.clip_by_global_norm(1.0), adaopt.adamw(lr, weight_decay=0.1))
        tx = adaopt.single_pass(tx, min_size=1) if wrap else tx
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(new))

    for wrap_grad in (jax.grad, jax.vmap):
        arg = jnp.float32(1e-2) if wrap_grad is jax.grad else jnp.array([1e-3, 1e-2])
        got = wrap_grad(lambda lr: loss_after_step(lr, True))(arg)
        want = wrap_grad(lambda lr: loss_after_step(lr, False))(arg)
        np.testing.assert_allclose(got, want, rtol=1e-6)


FUSED_SCRIPT = textwrap.dedent(
    r"""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import adaopt
    sys.path.insert(0, sys.argv[1])
    import test_single_pass as t

    assert adaopt.cpu_multi_output_fusion_enabled()
    out = {}
    # Three leaves of at least 16,384 elements (single_pass's default min_size) and three smaller
    # ones, of different shapes (XLA would merge the kernels of leaves of the same shape).
    shapes = [(128, 128), (129, 128), (130, 128), (64, 32), (65, 32), (66, 32)]
    leaves = {f"l{i}": jnp.full(shape, 0.01 * i, jnp.float32) for i, shape in enumerate(shapes)}
    grads = jax.tree.map(lambda x: x + 0.5, leaves)
    for name, tx in (("adam", adaopt.adam(1e-2)), ("sgd_momentum", adaopt.sgd(1e-2, momentum=0.9))):
        row = {}
        forms = (("plain", tx), ("large_leaves", adaopt.single_pass(tx)), ("all_leaves", adaopt.single_pass(tx, min_size=1)))
        for label, opt in forms:
            def step(p, s, g, opt=opt):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s
            hlo = jax.jit(step, donate_argnums=(0, 1)).lower(leaves, opt.init(leaves), grads).compile().as_text()
            entry = hlo.split("ENTRY")[1]
            # Kernels over arrays (not over the scalars of the step count and the bias corrections).
            row[label] = sum(re.search(r"= \(?\w+\[\d[^=]* fusion\(", line) is not None for line in entry.splitlines())
        for label, opt in (("plain", tx), ("all_leaves", adaopt.single_pass(tx, min_size=1))):
            p, s = t.run(opt, t.tree())
            row[label + "_state"] = [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves((p, s))]
        out[name] = row
    print(json.dumps(out))
    """
)


def test_with_the_fusion_each_leaf_is_one_kernel() -> None:
    """With XLA:CPU's multi-output fusion on: one kernel per leaf of ``min_size`` elements, and the same trajectory."""
    env = {**os.environ, "XLA_FLAGS": CPU_MULTI_OUTPUT_FUSION_FLAG, "JAX_PLATFORMS": "cpu"}
    here = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", FUSED_SCRIPT, here], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, row in out.items():
        # One kernel per leaf for its parameter and its state; without the wrapper the parameter's kernel
        # reads the moments the state's kernel writes: two per leaf. By default only the three large
        # leaves take the single-pass form.
        assert (row["all_leaves"], row["large_leaves"], row["plain"]) == (6, 3 + 2 * 3, 2 * 6), (name, row)
        for got, want in zip(row["all_leaves_state"], row["plain_state"], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fusion_on")
def test_sibling_form_inside_optax_wrappers() -> None:
    """inject_hyperparams inside, MultiSteps and apply_if_finite outside: the wrapped optimizer's steps."""
    params = tree()

    def wrapped(wrap: bool) -> optax.GradientTransformation:
        adam = optax.inject_hyperparams(adaopt.adam)(learning_rate=3e-2)
        inner = adaopt.single_pass(adam, min_size=1) if wrap else adam
        return optax.MultiSteps(optax.apply_if_finite(inner, max_consecutive_errors=3), every_k_schedule=2)

    got, want = run(wrapped(True), params), run(wrapped(False), params)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got[0]["w"] - params["w"]))) > 0


@pytest.mark.usefixtures("fusion_on")
def test_static_extra_arguments_stay_static_and_quantized_moments_keep_the_plain_form() -> None:
    """monitor's record= (static under jit) stays a Python bool through the sibling trace; a state of blockwise
    int8 moments keeps the plain program (its chunk loops run once, not again for the sibling's update)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64), "b": jnp.arange(3.0)}
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    tx = adaopt.monitor(adaopt.adam(1e-2))
    opt = adaopt.single_pass(tx, min_size=1)
    for record in (False, True):
        step = lambda t, r=record: jax.jit(t.update, static_argnames="record")(grads, t.init(params), params, record=r)
        assert_trees_close(step(opt), step(tx), rtol=1e-5, atol=1e-6)
    light = adaopt.adamw(1e-3, mu_dtype="int8", nu_dtype="int8")
    params = {"w": jnp.ones((512, 512))}  # large enough for a chunked step
    program = lambda t: jax.jit(t.update).lower(params, light.init(params), params).as_text()
    assert (
        program(adaopt.single_pass(light, min_size=1)).count("stablehlo.while")
        == program(light).count("stablehlo.while")
        > 0
    )


MESH_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import adaopt

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    tx = adaopt.single_pass(adaopt.adam(1e-2), min_size=1)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data", None)))}

        @jax.jit
        def step(p, s):
            updates, s = tx.update(p, s, p)
            return optax.apply_updates(p, updates), s

        new, _ = step(params, jax.jit(tx.init)(params))  # the fusion probe runs in this trace
    assert adaopt.cpu_multi_output_fusion_enabled()
    assert new["w"].sharding.spec == P("data", None), new["w"].sharding
    print("ok")
    """
)


def test_the_fusion_probe_runs_inside_a_trace_under_a_mesh() -> None:
    """With the fusion on, the first ``update`` (which compiles the probe) is traced under ``jax.set_mesh``."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {CPU_MULTI_OUTPUT_FUSION_FLAG}",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------
# enable_cpu_fusion: the fusion without setting XLA_FLAGS by hand.

ENABLE_SCRIPT = textwrap.dedent(
    """
    import json, os, warnings
    warnings.simplefilter("error")  # no call below may warn
    import adaopt
    out = {"first": adaopt.enable_cpu_fusion(), "flags": os.environ["XLA_FLAGS"]}
    out["again"] = adaopt.enable_cpu_fusion()
    out["flags_again"] = os.environ["XLA_FLAGS"]
    import jax
    out["devices"] = len(jax.devices())  # the user's other flag still reaches XLA
    out["enabled"] = adaopt.cpu_multi_output_fusion_enabled()  # the compiler fuses (the probe), not just the flag
    out["after_start"] = adaopt.enable_cpu_fusion()
    print(json.dumps(out))
    """
)


def test_enable_cpu_fusion_before_jax_starts_turns_the_fusion_on() -> None:
    """In a fresh process, after ``import adaopt`` and before any computation: the fusion is on, the user's
    flags stay, a second call changes nothing, and a call after the start says it is on."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    env.pop(adaopt.CPU_FUSION_ENV, None)
    result = subprocess.run(
        [sys.executable, "-c", ENABLE_SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["flags"] == f"--xla_force_host_platform_device_count=3 {CPU_MULTI_OUTPUT_FUSION_FLAG}"
    assert out["flags_again"] == out["flags"]
    assert out["first"] and out["again"] and out["after_start"] and out["enabled"]
    assert out["devices"] == 3


@pytest.fixture
def before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if JAX had not started its backends: ``enable_cpu_fusion`` then only edits the environment."""
    monkeypatch.setattr(single_pass_module, "_backends_started", lambda: False)
    monkeypatch.delenv(adaopt.CPU_FUSION_ENV, raising=False)


@pytest.mark.usefixtures("before_start")
def test_enable_cpu_fusion_appends_once_and_keeps_the_other_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    user = "--xla_cpu_enable_fast_math=false  --xla_backend_extra_options=xla_cpu_foo"
    monkeypatch.setenv("XLA_FLAGS", user)
    assert adaopt.enable_cpu_fusion() is True
    assert os.environ["XLA_FLAGS"] == f"{user} {CPU_MULTI_OUTPUT_FUSION_FLAG}"
    assert flag_in_environment()
    assert adaopt.enable_cpu_fusion() is True
    assert os.environ["XLA_FLAGS"] == f"{user} {CPU_MULTI_OUTPUT_FUSION_FLAG}"  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_extra_options=other,xla_cpu_use_multi_output_fusion")
    assert adaopt.enable_cpu_fusion() is True
    assert os.environ["XLA_FLAGS"] == "--xla_backend_extra_options=other,xla_cpu_use_multi_output_fusion"
    monkeypatch.delenv("XLA_FLAGS")
    assert adaopt.enable_cpu_fusion() is True
    assert os.environ["XLA_FLAGS"] == CPU_MULTI_OUTPUT_FUSION_FLAG


@pytest.mark.usefixtures("before_start")
def test_enable_cpu_fusion_respects_the_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv(adaopt.CPU_FUSION_ENV, "off")
    with pytest.warns(adaopt.CpuFusionWarning, match=f"{adaopt.CPU_FUSION_ENV}=off .* leaves .* off as asked"):
        assert adaopt.enable_cpu_fusion() is False
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    # The user's own flag stays on: the opt-out only keeps adaopt from adding it.
    monkeypatch.setenv("XLA_FLAGS", CPU_MULTI_OUTPUT_FUSION_FLAG)
    assert adaopt.enable_cpu_fusion() is True
    monkeypatch.setenv(adaopt.CPU_FUSION_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{adaopt.CPU_FUSION_ENV}='maybe'"):
        adaopt.enable_cpu_fusion()


@pytest.mark.usefixtures("before_start")
def test_enable_cpu_fusion_says_a_false_value_turns_the_fusion_on(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=false"
    monkeypatch.setenv("XLA_FLAGS", flags)
    with pytest.warns(adaopt.CpuFusionWarning, match="only tests whether the option is present: the fusion is on"):
        assert adaopt.enable_cpu_fusion() is True
    assert os.environ["XLA_FLAGS"] == flags


@pytest.mark.usefixtures("before_start")
def test_enable_cpu_fusion_without_a_cpu_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "")
    platforms = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda,tpu")
        with pytest.warns(adaopt.CpuFusionWarning, match="JAX_PLATFORMS=cuda,tpu starts no CPU backend"):
            assert adaopt.enable_cpu_fusion() is False
        assert os.environ["XLA_FLAGS"] == ""
        jax.config.update("jax_platforms", "cuda,cpu")
        assert adaopt.enable_cpu_fusion() is True
    finally:
        jax.config.update("jax_platforms", platforms)


def test_enable_cpu_fusion_after_the_start_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's CPU backend started without the fusion: the call cannot turn it on, leaves XLA_FLAGS
    as it is, and says how to (a new process, or XLA_FLAGS before Python starts)."""
    monkeypatch.delenv(adaopt.CPU_FUSION_ENV, raising=False)
    flags = os.environ.get("XLA_FLAGS", "")
    with pytest.warns(adaopt.CpuFusionWarning, match="already started without") as record:
        assert adaopt.enable_cpu_fusion() is False
    message = str(record[0].message)
    assert "restart the kernel" in message and f"XLA_FLAGS={CPU_MULTI_OUTPUT_FUSION_FLAG} before starting" in message
    assert record[0].filename == __file__  # it points at the caller's line
    assert os.environ.get("XLA_FLAGS", "") == flags
    monkeypatch.setenv("XLA_FLAGS", f"{flags} {CPU_MULTI_OUTPUT_FUSION_FLAG}")
    with pytest.warns(adaopt.CpuFusionWarning, match="set after JAX's CPU backend started"):
        assert adaopt.enable_cpu_fusion() is False
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(adaopt.CpuFusionWarning, match="default backend is gpu, .* only changes computations on the CPU"):
        assert adaopt.enable_cpu_fusion() is False
    monkeypatch.undo()  # default_backend, XLA_FLAGS
    monkeypatch.setenv("XLA_FLAGS", f"{flags} {CPU_MULTI_OUTPUT_FUSION_FLAG}")
    # A JAX that cannot tell whether it started: the probe decides, on the running backend.
    monkeypatch.setattr(single_pass_module, "_backends_started", lambda: None)
    with pytest.warns(adaopt.CpuFusionWarning, match="set after JAX's CPU backend started"):
        assert adaopt.enable_cpu_fusion() is False
