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
from jax.sharding import PartitionSpec as P
from jax.custom_derivatives import SymbolicZero

from bnjax import moving_average, stats, validation
from bnjax.stats import Moments, expand_to_input


class BatchNormParams(NamedTuple):
  """The learned affine transform ``y = scale * x_hat + bias`` (gamma, beta).

  A pytree of two ``[*F]`` arrays (``F`` the feature shape, ``(C,)`` for one
  feature axis), in the parameter dtype (float32 by default). Either field may be
  None: no scale (gamma = 1) or no bias (beta = 0). Constructing one checks
  nothing; ``bnjax.batch_norm`` raises ``TypeError`` for non-floating fields and
  ``ValueError`` for fields not of the input's feature shape.

  >>> params = BatchNormParams(scale=jnp.full((2,), 2.0), bias=None)  # no beta
  >>> _, state = init(2)
  >>> y, _ = batch_norm(jnp.array([[0.0, 5.0], [2.0, 7.0]]), params, state, training=True)
  >>> y.round(3).tolist()  # 2 * x_hat: each feature has std 1
  [[-2.0, -2.0], [2.0, 2.0]]
  """

  scale: jax.Array | None  #: Gamma, ``[*F]`` in the parameter dtype; None means 1.
  bias: jax.Array | None  #: Beta, ``[*F]`` in the parameter dtype; None means 0.


class BatchNormState(NamedTuple):
  """Running statistics used in inference mode, updated in training mode.

  A pytree of two ``[*F]`` float32 arrays (or wider: float64 under x64, complex
  for a complex mean). ``init`` starts them at mean 0 and variance 1, as Flax
  does; ``batch_norm`` in training mode returns them moved towards the batch's
  statistics. Constructing one checks nothing; ``bnjax.batch_norm`` raises
  ``TypeError`` for non-floating fields and ``ValueError`` for fields not of the
  input's feature shape.

  >>> state = BatchNormState(mean=jnp.array([1.0]), var=jnp.array([4.0]))
  >>> y, same = batch_norm(jnp.array([[3.0]]), None, state, training=False,
  ...                      epsilon=1e-12)
  >>> y.tolist(), same is state  # (3 - 1) / sqrt(4); evaluation returns the state
  ([[1.0]], True)
  """

  mean: jax.Array  #: Running average of the batch means, ``[*F]`` float32.
  var: jax.Array  #: Running average of the (biased) batch variances, ``[*F]`` float32.


def init(
    num_features: int | Sequence[int], *, dtype=jnp.float32
) -> tuple[BatchNormParams, BatchNormState]:
  """Identity parameters and neutral state: scale 1, bias 0, mean 0, var 1.

  Args:
    num_features: ``C``, or the feature shape ``F`` for several feature axes.
    dtype: dtype of the parameters. The state is always float32.

  Returns:
    ``(params, state)``: ``BatchNormParams`` (scale 1, bias 0) in ``dtype`` and
    ``BatchNormState`` (mean 0, var 1) in float32, all fields ``[*F]``.

  Raises:
    TypeError: ``num_features`` neither an int nor a sequence of ints.
    ValueError: ``num_features`` (or an entry of it) not positive, or empty.

  >>> params, state = init(3)
  >>> params.scale, state.var
  (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
  """
  shape = validation.feature_shape("num_features", num_features)
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
    virtual_batch_size: int | None = None,
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
      It may have no batch axis (``[C]``: one example): inference normalizes it
      with ``state``; training takes its statistics over ``axis_name`` (one
      example per ``vmap`` lane or device) or, without one, over the single value
      of each feature (variance 0, as Flax computes it: ``y = bias``).
    params: ``BatchNormParams`` of shape ``[*F]``, or None for no affine transform.
    state: ``BatchNormState`` of shape ``[*F]``.
    training: Python bool; see above.
    axis: the feature axis or axes of ``x``.
    momentum: weight of the old running statistics, in [0, 1]; may be traced.
    epsilon: added to the variance before the square root; positive.
    axis_name: named axis (``pmap``/``shard_map``) to synchronize statistics over.
    axis_index_groups: optional groups of indices along ``axis_name`` (under
      ``pmap``; of any sizes, together holding each index once); see
      ``bnjax.stats`` for grouping under ``shard_map`` and ``jit``.
    mask: optional boolean, True for valid entries, that broadcasts to ``x``
      under NumPy's rules, as Flax reads it: ``[N, L, 1]`` masks positions of
      ``x: [N, L, C]``, ``[N, L, C]`` single entries, and ``[L, 1]`` means
      ``[1, L, 1]``. (``[N, L]`` does not broadcast and is refused: write
      ``mask[..., None]``.) Masked-out entries (even NaN or inf) enter neither the
      statistics nor the gradients of valid entries; they are still normalized
      in ``y``.
    unbiased_variance: if True, the running variance is updated with the unbiased
      batch variance ``m / (m - 1) * var``, as the paper's inference statistics
      use (Algorithm 2); the batch itself is always normalized with the biased one.
    virtual_batch_size: ghost batch norm (Hoffer et al., 2017): statistics per
      consecutive group of this many examples along the leading axis, which must
      be a batch axis dividing evenly. Each group is normalized with its own
      statistics (on its own device: not synchronized), and the running statistics
      move by the mean of the groups' statistics (over all devices of
      ``axis_name``, which then costs one more collective).
    dtype: dtype of ``y``; default ``x.dtype``. Statistics are computed in at
      least float32 whatever the dtype.

  Returns:
    ``(y, new_state)``: ``y`` of ``x``'s shape, and the updated state (``state``
    itself when not training). Where the batch has no valid value for a feature
    (everything masked out; for ``unbiased_variance`` fewer than two), that
    statistic of the state is left as it was, and the gradients stay finite.

  Raises:
    TypeError: ``training`` or ``unbiased_variance`` not a Python bool; ``x``,
      ``params`` or ``state`` not floating; ``mask`` not boolean; ``axis`` or
      ``momentum`` of the wrong type.
    ValueError: ``axis`` out of range, ``params``/``state`` not of the feature
      shape of ``x``, ``mask`` not broadcastable, ``momentum`` outside [0, 1],
      ``epsilon`` not positive, ``virtual_batch_size`` not dividing the batch, a
      reduction axis of size 0 in training, ``axis_index_groups`` not
      holding each device index once.
    NotImplementedError: ``axis_index_groups`` under ``shard_map``.

  >>> params, state = init(2)
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> y, state = batch_norm(x, params, state, training=True, momentum=0.9)
  >>> y.round(3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> state.mean.tolist()
  [0.2, 2.0]
  """
  validation.check_bool("unbiased_variance", unbiased_variance)
  inputs = prepare(x, params, state, training=training, axis=axis, momentum=momentum,
                   epsilon=epsilon, mask=mask, dtype=dtype, axis_name=axis_name)
  if not training:
    return normalize_inference(inputs, state, epsilon), state
  if virtual_batch_size is not None:
    return _ghost_batch_norm(inputs, state, virtual_batch_size, momentum=momentum, epsilon=epsilon,
                             axis_name=axis_name, axis_index_groups=axis_index_groups,
                             unbiased_variance=unbiased_variance)
  config = training_config(inputs, epsilon, axis_name, axis_index_groups)
  y, moments = normalize_training(config, inputs)
  return y, updated_state(state, moments.mean, _batch_variance(moments, unbiased_variance), momentum,
                          has_mean=moments.count > 0, has_var=_has_variance(moments.count, unbiased_variance))


class Inputs(NamedTuple):
  """Validated arguments of a normalization call, in canonical form."""

  x: jax.Array
  scale: jax.Array | None  # [*F]
  bias: jax.Array | None  # [*F]
  mask: jax.Array | None  # x's rank, each axis 1 or x's size
  features: tuple[int, ...]  # sorted feature axes
  reduction_axes: tuple[int, ...]  # the other axes
  out_dtype: jnp.dtype


def prepare(x, params, state, *, training, axis, momentum, epsilon, mask, dtype, axis_name=None) -> Inputs:
  """Checks every argument (errors name the problem) and canonicalizes them."""
  validation.check_training(training)
  validation.check_floating("x", x)
  validation.check_momentum(momentum)
  validation.check_epsilon(epsilon)
  x = jnp.asarray(x)
  features = validation.feature_axes(x.ndim, axis)
  if training:
    validation.check_reduction(x.shape, features)
  feature_shape = tuple(x.shape[a] for a in features)
  scale, bias = (None, None) if params is None else params
  validation.check_floating_fields("params", [("scale", scale), ("bias", bias)])
  validation.check_floating_fields("state", [("mean", state.mean), ("var", state.var)])
  for name, value in [
      ("params.scale", scale),
      ("params.bias", bias),
      ("state.mean", state.mean),
      ("state.var", state.var),
  ]:
    validation.check_feature_shape(name, value, feature_shape, x.shape, axis)
  return Inputs(
      x=x, scale=scale, bias=bias,
      mask=validation.canonical_mask(mask, x.shape, features),
      features=features,
      reduction_axes=tuple(a for a in range(x.ndim) if a not in features),
      out_dtype=jnp.dtype(x.dtype if dtype is None else dtype),
  )


def normalize_inference(inputs: Inputs, state: BatchNormState, epsilon: float) -> jax.Array:
  """Inference mode: normalize with the running statistics."""
  inv_std = lax.rsqrt(state.var + jnp.asarray(epsilon, state.var.dtype))
  return _normalize(inputs.x, state.mean, None, inv_std, inputs.scale, inputs.bias,
                    inputs.reduction_axes, inputs.out_dtype)


def training_config(inputs: Inputs, epsilon, axis_name, axis_index_groups) -> "_TrainingConfig":
  return _TrainingConfig(
      reduction_axes=inputs.reduction_axes,
      epsilon=float(epsilon),
      axis_name=axis_name,
      axis_index_groups=validation.canonical_axis_index_groups(axis_index_groups),
      out_dtype=inputs.out_dtype,
  )


def normalize_training(config, inputs: Inputs, correction=None) -> tuple[jax.Array, Moments]:
  """Training mode: normalize with the batch's moments; returns ``(y, moments)``.

  ``correction``, for batch renormalization (``bnjax.renorm``), is a
  ``RenormCorrection``: the output becomes ``(x_hat * r + d) * scale + bias``.
  """
  args = (inputs.x, inputs.scale, inputs.bias, inputs.mask, correction)
  if not jnp.iscomplexobj(inputs.x):
    return _train_normalize(config, *args)
  # Complex inputs: autodiff differentiates the forward pass itself.
  if correction is not None:
    raise TypeError("batch renormalization supports real inputs only")
  if inputs.mask is None:
    y, moments, *_ = _train_forward(config, *args)
    return y, moments
  # Masked-out entries that are not finite would make 0 * NaN in autodiff's
  # backward pass: differentiate a copy where they are 0, and give them their own
  # (non-finite) output without a derivative.
  keep = inputs.mask | jnp.isfinite(inputs.x)
  safe_x = jnp.where(keep, inputs.x, jnp.zeros((), inputs.x.dtype))
  y, moments, inv_std, shift, mean_offset, _ = _train_forward(config, safe_x, *args[1:])
  unsafe_y = _normalize(inputs.x, shift, mean_offset, inv_std, inputs.scale, inputs.bias,
                        config.reduction_axes, config.out_dtype)  # only where y is not finite
  return jnp.where(keep, y, lax.stop_gradient(unsafe_y)), moments


def updated_state(state: BatchNormState, batch_mean, batch_var, momentum, *, has_mean, has_var) -> BatchNormState:
  """``momentum * state + (1 - momentum) * batch``, for both statistics; a
  statistic the batch does not define (``has_mean``/``has_var`` False: no valid
  value, or one only for an unbiased variance) leaves the state as it was."""

  def update(old, new, defined):
    moved = moving_average.update_moving_average(old, jnp.where(defined, new, jnp.zeros((), new.dtype)),
                                                 momentum=momentum)
    return jnp.where(defined, moved, old.astype(moved.dtype))

  return BatchNormState(mean=update(state.mean, batch_mean, has_mean), var=update(state.var, batch_var, has_var))


def _batch_variance(moments: Moments, unbiased: bool) -> jax.Array:
  return moments.unbiased_variance if unbiased else moments.variance


def _has_variance(count, unbiased: bool):
  return count > (1 if unbiased else 0)


def _ghost_batch_norm(inputs: Inputs, state, virtual_batch_size, *, momentum, epsilon, axis_name,
                      axis_index_groups, unbiased_variance):
  """Batch norm with statistics per group of ``virtual_batch_size`` leading rows."""
  x = inputs.x
  if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size <= 0:
    raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
  if 0 in inputs.features:
    raise ValueError("virtual_batch_size splits the leading axis, which must be a batch axis, "
                     f"not a feature axis (axis={inputs.features})")
  if x.shape[0] % virtual_batch_size:
    raise ValueError(f"virtual_batch_size {virtual_batch_size} does not divide the batch of "
                     f"{x.shape[0]} (x.shape={x.shape})")
  groups = x.shape[0] // virtual_batch_size
  grouped_features = (0,) + tuple(a + 1 for a in inputs.features)
  grouped_shape = (groups, virtual_batch_size) + x.shape[1:]
  per_group = lambda p: None if p is None else jnp.broadcast_to(p, (groups,) + p.shape)  # noqa: E731
  mask = inputs.mask
  if mask is not None:
    mask = mask.reshape(((groups, virtual_batch_size) if mask.shape[0] > 1 else (1, 1)) + mask.shape[1:])
  grouped = Inputs(
      x=_reshape_batch(x, grouped_shape), scale=per_group(inputs.scale), bias=per_group(inputs.bias), mask=mask,
      features=grouped_features,
      reduction_axes=tuple(a for a in range(x.ndim + 1) if a not in grouped_features),
      out_dtype=inputs.out_dtype,
  )
  y, moments = normalize_training(training_config(grouped, epsilon, None, None), grouped)
  # The mean over the groups (of every device of axis_name) that define each
  # statistic: a fully masked (padding) group defines none.
  has_mean = moments.count > 0
  has_var = _has_variance(moments.count, unbiased_variance)
  batch_var = _batch_variance(moments, unbiased_variance)
  sums = (
      jnp.sum(jnp.where(has_mean, moments.mean, jnp.zeros((), moments.mean.dtype)), axis=0),
      jnp.sum(has_mean, axis=0, dtype=jnp.float32),
      jnp.sum(jnp.where(has_var, batch_var, jnp.zeros((), batch_var.dtype)), axis=0),
      jnp.sum(has_var, axis=0, dtype=jnp.float32),
  )
  if axis_name is not None:
    sums = stats.psum(sums, axis_name, axis_index_groups)
  mean_sum, mean_groups, var_sum, var_groups = sums
  return _reshape_batch(y, x.shape), updated_state(
      state, mean_sum / jnp.maximum(mean_groups, 1).astype(mean_sum.dtype), var_sum / jnp.maximum(var_groups, 1),
      momentum,
      has_mean=mean_groups > 0, has_var=var_groups > 0,
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
  if not any(spec[:2 if merging else 1]):
    return x.reshape(shape)
  if merging:
    return lax.reshape(x, shape, out_sharding=sharding.update(spec=P(spec[0] or spec[1], *spec[2:])))
  blocks = stats.shards_along(x, 0)
  rest = spec[1:]
  if shape[0] % blocks == 0:
    out = P(spec[0], None, *rest)
  elif shape[1] % blocks == 0:
    out = P(None, spec[0], *rest)
  else:
    raise ValueError(
        f"virtual_batch_size {shape[1]} splits a batch of {x.shape[0]} sharded over {blocks} devices "
        "into groups that neither a whole number of devices nor of examples per device can hold; "
        "choose a virtual batch size that is a multiple or a divisor of the examples per device"
    )
  return lax.reshape(x, shape, out_sharding=sharding.update(spec=out))


class _TrainingConfig(NamedTuple):
  """The static (hashable) arguments of the training-mode custom derivative."""

  reduction_axes: tuple[int, ...]
  epsilon: float
  axis_name: Hashable | None
  axis_index_groups: tuple[tuple[int, ...], ...] | None
  out_dtype: jnp.dtype


def _compute_dtype(x, *params) -> jnp.dtype:
  return stats.statistics_dtype(x.dtype, *(p.dtype for p in params if p is not None))


def _normalize(x, shift, offset, inv_std, scale, bias, reduction_axes, out_dtype):
  """``(x - mean) * gain + bias`` with ``gain = scale * inv_std`` and the mean
  given as ``shift + offset``, computed as ``(x - shift) * gain + (bias - offset *
  gain)`` in the compute dtype, then cast.

  ``x - shift`` is exact where ``x`` is near the shift (within a factor of two),
  so large offsets cost no precision when ``offset`` carries what the shift
  misses of the mean. ``offset`` None is 0.
  """
  dtype = _compute_dtype(x, scale, bias)
  gain = inv_std.astype(dtype)
  if scale is not None:
    gain = gain * scale.astype(dtype)
  shifted_bias = None if offset is None else -offset.astype(dtype) * gain
  if bias is not None:
    shifted_bias = bias.astype(dtype) if shifted_bias is None else shifted_bias + bias.astype(dtype)
  y = x.astype(dtype) - expand_to_input(shift.astype(dtype), reduction_axes)
  y = y * expand_to_input(gain, reduction_axes)
  if shifted_bias is not None:
    y = y + expand_to_input(shifted_bias, reduction_axes)
  return y.astype(out_dtype)


class RenormCorrection(NamedTuple):
  """What batch renormalization needs besides the batch (Ioffe, 2017)."""

  running_mean: jax.Array  # [*F]
  running_var: jax.Array  # [*F]
  r_max: jax.Array  # [], >= 1
  d_max: jax.Array  # [], >= 0


def _renorm_factors(correction: RenormCorrection, mean, inv_std, epsilon):
  """``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma,
  -d_max, d_max)``, held constant in the derivative (stop_gradient)."""
  dtype = inv_std.dtype
  running_inv_std = lax.rsqrt(correction.running_var.astype(dtype) + epsilon)
  r_max = jnp.asarray(correction.r_max).astype(dtype)
  d_max = jnp.asarray(correction.d_max).astype(dtype)
  r = jnp.clip(running_inv_std / inv_std, 1 / r_max, r_max)
  d = jnp.clip((mean.astype(dtype) - correction.running_mean.astype(dtype)) * running_inv_std, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _train_forward(config: _TrainingConfig, x, scale, bias, mask, correction):
  """Batch moments, then normalize: ``(y, moments, inv_std, shift, mean_offset, renorm)``.

  ``shift`` is this device's shift (see ``bnjax.stats``), close to the mean, and
  ``mean_offset`` is ``mean - shift`` to the last digit; the output and the
  derivative work with ``x - shift``, an exact and cheaper operand than
  ``x - mean``. ``renorm`` is ``(r, d)`` with a ``correction``, else None.
  """
  local = stats.local_moments(x, reduction_axes=config.reduction_axes, mask=mask)
  combined = local
  if config.axis_name is not None:
    combined = stats.all_gather_moments(local, config.axis_name, config.axis_index_groups)
  moments = combined.moments
  mean_offset = (combined.shift - local.shift) + combined.offset
  inv_std = lax.rsqrt(moments.normalizing_variance + config.epsilon)
  renorm = None
  if correction is not None:
    # (x_hat * r + d) * scale + bias == x_hat * (scale * r) + (bias + scale * d)
    r, d = renorm = _renorm_factors(correction, moments.mean, inv_std, config.epsilon)
    scale_value = jnp.ones_like(r) if scale is None else scale.astype(r.dtype)
    bias = scale_value * d if bias is None else bias.astype(d.dtype) + scale_value * d
    scale = scale_value * r
  # x - mean = (x - rounded_mean) - rounding, with the rounding of the mean to
  # its dtype known to the last digit: exact like normalizing around the shift,
  # but a subtraction apart from the statistics' x - shift, which XLA then fuses
  # as it fuses two-pass batch norm (sharing x - shift measured 10-20% slower).
  rounded_mean = moments.mean
  rounding = (local.shift - rounded_mean) + mean_offset
  y = _normalize(x, rounded_mean, rounding, inv_std, scale, bias, config.reduction_axes,
                 config.out_dtype)
  return y, moments, inv_std, local.shift, mean_offset, renorm


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(config: _TrainingConfig, x, scale, bias, mask, correction):
  """Training-mode batch norm of real ``x``: returns ``(y, Moments)``."""
  y, moments, *_ = _train_forward(config, x, scale, bias, mask, correction)
  return y, moments


def _train_normalize_jvp(config: _TrainingConfig, primals, tangents):
  x, scale, bias, mask, correction = primals
  x_dot, scale_dot, bias_dot = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
  y, moments, inv_std, shift, mean_offset, renorm = _train_forward(config, x, scale, bias, mask, correction)
  # Not rematerialized (jax.checkpoint): measured, saving x - shift for the
  # backward pass is faster and uses no more memory than Flax (BENCHMARKS.md).
  y_dot, mean_dot, m2_dot = _train_tangent(
      config, x, shift, mean_offset, inv_std, moments.count, scale, renorm, mask, x_dot, scale_dot, bias_dot
  )
  var_dot = m2_dot / jnp.maximum(moments.count, 1)
  moments_dot = Moments(count=jnp.zeros_like(moments.count), mean=mean_dot, var=var_dot)
  return (y, moments), (y_dot, moments_dot)


def _train_tangent(
    config: _TrainingConfig, x, shift, mean_offset, inv_std, count, scale, renorm, mask, x_dot, scale_dot, bias_dot
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
  tangent, so that a zero cotangent there contributes zero. With batch
  renormalization's constants ``(r_renorm, d)``, ``scale`` acts as
  ``scale * r_renorm`` and ``scale_dot`` also adds ``scale_dot * d``.

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
  mean_offset = mean_offset.astype(dtype)  # [*F]: c = (x - shift) - mean_offset
  centered = x.astype(dtype) - expand_to_input(shift, axes)
  if mask is not None:
    centered = jnp.where(mask | jnp.isfinite(centered), centered, zero)
  renorm_r, renorm_d = (None, None) if renorm is None else renorm
  scale_value = jnp.ones((), real_dtype) if scale is None else scale.astype(real_dtype)
  if renorm_r is not None:
    scale_value = scale_value * renorm_r
  gain = inv_std * scale_value

  if x_dot is None:
    mean_dot = jnp.zeros_like(mean_offset)
    m2_dot = jnp.zeros_like(count)
    inv_std_dot = jnp.zeros_like(inv_std)
  else:
    x_dot = x_dot.astype(dtype)
    valid_x_dot = x_dot if mask is None else jnp.where(mask, x_dot, zero)
    sum_x_dot = jnp.sum(valid_x_dot, axes)
    # sum(c * x_dot) on this device, from sums around its shift:
    sum_centered_x_dot = jnp.sum(centered * valid_x_dot, axes) - mean_offset * sum_x_dot
    if config.axis_name is not None:  # both sums in one collective
      sums = jnp.stack([sum_x_dot, sum_centered_x_dot])
      sums = stats.psum(sums, config.axis_name, config.axis_index_groups)
      sum_x_dot, sum_centered_x_dot = sums[0], sums[1]
    safe_count = jnp.maximum(count, 1)  # no valid value: no derivative either
    mean_dot = sum_x_dot / safe_count
    m2_dot = 2 * sum_centered_x_dot
    inv_std_dot = -(inv_std**3) * sum_centered_x_dot / safe_count

  slope = scale_value * inv_std_dot
  offset = -gain * mean_dot
  if scale_dot is not None:
    scale_dot = scale_dot.astype(real_dtype)
    slope = slope + scale_dot * inv_std * (1 if renorm_r is None else renorm_r)
    if renorm_d is not None:
      offset = offset + scale_dot * renorm_d
  offset = offset - slope * mean_offset
  if bias_dot is not None:
    offset = offset + bias_dot.astype(dtype)
  y_dot = expand_to_input(slope, axes) * centered + expand_to_input(offset, axes)
  if x_dot is not None:
    y_dot = y_dot + expand_to_input(gain, axes) * x_dot
  return y_dot.astype(config.out_dtype), mean_dot, m2_dot


_train_normalize.defjvp(_train_normalize_jvp, symbolic_zeros=True)
