"""Batch norm on one accelerator host: every table that a GPU or a TPU can fill.

    python -m benchmarks.accelerator             # under 8 minutes on one H100 or TPU host
    python -m benchmarks.accelerator --small     # tiny shapes, 3 rounds: runs on a CPU

1. Batch norm alone, training mode, forward and forward + backward, float32 and
   bfloat16: bnjax against Flax's ``BatchNorm`` (fast default and exact mode).
2. The fusion steering (``bnjax._fusion``): bnjax's forward + backward with the
   optimization barriers that bnjax applies on CPU forced on, and with none, on
   this backend; the barriers and fusions in each compiled program. The forcing
   patches the private ``bnjax._fusion.unshared_on_cpu`` for the benchmark only.
3. Collectives per synchronized layer, under ``pmap`` and ``shard_map`` over the
   host's local devices (n/a with one device).
4. The ResNet-50 and BN-Inception training steps of the ImageNet experiment
   (``train.make_train_step``, bfloat16, under ``jit``), with bnjax's and Flax's
   ``BatchNorm``.

Timings are medians of interleaved rounds (``benchmarks.timing``), the whole
measurement repeated; in sections 1 and 2 a sample is several calls in a row,
divided, so that a device's time, not Python's dispatch, is measured on small
arrays. Ratios are bnjax's time over the other's (below 1: bnjax is faster).

Time: each section prints its elapsed time; a section (or network) that would
start after ``--budget-s`` seconds (360) is skipped and marked so, and the results
are written after every section, so a run cut short keeps what it measured. The
full sizes (two shapes, ResNet-50 and BN-Inception at batch 128 of 224x224) are
planned for about 5 minutes on one H100, most of it compiling the training steps.

Results merge into ``accelerator_results.json`` under a key per backend and
device kind (another backend's results stay), and ``accelerator_results.md`` is
rewritten from all of them, in ``benchmarks/`` or ``--output-dir``. ``--small``
writes into a temporary folder unless ``--output-dir`` is given, never into the
committed files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax._fusion
from benchmarks import implementations as impls
from benchmarks.hlo import count_collectives
from benchmarks.report import machine, ratio_text, write_results
from benchmarks.timing import ratio_summary, repeated
from bnjax import linen as bn
from experiments.imagenet import models

HERE = pathlib.Path(__file__).resolve().parent
NAMES = ("accelerator_results.json", "accelerator_results.md")
COMPARED = ("bnjax", "flax_fast", "flax_exact")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Sizes(NamedTuple):
  """What a run measures, and how long."""

  shapes: tuple[tuple[int, ...], ...]  # batch norm alone: x's shapes, features last
  rounds: int  # interleaved rounds per measurement (batch norm alone, steering)
  calls: int  # calls per timed sample there (queued: a device's time, not Python's)
  repeats: int  # measurements, for the spread of the ratios
  collective_shape: tuple[int, ...]  # x's shape per device in section 3
  networks: dict[str, tuple[str, Callable]]  # section 4: name -> (config, create_model)
  network_note: str  # what section 4's networks are
  image_size: int
  batch_size: int
  step_rounds: int  # interleaved rounds of the training steps


def small_resnet(config, *, norm) -> nn.Module:
  """ResNet-50's first stage cut to one bottleneck block of width 4, in bfloat16
  (``--small``: compiles in seconds on a CPU)."""
  return models.ResNet(
    stage_sizes=(1,), num_filters=4, num_classes=config.num_classes, dtype=jnp.bfloat16, norm=norm
  )


def small_inception(config, *, norm) -> nn.Module:
  """The BN-Inception's stem and module 3a at 1/16 of the width, in bfloat16
  (``--small``)."""
  return models.Inception(
    num_classes=config.num_classes,
    width_multiplier=1 / 16,
    norm=norm,
    modules=("3a",),
    dtype=jnp.bfloat16,
  )


FULL = Sizes(
  shapes=((256, 56, 56, 64), (256, 4096)),
  rounds=30,
  calls=10,
  repeats=3,
  collective_shape=(32, 28, 28, 64),
  networks={
    "ResNet-50": ("resnet50", models.create_model),
    "BN-Inception": ("inception_bn", models.create_model),
  },
  network_note="the experiment's networks",
  image_size=224,
  batch_size=128,
  step_rounds=10,
)
SMALL = Sizes(
  shapes=((4, 8, 8, 16),),
  rounds=3,
  calls=1,
  repeats=1,
  collective_shape=(2, 4, 4, 8),
  networks={
    "ResNet-50": ("resnet50", small_resnet),
    "BN-Inception": ("inception_bn", small_inception),
  },
  network_note="stand-ins of the networks' blocks (small mode: the plumbing only)",
  image_size=32,
  batch_size=8,
  step_rounds=2,
)


def milliseconds(seconds: float) -> str:
  return f"{1e3 * seconds:.3f}"


def inputs(shape, dtype):
  """``(x, scale, bias, dy)`` for one case: x of mean 1 and standard deviation 2."""
  keys = jax.random.split(jax.random.key(0), 2)
  x = (jax.random.normal(keys[0], shape) * 2 + 1).astype(dtype)
  dy = jax.random.normal(keys[1], shape).astype(dtype)
  return x, jnp.full(shape[-1], 1.5), jnp.full(shape[-1], 0.1), dy


def cases(sizes: Sizes):
  """``(label, shape, dtype)`` of every batch-norm-alone case."""
  return [
    (f"{shape} {name}", shape, dtype) for shape in sizes.shapes for name, dtype in DTYPES.items()
  ]


def per_call(candidates, sizes: Sizes) -> dict[str, list[float]]:
  """Seconds per call of each candidate (``benchmarks.timing.repeated``: a list over
  the repeats), each sample ``sizes.calls`` calls in a row, waiting for the last:
  a device runs them one after the other while Python queues the next, so that on
  small arrays the figure is the device's time rather than the dispatch's."""

  def in_a_row(fn):
    def run():
      for _ in range(sizes.calls - 1):
        fn()
      return fn()

    return run

  times = repeated(
    {name: in_a_row(fn) for name, fn in candidates.items()},
    rounds=sizes.rounds,
    repeats=sizes.repeats,
  )
  return {name: [t / sizes.calls for t in samples] for name, samples in times.items()}


# ---- 1. batch norm alone --------------------------------------------------------------------


def bench_batch_norm(sizes: Sizes) -> list[dict]:
  """Forward and forward + backward times of bnjax, Flax fast and Flax exact."""
  results = []
  for label, shape, dtype in cases(sizes):
    x, scale, bias, dy = inputs(shape, dtype)
    candidates = {}
    for name in COMPARED:
      f = impls.IMPLEMENTATIONS[name]
      forward = impls.forward(f).lower(x, scale, bias).compile()
      backward = impls.forward_backward(f).lower(x, scale, bias, dy).compile()
      candidates[f"forward/{name}"] = functools.partial(forward, x, scale, bias)
      candidates[f"forward_backward/{name}"] = functools.partial(backward, x, scale, bias, dy)
    times = per_call(candidates, sizes)
    case = {"case": label, "bytes": int(x.nbytes)}
    for kind in ("forward", "forward_backward"):
      case[f"{kind}_s"] = {n: statistics.median(times[f"{kind}/{n}"]) for n in COMPARED}
      case[f"{kind}_ratios"] = {
        f"bnjax_vs_{other}": ratio_summary(times[f"{kind}/bnjax"], times[f"{kind}/{other}"])
        for other in COMPARED[1:]
      }
    print(f"  {label}: {json.dumps(case['forward_backward_s'])}", flush=True)
    results.append(case)
  return results


# ---- 2. the fusion steering -----------------------------------------------------------------


@contextlib.contextmanager
def steering(barriers: bool):
  """bnjax traced with CPU's optimization barriers on every backend (``barriers``)
  or with none: replaces the private ``bnjax._fusion.unshared_on_cpu``, for this
  benchmark only; what is compiled inside keeps the choice."""
  original = bnjax._fusion.unshared_on_cpu

  def forced(operands, copies=1):
    return lax.optimization_barrier((operands,) * copies) if barriers else (operands,) * copies

  bnjax._fusion.unshared_on_cpu = forced
  try:
    yield
  finally:
    bnjax._fusion.unshared_on_cpu = original


def program_counts(lowered, compiled) -> dict:
  """Optimization barriers in the StableHLO and in the compiled program, fusions in
  the compiled program, and its temporary bytes (XLA's memory analysis)."""
  text = compiled.as_text()
  analysis = compiled.memory_analysis()
  return {
    "stablehlo_barriers": lowered.as_text().count("stablehlo.optimization_barrier"),
    "compiled_barriers": len(re.findall(r"\sopt-barrier\(", text)),
    "fusions": len(re.findall(r"\sfusion\(", text)),
    "temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes),
  }


def bench_steering(sizes: Sizes) -> list[dict]:
  """bnjax's forward + backward with and without CPU's barriers, on this backend."""
  results = []
  for label, shape, dtype in cases(sizes):
    args = inputs(shape, dtype)
    candidates, counts = {}, {}
    for variant, barriers in (("barriers", True), ("no_barriers", False)):
      with steering(barriers):
        lowered = impls.forward_backward(impls.bnjax_batch_norm).lower(*args)
        compiled = lowered.compile()
      candidates[variant] = functools.partial(compiled, *args)
      counts[variant] = program_counts(lowered, compiled)
    times = per_call(candidates, sizes)
    results.append(
      {
        "case": label,
        "forward_backward_s": {v: statistics.median(t) for v, t in times.items()},
        "barriers_vs_none": ratio_summary(times["barriers"], times["no_barriers"]),
        "programs": counts,
        "shipped": "barriers" if jax.default_backend() == "cpu" else "no_barriers",
      }
    )
    print(f"  {label}: {json.dumps(results[-1]['forward_backward_s'])}", flush=True)
  return results


# ---- 3. collectives -------------------------------------------------------------------------


def synchronized_programs(name: str, devices, shape) -> dict:
  """The lowered pmap forward, pmap forward + backward and shard_map forward +
  backward of one implementation synchronized over ``devices``."""
  f = functools.partial(impls.IMPLEMENTATIONS[name], axis_name="batch")

  def step(x, scale, bias, dy):
    _, vjp, stats = jax.vjp(f, x, scale, bias, has_aux=True)
    return vjp(dy), stats

  n = len(devices)
  x, scale, bias, dy = inputs((n, *shape), jnp.float32)
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  flat = lambda a: jax.device_put(a.reshape((-1, *shape[1:])), batch)  # noqa: E731
  shard_map_step = jax.shard_map(
    step,
    mesh=mesh,
    in_specs=(P("batch"), P(), P(), P("batch")),
    out_specs=((P("batch"), P(), P()), P()),
  )
  per_feature = [jax.device_put(a, replicated) for a in (scale, bias)]
  return {
    "pmap_forward": jax.pmap(f, "batch", in_axes=(0, None, None), devices=devices).lower(
      x, scale, bias
    ),
    "pmap_forward_backward": jax.pmap(
      step, "batch", in_axes=(0, None, None, 0), devices=devices
    ).lower(x, scale, bias, dy),
    "shard_map_forward_backward": jax.jit(shard_map_step).lower(flat(x), *per_feature, flat(dy)),
  }


def bench_collectives(sizes: Sizes) -> dict:
  """Collectives per synchronized layer over the local devices: those in each
  compiled program and those outside conditionals' branches (run on every call)."""
  devices = jax.local_devices()
  if len(devices) < 2:
    return {"devices": len(devices), "n/a": "one local device: nothing to synchronize"}
  results = {"devices": len(devices)}
  for name in COMPARED:
    programs = synchronized_programs(name, devices, sizes.collective_shape)
    texts = {key: lowered.compile().as_text() for key, lowered in programs.items()}
    results[name] = {
      key: {
        "in_program": count_collectives(text),
        "every_call": count_collectives(text, outside_branches=True),
      }
      for key, text in texts.items()
    }
  print(f"  {json.dumps(results)}", flush=True)
  return results


# ---- 4. training steps ----------------------------------------------------------------------


def bench_training_steps(sizes: Sizes, deadline: float) -> list[dict]:
  """Seconds per training step (the experiment's, ``train.make_train_step``) of each
  network with bnjax's and Flax's BatchNorm;
  a network that would start after ``deadline`` (``time.monotonic``) is skipped."""
  from benchmarks import imagenet_throughput

  results = []
  for label, (config_name, create_model) in sizes.networks.items():
    if time.monotonic() > deadline:
      results.append({"network": label, "skipped": "over the time budget"})
      continue
    config = imagenet_throughput.network_config(
      config_name,
      image_size=sizes.image_size,
      batch_size=sizes.batch_size,
      width_multiplier=1.0,
      parallelism="jit",
    )
    config.half_precision = True
    step = functools.partial(imagenet_throughput.step_candidate, config, create_model=create_model)
    steps = {"bnjax": step(bn.BatchNorm)[0], "flax": step(nn.BatchNorm)[0]}
    times = repeated(steps, rounds=sizes.step_rounds, repeats=sizes.repeats)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    results.append(
      {
        "network": label,
        "setting": f"{sizes.network_note}, batch {sizes.batch_size} of "
        f"{sizes.image_size}x{sizes.image_size}, bfloat16",
        "step_s": step_s,
        "images_per_s": {name: sizes.batch_size / s for name, s in step_s.items()},
        "bnjax_vs_flax": ratio_summary(times["bnjax"], times["flax"]),
      }
    )
    print(f"  {label}: {json.dumps(step_s)}", flush=True)
  return results


# ---- report ---------------------------------------------------------------------------------


def batch_norm_table(cases_: list[dict]) -> list[str]:
  lines = [
    "| case | pass | bnjax ms | Flax fast ms | Flax exact ms | bnjax / Flax fast "
    "| bnjax / Flax exact |",
    "|---|---|---|---|---|---|---|",
  ]
  for case in cases_:
    for kind, text in (("forward", "forward"), ("forward_backward", "forward + backward")):
      seconds, ratios = case[f"{kind}_s"], case[f"{kind}_ratios"]
      lines.append(
        f"| {case['case'] if kind == 'forward' else ''} | {text} | "
        + " | ".join(milliseconds(seconds[n]) for n in COMPARED)
        + f" | {ratio_text(ratios['bnjax_vs_flax_fast'])}"
        f" | {ratio_text(ratios['bnjax_vs_flax_exact'])} |"
      )
  return lines


def steering_table(cases_: list[dict]) -> list[str]:
  lines = [
    "| case | with barriers ms | without ms | with / without | barriers (StableHLO, "
    "compiled) | fusions | temporary bytes | bnjax ships |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for case in cases_:
    seconds, on, off = case["forward_backward_s"], *case["programs"].values()
    lines.append(
      f"| {case['case']} | {milliseconds(seconds['barriers'])} | "
      f"{milliseconds(seconds['no_barriers'])} | {ratio_text(case['barriers_vs_none'])} | "
      f"{on['stablehlo_barriers']}, {on['compiled_barriers']} / "
      f"{off['stablehlo_barriers']}, {off['compiled_barriers']} | "
      f"{on['fusions']} / {off['fusions']} | {on['temp_bytes']} / {off['temp_bytes']} | "
      f"{case['shipped'].replace('_', ' ')} |"
    )
  return lines


def collectives_table(collectives: dict) -> list[str]:
  if "n/a" in collectives:
    return [f"n/a: {collectives['n/a']}."]
  fmt = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "0"  # noqa: E731
  programs = ("pmap_forward", "pmap_forward_backward", "shard_map_forward_backward")
  lines = [
    f"{collectives['devices']} devices. Those run on every call; in brackets, all in the"
    " program where conditionals' branches hold more.",
    "",
    "| implementation | pmap forward | pmap forward + backward | shard_map forward + backward |",
    "|---|---|---|---|",
  ]
  for name in COMPARED:
    cells = []
    for key in programs:
      count = collectives[name][key]
      extra = "" if count["every_call"] == count["in_program"] else f" ({fmt(count['in_program'])})"
      cells.append(fmt(count["every_call"]) + extra)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def training_table(steps: list[dict]) -> list[str]:
  lines = [
    "| network | setting | bnjax ms/step | Flax ms/step | bnjax / Flax | bnjax images/s |",
    "|---|---|---|---|---|---|",
  ]
  for r in steps:
    if "skipped" in r:
      lines.append(f"| {r['network']} | skipped: {r['skipped']} | | | | |")
      continue
    lines.append(
      f"| {r['network']} | {r['setting']} | {milliseconds(r['step_s']['bnjax'])} | "
      f"{milliseconds(r['step_s']['flax'])} | {ratio_text(r['bnjax_vs_flax'])} | "
      f"{r['images_per_s']['bnjax']:.0f} |"
    )
  return lines


SECTIONS = {
  "batch_norm": ("1. Batch norm alone, training mode", batch_norm_table),
  "steering": (
    "2. The fusion steering: CPU's optimization barriers forced on and off",
    steering_table,
  ),
  "collectives": ("3. Collectives per synchronized layer (compiled HLO)", collectives_table),
  "training_steps": ("4. Training steps (ImageNet experiment, jit)", training_table),
}


def backend_markdown(key: str, run: dict) -> list[str]:
  m, s = run["machine"], run["settings"]
  lines = [
    f"## {key}",
    "",
    f"{m['date']}; {run['devices']} device(s); jax {m['jax']}, bnjax {m['bnjax']}, "
    f"{m['cpu_count']} CPUs. Medians of {s['rounds']} interleaved rounds of "
    f"{s['calls']} calls in a row (sections 1, 2; training steps: {s['step_rounds']} rounds "
    f"of one step), repeated {s['repeats']} times; ratios: median (min-max) over the "
    "repeats, bnjax's time over the other's. Elapsed per section (s): "
    + ", ".join(f"{k} {v:.0f}" for k, v in run["elapsed_s"].items())
    + ".",
  ]
  for name, (title, table) in SECTIONS.items():
    if name in run:
      lines += ["", f"### {title}", "", *table(run[name])]
    elif name in run.get("skipped", ()):
      lines += ["", f"### {title}", "", "Skipped: over the time budget."]
  return lines


def markdown(results: dict) -> str:
  lines = [
    "# Batch norm on accelerators",
    "",
    "Written by `python -m benchmarks.accelerator` (see `benchmarks/accelerator.py` for the"
    " method), one section per backend and device kind.",
  ]
  for key, run in sorted(results["backends"].items()):
    lines += ["", *backend_markdown(key, run)]
  return "\n".join(lines) + "\n"


# ---- running --------------------------------------------------------------------------------


def backend_key(small: bool) -> str:
  """The key of this run's results: backend and device kind (and the mode)."""
  device = jax.devices()[0]
  key = f"{jax.default_backend()}: {getattr(device, 'device_kind', str(device))}"
  return key + (" (small mode: tiny shapes, not a measurement)" if small else "")


def output_paths(*, small: bool, output_dir: str | None) -> tuple[pathlib.Path, pathlib.Path]:
  folder = pathlib.Path(output_dir) if output_dir else HERE
  if small and not output_dir:
    folder = pathlib.Path(tempfile.gettempdir()) / "bnjax-accelerator-small"
  return folder / NAMES[0], folder / NAMES[1]


def save(json_path: pathlib.Path, markdown_path: pathlib.Path, key: str, run: dict) -> None:
  """Merges ``run`` into the JSON under ``key`` and rewrites the Markdown from it."""
  results = json.loads(json_path.read_text()) if json_path.exists() else {"backends": {}}
  results["backends"][key] = run
  write_results(json_path, markdown_path, results, markdown(results))


def measure(sizes: Sizes, *, small: bool, budget_s: float, save_run) -> dict:
  """Runs the sections in order, each recorded and saved as it ends; a section that
  would start after ``budget_s`` seconds is skipped."""
  start = time.monotonic()
  deadline = start + budget_s
  run = {
    "machine": machine(),
    "devices": jax.local_device_count(),
    "settings": {
      "small": small,
      "budget_s": budget_s,
      **sizes._asdict(),
      "networks": {label: config for label, (config, _) in sizes.networks.items()},
    },
    "elapsed_s": {},
    "skipped": [],
  }
  sections = {
    "batch_norm": lambda: bench_batch_norm(sizes),
    "steering": lambda: bench_steering(sizes),
    "collectives": lambda: bench_collectives(sizes),
    "training_steps": lambda: bench_training_steps(sizes, deadline),
  }
  for name, section in sections.items():
    if time.monotonic() > deadline:
      run["skipped"].append(name)
      continue
    print(f"{name} ...", flush=True)
    section_start = time.monotonic()
    run[name] = section()
    run["elapsed_s"][name] = time.monotonic() - section_start
    print(f"{name}: {run['elapsed_s'][name]:.1f} s", flush=True)
    save_run(run)
  run["elapsed_s"]["total"] = time.monotonic() - start
  save_run(run)
  return run


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes and 3 rounds")
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None)
  parser.add_argument(
    "--budget-s",
    type=float,
    default=360.0,
    help="start no section (or network) after this many seconds: with the last one's"
    " own time, the run stays under 8 minutes on one H100",
  )
  args = parser.parse_args(argv)
  json_path, markdown_path = output_paths(small=args.small, output_dir=args.output_dir)
  if args.small and json_path.parent.resolve() == HERE:
    parser.error(
      "--small would write into benchmarks/, beside a device's results; give another --output-dir"
    )
  key = backend_key(args.small)
  print(f"{key}: writing {json_path}", flush=True)
  if jax.default_backend() == "cpu" and not args.small:
    print("The full sizes are an accelerator's: on a CPU, well over an hour (see --small).")
  return measure(
    SMALL if args.small else FULL,
    small=args.small,
    budget_s=args.budget_s,
    save_run=functools.partial(save, json_path, markdown_path, key),
  )


if __name__ == "__main__":
  main()
