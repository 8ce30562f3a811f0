"""bnjax.haiku.BatchNorm beside haiku.BatchNorm and the float64 reference: the same
params and state trees, outputs, gradients and moving averages after several steps;
exact statistics where Haiku's are not; synchronized statistics; Algorithm 2.

Each test runs its computation under one ``jax.jit`` (eager Haiku calls compile op
by op, which is what costs the time on CPU)."""

import importlib
import pathlib
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.haiku
from tests import reference
from tests.processes import child_env
from tests.samples import normal

DECAY = 0.9
STEPS = 3


# Haiku's own modules (hk.Linear, its EMA) mix dtypes implicitly, which the suite's
# strict mode forbids.
pytestmark = pytest.mark.usefixtures("standard_promotion")


def network(batch_norm_class, **options):
  """Linear -> BN -> ReLU -> Linear, as a transformed function of (x, is_training)."""

  def forward(x, is_training):
    x = hk.Linear(4, name="linear")(x)
    x = batch_norm_class(True, True, DECAY, name="bn", **options)(x, is_training)
    return hk.Linear(2, name="head")(jax.nn.relu(x))

  return hk.transform_with_state(forward)


def train(model, params, state, batches):
  """``STEPS`` SGD steps; returns the final params, state, and each step's output and
  gradients, and the evaluation output after training."""

  def step(carry, x):
    params, state = carry

    def loss(params):
      y, new_state = model.apply(params, state, None, x, True)
      return jnp.sum(y**2), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return (params, new_state), (y, grads)

  (params, state), (ys, grads) = jax.lax.scan(step, (params, state), batches)
  evaluation, _ = model.apply(params, state, None, batches[0], False)
  return params, state, ys, grads, evaluation


@pytest.fixture(scope="module")
def trained():
  """Both networks from the same initial params, trained on the same batches."""
  batches = jnp.asarray(normal(0, (STEPS, 8, 3), loc=1.0))
  haiku_model, bnjax_model = network(hk.BatchNorm), network(bnjax.haiku.BatchNorm)
  with jax.numpy_dtype_promotion("standard"):
    # Both inits in one compiled program (eager, Haiku's init compiles op by op).
    (params, state), (bnjax_params, bnjax_state) = jax.jit(
      lambda x: [model.init(jax.random.key(0), x, True) for model in (haiku_model, bnjax_model)]
    )(batches[0])
    runs = {
      name: jax.jit(lambda p, s, model=model: train(model, p, s, batches))(params, state)
      for name, model in (("haiku", haiku_model), ("bnjax", bnjax_model))
    }
  return dict(
    batches=batches,
    params=params,
    state=state,
    bnjax_params=bnjax_params,
    bnjax_state=bnjax_state,
    models=(haiku_model, bnjax_model),
    **runs,
  )


def test_params_and_state_trees_are_haikus(trained):
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  assert shapes(trained["bnjax_params"]) == shapes(trained["params"])
  assert shapes(trained["bnjax_state"]) == shapes(trained["state"])
  assert set(trained["state"]) == {"bn/~/mean_ema", "bn/~/var_ema"}
  assert set(trained["state"]["bn/~/mean_ema"]) == {"counter", "hidden", "average"}
  np.testing.assert_array_equal(
    trained["bnjax_params"]["bn"]["scale"], trained["params"]["bn"]["scale"]
  )
  # Haiku's init (in training mode) keeps counter and hidden at their initial 0 but
  # stores the average it set (the batch's statistics); so does bnjax.
  for name, entry in trained["state"].items():
    for field in ("counter", "hidden", "average"):
      np.testing.assert_allclose(trained["bnjax_state"][name][field], entry[field], rtol=1e-5)
    assert entry["counter"] == 0


def test_training_matches_haiku(trained):
  """Outputs, gradients, params and the moving averages (counter, hidden, debiased
  average) after several steps, to float32 rounding."""
  for key, tolerance in (("ys", 1e-5), ("grads", 1e-4)):
    jax.tree.map(
      lambda a, b, tolerance=tolerance: np.testing.assert_allclose(
        a, b, rtol=tolerance, atol=tolerance
      ),
      trained["bnjax"][3 if key == "grads" else 2],
      trained["haiku"][3 if key == "grads" else 2],
    )
  _, haiku_state, *_ = trained["haiku"]
  _, bnjax_state, *_ = trained["bnjax"]
  for name, entry in haiku_state.items():
    assert bnjax_state[name]["counter"] == entry["counter"] == STEPS
    for field in ("hidden", "average"):
      np.testing.assert_allclose(bnjax_state[name][field], entry[field], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(trained["bnjax"][4], trained["haiku"][4], rtol=1e-5, atol=1e-5)


def test_params_and_state_load_both_ways(trained):
  """Each class evaluates the other's trained params and state as its own."""
  haiku_model, bnjax_model = trained["models"]
  x = trained["batches"][0]
  for source in ("haiku", "bnjax"):
    params, state, *_ = trained[source]
    run = jax.jit(
      lambda p, s: [m.apply(p, s, None, x, False)[0] for m in (haiku_model, bnjax_model)]
    )
    haiku_y, bnjax_y = run(params, state)
    np.testing.assert_allclose(bnjax_y, haiku_y, rtol=1e-5, atol=1e-5)


def apply_layer(x, is_training=True, state=None, mask=None, **options):
  """One bnjax.haiku.BatchNorm: its output and state after one call."""
  layer = hk.transform_with_state(
    lambda x: bnjax.haiku.BatchNorm(False, False, DECAY, **options)(x, is_training, mask=mask)
  )
  params, initial = layer.init(None, x)
  return layer.apply(params, initial if state is None else state, None, x)


def test_moving_averages_are_the_debiased_average_of_the_batch_statistics():
  """Against the float64 reference: Haiku's zero-debiased EMA over the batches given
  to apply (init's call leaves counter and hidden at 0, as in Haiku)."""
  batches = normal(1, (3, 16, 2), loc=[3.0, -1.0], scale=[2.0, 0.5])

  @jax.jit
  def run(batches):
    layer = hk.transform_with_state(lambda x: bnjax.haiku.BatchNorm(False, False, DECAY)(x, True))
    _, state = layer.init(None, batches[0])
    for x in batches[1:]:
      y, state = layer.apply({}, state, None, x)
    return y, state

  y, state = run(batches)
  hidden_mean = hidden_var = 0.0
  updates = len(batches) - 1  # the batches after the one init saw
  for x in batches[1:]:
    mu, var = reference.batch_mean_var(x, (0,))
    hidden_mean = DECAY * hidden_mean + (1 - DECAY) * mu
    hidden_var = DECAY * hidden_var + (1 - DECAY) * var
  np.testing.assert_allclose(
    state["batch_norm/~/mean_ema"]["average"], hidden_mean / (1 - DECAY**updates), rtol=1e-6
  )
  np.testing.assert_allclose(
    state["batch_norm/~/var_ema"]["average"], hidden_var / (1 - DECAY**updates), rtol=1e-6
  )
  expected, _, _ = reference.forward(batches[-1], 1.0, 0.0, 1e-5, (0,))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_float64_inputs_keep_float64_moving_averages_as_haiku(x64):
  """Issue 31 bug 2: under x64, float64 inputs gave float32 moving averages (the
  state tree's dtypes differed from Haiku's, and a float64 model's statistics carried
  3e-7 of float32 rounding). Now the state is Haiku's, dtype for dtype, and equals
  Haiku's and the float64 reference's debiased averages to float64 rounding."""
  batches = normal(12, (3, 16, 2), loc=[3.0, -1.0], scale=[2.0, 0.5], dtype=np.float64)

  @jax.jit
  def run(batches):
    states = []
    for cls in (hk.BatchNorm, bnjax.haiku.BatchNorm):
      layer = hk.transform_with_state(lambda x, cls=cls: cls(True, True, DECAY)(x, True))
      params, state = layer.init(None, batches[0])
      for x in batches[1:]:
        _, state = layer.apply(params, state, None, x)
      states.append(state)
    return states

  haiku_state, bnjax_state = run(jnp.asarray(batches))
  dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)  # noqa: E731
  assert dtypes(bnjax_state) == dtypes(haiku_state)
  assert bnjax_state["batch_norm/~/mean_ema"]["average"].dtype == jnp.float64
  hidden = {"mean_ema": 0.0, "var_ema": 0.0}
  for x in batches[1:]:
    mu, var = reference.batch_mean_var(x, (0,))
    hidden = {
      "mean_ema": DECAY * hidden["mean_ema"] + (1 - DECAY) * mu,
      "var_ema": DECAY * hidden["var_ema"] + (1 - DECAY) * var,
    }
  for name, value in hidden.items():
    want = value / (1 - DECAY ** (len(batches) - 1))
    got = bnjax_state[f"batch_norm/~/{name}"]["average"]
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(got, haiku_state[f"batch_norm/~/{name}"]["average"], rtol=1e-13)


def test_the_moving_average_of_a_constant_is_that_constant():
  """The debiasing factor ``1 - decay**counter`` is computed without cancellation
  (``moving_average.zero_debias_factor``): five steps of one batch at decay 0.999 give
  its statistics to float32 rounding. Haiku's float32 power leaves its average 4.8e-6
  off; once the core took ``1 - decay`` in double (issue 31 bug 1), the same power
  made bnjax's 1.8e-5 off, as its hidden's weights no longer matched it."""
  x = jnp.array([[1.0, 3.0], [3.0, 5.0]])  # means (2, 4), variances (1, 1), exact

  @jax.jit
  def averages(x):
    results = []
    for cls in (hk.BatchNorm, bnjax.haiku.BatchNorm):
      layer = hk.transform_with_state(lambda x, cls=cls: cls(False, False, 0.999)(x, True))
      params, state = layer.init(None, x)
      for _ in range(5):
        _, state = layer.apply(params, state, None, x)
      results.append(state["batch_norm/~/mean_ema"]["average"].ravel())
    return results

  haiku_mean, mean = averages(x)
  np.testing.assert_allclose(mean, [2.0, 4.0], rtol=2.4e-7)
  haiku_error = np.max(np.abs(np.asarray(haiku_mean) / [2.0, 4.0] - 1))
  assert haiku_error > 1e-6, f"Haiku's average is off by {haiku_error}"


def test_statistics_are_exact_where_haikus_are_not():
  """Haiku computes E[x^2] - E[x]^2 in float32: at mean 1e4 and std 1 its variance is
  off by far more than rounding (here it measures it worse than 10 % wrong); bnjax's
  equals the float64 reference."""
  x = normal(2, (64, 3), loc=1e4)
  _, expected_var = reference.batch_mean_var(x, (0,))

  def variance(batch_norm_class):
    layer = hk.transform_with_state(lambda x: batch_norm_class(False, False, 0.0)(x, True))
    _, state = jax.jit(layer.init)(None, x)
    return state["batch_norm/~/var_ema"]["average"]  # decay 0: the batch's variance

  haiku_error = np.max(np.abs(variance(hk.BatchNorm) / expected_var - 1))
  assert haiku_error > 0.1, f"Haiku's variance is off by {haiku_error}"
  np.testing.assert_allclose(variance(bnjax.haiku.BatchNorm), expected_var, rtol=1e-4)


def test_half_precision_inputs_get_float32_statistics():
  """bfloat16 input: bfloat16 output and parameters (Haiku's dtypes), statistics and
  state in float32 (Haiku's state is bfloat16), equal to the reference of the same
  bfloat16 values."""
  x = jnp.asarray(normal(3, (32, 2), loc=50.0)).astype(jnp.bfloat16)
  layer = hk.transform_with_state(lambda x: bnjax.haiku.BatchNorm(True, True, 0.0)(x, True))
  params, state = jax.jit(layer.init)(None, x)
  y, state = jax.jit(layer.apply)(params, state, None, x)
  assert y.dtype == params["batch_norm"]["scale"].dtype == jnp.bfloat16
  average = state["batch_norm/~/var_ema"]["average"]
  assert average.dtype == jnp.float32
  mu, var = reference.batch_mean_var(np.asarray(x, np.float64), (0,))
  np.testing.assert_allclose(average, var, rtol=1e-5)
  np.testing.assert_allclose(state["batch_norm/~/mean_ema"]["average"], mu, rtol=1e-6)


def test_masked_statistics_are_those_of_the_valid_values():
  """A padded batch: the masked-out rows (even NaN) enter neither the output of the
  valid rows nor the statistics. (Haiku has no mask; averaging per-example means by
  hand would weigh examples of different lengths alike.)"""
  x = normal(4, (6, 5, 2))
  mask = np.arange(5)[None, :, None] < np.array([5, 3, 1, 4, 2, 5])[:, None, None]  # [N, L, 1]
  x = np.where(mask, x, np.nan).astype(np.float32)
  y, state = jax.jit(lambda x, mask: apply_layer(x, mask=mask))(x, mask)
  expected, mu, _ = reference.forward(x, 1.0, 0.0, 1e-5, (0, 1), mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(
    np.where(valid, y, 0), np.where(valid, expected, 0), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(state["batch_norm/~/mean_ema"]["average"], mu, rtol=1e-5)


def test_data_format_and_axis_options_match_haiku():
  """channels_first, explicit reduction axes and a per-example (conditional) scale."""
  x = normal(5, (4, 3, 2, 2), loc=2.0)
  scale = normal(6, (4, 3, 1, 1))  # not per feature: applied after normalizing

  def both(make, call):
    run = lambda cls: hk.transform_with_state(lambda x: call(make(cls), x))  # noqa: E731
    outputs = []
    for cls in (hk.BatchNorm, bnjax.haiku.BatchNorm):
      model = run(cls)
      params, state = model.init(None, x)
      outputs.append(model.apply(params, state, None, x))
    return outputs

  cases = [
    (lambda cls: cls(True, True, DECAY, data_format="channels_first"), lambda m, x: m(x, True)),
    (lambda cls: cls(False, True, DECAY, axis=[0, 2]), lambda m, x: m(x, True)),
    (lambda cls: cls(False, False, DECAY), lambda m, x: m(x, True, scale=scale)),
    (lambda cls: cls(True, True, DECAY), lambda m, x: m(x, False, test_local_stats=True)),
  ]
  results = jax.jit(lambda x: [both(make, call) for make, call in cases])(x)
  for (haiku_y, haiku_state), (bnjax_y, bnjax_state) in results:
    np.testing.assert_allclose(bnjax_y, haiku_y, rtol=1e-4, atol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), bnjax_state, haiku_state
    )


def test_synchronized_statistics_equal_the_full_batch():
  """cross_replica_axis under vmap, pmap and shard_map; and under jit with the batch sharded
  over 8 devices (no axis name): each gives the full batch's output and averages."""
  x = normal(7, (8, 4, 3), loc=5.0)
  full_y, full_state = jax.jit(lambda x: apply_layer(x.reshape(32, 3)))(x)

  def synced(x):
    return apply_layer(x, cross_replica_axis="i")

  vmapped = jax.jit(jax.vmap(synced, axis_name="i", out_axes=(0, None)))(x)
  pmapped = jax.pmap(synced, axis_name="i")(x)
  mesh = jax.make_mesh((8,), ("i",))
  sharded_map = jax.jit(
    jax.shard_map(lambda x: synced(x[0]), mesh=mesh, in_specs=P("i"), out_specs=(P("i"), P()))
  )(jax.device_put(x, NamedSharding(mesh, P("i"))))
  sharded = jax.device_put(x.reshape(32, 3), NamedSharding(mesh, P("i")))
  jitted = jax.jit(apply_layer)(sharded)
  pmapped = (pmapped[0], jax.tree.map(lambda a: a[0], pmapped[1]))  # every device's is the same
  for y, state in (vmapped, pmapped, sharded_map, jitted):
    np.testing.assert_allclose(np.reshape(y, (32, 3)), full_y, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state, full_state)


def test_recompute_batch_stats_is_algorithm_2():
  """Every layer's averages become Algorithm 2's statistics of its inputs, and further
  training keeps moving them as Haiku would (hidden matches the average)."""
  batches = [normal(8 + k, (6, 3), loc=k) for k in range(3)]
  model = hk.transform_with_state(
    lambda x: bnjax.haiku.BatchNorm(False, False, DECAY, name="bn")(x * 2.0, True)
  )
  params, state = jax.jit(model.init)(None, batches[0])
  state = bnjax.haiku.recompute_batch_stats(model.apply, params, state, batches)
  mean, var = reference.population_statistics([2.0 * b for b in batches], (0,))
  np.testing.assert_allclose(state["bn/~/mean_ema"]["average"], mean, rtol=1e-5)
  np.testing.assert_allclose(state["bn/~/var_ema"]["average"], var, rtol=1e-5)
  entry = state["bn/~/var_ema"]
  np.testing.assert_allclose(
    entry["hidden"] / (1 - DECAY ** entry["counter"]), entry["average"], rtol=1e-6
  )


def test_sync_state_averages_the_moving_averages_across_devices():
  x = normal(9, (8, 4, 2), loc=np.arange(8)[:, None, None])
  _, states = jax.pmap(lambda x: apply_layer(x))(x)  # each device its own statistics
  synced = jax.pmap(lambda s: bnjax.haiku.sync_state(s, "i"), axis_name="i")(states)
  for name in ("batch_norm/~/mean_ema", "batch_norm/~/var_ema"):
    for field in ("hidden", "average"):
      np.testing.assert_allclose(
        synced[name][field][3], np.mean(states[name][field], axis=0), rtol=1e-6
      )
    np.testing.assert_array_equal(synced[name]["counter"], states[name]["counter"])


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_without_the_framework_the_import_names_the_extra(monkeypatch, framework):
  importlib.import_module(f"bnjax.{framework}")
  monkeypatch.setitem(sys.modules, framework, None)  # as if not installed
  monkeypatch.delitem(sys.modules, f"bnjax.{framework}")
  monkeypatch.delattr(bnjax, framework, raising=False)
  with pytest.raises(ImportError, match=rf"pip install -e '\.\[{framework}\]' in a clone"):
    importlib.import_module(f"bnjax.{framework}")


@pytest.mark.slow
def test_import_bnjax_imports_neither_haiku_nor_equinox():
  code = (
    "import sys, bnjax\n"
    "assert not {'haiku', 'equinox'} & set(sys.modules), 'the core imported a framework'\n"
    "print(bnjax.haiku.BatchNorm.__module__, bnjax.equinox.BatchNorm.__module__)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=pathlib.Path(__file__).resolve().parent.parent,
    env=child_env(),
  )
  assert result.stdout == "bnjax.haiku bnjax.equinox\n", result.stderr


def test_gradients_are_the_papers_chain_rule():
  """d(sum(y * dy)) by x, scale and offset, against the float64 Section 3 chain rule."""
  x, dy = normal(10, (12, 3), loc=4.0), normal(11, (12, 3))
  gamma = np.array([0.5, 2.0, -1.0], np.float32)
  model = hk.transform_with_state(
    lambda x: bnjax.haiku.BatchNorm(
      True, True, DECAY, scale_init=hk.initializers.Constant(gamma), name="bn"
    )(x, True)
  )

  @jax.jit
  def grads(x):
    params, state = model.init(None, x)
    loss = lambda x, params: jnp.sum(model.apply(params, state, None, x)[0] * dy)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(x, params)

  dx, dparams = grads(x)
  expected_dx, dgamma, dbeta = reference.backward(x, gamma, dy, 1e-5, (0,))
  np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams["bn"]["scale"].ravel(), dgamma, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams["bn"]["offset"].ravel(), dbeta, rtol=1e-5, atol=1e-5)
