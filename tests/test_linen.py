"""bnjax.linen.BatchNorm against flax.linen.BatchNorm (exact-variance mode, so the
two agree to rounding): interface, variables, outputs, gradients, lifting.

Each test runs its computation under one ``jax.jit``: eager calls would compile
operation by operation, which is what costs the time on CPU."""

import dataclasses
import functools
import re

import chex
import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax.linen
from tests import reference, samples

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


# Flax's BatchNorm mixes dtypes implicitly, which the suite's strict mode forbids.
pytestmark = pytest.mark.usefixtures("standard_promotion")

# Standard normal float32 inputs, drawn in float32 (the numbers these tests were written with).
normal = functools.partial(samples.normal, draw_dtype=np.float32)


def flax_exact(**kwargs):
  return nn.BatchNorm(use_fast_variance=False, **kwargs)


def test_mixed_precision_under_strict_promotion():
  """A bfloat16 input with float32 parameters: Flax's dtype rule (the output is
  promoted with the parameters) holds in strict mode, and the values are Algorithm 1's."""
  x = normal(0, (16, 3)).astype(jnp.bfloat16)
  module = bnjax.linen.BatchNorm(use_running_average=False)
  y, state = jax.jit(
    lambda x: module.apply(module.init(jax.random.key(1), x), x, mutable=["batch_stats"])
  )(x)
  assert y.dtype == jnp.float32
  want, mean, var = reference.forward(np.asarray(x, np.float64), 1.0, 0.0, 1e-5, (0,))
  # float32 arithmetic on inputs float32 holds exactly: a few float32 ulps (1.2e-7 at 1).
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(
    state["batch_stats"],
    {"mean": 0.01 * mean.ravel(), "var": 0.99 + 0.01 * var.ravel()},
    rtol=1e-6,
    atol=1e-7,
  )


def test_fields_and_defaults_are_flaxs():
  def fields(cls):
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}

  ours, theirs = fields(bnjax.linen.BatchNorm), fields(nn.BatchNorm)
  assert {name: ours[name] for name in theirs} == theirs
  assert list(ours)[: len(theirs)] == list(theirs)  # positional order kept too
  extra = {"unbiased_variance", "virtual_batch_size", "debias", "update_stats"}
  assert set(ours) - set(theirs) == extra
  assert ours["unbiased_variance"] is False and ours["virtual_batch_size"] is None
  assert ours["debias"] is False and ours["update_stats"] is None


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_flax_in_training_and_inference(config):
  x = 2.0 * normal(0, (4, 6, 5, 3)) + 1.0
  ours, theirs = bnjax.linen.BatchNorm(**config), flax_exact(**config)

  @jax.jit
  def run(x):
    """Both modules' variables, then both applied to Flax's (a checkpoint from Flax),
    in training and in inference mode."""
    variables = theirs.init(jax.random.key(1), x, use_running_average=False)
    applied = [
      tuple(
        module.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
        for module in (ours, theirs)
      )
      for train in (True, False)
    ]
    return ours.init(jax.random.key(1), x, use_running_average=False), variables, applied

  our_variables, variables, applied = run(x)
  chex.assert_trees_all_equal_structs(our_variables, variables)
  chex.assert_trees_all_equal_dtypes(our_variables, variables)
  chex.assert_trees_all_equal(our_variables, variables)
  for (y, state), (want_y, want_state) in applied:
    assert y.dtype == want_y.dtype
    # bfloat16 parameters give bfloat16 outputs (8 bits of mantissa: 4e-3 relative).
    tolerance = 1e-2 if y.dtype == jnp.bfloat16 else 2e-6
    chex.assert_trees_all_close(y, want_y, rtol=tolerance, atol=tolerance)
    chex.assert_trees_all_close(state, want_state, rtol=1e-6, atol=1e-7)


def test_gradients_match_flax():
  x = normal(0, (8, 4, 4, 3)) + 0.5
  w = normal(2, x.shape)
  variables = jax.jit(lambda x: flax_exact().init(jax.random.key(1), x, use_running_average=False))(
    x
  )

  def loss(module, params, x):
    y, _ = module.apply(
      {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
    )
    return jnp.sum(w * y)

  @jax.jit
  def gradients(params, x):
    return [
      jax.grad(functools.partial(loss, module), argnums=(0, 1))(params, x)
      for module in (bnjax.linen.BatchNorm(), flax_exact())
    ]

  ours, theirs = gradients(variables["params"], x)
  # Sums of 128 float32 terms of order 1 (the scale's and bias's gradients: up to ~20).
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_half_precision_input_matches_flax_dtypes():
  x = normal(0, (16, 3)).astype(jnp.bfloat16)

  @jax.jit
  def run(x):
    results = []
    for dtype in (None, jnp.bfloat16):
      ours, theirs = bnjax.linen.BatchNorm(dtype=dtype), flax_exact(dtype=dtype)
      variables = theirs.init(jax.random.key(1), x, use_running_average=False)
      results.append(
        tuple(
          module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
          for module in (ours, theirs)
        )
      )
    return results

  for (y, state), (want_y, want_state) in run(x):
    assert y.dtype == want_y.dtype
    assert state["batch_stats"]["mean"].dtype == jnp.float32
    # bfloat16 outputs (dtype=bfloat16) may round the other way: 1 bfloat16 ulp, 8e-3 at 1.
    tolerance = 2e-2 if y.dtype == jnp.bfloat16 else 2e-6
    chex.assert_trees_all_close(y, want_y, rtol=tolerance, atol=tolerance)
    chex.assert_trees_all_close(state, want_state, rtol=1e-6, atol=1e-7)


def test_mask_matches_flax():
  x = normal(0, (6, 5, 3))
  mask = np.random.default_rng(1).random((6, 5, 1)) < 0.7

  @jax.jit
  def run(x, mask):
    variables = flax_exact().init(jax.random.key(1), x, use_running_average=False)
    return [
      module.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
      for module in (bnjax.linen.BatchNorm(), flax_exact())
    ]

  (y, state), (want_y, want_state) = run(x, mask)
  chex.assert_trees_all_close(y, want_y, rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(state, want_state, rtol=1e-6, atol=1e-7)
  # Both against Algorithm 1 over the valid values only.
  want, mean, var = reference.forward(x, 1.0, 0.0, 1e-5, (0, 1), mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y)[valid], want[valid], rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(
    state["batch_stats"],
    {"mean": 0.01 * mean.ravel(), "var": 0.99 + 0.01 * var.ravel()},
    rtol=1e-6,
    atol=1e-7,
  )


def test_no_statistics_update_during_init_and_when_immutable():
  x = normal(0, (8, 3)) + 5.0
  module = bnjax.linen.BatchNorm(use_running_average=False, axis_name="batch")
  # No named axis exists at init: the statistics are not used then.
  variables = jax.jit(lambda x: module.init(jax.random.key(0), x))(x)
  chex.assert_trees_all_equal(variables["batch_stats"], {"mean": jnp.zeros(3), "var": jnp.ones(3)})
  # Training mode without mutable=["batch_stats"]: Flax's error, word for word.
  message = 'Cannot update variable "mean" in "/" because collection "batch_stats" is immutable.'
  errors = []
  for norm in (bnjax.linen.BatchNorm, flax_exact):
    with pytest.raises(flax.errors.ModifyScopeVariableError, match=re.escape(message)) as error:
      jax.jit(norm(use_running_average=False).apply)(variables, x)  # raised while tracing
    errors.append(str(error.value))
  assert errors[0] == errors[1]


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
  x = normal(0, (32, 10))
  variables = jax.jit(lambda x: MLP(nn.BatchNorm).init(jax.random.key(1), x, train=False))(x)

  def train_and_evaluate(model, variables, x):
    """Three SGD steps from ``variables``; the trained variables and their inference output."""

    def step(_, variables):
      def loss(params):
        logits, updates = model.apply(
          {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(logits**2), updates

      grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
      params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
      return {"params": params, **updates}

    variables = jax.lax.fori_loop(0, 3, step, variables)
    return variables, model.apply(variables, x, train=False)

  ours, theirs = (
    jax.jit(functools.partial(train_and_evaluate, MLP(norm)))(variables, x)
    for norm in (bnjax.linen.BatchNorm, nn.BatchNorm)
  )
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_pmap_synchronized_matches_flax():
  x = normal(0, (8, 4, 3)) * 2 + 1

  def run(module):
    variables = jax.jit(lambda x: module.init(jax.random.key(1), x))(x[0])
    f = jax.pmap(lambda x: module.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")
    return f(x)

  (y, state), (want_y, want_state) = (
    run(norm(use_running_average=False, axis_name="batch"))
    for norm in (bnjax.linen.BatchNorm, flax_exact)
  )
  chex.assert_trees_all_close(y, want_y, rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(state, want_state, rtol=1e-6, atol=1e-7)
  # Both are Algorithm 1 over the whole batch of 32, as on one device.
  want, mean, var = reference.forward(x, 1.0, 0.0, 1e-5, (0, 1))
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(
    jax.tree.map(lambda a: a[5], state["batch_stats"]),
    {"mean": 0.01 * mean.ravel(), "var": 0.99 + 0.01 * var.ravel()},
    rtol=1e-6,
    atol=1e-7,
  )


class ScannedLayer(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x, _):
    x = nn.Dense(4, use_bias=False)(x)
    return nn.tanh(self.norm(use_running_average=False, use_fast_variance=False)(x)), None


def test_inside_nn_scan_over_layers():
  x = normal(0, (8, 4))

  @functools.partial(jax.jit, static_argnums=0)
  def run(norm, x):
    stack = nn.scan(
      ScannedLayer,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True},
      length=3,
    )(norm)
    variables = stack.init(jax.random.key(1), x, None)
    return variables, stack.apply(variables, x, None, mutable=["batch_stats"])

  ours_vars, ours = run(bnjax.linen.BatchNorm, x)
  theirs_vars, theirs = run(nn.BatchNorm, x)
  assert ours_vars["batch_stats"]["BatchNorm_0"]["mean"].shape == (3, 4)
  chex.assert_trees_all_equal(ours_vars, theirs_vars)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_under_jax_vmap_and_nn_vmap():
  """An ensemble: jax.vmap over members' variables; nn.vmap lifting the module.
  Each member's output is that of the module applied to it alone."""
  x = normal(0, (3, 8, 4)) + 1.0
  module = bnjax.linen.BatchNorm(use_running_average=False)
  apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
  members = jax.jit(lambda x: jax.vmap(module.init)(jax.random.split(jax.random.key(0), 3), x))(x)
  y, state = jax.jit(jax.vmap(apply))(members, x)
  want = np.stack([reference.forward(member, 1.0, 0.0, 1e-5, (0,))[0] for member in x])
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)  # each member its own batch
  for i in range(3):
    yi, si = apply(jax.tree.map(lambda a, i=i: a[i], members), x[i])
    chex.assert_trees_all_close(y[i], yi, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], state), si, rtol=1e-6, atol=1e-7)

  lifted = nn.vmap(
    bnjax.linen.BatchNorm,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True},
    in_axes=0,
  )(use_running_average=False)
  y_lifted, _ = jax.jit(
    lambda x: lifted.apply(lifted.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  )(x)
  chex.assert_trees_all_close(y_lifted, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.999])
def test_batch_stats_move_as_flaxs_to_float32_rounding(momentum):
  """Issue 31 bug 1, through the drop-in: the core rounded ``momentum`` before
  ``1 - momentum`` (1.3e-5 off Flax at 0.999); on a batch whose statistics are exact,
  the two modules' ``batch_stats`` now agree to float32 rounding."""
  x = jnp.array([[1.0, 10.0, -3.0], [3.0, 30.0, -5.0]])

  @jax.jit
  def both(x):
    stats = []
    for module in (bnjax.linen.BatchNorm, nn.BatchNorm):
      layer = module(use_running_average=False, momentum=momentum)
      variables = layer.init(jax.random.key(0), x)
      stats.append(layer.apply(variables, x, mutable=["batch_stats"])[1]["batch_stats"])
    return stats

  ours, theirs = both(x)
  chex.assert_trees_all_close(ours, theirs, rtol=1.2e-7, atol=0)


def test_half_precision_batch_stats_updated_with_the_exact_momentum():
  """Issue 8 item 5: ``batch_stats`` in bfloat16 (``force_float32_reductions=False``)
  are updated in float32 and rounded once; Flax rounds ``momentum`` to bfloat16
  (0.99 -> 0.98828) and gives the batch 17% too much weight."""
  x = jnp.tile(jnp.array([[90.0, -20.0], [110.0, 20.0]]), (4, 1)).astype(jnp.bfloat16)
  module = bnjax.linen.BatchNorm(
    use_running_average=False, param_dtype=jnp.bfloat16, force_float32_reductions=False
  )
  _, updated = jax.jit(
    lambda x: module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  )(x)
  stats = updated["batch_stats"]
  want = {"mean": 0.01 * np.array([100.0, 0.0]), "var": 0.99 + 0.01 * np.array([100.0, 400.0])}
  for name in ("mean", "var"):
    assert stats[name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
      stats[name].astype(jnp.float32), want[name].astype(jnp.bfloat16).astype(np.float32)
    )


def _stats_dtypes_after_two_steps(module_class, x, **kwargs):
  """Traced, not run (``jax.eval_shape``): a dtype is fixed when the computation is
  traced, and the compiled step's outputs have the traced ones (54 modules' inits and
  steps would otherwise compile, seconds per case)."""
  module = module_class(use_running_average=False, momentum=0.9, **kwargs)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)

  def step(variables, x):
    _, updates = module.apply(variables, x, mutable=["batch_stats"])
    return {**variables, **updates}

  once = jax.eval_shape(step, variables, x)
  twice = jax.eval_shape(step, once, x)
  return [
    {name: stats[name].dtype for name in ("mean", "var")}
    for stats in (variables["batch_stats"], once["batch_stats"], twice["batch_stats"])
  ]


@pytest.mark.parametrize("force_float32_reductions", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_batch_stats_dtypes_are_flaxs_in_every_precision(param_dtype, force_float32_reductions):
  """Issue 18 item 9: ``batch_stats`` have Flax's dtypes after init and after each
  step, for every input dtype, ``dtype``, ``param_dtype`` and
  ``force_float32_reductions`` (Flax's half-precision ``batch_stats`` become float32
  at the first step when its batch statistics are float32), so checkpoints match."""
  for x_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    x = jax.ShapeDtypeStruct((8, 3), x_dtype)
    for dtype in (None, jnp.float32, jnp.bfloat16):
      kwargs = dict(
        dtype=dtype, param_dtype=param_dtype, force_float32_reductions=force_float32_reductions
      )
      ours = _stats_dtypes_after_two_steps(bnjax.linen.BatchNorm, x, **kwargs)
      theirs = _stats_dtypes_after_two_steps(nn.BatchNorm, x, **kwargs)
      assert ours == theirs, (x_dtype, kwargs)


def test_half_precision_param_dtype_running_average_is_float32_exact():
  """Issue 18 item 9: float32 inputs with ``param_dtype=bfloat16`` and
  ``force_float32_reductions=False``: the running mean and variance after one step
  are float32 (as Flax's) and within float32 rounding of the float64 average, not
  rounded to bfloat16 (2e-3 relative off)."""
  module = bnjax.linen.BatchNorm(
    use_running_average=False,
    momentum=0.9,
    param_dtype=jnp.bfloat16,
    force_float32_reductions=False,
  )
  flax_module = nn.BatchNorm(
    use_running_average=False,
    momentum=0.9,
    param_dtype=jnp.bfloat16,
    force_float32_reductions=False,
  )

  @jax.jit  # one program (eager, the draw, init and Flax's apply compile op by op)
  def run():
    x = jax.random.normal(jax.random.key(2), (16, 3)) * 2 + 5
    variables = module.init(jax.random.key(0), x)
    return x, *(m.apply(variables, x, mutable=["batch_stats"])[1] for m in (module, flax_module))

  x, updates, flax_updates = run()
  x64 = np.asarray(x, np.float64)
  want = {"mean": 0.1 * x64.mean(0), "var": 0.9 + 0.1 * x64.var(0)}
  for name in ("mean", "var"):
    got = updates["batch_stats"][name]
    assert got.dtype == flax_updates["batch_stats"][name].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want[name], rtol=2e-6)
