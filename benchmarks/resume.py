"""A resumed ImageNet run's time to its first training batch, by position in the epoch.

    python -m benchmarks.resume               # ~10 min on 2 CPU cores (data prepared once)
    python -m benchmarks.resume --quick       # seconds of timing, tiny data (tests)

Data: ``imagenet2012`` prepared by TFDS itself, in both formats it writes (TFRecord:
read sequentially by tf.data; ArrayRecord: read by index through grain), from the
same archives of random JPEGs about ImageNet's average size (``--sides``), and
Debian's Fashion-MNIST (the IDX source) when it is installed. For each reader and
each position (0%, 50% and 99% of an epoch) it times ``source.train_batches(start)``
up to its first batch, after one warm-up call (TensorFlow traces its graphs once per
process; the warm-up's time is reported apart), the median over ``--repeats``
interleaved rounds. Also: the batches per second that follow, and the bytes of a
batch's images (uint8, against the float32 the pipeline sent before).

The TFRecord reader's files are in the page cache here; from Cloud Storage its skip
costs more. Its reading rate while skipping is extrapolated to ImageNet's 140 GB
training split in the results.

Writes ``benchmarks/resume_results.json`` and ``benchmarks/resume_results.md`` (or
into ``--output_dir``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
IMAGENET_TRAIN_BYTES = 140e9  # TFDS's prepared imagenet2012 train split, about
POSITIONS = (0.0, 0.5, 0.99)  # of an epoch


def _first_batch_seconds(source, start_step: int, following: int, **batches) -> tuple[float, float]:
  """(seconds to the first batch from ``start_step``, batches per second of the next ones)."""
  started = time.perf_counter()
  iterator = source.train_batches(start_step, **batches)
  next(iterator)
  first = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(following):
    next(iterator)
  return first, following / (time.perf_counter() - started)


def _imagenet_sources(root: pathlib.Path, args) -> dict:
  from experiments.imagenet import input_pipeline
  from tests.imagenet_testing import prepare_tiny_imagenet

  sources = {}
  for name, file_format in (
    ("TFRecord (tf.data)", "tfrecord"),
    ("ArrayRecord (grain)", "array_record"),
  ):
    data_dir = root / file_format
    if not (data_dir / "imagenet2012").is_dir():
      prepare_tiny_imagenet(
        data_dir,
        train_per_class=args.examples_per_class,
        num_val=4,
        file_format=file_format,
        sides=tuple(args.sides),
      )
    sources[name] = input_pipeline.TfdsSource.open("imagenet2012", str(data_dir))
  return sources


def _cases(args, root: pathlib.Path) -> list[dict]:
  """One entry per reader: its source, batch settings and steps per epoch."""
  cases = []
  imagenet = dict(
    global_batch_size=args.batch_size,
    image_size=args.image_size,
    seed=0,
    process_index=0,
    process_count=1,
  )
  for name, source in _imagenet_sources(root, args).items():
    train = source.builder.info.splits["train"]
    cases.append(
      {
        "reader": name,
        "source": source,
        "batches": imagenet,
        "bytes_per_example": int(train.num_bytes) / train.num_examples,
      }
    )
  if FASHION_MNIST.is_dir() and not args.quick:
    from experiments.imagenet import idx_data

    source = idx_data.open_idx_source("fashion_mnist", str(FASHION_MNIST))
    cases.append(
      {
        "reader": "Fashion-MNIST IDX (NumPy)",
        "source": source,
        "batches": dict(imagenet, image_size=32),
      }
    )
  for case in cases:
    b = case["batches"]
    case["steps_per_epoch"] = (
      case["source"]
      .split_plan("train", global_batch_size=b["global_batch_size"], process_count=1, train=True)
      .num_batches
    )
  return cases


def measure(args) -> dict:
  with tempfile.TemporaryDirectory() as scratch:
    root = pathlib.Path(args.data_dir or scratch)
    started = time.perf_counter()
    cases = _cases(args, root)
    prepared = time.perf_counter() - started
    for case in cases:  # the warm-up: the first call in the process
      case["warm_up_s"], _ = _first_batch_seconds(case["source"], 0, 0, **case["batches"])
      case["starts"] = [
        min(int(f * case["steps_per_epoch"]), case["steps_per_epoch"] - 1) for f in POSITIONS
      ]
      case["first_batch_s"] = [[] for _ in POSITIONS]
      case["batches_per_s"] = [[] for _ in POSITIONS]
    for _ in range(args.repeats):  # interleaved rounds
      for case in cases:
        for i, start in enumerate(case["starts"]):
          first, rate = _first_batch_seconds(
            case["source"], start, args.following, **case["batches"]
          )
          case["first_batch_s"][i].append(first)
          case["batches_per_s"][i].append(rate)
    for case in cases:
      batch = next(case["source"].train_batches(0, **case["batches"]))
      case["image_bytes_uint8"] = int(batch["image"].nbytes)
      case["image_bytes_float32"] = int(batch["image"].size * 4)
      del case["source"]
  return {
    "settings": {
      "command": "python -m benchmarks.resume " + " ".join(sys.argv[1:]),
      "examples_per_class": args.examples_per_class,
      "train_examples": 3 * args.examples_per_class,
      "sides": args.sides,
      "batch_size": args.batch_size,
      "image_size": args.image_size,
      "repeats": args.repeats,
      "prepare_s": prepared,
      "machine": f"{platform.machine()}, {_cpus()} CPUs",
    },
    "cases": cases,
  }


def _cpus() -> int:
  import os

  return len(os.sched_getaffinity(0))


def _median(values: list[float]) -> float:
  return statistics.median(values)


def markdown(results: dict) -> str:
  s = results["settings"]
  lines = [
    "# A resumed run's time to its first training batch",
    "",
    f"`{s['command']}` ({s['machine']}). ImageNet-shaped data: imagenet2012 prepared by "
    f"TFDS in each format from the same {s['train_examples']} random JPEGs of "
    f"{s['sides'][0]}-{s['sides'][1]} px sides; global batch {s['batch_size']} at "
    f"{s['image_size']}x{s['image_size']}, one host. Seconds from `train_batches(start)` "
    f"to its first batch, median of {s['repeats']} interleaved rounds (min-max), after one "
    "warm-up call (its time apart: TensorFlow traces its graphs once per process).",
    "",
    "| reader | warm-up (s) | "
    + " | ".join(f"start at {f:.0%} of the epoch" for f in POSITIONS)
    + " | batches/s after |",
    "|---|---|" + "---|" * len(POSITIONS) + "---|",
  ]
  for case in results["cases"]:
    cells = [
      f"{_median(t):.2f} ({min(t):.2f}-{max(t):.2f}), step {start}"
      for t, start in zip(case["first_batch_s"], case["starts"], strict=True)
    ]
    rate = _median([r for rates in case["batches_per_s"] for r in rates])
    lines.append(
      f"| {case['reader']} | {case['warm_up_s']:.2f} | " + " | ".join(cells) + f" | {rate:.1f} |"
    )
  lines += ["", *_extrapolation(results), "", "Bytes of one batch's images, host to device:", ""]
  lines += ["| reader | uint8 (now) | float32 (before) |", "|---|---|---|"]
  for case in results["cases"]:
    lines.append(
      f"| {case['reader']} | {case['image_bytes_uint8']:,} | {case['image_bytes_float32']:,} |"
    )
  return "\n".join(lines) + "\n"


def _extrapolation(results: dict) -> list[str]:
  """The TFRecord reader's cost per skipped example, scaled to ImageNet."""
  for case in results["cases"]:
    if case["reader"].startswith("TFRecord"):
      first, last = _median(case["first_batch_s"][0]), _median(case["first_batch_s"][-1])
      skipped = case["starts"][-1] * results["settings"]["batch_size"]
      per_example = (last - first) / skipped
      if per_example <= 0:  # a tiny run: skipping cost less than the timing's noise
        return [
          "TFRecord: skipping cost no measurable time here (the first batch came no later "
          "at the last position than at the first): too few examples to extrapolate."
        ]
      rate = case["bytes_per_example"] / per_example  # bytes per second
      at_99 = 0.99 * IMAGENET_TRAIN_BYTES / rate
      return [
        f"TFRecord: a resume reads what it skips: {per_example * 1e6:.0f} us per example "
        f"here ({case['bytes_per_example'] / 1e3:.0f} KB each: {rate / 1e6:.0f} MB/s, from "
        f"the page cache). At that rate a resume at 99% of an ImageNet epoch (about "
        f"{IMAGENET_TRAIN_BYTES / 1e9:.0f} GB) reads {at_99 / 60:.1f} min before its first "
        f"step on one host, {at_99 / 60 / 4:.1f} min on 4 hosts (each skips its own part); "
        "more where the files come from Cloud Storage. ArrayRecord and IDX: the same wait "
        "at every position."
      ]
  return []


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples_per_class", type=int, default=1000)
  parser.add_argument("--sides", type=int, nargs=2, default=[180, 260])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--following", type=int, default=4, help="batches timed after the first")
  parser.add_argument("--data_dir", default=None, help="keep the prepared data here")
  parser.add_argument("--output_dir", default=str(HERE))
  parser.add_argument("--quick", action="store_true", help="tiny data, one round (tests)")
  args = parser.parse_args(argv)
  if args.quick:
    args.examples_per_class, args.sides, args.image_size, args.repeats = 8, [24, 40], 32, 1
    args.batch_size, args.following = 4, 1
  results = measure(args)
  out = pathlib.Path(args.output_dir)
  (out / "resume_results.json").write_text(json.dumps(results, indent=1) + "\n")
  (out / "resume_results.md").write_text(markdown(results))
  print(markdown(results))
  return results


if __name__ == "__main__":
  main()
