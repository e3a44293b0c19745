"""Test-session set-up: 8 CPU devices for the sharding tests, deterministic hypothesis."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis

hypothesis.settings.register_profile("adaopt", deadline=None, derandomize=True, max_examples=60)
hypothesis.settings.load_profile("adaopt")
