"""``bnjax.equinox``: a drop-in for ``equinox.nn.BatchNorm``, and more.

Swap the class and keep everything else (``eqx.nn.make_with_state``, ``vmap`` with
an ``axis_name``, ``eqx.nn.inference_mode``)::

    from bnjax import equinox as bn   # bn.BatchNorm instead of eqx.nn.BatchNorm
    model, state = eqx.nn.make_with_state(bn.BatchNorm)(16, "batch", mode="batch")

``BatchNorm`` has Equinox's constructor, call, fields and state
(``batch_counter``/``batch_state_index``, or ``ema_first_time_index``/
``ema_state_index``); the math is ``bnjax.batch_norm``. ``recompute_batch_stats``
replaces every layer's running statistics by the paper's Algorithm 2 statistics,
``sync_state`` averages them across devices, and ``apply_pending`` moves them once
per optimizer step under gradient accumulation (``accumulate=True``);
``replace_batch_norm`` swaps bnjax into a model that hard-codes ``eqx.nn.BatchNorm``.
The layer is a thin shell: it reads its state, hands it to the pure function, and
writes the returned state back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

try:
  import equinox as eqx
except ModuleNotFoundError as error:  # the core needs JAX only; the drop-in needs Equinox
  raise ModuleNotFoundError(
    f"bnjax.equinox needs Equinox ({error}): pip install 'equinox>=0.13.8', "
    "or pip install -e '.[equinox]' in a clone of bnjax"
  ) from error

from bnjax import _wrappers, accumulation, moving_average, validation
from bnjax import sync_state as _sync_state
from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm
from bnjax.moving_average import MovingAverageWeights

_LEGACY_WARNING = (
  "When `eqx.nn.BatchNorm(..., mode=...)` is unspecified it defaults to 'ema', for backward "
  "compatibility (as in Equinox; so does bnjax.equinox.BatchNorm). For new code pass "
  "mode='batch'. See `https://github.com/patrick-kidger/equinox/issues/659`."
)


def _static_axis_name(axis_name):
  """Hashable (a static field): a list of names becomes a tuple."""
  if isinstance(axis_name, list):
    return tuple(axis_name)
  return axis_name


def _ema_momentum(momentum: float, first_time: jax.Array) -> MovingAverageWeights:
  """``"ema"`` mode's weights: the batch's statistics alone on the first step, then
  ``momentum`` (``1 - momentum`` taken in double, as Equinox's Python float is).

  >>> _ema_momentum(0.9, jnp.array(True)).new.tolist()
  1.0
  """
  weights = moving_average.moving_average_weights(momentum)
  return MovingAverageWeights(
    jnp.where(first_time, 0.0, weights.old), jnp.where(first_time, 1.0, weights.new)
  )


class BatchNorm(eqx.nn.StatefulLayer):
  r"""Batch normalization with ``equinox.nn.BatchNorm``'s interface and bnjax's core.

  Used as Equinox's: on one example ``x: [input_size, dim_1, ..., dim_N]``, inside
  ``jax.vmap`` (or ``pmap``, ``shard_map``) with a matching ``axis_name``; the
  statistics are those of every example along the named axes, exchanged in one
  collective. Under ``jax.jit`` with a sharded batch the ``vmap``'s statistics are
  those of the global batch. The constructor, call, fields and state are Equinox's,
  with its defaults (``mode`` unspecified means ``"ema"``, with Equinox's warning)
  and its ``momentum`` (the weight of the old running statistics).

  * ``mode="batch"``: training normalizes with the batch's statistics; inference
    with their zero-debiased moving average (``state.get(layer.batch_state_index)``
    holds that average, ``batch_counter`` the number of training steps).
  * ``mode="ema"``: training normalizes with the running statistics after they
    have moved towards this batch (the batch's own on the first step), gradients
    flowing through the batch's part, as Equinox does; inference with the running
    statistics.

  Where this differs from Equinox 0.13.8, on purpose:

  * Running variance at initialization: 1 (mean 0) in both modes, so that a layer
    never trained is the identity in inference. Equinox's ``"ema"`` mode starts it
    at 0 (``jnp.empty``): ``x / sqrt(eps)`` until the first training step.
  * ``"batch"`` mode's debiasing: exact. Equinox starts its biased ``hidden``
    variance at 1 and still divides it by ``1 - momentum**steps``: after one step
    the inference variance is ``momentum / (1 - momentum) + var_B`` (99 + var_B at
    momentum 0.99), converging only as ``momentum**steps`` vanishes. bnjax keeps
    the debiased average itself in the state (Equinox keeps ``hidden``); the
    inference mean is Equinox's.
  * Statistics exact in float32 for any offset (Equinox's two-pass mean of means
    is exact only when every example has as many values, which masks break), kept
    in at least float32 for half-precision ``dtype``.
  * ``axis_name`` is a static field (hashable: a list becomes a tuple).
  * ``__call__`` takes a ``mask``.

  >>> import equinox as eqx
  >>> layer, state = eqx.nn.make_with_state(BatchNorm)(1, "batch", mode="batch", momentum=0.9)
  >>> x = jnp.array([[1.0], [3.0]])  # two examples of one feature: mean 2, variance 1
  >>> y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
  ...     x, state)
  >>> y.round(3).tolist(), [s.tolist() for s in state.get(layer.batch_state_index)]
  ([[-1.0], [1.0]], [[2.0], [1.0]])

  Attributes:
    weight: gamma, ``[input_size]`` (None without ``channelwise_affine``).
    bias: beta, ``[input_size]`` (None without ``channelwise_affine``).
    ema_first_time_index: ``"ema"`` mode's flag, True until the first training step.
    ema_state_index: ``"ema"`` mode's running ``(mean, var)``, ``[input_size]`` each.
    batch_counter: ``"batch"`` mode's number of training steps, an int32 scalar.
    batch_state_index: ``"batch"`` mode's debiased ``(mean, var)``, ``[input_size]``.
    axis_name: the named axis or axes the statistics are taken over.
    inference: normalize with the running statistics (``eqx.nn.inference_mode``).
    input_size: the number of channels ``C``.
    eps: added to the variance before the square root.
    channelwise_affine: whether ``weight`` and ``bias`` exist.
    momentum: weight of the old running statistics (None: the cumulative average).
    mode: ``"batch"`` or ``"ema"``.
    pending_index: with ``accumulate``, the update that waits for the optimizer
      step: ``(moments, counter, (mean, var))``, the merged ``bnjax.Moments`` of
      the step's micro-batches so far and the ``batch_counter`` and statistics
      that ``apply_pending`` installs; else None.
    update_stats: whether a call moves the running statistics (None: in training).
    record: set by ``recompute_batch_stats`` only.
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  axis_name: Hashable = eqx.field(static=True)
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float | None = eqx.field(static=True)
  mode: Literal["ema", "batch"] = eqx.field(static=True)
  pending_index: eqx.nn.StateIndex | None
  update_stats: bool | None
  record: Literal["unbiased", "biased"] | None  # None: no leaf (a string only while recording)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable],
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float | None = 0.99,
    inference: bool = False,
    dtype=None,
    mode: Literal["ema", "batch", "legacy"] = "legacy",
    *,
    accumulate: bool = False,
    update_stats: bool | None = None,
  ):
    """Equinox's arguments and defaults, and ``accumulate`` and ``update_stats``.

    Args:
      input_size: the number of channels ``C``.
      axis_name: the name (or a sequence of names) of the ``vmap``/``pmap`` axes to
        compute statistics over.
      eps: added to the variance before the square root.
      channelwise_affine: whether the layer has the learned ``weight`` and ``bias``.
      momentum: weight of the old running statistics, in [0, 1]; None (in
        ``"batch"`` mode) for the cumulative average, the plain mean of every
        batch's statistics (PyTorch's ``momentum=None``).
      inference: normalize with the running statistics (may be toggled with
        ``eqx.nn.inference_mode`` or overridden in the call).
      dtype: dtype of ``weight`` and ``bias`` (default float32, float64 under x64);
        the running statistics are in this dtype or float32, the wider.
      mode: ``"batch"`` or ``"ema"``; unspecified means ``"ema"``, with a warning.
      accumulate: gradient accumulation (``"batch"`` mode): a training call
        normalizes with its micro-batch's statistics and merges them into the
        ``pending_index`` state (``bnjax.accumulate_batch_norm``); the running
        statistics move once per optimizer step, at ``apply_pending``.
      update_stats: whether a call moves the running statistics (or accumulates);
        None (the default) means in training. False normalizes a training call
        with the batch's statistics and leaves the state; True in inference
        normalizes with the running statistics and moves them.

    Raises:
      ValueError: ``mode`` neither ``"ema"`` nor ``"batch"``; ``accumulate`` in
        ``"ema"`` mode (it normalizes with the running statistics); ``momentum``
        None in ``"ema"`` mode.
    """
    if mode == "legacy":
      mode = "ema"
      warnings.warn(_LEGACY_WARNING, stacklevel=2)
    if mode not in {"ema", "batch"}:
      raise ValueError(f"Invalid mode {mode!r}, must be 'ema' or 'batch'.")
    if accumulate and mode != "batch":
      raise ValueError(
        "accumulate needs mode='batch': mode='ema' normalizes with the running statistics, "
        "which move once per optimizer step under accumulation"
      )
    if momentum is None and mode == "ema":
      raise ValueError(
        "momentum=None (the cumulative average) counts the training steps, which only "
        "mode='batch' does: pass mode='batch', or a momentum"
      )
    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)  # float32 or x64's
    stats_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    self.weight = jnp.ones((input_size,), dtype) if channelwise_affine else None
    self.bias = jnp.zeros((input_size,), dtype) if channelwise_affine else None
    neutral = (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
    self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True)) if mode == "ema" else None
    self.ema_state_index = eqx.nn.StateIndex(neutral) if mode == "ema" else None
    self.batch_counter = eqx.nn.StateIndex(jnp.array(0)) if mode == "batch" else None
    self.batch_state_index = eqx.nn.StateIndex(neutral) if mode == "batch" else None
    self.pending_index = None
    if accumulate:
      moments = accumulation.init_pending(BatchNormState(*neutral)).moments
      self.pending_index = eqx.nn.StateIndex((moments, jnp.array(0), neutral))
    self.axis_name = _static_axis_name(axis_name)
    self.inference = inference
    self.input_size = input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum
    self.mode = mode
    self.update_stats = update_stats
    self.record = None

  def _batch_momentum(self, count):
    """``"batch"`` mode's momentum after ``count`` updates: zero-debiased, except
    that momentum 1 keeps the statistics as they are; for momentum None the
    cumulative average's."""
    if self.momentum is None:
      return moving_average.cumulative_momentum(count)
    if self.momentum >= 1:
      return self.momentum
    return moving_average.debiased_momentum(self.momentum, count)

  @property
  def _statistics_index(self) -> eqx.nn.StateIndex:
    return self.batch_state_index if self.mode == "batch" else self.ema_state_index

  @jax.named_scope("bnjax.equinox.BatchNorm")
  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
    update_stats: bool | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example; in training mode also updates the state.

    Args:
      x: ``[input_size, dim_1, ..., dim_N]`` floating input (one example).
      state: the ``eqx.nn.State`` holding this layer's running statistics.
      key: ignored (Equinox's API).
      inference: overrides the field of the same name when not None.
      mask: optional boolean broadcastable to ``x`` (``[]`` for the whole example),
        True for the values that enter the statistics (see ``bnjax.batch_norm``).
      update_stats: overrides the field of the same name when not None.

    Returns:
      ``(y, state)``: ``y`` of ``x``'s shape (in the dtype promoted from ``x`` and
      ``weight``), and the state with this layer's statistics updated (unchanged
      in inference).

    Raises:
      NameError: in training, no ``vmap``/``pmap`` with a matching ``axis_name``.
      TypeError, ValueError: as ``bnjax.batch_norm`` (e.g. ``x`` not of
        ``input_size`` channels).
    """
    del key
    inference = self.inference if inference is None else inference
    params = BatchNormParams(self.weight, self.bias) if self.channelwise_affine else None
    with jax.numpy_dtype_promotion("standard"):  # Equinox's output dtype
      dtype = jnp.result_type(x, self.weight) if self.channelwise_affine else x.dtype
    running = BatchNormState(*state.get(self._statistics_index))

    def normalize(statistics, **training):
      if not training:
        return batch_norm(
          x, params, statistics, training=False, axis=0, epsilon=self.eps, dtype=dtype
        )
      return batch_norm(
        x,
        params,
        statistics,
        training=True,
        axis=0,
        epsilon=self.eps,
        axis_name=self.axis_name,
        mask=mask,
        dtype=dtype,
        **training,
      )

    update = validation.update_stats_flag(
      self.update_stats if update_stats is None else update_stats, not inference
    )
    if inference and not update:
      return normalize(running)[0], state
    if self.record is not None:  # recompute_batch_stats: this batch's statistics alone
      y, batch = normalize(running, momentum=0.0, unbiased_variance=self.record == "unbiased")
      return y, state.set(self._statistics_index, tuple(batch))
    if self.pending_index is not None and update:  # the running statistics stay
      y, state = self._accumulate(x, params, running, state, mask, dtype)
    else:
      y, moved, (index, value) = self._moved(normalize, running, state)
      if update:
        state = state.set(index, value).set(self._statistics_index, tuple(moved))
    if inference:  # the running statistics normalize as they were
      y = normalize(running)[0]
    return y, state

  def _moved(self, normalize, running: BatchNormState, state: eqx.nn.State):
    """A training step's output, its running statistics, and the new value of the
    counter (``"batch"`` mode) or first-time flag (``"ema"``) as ``(index, value)``."""
    if self.mode == "batch":
      count = state.get(self.batch_counter)  # the updates so far
      y, moved = normalize(running, momentum=self._batch_momentum(count))
      return y, moved, (self.batch_counter, count + 1)
    first_time = state.get(self.ema_first_time_index)
    _, moved = normalize(running, momentum=_ema_momentum(self.momentum, first_time))
    y, _ = normalize(moved)  # with the moved statistics, as Equinox
    # False, typed as the old flag (under pmap or shard_map, as varying as it).
    return y, moved, (self.ema_first_time_index, jnp.logical_and(first_time, False))

  def _accumulate(self, x, params, running, state, mask, dtype):
    """A training call under ``accumulate``: the batch's statistics normalize ``x``
    and join the pending update (``bnjax.accumulate_batch_norm``)."""
    count = state.get(self.batch_counter)  # the updates so far
    moments, _, next_state = state.get(self.pending_index)
    y, pending = accumulation.accumulate_batch_norm(
      x,
      params,
      running,
      accumulation.PendingUpdate(moments, BatchNormState(*next_state)),
      axis=0,
      momentum=self._batch_momentum(count),
      epsilon=self.eps,
      axis_name=self.axis_name,
      mask=mask,
      dtype=dtype,
    )
    next_pending = (pending.moments, count + 1, tuple(pending.next_state))
    return y, state.set(self.pending_index, next_pending)


def _layers(model) -> list[BatchNorm]:
  is_layer = lambda node: isinstance(node, BatchNorm)  # noqa: E731
  return [leaf for leaf in jax.tree.leaves(model, is_leaf=is_layer) if is_layer(leaf)]


def recompute_batch_stats(
  model,
  state: eqx.nn.State,
  batches: Iterable[Any],
  *,
  apply_fn: Callable[[Any, eqx.nn.State, Any], tuple[Any, eqx.nn.State]],
  unbiased: bool = True,
) -> eqx.nn.State:
  """Every ``BatchNorm``'s running statistics replaced by Algorithm 2's.

  Runs ``apply_fn(model, state, batch)`` for each batch, the model in training mode
  as it is trained (``vmap`` with the layers' ``axis_name`` included), with every
  ``BatchNorm`` recording its batch's statistics instead of moving its running
  ones. Each layer's new statistics are the mean of the batch means and of the
  ``m / (m - 1)``-corrected batch variances (``unbiased=False``: of the biased
  ones), exactly, each batch weighing the same (a feature that a batch leaves
  without a valid value, every entry masked out, counts that batch with the
  layer's current statistic). ``apply_fn`` is traced once, under
  ``eqx.filter_jit``; the statistics are those ``apply_fn`` gives the layers
  (over their ``axis_name``, as in training). The layers' counters are left as they
  are (at least 1 in ``"batch"`` mode, ``"ema"`` mode's first-time flag cleared),
  so that training afterwards keeps moving these statistics.

  Args:
    model: a pytree holding ``bnjax.equinox.BatchNorm`` layers.
    state: the model's ``eqx.nn.State``.
    batches: an iterable of inputs for ``apply_fn`` (K >= 1 of them).
    apply_fn: ``(model, state, batch) -> (anything, state)``, the training call.
    unbiased: the paper's ``m / (m - 1)`` correction of the variance.

  Returns:
    The new state; every other entry is ``state``'s.

  Raises:
    ValueError: ``model`` has no ``bnjax.equinox.BatchNorm``, or ``batches`` is empty.

  >>> import equinox as eqx
  >>> layer, state = eqx.nn.make_with_state(BatchNorm)(1, "batch", mode="batch")
  >>> apply_fn = lambda m, s, b: jax.vmap(m, axis_name="batch", in_axes=(0, None),
  ...                                     out_axes=(0, None))(b, s)
  >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]  # means 1, 5
  >>> state = recompute_batch_stats(layer, state, batches, apply_fn=apply_fn)
  >>> [s.tolist() for s in state.get(layer.batch_state_index)]  # 3 and 2/1 * 1
  [[3.0], [2.0]]
  """
  layers = _layers(model)
  if not layers:
    raise ValueError("recompute_batch_stats found no bnjax.equinox.BatchNorm in the model")
  record = "unbiased" if unbiased else "biased"
  recording = eqx.tree_at(
    lambda m: [layer.record for layer in _layers(m)],
    model,
    [record] * len(layers),
    is_leaf=lambda node: node is None,
  )

  @eqx.filter_jit
  def batch_statistics(state, batch):
    _, new_state = apply_fn(recording, state, batch)
    return [new_state.get(layer._statistics_index) for layer in layers]

  # Each batch starts from the same state (an Equinox State is used up once set).
  totals = _wrappers.sum_over_batches(
    lambda batch: (batch_statistics(_copy(state), batch), 1), batches
  )
  if totals is None:
    raise ValueError("recompute_batch_stats needs at least one batch")
  statistics, num_batches = totals
  for layer, (mean, var) in zip(layers, statistics, strict=True):
    state = state.set(layer._statistics_index, (mean / num_batches, var / num_batches))
    if layer.mode == "batch":
      state = state.set(layer.batch_counter, jnp.maximum(state.get(layer.batch_counter), 1))
    else:
      state = state.set(layer.ema_first_time_index, jnp.array(False))
  return state


def sync_state(model, state: eqx.nn.State, axis_name: Hashable) -> eqx.nn.State:
  """The mean across the devices of ``axis_name`` of every ``BatchNorm``'s statistics.

  Inside ``pmap``/``shard_map`` (``bnjax.sync_state``), for set-ups where each
  device keeps its own running statistics; counters and flags stay as they are.

  Args:
    model: a pytree holding ``bnjax.equinox.BatchNorm`` layers.
    state: this device's ``eqx.nn.State``.
    axis_name: the named axis to average over.

  Returns:
    The new state, of the same structure, shapes and dtypes.

  Raises:
    NameError: ``axis_name`` is not bound (outside ``pmap``/``shard_map``).

  >>> import equinox as eqx
  >>> layer, state = eqx.nn.make_with_state(BatchNorm)(1, "batch", mode="batch")
  >>> one_device = jax.tree.map(lambda a: a[None], state)  # [devices, ...]
  >>> synced = jax.pmap(lambda s: sync_state(layer, s, "i"), axis_name="i",
  ...                   devices=jax.devices()[:1])(one_device)
  >>> [s.tolist() for s in synced.get(layer.batch_state_index)]
  [[[0.0]], [[1.0]]]
  """
  for layer in _layers(model):
    index = layer._statistics_index
    state = state.set(index, _sync_state(state.get(index), axis_name))
  return state


def _copy(state: eqx.nn.State) -> eqx.nn.State:
  """A fresh ``State`` with the same entries (setting one invalidates the old)."""
  return jax.tree.map(lambda leaf: leaf, state)


def apply_pending(model, state: eqx.nn.State, *, where: bool | jax.Array = True) -> eqx.nn.State:
  """Ends an optimizer step: every pending update becomes the running statistics.

  For every ``BatchNorm(..., accumulate=True)`` of ``model`` (``bnjax.apply_pending``):
  its ``batch_counter`` and running statistics become those of its
  ``pending_index``, one update with the exact statistics of all the step's
  micro-batches, and the pending moments start again from zero. Call it once per
  optimizer step: after a loop over the micro-batches, or with ``where`` the
  condition that ``optax.MultiSteps`` stepped.

  Args:
    model: a pytree holding ``bnjax.equinox.BatchNorm`` layers.
    state: the model's ``eqx.nn.State``.
    where: a boolean scalar, possibly traced: whether the step ends here (where
      False, the state comes back as it is).

  Returns:
    The new state, of the same structure, shapes and dtypes.

  Raises:
    ValueError: no layer of ``model`` accumulates, or ``where`` not a scalar.
    TypeError: ``where`` not boolean.

  >>> import equinox as eqx
  >>> layer, state = eqx.nn.make_with_state(BatchNorm)(1, "batch", mode="batch",
  ...                                                  accumulate=True)
  >>> train = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):  # micro-batches
  ...   _, state = train(x, state)
  >>> state = apply_pending(layer, state)
  >>> [s.tolist() for s in state.get(layer.batch_state_index)]  # of 0, 2, 4 and 6
  [[3.0], [5.0]]
  """
  layers = [layer for layer in _layers(model) if layer.pending_index is not None]
  if not layers:
    raise ValueError(
      "apply_pending found no accumulating layer: build them with BatchNorm(..., "
      "mode='batch', accumulate=True)"
    )
  for layer in layers:
    moments, counter, statistics = state.get(layer.pending_index)
    running = (state.get(layer.batch_counter), state.get(layer.batch_state_index))
    pending = accumulation.PendingUpdate(moments, (counter, statistics))
    (counter, statistics), pending = accumulation.apply_pending(running, pending, where=where)
    state = state.set(layer.batch_counter, counter)
    state = state.set(layer.batch_state_index, statistics)
    state = state.set(layer.pending_index, (pending.moments, *pending.next_state))
  return state


_INDICES = ("ema_first_time_index", "ema_state_index", "batch_counter", "batch_state_index")


def _from_equinox(layer: eqx.nn.BatchNorm, state: eqx.nn.State) -> BatchNorm:
  """A ``BatchNorm`` with ``layer``'s settings, ``weight``, ``bias`` and state
  indices (so the model's state keeps its keys)."""
  if layer.weight is not None:
    dtype = layer.weight.dtype
  else:  # Equinox keeps the statistics in the parameters' dtype
    index = layer.ema_state_index if layer.mode == "ema" else layer.batch_state_index
    dtype = state.get(index)[0].dtype
  replacement = BatchNorm(
    layer.input_size,
    layer.axis_name,
    eps=layer.eps,
    channelwise_affine=layer.channelwise_affine,
    momentum=layer.momentum,
    inference=layer.inference,
    dtype=dtype,
    mode=layer.mode,
  )
  fields = ("weight", "bias", *_INDICES)
  return eqx.tree_at(
    lambda new: [getattr(new, name) for name in fields],
    replacement,
    [getattr(layer, name) for name in fields],
    is_leaf=lambda node: node is None,
  )


def _debiased(layer: eqx.nn.BatchNorm, state: eqx.nn.State) -> eqx.nn.State:
  """``"batch"`` mode's state as ``BatchNorm`` keeps it: the average Equinox
  normalizes with in inference (its ``hidden / (1 - momentum**steps)``), not
  ``hidden``. Training on from there, the inference statistics stay Equinox's."""
  steps = state.get(layer.batch_counter)
  hidden = state.get(layer.batch_state_index)
  momentum = jnp.asarray(layer.momentum, hidden[0].dtype)
  debias = jnp.where(steps == 0, 1, 1 - momentum ** steps.astype(momentum.dtype))
  return state.set(layer.batch_state_index, tuple(h / debias for h in hidden))


def replace_batch_norm(model, state: eqx.nn.State) -> tuple[Any, eqx.nn.State]:
  """Every ``equinox.nn.BatchNorm`` of ``model`` replaced by a ``BatchNorm``.

  For models that create ``eqx.nn.BatchNorm`` themselves. Each replacement
  (``eqx.tree_at``) has the layer's settings, ``weight`` and ``bias``, and its state
  indices, so ``state`` keeps its keys and every other layer's entries. In
  ``"ema"`` mode the state carries over as it is; in ``"batch"`` mode each layer's
  entry becomes the average Equinox normalizes with in inference, so that the
  model's inference outputs are unchanged and further training keeps them Equinox's
  (apart from a model never trained: bnjax starts the running variance at 1, where
  Equinox's first steps overstate it; see ``BatchNorm``). Subclasses of
  ``eqx.nn.BatchNorm`` stay as they are.

  Args:
    model: a pytree holding ``eqx.nn.BatchNorm`` layers (from
      ``eqx.nn.make_with_state``).
    state: its ``eqx.nn.State``; used up, as ``State.set`` uses it.

  Returns:
    ``(model, state)``: the model with ``bnjax.equinox.BatchNorm`` layers, and
    their state.

  Raises:
    KeyError: a "batch" mode layer has no entry in ``state`` (it is not the model's).

  >>> import equinox as eqx
  >>> model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", mode="batch")
  >>> model, state = replace_batch_norm(model, state)
  >>> type(model).__module__, [s.tolist() for s in state.get(model.batch_state_index)]
  ('bnjax.equinox', [[0.0, 0.0], [1.0, 1.0]])
  """
  is_layer = lambda node: type(node) is eqx.nn.BatchNorm  # noqa: E731

  def layers(tree):
    return [node for node in jax.tree.leaves(tree, is_leaf=is_layer) if is_layer(node)]

  originals = layers(model)
  if not originals:
    return model, state
  for layer in originals:
    if layer.mode == "batch":
      state = _debiased(layer, state)
  replacements = [_from_equinox(layer, state) for layer in originals]
  return eqx.tree_at(layers, model, replacements), state
