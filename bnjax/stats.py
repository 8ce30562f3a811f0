"""Batch moments: exact, float32, masked, synchronized across devices.

Batch norm needs, per feature, the mean and the (biased) variance of the values in
a batch (Algorithm 1 of Ioffe & Szegedy, 2015). This module computes them

* exactly: ``E[x^2] - E[x]^2`` from one pass only where it is exact (the mean
  within 2 standard deviations of zero), else a second pass around the mean, never
  the one-pass formula where it loses every digit (``|mean| >> std``);
* in at least float32, whatever the input dtype (bfloat16 and float16 inputs are
  reduced in float32; float64 and complex inputs keep their precision);
* over the valid entries of an optional ``mask`` only;
* across devices, in bytes that do not grow with their number: each device sums
  its values per feature around a shift every device holds, and one ``psum`` of
  ``[2, *F]`` (``[3, *F]`` with a mask: the valid counts, so that uneven counts
  per device are weighted exactly) gives every device the global sums
  (``synchronized_moments``); a second exchange of the same size runs only where
  the first sums are not exact. Along a ``vmap``'s named axis, where nothing is
  sent, each row's moments are gathered and combined exactly instead (Chan,
  Golub & LeVeque, 1979; ``all_gather_moments``). ``bnjax.collectives`` holds the
  exchange and the group checks, and says where each way of synchronizing works.

One pass or two. For values ``x_1..x_n`` and any shift ``K``, with ``s1 = sum(x -
K)`` and ``s2 = sum((x - K)^2)``, the sum of squared deviations is ``m2 = s2 - s1^2
/ n``, and its rounding error is about ``eps * s2 = eps * m2 * (1 + (mean - K)^2 /
var)``. bnjax first sums around ``K = 0``, one pass over ``x`` reading it once as
Flax's fast variance does, and keeps that result where every feature has
``mean^2 <= 4 var``: the error is then at most ``5 * eps * m2``, which covers the
activations batch norm normally sees (after a ReLU ``mean^2 / var`` is about 0.5,
for pixels in [0, 1] about 3). Where some feature is further out (a large offset, a
nearly constant feature) or a sum is not finite, a second pass sums around the
first pass's mean (``lax.cond``: it runs only then), whose distance from the true
mean is a rounding error, so the error is again about ``eps * m2`` (measured: under
one ``eps`` relative at ``|mean| / std`` up to ``1e7``). One feature
out of range sends the whole layer through the second pass; every input pays
for exactness only where it needs it.

The range that is exact. Where a sum of squared deviations ``x - K`` overflows,
they are summed again scaled by an exact power of two near ``1 / sqrt(n)`` (in the
second pass, and only then), so no intermediate exceeds a few times the variance:
the statistics keep the bound above for every input whose squared deviations from
its mean are finite, which in float32 means values up to about ``1e26`` (where
the spacing of float32 numbers reaches ``1e19``) and standard deviations up to
about ``1e19``, down to variances where squared deviations become subnormal
(about ``n * 1e-38``). ``batch_norm`` then computes ``x - mean`` as
``(x - m) - (mean - m)``, with ``m`` the mean rounded to float32 and
``mean - m`` known to the last digit from ``K`` and the offset, so its output is
as exact as its statistics (``x - m`` is exact where ``x`` is near the mean).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _fusion, collectives


class Moments(NamedTuple):
  """Count, mean and biased variance of a set of values, per feature.

  The sufficient statistics that combine exactly across devices or batches
  (Chan, Golub & LeVeque, 1979). ``F`` is the feature shape (one entry per
  normalized feature); the fields are float32 or wider (float64 for float64
  input; the mean complex for complex input). The variance is stored, not the sum
  of squared deviations ``m2 = count * var``, so that every representable variance
  stays finite. Constructing one checks nothing and raises nothing.

  >>> m = Moments(count=jnp.array([2.0]), mean=jnp.array([2.0]), var=jnp.array([1.0]))
  >>> m.m2.tolist(), m.unbiased_variance.tolist()  # values 1 and 3
  ([2.0], [2.0])
  >>> Moments(jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0])).variance.tolist()
  [nan]
  """

  count: jax.Array  #: Number of values reduced, ``[*F]`` in the real statistics dtype.
  mean: jax.Array  #: Their mean, ``[*F]`` in the statistics dtype (complex for complex input).
  var: jax.Array  #: Mean of ``|x - mean|^2``, ``[*F]`` real; 0 where count is 0.

  @property
  def m2(self) -> jax.Array:
    """The sum of squared deviations ``count * var``, ``[*F]``."""
    return self.var * self.count

  @property
  def variance(self) -> jax.Array:
    """The biased variance (Algorithm 1), ``[*F]``; NaN where count is 0."""
    return jnp.where(self.count > 0, self.var, jnp.nan)

  @property
  def unbiased_variance(self) -> jax.Array:
    """The unbiased variance ``count / (count - 1) * var`` (Algorithm 2), ``[*F]``;
    NaN where count < 2."""
    correction = self.count / jnp.maximum(self.count - 1, 1)
    return jnp.where(self.count > 1, self.var * correction, jnp.nan)


class ShiftedMoments(NamedTuple):
  """Moments whose mean is kept as ``shift + offset``, two exact float32 numbers.

  A float32 mean near 1e4 is only known to about 5e-4; kept as a shift (one of the
  inputs' own values or a mean of them) plus a small offset, it is known to the
  last digit, which combining devices' moments and normalizing ``x`` around it
  (``(x - shift) - offset``) need.
  """

  count: jax.Array  # [*F], real statistics dtype
  shift: jax.Array  # [*F], statistics dtype
  offset: jax.Array  # [*F], statistics dtype: mean - shift
  var: jax.Array  # [*F], real statistics dtype: biased variance, 0 where count is 0

  @property
  def moments(self) -> Moments:
    return Moments(count=self.count, mean=self.shift + self.offset, var=self.var)


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


def _sums(x, shift, scale, *, dtype, reduction_axes, mask):
  """``(sum(d), sum(|d|^2))`` per feature over the valid entries, ``d = (x - shift) *
  scale`` in ``dtype`` (``shift`` None: 0; ``scale`` None: 1).

  Each sum computes ``d`` itself: shared (between the two sums, or with the
  caller's own use of ``x``), XLA's CPU reductions write it out in full.
  """

  def deviations(x, shift, scale):
    d = x.astype(dtype)
    if shift is not None:
      d = d - expand_to_input(shift, reduction_axes)
    return d if scale is None else d * scale

  values, squares = (
    deviations(*copy) for copy in _fusion.unshared_on_cpu((x, shift, scale), copies=2)
  )
  return (
    _masked_sum(values, mask, reduction_axes),
    _masked_sum(abs_squared(squares), mask, reduction_axes),
  )


def _mean_and_variance(s1, s2, count):
  """The mean and biased variance of ``count`` values from their sums ``s1`` and
  ``s2`` of values and squares (0 and 0 where count is 0)."""
  safe_count = jnp.maximum(count, 1)
  mean = s1 / safe_count.astype(s1.dtype)
  return mean, jnp.maximum(s2 / safe_count - abs_squared(mean), 0)


def _power_of_two_scale(num_values: int) -> float:
  """``2^-k`` with ``4^k >= num_values``: exact to multiply by, and it keeps sums
  of ``num_values`` squares of scaled deviations within the range of the variance."""
  return 2.0 ** -math.ceil(math.log2(max(num_values, 1)) / 2)


def shifted_moments(
  x: jax.Array,
  shift: jax.Array,
  *,
  reduction_axes: Sequence[int],
  mask: jax.Array | None = None,
) -> ShiftedMoments:
  """Moments of ``x`` over ``reduction_axes`` in one pass around ``shift``.

  Exact to ``eps * (1 + (mean - shift)^2 / var)`` relative; see the module
  docstring. Masked-out entries (even NaN or inf) do not enter the sums. Where
  a sum of squares overflows, the deviations are summed again scaled by an exact
  power of two, so no sum overflows where the variance itself is representable.

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
  shift = shift.astype(dtype)
  count = _count(x.shape, reduction_axes, mask, real_dtype)
  sums = functools.partial(_sums, x, shift, dtype=dtype, reduction_axes=reduction_axes, mask=mask)

  # Sums of squares overflow only where deviations near the top of the range add up
  # past it; only then are they summed again, scaled (the common case pays nothing).
  scale = _power_of_two_scale(math.prod(x.shape[a] for a in reduction_axes))
  s1, s2 = sums(None)
  s1, s2, scale = lax.cond(
    jnp.any(jnp.isinf(s2)),
    lambda: (*sums(jnp.asarray(scale, dtype)), jnp.asarray(scale, real_dtype)),
    lambda: (s1, s2, jnp.ones((), real_dtype)),
  )
  scaled_offset, scaled_var = _mean_and_variance(s1, s2, count)
  return ShiftedMoments(
    count=count,
    shift=shift,
    offset=scaled_offset / scale.astype(dtype),
    var=scaled_var / (scale * scale),
  )


# The one pass around zero is kept where every feature has mean^2 <= this many
# variances (|mean| <= 2 std): it is then exact to 5 * eps relative (see the module
# docstring), close to what a pass around the mean itself gives.
ONE_PASS_MEAN_SQUARED_PER_VARIANCE = 4.0


def local_moments(
  x: jax.Array,
  *,
  reduction_axes: Sequence[int],
  mask: jax.Array | None = None,
  finish: Callable[[ShiftedMoments], Any] | None = None,
) -> Any:
  """Exact moments of the values of ``x`` on this device (no communication).

  One pass sums ``x`` and ``|x|^2``. Where that is not exact, for any feature (its
  mean further than 2 standard deviations from zero, or a sum not finite), a
  second pass sums around the first pass's mean instead (``shifted_moments``):
  only then (``lax.cond``), so that activations as batch norm sees them cost one
  pass, as Flax's fast variance does, and every input is exact.

  Returns ``ShiftedMoments`` with ``[*F]`` fields, or ``finish(moments)`` with a
  ``finish``: a function applied to them inside each branch of that choice, so
  that XLA fuses the caller's per-feature work with the branch that computed the
  moments (across the branch's boundary it cannot: each piece would be a kernel
  of its own).

  >>> m = local_moments(jnp.array([1e4 + 1, 1e4 - 1]), reduction_axes=(0,))  # two passes
  >>> float(m.moments.mean), float(m.moments.variance)
  (10000.0, 1.0)
  """
  dtype = statistics_dtype(x.dtype)
  real_dtype = jnp.finfo(dtype).dtype
  count = _count(x.shape, reduction_axes, mask, real_dtype)
  finish = finish or (lambda moments: moments)
  if not reduction_axes:  # one value per feature: its own mean
    offset, var = jnp.zeros(x.shape, dtype), jnp.zeros(x.shape, real_dtype)
    return finish(ShiftedMoments(count, x.astype(dtype), offset, var))
  s1, s2 = _sums(x, None, None, dtype=dtype, reduction_axes=reduction_axes, mask=mask)
  exact = _is_exact(*_mean_and_variance(s1, s2, count), s2)  # every feature near zero

  # Each branch derives the mean and variance from the sums itself: computed once
  # outside, they would be a kernel of their own.
  def one_pass(s1, s2):
    mean, var = _mean_and_variance(s1, s2, count)
    return finish(ShiftedMoments(count=count, shift=mean, offset=jnp.zeros_like(mean), var=var))

  def two_pass(s1, s2):
    mean, _ = _mean_and_variance(s1, s2, count)
    return finish(shifted_moments(x, mean, reduction_axes=reduction_axes, mask=mask))

  return lax.cond(exact, one_pass, two_pass, s1, s2)


def combine_shifted_moments(moments: ShiftedMoments) -> ShiftedMoments:
  """Combines moments stacked along a leading axis into the moments of the union.

  Exact (Chan et al.): with weights ``w_i = n_i / n``, ``mean = sum(w_i mean_i)``
  and ``var = sum(w_i var_i) + sum(w_i |mean_i - mean|^2)``. Means are taken
  relative to the shift of the entry with the most values, which becomes the
  result's shift, so a large common offset cancels exactly (an empty entry's mean
  means nothing).
  """
  largest = jnp.argmax(moments.count, axis=0)[None]
  reference = jnp.take_along_axis(moments.shift, largest, axis=0)
  relative_means = (moments.shift - reference) + moments.offset
  count = jnp.sum(moments.count, axis=0)
  weights = moments.count / jnp.maximum(count, 1)[None]
  relative_mean = jnp.sum(weights.astype(relative_means.dtype) * relative_means, axis=0)
  spread = jnp.sum(weights * abs_squared(relative_means - relative_mean[None]), axis=0)
  var = jnp.sum(weights * moments.var, axis=0) + spread
  return ShiftedMoments(count=count, shift=reference[0], offset=relative_mean, var=var)


def combine_moments(moments: Moments) -> Moments:
  """Combines moments stacked along a leading axis into the moments of the union.

  Exact (Chan et al.); see ``combine_shifted_moments``.

  >>> parts = Moments(count=jnp.array([2., 1.]), mean=jnp.array([1., 4.]),
  ...                 var=jnp.array([1., 0.]))  # the sets {0, 2} and {4}
  >>> m = combine_moments(parts)
  >>> float(m.count), float(m.mean), float(m.m2)
  (3.0, 2.0, 8.0)
  """
  shifted = ShiftedMoments(moments.count, moments.mean, jnp.zeros_like(moments.mean), moments.var)
  return combine_shifted_moments(shifted).moments


def agreed_shift(hint: jax.Array | None, x: jax.Array, axis_name: Hashable) -> jax.Array | None:
  """``hint`` where JAX's types prove that every device along ``axis_name`` holds
  the same one, else None (the exchange then sums around zero).

  Proven only under ``shard_map`` with its type checks on (``check_vma``): ``x``
  varies along every name of ``axis_name`` and ``hint`` along none. ``pmap``,
  ``vmap``'s named axes and ``check_vma=False`` carry no such types, so there a
  per-device state can never skew the sums. Values that are not finite become 0.
  """
  if hint is None:
    return None
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  x_axes, hint_axes = collectives.varying_axes(x), collectives.varying_axes(hint)
  if not all(name in x_axes and name not in hint_axes for name in names):
    return None
  dtype = statistics_dtype(x.dtype)
  hint = lax.stop_gradient(hint).astype(dtype)
  return jnp.where(jnp.isfinite(hint), hint, jnp.zeros((), dtype))


def _psum_features(arrays, axis_name, axis_index_groups):
  """``psum`` of ``[*F]`` arrays (real or complex) as one ``[k, *F]`` real array:
  one collective whatever their number."""
  rows = []
  for a in arrays:
    rows.extend([a.real, a.imag] if jnp.iscomplexobj(a) else [a])
  summed = collectives.psum(jnp.stack(rows), axis_name, axis_index_groups)
  out, i = [], 0
  for a in arrays:
    if jnp.iscomplexobj(a):
      out.append(lax.complex(summed[i], summed[i + 1]))
      i += 2
    else:
      out.append(summed[i])
      i += 1
  return out


def _is_exact(offset, var, s2) -> jax.Array:
  """Whether sums around a shift give every feature's moments exactly: each mean
  within 2 standard deviations of the shift (``offset^2 <= 4 var``), every sum of
  squares finite. One float reduction (max, NaN propagating), where ``jnp.all`` of
  booleans takes XLA's CPU backend three kernels."""
  excess = abs_squared(offset) - ONE_PASS_MEAN_SQUARED_PER_VARIANCE * var
  excess = jnp.where(jnp.isfinite(s2), excess, jnp.inf)
  return jnp.max(excess, initial=-jnp.inf) <= 0


def synchronized_moments(
  x: jax.Array,
  shift: jax.Array | None,
  *,
  reduction_axes: Sequence[int],
  mask: jax.Array | None,
  axis_name: Hashable,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  axis_sizes: tuple[int, ...] | None = None,
) -> ShiftedMoments:
  """Exact moments of every device's ``x`` along ``axis_name``, exchanging O(F).

  Each device sums ``x - K`` and ``|x - K|^2`` per feature around a shift ``K``
  that every device holds (``shift``, from ``agreed_shift``, or 0), and one
  ``psum`` of the ``[2, *F]`` sums (``[3, *F]`` with a ``mask``: the valid counts
  too) gives every device the same global sums: the bytes sent do not depend on
  the number of devices. They are kept where every feature's global mean lies
  within 2 standard deviations of ``K`` (error at most ``5 eps`` relative, as for
  ``local_moments``). Elsewhere, only then (``lax.cond``, on a predicate every
  device computes alike), a second pass sums around that first mean and exchanges
  ``[2, *F]`` again (deviations scaled by a power of two where the first sums of
  squares came near overflow), and, if the first mean was itself too far off for
  that (``|mean - K| / std`` beyond about ``1e6``), a third pass around the second
  mean: exact up to ``|mean - K| / std`` of about ``1 / eps^2``, ``1e13`` in
  float32. At most three exchanges of ``[2, *F]`` in all: with the backward pass's
  one, twice Flax's bytes; on the common path, Flax's bytes.

  Args:
    x: ``[...]`` floating or complex input, this device's part of the batch.
    shift: ``[*F]`` or None; must be the same on every device (``agreed_shift``).
    reduction_axes, mask: as ``local_moments``.
    axis_name, axis_index_groups: the devices to synchronize over (see
      ``bnjax.collectives``).
    axis_sizes: ``bnjax.collectives.axis_sizes(axis_name)``, asked where the axes
      are bound (here otherwise).

  Returns:
    ``ShiftedMoments`` of the union, ``[*F]`` fields, identical on every device.
  """
  dtype = statistics_dtype(x.dtype)
  real_dtype = jnp.finfo(dtype).dtype
  sizes = collectives.axis_sizes(axis_name) if axis_sizes is None else axis_sizes
  exchange = functools.partial(
    _psum_features, axis_name=axis_name, axis_index_groups=axis_index_groups
  )
  sums = functools.partial(_sums, x, dtype=dtype, reduction_axes=reduction_axes, mask=mask)
  local_count = _count(x.shape, reduction_axes, mask, real_dtype)
  if mask is None:
    group_size = collectives.group_size(axis_name, axis_index_groups, sizes)
    s1, s2 = exchange(sums(shift, None))
    count = local_count * jnp.asarray(group_size, real_dtype)
  else:
    count, s1, s2 = exchange([local_count, *sums(shift, None)])
  shift = jnp.zeros(count.shape, dtype) if shift is None else shift
  offset, var = _mean_and_variance(s1, s2, count)
  # A sum of squares around the first shift bounds those around the mean: where it
  # is near the top of the range (or not finite), the later passes sum deviations
  # scaled by a power of two, decided here alike on every device.
  scale = _power_of_two_scale(math.prod(x.shape[a] for a in reduction_axes) * math.prod(sizes))
  near_overflow = jnp.logical_not(jnp.all(s2 <= jnp.finfo(real_dtype).max / 4))
  factor = jnp.where(near_overflow, jnp.asarray(scale, real_dtype), 1)

  def around(shift):
    s1, s2 = exchange(sums(shift, factor.astype(dtype)))
    offset, var = _mean_and_variance(s1, s2, count)
    return shift, offset / factor.astype(dtype), var / (factor * factor), s2

  def second_pass(shift, offset):
    shift, offset, var, s2 = around(shift + offset)
    return lax.cond(
      _is_exact(offset, var, s2),
      lambda: (shift, offset, var),
      lambda: around(shift + offset)[:3],
    )

  shift, offset, var = lax.cond(
    _is_exact(offset, var, s2),
    lambda: (collectives.varying_alike((shift, offset))[0], offset, var),
    lambda: second_pass(shift, offset),
  )
  return ShiftedMoments(count=count, shift=shift, offset=offset, var=var)


def all_gather_moments(
  moments: ShiftedMoments,
  axis_name: Hashable,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  axis_sizes: tuple[int, ...] | None = None,
) -> ShiftedMoments:
  """Moments of the union of every device's values along ``axis_name``, from
  every device's own moments: the exchange where ``axis_name`` holds a ``vmap``'s
  axis (``bnjax.collectives.are_device_axes``). There nothing is sent; and a
  collective inside ``lax.cond``, as ``synchronized_moments`` has, cannot be
  traced where JAX 0.10 differentiates such a ``vmap`` lazily (see
  ``bnjax.collectives.axis_sizes``). Between devices that exchange would grow
  with their number.

  One collective (``bnjax.collectives.gather_rows``) gathers every device's
  ``(count, shift, offset, var)``, stacked as one ``[P, *F]`` real array, on every
  device (rows a smaller group leaves empty count no values). Every device then
  combines the same gathered rows exactly, so all get identical statistics. With
  ``axis_index_groups``, within each group only (``pmap`` only; see
  ``bnjax.collectives``). ``axis_sizes``: ``bnjax.collectives.axis_sizes(axis_name)``
  where the caller has them (asked here otherwise).

  Returns:
    The combined moments; their shift is that of the device with the most values.
  """
  is_complex = jnp.iscomplexobj(moments.shift)
  parts = [moments.count, moments.shift, moments.offset, moments.var]
  if is_complex:
    parts = [
      moments.count,
      moments.shift.real,
      moments.shift.imag,
      moments.offset.real,
      moments.offset.imag,
      moments.var,
    ]
  gathered = collectives.gather_rows(jnp.stack(parts), axis_name, axis_index_groups, axis_sizes)
  if is_complex:
    shift = lax.complex(gathered[:, 1], gathered[:, 2])
    offset = lax.complex(gathered[:, 3], gathered[:, 4])
  else:
    shift, offset = gathered[:, 1], gathered[:, 2]
  return combine_shifted_moments(ShiftedMoments(gathered[:, 0], shift, offset, gathered[:, -1]))


def batch_moments(
  x: jax.Array,
  *,
  reduction_axes: Sequence[int],
  mask: jax.Array | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
  """Exact per-feature moments over ``reduction_axes`` of ``x`` and, with
  ``axis_name``, of the ``x`` of every device along that named axis.

  The statistics ``bnjax.batch_norm`` normalizes with in training mode, for use on
  their own. Under ``jit`` with ``x`` sharded over devices (no ``axis_name``), the
  reductions are over the global array and XLA inserts the cross-device sums
  itself. With ``axis_name`` (inside ``pmap``/``shard_map``) the devices exchange
  their moments in one collective and every device gets the same result. The
  arguments are checked less than by ``bnjax.batch_norm`` and
  ``bnjax.update_population``, which check them with messages naming the problem.

  Args:
    x: ``[...]`` floating or complex input; ``F`` is its shape without the
      ``reduction_axes``.
    reduction_axes: sorted, non-negative axes of ``x`` to reduce over (batch and
      spatial axes), at least one (or an ``axis_name``).
    mask: optional boolean of ``x``'s rank, broadcastable to ``x``; True = valid.
    axis_name: named axis (``pmap``/``shard_map``) to synchronize over, or None.
    axis_index_groups: optional groups of device indices along ``axis_name``
      (``pmap`` only; any sizes, together holding each index once); statistics
      are then synchronized within each group only.

  Returns:
    ``Moments`` with ``[*F]`` fields, float32 or wider. Where no value is valid
    (count 0) the mean is finite but meaningless, and ``variance`` is NaN.

  Raises:
    NameError: ``axis_name`` not bound (called outside ``pmap``/``shard_map``).
    ValueError: ``mask`` not broadcastable to ``x``; ``axis_index_groups`` not
      holding each index of ``axis_name`` exactly once.
    NotImplementedError: ``axis_index_groups`` under ``shard_map``.

  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> m = batch_moments(x, reduction_axes=(0,))
  >>> m.mean.tolist(), m.variance.tolist()
  ([2.0, 20.0], [1.0, 100.0])
  >>> valid = jnp.array([[True], [False]])  # [N, 1]: the second example masked out
  >>> batch_moments(x, reduction_axes=(0,), mask=valid).mean.tolist()
  [1.0, 10.0]
  """
  if axis_name is None:
    return local_moments(x, reduction_axes=reduction_axes, mask=mask).moments
  if not collectives.are_device_axes(axis_name):
    local = local_moments(x, reduction_axes=reduction_axes, mask=mask)
    return all_gather_moments(local, axis_name, axis_index_groups).moments
  return synchronized_moments(
    x,
    None,
    reduction_axes=reduction_axes,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  ).moments
