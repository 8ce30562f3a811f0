"""bnjax.linen.BatchNorm against flax.linen.BatchNorm (exact-variance mode, so the
two agree to rounding): interface, variables, outputs, gradients, lifting."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax.linen

CONFIGS = [
    dict(),
    dict(momentum=0.9, epsilon=1e-3),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(axis=1),
    dict(axis=(1, 3)),
    dict(scale_init=nn.initializers.constant(2.0), bias_init=nn.initializers.constant(0.5)),
    dict(param_dtype=jnp.bfloat16),
]


def close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=rtol, atol=atol), a, b)


@pytest.fixture(autouse=True)
def standard_promotion(request):
  """Flax's BatchNorm mixes dtypes implicitly, which the suite's strict mode forbids."""
  if "strict" in request.node.name:
    yield
    return
  with jax.numpy_dtype_promotion("standard"):
    yield


def flax_exact(**kwargs):
  return nn.BatchNorm(use_fast_variance=False, **kwargs)


def test_mixed_precision_under_strict_promotion():
  x = jax.random.normal(jax.random.key(0), (16, 3)).astype(jnp.bfloat16)
  module = bnjax.linen.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(1), x)
  y, _ = module.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.float32  # Flax's rule: promoted with the float32 parameters


def test_fields_and_defaults_are_flaxs():
  def fields(cls):
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}

  ours, theirs = fields(bnjax.linen.BatchNorm), fields(nn.BatchNorm)
  assert {name: ours[name] for name in theirs} == theirs
  assert list(ours)[:len(theirs)] == list(theirs)  # positional order kept too
  assert set(ours) - set(theirs) == {"unbiased_variance", "virtual_batch_size"}
  assert ours["unbiased_variance"] is False and ours["virtual_batch_size"] is None


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_flax_in_training_and_inference(config):
  x = 2.0 * jax.random.normal(jax.random.key(0), (4, 6, 5, 3)) + 1.0
  ours, theirs = bnjax.linen.BatchNorm(**config), flax_exact(**config)
  variables = theirs.init(jax.random.key(1), x, use_running_average=False)
  assert jax.tree.structure(ours.init(jax.random.key(1), x, use_running_average=False)) == jax.tree.structure(variables)
  close(ours.init(jax.random.key(1), x, use_running_average=False), variables)

  for train in (True, False):
    y, state = ours.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
    want_y, want_state = theirs.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
    assert y.dtype == want_y.dtype
    close(y, want_y, rtol=1e-4, atol=1e-4)
    close(state, want_state)


def test_gradients_match_flax():
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) + 0.5
  w = jax.random.normal(jax.random.key(2), x.shape)
  variables = flax_exact().init(jax.random.key(1), x, use_running_average=False)

  def loss(module, params, x):
    y, _ = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(w * y)

  ours = jax.grad(functools.partial(loss, bnjax.linen.BatchNorm()), argnums=(0, 1))(variables["params"], x)
  theirs = jax.grad(functools.partial(loss, flax_exact()), argnums=(0, 1))(variables["params"], x)
  close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_half_precision_input_matches_flax_dtypes():
  x = jax.random.normal(jax.random.key(0), (16, 3)).astype(jnp.bfloat16)
  for dtype in (None, jnp.bfloat16):
    ours, theirs = bnjax.linen.BatchNorm(dtype=dtype), flax_exact(dtype=dtype)
    variables = theirs.init(jax.random.key(1), x, use_running_average=False)
    y, state = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    want_y, want_state = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == want_y.dtype
    assert state["batch_stats"]["mean"].dtype == jnp.float32
    close(y, want_y, rtol=2e-2, atol=2e-2)
    close(state, want_state)


def test_mask_matches_flax():
  x = jax.random.normal(jax.random.key(0), (6, 5, 3))
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (6, 5, 1))
  variables = flax_exact().init(jax.random.key(1), x, use_running_average=False)
  y, state = bnjax.linen.BatchNorm().apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
  want_y, want_state = flax_exact().apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
  close(y, want_y, rtol=1e-4, atol=1e-4)
  close(state, want_state)


def test_no_statistics_update_during_init_and_when_immutable():
  x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
  module = bnjax.linen.BatchNorm(use_running_average=False, axis_name="batch")
  variables = module.init(jax.random.key(0), x)  # no named axis exists: not used at init
  close(variables["batch_stats"], {"mean": jnp.zeros(3), "var": jnp.ones(3)})
  with pytest.raises(Exception, match="batch_stats"):
    bnjax.linen.BatchNorm(use_running_average=False).apply(variables, x)


class MLP(nn.Module):
  norm: type = bnjax.linen.BatchNorm

  @nn.compact
  def __call__(self, x, train):
    for features in (16, 8):
      x = nn.Dense(features, use_bias=False)(x)
      x = self.norm(use_running_average=not train, momentum=0.9, use_fast_variance=False)(x)
      x = nn.relu(x)
    return nn.Dense(2)(x)


def test_flax_checkpoint_loads_and_trains_the_same():
  """Variables initialized with Flax's BatchNorm drive bnjax's, step for step."""
  x = jax.random.normal(jax.random.key(0), (32, 10))
  variables = MLP(nn.BatchNorm).init(jax.random.key(1), x, train=False)

  def step(model, variables):
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.mean(logits**2), updates
    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {"params": params, **updates}

  ours, theirs = variables, variables
  for _ in range(3):
    ours, theirs = step(MLP(bnjax.linen.BatchNorm), ours), step(MLP(nn.BatchNorm), theirs)
  close(ours, theirs, rtol=1e-4, atol=1e-5)
  close(MLP().apply(ours, x, train=False), MLP(nn.BatchNorm).apply(theirs, x, train=False), rtol=1e-4, atol=1e-4)


def test_pmap_synchronized_matches_flax():
  x = jax.random.normal(jax.random.key(0), (8, 4, 3)) * 2 + 1

  def run(module):
    variables = module.init(jax.random.key(1), x[0])
    f = jax.pmap(lambda x: module.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")
    return f(x)

  close(run(bnjax.linen.BatchNorm(use_running_average=False, axis_name="batch")),
        run(flax_exact(use_running_average=False, axis_name="batch")), rtol=1e-4, atol=1e-5)


class ScannedLayer(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x, _):
    x = nn.Dense(4, use_bias=False)(x)
    return nn.tanh(self.norm(use_running_average=False, use_fast_variance=False)(x)), None


def test_inside_nn_scan_over_layers():
  x = jax.random.normal(jax.random.key(0), (8, 4))

  def run(norm):
    stack = nn.scan(
        ScannedLayer, variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True}, length=3,
    )(norm)
    variables = stack.init(jax.random.key(1), x, None)
    return variables, stack.apply(variables, x, None, mutable=["batch_stats"])

  ours_vars, ours = run(bnjax.linen.BatchNorm)
  theirs_vars, theirs = run(nn.BatchNorm)
  assert ours_vars["batch_stats"]["BatchNorm_0"]["mean"].shape == (3, 4)
  close(ours_vars, theirs_vars)
  close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_under_jax_vmap_and_nn_vmap():
  """An ensemble: jax.vmap over members' variables; nn.vmap lifting the module."""
  x = jax.random.normal(jax.random.key(0), (3, 8, 4)) + 1.0
  module = bnjax.linen.BatchNorm(use_running_average=False)
  members = jax.vmap(lambda k, x: module.init(k, x))(jax.random.split(jax.random.key(0), 3), x)
  y, state = jax.vmap(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))(members, x)
  for i in range(3):
    yi, si = module.apply(jax.tree.map(lambda a: a[i], members), x[i], mutable=["batch_stats"])
    close(y[i], yi)
    close(jax.tree.map(lambda a: a[i], state), si)

  lifted = nn.vmap(
      bnjax.linen.BatchNorm, variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True}, in_axes=0,
  )(use_running_average=False)
  lifted_vars = lifted.init(jax.random.key(0), x)
  y_lifted, _ = lifted.apply(lifted_vars, x, mutable=["batch_stats"])
  close(y_lifted, y)


def test_half_precision_batch_stats_updated_with_the_exact_momentum():
  """Issue 8 item 5: ``batch_stats`` in bfloat16 (``force_float32_reductions=False``)
  are updated in float32 and rounded once; Flax rounds ``momentum`` to bfloat16
  (0.99 -> 0.98828) and gives the batch 17% too much weight."""
  x = jnp.tile(jnp.array([[90.0, -20.0], [110.0, 20.0]]), (4, 1)).astype(jnp.bfloat16)
  module = bnjax.linen.BatchNorm(use_running_average=False, param_dtype=jnp.bfloat16,
                                 force_float32_reductions=False)
  variables = module.init(jax.random.key(0), x)
  _, updated = module.apply(variables, x, mutable=["batch_stats"])
  stats = updated["batch_stats"]
  want = {"mean": 0.01 * np.array([100.0, 0.0]), "var": 0.99 + 0.01 * np.array([100.0, 400.0])}
  for name in ("mean", "var"):
    assert stats[name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(stats[name].astype(jnp.float32),
                                  want[name].astype(jnp.bfloat16).astype(np.float32))
