"""bnjax.fold: an eval-mode Conv + BN equals the folded Conv, on a small CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax
import bnjax.linen
from tests.samples import normal


class CNN(nn.Module):
  """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> Dense -> BN; or, with
  ``folded``, the same layers with biases and no BN."""

  folded: bool = False

  @nn.compact
  def __call__(self, x):
    norm = (
      (lambda name: lambda x: x)
      if self.folded
      else (lambda name: bnjax.linen.BatchNorm(use_running_average=True, name=name))
    )
    x = nn.relu(norm("BatchNorm_0")(nn.Conv(8, (3, 3), use_bias=self.folded, name="Conv_0")(x)))
    x = nn.relu(norm("BatchNorm_1")(nn.Conv(4, (3, 3), strides=2, use_bias=True, name="Conv_1")(x)))
    return norm("BatchNorm_2")(
      nn.Dense(3, use_bias=self.folded, name="Dense_0")(x.reshape(x.shape[0], -1))
    )


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
  x = normal(2, (4, 10, 10, 3))
  variables = trained_looking_variables(x)
  folded = jax.jit(lambda v: bnjax.linen.fold_variables(v, PAIRS))(variables)
  assert set(folded) == {"params"} and set(folded["params"]) == {"Conv_0", "Conv_1", "Dense_0"}
  folded_y, y = jax.jit(CNN(folded=True).apply)(folded, x), jax.jit(CNN().apply)(variables, x)
  np.testing.assert_allclose(folded_y, y, rtol=2e-5, atol=2e-5)


def test_fold_of_one_dense_layer_with_and_without_bias():
  """Against eval-mode BN of the layer's output, in float64."""
  x = np.random.default_rng(3).standard_normal((6, 5))
  kernel, bias = normal(4, (5, 3)), jnp.array([0.1, -0.2, 0.3])
  params = bnjax.BatchNormParams(jnp.array([1.0, 2.0, -0.5]), jnp.array([0.0, 1.0, 2.0]))
  state = bnjax.BatchNormState(jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 2.0, 4.0]))
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  for layer_bias in (bias, None):
    z = x @ f64(kernel) + (0.0 if layer_bias is None else f64(layer_bias))
    want = f64(params.scale) * (z - f64(state.mean)) / np.sqrt(f64(state.var) + 1e-5) + f64(
      params.bias
    )
    k, b = bnjax.fold(kernel, layer_bias, params, state)
    np.testing.assert_allclose(x @ f64(k) + f64(b), want, rtol=1e-5, atol=1e-5)


def test_fold_keeps_float64_digits(x64):
  """Under x64 a float64 layer and BN were folded in float32 (9e-8 off; refused
  under strict promotion); now in float64, to float64 rounding."""
  rng = np.random.default_rng(5)
  kernel, bias = rng.standard_normal((4, 3)), rng.standard_normal(3)
  params = bnjax.BatchNormParams(rng.standard_normal(3), rng.standard_normal(3))
  state = bnjax.BatchNormState(rng.standard_normal(3), 0.5 + rng.random(3))
  k, b = jax.jit(bnjax.fold)(kernel, bias, params, state)
  assert k.dtype == b.dtype == jnp.float64
  multiplier = params.scale / np.sqrt(state.var + 1e-5)
  np.testing.assert_allclose(k, kernel * multiplier, rtol=1e-14)
  np.testing.assert_allclose(b, (bias - state.mean) * multiplier + params.bias, rtol=1e-13)


@pytest.mark.parametrize("layer_bias_dtype", [None, jnp.bfloat16, jnp.float32])
def test_fold_keeps_half_precision_kernels(layer_bias_dtype):
  """A bfloat16 3x3 convolution kernel folded with a trained-looking BN: on image
  patches, the folded layer equals the conv followed by eval-mode BN (float64), to
  the rounding of the folded kernel and bias to their dtypes."""
  rng = np.random.default_rng(5)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.bfloat16)
  layer_bias = (
    None
    if layer_bias_dtype is None
    else jnp.asarray(0.3 * rng.standard_normal(4), layer_bias_dtype)
  )
  params = bnjax.BatchNormParams(
    jnp.asarray(1.0 + 0.5 * rng.standard_normal(4), jnp.float32),
    jnp.asarray(0.5 * rng.standard_normal(4), jnp.float32),
  )
  state = bnjax.BatchNormState(
    jnp.asarray(rng.standard_normal(4), jnp.float32),
    jnp.asarray(rng.uniform(0.2, 3.0, 4), jnp.float32),
  )
  k, b = bnjax.fold(kernel, layer_bias, params, state)
  bias_dtype = (
    jnp.bfloat16 if layer_bias_dtype is None else np.promote_types(jnp.bfloat16, layer_bias_dtype)
  )
  assert (
    k.dtype == jnp.bfloat16
    and k.shape == kernel.shape
    and b.dtype == bias_dtype
    and b.shape == (4,)
  )

  f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
  patches = rng.standard_normal((32, 3, 3, 2))  # the input patches of a convolution at 32 positions
  z = np.tensordot(patches, f64(kernel), axes=3) + (0.0 if layer_bias is None else f64(layer_bias))
  want = f64(params.scale) * (z - f64(state.mean)) / np.sqrt(f64(state.var) + 1e-5) + f64(
    params.bias
  )
  got = np.tensordot(patches, f64(k), axes=3) + f64(b)
  # Each folded value is its exact value rounded once to its dtype (relative error
  # <= u): the error is at most u_kernel * sum|patch * k| + u_bias * |b|.
  exact_k = f64(kernel) * (f64(params.scale) / np.sqrt(f64(state.var) + 1e-5))
  u_kernel, u_bias = 2.0**-8, 2.0 ** -(jnp.finfo(bias_dtype).nmant + 1)
  bound = u_kernel * np.tensordot(np.abs(patches), np.abs(exact_k), axes=3) + u_bias * np.abs(
    f64(b)
  )
  assert (np.abs(got - want) <= bound + 1e-5).all(), np.abs(got - want) / bound
  # and not more exact than that: the kernel is not widened behind the caller's back
  assert np.abs(f64(k) - exact_k).max() > 1e-4


def test_feature_mismatch_is_named():
  params, state = bnjax.init(4)
  with pytest.raises(
    ValueError, match=r"state.mean has shape \(4,\) but the kernel of shape \(3, 5\) has 5 output"
  ):
    bnjax.fold(jnp.ones((3, 5)), None, params, state)
  with pytest.raises(KeyError, match="no 'Conv_9'"):
    bnjax.linen.fold_variables({"params": {}, "batch_stats": {}}, [("Conv_9", "BatchNorm_0")])


def test_integer_kernel_is_refused():
  params, state = bnjax.init(4)
  with pytest.raises(TypeError, match="kernel must have a floating or complex dtype, got int32"):
    bnjax.fold(jnp.ones((3, 4), jnp.int32), None, params, state)
  with pytest.raises(TypeError, match="state.var must have a floating or complex dtype, got int32"):
    bnjax.fold(
      jnp.ones((3, 4)), None, params, bnjax.BatchNormState(state.mean, jnp.ones(4, jnp.int32))
    )
