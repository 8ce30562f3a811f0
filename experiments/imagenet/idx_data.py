"""A folder of MNIST-format IDX files as the ImageNet experiment's dataset.

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/bn_x5.py \\
        --config.dataset=fashion_mnist --config.data_dir=/usr/share/datasets/fashion-mnist \\
        --config.num_classes=10 --config.image_size=32 --config.model=inception_tiny

(``python -m experiments.imagenet.figure3`` sets these fields on all six variants.)

``config.dataset`` is ``fashion_mnist`` or ``mnist`` and ``config.data_dir`` the
folder of the four IDX files (read by ``experiments.idx``, the reader the
MNIST experiment uses). The 60,000 training and 10,000 test images (28x28 gray
bytes) stay in memory; batches have the ImageNet pipeline's form and guarantees
(``sources.open_source`` chooses this source when the config has a ``data_dir``;
NumPy only, no TensorFlow):

* Geometry: the 28x28 image, resized by ``image_size / 32`` (bilinear, only when
  ``image_size`` > 32), is centred on a black ``image_size`` square (at 32: padded
  by 2 pixels, as LeNet-5's input) and its gray value copied to the 3 channels.
* Training augmentation: the ImageNet crop takes 8-100% of a photo's area; on a
  28x28 item that would cut most of it away, so the crop here is the one of
  small-image networks: a random ``image_size`` window of the square padded by
  ``image_size / 8`` pixels (a shift of up to 4 pixels at 32). Left-right flips for
  Fashion-MNIST (a mirrored shoe is a shoe), none for MNIST (a mirrored digit is
  not one). No photometric distortion (gray images; ``photometric_distortion`` is
  not used) and no shuffle buffer (every epoch is a full permutation of the split,
  ``shuffle_buffer`` is not used).
* Pixels are uint8 (a resize's output rounded); the steps normalize them with the
  training split's mean and standard deviation (``pixel_moments``: one value for
  all channels); the black padding is the background's value.
* Order: epoch ``e`` of host ``p`` is a permutation drawn from ``(seed, e, p)`` of
  the host's contiguous part of the training split, and the crops and flips of
  each batch from ``(seed, e, p, batch)``: a run restarted at step ``s`` sees the
  batches an uninterrupted run sees, without reading the skipped ones (its first
  batch comes as soon from any step: ``benchmarks/resume.py``).
* Evaluation: the whole test split, each image once, centred (no crop), each host
  its contiguous part, padded with masked-out zeros to the same number of batches.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from experiments import idx
from experiments.imagenet import data

DATASETS = idx.DATASETS  # ("mnist", "fashion_mnist")
FLIPPED = {"fashion_mnist": True, "mnist": False}  # left-right flips in training
SOURCE_SIZE = 28  # side of the IDX images
BASE_SIZE = 32  # image_size at which the 28x28 image is padded, not resized


class IdxSource(NamedTuple):
  """The dataset of an IDX folder, in memory: a ``data.Source``."""

  name: str  # config.dataset: "fashion_mnist" or "mnist"
  data_dir: pathlib.Path
  train_images: np.ndarray  # uint8 [60000, 28, 28]
  train_labels: np.ndarray  # int32 [60000]
  test_images: np.ndarray  # uint8 [10000, 28, 28]
  test_labels: np.ndarray  # int32 [10000]
  mean: float  # of the training pixels, in [0, 255]
  std: float
  num_classes: int = idx.NUM_CLASSES

  @property
  def pixel_moments(self) -> data.PixelMoments:
    """The training pixels' mean and standard deviation, the same for the 3 channels."""
    return data.PixelMoments((self.mean,) * 3, (self.std,) * 3)

  def split_plan(
    self, split: str, *, global_batch_size: int, process_count: int, train: bool
  ) -> data.Split:
    """As ``data.Source``'s, for ``split`` "train" or "validation" (the test split)."""
    images = self.train_images if split == data.TRAIN_SPLIT else self.test_images
    return data.split_plan(
      data.contiguous_counts(len(images), process_count),
      global_batch_size=global_batch_size,
      train=train,
      what=f"the training split of {self.data_dir}",
    )

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
    """This host's training batches from ``start_step`` on, without end.

    Yields:
      ``{"image": uint8 [B, S, S, 3], "label": int32 [B]}``, ``B`` the host's batch.
    """
    plan = self.split_plan(
      data.TRAIN_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=True
    )
    local = plan.local_batch_size
    first = data.host_bounds(len(self.train_images), process_count)[process_index]
    e, first_k = divmod(start_step, plan.num_batches)
    while True:
      rng = np.random.default_rng([seed, e, process_index])
      order = first + rng.permutation(plan.examples_per_host[process_index])
      for k in range(first_k, plan.num_batches):
        rows = order[k * local : (k + 1) * local]
        rng = np.random.default_rng([seed, e, process_index, k, 1])
        yield {
          "image": augmented(self, self.train_images[rows], image_size, rng),
          "label": self.train_labels[rows],
        }
      e, first_k = e + 1, 0

  def eval_batches(
    self, *, global_batch_size: int, image_size: int, process_index: int, process_count: int
  ) -> tuple[data.Split, Iterator[dict]]:
    """Every test image once, centred (no crop); the padding is masked-out zeros."""
    plan = self.split_plan(
      data.EVAL_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=False
    )
    bounds = data.host_bounds(len(self.test_images), process_count)

    def batches():
      for rows, mask in data.padded_rows(bounds[process_index], bounds[process_index + 1], plan):
        image = centred(self.test_images[rows], image_size)
        image[~mask] = 0
        label = np.where(mask, self.test_labels[rows], 0).astype(np.int32)
        yield {"image": image, "label": label, "mask": mask}

    return plan, batches()


def open_idx_source(dataset: str, data_dir: str | None) -> IdxSource:
  """The four IDX files of ``data_dir`` (``config.data_dir``), checked, as an ``IdxSource``.

  Raises:
    DataError: no ``data_dir``, an unknown ``dataset`` or missing or damaged files
      (one line naming the folder and how to install Debian's Fashion-MNIST).
  """
  if not data_dir:
    raise data.DataError(
      f"config.dataset={dataset!r} is read from a folder of IDX files: set "
      "--config.data_dir (`apt-get install dataset-fashion-mnist` puts "
      "Fashion-MNIST's in /usr/share/datasets/fashion-mnist)"
    )
  if dataset not in DATASETS:
    raise data.DataError(
      f"config.data_dir is a folder of IDX files, read for config.dataset in "
      f"{DATASETS}; got config.dataset={dataset!r}"
    )
  try:
    files = idx.load_idx_folder(data_dir)
  except idx.DataError as e:
    raise data.DataError(
      f"config.dataset={dataset!r}, config.data_dir={str(data_dir)!r}: {e}"
    ) from None
  mean, std = _pixel_moments(files.train_images)
  return IdxSource(
    name=dataset,
    data_dir=pathlib.Path(data_dir),
    train_images=files.train_images,
    train_labels=files.train_labels,
    test_images=files.test_images,
    test_labels=files.test_labels,
    mean=mean,
    std=std,
  )


def _pixel_moments(images: np.ndarray) -> tuple[float, float]:
  """Mean and (population) standard deviation of uint8 ``images``' pixels, in float64
  from their 256-bin histogram: the values of ``images.astype(np.float64)``'s
  ``mean()`` and ``std()`` without that array (376 MB for Fashion-MNIST's training
  split, seconds to fill). The histogram is counted 1,000 images at a time, since
  ``np.bincount`` widens its input to int64."""
  pixels = images.reshape(len(images), -1)
  counts = sum(
    np.bincount(pixels[i : i + 1000].reshape(-1), minlength=256)
    for i in range(0, len(pixels), 1000)
  ).astype(np.float64)
  values = np.arange(256, dtype=np.float64)
  mean = counts @ values / counts.sum()
  return float(mean), float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def _geometry(image_size: int) -> tuple[int, int]:
  """(side of the resized item, its margin on the black square)."""
  inner = round(SOURCE_SIZE * image_size / BASE_SIZE)
  return inner, (image_size - inner) // 2


def _resized(images: np.ndarray, inner: int) -> np.ndarray:
  """uint8 ``[B, 28, 28]`` -> float32 ``[B, inner, inner]`` in [0, 255] (bilinear, antialiased)."""
  if inner == SOURCE_SIZE:
    return images.astype(np.float32)
  import jax

  resized = jax.image.resize(
    images.astype(np.float32), (len(images), inner, inner), "linear", antialias=True
  )
  return np.clip(np.asarray(resized), 0.0, 255.0)


def _finish(squares: np.ndarray) -> np.ndarray:
  """float32 ``[B, S, S]`` in [0, 255] -> uint8 ``[B, S, S, 3]`` (rounded; exact at
  ``image_size`` 32, where nothing is resized)."""
  pixels = np.clip(np.rint(squares), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(np.broadcast_to(pixels[..., None], (*pixels.shape, 3)))


def centred(images: np.ndarray, image_size: int) -> np.ndarray:
  """The evaluation view: uint8 ``[B, 28, 28]`` -> uint8 ``[B, S, S, 3]``."""
  inner, margin = _geometry(image_size)
  squares = np.zeros((len(images), image_size, image_size), np.float32)
  squares[:, margin : margin + inner, margin : margin + inner] = _resized(images, inner)
  return _finish(squares)


def augmented(
  source: IdxSource, images: np.ndarray, image_size: int, rng: np.random.Generator
) -> np.ndarray:
  """The training view: a random shifted window (and flip, for Fashion-MNIST) of
  the padded square; uint8 ``[B, 28, 28]`` -> uint8 ``[B, S, S, 3]``."""
  inner, margin = _geometry(image_size)
  shift = image_size // 8
  side = image_size + 2 * shift
  padded = np.zeros((len(images), side, side), np.float32)
  start = margin + shift
  padded[:, start : start + inner, start : start + inner] = _resized(images, inner)
  offsets = rng.integers(0, 2 * shift + 1, size=(len(images), 2))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (image_size, image_size), axis=(1, 2))
  squares = windows[np.arange(len(images)), offsets[:, 0], offsets[:, 1]]
  if FLIPPED[source.name]:
    flip = rng.random(len(images)) < 0.5
    squares = np.where(flip[:, None, None], squares[:, :, ::-1], squares)
  return _finish(squares)
