"""The engine under ``bnjax.batch_norm`` and ``bnjax.batch_renorm`` (private).

Validation and canonical arguments (``prepare``), inference and training-mode
normalization, and the training path's hand-written derivative (``jax.custom_jvp``):
the statistics are computed once, in the forward pass, and the derivative needs only
``sum(dx)`` and ``sum(dx * (x - mean))`` per feature (and, transposed for the
backward pass, ``sum(dy)`` and ``sum(dy * (x - mean))``, Section 3 of the paper),
reduced across devices in one collective. Being a JVP rule it serves forward mode,
reverse mode and higher orders alike. The running statistics are updated inside it
too, in the same branch of ``bnjax.stats.local_moments`` that computed the moments:
there XLA fuses every per-feature step into a few kernels.

Nothing here is public API: ``bnjax/__init__.py`` says what is. The variants build
on it from their own modules (``bnjax.ghost``, ``bnjax.renorm``).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from bnjax import _fusion, collectives, moving_average, stats, validation
from bnjax.stats import Moments, expand_to_input


class Inputs(NamedTuple):
  """Validated arguments of a normalization call, in canonical form."""

  x: jax.Array
  scale: jax.Array | None  # [*F]
  bias: jax.Array | None  # [*F]
  mask: jax.Array | None  # x's rank, each axis 1 or x's size
  features: tuple[int, ...]  # sorted feature axes
  reduction_axes: tuple[int, ...]  # the other axes
  out_dtype: jnp.dtype


def prepare(
  x, params, state, *, training, axis, momentum, epsilon, mask, dtype, update_stats=False
) -> Inputs:
  """Checks every argument (errors name the problem) and canonicalizes them;
  ``axis_name`` and ``axis_index_groups`` are checked where they are used, inside
  the mapped function (``training_config``, ``bnjax.collectives.psum``). The batch
  needs values to reduce where its statistics normalize (``training``) or move the
  state (``update_stats``)."""
  validation.check_training(training)
  validation.check_floating("x", x)
  validation.check_momentum(momentum)
  validation.check_epsilon(epsilon)
  x = jnp.asarray(x)
  axes = validation.input_axes(x.shape, axis)
  if training or update_stats:
    validation.check_reduction(x.shape, axes.features)
  scale, bias = (None, None) if params is None else params
  validation.check_floating_fields("params", [("scale", scale), ("bias", bias)])
  validation.check_floating_fields("state", [("mean", state.mean), ("var", state.var)])
  for name, value in [
    ("params.scale", scale),
    ("params.bias", bias),
    ("state.mean", state.mean),
    ("state.var", state.var),
  ]:
    validation.check_feature_shape(name, value, axes.feature_shape, x.shape, axis)
  return Inputs(
    x=x,
    scale=scale,
    bias=bias,
    mask=validation.canonical_mask(mask, x.shape, axes.features),
    features=axes.features,
    reduction_axes=axes.reduction,
    out_dtype=jnp.dtype(x.dtype if dtype is None else dtype),
  )


def normalize_inference(inputs: Inputs, state, epsilon: float) -> jax.Array:
  """Inference mode: normalize with the running statistics (in at least float32,
  also when they are stored in half precision)."""
  var = state.var.astype(stats.statistics_dtype(state.var.dtype))
  inv_std = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
  return _normalize(
    inputs.x,
    state.mean,
    None,
    inv_std,
    inputs.scale,
    inputs.bias,
    inputs.reduction_axes,
    inputs.out_dtype,
  )


class TrainingConfig(NamedTuple):
  """The static (hashable) arguments of the training-mode custom derivative."""

  reduction_axes: tuple[int, ...]
  epsilon: float
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  out_dtype: jnp.dtype
  unbiased_variance: bool  # which batch variance the running variance moves towards
  # The sizes of axis_name's axes, asked before the custom derivative, inside which a
  # vmap's may be unknown (bnjax.collectives.axis_sizes); None without axis_name.
  axis_sizes: tuple[int, ...] | None = None
  # Whether axis_name's axes are devices' (bnjax.collectives.are_device_axes), asked
  # where they are bound: they exchange O(F) sums; a vmap's gathers every row.
  device_axes: bool = False


def training_config(
  inputs: Inputs, epsilon, axis_name, axis_index_groups, *, unbiased_variance=False
) -> TrainingConfig:
  return TrainingConfig(
    reduction_axes=inputs.reduction_axes,
    epsilon=float(epsilon),
    axis_name=axis_name,
    axis_index_groups=validation.canonical_axis_index_groups(axis_index_groups),
    out_dtype=inputs.out_dtype,
    unbiased_variance=unbiased_variance,
    axis_sizes=None if axis_name is None else collectives.axis_sizes(axis_name),
    device_axes=axis_name is not None and collectives.are_device_axes(axis_name),
  )


class RenormCorrection(NamedTuple):
  """What batch renormalization needs besides the batch (Ioffe, 2017): the
  ``correction`` of ``normalize_training`` (``bnjax.batch_renorm`` builds it)."""

  running_mean: jax.Array  # [*F]
  running_var: jax.Array  # [*F]
  r_max: jax.Array  # [], >= 1
  d_max: jax.Array  # [], >= 0


def renorm_factors(correction: RenormCorrection, mean, inv_std, epsilon):
  """``(r, d)`` for the batch's ``mean: [*F]`` and ``inv_std: [*F]``:
  ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma,
  -d_max, d_max)``, held constant in the derivative (stop_gradient)."""
  dtype = inv_std.dtype
  running_inv_std = lax.rsqrt(correction.running_var.astype(dtype) + epsilon)
  r_max = jnp.asarray(correction.r_max).astype(dtype)
  d_max = jnp.asarray(correction.d_max).astype(dtype)
  r = jnp.clip(running_inv_std / inv_std, 1 / r_max, r_max)
  running_mean = correction.running_mean.astype(dtype)
  d = jnp.clip((mean.astype(dtype) - running_mean) * running_inv_std, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


class StateUpdate(NamedTuple):
  """The running statistics that ``normalize_training`` moves towards the batch's,
  in the same pass (``updated_state``); ``state_update`` builds one."""

  state: Any  # a BatchNormState of [*F] arrays
  momentum: moving_average.MovingAverageWeights  # [] each: the old and the new value's weight


def state_update(state, momentum) -> StateUpdate:
  """``StateUpdate`` of ``state`` with ``momentum`` (a number, a traced scalar or
  ``MovingAverageWeights``), as arrays: a Python float's ``1 - momentum`` is taken
  in double here, before anything rounds it (``moving_average_weights``)."""
  dtype = moving_average.widest_real(*(statistic.dtype for statistic in state))
  return StateUpdate(state, moving_average.moving_average_weights(momentum, dtype))


def normalize_training(
  config: TrainingConfig,
  inputs: Inputs,
  correction: RenormCorrection | None = None,
  update: StateUpdate | None = None,
) -> tuple[jax.Array, Moments, Any]:
  """Training mode: normalize with the batch's moments; returns ``(y, moments,
  new_state)``, ``new_state = updated_state(config, update, moments)`` (None without
  an ``update``).

  With a ``correction`` (batch renormalization) the output becomes ``(x_hat * r +
  d) * scale + bias``, ``(r, d) = renorm_factors(correction, ...)``.
  """
  args = (inputs.x, inputs.scale, inputs.bias, inputs.mask, correction, update)
  if not jnp.iscomplexobj(inputs.x):
    return _train_normalize(config, *args)
  # Complex inputs: autodiff differentiates the forward pass itself.
  if correction is not None:
    raise TypeError("batch renormalization supports real inputs only")
  if inputs.mask is None:
    forward = _train_forward(config, *args)
    return forward.y, forward.statistics.moments, forward.statistics.new_state
  # Masked-out entries that are not finite would make 0 * NaN in autodiff's
  # backward pass: differentiate a copy where they are 0, and give them their own
  # (non-finite) output without a derivative.
  keep = inputs.mask | jnp.isfinite(inputs.x)
  safe_x = jnp.where(keep, inputs.x, jnp.zeros((), inputs.x.dtype))
  y, statistics = _train_forward(config, safe_x, *args[1:])
  unsafe_y = _apply(
    inputs.x,
    statistics.moments.mean,
    statistics.gain,
    statistics.shifted_bias,
    config.reduction_axes,
  ).astype(config.out_dtype)  # only where y is not finite
  return jnp.where(keep, y, lax.stop_gradient(unsafe_y)), statistics.moments, statistics.new_state


def updated_state(config: TrainingConfig, update: StateUpdate, moments: Moments):
  """The state of ``update`` moved towards the batch's ``moments`` (a
  ``BatchNormState``): the mean, and the biased or unbiased variance as
  ``config`` says."""
  has_var = has_variance(moments.count, config.unbiased_variance)
  return moved_state(
    update.state,
    moments.mean,
    batch_variance(moments, config.unbiased_variance),
    update.momentum,
    has_mean=moments.count > 0,
    has_var=has_var,
  )


def moved_state(state, batch_mean, batch_var, momentum, *, has_mean, has_var):
  """``momentum * state + (1 - momentum) * batch``, for both statistics; a
  statistic the batch does not define (``has_mean``/``has_var`` False: no valid
  value, or one only for an unbiased variance) leaves the state as it was.
  ``state`` is a ``BatchNormState``; so is the result."""

  def update(old, new, defined):
    moved = moving_average.update_moving_average(
      old, jnp.where(defined, new, jnp.zeros((), new.dtype)), momentum=momentum
    )
    return jnp.where(defined, moved, old.astype(moved.dtype))

  return state._replace(
    mean=update(state.mean, batch_mean, has_mean), var=update(state.var, batch_var, has_var)
  )


def batch_variance(moments: Moments, unbiased: bool) -> jax.Array:
  """The batch variance the running statistics move towards."""
  return moments.unbiased_variance if unbiased else moments.variance


def has_variance(count, unbiased: bool):
  """Whether ``count`` values define that variance (two for the unbiased one)."""
  return count > (1 if unbiased else 0)


def _compute_dtype(x_dtype, *params) -> jnp.dtype:
  return stats.statistics_dtype(x_dtype, *(p.dtype for p in params if p is not None))


def _normalize(x, shift, offset, inv_std, scale, bias, reduction_axes, out_dtype):
  """``(x - mean) * gain + bias`` with ``gain = scale * inv_std`` and the mean
  given as ``shift + offset``, computed as ``(x - shift) * gain + (bias - offset *
  gain)`` in the compute dtype, then cast.

  ``x - shift`` is exact where ``x`` is near the shift (within a factor of two),
  so large offsets cost no precision when ``offset`` carries what the shift
  misses of the mean. ``offset`` None is 0.
  """
  gain, shifted_bias = _gain_and_shifted_bias(x.dtype, offset, inv_std, scale, bias)
  return _apply(x, shift, gain, shifted_bias, reduction_axes).astype(out_dtype)


def _gain_and_shifted_bias(x_dtype, offset, inv_std, scale, bias):
  """The per-feature half of ``_normalize``: ``gain = scale * inv_std`` and
  ``bias - offset * gain`` (None for no bias and no offset), in the compute dtype."""
  dtype = _compute_dtype(x_dtype, scale, bias)
  gain = inv_std.astype(dtype)
  if scale is not None:
    gain = gain * scale.astype(dtype)
  shifted_bias = None if offset is None else -offset.astype(dtype) * gain
  if bias is not None:
    shifted_bias = bias.astype(dtype) if shifted_bias is None else shifted_bias + bias.astype(dtype)
  return gain, shifted_bias


def _apply(x, shift, gain, shifted_bias, reduction_axes):
  """The full-size half of ``_normalize``: ``(x - shift) * gain + shifted_bias``
  in ``gain``'s dtype."""
  y = x.astype(gain.dtype) - expand_to_input(shift.astype(gain.dtype), reduction_axes)
  y = y * expand_to_input(gain, reduction_axes)
  if shifted_bias is not None:
    y = y + expand_to_input(shifted_bias, reduction_axes)
  return y


class _Statistics(NamedTuple):
  """What the training pass derives per feature, ``[*F]``, from the batch's moments.

  Computed in one function (``_statistics``) so that, without ``axis_name``, it
  runs inside the branch of ``stats.local_moments`` that computed the moments:
  XLA fuses the per-feature work there, where across the branch's boundary it
  would launch a kernel for each piece.
  """

  moments: Moments  # the batch's (every device's, with axis_name)
  shift: jax.Array  # this device's shift (see bnjax.stats), close to the mean
  mean_offset: jax.Array  # mean - shift, to the last digit
  inv_std: jax.Array  # 1 / sqrt(var + epsilon)
  renorm: tuple[jax.Array, jax.Array] | None  # (r, d) with a correction, else None
  gain: jax.Array  # scale * inv_std (* r), in the compute dtype
  # y = (x - moments.mean) * gain + shifted_bias, with moments.mean rounded to its
  # dtype and shifted_bias = bias (+ scale * d) - (that rounding) * gain
  shifted_bias: jax.Array | None
  new_state: Any  # updated_state(...), or None without an update


def _statistics(config, local, combined, x_dtype, scale, bias, correction, update) -> _Statistics:
  """``_Statistics`` from this device's moments ``local`` and the batch's ``combined``
  (the same without ``axis_name``)."""
  moments = combined.moments
  mean_offset = (combined.shift - local.shift) + combined.offset
  # var is 0, not NaN, where no value is valid: normalization yields no NaN there.
  inv_std = lax.rsqrt(moments.var + config.epsilon)
  renorm = None
  if correction is not None:
    # (x_hat * r + d) * scale + bias == x_hat * (scale * r) + (bias + scale * d)
    r, d = renorm = renorm_factors(correction, moments.mean, inv_std, config.epsilon)
    scale_value = jnp.ones_like(r) if scale is None else scale.astype(r.dtype)
    bias = scale_value * d if bias is None else bias.astype(d.dtype) + scale_value * d
    scale = scale_value * r
  # x - mean = (x - rounded_mean) - rounding, with the rounding of the mean to
  # its dtype known to the last digit: exact like normalizing around the shift,
  # but a subtraction apart from the statistics' x - shift, which XLA then fuses
  # as it fuses two-pass batch norm (sharing x - shift measured 10-20% slower).
  rounding = (local.shift - moments.mean) + mean_offset
  gain, shifted_bias = _gain_and_shifted_bias(x_dtype, rounding, inv_std, scale, bias)
  return _Statistics(
    moments=moments,
    shift=local.shift,
    mean_offset=mean_offset,
    inv_std=inv_std,
    renorm=renorm,
    gain=gain,
    shifted_bias=shifted_bias,
    new_state=None if update is None else updated_state(config, update, moments),
  )


class _Forward(NamedTuple):
  y: jax.Array  # x's shape, config.out_dtype
  statistics: _Statistics


def _train_forward(config: TrainingConfig, x, scale, bias, mask, correction, update) -> _Forward:
  """Batch moments, their per-feature consequences (``_Statistics``), then ``y``.

  The output and the derivative work with ``x - shift``, an exact and cheaper
  operand than ``x - mean``.
  """
  finish = functools.partial(
    _statistics,
    config,
    x_dtype=x.dtype,
    scale=scale,
    bias=bias,
    correction=correction,
    update=update,
  )
  axes = config.reduction_axes
  if config.axis_name is None:
    statistics = stats.local_moments(
      x, reduction_axes=axes, mask=mask, finish=lambda moments: finish(moments, moments)
    )
  elif not config.device_axes:
    local = stats.local_moments(x, reduction_axes=axes, mask=mask)
    combined = stats.all_gather_moments(
      local, config.axis_name, config.axis_index_groups, config.axis_sizes
    )
    statistics = finish(local, combined)
  else:
    moments = stats.synchronized_moments(
      x,
      stats.agreed_shift(_running_mean(update, correction), x, config.axis_name),
      reduction_axes=axes,
      mask=mask,
      axis_name=config.axis_name,
      axis_index_groups=config.axis_index_groups,
      axis_sizes=config.axis_sizes,
    )
    statistics = finish(moments, moments)
  y = _apply(x, statistics.moments.mean, statistics.gain, statistics.shifted_bias, axes)
  return _Forward(y.astype(config.out_dtype), statistics)


def _running_mean(update: StateUpdate | None, correction: RenormCorrection | None):
  """The running mean, if any: the synchronized sums go around it where every
  device provably holds the same one (``bnjax.stats.agreed_shift``). After a few
  steps it lies near the batch mean, so features far from zero need no second pass."""
  if update is not None:
    return update.state.mean
  return None if correction is None else correction.running_mean


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(config: TrainingConfig, x, scale, bias, mask, correction, update):
  """Training-mode batch norm of real ``x``: returns ``(y, Moments, new_state)``."""
  y, statistics = _train_forward(config, x, scale, bias, mask, correction, update)
  return y, statistics.moments, statistics.new_state


class _Residuals(NamedTuple):
  """What the derivative keeps of the forward pass (``c = x - mean``).

  ``y = gamma * x_hat + beta`` with ``x_hat = c * r``: ``gamma = scale`` and
  ``beta = bias`` in batch norm; with batch renormalization's constants
  ``(r_renorm, d)``, ``gamma = scale * r_renorm`` and ``beta = bias + scale * d``.
  """

  x: jax.Array  # the input, [...]
  shift: jax.Array  # [*F]: this device's shift, so c = (x - shift) - mean_offset
  mean_offset: jax.Array  # [*F]: mean - shift
  inv_std: jax.Array  # [*F]: r = 1 / sqrt(var + epsilon)
  count: jax.Array  # [*F]: N, the number of valid values
  mask: jax.Array | None  # x's rank, True for valid entries (None: all valid)
  gamma: jax.Array  # [*F] (or [] without scale): the effective scale
  gamma_per_scale: jax.Array | float  # d gamma / d scale: r_renorm, or 1
  beta_per_scale: jax.Array | float  # d beta / d scale: d, or 0
  dtype: jnp.dtype  # the compute dtype of the full-size terms


def _centered(res: _Residuals, reduction_axes, *, copy_for: jax.Array) -> jax.Array:
  """``x - shift`` in the compute dtype (0 where masked out and not finite).

  Computed where it is used rather than saved by the forward pass: saving it costs
  a full-size write and read that recomputing it does not. Each use gets a copy of
  its own (``bnjax._fusion``), as the statistics' sums do; ``copy_for``, a
  different value at each use, keeps XLA from merging the copies back into one.
  """
  ((x, shift, _),) = _fusion.unshared_on_cpu((res.x, res.shift, copy_for))
  values = x.astype(res.dtype) - expand_to_input(shift.astype(res.dtype), reduction_axes)
  if res.mask is None:
    return values
  return jnp.where(res.mask | jnp.isfinite(values), values, jnp.zeros((), res.dtype))


def _train_normalize_jvp(config: TrainingConfig, primals, tangents):
  x, scale, bias, mask, correction, update = primals
  x_dot, scale_dot, bias_dot = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
  y, statistics = _train_forward(config, x, scale, bias, mask, correction, update)
  moments, renorm = statistics.moments, statistics.renorm
  dtype = _compute_dtype(x.dtype, scale)
  real_dtype = jnp.finfo(dtype).dtype
  gamma = jnp.ones((), real_dtype) if scale is None else scale.astype(real_dtype)
  r_renorm, d = (1, 0) if renorm is None else renorm
  if renorm is not None:
    gamma = gamma * r_renorm
  residuals = _Residuals(
    x=x,
    shift=statistics.shift,
    mean_offset=statistics.mean_offset.astype(dtype),
    inv_std=statistics.inv_std,
    count=moments.count,
    mask=mask,
    gamma=gamma,
    gamma_per_scale=r_renorm,
    beta_per_scale=d,
    dtype=dtype,
  )
  y_dot, mean_dot, m2_dot = _train_tangent(config, residuals, x_dot, scale_dot, bias_dot)
  var_dot = m2_dot / jnp.maximum(moments.count, 1)
  moments_dot = Moments(count=jnp.zeros_like(moments.count), mean=mean_dot, var=var_dot)
  new_state_dot = None
  if update is not None:  # plain jnp code: autodiff's tangent, fed the moments' tangents
    _, new_state_dot = jax.jvp(
      lambda update, mean, var: updated_state(config, update, moments._replace(mean=mean, var=var)),
      (update, moments.mean, moments.var),
      (_instantiated(update, tangents[5]), mean_dot, var_dot),
    )
  return (y, moments, statistics.new_state), (y_dot, moments_dot, new_state_dot)


def _instantiated(primals, tangents):
  """``tangents`` with symbolic zeros made zeros of their primals' shapes and dtypes."""
  return jax.tree.map(
    lambda p, t: jnp.zeros_like(p) if isinstance(t, SymbolicZero) else t, primals, tangents
  )


def _train_tangent(config: TrainingConfig, res: _Residuals, x_dot, scale_dot, bias_dot):
  """The linear map from input tangents to output tangents of training-mode BN.

  With ``c = x - mean``, ``r = 1 / sqrt(var + eps)``, ``y = gamma * r * c + beta``
  (``_Residuals``) and global sums over the ``N`` valid values ``S0 = sum(x_dot)``,
  ``S1 = sum(c * x_dot)`` (one ``psum``):

      mean_dot = S0 / N,   m2_dot = 2 * S1,   r_dot = -r^3 * S1 / N
      y_dot = gamma * r * (x_dot - mean_dot) + (gamma * r_dot + gamma_dot * r) * c + beta_dot

  with ``gamma_dot = scale_dot * gamma_per_scale`` and ``beta_dot = bias_dot +
  scale_dot * beta_per_scale``. Reverse mode transposes this map: ``dx = gamma * r *
  dy`` plus, on valid entries, a per-feature affine function of ``c`` built from
  ``sum(dy)`` and ``sum(dy * c)``, the backward pass of Section 3 of the paper, again
  with one ``psum``. Entries outside the mask reach ``y`` through ``c`` and ``r`` but
  not the statistics; where they are not finite, they are taken as ``c = 0`` in the
  tangent, so that a zero cotangent there contributes zero.

  Every full-size term is written with ``x - shift`` (``shift`` is this device's
  shift, within a few standard deviations of the mean) and per-feature
  corrections by ``mean - shift``: exactly the same map, but XLA fuses a
  subtraction of a reduction's output into the reductions that consume it.
  Returns ``(y_dot, mean_dot, m2_dot)``.
  """
  axes = config.reduction_axes
  gain = res.inv_std * res.gamma  # gamma * r
  if x_dot is None:
    mean_dot = jnp.zeros_like(res.mean_offset)
    m2_dot = jnp.zeros_like(res.count)
    inv_std_dot = jnp.zeros_like(res.inv_std)
  else:
    x_dot = x_dot.astype(res.dtype)
    zero = jnp.zeros((), res.dtype)
    valid_x_dot = x_dot if res.mask is None else jnp.where(res.mask, x_dot, zero)
    sum_x_dot = jnp.sum(valid_x_dot, axes)
    # sum(c * x_dot) on this device, from sums around its shift:
    centered = _centered(res, axes, copy_for=res.mean_offset)
    sum_centered_x_dot = jnp.sum(centered * valid_x_dot, axes) - res.mean_offset * sum_x_dot
    if config.axis_name is not None:  # both sums in one collective
      sums = jnp.stack([sum_x_dot, sum_centered_x_dot])
      sums = collectives.psum(sums, config.axis_name, config.axis_index_groups)
      sum_x_dot, sum_centered_x_dot = sums[0], sums[1]
    safe_count = jnp.maximum(res.count, 1)  # no valid value: no derivative either
    mean_dot = sum_x_dot / safe_count
    m2_dot = 2 * sum_centered_x_dot
    inv_std_dot = -(res.inv_std**3) * sum_centered_x_dot / safe_count

  slope = res.gamma * inv_std_dot  # the coefficient of c
  offset = -gain * mean_dot
  if scale_dot is not None:
    scale_dot = scale_dot.astype(res.gamma.dtype)
    slope = slope + scale_dot * res.inv_std * res.gamma_per_scale
    offset = offset + scale_dot * res.beta_per_scale
  offset = offset - slope * res.mean_offset  # c = centered - mean_offset
  if bias_dot is not None:
    offset = offset + bias_dot.astype(res.dtype)
  centered = _centered(res, axes, copy_for=res.inv_std)
  y_dot = expand_to_input(slope, axes) * centered + expand_to_input(offset, axes)
  if x_dot is not None:
    y_dot = y_dot + expand_to_input(gain, axes) * x_dot
  return y_dot.astype(config.out_dtype), mean_dot, m2_dot


_train_normalize.defjvp(_train_normalize_jvp, symbolic_zeros=True)
