"""Algorithm 2 (population statistics over K batches): the pure accumulator,
bnjax.linen.recompute_batch_stats and bnjax.nnx.recompute_batch_stats, against a
NumPy transcription of the algorithm (float64).

Tolerances: the statistics are float32 sums over 64 values per batch, combined over
5 batches, of inputs of order 1 to 10; their float32 rounding error (unit roundoff
6e-8, a few roundings deep) stays below 1e-6 relative (measured: 3e-7), and below
1e-6 absolute for means near 0."""

import chex
import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference
from tests.samples import numpy_normal_init

# NumPy inputs: jax.random would compile a kernel for the shape (about a second on CPU).
BATCHES = [
  2.0 * np.random.default_rng(i).standard_normal((16, 4, 3), np.float32) + i for i in range(5)
]
RTOL, ATOL = 1e-6, 1e-6  # float32 rounding, see above


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
  np.testing.assert_allclose(state.mean, mean.ravel(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(state.var, var.ravel(), rtol=RTOL)


def test_float64_batches_keep_their_digits(x64):
  """Under x64 the sums were float32 whatever the batches: float64 statistics came
  out with float32 rounding (3e-8 and 8e-8 here). They now widen to the batches' dtype (and
  ``init_population(dtype=...)`` fixes it up front, for a ``lax.scan`` carry)."""
  batches = [np.asarray(b, np.float64) * np.pi for b in BATCHES]
  mean, var = reference.population_statistics(batches, (0, 1))
  update = jax.jit(bnjax.update_population)
  for start in (bnjax.init_population(3), bnjax.init_population(3, dtype=np.float64)):
    population = start
    for batch in batches:
      population = update(population, batch)
    state = bnjax.population_state(population)
    assert state.mean.dtype == state.var.dtype == np.float64
    np.testing.assert_allclose(state.mean, mean.ravel(), rtol=1e-13)
    np.testing.assert_allclose(state.var, var.ravel(), rtol=1e-13)


def test_cumulative_momentum_in_batch_norm_gives_the_same():
  """The running average with momentum k/(k+1), traced, is Algorithm 2 too."""
  state = bnjax.BatchNormState(np.zeros(3, np.float32), np.zeros(3, np.float32))
  step = jax.jit(
    lambda x, state, k: bnjax.batch_norm(
      x, None, state, training=True, momentum=k / (k + 1), unbiased_variance=True
    )[1]
  )
  for k, batch in enumerate(BATCHES):
    state = step(batch, state, np.float32(k))
  mean, var = reference.population_statistics([np.asarray(b) for b in BATCHES], (0, 1))
  np.testing.assert_allclose(state.mean, mean.ravel(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(state.var, var.ravel(), rtol=RTOL)


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
  """The inputs of the three BN layers in training mode, in float64 (Algorithm 1)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])

  def normalize(h, name):
    return reference.forward(h, p[name]["scale"], p[name]["bias"], 1e-5, (0, 1))[0]

  h1 = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"]
  h2 = np.maximum(normalize(h1, "BatchNorm_0"), 0) @ p["Dense_1"]["kernel"]
  return {"BatchNorm_0": h1, "flax_bn": h2, "renorm": normalize(h2, "flax_bn")}


@pytest.fixture(scope="module")
def net_variables():
  return jax.jit(lambda x: Net().init(jax.random.key(0), x, train=False))(BATCHES[0])


def test_linen_recompute_batch_stats(net_variables):
  model, variables = Net(), net_variables
  with jax.numpy_dtype_promotion("standard"):  # Flax's BatchNorm promotes implicitly
    new = bnjax.linen.recompute_batch_stats(
      lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]), variables, BATCHES
    )
  inputs = [layer_inputs(variables, b) for b in BATCHES]
  want = {}
  for name in ("BatchNorm_0", "flax_bn", "renorm"):
    mean, var = reference.population_statistics([i[name] for i in inputs], (0, 1))
    want[name] = {"mean": mean.ravel(), "var": var.ravel()}
  chex.assert_trees_all_close(new["batch_stats"], want, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_equal(new["params"], variables["params"])


def test_linen_recompute_needs_training_mode(net_variables):
  model, variables = Net(), net_variables
  with pytest.raises(ValueError, match="saw no BN layer in training mode"):
    bnjax.linen.recompute_batch_stats(
      lambda v, b: model.apply(v, b, train=False), variables, BATCHES
    )


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 5, use_bias=False, kernel_init=numpy_normal_init, rngs=rngs)
    self.norm = bnjax.nnx.BatchNorm(5, rngs=rngs)
    self.renorm = bnjax.nnx.BatchRenorm(5, rngs=rngs)

  def __call__(self, x):
    return self.renorm(nnx.relu(self.norm(self.dense(x))))


def test_nnx_recompute_batch_stats():
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  kernel = np.asarray(model.dense.kernel[...], np.float64)
  bnjax.nnx.recompute_batch_stats(model, BATCHES)
  assert model.norm.use_running_average and model.renorm.use_running_average  # modes restored
  hidden = [np.asarray(b, np.float64) @ kernel for b in BATCHES]
  # The second layer's input: the first normalized with each batch's own statistics
  # (its scale 1 and bias 0 as initialized).
  second = [np.maximum(reference.forward(h, 1.0, 0.0, 1e-5, (0, 1))[0], 0) for h in hidden]
  for layer, inputs in ((model.norm, hidden), (model.renorm, second)):
    mean, var = reference.population_statistics(inputs, (0, 1))
    np.testing.assert_allclose(layer.mean[...], mean.ravel(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.var[...], var.ravel(), rtol=RTOL)


class ScaledBatchNorm(bnjax.nnx.BatchNorm):
  """A user's subclass whose ``__call__`` calls the parent's."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    return 2.0 * super().__call__(x, use_running_average, mask=mask)


def test_nnx_recompute_intercepts_the_call_and_leaves_the_layer_as_it_was():
  """Issue 19 item 4: the layers carry no recording flag; recompute_batch_stats
  intercepts their ``__call__`` for its own duration only (restored also when the
  model fails), a subclass's that calls its parent's included."""
  layer = ScaledBatchNorm(3, rngs=nnx.Rngs(0))
  assert set(vars(layer)) == set(vars(bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))))
  assert not any("record" in name for name in vars(layer))
  calls = (ScaledBatchNorm.__call__, bnjax.nnx.BatchNorm.__call__, bnjax.nnx.BatchRenorm.__call__)
  bnjax.nnx.recompute_batch_stats(layer, BATCHES)
  x64 = [np.asarray(b, np.float64) for b in BATCHES]
  mean, var = reference.population_statistics(x64, (0, 1))
  np.testing.assert_allclose(layer.mean[...], mean.ravel(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(layer.var[...], var.ravel(), rtol=RTOL)

  def failing(model, batch):
    raise RuntimeError("the model failed")

  with pytest.raises(RuntimeError, match="the model failed"):
    bnjax.nnx.recompute_batch_stats(layer, BATCHES, apply_fn=failing)
  assert (
    ScaledBatchNorm.__call__,
    bnjax.nnx.BatchNorm.__call__,
    bnjax.nnx.BatchRenorm.__call__,
  ) == calls
  assert "first_from" not in vars(bnjax.nnx)


def test_nnx_recompute_without_bn_layers():
  with pytest.raises(ValueError, match="found no bnjax.nnx"):
    bnjax.nnx.recompute_batch_stats(
      nnx.Linear(2, 2, kernel_init=numpy_normal_init, rngs=nnx.Rngs(0)), BATCHES
    )


def test_linen_recompute_when_the_batch_norm_is_the_root_module():
  module = bnjax.linen.BatchNorm(use_running_average=False)
  variables = jax.jit(lambda x: module.init(jax.random.key(0), x))(BATCHES[0])
  new = bnjax.linen.recompute_batch_stats(
    lambda v, b: module.apply(v, b, mutable=["batch_stats"]), variables, BATCHES
  )
  mean, var = reference.population_statistics([np.asarray(b) for b in BATCHES], (0, 1))
  chex.assert_trees_all_close(
    new["batch_stats"], {"mean": mean.ravel(), "var": var.ravel()}, rtol=RTOL, atol=ATOL
  )
  chex.assert_trees_all_equal(new["params"], variables["params"])


def test_a_batch_that_defines_no_statistic_changes_none():
  """An all-masked batch and a final batch of one example (issue 8)."""
  batches = BATCHES[:3]
  update = jax.jit(bnjax.update_population)
  population = bnjax.init_population(3)
  for batch in batches:
    population = update(population, batch)
  all_masked = update(population, BATCHES[3], mask=np.zeros((16, 4, 1), bool))
  one_example = update(all_masked, BATCHES[4][:1, :1])
  mean, var = reference.population_statistics(batches, (0, 1))
  for unbiased, want_var in [(True, var), (False, var * 63 / 64)]:
    state = jax.jit(bnjax.population_state, static_argnames="unbiased")(
      one_example, unbiased=unbiased
    )
    if unbiased:  # the single example adds a mean but no unbiased variance
      want_mean = (mean.ravel() * 3 + BATCHES[4][0, 0]) / 4
    else:  # ... and a biased variance of 0
      want_mean, want_var = (mean.ravel() * 3 + BATCHES[4][0, 0]) / 4, want_var * 3 / 4
    np.testing.assert_allclose(state.mean, want_mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.var, want_var.ravel(), rtol=RTOL)


def test_statistics_no_batch_defines_keep_the_fallback():
  @jax.jit
  def states(x, mask, fallback):
    population = bnjax.update_population(bnjax.init_population(2), x, mask=mask)
    return bnjax.population_state(population, fallback=fallback), bnjax.population_state(population)

  fallback = bnjax.BatchNormState(
    mean=np.array([7.0, 8.0], np.float32), var=np.array([2.0, 3.0], np.float32)
  )
  state, without_fallback = states(np.ones((4, 2), np.float32), np.array([True, False]), fallback)
  np.testing.assert_array_equal(state.mean, [1.0, 8.0])
  np.testing.assert_array_equal(state.var, [0.0, 3.0])
  np.testing.assert_array_equal(without_fallback.mean, [1.0, np.nan])
  np.testing.assert_array_equal(without_fallback.var, [0.0, np.nan])


def test_linen_recompute_accepts_a_jitted_apply_fn_and_keeps_undefined_statistics():
  model = bnjax.linen.BatchNorm(use_running_average=False)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(np.zeros((2, 2), np.float32))
  variables = {
    **variables,
    "batch_stats": {
      "mean": np.array([5.0, 6.0], np.float32),
      "var": np.array([2.0, 3.0], np.float32),
    },
  }
  mask = np.array([[True, False]] * 4)  # the second feature never has a valid value
  apply_fn = jax.jit(lambda v, b: model.apply(v, b, mask=mask, mutable=["batch_stats"]))
  batches = [np.arange(8.0, dtype=np.float32).reshape(4, 2) + shift for shift in (0.0, 2.0)]
  new = bnjax.linen.recompute_batch_stats(apply_fn, variables, batches)
  # feature 0 holds 0, 2, 4, 6 and then 2, 4, 6, 8: means 3, 5; unbiased variances 20/3 each
  np.testing.assert_allclose(new["batch_stats"]["mean"], [4.0, 6.0])
  np.testing.assert_allclose(new["batch_stats"]["var"], [20.0 / 3.0, 3.0], rtol=1e-6)


def test_nnx_recompute_keeps_statistics_no_batch_defines():
  layer = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  layer.mean[...] = np.array([5.0, 6.0], np.float32)
  mask = np.array([[True, False]] * 4)
  bnjax.nnx.recompute_batch_stats(
    layer, [np.arange(8.0, dtype=np.float32).reshape(4, 2)], apply_fn=lambda m, b: m(b, mask=mask)
  )
  np.testing.assert_allclose(layer.mean[...], [3.0, 6.0])
  np.testing.assert_allclose(layer.var[...], [20.0 / 3.0, 1.0], rtol=1e-6)
