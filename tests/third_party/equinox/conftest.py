"""Runs Equinox's own BatchNorm tests against ``bnjax.equinox.BatchNorm``.

``*_test.py`` here are excerpts of Equinox's tests at v0.13.8 (the installed
version): every test that constructs ``eqx.nn.BatchNorm`` (see
``vendor_equinox_tests.py``), unchanged. ``eqx.nn.BatchNorm`` (and the class in
``equinox.nn._batch_norm``) is replaced by bnjax's before each test runs
(``test_replacement.py`` checks it, and that Equinox's class never runs). Every one
of them passes with bnjax: none asserts Equinox's running variance at 0 (the
``"ema"`` mode's, until its first training step) or its ``"batch"`` mode's
debiasing of a variance that starts at 1, where bnjax differs on purpose;
tests/test_equinox.py checks both against the float64 reference.
"""

import equinox as eqx
import equinox.nn._batch_norm
import pytest

import bnjax.equinox
from tests import third_party

EQUINOX_BATCH_NORM = eqx.nn.BatchNorm


@pytest.fixture(autouse=True)
def _bnjax_in_place_of_equinox_batch_norm(monkeypatch):
  for module in (eqx.nn, equinox.nn._batch_norm):
    monkeypatch.setattr(module, "BatchNorm", bnjax.equinox.BatchNorm)


@pytest.fixture
def getkey():
  """Equinox's fixture (its tests/conftest.py): a fresh PRNG key per call."""
  import equinox.internal as eqxi

  return eqxi.GetKey()


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
  """Equinox's tests (11, about 30 s here) are slow; the replacement check is fast."""
  third_party.mark_slow(__file__, items)
