"""bnjax.update_moving_average: Flax's convention, traced momentum, schedules."""

import jax
import jax.numpy as jnp
import numpy as np

import bnjax


def test_momentum_is_the_weight_of_the_old_average():
  new = bnjax.update_moving_average(jnp.array([1.0, 2.0]), jnp.array([3.0, 6.0]), momentum=0.9)
  np.testing.assert_allclose(new, [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6], rtol=1e-7)


def test_cumulative_average_from_a_traced_schedule():
  values = jax.random.normal(jax.random.key(0), (10, 3))

  @jax.jit
  def run(values):
    def step(average, kv):
      k, value = kv
      momentum = k / (k + 1.0)  # weight k/(k+1) on the old average: the plain mean
      return bnjax.update_moving_average(average, value, momentum=momentum), None
    average, _ = jax.lax.scan(step, jnp.zeros(3), (jnp.arange(10.0), values))
    return average

  np.testing.assert_allclose(run(values), np.mean(np.asarray(values, np.float64), axis=0), rtol=1e-5, atol=1e-6)


def test_keeps_the_average_dtype():
  new = bnjax.update_moving_average(jnp.zeros(2), jnp.ones(2, jnp.bfloat16), momentum=0.5)
  assert new.dtype == jnp.float32
