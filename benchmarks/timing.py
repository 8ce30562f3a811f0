"""Interleaved timing: every candidate measured in the same rounds, medians kept.

On a shared 2-core CPU, timings of memory-bound ops on 25 MB tensors move by 2x
between runs; measured in alternation, their *ratios* are stable. So: compile
and warm up every candidate, then run rounds in which each candidate is called once,
and keep each candidate's median. Each round's order is shuffled (seeded): rotating
a fixed order would give each candidate the same predecessor in every round, and
what a call leaves in the caches is part of the next one's time (two copies of
one program, rotated with a third, measured 6% apart). The whole measurement is
repeated, and the spread of the repeats is reported with the ratios.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping

import jax


def time_call(fn: Callable[[], object]) -> float:
  """Seconds for one call, waiting for the device to finish."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved_medians(
  candidates: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 2
) -> dict[str, float]:
  """Median seconds per call of each candidate over ``rounds`` interleaved rounds."""
  names = list(candidates)
  for _ in range(warmup):
    for name in names:
      time_call(candidates[name])
  samples = {name: [] for name in names}
  shuffled = random.Random(0)
  for _ in range(rounds):
    order = shuffled.sample(names, len(names))
    for name in order:
      samples[name].append(time_call(candidates[name]))
  return {name: statistics.median(times) for name, times in samples.items()}


def repeated(candidates, *, rounds: int, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
  """``interleaved_medians`` repeated ``repeats`` times: name -> list of medians."""
  results = {name: [] for name in candidates}
  for _ in range(repeats):
    medians = interleaved_medians(candidates, rounds=rounds, warmup=warmup)
    for name, value in medians.items():
      results[name].append(value)
  return results


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict[str, float]:
  """Median, min and max over repeats of the per-repeat ratio."""
  ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
  return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
