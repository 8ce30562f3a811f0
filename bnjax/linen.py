"""``bnjax.linen``: drop-ins for ``flax.linen.BatchNorm``, and more.

Swap the import and keep everything else, checkpoints included::

    from bnjax import linen as bn   # instead of: from flax import linen as nn
    x = bn.BatchNorm(use_running_average=not train, momentum=0.9)(x)

``BatchNorm`` has Flax's fields, defaults, call signature and variables
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), plus ``unbiased_variance``
and ``virtual_batch_size``; the math is ``bnjax.batch_norm``. ``BatchRenorm`` is
batch renormalization with the same variables. ``recompute_batch_stats`` replaces
every BN layer's running statistics by the paper's Algorithm 2 statistics.
``init_pending`` and ``apply_pending`` move them once per optimizer step under
gradient accumulation (the ``pending_stats`` collection). ``replace_batch_norm``
runs bnjax in models that hard-code ``nn.BatchNorm``.

The modules are thin shells: they declare the variables, hand them to the pure
functions, and write the returned state back into ``batch_stats``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

try:
  from flax import linen as nn
except ModuleNotFoundError as error:  # the core needs JAX only; the drop-ins need Flax
  raise ModuleNotFoundError(
    f"bnjax.linen needs Flax ({error}): pip install 'flax>=0.12.8', or pip install -e '.[flax]' "
    "in a clone of bnjax"
  ) from error
from flax.linen import dtypes
from flax.typing import Dtype, Initializer

from bnjax import _wrappers, accumulation, population, validation
from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm
from bnjax.fold import fold
from bnjax.renorm import batch_renorm
from bnjax.stats import Moments


def _variables(module: nn.Module, x, stats_dtype):
  """Declares (or reads) the BN variables: ``(params, mean variable, var variable)``."""
  validation.check_floating("x", x)
  shape = validation.input_axes(jnp.shape(x), module.axis).feature_shape
  mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape)
  var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape)
  scale = bias = None
  if module.use_scale:
    scale = module.param("scale", module.scale_init, shape, module.param_dtype)
  if module.use_bias:
    bias = module.param("bias", module.bias_init, shape, module.param_dtype)
  return BatchNormParams(scale=scale, bias=bias), mean, var


def _output_dtype(x, params: BatchNormParams, dtype):
  with jax.numpy_dtype_promotion("standard"):  # Flax's rule, also in strict mode
    return dtypes.canonicalize_dtype(x, params.scale, params.bias, dtype=dtype)


def _updated_stats_dtype(stored_dtype, compute_dtype):
  """The dtype of ``batch_stats`` after a training step, as Flax's: its update
  ``momentum * old + (1 - momentum) * batch`` promotes the stored dtype with that of
  the batch statistics (``compute_dtype``, real part: a complex mean is
  ``bnjax.update_moving_average``'s to promote). float32 statistics computed
  from float32 inputs thus widen ``force_float32_reductions=False``'s
  half-precision ``batch_stats`` to float32 at the first step, and half-precision
  ones stay as they are."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.promote_types(stored_dtype, jnp.finfo(compute_dtype).dtype)


def _apply(
  module: nn.Module,
  normalize,
  x,
  use_running_average,
  mask,
  *,
  update_stats=None,
  stats_dtype=jnp.float32,
  compute_dtype=None,
  **options,
) -> jax.Array:
  """The call both layers share: declares (or reads) the variables, runs
  ``normalize`` (``bnjax.batch_norm`` or ``bnjax.batch_renorm``, given ``options``)
  and, where the statistics update (by default in training mode), writes the
  returned state back to ``batch_stats``, widened to ``_updated_stats_dtype(...,
  compute_dtype)`` where that is given, and counts the update in
  ``batch_stats/count`` where the layer keeps one. A function, not a method: Flax
  wraps methods, and only compact ones (or ``setup``) may declare variables."""
  training = not _use_running_average(module, use_running_average)
  update = _updates(module, training, update_stats)
  params, mean, var = _variables(module, x, stats_dtype)
  count = _count(module)
  initializing = module.is_initializing()
  state = _state(mean, var, compute_dtype if update else None)
  y, new_state = normalize(
    x,
    params,
    state,
    training=training,
    update_stats=update,
    **_options(module, x, params, mask, count),
    **options,
  )
  if update and not initializing:  # during init the statistics stay (as Flax)
    mean.value, var.value = new_state.mean, new_state.var
    if count is not None:
      count.value = count.value + 1
  return y


def _count(module: nn.Module):
  """The ``batch_stats/count`` variable of a layer whose momentum needs its number
  of updates (``momentum=None``, ``debias=True``); None for the others."""
  if not _wrappers.counts_updates(module.momentum, module.debias):
    return None
  return module.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))


def _use_running_average(module: nn.Module, use_running_average: bool | None) -> bool:
  return nn.merge_param("use_running_average", module.use_running_average, use_running_average)


def _updates(module: nn.Module, training: bool, update_stats: bool | None) -> bool:
  """Whether the call updates the statistics: the call's ``update_stats``, else the
  field's, else ``training``."""
  return validation.update_stats_flag(
    module.update_stats if update_stats is None else update_stats, training
  )


def _state(mean, var, compute_dtype) -> BatchNormState:
  """The running statistics of the variables ``mean`` and ``var``, widened to
  ``_updated_stats_dtype(..., compute_dtype)`` where that is given (exact: the
  math is unchanged)."""
  state = BatchNormState(mean=mean.value, var=var.value)
  if compute_dtype is None:
    return state
  return BatchNormState(
    *(jnp.asarray(v, _updated_stats_dtype(v.dtype, compute_dtype)) for v in state)
  )


def _options(module: nn.Module, x, params: BatchNormParams, mask, count=None) -> dict[str, Any]:
  """The core's keyword arguments that the module's fields and the call give (the
  momentum of the layer's next update, after ``count``'s updates where it counts)."""
  initializing = module.is_initializing()
  return dict(
    axis=module.axis,
    momentum=_wrappers.layer_momentum(
      module.momentum, module.debias, None if count is None else count.value
    ),
    epsilon=module.epsilon,
    # During init the named axis may not exist yet (as Flax).
    axis_name=None if initializing else module.axis_name,
    axis_index_groups=None if initializing else module.axis_index_groups,
    mask=mask,
    dtype=_output_dtype(x, params, module.dtype),
  )


_PENDING = "pending_stats"  # the collection of the updates that wait for the optimizer step
_PENDING_FIELDS = ("count", "mean", "var", "next_mean", "next_var")


def _as_pending(entry: Mapping[str, jax.Array]) -> accumulation.PendingUpdate:
  """A layer's ``pending_stats`` entry as the core's ``PendingUpdate``."""
  return accumulation.PendingUpdate(
    moments=Moments(entry["count"], entry["mean"], entry["var"]),
    next_state=BatchNormState(entry["next_mean"], entry["next_var"]),
  )


def _pending_entry(pending: accumulation.PendingUpdate) -> dict[str, jax.Array]:
  return dict(zip(_PENDING_FIELDS, (*pending.moments, *pending.next_state), strict=True))


def _accumulate(module: nn.Module, x, mask, *, stats_dtype, compute_dtype) -> jax.Array:
  """``BatchNorm``'s training call with a ``pending_stats`` entry: the batch's
  moments join the layer's pending update (``bnjax.accumulate_batch_norm``), and
  ``batch_stats`` stay as they are."""
  if module.virtual_batch_size is not None:
    raise ValueError(
      "BatchNorm with virtual_batch_size cannot accumulate into pending_stats: ghost batch "
      "norm moves the running statistics by the mean of its groups'; pass no pending_stats, "
      "or leave virtual_batch_size None"
    )
  params, mean, var = _variables(module, x, stats_dtype)
  state = _state(mean, var, compute_dtype)
  variables = {name: module.variable(_PENDING, name) for name in _PENDING_FIELDS}
  y, pending = accumulation.accumulate_batch_norm(
    x,
    params,
    state,
    _as_pending({name: v.value for name, v in variables.items()}),
    unbiased_variance=module.unbiased_variance,
    **_options(module, x, params, mask, _count(module)),
  )
  for name, value in _pending_entry(pending).items():
    variables[name].value = value
  return y


class _Normalization(nn.Module):
  """The fields both modules share, in flax.linen.BatchNorm's order."""

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Hashable | None = None
  axis_index_groups: Any = None


class BatchNorm(_Normalization):
  """Batch normalization with Flax's interface and bnjax's core.

  The first 14 attributes are ``flax.linen.BatchNorm``'s, with its defaults and
  variables: ``params/{scale,bias}`` and ``batch_stats/{mean,var}``, all ``[C]``
  (float32 statistics, or Flax's dtypes with ``force_float32_reductions=False``).
  The math is ``bnjax.batch_norm``.

  Under gradient accumulation, pass a ``pending_stats`` collection
  (``init_pending``) and make it mutable instead of ``batch_stats``: a training
  call then normalizes with its micro-batch's statistics and merges them into the
  layer's ``pending_stats`` entry (``bnjax.accumulate_batch_norm``), ``batch_stats``
  stay, and ``apply_pending`` moves them once per optimizer step (Flax's attention
  layers decide on their ``cache`` collection likewise, by its presence).

  ``momentum=None`` keeps the cumulative average, the plain mean of every batch's
  statistics (PyTorch's ``momentum=None``), and ``debias=True`` the zero-debiased
  exponential average (Haiku's); both count the updates in ``batch_stats/count``
  (an int32 scalar, absent otherwise, so checkpoints stay Flax's).

  >>> import jax
  >>> layer = BatchNorm(use_running_average=False, momentum=0.9)
  >>> x = jnp.array([[1.0], [3.0]])  # [N, C]: mean 2, variance 1
  >>> variables = layer.init(jax.random.key(0), x)
  >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  >>> y.round(3).tolist(), updates["batch_stats"]["mean"].tolist()
  ([[-1.0], [1.0]], [0.2])

  Attributes:
    use_running_average: if True, normalize with the stored ``batch_stats``
      (inference); if False, with the batch's statistics (training), updating
      ``batch_stats`` when that collection is mutable.
    axis: the feature axis or axes of the input.
    momentum: weight of the old running statistics (Flax's convention); None
      for the cumulative average (see above).
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: promoted from input and parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias`` (beta).
    use_scale: if True, multiply by the learned ``scale`` (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis (``pmap``/``shard_map``) to synchronize statistics over;
      under ``jit`` with a sharded batch leave it None (statistics are global).
    axis_index_groups: groups of device indices along ``axis_name``.
    use_fast_variance: accepted for compatibility and ignored: bnjax's variance
      is always exact, at the speed of Flax's fast (inexact) one.
    force_float32_reductions: statistics are always reduced in at least float32
      in bnjax; if False, ``batch_stats`` start in ``param_dtype`` and a training
      step promotes them with the dtype Flax computes the batch statistics in
      (``dtype``, else the input's): as Flax, they stay in half precision for
      half-precision inputs and become float32 at the first step for float32 ones.
    unbiased_variance: update the running variance with the unbiased batch
      variance (the paper's inference statistics); see ``bnjax.batch_norm``.
    virtual_batch_size: ghost batch norm; see ``bnjax.batch_norm``.
    debias: keep the zero-debiased exponential average (Haiku's), counting the
      updates in ``batch_stats/count``; see ``bnjax.debiased_momentum``.
    update_stats: whether a call updates ``batch_stats`` (or accumulates into
      ``pending_stats``); None (the default) means in training mode. False keeps
      them as they are while the batch's statistics normalize (fine-tuning, a
      second forward pass); True with ``use_running_average=True`` normalizes
      with them and updates them.
  """

  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_variance: bool = False
  virtual_batch_size: int | None = None
  debias: bool = False
  update_stats: bool | None = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    update_stats: bool | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training mode also updates ``batch_stats``.

    Args:
      x: ``[..., C]`` floating input (features on ``axis``).
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics; see
        ``bnjax.batch_norm``.
      update_stats: overrides the attribute of the same name.

    Returns:
      The normalized input, of ``x``'s shape, in ``dtype`` (by default promoted
      from the input and the parameters).

    Raises:
      flax.errors.ModifyScopeVariableError: training mode (outside ``init``)
        with ``batch_stats`` not mutable: pass ``mutable=["batch_stats"]`` (or,
        given ``pending_stats``, with those not mutable).
      ValueError: ``pending_stats`` given with a ``virtual_batch_size``.
      TypeError, ValueError: as ``bnjax.batch_norm`` (e.g. a non-floating ``x``).
    """
    return _batch_norm(self, x, use_running_average, mask=mask, update_stats=update_stats)


def _batch_norm(module, x, use_running_average=None, *, mask=None, update_stats=None) -> jax.Array:
  """``BatchNorm``'s call, for any module with its fields (a ``flax.linen.BatchNorm``
  too, seen through ``_WithBnjaxFields`` in ``replace_batch_norm``)."""
  stats_dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype
  compute_dtype = module.dtype or jnp.result_type(x)  # Flax's dtype for the batch statistics
  if module.force_float32_reductions:
    compute_dtype = _updated_stats_dtype(compute_dtype, jnp.float32)
  training = not _use_running_average(module, use_running_average)
  if (
    training and _updates(module, training, update_stats) and module.has_variable(_PENDING, "count")
  ):
    return _accumulate(module, x, mask, stats_dtype=stats_dtype, compute_dtype=compute_dtype)
  return _apply(
    module,
    batch_norm,
    x,
    use_running_average,
    mask,
    update_stats=update_stats,
    stats_dtype=stats_dtype,
    compute_dtype=compute_dtype,
    unbiased_variance=module.unbiased_variance,
    virtual_batch_size=module.virtual_batch_size,
  )


class BatchRenorm(_Normalization):
  """Batch renormalization (Ioffe, 2017); see ``bnjax.batch_renorm``.

  Same variables as ``BatchNorm`` (a BatchNorm checkpoint loads). ``r_max`` and
  ``d_max`` are the attributes' values unless the call passes others, which may
  be traced (the paper raises them on a schedule from 1 and 0).

  The attributes ``use_running_average``, ``axis``, ``momentum``, ``epsilon``,
  ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``,
  ``scale_init``, ``axis_name`` and ``axis_index_groups`` are ``BatchNorm``'s.

  >>> import jax
  >>> layer = BatchRenorm(use_running_average=False, r_max=1.0, d_max=5.0)
  >>> x = jnp.array([[1.0], [3.0]])  # batch mean 2; running mean 0, variance 1
  >>> y, _ = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  >>> y.round(3).tolist()  # x_hat + d, with d = (2 - 0) / 1
  [[1.0], [3.0]]

  Attributes:
    r_max: bound on the scale correction r, >= 1 (the paper's final 3).
    d_max: bound on the shift correction d, >= 0 (the paper's final 5).
    debias: as ``BatchNorm``'s.
    update_stats: as ``BatchNorm``'s.
  """

  r_max: float = 3.0
  d_max: float = 5.0
  debias: bool = False
  update_stats: bool | None = None

  @nn.compact
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
    """Normalizes ``x``; in training mode also updates ``batch_stats``.

    Args:
      x: ``[..., C]`` real floating input (features on ``axis``).
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics; see
        ``bnjax.batch_norm``.
      r_max: overrides the attribute; may be a traced scalar (a schedule).
      d_max: overrides the attribute; may be a traced scalar.
      update_stats: overrides the attribute of the same name.

    Returns:
      The renormalized input, of ``x``'s shape, in ``dtype`` (by default promoted
      from the input and the parameters).

    Raises:
      flax.errors.ModifyScopeVariableError: training mode (outside ``init``)
        with ``batch_stats`` not mutable: pass ``mutable=["batch_stats"]``.
      ValueError: ``r_max < 1`` or ``d_max < 0``, or as ``bnjax.batch_renorm``.
      TypeError: as ``bnjax.batch_renorm`` (e.g. a complex or integer ``x``).
    """
    return _apply(
      self,
      batch_renorm,
      x,
      use_running_average,
      mask,
      update_stats=update_stats,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
    )


_NORMALIZATIONS = (BatchNorm, BatchRenorm, nn.BatchNorm)


def _batch_moments_of_apply(apply_fn, variables, batch) -> dict[tuple[str, ...], Any]:
  """Runs ``apply_fn`` and returns each training-mode BN layer's batch moments,
  keyed by module path, computed from the layer's input as bnjax computes them."""
  moments = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, _NORMALIZATIONS):
      x = args[0]
      call_mode = args[1] if len(args) > 1 else kwargs.get("use_running_average")
      if not nn.merge_param("use_running_average", module.use_running_average, call_mode):
        if module.path in moments:
          raise NotImplementedError(
            f"the BN layer {'/'.join(module.path)} ran more than once in one apply (nn.scan, "
            "or a shared module): its statistics cannot be recomputed per call"
          )
        shape = validation.input_axes(jnp.shape(x), module.axis).feature_shape
        moments[module.path] = population.update_population(
          population.init_population(shape), x, axis=module.axis, mask=kwargs.get("mask")
        )
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    apply_fn(variables, batch)
  return moments


def recompute_batch_stats(
  apply_fn: Callable[[Any, Any], Any],
  variables: dict,
  batches: Iterable[Any],
  *,
  unbiased: bool = True,
) -> dict:
  """Every BN layer's ``batch_stats`` replaced by Algorithm 2's statistics.

  Runs ``apply_fn(variables, batch)`` for each batch, which must apply the model in
  training mode (BN layers using batch statistics), e.g.
  ``lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])``, and
  records each BN layer's batch statistics (``bnjax.linen.BatchNorm``,
  ``BatchRenorm`` and ``flax.linen.BatchNorm`` alike). The new statistics are, per
  layer, the mean of the batch means and ``m / (m - 1)`` times the mean of the
  batch variances (``unbiased=False``: of the biased ones), exactly, not an
  exponential average. ``apply_fn`` is traced under ``jax.jit`` here, with a
  method interceptor that sees the BN inputs (a jitted ``apply_fn`` is unwrapped
  first). A statistic that no batch defines keeps its old value. Statistics are those of
  each batch as given (not synchronized across devices).

  Args:
    apply_fn: ``(variables, batch) -> anything``, the model in training mode.
    variables: the model's variables, with a ``batch_stats`` collection.
    batches: an iterable of inputs for ``apply_fn`` (K >= 1 of them).
    unbiased: the paper's ``m / (m - 1)`` correction of the variance.

  Returns:
    ``variables`` with ``batch_stats`` replaced for every BN layer that ran
    (``[C]`` float32 ``mean`` and ``var``, or the dtype they had).

  Raises:
    ValueError: no BN layer ran in training mode (``apply_fn`` evaluates, or
      ``batches`` is empty).
    NotImplementedError: a BN layer ran more than once in one call (``nn.scan``,
      a shared module).

  >>> import jax
  >>> model = BatchNorm(use_running_average=False)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 1)))
  >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]  # means 1, 5
  >>> variables = recompute_batch_stats(
  ...     lambda v, b: model.apply(v, b, mutable=["batch_stats"]), variables, batches)
  >>> variables["batch_stats"]["mean"].tolist(), variables["batch_stats"]["var"].tolist()
  ([3.0], [2.0])
  """
  while isinstance(apply_fn, jax.stages.Wrapped):  # a jitted apply_fn would hide the BN calls
    apply_fn = apply_fn.__wrapped__
  run = jax.jit(lambda variables, batch: _batch_moments_of_apply(apply_fn, variables, batch))
  totals = _wrappers.sum_over_batches(lambda batch: run(variables, batch), batches)
  if not totals:
    raise ValueError(
      "recompute_batch_stats saw no BN layer in training mode: give it an apply_fn that runs "
      "the model with use_running_average=False (e.g. train=True), and at least one batch"
    )
  batch_stats = variables.get("batch_stats", {})

  def recomputed(old, summed):
    # Statistics that no batch defined (every value masked out) keep their old value.
    state = population.population_state(
      summed, unbiased=unbiased, fallback=BatchNormState(mean=old["mean"], var=old["var"])
    )
    return {
      **old,
      "mean": state.mean.astype(old["mean"].dtype),
      "var": state.var.astype(old["var"].dtype),
    }

  for path, summed in totals.items():
    batch_stats = _wrappers.replace_at(
      batch_stats, path, functools.partial(recomputed, summed=summed)
    )
  return {**variables, "batch_stats": batch_stats}


def fold_variables(
  variables: Mapping[str, Any], pairs: Iterable[tuple[str, str]], *, epsilon: float = 1e-5
) -> dict[str, Any]:
  """Folds every ``(layer, batch_norm)`` pair of a Flax variable dict (``bnjax.fold``).

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a model with BN.
    pairs: ``(layer_path, bn_path)`` with '/'-separated module paths, e.g.
      ``[("Conv_0", "BatchNorm_0"), ("block/Dense_0", "block/BatchNorm_0")]``:
      each BN directly follows its layer (a Dense or a Conv, with or without bias).
    epsilon: the BNs' epsilon.

  Returns:
    ``{"params": ...}`` for the same model without those BNs, each layer with
    the folded kernel and a bias, the BN entries removed, and ``batch_stats``
    dropped once empty. Meant for a model whose layers have ``use_bias=True``
    where a BN followed them. Kernels keep their ``[..., C]`` shape and dtype;
    each folded bias is ``[C]``.

  Raises:
    KeyError: ``variables`` has no ``params``, or a path names no module of
      ``params`` (or, for a BN, of ``batch_stats``); the message lists the names
      there are.
    TypeError, ValueError: as ``fold`` (non-floating arrays, a kernel whose last
      axis is not the BN's number of features, ``epsilon`` not positive).

  >>> variables = {
  ...     "params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
  ...                "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}},
  ...     "batch_stats": {"BatchNorm_0": {"mean": jnp.array([1.0, 2.0]),
  ...                                     "var": jnp.array([4.0, 1.0])}}}
  >>> folded = fold_variables(variables, [("Dense_0", "BatchNorm_0")], epsilon=1e-12)
  >>> list(folded), list(folded["params"])  # the BN is gone
  (['params'], ['Dense_0'])
  >>> dense = folded["params"]["Dense_0"]
  >>> dense["kernel"][0].tolist(), dense["bias"].tolist()
  ([0.5, 1.0], [0.5, -1.0])
  """
  params = dict(variables["params"])
  batch_stats = dict(variables.get("batch_stats", {}))
  for layer_path, bn_path in pairs:
    layer = _wrappers.get_path(params, layer_path)
    bn_params = _wrappers.get_path(params, bn_path)
    bn_stats = _wrappers.get_path(batch_stats, bn_path)
    kernel, bias = fold(
      layer["kernel"],
      layer.get("bias"),
      BatchNormParams(bn_params.get("scale"), bn_params.get("bias")),
      BatchNormState(bn_stats["mean"], bn_stats["var"]),
      epsilon=epsilon,
    )
    folded_layer = {**layer, "kernel": kernel, "bias": bias}
    params = _wrappers.replace_at(params, layer_path, lambda _, new=folded_layer: new)
    params = _wrappers.without(params, bn_path)
    batch_stats = _wrappers.without(batch_stats, bn_path)
  folded = {"params": params}
  if jax.tree.leaves(batch_stats):
    folded["batch_stats"] = batch_stats
  return folded


def _is_batch_norm_entry(node: Mapping) -> bool:
  """A layer's ``batch_stats``: ``mean`` and ``var``, and a ``count`` where it keeps one."""
  names = set(node)
  return {"mean", "var"} <= names <= {"mean", "var", "count"} and not isinstance(
    node["mean"], Mapping
  )


def init_pending(batch_stats: Mapping[str, Any]) -> dict[str, Any]:
  """The ``pending_stats`` collection at the start of an optimizer step.

  For every BN layer of ``batch_stats`` (an entry holding ``mean`` and ``var``,
  and nothing else but a ``count``), at the same path: ``count``, ``mean`` and
  ``var``, the moments of no micro-batch yet (zeros), and ``next_mean`` and
  ``next_var``, the layer's statistics as they are (``bnjax.init_pending``). Given
  to ``apply`` as the ``pending_stats`` collection, it makes every ``BatchNorm``
  accumulate (every BN layer of the model must then be ``bnjax.linen.BatchNorm``:
  the others would not fill their entries).

  Args:
    batch_stats: the model's ``batch_stats`` collection.

  Returns:
    A dict of the same nesting with an entry of five ``[C]`` arrays per layer.

  Raises:
    TypeError: a statistic not floating.

  >>> pending = init_pending({"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}})
  >>> sorted(pending["BatchNorm_0"]), pending["BatchNorm_0"]["next_var"].tolist()
  (['count', 'mean', 'next_mean', 'next_var', 'var'], [1.0, 1.0])
  """
  pending = {}
  for path, entry in _wrappers.entries(batch_stats, _is_batch_norm_entry):
    fresh = _pending_entry(accumulation.init_pending(BatchNormState(entry["mean"], entry["var"])))
    pending = _wrappers.replace_at(pending, path, lambda _, new=fresh: new)
  return pending


def _installed(old: Mapping[str, Any], state: BatchNormState, where) -> dict[str, Any]:
  """A layer's ``batch_stats`` entry with ``state`` installed, and its ``count`` (where
  it keeps one: ``momentum=None``, ``debias=True``) one more where ``where``."""
  entry = {**old, **state._asdict()}
  if "count" in old:
    entry["count"] = old["count"] + jnp.asarray(where).astype(old["count"].dtype)
  return entry


def apply_pending(
  batch_stats: Mapping[str, Any],
  pending_stats: Mapping[str, Any],
  *,
  where: bool | jax.Array = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Ends an optimizer step: every layer's pending statistics become its ``batch_stats``.

  ``bnjax.apply_pending`` for each layer of ``pending_stats``: its ``batch_stats``
  become ``next_mean`` and ``next_var`` (one update with the exact statistics of
  all the step's micro-batches), and its moments start again from zero. Call it
  once per optimizer step: after a ``lax.scan`` over the micro-batches, or with
  ``where`` the condition that ``optax.MultiSteps`` stepped.

  Args:
    batch_stats: the model's ``batch_stats`` collection.
    pending_stats: the ``pending_stats`` the micro-batches' training calls
      returned (``mutable=["pending_stats"]``).
    where: a boolean scalar, possibly traced: whether the step ends here (where
      False, both collections come back as they are).

  Returns:
    ``(batch_stats, pending_stats)`` of the same structure, shapes and dtypes.

  Raises:
    KeyError: a layer of ``pending_stats`` has no entry in ``batch_stats``.
    TypeError, ValueError: ``where`` not a boolean scalar.

  >>> import jax
  >>> layer = BatchNorm(use_running_average=False, momentum=0.0)
  >>> variables = layer.init(jax.random.key(0), jnp.zeros((2, 1)))
  >>> pending = init_pending(variables["batch_stats"])
  >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):  # micro-batches
  ...   _, updates = layer.apply({**variables, "pending_stats": pending}, x,
  ...                            mutable=["pending_stats"])
  ...   pending = updates["pending_stats"]
  >>> batch_stats, _ = apply_pending(variables["batch_stats"], pending)
  >>> batch_stats["mean"].tolist(), batch_stats["var"].tolist()  # of 0, 2, 4 and 6
  ([3.0], [5.0])
  """
  batch_stats, pending_stats = dict(batch_stats), dict(pending_stats)
  for path, entry in _wrappers.entries(pending_stats, lambda node: "next_mean" in node):
    old = _wrappers.get_path(batch_stats, path)
    state, pending = accumulation.apply_pending(
      BatchNormState(old["mean"], old["var"]), _as_pending(entry), where=where
    )
    batch_stats = _wrappers.replace_at(
      batch_stats, path, lambda old, new=state: _installed(old, new, where)
    )
    pending_stats = _wrappers.replace_at(
      pending_stats, path, lambda _, new=pending: _pending_entry(new)
    )
  return batch_stats, pending_stats


# BatchNorm's fields that flax.linen.BatchNorm lacks, with their defaults.
_BNJAX_FIELDS = {
  field.name: field.default
  for field in dataclasses.fields(BatchNorm)
  if field.name not in {flax_field.name for flax_field in dataclasses.fields(nn.BatchNorm)}
}


class _WithBnjaxFields:
  """A ``flax.linen.BatchNorm`` seen as a ``BatchNorm``: its own fields, scope and
  methods (``variable``, ``param``, ...), and ``BatchNorm``'s further fields, at
  their defaults or as ``options`` give them."""

  def __init__(self, module: nn.BatchNorm, options: Mapping[str, Any]):
    self._module = module
    self._fields = {**_BNJAX_FIELDS, **options}

  def __getattr__(self, name: str):
    if name in self._fields:
      return self._fields[name]
    return getattr(self._module, name)


def replace_batch_norm(**options):
  """Within the block (or the decorated function), every ``flax.linen.BatchNorm`` runs bnjax.

  For models that create ``nn.BatchNorm`` themselves, with no argument to pass
  another class (a model with one, e.g. ``norm=``, takes ``BatchNorm`` directly).
  Through Flax's public method interception (``nn.intercept_methods``), each call of
  an ``nn.BatchNorm`` runs ``bnjax.batch_norm`` in that module's own scope, with its
  settings, variables and names: ``params/{scale,bias}`` and ``batch_stats/{mean,var}``
  are Flax's, so a checkpoint loads either way. Wrap the ``init``/``apply`` calls,
  or decorate the function that makes them before ``jax.jit`` sees it
  (``jax.jit(replace_batch_norm()(train_step))``): JAX's cache does not see the
  interception, so a ``with`` block around a call of a function compiled before
  would run its old program. Subclasses of ``nn.BatchNorm`` are left as they are.

  Args:
    **options: ``BatchNorm``'s own fields (beyond Flax's) for every replaced
      layer: ``unbiased_variance``, ``virtual_batch_size``, ``debias``,
      ``update_stats``.

  Returns:
    A context manager, also usable as a decorator.

  Raises:
    TypeError: an option that is not one of ``BatchNorm``'s own fields.

  >>> import jax
  >>> layer = nn.BatchNorm(use_running_average=False, momentum=0.9)
  >>> x = jnp.array([[1.0], [3.0]])  # [N, C]: mean 2, variance 1
  >>> with replace_batch_norm():
  ...   variables = layer.init(jax.random.key(0), x)
  ...   y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  >>> y.round(3).tolist(), updates["batch_stats"]["mean"].tolist()
  ([[-1.0], [1.0]], [0.2])
  """
  _wrappers.check_options("replace_batch_norm", options, _BNJAX_FIELDS)

  def bnjax_instead(next_fun, args, kwargs, context):
    module = context.module
    if type(module) is not nn.BatchNorm or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    return _batch_norm(_WithBnjaxFields(module, options), *args, **kwargs)

  return nn.intercept_methods(bnjax_instead)
