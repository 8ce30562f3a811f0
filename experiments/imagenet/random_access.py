"""The training order of a random-access dataset, and its batches through grain.

A dataset prepared as ArrayRecord (``tfds.data_source``, ``builder.as_data_source``)
is a sequence: example ``i`` is read without reading the ones before it. So the
order of training can be a function of ``(seed, position)`` alone, and a run
resumed at step ``s`` starts reading at step ``s``: no iterator state to save,
nothing skipped to read (``benchmarks/resume.py`` measures it). This module does
not import TensorFlow: the caller passes the function that makes an example.

The order (one stream for all hosts):

* Position ``t`` of the stream (``t = 0, 1, ...``) holds example
  ``permutation_e(t mod N)`` of the ``N`` examples, ``e = t // N`` the epoch: a new
  permutation every epoch, drawn from ``(seed, e)`` (grain's ``shuffle``: an index
  shuffle, computed per position; no permutation is ever stored).
* Global batch ``s`` is positions ``[s * G, (s + 1) * G)``; host ``p`` of ``P`` holds
  its rows ``[s * G + p * B, s * G + (p + 1) * B)``, ``B = G / P``. So the hosts'
  parts are disjoint, each epoch covers every example once, and the global batch is
  the same whatever the number of hosts (a batch may straddle two epochs).
* The example at position ``t`` is made by ``make_example(t, record)``: its
  randomness (crops, flips) is a function of ``t``, hence of the seed and the step.

Why grain: its ``MapDataset`` is this index arithmetic (``shuffle`` reseeded per
epoch, ``repeat``, ``map``), and ``to_iter_dataset`` reads and makes the examples on
a pool of threads, ahead of the training step (grain's ``ReadOptions``). What is
ours is the layout of hosts and steps over the stream, above.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

READ_THREADS = 16  # grain's default: examples read and made in parallel
PREFETCH_BATCHES = 2  # examples made ahead: this many batches' worth


def shuffled_stream(
  records: Sequence, make_example: Callable[[int, object], dict], *, seed: int
) -> grain.MapDataset:
  """Position ``t`` -> ``make_example(t, records[permutation_e(t mod N)])``, without end.

  Args:
    records: the ``N`` examples (anything with ``len`` and ``[i]``).
    make_example: ``(position, record) -> dict`` of NumPy values.
    seed: of the permutations (each epoch ``e`` uses ``seed + e``, in ``[0, 2**32)``).
  """
  return grain.MapDataset.source(records).shuffle(seed=seed).repeat().map_with_index(make_example)


def host_position(row: int, *, global_batch_size: int, process_index: int, process_count: int):
  """The stream position of this host's ``row``-th example (row ``row % B`` of step
  ``row // B``, ``B`` the host's batch).

  >>> [host_position(r, global_batch_size=4, process_index=1, process_count=2) for r in range(4)]
  [2, 3, 6, 7]
  """
  local = global_batch_size // process_count
  step, j = divmod(row, local)
  return step * global_batch_size + process_index * local + j


def train_batches(
  stream: grain.MapDataset,
  start_step: int,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict]:
  """This host's batches of ``stream`` from step ``start_step`` on, without end:
  ``{name: [B, ...]}``, ``B = global_batch_size / process_count``. The first one is
  read as soon at any ``start_step``."""
  local = global_batch_size // process_count
  where = dict(
    global_batch_size=global_batch_size, process_index=process_index, process_count=process_count
  )
  rows = grain.MapDataset.range(start_step * local, sys.maxsize)
  examples = rows.map(lambda row: stream[host_position(row, **where)])
  return iter(_read(examples, local).batch(local, drop_remainder=True))


def padded_batches(
  records: Sequence,
  make_example: Callable[[object], dict],
  padding: dict,
  *,
  num_batches: int,
  batch_size: int,
) -> Iterator[dict]:
  """``num_batches`` batches of ``records`` in order, each example once, then
  ``padding``: ``{name: [batch_size, ...], "mask": bool [batch_size]}``, ``mask``
  False on the padding."""

  def example(i: int) -> dict:
    if i < len(records):
      return {**make_example(records[i]), "mask": np.True_}
    return {**padding, "mask": np.False_}

  examples = grain.MapDataset.range(num_batches * batch_size).map(example)
  return iter(_read(examples, batch_size).batch(batch_size))


def _read(examples: grain.MapDataset, batch_size: int) -> grain.IterDataset:
  """``examples`` made on ``READ_THREADS`` threads, ``PREFETCH_BATCHES`` batches ahead."""
  buffer = max(PREFETCH_BATCHES * batch_size, READ_THREADS)  # grain warns below its threads
  options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=buffer)
  return examples.to_iter_dataset(options)
