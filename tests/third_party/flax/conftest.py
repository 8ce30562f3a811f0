"""Runs Flax's own BatchNorm tests against bnjax's drop-ins.

``linen_test.py`` is Flax's ``tests/linen/linen_test.py`` (google/flax, Apache-2.0,
commit 18f8f311, whose ``flax/`` matches the pinned flax 0.12.8), unchanged, of which
only the batch-norm tests are collected. The other ``*_test.py`` files are excerpts
of Flax's tests at that commit that exercise BatchNorm (see ``vendor_flax_tests.py``).
Here ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` (and the same classes in
``flax.linen.normalization`` and ``flax.nnx.nn.normalization``) are replaced by
bnjax's before each test runs (``test_replacement.py`` checks it).

Flax tests expected to fail are listed in ``EXPECTED_FAILURES`` with the reason;
the few BatchNorm tests not copied (redundant variants, for time) are listed with
the reason in the header of their excerpt. Where Flax compares nnx with linen bit for bit, both are
bnjax's here, and they agree bit for bit (no test needed a tolerance).
"""

import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization
import jax
import pytest

import bnjax.linen
import bnjax.nnx

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


# Flax's test (file::class::name) -> (why it fails with bnjax's BatchNorm, strict).
# None since issue 8: masks broadcast as NumPy broadcasts them, and an input with no
# batch axis is a batch of one value per feature, as Flax computes it.
EXPECTED_FAILURES: dict[str, tuple[str, bool]] = {}


# The files of this folder that stay in the fast tests: the check that the Flax tests
# see bnjax's classes. Flax's tests themselves (135 tests: 2 min on the shared 2-core
# machine, 11 s of it the docstring examples; most of it XLA compiling Flax's eager
# calls, in Flax's code, which stays as it is) are a compatibility suite: marked slow,
# they run in CI. The fast tests compare bnjax with Flax in tests/test_linen.py and
# tests/test_nnx.py.
FAST = {"test_replacement.py"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
  """Marks EXPECTED_FAILURES, and Flax's tests slow; keeps the batch-norm tests of
  linen_test.py (the rest of that file tests other modules)."""
  here = __file__.rsplit("/", 1)[0]
  for item in items:
    expected = EXPECTED_FAILURES.get(item.nodeid.rsplit("/", 1)[-1])
    if expected:
      reason, strict = expected
      item.add_marker(pytest.mark.xfail(reason=reason, strict=strict))
    if str(item.fspath).startswith(here) and item.fspath.basename not in FAST:
      item.add_marker(pytest.mark.slow)
  deselected = [
    item
    for item in items
    if str(item.fspath).startswith(here)
    and "batch_norm" not in item.name
    and item.fspath.basename == "linen_test.py"
  ]
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if item not in deselected]
