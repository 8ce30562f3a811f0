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

from bnjax import stats, validation
from bnjax.batch_norm import BatchNormState


class PopulationStatistics(NamedTuple):
  """Sums over the batches seen so far, per feature."""

  num_batches: jax.Array  # [], float32
  mean_sum: jax.Array  # [*F], float32: sum of batch means
  variance_sum: jax.Array  # [*F], float32: sum of biased batch variances
  unbiased_variance_sum: jax.Array  # [*F], float32: sum of m/(m-1) * batch variances


def init_population(num_features: int | Sequence[int]) -> PopulationStatistics:
  """No batches yet."""
  shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
  zeros = jnp.zeros(shape, jnp.float32)
  return PopulationStatistics(jnp.zeros((), jnp.float32), zeros, zeros, zeros)


def accumulate_moments(population: PopulationStatistics, moments: stats.Moments) -> PopulationStatistics:
  """Adds one batch, given its moments."""
  mean_sum = population.mean_sum
  if jnp.iscomplexobj(moments.mean) and not jnp.iscomplexobj(mean_sum):
    mean_sum = mean_sum.astype(moments.mean.dtype)
  return PopulationStatistics(
      num_batches=population.num_batches + 1,
      mean_sum=mean_sum + moments.mean.astype(mean_sum.dtype),
      variance_sum=population.variance_sum + moments.variance.astype(jnp.float32),
      unbiased_variance_sum=population.unbiased_variance_sum + moments.unbiased_variance.astype(jnp.float32),
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
  as ``bnjax.batch_norm`` computes them in training mode."""
  validation.check_floating("x", x)
  features = validation.feature_axes(jnp.ndim(x), axis)
  expected = tuple(jnp.shape(x)[a] for a in features)
  validation.check_feature_shape("population.mean_sum", population.mean_sum, expected, jnp.shape(x), axis)
  moments = stats.batch_moments(
      x,
      reduction_axes=tuple(a for a in range(jnp.ndim(x)) if a not in features),
      mask=validation.canonical_mask(mask, jnp.shape(x), features),
      axis_name=axis_name,
      axis_index_groups=validation.canonical_axis_index_groups(axis_index_groups),
  )
  return accumulate_moments(population, moments)


def population_state(population: PopulationStatistics, *, unbiased: bool = True) -> BatchNormState:
  """Algorithm 2's statistics as a ``BatchNormState``.

  Args:
    population: the sums after K >= 1 batches.
    unbiased: if True (the paper), the variance is the mean of the batches'
      unbiased variances ``m / (m - 1) * var_B``; else of their biased ones.

  >>> population = init_population(1)
  >>> for batch in ([[0.0], [2.0]], [[4.0], [6.0]]):  # means 1, 5; variances 1, 1
  ...   population = update_population(population, jnp.array(batch))
  >>> state = population_state(population)
  >>> float(state.mean[0]), float(state.var[0])  # 3 and 2/1 * 1
  (3.0, 2.0)
  """
  variance_sum = population.unbiased_variance_sum if unbiased else population.variance_sum
  return BatchNormState(
      mean=population.mean_sum / population.num_batches.astype(population.mean_sum.dtype),
      var=variance_sum / population.num_batches,
  )
