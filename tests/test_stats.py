"""bnjax.stats: exact moments in one pass or two, exact combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import stats
from tests import reference
from tests.samples import normal

# Compiled once per shape (eager calls compile each primitive on its own).
batch_moments = jax.jit(stats.batch_moments, static_argnames=("reduction_axes",))


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, -3e4])
@pytest.mark.parametrize(
  "shape, axes", [((4096,), (0,)), ((16, 7, 9, 3), (0, 1, 2)), ((5, 40, 2), (0, 1))]
)
def test_batch_moments_exact(shape, axes, offset):
  x = normal(0, shape, offset)
  m = batch_moments(x, reduction_axes=axes)
  mu, var = reference.batch_mean_var(x, axes)
  np.testing.assert_allclose(m.mean, mu.reshape(m.mean.shape), rtol=1e-7, atol=1e-6)
  np.testing.assert_allclose(m.variance, var.reshape(m.mean.shape), rtol=1e-5)
  assert float(m.count.reshape(-1)[0]) == np.prod([shape[a] for a in axes])


@pytest.mark.parametrize("mean_per_std", [0.0, 1.99, 2.01, 30.0, -1e5])
def test_one_pass_and_two_pass_statistics_are_exact(mean_per_std):
  """|mean| <= 2 std takes one pass around zero, further out two (around the first
  pass's mean): both within a few float32 roundings of float64."""
  z = np.random.default_rng(5).normal(size=(8192, 3))
  z = (z - z.mean(0)) / z.std(0)  # standardized, so that mean_per_std is what it says
  x = jnp.asarray(3.0 * z + 3.0 * mean_per_std, jnp.float32)
  m = batch_moments(x, reduction_axes=(0,))
  mu, var = reference.batch_mean_var(x, (0,))
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=2e-6)
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=2e-7, atol=3e-7)


def test_sorted_and_single_outlier_batches_are_exact():
  # Worst cases for a shift taken from part of the batch: sorted values, a single
  # outlier first, all of the mass at the start.
  outlier_first = np.zeros((1600, 1))
  outlier_first[0] = 1e6
  for x in (
    np.sort(np.asarray(normal(1, (4096, 1))), axis=0) + 1e3,
    outlier_first,
    np.where(np.arange(1600)[:, None] < 100, 1.0, 0.0) + 1e4,
  ):
    x = jnp.asarray(x, jnp.float32)
    m = batch_moments(x, reduction_axes=(0,))
    mu, var = reference.batch_mean_var(x, (0,))
    np.testing.assert_allclose(m.variance, var.ravel(), rtol=2e-5)


def test_values_whose_squares_overflow():
  """Squares of values near 1e25 overflow float32: the second pass centers them on
  the first pass's mean, and the variance (1e36) is exact."""
  x = 1e25 + 1e18 * normal(6, (64, 2))
  m = batch_moments(x, reduction_axes=(0,))
  mu, var = reference.batch_mean_var(x, (0,))
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=1e-7)
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=1e-5)


def test_masked_moments_ignore_nan_and_inf():
  index = np.arange(60).reshape(10, 6, 1)
  mask = index % 7 != 3
  x = np.where(mask, normal(2, (10, 6, 2), 50.0), np.where(index % 2 == 0, np.nan, np.inf))
  m = batch_moments(jnp.asarray(x, jnp.float32), reduction_axes=(0, 1), mask=jnp.asarray(mask))
  mu, var = reference.batch_mean_var(x, (0, 1), mask=np.broadcast_to(mask, x.shape))
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=1e-6)
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=1e-5)
  np.testing.assert_allclose(m.count, [int(mask.sum())] * 2)


def test_combine_moments_equals_moments_of_the_union():
  rng = np.random.default_rng(0)
  sizes = (1, 7, 20, 3)
  parts = [rng.normal(5e3, 2.0, size=(n, 3)).astype(np.float32) for n in sizes]
  # Each part's moments, as one array of parts padded to 20 rows and masked.
  padded = np.stack([np.pad(p, ((0, 20 - len(p)), (0, 0))) for p in parts])
  valid = np.arange(20)[None, :, None] < np.array(sizes)[:, None, None]

  @jax.jit
  def combined(padded, valid):
    parts = jax.vmap(lambda x, v: stats.batch_moments(x, reduction_axes=(0,), mask=v))(
      padded, valid
    )
    return parts, stats.combine_moments(parts)

  parts_moments, m = combined(jnp.asarray(padded), jnp.asarray(valid))
  np.testing.assert_array_equal(parts_moments.count[:, 0], sizes)
  np.testing.assert_allclose(
    parts_moments.mean, [p.astype(np.float64).mean(0) for p in parts], rtol=1e-7
  )
  union = np.concatenate(parts)
  mu, var = reference.batch_mean_var(union, (0,))
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=1e-7)
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=1e-4)
  np.testing.assert_allclose(
    m.unbiased_variance, var.ravel() * len(union) / (len(union) - 1), rtol=1e-4
  )


def test_half_precision_reduced_in_float32():
  x = normal(3, (512, 2), 8.0).astype(jnp.bfloat16)
  m = batch_moments(x, reduction_axes=(0,))
  assert m.mean.dtype == m.m2.dtype == jnp.float32
  mu, var = reference.batch_mean_var(np.asarray(x.astype(jnp.float32)), (0,))
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=1e-6)
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=1e-5)


def test_statistics_dtype():
  assert stats.statistics_dtype(jnp.float16) == jnp.float32
  assert stats.statistics_dtype(jnp.bfloat16, jnp.float32) == jnp.float32
  assert stats.statistics_dtype(jnp.float32, jnp.complex64) == jnp.complex64
