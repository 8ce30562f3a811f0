"""bnjax.sync_state, and frozen batch norm (inference mode inside training)."""

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from tests.derivatives import check_derivatives


def test_sync_state_is_the_mean_over_devices():
  states = bnjax.BatchNormState(jnp.arange(24.0).reshape(8, 3), jnp.arange(24.0).reshape(8, 3) ** 2)
  synced = jax.pmap(lambda s: bnjax.sync_state(s, "i"), axis_name="i")(states)
  for d in range(8):
    np.testing.assert_allclose(synced.mean[d], np.mean(np.asarray(states.mean), 0), rtol=1e-6)
    np.testing.assert_allclose(synced.var[d], np.mean(np.asarray(states.var), 0), rtol=1e-6)


def test_per_device_statistics_synced_before_evaluation():
  """The Flax ImageNet example's recipe: unsynchronized training, sync, evaluate."""
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((8, 6, 3)) + np.arange(8.0)[:, None, None], jnp.float32
  )
  params, state = bnjax.init(3)
  step = jax.pmap(
    lambda x: bnjax.sync_state(
      bnjax.batch_norm(x, params, state, training=True, momentum=0.0)[1], "i"
    ),
    axis_name="i",
  )
  synced = step(x)
  per_device_var = np.asarray(x, np.float64).var(axis=1)
  np.testing.assert_allclose(synced.var[0], per_device_var.mean(0), rtol=1e-5)


def test_frozen_batch_norm_trains_scale_and_bias_with_exact_gradients(x64):
  """Training with training=False: running statistics fixed, gradients exact."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)), jnp.float64)
  params = bnjax.BatchNormParams(jnp.array([1.0, 2.0, 0.5, -1.0]), jnp.zeros(4))
  state = bnjax.BatchNormState(jnp.array([0.1, -0.3, 2.0, 0.0]), jnp.array([1.0, 0.5, 4.0, 9.0]))

  def frozen(x, scale, bias):
    return bnjax.batch_norm(x, bnjax.BatchNormParams(scale, bias), state, training=False)[0]

  check_derivatives(
    frozen, (x, params.scale, params.bias), order=2, modes=["fwd", "rev"], atol=1e-7, rtol=1e-7
  )
  dscale = jax.jit(jax.grad(lambda s: jnp.sum(frozen(x, s, params.bias))))(params.scale)
  want = np.sum(
    (np.asarray(x) - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var) + 1e-5), axis=0
  )
  np.testing.assert_allclose(dscale, want, rtol=1e-10)
  _, new_state = bnjax.batch_norm(x, params, state, training=False)  # eager
  assert new_state is state
