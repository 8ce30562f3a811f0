"""The moving averages that batch norm keeps of batch statistics.

Kept apart from batch norm (as dm-haiku keeps ``moving_averages.py``) so that its
one rule is visible and testable on its own:

    new = momentum * average + (1 - momentum) * value

Other rules are a choice of ``momentum`` per step, which may be traced (a schedule
needs no recompilation): ``cumulative_momentum`` gives the plain mean of every
value so far (PyTorch's ``momentum=None``), ``debiased_momentum`` the zero-debiased
exponential average (Haiku's ``ExponentialMovingAverage``, Adam's bias
correction). Both return ``MovingAverageWeights``, the two weights each rounded
once, where ``1 - momentum`` of a rounded ``momentum`` would lose digits.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MovingAverageWeights(NamedTuple):
  """The two weights of a moving-average update, ``old * average + new * value``.

  ``new`` is ``1 - old`` computed before either is rounded: a momentum close to 1
  rounded to float32 first (0.999 to 0.99900001) leaves ``1 - momentum`` with only
  the digits the rounding kept (off by 1e-5 at 0.999). A pytree of two scalars;
  anything that takes a ``momentum`` takes one, traced or not.

  >>> weights = cumulative_momentum(3)  # a fourth value, in an average of three
  >>> weights.old.tolist(), weights.new.tolist()
  (0.75, 0.25)
  """

  old: jax.Array  #: The momentum: weight of the old average, ``[]`` floating.
  new: jax.Array  #: ``1 - momentum``: weight of the new value, ``[]`` floating.


def moving_average_weights(momentum, dtype=None) -> MovingAverageWeights:
  """``momentum`` as ``MovingAverageWeights``, each weight rounded once.

  A Python number (or NumPy scalar) has ``1 - momentum`` taken in double precision,
  as ``flax.linen`` effectively does (its weak-typed Python floats meet the
  statistics only after the subtraction). An array (a traced momentum) is used as
  given: ``1 - momentum`` is taken in its dtype widened to ``dtype``.

  Args:
    momentum: scalar in [0, 1]: a number, an array, or ``MovingAverageWeights``
      (returned unchanged).
    dtype: the dtype the weights will be used in; default float32 (float64 under
      x64) for a number, the momentum's own (at least float32) for an array.

  Returns:
    ``MovingAverageWeights`` of two ``[]`` arrays.

  >>> moving_average_weights(0.999).new.item() == jnp.float32(1 - 0.999).item()
  True
  """
  if isinstance(momentum, MovingAverageWeights):
    return MovingAverageWeights(*(jnp.asarray(weight) for weight in momentum))
  if isinstance(momentum, numbers.Real):  # concrete: 1 - momentum in double
    dtype = jnp.result_type(float) if dtype is None else dtype
    return MovingAverageWeights(
      jnp.asarray(float(momentum), dtype), jnp.asarray(1 - float(momentum), dtype)
    )
  momentum = jnp.asarray(momentum)
  given = momentum.dtype if jnp.issubdtype(momentum.dtype, jnp.floating) else jnp.float32
  momentum = momentum.astype(widest_real(given, jnp.float32 if dtype is None else dtype))
  return MovingAverageWeights(momentum, 1 - momentum)


def widest_real(*dtypes) -> jnp.dtype:
  """The widest real floating dtype of ``dtypes`` (complex ones count as their real
  part), at least float32; whatever the promotion mode.

  >>> widest_real(jnp.bfloat16, jnp.complex64)
  dtype('float32')
  """
  reals = [jnp.dtype(jnp.finfo(d).dtype) for d in (*dtypes, jnp.float32)]
  return max(reals, key=lambda d: d.itemsize)


def cumulative_momentum(count) -> MovingAverageWeights:
  """The weights that make the average the plain mean of every value so far.

  With ``count`` values averaged already, the next enters with weight
  ``1 / (count + 1)``: after ``K`` updates from any start the average is the mean
  of the ``K`` values, each weighing the same (PyTorch's ``momentum=None``, and
  Algorithm 2's population statistics when the parameters no longer change).

  Args:
    count: the number of updates the average holds already (0 before the first);
      an int or an integer scalar, which may be traced.

  Returns:
    ``MovingAverageWeights(count / (count + 1), 1 / (count + 1))``, float32
    (float64 under x64) scalars.

  Raises:
    TypeError: ``count`` not a number.

  >>> average = jnp.array(0.0)  # any start: the first update replaces it
  >>> for count, value in enumerate([2.0, 4.0, 9.0]):
  ...   average = update_moving_average(average, jnp.array(value),
  ...                                   momentum=cumulative_momentum(count))
  >>> average.tolist()
  5.0
  """
  count = jnp.asarray(count, jnp.result_type(float))
  return MovingAverageWeights(count / (count + 1), 1 / (count + 1))


def debiased_momentum(momentum: float, count) -> MovingAverageWeights:
  """The weights of a zero-debiased exponential moving average, kept debiased.

  An exponential average started at zero is biased towards it by the factor
  ``1 - momentum**count``; Haiku's ``ExponentialMovingAverage`` (and Adam) keep
  the biased average and divide on reading. Kept as the debiased average itself,
  the same values come from the weights

      old = momentum * (1 - momentum**count) / (1 - momentum**(count + 1))
      new = (1 - momentum) / (1 - momentum**(count + 1))

  (the first update replaces the initial value; later ones tend to ``momentum``).
  Computed without cancellation: ``1 - momentum**k`` as ``-expm1(k *
  log(momentum))``, with ``1 - momentum`` and the logarithm in double precision.

  Args:
    momentum: the exponential average's momentum (weight of the old average), a
      Python number in [0, 1]; 1 gives ``cumulative_momentum``.
    count: the number of updates the average holds already (0 before the first);
      an int or an integer scalar, which may be traced.

  Returns:
    ``MovingAverageWeights`` of float32 (float64 under x64) scalars.

  Raises:
    TypeError: ``momentum`` not a Python number (a traced one cannot be debiased
      exactly).
    ValueError: ``momentum`` outside [0, 1].

  >>> weights = debiased_momentum(0.5, 1)  # the second update: 0.5 * 0.5 / 0.75
  >>> round(weights.old.item(), 6), round(weights.new.item(), 6)
  (0.333333, 0.666667)
  """
  if isinstance(momentum, (bool, jax.Array)) or not isinstance(momentum, numbers.Real):
    raise TypeError(
      f"debiased_momentum needs momentum as a Python number, got {type(momentum).__name__}: "
      "a traced momentum cannot be debiased exactly; pass a float such as 0.99"
    )
  momentum = float(momentum)
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
  if momentum == 1.0:  # the limit of the weights below
    return cumulative_momentum(count)
  count = jnp.asarray(count, jnp.result_type(float))
  bias_now = zero_debias_factor(momentum, count + 1)
  # new <= 1 exactly (1 at count 0), where rounding the two expressions could exceed it.
  new = jnp.minimum((1 - momentum) / bias_now, 1)
  return MovingAverageWeights(momentum * zero_debias_factor(momentum, count) / bias_now, new)


def zero_debias_factor(momentum: float, count, dtype=None) -> jax.Array:
  """``1 - momentum**count``: the factor by which an exponential average started at
  zero falls short of the values' weighted mean after ``count`` updates (Haiku's
  ``ExponentialMovingAverage`` divides its ``hidden`` by it).

  Computed as ``-expm1(count * log(momentum))`` with the logarithm in double
  precision: ``1 - momentum**count`` of a float32 ``momentum`` cancels, and its
  rounding of 0.999 alone makes the factor 1.3e-5 off at the first step.

  Args:
    momentum: the average's momentum, a Python number in [0, 1].
    count: the number of updates, >= 0; an int or a scalar, which may be traced.
    dtype: of the result; default float32 (float64 under x64).

  Returns:
    ``[]`` ``1 - momentum**count`` (0 at count 0, 1 for momentum 0 and count >= 1).

  >>> zero_debias_factor(0.5, 2).tolist()
  0.75
  """
  count = jnp.asarray(count, jnp.result_type(float) if dtype is None else dtype)
  if momentum == 0.0:
    return (count > 0).astype(count.dtype)
  return -jnp.expm1(count * math.log(momentum))


def update_moving_average(average: jax.Array, value: jax.Array, *, momentum) -> jax.Array:
  """``momentum * average + (1 - momentum) * value``.

  ``momentum`` is the weight of the old average (Flax's and Keras's convention;
  PyTorch's ``momentum`` is ``1 - momentum`` here). It may be a Python float, a
  traced scalar (a schedule needs no recompilation), or ``MovingAverageWeights``
  (``cumulative_momentum``, ``debiased_momentum``).

  The result keeps ``average``'s dtype (float32 batch statistics stay float32 with
  bfloat16 activations), promoted to complex if ``value`` is complex. It is
  computed in at least float32 and rounded once, with each weight rounded once
  (``moving_average_weights``): a Python float's ``1 - momentum`` is taken in double
  (rounding 0.999 to float32 first would make it 1e-5 off), and a half-precision
  ``average`` gets the exact ``momentum`` (0.99 in bfloat16 would be 0.98828,
  giving the new value 17% too much weight).

  Args:
    average: ``[*F]`` the running average.
    value: ``[*F]`` this step's value.
    momentum: scalar in [0, 1], or ``MovingAverageWeights``.

  Returns:
    ``[*F]`` the new average.

  Raises:
    TypeError: ``average`` and ``value`` of shapes that do not broadcast, or
      ``momentum`` not a number. Nothing else is checked here (``batch_norm``
      checks ``momentum``).

  >>> update_moving_average(jnp.array(1.0), jnp.array(3.0), momentum=0.75)
  Array(1.5, dtype=float32)
  """
  dtype = average.dtype
  if jnp.iscomplexobj(value) and not jnp.iscomplexobj(average):
    dtype = value.dtype
  compute_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
  weights = moving_average_weights(momentum, widest_real(compute_dtype))
  old, new = (weight.astype(compute_dtype) for weight in weights)
  return (old * average.astype(compute_dtype) + new * value.astype(compute_dtype)).astype(dtype)
