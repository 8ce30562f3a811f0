"""The Haiku tests in this folder really exercise ``bnjax.haiku.BatchNorm``."""

import haiku as hk
import pytest
from haiku._src import batch_norm as haiku_batch_norm

import bnjax.haiku
from tests.third_party.haiku import batch_norm_test, conftest


# Slow, as the vendored suite it checks (issue 19: the fast set under 90 s).
@pytest.mark.slow
def test_haiku_tests_see_bnjax_batch_norm(monkeypatch):
  assert conftest.HAIKU_BATCH_NORM is not bnjax.haiku.BatchNorm
  assert hk.BatchNorm is haiku_batch_norm.BatchNorm is bnjax.haiku.BatchNorm
  assert batch_norm_test.batch_norm.BatchNorm is bnjax.haiku.BatchNorm

  # Haiku's class never runs: make it fail, then run Haiku's tests of both modes.
  def refuse(*args, **kwargs):
    raise AssertionError("haiku.BatchNorm ran")

  monkeypatch.setattr(conftest.HAIKU_BATCH_NORM, "__call__", refuse)
  monkeypatch.setattr(conftest.HAIKU_BATCH_NORM, "__init__", refuse)
  case = batch_norm_test.BatchNormTest("test_basic")
  case.test_basic()
  case.test_simple_training_cross_replica_axis()
