"""Synchronized batch norm on 8 simulated devices: ``pmap``, ``shard_map`` and
``jit`` with a sharded batch all match the full batch on one device (outputs, new
state, input and parameter gradients), with one collective per direction."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from benchmarks.hlo import count_collectives, total_collectives
from tests import reference

DEVICES = 8
SHAPE = (DEVICES * 4, 5, 3)  # global batch of 32, 5 positions, 3 features
AXES = (0, 1)


def make_problem(offset=1.0, seed=0):
  """x, w (the loss is sum(w * y)), params and init's state; NumPy draws (jax.random
  compiles a program per shape)."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  x = f32(1.5 * rng.standard_normal(SHAPE) + offset)
  w = f32(rng.standard_normal(SHAPE))
  params = bnjax.BatchNormParams(
    scale=f32(1.0 + 0.2 * rng.standard_normal(3)), bias=f32(0.1 * rng.standard_normal(3))
  )
  _, state = bnjax.init(3)
  return x, w, params, state


def reference_step(x, w, params, state, momentum=0.8):
  """Float64 (dx, (dscale, dbias)), (y, (mean, var)) of a batch: Algorithm 1 and
  the paper's Section 3 backward (tests/reference.py)."""
  gamma, beta = (np.asarray(p, np.float64)[None, None] for p in params)
  y, mu, var = reference.forward(x, gamma, beta, 1e-5, AXES)
  dx, dgamma, dbeta = reference.backward(x, gamma, w, 1e-5, AXES)
  new_state = tuple(
    momentum * np.asarray(s) + (1 - momentum) * b.ravel()
    for s, b in zip(state, (mu, var), strict=True)
  )
  return (dx, (dgamma, dbeta)), (y, new_state)


def loss_and_state(x, w, params, state, mask=None, momentum=0.8, **kwargs):
  y, new_state = bnjax.batch_norm(
    x, params, state, training=True, momentum=momentum, mask=mask, **kwargs
  )
  return jnp.sum(w * y), (y, new_state)


# Gradients of sum_i loss_i w.r.t. x and params, with the statistics of the whole batch.
grad_full_batch = jax.jit(jax.grad(loss_and_state, argnums=(0, 2), has_aux=True))


def per_device(a):
  return a.reshape((DEVICES, -1) + a.shape[1:])


def assert_matches_full_batch(x, w, params, state, dx, dparams, y, new_state, mask=None):
  (want_dx, want_dparams), (want_y, want_state) = grad_full_batch(x, w, params, state, mask)
  np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx.reshape(x.shape), want_dx, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(dparams, want_dparams, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(new_state, want_state, rtol=1e-5, atol=1e-6)


def pmapped_step(**kwargs):
  grad = jax.grad(functools.partial(loss_and_state, **kwargs), argnums=(0, 2), has_aux=True)
  return jax.pmap(grad, axis_name="batch", in_axes=(0, 0, None, None, 0))


# One object, so that the tests that run it and the one that reads its compiled
# program share one compilation.
synchronized_step = pmapped_step(axis_name="batch")


def test_pmap_matches_full_batch():
  x, w, params, state = make_problem()
  (dx, dparams), (y, new_state) = synchronized_step(
    per_device(x), per_device(w), params, state, None
  )
  # pmap gives each device the gradient of its own loss w.r.t. the parameters.
  dparams = jax.tree.map(lambda g: g.sum(0), dparams)
  for d in range(1, DEVICES):  # every device holds the same new state
    chex.assert_trees_all_equal(tuple(s[d] for s in new_state), tuple(s[0] for s in new_state))
  assert_matches_full_batch(
    x, w, params, state, dx, dparams, y, jax.tree.map(lambda s: s[0], new_state)
  )


def test_statistics_exact_across_devices_with_large_offset():
  x, w, params, state = make_problem(offset=1e4)
  _, (_, new_state) = pmapped_step(axis_name="batch", momentum=0.0)(
    per_device(x), per_device(w), params, state, None
  )
  _, var = reference.batch_mean_var(x, AXES)
  rel = np.abs(np.asarray(new_state.var[0], np.float64) / var.squeeze() - 1)
  assert rel.max() <= 1e-5, rel.max()


def test_uneven_valid_counts_per_device_with_nan():
  x, w, params, state = make_problem()
  # Device d keeps d of its 4 examples (device 0 none at all); the rest is NaN.
  keep = (np.arange(SHAPE[0]) % 4) < (np.arange(SHAPE[0]) // 4)
  mask = np.broadcast_to(keep[:, None, None], (SHAPE[0], SHAPE[1], 1))
  x = jnp.asarray(np.where(mask, x, np.nan))
  w = jnp.asarray(np.where(mask, w, 0.0), jnp.float32)
  mask = jnp.asarray(mask)
  (dx, dparams), (y, new_state) = synchronized_step(
    per_device(x), per_device(w), params, state, per_device(mask)
  )
  dparams = jax.tree.map(lambda g: g.sum(0), dparams)
  chex.assert_tree_all_finite((dx, dparams))
  valid = np.broadcast_to(np.asarray(mask), SHAPE)
  gamma, beta = (np.asarray(p, np.float64)[None, None] for p in params)
  want_y, mu, var = reference.forward(x, gamma, beta, 1e-5, AXES, mask=valid)
  for device in range(DEVICES):  # device 0, with no valid example, too
    np.testing.assert_allclose(new_state.mean[device], 0.2 * mu.squeeze(), rtol=1e-5)
    np.testing.assert_allclose(new_state.var[device], 0.8 + 0.2 * var.squeeze(), rtol=1e-5)
  want_dx, want_dgamma, want_dbeta = reference.backward(x, gamma, w, 1e-5, AXES, mask=valid)
  np.testing.assert_allclose(
    np.asarray(y).reshape(SHAPE)[valid], want_y[valid], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(dx.reshape(SHAPE), want_dx, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(tuple(dparams), (want_dgamma, want_dbeta), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]])
def test_axis_index_groups_synchronize_within_each_group(groups):
  x, w, params, state = make_problem()
  (dx, dparams), (y, new_state) = pmapped_step(axis_name="batch", axis_index_groups=groups)(
    per_device(x), per_device(w), params, state, None
  )
  assert_groups_match_their_batches(groups, x, w, params, state, dx, dparams, y, new_state)


def assert_groups_match_their_batches(groups, x, w, params, state, dx, dparams, y, new_state):
  """Each group's devices hold Algorithm 1 on the group's examples (float64
  reference), and the group's share of the parameters' gradient."""
  xs, ws = per_device(np.asarray(x)), per_device(np.asarray(w))
  dx, y, dparams = np.asarray(dx), np.asarray(y), tuple(np.asarray(a) for a in dparams)
  for group in groups:
    members = np.array(group)
    group_x = xs[members].reshape((-1,) + SHAPE[1:])
    (want_dx, want_dparams), (want_y, want_state) = reference_step(
      group_x, ws[members].reshape((-1,) + SHAPE[1:]), params, state
    )
    np.testing.assert_allclose(y[members].reshape(group_x.shape), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx[members].reshape(group_x.shape), want_dx, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(
      tuple(a[members].sum(0) for a in dparams), want_dparams, rtol=1e-4, atol=1e-4
    )
    for d in group:
      np.testing.assert_allclose(new_state.mean[d], want_state[0], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(new_state.var[d], want_state[1], rtol=1e-5)


def _mesh():
  return jax.make_mesh((DEVICES,), ("batch",))


def sharded_problem():
  x, w, params, state = make_problem()
  mesh = _mesh()
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  return (
    (x, w, params, state),
    (
      jax.device_put(x, batch),
      jax.device_put(w, batch),
      jax.device_put(params, replicated),
      jax.device_put(state, replicated),
    ),
    mesh,
  )


@functools.cache  # one compilation for the tests that run it and the one that reads it
def shard_map_step(mesh):
  grad = jax.grad(
    functools.partial(loss_and_state, axis_name="batch"), argnums=(0, 2), has_aux=True
  )
  return jax.jit(
    jax.shard_map(
      lambda x, w, p, s: grad(x, w, p, s),
      mesh=mesh,
      in_specs=(P("batch"), P("batch"), P(), P()),
      out_specs=((P("batch"), P()), (P("batch"), P())),
    )
  )


def test_shard_map_matches_full_batch():
  (x, w, params, state), sharded, mesh = sharded_problem()
  (dx, dparams), (y, new_state) = shard_map_step(mesh)(*sharded)
  # Replicated parameters: shard_map sums their gradient over devices itself.
  assert_matches_full_batch(x, w, params, state, dx, dparams, y, new_state)


def test_jit_with_sharded_batch_gives_global_statistics():
  (x, w, params, state), sharded, _ = sharded_problem()
  (dx, dparams), (y, new_state) = grad_full_batch(*sharded, None)
  assert dx.sharding.spec[0] == "batch"  # the gradient stays sharded like x
  assert_matches_full_batch(x, w, params, state, dx, dparams, y, new_state)


def test_one_collective_forward_and_one_backward():
  x, w, params, state = make_problem()
  xs, ws = per_device(x), per_device(w)

  def forward(x, params, state):
    return bnjax.batch_norm(x, params, state, training=True, axis_name="batch")

  pmap_forward = jax.pmap(forward, axis_name="batch", in_axes=(0, None, None))
  forward_text = pmap_forward.lower(xs, params, state).compile().as_text()
  step_text = synchronized_step.lower(xs, ws, params, state, None).compile().as_text()
  # On every call; the forward's fallback exchanges (a second pass, and a third for
  # a shift far off) sit in lax.cond branches that run only where needed.
  every_call = functools.partial(count_collectives, outside_branches=True)
  assert every_call(forward_text) == {"all-reduce": 1}
  assert every_call(step_text) == {"all-reduce": 2}
  assert count_collectives(forward_text) == {"all-reduce": 3}

  (_, _, _, _), sharded, mesh = sharded_problem()
  shard_map_text = shard_map_step(mesh).lower(*sharded).compile().as_text()
  assert every_call(shard_map_text) == {"all-reduce": 2}


def test_flax_exact_mode_needs_more_collectives():
  """The counter sees what the previous test asserts the absence of."""
  x, w, _, _ = make_problem()
  bn = nn.BatchNorm(use_running_average=False, axis_name="batch", use_fast_variance=False)
  params, state = bnjax.init(3)
  variables = {"params": params._asdict(), "batch_stats": state._asdict()}  # Flax's init, unchanged

  def loss(x, w, variables):
    y, _ = bn.apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(w * y)

  step = jax.pmap(jax.grad(loss), axis_name="batch", in_axes=(0, 0, None))
  text = step.lower(per_device(x), per_device(w), variables).compile().as_text()
  assert total_collectives(text) > 2


def test_shard_map_over_two_mesh_axes():
  """A batch split over a 2-D mesh (e.g. hosts x chips), synchronized over both."""
  x, w, params, state = make_problem()
  mesh = jax.make_mesh((2, 4), ("hosts", "chips"))
  batch, replicated = NamedSharding(mesh, P(("hosts", "chips"))), NamedSharding(mesh, P())
  grad = jax.grad(
    functools.partial(loss_and_state, axis_name=("hosts", "chips")), argnums=(0, 2), has_aux=True
  )
  step = jax.jit(
    jax.shard_map(
      lambda x, w, p, s: grad(x, w, p, s),
      mesh=mesh,
      in_specs=(P(("hosts", "chips")), P(("hosts", "chips")), P(), P()),
      out_specs=((P(("hosts", "chips")), P()), (P(("hosts", "chips")), P())),
    )
  )
  (dx, dparams), (y, new_state) = step(
    jax.device_put(x, batch),
    jax.device_put(w, batch),
    jax.device_put(params, replicated),
    jax.device_put(state, replicated),
  )
  assert_matches_full_batch(x, w, params, state, dx, dparams, y, new_state)


# The new state of a masked batch synchronized over the devices (one compile for all cases).
masked_state_across_devices = jax.pmap(
  lambda x, mask: bnjax.batch_norm(
    x, None, bnjax.init(1)[1], training=True, mask=mask, axis_name="i", momentum=0.0
  )[1],
  axis_name="i",
)


@pytest.mark.parametrize("empty_device", [0, 3])
def test_empty_device_keeps_large_offset_statistics_exact(empty_device):
  """The exchange's reference is the fullest device, not device 0."""
  x = np.random.default_rng(7).standard_normal((DEVICES * 64, 1)).astype(np.float32) + np.float32(
    1e4
  )
  keep = np.arange(DEVICES * 64) // 64 != empty_device
  new_state = masked_state_across_devices(x.reshape(DEVICES, 64, 1), keep.reshape(DEVICES, 64, 1))
  want = x.astype(np.float64)[keep].var()
  for device in range(DEVICES):
    assert abs(float(new_state.var[device, 0]) / want - 1) <= 1e-5
  np.testing.assert_allclose(new_state.mean[:, 0], x.astype(np.float64)[keep].mean(), rtol=1e-7)


# Issue 8: groups of unequal sizes are exact; bad groups are refused clearly.

UNEQUAL_GROUPS = [
  [[0, 1, 2], [3, 4, 5, 6, 7]],
  [[5], [0, 1, 2, 3, 4, 6, 7]],
  [[0, 3], [1, 4, 6], [2, 5, 7]],
]


@pytest.mark.parametrize("groups", UNEQUAL_GROUPS)
def test_unequal_axis_index_groups_are_exact(groups):
  x, w, params, state = make_problem(offset=30.0)
  (dx, dparams), (y, new_state) = pmapped_step(axis_name="batch", axis_index_groups=groups)(
    per_device(x), per_device(w), params, state, None
  )
  assert_groups_match_their_batches(groups, x, w, params, state, dx, dparams, y, new_state)


@pytest.mark.parametrize(
  "groups, match",
  [
    ([[0, 1], [2, 3]], r"in no group: \[4, 5, 6, 7\]"),
    ([[0, 1, 2, 3], [4, 5, 6, 7, 8]], r"out of range: \[8\]"),
    ([[0, 1, 2, 3], [3, 4, 5, 6, 7]], r"in more than one group: \[3\]"),
    ([[0, 1, 2, 3, 4, 5, 6, 7], []], "a group is empty"),
  ],
)
def test_bad_axis_index_groups_are_refused(groups, match):
  x, w, params, state = make_problem()
  with pytest.raises(ValueError, match=match):
    pmapped_step(axis_name="batch", axis_index_groups=groups)(
      per_device(x), per_device(w), params, state, None
    )


def test_axis_index_groups_under_shard_map_name_the_alternative():
  (_, _, _, state), (x, *_), mesh = sharded_problem()
  f = jax.jit(
    jax.shard_map(
      lambda x: bnjax.batch_norm(
        x,
        None,
        state,
        training=True,
        axis_name="batch",
        axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]],
      )[0],
      mesh=mesh,
      in_specs=P("batch"),
      out_specs=P("batch"),
    )
  )
  with pytest.raises(NotImplementedError, match="give the mesh a second axis"):
    f(x)


def test_groups_under_jit_are_virtual_batches_of_their_devices():
  """Under jit with a sharded batch, groups of k devices are ghost batches of k
  devices' examples, as bnjax.stats documents."""
  (x, w, params, state), (sx, sw, sparams, sstate), _ = sharded_problem()
  per_device_examples = SHAPE[0] // DEVICES
  step = jax.jit(
    jax.grad(
      functools.partial(loss_and_state, virtual_batch_size=2 * per_device_examples),
      argnums=(0, 2),
      has_aux=True,
    )
  )
  (dx, _), (y, _) = step(sx, sw, sparams, sstate)
  dx, y = np.asarray(dx), np.asarray(y)
  for first in range(0, DEVICES, 2):
    rows = slice(first * per_device_examples, (first + 2) * per_device_examples)
    (want_dx, _), (want_y, _) = reference_step(x[rows], w[rows], params, state)
    np.testing.assert_allclose(y[rows], want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx[rows], want_dx, rtol=1e-4, atol=1e-5)


_DEVICE_COUNT_SCRIPT = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))  # before any other jax use
import jax.numpy as jnp, numpy as np, bnjax
assert jax.device_count() == int(sys.argv[1]), jax.devices()
x = jax.random.normal(jax.random.key(0), (128, 4)) * 3.0 + 1e3
params, state = bnjax.init(4)
f = lambda x: bnjax.batch_norm(x, params, state, training=True, axis_name="i", momentum=0.0)
y, s = jax.pmap(f, axis_name="i")(x.reshape(2, 64, 4))
print(np.asarray(y).tobytes().hex(), np.asarray(s.var).tobytes().hex(),
      np.asarray(s.mean).tobytes().hex())
"""


@pytest.mark.slow
def test_results_do_not_depend_on_the_process_device_count():
  import subprocess
  import sys

  outputs = [
    subprocess.run(
      [sys.executable, "-c", _DEVICE_COUNT_SCRIPT, str(n)],
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
    ).stdout
    for n in (2, 8)
  ]
  assert outputs[0] == outputs[1] and outputs[0].strip()
