"""Batch moments: exact, float32, masked, synchronized across devices.

Batch norm needs, per feature, the mean and the (biased) variance of the values in
a batch (Algorithm 1 of Ioffe & Szegedy, 2015). This module computes them

* exactly: one pass over ``x`` around a *shift* close to the mean, never the
  one-pass ``E[x^2] - E[x]^2``, which loses every digit when ``|mean| >> std``;
* in at least float32, whatever the input dtype (bfloat16 and float16 inputs are
  reduced in float32; float64 and complex inputs keep their precision);
* over the valid entries of an optional ``mask`` only;
* across devices with one collective: each device reduces its own values to
  ``(count, mean, m2)``, one collective exchanges them, and every device
  combines them exactly (Chan, Golub & LeVeque, 1979). Uneven valid counts per
  device are weighted correctly; this is not a mean of means. The exchange is one
  ``psum`` of a ``[D, 4, *F]`` array (D devices in the group): tiny next to the
  activations, but it grows with D, so very large axes are best synchronized in
  groups (``axis_index_groups``), as large-scale training does anyway.

The shift. For values ``x_1..x_n`` and any shift ``K``, with ``s1 = sum(x - K)`` and
``s2 = sum((x - K)^2)``, the sum of squared deviations is ``m2 = s2 - s1^2 / n``.
Its rounding error is about ``eps * s2 = eps * m2 * (1 + (mean - K)^2 / var)``, so
the shift must lie within a few standard deviations of the mean. bnjax takes ``K``
as the mean of a slice holding at least 1/16 of the values (a corner of each image,
or some rows of each device's share of the batch): for any subset of size ``k``,
``(mean_subset - mean)^2 <= (n / k) * var``, so the error is bounded by
``17 * eps * m2`` on every input (and is ``~eps * m2`` on shuffled batches), at the
price of reading 1/16 to 1/8 of ``x`` once more. With a mask the shift is the full
masked mean (a masked slice could hold no valid value), which costs one more pass.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The shift is the mean of a slice holding at least 1 / SHIFT_SUBSET_FRACTION of
# the values; see the module docstring for the bound.
SHIFT_SUBSET_FRACTION = 16


class Moments(NamedTuple):
  """Count, mean and sum of squared deviations of a set of values, per feature.

  The sufficient statistics that combine exactly across devices or batches.
  ``F`` is the feature shape (one entry per normalized feature).
  """

  count: jax.Array  # [*F], real statistics dtype: number of values reduced
  mean: jax.Array  # [*F], statistics dtype (complex for complex input)
  m2: jax.Array  # [*F], real statistics dtype: sum of |x - mean|^2

  @property
  def variance(self) -> jax.Array:
    """The biased variance ``m2 / count`` (Algorithm 1); NaN where count is 0."""
    return jnp.where(self.count > 0, self.m2 / jnp.maximum(self.count, 1), jnp.nan)

  @property
  def unbiased_variance(self) -> jax.Array:
    """The unbiased variance ``m2 / (count - 1)`` (Algorithm 2); NaN where count < 2."""
    return jnp.where(self.count > 1, self.m2 / jnp.maximum(self.count - 1, 1), jnp.nan)

  @property
  def normalizing_variance(self) -> jax.Array:
    """The biased variance, and 0 where there is no value (count 0): what
    normalization divides by, finite so that an empty set (a padded virtual batch,
    a device or batch whose values are all masked out) yields no NaN."""
    return self.m2 / jnp.maximum(self.count, 1)


class ShiftedMoments(NamedTuple):
  """Moments whose mean is kept as ``shift + offset``, two exact float32 numbers.

  A float32 mean near 1e4 is only known to about 5e-4; kept as a shift (one of the
  inputs' own values or a mean of them) plus a small offset, it is known to the
  last digit, which combining devices' moments exactly needs.
  """

  count: jax.Array  # [*F], real statistics dtype
  shift: jax.Array  # [*F], statistics dtype
  offset: jax.Array  # [*F], statistics dtype: mean - shift
  m2: jax.Array  # [*F], real statistics dtype

  @property
  def moments(self) -> Moments:
    return Moments(count=self.count, mean=self.shift + self.offset, m2=self.m2)


def statistics_dtype(*dtypes) -> jnp.dtype:
  """The dtype statistics are computed in: the widest of ``dtypes``, at least
  float32 (complex if any is complex). Independent of the promotion mode.

  >>> statistics_dtype(jnp.bfloat16)
  dtype('float32')
  >>> statistics_dtype(jnp.float32, jnp.complex64)
  dtype('complex64')
  """
  with jax.numpy_dtype_promotion("standard"):
    result = jnp.dtype(jnp.float32)
    for dtype in dtypes:
      result = jnp.promote_types(result, dtype)
  return result


def abs_squared(x: jax.Array) -> jax.Array:
  """``|x|^2`` elementwise, real for complex ``x``."""
  if jnp.iscomplexobj(x):
    return lax.square(x.real) + lax.square(x.imag)
  return lax.square(x)


def expand_to_input(stat: jax.Array, reduction_axes: Sequence[int]) -> jax.Array:
  """Inserts size-1 reduction axes so a ``[*F]`` statistic broadcasts against x."""
  return jnp.expand_dims(stat, tuple(reduction_axes))


def _feature_shape(shape: Sequence[int], reduction_axes: Sequence[int]):
  return tuple(d for a, d in enumerate(shape) if a not in reduction_axes)


def _count(x_shape, reduction_axes, mask, dtype) -> jax.Array:
  """Number of reduced values per feature, ``[*F]``; ``mask`` has x's rank."""
  feature_shape = _feature_shape(x_shape, reduction_axes)
  if mask is None:
    total = math.prod(x_shape[a] for a in reduction_axes)
    return jnp.full(feature_shape, total, dtype)
  repeats = math.prod(x_shape[a] for a in reduction_axes if mask.shape[a] == 1)
  count = jnp.sum(mask, axis=tuple(reduction_axes), dtype=dtype) * repeats
  return jnp.broadcast_to(count, feature_shape)


def _masked_sum(values, mask, reduction_axes):
  if mask is not None:
    values = jnp.where(mask, values, jnp.zeros((), values.dtype))
  return jnp.sum(values, axis=tuple(reduction_axes))


def shifted_moments(
    x: jax.Array,
    shift: jax.Array,
    *,
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
) -> ShiftedMoments:
  """Moments of ``x`` over ``reduction_axes`` in one pass around ``shift``.

  Exact to ``eps * (1 + (mean - shift)^2 / var)`` relative; see the module
  docstring. Masked-out entries (even NaN or inf) do not enter the sums.

  Args:
    x: ``[...]`` input of any floating or complex dtype.
    shift: ``[*F]`` values near the mean, in the statistics dtype of ``x``.
    reduction_axes: sorted axes of ``x`` to reduce; the others are features.
    mask: optional boolean of ``x``'s rank, broadcastable to ``x``; True = valid.

  Returns:
    ``ShiftedMoments`` with ``[*F]`` fields in the statistics dtype of ``x``.

  >>> m = shifted_moments(jnp.array([1e4 + 1, 1e4 - 1]), jnp.array(1e4),
  ...                     reduction_axes=(0,)).moments
  >>> float(m.mean), float(m.variance)
  (10000.0, 1.0)
  """
  dtype = statistics_dtype(x.dtype)
  real_dtype = jnp.finfo(dtype).dtype
  centered = x.astype(dtype) - expand_to_input(shift.astype(dtype), reduction_axes)
  s1 = _masked_sum(centered, mask, reduction_axes)
  s2 = _masked_sum(abs_squared(centered), mask, reduction_axes)
  count = _count(x.shape, reduction_axes, mask, real_dtype)
  safe_count = jnp.maximum(count, 1).astype(real_dtype)
  offset = s1 / safe_count.astype(dtype)
  m2 = jnp.maximum(s2 - abs_squared(s1) / safe_count, 0)
  return ShiftedMoments(count=count, shift=shift.astype(dtype), offset=offset, m2=m2)


def _shards_along(x: jax.Array, axis: int) -> int:
  """How many devices ``axis`` of ``x`` is split over in its type (explicit
  sharding under ``jit``); 1 when unsharded or when the type does not say."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if spec is None or mesh is None or axis >= len(spec) or spec[axis] is None:
    return 1
  names = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
  return math.prod(mesh.shape[name] for name in names)


def _shift_slice_plan(x: jax.Array, reduction_axes: Sequence[int]) -> dict[int, tuple[int, int]]:
  """Where the shift's slice comes from: axis -> (blocks, positions kept per block).

  The slice keeps at least 1/16 of the values (at most 1/8 where sizes allow):
  first the leading positions of the non-leading reduction axes (spatial axes of
  images, from the last), then, if those are too short, of the leading (batch)
  axis, taken from each device's block of it so that no device needs another's
  values: the blocks of the explicit sharding in ``x``'s type, or else of
  ``jax.device_count()`` devices, when the batch holds 16 or more rows per device.
  """
  plan, need = {}, float(SHIFT_SUBSET_FRACTION)
  leading, *others = reduction_axes
  for axis in [*reversed(others), leading]:
    if need < 2:
      break
    length = x.shape[axis]
    blocks = _shards_along(x, axis)
    if blocks == 1 and axis == leading and length % jax.device_count() == 0 and (
        length // jax.device_count() >= SHIFT_SUBSET_FRACTION
    ):
      blocks = jax.device_count()
    block = length // blocks
    kept = -(-block // min(need, block))
    kept = int(min(block, max(1, kept)))
    plan[axis] = (blocks, kept)
    need *= kept / block
  return plan


def estimate_shift(
    x: jax.Array,
    *,
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
) -> jax.Array:
  """A ``[*F]`` shift provably close to the mean, for ``shifted_moments``.

  Without a mask: the mean of a slice holding at least 1/16 of the values (see
  ``_shift_slice_plan``), so that ``(shift - mean)^2 <= 16 * var``. With a mask:
  the masked mean of all of ``x`` (a slice could hold no valid value). Carries no
  gradient.
  """
  x = lax.stop_gradient(x)
  dtype = statistics_dtype(x.dtype)
  if mask is not None:
    real_dtype = jnp.finfo(dtype).dtype
    total = _masked_sum(x.astype(dtype), mask, reduction_axes)
    count = _count(x.shape, reduction_axes, mask, real_dtype)
    return total / jnp.maximum(count, 1).astype(dtype)
  plan = _shift_slice_plan(x, reduction_axes)
  blocked_shape, starts, limits, subset_axes = [], [], [], []
  for axis, length in enumerate(x.shape):
    blocks, kept = plan.get(axis, (1, length))
    if blocks > 1:
      blocked_shape += [blocks, length // blocks]
      starts += [0, 0]
      limits += [blocks, kept]
    else:
      blocked_shape.append(length)
      starts.append(0)
      limits.append(kept)
    new_axes = [len(blocked_shape) - 2, len(blocked_shape) - 1] if blocks > 1 else [len(blocked_shape) - 1]
    if axis in reduction_axes:
      subset_axes += new_axes
  subset = lax.slice(x.reshape(blocked_shape), starts, limits)
  return jnp.mean(subset.astype(dtype), axis=tuple(subset_axes))


def local_moments(
    x: jax.Array,
    *,
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
) -> ShiftedMoments:
  """Exact moments of the values of ``x`` on this device (no communication)."""
  shift = estimate_shift(x, reduction_axes=reduction_axes, mask=mask)
  return shifted_moments(x, shift, reduction_axes=reduction_axes, mask=mask)


def combine_moments(moments: Moments | ShiftedMoments) -> Moments:
  """Combines moments stacked along a leading axis into the moments of the union.

  Exact (Chan et al.): ``mean = sum(n_i mean_i) / n`` and
  ``m2 = sum(m2_i) + sum(n_i |mean_i - mean|^2)``. Means are taken relative to the
  mean (for ``ShiftedMoments``, the shift) of the entry with the most values, so a
  large common offset cancels exactly (an empty entry's mean means nothing).

  >>> parts = Moments(count=jnp.array([2., 1.]), mean=jnp.array([1., 4.]),
  ...                 m2=jnp.array([2., 0.]))  # the sets {0, 2} and {4}
  >>> m = combine_moments(parts)
  >>> float(m.count), float(m.mean), float(m.m2)
  (3.0, 2.0, 8.0)
  """
  if isinstance(moments, Moments):
    moments = ShiftedMoments(moments.count, moments.mean, jnp.zeros_like(moments.mean), moments.m2)
  largest = jnp.argmax(moments.count, axis=0)[None]
  reference = jnp.take_along_axis(moments.shift, largest, axis=0)
  relative_means = (moments.shift - reference) + moments.offset
  count = jnp.sum(moments.count, axis=0)
  weights = moments.count.astype(relative_means.dtype)
  safe_count = jnp.maximum(count, 1).astype(relative_means.dtype)
  relative_mean = jnp.sum(weights * relative_means, axis=0) / safe_count
  spread = jnp.sum(moments.count * abs_squared(relative_means - relative_mean[None]), axis=0)
  return Moments(
      count=count, mean=reference[0] + relative_mean, m2=jnp.sum(moments.m2, axis=0) + spread
  )


def all_gather_moments(
    moments: ShiftedMoments,
    axis_name: Hashable,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
  """Moments of the union of every device's values along ``axis_name``.

  One collective: each device writes its ``(count, shift, offset, m2)``, stacked
  as one ``[P, *F]`` real array, into its own row of a zero ``[D, P, *F]`` array,
  and a ``psum`` of that gathers every row on every device. A ``psum`` rather than
  an ``all_gather`` because its result is replicated in type (``shard_map`` checks
  that), and it supports ``axis_index_groups`` everywhere. Every device then
  combines the same gathered rows exactly, so all get identical statistics.
  With ``axis_index_groups``, within each group only.
  """
  is_complex = jnp.iscomplexobj(moments.shift)
  parts = [moments.count, moments.shift, moments.offset, moments.m2]
  if is_complex:
    parts = [moments.count, moments.shift.real, moments.shift.imag,
             moments.offset.real, moments.offset.imag, moments.m2]
  stacked = jnp.stack(parts)
  position, size = _position_in_group(axis_name, axis_index_groups)
  rows = jnp.arange(size).reshape((size,) + (1,) * stacked.ndim) == position
  scattered = jnp.where(rows, stacked, jnp.zeros((), stacked.dtype))
  gathered = lax.psum(scattered, axis_name, axis_index_groups=axis_index_groups)
  if is_complex:
    shift = lax.complex(gathered[:, 1], gathered[:, 2])
    offset = lax.complex(gathered[:, 3], gathered[:, 4])
  else:
    shift, offset = gathered[:, 1], gathered[:, 2]
  return combine_moments(ShiftedMoments(gathered[:, 0], shift, offset, gathered[:, -1]))


def _position_in_group(axis_name, axis_index_groups):
  """This device's index within its group along ``axis_name``, and group size."""
  index = lax.axis_index(axis_name)
  if axis_index_groups is None:
    return index, lax.axis_size(axis_name)
  positions = np.zeros(sum(len(g) for g in axis_index_groups), np.int32)
  for group in axis_index_groups:
    positions[list(group)] = np.arange(len(group))
  return jnp.asarray(positions)[index], len(axis_index_groups[0])


def batch_moments(
    x: jax.Array,
    *,
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
  """Exact moments over ``reduction_axes`` of ``x`` and, with ``axis_name``, of
  the ``x`` of every device along that named axis (``pmap``/``shard_map``).

  Under ``jit`` with ``x`` sharded over devices (no ``axis_name``), the reductions
  are over the global array and XLA inserts the cross-device sums itself.

  Args:
    x: ``[...]`` floating or complex input.
    reduction_axes: sorted axes of ``x`` to reduce over (batch and spatial axes).
    mask: optional boolean of ``x``'s rank, broadcastable to ``x``; True = valid.
    axis_name: named axis to synchronize over, or None.
    axis_index_groups: optional groups of device indices along ``axis_name``;
      statistics are then synchronized within each group only.

  Returns:
    ``Moments`` with ``[*F]`` fields, float32 or wider. Where no value is valid
    (count 0) the mean is finite but meaningless, and ``variance`` is NaN.

  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> m = batch_moments(x, reduction_axes=(0,))
  >>> m.mean.tolist(), m.variance.tolist()
  ([2.0, 20.0], [1.0, 100.0])
  """
  moments = local_moments(x, reduction_axes=reduction_axes, mask=mask)
  if axis_name is None:
    return moments.moments
  return all_gather_moments(moments, axis_name, axis_index_groups)
