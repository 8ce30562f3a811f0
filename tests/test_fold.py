"""bnjax.fold: an eval-mode Conv + BN equals the folded Conv, on a small CNN."""

import importlib

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
  """The CNN's variables filled with NumPy random values (no init to compile):
  kernels, biases, scales and means around 0 or 1, variances in [0.2, 3]."""
  shapes = jax.eval_shape(CNN().init, jax.random.key(0), x)
  rng = np.random.default_rng(1)
  def fill(path, a):
    name = path[-1].key
    if name == "var":
      return jnp.asarray(rng.uniform(0.2, 3.0, a.shape), a.dtype)
    return jnp.asarray((name == "scale") + 0.5 * rng.standard_normal(a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


PAIRS = [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Dense_0", "BatchNorm_2")]


def test_folded_cnn_equals_eval_mode_cnn():
  x = jax.random.normal(jax.random.key(2), (4, 10, 10, 3))
  variables = trained_looking_variables(x)
  folded = bnjax.linen.fold_variables(variables, PAIRS)
  assert set(folded) == {"params"} and "BatchNorm_0" not in folded["params"]
  folded_y, y = jax.jit(CNN(folded=True).apply)(folded, x), jax.jit(CNN().apply)(variables, x)
  np.testing.assert_allclose(folded_y, y, rtol=2e-5, atol=2e-5)


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


@pytest.mark.parametrize("layer_bias_dtype", [None, jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.xfail(
    raises=jax.dtypes.TypePromotionError, strict=True,
    reason="bnjax.fold widens the bias with jnp.promote_types, which strict promotion refuses"))])
def test_fold_keeps_half_precision_kernels(layer_bias_dtype):
  """A bfloat16 3x3 convolution kernel folded with a trained-looking BN: on image
  patches, the folded layer equals the conv followed by eval-mode BN (float64), to
  the rounding of the folded kernel and bias to their dtypes."""
  keys = jax.random.split(jax.random.key(5), 7)
  kernel = jax.random.normal(keys[0], (3, 3, 2, 4), jnp.bfloat16)
  layer_bias = (None if layer_bias_dtype is None
                else (0.3 * jax.random.normal(keys[1], (4,))).astype(layer_bias_dtype))
  params = bnjax.BatchNormParams(1.0 + 0.5 * jax.random.normal(keys[2], (4,)), 0.5 * jax.random.normal(keys[3], (4,)))
  state = bnjax.BatchNormState(jax.random.normal(keys[4], (4,)), jax.random.uniform(keys[5], (4,), minval=0.2, maxval=3.0))
  k, b = bnjax.fold(kernel, layer_bias, params, state)
  bias_dtype = jnp.bfloat16 if layer_bias_dtype is None else np.promote_types(jnp.bfloat16, layer_bias_dtype)
  assert k.dtype == jnp.bfloat16 and k.shape == kernel.shape and b.dtype == bias_dtype and b.shape == (4,)

  f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
  patches = f64(jax.random.normal(keys[6], (32, 3, 3, 2)))  # a convolution's output at 32 positions
  z = np.tensordot(patches, f64(kernel), axes=3) + (0.0 if layer_bias is None else f64(layer_bias))
  want = f64(params.scale) * (z - f64(state.mean)) / np.sqrt(f64(state.var) + 1e-5) + f64(params.bias)
  got = np.tensordot(patches, f64(k), axes=3) + f64(b)
  # Each folded value is its exact value rounded once to its dtype (relative error
  # <= u): the error is at most u_kernel * sum|patch * k| + u_bias * |b|.
  exact_k = f64(kernel) * (f64(params.scale) / np.sqrt(f64(state.var) + 1e-5))
  u_kernel, u_bias = 2.0 ** -8, 2.0 ** -(jnp.finfo(bias_dtype).nmant + 1)
  bound = u_kernel * np.tensordot(np.abs(patches), np.abs(exact_k), axes=3) + u_bias * np.abs(f64(b))
  assert (np.abs(got - want) <= bound + 1e-5).all(), np.abs(got - want) / bound
  # and not more exact than that: the kernel is not widened behind the caller's back
  assert np.abs(f64(k) - exact_k).max() > 1e-4


def test_feature_mismatch_is_named():
  params, state = bnjax.init(4)
  with pytest.raises(ValueError, match=r"state.mean has shape \(4,\) but the kernel of shape \(3, 5\) has 5 output"):
    bnjax.fold(jnp.ones((3, 5)), None, params, state)
  with pytest.raises(KeyError, match="no 'Conv_9'"):
    bnjax.linen.fold_variables({"params": {}, "batch_stats": {}}, [("Conv_9", "BatchNorm_0")])


def test_old_homes_of_fold_variables_still_work_with_a_deprecation_warning():
  for module in (bnjax, importlib.import_module("bnjax.fold")):  # bnjax.fold is the function
    with pytest.warns(DeprecationWarning, match="moved to bnjax.linen.fold_variables"):
      assert module.fold_variables is bnjax.linen.fold_variables


def test_integer_kernel_is_refused():
  params, state = bnjax.init(4)
  with pytest.raises(TypeError, match="kernel must have a floating or complex dtype, got int32"):
    bnjax.fold(jnp.ones((3, 4), jnp.int32), None, params, state)
  with pytest.raises(TypeError, match="state.var must have a floating or complex dtype, got int32"):
    bnjax.fold(jnp.ones((3, 4)), None, params, bnjax.BatchNormState(state.mean, jnp.ones(4, jnp.int32)))
