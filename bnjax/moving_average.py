"""The exponential moving average that batch norm keeps of batch statistics.

Kept apart from batch norm (as dm-haiku keeps ``moving_averages.py``) so that its
one rule is visible and testable on its own, and so that other rules (a cumulative
average, a schedule) can be written as a choice of ``momentum`` per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_moving_average(average: jax.Array, value: jax.Array, *, momentum) -> jax.Array:
  """``momentum * average + (1 - momentum) * value``.

  ``momentum`` is the weight of the old average (Flax's and Keras's convention;
  PyTorch's ``momentum`` is ``1 - momentum`` here). It may be a Python float or a
  traced scalar, so a schedule needs no recompilation: ``momentum = k / (k + 1)``
  at step ``k = 0, 1, ...`` gives the cumulative (equal-weight) average.

  The result keeps ``average``'s dtype (float32 batch statistics stay float32 with
  bfloat16 activations), promoted to complex if ``value`` is complex. It is
  computed in at least float32 and rounded once: a half-precision ``average``
  gets the exact ``momentum`` (0.99 in bfloat16 would be 0.98828, giving the new
  value 17% too much weight).

  Args:
    average: ``[*F]`` the running average.
    value: ``[*F]`` this step's value.
    momentum: scalar in [0, 1].

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
  momentum = jnp.asarray(momentum).astype(compute_dtype)
  new = momentum * average.astype(compute_dtype) + (1 - momentum) * value.astype(compute_dtype)
  return new.astype(dtype)
