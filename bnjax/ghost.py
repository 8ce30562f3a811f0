"""Ghost batch norm (Hoffer, Hubara & Soudry, 2017, arXiv:1705.08741).

``bnjax.batch_norm(..., virtual_batch_size=k)``: statistics per consecutive group
of ``k`` examples along the leading axis, each group normalized with its own
statistics, and the running statistics moved by the mean of the groups'. Private:
``bnjax.batch_norm`` is its public entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from bnjax import _engine, collectives, stats


def _ghost_batch_norm(
  inputs: _engine.Inputs,
  state,
  virtual_batch_size,
  *,
  momentum,
  epsilon,
  axis_name,
  axis_index_groups,
  unbiased_variance,
):
  """Batch norm with statistics per group of ``virtual_batch_size`` leading rows.

  ``inputs`` are ``bnjax.batch_norm``'s, prepared; returns ``(y, new_state)``
  (``new_state`` None for a ``state`` of None: no update, and no collective).
  """
  x = inputs.x
  if (
    isinstance(virtual_batch_size, bool)
    or not isinstance(virtual_batch_size, int)
    or virtual_batch_size <= 0
  ):
    raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
  if 0 in inputs.features:
    raise ValueError(
      "virtual_batch_size splits the leading axis, which must be a batch axis, "
      f"not a feature axis (axis={inputs.features})"
    )
  if x.shape[0] % virtual_batch_size:
    raise ValueError(
      f"virtual_batch_size {virtual_batch_size} does not divide the batch of "
      f"{x.shape[0]} (x.shape={x.shape})"
    )
  groups = x.shape[0] // virtual_batch_size
  grouped_features = (0,) + tuple(a + 1 for a in inputs.features)
  grouped_shape = (groups, virtual_batch_size) + x.shape[1:]

  def per_group(p):
    # Widened before the copies, so that their gradients add up in float32 and are
    # rounded to a half-precision parameter's dtype once.
    if p is None:
      return None
    return jnp.broadcast_to(p.astype(stats.statistics_dtype(p.dtype)), (groups,) + p.shape)

  mask = inputs.mask
  if mask is not None:
    leading = (groups, virtual_batch_size) if mask.shape[0] > 1 else (1, 1)
    mask = mask.reshape(leading + mask.shape[1:])
  grouped = _engine.Inputs(
    x=_reshape_batch(x, grouped_shape),
    scale=per_group(inputs.scale),
    bias=per_group(inputs.bias),
    mask=mask,
    features=grouped_features,
    reduction_axes=tuple(a for a in range(x.ndim + 1) if a not in grouped_features),
    out_dtype=inputs.out_dtype,
  )
  config = _engine.training_config(grouped, epsilon, None, None)
  y, moments, _ = _engine.normalize_training(config, grouped)
  if state is None:
    return _reshape_batch(y, x.shape), None
  # The mean over the groups (of every device of axis_name) that define each
  # statistic: a fully masked (padding) group defines none.
  has_mean = moments.count > 0
  has_var = _engine.has_variance(moments.count, unbiased_variance)
  batch_var = _engine.batch_variance(moments, unbiased_variance)
  sums = (
    jnp.sum(jnp.where(has_mean, moments.mean, jnp.zeros((), moments.mean.dtype)), axis=0),
    jnp.sum(has_mean, axis=0, dtype=jnp.float32),
    jnp.sum(jnp.where(has_var, batch_var, jnp.zeros((), batch_var.dtype)), axis=0),
    jnp.sum(has_var, axis=0, dtype=jnp.float32),
  )
  if axis_name is not None:
    sums = collectives.psum(sums, axis_name, axis_index_groups)
  mean_sum, mean_groups, var_sum, var_groups = sums
  mean = mean_sum / jnp.maximum(mean_groups, 1).astype(mean_sum.dtype)
  var = var_sum / jnp.maximum(var_groups, 1)
  return _reshape_batch(y, x.shape), _engine.moved_state(
    state, mean, var, momentum, has_mean=mean_groups > 0, has_var=var_groups > 0
  )


def _reshape_batch(x, shape):
  """``x.reshape(shape)``, splitting or merging the leading axis. Where ``x``'s
  type shards that axis explicitly (``jit`` over a mesh of ``Explicit`` axes),
  the result is sharded on whichever of the split axes the devices divide: the
  groups (each group on its own devices, no communication) or else the examples
  within each group (a reshard)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", None) or ())
  spec = spec + (None,) * (x.ndim - len(spec))
  merging = len(shape) < x.ndim  # [groups, examples, ...] back to [batch, ...]
  if not any(spec[: 2 if merging else 1]):
    return x.reshape(shape)
  if merging:
    merged = P(spec[0] or spec[1], *spec[2:])
    return lax.reshape(x, shape, out_sharding=sharding.update(spec=merged))
  blocks = collectives.shards_along(x, 0)
  rest = spec[1:]
  if shape[0] % blocks == 0:
    out = P(spec[0], None, *rest)
  elif shape[1] % blocks == 0:
    out = P(None, spec[0], *rest)
  else:
    raise ValueError(
      f"virtual_batch_size {shape[1]} splits a batch of {x.shape[0]} sharded over {blocks} "
      "devices into groups that neither a whole number of devices nor of examples per device "
      "can hold; choose a virtual batch size that is a multiple or a divisor of the examples "
      "per device"
    )
  return lax.reshape(x, shape, out_sharding=sharding.update(spec=out))
