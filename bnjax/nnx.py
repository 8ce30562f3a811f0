"""``bnjax.nnx``: drop-ins for ``flax.nnx.BatchNorm``, and more.

``BatchNorm`` has Flax's constructor, attributes, state (``nnx.Param``
``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``) and modes
(``.train()``/``.eval()``, ``use_running_average``, ``nnx.view``), plus
``unbiased_variance`` and ``virtual_batch_size``; the math is ``bnjax.batch_norm``.
``BatchRenorm`` is batch renormalization with the same state.
``recompute_batch_stats`` sets every BN layer's statistics to the paper's
Algorithm 2 statistics; ``init_pending`` and ``apply_pending`` move them once per
optimizer step under gradient accumulation (``PendingStat`` variables);
``replace_batch_norm`` swaps bnjax into a model that hard-codes ``nnx.BatchNorm``.
The modules hold the variables; each call reads them, runs the pure function and
writes the returned state back.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing as tp
from collections.abc import Callable, Hashable, Iterable, Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp

try:
  import flax.errors
  from flax import nnx
except ModuleNotFoundError as error:  # the core needs JAX only; the drop-ins need Flax
  raise ModuleNotFoundError(
    f"bnjax.nnx needs Flax ({error}): pip install 'flax>=0.12.8', or pip install -e '.[flax]' "
    "in a clone of bnjax"
  ) from error
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from bnjax import _wrappers, accumulation, population, validation
from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm
from bnjax.renorm import batch_renorm
from bnjax.stats import Moments


class BatchNorm(nnx.Module):
  """Batch normalization with ``flax.nnx.BatchNorm``'s interface and bnjax's core.

  All arguments but the last four are ``flax.nnx.BatchNorm``'s, with its defaults
  and state: ``nnx.Param`` ``scale``/``bias`` and ``nnx.BatchStat`` ``mean``/``var``,
  all ``[num_features]`` (float32 statistics). Training mode (the default,
  ``.train()``) normalizes with the batch's statistics and updates ``mean`` and
  ``var`` in place; ``.eval()`` normalizes with them. The math is
  ``bnjax.batch_norm``. After ``init_pending``, training calls accumulate
  instead (``bnjax.accumulate_batch_norm``): ``mean`` and ``var`` move once per
  optimizer step, at ``apply_pending``.

  ``momentum=None`` keeps the cumulative average, the plain mean of every batch's
  statistics (PyTorch's ``momentum=None``), and ``debias=True`` the zero-debiased
  exponential average (Haiku's); both count the updates in an ``nnx.BatchStat``
  ``count`` (an int32 scalar, absent otherwise).

  >>> from flax import nnx
  >>> layer = BatchNorm(1, momentum=0.9, rngs=nnx.Rngs(0))
  >>> x = jnp.array([[1.0], [3.0]])  # [N, C]: mean 2, variance 1
  >>> layer(x).round(3).tolist(), layer.mean[...].tolist()
  ([[-1.0], [1.0]], [0.2])
  >>> layer.eval()
  >>> layer(x).round(3).tolist()  # (x - 0.2) / sqrt(0.9 * 1 + 0.1 * 1)
  [[0.8], [2.8]]

  Args:
    num_features: the number of features ``C``.
    use_running_average: if True, normalize with the stored statistics
      (``.eval()`` sets it); if False, with the batch's, updating them
      (``.train()`` sets it).
    axis: the feature axis of the input.
    momentum: weight of the old running statistics; None for the cumulative
      average (see above).
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: promoted from input and variables).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias``.
    use_scale: if True, multiply by the learned ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis to synchronize statistics over (``pmap``/``shard_map``).
    axis_index_groups: groups of device indices along ``axis_name``.
    use_fast_variance: accepted for compatibility and ignored: the variance is
      always exact.
    promote_dtype: function promoting ``(x, mean, var, scale, bias)`` to a
      common dtype, as Flax's.
    rngs: random number generators for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    unbiased_variance: see ``bnjax.batch_norm``.
    virtual_batch_size: ghost batch norm; see ``bnjax.batch_norm``.
    debias: keep the zero-debiased exponential average (Haiku's), counting the
      updates in ``count``; see ``bnjax.debiased_momentum``.
    update_stats: whether a call updates ``mean`` and ``var`` (or accumulates,
      under ``init_pending``); None (the default) means in training mode. False
      keeps them while the batch's statistics normalize (fine-tuning); True in
      ``.eval()`` mode normalizes with them and updates them.
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros_init(),
    scale_init: Initializer = initializers.ones_init(),
    axis_name: Hashable | None = None,
    axis_index_groups: tp.Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
    unbiased_variance: bool = False,
    virtual_batch_size: int | None = None,
    debias: bool = False,
    update_stats: bool | None = None,
  ):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    counts = _wrappers.counts_updates(momentum, debias)
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if counts else nnx.data(None)
    self.scale: nnx.Param[jax.Array] | None = (
      nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
      if use_scale
      else nnx.data(None)
    )
    self.bias: nnx.Param[jax.Array] | None = (
      nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
      if use_bias
      else nnx.data(None)
    )
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.unbiased_variance = unbiased_variance
    self.virtual_batch_size = virtual_batch_size
    self.debias = debias
    self.update_stats = update_stats

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    update_stats: bool | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training mode also updates ``mean`` and ``var``.

    Args:
      x: ``[..., num_features]`` floating input (features on ``axis``).
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics; see
        ``bnjax.batch_norm``.
      update_stats: overrides the attribute of the same name.

    Returns:
      The normalized input, of ``x``'s shape, in ``dtype`` (by default promoted
      from the input and the variables).

    Raises:
      ValueError: no mode given (``use_running_average`` None in the constructor
        and the call), accumulating with a ``virtual_batch_size``, or as
        ``bnjax.batch_norm``.
      TypeError: as ``bnjax.batch_norm`` (e.g. a non-floating ``x``).
    """
    pending = _pending(self)
    training = _training(self, use_running_average)
    if pending is not None and training and self._updates(training, update_stats):
      return self._accumulate(x, pending, mask)
    return self._apply(
      batch_norm,
      x,
      use_running_average,
      mask,
      update_stats,
      unbiased_variance=self.unbiased_variance,
      virtual_batch_size=self.virtual_batch_size,
    )

  def _apply(self, normalize, x, use_running_average, mask, update_stats, **options):
    """The call both layers share: promotes as Flax does, runs ``normalize``
    (``bnjax.batch_norm`` or ``bnjax.batch_renorm``, given ``options``) and, where
    the statistics update (by default in training mode), writes the returned state
    back and counts the update."""
    training = _training(self, use_running_average)
    update = self._updates(training, update_stats)
    x, params, state, out_dtype = self._promoted(x)
    y, new_state = normalize(
      x,
      params,
      state,
      training=training,
      update_stats=update,
      **self._options(mask, out_dtype),
      **options,
    )
    if update:
      _write_statistics(self, new_state)
    return y

  def _updates(self, training: bool, update_stats: bool | None) -> bool:
    """Whether the call updates the statistics: the call's ``update_stats``, else
    the attribute's, else ``training``."""
    return validation.update_stats_flag(
      self.update_stats if update_stats is None else update_stats, training
    )

  def _accumulate(self, x, pending: accumulation.PendingUpdate, mask) -> jax.Array:
    """The training call of a layer with ``PendingStat`` variables: the batch's
    moments join them (``bnjax.accumulate_batch_norm``); ``mean`` and ``var`` stay."""
    if self.virtual_batch_size is not None:
      raise ValueError(
        "BatchNorm with virtual_batch_size cannot accumulate: ghost batch norm moves the "
        "running statistics by the mean of its groups'; remove the PendingStat variables "
        "(nnx.pop(model, bnjax.nnx.PendingStat)), or leave virtual_batch_size None"
      )
    x, params, state, out_dtype = self._promoted(x)
    y, pending = accumulation.accumulate_batch_norm(
      x,
      params,
      state,
      pending,
      unbiased_variance=self.unbiased_variance,
      **self._options(mask, out_dtype),
    )
    _set_pending(self, pending)
    return y

  def _promoted(self, x):
    """``(x, params, state, output dtype)``, promoted as Flax promotes them."""
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    with jax.numpy_dtype_promotion("standard"):  # Flax's rule, also in strict mode
      x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
      )
      out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    state = BatchNormState(mean=self.mean[...], var=self.var[...])
    return x, BatchNormParams(scale=scale, bias=bias), state, out_dtype

  def _options(self, mask, out_dtype) -> dict[str, tp.Any]:
    """The core's keyword arguments that the layer's attributes and the call give."""
    return dict(
      axis=self.axis,
      momentum=_wrappers.layer_momentum(
        self.momentum, self.debias, None if self.count is None else self.count[...]
      ),
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
    )

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view`` to set the mode of a view of the model.

    ``nnx.view_info`` prints the ``Args:`` section below, worded as Flax's so
    that its output is Flax's.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class PendingStat(nnx.Variable):
  """A BN layer's update of its statistics that waits for the optimizer step.

  The variable type of the ``pending_*`` attributes that ``init_pending`` gives
  each layer under gradient accumulation (the merged moments of the step's
  micro-batches so far, and the ``mean`` and ``var`` one update with them gives:
  ``bnjax.PendingUpdate``); a filter for ``nnx.state``, ``nnx.split`` and
  ``nnx.pop``, as ``nnx.BatchStat`` is for the running statistics.

  Args:
    value: the ``[num_features]`` array.
    hijax, ref, eager_sharding, metadata: as ``nnx.Variable``'s (``metadata``: keywords).

  >>> from flax import nnx
  >>> layer = init_pending(BatchNorm(2, rngs=nnx.Rngs(0)))
  >>> sorted(nnx.state(layer, PendingStat))  # doctest: +NORMALIZE_WHITESPACE
  ['pending_count', 'pending_mean', 'pending_next_mean', 'pending_next_var',
   'pending_var']
  """


_PENDING_ATTRIBUTES = (
  "pending_count",
  "pending_mean",
  "pending_var",
  "pending_next_mean",
  "pending_next_var",
)


def _pending(layer: BatchNorm) -> accumulation.PendingUpdate | None:
  """The layer's ``PendingStat`` variables as the core's ``PendingUpdate``, or None
  where it has none (not accumulating)."""
  if getattr(layer, _PENDING_ATTRIBUTES[0], None) is None:
    return None
  count, mean, var, next_mean, next_var = (getattr(layer, a)[...] for a in _PENDING_ATTRIBUTES)
  return accumulation.PendingUpdate(Moments(count, mean, var), BatchNormState(next_mean, next_var))


def _set_pending(layer: BatchNorm, pending: accumulation.PendingUpdate) -> None:
  values = (*pending.moments, *pending.next_state)
  for name, value in zip(_PENDING_ATTRIBUTES, values, strict=True):
    getattr(layer, name)[...] = value


_CAPTURED = (
  "{layer} cannot update its mean and var inside this transform: its Variables belong to an "
  "outer trace, because the transform captured the module (e.g. nnx.vmap(model), flax#4760) "
  "or nnx.merge reused them (pass copy=True); pass the module as an argument instead: "
  "nnx.vmap(lambda model, x: model(x), in_axes=(None, 0), axis_name='batch')(model, x), with "
  "axis_name='batch' on the BatchNorm too"
)


def _write_statistics(layer: BatchNorm, new_state: BatchNormState) -> None:
  """Stores an updating call's running statistics in the layer's ``BatchStat``s.

  They carry no gradient (as Flax): with hijax variables the write happens inside
  the differentiated function, which otherwise fails. Flax refuses the write to
  Variables of an outer trace; the error then says how to pass the module instead.
  """
  try:
    layer.mean[...] = jax.lax.stop_gradient(new_state.mean)
    layer.var[...] = jax.lax.stop_gradient(new_state.var)
    if layer.count is not None:  # counts the update
      layer.count[...] = layer.count[...] + 1
  except flax.errors.TraceContextError as error:
    raise flax.errors.TraceContextError(
      _CAPTURED.format(layer=f"bnjax.nnx.{type(layer).__name__}")
    ) from error


def _training(layer: BatchNorm, use_running_average: bool | None) -> bool:
  """The layer's mode for this call: the call's ``use_running_average``, else the
  layer's; neither given is an error."""
  if use_running_average is None:
    use_running_average = layer.use_running_average
  if use_running_average is None:
    raise ValueError(
      "No `use_running_average` argument was provided to BatchNorm: "
      "pass it to the constructor or the call, or use .train() / .eval()."
    )
  return not use_running_average


class BatchRenorm(BatchNorm):
  """Batch renormalization (Ioffe, 2017); see ``bnjax.batch_renorm``.

  ``BatchNorm`` with two more arguments, ``r_max`` (>= 1) and ``d_max`` (>= 0), the
  bounds of the corrections: the same state, and the same keyword arguments but
  ``unbiased_variance`` and ``virtual_batch_size``. ``r_max`` and ``d_max`` are the
  attributes' values unless the call passes others (which may be traced, for a
  schedule).

  >>> from flax import nnx
  >>> layer = BatchRenorm(1, r_max=1.0, d_max=5.0, rngs=nnx.Rngs(0))
  >>> x = jnp.array([[1.0], [3.0]])  # batch mean 2; running mean 0, variance 1
  >>> layer(x).round(3).tolist()  # x_hat + d, with d = (2 - 0) / 1
  [[1.0], [3.0]]

  Args:
    num_features: the number of features ``C``.
    r_max: bound on the scale correction r, >= 1 (the paper's final 3).
    d_max: bound on the shift correction d, >= 0 (the paper's final 5).
    **kwargs: ``BatchNorm``'s keyword arguments (``use_running_average``, ``axis``,
      ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``,
      ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
      ``axis_index_groups``, ``use_fast_variance``, ``promote_dtype``, ``rngs``,
      ``bias_metadata``, ``scale_metadata``, ``debias``, ``update_stats``).
  """

  def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, **kwargs):
    for name in ("unbiased_variance", "virtual_batch_size"):
      if name in kwargs:
        raise TypeError(
          f"BatchRenorm takes no {name}: batch renormalization updates the "
          "running statistics with the biased variance of the whole batch"
        )
    super().__init__(num_features, **kwargs)
    self.r_max = r_max
    self.d_max = d_max

  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask=None,
    r_max=None,
    d_max=None,
    update_stats: bool | None = None,
  ):
    """Normalizes ``x``; in training mode also updates ``mean`` and ``var``.

    Args:
      x: ``[..., num_features]`` real floating input (features on ``axis``).
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics; see
        ``bnjax.batch_norm``.
      r_max: overrides the attribute; may be a traced scalar (a schedule).
      d_max: overrides the attribute; may be a traced scalar.
      update_stats: overrides the attribute of the same name.

    Returns:
      The renormalized input, of ``x``'s shape, in ``dtype`` (by default promoted
      from the input and the variables).

    Raises:
      ValueError: ``r_max < 1`` or ``d_max < 0``, no mode given
        (``use_running_average`` None in the constructor and the call), or as
        ``bnjax.batch_renorm``.
      TypeError: as ``bnjax.batch_renorm`` (e.g. a complex or integer ``x``).
    """
    return self._apply(
      batch_renorm,
      x,
      use_running_average,
      mask,
      update_stats,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
    )


def _recording(call, recording_layers: set[int]):
  """``call`` (a BN layer's ``__call__``) that first sows, in training mode, the
  ``PopulationStatistics`` of its input as ``nnx.Intermediate`` ``batch_moments``;
  once per layer call (a subclass's ``__call__`` calling its parent's records once)."""

  @functools.wraps(call)
  def recording_call(layer, x, use_running_average=None, *, mask=None, **kwargs):
    if id(layer) in recording_layers:  # the outer call of this layer records
      return call(layer, x, use_running_average, mask=mask, **kwargs)
    if _training(layer, use_running_average):
      empty = population.init_population(layer.num_features)
      layer.sow(
        nnx.Intermediate,
        "batch_moments",
        population.update_population(empty, x, axis=layer.axis, mask=mask),
      )
    recording_layers.add(id(layer))
    try:
      return call(layer, x, use_running_average, mask=mask, **kwargs)
    finally:
      recording_layers.discard(id(layer))

  return recording_call


@contextlib.contextmanager
def _recording_batch_moments(layer_types):
  """Within the block, BN layers of ``layer_types`` record their inputs' batch
  moments (``_recording`` replaces each ``__call__`` they run, and the block's end
  restores it): the interception ``nn.intercept_methods`` gives
  ``bnjax.linen.recompute_batch_stats``, so the layers carry no flag for it."""
  classes = {
    cls
    for layer_type in layer_types
    for cls in layer_type.__mro__
    if issubclass(cls, BatchNorm) and "__call__" in vars(cls)
  }
  originals = {cls: vars(cls)["__call__"] for cls in classes}
  recording_layers: set[int] = set()
  try:
    for cls, original in originals.items():
      cls.__call__ = _recording(original, recording_layers)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def recompute_batch_stats(
  model: nnx.Module,
  batches: Iterable[tp.Any],
  *,
  unbiased: bool = True,
  apply_fn: Callable[[nnx.Module, tp.Any], tp.Any] | None = None,
) -> nnx.Module:
  """Sets every bnjax BN layer's ``mean`` and ``var`` to Algorithm 2's statistics.

  Runs the model in training mode on each batch (``apply_fn(model, batch)``,
  default ``model(batch)``) and records, per BN layer, the batch statistics of its
  input; then sets ``mean`` to the mean of the batch means and ``var`` to
  ``m / (m - 1)`` times the mean of the batch variances (``unbiased=False``: of
  the biased ones), exactly. Everything else in the model is left as it was, the
  layers' modes included. Updates ``model`` in place and returns it.

  Args:
    model: an nnx model holding ``bnjax.nnx`` ``BatchNorm``/``BatchRenorm`` layers.
    batches: an iterable of inputs for ``apply_fn`` (K >= 1 of them).
    unbiased: the paper's ``m / (m - 1)`` correction of the variance.
    apply_fn: ``(model, batch) -> anything``; default ``model(batch)``.

  Returns:
    ``model``, whose BN layers' ``[num_features]`` ``mean`` and ``var`` are set.

  Raises:
    ValueError: the model has no ``bnjax.nnx`` BN layer, or ``batches`` is empty.

  >>> from flax import nnx
  >>> model = BatchNorm(1, rngs=nnx.Rngs(0))
  >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]  # means 1, 5
  >>> model = recompute_batch_stats(model, batches)
  >>> model.mean[...].tolist(), model.var[...].tolist()
  ([3.0], [2.0])
  """
  apply_fn = apply_fn or (lambda model, batch: model(batch))
  layers = [
    (path, module) for path, module in nnx.iter_graph(model) if isinstance(module, BatchNorm)
  ]  # BatchRenorm too
  if not layers:
    raise ValueError(
      "recompute_batch_stats found no bnjax.nnx BatchNorm/BatchRenorm layer in the model"
    )
  variables = jax.tree.leaves(nnx.state(model), is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))
  if any(getattr(variable, "hijax", False) for variable in variables):
    # nnx.jit refuses hijax variables (nnx.var_defaults(hijax=True)): recompute on a
    # copy with ordinary ones, then write the statistics back.
    ordinary = nnx.with_vars(model, hijax=False)
    recompute_batch_stats(ordinary, batches, unbiased=unbiased, apply_fn=apply_fn)
    nnx.update(model, nnx.state(ordinary, nnx.BatchStat))
    return model
  saved_state = nnx.clone(nnx.state(model))
  saved_modes = [module.use_running_average for _, module in layers]
  for _, module in layers:
    module.use_running_average = False

  @nnx.jit
  def batch_moments(model, batch):
    if hasattr(nnx, "capture"):  # Flax >= 0.12.8: sown values are captured, not stored
      _, intermediates = nnx.capture(apply_fn, nnx.Intermediate)(model, batch)
      return intermediates
    apply_fn(model, batch)
    return nnx.pop(model, nnx.Intermediate)

  try:
    with _recording_batch_moments({type(module) for _, module in layers}):
      totals = _wrappers.sum_over_batches(lambda batch: batch_moments(model, batch), batches)
  finally:
    nnx.update(model, saved_state)
    for (_, module), mode in zip(layers, saved_modes, strict=True):
      module.use_running_average = mode
  if totals is None:
    raise ValueError("recompute_batch_stats needs at least one batch")
  for path, module in layers:
    recorded = _wrappers.get_path(totals, path)["batch_moments"]  # a tuple of one
    if isinstance(recorded, nnx.Variable):
      recorded = recorded.get_value()
    # Statistics that no batch defined (every value masked out) keep their old value.
    fallback = BatchNormState(mean=module.mean[...], var=module.var[...])
    state = population.population_state(recorded[0], unbiased=unbiased, fallback=fallback)
    module.mean[...] = state.mean.astype(module.mean[...].dtype)
    module.var[...] = state.var.astype(module.var[...].dtype)
  return model


def _accumulating_layers(model: nnx.Module) -> list[BatchNorm]:
  """The model's ``BatchNorm`` layers that can accumulate (not ``BatchRenorm``)."""
  return [
    module
    for _, module in nnx.iter_graph(model)
    if isinstance(module, BatchNorm) and not isinstance(module, BatchRenorm)
  ]


def init_pending(model: nnx.Module) -> nnx.Module:
  """Makes every ``BatchNorm`` of ``model`` accumulate; each optimizer step's starts empty.

  Gives each layer ``PendingStat`` variables, ``pending_count``, ``pending_mean``
  and ``pending_var`` (the moments of no micro-batch yet: zeros) and
  ``pending_next_mean`` and ``pending_next_var`` (its ``mean`` and ``var``), as
  Flax's attention layers get their cache (``init_cache``). From then on, a
  training call normalizes with its micro-batch's statistics and merges them into
  these (``bnjax.accumulate_batch_norm``); ``mean`` and ``var`` stay until
  ``apply_pending``. ``nnx.pop(model, PendingStat)`` ends accumulation. Call it
  outside ``nnx.jit``: it adds variables to the model. ``BatchRenorm`` layers are
  left as they are.

  Args:
    model: an nnx model holding ``bnjax.nnx.BatchNorm`` layers.

  Returns:
    ``model``, updated in place.

  Raises:
    ValueError: the model has no ``bnjax.nnx.BatchNorm`` layer.

  >>> from flax import nnx
  >>> layer = init_pending(BatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0)))
  >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):  # micro-batches
  ...   _ = layer(x)
  >>> layer.mean[...].tolist(), layer.pending_next_mean[...].tolist()  # of 0, 2, 4 and 6
  ([0.0], [3.0])
  """
  layers = _accumulating_layers(model)
  if not layers:
    raise ValueError("init_pending found no bnjax.nnx.BatchNorm layer in the model")
  for layer in layers:
    fresh = accumulation.init_pending(BatchNormState(layer.mean[...], layer.var[...]))
    for name, value in zip(_PENDING_ATTRIBUTES, (*fresh.moments, *fresh.next_state), strict=True):
      setattr(layer, name, PendingStat(value))
  return model


def apply_pending(model: nnx.Module, *, where: bool | jax.Array = True) -> nnx.Module:
  """Ends an optimizer step: every layer's pending statistics become its ``mean`` and ``var``.

  ``bnjax.apply_pending`` for each layer with ``PendingStat`` variables
  (``init_pending``): ``mean`` and ``var`` become one update with the exact
  statistics of all the step's micro-batches, and the moments start again from
  zero. Call it once per optimizer step (inside ``nnx.jit`` too): after a loop
  over the micro-batches, or with ``where`` the condition that
  ``optax.MultiSteps`` stepped.

  Args:
    model: an nnx model whose ``BatchNorm`` layers accumulate.
    where: a boolean scalar, possibly traced: whether the step ends here (where
      False, nothing changes).

  Returns:
    ``model``, updated in place.

  Raises:
    ValueError: no layer of ``model`` accumulates (see ``init_pending``), or
      ``where`` not a scalar.
    TypeError: ``where`` not boolean.

  >>> from flax import nnx
  >>> layer = init_pending(BatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0)))
  >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):  # micro-batches
  ...   _ = layer(x)
  >>> layer = apply_pending(layer)
  >>> layer.mean[...].tolist(), layer.var[...].tolist()  # of 0, 2, 4 and 6
  ([3.0], [5.0])
  """
  layers = [(layer, _pending(layer)) for layer in _accumulating_layers(model)]
  layers = [(layer, pending) for layer, pending in layers if pending is not None]
  if not layers:
    raise ValueError(
      "apply_pending found no accumulating BatchNorm layer: call init_pending(model) first"
    )
  for layer, pending in layers:
    state = BatchNormState(layer.mean[...], layer.var[...])
    state, pending = accumulation.apply_pending(state, pending, where=where)
    layer.mean[...], layer.var[...] = state.mean, state.var
    if layer.count is not None:  # momentum=None, debias=True: one update more
      layer.count[...] = layer.count[...] + jnp.asarray(where).astype(jnp.int32)
    _set_pending(layer, pending)
  return model


# BatchNorm's constructor arguments that flax.nnx.BatchNorm's lacks.
_BNJAX_OPTIONS = sorted(
  set(inspect.signature(BatchNorm.__init__).parameters)
  - set(inspect.signature(nnx.BatchNorm.__init__).parameters)
)
_FLAX_SETTINGS = (
  "use_running_average",
  "axis",
  "momentum",
  "epsilon",
  "dtype",
  "param_dtype",
  "use_bias",
  "use_scale",
  "axis_name",
  "axis_index_groups",
  "use_fast_variance",
  "promote_dtype",
)


def _from_flax(layer: nnx.BatchNorm, options: Mapping[str, tp.Any]) -> BatchNorm:
  """A ``BatchNorm`` with ``layer``'s settings and its very ``Variable``s."""
  settings = {name: getattr(layer, name) for name in _FLAX_SETTINGS}
  replacement = BatchNorm(layer.num_features, **settings, **options, rngs=nnx.Rngs(0))
  for name in ("mean", "var", "scale", "bias"):
    if getattr(layer, name) is not None:
      setattr(replacement, name, getattr(layer, name))
  return replacement


def _set_child(parent, key, child, path) -> None:
  if isinstance(parent, nnx.Module) and isinstance(key, str):
    setattr(parent, key, child)
  elif hasattr(parent, "__setitem__"):  # nnx.List, nnx.Dict, list, dict
    parent[key] = child
  else:
    raise TypeError(
      f"replace_batch_norm cannot replace the nnx.BatchNorm at {'/'.join(map(str, path))}: it "
      f"sits in a {type(parent).__name__}, which cannot be changed; hold it in an nnx.List "
      "or nnx.Dict"
    )


def replace_batch_norm(model: nnx.Module, **options) -> nnx.Module:
  """Every ``flax.nnx.BatchNorm`` of ``model`` replaced by a ``BatchNorm``, in place.

  For models that create ``nnx.BatchNorm`` themselves (a model with an argument
  for the class, e.g. ``norm=``, takes ``BatchNorm`` directly). Each replacement has
  the layer's settings and its very ``Variable``s (``scale``, ``bias``, ``mean``,
  ``var``: the same objects), at the same place in the graph, so the model's state,
  its checkpoints and an optimizer's state keep their structure; a layer shared by
  several parents is replaced by one shared ``BatchNorm``. Call it outside
  transforms, as any graph change; subclasses of ``nnx.BatchNorm`` stay as they are.

  Args:
    model: an nnx model, or an ``nnx.BatchNorm`` itself.
    **options: ``BatchNorm``'s own arguments (beyond Flax's) for every replaced
      layer: ``unbiased_variance``, ``virtual_batch_size``, ``debias``,
      ``update_stats``.

  Returns:
    ``model``, changed in place (the replacement itself for an ``nnx.BatchNorm``).

  Raises:
    TypeError: an option that is not one of ``BatchNorm``'s own arguments, or a
      layer held in a container that cannot be changed (a tuple).

  >>> class Model(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(1, 1, rngs=rngs)
  ...     self.norm = nnx.BatchNorm(1, momentum=0.9, rngs=rngs)
  >>> model = replace_batch_norm(Model(nnx.Rngs(0)))
  >>> type(model.norm).__module__, model.norm.momentum
  ('bnjax.nnx', 0.9)
  """
  _wrappers.check_options("replace_batch_norm", options, _BNJAX_OPTIONS)
  replacements: dict[int, BatchNorm] = {}

  def replacement(layer):
    if id(layer) not in replacements:
      replacements[id(layer)] = _from_flax(layer, options)
    return replacements[id(layer)]

  if type(model) is nnx.BatchNorm:
    return replacement(model)
  while True:  # a layer shared by several parents shows at one path per pass
    nodes = dict(nnx.iter_graph(model))
    found = [(path, node) for path, node in nodes.items() if type(node) is nnx.BatchNorm]
    if not found:
      return model
    for path, layer in found:
      _set_child(nodes[path[:-1]], path[-1], replacement(layer), path)
