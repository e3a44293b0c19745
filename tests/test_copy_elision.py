"""adaopt.enable_cpu_copy_elision: before JAX starts it turns XLA:CPU's region-based copy elision on (keeping the
user's flags, once, respecting an explicit false); the steps that copied donated buffers whole (bfloat16
and stochastically rounded moments) then compile without those copies, and every step tried gives the same
numbers bit for bit; after the start it says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

import adaopt
from adaopt._src.layouts import copy_elision

FLAG = adaopt.CPU_COPY_ELISION_FLAG

# Run in a fresh process: enable (or not), then train a small tree for a few donated steps with AdamW's
# moments stored in several ways and with monitor's records, and print the copies each compiled step holds
# and the results' bits.
STEPS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    warnings.simplefilter("error")  # no call below may warn
    import adaopt
    out = {}
    if sys.argv[1] == "on":
        out["first"] = adaopt.enable_cpu_copy_elision()
        out["flags"] = os.environ["XLA_FLAGS"]
        out["again"] = adaopt.enable_cpu_copy_elision()
        out["flags_again"] = os.environ["XLA_FLAGS"]
    import jax, jax.numpy as jnp, numpy as np
    out["devices"] = len(jax.devices())  # the user's other flag still reaches XLA
    out["elides"] = adaopt.cpu_backend_elides_copies()
    params = {"w": jnp.linspace(-1.0, 1.0, 96 * 64).reshape(96, 64), "b": jnp.linspace(0.0, 1.0, 64)}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    optimizers = {
        "bf16": adaopt.adamw(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "bf16_sr": adaopt.adamw(1e-2, mu_dtype="bfloat16_sr", nu_dtype="bfloat16_sr"),
        "int8": adaopt.adamw(1e-2, mu_dtype="int8", nu_dtype="int8"),
        "monitor": adaopt.monitor(adaopt.adamw(1e-2), every=2),
    }
    for name, tx in optimizers.items():
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return adaopt.apply_updates(p, u), s
        step = jax.jit(step, donate_argnums=(0, 1))
        p, s = jax.tree.map(jnp.copy, params), tx.init(params)
        hlo = step.lower(p, s, grads).compile().as_text().split("ENTRY", 1)[-1]
        out[name + "_copies"] = hlo.count(" copy(")
        for _ in range(5):
            p, s = step(p, s, grads)
        leaves = jax.tree.leaves((p, s))
        out[name] = [np.asarray(x).astype(np.float64).tobytes().hex() for x in leaves]
    if sys.argv[1] == "on":
        out["after_start"] = adaopt.enable_cpu_copy_elision()
    print(json.dumps(out))
    """
)


def _run(mode: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", STEPS_SCRIPT, mode], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_before_jax_starts_the_copies_go_and_the_numbers_stay() -> None:
    on, off = _run("on"), _run("off")
    assert on["flags"] == f"--xla_force_host_platform_device_count=3 {FLAG}" and on["flags_again"] == on["flags"]
    assert on["first"] and on["again"] and on["after_start"] and on["elides"] and not off["elides"]
    assert on["devices"] == off["devices"] == 3
    for name in ("bf16", "bf16_sr"):  # XLA's default copies the donated moments, read twice
        assert off[name + "_copies"] > 0 and on[name + "_copies"] == 0, name
    for name in ("bf16", "bf16_sr", "int8", "monitor"):
        assert on[name + "_copies"] <= off[name + "_copies"], name
        assert on[name] == off[name], name  # bit for bit


@pytest.fixture
def before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if JAX had not started its backends: the call then only edits the environment."""
    monkeypatch.setattr(copy_elision, "_backends_started", lambda: False)


@pytest.mark.usefixtures("before_start")
def test_appends_once_and_keeps_the_other_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    user = "--xla_cpu_enable_fast_math=false  --xla_backend_extra_options=xla_cpu_foo"
    monkeypatch.setenv("XLA_FLAGS", user)
    assert adaopt.enable_cpu_copy_elision() is True
    assert os.environ["XLA_FLAGS"] == f"{user} {FLAG}"
    assert adaopt.enable_cpu_copy_elision() is True
    assert os.environ["XLA_FLAGS"] == f"{user} {FLAG}"  # idempotent
    for given in ("--xla_cpu_copy_insertion_use_region_analysis", "--xla_cpu_copy_insertion_use_region_analysis=1"):
        monkeypatch.setenv("XLA_FLAGS", given)
        assert adaopt.enable_cpu_copy_elision() is True
        assert os.environ["XLA_FLAGS"] == given
    monkeypatch.delenv("XLA_FLAGS")
    assert adaopt.enable_cpu_copy_elision() is True
    assert os.environ["XLA_FLAGS"] == FLAG


@pytest.mark.usefixtures("before_start")
def test_an_explicit_false_is_kept_and_a_bad_value_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = f"{FLAG} --xla_cpu_copy_insertion_use_region_analysis=false"  # the last one counts, as for XLA
    monkeypatch.setenv("XLA_FLAGS", flags)
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="region_analysis=false: .* leaves the elision off, as asked"):
        assert adaopt.enable_cpu_copy_elision() is False
    assert os.environ["XLA_FLAGS"] == flags
    for bad in ("maybe", "yes"):  # XLA takes true, false, 1 or 0 only, and aborts at anything else
        monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_copy_insertion_use_region_analysis={bad}")
        with pytest.raises(ValueError, match=f"'{bad}', which XLA refuses"):
            adaopt.enable_cpu_copy_elision()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_copy_insertion_use_region_analysis=TRUE")  # any case
    assert adaopt.enable_cpu_copy_elision() is True


@pytest.mark.usefixtures("before_start")
def test_without_a_cpu_platform_there_is_nothing_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "")
    platforms = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda,tpu")
        with pytest.warns(adaopt.CpuCopyElisionWarning, match="JAX_PLATFORMS=cuda,tpu starts no CPU backend"):
            assert adaopt.enable_cpu_copy_elision() is False
        assert os.environ["XLA_FLAGS"] == ""
        jax.config.update("jax_platforms", "cuda,cpu")
        assert adaopt.enable_cpu_copy_elision() is True
    finally:
        jax.config.update("jax_platforms", platforms)


def test_after_the_start_it_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's CPU backend started without the elision (the suite's flags): the call cannot turn it on,
    leaves XLA_FLAGS as it is, and says how to."""
    flags = os.environ.get("XLA_FLAGS", "")
    assert not adaopt.cpu_backend_elides_copies()
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="already started without") as record:
        assert adaopt.enable_cpu_copy_elision() is False
    message = str(record[0].message)
    assert "restart the kernel" in message and f"XLA_FLAGS={FLAG} before starting" in message
    assert record[0].filename == __file__  # it points at the caller's line
    assert os.environ.get("XLA_FLAGS", "") == flags
    monkeypatch.setenv("XLA_FLAGS", f"{flags} {FLAG}")
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="set after JAX's CPU backend started"):
        assert adaopt.enable_cpu_copy_elision() is False
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_cpu_copy_insertion_use_region_analysis=false")
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="leaves the elision off, as asked"):
        assert adaopt.enable_cpu_copy_elision() is False
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="default backend is gpu, .* only changes computations on"):
        assert adaopt.enable_cpu_copy_elision() is False
    # A JAX that cannot tell whether it started: the probe decides, on the running backend.
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", flags)  # restored at the end: the call below edits it
    monkeypatch.setattr(copy_elision, "_backends_started", lambda: None)
    with pytest.warns(adaopt.CpuCopyElisionWarning, match="already started without"):
        assert adaopt.enable_cpu_copy_elision() is False
    assert os.environ["XLA_FLAGS"] == f"{flags} {FLAG}".strip()  # in case it had not started
