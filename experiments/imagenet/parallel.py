"""How a run spreads over devices and hosts: ``jit`` over a mesh, or ``pmap``.

One mesh axis, ``"batch"``, over every device of every host in ``jax.devices()``
order (by host, then device): the global batch is laid out contiguously over it,
host 0's rows first. Parameters, optimizer state and BN statistics are replicated.

* ``jit``: the batch is one global ``jax.Array`` sharded with ``NamedSharding``
  (built from each host's rows by ``jax.make_array_from_process_local_data``);
  BN has no ``axis_name``: its statistics are those of the global array.
* ``pmap``: each host's rows are split ``[local_devices, per_device, ...]``; BN
  synchronizes over the named axis ``"batch"``.

Statistics over groups of devices (``bn_group_size`` = k > 0): under ``pmap``,
``axis_index_groups`` of k consecutive devices; under ``jit``, the core's
``virtual_batch_size`` of k times the per-device batch, whose groups of
consecutive rows are exactly the rows of k consecutive devices (``bnjax.batch_norm``
documents it). Either way the running statistics move by the mean of all groups'
statistics (under ``pmap`` the per-group ones are averaged across devices after
each step), so both modes keep the same state.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax import linen as bn

AXIS = "batch"
PARALLELISMS = ("jit", "pmap")


class Layout(NamedTuple):
  """The devices of a run and how data and state are placed on them."""

  parallelism: str  # "jit" or "pmap"
  mesh: Mesh  # all devices of all hosts, axis "batch"
  local_mesh: Mesh  # this host's devices, axis "batch" (pmap's arrays)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def num_local_devices(self) -> int:
    return self.local_mesh.size


def make_layout(parallelism: str) -> Layout:
  return Layout(
    parallelism=parallelism,
    mesh=Mesh(np.array(jax.devices()), (AXIS,)),
    local_mesh=Mesh(np.array(jax.local_devices()), (AXIS,)),
  )


def replicated(layout: Layout) -> NamedSharding:
  return NamedSharding(layout.mesh, P())


def batch_sharded(layout: Layout) -> NamedSharding:
  return NamedSharding(layout.mesh, P(AXIS))


class BatchNormSetup(NamedTuple):
  """How BN layers compute their statistics in training, for ``models.create_model``."""

  norm: Any  # the BatchNorm constructor with its device options bound
  axis_name: str | None  # pmap's axis, for gradients and losses too
  average_statistics: bool  # pmap: average the running statistics across devices after each step


def batch_norm_setup(config, layout: Layout, *, norm_class=bn.BatchNorm) -> BatchNormSetup:
  """The BN constructor for ``config``'s statistics groups on ``layout``.

  ``config.bn_virtual_batch_size`` (v > 0) takes statistics over each v
  consecutive examples; else ``config.bn_group_size`` (k > 0) over the examples of
  k consecutive devices; else over the whole global batch. ``ConfigError``
  checks (``train.validate_config``) have ensured these divide evenly.
  """
  norm = functools.partial(norm_class, momentum=config.bn_momentum, epsilon=config.bn_epsilon)
  per_device = config.batch_size // layout.num_devices
  virtual, group = config.bn_virtual_batch_size, config.bn_group_size
  if layout.parallelism == "jit":
    size = virtual or group * per_device or None
    if size is not None and size < config.batch_size:
      norm = functools.partial(norm, virtual_batch_size=size)
    return BatchNormSetup(norm, None, False)
  if (
    virtual and virtual <= per_device
  ):  # groups within each device; running statistics averaged over all
    return BatchNormSetup(
      functools.partial(norm, axis_name=AXIS, virtual_batch_size=virtual), AXIS, False
    )
  group = virtual // per_device if virtual else group
  if group and group < layout.num_devices:
    groups = [list(range(g, g + group)) for g in range(0, layout.num_devices, group)]
    return BatchNormSetup(
      functools.partial(norm, axis_name=AXIS, axis_index_groups=groups), AXIS, True
    )
  return BatchNormSetup(functools.partial(norm, axis_name=AXIS), AXIS, False)


# ---- placing data and state ----------------------------------------------------------


def to_device_batch(layout: Layout, batch: dict) -> dict:
  """A host-local batch (NumPy ``[B, ...]`` leaves, this host's rows) on the devices:
  ``jit``: global arrays ``[B * hosts, ...]`` sharded over the mesh; ``pmap``:
  ``[local_devices, B / local_devices, ...]`` sharded over this host's devices."""
  if layout.parallelism == "jit":
    sharding = batch_sharded(layout)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  sharding = NamedSharding(layout.local_mesh, P(AXIS))
  n = layout.num_local_devices
  return jax.tree.map(
    lambda x: jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), sharding), batch
  )


def prefetch(iterator, size: int = 2):
  """Keeps ``size`` items of ``iterator`` ahead (their transfers to the devices
  run while the current step computes)."""
  queue = []
  for item in iterator:
    queue.append(item)
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def host_copy(tree):
  """A replicated global pytree as NumPy arrays (each host reads its own copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def to_global_replicated(layout: Layout, tree):
  """Host values (the same on every host) as global arrays replicated on the mesh."""
  sharding = replicated(layout)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )


def to_pmap_replicated(layout: Layout, tree):
  """Host values as ``pmap`` arguments: one copy per local device, ``[n, ...]``."""
  sharding = NamedSharding(layout.local_mesh, P(AXIS))
  n = layout.num_local_devices
  return jax.tree.map(
    lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree
  )


def from_pmap_replicated(layout: Layout, tree):
  """``pmap``'s replicated outputs as global arrays replicated on the mesh."""
  return to_global_replicated(
    layout, jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
  )
