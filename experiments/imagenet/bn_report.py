"""The start-up lines on batch norm: what each layer's statistics cover in this run.

``bnjax.describe`` traces the training step on the first batch (no compile, no
run) and the run says, before compiling, which devices and how many examples
each BN statistic spans, whether the running statistics stay replicated, and what
the exchange costs a step: the check that the layout (``jit`` with a sharded batch,
or ``pmap``) and ``config.bn_group_size`` / ``bn_virtual_batch_size`` give the
statistics the config means (algorithmic-efficiency #848, timm #45).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import jax

import bnjax


def announce(run_step: Callable, state, batches: Iterator[dict]) -> Iterator[dict]:
  """Says ``bnjax.describe``'s summary of ``run_step(state, first batch)``; returns
  ``batches`` as they were (the first one put back)."""
  first = next(batches)
  report = bnjax.describe(run_step, state, first)
  for line in report.summary().splitlines():
    if jax.process_index() == 0:  # the others run the same loop silently
      print(f"batch norm: {line}", flush=True)
  return itertools.chain([first], batches)
