"""bnjax.update_moving_average: Flax's convention, traced momentum, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import moving_average


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


MOMENTA = [0.9, 0.99, 0.999]


@pytest.mark.parametrize("momentum", MOMENTA)
def test_a_python_float_momentum_is_complemented_in_double(momentum):
  """Issue 31 bug 1: ``1 - momentum`` was taken after rounding ``momentum`` to
  float32, which left the new value's weight 2.2e-7, 1.4e-6 and 1.3e-5 off (0.9,
  0.99, 0.999). From a zero average the result is that weight times the value:
  rounded once, it is within one float32 rounding of float64's."""
  value = np.array([2.0, 3.0, -7.0], np.float32)

  @jax.jit
  def update(average, value):
    return bnjax.update_moving_average(average, value, momentum=momentum)

  new = np.asarray(update(jnp.zeros(3), jnp.asarray(value)), np.float64)
  np.testing.assert_allclose(new, (1 - momentum) * value.astype(np.float64), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("momentum", MOMENTA)
def test_the_core_moves_its_statistics_as_flax_linen_does(momentum):
  """The same batch (statistics exact in float32) through ``bnjax.batch_norm`` and
  ``flax.linen.BatchNorm``: the running statistics agree to float32 rounding
  (before the fix, to 1e-5 at momentum 0.999), and both to float64's."""
  from flax import linen as nn

  x = jnp.array([[1.0, 10.0, -3.0], [3.0, 30.0, -5.0]])  # mean (2, 20, -4), var (1, 100, 1)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=momentum)

  @jax.jit
  def both(x):
    params, state = bnjax.init(3)
    _, ours = bnjax.batch_norm(x, params, state, training=True, momentum=momentum)
    with jax.numpy_dtype_promotion("standard"):
      _, theirs = flax_bn.apply(flax_bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    return ours, theirs["batch_stats"]

  ours, theirs = both(x)
  want_mean = (1 - momentum) * np.array([2.0, 20.0, -4.0])
  want_var = momentum + (1 - momentum) * np.array([1.0, 100.0, 1.0])
  for got, flax_value, want in (
    (ours.mean, theirs["mean"], want_mean),
    (ours.var, theirs["var"], want_var),
  ):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1.2e-7)
    np.testing.assert_allclose(got, flax_value, rtol=1.2e-7)


def test_float64_statistics_are_updated_in_float64(x64):
  new = jax.jit(lambda a, v: bnjax.update_moving_average(a, v, momentum=0.999))(
    jnp.array([1.0, -2.0]), jnp.array([3.0, 5.0])
  )
  assert new.dtype == jnp.float64
  np.testing.assert_allclose(
    new, 0.999 * np.array([1.0, -2.0]) + 0.001 * np.array([3.0, 5.0]), rtol=1e-15
  )


def test_a_traced_momentum_is_used_in_its_own_dtype():
  """A traced momentum has been rounded already: ``1 - momentum`` is exact of it."""
  momentum = jnp.float32(0.999)
  new = jax.jit(lambda m: bnjax.update_moving_average(jnp.zeros(1), jnp.ones(1), momentum=m))(
    momentum
  )
  np.testing.assert_array_equal(new, [1 - np.float64(momentum)])


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.999])
def test_zero_debias_factor_is_one_minus_the_power_without_cancellation(momentum):
  counts = np.arange(0, 2000, 7)
  got = jax.jit(lambda c: moving_average.zero_debias_factor(momentum, c))(counts)
  np.testing.assert_allclose(got, 1 - momentum ** counts.astype(np.float64), rtol=4e-7, atol=0)


@pytest.mark.parametrize("variant", ["plain", "ghost", "renorm"])
def test_every_variant_complements_the_momentum_in_double(variant):
  """Plain, ghost and renorm updates all take a Python momentum's ``1 - momentum``
  in double (at 0.999, rounding first made the new value's weight 1.3e-5 off)."""
  x = jnp.array([[1.0, 10.0], [3.0, 30.0], [1.0, 10.0], [3.0, 30.0]])  # groups alike
  state = bnjax.BatchNormState(jnp.zeros(2), jnp.zeros(2))
  options = dict(training=True, momentum=0.999)
  if variant == "renorm":
    run = lambda x: bnjax.batch_renorm(x, None, state, r_max=1.0, d_max=0.0, **options)  # noqa: E731
  else:
    size = 2 if variant == "ghost" else None
    run = lambda x: bnjax.batch_norm(x, None, state, virtual_batch_size=size, **options)  # noqa: E731
  _, new = jax.jit(run)(x)
  np.testing.assert_allclose(
    np.asarray(new.mean, np.float64), 0.001 * np.array([2.0, 20.0]), rtol=1.2e-7
  )
  np.testing.assert_allclose(
    np.asarray(new.var, np.float64), 0.001 * np.array([1.0, 100.0]), rtol=1.2e-7
  )
