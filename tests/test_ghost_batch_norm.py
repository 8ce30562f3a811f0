"""Ghost batch norm (virtual_batch_size) against a loop over groups."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference

STATIC = ("training", "axis", "unbiased_variance", "virtual_batch_size", "axis_name")
batch_norm = jax.jit(bnjax.batch_norm, static_argnames=STATIC)  # compiled whole, not op by op


def problem():
  """x [24, 5, 3] whose groups of rows differ in mean; params; init's state (NumPy draws:
  jax.random compiles a program per shape)."""
  rng = np.random.default_rng(0)
  x = 2 * rng.standard_normal((24, 5, 3)) + np.arange(24.0)[:, None, None] / 4
  params = bnjax.BatchNormParams(
    jnp.asarray(1 + 0.1 * rng.standard_normal(3), jnp.float32),
    jnp.asarray(0.2 * rng.standard_normal(3), jnp.float32),
  )
  return jnp.asarray(x, jnp.float32), params, bnjax.init(3)[1]


def test_matches_a_loop_over_groups():
  x, params, state = problem()
  ghost = lambda unbiased: bnjax.batch_norm(  # noqa: E731
    x, params, state, training=True, virtual_batch_size=6, momentum=0.0, unbiased_variance=unbiased
  )
  (y, new_state), (unbiased_y, unbiased_state) = jax.jit(lambda: (ghost(False), ghost(True)))()
  want_y, mu, var = reference.ghost_forward(
    x, np.asarray(params.scale), np.asarray(params.bias), 1e-5, 6, (0, 1)
  )
  m = 6 * 5
  for got_y, got_state, want_var in (
    (y, new_state, var),
    (unbiased_y, unbiased_state, var * m / (m - 1)),
  ):
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_state.mean, mu.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_state.var, want_var.ravel(), rtol=1e-5)


def test_gradients_match_a_loop_over_groups():
  """dx, dscale, dbias: the paper's Section 3 backward on each group of 8, in float64."""
  x, params, state = problem()
  w = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)

  def ghost(x, params):
    return jnp.sum(w * bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=8)[0])

  dx, dparams = jax.jit(jax.grad(ghost, argnums=(0, 1)))(x, params)
  gamma = np.asarray(params.scale, np.float64)
  groups = [
    reference.backward(x[i : i + 8], gamma, w[i : i + 8], 1e-5, (0, 1)) for i in range(0, 24, 8)
  ]
  want_dx, want_dscale, want_dbias = zip(*groups, strict=True)
  np.testing.assert_allclose(dx, np.concatenate(want_dx), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams.scale, np.sum(want_dscale, 0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams.bias, np.sum(want_dbias, 0), rtol=1e-4, atol=1e-4)


def test_whole_batch_is_plain_batch_norm():
  x, params, state = problem()
  a, b = jax.jit(
    lambda: (
      bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=24),
      bnjax.batch_norm(x, params, state, training=True),
    )
  )()
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


def test_running_statistics_averaged_across_devices():
  x, params, state = problem()

  def f(x):
    return bnjax.batch_norm(
      x, params, state, training=True, virtual_batch_size=3, axis_name="i", momentum=0.0
    )

  y, new_state = jax.pmap(f, axis_name="i")(x.reshape((8, 3) + x.shape[1:]))
  want_y, mu, var = reference.ghost_forward(
    x, np.asarray(params.scale), np.asarray(params.bias), 1e-5, 3, (0, 1)
  )
  np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)
  for device in range(8):  # every device holds the mean over all devices' groups
    np.testing.assert_allclose(new_state.mean[device], mu.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var[device], var.ravel(), rtol=1e-5)


def test_masked_groups():
  """Each group of 12 normalized with its own valid entries' statistics (float64
  reference), and the state moved by the mean of the groups'."""
  x, params, state = problem()
  mask = (np.arange(24 * 5).reshape(24, 5) % 3 != 0)[..., None]
  y, new_state = batch_norm(
    x, params, state, training=True, virtual_batch_size=12, mask=jnp.asarray(mask), momentum=0.0
  )
  means, variances = [], []
  for rows in (slice(0, 12), slice(12, 24)):
    valid = np.broadcast_to(mask[rows], x[rows].shape)
    want, mu, var = reference.forward(
      x[rows],
      np.asarray(params.scale, np.float64),
      np.asarray(params.bias, np.float64),
      1e-5,
      (0, 1),
      mask=valid,
    )
    np.testing.assert_allclose(y[rows], want, rtol=1e-5, atol=1e-5)
    means.append(mu.ravel())
    variances.append(var.ravel())
  np.testing.assert_allclose(new_state.mean, np.mean(means, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, np.mean(variances, 0), rtol=1e-5)


@pytest.mark.parametrize(
  "size, match",
  [
    (5, "virtual_batch_size 5 does not divide the batch of 24"),
    (0, "must be a positive int"),
    (2.5, "must be a positive int"),
  ],
)
def test_bad_virtual_batch_size(size, match):
  x, params, state = problem()
  with pytest.raises(ValueError, match=match):
    bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=size)


def test_leading_axis_must_be_a_batch_axis():
  x, params, state = problem()
  with pytest.raises(ValueError, match="must be a batch axis"):
    bnjax.batch_norm(
      x.transpose(2, 0, 1), params, state, training=True, axis=0, virtual_batch_size=3
    )


def test_linen_and_nnx_expose_it():
  x, params, state = problem()
  want, want_state = batch_norm(x, None, state, training=True, virtual_batch_size=6)
  module = bnjax.linen.BatchNorm(use_running_average=False, virtual_batch_size=6)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  y, updated = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))(variables, x)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updated["batch_stats"]["var"], want_state.var, rtol=1e-6)
  layer = bnjax.nnx.BatchNorm(3, virtual_batch_size=6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    nnx.jit(lambda layer, x: layer(x))(layer, x), want, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(layer.var[...], want_state.var, rtol=1e-6)


def test_fully_masked_virtual_batch_leaves_no_nan():
  """A padded final batch: its last virtual batch has no valid example."""
  x = jnp.arange(8.0).reshape(8, 1)
  mask = (jnp.arange(8) < 6)[:, None]  # groups {0,1} {2,3} {4,5} valid, {6,7} padding
  params, state = bnjax.init(1)

  def loss(x, params):
    y, new_state = bnjax.batch_norm(
      x, params, state, training=True, mask=mask, virtual_batch_size=2, momentum=0.0
    )
    return jnp.sum(jnp.where(mask, y * x, 0.0)), new_state

  (dx, dparams), new_state = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, params)
  np.testing.assert_allclose(new_state.mean, [2.5])  # mean of the group means 0.5, 2.5, 4.5
  np.testing.assert_allclose(new_state.var, [0.25])  # each valid group's biased variance
  # The valid groups, each Algorithm 1 on its own (d(y * x)/dx = y + backward(dy = x));
  # the padding gets no gradient.
  want_dx, want_dscale, want_dbias = [], 0.0, 0.0
  for group in np.split(np.asarray(x, np.float64)[:6], 3):
    y, _, _ = reference.forward(group, 1.0, 0.0, 1e-5, (0,))
    gx, gscale, gbias = reference.backward(group, 1.0, group, 1e-5, (0,))
    want_dx.append(y + gx)
    want_dscale, want_dbias = want_dscale + gscale, want_dbias + gbias
  np.testing.assert_allclose(dx, np.concatenate(want_dx + [np.zeros((2, 1))]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dparams.scale, want_dscale, rtol=1e-5)
  np.testing.assert_allclose(dparams.bias, want_dbias, rtol=1e-6)


def test_no_group_with_a_variance_leaves_the_state():
  x = jnp.arange(4.0).reshape(4, 1)
  params, state = bnjax.init(1)
  _, new_state = batch_norm(
    x, params, state, training=True, virtual_batch_size=1, unbiased_variance=True
  )
  np.testing.assert_allclose(new_state.var, state.var)  # one value per group: no unbiased variance
  np.testing.assert_allclose(new_state.mean, 0.01 * 1.5, rtol=1e-6)
