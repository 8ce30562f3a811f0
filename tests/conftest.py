"""Suite-wide settings, as equinox's tests do: eight simulated CPU devices, and
strict dtype and rank promotion so that silent upcasts and broadcasts fail."""

import jax
import pytest

# A script for subprocesses, not a test module (its import would run it).
collect_ignore = ["multihost_worker.py", "imagenet_runner.py"]

jax.config.update("jax_platforms", "cpu")
# Read when jax initializes its backends (the first array or device query), so it
# must come before any jax use; it takes precedence over XLA_FLAGS's device count.
try:
  jax.config.update("jax_num_cpu_devices", 8)
  _DEVICES_PROBLEM = None
except RuntimeError as error:  # jax was used before pytest imported this file
  _DEVICES_PROBLEM = str(error)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, (
      f"tests need 8 CPU devices and see {jax.device_count()}: tests/conftest.py sets "
      "jax.config.update('jax_num_cpu_devices', 8), which must run before jax initializes "
      "its backends; something used jax before pytest imported tests/conftest.py"
      + (f" ({_DEVICES_PROBLEM})" if _DEVICES_PROBLEM else "")
  )


@pytest.fixture
def x64():
  """Float64 enabled for one test (finite differences need it)."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)
