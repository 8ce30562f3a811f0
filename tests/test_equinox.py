"""bnjax.equinox.BatchNorm beside equinox.nn.BatchNorm and the float64 reference:
the same network's outputs, gradients and state after several steps in both modes;
where Equinox is off (its running variance at initialization, its "batch" mode's
debiasing), bnjax against the reference; synchronized statistics; Algorithm 2.

Each test runs its computation under one ``jax.jit`` (eager Equinox calls compile op
by op, which is what costs the time on CPU)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax.equinox
from tests import reference
from tests.samples import normal

MOMENTUM = 0.9
STEPS = 3


class Network(eqx.Module):
  """Linear -> BN -> ReLU -> Linear, on one example."""

  linear: eqx.nn.Linear
  norm: eqx.Module
  head: eqx.nn.Linear

  def __init__(self, batch_norm_class, mode):
    first, second = jax.random.split(jax.random.key(0))
    self.linear = eqx.nn.Linear(3, 4, key=first)
    self.norm = batch_norm_class(4, "batch", momentum=MOMENTUM, mode=mode)
    self.head = eqx.nn.Linear(4, 2, key=second)

  def __call__(self, x, state):
    x, state = self.norm(self.linear(x), state)
    return self.head(jax.nn.relu(x)), state


def batched(model, axis_name="batch"):
  return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def train(model, state, batches):
  """``STEPS`` SGD steps; the final model and state, each step's output and gradients."""
  arrays, static = eqx.partition(model, eqx.is_array)

  def step(carry, x):
    arrays, state = carry

    def loss(arrays):
      y, new_state = batched(eqx.combine(arrays, static))(x, state)
      return jnp.sum(y**2), (y, new_state)

    grads, (y, state) = jax.grad(loss, has_aux=True)(arrays)
    arrays = jax.tree.map(lambda p, g: p - 0.1 * g, arrays, grads)
    return (arrays, state), (y, grads)

  (arrays, state), (ys, grads) = jax.lax.scan(step, (arrays, state), batches)
  return eqx.combine(arrays, static), state, ys, grads


@pytest.fixture(scope="module", params=["batch", "ema"])
def trained(request):
  """Both networks, trained on the same batches, in one mode."""
  mode = request.param
  batches = jnp.asarray(normal(0, (STEPS, 8, 3), loc=1.0))
  runs = {}
  for name, cls in (("equinox", eqx.nn.BatchNorm), ("bnjax", bnjax.equinox.BatchNorm)):
    model, state = eqx.nn.make_with_state(Network)(cls, mode)
    runs[name] = eqx.filter_jit(train)(model, state, batches)
  return dict(mode=mode, batches=batches, **runs)


def test_training_outputs_and_gradients_match_equinox(trained):
  for i in (2, 3):  # outputs, gradients (the same fields in the same order)
    for a, b in zip(
      jax.tree.leaves(trained["bnjax"][i]), jax.tree.leaves(trained["equinox"][i]), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_running_statistics_after_training(trained):
  """ "ema": Equinox's running statistics, which its first step fills with the batch's.
  "batch": the mean is Equinox's inference mean (its hidden mean debiased); Equinox's
  inference variance is off (its hidden variance starts at 1, and is debiased as if
  it started at 0), so bnjax's is checked against the reference: the debiased moving
  average of the batch variances."""
  model, state = trained["bnjax"][:2]
  equinox_model, equinox_state = trained["equinox"][:2]
  index = "ema_state_index" if trained["mode"] == "ema" else "batch_state_index"
  mean, var = state.get(getattr(model.norm, index))
  equinox_mean, equinox_var = equinox_state.get(getattr(equinox_model.norm, index))
  if trained["mode"] == "ema":
    np.testing.assert_allclose(mean, equinox_mean, rtol=1e-5)
    np.testing.assert_allclose(var, equinox_var, rtol=1e-5)
    return
  debias = 1 - MOMENTUM**STEPS
  assert state.get(model.norm.batch_counter) == STEPS
  np.testing.assert_allclose(mean, equinox_mean / debias, rtol=1e-5, atol=1e-6)
  # The reference: each step's batch variance of the BN input, from that step's weights.
  hidden = 0.0
  for linear, x in zip(_linear_per_step(trained), trained["batches"], strict=True):
    _, batch_var = reference.batch_mean_var(np.asarray(jax.vmap(linear)(x)), (0,))
    hidden = MOMENTUM * hidden + (1 - MOMENTUM) * batch_var[0]
  np.testing.assert_allclose(var, hidden / debias, rtol=1e-4)
  equinox_error = np.max(np.abs(equinox_var / debias / (hidden / debias) - 1))
  assert equinox_error > 0.5, f"Equinox's inference variance is off by {equinox_error}"


def _linear_per_step(trained):
  """The first Linear at the start of each step, replayed from the gradients."""
  model, _ = eqx.nn.make_with_state(Network)(bnjax.equinox.BatchNorm, trained["mode"])
  linear, linears = model.linear, []
  grads = trained["bnjax"][3].linear
  for k in range(STEPS):
    linears.append(linear)
    linear = jax.tree.map(lambda p, g, k=k: p - 0.1 * g[k], linear, grads)
  return linears


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_float64_running_statistics_are_equinoxs_and_the_references(x64, standard_promotion, mode):
  """Issue 31 bug 3: under x64 the momentum was rounded to float32 ("ema" mode, and
  "batch" mode's debiased momentum): the running mean was off by 1.2e-8 (ema) and
  2.3e-6 (batch) here, where Equinox is exact, and "ema" outputs followed. Now the
  means (and "ema" mode's variances and outputs) equal Equinox's and the float64
  reference's (the zero-debiased average in "batch" mode) to float64 rounding."""
  momentum = 0.999
  batches = normal(13, (3, 8, 2), loc=[2.0, -5.0], scale=[1.0, 3.0], dtype=np.float64)

  @jax.jit
  def run(batches):
    results = []
    for cls in (eqx.nn.BatchNorm, bnjax.equinox.BatchNorm):
      layer, state = eqx.nn.make_with_state(cls)(2, "batch", momentum=momentum, mode=mode)
      for x in batches:
        y, state = batched(layer)(x, state)
      mean, var = state.get(layer.ema_state_index or layer.batch_state_index)
      if mode == "batch" and cls is eqx.nn.BatchNorm:  # Equinox keeps the biased hidden mean
        mean = mean / (1 - momentum ** state.get(layer.batch_counter))
      results.append((y, mean, var))
    return results

  (equinox_y, equinox_mean, equinox_var), (y, mean, var) = run(jnp.asarray(batches))
  assert mean.dtype == var.dtype == jnp.float64
  moments = [[s.ravel() for s in reference.batch_mean_var(x, (0,))] for x in batches]
  if mode == "ema":  # the first batch's statistics, then moved by each later batch's
    want_mean, want_var = moments[0]
    for mu, batch_var in moments[1:]:
      want_mean = momentum * want_mean + (1 - momentum) * mu
      want_var = momentum * want_var + (1 - momentum) * batch_var
    np.testing.assert_allclose(var, want_var, rtol=1e-13)
    np.testing.assert_allclose(var, equinox_var, rtol=1e-13)
    np.testing.assert_allclose(y, equinox_y, rtol=1e-12, atol=1e-12)
  else:  # Haiku's zero-debiased average of the batch means
    weights = (1 - momentum) * momentum ** np.arange(len(batches))[::-1]
    want_mean = sum(w * mu for w, (mu, _) in zip(weights, moments, strict=True)) / weights.sum()
  np.testing.assert_allclose(mean, want_mean, rtol=1e-13)
  np.testing.assert_allclose(mean, equinox_mean, rtol=1e-13)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_an_untrained_layer_is_the_identity_in_inference(mode):
  """Running statistics start at mean 0, variance 1. Equinox's "ema" mode starts its
  running variance at 0: x / sqrt(eps), 316 times x, until the first training step."""
  x = normal(1, (4, 3))

  def infer(cls):
    layer, state = eqx.nn.make_with_state(cls)(3, "batch", mode=mode, inference=True)
    return batched(layer)(x, state)[0]

  np.testing.assert_allclose(
    jax.jit(lambda: infer(bnjax.equinox.BatchNorm))(), x / np.sqrt(1 + 1e-5), rtol=1e-6
  )
  if mode == "ema":
    np.testing.assert_allclose(
      jax.jit(lambda: infer(eqx.nn.BatchNorm))(), x / np.sqrt(1e-5), rtol=1e-4
    )


def apply_layer(x, axis_name="batch", mask=None, mode="batch", dtype=None):
  """One training call of a fresh layer on the batch ``x`` (vmapped over its first axis)."""
  layer, state = make_layer(x.shape[1], axis_name, mode=mode, dtype=dtype)
  return apply_made(layer, state, x, mask)


def make_layer(channels, axis_name="batch", mode="batch", dtype=None):
  return eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    channels, axis_name, mode=mode, momentum=0.0, dtype=dtype
  )


def apply_made(layer, state, x, mask=None):
  if mask is None:
    y, state = batched(layer)(x, state)
    return y, state_values(layer, state)
  y, state = jax.vmap(
    lambda x, m, s: layer(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None)
  )(x, mask, state)
  return y, state_values(layer, state)


def state_values(layer, state):
  return state.get(layer._statistics_index)


def test_statistics_and_output_are_the_references():
  """Against the float64 reference at a large offset (mean 1e4, std 1), per channel
  over the batch and the spatial axes."""
  x = normal(2, (6, 2, 5), loc=1e4)
  y, (mean, var) = jax.jit(apply_layer)(x)
  expected, mu, expected_var = reference.forward(x, 1.0, 0.0, 1e-5, (0, 2))
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(mean, mu.ravel(), rtol=1e-7)
  np.testing.assert_allclose(var, expected_var.ravel(), rtol=1e-4)


def test_masked_statistics_are_those_of_the_valid_values():
  """Examples of different lengths (a per-example mask over positions): the statistics
  of the valid values, where a mean of per-example means would weigh a short example
  as much as a long one."""
  x = normal(3, (5, 2, 4))
  lengths = np.array([4, 1, 3, 2, 4])
  mask = np.arange(4)[None, None, :] < lengths[:, None, None]  # [N, 1, L]
  x = np.where(mask, x, np.nan).astype(np.float32)
  y, (mean, var) = jax.jit(lambda x, m: apply_layer(x, mask=m))(x, mask)
  expected, mu, expected_var = reference.forward(x, 1.0, 0.0, 1e-5, (0, 2), mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(
    np.where(valid, y, 0), np.where(valid, expected, 0), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(mean, mu.ravel(), rtol=1e-5)
  np.testing.assert_allclose(var, expected_var.ravel(), rtol=1e-5)
  mean_of_means = np.nanmean(np.nanmean(x, axis=2), axis=0)
  assert np.max(np.abs(mean_of_means - mu.ravel())) > 1e-2  # what a mean of means gives


def test_half_precision_keeps_float32_statistics():
  """dtype=bfloat16: bfloat16 weight and output, float32 running statistics (Equinox
  stores them in bfloat16) equal to the reference of the same bfloat16 values."""
  x = jnp.asarray(normal(4, (16, 2), loc=30.0)).astype(jnp.bfloat16)
  y, (mean, var) = jax.jit(lambda x: apply_layer(x, dtype=jnp.bfloat16))(x)
  assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
  mu, expected_var = reference.batch_mean_var(np.asarray(x, np.float64), (0,))
  np.testing.assert_allclose(mean, mu.ravel(), rtol=1e-6)
  np.testing.assert_allclose(var, expected_var.ravel(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_synchronized_statistics_equal_the_full_batch(mode):
  """vmap alone; pmap over devices around a vmap (axis_name=("device", "batch"));
  shard_map the same way; and jit with the batch sharded over 8 devices: each the
  full batch's output and statistics."""
  x = normal(5, (8, 4, 3), loc=2.0)
  full = jax.jit(lambda x: apply_layer(x.reshape(32, 3), mode=mode))(x)
  layer, state = make_layer(3, ("device", "batch"), mode=mode)
  two_names = lambda x, state: apply_made(layer, state, x)  # noqa: E731
  pmapped = jax.pmap(two_names, axis_name="device", in_axes=(0, None))(x, state)
  pmapped = (pmapped[0], jax.tree.map(lambda a: a[0], pmapped[1]))  # every device's is the same
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("device",))  # XLA places the collectives
  # check_vma=False: JAX's check of shard_map's varying values refuses a psum over
  # a shard_map axis and a vmap axis together.
  sharded_map = jax.jit(
    jax.shard_map(
      lambda x, state: two_names(x[0], state),
      mesh=mesh,
      in_specs=(P("device"), P()),
      out_specs=(P("device"), P()),
      check_vma=False,
    )
  )(jax.device_put(x, NamedSharding(mesh, P("device"))), state)
  sharded = jax.device_put(x.reshape(32, 3), NamedSharding(mesh, P("device")))
  jitted = jax.jit(lambda x: apply_layer(x, mode=mode))(sharded)
  for y, statistics in (pmapped, sharded_map, jitted):
    np.testing.assert_allclose(np.reshape(y, (32, 3)), full[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), statistics, full[1])


def test_recompute_batch_stats_is_algorithm_2():
  batches = [normal(6 + k, (6, 3, 2), loc=k) for k in range(3)]
  layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "batch", mode="batch")
  state = bnjax.equinox.recompute_batch_stats(
    layer, state, batches, apply_fn=lambda m, s, b: batched(m)(b, s)
  )
  mean, var = reference.population_statistics(batches, (0, 2))
  got_mean, got_var = state.get(layer.batch_state_index)
  np.testing.assert_allclose(got_mean, mean.ravel(), rtol=1e-5)
  np.testing.assert_allclose(got_var, var.ravel(), rtol=1e-5)
  assert state.get(layer.batch_counter) == 1


def test_sync_state_averages_the_statistics_across_devices():
  x = normal(9, (8, 4, 2), loc=np.arange(8)[:, None, None])
  layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, "batch", mode="batch")

  states = jax.pmap(lambda x, s: batched(layer)(x, s)[1], in_axes=(0, None))(x, state)
  synced = jax.pmap(lambda s: bnjax.equinox.sync_state(layer, s, "i"), axis_name="i")(states)
  for got, own in zip(
    synced.get(layer.batch_state_index), states.get(layer.batch_state_index), strict=True
  ):
    np.testing.assert_allclose(got[5], np.mean(own, axis=0), rtol=1e-6)
  np.testing.assert_array_equal(synced.get(layer.batch_counter), 1)


def test_a_model_and_state_saved_with_equinox_load_into_bnjax_and_back(trained, tmp_path):
  """``eqx.tree_serialise_leaves`` files move both ways (the same array leaves, shapes
  and dtypes; Equinox's ``axis_name`` is a string leaf, bnjax's a static field). In
  "ema" mode the state means the same in both, so the loaded model
  evaluates as the saved one; in "batch" mode Equinox stores its biased hidden
  averages where bnjax stores the debiased ones (the same after many steps)."""
  x = trained["batches"][0]
  evaluate = eqx.filter_jit(lambda model, state: batched(eqx.nn.inference_mode(model))(x, state)[0])
  for source, target in (("equinox", bnjax.equinox.BatchNorm), ("bnjax", eqx.nn.BatchNorm)):
    path = tmp_path / f"{source}.eqx"
    eqx.tree_serialise_leaves(path, trained[source][:2])
    like = eqx.nn.make_with_state(Network)(target, trained["mode"])
    model, state = eqx.tree_deserialise_leaves(path, like)
    arrays = lambda tree: jax.tree.leaves(eqx.filter(tree, eqx.is_array))  # noqa: E731
    for loaded, saved in zip(arrays((model, state)), arrays(trained[source][:2]), strict=True):
      np.testing.assert_array_equal(loaded, saved)
    if trained["mode"] == "ema":
      np.testing.assert_allclose(
        evaluate(model, state), evaluate(*trained[source][:2]), rtol=1e-5, atol=1e-5
      )


def test_gradients_are_the_papers_chain_rule():
  """d(sum(y * dy)) by x, weight and bias, against the float64 Section 3 chain rule,
  per channel over the batch and the spatial axis."""
  x, dy = normal(10, (6, 3, 4), loc=4.0), normal(11, (6, 3, 4))
  layer, state = make_layer(3)
  layer = eqx.tree_at(lambda m: m.weight, layer, jnp.array([0.5, 2.0, -1.0]))

  @eqx.filter_jit
  def grads(layer, x):
    loss = lambda layer, x: jnp.sum(batched(layer)(x, state)[0] * dy)  # noqa: E731
    return eqx.filter_grad(loss)(layer, x), jax.grad(loss, argnums=1)(layer, x)

  dlayer, dx = grads(layer, x)
  gamma = np.asarray(layer.weight)[None, :, None]
  expected_dx, dgamma, dbeta = reference.backward(x, gamma, dy, 1e-5, (0, 2))
  np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dlayer.weight, dgamma.ravel(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dlayer.bias, dbeta.ravel(), rtol=1e-5, atol=1e-5)


def test_axis_name_is_static_and_hashable():
  """A static field (Equinox's is a string leaf of the pytree, equinox#1074): a list
  of names becomes a tuple, and no name is a leaf."""
  layer = bnjax.equinox.BatchNorm(2, ["device", "batch"], mode="batch")
  assert layer.axis_name == ("device", "batch")
  assert not [leaf for leaf in jax.tree.leaves(layer) if isinstance(leaf, str)]
  assert [
    leaf
    for leaf in jax.tree.leaves(eqx.nn.BatchNorm(2, "batch", mode="batch"))
    if isinstance(leaf, str)
  ] == ["batch"]
