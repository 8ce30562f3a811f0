"""bnjax._fusion: on CPU, the training pass keeps no x-sized temporary (XLA's CPU
reductions would write out an operand they share); other backends share one copy."""

import re

import jax
import jax.numpy as jnp
import pytest

import bnjax


def training_loss(x, params, state):
  y, new_state = bnjax.batch_norm(x, params, state, training=True)
  return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32))), new_state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_pass_keeps_no_input_sized_temporary_on_cpu(dtype):
  x = jnp.ones((16, 8, 8, 32), dtype)
  params, state = bnjax.init(32)
  forward = jax.jit(lambda x: bnjax.batch_norm(x, params, state, training=True))
  backward = jax.jit(jax.grad(training_loss, argnums=(0, 1), has_aux=True))
  float32_copy = x.size * 4  # what x - shift, or x cast to float32, would take
  small = float32_copy / 4  # per-feature statistics fit in it
  forward_bytes = forward.lower(x).compile().memory_analysis().temp_size_in_bytes
  backward_bytes = backward.lower(x, params, state).compile().memory_analysis().temp_size_in_bytes
  assert forward_bytes < small
  # A half-precision cotangent is cast to float32 once for its three uses (two
  # sums and dx); that one copy stays.
  assert backward_bytes < small + (float32_copy if dtype == jnp.bfloat16 else 0)


@pytest.mark.parametrize("platform, copies_of_x", [("cpu", 2), ("cuda", 1), ("tpu", 1)])
def test_statistics_sums_get_their_own_x_on_cpu_only(platform, copies_of_x):
  """On CPU the two sums of the statistics take x from a barrier with two copies
  of it; elsewhere they share one."""
  x = jnp.ones((8, 4))
  params, state = bnjax.init(4)
  grad = jax.jit(jax.grad(training_loss, argnums=(0, 1), has_aux=True))
  module = jax.export.export(grad, platforms=[platform])(x, params, state).mlir_module()
  barriers = re.findall(r"stablehlo.optimization_barrier ([^:]*) :", module)
  assert barriers
  most_copies = max(operands.split(", ").count("%arg0") for operands in barriers)
  assert most_copies == copies_of_x
