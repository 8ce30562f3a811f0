"""Random inputs and weights drawn by NumPy, for the tests: ``jax.random`` compiles
a kernel for each new shape, about a second each on these CPUs."""

import jax.numpy as jnp
import numpy as np


def normal(seed, shape, loc=0.0, scale=1.0, *, dtype=np.float32, draw_dtype=np.float64):
  """``loc + scale * z``, z standard normal of ``shape``, rounded to ``dtype``.

  Args:
    seed: NumPy's seed (``np.random.default_rng(seed)``).
    shape: the sample's shape.
    loc, scale: floats or arrays broadcasting to ``shape``.
    dtype: the result's dtype.
    draw_dtype: the dtype NumPy draws z in: float64 (rounded after ``loc`` and
      ``scale`` are applied) or float32 (another sequence of numbers: NumPy's
      float32 sampler, not float64 draws rounded).

  Returns:
    A NumPy array of ``shape`` and ``dtype``.
  """
  z = np.random.default_rng(seed).standard_normal(shape, draw_dtype)
  return (loc + scale * z).astype(dtype)


def numpy_normal_init(key, shape, dtype):
  """A Flax kernel initializer: normal weights scaled by the fan-in (``shape[0]``),
  drawn by NumPy with the seed ``sum(shape)`` (``key`` unused). Any random weights
  serve the tests that use it; these compile nothing.

  Returns:
    A jax array of ``shape`` and ``dtype``.
  """
  del key
  return jnp.asarray(normal(sum(shape), shape, draw_dtype=np.float32) / np.sqrt(shape[0]), dtype)
