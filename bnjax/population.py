"""Population statistics for inference, as the paper's Algorithm 2 computes them.

The running averages that training keeps are an estimate of the population's
statistics that lags behind the parameters. Algorithm 2 instead fixes the
parameters and averages the statistics of K training batches of m values each:

    E[x]   = mean over batches of the batch means
    Var[x] = m / (m - 1) * mean over batches of the (biased) batch variances

exactly, not as an exponential average ("precise BN" in Detectron2 and fvcore).
This module is the pure form: an accumulator threaded through the batches, like
an optax state. ``bnjax.linen.recompute_batch_stats`` and
``bnjax.nnx.recompute_batch_stats`` apply it to every BN layer of a Flax model.

    population = init_population(num_features)
    for x in inputs_of_the_bn_layer:              # [N, ..., C] each
      population = update_population(population, x)
    state = population_state(population)          # a BatchNormState
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moving_average, stats, validation
from bnjax.batch_norm import BatchNormState


class PopulationStatistics(NamedTuple):
  """Sums over the batches seen so far, per feature, and how many batches each
  sum holds.

  The accumulator of Algorithm 2, a pytree of float32 arrays: ``num_batches`` a
  scalar, the other fields ``[*F]`` (``F`` the feature shape; the sums float64
  for float64 input under x64, ``mean_sum`` complex for complex input). A batch
  enters only the statistics it defines: a feature with no valid value in a batch
  adds nothing, and one value adds no unbiased variance. ``init_population`` starts
  it, ``update_population`` adds a batch and ``population_state`` turns it into a
  ``BatchNormState``; constructing one directly checks nothing.

  >>> x = jnp.array([[0.0, 1.0], [2.0, 1.0]])  # [N, C]
  >>> population = update_population(init_population(2), x)
  >>> population.num_batches.tolist(), population.mean_sum.tolist()
  (1.0, [1.0, 1.0])
  >>> population.variance_sum.tolist()
  [1.0, 0.0]
  """

  num_batches: jax.Array  #: Batches seen, ``[]`` float32.
  mean_sum: jax.Array  #: Sum of the batch means, ``[*F]`` float32.
  variance_sum: jax.Array  #: Sum of the biased batch variances, ``[*F]`` float32.
  unbiased_variance_sum: jax.Array  #: Sum of ``m / (m - 1) * var_B``, ``[*F]`` float32.
  mean_batches: jax.Array  #: Batches with a valid value, ``[*F]`` float32.
  unbiased_variance_batches: jax.Array  #: Batches with two or more valid values, ``[*F]`` float32.


def init_population(
  num_features: int | Sequence[int], *, dtype=jnp.float32
) -> PopulationStatistics:
  """No batches yet: every sum and count 0.

  Args:
    num_features: ``C``, or the feature shape ``F`` for several feature axes (as
      ``bnjax.init``).
    dtype: dtype of the sums. Adding a batch widens them to its statistics' dtype
      (float64 for float64 batches under x64, complex for complex ones); give that
      dtype here where the accumulator must keep one type (a ``lax.scan`` carry).

  Returns:
    ``PopulationStatistics`` of zeros, ``num_batches`` of shape ``[]`` and the
    other fields ``[*F]``; the sums in ``dtype``, the counts float32.

  Raises:
    TypeError: ``num_features`` neither an int nor a sequence of ints.
    ValueError: ``num_features`` (or an entry of it) not positive, or empty.

  >>> population = init_population(3)
  >>> population.num_batches.tolist(), population.mean_sum.shape
  (0.0, (3,))
  """
  shape = validation.feature_shape("num_features", num_features)
  sums, counts = jnp.zeros(shape, dtype), jnp.zeros(shape, jnp.float32)
  return PopulationStatistics(jnp.zeros((), jnp.float32), sums, sums, sums, counts, counts)


def accumulate_moments(
  population: PopulationStatistics, moments: stats.Moments
) -> PopulationStatistics:
  """Adds one batch, given its moments; statistics it does not define stay. A sum
  narrower than the batch's statistic (float32 for a float64 or complex batch) is
  widened to it first: the batch's digits are kept."""

  def add(total, value, defined):
    dtype = np.promote_types(moving_average.widest_real(total.dtype, value.dtype), total.dtype)
    if jnp.iscomplexobj(value):
      dtype = np.promote_types(dtype, value.dtype)
    value = jnp.where(defined, value, jnp.zeros((), value.dtype))
    return total.astype(dtype) + value.astype(dtype)

  has_mean, has_unbiased = moments.count > 0, moments.count > 1
  return PopulationStatistics(
    num_batches=population.num_batches + 1,
    mean_sum=add(population.mean_sum, moments.mean, has_mean),
    variance_sum=add(population.variance_sum, moments.var, has_mean),
    unbiased_variance_sum=add(
      population.unbiased_variance_sum, moments.unbiased_variance, has_unbiased
    ),
    mean_batches=population.mean_batches + has_mean.astype(jnp.float32),
    unbiased_variance_batches=(
      population.unbiased_variance_batches + has_unbiased.astype(jnp.float32)
    ),
  )


def update_population(
  population: PopulationStatistics,
  x: jax.Array,
  *,
  axis: int | Sequence[int] = -1,
  mask: jax.Array | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> PopulationStatistics:
  """Adds the batch ``x`` (the BN layer's input), its statistics computed exactly
  as ``bnjax.batch_norm`` computes them in training mode.

  A feature whose values are all masked out adds nothing to that feature's
  statistics; a feature with a single valid value adds its mean but no unbiased
  variance.

  Args:
    population: the ``PopulationStatistics`` so far, of feature shape ``[*F]``.
    x: ``[..., *F, ...]`` floating or complex batch, features on ``axis``.
    axis: the feature axis or axes of ``x``.
    mask: optional boolean, True for valid entries, broadcastable to ``x``
      (NumPy's rules, as ``bnjax.batch_norm``).
    axis_name: named axis (``pmap``/``shard_map``) whose devices' batches
      together form the batch, or None.
    axis_index_groups: optional groups of device indices along ``axis_name``, as
      ``bnjax.batch_norm``.

  Returns:
    The ``PopulationStatistics`` with this batch added (``num_batches`` + 1), of
    the same shapes and dtypes (the sums widened to the batch's statistics:
    float64 for float64 ``x`` under x64, ``mean_sum`` complex for complex ``x``).

  Raises:
    TypeError: ``x`` not floating, ``mask`` not boolean, ``axis`` not an int or a
      sequence of ints.
    ValueError: ``axis`` out of range, ``x``'s feature shape not that of
      ``population``, ``mask`` not broadcastable, no values to reduce over,
      ``axis_index_groups`` not holding each index once.
    NameError: ``axis_name`` not bound (outside ``pmap``/``shard_map``).
    NotImplementedError: ``axis_index_groups`` under ``shard_map``.

  >>> population = init_population(1)
  >>> population = update_population(population, jnp.array([[0.0], [2.0], [9.0]]),
  ...                                mask=jnp.array([[True], [True], [False]]))
  >>> population.mean_sum.tolist(), population.unbiased_variance_sum.tolist()  # of 0 and 2
  ([1.0], [2.0])
  """
  validation.check_floating("x", x)
  axes = validation.input_axes(jnp.shape(x), axis)
  validation.check_reduction(jnp.shape(x), axes.features)
  validation.check_feature_shape(
    "population.mean_sum", population.mean_sum, axes.feature_shape, jnp.shape(x), axis
  )
  moments = stats.batch_moments(
    x,
    reduction_axes=axes.reduction,
    mask=validation.canonical_mask(mask, jnp.shape(x), axes.features),
    axis_name=axis_name,
    axis_index_groups=validation.canonical_axis_index_groups(axis_index_groups),
  )
  return accumulate_moments(population, moments)


def population_state(
  population: PopulationStatistics,
  *,
  unbiased: bool = True,
  fallback: BatchNormState | None = None,
) -> BatchNormState:
  """Algorithm 2's statistics as a ``BatchNormState``.

  Args:
    population: the sums after K >= 1 batches.
    unbiased: if True (the paper), the variance is the mean of the batches'
      unbiased variances ``m / (m - 1) * var_B``; else of their biased ones.
    fallback: the statistics to keep where no batch defined one (every value of a
      feature masked out; for ``unbiased``, no batch with two values); without it
      those entries are NaN.

  Returns:
    A ``BatchNormState`` with ``[*F]`` ``mean`` and ``var`` in the sums' dtype
    (float32; float64 for float64 batches under x64; the mean complex for complex
    batches): the mean of the batch means and of the batch
    variances, over the batches that define each.

  Raises:
    TypeError: ``unbiased`` not a Python bool.
    ValueError: ``fallback``'s fields not broadcastable to the feature shape.

  >>> population = init_population(1)
  >>> for batch in ([[0.0], [2.0]], [[4.0], [6.0]]):  # means 1, 5; variances 1, 1
  ...   population = update_population(population, jnp.array(batch))
  >>> state = population_state(population)
  >>> float(state.mean[0]), float(state.var[0])  # 3 and 2/1 * 1
  (3.0, 2.0)
  """
  validation.check_bool("unbiased", unbiased)
  if unbiased:
    variance_sum = population.unbiased_variance_sum
    variance_batches = population.unbiased_variance_batches
  else:
    variance_sum, variance_batches = population.variance_sum, population.mean_batches

  def average(total, batches, old):
    value = total / jnp.maximum(batches, 1).astype(total.dtype)
    missing = jnp.full_like(value, jnp.nan) if old is None else jnp.asarray(old).astype(value.dtype)
    return jnp.where(batches > 0, value, missing)

  return BatchNormState(
    mean=average(
      population.mean_sum, population.mean_batches, None if fallback is None else fallback.mean
    ),
    var=average(variance_sum, variance_batches, None if fallback is None else fallback.var),
  )
