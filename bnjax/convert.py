"""Batch-norm weights and statistics from PyTorch, Keras and Haiku, and back.

Every project that ports a batch-norm model writes this conversion, and the same
mistakes recur (transformers #21581, timm #815, equinox #948, flax #1848): the
momentum read with the other convention, Keras's epsilon left at bnjax's default,
PyTorch's running variance "corrected" for a bias it does not have, Haiku's
debiased averages taken for plain ones. Each ``from_*`` function here returns the
layer as bnjax has it, a ``Converted`` ``(params, state, options)``, where
``options`` are the ``bnjax.batch_norm`` keyword arguments that make bnjax compute
what the source framework computes::

    params, state, options = bnjax.convert.from_torch(model.state_dict(), "layer1.0.bn1.")
    y, state = bnjax.batch_norm(x_nchw, params, state, training=True, **options)

Evaluation then matches the source exactly: it reads only the stored statistics,
which are copied unchanged (PyTorch's and Keras's ``[C]`` vectors as they are,
Haiku's ``[1, ..., C, ...]`` ones reshaped to ``[C]``). Training matches as far as
the conventions allow (what each ``from_*`` says): the batch is normalized with its
biased variance everywhere, and the running statistics move the source's way (the
unbiased batch variance for PyTorch, the biased one for Keras and Haiku), by the
source's momentum, which for PyTorch's ``momentum=None`` and Haiku's debiased
averages changes from step to step (``torch_momentum``, ``haiku_momentum``). The
same ``options`` fit ``bnjax.linen.BatchNorm(**options)`` and
``bnjax.nnx.BatchNorm(C, **options)``, and ``params._asdict()`` and
``state._asdict()`` are Flax's ``params`` and ``batch_stats`` entries of the layer.

The ``to_*`` functions go the other way, returning the source framework's entries
(NumPy arrays) and its layer's settings. No framework is imported here: entries may
be PyTorch tensors (``state_dict()`` values, detached), NumPy or JAX arrays.

No library does this: converters in timm, transformers and flaxmodels each handle
their own models' layers, with one framework's conventions hard-coded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.batch_norm import BatchNormParams, BatchNormState

_TORCH_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_EMA_NAMES = ("mean_ema", "var_ema")


class Converted(NamedTuple):
  """A batch-norm layer as bnjax holds it, converted from another framework.

  Unpacks as ``params, state, options = bnjax.convert.from_torch(...)``.

  >>> entries = {"weight": np.ones(2), "bias": np.zeros(2),
  ...            "running_mean": np.array([1.0, 2.0]), "running_var": np.array([4.0, 9.0])}
  >>> params, state, options = from_torch(entries, momentum=0.1)
  >>> state.var.tolist(), options["momentum"], options["unbiased_variance"]
  ([4.0, 9.0], 0.9, True)
  """

  params: BatchNormParams  #: ``scale`` and ``bias``, ``[C]`` (None where the source has none).
  state: BatchNormState  #: The running ``mean`` and ``var``, ``[C]``, copied unchanged.
  options: dict[str, Any]  #: ``batch_norm``'s momentum, epsilon, unbiased_variance, axis.


def _array(value, name: str) -> jax.Array:
  """A framework's entry as a JAX array (a PyTorch tensor through NumPy)."""
  if hasattr(value, "detach"):  # a torch.Tensor; .numpy() needs no gradient tape
    value = value.detach().cpu().numpy()
  array = jnp.asarray(value)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array, got dtype {array.dtype}")
  return array


def _vector(value, name: str) -> jax.Array:
  array = _array(value, name)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a vector [C], got shape {array.shape}")
  return array


def _check_epsilon(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}")
  return float(value)


def _check_momentum(name: str, value, *, allow_none: bool = False):
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
  return float(value)


# ---- PyTorch ------------------------------------------------------------------------


def torch_momentum(momentum: float | None, num_batches_tracked=0):
  """The ``momentum`` (Flax's convention) of PyTorch's next training step.

  PyTorch moves ``running = (1 - m) * running + m * batch`` with ``m`` its
  ``momentum``; bnjax moves ``momentum * running + (1 - momentum) * batch``. So
  ``momentum = 1 - m``: PyTorch's default 0.1 is 0.9 here, and PyTorch's 0 ("no
  update") is 1. PyTorch's ``momentum=None`` keeps the cumulative (equal-weight)
  average, with ``m = 1 / (k + 1)`` at the step after ``k = num_batches_tracked``
  steps: ``momentum = k / (k + 1)``, a new value each step (traced ``k`` gives a
  traced momentum, so a jitted step needs no recompilation).

  Args:
    momentum: PyTorch's ``momentum``, in [0, 1], or None (cumulative average).
    num_batches_tracked: PyTorch's count of training steps so far, ``k``; read
      only for ``momentum=None``. An int or an integer array (may be traced).

  Returns:
    A Python float, or for ``momentum=None`` and an array ``k`` a float32 (float64
    under x64) scalar array.

  Raises:
    ValueError: ``momentum`` neither None nor in [0, 1], or ``num_batches_tracked``
      negative.

  >>> torch_momentum(0.1), torch_momentum(0.0), torch_momentum(None, 3)
  (0.9, 1.0, 0.75)
  """
  momentum = _check_momentum("PyTorch's momentum", momentum, allow_none=True)
  if momentum is not None:
    return 1.0 - momentum
  if isinstance(num_batches_tracked, (int, np.integer)):
    if num_batches_tracked < 0:
      raise ValueError(f"num_batches_tracked must be >= 0, got {num_batches_tracked}")
    return num_batches_tracked / (num_batches_tracked + 1)
  k = jnp.asarray(num_batches_tracked).astype(jnp.result_type(float))
  return k / (k + 1)


def from_torch(
  entries: Mapping[str, Any],
  prefix: str = "",
  *,
  momentum: float | None = 0.1,
  eps: float = 1e-5,
  axis: int | Sequence[int] = 1,
) -> Converted:
  """A PyTorch ``BatchNorm{1,2,3}d``/``SyncBatchNorm`` layer, from its ``state_dict``.

  Reads ``{prefix}weight``, ``{prefix}bias`` (absent with ``affine=False``),
  ``{prefix}running_mean``, ``{prefix}running_var`` and
  ``{prefix}num_batches_tracked`` (optional). The statistics are copied as they
  are: PyTorch's ``running_var`` is a running average of *unbiased* batch
  variances, and ``options`` say so (``unbiased_variance=True``), so evaluation
  gives PyTorch's output exactly and training moves the statistics as PyTorch
  does. (Rescaling ``running_var`` by ``(m - 1) / m`` would make every evaluation
  differ from PyTorch's.)

  Both conventions meet exactly: PyTorch normalizes a training batch with its
  biased variance, as bnjax does, and for the moving averages ``options``
  carry ``torch_momentum(momentum, num_batches_tracked)``. With ``momentum=None``
  (cumulative average) that momentum is the next step's only; step ``i`` after it
  takes ``torch_momentum(None, num_batches_tracked + i)``. Where PyTorch refuses a
  batch of one value per feature in training, bnjax leaves the running variance
  as it was. ``SyncBatchNorm``'s entries are BatchNorm's; its process group is
  bnjax's ``axis_name`` (under ``pmap``/``shard_map``) or, under ``jit`` with a
  sharded batch, nothing at all.

  Args:
    entries: a ``state_dict`` (or any mapping of names to tensors or arrays).
    prefix: the layer's name in ``entries`` with its trailing dot, e.g.
      ``"layer1.0.bn1."``; ``""`` for a layer's own ``state_dict``.
    momentum: the layer's ``momentum`` (PyTorch's convention; 0.1 by default),
      or None for the cumulative average.
    eps: the layer's ``eps``.
    axis: the feature axis of the inputs bnjax will get: 1 for PyTorch's own
      layouts (``[N, C]``, ``[N, C, L]``, NCHW, NCDHW), -1 for inputs transposed
      to channels-last.

  Returns:
    ``Converted(params, state, options)``: ``[C]`` arrays in the entries' dtype,
    and ``options = {"momentum", "epsilon", "unbiased_variance": True, "axis"}``.

  Raises:
    KeyError: no ``{prefix}running_mean``/``running_var`` (a layer built with
      ``track_running_stats=False``, which normalizes with batch statistics in
      evaluation too: call ``batch_norm`` with ``training=True`` and drop the state),
      or a ``weight`` without its ``bias``.
    ValueError: entries not vectors of one length, or a bad ``momentum``/``eps``.
    TypeError: entries not floating.

  >>> import bnjax
  >>> entries = {"bn.weight": np.array([2.0]), "bn.bias": np.array([1.0]),
  ...            "bn.running_mean": np.array([3.0]), "bn.running_var": np.array([4.0]),
  ...            "bn.num_batches_tracked": np.array(7)}
  >>> params, state, options = from_torch(entries, "bn.", momentum=None)
  >>> options
  {'momentum': 0.875, 'epsilon': 1e-05, 'unbiased_variance': True, 'axis': 1}
  >>> x = jnp.array([[5.0], [7.0]])  # [N, C]
  >>> y, _ = bnjax.batch_norm(x, params, state, training=False, **options)
  >>> y.round(4).tolist()  # 2 * (x - 3) / sqrt(4 + 1e-5) + 1
  [[3.0], [5.0]]
  """
  eps = _check_epsilon("eps", eps)
  missing = [n for n in ("running_mean", "running_var") if prefix + n not in entries]
  if missing:
    raise KeyError(
      f"no {', '.join(prefix + n for n in missing)} in the state_dict: a layer with "
      "track_running_stats=False normalizes with the batch's statistics in evaluation too; "
      "call bnjax.batch_norm with training=True and drop the returned state"
    )
  if (prefix + "weight" in entries) != (prefix + "bias" in entries):
    raise KeyError(f"{prefix}weight and {prefix}bias come together (affine=True), not alone")
  read = {
    name: _vector(entries[prefix + name], prefix + name)
    for name in _TORCH_NAMES[:4]
    if prefix + name in entries
  }
  _check_lengths(read)
  tracked = int(np.asarray(entries.get(prefix + "num_batches_tracked", 0)))
  params = BatchNormParams(scale=read.get("weight"), bias=read.get("bias"))
  state = BatchNormState(mean=read["running_mean"], var=read["running_var"])
  options = {
    "momentum": torch_momentum(momentum, tracked),
    "epsilon": eps,
    "unbiased_variance": True,
    "axis": axis,
  }
  return Converted(params, state, options)


def _check_lengths(arrays: Mapping[str, jax.Array]) -> None:
  lengths = {name: a.shape for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"the layer's vectors differ in length: {lengths}")


def to_torch(
  params: BatchNormParams | None,
  state: BatchNormState,
  prefix: str = "",
  *,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  num_batches_tracked: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """A bnjax layer as PyTorch ``BatchNorm`` ``state_dict`` entries and settings.

  ``running_mean`` and ``running_var`` are the state as it is: PyTorch evaluates
  with them as bnjax does, so evaluation matches exactly whichever variance the
  state averaged (bnjax's default is the biased one; with
  ``unbiased_variance=True`` training continues in PyTorch exactly as it would
  in bnjax).

  Args:
    params: ``BatchNormParams`` of ``[C]`` arrays, or None (``affine=False``).
      Both fields or neither: PyTorch's layer has a weight and a bias or none.
    state: ``BatchNormState`` of ``[C]`` arrays.
    prefix: prepended to each name, e.g. ``"layer1.0.bn1."``.
    momentum: bnjax's ``momentum`` (Flax's convention) the layer trained with.
    epsilon: bnjax's ``epsilon``.
    num_batches_tracked: the training steps taken (PyTorch reads it only for
      ``momentum=None``).

  Returns:
    ``(entries, settings)``: NumPy ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (``[C]``, the arrays' dtypes) and ``num_batches_tracked``
    (int64 ``[]``), each name prefixed, for ``load_state_dict`` after
    ``torch.from_numpy``; ``settings = {"momentum": 1 - momentum, "eps":
    epsilon}`` for the layer's constructor.

  Raises:
    ValueError: one of ``params``' fields None and not the other, vectors of
      different lengths, or a bad ``momentum``/``epsilon``.

  >>> import bnjax
  >>> params, state = bnjax.init(2)
  >>> entries, settings = to_torch(params, state, "bn.", momentum=0.9)
  >>> sorted(entries)
  ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
  >>> settings  # 1 - 0.9 in double precision
  {'momentum': 0.09999999999999998, 'eps': 1e-05}
  """
  momentum = _check_momentum("momentum", momentum)
  epsilon = _check_epsilon("epsilon", epsilon)
  arrays = {"running_mean": state.mean, "running_var": state.var}
  if params is not None and (params.scale is None) != (params.bias is None):
    raise ValueError(
      "PyTorch's BatchNorm has a weight and a bias (affine=True) or neither: "
      "give params with both fields, or None"
    )
  if params is not None and params.scale is not None:
    arrays = {"weight": params.scale, "bias": params.bias, **arrays}
  vectors = {name: np.asarray(_vector(a, name)) for name, a in arrays.items()}
  _check_lengths(vectors)
  vectors["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  entries = {prefix + name: vectors[name] for name in _TORCH_NAMES if name in vectors}
  return entries, {"momentum": 1.0 - momentum, "eps": epsilon}


# ---- Keras ----------------------------------------------------------------------------


def from_keras(
  weights: Sequence[Any],
  *,
  scale: bool = True,
  center: bool = True,
  momentum: float = 0.99,
  epsilon: float = 1e-3,
  axis: int | Sequence[int] = -1,
) -> Converted:
  """A Keras ``BatchNormalization`` layer, from ``layer.get_weights()``.

  The weights come in Keras's order: ``gamma`` (with ``scale=True``), ``beta``
  (with ``center=True``), ``moving_mean``, ``moving_variance``. Keras's momentum
  is already bnjax's (the weight of the old value) and its moving variance
  averages biased batch variances, as bnjax's default does; its epsilon is 1e-3,
  not bnjax's 1e-5, and ``options`` carry it. Evaluation and training then match
  Keras exactly (both normalize a training batch with its biased variance).

  Args:
    weights: ``layer.get_weights()`` (NumPy arrays, ``[C]`` each).
    scale: the layer's ``scale`` (whether it has ``gamma``).
    center: the layer's ``center`` (whether it has ``beta``).
    momentum: the layer's ``momentum``.
    epsilon: the layer's ``epsilon`` (Keras's default 1e-3).
    axis: the layer's ``axis`` (-1; 1 for ``channels_first`` data).

  Returns:
    ``Converted(params, state, options)``, ``options = {"momentum", "epsilon",
    "unbiased_variance": False, "axis"}``.

  Raises:
    ValueError: not as many weights as ``scale`` and ``center`` say (a renorm
      layer's extra weights too: Keras's ``renorm`` is not converted), or not
      vectors of one length, or a bad ``momentum``/``epsilon``.
    TypeError: weights not floating.

  >>> weights = [np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0])]
  >>> params, state, options = from_keras(weights)
  >>> options
  {'momentum': 0.99, 'epsilon': 0.001, 'unbiased_variance': False, 'axis': -1}
  """
  momentum = _check_momentum("momentum", momentum)
  epsilon = _check_epsilon("epsilon", epsilon)
  names = ["gamma"] * scale + ["beta"] * center + ["moving_mean", "moving_variance"]
  if len(weights) != len(names):
    raise ValueError(
      f"expected {len(names)} Keras weights ({', '.join(names)}) for scale={scale}, "
      f"center={center}, got {len(weights)}"
    )
  read = {name: _vector(w, name) for name, w in zip(names, weights, strict=True)}
  _check_lengths(read)
  params = BatchNormParams(scale=read.get("gamma"), bias=read.get("beta"))
  state = BatchNormState(mean=read["moving_mean"], var=read["moving_variance"])
  options = {"momentum": momentum, "epsilon": epsilon, "unbiased_variance": False, "axis": axis}
  return Converted(params, state, options)


def to_keras(
  params: BatchNormParams | None,
  state: BatchNormState,
  *,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  axis: int = -1,
) -> tuple[list[np.ndarray], dict[str, Any]]:
  """A bnjax layer as Keras ``BatchNormalization`` weights and settings.

  Args:
    params: ``BatchNormParams`` of ``[C]`` arrays, or None (no ``gamma``/``beta``).
    state: ``BatchNormState`` of ``[C]`` arrays.
    momentum: bnjax's ``momentum`` (Keras's convention too).
    epsilon: bnjax's ``epsilon`` (1e-5 by default, where Keras's default is 1e-3:
      ``settings`` carry it).
    axis: the feature axis.

  Returns:
    ``(weights, settings)``: the list for ``layer.set_weights`` (``gamma``,
    ``beta``, ``moving_mean``, ``moving_variance``, those the layer has) and
    ``settings = {"axis", "momentum", "epsilon", "center", "scale"}`` for
    ``keras.layers.BatchNormalization(**settings)``.

  Raises:
    ValueError: vectors of different lengths, or a bad ``momentum``/``epsilon``.

  >>> import bnjax
  >>> params, state = bnjax.init(3)
  >>> weights, settings = to_keras(params, state)
  >>> len(weights), settings
  (4, {'axis': -1, 'momentum': 0.99, 'epsilon': 1e-05, 'center': True, 'scale': True})
  """
  momentum = _check_momentum("momentum", momentum)
  epsilon = _check_epsilon("epsilon", epsilon)
  scale, bias = (None, None) if params is None else params
  arrays = {
    name: value
    for name, value in (
      ("gamma", scale),
      ("beta", bias),
      ("moving_mean", state.mean),
      ("moving_variance", state.var),
    )
    if value is not None
  }
  vectors = {name: np.asarray(_vector(a, name)) for name, a in arrays.items()}
  _check_lengths(vectors)
  settings = {
    "axis": axis,
    "momentum": momentum,
    "epsilon": epsilon,
    "center": bias is not None,
    "scale": scale is not None,
  }
  return list(vectors.values()), settings


# ---- Haiku ----------------------------------------------------------------------------


def haiku_momentum(decay_rate: float, counter=0):
  """The ``momentum`` of the next step of Haiku's debiased moving average.

  ``hk.BatchNorm`` keeps ``hidden = d * hidden + (1 - d) * value`` from zero and
  evaluates with ``average = hidden / (1 - d**t)`` after ``t`` steps (its
  ``ExponentialMovingAverage``, zero-debiased). That average is itself a moving
  average, ``average_t = momentum_t * average_(t-1) + (1 - momentum_t) *
  value_t`` with ``momentum_t = (d - d**t) / (1 - d**t)``: 0 at the first step
  (the average is the first value), approaching ``d`` as ``t`` grows. So bnjax's
  state holding Haiku's ``average`` moves exactly as Haiku's does with this
  momentum, ``t = counter + 1``.

  Args:
    decay_rate: Haiku's ``decay_rate``, ``d``, in [0, 1).
    counter: the moving averages' ``counter`` (steps taken so far); an int or an
      integer array (may be traced).

  Returns:
    A Python float, or for an array ``counter`` a float32 (float64 under x64)
    scalar array.

  Raises:
    ValueError: ``decay_rate`` not in [0, 1), or ``counter`` negative.

  >>> haiku_momentum(0.9, 0), round(haiku_momentum(0.9, 1), 6), haiku_momentum(0.9, 10_000)
  (0.0, 0.473684, 0.9)
  """
  decay = _check_momentum("decay_rate", decay_rate)
  if decay == 1:
    raise ValueError("decay_rate must be below 1: Haiku's debiased average divides by 1 - d**t")
  if isinstance(counter, (int, np.integer)):
    if counter < 0:
      raise ValueError(f"counter must be >= 0, got {counter}")
    power = decay ** (counter + 1)
    return (decay - power) / (1 - power)
  dtype = jnp.result_type(float)
  power = jnp.power(jnp.asarray(decay, dtype), (jnp.asarray(counter) + 1).astype(dtype))
  return (decay - power) / (1 - power)


def from_haiku(
  params: Mapping[str, Any],
  state: Mapping[str, Any],
  name: str = "batch_norm",
  *,
  decay_rate: float,
  eps: float = 1e-5,
  data_format: str = "channels_last",
) -> Converted:
  """A Haiku ``hk.BatchNorm`` (or ``bnjax.haiku.BatchNorm``) layer, from a model's
  params and state.

  Reads ``params[name]`` (``scale``, ``offset``, each optional) and
  ``state[name + "/~/mean_ema"]``, ``state[name + "/~/var_ema"]`` (``counter``,
  ``hidden``, ``average``). The state is Haiku's debiased ``average``, which is
  what Haiku evaluates with, so evaluation matches Haiku exactly; ``options``
  carry ``haiku_momentum(decay_rate, counter)``, with which training moves the
  state exactly as Haiku moves its averages, for the next step (step ``i`` after
  it takes ``haiku_momentum(decay_rate, counter + i)``; after a few hundred steps
  it is ``decay_rate`` to float precision). Haiku's variance is biased, as
  bnjax's default; its training-mode variance is ``E[x^2] - E[x]^2`` in the
  input's dtype, bnjax's the exact one, so training outputs agree to that
  formula's rounding.

  Args:
    params: the model's parameters (``transform_with_state``'s ``params``).
    state: the model's state.
    name: the layer's module name, e.g. ``"res_net/~/initial_batchnorm"``.
    decay_rate: the layer's ``decay_rate``.
    eps: the layer's ``eps``.
    data_format: the layer's ``data_format``: ``"channels_last"`` (options'
      ``axis`` -1) or ``"channels_first"`` (``axis`` 1).

  Returns:
    ``Converted(params, state, options)`` with ``[C]`` arrays, ``options =
    {"momentum", "epsilon", "unbiased_variance": False, "axis"}``.

  Raises:
    KeyError: no such layer in ``state`` (the message lists the layers there).
    ValueError: statistics or parameters with more than one entry that is not 1
      (a layer over several feature axes: reshape them yourself), an unknown
      ``data_format``, or a bad ``decay_rate``/``eps``.

  >>> ema = lambda v: {"counter": np.array(3, np.int32), "hidden": np.array([[v * 0.271]]),
  ...                  "average": np.array([[v]])}
  >>> state = {"bn/~/mean_ema": ema(2.0), "bn/~/var_ema": ema(4.0)}
  >>> params = {"bn": {"scale": np.ones((1, 1)), "offset": np.zeros((1, 1))}}
  >>> _, state, options = from_haiku(params, state, "bn", decay_rate=0.9)
  >>> state.mean.tolist(), round(options["momentum"], 4)  # (0.9 - 0.9**4) / (1 - 0.9**4)
  ([2.0], 0.7092)
  """
  eps = _check_epsilon("eps", eps)
  axis = {"channels_last": -1, "channels_first": 1}.get(data_format)
  if axis is None:
    raise ValueError(
      f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}"
    )
  emas = {n: state.get(f"{name}/~/{n}") for n in _EMA_NAMES}
  if any(e is None for e in emas.values()):
    layers = sorted({k.rsplit("/~/", 1)[0] for k in state if k.endswith(_EMA_NAMES)})
    raise KeyError(f"no BatchNorm named {name!r} in the state; its BatchNorm layers: {layers}")
  layer = params.get(name, {})
  read = {
    "scale": layer.get("scale"),
    "offset": layer.get("offset"),
    "mean": emas["mean_ema"]["average"],
    "var": emas["var_ema"]["average"],
  }
  vectors = {k: _per_feature(v, f"{name}: {k}") for k, v in read.items() if v is not None}
  _check_lengths(vectors)
  counter = int(np.asarray(emas["mean_ema"]["counter"]))
  return Converted(
    BatchNormParams(scale=vectors.get("scale"), bias=vectors.get("offset")),
    BatchNormState(mean=vectors["mean"], var=vectors["var"]),
    {
      "momentum": haiku_momentum(decay_rate, counter),
      "epsilon": eps,
      "unbiased_variance": False,
      "axis": axis,
    },
  )


def _per_feature(value, name: str) -> jax.Array:
  """Haiku's ``[1, ..., C, ..., 1]`` as ``[C]``."""
  array = _array(value, name)
  if sum(d != 1 for d in array.shape) > 1:
    raise ValueError(
      f"{name} has shape {array.shape}: one feature axis is converted (reshape a layer "
      "over several feature axes to [C] yourself)"
    )
  return array.reshape(-1)


def _haiku_counter(counter: int | None, decay: float) -> int:
  """``counter``, or the number of steps after which Haiku's debiasing divides
  by exactly 1 (``decay**counter`` below 2**-60): a plain moving average."""
  if counter is not None:
    if counter < 1:
      raise ValueError(f"counter must be >= 1 (Haiku divides by 1 - d**counter), got {counter}")
    return counter
  if decay == 0:
    return 1
  return math.ceil(60 * math.log(2) / -math.log(decay))


def to_haiku(
  params: BatchNormParams | None,
  state: BatchNormState,
  name: str = "batch_norm",
  *,
  shape: Sequence[int],
  decay_rate: float,
  counter: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A bnjax layer as a Haiku ``hk.BatchNorm``'s params and state entries.

  Each moving average gets ``average`` = the state, ``counter``, and the
  ``hidden`` that Haiku debiases to it, ``average * (1 - d**counter)``. Haiku then
  evaluates exactly as bnjax does. With ``counter=None`` the counter is the
  number of steps after which ``d**counter`` is below 2**-60: Haiku's debiasing
  divides by exactly 1 and its training moves the averages exactly as bnjax's
  state moves with ``momentum = decay_rate`` (a bnjax state is a plain moving
  average). Give the real step count instead to continue a debiased average.

  Args:
    params: ``BatchNormParams`` of ``[C]`` arrays, or None.
    state: ``BatchNormState`` of ``[C]`` arrays.
    name: the layer's module name.
    shape: the parameters' and statistics' shape in Haiku: the input's rank, 1 on
      the reduced axes, e.g. ``(1, 1, 1, C)`` for NHWC, ``(1, C, 1, 1)`` for NCHW.
    decay_rate: the layer's ``decay_rate``, in [0, 1).
    counter: the moving averages' ``counter``, at least 1; see above for None.

  Returns:
    ``(params_entries, state_entries)``: ``{name: {"scale", "offset"}}`` (those
    ``params`` has) and ``{name + "/~/mean_ema": {...}, name + "/~/var_ema":
    {...}}``, JAX arrays (``counter`` int32), to merge into a model's params and
    state.

  Raises:
    ValueError: ``shape`` not holding ``C`` values, a bad ``decay_rate`` or
      ``counter``.

  >>> import bnjax
  >>> params, state = bnjax.init(2)
  >>> p, s = to_haiku(params, state, "bn", shape=(1, 2), decay_rate=0.9)
  >>> sorted(s), int(s["bn/~/mean_ema"]["counter"]), s["bn/~/var_ema"]["hidden"].tolist()
  (['bn/~/mean_ema', 'bn/~/var_ema'], 395, [[1.0, 1.0]])
  """
  decay = _check_momentum("decay_rate", decay_rate)
  if decay == 1:
    raise ValueError("decay_rate must be below 1: Haiku's debiased average divides by 1 - d**t")
  counter = _haiku_counter(counter, decay)
  shape = tuple(shape)

  def shaped(value, what):
    vector = _vector(value, what)
    if math.prod(shape) != vector.shape[0]:
      raise ValueError(f"shape {shape} does not hold the {vector.shape[0]} values of {what}")
    return vector.reshape(shape)

  def ema(average):
    debias = 1 - jnp.power(jnp.asarray(decay, average.dtype), counter)
    return {
      "counter": jnp.asarray(counter, jnp.int32),
      "hidden": average * debias,
      "average": average,
    }

  layer = {}
  if params is not None:
    fields = {"scale": params.scale, "offset": params.bias}
    layer = {k: shaped(v, k) for k, v in fields.items() if v is not None}
  state_entries = {
    f"{name}/~/mean_ema": ema(shaped(state.mean, "state.mean")),
    f"{name}/~/var_ema": ema(shaped(state.var, "state.var")),
  }
  return ({name: layer} if layer else {}), state_entries
