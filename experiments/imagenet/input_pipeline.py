"""The TFDS source (``data.Source``): ``imagenet2012`` through tf.data; the only module
of the experiment that imports TensorFlow.

Training examples get the Inception-style augmentation: a random crop of 8% to 100%
of the image's area and aspect ratio 3/4 to 4/3 (Szegedy et al., 2015), decoded
from the JPEG bytes together with the crop (``tf.image.decode_and_crop_jpeg``: only
the crop is decompressed), resized to ``image_size``, randomly flipped. Evaluation
takes the central square of 87.5% of the shorter side (224 of 256), decoded fused
with the crop the same way. Optional photometric distortions (brightness,
saturation, hue, contrast: tf-slim's Inception preprocessing, scaled by a factor).
Pixels are normalized per channel with ImageNet's mean and standard deviation.

Each host reads its own part of each split (``tfds.split_for_jax_process``). The
training order is shuffled at up to three levels: the shard files' order, the
interleaving of 16 shards and, when ``shuffle_buffer_size`` > 0, a shuffle buffer
of examples, so that the examples stored together in a shard do not always meet in
a batch (the paper's within-shard shuffling, Section 4.2.1). Everything random is a
function of the seed, the epoch, the host and the example's position, so a restarted
run at step ``s`` sees
exactly the batches an uninterrupted run sees from step ``s``; to get there it reads
(without decoding) the examples of the current epoch that it skips.

Evaluation scores every example of the split exactly once, whatever the batch size
and the number of hosts: each host pads its part to the same number of batches,
and a ``mask`` marks the padding, which the metrics leave out.

Batches have the form ``data.py`` describes.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.imagenet import data
from experiments.imagenet.data import (
  EVAL_SPLIT,
  MEAN_RGB,
  STDDEV_RGB,
  TRAIN_SPLIT,
  DataError,
  Split,
)

EVAL_CROP_FRACTION = 224 / 256  # default: the central crop's side over the shorter side
AREA_RANGE = (0.08, 1.0)  # of the random training crop, as a fraction of the image
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # then the central crop
FILES_INTERLEAVED = 16


def _shuffle_seeds(seed: int, epoch: int, process_index: int) -> np.ndarray:
  """Three independent int32 seeds for one host's epoch: files, buffer, crops."""
  return np.random.SeedSequence([seed, epoch, process_index]).generate_state(3).astype(np.int64) % (
    2**31 - 1
  )


# ---- the data on disk --------------------------------------------------------------


def builder_for(dataset: str, data_dir: str | None):
  """The TFDS builder of ``dataset``, with both splits prepared in ``data_dir``.

  Raises:
    DataError: an unknown dataset, or one not prepared there (the message says
      where to put ImageNet's files and how TFDS prepares them).
  """
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
      f"config.dataset={dataset!r} is not a TFDS dataset ({str(e).splitlines()[0]})"
    ) from None
  missing = [s for s in (TRAIN_SPLIT, EVAL_SPLIT) if s not in builder.info.splits]
  if missing:
    raise DataError(missing_data_message(builder, missing))
  return builder


def missing_data_message(builder: tfds.core.DatasetBuilder, missing: list[str]) -> str:
  """What to do when TFDS has not prepared ``missing`` splits of the dataset."""
  root = pathlib.Path(builder.data_dir).parents[1]
  manual = root / "downloads" / "manual"
  where = f"TFDS {builder.name} has no prepared {'/'.join(missing)} split in {builder.data_dir}"
  if builder.name == "imagenet2012":
    how = (
      "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
      "(from https://image-net.org/download-images) "
      f"in {manual}, then prepare them once (about 150 GB, hours): "
      'python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('imagenet2012', data_dir='{root}').download_and_prepare(download_config="
      f"tfds.download.DownloadConfig(manual_dir='{manual}'))\""
    )
  else:
    how = (
      f"prepare it with tfds.builder('{builder.name}', data_dir='{root}').download_and_prepare()"
    )
  return (
    f"{where}: {how}; or set --config.tfds_data_dir to a folder (or gs:// bucket) where it is "
    "prepared, "
    "or --config.fake_data=True for synthetic data"
  )


# ---- preprocessing -----------------------------------------------------------------


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8 or float pixels in [0, 255] to float32, zero mean and unit variance per channel."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bicubic resize to ``[image_size, image_size, 3]`` float32 (as the Flax example)."""
  return tf.image.resize(image, [image_size, image_size], method=tf.image.ResizeMethod.BICUBIC)


def decode_and_center_crop(
  image_bytes: tf.Tensor, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> tf.Tensor:
  """The central square of ``crop_fraction`` of the shorter side, decoded from the
  JPEG with the crop, resized: float32 ``[image_size, image_size, 3]``."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  crop = tf.maximum(
    tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32), 1
  )
  window = tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])
  return _resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size)


def decode_and_random_crop(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """Inception-style random crop decoded fused with the crop, resized: float32
  ``[image_size, image_size, 3]``. ``seed``: int ``[2]`` (stateless). If no crop
  within ``CROP_ATTEMPTS`` fits the ranges, the central crop instead."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=seed,
    min_object_covered=0.1,
    aspect_ratio_range=ASPECT_RATIO_RANGE,
    area_range=AREA_RANGE,
    max_attempts=CROP_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))  # the sampler returned the whole image
  return tf.cond(
    failed,
    lambda: decode_and_center_crop(image_bytes, image_size),
    lambda: _resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size),
  )


def distort_color(image: tf.Tensor, seeds: tf.Tensor, strength: float) -> tf.Tensor:
  """Random brightness, saturation, hue and contrast, in that order, at ``strength``
  times tf-slim's Inception amounts (brightness +-32/255, saturation and contrast
  x[0.5, 1.5], hue +-0.2); ``image`` float in [0, 255], ``seeds`` int ``[4, 2]``."""
  image = image / 255.0
  image = tf.image.stateless_random_brightness(image, 32.0 / 255.0 * strength, seeds[0])
  image = tf.image.stateless_random_saturation(
    image, 1 - 0.5 * strength, 1 + 0.5 * strength, seeds[1]
  )
  image = tf.image.stateless_random_hue(image, min(0.2 * strength, 0.5), seeds[2])
  image = tf.image.stateless_random_contrast(
    image, 1 - 0.5 * strength, 1 + 0.5 * strength, seeds[3]
  )
  return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def preprocess_train(
  index: tf.Tensor,
  example: dict,
  *,
  crop_seed: int,
  image_size: int,
  photometric_distortion: float = 0.0,
) -> dict:
  """Random crop, flip (and color distortion) of the ``index``-th example of a
  host's epoch; the randomness is a function of ``(crop_seed, index)``."""
  seeds = tf.random.experimental.stateless_split(
    tf.random.experimental.stateless_fold_in(tf.constant([crop_seed, 0], tf.int64), index), 6
  )
  image = decode_and_random_crop(example["image"], seeds[0], image_size)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if photometric_distortion > 0:
    image = distort_color(image, seeds[2:], photometric_distortion)
  return {"image": normalize(image), "label": tf.cast(example["label"], tf.int32)}


def preprocess_eval(
  example: dict, *, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> dict:
  return {
    "image": normalize(decode_and_center_crop(example["image"], image_size, crop_fraction)),
    "label": tf.cast(example["label"], tf.int32),
    "mask": tf.constant(True),
  }


# ---- datasets ----------------------------------------------------------------------


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # the order is a function of the seeds (restarts)
  options.threading.private_threadpool_size = 0
  options.autotune.enabled = True
  return options


def _padded(ds: tf.data.Dataset, plan: Split, image_size: int) -> tf.data.Dataset:
  """``ds`` followed by masked-out zeros, cut to exactly ``plan.num_batches`` batches."""
  padding = tf.data.Dataset.from_tensors(
    {
      "image": tf.zeros([image_size, image_size, 3], tf.float32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False),
    }
  ).repeat()
  ds = ds.concatenate(padding).take(plan.num_batches * plan.local_batch_size)
  return ds.batch(plan.local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class TfdsSource(NamedTuple):
  """A TFDS dataset with ``train`` and ``validation`` splits: a ``data.Source``.

  ``shuffle_buffer_size``: examples in each host's shuffle buffer (0: the shards'
  order and interleaving only); ``photometric_distortion``: strength of
  ``distort_color`` (0: none); ``crop_fraction``: of the evaluation's central crop.
  """

  builder: tfds.core.DatasetBuilder
  shuffle_buffer_size: int = 0
  photometric_distortion: float = 0.0
  crop_fraction: float = EVAL_CROP_FRACTION

  @classmethod
  def open(cls, dataset: str, data_dir: str | None, **options) -> TfdsSource:
    """``builder_for(dataset, data_dir)`` with the pipeline's ``options`` (the fields)."""
    return cls(builder_for(dataset, data_dir), **options)

  @property
  def num_classes(self) -> int:
    return self.builder.info.features["label"].num_classes

  def split_plan(
    self, split: str, *, global_batch_size: int, process_count: int, train: bool
  ) -> Split:
    """``data.split_plan`` of the parts ``tfds.split_for_jax_process`` gives each host."""
    counts = tuple(
      self.builder.info.splits[
        tfds.split_for_jax_process(split, process_index=i, process_count=process_count)
      ].num_examples
      for i in range(process_count)
    )
    return data.split_plan(
      counts, global_batch_size=global_batch_size, train=train, what=f"the {split} split"
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
    """This host's training batches from step ``start_step`` on, without end.

    Epoch ``e`` reads the host's part of the split in an order drawn from
    ``(seed, e, process_index)``; the batches of steps ``s, s+1, ...`` are the same
    whatever ``start_step`` the iteration began at.

    Yields:
      ``{"image": float32 [B, S, S, 3], "label": int32 [B]}``, ``B`` the host's batch.
    """
    plan = self.split_plan(
      TRAIN_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=True
    )
    local = plan.local_batch_size
    split = tfds.split_for_jax_process(
      TRAIN_SPLIT, process_index=process_index, process_count=process_count
    )
    preprocess = functools.partial(
      preprocess_train, image_size=image_size, photometric_distortion=self.photometric_distortion
    )

    def epoch(e: int, skip_batches: int) -> tf.data.Dataset:
      files_seed, buffer_seed, crop_seed = (int(s) for s in _shuffle_seeds(seed, e, process_index))
      read_config = tfds.ReadConfig(
        shuffle_seed=files_seed, interleave_cycle_length=FILES_INTERLEAVED, options=_options()
      )
      ds = self.builder.as_dataset(
        split=split,
        shuffle_files=True,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
      )
      if self.shuffle_buffer_size > 0:
        ds = ds.shuffle(self.shuffle_buffer_size, seed=buffer_seed)
      ds = ds.take(plan.num_batches * local).enumerate()
      ds = ds.skip(skip_batches * local)  # read, not decoded
      ds = ds.map(
        functools.partial(preprocess, crop_seed=crop_seed), num_parallel_calls=tf.data.AUTOTUNE
      )
      return ds.batch(local, drop_remainder=True)

    e, skip = divmod(start_step, plan.num_batches)
    while True:  # one tf.data pipeline per epoch (its shuffle buffer refills at the start)
      yield from epoch(e, skip).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
      e, skip = e + 1, 0

  def eval_batches(
    self, *, global_batch_size: int, image_size: int, process_index: int, process_count: int
  ) -> tuple[Split, Iterator[dict]]:
    """This host's evaluation batches of the validation split: every example once.

    Returns:
      ``(plan, batches)``: ``plan.num_batches`` batches ``{"image": float32 [B, S, S, 3],
      "label": int32 [B], "mask": bool [B]}``, the same number on every host, ``mask``
      False on the padding that fills them.
    """
    plan = self.split_plan(
      EVAL_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=False
    )
    split = tfds.split_for_jax_process(
      EVAL_SPLIT, process_index=process_index, process_count=process_count
    )
    ds = self.builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(options=_options()),
    )
    ds = ds.map(
      functools.partial(preprocess_eval, image_size=image_size, crop_fraction=self.crop_fraction),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    return plan, _padded(ds, plan, image_size).as_numpy_iterator()
