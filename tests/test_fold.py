"""bnjax.fold: an eval-mode Conv + BN equals the folded Conv, on a small CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax
import bnjax.linen


class CNN(nn.Module):
  """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> Dense -> BN; or, with
  ``folded``, the same layers with biases and no BN."""

  folded: bool = False

  @nn.compact
  def __call__(self, x):
    norm = (lambda name: (lambda x: x)) if self.folded else (
        lambda name: bnjax.linen.BatchNorm(use_running_average=True, name=name))
    x = nn.relu(norm("BatchNorm_0")(nn.Conv(8, (3, 3), use_bias=self.folded, name="Conv_0")(x)))
    x = nn.relu(norm("BatchNorm_1")(nn.Conv(4, (3, 3), strides=2, use_bias=True, name="Conv_1")(x)))
    return norm("BatchNorm_2")(nn.Dense(3, use_bias=self.folded, name="Dense_0")(x.reshape(x.shape[0], -1)))


def trained_looking_variables(x):
  variables = CNN().init(jax.random.key(0), x)
  keys = iter(jax.random.split(jax.random.key(1), 32))
  def perturb(path, a):
    if path[-1].key == "var":
      return jax.random.uniform(next(keys), a.shape, minval=0.2, maxval=3.0)
    return a + 0.5 * jax.random.normal(next(keys), a.shape)
  return jax.tree_util.tree_map_with_path(perturb, variables)


PAIRS = [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Dense_0", "BatchNorm_2")]


def test_folded_cnn_equals_eval_mode_cnn():
  x = jax.random.normal(jax.random.key(2), (4, 10, 10, 3))
  variables = trained_looking_variables(x)
  folded = bnjax.fold_variables(variables, PAIRS)
  assert set(folded) == {"params"} and "BatchNorm_0" not in folded["params"]
  np.testing.assert_allclose(CNN(folded=True).apply(folded, x), CNN().apply(variables, x), rtol=2e-5, atol=2e-5)


def test_fold_of_one_dense_layer_with_and_without_bias():
  x = jax.random.normal(jax.random.key(3), (6, 5))
  kernel, bias = jax.random.normal(jax.random.key(4), (5, 3)), jnp.array([0.1, -0.2, 0.3])
  params = bnjax.BatchNormParams(jnp.array([1.0, 2.0, -0.5]), jnp.array([0.0, 1.0, 2.0]))
  state = bnjax.BatchNormState(jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 2.0, 4.0]))
  for layer_bias in (bias, None):
    z = x @ kernel + (0 if layer_bias is None else layer_bias[None])
    want, _ = bnjax.batch_norm(z, params, state, training=False)
    k, b = bnjax.fold(kernel, layer_bias, params, state)
    np.testing.assert_allclose(x @ k + b[None], want, rtol=1e-5, atol=1e-5)


def test_fold_keeps_half_precision_kernels():
  kernel = jnp.ones((3, 3, 2, 4), jnp.bfloat16)
  params, state = bnjax.init(4)
  k, b = bnjax.fold(kernel, None, params, state)
  assert k.dtype == jnp.bfloat16 and k.shape == kernel.shape and b.shape == (4,)


def test_feature_mismatch_is_named():
  params, state = bnjax.init(4)
  with pytest.raises(ValueError, match=r"state.mean has shape \(4,\) but the kernel of shape \(3, 5\) has 5 output"):
    bnjax.fold(jnp.ones((3, 5)), None, params, state)
  with pytest.raises(KeyError, match="no 'Conv_9'"):
    bnjax.fold_variables({"params": {}, "batch_stats": {}}, [("Conv_9", "BatchNorm_0")])


def test_integer_kernel_is_refused():
  params, state = bnjax.init(4)
  with pytest.raises(TypeError, match="kernel must have a floating or complex dtype, got int32"):
    bnjax.fold(jnp.ones((3, 4), jnp.int32), None, params, state)
  with pytest.raises(TypeError, match="state.var must have a floating or complex dtype, got int32"):
    bnjax.fold(jnp.ones((3, 4)), None, params, bnjax.BatchNormState(state.mean, jnp.ones(4, jnp.int32)))
