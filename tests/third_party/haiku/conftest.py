"""Runs Haiku's own BatchNorm tests against ``bnjax.haiku.BatchNorm``.

``batch_norm_test.py`` is Haiku's ``haiku/_src/batch_norm_test.py`` as the dm-haiku
0.0.17 wheel ships it (google-deepmind/dm-haiku, Apache-2.0: its header and
``LICENSE`` in this folder), unchanged. ``hk.BatchNorm`` (and the class in
``haiku._src.batch_norm``, which the test file calls) is replaced by bnjax's before
each test runs; ``test_replacement.py`` checks it, and that Haiku's class never
runs. The suite's conftest gives them 8 CPU devices. All 11 pass, as with Haiku.
They are slow (about 10 s here); the replacement check is fast.
"""

import haiku as hk
import jax
import pytest
from haiku._src import batch_norm as haiku_batch_norm

import bnjax.haiku
from tests import third_party

HAIKU_BATCH_NORM = hk.BatchNorm


@pytest.fixture(autouse=True)
def _bnjax_in_place_of_haiku_batch_norm(monkeypatch):
  for module in (hk, haiku_batch_norm):
    monkeypatch.setattr(module, "BatchNorm", bnjax.haiku.BatchNorm)


@pytest.fixture(autouse=True)
def _jax_default_promotion():
  """Haiku's tests are written for JAX's default promotion rules, not the suite's
  strict ones: with Haiku's own BatchNorm, 4 of the 11 fail under strict promotion
  (NumPy float64 inputs, ``(5,)`` scales against ``[1, 1, 1, 5]`` parameters)."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
  third_party.mark_slow(__file__, items)
