"""bnjax.stats: exact moments, the shift bound, exact combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax import stats
from tests import reference

# Compiled once per shape (eager calls compile each primitive on its own).
batch_moments = jax.jit(stats.batch_moments, static_argnames=("reduction_axes",))
estimate_shift = jax.jit(stats.estimate_shift, static_argnames=("reduction_axes",))


def normal(seed, shape, offset=0.0):
  """float32 samples from NumPy (jax.random compiles a program per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) + offset, jnp.float32)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, -3e4])
@pytest.mark.parametrize("shape, axes", [((4096,), (0,)), ((16, 7, 9, 3), (0, 1, 2)), ((5, 40, 2), (0, 1))])
def test_batch_moments_exact(shape, axes, offset):
  x = normal(0, shape, offset)
  m = batch_moments(x, reduction_axes=axes)
  mu, var = reference.batch_mean_var(x, axes)
  np.testing.assert_allclose(m.mean, mu.reshape(m.mean.shape), rtol=1e-7, atol=1e-6)
  np.testing.assert_allclose(m.variance, var.reshape(m.mean.shape), rtol=1e-5)
  assert float(m.count.reshape(-1)[0]) == np.prod([shape[a] for a in axes])


def test_shift_is_within_four_standard_deviations_on_any_input():
  # The slice's mean can be at most sqrt(16) standard deviations from the mean:
  # sorted values, a single outlier, or all mass at the start are worst cases.
  outlier_first = np.zeros((1600, 1))
  outlier_first[0] = 1e6
  cases = {
      "sorted": np.sort(np.asarray(normal(1, (1600, 1))), axis=0),
      "outlier_first": outlier_first,
      "step": np.where(np.arange(1600)[:, None] < 100, 1.0, 0.0),
  }
  for name, x in cases.items():
    x = jnp.asarray(x, jnp.float32)
    shift = estimate_shift(x, reduction_axes=(0,))
    mu, var = reference.batch_mean_var(x, (0,))
    distance = np.abs(np.asarray(shift, np.float64) - mu.ravel()) / np.sqrt(var.ravel())
    assert distance.max() <= 4.0 + 1e-6, (name, distance)


def test_shift_slice_respects_explicit_sharding():
  mesh = jax.make_mesh((8,), ("batch",))
  x = jax.device_put(jnp.arange(64.0).reshape(64, 1), NamedSharding(mesh, P("batch")))
  # One example of each device's 8: rows 0, 8, 16, ... (no device reads another's).
  shift = jax.jit(lambda x: stats.estimate_shift(x, reduction_axes=(0,)))(x)
  np.testing.assert_allclose(shift, [np.mean(np.arange(0, 64, 8))])


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
    parts = jax.vmap(lambda x, v: stats.batch_moments(x, reduction_axes=(0,), mask=v))(padded, valid)
    return parts, stats.combine_moments(parts)

  parts_moments, m = combined(jnp.asarray(padded), jnp.asarray(valid))
  np.testing.assert_array_equal(parts_moments.count[:, 0], sizes)
  np.testing.assert_allclose(parts_moments.mean, [p.astype(np.float64).mean(0) for p in parts], rtol=1e-7)
  union = np.concatenate(parts)
  mu, var = reference.batch_mean_var(union, (0,))
  np.testing.assert_allclose(m.mean, mu.ravel(), rtol=1e-7)
  np.testing.assert_allclose(m.variance, var.ravel(), rtol=1e-4)
  np.testing.assert_allclose(m.unbiased_variance, var.ravel() * len(union) / (len(union) - 1), rtol=1e-4)


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
