"""Argument checks shared by the normalization functions.

Every check raises at trace time with a message that names the argument, what was
expected and what was given, so a bad call fails loudly instead of broadcasting
into a silently wrong result.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moving_average


def check_training(training) -> None:
  """``training`` selects Python control flow, so it must be a concrete bool."""
  if not isinstance(training, (bool, np.bool_)):
    raise TypeError(
      f"training must be a Python bool, got {type(training).__name__} "
      f"({training!r}). It selects the code path at trace time; to switch it "
      "under jit, mark it static (jax.jit(..., static_argnames='training'))."
    )


def check_floating(name: str, x) -> None:
  """``x`` must be a floating or complex array."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"{name} must have a floating or complex dtype, got {dtype}; "
      f"cast it first, e.g. {name}.astype(jnp.float32)."
    )


def feature_axes(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sorted, non-negative feature axes of a rank-``ndim`` input.

  Every axis may be a feature axis (an input ``[C]`` of one example): in
  training each feature is then a batch of one value (or reduced over a named
  axis), as Flax computes it.

  >>> feature_axes(4, -1)
  (3,)
  >>> feature_axes(4, (1, -1))
  (1, 3)
  >>> feature_axes(2, 1.0)
  Traceback (most recent call last):
  ...
  TypeError: axis must be an int or a sequence of ints, got 1.0 (float).
  """
  if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
    axes = (axis,)
  elif isinstance(axis, Sequence) and not isinstance(axis, str):
    axes = tuple(axis)
  else:
    raise TypeError(
      f"axis must be an int or a sequence of ints, got {axis!r} ({type(axis).__name__})."
    )
  if not axes:
    raise ValueError("axis must name at least one feature axis, got ().")
  for a in axes:
    if not isinstance(a, numbers.Integral) or isinstance(a, bool):
      raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"axis {a} is out of range for an input of rank {ndim} (valid: {-ndim} to {ndim - 1})."
      )
  canonical = sorted(int(a) % ndim for a in axes)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"axis {axis!r} names the same axis twice (input rank {ndim}).")
  return tuple(canonical)


class InputAxes(NamedTuple):
  """How an input's axes divide: features (kept) and the rest (reduced over)."""

  features: tuple[int, ...]  # sorted, non-negative feature axes
  feature_shape: tuple[int, ...]  # F: the input's sizes on them
  reduction: tuple[int, ...]  # every other axis, in order


def input_axes(x_shape: Sequence[int], axis: int | Sequence[int]) -> InputAxes:
  """The feature axes ``axis`` of an input of shape ``x_shape``, checked.

  >>> input_axes((8, 5, 3), -1)
  InputAxes(features=(2,), feature_shape=(3,), reduction=(0, 1))
  """
  features = feature_axes(len(x_shape), axis)
  return InputAxes(
    features=features,
    feature_shape=tuple(x_shape[a] for a in features),
    reduction=tuple(a for a in range(len(x_shape)) if a not in features),
  )


def feature_shape(name: str, num_features) -> tuple[int, ...]:
  """``C`` or a feature shape ``F`` as a tuple of positive ints.

  >>> feature_shape("num_features", 3)
  (3,)
  >>> feature_shape("num_features", 0)
  Traceback (most recent call last):
  ...
  ValueError: num_features must be a positive int or a sequence of them, got 0.
  """
  if isinstance(num_features, numbers.Integral) and not isinstance(num_features, bool):
    shape = (int(num_features),)
  elif (
    isinstance(num_features, Sequence)
    and not isinstance(num_features, str)
    and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in num_features)
  ):
    shape = tuple(int(d) for d in num_features)
  else:
    raise TypeError(f"{name} must be a positive int or a sequence of them, got {num_features!r}.")
  if not shape or min(shape) <= 0:
    raise ValueError(f"{name} must be a positive int or a sequence of them, got {num_features!r}.")
  return shape


def check_reduction(x_shape, features: tuple[int, ...]) -> None:
  """Batch statistics need values: no reduction axis may have size 0. (With no
  reduction axis at all, each feature is a batch of one value, as Flax reads it.)"""
  empty = [a for a in range(len(x_shape)) if a not in features and x_shape[a] == 0]
  if empty:
    raise ValueError(
      f"x of shape {tuple(x_shape)} has no values to compute batch statistics over "
      f"(axis {empty[0]} has size 0)."
    )


def check_feature_shape(name: str, array, expected: tuple[int, ...], x_shape, axis) -> None:
  """``array`` (a parameter or state field) must have the feature shape of x."""
  if array is None:
    return
  shape = tuple(np.shape(array))
  if shape != expected:
    raise ValueError(
      f"{name} has shape {shape} but x of shape {tuple(x_shape)} has "
      f"feature shape {expected} along axis {axis!r}."
    )


def check_momentum(momentum) -> None:
  """``momentum`` a real scalar in [0, 1], or ``MovingAverageWeights`` of two; a
  traced scalar is accepted unchecked."""
  if isinstance(momentum, moving_average.MovingAverageWeights):
    for name, weight in zip(("old", "new"), momentum, strict=True):
      try:
        check_momentum(weight)
      except (TypeError, ValueError) as error:
        raise type(error)(f"MovingAverageWeights.{name}: {error}") from None
    return
  if isinstance(momentum, (bool, np.bool_)) or (
    hasattr(momentum, "dtype")
    and not jnp.issubdtype(momentum.dtype, jnp.floating)
    and not jnp.issubdtype(momentum.dtype, jnp.integer)
  ):
    raise TypeError(f"momentum must be a real number in [0, 1], got {momentum!r}.")
  if isinstance(momentum, numbers.Real):
    if not 0.0 <= float(momentum) <= 1.0:
      raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
    return
  if not hasattr(momentum, "dtype"):
    raise TypeError(f"momentum must be a real number in [0, 1], got {type(momentum).__name__}.")
  if np.ndim(momentum) != 0:
    raise ValueError(f"momentum must be a scalar, got shape {np.shape(momentum)}.")
  if isinstance(momentum, (jax.Array, np.ndarray, np.generic)) and not isinstance(
    momentum, jax.core.Tracer
  ):
    check_momentum(float(momentum))


def update_stats_flag(update_stats, training: bool) -> bool:
  """``update_stats`` as a Python bool: None means ``training`` (the running
  statistics move when the batch's normalize)."""
  if update_stats is None:
    return bool(training)
  check_bool("update_stats", update_stats)
  return bool(update_stats)


def check_bool(name: str, value) -> None:
  """A Python bool flag (it selects code at trace time)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a Python bool, got {type(value).__name__} ({value!r}).")


def check_floating_fields(prefix: str, fields) -> None:
  """Parameter and state fields must be floating (an integer running mean would be
  truncated at every update)."""
  for name, value in fields:
    if value is not None:
      check_floating(f"{prefix}.{name}", value)


def check_epsilon(epsilon) -> None:
  """``epsilon`` is a positive Python number (it is static under jit)."""
  if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
    raise TypeError(f"epsilon must be a Python float, got {type(epsilon).__name__}.")
  if not float(epsilon) > 0.0:
    raise ValueError(f"epsilon must be positive, got {epsilon}.")


def canonical_mask(mask, x_shape: tuple[int, ...], features: tuple[int, ...]):
  """The mask broadcast, as NumPy broadcasts, to ``x``'s rank.

  A mask is a boolean array, True for valid entries, that broadcasts to ``x``
  under NumPy's rules (trailing axes aligned), exactly as Flax reads it: for
  ``x: [N, L, C]``, ``[N, L, 1]`` masks positions and ``[N, L, C]`` entries; a
  mask ``[L, 1]`` is read as ``[1, L, 1]``. No other reading is made, so no shape
  means two things. Returned with ``x``'s rank, each axis 1 or ``x``'s size.

  >>> canonical_mask(jnp.ones((4, 1), bool), (4, 4, 3), (2,)).shape
  (1, 4, 1)
  >>> canonical_mask(jnp.ones((2, 5), bool), (2, 5, 3), (2,))
  Traceback (most recent call last):
  ...
  ValueError: mask of shape (2, 5) does not broadcast to x of shape (2, 5, 3) (NumPy rules,
  trailing axes aligned); to mask whole positions of x's shape without the feature axes,
  add size-1 feature axes: mask[..., None] has shape (2, 5, 1).
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
      f"mask must be boolean (True = valid entry), got dtype {mask.dtype}; use mask.astype(bool)."
    )
  given_shape, ndim = tuple(mask.shape), len(x_shape)
  aligned = (1,) * (ndim - mask.ndim) + given_shape
  if mask.ndim > ndim or any(m not in (1, d) for m, d in zip(aligned, x_shape, strict=True)):
    hint = ""
    without = tuple(d for a, d in enumerate(x_shape) if a not in features)
    if given_shape == without and mask.ndim < ndim:
      expanded = tuple(1 if a in features else d for a, d in enumerate(x_shape))
      suffix = "[..., None]" if features == (ndim - 1,) else f" expanded at axes {features}"
      hint = (
        f"; to mask whole positions of x's shape without the feature axes, add size-1 "
        f"feature axes: mask{suffix} has shape {expanded}"
      )
    raise ValueError(
      f"mask of shape {given_shape} does not broadcast to x of shape {tuple(x_shape)} "
      f"(NumPy rules, trailing axes aligned){hint}."
    )
  return mask.reshape(aligned)


def canonical_axis_index_groups(groups):
  """Groups as a hashable tuple of tuples (they parameterize compiled code).

  Whether they cover the named axis is checked where its size is known, under the
  mapped function (``bnjax.collectives.check_axis_index_groups``).
  """
  if groups is None:
    return None
  try:
    canonical = tuple(tuple(operator.index(i) for i in group) for group in groups)
  except TypeError:
    raise TypeError(
      f"axis_index_groups must be a sequence of sequences of ints, got {groups!r}."
    ) from None
  if not canonical:
    raise ValueError("axis_index_groups must hold at least one group, got [].")
  return canonical
