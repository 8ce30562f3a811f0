"""The core's tests again at XLA's default optimization level.

tests/conftest.py has XLA compile the suite's programs without LLVM's
optimizations, for compile time; users' programs are compiled at XLA's default
level, whose round-off can differ. This runs the fast tests of the core and the
Flax drop-ins at that level, in a subprocess: the level is fixed when jax creates
its backends."""

import os
import subprocess
import sys

import pytest

from tests import ROOT
from tests.processes import XLA_LEVEL_FLAG

CORE_TESTS = [
  "tests/test_batch_norm.py",
  "tests/test_stats.py",
  "tests/test_renorm.py",
  "tests/test_ghost_batch_norm.py",
  "tests/test_engine_state.py",
  "tests/test_mixed_precision.py",
  "tests/test_fusion.py",
  "tests/test_distributed.py",
  "tests/test_sync.py",
  "tests/test_population.py",
  "tests/test_fold.py",
  "tests/test_linen.py",
  "tests/test_nnx.py",
]


@pytest.mark.slow
def test_the_cores_tests_pass_at_xlas_default_optimization_level():
  flags = os.environ.get("XLA_FLAGS", "").split()
  env = {
    **os.environ,
    "BNJAX_TEST_XLA_OPTIMIZE": "1",
    "XLA_FLAGS": " ".join(f for f in flags if not f.startswith(XLA_LEVEL_FLAG)),
  }
  args = ["-m", "not slow", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", *CORE_TESTS]
  result = subprocess.run(
    [sys.executable, "-m", "pytest", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
  assert " passed" in result.stdout
