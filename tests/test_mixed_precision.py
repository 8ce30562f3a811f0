"""Half-precision activations across the features: float32 statistics and state,
output in the activation dtype, parameters in their own dtype."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx
from tests import reference

HALF = [jnp.bfloat16, jnp.float16]
EPSILON = 1e-5
AXES = (0, 1)


def unit_roundoff(dtype):
  """The largest relative error of one rounding to ``dtype`` (2^-p, p bits of significand)."""
  return 2.0 ** -(jnp.finfo(dtype).nmant + 1)


def activations(dtype):
  """[16, 4, 3], mean 3, std 1.5 (NumPy draws: jax.random compiles per shape)."""
  return jnp.asarray(1.5 * np.random.default_rng(0).standard_normal((16, 4, 3)) + 3.0, dtype)


def as_float64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


MASK = (jnp.arange(64).reshape(16, 4) % 5 != 0)[..., None]  # [16, 4, 1]
R_MAX, D_MAX, VIRTUAL_BATCH = 2.0, 1.0, 4


def reference_step(variant, x, gamma, beta, dy, state):
  """Float64 y, new state (momentum 0), (dx, dgamma, dbeta) of ``variant`` from
  tests/reference.py (Algorithm 1, the paper's Section 3 backward), and the
  per-feature sums of |dgamma| and |dbeta| over the groups (ghost; else |dgamma|, |dbeta|)."""
  keep = lambda a: a.reshape(-1)  # noqa: E731  [1, 1, C] -> [C]
  if variant == "ghost":
    steps = [
      reference_step(
        "plain", x[i : i + VIRTUAL_BATCH], gamma, beta, dy[i : i + VIRTUAL_BATCH], state
      )
      for i in range(0, len(x), VIRTUAL_BATCH)
    ]
    y, states, grads, _ = zip(*steps, strict=True)
    (means, variances), (dx, dgamma, dbeta) = zip(*states, strict=True), zip(*grads, strict=True)
    return (
      np.concatenate(y),
      (np.mean(means, 0), np.mean(variances, 0)),
      (np.concatenate(dx), np.sum(dgamma, 0), np.sum(dbeta, 0)),
      (np.abs(dgamma).sum(0), np.abs(dbeta).sum(0)),
    )
  mask = np.broadcast_to(np.asarray(MASK), x.shape) if variant == "masked" else None
  y, mu, var = reference.forward(x, gamma, beta, EPSILON, AXES, mask=mask)
  if variant == "renorm":  # r and d are constants of the derivative (stop_gradient)
    r, d = reference.renorm_corrections(
      x, as_float64(state.mean), as_float64(state.var), EPSILON, R_MAX, D_MAX, AXES
    )
    y = reference.renorm_forward(x, gamma, beta, EPSILON, r, d, AXES)
    dx, dgamma, dbeta = reference.backward(x, gamma * r, dy, EPSILON, AXES)
    dgamma = keep(r) * dgamma + keep(d) * dbeta
  else:
    dx, dgamma, dbeta = reference.backward(x, gamma, dy, EPSILON, AXES, mask=mask)
  if variant == "unbiased":
    var = var * 64 / 63
  return y, (keep(mu), keep(var)), (dx, dgamma, dbeta), (np.abs(dgamma), np.abs(dbeta))


# Every variant in bfloat16, plain batch norm in float16 in the fast set; the other
# float16 variants are slow (each case compiles its own gradient program: issue 19,
# the fast set under 90 s).
@pytest.mark.parametrize(
  "variant, dtype",
  [
    pytest.param(
      variant,
      dtype,
      marks=pytest.mark.slow if dtype == jnp.float16 and variant != "plain" else (),
    )
    for variant in ["plain", "ghost", "unbiased", "renorm", "masked"]
    for dtype in HALF
  ],
)
def test_statistics_in_float32_output_in_input_dtype(dtype, variant):
  """Output, new state and gradients (x, scale, bias) against the float64
  reference on the same half-precision values: statistics exact in float32, and
  each half-precision result one float32 computation rounded once to its dtype."""
  x = activations(dtype)
  w = jnp.asarray(
    np.random.default_rng(1).standard_normal(x.shape), jnp.float32
  )  # the loss is sum(w * y)
  params = bnjax.BatchNormParams(
    jnp.array([1.5, 0.75, -1.25], jnp.bfloat16), jnp.array([0.5, -0.25, 1.0], jnp.bfloat16)
  )
  _, state = bnjax.init(3)
  kwargs = {
    "plain": {},
    "ghost": {"virtual_batch_size": VIRTUAL_BATCH},
    "unbiased": {"unbiased_variance": True},
    "masked": {"mask": MASK},
    "renorm": {"r_max": R_MAX, "d_max": D_MAX},
  }[variant]
  layer = bnjax.batch_renorm if variant == "renorm" else bnjax.batch_norm

  @jax.jit
  def step(x, params):
    def loss(x, params):
      y, new_state = layer(x, params, state, training=True, momentum=0.0, **kwargs)
      return jnp.sum(w * y.astype(jnp.float32)), (y, new_state)

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

  (dx, dparams), (y, new_state) = step(x, params)
  assert y.dtype == dx.dtype == dtype and dparams.scale.dtype == dparams.bias.dtype == jnp.bfloat16
  assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
  # The cotangent reaching y is w rounded to the output dtype (the cast's transpose).
  want_y, want_state, want_grads, magnitudes = reference_step(
    variant,
    as_float64(x),
    as_float64(params.scale),
    as_float64(params.bias),
    as_float64(w.astype(dtype)),
    state,
  )
  # Float32 statistics of values exact in float32: float32 rounding only.
  np.testing.assert_allclose(new_state.mean, want_state[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new_state.var, want_state[1], rtol=1e-5)
  # One rounding to the output dtype (relative error <= u); atol for float32 arithmetic.
  u_x, u_params = unit_roundoff(dtype), unit_roundoff(jnp.bfloat16)
  np.testing.assert_allclose(as_float64(y), want_y, rtol=u_x, atol=1e-5)
  np.testing.assert_allclose(as_float64(dx), want_grads[0], rtol=u_x, atol=1e-5)
  # Parameter gradients: one rounding to bfloat16 (ghost batch norm's G groups too:
  # their parts add up in float32), <= u * sum_g |group's| (magnitudes).
  for got, want, magnitude in zip(dparams, want_grads[1:], magnitudes, strict=True):
    error = np.abs(as_float64(got) - want)
    assert (error <= u_params * magnitude + 1e-4).all(), (error, magnitude)


@pytest.mark.parametrize("dtype", HALF)
def test_population_statistics_in_float32(dtype):
  state = jax.jit(
    lambda x: bnjax.population_state(bnjax.update_population(bnjax.init_population(3), x))
  )(activations(dtype))
  assert state.var.dtype == jnp.float32
  x = np.asarray(activations(dtype).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(state.var, x.var((0, 1)) * 64 / 63, rtol=1e-5)


def module_and_function(module, function, variables, x):
  """A training step of a linen module and of the function it wraps, in one compiled call."""
  params, state = (
    type_(**variables[name])
    for type_, name in ((bnjax.BatchNormParams, "params"), (bnjax.BatchNormState, "batch_stats"))
  )
  return jax.jit(
    lambda v, x: (
      module.apply(v, x, mutable=["batch_stats"]),
      function(x, params, state, training=True, momentum=0.9),
    )
  )(variables, x)


def test_modules_with_bfloat16_parameters():
  """The Flax shells keep bfloat16 parameters and add no math: their output and
  statistics are the function's on the same bfloat16 parameters."""
  x = activations(jnp.bfloat16)
  params, state = bnjax.init(3, dtype=jnp.bfloat16)
  limits = dict(r_max=2.0, d_max=1.0)
  for module, function in (
    (
      bnjax.linen.BatchNorm(
        use_running_average=False, momentum=0.9, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16
      ),
      bnjax.batch_norm,
    ),
    (
      bnjax.linen.BatchRenorm(
        use_running_average=False,
        momentum=0.9,
        param_dtype=jnp.bfloat16,
        dtype=jnp.bfloat16,
        **limits,
      ),
      functools.partial(bnjax.batch_renorm, **limits),
    ),
  ):
    # The module's variables: init's shapes and dtypes (bfloat16 parameters, float32
    # statistics), and Flax's initial values, which bnjax.init gives.
    variables = {"params": params._asdict(), "batch_stats": state._asdict()}
    chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.eval_shape(module.init, jax.random.key(0), x), variables
    )
    (y, updated), (want_y, want_state) = module_and_function(module, function, variables, x)
    assert y.dtype == jnp.bfloat16 and updated["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_array_equal(y, want_y)
    chex.assert_trees_all_equal(updated["batch_stats"], want_state._asdict())
  layer = bnjax.nnx.BatchRenorm(
    3, momentum=0.9, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **limits
  )
  y, (want_y, want_state) = nnx.jit(
    lambda layer, x: (
      layer(x),
      bnjax.batch_renorm(x, params, state, training=True, momentum=0.9, **limits),
    )
  )(layer, x)
  assert (
    y.dtype == jnp.bfloat16
    and layer.scale[...].dtype == jnp.bfloat16
    and layer.var[...].dtype == jnp.float32
  )
  np.testing.assert_array_equal(y, want_y)
  chex.assert_trees_all_equal((layer.mean[...], layer.var[...]), tuple(want_state))


def test_half_precision_running_statistics_normalize_in_float32():
  """bfloat16 running statistics (Flax's force_float32_reductions=False) are
  widened before rsqrt(var + eps): the output is that of their float32 values."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 3)) * 3.0, jnp.float32)
  state = bnjax.BatchNormState(
    mean=jnp.array([0.5, -1.0, 2.0], jnp.bfloat16), var=jnp.array([3.3, 0.7, 11.0], jnp.bfloat16)
  )
  y, _ = jax.jit(lambda x, state: bnjax.batch_norm(x, None, state, training=False))(x, state)
  mean64, var64 = (np.asarray(v.astype(jnp.float32), np.float64) for v in state)
  want = (np.asarray(x, np.float64) - mean64) / np.sqrt(var64 + 1e-5)
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)
