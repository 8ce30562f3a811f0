"""The TFDS source (``data.Source``): ``imagenet2012`` as TFDS prepared it, ArrayRecord
or TFRecord; the only module of the experiment that imports TensorFlow.

Training examples get the Inception-style augmentation: a random crop of 8% to 100%
of the image's area and aspect ratio 3/4 to 4/3 (Szegedy et al., 2015), decoded
from the JPEG bytes together with the crop (``tf.image.decode_and_crop_jpeg``: only
the crop is decompressed), resized to ``image_size``, randomly flipped. Evaluation
takes the central square of 87.5% of the shorter side (224 of 256), decoded fused
with the crop the same way. Optional photometric distortions (brightness,
saturation, hue, contrast: tf-slim's Inception preprocessing, scaled by a factor).
Images leave as uint8 (the resized pixels rounded, and clipped where bicubic
resizing overshoots [0, 255]); the steps normalize them with ImageNet's per-channel
mean and standard deviation (``data.IMAGENET_PIXELS``).

How a split is read depends on the format TFDS prepared it in (``file_format``):

* ArrayRecord (random access: ``builder.as_data_source``; preferred when the folder
  has it): the order of ``random_access.py``, one shuffled stream of the whole split
  for all hosts, each host its rows of every global batch. Resuming at step ``s``
  reads from step ``s``: the first batch comes as soon at any step.
* TFRecord (sequential: ``builder.as_dataset``, tf.data): each host reads its own
  part (``tfds.split_for_jax_process``), shuffled at up to three levels per epoch:
  the shard files' order, the interleaving of 16 shards and, when
  ``shuffle_buffer_size`` > 0, a shuffle buffer of examples, so that the examples
  stored together in a shard do not always meet in a batch (the paper's
  within-shard shuffling, Section 4.2.1). A file of records has no index: to resume
  at step ``s`` it reads (without decoding) the examples of the current epoch up to
  step ``s``, up to an epoch of the host's part. ``tfds convert_format`` adds the
  ArrayRecord files beside them (the ImageNet README says how).

Either way everything random is a function of the seed, the epoch, the host and the
example's position, so a restarted run at step ``s`` sees exactly the batches an
uninterrupted run sees from step ``s``; no iterator state is saved. The two formats
give different orders (a run keeps the format it started with).

Evaluation scores every example of the split exactly once, whatever the batch size
and the number of hosts: each host reads its part (``tfds.split_for_jax_process``)
in order, pads it to the same number of batches, and a ``mask`` marks the padding,
which the metrics leave out; both formats give the same batches.

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

from experiments.imagenet import data, random_access
from experiments.imagenet.data import (
  EVAL_SPLIT,
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


def _stream_seeds(seed: int) -> tuple[int, int]:
  """Two independent seeds of the random-access order: permutations, crops."""
  permutations, crops = np.random.SeedSequence([seed, 1]).generate_state(2)
  return int(permutations) // 2, int(crops) // 2  # below 2**31, as both consumers take


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


def to_pixels(image: tf.Tensor) -> tf.Tensor:
  """float pixels in [0, 255] (a resize's output) to uint8: rounded, clipped to [0, 255]."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


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
  host's epoch (TFRecord) or of the stream (ArrayRecord); the randomness is a
  function of ``(crop_seed, index)``. ``image``: uint8 ``[S, S, 3]``."""
  key = tf.stack([tf.cast(crop_seed, tf.int64), tf.constant(0, tf.int64)])
  seeds = tf.random.experimental.stateless_split(
    tf.random.experimental.stateless_fold_in(key, index), 6
  )
  image = decode_and_random_crop(example["image"], seeds[0], image_size)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if photometric_distortion > 0:
    image = distort_color(image, seeds[2:], photometric_distortion)
  return {"image": to_pixels(image), "label": tf.cast(example["label"], tf.int32)}


def preprocess_eval(
  example: dict, *, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> dict:
  return {
    "image": to_pixels(decode_and_center_crop(example["image"], image_size, crop_fraction)),
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
      "image": tf.zeros([image_size, image_size, 3], tf.uint8),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False),
    }
  ).repeat()
  ds = ds.concatenate(padding).take(plan.num_batches * plan.local_batch_size)
  return ds.batch(plan.local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _padding(image_size: int) -> dict:
  """The example that fills the last evaluation batches (masked out)."""
  return {"image": np.zeros([image_size, image_size, 3], np.uint8), "label": np.int32(0)}


@functools.cache
def _graph_train(image_size: int, photometric_distortion: float):
  """``preprocess_train`` as one TensorFlow graph, for the random-access reader's
  threads: ``(index, image_bytes, label, crop_seed) -> {"image", "label"}``."""
  scalar = functools.partial(tf.TensorSpec, [])
  return _traced(
    lambda index, image, label, crop_seed: preprocess_train(
      index,
      {"image": image, "label": label},
      crop_seed=crop_seed,
      image_size=image_size,
      photometric_distortion=photometric_distortion,
    ),
    [scalar(tf.int64), scalar(tf.string), scalar(tf.int64), scalar(tf.int64)],
  )


@functools.cache
def _graph_eval(image_size: int, crop_fraction: float):
  """``preprocess_eval`` as one TensorFlow graph: ``(image_bytes, label) -> example``."""
  scalar = functools.partial(tf.TensorSpec, [])
  return _traced(
    lambda image, label: preprocess_eval(
      {"image": image, "label": label}, image_size=image_size, crop_fraction=crop_fraction
    ),
    [scalar(tf.string), scalar(tf.int64)],
  )


def _traced(function, signature: list[tf.TensorSpec]):
  """``function`` as a TensorFlow graph, traced once now (the reader's threads would
  otherwise each trace it at their first call)."""
  graph = tf.function(function, input_signature=signature)
  graph.get_concrete_function()
  return graph


def _numpy(example: dict) -> dict:
  return {k: v.numpy() for k, v in example.items() if k != "mask"}


class TfdsSource(NamedTuple):
  """A TFDS dataset with ``train`` and ``validation`` splits: a ``data.Source``.

  ``shuffle_buffer_size``: examples in each host's shuffle buffer (TFRecord only;
  0: the shards' order and interleaving only); ``photometric_distortion``: strength
  of ``distort_color`` (0: none); ``crop_fraction``: of the evaluation's central crop.
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

  @property
  def pixel_moments(self) -> data.PixelMoments:
    return data.IMAGENET_PIXELS

  @property
  def random_access(self) -> bool:
    """Whether the prepared files are ArrayRecord (read by index), not TFRecord."""
    return self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD

  def _records(self, split: str):
    """The examples of ``split`` (a TFDS split name, sliced or not) by index, the
    images as JPEG bytes."""
    return self.builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})

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
    """This host's training batches from step ``start_step`` on, without end; the
    batches of steps ``s, s+1, ...`` are the same whatever ``start_step`` the
    iteration began at (module docstring: the order of each format).

    Yields:
      ``{"image": uint8 [B, S, S, 3], "label": int32 [B]}``, ``B`` the host's batch.
    """
    if not self.random_access:
      plan = self.split_plan(
        TRAIN_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=True
      )
      split = tfds.split_for_jax_process(
        TRAIN_SPLIT, process_index=process_index, process_count=process_count
      )
      return self._sequential_train_batches(
        start_step, plan, split, image_size=image_size, seed=seed, process_index=process_index
      )
    permutation_seed, crop_seed = _stream_seeds(seed)
    preprocess = _graph_train(image_size, self.photometric_distortion)

    def make_example(position: int, record: dict) -> dict:
      return _numpy(preprocess(position, record["image"], record["label"], crop_seed))

    stream = random_access.shuffled_stream(
      self._records(TRAIN_SPLIT), make_example, seed=permutation_seed
    )
    return random_access.train_batches(
      stream,
      start_step,
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
    )

  def _sequential_train_batches(
    self,
    start_step: int,
    plan: Split,
    split: str,
    *,
    image_size: int,
    seed: int,
    process_index: int,
  ) -> Iterator[dict]:
    """TFRecord: epoch ``e`` reads the host's ``split`` in an order drawn from
    ``(seed, e, process_index)``, from step ``start_step`` on (reading, not
    decoding, the examples of the epoch before it)."""
    local = plan.local_batch_size
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
    """This host's evaluation batches of the validation split: every example once,
    in order (the same batches from either format).

    Returns:
      ``(plan, batches)``: ``plan.num_batches`` batches ``{"image": uint8 [B, S, S, 3],
      "label": int32 [B], "mask": bool [B]}``, the same number on every host, ``mask``
      False on the padding that fills them.
    """
    plan = self.split_plan(
      EVAL_SPLIT, global_batch_size=global_batch_size, process_count=process_count, train=False
    )
    split = tfds.split_for_jax_process(
      EVAL_SPLIT, process_index=process_index, process_count=process_count
    )
    if self.random_access:
      preprocess = _graph_eval(image_size, self.crop_fraction)
      batches = random_access.padded_batches(
        self._records(split),
        lambda record: _numpy(preprocess(record["image"], record["label"])),
        _padding(image_size),
        num_batches=plan.num_batches,
        batch_size=plan.local_batch_size,
      )
      return plan, batches
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
