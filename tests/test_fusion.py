"""bnjax._fusion: on CPU, the training pass keeps no x-sized temporary (XLA's CPU
reductions would write out an operand they share); the programs for other backends
hold no optimization barrier."""

import re

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def test_statistics_sums_get_their_own_x_on_cpu():
  """On CPU the two sums of the statistics take x from a barrier with two copies
  of it."""
  x = jnp.ones((8, 4))
  params, state = bnjax.init(4)
  grad = jax.jit(jax.grad(training_loss, argnums=(0, 1), has_aux=True))
  module = jax.export.export(grad, platforms=["cpu"])(x, params, state).mlir_module()
  barriers = re.findall(r"stablehlo.optimization_barrier ([^:]*) :", module)
  most_copies = max(operands.split(", ").count("%arg0") for operands in barriers)
  assert most_copies == 2


def _synchronized_masked_step():
  """A training forward + backward of bfloat16 inputs with a mask, under
  ``shard_map`` over 8 devices synchronized by ``axis_name``, and its sharded
  arguments."""
  mesh = jax.make_mesh((8,), ("batch",))

  def loss(x, mask, params, state):
    y, new_state = bnjax.batch_norm(x, params, state, training=True, axis_name="batch", mask=mask)
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32))), new_state

  step = jax.jit(
    jax.shard_map(
      jax.grad(loss, argnums=(0, 2), has_aux=True),
      mesh=mesh,
      in_specs=(P("batch"), P("batch"), P(), P()),
      out_specs=((P("batch"), P()), P()),
    )
  )
  batch = NamedSharding(mesh, P("batch"))
  x = jax.random.normal(jax.random.key(0), (16, 3, 8), jnp.bfloat16)
  mask = jnp.arange(16 * 3).reshape(16, 3, 1) % 5 != 0
  params, state = bnjax.init(8)
  return step, (jax.device_put(x, batch), jax.device_put(mask, batch), params, state)


def _plain_step():
  """A training forward + backward under ``jax.jit`` alone, and its arguments."""
  params, state = bnjax.init(8)
  step = jax.jit(jax.grad(training_loss, argnums=(0, 1), has_aux=True))
  return step, (jnp.ones((16, 4, 8)), params, state)


STEPS = {"jit": _plain_step, "shard_map_masked_bfloat16": _synchronized_masked_step}


def _barriers(step, arguments, platforms) -> int:
  module = jax.export.export(step, platforms=platforms)(*arguments).mlir_module()
  return module.count("stablehlo.optimization_barrier")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_optimization_barriers_on_cpu_only(step, platform):
  """The fusion steering is CPU's: the programs exported for CUDA and TPU hold no
  optimization barrier (CPU's does, so the count can fail)."""
  barriers = _barriers(*STEPS[step](), [platform])
  assert (barriers > 0) if platform == "cpu" else (barriers == 0)


def test_multi_platform_export_keeps_the_barriers_in_cpu_branch():
  """Exported for CPU and TPU together, the program holds CPU's barriers once (the
  TPU branch none), and on CPU it computes what the jitted step does."""
  step, arguments = _synchronized_masked_step()
  assert _barriers(step, arguments, ["cpu", "tpu"]) == _barriers(step, arguments, ["cpu"])
  exported = jax.export.export(step, platforms=["cpu", "tpu"])(*arguments)
  chex.assert_trees_all_close(exported.call(*arguments), step(*arguments), rtol=1e-5, atol=1e-6)


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
