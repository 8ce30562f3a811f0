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
``sum(dx)`` and ``sum(dx * (x - mean))`` per feature, reduced across devices in
one collective (``bnjax._engine``). Ghost batch norm (``virtual_batch_size``) is
in ``bnjax.ghost``, batch renormalization in ``bnjax.renorm``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import _engine, _recording, ghost, validation
from bnjax.moving_average import MovingAverageWeights


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
  state = BatchNormState(mean=jnp.zeros(shape, jnp.float32), var=jnp.ones(shape, jnp.float32))
  return params, state


@_recording.recorded("batch_norm")  # bnjax.describe sees the call
def batch_norm(
  x: jax.Array,
  params: BatchNormParams | None,
  state: BatchNormState,
  *,
  training: bool,
  axis: int | Sequence[int] = -1,
  momentum: float | jax.Array | MovingAverageWeights = 0.99,
  epsilon: float = 1e-5,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  mask: jax.Array | None = None,
  unbiased_variance: bool = False,
  virtual_batch_size: int | None = None,
  dtype: Any = None,
  update_stats: bool | None = None,
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

  ``update_stats`` separates the second from the first: whether the state moves
  (default: when training). ``training=True, update_stats=False`` normalizes with
  the batch's statistics and returns ``state`` itself (Haiku's
  ``test_local_stats``); ``training=False, update_stats=True`` normalizes with
  ``state``, as in inference, and returns it moved towards the batch's statistics.

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
    momentum: weight of the old running statistics, in [0, 1]; may be traced (a
      schedule needs no recompilation), or ``MovingAverageWeights``
      (``bnjax.cumulative_momentum``: the plain mean of every batch;
      ``bnjax.debiased_momentum``: a zero-debiased average). A Python float's
      ``1 - momentum`` is taken in double precision (``update_moving_average``).
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
    update_stats: Python bool, whether the returned state moves towards this
      batch's statistics; None (the default) means ``training``. See above.

  Returns:
    ``(y, new_state)``: ``y`` of ``x``'s shape, and the updated state (``state``
    itself when not training). Where the batch has no valid value for a feature
    (everything masked out; for ``unbiased_variance`` fewer than two), that
    statistic of the state is left as it was, and the gradients stay finite.

  Raises:
    TypeError: ``training``, ``unbiased_variance`` or ``update_stats`` not a
      Python bool (``update_stats`` may be None); ``x``,
      ``params`` or ``state`` not floating; ``mask`` not boolean; ``axis`` or
      ``momentum`` of the wrong type.
    ValueError: ``axis`` out of range, ``params``/``state`` not of the feature
      shape of ``x``, ``mask`` not broadcastable, ``momentum`` outside [0, 1],
      ``epsilon`` not positive, ``virtual_batch_size`` not dividing the batch, a
      reduction axis of size 0 in training (or with ``update_stats``),
      ``axis_index_groups`` not
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
  y, new_state = _with_batch_statistics(
    inputs,
    state if update_stats else None,
    momentum=momentum,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    unbiased_variance=unbiased_variance,
    virtual_batch_size=virtual_batch_size,
  )
  if not training:  # the running statistics normalize; the batch's move them
    y = _engine.normalize_inference(inputs, state, epsilon)
  return y, state if new_state is None else new_state


def _with_batch_statistics(
  inputs,
  state,
  *,
  momentum,
  epsilon,
  axis_name,
  axis_index_groups,
  unbiased_variance,
  virtual_batch_size,
):
  """Training mode: ``y`` normalized with the batch's statistics, and ``state``
  moved towards them (None for a ``state`` of None: no update)."""
  if virtual_batch_size is not None:
    y, new_state = ghost._ghost_batch_norm(
      inputs,
      state,
      virtual_batch_size,
      momentum=momentum,
      epsilon=epsilon,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      unbiased_variance=unbiased_variance,
    )
    return y, new_state
  config = _engine.training_config(
    inputs, epsilon, axis_name, axis_index_groups, unbiased_variance=unbiased_variance
  )
  update = None if state is None else _engine.state_update(state, momentum)
  y, _, new_state = _engine.normalize_training(config, inputs, update=update)
  return y, new_state
