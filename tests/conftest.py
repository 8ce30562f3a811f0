"""Suite-wide settings, as equinox's tests do: eight simulated CPU devices, and
strict dtype and rank promotion so that silent upcasts and broadcasts fail."""

import os

# XLA reads this when jax initializes its backends, so it must precede any jax use.
_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# A script for subprocesses, not a test module (its import would run it).
collect_ignore = ["multihost_worker.py", "imagenet_runner.py"]

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, (
      "tests need 8 CPU devices; XLA_FLAGS was read before tests/conftest.py "
      f"could set it (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
  )


@pytest.fixture
def x64():
  """Float64 enabled for one test (finite differences need it)."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)
