"""``bnjax.haiku``: a drop-in for ``haiku.BatchNorm``, and more.

Swap the class and keep everything else, params and state included::

    from bnjax import haiku as bn   # bn.BatchNorm instead of hk.BatchNorm
    x = bn.BatchNorm(True, True, decay_rate=0.9)(x, is_training=True)

``BatchNorm`` has Haiku's constructor, call, parameters (``scale``, ``offset``) and
state (``mean_ema`` and ``var_ema``, each ``counter``/``hidden``/``average``: Haiku's
``ExponentialMovingAverage``, zero-debiased); the math is ``bnjax.batch_norm``.
``recompute_batch_stats`` replaces every layer's statistics by the paper's
Algorithm 2 statistics, ``sync_state`` averages them across devices, and
``apply_pending`` moves them once per optimizer step under gradient accumulation
(``accumulate=True``); ``replace_batch_norm`` puts bnjax inside a model someone
else wrote (``hk.nets.ResNet``). The module is a thin shell: it reads its state,
hands it to the pure function, and writes the returned state back.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
  import haiku as hk
except ModuleNotFoundError as error:  # the core needs JAX only; the drop-in needs Haiku
  raise ModuleNotFoundError(
    f"bnjax.haiku needs Haiku ({error}): pip install 'dm-haiku>=0.0.17', "
    "or pip install -e '.[haiku]' in a clone of bnjax"
  ) from error

from bnjax import _wrappers, accumulation, moving_average, validation
from bnjax import sync_state as _sync_state
from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm
from bnjax.stats import Moments

_EMA_NAMES = ("mean_ema", "var_ema")
_recording: list[str] = []  # set by recompute_batch_stats while it traces the model


def _axis_name(names: str | Sequence[str] | None) -> Hashable | None:
  return names if names is None or isinstance(names, str) else tuple(names)


class _MovingAverage(hk.Module):
  """The state of Haiku's ``ExponentialMovingAverage`` (its names, shapes, and
  ``average = hidden / (1 - decay**counter)``); ``bnjax.batch_norm`` moves ``hidden``."""

  def __init__(self, decay: float, name: str):
    super().__init__(name=name)
    self.decay = decay

  def hidden(self, shape: Sequence[int], dtype) -> tuple[jax.Array, jax.Array]:
    """``(counter, hidden)``, created as Haiku's (0 and zeros, ``hidden`` in
    ``dtype``) where missing."""
    counter = hk.get_state("counter", (), jnp.int32, init=jnp.zeros)
    return counter, hk.get_state("hidden", shape, dtype, init=jnp.zeros)

  def initialize(self, shape: Sequence[int], dtype) -> tuple[jax.Array, jax.Array]:
    """``(counter, hidden)``, and also ``average`` created as zeros where missing
    (Haiku's ``initialize``): for a layer that does not set them at every call."""
    hk.get_state("average", shape, dtype, init=jnp.zeros)
    return self.hidden(shape, dtype)

  def set(self, counter: jax.Array, hidden: jax.Array) -> None:
    """Stores ``counter`` and ``hidden`` and their zero-debiased ``average``."""
    self._store(counter, hidden, hidden / self._debias(counter, hidden.dtype))

  def set_average(self, counter: jax.Array, average: jax.Array) -> None:
    """Stores ``average`` and the ``hidden`` that gives it at ``counter`` (>= 1)."""
    self._store(counter, average * self._debias(counter, average.dtype), average)

  def _debias(self, counter, dtype) -> jax.Array:
    """``1 - decay**counter``, without the cancellation of Haiku's float32 power
    (``moving_average.zero_debias_factor``); 1 for the cumulative average (decay
    None), which ``hidden`` holds as it is."""
    if self.decay is None:
      return jnp.ones((), dtype)
    return moving_average.zero_debias_factor(self.decay, counter, dtype)

  def _store(self, counter, hidden, average) -> None:
    hk.set_state("counter", counter)
    hk.set_state("hidden", hidden)
    hk.set_state("average", average)

  def average(self) -> jax.Array:
    return hk.get_state("average")


class _PendingMoments(hk.Module):
  """The merged moments of an optimizer step's micro-batches so far (count,
  mean, var), as state; zeros where missing."""

  def get(self, shape: Sequence[int]) -> Moments:
    return Moments(
      *(hk.get_state(name, shape, jnp.float32, init=jnp.zeros) for name in Moments._fields)
    )

  def set(self, moments: Moments) -> None:
    for name, value in zip(Moments._fields, moments, strict=True):
      hk.set_state(name, value)


class BatchNorm(hk.Module):
  """Batch normalization with ``haiku.BatchNorm``'s interface and bnjax's core.

  The constructor, call, parameters (``scale``, ``offset``: of the input's shape
  with 1 on the reduced axes, in the input's dtype) and state (``mean_ema/~`` and
  ``var_ema/~`` with ``counter``, ``hidden`` and ``average``) are Haiku's; the
  moving averages are Haiku's ``ExponentialMovingAverage`` (zero-debiased, with
  ``decay_rate`` the weight of the old value). A model's params and state load
  into either class. With ``cross_replica_axis`` the statistics are those of every
  replica along the named axes (``pmap``, ``shard_map`` or ``vmap``), exchanged in
  one collective; under ``jit`` with a sharded batch, those of the global batch.

  Where this differs from Haiku 0.0.17, on purpose:

  * The variance is exact, ``E[(x - E[x])^2]`` in float32 at any offset (Haiku
    computes ``E[x^2] - E[x]^2`` in the input's dtype: inexact, even negative,
    when the mean is large against the deviation).
  * Statistics are computed in at least float32 and the state is float32 for
    half-precision inputs (Haiku's state takes the input's dtype; for float32 and
    float64 inputs both keep the input's).
  * The debiasing factor ``1 - decay**counter`` is computed without cancellation
    (Haiku's float32 power leaves its averages 5e-6 off after 5 steps at decay
    0.999), and ``1 - decay`` in double precision.
  * ``__call__`` takes a ``mask``; ``axis`` may hold negative axes.
  * Integer inputs are normalized as float32 (float64 under x64), with parameters
    in that dtype (Haiku creates them in the integer dtype).

  >>> import haiku as hk
  >>> forward = hk.transform_with_state(lambda x: BatchNorm(True, True, 0.9)(x, True))
  >>> x = jnp.array([[1.0], [3.0]])  # [N, C]: mean 2, variance 1
  >>> params, state = forward.init(None, x)
  >>> y, state = forward.apply(params, state, None, x)
  >>> y.round(3).tolist(), state["batch_norm/~/mean_ema"]["average"].tolist()
  ([[-1.0], [1.0]], [[2.0]])

  Args:
    create_scale: whether to learn a ``scale`` (gamma).
    create_offset: whether to learn an ``offset`` (beta).
    decay_rate: the moving averages' decay, the weight of the old value; None
      for the cumulative average, the plain mean of every batch's statistics
      (PyTorch's ``momentum=None``; ``hidden`` then holds the average itself).
    eps: added to the variance before the square root.
    scale_init: initializer of ``scale`` (default ones); only with ``create_scale``.
    offset_init: initializer of ``offset`` (default zeros); only with ``create_offset``.
    axis: the axes to reduce over; default all but the channel axis.
    cross_replica_axis: named axis (or axes) to take the statistics over.
    cross_replica_axis_index_groups: groups of replica indices (``pmap`` only).
    data_format: ``channels_last`` (``N...C``) or ``channels_first`` (``NC...``).
    name: the module's name.
    accumulate: gradient accumulation: a training call normalizes with its
      micro-batch's statistics and merges them into the state's
      ``pending_moments``, ``pending_mean_ema`` and ``pending_var_ema``
      (``bnjax.accumulate_batch_norm``); ``mean_ema`` and ``var_ema`` move once
      per optimizer step, at ``apply_pending``.
    update_stats: whether a call moves the averages; None (the default) means
      when ``is_training``. False with ``is_training`` normalizes with the batch's
      statistics and leaves the averages (as ``test_local_stats`` does when not
      training); True without it normalizes with the averages and moves them.
  """

  def __init__(
    self,
    create_scale: bool,
    create_offset: bool,
    decay_rate: float,
    eps: float = 1e-5,
    scale_init: hk.initializers.Initializer | None = None,
    offset_init: hk.initializers.Initializer | None = None,
    axis: Sequence[int] | None = None,
    cross_replica_axis: str | Sequence[str] | None = None,
    cross_replica_axis_index_groups: Sequence[Sequence[int]] | None = None,
    data_format: str = "channels_last",
    name: str | None = None,
    *,
    accumulate: bool = False,
    update_stats: bool | None = None,
  ):
    """Haiku's arguments and checks (see the class), ``accumulate`` and ``update_stats``.

    Raises:
      ValueError: an initializer without its parameter, or index groups without
        ``cross_replica_axis``.
    """
    super().__init__(name=name)
    if not create_scale and scale_init is not None:
      raise ValueError("Cannot set `scale_init` if `create_scale=False`")
    if not create_offset and offset_init is not None:
      raise ValueError("Cannot set `offset_init` if `create_offset=False`")
    if cross_replica_axis is None and cross_replica_axis_index_groups is not None:
      raise ValueError(
        "`cross_replica_axis` name must be specified if `cross_replica_axis_index_groups` are used."
      )
    self.create_scale = create_scale
    self.create_offset = create_offset
    self.eps = eps
    self.scale_init = scale_init or jnp.ones
    self.offset_init = offset_init or jnp.zeros
    self.axis = axis
    self.cross_replica_axis = cross_replica_axis
    self.cross_replica_axis_index_groups = cross_replica_axis_index_groups
    self.channel_index = hk.get_channel_index(data_format)
    self.decay_rate = decay_rate
    self.update_stats = update_stats
    self.mean_ema = _MovingAverage(decay_rate, name="mean_ema")
    self.var_ema = _MovingAverage(decay_rate, name="var_ema")
    self.accumulate = accumulate
    if accumulate:
      self.pending_moments = _PendingMoments(name="pending_moments")
      self.pending_mean_ema = _MovingAverage(decay_rate, name="pending_mean_ema")
      self.pending_var_ema = _MovingAverage(decay_rate, name="pending_var_ema")

  def _reduced_axes(self, ndim: int) -> tuple[int, ...]:
    if self.axis is not None:
      return tuple(sorted(a % ndim for a in self.axis))
    channel = self.channel_index % ndim if ndim else self.channel_index
    return tuple(i for i in range(ndim) if i != channel)

  def __call__(
    self,
    inputs: jax.Array,
    is_training: bool,
    test_local_stats: bool = False,
    scale: jax.Array | None = None,
    offset: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    update_stats: bool | None = None,
  ) -> jax.Array:
    """Normalizes ``inputs``; in training also updates the moving averages.

    Args:
      inputs: ``[..., C]`` floating input (``[N, C, ...]`` for ``channels_first``).
      is_training: normalize with the batch's statistics and update the averages.
      test_local_stats: when not training, normalize with the batch's statistics
        anyway (the averages stay).
      scale: a scale broadcastable to ``inputs``, only without ``create_scale``.
      offset: an offset broadcastable to ``inputs``, only without ``create_offset``.
      mask: optional boolean broadcastable to ``inputs``, True for the values that
        enter the statistics (see ``bnjax.batch_norm``). A feature with no valid
        value keeps its ``hidden``; the counter still counts the step.
      update_stats: overrides the constructor's ``update_stats``.

    Returns:
      The normalized input, of ``inputs``' shape, in the dtype promoted from the
      input and ``scale``/``offset`` (the input's, for the module's own).

    Raises:
      ValueError: ``scale``/``offset`` given with ``create_scale``/``create_offset``,
        or as ``bnjax.batch_norm``.
    """
    if self.create_scale and scale is not None:
      raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
    if self.create_offset and offset is not None:
      raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
    inputs = jnp.asarray(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.inexact):  # Haiku's mean of integers is float
      inputs = inputs.astype(jnp.result_type(float))
    reduced = self._reduced_axes(inputs.ndim)
    w_shape = tuple(1 if i in reduced else n for i, n in enumerate(inputs.shape))
    x, features, mask_ = _with_feature_axes(inputs, mask, reduced)
    feature_shape = tuple(x.shape[i] for i in features)
    if self.create_scale:
      scale = hk.get_parameter("scale", w_shape, inputs.dtype, init=self.scale_init)
    if self.create_offset:
      offset = hk.get_parameter("offset", w_shape, inputs.dtype, init=self.offset_init)
    with jax.numpy_dtype_promotion("standard"):  # Haiku's output dtype
      dtype = jnp.result_type(*(v for v in (inputs, scale, offset) if v is not None))
    params = _per_feature_params(scale, offset, w_shape, feature_shape)
    options = dict(axis=features, epsilon=self.eps, mask=mask_, dtype=dtype)

    use_batch = is_training or test_local_stats
    update = validation.update_stats_flag(
      self.update_stats if update_stats is None else update_stats, is_training
    )
    if not use_batch:  # read before any update: the averages normalize as they were
      y, _ = batch_norm(x, params, self._averages(feature_shape), training=False, **options)
    if update or (is_training and hk.running_init()):  # init creates the state, as Haiku's
      y_batch = self._train(x, params, w_shape, feature_shape, options)
      y = y_batch if use_batch else y
    elif use_batch:  # the batch's statistics, the averages left as they are
      neutral = BatchNormState(jnp.zeros(feature_shape), jnp.ones(feature_shape))
      y, _ = batch_norm(
        x,
        params,
        neutral,
        training=True,
        axis_name=_axis_name(self.cross_replica_axis),
        axis_index_groups=self.cross_replica_axis_index_groups,
        **options,
      )
    if params is None:  # a scale or offset per example (conditional normalization)
      with jax.numpy_dtype_promotion("standard"):
        y = y * (1 if scale is None else scale) + (0 if offset is None else offset)
    return y[..., 0] if x is not inputs and y.ndim > inputs.ndim else y

  def _averages(self, feature_shape) -> BatchNormState:
    return BatchNormState(
      jnp.reshape(self.mean_ema.average(), feature_shape),
      jnp.reshape(self.var_ema.average(), feature_shape),
    )

  def _train(self, x, params, w_shape, feature_shape, options) -> jax.Array:
    """Training mode: the batch's statistics normalize ``x`` and move the averages
    (or, inside ``recompute_batch_stats``, become them)."""
    record = _recording[-1] if _recording else None
    if self.accumulate and not record:
      return self._accumulate(x, params, w_shape, feature_shape, options)
    # Haiku's state takes the input's dtype; here at least float32 (float64 under x64).
    dtype = moving_average.widest_real(x.dtype)
    (counter, mean), (_, var) = (
      ema.hidden(w_shape, dtype) for ema in (self.mean_ema, self.var_ema)
    )
    moving = BatchNormState(jnp.reshape(mean, feature_shape), jnp.reshape(var, feature_shape))
    y, hidden = batch_norm(
      x,
      params,
      moving,
      training=True,
      momentum=0.0 if record else _momentum(self.decay_rate, counter),
      axis_name=_axis_name(self.cross_replica_axis),
      axis_index_groups=self.cross_replica_axis_index_groups,
      unbiased_variance=record == "unbiased",
      **options,
    )
    for ema, value in zip((self.mean_ema, self.var_ema), hidden, strict=True):
      if record:  # recompute_batch_stats: this batch's statistics as the average
        ema.set_average(jnp.maximum(counter, 1), jnp.reshape(value, w_shape))
      else:
        ema.set(counter + 1, jnp.reshape(value, w_shape))
    return y

  def _accumulate(self, x, params, w_shape, feature_shape, options) -> jax.Array:
    """Training mode with ``accumulate``: the batch's statistics normalize ``x`` and
    join the pending moments; the pending averages become those one update of the
    moving averages with all of them gives, and the moving averages stay."""
    dtype = moving_average.widest_real(x.dtype)
    (counter, mean), (_, var) = (
      ema.initialize(w_shape, dtype) for ema in (self.mean_ema, self.var_ema)
    )
    moving = BatchNormState(jnp.reshape(mean, feature_shape), jnp.reshape(var, feature_shape))
    pending = accumulation.PendingUpdate(self.pending_moments.get(feature_shape), moving)
    y, pending = accumulation.accumulate_batch_norm(
      x,
      params,
      moving,
      pending,
      momentum=_momentum(self.decay_rate, counter),
      axis_name=_axis_name(self.cross_replica_axis),
      axis_index_groups=self.cross_replica_axis_index_groups,
      **options,
    )
    self.pending_moments.set(pending.moments)
    for ema, value in zip(
      (self.pending_mean_ema, self.pending_var_ema), pending.next_state, strict=True
    ):
      ema.initialize(w_shape, dtype)
      ema.set(counter + 1, jnp.reshape(value, w_shape))
    return y


def _momentum(decay_rate: float | None, counter: jax.Array):
  """The weight of ``hidden`` in its next update: ``decay_rate`` (Haiku's biased
  average, debiased on reading), or for ``decay_rate`` None the cumulative average's
  (``bnjax.cumulative_momentum``: ``hidden`` is then the average itself)."""
  return moving_average.cumulative_momentum(counter) if decay_rate is None else decay_rate


def _with_feature_axes(inputs: jax.Array, mask, reduced: tuple[int, ...]):
  """``(x, feature axes, mask)`` for the core: with no feature axis left (one
  statistic for everything), a unit feature axis is appended to ``inputs`` and ``mask``."""
  features = tuple(i for i in range(inputs.ndim) if i not in reduced)
  if features:
    return inputs, features, mask
  return inputs[..., None], (inputs.ndim,), None if mask is None else jnp.asarray(mask)[..., None]


def _per_feature_params(scale, offset, w_shape, feature_shape) -> BatchNormParams | None:
  """The core's parameters where ``scale`` and ``offset`` are per feature (or
  absent); None where either varies per example, which is applied after the core."""
  if not all(
    v is None or np.broadcast_shapes(jnp.shape(v), w_shape) == w_shape for v in (scale, offset)
  ):
    return None

  def as_feature(value):
    return None if value is None else jnp.reshape(jnp.broadcast_to(value, w_shape), feature_shape)

  return BatchNormParams(as_feature(scale), as_feature(offset))


def _ema_entries(state: Mapping[str, Any]) -> list[str]:
  """The names of the moving averages' entries of a Haiku state."""
  return [name for name in state if name.rsplit("/~/", 1)[-1] in _EMA_NAMES]


def recompute_batch_stats(
  apply_fn: Callable[..., Any],
  params: Mapping[str, Any],
  state: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  unbiased: bool = True,
  rng: jax.Array | None = None,
) -> dict[str, Any]:
  """Every ``BatchNorm``'s moving averages replaced by Algorithm 2's statistics.

  Runs ``apply_fn(params, state, rng, batch)`` (a ``hk.transform_with_state``
  ``apply`` of the model in training mode, ``is_training=True``) for each batch,
  with every ``bnjax.haiku.BatchNorm`` recording its batch's statistics (over its
  ``cross_replica_axis`` too) instead of moving its averages. Each layer's new
  ``average`` is the mean of the batch means and of the ``m / (m - 1)``-corrected
  batch variances (``unbiased=False``: the biased ones); ``hidden`` is set to match
  (``average * (1 - decay**counter)``, ``counter`` at least 1), so that training
  afterwards keeps moving these statistics. ``apply_fn`` is traced once, under
  ``jax.jit`` (a jitted ``apply_fn`` is unwrapped first; a ``pmap``-ed one would
  reuse its earlier trace, so pass the plain ``apply``). Every batch norm of the
  model must be ``bnjax.haiku.BatchNorm``: the state's other ``mean_ema`` and
  ``var_ema`` entries would be averaged as they come out.

  Args:
    apply_fn: ``(params, state, rng, batch) -> (anything, state)``.
    params: the model's parameters.
    state: the model's state.
    batches: an iterable of inputs for ``apply_fn`` (K >= 1 of them).
    unbiased: the paper's ``m / (m - 1)`` correction of the variance.
    rng: passed to ``apply_fn``.

  Returns:
    The new state; entries other than the layers' moving averages are ``state``'s.

  Raises:
    ValueError: no ``BatchNorm`` ran in training mode, or ``batches`` is empty.

  >>> import haiku as hk
  >>> model = hk.transform_with_state(lambda x: BatchNorm(False, False, 0.9)(x, True))
  >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]  # means 1, 5
  >>> params, state = model.init(None, batches[0])
  >>> state = recompute_batch_stats(model.apply, params, state, batches)
  >>> [state[f"batch_norm/~/{n}"]["average"].tolist() for n in ("mean_ema", "var_ema")]
  [[[3.0]], [[2.0]]]
  """
  while isinstance(apply_fn, jax.stages.Wrapped):  # a jitted apply_fn would hide the layers
    apply_fn = apply_fn.__wrapped__
  entries = _ema_entries(state)

  @jax.jit
  def batch_statistics(batch):
    with _record("unbiased" if unbiased else "biased"):
      _, new_state = apply_fn(params, state, rng, batch)
    return {name: new_state[name] for name in entries}

  totals = _wrappers.sum_over_batches(lambda batch: (batch_statistics(batch), 1), batches)
  if totals is None:
    raise ValueError("recompute_batch_stats needs at least one batch")
  if not entries:
    raise ValueError(
      "recompute_batch_stats found no bnjax.haiku.BatchNorm state: give it the "
      "state of a model with one, run in training mode"
    )
  sums, num_batches = totals
  new_state = dict(state)
  for name, entry in sums.items():  # hidden and average are linear in the statistics
    counter = entry["counter"] // num_batches  # the same in every batch
    new_state[name] = {
      **state[name],
      "counter": counter.astype(state[name]["counter"].dtype),
      **{k: (entry[k] / num_batches).astype(state[name][k].dtype) for k in ("hidden", "average")},
    }
  return new_state


@contextlib.contextmanager
def _record(kind: str):
  _recording.append(kind)
  try:
    yield
  finally:
    _recording.pop()


def sync_state(state: Mapping[str, Any], axis_name: Hashable) -> dict[str, Any]:
  """The mean across the devices of ``axis_name`` of every moving average.

  Inside ``pmap``/``shard_map``: ``hidden`` and ``average`` of each ``mean_ema``
  and ``var_ema`` are averaged (``bnjax.sync_state``); counters and every other
  entry stay as they are.

  Args:
    state: a Haiku state holding ``BatchNorm`` moving averages.
    axis_name: the named axis to average over.

  Returns:
    The state, with the same structure, shapes and dtypes.

  Raises:
    NameError: ``axis_name`` is not bound (outside ``pmap``/``shard_map``).

  >>> entry = {"counter": jnp.array([2]), "hidden": jnp.array([[0.5]]),
  ...          "average": jnp.array([[1.0]])}  # [devices, ...]
  >>> state = {"batch_norm/~/mean_ema": entry, "linear": {"w": jnp.array([[3]])}}
  >>> synced = jax.pmap(lambda s: sync_state(s, "i"), axis_name="i",
  ...                   devices=jax.devices()[:1])(state)
  >>> synced["batch_norm/~/mean_ema"]["average"].tolist(), synced["linear"]["w"].tolist()
  ([[1.0]], [[3]])
  """
  new_state = dict(state)
  for name in _ema_entries(state):
    entry = state[name]
    synced = _sync_state({k: entry[k] for k in ("hidden", "average")}, axis_name)
    new_state[name] = {**entry, **synced}
  return new_state


_PENDING_SUFFIX = "/~/pending_moments"


def apply_pending(state: Mapping[str, Any], *, where: bool | jax.Array = True) -> dict[str, Any]:
  """Ends an optimizer step: every pending average becomes the moving average.

  For every ``BatchNorm(..., accumulate=True)`` of the state (``bnjax.apply_pending``):
  its ``mean_ema`` and ``var_ema`` (``counter``, ``hidden``, ``average``) become
  ``pending_mean_ema`` and ``pending_var_ema``, one update with the exact
  statistics of all the step's micro-batches, and ``pending_moments`` start again
  from zero. Call it once per optimizer step: after a loop over the
  micro-batches, or with ``where`` the condition that ``optax.MultiSteps`` stepped.

  Args:
    state: a Haiku state holding accumulating ``BatchNorm`` layers.
    where: a boolean scalar, possibly traced: whether the step ends here (where
      False, the state comes back as it is).

  Returns:
    The new state, of the same structure, shapes and dtypes.

  Raises:
    ValueError: no accumulating ``BatchNorm`` in ``state``, or ``where`` not a scalar.
    TypeError: ``where`` not boolean.

  >>> import haiku as hk
  >>> model = hk.transform_with_state(
  ...     lambda x: BatchNorm(False, False, 0.5, accumulate=True)(x, is_training=True))
  >>> micro_batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
  >>> params, state = model.init(None, micro_batches[0])
  >>> for x in micro_batches:
  ...   _, state = model.apply(params, state, None, x)
  >>> state = apply_pending(state)
  >>> state["batch_norm/~/mean_ema"]["average"].tolist()  # debiased: 0, 2, 4 and 6's mean
  [[3.0]]
  """
  names = [name[: -len(_PENDING_SUFFIX)] for name in state if name.endswith(_PENDING_SUFFIX)]
  if not names:
    raise ValueError(
      "apply_pending found no pending_moments in the state: build the layers with "
      "BatchNorm(..., accumulate=True)"
    )
  new_state = dict(state)
  for layer in names:
    entries = {ema: state[f"{layer}/~/{ema}"] for ema in _EMA_NAMES}
    pending = accumulation.PendingUpdate(
      Moments(**state[layer + _PENDING_SUFFIX]),
      {ema: state[f"{layer}/~/pending_{ema}"] for ema in _EMA_NAMES},
    )
    entries, pending = accumulation.apply_pending(entries, pending, where=where)
    for ema in _EMA_NAMES:
      new_state[f"{layer}/~/{ema}"] = entries[ema]
    new_state[layer + _PENDING_SUFFIX] = pending.moments._asdict()
  return new_state


# BatchNorm's keyword-only arguments, which hk.BatchNorm lacks.
_BNJAX_OPTIONS = [
  name
  for name, parameter in inspect.signature(BatchNorm).parameters.items()
  if parameter.kind is inspect.Parameter.KEYWORD_ONLY
]


def _bnjax_for_haiku(next_fun, args, kwargs, context, *, options):
  """A method interceptor: a call of ``hk.BatchNorm`` runs ``BatchNorm`` instead,
  built from its settings (and ``options``) under its very name (``hk.force_name``),
  so that it reads and writes the same parameters and state."""
  module = context.module
  if type(module) is not hk.BatchNorm or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  layer = BatchNorm(
    module.create_scale,
    module.create_offset,
    module.mean_ema.decay,
    eps=module.eps,
    scale_init=module.scale_init if module.create_scale else None,
    offset_init=module.offset_init if module.create_offset else None,
    axis=module.axis,
    cross_replica_axis=module.cross_replica_axis,
    cross_replica_axis_index_groups=module.cross_replica_axis_index_groups,
    data_format="channels_first" if module.channel_index == 1 else "channels_last",
    name=hk.force_name(module.module_name),
    **options,
  )
  return layer(*args, **kwargs)


def replace_batch_norm(**options):
  """Within the block (or the decorated function), every ``hk.BatchNorm`` runs bnjax.

  For models that create ``hk.BatchNorm`` themselves (``hk.nets.ResNet18``,
  ``hk.nets.MobileNetV1``): each call of an ``hk.BatchNorm`` becomes a call of a
  ``BatchNorm`` with its settings and its name, through Haiku's public method
  interception (``hk.intercept_methods``), so the parameters and state are Haiku's
  own: a checkpoint of the model loads either way, and nothing of Haiku is patched.
  Use it inside the transformed function, where the model runs; subclasses of
  ``hk.BatchNorm`` are left as they are.

  Args:
    **options: ``BatchNorm``'s own keyword arguments for every replaced layer:
      ``accumulate``, ``update_stats``.

  Returns:
    A context manager, also usable as a decorator of the function to transform.

  Raises:
    TypeError: an option that is not one of ``BatchNorm``'s own.
    ValueError, TypeError: within the block, a replaced layer's call raises what
      ``BatchNorm`` raises for it (e.g. a ``scale`` passed to a layer that creates one).

  >>> import haiku as hk
  >>> def forward(x):
  ...   with replace_batch_norm():
  ...     return hk.BatchNorm(True, True, 0.9, name="bn")(x, is_training=True)
  >>> model = hk.transform_with_state(forward)
  >>> x = jnp.array([[1.0], [3.0]])  # [N, C]: mean 2, variance 1
  >>> params, state = model.init(None, x)
  >>> y, state = model.apply(params, state, None, x)
  >>> y.round(3).tolist(), sorted(state)  # hk.BatchNorm's names, bnjax's numbers
  ([[-1.0], [1.0]], ['bn/~/mean_ema', 'bn/~/var_ema'])
  """
  _wrappers.check_options("replace_batch_norm", options, _BNJAX_OPTIONS)
  return hk.intercept_methods(functools.partial(_bnjax_for_haiku, options=options))
