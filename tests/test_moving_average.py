"""bnjax.update_moving_average: Flax's convention, traced momentum, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def test_momentum_is_the_weight_of_the_old_average():
  new = bnjax.update_moving_average(jnp.array([1.0, 2.0]), jnp.array([3.0, 6.0]), momentum=0.9)
  np.testing.assert_allclose(new, [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6], rtol=1e-7)


def test_cumulative_average_from_a_traced_schedule():
  values = jnp.asarray(np.random.default_rng(0).standard_normal((10, 3)), jnp.float32)

  @jax.jit
  def run(values):
    def step(average, kv):
      k, value = kv
      momentum = k / (k + 1.0)  # weight k/(k+1) on the old average: the plain mean
      return bnjax.update_moving_average(average, value, momentum=momentum), None

    average, _ = jax.lax.scan(step, jnp.zeros(3), (jnp.arange(10.0), values))
    return average

  np.testing.assert_allclose(
    run(values), np.mean(np.asarray(values, np.float64), axis=0), rtol=1e-5, atol=1e-6
  )


def test_keeps_the_average_dtype():
  new = bnjax.update_moving_average(
    jnp.zeros(2), jnp.array([1.0, -3.0], jnp.bfloat16), momentum=0.25
  )
  assert new.dtype == jnp.float32
  np.testing.assert_array_equal(new, [0.75, -2.25])  # exact in float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_average_uses_the_exact_momentum(dtype):
  """Issue 8 item 5: computed in float32 and rounded once (0.99 in bfloat16 is
  0.98828, which gave the new value 17% too much weight)."""
  new = bnjax.update_moving_average(jnp.zeros(1, dtype), jnp.full(1, 100.0, dtype), momentum=0.99)
  assert new.dtype == dtype
  np.testing.assert_array_equal(new.astype(jnp.float32), [1.0])
  traced = jax.jit(bnjax.update_moving_average)(
    jnp.full(1, 2.0, dtype), jnp.full(1, 3.0, dtype), momentum=0.999
  )
  np.testing.assert_array_equal(
    traced.astype(jnp.float32), np.asarray(np.float64(2.001), dtype).astype(np.float32)
  )


@pytest.mark.parametrize("variant", ["plain", "ghost", "renorm"])
def test_half_precision_running_statistics_are_rounded_once(variant):
  """Every state update of the core (plain, ghost, renorm) goes through it."""
  x = jnp.tile(jnp.array([[90.0, -20.0], [110.0, 20.0]]), (4, 1))  # mean (100, 0), var (100, 400)
  params, state = bnjax.init(2)
  state = jax.tree.map(lambda s: s.astype(jnp.bfloat16), state)
  if variant == "renorm":

    def step(x, state):
      return bnjax.batch_renorm(
        x, params, state, training=True, r_max=1.0, d_max=0.0, momentum=0.99
      )
  else:

    def step(x, state):
      return bnjax.batch_norm(
        x,
        params,
        state,
        training=True,
        momentum=0.99,
        virtual_batch_size=4 if variant == "ghost" else None,
      )

  _, new = jax.jit(step)(x, state)
  want_mean = np.asarray([0.99 * 0 + 0.01 * 100, 0.0], np.float64)
  want_var = np.asarray([0.99 * 1 + 0.01 * 100, 0.99 * 1 + 0.01 * 400], np.float64)
  for got, want in ((new.mean, want_mean), (new.var, want_var)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
      got.astype(jnp.float32), want.astype(jnp.bfloat16).astype(np.float32)
    )
