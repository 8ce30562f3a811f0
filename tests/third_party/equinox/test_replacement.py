"""The Equinox tests in this folder really exercise ``bnjax.equinox.BatchNorm``."""

import equinox as eqx
import equinox.nn._batch_norm
import jax
import jax.numpy as jnp
import pytest

import bnjax.equinox
from tests.third_party.equinox import conftest, nn_test


# Slow, as the vendored suite it checks (issue 19: the fast set under 90 s).
@pytest.mark.slow
def test_equinox_tests_see_bnjax_batch_norm(monkeypatch):
  assert conftest.EQUINOX_BATCH_NORM is not bnjax.equinox.BatchNorm
  assert eqx.nn.BatchNorm is equinox.nn._batch_norm.BatchNorm is bnjax.equinox.BatchNorm
  assert nn_test.eqx.nn.BatchNorm is bnjax.equinox.BatchNorm

  # Equinox's class never runs: make it fail, then run one of its tests.
  def refuse(*args, **kwargs):
    raise AssertionError("equinox.nn.BatchNorm ran")

  monkeypatch.setattr(conftest.EQUINOX_BATCH_NORM, "__call__", refuse)
  monkeypatch.setattr(conftest.EQUINOX_BATCH_NORM, "__init__", refuse)
  nn_test.test_batch_norm_zero_training_steps(lambda: jax.random.key(0))
  layer = eqx.nn.BatchNorm(2, "batch", mode="batch")
  assert type(layer) is bnjax.equinox.BatchNorm
  assert jnp.shape(layer.weight) == (2,)
