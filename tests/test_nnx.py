"""bnjax.nnx.BatchNorm against flax.nnx.BatchNorm (exact-variance mode), and against
Algorithm 1 (float64 NumPy) where the semantics are bnjax's own.

The modules run under ``nnx.jit``: eager calls would compile operation by operation,
which is what costs the time on CPU."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.nnx
from tests import reference, samples
from tests.samples import numpy_normal_init

# Flax's BatchNorm mixes dtypes implicitly, which the suite's strict mode forbids.
pytestmark = pytest.mark.usefixtures("standard_promotion")

# Standard normal float32 inputs, drawn in float32 (the numbers these tests were written with).
normal = functools.partial(samples.normal, draw_dtype=np.float32)


def exact_flax(num_features, **kwargs):
  return nnx.BatchNorm(num_features, use_fast_variance=False, **kwargs)


def pair(num_features=3, **kwargs):
  return (
    bnjax.nnx.BatchNorm(num_features, rngs=nnx.Rngs(0), **kwargs),
    exact_flax(num_features, rngs=nnx.Rngs(0), **kwargs),
  )


def test_constructor_signature_is_flaxs():
  ours = inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  assert list(ours)[: len(theirs)] == list(theirs)
  extra = ["unbiased_variance", "virtual_batch_size", "debias", "update_stats"]
  assert list(ours)[len(theirs) :] == extra
  for name in theirs:
    if name not in ("self", "rngs", "bias_init", "scale_init", "promote_dtype"):
      assert ours[name].default == theirs[name].default, name


@nnx.jit
def train_then_evaluate(ours, theirs, x):
  """Two training-mode calls of each (the second sees updated statistics), their
  statistics; then in inference mode (``.eval()``) the outputs, the statistics after
  them, and the outputs in training mode by argument."""
  training = [(ours(x), theirs(x)) for _ in range(2)]
  trained = nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat)
  ours.eval(), theirs.eval()
  inference = ours(x), theirs(x)
  after_inference = nnx.state(ours, nnx.BatchStat)
  by_argument = ours(x, use_running_average=False), theirs(x, use_running_average=False)
  return training, trained, inference, after_inference, by_argument


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(momentum=0.9),
    dict(use_bias=False, use_scale=False),
    dict(axis=1),
    dict(param_dtype=jnp.bfloat16),
  ],
)
def test_matches_flax_state_and_outputs(kwargs):
  x = 2.0 * normal(0, (8, 3, 5)) + 1.0
  if kwargs.get("axis") != 1:
    x = x.transpose(0, 2, 1)
  ours, theirs = pair(**kwargs)
  chex.assert_trees_all_equal_structs(nnx.state(ours), nnx.state(theirs))
  chex.assert_trees_all_equal(nnx.state(ours), nnx.state(theirs))
  # bfloat16 parameters give bfloat16 outputs (8 bits of mantissa: 4e-3 relative).
  tolerance = 1e-2 if kwargs.get("param_dtype") == jnp.bfloat16 else 2e-6

  def close_outputs(pairs):
    for y, want in pairs:
      assert y.dtype == want.dtype
      chex.assert_trees_all_close(y, want, rtol=tolerance, atol=tolerance)

  training, trained, inference, after_inference, by_argument = train_then_evaluate(ours, theirs, x)
  assert ours.use_running_average is True and theirs.use_running_average is True
  close_outputs(training)  # training updates mean and var
  chex.assert_trees_all_close(*trained, rtol=1e-6, atol=1e-7)
  close_outputs([inference, by_argument])
  chex.assert_trees_all_equal(after_inference, trained[0])  # inference leaves them alone
  chex.assert_trees_all_close(
    nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat), rtol=1e-6, atol=1e-7
  )


def test_view_and_call_override():
  """A view in inference mode normalizes with the running statistics and leaves them;
  the module itself, in training mode, normalizes with the batch's and updates them."""
  x = normal(0, (8, 3)) + 1.0
  ours, _ = pair()
  frozen = nnx.view(ours, use_running_average=True)
  assert frozen.use_running_average and not ours.use_running_average
  call = nnx.jit(lambda module, x: module(x))
  y_frozen = call(frozen, x)
  chex.assert_trees_all_equal((ours.mean[...], ours.var[...]), (np.zeros(3), np.ones(3)))
  np.testing.assert_allclose(y_frozen, x / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-6)
  y = call(ours, x)
  want, mean, var = reference.forward(x, 1.0, 0.0, 1e-5, (0,))
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(
    (ours.mean[...], ours.var[...]),
    (0.01 * mean.ravel(), 0.99 + 0.01 * var.ravel()),
    rtol=1e-6,
    atol=1e-7,
  )


class Net(nnx.Module):
  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(4, 6, use_bias=False, kernel_init=numpy_normal_init, rngs=rngs)
    self.norm = norm(6, rngs=rngs)
    self.head = nnx.Linear(6, 1, kernel_init=numpy_normal_init, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.linear(x))))


def test_training_loop_with_nnx_jit_and_optimizer_matches_flax():
  x = normal(0, (16, 4))
  target = np.sum(x, axis=1, keepdims=True)

  def train(norm):
    model = Net(norm, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    losses = [step(model, optimizer) for _ in range(5)]
    model.eval()
    return jnp.stack(losses), nnx.jit(lambda model: model(x))(model), nnx.state(model)

  # Five SGD steps through float32 forward and backward passes.
  chex.assert_trees_all_close(train(bnjax.nnx.BatchNorm), train(exact_flax), rtol=1e-5, atol=1e-6)


def test_synchronized_under_pmap():
  """Each device's slice is normalized with the whole batch's statistics: the outputs and
  the updated statistics are those of the whole batch on one device."""
  x = normal(0, (8, 4, 3)) + 2.0
  graphdef, state = nnx.split(bnjax.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0)))

  def apply(state, x):
    module = nnx.merge(graphdef, state)
    y = module(x)
    return y, nnx.state(module)

  y, new_state = jax.pmap(apply, axis_name="batch", in_axes=(None, 0))(state, x)
  full = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  want = nnx.jit(lambda module, x: module(x))(full, x.reshape(32, 3))
  chex.assert_trees_all_close(y.reshape(32, 3), want, rtol=2e-6, atol=2e-6)
  chex.assert_trees_all_close(
    jax.tree.map(lambda a: a[5], new_state), nnx.state(full), rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize("norm", [bnjax.nnx.BatchNorm, bnjax.nnx.BatchRenorm])
def test_gradient_with_hijax_variables_as_flax(norm):
  """Issue 8 item 3: with hijax variables the running statistics are written
  inside the differentiated function; as Flax, the write stops the gradient, so
  the gradients and statistics are those of ordinary variables (and Flax's)."""
  x = normal(0, (8, 4))

  def gradients(norm, hijax):
    with nnx.var_defaults(hijax=hijax):
      model = Net(norm, nnx.Rngs(0))  # the BN input depends on the parameters

      @jax.jit
      def grad(x):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda params: jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)  # noqa: E731
        return jax.grad(loss)(nnx.with_vars(params, hijax=False))

      if hijax:
        grads = grad(x)
      else:  # ordinary variables: nnx.grad carries the state updates out
        grads = nnx.jit(nnx.grad(lambda model, x: jnp.sum(model(x) ** 2)))(model, x)
      # As plain arrays: hijax variables are leaves of the state's tree, ordinary ones nodes.
      return grads, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  grads, stats = gradients(norm, hijax=True)
  assert not np.allclose(stats["norm"]["mean"], 0.0)  # the write happened
  chex.assert_trees_all_close((grads, stats), gradients(norm, hijax=False), rtol=1e-5, atol=1e-6)
  if norm is bnjax.nnx.BatchNorm:
    chex.assert_trees_all_close(
      (grads, stats), gradients(exact_flax, hijax=True), rtol=1e-5, atol=1e-6
    )


def test_view_info_is_flaxs():
  """Issue 8 item 4: ``nnx.view_info`` parses ``set_view``'s ``Args:`` section."""

  class Model(nnx.Module):
    def __init__(self, norm, rngs):
      self.norm = norm(2, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

  want = nnx.view_info(Model(nnx.BatchNorm, nnx.Rngs(0)))
  assert "use_running_average" in want
  assert nnx.view_info(Model(bnjax.nnx.BatchNorm, nnx.Rngs(0))) == want
  renorm = nnx.view_info(Model(bnjax.nnx.BatchRenorm, nnx.Rngs(0)))
  assert renorm == want.replace("BatchNorm:", "BatchRenorm:")


def test_recompute_batch_stats_with_hijax_variables():
  """A sibling of issue 8 item 3: ``nnx.jit`` refuses hijax variables, so the
  recomputation runs on a copy with ordinary ones and writes the result back."""
  batches = [normal(i, (8, 4)) for i in range(3)]
  with nnx.var_defaults(hijax=True):
    hijax_model = Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  model = Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  bnjax.nnx.recompute_batch_stats(hijax_model, batches)
  bnjax.nnx.recompute_batch_stats(model, batches)
  assert hijax_model.norm.mean.hijax
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state(hijax_model)), nnx.to_pure_dict(nnx.state(model))
  )
  # Algorithm 2 over the BN layer's inputs, in float64 (float32 rounding: 1e-6).
  kernel = np.asarray(model.linear.kernel[...], np.float64)
  hidden = [b.astype(np.float64) @ kernel for b in batches]
  mean, var = reference.population_statistics(hidden, (0,))
  chex.assert_trees_all_close(
    (model.norm.mean[...], model.norm.var[...]), (mean.ravel(), var.ravel()), rtol=1e-6, atol=1e-6
  )


def test_half_precision_param_dtype_keeps_float32_statistics_as_flax():
  """Issue 18 item 9: with a half-precision ``param_dtype`` (and ``dtype``), the
  ``mean`` and ``var`` stay float32 and equal to the float64 running average, as
  ``flax.nnx.BatchNorm``'s (which has no ``force_float32_reductions``)."""
  x = jnp.asarray(normal(3, (16, 3)) * 2 + 5, jnp.float32)
  for x_dtype, dtype, param_dtype in [
    (jnp.float32, None, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.float16, jnp.float16),
  ]:
    ours, theirs = pair(dtype=dtype, param_dtype=param_dtype, momentum=0.9)
    nnx.jit(lambda ours, theirs, x: (ours(x), theirs(x)))(ours, theirs, x.astype(x_dtype))
    promoted = x.astype(x_dtype).astype(dtype or x_dtype)  # Flax's promote_dtype
    x64 = np.asarray(promoted.astype(jnp.float32), np.float64)
    want = {"mean": 0.1 * x64.mean(0), "var": 0.9 + 0.1 * x64.var(0)}
    for name in ("mean", "var"):
      got = getattr(ours, name)[...]
      assert got.dtype == getattr(theirs, name)[...].dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(got, np.float64), want[name], rtol=2e-6)
