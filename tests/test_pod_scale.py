"""Synchronized statistics at pod scale: bytes that do not grow with the number of
devices, a second exchange only where exactness needs it, 2-D meshes.

The bytes are read off compiled programs (``benchmarks.hlo``); how often an
exchange runs is counted by wrapping ``bnjax.collectives.psum`` (every exchange
goes through it) with a host callback, which runs only where its branch is taken.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from benchmarks import hlo
from bnjax import collectives
from tests import reference

C = 256


def _mesh(devices: int, names=("data",)) -> jax.sharding.Mesh:
  shape = (devices,) if len(names) == 1 else (devices // 2, 2)
  return jax.sharding.Mesh(np.array(jax.devices()[:devices]).reshape(shape), names)


def _synchronized_step(mesh, x, state, *, mask=None):
  """Training forward + backward of one synchronized layer under ``shard_map``:
  ``((dx, dparams), new_state)``."""
  params = bnjax.BatchNormParams(jnp.ones(x.shape[-1]), jnp.zeros(x.shape[-1]))

  def step(x, params, state, dy):
    def f(x, params):
      return bnjax.batch_norm(x, params, state, training=True, axis_name="data", mask=mask)

    _, vjp, new_state = jax.vjp(f, x, params, has_aux=True)
    return vjp(dy), new_state

  specs = (P("data"), P(), P(), P("data"))
  mapped = jax.shard_map(
    step, mesh=mesh, in_specs=specs, out_specs=((P("data"), P()), P()), check_vma=True
  )
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  args = (put(x, P("data")), put(params, P()), put(state, P()), put(x, P("data")))
  return jax.jit(mapped), args


@pytest.mark.parametrize("devices", [2, 8])
def test_bytes_exchanged_do_not_grow_with_the_number_of_devices(devices):
  """At 2 and 8 devices alike: on the path every call takes, [2, C] float32 sums
  forward and [2, C] backward (Flax's fast mode's bytes); in the whole program,
  the fallback's two exchanges included, twice that."""
  mesh = _mesh(devices)
  x = jnp.zeros((devices * 2, 3, C))
  step, args = _synchronized_step(mesh, x, bnjax.init(C)[1])
  text = step.lower(*args).compile().as_text()
  assert hlo.count_collectives(text, outside_branches=True) == {"all-reduce": 2}
  assert hlo.collective_bytes(text, outside_branches=True) == 2 * (2 * C * 4)
  assert hlo.collective_bytes(text) == 4 * (2 * C * 4)


def test_masked_and_grouped_exchanges_are_per_feature_too():
  """With a mask the valid counts join the sums ([3, C]); unequal groups under
  pmap change nothing in the bytes."""
  x = jnp.zeros((8, 4, C))
  mask = jnp.ones((8, 4, 1), bool)
  params, state = bnjax.init(C)
  for groups in (None, [[0, 1, 2], [3, 4, 5, 6, 7]]):
    f = jax.pmap(
      lambda x, m, g=groups: bnjax.batch_norm(
        x, params, state, training=True, axis_name="i", axis_index_groups=g, mask=m
      ),
      axis_name="i",
    )
    text = f.lower(x, mask).compile().as_text()
    assert hlo.count_collectives(text, outside_branches=True) == {"all-reduce": 1}
    assert hlo.collective_bytes(text, outside_branches=True) == 3 * C * 4


@pytest.fixture
def exchanges(monkeypatch):
  """How many times each device ran an exchange (``collectives.psum``), per call."""
  calls = []
  psum = collectives.psum

  def counted(x, axis_name, axis_index_groups=None):
    jax.debug.callback(lambda: calls.append(1))
    return psum(x, axis_name, axis_index_groups)

  monkeypatch.setattr(collectives, "psum", counted)
  return calls


REPLICATED = P()


def _forward(mesh, x, state, *, spec_state=REPLICATED, mask=None):
  """``(y, new_state)`` of a synchronized layer under ``shard_map``, every array
  placed as its spec says (``mask``: None or x's rank, split like ``x``)."""

  def f(x, state, mask):
    return bnjax.batch_norm(
      x, None, state, training=True, axis_name="data", momentum=0.0, mask=mask
    )

  specs = (P("data"), spec_state, None if mask is None else P("data"))
  mapped = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(P("data"), spec_state))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  args = [put(x, P("data")), jax.tree.map(lambda s: put(s, spec_state), state)]
  return jax.jit(mapped)(*args, None if mask is None else put(mask, P("data")))


def _check_exact(x, new_state, rtol_var=3e-6):
  """``momentum=0``: the new state is the batch's mean and biased variance."""
  mean, var = reference.batch_mean_var(x, (0, 1))
  np.testing.assert_allclose(new_state.mean, mean.ravel(), rtol=1e-7, atol=1e-6)
  np.testing.assert_allclose(new_state.var, var.ravel(), rtol=rtol_var)


def _data(mean, std=1.0, shape=(16, 5, C), dtype=jnp.float32):
  z = np.random.default_rng(0).standard_normal(shape)
  return jnp.asarray(mean + std * z, dtype)


@pytest.mark.parametrize(
  "data_mean, running_mean, passes",
  [
    (0.5, 0.0, 1),  # near zero: one exchange
    (1e4, 0.0, 2),  # far from the shift: the fallback's pass around the first mean
    (1e4, 1e4 - 0.7, 1),  # the running mean as the shift: one exchange
    (3.0, 1e12, 3),  # a wild running mean: its first mean is off by 1e5, so 3 passes
  ],
)
def test_a_second_exchange_runs_only_where_needed_and_is_exact(
  exchanges, data_mean, running_mean, passes
):
  mesh = _mesh(8)
  x = _data(data_mean)
  state = bnjax.BatchNormState(jnp.full(C, running_mean), jnp.ones(C))
  _, new_state = _forward(mesh, x, state)
  jax.effects_barrier()
  assert len(exchanges) == 8 * passes  # per device
  _check_exact(x, new_state)


def test_one_feature_far_out_sends_the_layer_through_the_fallback(exchanges):
  x = np.array(_data(0.0))
  x[..., 7] += 5e3
  x = jnp.asarray(x)
  _, new_state = _forward(_mesh(8), x, bnjax.init(C)[1])
  jax.effects_barrier()
  assert len(exchanges) == 8 * 2
  _check_exact(x, new_state)


def test_per_device_states_that_differ_are_not_used_as_the_shift(exchanges):
  """A state that varies along the synchronized axis (here each device's own running
  mean, up to 1e4 apart) proves nothing about agreement: the sums go around zero,
  and the statistics are exact and the same on every device."""
  mesh = _mesh(8)
  x = _data(1e4)
  means = 1e4 + 1e4 * np.random.default_rng(1).standard_normal(8 * C)
  state = bnjax.BatchNormState(jnp.asarray(means, jnp.float32), jnp.ones(8 * C))
  _, new_state = _forward(mesh, x, state, spec_state=P("data"))  # [C] on each device
  jax.effects_barrier()
  assert len(exchanges) == 8 * 2  # around zero, then around the first mean
  for device in range(8):
    _check_exact(x, jax.tree.map(lambda s, d=device: s[d * C : (d + 1) * C], new_state))


def test_pmap_never_uses_the_running_mean_as_the_shift(exchanges):
  """pmap's types cannot prove that every device holds the same state, so a
  running mean equal to the data's mean still sums around zero there."""
  x = _data(1e4)
  state = bnjax.BatchNormState(jnp.full(C, 1e4), jnp.ones(C))
  f = jax.pmap(
    lambda x: bnjax.batch_norm(x, None, state, training=True, axis_name="i", momentum=0.0)[1],
    axis_name="i",
  )
  new_state = f(x.reshape((8, 2) + x.shape[1:]))
  jax.effects_barrier()
  assert len(exchanges) == 8 * 2
  _check_exact(x, jax.tree.map(lambda s: s[0], new_state))


def test_masked_uneven_counts_through_the_fallback():
  rng = np.random.default_rng(2)
  x = _data(3e3, std=2.0)
  mask = rng.random((16, 5, 1)) < np.linspace(0.1, 0.9, 16)[:, None, None]
  _, new_state = _forward(_mesh(8), x, bnjax.init(C)[1], mask=jnp.asarray(mask))
  values = np.asarray(x, np.float64)[np.broadcast_to(mask, x.shape)].reshape(-1, C)
  np.testing.assert_allclose(new_state.mean, values.mean(0), rtol=1e-7)
  np.testing.assert_allclose(new_state.var, values.var(0), rtol=3e-6)


def test_values_near_the_top_of_float32_through_the_fallback():
  x = _data(3e19, std=1e18)  # squares overflow float32: scaled in the second pass
  _, new_state = _forward(_mesh(8), x, bnjax.init(C)[1])
  _check_exact(x, new_state)


# ---- 2-D meshes: batch over "data", features over "model" ----------------------------


def _two_d(x, mean_offset=0.0):
  mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
  params, state = bnjax.init(x.shape[-1])
  state = state._replace(mean=state.mean + mean_offset)
  return mesh, params, state


def _features_reference(x):
  mean, var = reference.batch_mean_var(x, (0, 1))
  return mean.ravel(), var.ravel()


def test_two_d_mesh_under_shard_map_reduces_over_data_only():
  x = _data(2.0)
  mesh, params, state = _two_d(x, mean_offset=1.5)

  def f(x, params, state):
    return bnjax.batch_norm(x, params, state, training=True, axis_name="data", momentum=0.0)

  feature_spec = bnjax.BatchNormState(P("model"), P("model"))
  mapped = jax.jit(
    jax.shard_map(
      f,
      mesh=mesh,
      in_specs=(
        P("data", None, "model"),
        bnjax.BatchNormParams(P("model"), P("model")),
        feature_spec,
      ),
      out_specs=(P("data", None, "model"), feature_spec),
    )
  )
  features = NamedSharding(mesh, P("model"))
  x = jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
  params, state = jax.device_put((params, state), features)
  y, new_state = mapped(x, params, state)
  mean, var = _features_reference(x)
  np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new_state.var, var, rtol=3e-6)
  want = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  text = mapped.lower(x, params, state).compile().as_text()
  assert set(hlo.count_collectives(text)) == {"all-reduce"}  # no feature gathered
  # Each all-reduce runs among the 4 devices of one "model" column: [C/2] features each.
  assert hlo.collective_bytes(text, outside_branches=True) == 2 * (C // 2) * 4


def test_two_d_mesh_batch_over_both_axes_synchronized_over_data(x64):
  """The batch split over ("data", "model"), statistics over "data" only: each
  "model" index gets the statistics of its own four devices' examples."""
  x = _data(1e3, shape=(16, 3, 8), dtype=jnp.float64)
  mesh, _, _ = _two_d(x)
  state = bnjax.BatchNormState(jnp.full(8, 999.0, jnp.float64), jnp.ones(8, jnp.float64))

  def f(x, state):
    return bnjax.batch_norm(x, None, state, training=True, axis_name="data", momentum=0.0)[1]

  stats_per_model = jax.jit(
    jax.shard_map(
      f,
      mesh=mesh,
      in_specs=(P(("data", "model")), P()),
      out_specs=P("model"),
      check_vma=True,
    )
  )
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "model"))))
  new_state = stats_per_model(x, jax.device_put(state, NamedSharding(mesh, P())))
  new_state = jax.tree.map(np.asarray, new_state)
  blocks = np.asarray(x).reshape(4, 2, 2, 3, 8)  # [data, model, examples, 3, C]
  for model in range(2):
    values = blocks[:, model].reshape(-1, 8)
    features = slice(model * 8, (model + 1) * 8)
    np.testing.assert_allclose(new_state.mean[features], values.mean(0), rtol=1e-13)
    np.testing.assert_allclose(new_state.var[features], values.var(0), rtol=1e-10)


def test_two_d_mesh_under_jit_with_named_sharding_never_gathers_features():
  x = _data(2.0)
  mesh, params, state = _two_d(x)
  sharded = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data", None, "model")))
  features = NamedSharding(mesh, P("model"))
  x = sharded(x)
  params, state = jax.device_put((params, state), features)

  @jax.jit
  def step(x, params, state):
    def f(x, params):
      return bnjax.batch_norm(x, params, state, training=True, momentum=0.0)

    y, vjp, new_state = jax.vjp(f, x, params, has_aux=True)
    return vjp(jnp.ones_like(y)), new_state

  (_, _), new_state = step(x, params, state)
  mean, var = _features_reference(np.asarray(x))
  np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new_state.var, var, rtol=3e-6)
  text = step.lower(x, params, state).compile().as_text()
  assert "all-gather" not in hlo.count_collectives(text)
