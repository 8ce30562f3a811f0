"""MNIST-format IDX files: the reader shared by the experiments.

The four files of a folder (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``,
as Yann LeCun's MNIST and Zalando's Fashion-MNIST ship them; Debian's
``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist) are
read into uint8 arrays with numpy and gzip only, each checked against its header.
``experiments.mnist`` and ``experiments.imagenet`` (its ``idx_data`` source) use it.
"""

from __future__ import annotations

import gzip
import pathlib
import re
import zlib
from typing import NamedTuple

import numpy as np

from experiments.common.errors import DataError

DATASETS = ("mnist", "fashion_mnist")
SPLITS = {"train": "train", "test": "t10k"}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: 0x00000803 (3-D uint8), 0x00000801 (1-D uint8)
NUM_CLASSES = 10
OFFLINE_HINT = (
  "Offline, point --config.data_dir at a folder holding the four IDX files "
  "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
  "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). On Debian/Ubuntu, "
  "`apt-get install dataset-fashion-mnist` installs Fashion-MNIST's in "
  "/usr/share/datasets/fashion-mnist: --config.dataset=fashion_mnist "
  "--config.data_dir=/usr/share/datasets/fashion-mnist"
)


class Dataset(NamedTuple):
  """Images as uint8 ``[N, 28, 28]`` and labels as int32 ``[N]`` in 0..9."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def read_idx(path: str | pathlib.Path, *, expected_magic: int) -> np.ndarray:
  """Reads an IDX file (gzipped or not) of unsigned bytes into a uint8 array.

  The format: a big-endian int32 magic number ``0x0000080D`` (D = rank), D
  big-endian int32 sizes, then the values. Only uint8 data (type 0x08) is read.

  Raises:
    DataError: naming the file, for a wrong magic number, a truncated file or
      trailing bytes.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(
      f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'a file'}: {e}"
    ) from e
  if len(raw) < 4:
    raise DataError(f"{path}: truncated: {len(raw)} bytes, not even a magic number")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise DataError(
      f"{path}: magic number {magic:#010x}, expected {expected_magic:#010x} "
      f"({'images' if expected_magic == IMAGE_MAGIC else 'labels'}); is this the right file?"
    )
  rank = magic & 0xFF
  header = 4 + 4 * rank
  if len(raw) < header:
    raise DataError(f"{path}: truncated inside the header ({len(raw)} bytes)")
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise DataError(
      f"{path}: header says shape {shape} ({size} bytes of data) but the file holds "
      f"{len(raw) - header}; the file is {'truncated' if len(raw) - header < size else 'too long'}"
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_idx_file(data_dir: pathlib.Path, split: str, kind: str) -> pathlib.Path:
  """The IDX file of ``split`` ('train'/'test') and ``kind`` ('images'/'labels').

  Accepts the usual spellings: ``train-images-idx3-ubyte.gz``,
  ``train-images.idx3-ubyte``, with or without ``.gz``.
  """
  rank = 3 if kind == "images" else 1
  pattern = re.compile(rf"^{SPLITS[split]}-{kind}[-.]idx{rank}-ubyte(\.gz)?$")
  matches = (
    sorted(p for p in data_dir.iterdir() if pattern.match(p.name)) if data_dir.is_dir() else []
  )
  if not matches:
    raise DataError(
      f"no {split} {kind} file in {data_dir} (expected {SPLITS[split]}-{kind}-idx{rank}-ubyte.gz). "
      + OFFLINE_HINT
    )
  return matches[0]


def load_idx_folder(data_dir: str | pathlib.Path) -> Dataset:
  """Loads the four MNIST-format IDX files of ``data_dir``, validated."""
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f"data_dir {data_dir} is not a folder. " + OFFLINE_HINT)
  arrays = {}
  for split in SPLITS:
    images_path = find_idx_file(data_dir, split, "images")
    labels_path = find_idx_file(data_dir, split, "labels")
    images = read_idx(images_path, expected_magic=IMAGE_MAGIC)
    labels = read_idx(labels_path, expected_magic=LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise DataError(f"{images_path}: images of shape {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] == 0:
      raise DataError(f"{images_path}: holds no images")
    if labels.shape != (images.shape[0],):
      raise DataError(
        f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}"
      )
    if labels.size and labels.max() >= NUM_CLASSES:
      raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    arrays[split] = (images, labels.astype(np.int32))
  return Dataset(*arrays["train"], *arrays["test"])
