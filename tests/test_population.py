"""Algorithm 2 (population statistics over K batches): the pure accumulator,
bnjax.linen.recompute_batch_stats and bnjax.nnx.recompute_batch_stats, against a
NumPy transcription of the algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference

BATCHES = [2.0 * jax.random.normal(jax.random.key(i), (16, 4, 3)) + i for i in range(5)]


@pytest.mark.parametrize("unbiased", [True, False])
def test_pure_accumulator_is_algorithm_2(unbiased):
  population = bnjax.init_population(3)
  update = jax.jit(bnjax.update_population)
  for batch in BATCHES:
    population = update(population, batch)
  state = bnjax.population_state(population, unbiased=unbiased)
  mean, var = reference.population_statistics([np.asarray(b) for b in BATCHES], (0, 1))
  if not unbiased:
    var = var * (64 - 1) / 64
  np.testing.assert_allclose(state.mean, mean.ravel(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state.var, var.ravel(), rtol=1e-5)


def test_cumulative_momentum_in_batch_norm_gives_the_same():
  """The running average with momentum k/(k+1), traced, is Algorithm 2 too."""
  state = bnjax.BatchNormState(jnp.zeros(3), jnp.zeros(3))
  step = jax.jit(lambda x, state, k: bnjax.batch_norm(
      x, None, state, training=True, momentum=k / (k + 1), unbiased_variance=True)[1])
  for k, batch in enumerate(BATCHES):
    state = step(batch, state, jnp.float32(k))
  mean, var = reference.population_statistics([np.asarray(b) for b in BATCHES], (0, 1))
  np.testing.assert_allclose(state.mean, mean.ravel(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, var.ravel(), rtol=1e-5)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(5, use_bias=False)(x)
    x = bnjax.linen.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Dense(4, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)  # Flax's own, recomputed too
    return bnjax.linen.BatchRenorm(use_running_average=not train, name="renorm")(x)


def layer_inputs(variables, x):
  """The inputs of the three BN layers, computed by hand."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  h1 = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"]
  mu, var = h1.mean((0, 1)), h1.var((0, 1))
  h2 = np.maximum((h1 - mu) / np.sqrt(var + 1e-5) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"], 0)
  h2 = h2 @ p["Dense_1"]["kernel"]
  mu2, var2 = h2.mean((0, 1)), h2.var((0, 1))
  h3 = (h2 - mu2) / np.sqrt(var2 + 1e-5) * p["flax_bn"]["scale"] + p["flax_bn"]["bias"]
  return {"BatchNorm_0": h1, "flax_bn": h2, "renorm": h3}


def test_linen_recompute_batch_stats():
  model = Net()
  variables = model.init(jax.random.key(0), BATCHES[0], train=False)
  with jax.numpy_dtype_promotion("standard"):  # Flax's BatchNorm promotes implicitly
    new = bnjax.linen.recompute_batch_stats(
        lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]), variables, BATCHES)
  inputs = [layer_inputs(variables, b) for b in BATCHES]
  for name in ("BatchNorm_0", "flax_bn", "renorm"):
    mean, var = reference.population_statistics([np.asarray(i[name]) for i in inputs], (0, 1))
    np.testing.assert_allclose(new["batch_stats"][name]["mean"], mean.ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][name]["var"], var.ravel(), rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])


def test_linen_recompute_needs_training_mode():
  model = Net()
  variables = model.init(jax.random.key(0), BATCHES[0], train=False)
  with pytest.raises(ValueError, match="saw no BN layer in training mode"):
    bnjax.linen.recompute_batch_stats(lambda v, b: model.apply(v, b, train=False), variables, BATCHES)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 5, use_bias=False, rngs=rngs)
    self.norm = bnjax.nnx.BatchNorm(5, rngs=rngs)
    self.renorm = bnjax.nnx.BatchRenorm(5, rngs=rngs)

  def __call__(self, x):
    return self.renorm(nnx.relu(self.norm(self.dense(x))))


def test_nnx_recompute_batch_stats():
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  kernel = model.dense.kernel[...]
  bnjax.nnx.recompute_batch_stats(model, BATCHES)
  assert model.norm.use_running_average and model.renorm.use_running_average  # modes restored
  hidden = [np.asarray(b) @ np.asarray(kernel) for b in BATCHES]
  mean, var = reference.population_statistics(hidden, (0, 1))
  np.testing.assert_allclose(model.norm.mean[...], mean.ravel(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.norm.var[...], var.ravel(), rtol=1e-4)
  # The second layer's input: the first normalized with each batch's own statistics.
  second = [np.maximum((h - h.mean((0, 1))) / np.sqrt(h.var((0, 1)) + 1e-5), 0) for h in hidden]
  mean, var = reference.population_statistics(second, (0, 1))
  np.testing.assert_allclose(model.renorm.var[...], var.ravel(), rtol=1e-3)


def test_nnx_recompute_without_bn_layers():
  with pytest.raises(ValueError, match="found no bnjax.nnx"):
    bnjax.nnx.recompute_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), BATCHES)


def test_linen_recompute_when_the_batch_norm_is_the_root_module():
  module = bnjax.linen.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), BATCHES[0])
  new = bnjax.linen.recompute_batch_stats(lambda v, b: module.apply(v, b, mutable=["batch_stats"]), variables, BATCHES)
  mean, var = reference.population_statistics([np.asarray(b) for b in BATCHES], (0, 1))
  np.testing.assert_allclose(new["batch_stats"]["var"], var.ravel(), rtol=1e-5)


def test_a_batch_that_defines_no_statistic_changes_none():
  """An all-masked batch and a final batch of one example (issue 8)."""
  batches = [np.asarray(b) for b in BATCHES[:3]]
  population = bnjax.init_population(3)
  for batch in batches:
    population = bnjax.update_population(population, jnp.asarray(batch))
  all_masked = bnjax.update_population(population, BATCHES[3], mask=jnp.zeros((16, 4, 1), bool))
  one_example = bnjax.update_population(all_masked, BATCHES[4][:1, :1])
  mean, var = reference.population_statistics(batches, (0, 1))
  for unbiased, want_var in [(True, var), (False, var * 63 / 64)]:
    state = bnjax.population_state(one_example, unbiased=unbiased)
    if unbiased:  # the single example adds a mean but no unbiased variance
      want_mean = (mean.ravel() * 3 + np.asarray(BATCHES[4][0, 0])) / 4
    else:  # ... and a biased variance of 0
      want_mean, want_var = (mean.ravel() * 3 + np.asarray(BATCHES[4][0, 0])) / 4, want_var * 3 / 4
    np.testing.assert_allclose(state.mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.var, want_var.ravel(), rtol=1e-5)


def test_statistics_no_batch_defines_keep_the_fallback():
  population = bnjax.update_population(bnjax.init_population(2), jnp.ones((4, 2)),
                                       mask=jnp.array([True, False]))
  fallback = bnjax.BatchNormState(mean=jnp.array([7.0, 8.0]), var=jnp.array([2.0, 3.0]))
  state = bnjax.population_state(population, fallback=fallback)
  np.testing.assert_allclose(state.mean, [1.0, 8.0])
  np.testing.assert_allclose(state.var, [0.0, 3.0])
  assert np.isnan(bnjax.population_state(population).var[1])


def test_linen_recompute_accepts_a_jitted_apply_fn_and_keeps_undefined_statistics():
  model = bnjax.linen.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 2)))
  variables = {**variables, "batch_stats": {"mean": jnp.array([5.0, 6.0]), "var": jnp.array([2.0, 3.0])}}
  mask = jnp.array([[True, False]] * 4)  # the second feature never has a valid value
  apply_fn = jax.jit(lambda v, b: model.apply(v, b, mask=mask, mutable=["batch_stats"]))
  batches = [jnp.arange(8.0).reshape(4, 2), jnp.arange(8.0).reshape(4, 2) + 2.0]
  new = bnjax.linen.recompute_batch_stats(apply_fn, variables, batches)
  # feature 0 holds 0, 2, 4, 6 and then 2, 4, 6, 8: means 3, 5; unbiased variances 20/3 each
  np.testing.assert_allclose(new["batch_stats"]["mean"], [4.0, 6.0])
  np.testing.assert_allclose(new["batch_stats"]["var"], [20.0 / 3.0, 3.0], rtol=1e-6)


def test_nnx_recompute_keeps_statistics_no_batch_defines():
  layer = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  layer.mean[...] = jnp.array([5.0, 6.0])
  mask = jnp.array([[True, False]] * 4)
  bnjax.nnx.recompute_batch_stats(layer, [jnp.arange(8.0).reshape(4, 2)], apply_fn=lambda m, b: m(b, mask=mask))
  np.testing.assert_allclose(layer.mean[...], [3.0, 6.0])
  np.testing.assert_allclose(layer.var[...], [20.0 / 3.0, 1.0], rtol=1e-6)
