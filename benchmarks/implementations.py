"""The batch norms compared, as functions ``f(x, scale, bias) -> (y, new_stats)``.

All in training mode over every axis but the last, with epsilon 1e-5, each
returning its updated running statistics so that no work is optimized away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

import bnjax

EPSILON = 1e-5


def bnjax_batch_norm(x, scale, bias, *, axis_name=None, axis_index_groups=None):
  features = x.shape[-1]
  state = bnjax.BatchNormState(jnp.zeros(features), jnp.ones(features))
  return bnjax.batch_norm(
    x,
    bnjax.BatchNormParams(scale, bias),
    state,
    training=True,
    epsilon=EPSILON,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  )


def flax_batch_norm(x, scale, bias, *, fast, axis_name=None, axis_index_groups=None):
  features = x.shape[-1]
  module = nn.BatchNorm(
    use_running_average=False,
    use_fast_variance=fast,
    epsilon=EPSILON,
    dtype=x.dtype,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  )
  variables = {
    "params": {"scale": scale, "bias": bias},
    "batch_stats": {"mean": jnp.zeros(features), "var": jnp.ones(features)},
  }
  return module.apply(variables, x, mutable=["batch_stats"])


def naive_two_pass(x, scale, bias, *, axis_name=None):
  """Textbook two-pass batch norm in float32, differentiated by autodiff."""
  del axis_name
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + EPSILON) * scale.reshape(var.shape) + bias.reshape(
    var.shape
  )
  return y.astype(x.dtype), (mean.ravel(), var.ravel())


IMPLEMENTATIONS = {
  "bnjax": bnjax_batch_norm,
  "flax_fast": functools.partial(flax_batch_norm, fast=True),
  "flax_exact": functools.partial(flax_batch_norm, fast=False),
  "naive_two_pass": naive_two_pass,
}


def forward(batch_norm):
  """Jitted training forward pass: ``(x, scale, bias) -> (y, new_stats)``."""
  return jax.jit(batch_norm)


def forward_backward(batch_norm):
  """Jitted forward + backward: ``(x, scale, bias, dy) -> ((dx, dscale, dbias), new_stats)``."""

  def run(x, scale, bias, dy):
    _, vjp, new_stats = jax.vjp(batch_norm, x, scale, bias, has_aux=True)
    return vjp(dy), new_stats

  return jax.jit(run)


@jax.jit
def streaming_floor(x, dy):
  """Reads x and dy, writes two tensors of their size: what any fused BN
  forward + backward must at least move."""
  return x + dy, x * dy
