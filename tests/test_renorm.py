"""bnjax.batch_renorm against the paper (Ioffe 2017) transcribed in NumPy, its
gradients against finite differences of that transcription with r and d held
fixed (stop_gradient), and the linen/nnx modules."""

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

AXES = (0, 1)
# The functions under test, compiled whole (eager calls compile each primitive on
# its own); r_max, d_max and momentum are traced, as a schedule passes them.
batch_renorm = jax.jit(bnjax.batch_renorm, static_argnames=("training", "axis_name"))
batch_norm = jax.jit(bnjax.batch_norm, static_argnames=("training",))


def problem(seed=0, dtype=jnp.float32):
  """NumPy draws (jax.random compiles a program per shape)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(1.7 * rng.standard_normal((12, 3, 4)) + 0.8, dtype)
  params = bnjax.BatchNormParams(
    jnp.asarray(1 + 0.2 * rng.standard_normal(4), jnp.float32),
    jnp.asarray(0.3 * rng.standard_normal(4), jnp.float32),
  )
  # Running statistics off from the batch's, so that r and d hit their clips for some features.
  state = bnjax.BatchNormState(
    mean=jnp.array([0.0, 0.8, 3.0, -2.0]), var=jnp.array([1.0, 2.9, 0.3, 9.0])
  )
  return x, params, state


@pytest.mark.parametrize("r_max, d_max", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_forward_is_the_paper(r_max, d_max):
  x, params, state = problem()
  y, new_state = batch_renorm(
    x, params, state, training=True, r_max=r_max, d_max=d_max, momentum=0.9
  )
  expand = lambda a: np.asarray(a, np.float64)[None, None]  # noqa: E731
  r, d = reference.renorm_corrections(
    x, expand(state.mean), expand(state.var), 1e-5, r_max, d_max, AXES
  )
  want = reference.renorm_forward(x, expand(params.scale), expand(params.bias), 1e-5, r, d, AXES)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  _, mu, var = reference.forward(x, 1.0, 0.0, 1e-5, AXES)
  np.testing.assert_allclose(
    new_state.mean, 0.9 * state.mean + 0.1 * mu.ravel(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(new_state.var, 0.9 * state.var + 0.1 * var.ravel(), rtol=1e-5)


def test_r_max_1_d_max_0_is_batch_norm():
  x, params, state = problem()
  y, s1 = batch_renorm(x, params, state, training=True, r_max=1.0, d_max=0.0)
  want, s2 = batch_norm(x, params, state, training=True)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(s1, s2)


def test_inference_is_batch_norm():
  x, params, state = problem()
  y, same = bnjax.batch_renorm(x, params, state, training=False, r_max=3.0, d_max=5.0)  # eager
  assert same is state
  np.testing.assert_allclose(
    y, batch_norm(x, params, state, training=False)[0], rtol=1e-6, atol=1e-6
  )


def test_gradients_treat_r_and_d_as_constants(x64):
  x, params, state = problem()
  x = x.astype(jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  w = np.random.default_rng(5).standard_normal(x.shape)
  r_max, d_max = 1.5, 0.5
  expand = lambda a: np.asarray(a, np.float64)[None, None]  # noqa: E731
  r, d = reference.renorm_corrections(
    x, expand(state.mean), expand(state.var), 1e-5, r_max, d_max, AXES
  )

  def transcription(x, gamma, beta):
    """sum(w * y) with r and d fixed at their values (the stop_gradient), for
    copies stacked on a leading axis: x [P, 12, 3, 4], gamma and beta [P, 4]."""
    y = reference.renorm_forward(x, gamma[:, None, None], beta[:, None, None], 1e-5, r, d, (1, 2))
    return np.sum(w * y, axis=(1, 2, 3))

  def numeric_gradient(args, index, h=1e-6):
    """Central differences, all entries of args[index] at once (one copy each)."""
    base = args[index]
    steps = h * np.eye(base.size).reshape((base.size,) + base.shape)
    copies = [np.broadcast_to(a, (base.size,) + a.shape) for a in args]
    plus, minus = list(copies), list(copies)
    plus[index], minus[index] = base + steps, base - steps
    return ((transcription(*plus) - transcription(*minus)) / (2 * h)).reshape(base.shape)

  def loss(x, scale, bias):
    y, _ = bnjax.batch_renorm(
      x, bnjax.BatchNormParams(scale, bias), state, training=True, r_max=r_max, d_max=d_max
    )
    return jnp.sum(w * y)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, params.scale, params.bias)
  args = (np.asarray(x), np.asarray(params.scale), np.asarray(params.bias))
  for i in range(3):
    np.testing.assert_allclose(grads[i], numeric_gradient(args, i), rtol=1e-6, atol=1e-7)


def test_traced_limits_follow_a_schedule_without_recompiling():
  x, params, state = problem()
  step = jax.jit(
    lambda r_max, d_max: bnjax.batch_renorm(
      x, params, state, training=True, r_max=r_max, d_max=d_max
    )[0]
  )
  a, b = step(jnp.float32(1.0), jnp.float32(0.0)), step(jnp.float32(3.0), jnp.float32(5.0))
  assert step._cache_size() == 1
  np.testing.assert_allclose(
    a, batch_norm(x, params, state, training=True)[0], rtol=1e-5, atol=1e-5
  )
  expand = lambda a: np.asarray(a, np.float64)[None, None]  # noqa: E731
  r, d = reference.renorm_corrections(
    x, expand(state.mean), expand(state.var), 1e-5, 3.0, 5.0, AXES
  )
  want = reference.renorm_forward(x, expand(params.scale), expand(params.bias), 1e-5, r, d, AXES)
  np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-5)


def test_synchronized_under_pmap_matches_full_batch():
  x, params, state = problem()
  x = jnp.asarray(np.concatenate([x] * 2))  # 24 examples, 3 per device

  def f(x):
    return bnjax.batch_renorm(x, params, state, training=True, r_max=2.0, d_max=1.0, axis_name="i")

  y, new_state = jax.pmap(f, axis_name="i")(x.reshape((8, 3) + x.shape[1:]))
  want_y, want_state = batch_renorm(x, params, state, training=True, r_max=2.0, d_max=1.0)
  np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)
  for device in range(8):  # every device holds the state of the whole batch
    np.testing.assert_allclose(new_state.mean[device], want_state.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state.var[device], want_state.var, rtol=1e-5)


def test_bfloat16_input():
  x, params, state = problem(dtype=jnp.bfloat16)
  y, new_state = batch_renorm(x, params, state, training=True, r_max=2.0, d_max=1.0)
  assert y.dtype == jnp.bfloat16 and new_state.var.dtype == jnp.float32
  want, want_state = batch_renorm(
    x.astype(jnp.float32), params, state, training=True, r_max=2.0, d_max=1.0
  )
  # The float32 computation on the same values, rounded once to bfloat16 (u = 2^-8).
  np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=2.0**-8, atol=1e-6)
  chex.assert_trees_all_close(new_state, want_state, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "r_max, d_max, match",
  [
    (0.5, 1.0, "r_max must be >= 1"),
    (2.0, -1.0, "d_max must be >= 0"),
    (jnp.ones(2), 1.0, "r_max must be a scalar"),
  ],
)
def test_bad_limits(r_max, d_max, match):
  x, params, state = problem()
  with pytest.raises(ValueError, match=match):
    bnjax.batch_renorm(x, params, state, training=True, r_max=r_max, d_max=d_max)


def test_linen_and_nnx_modules_match_the_function():
  x, _, _ = problem()
  module = bnjax.linen.BatchRenorm(use_running_average=False, r_max=2.0, d_max=1.0)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  variables = {**variables, "batch_stats": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}}
  apply = jax.jit(
    lambda variables, x, **limits: module.apply(variables, x, mutable=["batch_stats"], **limits)
  )
  y, updated = apply(variables, x)
  state = bnjax.BatchNormState(jnp.full(4, 0.5), jnp.full(4, 2.0))
  want, want_state = batch_renorm(x, bnjax.init(4)[0], state, training=True, r_max=2.0, d_max=1.0)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(updated["batch_stats"], want_state._asdict(), rtol=1e-6)
  y_traced, _ = apply(variables, x, r_max=jnp.float32(1.0), d_max=jnp.float32(0.0))
  np.testing.assert_allclose(
    y_traced, batch_norm(x, bnjax.init(4)[0], state, training=True)[0], rtol=1e-5, atol=1e-5
  )

  layer = bnjax.nnx.BatchRenorm(4, r_max=2.0, d_max=1.0, rngs=nnx.Rngs(0))
  layer.mean[...], layer.var[...] = jnp.full(4, 0.5), jnp.full(4, 2.0)
  np.testing.assert_allclose(
    nnx.jit(lambda layer, x: layer(x))(layer, x), want, rtol=1e-6, atol=1e-6
  )
  chex.assert_trees_all_close((layer.mean[...], layer.var[...]), tuple(want_state), rtol=1e-6)


def test_nnx_batch_renorm_is_a_batch_norm_without_its_batch_norm_only_arguments():
  layer = bnjax.nnx.BatchRenorm(3, r_max=2.0, momentum=0.5, rngs=nnx.Rngs(0))
  assert isinstance(layer, bnjax.nnx.BatchNorm) and layer.momentum == 0.5 and layer.r_max == 2.0
  for name, value in [("unbiased_variance", True), ("virtual_batch_size", 2)]:
    with pytest.raises(TypeError, match=f"BatchRenorm takes no {name}"):
      bnjax.nnx.BatchRenorm(3, rngs=nnx.Rngs(0), **{name: value})
