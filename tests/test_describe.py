"""bnjax.describe: what each layer's statistics cover, checked against what runs.

The bytes against XLA's compiled program (the all-reduces it holds, attributed to
layers by the op_name metadata JAX gives them, forward and backward apart); the
device and example counts against the mapping itself (devices in the mesh, rows
of the batch); "replicated" and "per device" against the running statistics a run
actually returns on each device.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import linen as bn

_ALL_REDUCE = re.compile(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(.*op_name=\"([^\"]*)\"")
_TYPE = re.compile(r"(f16|bf16|f32|f64|s32|u32|pred)\[([\d,]*)\]")
_ITEMSIZE = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_BRANCHES = re.compile(
  r"branch_computations=\{([^}]*)\}|true_computation=%(\S+), false_computation=%(\S+)"
)
_CALLS = re.compile(r"(?:body|condition|calls)=%([\w.\-]+)")


class _Computation:
  """An HLO computation: its own all-reduces, the computations it calls, and its
  conditionals' branch computations."""

  def __init__(self):
    self.all_reduces: list[tuple[str, int]] = []  # (op_name, bytes)
    self.calls: list[str] = []
    self.conditionals: list[list[str]] = []


def _read_hlo(text: str) -> tuple[dict[str, _Computation], str]:
  computations, current, entry = {}, None, ""
  for line in text.splitlines():
    if header := _COMPUTATION.match(line):
      current = computations.setdefault(header.group(1), _Computation())
      entry = header.group(1) if line.startswith("ENTRY") else entry
    elif current is None:
      continue
    elif match := _ALL_REDUCE.search(line):
      size = sum(
        _ITEMSIZE[kind] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for kind, dims in _TYPE.findall(match.group(1))
      )
      current.all_reduces.append((match.group(2), size))
    elif branches := _BRANCHES.search(line):
      names = branches.group(1).split(",") if branches.group(1) else branches.groups()[1:]
      current.conditionals.append([n.strip().lstrip("%") for n in names])
    else:
      current.calls.extend(_CALLS.findall(line))
  return computations, entry


def _hlo_cost(computations, name: str, layer: str, backward: bool) -> tuple[int, int]:
  """``(always, conditional)`` bytes of the all-reduces that computation ``name``
  runs (calls included): each conditional always costs its cheapest branch, the
  rest of its costliest conditionally, as ``bnjax.describe`` counts."""
  computation = computations.get(name)
  if computation is None:
    return 0, 0
  always = sum(
    size
    for op_name, size in computation.all_reduces
    if layer in op_name and ("transpose(" in op_name) == backward
  )
  conditional = 0
  for called in computation.calls:
    a, c = _hlo_cost(computations, called, layer, backward)
    always, conditional = always + a, conditional + c
  for branches in computation.conditionals:
    costs = [_hlo_cost(computations, b, layer, backward) for b in branches]
    cheapest = min(a for a, _ in costs)
    always += cheapest
    conditional += max(a + c for a, c in costs) - cheapest
  return always, conditional


def compiled_all_reduce_bytes(compiled_text: str, layer: str = "") -> dict[str, int]:
  """Bytes of the compiled program's all-reduces whose op_name holds ``layer``:
  ``{"forward", "backward", "conditional"}``, conditionals read from the program's
  structure (XLA moves an all-reduce both branches share out of a conditional,
  and inlines a conditional it can decide)."""
  computations, entry = _read_hlo(compiled_text)
  forward, forward_extra = _hlo_cost(computations, entry, layer, backward=False)
  backward, backward_extra = _hlo_cost(computations, entry, layer, backward=True)
  return {"forward": forward, "backward": backward, "conditional": forward_extra + backward_extra}


def reported_bytes(row) -> dict[str, int]:
  return {
    "forward": row.forward_bytes,
    "backward": row.backward_bytes,
    "conditional": row.conditional_bytes,
  }


class Net(nn.Module):
  """Dense, BN, Dense, BN: the first BN gets a gradient to pass on (its backward
  pass exchanges too)."""

  axis_name: str | None = None
  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(self, x):
    options = {"axis_name": self.axis_name, "virtual_batch_size": self.virtual_batch_size}
    x = nn.Dense(16)(x)
    x = bn.BatchNorm(use_running_average=False, momentum=0.9, **options)(x)
    x = nn.Dense(8)(x)
    return bn.BatchNorm(use_running_average=False, **options)(x)


def gradient_step(model):
  """The parameters' gradient and the new statistics; no collective but BN's."""

  def loss(params, stats, x):
    y, updates = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return (y**2).sum(), updates["batch_stats"]

  return jax.grad(loss, has_aux=True)


@pytest.fixture(scope="module")
def variables():
  return Net().init(jax.random.key(0), jnp.ones((8, 12)))


def batch(rows=64):
  return jax.random.normal(jax.random.key(1), (rows, 12)) * 2 + 3


def test_pmap_with_axis_name_matches_the_compiled_exchange(variables):
  step = jax.pmap(gradient_step(Net("batch")), axis_name="batch", in_axes=(None, None, 0))
  x = batch().reshape(8, 8, 12)
  report = bnjax.describe(step, variables["params"], variables["batch_stats"], x)
  assert [row.name for row in report] == ["Net/BatchNorm_0", "Net/BatchNorm_1"]
  compiled = step.lower(variables["params"], variables["batch_stats"], x).compile().as_text()
  for row in report:
    assert (row.device_axes, row.devices, row.examples) == (("batch",), 8, 64)
    assert row.input_shape == (8, row.input_shape[1]) and row.running_statistics == "replicated"
    assert reported_bytes(row) == compiled_all_reduce_bytes(compiled, row.name.split("/")[-1])
  assert report[0].backward_bytes > 0 and report[0].momentum == 0.9
  assert report[1].momentum == 0.99


def test_pmap_without_axis_name_is_per_device_and_warns_when_asked(variables):
  step = jax.pmap(gradient_step(Net()), axis_name="batch", in_axes=(None, None, 0))
  x = batch().reshape(8, 8, 12)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning unless asked
    report = bnjax.describe(step, variables["params"], variables["batch_stats"], x)
  for row in report:
    assert (row.devices, row.examples, row.forward_bytes, row.backward_bytes) == (1, 8, 0, 0)
    assert row.running_statistics == "per device (batch: 8)"
  _, stats = step(variables["params"], variables["batch_stats"], x)  # what a run gives
  means = stats["BatchNorm_0"]["mean"]
  assert not np.allclose(means[0], means[1])  # device 0's copy is not device 1's
  with pytest.warns(bnjax.StatisticsScopeWarning, match="virtual_batch_size=8"):
    bnjax.describe(step, variables["params"], variables["batch_stats"], x, warn=True)


def test_jit_with_a_sharded_batch_is_global_and_matches_the_compiled_exchange(variables):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(batch(), NamedSharding(mesh, P("data")))
  step = jax.jit(gradient_step(Net()))
  with pytest.warns(bnjax.StatisticsScopeWarning, match="global batch"):
    report = bnjax.describe(step, variables["params"], variables["batch_stats"], x, warn=True)
  compiled = step.lower(variables["params"], variables["batch_stats"], x).compile().as_text()
  for row in report:
    assert (row.device_axes, row.devices, row.examples) == (("data",), 8, 64)
    assert row.running_statistics == "replicated"
    assert reported_bytes(row) == compiled_all_reduce_bytes(compiled, row.name.split("/")[-1])
    assert row.forward_bytes > 0 and row.conditional_bytes > 0


def test_jit_ghost_batches_span_the_devices_of_one_virtual_batch():
  """Virtual batches of 16 rows, 8 on each device: each statistic spans 2 devices.
  XLA combines some of these all-reduces with others, so the program's totals are
  compared (the gradient is the input's: no parameter's all-reduce joins in)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(batch()[:, :6], NamedSharding(mesh, P("data")))
  params, state = bnjax.init(6)

  def loss(x):
    states = []
    for momentum in (0.9, 0.5):
      x, new_state = bnjax.batch_norm(
        x, params, state, training=True, momentum=momentum, virtual_batch_size=16
      )
      states.append(new_state)
    return (x**3).sum(), states

  step = jax.jit(jax.grad(loss, has_aux=True))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # per virtual batch under pmap and jit alike: no warning
    report = bnjax.describe(step, x, warn=True)
  compiled = compiled_all_reduce_bytes(step.lower(x).compile().as_text())
  for row in report:
    assert (row.devices, row.examples, row.running_statistics) == (2, 16, "replicated")
    assert row.forward_bytes > 0 and row.backward_bytes > 0
  totals = [sum(reported_bytes(row)[part] for row in report) for part in compiled]
  assert totals == list(compiled.values())


def test_shard_map_over_two_mesh_axes():
  """Synchronized over "data": replicated where the batch is split over "data"
  only, per device where it is split over "model" too."""
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  params, state = bnjax.init(6)

  def forward(x):
    return bnjax.batch_norm(x, params, state, training=True, axis_name="data")

  for spec, expected in [
    (P("data"), "replicated"),
    (P(("data", "model")), "per device (model: 2)"),
  ]:
    mapped = jax.shard_map(forward, mesh=mesh, in_specs=spec, out_specs=(spec, P(*spec)))
    x = jax.device_put(batch(32)[:, :6], NamedSharding(mesh, spec))
    (row,) = bnjax.describe(mapped, x)
    assert (row.device_axes, row.devices, row.running_statistics) == (("data",), 4, expected)
    assert row.examples == 4 * row.input_shape[0]


def test_axis_index_groups_make_statistics_per_group():
  params, state = bnjax.init(6)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  step = jax.pmap(
    lambda x: bnjax.batch_norm(
      x, params, state, training=True, axis_name="i", axis_index_groups=groups
    ),
    axis_name="i",
  )
  x = batch(32)[:, :6].reshape(8, 4, 6)
  (row,) = bnjax.describe(step, x)
  assert (row.devices, row.examples, row.running_statistics) == (4, 16, "per group of 4")
  _, states = step(x)
  np.testing.assert_allclose(states.mean[0], states.mean[3], rtol=1e-6)  # one group
  assert not np.allclose(states.mean[0], states.mean[4])  # two groups

  # Averaged after each step, as the ImageNet experiment does: replicated again.
  synced = jax.pmap(lambda x: bnjax.sync_state(step.__wrapped__(x)[1], "i"), axis_name="i")
  (row,) = bnjax.describe(synced, x)
  assert row.running_statistics == "replicated (sync_state)"
  np.testing.assert_allclose(synced(x).mean[0], synced(x).mean[4], rtol=1e-6)


def test_evaluation_and_a_traced_momentum():
  params, state = bnjax.init(3)

  def forward(x, momentum):
    y, new = bnjax.batch_norm(x, params, state, training=True, momentum=momentum)
    return bnjax.batch_norm(y, params, new, training=False)

  training, evaluation = bnjax.describe(forward, jnp.ones((4, 3)), jnp.float32(0.9))
  assert training.momentum is None and training.running_statistics == "replicated"
  assert evaluation.running_statistics == "not updated" and evaluation.forward_bytes == 0
  table = str(bnjax.describe(forward, jnp.ones((4, 3)), jnp.float32(0.9))).splitlines()
  assert "traced" in table[1] and "running statistics (evaluation)" in table[2]


def test_a_function_traced_before_is_traced_again():
  params, state = bnjax.init(3)
  step = jax.jit(lambda x: bnjax.batch_norm(x, params, state, training=True)[0])
  step(jnp.ones((4, 3)))  # JAX's caches now hold its trace
  assert len(bnjax.describe(step, jnp.ones((4, 3)))) == 1
  assert len(bnjax.describe(step, jnp.ones((4, 3)))) == 1


@pytest.mark.usefixtures("standard_promotion")  # Haiku's and Equinox's modules mix dtypes
def test_the_drop_ins_are_seen():
  import equinox as eqx
  import haiku as hk
  from flax import nnx

  import bnjax.equinox
  import bnjax.haiku
  import bnjax.nnx

  x = batch(32)[:, :6].reshape(8, 4, 6)
  layer = bnjax.nnx.BatchNorm(6, axis_name="i", rngs=nnx.Rngs(0))
  graph, nnx_state = nnx.split(layer)

  def nnx_forward(state, x):
    model = nnx.merge(graph, state)
    return model(x), nnx.state(model)

  forward = hk.transform_with_state(
    lambda x: bnjax.haiku.BatchNorm(True, True, 0.9, cross_replica_axis="i")(x, True)
  )
  hk_params, hk_state = jax.pmap(lambda x: forward.init(None, x), axis_name="i")(x)
  eqx_layer, eqx_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(6, "i", mode="batch")
  mapped = {
    "nnx": (jax.pmap(nnx_forward, axis_name="i", in_axes=(None, 0)), (nnx_state, x)),
    "haiku": (
      jax.pmap(lambda p, s, x: forward.apply(p, s, None, x), axis_name="i"),
      (hk_params, hk_state, x),
    ),
    "equinox": (  # one example per lane of a vmap inside each device
      jax.pmap(jax.vmap(eqx_layer, axis_name="i", in_axes=(0, None)), axis_name="d"),
      (x, jax.tree.map(lambda a: jnp.stack([a] * 8), eqx_state)),
    ),
  }
  core = jax.pmap(
    lambda x: bnjax.batch_norm(x, *bnjax.init(6), training=True, axis_name="i"), axis_name="i"
  )
  (reference,) = bnjax.describe(core, x)
  for name, (step, args) in mapped.items():
    (row,) = bnjax.describe(step, *args)
    if name == "equinox":  # 4 lanes on each of 8 devices; statistics per device
      assert (row.device_axes, row.devices, row.examples) == (("i",), 4, 4), name
      assert row.running_statistics == "per device (d: 8)" and row.forward_bytes == 0
    else:
      assert (row.devices, row.examples, row.running_statistics) == (8, 32, "replicated"), name
      assert row.forward_bytes == reference.forward_bytes, name


def test_the_summary_folds_layers_of_one_coverage(variables):
  step = jax.pmap(gradient_step(Net("batch")), axis_name="batch", in_axes=(None, None, 0))
  report = bnjax.describe(
    step, variables["params"], variables["batch_stats"], batch().reshape(8, 8, 12)
  )
  first, second = report
  assert report.summary().splitlines() == [
    f"1 layer: statistics over batch (8 devices, 64 examples), running statistics replicated, "
    f"momentum {m:g}; exchange {row.forward_bytes:,} B + {row.backward_bytes:,} B "
    "(forward + backward)"
    for m, row in ((0.9, first), (0.99, second))
  ]
  assert len(str(report).splitlines()) == 3  # the header and a line a layer


def test_jit_with_an_explicitly_sharded_batch_reads_the_input_type():
  """Explicit sharding: the layer's input type says how its batch is split, whatever
  the arguments' shapes."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  params, state = bnjax.init(6)
  x = jax.device_put(batch(32)[:, :6], NamedSharding(mesh, P(("data", "model"))))
  with jax.sharding.set_mesh(mesh):
    (row,) = bnjax.describe(
      jax.jit(lambda x: bnjax.batch_norm(x.reshape(32, 6), params, state, training=True)), x
    )
  assert (row.device_axes, row.devices, row.examples) == (("data", "model"), 8, 32)
  assert row.running_statistics == "replicated" and row.forward_bytes > 0
