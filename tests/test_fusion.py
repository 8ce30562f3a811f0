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


def _entry(compiled_text: str) -> list[str]:
  """The instructions of a compiled program's entry computation, a line each."""
  entry = compiled_text[compiled_text.index("\nENTRY") + 1 :]
  return entry[: entry.index("\n}")].splitlines()[1:]


@pytest.mark.parametrize("kind", ["batch_norm", "batch_renorm"])
def test_per_feature_work_runs_inside_the_branch_that_computed_the_moments(kind):
  """Without axis_name, everything per feature (the variance's rsqrt, the gain, the
  running statistics' update) runs inside the one-pass/two-pass conditional, where
  XLA fuses it: what the entry computation does with the conditional's results is
  only the full-size normalization (and returning the state)."""
  x = jnp.ones((16, 32))
  params, state = bnjax.init(32)
  extra = dict(r_max=2.0, d_max=1.0) if kind == "batch_renorm" else {}
  forward = jax.jit(lambda x: getattr(bnjax, kind)(x, params, state, training=True, **extra))
  lines = _entry(forward.lower(x).compile().as_text())
  name = lambda line: line.split("=")[0].split()[-1]  # noqa: E731
  (conditional,) = [name(line) for line in lines if " conditional(" in line]
  results = {conditional} | {
    name(line) for line in lines if f"get-tuple-element({conditional})" in line
  }
  users = [
    line
    for line in lines
    if "get-tuple-element(" not in line
    and any(re.search(re.escape(r) + r"[,)\s]", line.split("=", 1)[1]) for r in results)
  ]
  assert users
  for line in users:
    assert "f32[16,32]" in line.split("=", 1)[1].split("(")[0] or line.lstrip().startswith("ROOT")
