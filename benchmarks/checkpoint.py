"""What a run's bookkeeping costs (``experiments.common.Run``), on local disk and on a
Cloud Storage emulator (fake-gcs-server):

1. The training step around an (asynchronous) checkpoint save: the median step
   without a save, and "a step plus ``maybe_save``" (what the loop waits for).
2. SIGTERM to exit: from the signal, after a step, to the end of
   ``stop_if_requested`` and ``close`` (the step's checkpoint saved, the rows
   written, the workdir released), against orbax's own save of the same state in
   the same place (``CheckpointManager.save`` then ``wait_until_finished``, after
   the same saves before it: the oldest step is deleted in both).
3. Metric rows: bytes sent and milliseconds per row appended to ``metrics.jsonl``,
   over the first and the last 1,000 of ``--rows`` rows (gs:// only: locally an
   append is a write of the row).

    python -m benchmarks.checkpoint                     # ~3 min on 2 CPU cores
    python -m benchmarks.checkpoint --megabytes=256 --rows=10000

The emulator is a local process: its uploads are a lower bound for a real bucket's.
Writes ``benchmarks/checkpoint_results.json`` and ``.md`` (or into ``--output_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import signal
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
  return {"w": [jax.random.normal(k, (width, width), jnp.float32) / width**0.5 for k in keys]}


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
    return {"w": [w - 0.01 * g for w, g in zip(state["w"], grads, strict=True)]}

  return jax.jit(step, donate_argnums=0)


def measure_run(directory: str, *, megabytes: float, steps: int, save_every: int) -> dict:
  """Sections 1 and 2 on ``directory``."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from experiments import common

  step_fn, state, x = _train_step(), _state(megabytes), jnp.ones((256, 1024), jnp.float32)
  state = jax.block_until_ready(step_fn(state, x))  # compile
  plain, with_save, signalled = [], [], None
  options = {"num_train_steps": 10**6, "checkpoint_every": save_every, "max_to_keep": 2}
  try:
    with common.Run.open(directory, {"megabytes": megabytes}, **options) as run:
      for i in range(1, steps + 2):
        t = time.perf_counter()
        state = jax.block_until_ready(step_fn(state, x))
        if i > steps:  # SIGTERM after a step that saves nothing of itself
          signalled = time.perf_counter()
          os.kill(os.getpid(), signal.SIGTERM)
        run.log(i, {"loss": 0.5})
        saved = run.maybe_save(i, state)
        if i <= steps:
          (with_save if saved else plain).append(time.perf_counter() - t)
        run.stop_if_requested(i)
  except common.Preempted:
    pass
  to_exit = time.perf_counter() - signalled
  # orbax alone, in the same place: the same saves before, then the timed one (with
  # max_to_keep=2 it deletes the oldest step, as the run's last save did).
  with ocp.CheckpointManager(
    f"{directory}-orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2)
  ) as manager:
    for i in range(save_every, steps + 1, save_every):
      manager.save(i, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    t = time.perf_counter()
    manager.save(steps + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    orbax_save = time.perf_counter() - t
  return {
    "storage": "gcs-emulator" if directory.startswith("gs://") else "local",
    "step_ms": 1e3 * statistics.median(plain),
    "step_with_save_ms": 1e3 * statistics.median(with_save),
    "sigterm_to_exit_s": to_exit,
    "orbax_save_s": orbax_save,
  }


def measure_rows(directory: str, rows: int) -> dict:
  """Section 3: ``rows`` rows appended to ``directory/metrics.jsonl``."""
  import requests

  from experiments.common import files

  sent, request = [0], requests.Session.request

  def counting(self, method, url, *args, data=None, **kwargs):
    sent[0] += len(data) if isinstance(data, bytes) else 0
    return request(self, method, url, *args, data=data, **kwargs)

  requests.Session.request = counting
  try:
    appender, costs = files.Appender(files.workdir_path(directory) / "metrics.jsonl"), []
    for step in range(rows):
      before, t = sent[0], time.perf_counter()
      row = {"step": step, "train_loss": 1 / (step + 1), "learning_rate": 0.1}
      appender.write(json.dumps(row).encode() + b"\n")
      costs.append((sent[0] - before, time.perf_counter() - t))
  finally:
    requests.Session.request = request
  first, last = costs[:1000], costs[-1000:]
  return {
    "rows": rows,
    "file_bytes": len((files.workdir_path(directory) / "metrics.jsonl").read_bytes()),
    "bytes_sent_per_row_first_1000": statistics.mean(b for b, _ in first),
    "bytes_sent_per_row_last_1000": statistics.mean(b for b, _ in last),
    "ms_per_row_first_1000": 1e3 * statistics.median(s for _, s in first),
    "ms_per_row_last_1000": 1e3 * statistics.median(s for _, s in last),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--megabytes", type=float, default=64, help="size of the saved state")
  parser.add_argument("--steps", type=int, default=35, help="then SIGTERM (not just after a save)")
  parser.add_argument("--save_every", type=int, default=10)
  parser.add_argument("--rows", type=int, default=10000)
  parser.add_argument("--repeats", type=int, default=2, help="sections 1-2, per storage")
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=str(HERE))
  args = parser.parse_args(argv)
  sys.path.insert(0, str(HERE.parent))
  from tests import gcs_emulator

  root = pathlib.Path(tempfile.mkdtemp(prefix="bnjax-ckpt-bench-"))
  server, emulator = gcs_emulator.start(root)
  os.environ.update(gcs_emulator.environment(emulator.url))
  runs = []
  try:
    bucket = emulator.make_bucket()
    for repeat in range(args.repeats):  # interleaved: the machine's load falls on both alike
      for storage in ("local", "gcs-emulator"):
        where = f"gs://{bucket}" if storage != "local" else str(root)
        runs.append(
          measure_run(
            f"{where}/run{repeat}",
            megabytes=args.megabytes,
            steps=args.steps,
            save_every=args.save_every,
          )
        )
        print(json.dumps(runs[-1]), flush=True)
    rows = measure_rows(f"gs://{bucket}/rows", args.rows)
    print(json.dumps(rows), flush=True)
  finally:
    server.kill()
    server.wait()
  summary = {
    "settings": {**vars(args), "machine": platform.machine(), "cpus": os.cpu_count()},
    "runs": runs,
    "rows": rows,
  }
  out = pathlib.Path(args.output_dir)
  (out / "checkpoint_results.json").write_text(json.dumps(summary, indent=2) + "\n")
  lines = [
    "# What a run's bookkeeping costs",
    "",
    f"`python -m benchmarks.checkpoint --megabytes={args.megabytes:g} --steps={args.steps} "
    f"--save_every={args.save_every} --rows={args.rows} --repeats={args.repeats}` "
    f"({os.cpu_count()} CPUs); each run's figures, in the order measured.",
    "",
    "| storage | step (ms) | step + save (ms) | SIGTERM to exit (s) | orbax's save (s) |",
    "|---|---|---|---|---|",
  ]
  for r in runs:
    lines.append(
      f"| {r['storage']} | {r['step_ms']:.0f} | {r['step_with_save_ms']:.0f} | "
      f"{r['sigterm_to_exit_s']:.2f} | {r['orbax_save_s']:.2f} |"
    )
  lines += [
    "",
    f"Metric rows on the emulator: {rows['rows']:,} rows, a {rows['file_bytes']:,}-byte file; "
    f"bytes sent per row {rows['bytes_sent_per_row_first_1000']:.0f} (first 1,000) and "
    f"{rows['bytes_sent_per_row_last_1000']:.0f} (last 1,000); ms per row "
    f"{rows['ms_per_row_first_1000']:.1f} and {rows['ms_per_row_last_1000']:.1f}.",
  ]
  (out / "checkpoint_results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return summary


if __name__ == "__main__":
  main()
