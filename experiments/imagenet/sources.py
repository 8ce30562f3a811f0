"""Choosing the ImageNet experiment's data source, once: fake data, a folder of IDX
files (``idx_data``) or TFDS (``input_pipeline``, the only source that imports
TensorFlow, and only when it is asked for). Each implements ``data.Source``."""

from __future__ import annotations

from experiments.imagenet import idx_data
from experiments.imagenet.data import TFDS_INSTALL, DataError, FakeSource, Source


def open_source(config) -> Source:
  """The source ``config`` asks for: fake data, a folder of IDX files, or TFDS.

  Raises:
    DataError: missing data, or TFDS asked for without TensorFlow installed (one
      line naming the extra to install).
  """
  if config.fake_data:
    # 2.5 batches of synthetic "validation images": the last batch padded, as a real split's.
    return FakeSource(num_eval_examples=config.eval_batch_size * 5 // 2, seed=config.seed)
  if config.get("data_dir") or config.dataset in idx_data.DATASETS:
    return idx_data.open_idx_source(config.dataset, config.get("data_dir"))
  try:
    from experiments.imagenet import input_pipeline
  except ImportError as e:
    raise DataError(
      f"config.dataset={config.dataset!r} is read through TFDS, which needs TensorFlow "
      f"({e}): {TFDS_INSTALL}; or --config.fake_data=True for synthetic data"
    ) from None
  return input_pipeline.TfdsSource.open(
    config.dataset,
    config.tfds_data_dir,
    shuffle_buffer_size=config.shuffle_buffer,
    photometric_distortion=float(config.photometric_distortion),
    crop_fraction=float(config.eval_crop_fraction),
  )
