"""MNIST-format data: from TFDS, or from the four IDX files in a folder.

Everything is loaded into memory once (60,000 + 10,000 images of 28x28 bytes) and
kept as uint8 arrays; the training loop puts them on the device and samples
batches there by index.
"""

from __future__ import annotations

import gzip
import pathlib
import re
import socket
import zlib
from typing import NamedTuple

import numpy as np

from experiments.common import DataError as DataError

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
    raise DataError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'a file'}: {e}") from e
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
  matches = sorted(p for p in data_dir.iterdir() if pattern.match(p.name)) if data_dir.is_dir() else []
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


def internet_reachable(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
  """Whether TFDS's download host answers: offline, TFDS retries for minutes."""
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def load_tfds(name: str, tfds_data_dir: str | None = None) -> Dataset:
  """Loads ``name`` through TensorFlow Datasets (downloading it if needed)."""
  try:
    import tensorflow_datasets as tfds  # Heavy (TensorFlow); only on this path.
  except ImportError as e:
    raise DataError(
        f"reading '{name}' through TFDS needs TensorFlow Datasets ({e}): pip install -e \".[tfds]\". "
        + OFFLINE_HINT
    ) from e

  builder = tfds.builder(name, data_dir=tfds_data_dir)
  if not builder.is_prepared() and not internet_reachable():
    raise DataError(
        f"'{name}' is not in TFDS's data_dir ({builder.data_dir!s}) and there is no "
        "internet connection to download it. " + OFFLINE_HINT
    )
  try:
    builder.download_and_prepare()
  except Exception as e:  # TFDS raises many kinds; all mean "no data".
    raise DataError(
        f"TFDS could not prepare '{name}' in {builder.data_dir!s} ({type(e).__name__}: "
        f"{str(e)[:300]}). Without internet TFDS cannot download it. " + OFFLINE_HINT
    ) from e
  arrays = {}
  for split in SPLITS:
    batches = tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True).batch(10_000))
    images, labels = zip(*batches)
    arrays[split] = (
        np.concatenate(images).astype(np.uint8).reshape(-1, 28, 28),
        np.concatenate(labels).astype(np.int32),
    )
  return Dataset(*arrays["train"], *arrays["test"])


def load_dataset(dataset: str, data_dir: str | None = None, tfds_data_dir: str | None = None) -> Dataset:
  """The dataset named by the config: from ``data_dir`` if set, else from TFDS."""
  if dataset not in DATASETS:
    raise ValueError(f"config.dataset must be one of {DATASETS}, got {dataset!r}")
  if data_dir:
    return load_idx_folder(data_dir)
  return load_tfds(dataset, tfds_data_dir)
