"""Runs Flax's own BatchNorm tests against bnjax's drop-ins.

The ``*_test.py`` files are excerpts of Flax's tests (google/flax, Apache-2.0, commit
18f8f311, whose ``flax/`` matches the pinned flax 0.12.8) that exercise BatchNorm,
written by ``vendor_flax_tests.py``.
Here ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` (and the same classes in
``flax.linen.normalization`` and ``flax.nnx.nn.normalization``) are replaced by
bnjax's before each test runs (``test_replacement.py`` checks it).

All of them pass with bnjax's classes; the few BatchNorm tests not copied (redundant
variants, for time) are listed with the reason in the header of their excerpt. Where
Flax compares nnx with linen bit for bit, both are bnjax's here, and they agree bit for
bit (no test needed a tolerance).
"""

import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization
import jax
import pytest

import bnjax.linen
import bnjax.nnx
from tests import third_party

FLAX_BATCH_NORM = flax.linen.BatchNorm
FLAX_NNX_BATCH_NORM = flax.nnx.BatchNorm


@pytest.fixture(autouse=True)
def _bnjax_in_place_of_flax_batch_norm(monkeypatch):
  for module in (flax.linen, flax.linen.normalization):
    monkeypatch.setattr(module, "BatchNorm", bnjax.linen.BatchNorm)
  for module in (flax.nnx, flax.nnx.nn.normalization):
    monkeypatch.setattr(module, "BatchNorm", bnjax.nnx.BatchNorm)


@pytest.fixture(autouse=True)
def _jax_default_promotion(request):
  """Flax's tests are written for JAX's default promotion rules, not the suite's
  strict ones (with Flax's own BatchNorm, 29 of the excerpts' tests fail under
  strict promotion, in Flax's code and in the tests'); linen_test.py passes under
  strict promotion and stays under it."""
  if request.path.name == "linen_test.py":
    yield
    return
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
  """Flax's tests (about 2 min on the shared 2-core machine, most of it XLA compiling
  Flax's eager calls, in Flax's code) are slow; the fast tests compare bnjax with
  Flax in tests/test_linen.py and tests/test_nnx.py."""
  third_party.mark_slow(__file__, items)
