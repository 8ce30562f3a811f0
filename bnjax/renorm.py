"""Batch renormalization (Ioffe, 2017, arXiv:1702.03275) as a pure function.

In training, batch norm's output depends on the batch it is in; at inference, on
the running statistics. Batch renormalization makes training use the running
statistics too, through two per-feature corrections that are constants to the
gradient:

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

with ``sigma_B = sqrt(var_B + epsilon)`` of the batch and ``mu``,
``sigma = sqrt(var + epsilon)`` of the running statistics. With ``r = 1, d = 0``
(``r_max = 1, d_max = 0``) it is batch norm; the paper starts there and relaxes
``r_max`` and ``d_max`` on a schedule, which is why both may be traced scalars.
Inference is batch norm's. The running statistics are updated as batch norm's
(``var`` is the running variance), so a batch-norm checkpoint continues with
batch renormalization and back.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bnjax import _engine, _recording, validation
from bnjax.batch_norm import BatchNormParams, BatchNormState
from bnjax.moving_average import MovingAverageWeights


def _check_limit(name: str, value, lowest: float) -> None:
  if isinstance(value, numbers.Real) or (
    isinstance(value, (jax.Array, jnp.ndarray))
    and not isinstance(value, jax.core.Tracer)
    and jnp.ndim(value) == 0
  ):
    if not float(value) >= lowest:
      raise ValueError(f"{name} must be >= {lowest}, got {float(value)}")
  elif jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")


@_recording.recorded("batch_renorm")  # bnjax.describe sees the call
def batch_renorm(
  x: jax.Array,
  params: BatchNormParams | None,
  state: BatchNormState,
  *,
  training: bool,
  r_max,
  d_max,
  momentum: float | jax.Array | MovingAverageWeights = 0.99,
  epsilon: float = 1e-5,
  axis: int | Sequence[int] = -1,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  mask: jax.Array | None = None,
  dtype: Any = None,
  update_stats: bool | None = None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch renormalization; arguments and returns as ``bnjax.batch_norm``.

  Args:
    x: ``[..., *F, ...]`` real floating input.
    params: ``BatchNormParams`` of shape ``[*F]``, or None.
    state: ``BatchNormState``: the running ``mu`` and ``sigma^2`` the
      corrections pull the batch towards.
    training: Python bool.
    r_max: bound on ``r``, >= 1 (1 is batch norm); may be a traced scalar.
    d_max: bound on ``|d|``, >= 0 (0 is batch norm); may be a traced scalar.
    momentum, epsilon, axis, axis_name, axis_index_groups, mask, dtype: as
      ``bnjax.batch_norm``.
    update_stats: as ``bnjax.batch_norm``: whether the state moves (default
      ``training``), apart from which statistics normalize.

  Returns:
    ``(y, new_state)``: ``y`` of ``x``'s shape (dtype ``dtype``, default
    ``x.dtype``), and the state moved towards the batch's statistics (``state``
    itself when not training).

  Raises:
    ValueError: ``r_max < 1`` or ``d_max < 0`` (when concrete), either not a
      scalar, or as ``bnjax.batch_norm``.
    TypeError: as ``bnjax.batch_norm``, and for complex ``x``.

  >>> import bnjax
  >>> params, state = bnjax.init(1)
  >>> x = jnp.array([[1.0], [3.0]])  # batch mean 2, std 1; running: 0 and 1
  >>> y, _ = batch_renorm(x, params, state, training=True, r_max=1.0, d_max=5.0)
  >>> y.ravel().round(3).tolist()  # x_hat + d with d = (2 - 0) / 1
  [1.0, 3.0]
  """
  _check_limit("r_max", r_max, 1.0)
  _check_limit("d_max", d_max, 0.0)
  validation.check_training(training)
  update_stats = validation.update_stats_flag(update_stats, training)
  inputs = _engine.prepare(
    x,
    params,
    state,
    training=training,
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    mask=mask,
    dtype=dtype,
    update_stats=update_stats,
  )
  if not (training or update_stats):
    return _engine.normalize_inference(inputs, state, epsilon), state
  correction = _engine.RenormCorrection(
    running_mean=state.mean, running_var=state.var, r_max=r_max, d_max=d_max
  )
  config = _engine.training_config(inputs, epsilon, axis_name, axis_index_groups)
  update = _engine.state_update(state, momentum) if update_stats else None
  y, _, new_state = _engine.normalize_training(config, inputs, correction, update)
  if not training:  # the running statistics normalize; the batch's move them
    y = _engine.normalize_inference(inputs, state, epsilon)
  return y, new_state if update_stats else state
