"""MNIST-format data: from TFDS, or from the four IDX files in a folder.

Everything is loaded into memory once (60,000 + 10,000 images of 28x28 bytes) and
kept as uint8 arrays; the training loop puts them on the device and samples
batches there by index.
"""

from __future__ import annotations

import socket

import numpy as np

from experiments.common import DataError as DataError
from experiments.idx import (  # noqa: F401 (re-exported: the reader is shared, experiments/idx.py)
  DATASETS,
  IMAGE_MAGIC,
  LABEL_MAGIC,
  NUM_CLASSES,
  OFFLINE_HINT,
  SPLITS,
  Dataset,
  find_idx_file,
  load_idx_folder,
  read_idx,
)


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
    images, labels = zip(*batches, strict=True)
    arrays[split] = (
      np.concatenate(images).astype(np.uint8).reshape(-1, 28, 28),
      np.concatenate(labels).astype(np.int32),
    )
  return Dataset(*arrays["train"], *arrays["test"])


def load_dataset(
  dataset: str, data_dir: str | None = None, tfds_data_dir: str | None = None
) -> Dataset:
  """The dataset named by the config: from ``data_dir`` if set, else from TFDS."""
  if dataset not in DATASETS:
    raise ValueError(f"config.dataset must be one of {DATASETS}, got {dataset!r}")
  if data_dir:
    return load_idx_folder(data_dir)
  return load_tfds(dataset, tfds_data_dir)
