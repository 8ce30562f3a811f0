"""Suite-wide settings, as equinox's tests do: eight simulated CPU devices, and
strict dtype and rank promotion so that silent upcasts and broadcasts fail. Plus
JAX's persistent compilation cache, in .cache/jax-tests/ at the repository root:
most of the suite's time is XLA compiling small programs, and a second run (or a
subprocess compiling what an earlier one did) reads them back instead.
``BNJAX_TEST_COMPILATION_CACHE=0`` turns it off. XLA's CPU back end compiles
without LLVM's optimizations, and the garbage collector runs less often (both
explained below)."""

import gc
import os

import jax
import pytest

from tests import ROOT
from tests.processes import XLA_LEVEL_FLAG, xla_level_flags

# A script for subprocesses, not a test module (its import would run it).
collect_ignore = ["multihost_worker.py", "imagenet_runner.py", "gcs_emulator.py"]
pytest_plugins = [
  "tests.gcs_emulator",  # the Cloud Storage emulator's fixtures (test_gcs.py)
  "tests.mnist_testing",  # fashion_mnist_dir, trained_run (test_mnist_*.py, test_figure3.py)
]

# The suite's programs are tiny, and LLVM optimizing their machine code is most of
# their compile time (15-25% of the fast set, measured; issue 19). Level 0 changes
# only that last step: the optimized HLO (XLA's fusions, buffers, collectives, what
# tests/test_fusion.py reads) is the same, and results differ at round-off, which
# every tolerance here allows. Set before jax creates its backends; an environment
# variable, so that the experiments' subprocesses compile the same way. Benchmarks
# and the experiments themselves compile at XLA's default level, and so does this
# suite with BNJAX_TEST_XLA_OPTIMIZE=1 (tests/test_xla_default_level.py runs the
# core's tests that way).
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if os.environ.get("BNJAX_TEST_XLA_OPTIMIZE", "0") != "1" and not xla_level_flags(_XLA_FLAGS):
  os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} {XLA_LEVEL_FLAG}=0".strip()

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

# A test session accumulates millions of long-lived objects (traced jaxprs, compiled
# programs, Flax modules), and at Python's default thresholds the cyclic collector
# walks them thousands of times: 6 s of a 75 s run, measured (issue 19). Collecting
# the youngest generation every 50,000 allocations, not 700, leaves well under a
# second of it; the objects a collection frees are the same.
gc.set_threshold(50_000, 20, 20)

if os.environ.get("BNJAX_TEST_COMPILATION_CACHE", "1") != "0":
  _CACHE = ROOT / ".cache" / "jax-tests"
  # Environment variables, so that the experiments' subprocesses share the cache.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
  # A size limit turns on JAX's file lock: xdist workers and multi-host processes
  # then never read an entry another is still writing.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
    "jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"])
  )
  jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
  )


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


@pytest.fixture
def standard_promotion(request):
  """JAX's standard dtype promotion for one test, in place of the suite's strict mode:
  Flax's and Haiku's own modules mix dtypes implicitly. A test whose name says
  "strict" keeps the strict mode. A module takes it for all its tests with
  ``pytestmark = pytest.mark.usefixtures("standard_promotion")``."""
  if "strict" in request.node.name:
    yield
    return
  with jax.numpy_dtype_promotion("standard"):
    yield


def pytest_collection_finish(session):
  """What collection imported lives for the whole session: the collector stops walking it."""
  gc.freeze()
