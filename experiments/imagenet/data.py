"""The ImageNet experiment's data contract: one ``Source`` protocol, three sources.

    source = sources.open_source(config)    # picks the source, once (sources.py)
    source.num_classes
    source.pixel_moments                    # the steps normalize the uint8 images with it
    source.split_plan("train", global_batch_size=256, process_count=1, train=True)
    source.train_batches(start_step, global_batch_size=..., image_size=..., seed=...,
                         process_index=..., process_count=...)      # without end
    plan, batches = source.eval_batches(global_batch_size=..., image_size=...,
                                        process_index=..., process_count=...)

The sources:

* ``FakeSource`` (``config.fake_data``): synthetic random images, NumPy only.
* ``idx_data.IdxSource`` (``config.data_dir``, MNIST/Fashion-MNIST IDX files), NumPy only.
* ``input_pipeline.TfdsSource`` (the default: TFDS ``imagenet2012``, read by index
  through grain when prepared as ArrayRecord, through tf.data when TFRecord), the
  only one that imports TensorFlow.

Batches are host-local NumPy dicts: ``image`` uint8 ``[B, S, S, 3]`` (pixel values
0-255, a quarter of float32's bytes from host to device), ``label`` int32 ``[B]``, and
for evaluation ``mask`` bool ``[B]`` (False on the padding that gives every host the
same number of batches), with ``B`` the batch of this host (the global batch divided
by the number of hosts). Each source names its ``pixel_moments``; the jitted steps
normalize the images with them (``normalize``). Training batches are a function of
the seed and the step, so a run restarted at step ``s`` sees the batches an
uninterrupted run sees from step ``s``; evaluation scores every example once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np

from experiments import common
from experiments.imagenet.configs.default import (
  IMAGENET_TRAIN_IMAGES,
)  # what a fake run pretends to have

TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FAKE_NUM_CLASSES = 1000
FAKE_BATCHES = 2  # distinct synthetic training batches, cycled
TFDS_INSTALL = 'pip install -e ".[imagenet]"'


class DataError(common.DataError):
  """The data is missing or cannot feed this run; the message says what to do."""


class Split(NamedTuple):
  """How a split is divided among hosts and batches."""

  examples_per_host: tuple[int, ...]  # [process_count]: examples each host reads
  local_batch_size: int  # examples per batch on each host
  num_batches: int  # batches per host: per epoch (training) or per pass (evaluation)


class PixelMoments(NamedTuple):
  """Per-channel mean and standard deviation of a dataset's pixel values (0-255)."""

  mean: tuple[float, float, float]  # [3]: R, G, B
  std: tuple[float, float, float]  # [3]


IMAGENET_PIXELS = PixelMoments(MEAN_RGB, STDDEV_RGB)


class Source(Protocol):
  """What the training loop reads from a dataset (module docstring)."""

  num_classes: int
  pixel_moments: PixelMoments  # what the steps normalize the uint8 images with

  def split_plan(
    self, split: str, *, global_batch_size: int, process_count: int, train: bool
  ) -> Split: ...

  def train_batches(
    self,
    start_step: int = 0,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int,
    process_count: int,
  ) -> Iterator[dict]: ...

  def eval_batches(
    self, *, global_batch_size: int, image_size: int, process_index: int, process_count: int
  ) -> tuple[Split, Iterator[dict]]: ...


def host_bounds(num_examples: int, process_count: int) -> list[int]:
  """Where each host's contiguous part of a split begins (and the last one ends)."""
  return [num_examples * i // process_count for i in range(process_count + 1)]


def contiguous_counts(num_examples: int, process_count: int) -> tuple[int, ...]:
  """Examples of each host when the split is cut into ``process_count`` contiguous parts."""
  bounds = host_bounds(num_examples, process_count)
  return tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))


def split_plan(
  counts: tuple[int, ...], *, global_batch_size: int, train: bool, what: str = "the train split"
) -> Split:
  """Batches per host for a split of ``counts`` examples per host.

  Training drops each host's last partial batch of every epoch, and every host
  takes as many batches as the smallest part allows (hosts must step together).
  Evaluation takes as many batches as the largest part needs; the other hosts pad.

  Raises:
    DataError: a training split with fewer examples per host than a batch
      (``what`` names the split in the message).
  """
  process_count = len(counts)
  local = global_batch_size // process_count
  if train:
    num_batches = min(counts) // local
    if num_batches == 0:
      raise DataError(
        f"{what} has {min(counts)} examples on a host, fewer than the batch of "
        f"{local} per host (config.batch_size={global_batch_size}, "
        f"{process_count} hosts)"
      )
  else:
    num_batches = max(1, math.ceil(max(counts) / local))
  return Split(examples_per_host=tuple(counts), local_batch_size=local, num_batches=num_batches)


def normalize(images, moments: PixelMoments):
  """Pixels ``[..., 3]`` (uint8, or float in [0, 255]) to float32 with zero mean and
  unit variance per channel: ``(images - mean) / std`` in float32.

  The same arithmetic on a NumPy array (on the host) and on a ``jax.Array`` (in a
  jitted step, where the training and evaluation steps call it): the images travel
  to the devices as uint8.

  >>> normalize(np.array([[0, 124, 255]], np.uint8), PixelMoments((124.0,) * 3, (2.0,) * 3))
  array([[-62. ,   0. ,  65.5]], dtype=float32)
  """
  channels = (1,) * (images.ndim - 1) + (3,)  # explicit ranks (no implicit rank promotion)
  mean = np.asarray(moments.mean, np.float32).reshape(channels)
  std = np.asarray(moments.std, np.float32).reshape(channels)
  return (images.astype(np.float32) - mean) / std


def padded_rows(first: int, stop: int, plan: Split) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(rows, mask)`` of each of ``plan.num_batches`` evaluation batches of the host
  whose part is ``[first, stop)``; the padding rows repeat ``first`` and are masked out."""
  local = plan.local_batch_size
  for b in range(plan.num_batches):
    rows = np.arange(first + b * local, first + (b + 1) * local)
    mask = rows < stop
    yield np.where(mask, rows, first), mask


# ---- synthetic data ------------------------------------------------------------------------


class FakeSource(NamedTuple):
  """Synthetic random images (uniform pixels, uniform labels), for smoke runs and
  throughput: ``FAKE_BATCHES`` training batches cycled (step ``s`` uses batch
  ``s % FAKE_BATCHES``) and a validation split of ``num_eval_examples``. Example
  ``i`` is a function of ``(seed, i)`` alone, so the global batch is the same
  whatever the number of hosts: each host makes its rows of it."""

  num_eval_examples: int
  seed: int = 0  # of the validation images (training batches take the seed they are given)
  num_classes: int = FAKE_NUM_CLASSES
  num_train_examples: int = IMAGENET_TRAIN_IMAGES
  pixel_moments: PixelMoments = IMAGENET_PIXELS

  def split_plan(
    self, split: str, *, global_batch_size: int, process_count: int, train: bool
  ) -> Split:
    total = self.num_train_examples if split == TRAIN_SPLIT else self.num_eval_examples
    return split_plan(
      contiguous_counts(total, process_count),
      global_batch_size=global_batch_size,
      train=train,
      what=f"the fake {split} split",
    )

  def examples(self, rows: np.ndarray, *, seed: int, image_size: int) -> dict:
    """Examples ``rows`` (int ``[B]``): ``image`` uint8 ``[B, S, S, 3]``, ``label``
    int32 ``[B]``."""
    images, labels = [], []
    for row in rows:
      rng = np.random.default_rng([seed, 1, int(row)])
      images.append(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
      labels.append(rng.integers(0, self.num_classes))
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

  def train_batches(
    self,
    start_step: int = 0,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int,
    process_count: int,
  ) -> Iterator[dict]:
    local = global_batch_size // process_count
    fixed = [
      self.examples(
        np.arange(local) + b * global_batch_size + process_index * local,
        seed=seed,
        image_size=image_size,
      )
      for b in range(FAKE_BATCHES)
    ]
    step = start_step
    while True:
      yield fixed[step % FAKE_BATCHES]
      step += 1

  def eval_batches(
    self, *, global_batch_size: int, image_size: int, process_index: int, process_count: int
  ) -> tuple[Split, Iterator[dict]]:
    plan = self.split_plan(
      EVAL_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=False
    )
    bounds = host_bounds(self.num_eval_examples, process_count)

    def batches():
      offset = 10**9  # validation rows: a stream apart from the training rows
      for rows, mask in padded_rows(bounds[process_index], bounds[process_index + 1], plan):
        batch = self.examples(rows + offset, seed=self.seed, image_size=image_size)
        batch["image"][~mask] = 0
        batch["label"][~mask] = 0
        yield {**batch, "mask": mask}

    return plan, batches()
