"""Training throughput of the ImageNet networks: bnjax's BatchNorm against Flax's.

    python -m benchmarks.imagenet_throughput    # small size, ~15 min on 2 CPU cores
    python -m benchmarks.imagenet_throughput --image_size=224 --batch_size=256 --width_multiplier=1

Images per second of the experiment's own training step (``train.make_train_step``:
forward, backward, SGD update, BN statistics, donated state) on a fixed batch of
synthetic images, for the Inception with BN (BN-x5) and ResNet-50, under ``jit`` and
under ``pmap``, with ``bnjax.linen.BatchNorm`` and with ``flax.linen.BatchNorm`` in
the same network (Flax's default fast variance). The two BatchNorms of one network
and mode are timed side by side (``benchmarks.timing``: interleaved rounds, medians,
the whole measurement repeated), so their ratio is what to read; absolute figures
move with the machine's load.

Writes ``benchmarks/imagenet_results.json`` and ``benchmarks/imagenet_results.md``
(or into ``--output-dir``). ``--cpu_devices=N``: N simulated CPU devices, set as
``benchmarks.run`` sets its 8 (``jax_num_cpu_devices``, before JAX starts its backends).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics

import jax
from flax import linen as nn

from benchmarks.report import write_results
from benchmarks.timing import ratio_summary, repeated
from bnjax import linen as bn
from experiments.imagenet import models, parallel, train
from experiments.imagenet.configs import bn_x5, resnet50

HERE = pathlib.Path(__file__).resolve().parent
NETWORKS = {"inception_bn": bn_x5.get_config, "resnet50": resnet50.get_config}
NORMS = {"bnjax": bn.BatchNorm, "flax": nn.BatchNorm}


def network_config(
  name: str, *, image_size: int, batch_size: int, width_multiplier: float, parallelism: str
):
  config = NETWORKS[name]()
  config.unlock()
  config.update(
    image_size=image_size,
    batch_size=batch_size,
    eval_batch_size=batch_size,
    fake_data=True,
    width_multiplier=width_multiplier,
    parallelism=parallelism,
    bn_group_size=0,
    bn_virtual_batch_size=0,
    recompute_bn_batches=0,
    lr_schedule="constant",
    warmup_epochs=0.0,
  )
  return config


def step_candidate(config, norm_class, *, create_model=models.create_model):
  """A function running one training step (its state carried from call to call)
  and the number of parameters of the network."""
  exp = train.prepare(config, create_model=create_model, norm_class=norm_class)
  layout = exp.layout
  state = train.make_initial_state(exp)
  if layout.parallelism == "pmap":
    state = parallel.to_pmap_replicated(layout, parallel.host_copy(state))
  batch = parallel.to_device_batch(layout, next(train.host_train_batches(exp, 0, seed=0)))
  step = train.make_train_step(exp)
  carried = [state]

  def run_one_step():
    carried[0], metrics = step(carried[0], batch)
    return metrics["loss"]

  return run_one_step, exp.num_params


def measure(
  networks,
  parallelisms,
  *,
  image_size: int,
  batch_size: int,
  width_multiplier: float,
  rounds: int,
  repeats: int,
  create_model=models.create_model,
) -> list[dict]:
  """Images/s of each (network, parallelism) with each BatchNorm, and their ratios."""
  results = []
  for name in networks:
    for parallelism in parallelisms:
      config = network_config(
        name,
        image_size=image_size,
        batch_size=batch_size,
        width_multiplier=width_multiplier,
        parallelism=parallelism,
      )
      candidates, num_params = {}, None
      for norm_name, norm_class in NORMS.items():
        candidates[norm_name], num_params = step_candidate(
          config, norm_class, create_model=create_model
        )
      print(f"{name} {parallelism}: compiling and timing {list(candidates)} ...", flush=True)
      seconds = repeated(candidates, rounds=rounds, repeats=repeats)
      results.append(
        {
          "network": name,
          "parallelism": parallelism,
          "parameters": num_params,
          "images_per_sec": {k: batch_size / statistics.median(v) for k, v in seconds.items()},
          "seconds_per_step": {k: statistics.median(v) for k, v in seconds.items()},
          # images/s of bnjax over Flax's: > 1 means bnjax trains faster.
          "bnjax_over_flax_images_per_sec": ratio_summary(seconds["flax"], seconds["bnjax"]),
        }
      )
      print(f"  {results[-1]['images_per_sec']}", flush=True)
  return results


def machine() -> dict:
  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "date": datetime.date.today().isoformat(),
  }


def markdown(results: dict) -> str:
  s = results["settings"]
  lines = [
    "# ImageNet training throughput: bnjax vs flax.linen.BatchNorm\n",
    f"Written by `python -m benchmarks.imagenet_throughput` on {results['machine']['devices']} "
    f"{results['machine']['device_kind']} device(s) ({results['machine']['backend']}, "
    f"{results['machine']['cpu_count']} CPU cores), {results['machine']['date']}. "
    f"Images {s['image_size']}x{s['image_size']}, global batch {s['batch_size']}, width multiplier "
    f"{s['width_multiplier']}, synthetic data; {s['rounds']} interleaved rounds x "
    f"{s['repeats']} repeats.\n",
    "| network | parallelism | parameters | bnjax images/s | Flax images/s "
    "| bnjax / Flax (median, min-max) |",
    "|---|---|---|---|---|---|",
  ]
  for r in results["throughput"]:
    ratio = r["bnjax_over_flax_images_per_sec"]
    lines.append(
      f"| {r['network']} | {r['parallelism']} | {r['parameters']:,} | "
      f"{r['images_per_sec']['bnjax']:.1f} | {r['images_per_sec']['flax']:.1f} | "
      f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) |"
    )
  lines.append(
    "\nA ratio above 1: bnjax's exact BatchNorm trains faster than Flax's fast (inexact) default.\n"
  )
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16, help="global batch")
  parser.add_argument("--width_multiplier", type=float, default=0.25)
  parser.add_argument(
    "--networks", default=",".join(NETWORKS), help=f"comma-separated, of {list(NETWORKS)}"
  )
  parser.add_argument("--parallelisms", default="jit,pmap")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--cpu_devices", type=int, default=None, help="simulated CPU devices (CPU runs only)"
  )
  # --output-dir as benchmarks.run spells it; --output_dir, the spelling before, still works.
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=str(HERE))
  args = parser.parse_args(argv)
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  networks, parallelisms = args.networks.split(","), args.parallelisms.split(",")
  unknown = [n for n in networks if n not in NETWORKS] + [
    p for p in parallelisms if p not in parallel.PARALLELISMS
  ]
  if unknown:
    parser.error(f"unknown network or parallelism: {', '.join(unknown)}")
  settings = {
    k: getattr(args, k)
    for k in ("image_size", "batch_size", "width_multiplier", "rounds", "repeats")
  }
  throughput = measure(networks, parallelisms, **settings)
  results = {"machine": machine(), "settings": settings, "throughput": throughput}
  output = pathlib.Path(args.output_dir)
  write_results(
    output / "imagenet_results.json", output / "imagenet_results.md", results, markdown(results)
  )
  return results


if __name__ == "__main__":
  main()
