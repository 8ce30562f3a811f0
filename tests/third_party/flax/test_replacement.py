"""The Flax tests in this folder really exercise bnjax's modules."""

import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization

import bnjax.linen
import bnjax.nnx
from tests.third_party.flax import (
  conftest,
  linen_test,
  nnx_integration_test,
  nnx_normalization_test,
)


def test_flax_tests_see_bnjax_batch_norm():
  assert conftest.FLAX_BATCH_NORM is not bnjax.linen.BatchNorm
  assert conftest.FLAX_NNX_BATCH_NORM is not bnjax.nnx.BatchNorm
  assert flax.linen.BatchNorm is flax.linen.normalization.BatchNorm is bnjax.linen.BatchNorm
  assert flax.nnx.BatchNorm is flax.nnx.nn.normalization.BatchNorm is bnjax.nnx.BatchNorm
  assert linen_test.nn.BatchNorm is nnx_normalization_test.linen.BatchNorm is bnjax.linen.BatchNorm
  assert (
    nnx_integration_test.nnx.BatchNorm
    is nnx_normalization_test.nnx.BatchNorm
    is bnjax.nnx.BatchNorm
  )
