"""The Flax tests in this folder really exercise bnjax's module."""

import flax.linen

import bnjax.linen
from tests.third_party.flax import conftest, linen_test


def test_flax_tests_see_bnjax_batch_norm():
  assert linen_test.nn.BatchNorm is bnjax.linen.BatchNorm
  assert conftest.FLAX_BATCH_NORM is not bnjax.linen.BatchNorm
  assert flax.linen.BatchNorm is bnjax.linen.BatchNorm
