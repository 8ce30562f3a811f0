"""One process of a multi-host run on this machine (see test_multihost.py).

Usage: python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT

Each process owns 2 CPU devices and its share of a global batch; statistics are
synchronized across all processes' devices through ``jax.distributed`` (gloo), as
on a Cloud TPU pod. Prints one JSON line with the largest differences from the
full batch computed on one device.
"""

import json
import sys

import jax

LOCAL_DEVICES = 2
process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)  # before any other jax use
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402


def loss(x, w, params, state, axis_name=None):
  y, new_state = bnjax.batch_norm(
    x, params, state, training=True, momentum=0.0, axis_name=axis_name
  )
  return jnp.sum(w * y), new_state


def main():
  devices = jax.device_count()
  per_device = 3
  keys = jax.random.split(jax.random.key(0), 2)
  x = np.asarray(jax.random.normal(keys[0], (devices * per_device, 4, 5))) * 2 + 1e3
  w = np.asarray(jax.random.normal(keys[1], x.shape))
  params, state = bnjax.init(5)

  # Reference: the whole global batch on this process's first device, no collectives.
  (want_dx, want_state) = jax.jit(jax.grad(loss, has_aux=True), device=jax.local_devices()[0])(
    x, w, params, state
  )

  mesh = jax.make_mesh((devices,), ("batch",))
  rows = slice(
    process_id * LOCAL_DEVICES * per_device, (process_id + 1) * LOCAL_DEVICES * per_device
  )

  def to_global(a):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), a[rows])

  step = jax.jit(
    jax.shard_map(
      jax.grad(functools.partial(loss, axis_name="batch"), has_aux=True),
      mesh=mesh,
      in_specs=(P("batch"), P("batch"), P(), P()),
      out_specs=(P("batch"), P()),
    )
  )
  dx, new_state = step(to_global(x), to_global(w), params, state)
  local_dx = np.concatenate(
    [np.asarray(s.data) for s in sorted(dx.addressable_shards, key=lambda s: s.index[0].start)]
  )
  print(
    json.dumps(
      {
        "process": process_id,
        "devices": devices,
        "dx_error": float(np.abs(local_dx - np.asarray(want_dx)[rows]).max()),
        "var_relative_error": float(
          np.abs(np.asarray(new_state.var) / np.asarray(want_state.var) - 1).max()
        ),
        "mean_error": float(np.abs(np.asarray(new_state.mean) - np.asarray(want_state.mean)).max()),
      }
    ),
    flush=True,
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
