"""Exchanging values across devices, and checking device groups.

``batch_norm`` synchronizes statistics and derivatives with ``psum``s of per-feature
sums (``bnjax.stats.synchronized_moments``), which check ``axis_index_groups``
first (``psum`` here), with errors that name the problem.

Where each way of synchronizing works:

* ``pmap``: ``axis_name``, and ``axis_index_groups`` (groups may differ in size;
  together they must hold every index along the axis exactly once).
* ``shard_map``: ``axis_name`` (one mesh axis or a tuple of them). JAX does not
  support ``axis_index_groups`` there: give the mesh two axes, e.g.
  ``("group", "device")``, and synchronize over ``"device"`` only.
* ``jit`` with the batch sharded over devices (``NamedSharding``): no
  ``axis_name``; the statistics are those of the global batch. For groups of
  ``k`` devices, each holding ``b`` contiguous examples, use
  ``virtual_batch_size=k * b`` (ghost batch norm over the global batch): each
  virtual batch is then one group's examples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def shards_along(x: jax.Array, axis: int) -> int:
  """How many devices ``axis`` of ``x`` is split over in its type (explicit
  sharding under ``jit``); 1 when unsharded or when the type does not say."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if spec is None or mesh is None or axis >= len(spec) or spec[axis] is None:
    return 1
  names = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
  return math.prod(mesh.shape[name] for name in names)


def check_axis_index_groups(axis_index_groups, axis_size: int) -> None:
  """Groups must hold each index along the axis exactly once.

  >>> check_axis_index_groups([[0, 1], [2]], 3)
  >>> check_axis_index_groups([[0, 1], [1]], 3)
  Traceback (most recent call last):
  ...
  ValueError: axis_index_groups [[0, 1], [1]] must hold each index 0..2 of the named axis
  (size 3) exactly once; in more than one group: [1]; in no group: [2]
  """
  if axis_index_groups is None:
    return
  flat = [i for group in axis_index_groups for i in group]
  problems = []
  if any(len(group) == 0 for group in axis_index_groups):
    problems.append("a group is empty")
  for what, indices in [
    ("out of range", {i for i in flat if not 0 <= i < axis_size}),
    ("in more than one group", {i for i in flat if flat.count(i) > 1}),
    ("in no group", set(range(axis_size)) - set(flat)),
  ]:
    if indices:
      problems.append(f"{what}: {sorted(indices)}")
  if problems:
    groups = [list(g) for g in axis_index_groups]
    raise ValueError(
      f"axis_index_groups {groups} must hold each index 0..{axis_size - 1} of the named axis "
      f"(size {axis_size}) exactly once; {'; '.join(problems)}"
    )


def psum(x, axis_name: Hashable, axis_index_groups=None):
  """``lax.psum`` over ``axis_name``, within each group of ``axis_index_groups``;
  the groups are checked (``check_axis_index_groups``), with a clear error where
  JAX does not support them."""
  if axis_index_groups is not None:
    check_axis_index_groups(axis_index_groups, lax.axis_size(axis_name))
  try:
    return lax.psum(x, axis_name, axis_index_groups=axis_index_groups)
  except NotImplementedError as error:
    if axis_index_groups is None:
      raise
    raise NotImplementedError(
      f"axis_index_groups {[list(g) for g in axis_index_groups]} are not supported by JAX here "
      "(shard_map does not implement them; pmap does). Under shard_map, give the mesh a second "
      "axis, e.g. jax.make_mesh((groups, devices_per_group), ('group', 'device')), and "
      "synchronize over axis_name='device'."
    ) from error


def axis_sizes(axis_name: Hashable) -> tuple[int, ...]:
  """The size of each named axis in ``axis_name`` (one name or a tuple of names).

  Ask where the axes are bound: ``bnjax._engine`` does, before its custom
  derivative. Inside that, JAX 0.10 may have lost ``vmap``'s axis sizes: the
  derivative of a ``custom_jvp`` under a named ``vmap`` is traced lazily, and when
  the ``vmap`` sits inside ``jit``, ``scan``, ``cond`` or ``checkpoint`` and is
  differentiated from outside them, the axis environment is gone (``lax.axis_size``,
  ``lax.pmean`` and a tuple's ``lax.axis_index`` raise "unbound axis name"), while
  ``psum`` of traced values and one name's ``axis_index`` still work.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return tuple(lax.axis_size(name) for name in names)


def are_device_axes(axis_name: Hashable) -> bool:
  """Whether every name in ``axis_name`` is an axis of devices (``shard_map``'s or
  ``pmap``'s), not a ``vmap``'s: ask where the axes are bound. Along a ``vmap``'s
  named axis the "devices" are rows of one array in memory: nothing is sent."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  device_axes = jax.sharding.get_abstract_mesh().manual_axes
  return all(name in device_axes for name in names)


def varying_axes(x) -> frozenset:
  """The device axes along which ``x`` may differ, as ``shard_map``'s type checks
  (``check_vma``) track them (``jax.typeof(x).manual_axis_type.varying`` in JAX
  0.10); empty where nothing tracks them (``pmap``, ``check_vma=False``, outside)."""
  axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(getattr(axis_type, "varying", ()))


def varying_alike(operands):
  """``operands`` (a pytree) with each array cast (``lax.pcast(..., to="varying")``,
  a change of type that lowers to nothing) to vary along every device axis that any
  of them varies along (``varying_axes``), as an optimization barrier's results and
  both branches of a ``lax.cond`` must; unchanged where nothing tracks the axes."""
  leaves = jax.tree.leaves(operands)
  axes = sorted(frozenset().union(*map(varying_axes, leaves)), key=str)  # one program per trace

  def cast(leaf):
    missing = tuple(a for a in axes if a not in varying_axes(leaf))
    return lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, operands)


def _index_along(axis_name, sizes: tuple[int, ...]):
  """This device's index along ``axis_name``, the first name running slowest."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  index = 0
  for name, size in zip(names, sizes, strict=True):  # one name at a time: see axis_sizes
    index = index * size + lax.axis_index(name)
  return index


def group_size(axis_name, axis_index_groups, sizes: tuple[int, ...] | None = None):
  """How many devices this device's group along ``axis_name`` holds: a Python int
  where every group has one size, else a traced ``[]`` int32 looked up by this
  device's index. ``sizes``: ``axis_sizes(axis_name)``, asked where the axes are
  bound (see there); without it, asked here. Along a tuple of names the index runs
  over the first name slowest."""
  sizes = axis_sizes(axis_name) if sizes is None else sizes
  if axis_index_groups is None:
    return math.prod(sizes)
  lengths = {len(group) for group in axis_index_groups}
  if len(lengths) == 1:
    return lengths.pop()
  index = _index_along(axis_name, sizes)
  size_of = np.zeros(sum(len(g) for g in axis_index_groups), np.int32)
  for group in axis_index_groups:
    size_of[list(group)] = len(group)
  return jnp.asarray(size_of)[index]


def position_in_group(axis_name, axis_index_groups, sizes: tuple[int, ...] | None = None):
  """This device's index within its group along ``axis_name``, and the size of
  the largest group. ``sizes``: ``axis_sizes(axis_name)``, asked where the axes are
  bound (see there); without it, asked here. Along a tuple of names the index runs
  over the first name slowest."""
  sizes = axis_sizes(axis_name) if sizes is None else sizes
  index = _index_along(axis_name, sizes)
  if axis_index_groups is None:
    return index, math.prod(sizes)
  positions = np.zeros(sum(len(g) for g in axis_index_groups), np.int32)
  for group in axis_index_groups:
    positions[list(group)] = np.arange(len(group))
  return jnp.asarray(positions)[index], max(len(g) for g in axis_index_groups)


def gather_rows(
  row: jax.Array, axis_name: Hashable, axis_index_groups=None, sizes: tuple[int, ...] | None = None
) -> jax.Array:
  """Every device's ``row`` along ``axis_name`` (within its group), on every device.

  Each device writes its ``row: [...]`` into its own row of a zero ``[G, ...]``
  array (``G`` the size of the largest group), and a ``psum`` of that gathers every
  row: a ``psum`` rather than an ``all_gather`` because its result is replicated in
  type (``shard_map`` checks that), and it takes ``axis_index_groups`` of unequal
  sizes (the rows a smaller group leaves are zeros).

  ``sizes`` are ``axis_sizes(axis_name)``, where the caller has them (see there).

  Returns:
    ``[G, ...]``, row ``i`` the ``row`` of the ``i``-th device of this group.
  """
  position, size = position_in_group(axis_name, axis_index_groups, sizes)
  # int32 as the position (jnp.arange is int64 under x64, which strict promotion refuses).
  rows = jnp.arange(size, dtype=jnp.int32).reshape((size,) + (1,) * row.ndim) == position
  return psum(jnp.where(rows, row, jnp.zeros((), row.dtype)), axis_name, axis_index_groups)
