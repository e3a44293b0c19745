"""Test-session set-up: 8 CPU devices for the sharding tests, deterministic hypothesis, a fixture
that traces ``single_pass``'s sibling form, and one that turns adaopt's CPU kernels on."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Must be set before JAX initialises its backends. The suite compiles thousands of small programs, each
# run for a few steps: XLA:CPU's cheaper code generation halves its time, and its older elemental emitters
# (not the MLIR fusion emitters) compile a third faster again. Tests whose assertion is about the default
# code (a convergence bound on a float32 trajectory that rounding steers) compile with
# tests.problems.DEFAULT_CODEGEN.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread for torch (and NumPy's BLAS): the references step small tensors, and xdist runs a worker per core,
# so their default of a thread per core has each worker's threads contend with the other's (test_soap.py's
# heavyball and pytorch-optimizer runs took 1.8x as long). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hypothesis
import jax
import pytest

import adaopt
from adaopt._src.layouts import cpu_kernels as cpu_kernels_module
from adaopt._src.layouts import single_pass

# One compilation cache for the run, shared by its workers: the registry-wide tests build the same programs
# many times over (a new optimizer object, a new lambda, the same HLO), and a program compiled once is then
# read back. Its key holds the program, the flags and the versions, so a hit is the same executable. Fresh
# for each run (made by the process that starts the run; xdist's workers inherit its environment), so a
# run's time is a clean machine's.
_OWNS_CACHE = "ADAOPT_TEST_COMPILATION_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["ADAOPT_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="adaopt-tests-")
_COMPILATION_CACHE = Path(os.environ["ADAOPT_TEST_COMPILATION_CACHE"])
jax.config.update("jax_compilation_cache_dir", str(_COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


@pytest.fixture
def cpu_kernels() -> Iterator[None]:
    """adaopt's CPU kernels on for the test (built into the user's cache on first use), off after it."""
    if cpu_kernels_module._compiler() is None:
        pytest.skip("no C++ compiler ($CXX, else c++) to build adaopt's CPU kernels")
    assert adaopt.enable_cpu_kernels()
    try:
        yield
    finally:
        adaopt.disable_cpu_kernels()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's compilation cache removed by the process that made it (xdist's controller, or the only one)."""
    if _OWNS_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
