"""Argument checks shared by the normalization functions.

Every check raises at trace time with a message that names the argument, what was
expected and what was given, so a bad call fails loudly instead of broadcasting
into a silently wrong result.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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

  >>> feature_axes(4, -1)
  (3,)
  >>> feature_axes(4, (1, -1))
  (1, 3)
  """
  axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  if not axes:
    raise ValueError("axis must name at least one feature axis, got ().")
  for a in axes:
    if not isinstance(a, numbers.Integral):
      raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"axis {a} is out of range for an input of rank {ndim} "
          f"(valid: {-ndim} to {ndim - 1})."
      )
  canonical = sorted(int(a) % ndim for a in axes)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"axis {axis!r} names the same axis twice (input rank {ndim}).")
  if len(canonical) == ndim:
    raise ValueError(
        f"axis {axis!r} makes every axis of the rank-{ndim} input a feature axis, "
        "leaving none to compute batch statistics over."
    )
  return tuple(canonical)


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
  """``momentum`` in [0, 1]; a traced scalar is accepted unchecked."""
  if isinstance(momentum, numbers.Real):
    if not 0.0 <= float(momentum) <= 1.0:
      raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
    return
  if np.ndim(momentum) != 0:
    raise ValueError(f"momentum must be a scalar, got shape {np.shape(momentum)}.")
  if isinstance(momentum, (jax.Array, np.ndarray, np.generic)) and not isinstance(
      momentum, jax.core.Tracer
  ):
    check_momentum(float(momentum))


def check_epsilon(epsilon) -> None:
  """``epsilon`` is a positive Python number (it is static under jit)."""
  if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
    raise TypeError(f"epsilon must be a Python float, got {type(epsilon).__name__}.")
  if not float(epsilon) > 0.0:
    raise ValueError(f"epsilon must be positive, got {epsilon}.")


def canonical_mask(mask, x_shape: tuple[int, ...], features: tuple[int, ...]):
  """The mask with ``x``'s rank, every axis of size 1 or that of ``x``.

  Accepted forms: boolean of ``x``'s rank broadcastable to ``x`` (Flax's
  convention, e.g. ``[N, L, 1]`` for ``x: [N, L, C]``), or boolean of the shape of
  ``x`` without its feature axes (e.g. ``[N, L]``), or broadcastable to that.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"mask must be boolean (True = valid entry), got dtype {mask.dtype}; "
        "use mask.astype(bool)."
    )
  ndim, given_shape = len(x_shape), tuple(mask.shape)
  if mask.ndim == ndim - len(features):
    mask = jnp.expand_dims(mask, features)
  if mask.ndim != ndim or any(
      m not in (1, d) for m, d in zip(mask.shape, x_shape)
  ):
    without = tuple(d for a, d in enumerate(x_shape) if a not in features)
    raise ValueError(
        f"mask of shape {given_shape} does not broadcast to x of shape "
        f"{tuple(x_shape)}; expected a boolean of x's rank broadcastable to it, "
        f"or one of x's shape without the feature axes, {without}."
    )
  return mask


def canonical_axis_index_groups(groups):
  """Groups as a hashable tuple of tuples (they parameterize compiled code)."""
  if groups is None:
    return None
  return tuple(tuple(int(i) for i in group) for group in groups)
