"""Half-precision activations across the features: float32 statistics and state,
output in the activation dtype, parameters in their own dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx

HALF = [jnp.bfloat16, jnp.float16]


def activations(dtype):
  return (1.5 * jax.random.normal(jax.random.key(0), (16, 4, 3)) + 3.0).astype(dtype)


def float32_reference(fn, x, *args, **kwargs):
  return fn(x.astype(jnp.float32), *args, **kwargs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("variant", ["plain", "ghost", "unbiased", "renorm", "masked"])
def test_statistics_in_float32_output_in_input_dtype(dtype, variant):
  x = activations(dtype)
  params = bnjax.BatchNormParams(jnp.full(3, 1.5, jnp.bfloat16), jnp.full(3, 0.5, jnp.bfloat16))
  _, state = bnjax.init(3)
  kwargs = {"plain": {}, "ghost": {"virtual_batch_size": 4}, "unbiased": {"unbiased_variance": True},
            "masked": {"mask": (jnp.arange(64).reshape(16, 4) % 5 != 0)[..., None]}, "renorm": {}}[variant]
  fn = (lambda x, **k: bnjax.batch_renorm(x, params, state, training=True, r_max=2.0, d_max=1.0, **k)) \
      if variant == "renorm" else (lambda x, **k: bnjax.batch_norm(x, params, state, training=True, **k))
  y, new_state = fn(x, **kwargs)
  want_y, want_state = float32_reference(fn, x, **kwargs)
  assert y.dtype == dtype
  assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new_state, want_state)
  np.testing.assert_allclose(y.astype(jnp.float32), want_y, rtol=1e-2, atol=1e-2)
  grads = jax.grad(lambda x, p: jnp.sum(fn(x, **kwargs)[0].astype(jnp.float32)), argnums=(0,))(x, params)
  assert grads[0].dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_population_statistics_in_float32(dtype):
  population = bnjax.update_population(bnjax.init_population(3), activations(dtype))
  state = bnjax.population_state(population)
  assert state.var.dtype == jnp.float32
  x = np.asarray(activations(dtype).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(state.var, x.var((0, 1)) * 64 / 63, rtol=1e-5)


def test_modules_with_bfloat16_parameters():
  x = activations(jnp.bfloat16)
  for module in (bnjax.linen.BatchNorm(use_running_average=False, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
                 bnjax.linen.BatchRenorm(use_running_average=False, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)):
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["scale"].dtype == jnp.bfloat16
    y, updated = module.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and updated["batch_stats"]["var"].dtype == jnp.float32
  layer = bnjax.nnx.BatchRenorm(3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer(x).dtype == jnp.bfloat16 and layer.var[...].dtype == jnp.float32
