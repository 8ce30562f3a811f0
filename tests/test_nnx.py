"""bnjax.nnx.BatchNorm against flax.nnx.BatchNorm (exact-variance mode)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.nnx


def close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=rtol, atol=atol), a, b)


@pytest.fixture(autouse=True)
def standard_promotion():
  """Flax's BatchNorm mixes dtypes implicitly, which the suite's strict mode forbids."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def pair(num_features=3, **kwargs):
  return (bnjax.nnx.BatchNorm(num_features, rngs=nnx.Rngs(0), **kwargs),
          nnx.BatchNorm(num_features, rngs=nnx.Rngs(0), use_fast_variance=False, **kwargs))


def test_constructor_signature_is_flaxs():
  ours = inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  assert list(ours)[:len(theirs)] == list(theirs)
  assert list(ours)[len(theirs):] == ["unbiased_variance", "virtual_batch_size"]
  for name in theirs:
    if name not in ("self", "rngs", "bias_init", "scale_init", "promote_dtype"):
      assert ours[name].default == theirs[name].default, name


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(use_bias=False, use_scale=False),
                                    dict(axis=1), dict(param_dtype=jnp.bfloat16)])
def test_matches_flax_state_and_outputs(kwargs):
  x = 2.0 * jax.random.normal(jax.random.key(0), (8, 3, 5)) + 1.0
  if kwargs.get("axis") != 1:
    x = x.transpose(0, 2, 1)
  ours, theirs = pair(**kwargs)
  close(nnx.state(ours), nnx.state(theirs))
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
  for _ in range(2):  # training updates mean and var
    close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
  close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
  ours.eval(), theirs.eval()
  assert ours.use_running_average is True
  before = nnx.state(ours, nnx.BatchStat)
  close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
  close(nnx.state(ours, nnx.BatchStat), before)  # inference leaves them alone
  close(ours(x, use_running_average=False), theirs(x, use_running_average=False), rtol=1e-4, atol=1e-4)


def test_view_and_call_override():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  ours, _ = pair()
  frozen = nnx.view(ours, use_running_average=True)
  assert frozen.use_running_average and not ours.use_running_average
  frozen(x)
  close(nnx.state(ours, nnx.BatchStat)["var"][...], jnp.ones(3))
  ours(x)
  assert not np.allclose(nnx.state(ours, nnx.BatchStat)["var"][...], 1.0)


class Net(nnx.Module):
  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(4, 6, use_bias=False, rngs=rngs)
    self.norm = norm(6, rngs=rngs)
    self.head = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.linear(x))))


def test_training_loop_with_nnx_jit_and_optimizer_matches_flax():
  x = jax.random.normal(jax.random.key(0), (16, 4))
  target = jnp.sum(x, axis=1, keepdims=True)

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
    return jnp.stack(losses), model(x), nnx.state(model)

  def exact_flax(n, rngs):
    return nnx.BatchNorm(n, use_fast_variance=False, rngs=rngs)

  close(train(bnjax.nnx.BatchNorm), train(exact_flax), rtol=1e-4, atol=1e-5)


def test_synchronized_under_pmap():
  x = jax.random.normal(jax.random.key(0), (8, 4, 3)) + 2.0
  graphdef, state = nnx.split(bnjax.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0)))

  def apply(state, x):
    module = nnx.merge(graphdef, state)
    y = module(x)
    return y, nnx.state(module)

  y, new_state = jax.pmap(apply, axis_name="batch", in_axes=(None, 0))(state, x)
  full = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  close(y.reshape(32, 3), full(x.reshape(32, 3)), rtol=1e-5, atol=1e-5)
  close(jax.tree.map(lambda a: a[5], new_state), nnx.state(full))


@pytest.mark.parametrize("norm", [bnjax.nnx.BatchNorm, bnjax.nnx.BatchRenorm])
def test_gradient_with_hijax_variables_as_flax(norm):
  """Issue 8 item 3: with hijax variables the running statistics are written
  inside the differentiated function; as Flax, the write stops the gradient, so
  the gradients and statistics are those of ordinary variables (and Flax's)."""
  x = jax.random.normal(jax.random.key(0), (8, 4))

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
        grads = nnx.grad(lambda model: jnp.sum(model(x) ** 2))(model)
      return grads, nnx.state(model, nnx.BatchStat)

  def exact_flax(n, rngs):
    return nnx.BatchNorm(n, use_fast_variance=False, rngs=rngs)

  grads, stats = gradients(norm, hijax=True)
  assert not np.allclose(stats["norm"]["mean"][...], 0.0)  # the write happened
  close((grads, stats), gradients(norm, hijax=False), rtol=1e-5, atol=1e-6)
  if norm is bnjax.nnx.BatchNorm:
    close((grads, stats), gradients(exact_flax, hijax=True), rtol=1e-4, atol=1e-5)


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
  batches = [jax.random.normal(jax.random.key(i), (8, 4)) for i in range(3)]
  with nnx.var_defaults(hijax=True):
    hijax_model = Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  model = Net(bnjax.nnx.BatchNorm, nnx.Rngs(0))
  bnjax.nnx.recompute_batch_stats(hijax_model, batches)
  bnjax.nnx.recompute_batch_stats(model, batches)
  assert hijax_model.norm.mean.hijax and not np.allclose(model.norm.var[...], 1.0)
  close(nnx.state(hijax_model), nnx.state(model), rtol=0, atol=0)
