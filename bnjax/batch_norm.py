"""Batch normalization as a pure function that threads its statistics as state.

    params, state = init(num_features)
    y, state = batch_norm(x, params, state, training=True)    # Algorithm 1
    y, _ = batch_norm(x, params, state, training=False)       # inference

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", 2015 (arXiv:1502.03167).

Nothing is hidden: the learned affine transform is ``params``, the running
statistics are ``state``, and the updated statistics come back as a value. In
training mode the function normalizes with the statistics of the batch (all devices
of ``axis_name`` together) and returns the state moved towards them; in inference
mode it normalizes with the state's statistics and returns the state unchanged.

The training path has a hand-written derivative (``jax.custom_jvp``): the
statistics are computed once, in the forward pass, and the derivative needs only
``sum(dx)`` and ``sum(dx * (x - mean))`` per feature (and, transposed for the
backward pass, ``sum(dy)`` and ``sum(dy * (x - mean))``, Section 3 of the paper),
reduced across devices in one collective. Being a JVP rule it serves forward mode,
reverse mode and higher orders alike.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from bnjax import moving_average, stats, validation
from bnjax.stats import Moments, expand_to_input


class BatchNormParams(NamedTuple):
  """The learned affine transform ``y = scale * x_hat + bias`` (gamma, beta).

  Either field may be None: no scale (gamma = 1) or no bias (beta = 0).
  ``F`` is the feature shape, ``(C,)`` for one feature axis.
  """

  scale: jax.Array | None  # [*F], param dtype (float32 by default): gamma
  bias: jax.Array | None  # [*F], param dtype (float32 by default): beta


class BatchNormState(NamedTuple):
  """Running statistics used in inference mode, updated in training mode."""

  mean: jax.Array  # [*F], float32: running average of batch means
  var: jax.Array  # [*F], float32: running average of batch variances (biased)


def init(
    num_features: int | Sequence[int], *, dtype=jnp.float32
) -> tuple[BatchNormParams, BatchNormState]:
  """Identity parameters and neutral state: scale 1, bias 0, mean 0, var 1.

  Args:
    num_features: ``C``, or the feature shape ``F`` for several feature axes.
    dtype: dtype of the parameters. The state is always float32.

  Returns:
    ``(params, state)`` with ``[*F]`` fields.

  >>> params, state = init(3)
  >>> params.scale, state.var
  (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
  """
  shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
  params = BatchNormParams(scale=jnp.ones(shape, dtype), bias=jnp.zeros(shape, dtype))
  state = BatchNormState(
      mean=jnp.zeros(shape, jnp.float32), var=jnp.ones(shape, jnp.float32)
  )
  return params, state


def batch_norm(
    x: jax.Array,
    params: BatchNormParams | None,
    state: BatchNormState,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | jax.Array = 0.99,
    epsilon: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    unbiased_variance: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch normalization: ``y = scale * (x - mean) / sqrt(var + epsilon) + bias``.

  Statistics are per feature (the ``axis`` entries of ``x``), over every other
  axis: the batch and, for images, the spatial positions (Section 3.2).

  * ``training=True``: ``mean`` and ``var`` are the batch's (Algorithm 1; ``var``
    is the biased variance, divided by the number of values ``m``), exact in
    float32 even when ``|mean| >> std``. With ``axis_name`` they are those of the
    global batch, all devices of that named axis together (or each group of
    ``axis_index_groups``), exchanged in one collective. The returned state is
    ``momentum * state + (1 - momentum) * batch`` for both fields.
  * ``training=False``: ``mean`` and ``var`` come from ``state``, which is returned
    unchanged.

  Under ``jax.jit`` with ``x`` sharded over devices (a ``NamedSharding`` on the batch
  axis), leave ``axis_name=None``: the statistics are already those of the global
  array, and XLA inserts the cross-device sums.

  Args:
    x: ``[..., *F, ...]`` floating or complex input (float32, bfloat16, float16, ...).
    params: ``BatchNormParams`` of shape ``[*F]``, or None for no affine transform.
    state: ``BatchNormState`` of shape ``[*F]``.
    training: Python bool; see above.
    axis: the feature axis or axes of ``x``.
    momentum: weight of the old running statistics, in [0, 1]; may be traced.
    epsilon: added to the variance before the square root; positive.
    axis_name: named axis (``pmap``/``shard_map``) to synchronize statistics over.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean, True for valid entries, of ``x``'s rank and
      broadcastable to it (``[N, L, 1]`` for ``x: [N, L, C]``) or of ``x``'s shape
      without the feature axes (``[N, L]``). Masked-out entries (even NaN or inf)
      enter neither the statistics nor the gradients of valid entries; they are
      still normalized in ``y``.
    unbiased_variance: if True, the running variance is updated with the unbiased
      batch variance ``m / (m - 1) * var``, as the paper's inference statistics
      use (Algorithm 2); the batch itself is always normalized with the biased one.
    dtype: dtype of ``y``; default ``x.dtype``. Statistics are computed in at
      least float32 whatever the dtype.

  Returns:
    ``(y, new_state)``: ``y`` of ``x``'s shape, and the updated state (``state``
    itself when not training).

  Raises:
    TypeError: ``training`` not a Python bool, ``x`` not floating, ``mask`` not boolean.
    ValueError: ``axis`` out of range, ``params``/``state`` not of the feature
      shape of ``x``, ``mask`` not broadcastable, ``momentum`` outside [0, 1],
      ``epsilon`` not positive.

  >>> params, state = init(2)
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> y, state = batch_norm(x, params, state, training=True, momentum=0.9)
  >>> y.round(3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> state.mean.tolist()
  [0.2, 2.0]
  """
  validation.check_training(training)
  validation.check_floating("x", x)
  validation.check_momentum(momentum)
  validation.check_epsilon(epsilon)
  x = jnp.asarray(x)
  features = validation.feature_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in features)
  feature_shape = tuple(x.shape[a] for a in features)
  scale, bias = (None, None) if params is None else params
  for name, value in [
      ("params.scale", scale),
      ("params.bias", bias),
      ("state.mean", state.mean),
      ("state.var", state.var),
  ]:
    validation.check_feature_shape(name, value, feature_shape, x.shape, axis)
  mask = validation.canonical_mask(mask, x.shape, features)
  out_dtype = jnp.dtype(x.dtype if dtype is None else dtype)

  if not training:
    inv_std = lax.rsqrt(state.var + jnp.asarray(epsilon, state.var.dtype))
    y = _normalize(x, state.mean, inv_std, scale, bias, reduction_axes, out_dtype)
    return y, state

  config = _TrainingConfig(
      reduction_axes=reduction_axes,
      epsilon=float(epsilon),
      axis_name=axis_name,
      axis_index_groups=validation.canonical_axis_index_groups(axis_index_groups),
      out_dtype=out_dtype,
  )
  if jnp.iscomplexobj(x):
    # Complex inputs differentiate through the same forward pass by autodiff.
    y, moments, _, _ = _train_forward(config, x, scale, bias, mask)
  else:
    y, moments = _train_normalize(config, x, scale, bias, mask)
  batch_var = moments.unbiased_variance if unbiased_variance else moments.variance
  new_state = BatchNormState(
      mean=moving_average.update_moving_average(
          state.mean, moments.mean, momentum=momentum
      ),
      var=moving_average.update_moving_average(state.var, batch_var, momentum=momentum),
  )
  return y, new_state


class _TrainingConfig(NamedTuple):
  """The static (hashable) arguments of the training-mode custom VJP."""

  reduction_axes: tuple[int, ...]
  epsilon: float
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  out_dtype: jnp.dtype


def _compute_dtype(x, *params) -> jnp.dtype:
  return stats.statistics_dtype(x.dtype, *(p.dtype for p in params if p is not None))


def _normalize(x, mean, inv_std, scale, bias, reduction_axes, out_dtype):
  """``(x - mean) * (scale * inv_std) + bias`` in the compute dtype, then cast.

  Subtracting the mean before scaling keeps large offsets exact.
  """
  dtype = _compute_dtype(x, scale, bias)
  gain = inv_std.astype(dtype)
  if scale is not None:
    gain = gain * scale.astype(dtype)
  y = x.astype(dtype) - expand_to_input(mean.astype(dtype), reduction_axes)
  y = y * expand_to_input(gain, reduction_axes)
  if bias is not None:
    y = y + expand_to_input(bias.astype(dtype), reduction_axes)
  return y.astype(out_dtype)


def _train_forward(config: _TrainingConfig, x, scale, bias, mask):
  """Batch moments, then normalize: returns ``(y, moments, inv_std, shift)``.

  ``shift`` is this device's shift (see ``bnjax.stats``), close to the mean; the
  derivative works with ``x - shift`` too, a cheaper operand than ``x - mean``.
  """
  local = stats.local_moments(x, reduction_axes=config.reduction_axes, mask=mask)
  if config.axis_name is None:
    moments = local.moments
  else:
    moments = stats.all_gather_moments(local, config.axis_name, config.axis_index_groups)
  inv_std = lax.rsqrt(moments.variance + config.epsilon)
  y = _normalize(x, moments.mean, inv_std, scale, bias, config.reduction_axes, config.out_dtype)
  return y, moments, inv_std, local.shift


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(config: _TrainingConfig, x, scale, bias, mask):
  """Training-mode batch norm of real ``x``: returns ``(y, Moments)``."""
  y, moments, _, _ = _train_forward(config, x, scale, bias, mask)
  return y, moments


def _train_normalize_jvp(config: _TrainingConfig, primals, tangents):
  x, scale, bias, mask = primals
  x_dot, scale_dot, bias_dot, _ = (
      None if isinstance(t, SymbolicZero) else t for t in tangents
  )
  y, moments, inv_std, shift = _train_forward(config, x, scale, bias, mask)
  # Rematerialized: reverse mode saves x (not x - mean) and recomputes the rest.
  tangent = jax.checkpoint(functools.partial(_train_tangent, config))(
      x, shift, moments.mean, inv_std, moments.count, scale, mask, x_dot, scale_dot, bias_dot
  )
  y_dot, mean_dot, m2_dot = tangent
  moments_dot = Moments(count=jnp.zeros_like(moments.count), mean=mean_dot, m2=m2_dot)
  return (y, moments), (y_dot, moments_dot)


def _train_tangent(
    config: _TrainingConfig, x, shift, mean, inv_std, count, scale, mask, x_dot, scale_dot, bias_dot
):
  """The linear map from input tangents to output tangents of training-mode BN.

  With ``c = x - mean``, ``r = 1 / sqrt(var + eps)`` and global sums over the ``N``
  valid values ``S0 = sum(x_dot)``, ``S1 = sum(c * x_dot)`` (one ``psum``):

      mean_dot = S0 / N,   m2_dot = 2 * S1,   r_dot = -r^3 * S1 / N
      y_dot = scale * r * (x_dot - mean_dot) + (scale * r_dot + scale_dot * r) * c + bias_dot

  Reverse mode transposes this map: ``dx = scale * r * dy`` plus, on valid entries,
  a per-feature affine function of ``c`` built from ``sum(dy)`` and
  ``sum(dy * c)``, the backward pass of Section 3 of the paper, again with one
  ``psum``. Entries outside the mask reach ``y`` through ``c`` and ``r`` but not the
  statistics; where they are not finite, they are taken as ``c = 0`` in the
  tangent, so that a zero cotangent there contributes zero.

  Every full-size term is written with ``x - shift`` (``shift`` is this device's
  shift, within a few standard deviations of the mean) and per-feature
  corrections by ``mean - shift``: exactly the same map, but XLA fuses a
  subtraction of a reduction's output into the reductions that consume it.
  """
  axes = config.reduction_axes
  dtype = _compute_dtype(x, scale)
  real_dtype = jnp.finfo(dtype).dtype
  zero = jnp.zeros((), dtype)
  shift = shift.astype(dtype)
  mean_offset = mean.astype(dtype) - shift  # [*F]: c = (x - shift) - mean_offset
  centered = x.astype(dtype) - expand_to_input(shift, axes)
  if mask is not None:
    centered = jnp.where(mask | jnp.isfinite(centered), centered, zero)
  gain = inv_std if scale is None else inv_std * scale.astype(real_dtype)
  scale_value = jnp.ones((), real_dtype) if scale is None else scale.astype(real_dtype)

  if x_dot is None:
    mean_dot = jnp.zeros_like(mean)
    m2_dot = jnp.zeros_like(count)
    inv_std_dot = jnp.zeros_like(inv_std)
  else:
    x_dot = x_dot.astype(dtype)
    valid_x_dot = x_dot if mask is None else jnp.where(mask, x_dot, zero)
    sum_x_dot = jnp.sum(valid_x_dot, axes)
    # sum(c * x_dot) on this device, from sums around its shift:
    sum_centered_x_dot = jnp.sum(centered * valid_x_dot, axes) - mean_offset * sum_x_dot
    sums = jnp.stack([sum_x_dot, sum_centered_x_dot])
    if config.axis_name is not None:
      sums = lax.psum(sums, config.axis_name, axis_index_groups=config.axis_index_groups)
    sum_x_dot, sum_centered_x_dot = sums[0], sums[1]
    mean_dot = sum_x_dot / count
    m2_dot = 2 * sum_centered_x_dot
    inv_std_dot = -(inv_std**3) * sum_centered_x_dot / count

  slope = scale_value * inv_std_dot
  if scale_dot is not None:
    slope = slope + scale_dot.astype(real_dtype) * inv_std
  offset = -gain * mean_dot - slope * mean_offset
  if bias_dot is not None:
    offset = offset + bias_dot.astype(dtype)
  y_dot = expand_to_input(slope, axes) * centered + expand_to_input(offset, axes)
  if x_dot is not None:
    y_dot = y_dot + expand_to_input(gain, axes) * x_dot
  return y_dot.astype(config.out_dtype), mean_dot, m2_dot


_train_normalize.defjvp(_train_normalize_jvp, symbolic_zeros=True)
