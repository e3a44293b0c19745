"""Test-session set-up: 8 CPU devices for the sharding tests, deterministic hypothesis, and a
fixture that traces ``single_pass``'s sibling form."""

import os

# Must be set before JAX initialises its backends. The suite compiles thousands of small programs, each
# run for a few steps: XLA:CPU's cheaper code generation halves its time. Tests whose assertion is about
# the default code (a convergence bound on a float32 trajectory that rounding steers) compile with
# tests.problems.DEFAULT_CODEGEN.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis
import jax
import pytest

from adaopt._src.layouts import single_pass

# Start the backends now, with these flags: tests that set XLA_FLAGS later (to trace single_pass's
# sibling form) must not be the ones that start them.
jax.devices()

hypothesis.settings.register_profile("adaopt", deadline=None, derandomize=True, max_examples=60)
hypothesis.settings.load_profile("adaopt")


@pytest.fixture
def fusion_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trace as on a CPU backend started with XLA:CPU's multi-output fusion: ``single_pass`` takes
    its sibling form. This process's backend runs without the fusion, so the programs compile to
    more kernels, with the same numbers."""
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {single_pass.CPU_MULTI_OUTPUT_FUSION_FLAG}")
    monkeypatch.setattr(single_pass, "cpu_backend_fuses_siblings", lambda: True)
