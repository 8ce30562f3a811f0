"""Runs Flax's own BatchNorm tests against ``bnjax.linen.BatchNorm``.

``linen_test.py`` is Flax's ``tests/linen/linen_test.py`` (google/flax, Apache-2.0,
commit 18f8f311), unchanged. Here ``flax.linen.BatchNorm`` is replaced by bnjax's
before those tests run, and only its batch-norm tests are collected.
"""

import flax.linen
import pytest

import bnjax.linen

FLAX_BATCH_NORM = flax.linen.BatchNorm


@pytest.fixture(autouse=True)
def _bnjax_in_place_of_flax_batch_norm(monkeypatch):
  monkeypatch.setattr(flax.linen, "BatchNorm", bnjax.linen.BatchNorm)


def pytest_collection_modifyitems(config, items):
  """Keeps the batch-norm tests of linen_test.py; the rest test other modules."""
  here = __file__.rsplit("/", 1)[0]
  deselected = [
      item for item in items
      if str(item.fspath).startswith(here) and "batch_norm" not in item.name
      and item.fspath.basename == "linen_test.py"
  ]
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if item not in deselected]
