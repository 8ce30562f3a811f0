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


def problem():
  keys = jax.random.split(jax.random.key(0), 3)
  x = 2 * jax.random.normal(keys[0], (24, 5, 3)) + jnp.arange(24.0)[:, None, None] / 4  # groups differ
  params = bnjax.BatchNormParams(1 + 0.1 * jax.random.normal(keys[1], (3,)), 0.2 * jax.random.normal(keys[2], (3,)))
  return x, params, bnjax.init(3)[1]


@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_a_loop_over_groups(unbiased):
  x, params, state = problem()
  y, new_state = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=6, momentum=0.0,
                                  unbiased_variance=unbiased)
  want_y, mu, var = reference.ghost_forward(x, np.asarray(params.scale), np.asarray(params.bias), 1e-5, 6, (0, 1))
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, mu.ravel(), rtol=1e-5, atol=1e-6)
  m = 6 * 5
  np.testing.assert_allclose(new_state.var, var.ravel() * (m / (m - 1) if unbiased else 1), rtol=1e-5)


def test_gradients_match_a_loop_over_groups():
  x, params, state = problem()
  w = jax.random.normal(jax.random.key(4), x.shape)

  def ghost(x, params):
    return jnp.sum(w * bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=8)[0])

  def loop(x, params):
    return sum(jnp.sum(w[i:i + 8] * bnjax.batch_norm(x[i:i + 8], params, state, training=True)[0])
               for i in range(0, 24, 8))

  got, want = jax.grad(ghost, argnums=(0, 1))(x, params), jax.grad(loop, argnums=(0, 1))(x, params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_whole_batch_is_plain_batch_norm():
  x, params, state = problem()
  a = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=24)
  b = bnjax.batch_norm(x, params, state, training=True)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


def test_running_statistics_averaged_across_devices():
  x, params, state = problem()
  f = lambda x: bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=3,  # noqa: E731
                                 axis_name="i", momentum=0.0)
  y, new_state = jax.pmap(f, axis_name="i")(x.reshape((8, 3) + x.shape[1:]))
  want_y, mu, var = reference.ghost_forward(x, np.asarray(params.scale), np.asarray(params.bias), 1e-5, 3, (0, 1))
  np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.var[0], var.ravel(), rtol=1e-5)
  np.testing.assert_allclose(new_state.mean[7], mu.ravel(), rtol=1e-5, atol=1e-6)


def test_masked_groups():
  x, params, state = problem()
  mask = (jnp.arange(24 * 5).reshape(24, 5) % 3 != 0)[..., None]
  y, _ = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=12, mask=mask)
  for start in (0, 12):
    want, _ = bnjax.batch_norm(x[start:start + 12], params, state, training=True, mask=mask[start:start + 12])
    np.testing.assert_allclose(y[start:start + 12], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, match", [(5, "virtual_batch_size 5 does not divide the batch of 24"),
                                         (0, "must be a positive int"), (2.5, "must be a positive int")])
def test_bad_virtual_batch_size(size, match):
  x, params, state = problem()
  with pytest.raises(ValueError, match=match):
    bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=size)


def test_leading_axis_must_be_a_batch_axis():
  x, params, state = problem()
  with pytest.raises(ValueError, match="must be a batch axis"):
    bnjax.batch_norm(x.transpose(2, 0, 1), params, state, training=True, axis=0, virtual_batch_size=3)


def test_linen_and_nnx_expose_it():
  x, params, state = problem()
  want, want_state = bnjax.batch_norm(x, None, state, training=True, virtual_batch_size=6)
  module = bnjax.linen.BatchNorm(use_running_average=False, virtual_batch_size=6)
  y, updated = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updated["batch_stats"]["var"], want_state.var, rtol=1e-6)
  layer = bnjax.nnx.BatchNorm(3, virtual_batch_size=6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)


def test_fully_masked_virtual_batch_leaves_no_nan():
  """A padded final batch: its last virtual batch has no valid example."""
  x = jnp.arange(8.0).reshape(8, 1)
  mask = (jnp.arange(8) < 6)[:, None]  # groups {0,1} {2,3} {4,5} valid, {6,7} padding
  params, state = bnjax.init(1)

  def loss(x, params):
    y, new_state = bnjax.batch_norm(x, params, state, training=True, mask=mask, virtual_batch_size=2, momentum=0.0)
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
  _, new_state = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=1, unbiased_variance=True)
  np.testing.assert_allclose(new_state.var, state.var)  # one value per group: no unbiased variance
  np.testing.assert_allclose(new_state.mean, 0.01 * 1.5, rtol=1e-6)
