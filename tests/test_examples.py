"""The example scripts run, and show what they claim."""

import importlib.util

import jax
import pytest

from tests import ROOT


@pytest.mark.slow  # the whole script, eager as a user writes it
def test_sync_batch_norm_demo_statistics_equal_the_full_batch():
  spec = importlib.util.spec_from_file_location(
    "demo", ROOT / "examples" / "sync_batch_norm_demo.py"
  )
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  with (
    jax.numpy_dtype_promotion("standard"),
    jax.numpy_rank_promotion("allow"),
  ):  # user code, not strict
    checks = demo.main(steps=2, per_device_batch=4)
  assert len(checks) == 2
  for identical, error in checks:
    assert identical and error < 1e-5
