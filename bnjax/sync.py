"""Averaging per-device running statistics before evaluation.

Some training set-ups (the Flax ImageNet example among them) normalize each
device's batch with its own statistics and let each device keep its own running
averages; before evaluating, those are averaged across devices.
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
from jax import lax

from bnjax import _recording
from bnjax.batch_norm import BatchNormState


@_recording.recorded_sync  # bnjax.describe sees which axes it averages over
def sync_state(state: BatchNormState, axis_name: Hashable) -> BatchNormState:
  """The mean across the devices of ``axis_name`` of each running statistic.

  Inside ``pmap``/``shard_map``. Any pytree of statistics works (a whole Flax
  ``batch_stats`` collection too). The result is the same on every device.

  Args:
    state: this device's ``BatchNormState`` (or pytree of them).
    axis_name: the named axis to average over.

  Returns:
    The averaged state, of the same structure, shapes (``[*F]`` per statistic)
    and dtypes.

  Raises:
    NameError: ``axis_name`` is not bound (called outside ``pmap``/``shard_map``).

  >>> import jax.numpy as jnp
  >>> states = BatchNormState(mean=jnp.array([[0.0], [2.0]]), var=jnp.array([[1.0], [3.0]]))
  >>> synced = jax.pmap(lambda s: sync_state(s, "i"), axis_name="i", devices=jax.devices()[:1])(
  ...     jax.tree.map(lambda a: a[:1], states))
  >>> synced.var.tolist()
  [[1.0]]
  """
  return jax.tree.map(lambda statistic: lax.pmean(statistic, axis_name), state)
