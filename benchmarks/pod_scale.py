"""Batch norm at pod scale: what one synchronized layer sends between D devices, and
what that makes per ResNet-50 and BN-Inception training step, from compiled HLO.

    python -m benchmarks.pod_scale                 # D = 8, 64, 256, 1024 (a few minutes, 2 CPUs)
    python -m benchmarks.pod_scale --devices 8,64  # some device counts
    python -m benchmarks.pod_scale --quick         # D = 2, 4, small C: does it run (tests do)

Nothing is run: every program is compiled (``lower(...).compile()``) for D simulated
CPU devices, one subprocess per D (``XLA_FLAGS=--xla_force_host_platform_device_count=D``
is read when jax starts), and its HLO text is read by ``benchmarks.hlo``: each
collective instruction and its operands' bytes (shape times element size: the buffer
each device all-reduces). It measures whichever bnjax the interpreter imports.

1. One synchronized layer under ``jax.shard_map`` over a 1-D mesh of D devices: a
   per-device batch of [2, 4, 4, C] float32 (NHWC), training mode, bnjax against
   Flax's ``BatchNorm`` (``use_fast_variance`` True and False), the forward alone
   and forward + backward (``jax.vjp``). Two counts: the collectives on the path
   that runs on every call (outside the branches of conditionals) and every
   collective in the program (a ``lax.cond``'s rarely taken branches included).
   Compiled at several C: the bytes are affine in C (checked at the middle C),
   and bytes per channel and a constant are what the step totals use.
2. The same under ``pmap`` at one D as a cross-check, and with ``axis_index_groups``
   of unequal sizes.
3. Per training step: the batch norm layers of ResNet-50 and BN-Inception
   (``experiments/imagenet/models.py``, their feature counts from ``jax.eval_shape``
   of ``init``), each layer's bytes at its C summed.
4. A MODEL, not a measurement, of the time those exchanges take on TPU v4 and v5e:
   a ring all-reduce of b bytes over D chips takes 2 (D-1)/D * b / B plus a fixed
   latency per collective; B and its public source are in ``CHIPS``.

Writes ``benchmarks/pod_scale.json`` and ``benchmarks/pod_scale.md`` and puts the
same tables into ``BENCHMARKS.md`` as its section "Pod scale" (``benchmarks.run``,
which writes the rest of that file, puts the section back from ``pod_scale.json``
when it rewrites it: both go through ``benchmarks_section``). With ``--output-dir``,
or ``--quick`` (a temporary folder unless given one), the committed files are left
alone and BENCHMARKS.md is not touched.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from benchmarks import implementations as impls
from benchmarks.hlo import collectives
from benchmarks.report import machine, write_results
from experiments.common.files import write_atomic

HERE = pathlib.Path(__file__).resolve().parent
CANDIDATES = ("bnjax", "flax_fast", "flax_exact")
NAMES = {"bnjax": "bnjax", "flax_fast": "Flax fast", "flax_exact": "Flax exact"}
PROGRAMS = ("forward", "forward_backward")
SCOPES = ("every_call", "all")
AXIS = "batch"
PER_DEVICE_BATCH = (2, 4, 4)  # [N, H, W] of each device's [N, H, W, C] input
SECTION_TITLE = "## Pod scale"


class Settings(NamedTuple):
  """What a run compiles: device counts D, feature counts C (the tables use the
  last), the D of the ``pmap`` cross-check, and each subprocess's time limit."""

  devices: tuple[int, ...]
  channels: tuple[int, ...]
  pmap_devices: int
  timeout_s: float


FULL = Settings(devices=(8, 64, 256, 1024), channels=(64, 256, 1024), pmap_devices=8, timeout_s=300)
QUICK = Settings(devices=(2, 4), channels=(8, 16, 32), pmap_devices=4, timeout_s=300)


class Chip(NamedTuple):
  """Public figures a modelled time rests on."""

  all_reduce_bytes_per_s: float  # per chip: the pod's all-reduce bandwidth / its chips
  pod_chips: int
  source: str
  figures: str


CHIPS = {
  "TPU v4": Chip(
    1.1e15 / 4096,
    4096,
    "https://cloud.google.com/tpu/docs/v4",
    "All-reduce bandwidth per Pod 1.1 PB/s; TPU Pod size 4096 chips",
  ),
  "TPU v5e": Chip(
    51.2e12 / 256,
    256,
    "https://cloud.google.com/tpu/docs/v5e",
    "All-reduce bandwidth per Pod 51.2 TB/s; TPU Pod size 256 chips; bidirectional"
    " inter-chip interconnect (ICI) bandwidth per chip 400 GB/s (200 GB/s each way)",
  ),
}
# Assumed, not sourced: a fixed cost per collective (launch, synchronization and the
# hops of a small message). The one public per-hop figure found is about 1 us per ICI
# link (https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html).
LATENCY_S = 10e-6


# ---- in a subprocess: D devices, compile, read the HLO -------------------------------------


def layer_functions(name: str, axis_index_groups=None) -> dict:
  """The layer's training forward ``(x, scale, bias) -> (y, new_stats)`` and forward +
  backward ``(x, scale, bias, dy) -> ((dx, dscale, dbias), new_stats)``."""
  options = {"axis_index_groups": axis_index_groups} if axis_index_groups else {}
  forward = functools.partial(impls.IMPLEMENTATIONS[name], axis_name=AXIS, **options)

  def forward_backward(x, scale, bias, dy):
    _, vjp, new_stats = jax.vjp(forward, x, scale, bias, has_aux=True)
    return vjp(dy), new_stats

  return {"forward": forward, "forward_backward": forward_backward}


def hlo_record(text: str, compile_s: float) -> dict:
  """A compiled program's collectives: counts by kind and bytes, on the path run on
  every call and in the whole program."""
  found = collectives(text)
  record = {"compile_s": round(compile_s, 3)}
  for scope in SCOPES:
    kept = [c for c in found if c.every_call or scope == "all"]
    counts: dict[str, int] = {}
    for c in kept:
      counts[c.kind] = counts.get(c.kind, 0) + 1
    record[scope] = {"collectives": counts, "bytes": sum(c.bytes for c in kept)}
  return record


def compiled_record(jitted, *args) -> dict:
  start = time.perf_counter()
  with jax.numpy_dtype_promotion("standard"):  # Flax's BatchNorm promotes implicitly
    text = jitted.lower(*args).compile().as_text()
  return hlo_record(text, time.perf_counter() - start)


def shard_map_records(devices: int, channels: int) -> dict:
  """``{implementation: {program: record}}`` under ``shard_map`` over ``devices``."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (AXIS,))
  batch = (devices * PER_DEVICE_BATCH[0], *PER_DEVICE_BATCH[1:], channels)
  x = jax.ShapeDtypeStruct(batch, jnp.float32)
  vector = jax.ShapeDtypeStruct((channels,), jnp.float32)
  specs = {
    "forward": ((P(AXIS), P(), P()), (P(AXIS), P())),
    "forward_backward": ((P(AXIS), P(), P(), P(AXIS)), ((P(AXIS), P(), P()), P())),
  }
  records = {}
  for name in CANDIDATES:
    records[name] = {}
    for program, function in layer_functions(name).items():
      in_specs, out_specs = specs[program]
      mapped = jax.jit(jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
      args = (x, vector, vector, x)[: len(in_specs)]
      records[name][program] = compiled_record(mapped, *args)
  return records


def unequal_groups(devices: int) -> list[list[int]]:
  """Two groups of unequal sizes where ``devices`` allows (8 -> [[0, 1, 2], [3, ..., 7]])."""
  first = max(1, (devices - 1) // 2)
  return [list(range(first)), list(range(first, devices))]


def pmap_records(devices: int, channels: int, groups=None) -> dict:
  """``{implementation: {program: record}}`` under ``pmap`` over ``devices``."""
  x = jax.ShapeDtypeStruct((devices, *PER_DEVICE_BATCH, channels), jnp.float32)
  vector = jax.ShapeDtypeStruct((channels,), jnp.float32)
  in_axes = {"forward": (0, None, None), "forward_backward": (0, None, None, 0)}
  records = {}
  for name in CANDIDATES:
    records[name] = {}
    for program, function in layer_functions(name, groups).items():
      mapped = jax.pmap(function, axis_name=AXIS, in_axes=in_axes[program])
      args = (x, vector, vector, x)[: len(in_axes[program])]
      records[name][program] = compiled_record(mapped, *args)
  return records


def measure(devices: int, channels: tuple[int, ...], with_pmap: bool) -> dict:
  """Everything one subprocess compiles, for ``devices`` simulated devices."""
  if len(jax.devices()) < devices:
    raise RuntimeError(f"{len(jax.devices())} devices, not {devices}: set XLA_FLAGS first")
  result = {
    "devices": devices,
    "shard_map": {str(c): shard_map_records(devices, c) for c in channels},
  }
  if with_pmap:
    groups = unequal_groups(devices)
    result["pmap"] = {"channels": channels[-1], **pmap_records(devices, channels[-1])}
    result["pmap_groups"] = {
      "channels": channels[-1],
      "groups": groups,
      **pmap_records(devices, channels[-1], groups),
    }
  return result


def worker_main(devices: int, channels: tuple[int, ...], with_pmap: bool) -> None:
  """The subprocess: its results as one JSON line on stdout."""
  jax.config.update("jax_enable_compilation_cache", False)  # texts of fresh compiles
  print(json.dumps(measure(devices, channels, with_pmap)), flush=True)


# ---- in the parent: one subprocess per D -------------------------------------------------


def worker_environment(devices: int) -> dict:
  """The parent's environment with ``devices`` simulated CPU devices and no others."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def run_worker(devices: int, settings: Settings, with_pmap: bool) -> dict:
  """One subprocess's results, or ``{"skipped": reason}``; ``wall_s`` in both."""
  command = [sys.executable, "-m", "benchmarks.pod_scale", "--worker", str(devices)]
  command += ["--channels", ",".join(map(str, settings.channels))]
  command += ["--with-pmap"] if with_pmap else []
  start = time.perf_counter()
  try:
    done = subprocess.run(
      command,
      cwd=HERE.parent,
      env=worker_environment(devices),
      capture_output=True,
      text=True,
      timeout=settings.timeout_s,
    )
  except subprocess.TimeoutExpired:
    return {"skipped": f"did not compile within {settings.timeout_s:.0f} s", "wall_s": None}
  wall_s = round(time.perf_counter() - start, 1)
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"skipped": f"failed (exit {done.returncode}): {last}", "wall_s": wall_s}
  return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall_s}


def measure_all(settings: Settings) -> dict:
  """``{str(D): worker result}``, the ``pmap`` cross-check under its own D's key."""
  results = {}
  for devices in settings.devices:
    result = run_worker(devices, settings, with_pmap=devices == settings.pmap_devices)
    results[str(devices)] = result
    print(f"D = {devices}: {result.get('skipped', 'compiled')}, {result['wall_s']} s", flush=True)
  if settings.pmap_devices not in settings.devices:
    results[str(settings.pmap_devices)] = run_worker(settings.pmap_devices, settings, True)
  return results


# ---- derived: bytes per channel, per step, modelled time ---------------------------------


def affine_fit(points: dict[int, int]) -> dict:
  """``bytes = constant + per_channel * C`` through the first and last C; ``affine``
  says whether every other C lies on that line (exactly: bytes are integers)."""
  (c0, b0), (c1, b1) = min(points.items()), max(points.items())
  per_channel = (b1 - b0) / (c1 - c0)
  constant = b0 - per_channel * c0
  affine = all(abs(constant + per_channel * c - b) < 1e-6 for c, b in points.items())
  return {"per_channel": per_channel, "constant": constant, "affine": affine}


def layer_fits(measured: dict) -> dict:
  """``{D: {implementation: {program: {scope: fit}}}}`` from the shard_map records,
  and the collective counts (``{scope: counts}``, None where they depend on C)."""
  fits = {}
  for devices, result in measured.items():
    if "shard_map" not in result:
      continue
    by_channels = {int(c): records for c, records in result["shard_map"].items()}
    fits[devices] = {}
    for name in CANDIDATES:
      fits[devices][name] = {}
      for program in PROGRAMS:
        fits[devices][name][program] = program_fit(by_channels, name, program)
  return fits


def program_fit(by_channels: dict, name: str, program: str) -> dict:
  records = {c: r[name][program] for c, r in by_channels.items()}
  fit = {}
  for scope in SCOPES:
    counts = [r[scope]["collectives"] for r in records.values()]
    fit[scope] = {
      **affine_fit({c: r[scope]["bytes"] for c, r in records.items()}),
      "collectives": counts[0] if all(c == counts[0] for c in counts) else None,
    }
  return fit


def model_channels() -> dict[str, list[int]]:
  """Each batch norm layer's feature count C, by network, from ``jax.eval_shape`` of
  ``init`` at 224x224 (nothing allocated)."""
  from experiments.imagenet import models

  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  networks = {"ResNet-50": models.ResNet50(), "BN-Inception": models.Inception()}
  channels = {}
  for label, network in networks.items():
    shapes = jax.eval_shape(functools.partial(network.init, train=False), jax.random.key(0), images)
    leaves = jax.tree_util.tree_leaves_with_path(shapes["batch_stats"])
    channels[label] = [leaf.shape[-1] for path, leaf in leaves if path[-1].key == "mean"]
  return channels


def step_totals(fits: dict, channels: dict[str, list[int]]) -> dict:
  """``{network: {D: {implementation: {program: {scope: {bytes, collectives}}}}}}``:
  the sum over the network's layers of each layer's fitted bytes at its C."""
  totals = {}
  for label, layers in channels.items():
    totals[label] = {}
    for devices, by_name in fits.items():
      totals[label][devices] = {
        name: {
          program: {scope: layer_sum(fit[scope], layers) for scope in SCOPES}
          for program, fit in by_program.items()
        }
        for name, by_program in by_name.items()
      }
  return totals


def layer_sum(fit: dict, layers: list[int]) -> dict:
  counts = fit["collectives"]
  return {
    "bytes": round(sum(fit["constant"] + fit["per_channel"] * c for c in layers)),
    "collectives": None if counts is None else len(layers) * sum(counts.values()),
  }


def modelled_seconds(devices: int, step: dict, chip: Chip) -> dict | None:
  """The MODEL's time of one step's exchanges on the path run on every call: ring
  all-reduce bandwidth term and fixed latency term, in seconds; None beyond a pod."""
  if devices > chip.pod_chips:
    return None
  bandwidth = 2 * (devices - 1) / devices * step["bytes"] / chip.all_reduce_bytes_per_s
  latency = None if step["collectives"] is None else step["collectives"] * LATENCY_S
  return {"bandwidth_s": bandwidth, "latency_s": latency}


def modelled_times(totals: dict) -> dict:
  """``{chip: {network: {D: {implementation: seconds}}}}`` for forward + backward."""
  times = {}
  for chip_name, chip in CHIPS.items():
    times[chip_name] = {}
    for label, by_devices in totals.items():
      times[chip_name][label] = {
        devices: {
          name: modelled_seconds(
            int(devices), by_name[name]["forward_backward"]["every_call"], chip
          )
          for name in CANDIDATES
        }
        for devices, by_name in by_devices.items()
      }
  return times


# ---- report ----------------------------------------------------------------------------------


def counts_text(counts: dict | None) -> str:
  if counts is None:
    return "varies with C"
  return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "0"


def cell(record: dict) -> str:
  """A program's collectives and bytes: every call, and in brackets the whole program
  where it holds more."""
  every, everything = record["every_call"], record["all"]
  text = f"{counts_text(every['collectives'])}: {every['bytes']:,}"
  if everything != every:
    text += f" ({counts_text(everything['collectives'])}: {everything['bytes']:,} in all)"
  return text


def layer_table(results: dict, heading: str) -> list[str]:
  channels = results["settings"]["channels"][-1]
  lines = [
    f"{heading} One synchronized layer, shard_map, per-device batch "
    f"[{', '.join(map(str, PER_DEVICE_BATCH))}, {channels}] float32",
    "",
    "Collectives and the bytes they all-reduce (operand bytes per device) on the path that"
    " runs on every call; in brackets, every exchange in the program where the branches of a"
    " `lax.cond` hold more.",
    "",
    "| D | implementation | forward | forward + backward |",
    "|---|---|---|---|",
  ]
  for devices, result in results["measured"].items():
    if "skipped" in result:
      lines.append(f"| {devices} | all | skipped: {result['skipped']} | |")
      continue
    for name in CANDIDATES:
      records = result["shard_map"][str(channels)][name]
      lines.append(
        f"| {devices} | {NAMES[name]} | {cell(records['forward'])} "
        f"| {cell(records['forward_backward'])} |"
      )
  return lines


def fit_table(results: dict, heading: str) -> list[str]:
  channels = ", ".join(map(str, results["settings"]["channels"]))
  lines = [
    f"{heading} Bytes per channel (forward + backward)",
    "",
    f"Fitted as bytes = constant + per channel x C through the smallest and largest of C ="
    f' {channels}; "affine" says whether every C compiled lies on that line. Every call;'
    " all exchanges.",
    "",
    "| D | implementation | per channel | constant | affine | per channel, all | constant, all |",
    "|---|---|---|---|---|---|---|",
  ]
  for devices, by_name in results["fits"].items():
    for name in CANDIDATES:
      every, everything = (by_name[name]["forward_backward"][s] for s in SCOPES)
      affine = "yes" if every["affine"] and everything["affine"] else "NO"
      lines.append(
        f"| {devices} | {NAMES[name]} | {every['per_channel']:,.1f} | {every['constant']:,.0f} "
        f"| {affine} | {everything['per_channel']:,.1f} | {everything['constant']:,.0f} |"
      )
  return lines


def pmap_table(results: dict, heading: str) -> list[str]:
  lines = [
    f"{heading} Cross-check under pmap",
    "",
    "The forward matches shard_map's. Under shard_map the backward also all-reduces"
    " cotangents of the replicated (P()) scale and bias, the transpose of their implicit"
    " broadcast, which pmap (in_axes None) leaves per device: its forward + backward sends less.",
    "",
  ]
  for devices, result in results["measured"].items():
    for key, label in (("pmap", "pmap"), ("pmap_groups", "pmap, axis_index_groups")):
      if key not in result:
        continue
      groups = result[key].get("groups")
      sizes = f", groups of {' and '.join(str(len(g)) for g in groups)}" if groups else ""
      lines += [
        f"{label}: D = {devices}{sizes}, C = {result[key]['channels']}.",
        "",
        "| implementation | forward | forward + backward |",
        "|---|---|---|",
      ]
      lines += [
        f"| {NAMES[n]} | {cell(result[key][n]['forward'])} "
        f"| {cell(result[key][n]['forward_backward'])} |"
        for n in CANDIDATES
      ]
      lines.append("")
  return lines


def step_table(results: dict, heading: str) -> list[str]:
  lines = [f"{heading} Per training step (all batch norm layers synchronized)", ""]
  for label, by_devices in results["steps"].items():
    layers = results["model_channels"][label]
    lines += [
      f"{label}: {len(layers)} batch norm layers, {sum(layers):,} channels in all. Collectives"
      " and bytes on the path run on every call (bytes counting every exchange).",
      "",
      "| D | implementation | forward | forward + backward |",
      "|---|---|---|---|",
    ]
    for devices, by_name in by_devices.items():
      for name in CANDIDATES:
        lines.append(
          f"| {devices} | {NAMES[name]} | {step_cell(by_name[name]['forward'])} "
          f"| {step_cell(by_name[name]['forward_backward'])} |"
        )
    lines.append("")
  return lines


def step_cell(step: dict) -> str:
  every, everything = step["every_call"], step["all"]
  count = "?" if every["collectives"] is None else every["collectives"]
  return f"{count}: {every['bytes'] / 2**20:,.2f} MiB ({everything['bytes'] / 2**20:,.2f} MiB)"


def time_table(results: dict, heading: str) -> list[str]:
  lines = [
    f"{heading} MODELLED time per training step (a model, not a measurement)",
    "",
    "Forward + backward exchanges on the path run on every call, as ring all-reduces:"
    " 2 (D-1)/D x bytes / B, plus an ASSUMED fixed latency of"
    f" {LATENCY_S * 1e6:.0f} us per collective (no public per-collective figure was found)."
    " B per chip is the pod's all-reduce bandwidth divided by its chips, from Cloud TPU's"
    " documentation:",
    "",
  ]
  for name, chip in CHIPS.items():
    lines.append(
      f"- {name}: B = {chip.all_reduce_bytes_per_s / 1e9:.1f} GB/s ({chip.figures}; {chip.source})"
    )
  lines += [
    "",
    "Bandwidth term + latency term, microseconds; D beyond a pod's chips is not modelled.",
    "",
    "| chip | network | D | " + " | ".join(NAMES[n] for n in CANDIDATES) + " |",
    "|---|---|---|" + "---|" * len(CANDIDATES),
  ]
  for chip, by_network in results["modelled_time"].items():
    for label, by_devices in by_network.items():
      for devices, by_name in by_devices.items():
        cells = [seconds_text(by_name[n]) for n in CANDIDATES]
        lines.append(f"| {chip} | {label} | {devices} | " + " | ".join(cells) + " |")
  return lines


def seconds_text(modelled: dict | None) -> str:
  if modelled is None:
    return "beyond one pod"
  latency = "?" if modelled["latency_s"] is None else f"{modelled['latency_s'] * 1e6:,.0f}"
  return f"{modelled['bandwidth_s'] * 1e6:,.1f} + {latency}"


def bnjax_source(path: pathlib.Path) -> str:
  """Where the measured bnjax came from: this checkout's, or the installed one's path.

  Decided when measuring, so the committed results read the same from any clone.
  """
  return "this checkout's bnjax/" if path == HERE.parent / "bnjax" else str(path)


def markdown_body(results: dict, level: int) -> str:
  """The tables, their headings at ``level`` (2 in pod_scale.md, 3 in BENCHMARKS.md)."""
  heading = "#" * level
  m = results["machine"]
  walls = ", ".join(
    f"D = {d}: {r['wall_s']} s" + (f" ({r['skipped']})" if "skipped" in r else "")
    for d, r in results["measured"].items()
  )
  lines = [
    f"Written by `{results['command']}` on {m['date']}: jax {m['jax']}, bnjax {m['bnjax']}"
    f" ({results['bnjax_source']}), {m['cpu_count']} CPUs. Compiled for simulated"
    " CPU devices, never run; bytes are read from the compiled HLO.",
    f"Wall time per D (one subprocess each): {walls}.",
    "",
  ]
  for table in (layer_table, fit_table, pmap_table, step_table, time_table):
    lines += "\n".join(table(results, heading)).rstrip("\n").split("\n") + [""]
  return "\n".join(lines).rstrip() + "\n"


def benchmarks_section(results: dict) -> str:
  """The "Pod scale" section of BENCHMARKS.md (``benchmarks.run`` writes it too)."""
  return (
    f"{SECTION_TITLE}\n\nThe tables of `benchmarks/pod_scale.md` (method in"
    " `benchmarks/pod_scale.py`).\n\n" + markdown_body(results, level=3)
  )


def with_section(document: str, section: str) -> str:
  """``document`` with its "Pod scale" section (up to the next ``## `` heading)
  replaced by ``section``, or ``section`` appended.

  >>> with_section("# B\\n\\n## Pod scale\\n\\nold\\n\\n## Next\\n", "## Pod scale\\n\\nnew\\n")
  '# B\\n\\n## Pod scale\\n\\nnew\\n\\n## Next\\n'
  >>> with_section("# B\\n", "## Pod scale\\n\\nnew\\n")
  '# B\\n\\n## Pod scale\\n\\nnew\\n'
  """
  start = document.find(f"\n{SECTION_TITLE}\n")
  if start < 0:
    return document.rstrip("\n") + "\n\n" + section
  end = document.find("\n## ", start + 1)
  after = "" if end < 0 else "\n" + document[end + 1 :]
  return document[: start + 1] + section + after


def committed_section() -> str:
  """The section from the committed ``pod_scale.json``; empty if there is none."""
  path = HERE / "pod_scale.json"
  return benchmarks_section(json.loads(path.read_text())) if path.exists() else ""


# ---- command line --------------------------------------------------------------------------


def output_folder(args) -> pathlib.Path:
  if args.output_dir:
    return pathlib.Path(args.output_dir)
  if args.quick:
    return pathlib.Path(tempfile.gettempdir()) / "bnjax-pod-scale-quick"
  return HERE


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", help="device counts D, comma-separated (8,64,256,1024)")
  parser.add_argument("--channels", help="feature counts C compiled, comma-separated")
  parser.add_argument("--quick", action="store_true", help="D = 2, 4 and small C")
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None)
  parser.add_argument("--timeout", type=float, default=None, help="seconds per D (300)")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--with-pmap", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def settings_from(args) -> Settings:
  settings = QUICK if args.quick else FULL
  numbers = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
  if args.devices:
    settings = settings._replace(devices=numbers(args.devices))
  if args.channels:
    settings = settings._replace(channels=tuple(sorted(numbers(args.channels))))
  if args.timeout:
    settings = settings._replace(timeout_s=args.timeout)
  return settings


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  settings = settings_from(args)
  if args.worker:
    worker_main(args.worker, settings.channels, args.with_pmap)
    return {}
  import bnjax

  results = {
    "machine": machine(),
    "command": shlex.join(["python", "-m", "benchmarks.pod_scale", *argv]),
    "bnjax_source": bnjax_source(pathlib.Path(bnjax.__file__).resolve().parent),
    "settings": settings._asdict(),
    "measured": measure_all(settings),
    "model_channels": model_channels(),
  }
  results["fits"] = layer_fits(results["measured"])
  results["steps"] = step_totals(results["fits"], results["model_channels"])
  results["modelled_time"] = modelled_times(results["steps"])
  results["chips"] = {name: chip._asdict() for name, chip in CHIPS.items()}
  results["latency_s_assumed"] = LATENCY_S
  folder = output_folder(args)
  if args.quick and folder.resolve() == HERE:
    raise SystemExit("--quick would overwrite the committed results; give another --output-dir")
  text = "# Pod scale\n\n" + markdown_body(results, level=2)
  write_results(folder / "pod_scale.json", folder / "pod_scale.md", results, text)
  if folder == HERE:
    benchmarks_md = HERE.parent / "BENCHMARKS.md"
    document = with_section(benchmarks_md.read_text(), benchmarks_section(results))
    write_atomic(benchmarks_md, document.encode())
    print(f"Wrote its section into {benchmarks_md}")
  return results


if __name__ == "__main__":
  main()
