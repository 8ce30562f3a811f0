"""Training-step time around a checkpoint save: synchronous against asynchronous,
on local disk and on a Cloud Storage emulator (fake-gcs-server).

    python -m benchmarks.checkpoint                     # ~1-2 min on 2 CPU cores
    python -m benchmarks.checkpoint --megabytes=256 --steps=60

A jitted training step (a matmul-heavy MLP update whose state is ``--megabytes`` of
float32) runs ``--steps`` steps, saving through ``experiments.common.Checkpoints``
every ``--save_every`` steps. For each storage x mode it reports, in milliseconds:
the median step without a save; the median of "a step plus its save call" (what
the training loop waits for at a save); and the wall time of the whole loop,
including waiting at the end for the last write and its SHA256SUMS. The emulator
is a local process, so its upload is a lower bound for a real bucket's.

Writes ``benchmarks/checkpoint_results.json`` and ``benchmarks/checkpoint_results.md``
(or into ``--output_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent


def _state(megabytes: float):
  import jax
  import jax.numpy as jnp

  width = 1024
  layers = max(1, int(megabytes * 2**20 / 4 / width / width))
  keys = jax.random.split(jax.random.key(0), layers)
  return {
    "w": [jax.random.normal(k, (width, width), jnp.float32) / width**0.5 for k in keys],
    "step": jnp.zeros((), jnp.int32),
  }


def _train_step():
  import jax
  import jax.numpy as jnp

  def step(state, x):
    def loss(ws):
      h = x
      for w in ws:
        h = jnp.tanh(h @ w)
      return jnp.mean(h**2)

    grads = jax.grad(loss)(state["w"])
    new_weights = [w - 0.01 * g for w, g in zip(state["w"], grads, strict=True)]
    return {"w": new_weights, "step": state["step"] + 1}

  return jax.jit(step, donate_argnums=0)


def measure(
  directory: str, *, asynchronous: bool, megabytes: float, steps: int, save_every: int
) -> dict:
  import jax
  import jax.numpy as jnp

  from experiments import common

  step_fn = _train_step()
  state = _state(megabytes)
  x = jnp.ones((256, 1024), jnp.float32)
  state = jax.block_until_ready(step_fn(state, x))  # compile
  plain, with_save = [], []
  started = time.perf_counter()
  with common.Checkpoints(directory, max_to_keep=2, asynchronous=asynchronous) as checkpoints:
    for i in range(1, steps + 1):
      t = time.perf_counter()
      state = jax.block_until_ready(step_fn(state, x))
      if i % save_every == 0:
        checkpoints.save(i, state)
        with_save.append(time.perf_counter() - t)
      else:
        plain.append(time.perf_counter() - t)
  total = time.perf_counter() - started  # close() waited for the last write and its record
  return {
    "storage": "gcs-emulator" if directory.startswith("gs://") else "local",
    "asynchronous": asynchronous,
    "step_ms": 1e3 * statistics.median(plain),
    "step_with_save_ms": 1e3 * statistics.median(with_save),
    "saves": len(with_save),
    "steps": steps,
    "total_s": total,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--megabytes", type=float, default=64, help="size of the saved state")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--save_every", type=int, default=10)
  parser.add_argument(
    "--repeats", type=int, default=2, help="each storage x mode measured this many times"
  )
  # --output-dir as the other benchmarks spell it; --output_dir works too.
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=str(HERE))
  args = parser.parse_args(argv)
  sys.path.insert(0, str(HERE.parent))
  from tests import gcs_emulator

  root = pathlib.Path(tempfile.mkdtemp(prefix="bnjax-ckpt-bench-"))
  server, emulator = gcs_emulator.start(root)
  os.environ.update(gcs_emulator.environment(emulator.url))
  results = []
  try:
    bucket = emulator.make_bucket()
    run = 0
    for _ in range(args.repeats):
      for storage in ("local", "gcs-emulator"):
        for asynchronous in (False, True):  # interleaved: the machine's load falls on all alike
          run += 1
          directory = f"gs://{bucket}/run{run}" if storage != "local" else str(root / f"local{run}")
          results.append(
            measure(
              directory,
              asynchronous=asynchronous,
              megabytes=args.megabytes,
              steps=args.steps,
              save_every=args.save_every,
            )
          )
          print(json.dumps(results[-1]), flush=True)
  finally:
    server.kill()
    server.wait()
  summary = {
    "settings": {**vars(args), "machine": platform.machine(), "cpus": os.cpu_count()},
    "runs": results,
  }
  out = pathlib.Path(args.output_dir)
  (out / "checkpoint_results.json").write_text(json.dumps(summary, indent=2) + "\n")
  lines = [
    "# Training-step time around a checkpoint save",
    "",
    f"`python -m benchmarks.checkpoint --megabytes={args.megabytes:g} --steps={args.steps} "
    f"--save_every={args.save_every} --repeats={args.repeats}` ({os.cpu_count()} CPUs). "
    "Milliseconds; "
    "the median over the runs of each kind (min-max in brackets).",
    "",
    "| storage | save | step (no save) | step + save call | whole loop (s) |",
    "|---|---|---|---|---|",
  ]
  for storage in ("local", "gcs-emulator"):
    for asynchronous in (False, True):
      rows = [r for r in results if r["storage"] == storage and r["asynchronous"] == asynchronous]

      def fmt(key, scale=1.0, digits=0):
        values = [r[key] * scale for r in rows]  # noqa: B023 - used at once, in this iteration
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

      lines.append(
        f"| {storage} | {'async' if asynchronous else 'sync'} | {fmt('step_ms')} | "
        f"{fmt('step_with_save_ms')} | {fmt('total_s', digits=2)} |"
      )
  (out / "checkpoint_results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return summary


if __name__ == "__main__":
  main()
