"""bnjax.batch_norm on one device, against float64 NumPy transcriptions of the
paper (tests/reference.py), finite differences and Flax.

The function under test runs compiled (``batch_norm`` and ``training_step``
below): eager calls compile and dispatch each primitive on its own, seconds per
test on two cores. Argument errors and object identity are tested on
``bnjax.batch_norm`` itself, and ``JitAndEagerTest`` runs the paths where jit and
eager execution could part ways (the custom derivative with masks, the overflow
guard's ``lax.cond``) both ways.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

import bnjax
from tests import reference
from tests.derivatives import check_derivatives

# (shape, axis, reduction axes)
LAYOUTS = [
  ((32, 5), -1, (0,)),  # fully connected: over the batch
  ((4, 6, 5, 3), -1, (0, 1, 2)),  # NHWC convolution: batch and positions
  ((4, 3, 6, 5), 1, (0, 2, 3)),  # NCHW
  ((4, 3, 6, 2), (1, -1), (0, 2)),  # two feature axes
]
STATIC = (
  "training",
  "axis",
  "epsilon",
  "axis_name",
  "unbiased_variance",
  "virtual_batch_size",
  "dtype",
)
batch_norm = jax.jit(bnjax.batch_norm, static_argnames=STATIC)


def weighted_sum(w, y):
  """sum(w * y) in w's dtype, over the entries of nonzero weight (y may be NaN elsewhere)."""
  return jnp.sum(jnp.where(w == 0, jnp.zeros((), w.dtype), w * y.astype(w.dtype)))


@functools.partial(jax.jit, static_argnames=STATIC)
def training_step(x, params, state, w, **kwargs):
  """Gradients of ``weighted_sum(w, y)`` w.r.t. x and params, with y and the new state."""

  def loss(x, params):
    y, new_state = bnjax.batch_norm(x, params, state, training=True, **kwargs)
    return weighted_sum(w, y), (y, new_state)

  return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)


def float32(a):
  """``a`` rounded to float32 by NumPy (``jnp.asarray(a, jnp.float32)`` compiles a
  conversion for each new shape)."""
  return jnp.asarray(np.asarray(a, np.float32))


def random_inputs(shape, axis, seed=0, offset=0.0):
  """x, params and state from NumPy's generator (jax.random compiles per shape)."""
  rng = np.random.default_rng(seed)
  features = bnjax.validation.feature_axes(len(shape), axis)
  fshape = tuple(shape[a] for a in features)
  x = float32(2.0 * rng.standard_normal(shape) + offset)
  params = bnjax.BatchNormParams(
    scale=float32(1.0 + 0.3 * rng.standard_normal(fshape)),
    bias=float32(0.5 * rng.standard_normal(fshape)),
  )
  state = bnjax.BatchNormState(
    mean=float32(0.1 * rng.standard_normal(fshape)), var=float32(np.full(fshape, 2.0))
  )
  return x, params, state


def _weights(shape, seed=7):
  return float32(np.random.default_rng(seed).standard_normal(shape))


def expand(a, axes):
  return np.expand_dims(np.asarray(a, np.float64), axes)


@pytest.mark.parametrize("shape, axis, axes", LAYOUTS)
def test_training_is_algorithm_1_and_its_gradients_the_papers_chain_rule(shape, axis, axes):
  """y and the new state (Algorithm 1), dx, dscale and dbias (Section 3)."""
  x, params, state = random_inputs(shape, axis, offset=3.0)
  w = _weights(shape)
  (dx, dparams), (y, new_state) = training_step(x, params, state, w, axis=axis, momentum=0.9)
  gamma = expand(params.scale, axes)
  want_y, mu, var = reference.forward(x, gamma, expand(params.bias, axes), 1e-5, axes)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    new_state.mean, 0.9 * np.asarray(state.mean) + 0.1 * mu.squeeze(axes), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    new_state.var, 0.9 * np.asarray(state.var) + 0.1 * var.squeeze(axes), rtol=1e-6
  )
  assert new_state.mean.dtype == jnp.float32 and y.dtype == x.dtype
  want_dx, want_dgamma, want_dbeta = reference.backward(x, gamma, w, 1e-5, axes)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams.scale, want_dgamma, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams.bias, want_dbeta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, axis, axes", LAYOUTS)
def test_inference_uses_state_and_returns_it_unchanged(shape, axis, axes):
  x, params, state = random_inputs(shape, axis)
  y, new_state = batch_norm(x, params, state, training=False, axis=axis)
  chex.assert_trees_all_equal(new_state, state)  # (eager, the object itself: see below)
  want = expand(params.scale, axes) * (np.asarray(x, np.float64) - expand(state.mean, axes))
  want = want / np.sqrt(expand(state.var, axes) + 1e-5) + expand(params.bias, axes)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_no_affine_and_partial_affine():
  x, params, state = random_inputs((16, 4), -1)
  want, _, _ = reference.forward(x, 1.0, 0.0, 1e-5, (0,))
  cases = (
    None,
    bnjax.BatchNormParams(scale=params.scale, bias=None),
    bnjax.BatchNormParams(scale=None, bias=params.bias),
  )
  outputs = jax.jit(lambda x: [bnjax.batch_norm(x, p, state, training=True)[0] for p in cases])(x)
  for y, want_y in zip(
    outputs, (want, want * np.asarray(params.scale), want + np.asarray(params.bias)), strict=True
  ):
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)


def test_init():
  params, state = bnjax.init(3)
  np.testing.assert_array_equal(params.scale, np.ones(3))
  np.testing.assert_array_equal(params.bias, np.zeros(3))
  np.testing.assert_array_equal(state.mean, np.zeros(3))
  np.testing.assert_array_equal(state.var, np.ones(3))
  params, state = bnjax.init((2, 3), dtype=jnp.bfloat16)
  assert params.scale.shape == (2, 3) and params.scale.dtype == jnp.bfloat16
  np.testing.assert_array_equal(params.scale.astype(jnp.float32), np.ones((2, 3)))
  assert state.var.dtype == jnp.float32


def _training_outputs_in_float64():
  """``(f, args)``: y and the new state, with and without a mask, as one function of
  ``(x, scale, bias)`` in float64 (``check_derivatives`` differentiates all six)."""
  x, params, state = jax.tree.map(lambda a: np.asarray(a, np.float64), random_inputs((6, 3, 4), -1))
  mask = np.arange(18).reshape(6, 3, 1) % 4 != 1

  def f(x, scale, bias):
    outputs = []
    for m in (None, mask):
      # Output and the new state both depend on x: checks their cotangents too.
      y, new_state = bnjax.batch_norm(
        x, bnjax.BatchNormParams(scale, bias), state, training=True, momentum=0.5, mask=m
      )
      outputs += [y, new_state.mean, new_state.var]
    return outputs

  return f, (x, params.scale, params.bias)


def test_gradients_match_finite_differences_in_float64(x64):
  f, args = _training_outputs_in_float64()
  check_derivatives(f, args, order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


# Slow: XLA takes about 7 s to compile the second derivatives of this function in
# both modes, and the first ones are checked in the fast set (issue 19).
@pytest.mark.slow
def test_second_derivatives_match_finite_differences_in_float64(x64):
  f, args = _training_outputs_in_float64()
  check_derivatives(f, args, order=2, modes=["fwd", "rev"], atol=1e-4, rtol=1e-4)


def test_inference_gradients_match_finite_differences(x64):
  x, params, state = jax.tree.map(lambda a: a.astype(jnp.float64), random_inputs((6, 4), -1))

  @jax.jit
  def f(x, scale, bias):
    return bnjax.batch_norm(x, bnjax.BatchNormParams(scale, bias), state, training=False)[0]

  check_derivatives(f, (x, params.scale, params.bias), order=2, modes=["rev"], atol=1e-6, rtol=1e-6)


def large_offset_batch(offset, shape=(256, 4, 4, 8)):
  return float32(np.random.default_rng(3).standard_normal(shape) + offset)


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_variance_exact_when_mean_dwarfs_std(offset):
  # |mean| / std = offset: the one-pass E[x^2] - E[x]^2 loses everything here.
  x = large_offset_batch(offset)
  _, state = bnjax.init(8)
  _, new_state = batch_norm(x, None, state, training=True, momentum=0.0)
  _, want = reference.batch_mean_var(x, (0, 1, 2))
  rel = np.abs(np.asarray(new_state.var, np.float64) / want.squeeze() - 1)
  assert rel.max() <= 1e-5, rel.max()


def test_flax_fast_variance_is_wrong_where_bnjax_is_exact():
  """The failure the previous test guards against, shown on Flax's default."""
  x = large_offset_batch(1e4)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
  params, state = bnjax.init(8)
  variables = {"params": params._asdict(), "batch_stats": state._asdict()}  # Flax's init, unchanged
  _, updated = jax.jit(lambda x: flax_bn.apply(variables, x, mutable=["batch_stats"]))(x)
  _, want = reference.batch_mean_var(x, (0, 1, 2))
  rel = np.abs(np.asarray(updated["batch_stats"]["var"], np.float64) / want.squeeze() - 1)
  assert rel.max() > 1.0


def test_variance_exact_on_adversarially_ordered_batch():
  # Sorted values: the first pass's sums around zero lose every digit at this offset.
  x = float32(np.sort(np.random.default_rng(4).standard_normal((4096, 2)), axis=0) + 1e3)
  _, state = bnjax.init(2)
  _, new_state = batch_norm(x, None, state, training=True, momentum=0.0)
  _, want = reference.batch_mean_var(x, (0,))
  np.testing.assert_allclose(new_state.var, want.squeeze(), rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_statistics_in_float32(dtype):
  """Against the float64 reference on the same half-precision values: float32
  statistics, and y and dx each a float32 computation rounded once to ``dtype``."""
  x, params, state = random_inputs((64, 4, 8), -1, offset=4.0)
  x = x.astype(dtype)
  w = _weights(x.shape)
  (dx, dparams), (y, new_state) = training_step(x, params, state, w, momentum=0.0)
  assert y.dtype == dx.dtype == dtype and dparams.scale.dtype == jnp.float32
  assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  gamma, beta = expand(params.scale, (0, 1)), expand(params.bias, (0, 1))
  want_y, mu, var = reference.forward(x64, gamma, beta, 1e-5, (0, 1))
  np.testing.assert_allclose(new_state.mean, mu.squeeze(), rtol=1e-6)
  np.testing.assert_allclose(new_state.var, var.squeeze(), rtol=1e-5)
  # The cotangent reaching y is w rounded to dtype (the transpose of y's cast).
  dy = np.asarray(w.astype(dtype).astype(jnp.float32), np.float64)
  want_dx, want_dgamma, want_dbeta = reference.backward(x64, gamma, dy, 1e-5, (0, 1))
  unit_roundoff = 2.0 ** -(jnp.finfo(dtype).nmant + 1)  # one rounding to dtype
  np.testing.assert_allclose(y.astype(jnp.float32), want_y, rtol=unit_roundoff, atol=1e-5)
  np.testing.assert_allclose(dx.astype(jnp.float32), want_dx, rtol=unit_roundoff, atol=1e-5)
  # float32 parameters: float32 sums of 256 terms each.
  np.testing.assert_allclose(dparams.scale, want_dgamma, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dparams.bias, want_dbeta, rtol=1e-5, atol=1e-4)


def test_output_dtype_argument():
  """A float32 output of bfloat16 input is not rounded to bfloat16 on the way."""
  x, params, state = random_inputs((16, 3), -1)
  x = x.astype(jnp.bfloat16)
  y, _ = batch_norm(x, params, state, training=True, dtype=jnp.float32)
  assert y.dtype == jnp.float32
  want, _, _ = reference.forward(
    np.asarray(x.astype(jnp.float32)),
    expand(params.scale, (0,)),
    expand(params.bias, (0,)),
    1e-5,
    (0,),
  )
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # float32, not bfloat16's 4e-3


def test_complex_input():
  x, params, state = random_inputs((16, 3), -1)
  xc = jnp.asarray(np.asarray(x) + 1j * (np.flip(np.asarray(x), 0) + 1.0), jnp.complex64)
  y, new_state = batch_norm(xc, params, state, training=True, momentum=0.0)
  want_y, mu, var = reference.forward(
    xc, expand(params.scale, (0,)), expand(params.bias, (0,)), 1e-5, (0,)
  )
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, mu.squeeze(), rtol=1e-6)
  np.testing.assert_allclose(new_state.var, var.squeeze(), rtol=1e-5)
  assert y.dtype == jnp.complex64 and new_state.var.dtype == jnp.float32


class JitAndEagerTest(chex.TestCase):
  """Each test once compiled and once eager (chex.variants, as optax's tests)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_excludes_entries_even_nan(self):
    """Masked-out entries (NaN here) enter neither the statistics nor the gradients
    (the custom derivative's masked path), against the float64 reference."""
    x, params, state = random_inputs((8, 5, 3), -1, offset=1.0)
    mask = np.random.default_rng(9).random((8, 5, 1)) < 0.6
    mask[0, 0] = True
    valid = np.broadcast_to(mask, x.shape)
    x = float32(np.where(valid, x, np.nan))
    w = float32(np.where(valid, _weights(x.shape), 0.0))  # the loss leaves the masked-out y out

    def step(x, params):
      def loss(x, params):
        y, new_state = bnjax.batch_norm(
          x, params, state, training=True, mask=jnp.asarray(mask), momentum=0.0
        )
        return weighted_sum(w, y), (y, new_state)

      return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    (dx, dparams), (y, new_state) = self.variant(step)(x, params)
    want_y, mu, var = reference.forward(
      x, expand(params.scale, (0, 1)), expand(params.bias, (0, 1)), 1e-5, (0, 1), mask=valid
    )
    np.testing.assert_allclose(np.asarray(y)[valid], want_y[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.mean, mu.squeeze(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, var.squeeze(), rtol=1e-5)
    want_dx, want_dgamma, want_dbeta = reference.backward(
      x, expand(params.scale, (0, 1)), w, 1e-5, (0, 1), mask=valid
    )
    chex.assert_tree_all_finite((dx, dparams))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams.scale, want_dgamma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams.bias, want_dbeta, rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1e18, 5e18, 1e19)
  def test_variance_near_float32_range_is_finite_and_exact(self, std):
    """From 5e18 on, the sums of squares overflow float32 and the lax.cond guard
    sums them again, scaled."""
    x = (1e19 + std * np.random.default_rng(5).standard_normal((32, 4))).astype(np.float32)
    params, state = bnjax.init(4)
    y, new_state = self.variant(
      lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.0)
    )(jnp.asarray(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(new_state.var, np.var(x64, 0), rtol=1e-5)
    np.testing.assert_allclose(y, (x64 - x64.mean(0)) / np.sqrt(x64.var(0)), atol=1e-5)


def test_per_feature_mask():
  x, params, state = random_inputs((12, 3), -1)
  mask = np.arange(36).reshape(12, 3) % (np.arange(3) + 2)[None, :] != 0  # one per feature
  _, new_state = batch_norm(x, params, state, training=True, mask=jnp.asarray(mask), momentum=0.0)
  want_mean, want_var = reference.batch_mean_var(x, (0,), mask=mask)
  np.testing.assert_allclose(new_state.mean, want_mean.squeeze(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_state.var, want_var.squeeze(), rtol=1e-5)


def test_jit_and_traced_momentum():
  x, params, state = random_inputs((16, 4), -1)

  @jax.jit
  def step(x, state, momentum):
    return bnjax.batch_norm(x, params, state, training=True, momentum=momentum)

  mu, var = reference.batch_mean_var(x, (0,))
  for momentum in (0.25, 0.5):  # a new value, no recompilation needed
    _, new_state = step(x, state, jnp.float32(momentum))
    np.testing.assert_allclose(
      new_state.mean,
      momentum * np.asarray(state.mean) + (1 - momentum) * mu.squeeze(),
      rtol=1e-6,
      atol=1e-7,
    )
    np.testing.assert_allclose(
      new_state.var, momentum * np.asarray(state.var) + (1 - momentum) * var.squeeze(), rtol=1e-6
    )
  assert step._cache_size() == 1


def test_unbiased_variance_updates_running_var_with_m_over_m_minus_1():
  x, params, state = random_inputs((10, 3), -1)
  (y_biased, biased), (y, unbiased) = jax.jit(
    lambda x: [
      bnjax.batch_norm(x, params, state, training=True, momentum=0.0, unbiased_variance=unbiased)
      for unbiased in (False, True)
    ]
  )(x)
  np.testing.assert_allclose(unbiased.var, biased.var * 10 / 9, rtol=1e-6)
  np.testing.assert_array_equal(y, y_biased)  # the batch is normalized with the biased one


# ---- bad input: each raises an error naming the problem --------------------------------


def _call(**overrides):
  x, params, state = random_inputs((8, 4), -1)
  kwargs = dict(x=x, params=params, state=state, training=True)
  kwargs.update(overrides)
  return bnjax.batch_norm(kwargs.pop("x"), kwargs.pop("params"), kwargs.pop("state"), **kwargs)


@pytest.mark.parametrize(
  "overrides, error, match",
  [
    (dict(training=1), TypeError, "training must be a Python bool"),
    (dict(training=jnp.array(True)), TypeError, "training must be a Python bool"),
    (dict(x=jnp.ones((8, 4), jnp.int32)), TypeError, "x must have a floating"),
    (dict(axis=2), ValueError, "axis 2 is out of range for an input of rank 2"),
    (dict(axis=(1, -1)), ValueError, "names the same axis twice"),
    (
      dict(params=bnjax.init(5)[0]),
      ValueError,
      r"params.scale has shape \(5,\) but x of shape \(8, 4\) has feature shape \(4,\)",
    ),
    (dict(state=bnjax.init(3)[1]), ValueError, r"state.mean has shape \(3,\)"),
    (
      dict(mask=jnp.ones((8, 4, 1), bool)),
      ValueError,
      r"mask of shape \(8, 4, 1\) does not broadcast",
    ),
    (dict(mask=jnp.ones((3,), bool)), ValueError, r"mask of shape \(3,\) does not broadcast"),
    (dict(mask=jnp.ones((8,), jnp.int32)), TypeError, "mask must be boolean"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(momentum=jnp.ones(2)), ValueError, "momentum must be a scalar"),
    (dict(epsilon=0.0), ValueError, "epsilon must be positive"),
    (dict(epsilon=-1e-5), ValueError, "epsilon must be positive"),
  ],
)
def test_bad_input_raises_a_clear_error(overrides, error, match):
  with pytest.raises(error, match=match):
    _call(**overrides)


def test_complex_masked_nan_entries_do_not_reach_gradients():
  x, params, state = random_inputs((10, 3), -1)
  xc = np.asarray(x) + 1j * np.flip(np.asarray(x), 0)
  mask = (np.arange(10) % 3 != 0)[:, None]
  w = jnp.asarray(np.where(mask, np.asarray(_weights((10, 3))), 0.0), jnp.complex64)

  @jax.jit
  def step(x, scale):
    def loss(x, scale):
      y, _ = bnjax.batch_norm(
        x, bnjax.BatchNormParams(scale, params.bias), state, training=True, mask=jnp.asarray(mask)
      )
      return jnp.real(weighted_sum(w, y)), y

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, scale)

  clean, _ = step(jnp.asarray(xc, jnp.complex64), params.scale)
  poisoned, y = step(jnp.asarray(np.where(mask, xc, np.nan), jnp.complex64), params.scale)
  np.testing.assert_allclose(poisoned[1], clean[1], rtol=1e-5)
  np.testing.assert_allclose(
    np.where(mask, poisoned[0], 0), np.where(mask, clean[0], 0), rtol=1e-5, atol=1e-6
  )
  assert np.isnan(np.asarray(y)[~np.broadcast_to(mask, y.shape)]).all()  # still NaN out


def test_nothing_valid_leaves_the_state_and_gives_finite_gradients():
  """No valid value: the statistics are constants (no derivative), so y is an
  affine map of x per feature and dx is its slope times dy."""
  x, params, state = random_inputs((6, 3), -1)
  w = _weights(x.shape)
  (dx, _), (y, new_state) = training_step(x, params, state, w, mask=jnp.zeros((6, 1), bool))
  chex.assert_trees_all_equal(new_state, state)
  chex.assert_tree_all_finite((y, dx))
  y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
  slope = (y[1:] - y[:1]) / (x[1:] - x[:1])  # the same for every pair of examples
  np.testing.assert_allclose(slope, np.broadcast_to(slope[0], slope.shape), rtol=1e-4)
  np.testing.assert_allclose(dx, slope[0] * np.asarray(w), rtol=1e-4)


# Issue 8: masks read as NumPy (and Flax) broadcast them; inputs without a batch
# axis; the output as exact as the statistics; argument types.


@pytest.mark.parametrize(
  "x_shape, mask",
  [
    ((4, 4, 3), np.array([[True], [True], [False], [True]])),  # [4, 1] is [1, 4, 1]
    ((10, 5), np.arange(5) % 2 == 0),  # [5] is [1, 5]: per feature
    ((6, 4, 3), np.arange(12).reshape(4, 3) % 5 != 0),  # [4, 3] is [1, 4, 3]
  ],
)
def test_mask_is_broadcast_as_flax_broadcasts_it(x_shape, mask):
  x = float32(np.random.default_rng(3).standard_normal(x_shape) + 2.0)
  params, state = bnjax.init(x_shape[-1])
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=False)
  variables = {"params": params._asdict(), "batch_stats": state._asdict()}  # Flax's init, unchanged
  want_y, want = jax.jit(lambda x: flax_bn.apply(variables, x, mask=mask, mutable=["batch_stats"]))(
    x
  )
  y, new_state = batch_norm(x, params, state, training=True, momentum=0.0, mask=jnp.asarray(mask))
  # In NumPy from here: indexing jax arrays with a boolean mask compiles a gather per shape.
  want_y, want, y, new_state, state = jax.device_get((want_y, want, y, new_state, state))
  valid = np.broadcast_to(mask, x_shape)
  defined = valid.reshape(-1, x_shape[-1]).any(0)  # Flax's statistics are NaN elsewhere
  assert not defined.all() or mask.ndim > 1
  np.testing.assert_allclose(
    new_state.mean[defined], want["batch_stats"]["mean"][defined], rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(new_state.var[defined], want["batch_stats"]["var"][defined], rtol=1e-5)
  # A feature with no valid value leaves the state as it was (bnjax's documented rule).
  np.testing.assert_array_equal(new_state.mean[~defined], state.mean[~defined])
  np.testing.assert_array_equal(new_state.var[~defined], state.var[~defined])
  np.testing.assert_allclose(
    np.where(valid, y, 0), np.where(valid, want_y, 0), rtol=1e-5, atol=1e-5
  )
  _, ref_var = reference.batch_mean_var(x, tuple(range(len(x_shape) - 1)), mask=valid)
  np.testing.assert_allclose(new_state.var[defined], ref_var.ravel()[defined], rtol=1e-5)


def test_mask_of_x_shape_without_features_is_refused_with_the_fix():
  x, params, state = random_inputs((6, 5, 3), -1)
  with pytest.raises(ValueError, match=r"mask\[\.\.\., None\] has shape \(6, 5, 1\)"):
    bnjax.batch_norm(x, params, state, training=True, mask=jnp.ones((6, 5), bool))


def test_one_example_without_batch_axis_in_inference():
  x, params, _ = random_inputs((4, 3), -1)
  state = bnjax.BatchNormState(mean=jnp.array([1.0, -1.0, 0.5]), var=jnp.array([4.0, 1.0, 0.25]))
  y_one, same = bnjax.batch_norm(x[1], params, state, training=False)  # eager
  assert same is state  # inference returns the state object itself
  want = np.asarray(params.scale) * (np.asarray(x, np.float64) - np.asarray(state.mean))
  want = want / np.sqrt(np.asarray(state.var, np.float64) + 1e-5) + np.asarray(params.bias)
  np.testing.assert_allclose(y_one, want[1], rtol=1e-6)
  per_example = jax.jit(jax.vmap(lambda e: bnjax.batch_norm(e, params, state, training=False)[0]))(
    x
  )
  np.testing.assert_allclose(per_example, want, rtol=1e-6)


def test_one_example_per_vmap_lane_trains_over_the_named_axis():
  x, params, state = random_inputs((8, 3), -1, offset=3.0)
  want_y, mu, var = reference.forward(
    x, np.asarray(params.scale), np.asarray(params.bias), 1e-5, (0,)
  )
  y, new_state = jax.jit(
    jax.vmap(
      lambda e: bnjax.batch_norm(e, params, state, training=True, axis_name="lanes", momentum=0.0),
      axis_name="lanes",
    )
  )(x)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for lane in range(8):  # every lane holds the state of the whole batch
    np.testing.assert_allclose(new_state.mean[lane], mu.squeeze(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state.var[lane], var.squeeze(), rtol=1e-5)


def test_training_without_batch_axis_is_a_batch_of_one():
  """As Flax computes it (Flax's test_bind_stateful): the same as x[None]."""
  x, params, state = random_inputs((4, 3), -1, offset=2.0)
  y, new_state = batch_norm(x[0], params, state, training=True, momentum=0.5)
  want_y, want_state = batch_norm(x[:1], params, state, training=True, momentum=0.5)
  np.testing.assert_array_equal(y, want_y[0])
  chex.assert_trees_all_equal(new_state, want_state)
  np.testing.assert_allclose(y, params.bias, atol=1e-6)
  # variance 0 and mean x: the state moves halfway to them
  np.testing.assert_allclose(
    new_state.mean, 0.5 * np.asarray(state.mean) + 0.5 * np.asarray(x[0]), rtol=1e-6
  )
  np.testing.assert_allclose(new_state.var, 0.5 * np.asarray(state.var), rtol=1e-6)


@pytest.mark.parametrize("offset", [1e5, 1e7])
def test_output_as_exact_as_the_statistics_at_large_offsets(offset):
  rng = np.random.default_rng(4)
  x = (offset + rng.standard_normal((32, 16))).astype(np.float32)
  params, state = bnjax.init(16)
  y, _ = batch_norm(x, params, state, training=True)
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
  # Subtracting a float32-rounded mean was off by up to 0.45 standard deviations at 1e7.
  np.testing.assert_allclose(y, want, atol=5e-6)


@pytest.mark.parametrize(
  "overrides, error, match",
  [
    (
      dict(state=bnjax.BatchNormState(jnp.zeros(4, jnp.int32), jnp.ones(4))),
      TypeError,
      "state.mean must have a floating",
    ),
    (
      dict(params=bnjax.BatchNormParams(jnp.ones(4, jnp.int32), None)),
      TypeError,
      "params.scale must have a floating",
    ),
    (dict(momentum=True), TypeError, "momentum must be a real number"),
    (dict(momentum="0.9"), TypeError, "momentum must be a real number"),
    (dict(unbiased_variance="no"), TypeError, "unbiased_variance must be a Python bool"),
    (dict(axis=None), TypeError, "axis must be an int or a sequence of ints, got None"),
    (dict(axis=1.0), TypeError, "axis must be an int or a sequence of ints, got 1.0"),
    (dict(x=jnp.ones((0, 4))), ValueError, r"has no values .* \(axis 0 has size 0\)"),
    (dict(axis_index_groups=[[0, "a"]], axis_name="i"), TypeError, "axis_index_groups must be"),
  ],
)
def test_bad_argument_types_raise_a_clear_error(overrides, error, match):
  with pytest.raises(error, match=match):
    _call(**overrides)


@pytest.mark.parametrize(
  "num_features, error",
  [(0, ValueError), (-3, ValueError), ((4, 0), ValueError), (2.5, TypeError), (True, TypeError)],
)
def test_init_refuses_an_empty_or_non_integer_layer(num_features, error):
  with pytest.raises(error, match="num_features must be a positive int"):
    bnjax.init(num_features)


def test_zero_size_batch_in_inference_is_empty():
  _, params, state = random_inputs((8, 4), -1)
  y, _ = bnjax.batch_norm(jnp.ones((0, 4)), params, state, training=False)
  assert y.shape == (0, 4)
