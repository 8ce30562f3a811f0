"""Batch norm under gradient accumulation (bnjax.accumulation), against independent
references: ghost batch norm on the concatenated batch (``virtual_batch_size`` = the
micro-batch size) for the outputs and gradients, and one update of the running
statistics with the whole batch's statistics in float64 NumPy; across 8 devices,
against one device holding the global micro-batches; with ``optax.MultiSteps``,
against one optimizer step on the whole batch.

Tolerances: float32 statistics of at most 48 values of order 10, merged over 3
micro-batches: a few roundings of 6e-8, below 1e-6 relative (the float64 test holds
them to 1e-12); outputs and gradients of order 1 to 10 within 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.equinox
import bnjax.haiku
import bnjax.linen
import bnjax.nnx
from tests import reference

# Compiled whole, not op by op.
batch_norm = jax.jit(bnjax.batch_norm, static_argnames=("training", "virtual_batch_size"))
K, MICRO, C = 3, 4, 3  # micro-batches per optimizer step, examples per micro-batch, features
MOMENTUM = 0.9


def problem(dtype=np.float32, offset=0.0):
  """Micro-batches x [K, MICRO, 2, C] whose means differ (so the whole batch's variance is
  not the mean of theirs), a cotangent w of the same shape, params and a state."""
  rng = np.random.default_rng(0)
  x = 2 * rng.standard_normal((K, MICRO, 2, C)) + 3 * np.arange(K)[:, None, None, None] + offset
  w = rng.standard_normal(x.shape)
  params = bnjax.BatchNormParams(
    jnp.asarray(1 + 0.1 * rng.standard_normal(C), dtype), jnp.asarray(rng.standard_normal(C), dtype)
  )
  state = bnjax.BatchNormState(
    jnp.asarray(rng.standard_normal(C), dtype), jnp.asarray(1 + rng.random(C), dtype)
  )
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype), params, state


def one_update(state, x, mask=None, *, unbiased=False, momentum=MOMENTUM):
  """float64 NumPy: the state after one update with the statistics of all of ``x``
  (``[..., C]``) over its valid entries; a feature without any keeps its state."""
  axes = tuple(range(x.ndim - 1))
  mu, var = reference.batch_mean_var(np.asarray(x, np.float64), axes, mask)
  count = np.broadcast_to(np.ones(x.shape) if mask is None else mask, x.shape).sum(axes)
  mu, var = mu.ravel(), var.ravel() * (count / np.maximum(count - 1, 1) if unbiased else 1)
  old_mean, old_var = (np.asarray(s, np.float64) for s in state)
  return (
    np.where(count > 0, momentum * old_mean + (1 - momentum) * mu, old_mean),
    np.where(count > (1 if unbiased else 0), momentum * old_var + (1 - momentum) * var, old_var),
  )


def accumulated(x, w, params, state, mask=None, **options):
  """A ``lax.scan`` over the micro-batches: each one's output and gradients of
  ``sum(w * y)`` (params' summed), then one ``apply_pending``."""

  def micro_step(carry, inputs):
    dparams, pending = carry
    x, w, mask = inputs

    def loss(x, params):
      y, pending_out = bnjax.accumulate_batch_norm(
        x, params, state, pending, momentum=MOMENTUM, mask=mask, **options
      )
      return jnp.sum(w * y), (y, pending_out)

    (dx, dp), (y, pending) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return (jax.tree.map(jnp.add, dparams, dp), pending), (y, dx)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (dparams, pending), (y, dx) = jax.lax.scan(
    micro_step, (zeros, bnjax.init_pending(state)), (x, w, mask)
  )
  new_state, next_pending = bnjax.apply_pending(state, pending)
  return y, dx, dparams, new_state, next_pending


def ghost(x, w, params, state, mask=None):
  """Ghost batch norm on the concatenated batch, groups of MICRO: output and gradients."""
  whole = lambda a: None if a is None else a.reshape((-1,) + a.shape[2:])  # noqa: E731

  def loss(x, params):
    y, _ = bnjax.batch_norm(
      x, params, state, training=True, virtual_batch_size=MICRO, mask=whole(mask)
    )
    return jnp.sum(whole(w) * y), y

  (dx, dparams), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(whole(x), params)
  return y.reshape(x.shape), dx.reshape(x.shape), dparams


def assert_ghost_outputs_and_gradients(got, want, rtol=1e-5, atol=1e-5):
  (y, dx, dparams), (want_y, want_dx, want_dparams) = got, want
  np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol)
  np.testing.assert_allclose(dx, want_dx, rtol=rtol, atol=atol)
  for got_p, want_p in zip(dparams, want_dparams, strict=True):
    np.testing.assert_allclose(got_p, want_p, rtol=rtol, atol=atol)


@pytest.mark.parametrize("unbiased", [False, True])
def test_scan_is_ghost_batch_norm_and_one_exact_update(unbiased):
  x, w, params, state = problem(offset=10.0)
  both = jax.jit(
    lambda x, w: (
      accumulated(x, w, params, state, unbiased_variance=unbiased),
      ghost(x, w, params, state),
    )
  )
  (y, dx, dparams, new_state, next_pending), want = both(x, w)
  assert_ghost_outputs_and_gradients((y, dx, dparams), want)
  want_mean, want_var = one_update(state, x, unbiased=unbiased)
  np.testing.assert_allclose(new_state.mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(new_state.var, want_var, rtol=1e-6)
  # The next step starts empty, from the installed statistics.
  np.testing.assert_array_equal(next_pending.moments.count, 0)
  np.testing.assert_array_equal(next_pending.next_state.mean, new_state.mean)


def test_float64_is_exact(x64):
  x, w, params, state = problem(np.float64, offset=1e4)
  y, dx, dparams, new_state, _ = jax.jit(lambda x, w: accumulated(x, w, params, state))(x, w)
  want_mean, want_var = one_update(state, x)
  np.testing.assert_allclose(new_state.mean, want_mean, rtol=1e-13)
  np.testing.assert_allclose(new_state.var, want_var, rtol=1e-12)
  for k in range(K):
    want_y, _, _ = reference.forward(x[k], *map(np.asarray, params), 1e-5, (0, 1))
    np.testing.assert_allclose(y[k], want_y, rtol=1e-12, atol=1e-12)
    want_dx, _, _ = reference.backward(x[k], np.asarray(params.scale), w[k], 1e-5, (0, 1))
    np.testing.assert_allclose(dx[k], want_dx, rtol=1e-10, atol=1e-12)


def uneven_mask():
  """[K, MICRO, 2, C]: uneven valid counts per micro-batch; feature 0 has no valid
  value in micro-batch 1, feature 2 none anywhere (its state must stay)."""
  mask = np.random.default_rng(1).random((K, MICRO, 2, C)) < 0.6
  mask[0, 0, 0, :2] = mask[2, 0, 0, :2] = True  # every feature but 2 has a value
  mask[1, ..., 0] = False
  mask[..., 2] = False
  return mask


def test_masks_with_uneven_counts():
  x, w, params, state = problem()
  mask = uneven_mask()
  got, want = jax.jit(
    lambda x, w, mask: (accumulated(x, w, params, state, mask), ghost(x, w, params, state, mask))
  )(x, w, jnp.asarray(mask))
  y, dx, dparams, new_state, _ = got
  assert_ghost_outputs_and_gradients((y, dx, dparams), want)
  want_mean, want_var = one_update(state, x, mask)
  np.testing.assert_allclose(new_state.mean, want_mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(new_state.var, want_var, rtol=1e-6)
  np.testing.assert_array_equal(new_state.mean[2], state.mean[2])  # never defined: kept


def test_eight_devices_with_uneven_masks():
  """Each micro-batch spread over 8 devices (2 examples each, uneven valid counts, one
  device with none in micro-batch 0), under shard_map: the outputs, gradients and
  running statistics of one device holding the global micro-batches; under pmap, the
  same running statistics on every device."""
  rng = np.random.default_rng(2)
  devices, per_device = 8, 2
  x = jnp.asarray(2 * rng.standard_normal((K, devices * per_device, C)) + 5, jnp.float32)
  w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  mask = rng.random(x.shape[:2] + (1,)) < 0.7
  mask[0, :per_device] = False
  mask = jnp.asarray(mask)
  params, state = problem()[2:]
  mesh = jax.make_mesh((devices,), ("batch",))
  sharded = jax.jit(
    jax.shard_map(
      lambda x, w, mask: accumulated(x, w, params, state, mask, axis_name="batch"),
      mesh=mesh,
      in_specs=(P(None, "batch"), P(None, "batch"), P(None, "batch")),
      out_specs=(P(None, "batch"), P(None, "batch"), P(), P(), P()),
    )
  )
  spread = jax.sharding.NamedSharding(mesh, P(None, "batch"))
  y, dx, dparams, new_state, _ = sharded(*(jax.device_put(a, spread) for a in (x, w, mask)))
  one_device = jax.jit(accumulated)(x, w, params, state, mask)
  for got, want in zip((y, dx, dparams, new_state), one_device[:4], strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  want_mean, want_var = one_update(state, x, mask)
  np.testing.assert_allclose(new_state.mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(new_state.var, want_var, rtol=1e-6)
  # pmap: every device gets the same running statistics.
  per_device = lambda a: jnp.stack(jnp.split(a, devices, axis=1))  # noqa: E731  [8, K, 2, ...]
  pmapped = jax.pmap(
    lambda x, w, mask: accumulated(x, w, params, state, mask, axis_name="batch")[3],
    axis_name="batch",
  )(per_device(x), per_device(w), per_device(mask))
  for device in range(devices):
    np.testing.assert_allclose(pmapped.mean[device], want_mean, rtol=1e-6)
    np.testing.assert_allclose(pmapped.var[device], want_var, rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")  # optax mixes int32 and float32
def test_multi_steps_moves_the_statistics_once_per_optimizer_step():
  """optax.MultiSteps over K micro-batches: the running statistics stay until its
  K-th call, then are one update with the whole batch's statistics; the parameters
  are one SGD step on ghost batch norm's mean loss over the whole batch."""
  x, targets, bn_params, state = problem()
  kernel = jnp.asarray(np.random.default_rng(3).standard_normal((C, C)), jnp.float32)
  params = (kernel, bn_params)
  tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=K)

  def loss(params, x, targets, state, pending):
    kernel, bn_params = params
    y, pending = bnjax.accumulate_batch_norm(
      x @ kernel, bn_params, state, pending, momentum=MOMENTUM
    )
    return jnp.mean((y - targets) ** 2), pending

  @jax.jit
  def train_step(params, opt_state, state, pending, x, targets):
    grads, pending = jax.grad(loss, has_aux=True)(params, x, targets, state, pending)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    stepped = new_opt_state.gradient_step > opt_state.gradient_step
    state, pending = bnjax.apply_pending(state, pending, where=stepped)
    return optax.apply_updates(params, updates), new_opt_state, state, pending

  opt_state, pending, start = tx.init(params), bnjax.init_pending(state), state
  for k in range(K):
    params, opt_state, state, pending = train_step(
      params, opt_state, state, pending, x[k], targets[k]
    )
    if k < K - 1:  # not yet: the state is the one from before the step
      jax.tree.map(np.testing.assert_array_equal, state, start)
  h = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  want_mean, want_var = one_update(start, h)
  np.testing.assert_allclose(state.mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, want_var, rtol=1e-5)
  np.testing.assert_array_equal(pending.moments.count, 0)

  def ghost_loss(params):
    kernel, bn_params = params
    whole = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    y, _ = bnjax.batch_norm(
      whole(x) @ kernel, bn_params, start, training=True, virtual_batch_size=MICRO
    )
    return jnp.mean((y - whole(targets)) ** 2)

  first = (kernel, bn_params)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, first, jax.jit(jax.grad(ghost_loss))(first))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, want)


def test_apply_pending_where_false_keeps_both():
  x, _, params, state = problem()

  @jax.jit
  def run(where):
    _, pending = bnjax.accumulate_batch_norm(x[0], params, state, bnjax.init_pending(state))
    return pending, bnjax.apply_pending(state, pending, where=where)

  pending, (kept_state, kept_pending) = run(jnp.array(False))
  jax.tree.map(np.testing.assert_array_equal, kept_state, state)
  jax.tree.map(np.testing.assert_array_equal, kept_pending, pending)


def test_merge_moments_includes_the_spread_of_the_means():
  """Two halves of standard deviation 1 around 100 and 102: the variance of the union
  is about 2, the mean of their variances about 1. The merge is exact up to the
  rounding of the halves' float32 means, eps * 100 relative to the spread."""
  rng = np.random.default_rng(4)
  halves = [100 + rng.standard_normal((50, 1)) + 2 * i for i in range(2)]
  moments = functools.partial(bnjax.batch_moments, reduction_axes=(0,))
  a, b, merged = jax.jit(
    lambda u, v: (moments(u), moments(v), bnjax.merge_moments(moments(u), moments(v)))
  )(*(jnp.asarray(h, jnp.float32) for h in halves))
  values = np.concatenate([np.asarray(h, np.float32) for h in halves]).astype(np.float64)
  np.testing.assert_allclose(merged.count, [100.0])
  np.testing.assert_allclose(merged.mean, values.mean(0), rtol=1e-7)
  np.testing.assert_allclose(merged.var, values.var(0), rtol=1e-5)
  mean_of_variances = (a.var + b.var) / 2  # what averaging micro-batch variances gives
  assert abs(float(mean_of_variances[0]) / values.var() - 1) > 0.3


def test_errors_name_the_problem():
  x, _, params, state = problem()
  pending = bnjax.init_pending(state)
  with pytest.raises(ValueError, match=r"pending.moments.count has shape \(2,\)"):
    wrong = pending._replace(moments=pending.moments._replace(count=jnp.zeros(2)))
    bnjax.accumulate_batch_norm(x[0], params, state, wrong)
  with pytest.raises(ValueError, match="where must be a boolean scalar"):
    bnjax.apply_pending(state, pending, where=jnp.ones(2, bool))
  with pytest.raises(TypeError, match="where must be a boolean scalar, got dtype float32"):
    bnjax.apply_pending(state, pending, where=jnp.array(1.0))
  with pytest.raises(ValueError, match="moments of one shape"):
    bnjax.merge_moments(pending.moments, bnjax.Moments(*(jnp.zeros(2),) * 3))


# The drop-ins: each layer's outputs are ghost batch norm's, and its running
# statistics after apply_pending are one update with the whole batch's (float64
# NumPy, in the framework's own convention); before it, they stay.


def whole(a):
  """[K, MICRO, ...] micro-batches as one batch of K * MICRO."""
  return a.reshape((-1,) + a.shape[2:])


@pytest.mark.usefixtures("standard_promotion")
def test_linen_two_layers_in_a_scan():
  from flax import linen as nn

  class Net(nn.Module):
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.Dense(C)(x)
        x = bnjax.linen.BatchNorm(
          use_running_average=False, momentum=MOMENTUM, virtual_batch_size=self.virtual_batch_size
        )(x)
      return x

  x, w, _, _ = problem()
  net, ghost_net = Net(), Net(virtual_batch_size=MICRO)
  variables = jax.jit(net.init)(jax.random.key(0), x[0])
  batch_stats = variables["batch_stats"]

  def micro_step(carry, inputs):
    grads, pending = carry

    def loss(params):
      y, updates = net.apply(
        {"params": params, "batch_stats": batch_stats, "pending_stats": pending},
        inputs[0],
        mutable=["pending_stats"],
      )
      return jnp.sum(inputs[1] * y), (y, updates["pending_stats"])

    (y, pending), g = jax.grad(loss, has_aux=True)(variables["params"])[::-1]
    return (jax.tree.map(jnp.add, grads, g), pending), y

  def accumulated(x, w):
    start = (
      jax.tree.map(jnp.zeros_like, variables["params"]),
      bnjax.linen.init_pending(batch_stats),
    )
    (grads, pending), y = jax.lax.scan(micro_step, start, (x, w))
    return y, grads, bnjax.linen.apply_pending(batch_stats, pending)

  def ghost(x, w):
    def loss(params):
      y, state = ghost_net.apply(
        {"params": params, "batch_stats": batch_stats},
        whole(x),
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda module, _: isinstance(module, nn.Dense),
      )
      return jnp.sum(whole(w) * y), (y, state["intermediates"])

    (y, intermediates), grads = jax.grad(loss, has_aux=True)(variables["params"])[::-1]
    return y, grads, intermediates

  (y, grads, (new_stats, pending)), (want_y, want_grads, bn_inputs) = jax.jit(
    lambda x, w: (accumulated(x, w), ghost(x, w))
  )(x, w)
  np.testing.assert_allclose(whole(y), want_y, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, want_grads
  )
  for layer in range(2):
    h = bn_inputs[f"Dense_{layer}"]["__call__"][0]
    old = batch_stats[f"BatchNorm_{layer}"]
    want_mean, want_var = one_update(bnjax.BatchNormState(old["mean"], old["var"]), h)
    got = new_stats[f"BatchNorm_{layer}"]
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5)
    np.testing.assert_array_equal(pending[f"BatchNorm_{layer}"]["count"], 0)
    assert sorted(pending[f"BatchNorm_{layer}"]) == [
      "count",
      "mean",
      "next_mean",
      "next_var",
      "var",
    ]


def test_nnx_in_place_under_nnx_jit():
  from flax import nnx

  x, _, _, _ = problem()
  mask = jnp.asarray(uneven_mask())
  layer = bnjax.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=nnx.Rngs(0))
  start = bnjax.BatchNormState(layer.mean[...], layer.var[...])
  bnjax.nnx.init_pending(layer)
  call = nnx.jit(lambda layer, x, mask: layer(x, mask=mask))
  y = [call(layer, x[k], mask[k]) for k in range(K)]
  np.testing.assert_array_equal(layer.mean[...], start.mean)  # not yet
  nnx.jit(bnjax.nnx.apply_pending)(layer)
  want_y, _ = batch_norm(
    whole(x), None, start, training=True, virtual_batch_size=MICRO, mask=whole(mask)
  )
  np.testing.assert_allclose(whole(jnp.stack(y)), want_y, rtol=1e-5, atol=1e-5)
  want_mean, want_var = one_update(start, x, np.asarray(mask))
  np.testing.assert_allclose(layer.mean[...], want_mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(layer.var[...], want_var, rtol=1e-6)
  nnx.pop(layer, bnjax.nnx.PendingStat)  # back to an update per call
  nnx.jit(lambda layer, x: layer(x))(layer, x[0])
  assert not np.allclose(layer.mean[...], want_mean)


@pytest.mark.usefixtures("standard_promotion")
def test_haiku_moving_averages_move_once():
  import haiku as hk

  x, _, _, _ = problem()
  model = hk.transform_with_state(
    lambda x: bnjax.haiku.BatchNorm(False, False, MOMENTUM, accumulate=True)(x, True)
  )
  params, initial = jax.jit(model.init)(None, x[0])
  apply = jax.jit(model.apply)
  state = initial
  for k in range(K):
    y, state = apply(params, state, None, x[k])
    want_y, _ = batch_norm(x[k], None, bnjax.init(C)[1], training=True)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    np.testing.assert_array_equal, state["batch_norm/~/mean_ema"], initial["batch_norm/~/mean_ema"]
  )
  state = jax.jit(bnjax.haiku.apply_pending)(state)
  # One update of Haiku's zero-debiased averages: counter 1, the average is the whole
  # batch's statistic itself.
  zero = bnjax.BatchNormState(np.zeros(C), np.zeros(C))
  want = [w / (1 - MOMENTUM) for w in one_update(zero, x)]
  for name, value in zip(("mean_ema", "var_ema"), want, strict=True):
    entry = state[f"batch_norm/~/{name}"]
    assert int(entry["counter"]) == 1
    np.testing.assert_allclose(entry["average"].ravel(), value, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state["batch_norm/~/pending_moments"]["count"], 0)


def test_equinox_two_optimizer_steps_of_debiased_statistics():
  import equinox as eqx

  x, _, _, _ = problem()
  layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    C, "batch", mode="batch", momentum=MOMENTUM, accumulate=True
  )
  train = jax.jit(jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
  apply = jax.jit(lambda state: bnjax.equinox.apply_pending(layer, state))
  running = bnjax.BatchNormState(np.zeros(C), np.ones(C))
  for step, batch in enumerate((x, x[::-1] * 2 + 1), start=1):
    before = state.get(layer.batch_state_index)
    for k in range(K):
      _, state = train(jnp.moveaxis(batch[k], -1, 1), state)  # examples [C, 2]
    jax.tree.map(np.testing.assert_array_equal, state.get(layer.batch_state_index), before)
    state = apply(state)
    # Equinox's "batch" mode keeps the debiased average: at step s, momentum
    # m (1 - m^(s-1)) / (1 - m^s), so 0 at step 1.
    momentum = MOMENTUM * (1 - MOMENTUM ** (step - 1)) / (1 - MOMENTUM**step)
    running = one_update(running, batch, momentum=momentum)
    assert int(state.get(layer.batch_counter)) == step
    for got, want in zip(state.get(layer.batch_state_index), running, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="accumulate needs mode='batch'"):
    bnjax.equinox.BatchNorm(C, "batch", mode="ema", accumulate=True)
