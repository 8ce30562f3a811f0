"""The training forward pass alone, bnjax against Flax's ``BatchNorm``, side by side.

    python -m benchmarks.forward            # about 20 seconds on 2 CPU cores
    python -m benchmarks.forward --quick    # tiny shapes, to check it runs (tests do)

Writes ``benchmarks/forward.json`` and ``benchmarks/forward.md`` (the committed
results), or into ``--output-dir``; a quick run writes into a temporary folder
unless given one. ``benchmarks.run`` measures the same forward pass among much else;
this one measures it alone, with more rounds, because its target is tight: bnjax's
training forward (exact statistics, the running statistics updated) no slower than
Flax's fast mode (one pass, inexact where ``|mean| >> std``), whose work is the same
reads and writes of ``x`` and nothing else.

The cases are ``benchmarks.run``'s three, each once as batch norm usually sees its
input (mean 1, std 2: both take their one pass) and the worst shape once more with
a large offset (mean 1000, std 2), where bnjax takes its second pass and stays
exact, and Flax's fast mode keeps one pass and loses digits of the variance.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import implementations as impls
from benchmarks.report import machine, ratio_text, write_results
from benchmarks.timing import ratio_summary, repeated

HERE = pathlib.Path(__file__).resolve().parent
CANDIDATES = ("bnjax", "flax_fast", "flax_exact")


def cases(quick: bool) -> list[tuple[str, tuple[int, ...], jnp.dtype, float]]:
  """``(label, shape, dtype, mean)`` of each input; its standard deviation is 2."""
  if quick:
    return [("(16, 32) float32", (16, 32), jnp.float32, 1.0)]
  return [
    ("(256, 4096) float32", (256, 4096), jnp.float32, 1.0),
    ("(32, 56, 56, 64) float32", (32, 56, 56, 64), jnp.float32, 1.0),
    ("(32, 56, 56, 64) bfloat16", (32, 56, 56, 64), jnp.bfloat16, 1.0),
    ("(256, 4096) float32, mean 1000", (256, 4096), jnp.float32, 1000.0),
  ]


def measure(quick: bool, rounds: int, repeats: int) -> list[dict]:
  results = []
  for label, shape, dtype, mean in cases(quick):
    x = (jax.random.normal(jax.random.key(0), shape) * 2 + mean).astype(dtype)
    scale, bias = jnp.full(shape[-1], 1.5), jnp.full(shape[-1], 0.1)
    calls = {
      name: functools.partial(impls.forward(impls.IMPLEMENTATIONS[name]), x, scale, bias)
      for name in CANDIDATES
    }
    times = repeated(calls, rounds=rounds, repeats=repeats)
    case = {
      "case": label,
      "seconds": {name: statistics.median(t) for name, t in times.items()},
      "vs_flax_fast": {name: ratio_summary(times[name], times["flax_fast"]) for name in CANDIDATES},
    }
    print(f"{label}: bnjax / Flax fast {case['vs_flax_fast']['bnjax']['median']:.3f}", flush=True)
    results.append(case)
  return results


def markdown(results: dict) -> str:
  m, settings = results["machine"], results["settings"]
  lines = [
    "# Training forward pass alone",
    "",
    "Written by `python -m benchmarks.forward`; see `benchmarks/forward.py` for the method.",
    "",
    f"{m['device']} ({m['backend']}), {m['date']}: jax {m['jax']}, bnjax {m['bnjax']}, "
    f"Python {m['python']}, {m['cpu_count']} CPUs, {m['platform']}.",
    f"Medians of {settings['rounds']} interleaved rounds, repeated {settings['repeats']} "
    "times; ratios are medians over the repeats, (min-max) across them. Lower is faster.",
    "",
    "| case | bnjax ms | Flax fast ms | Flax exact ms | bnjax / Flax fast "
    "| Flax exact / Flax fast |",
    "|---|---|---|---|---|---|",
  ]
  for case in results["cases"]:
    s, r = case["seconds"], case["vs_flax_fast"]
    lines.append(
      f"| {case['case']} | {1e3 * s['bnjax']:.3f} | {1e3 * s['flax_fast']:.3f} | "
      f"{1e3 * s['flax_exact']:.3f} | {ratio_text(r['bnjax'])} | {ratio_text(r['flax_exact'])} |"
    )
  lines += [
    "",
    "Every candidate returns `y` and its updated running statistics. With mean 1000,",
    "bnjax takes its exact second pass; Flax's fast mode keeps its one pass there and",
    "loses digits of the variance (`bnjax.stats` says how many).",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one tiny shape, few rounds")
  # --output-dir as benchmarks.run spells it; --output_dir works too.
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  if args.output_dir:
    output = pathlib.Path(args.output_dir)
  elif args.quick:
    output = pathlib.Path(tempfile.gettempdir()) / "bnjax-benchmarks-quick"
  else:
    output = HERE
  if args.quick and output.resolve() == HERE:
    parser.error("--quick would overwrite the full run's results; give another --output-dir")
  rounds = args.rounds or (3 if args.quick else 100)
  repeats = args.repeats or (1 if args.quick else 5)
  results = {
    "machine": machine(),
    "settings": {"quick": args.quick, "rounds": rounds, "repeats": repeats},
  }
  # Flax's BatchNorm mixes dtypes implicitly; the suite's strict mode would refuse it.
  with jax.numpy_dtype_promotion("standard"):
    results["cases"] = measure(args.quick, rounds, repeats)
  write_results(output / "forward.json", output / "forward.md", results, markdown(results))
  return results


if __name__ == "__main__":
  main()
