"""What every benchmark writes: the machine it ran on, and its results as JSON and
Markdown."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import jax

import bnjax
from experiments.common.files import write_atomic


def machine() -> dict:
  """The machine and versions a run measured, for its report."""
  device = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "bnjax": bnjax.__version__,
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
  }


def ratio_text(ratio: dict) -> str:
  """A ``benchmarks.timing.ratio_summary`` as the tables print it: median (min-max)."""
  return f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"


def write_results(
  json_path: pathlib.Path, markdown_path: pathlib.Path, results: dict, text: str
) -> None:
  """``results`` as JSON and ``text`` as Markdown, each written atomically (their
  folders created), and a line saying where."""
  for path, content in ((json_path, json.dumps(results, indent=2) + "\n"), (markdown_path, text)):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, content.encode())
  print(f"Wrote {json_path} and {markdown_path}")
