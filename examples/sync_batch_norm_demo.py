"""Synchronized batch norm under ``pmap``, with the state threaded by hand.

Trains a small Flax MLP whose BatchNorm layers are ``bnjax.linen.BatchNorm`` on
SYNTHETIC random data, across every local device, and prints the running
statistics after each step: identical on every device, and equal to those a single
device computes from the whole global batch. It shows how state flows; it does
not teach the network anything worth keeping.

    python examples/sync_batch_norm_demo.py

On a machine without accelerators it simulates 8 CPU devices.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Only affects the CPU backend; set before jax initializes.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

import bnjax  # noqa: E402
from bnjax import linen as bn  # noqa: E402


class MLP(nn.Module):
  """Dense -> BatchNorm -> ReLU, twice, then a linear head."""

  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x, *, train: bool):
    for features in (64, 64):
      x = nn.Dense(features, use_bias=False)(x)  # BN's bias replaces it (Section 3.2)
      x = bn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(1)(x)


def main(steps: int = 5, per_device_batch: int = 16) -> list[tuple[bool, float]]:
  """Trains and prints; returns, per step, (identical on all devices, max |sync - full batch|)."""
  devices = jax.local_device_count()
  print("=" * 72)
  print("SYNTHETIC DATA: random inputs and targets, to show how the state flows.")
  print(
    f"{devices} devices x {per_device_batch} examples = global batch {devices * per_device_batch}"
  )
  print("=" * 72)

  model = MLP()
  optimizer = optax.sgd(0.05)
  key_x, key_init = jax.random.split(jax.random.key(0))
  inputs = jax.random.normal(key_x, (steps, devices, per_device_batch, 8)) * 3.0 + 2.0
  targets = jnp.sum(jnp.sin(inputs), axis=-1, keepdims=True)

  variables = model.init(key_init, inputs[0, 0], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optimizer.init(params)

  @functools.partial(jax.pmap, axis_name="batch")
  def train_step(params, batch_stats, opt_state, x, y):
    """(params, batch_stats, opt_state) in, the same out: nothing is hidden."""

    def loss_fn(params):
      prediction, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.mean((prediction - y) ** 2), updates["batch_stats"]

    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.lax.pmean(grads, "batch")  # parameters stay replicated
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (
      optax.apply_updates(params, updates),
      new_batch_stats,
      opt_state,
      jax.lax.pmean(loss, "batch"),
    )

  def replicate(tree):  # one copy per device, stacked on a leading axis for pmap
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (devices,) + a.shape), tree)

  params_r, stats_r, opt_r = replicate(params), replicate(batch_stats), replicate(opt_state)
  single_device = MLP(axis_name=None)
  checks = []
  for step in range(steps):
    # The statistics a single device computes from the whole global batch, with the
    # same parameters and state, before the step:
    global_batch = inputs[step].reshape(devices * per_device_batch, -1)
    _, want = single_device.apply(
      {"params": params, "batch_stats": batch_stats},
      global_batch,
      train=True,
      mutable=["batch_stats"],
    )
    params_r, stats_r, opt_r, loss = train_step(
      params_r, stats_r, opt_r, inputs[step], targets[step]
    )
    params, batch_stats = jax.tree.map(lambda a: a[0], (params_r, stats_r))

    var = stats_r["BatchNorm_0"]["var"]
    same_everywhere = bool(jnp.all(var == var[0]))
    error = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(
        jax.tree.leaves(batch_stats), jax.tree.leaves(want["batch_stats"]), strict=True
      )
    )
    print(
      f"step {step}: loss {float(loss[0]):.4f}  BatchNorm_0 running var[:3] "
      f"{np.round(np.asarray(var[0][:3]), 4)}  identical on all {devices} devices: "
      f"{same_everywhere}  max |sync - full batch| = {error:.1e}"
    )
    checks.append((same_everywhere, error))
  print(f"bnjax {bnjax.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
  return checks


if __name__ == "__main__":
  main()
