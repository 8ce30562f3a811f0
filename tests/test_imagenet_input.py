"""The ImageNet input pipeline: a run resumed at any step reads the batches an
uninterrupted run reads, from either format TFDS prepares (ArrayRecord by index,
TFRecord by reading); the hosts' parts are disjoint and cover an epoch; images
leave the host as uint8 and the steps normalize them exactly as the float32 path
did on the host."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.imagenet import data, input_pipeline, random_access
from tests.imagenet_testing import prepare_tiny_imagenet

FORMATS = ("tfrecord", "array_record")
TRAIN_EXAMPLES = 24  # prepare_tiny_imagenet: 3 classes of 8


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
  """The same tiny archives prepared by TFDS in each format: ``{format: data_dir}``."""
  return {
    f: prepare_tiny_imagenet(tmp_path_factory.mktemp(f), num_val=13, file_format=f) for f in FORMATS
  }


def _source(tiny_imagenet, file_format: str) -> input_pipeline.TfdsSource:
  source = input_pipeline.TfdsSource.open(
    "imagenet2012",
    str(tiny_imagenet[file_format]),
    shuffle_buffer_size=8,
    photometric_distortion=0.5,
  )
  assert source.random_access == (file_format == "array_record")
  return source


def _take(batches, n: int) -> list[dict]:
  return [next(batches) for _ in range(n)]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# ---- the order of a random-access dataset, on records that are their own index -----------


def _stream(num_records: int, seed: int = 11):
  return random_access.shuffled_stream(
    np.arange(num_records),
    lambda position, record: {"position": np.int64(position), "record": np.int64(record)},
    seed=seed,
  )


def test_random_access_order_is_one_stream_split_by_host_and_resumes_anywhere():
  num_records, global_batch = 37, 8  # an epoch is 4.6 global batches: batches straddle epochs
  stream = _stream(num_records)
  single = _take(
    random_access.train_batches(
      stream, 0, global_batch_size=global_batch, process_index=0, process_count=1
    ),
    10,
  )
  positions = np.concatenate([b["position"] for b in single])
  np.testing.assert_array_equal(positions, np.arange(10 * global_batch))  # in stream order
  records = np.concatenate([b["record"] for b in single])
  epochs = records[:num_records], records[num_records : 2 * num_records]
  for epoch in epochs:  # each epoch is a permutation of all the records
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_records))
  assert not np.array_equal(*epochs)  # a new order every epoch
  assert not np.array_equal(epochs[0], np.arange(num_records))  # shuffled

  for process_count in (2, 4):
    local = global_batch // process_count
    for start in (0, 2, 4, 5, 9):  # the middle and the ends of epochs
      for p in range(process_count):
        resumed = random_access.train_batches(
          stream,
          start,
          global_batch_size=global_batch,
          process_index=p,
          process_count=process_count,
        )
        got = _take(resumed, 10 - start)
        want = [
          {k: v[p * local : (p + 1) * local] for k, v in batch.items()} for batch in single[start:]
        ]
        _assert_same_batches(got, want)  # host p's rows of the single host's batch


def test_random_access_order_depends_on_the_seed():
  def first(seed):
    batches = random_access.train_batches(
      _stream(37, seed), 0, global_batch_size=8, process_index=0, process_count=1
    )
    return next(batches)["record"]

  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


def test_padded_batches_hold_every_record_once_then_masked_padding():
  batches = list(
    random_access.padded_batches(
      np.arange(10, 15),
      lambda record: {"record": np.int64(record)},
      {"record": np.int64(-1)},
      num_batches=3,
      batch_size=2,
    )
  )
  records = np.concatenate([b["record"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(records, [10, 11, 12, 13, 14, -1])
  np.testing.assert_array_equal(mask, [True] * 5 + [False])


# ---- both formats, through TFDS ------------------------------------------------------------


@pytest.mark.parametrize("file_format", FORMATS)
def test_training_batches_resume_at_any_step_on_every_host(tiny_imagenet, file_format):
  source = _source(tiny_imagenet, file_format)
  process_count, global_batch = 2, 4
  hosts = [
    dict(
      global_batch_size=global_batch,
      image_size=32,
      seed=5,
      process_index=p,
      process_count=process_count,
    )
    for p in range(process_count)
  ]
  steps_per_epoch = source.split_plan(
    "train", global_batch_size=global_batch, process_count=process_count, train=True
  ).num_batches
  assert steps_per_epoch == TRAIN_EXAMPLES // global_batch == 6
  num_steps = steps_per_epoch + 3
  uninterrupted = [_take(source.train_batches(**host), num_steps) for host in hosts]
  for start in (3, steps_per_epoch - 1, steps_per_epoch + 1):  # mid-epoch, its end, the next
    for host, batches in zip(hosts, uninterrupted, strict=True):
      resumed = source.train_batches(start_step=start, **host)
      _assert_same_batches(_take(resumed, num_steps - start), batches[start:])

  first = uninterrupted[0][0]
  assert first["image"].dtype == np.uint8 and first["image"].shape == (2, 32, 32, 3)
  assert first["label"].dtype == np.int32
  # The hosts' parts of an epoch are disjoint and cover the split: every example
  # once (the labels of the 3 classes of 8), new crops the next epoch.
  epoch_labels = np.concatenate([b["label"] for h in uninterrupted for b in h[:steps_per_epoch]])
  np.testing.assert_array_equal(np.sort(epoch_labels), np.repeat([0, 1, 2], 8))
  assert not np.array_equal(first["image"], uninterrupted[0][steps_per_epoch]["image"])


def test_array_record_global_batches_are_the_same_on_any_number_of_hosts(tiny_imagenet):
  source = _source(tiny_imagenet, "array_record")
  common = dict(global_batch_size=6, image_size=32, seed=2)
  single = _take(source.train_batches(process_index=0, process_count=1, **common), 5)
  for process_count in (2, 3):
    parts = [
      _take(source.train_batches(process_index=p, process_count=process_count, **common), 5)
      for p in range(process_count)
    ]
    merged = [
      {k: np.concatenate([part[s][k] for part in parts]) for k in single[s]} for s in range(5)
    ]
    _assert_same_batches(merged, single)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_evaluation_batches_are_the_same_from_both_formats(tiny_imagenet, process_count):
  by_format = {}
  for file_format in FORMATS:
    source = _source(tiny_imagenet, file_format)
    by_format[file_format] = [
      source.eval_batches(
        global_batch_size=2 * process_count,
        image_size=32,
        process_index=p,
        process_count=process_count,
      )
      for p in range(process_count)
    ]
  for (plan_a, tfrecord), (plan_b, array_record) in zip(*by_format.values(), strict=True):
    assert plan_a == plan_b
    _assert_same_batches(list(array_record), list(tfrecord))


# ---- uint8 to the devices, normalized in the step --------------------------------------------


def test_uint8_normalized_in_a_jitted_step_equals_the_float32_host_path():
  pixels = np.arange(256 * 3, dtype=np.int64).reshape(256, 3) % 256  # every value, every channel
  pixels = np.stack([pixels, pixels[::-1]]).astype(np.uint8)  # [2, 256, 3]
  moments = data.IMAGENET_PIXELS
  # The float32 arithmetic the host did before (input_pipeline.normalize, data.normalize).
  mean, std = np.float32(moments.mean), np.float32(moments.std)
  host_float32 = (pixels.astype(np.float32) - mean) / std
  in_step = np.asarray(jax.jit(data.normalize, static_argnums=1)(pixels, moments))
  assert in_step.dtype == np.float32
  np.testing.assert_allclose(in_step, host_float32, rtol=2e-7, atol=1e-7)  # float rounding
  float64 = (pixels.astype(np.float64) - np.asarray(moments.mean)) / np.asarray(moments.std)
  np.testing.assert_allclose(in_step, float64, rtol=1e-6, atol=1e-6)
  assert pixels.nbytes * 4 == host_float32.nbytes  # what crossed to the devices before


def test_pipeline_pixels_are_the_float_pipeline_rounded(tiny_imagenet):
  """The uint8 the pipeline sends is the float32 image it sent before (unnormalized)
  rounded, and clipped where bicubic resizing overshoots [0, 255]."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  builder = input_pipeline.builder_for("imagenet2012", str(tiny_imagenet["tfrecord"]))
  examples = builder.as_dataset(
    split="validation", decoders={"image": tfds.decode.SkipDecoding()}
  ).take(4)
  for example in examples:
    resized = input_pipeline.decode_and_center_crop(example["image"], 32).numpy()
    sent = input_pipeline.preprocess_eval(example, image_size=32)["image"].numpy()
    assert sent.dtype == np.uint8
    np.testing.assert_array_equal(sent, np.clip(np.rint(resized), 0, 255))
    inside = (resized >= 0) & (resized <= 255)
    assert np.abs(sent[inside] - resized[inside]).max() <= 0.5
  halves = tf.constant([-3.2, 0.5, 1.5, 254.6, 301.0])  # rounded half to even, as np.rint
  np.testing.assert_array_equal(input_pipeline.to_pixels(halves).numpy(), [0, 0, 2, 255, 255])


# ---- TFRecord to ArrayRecord -------------------------------------------------------------------


def test_a_converted_tfrecord_folder_reads_as_the_one_prepared_as_array_record(
  tiny_imagenet, tmp_path
):
  from experiments.imagenet import to_array_record

  version_dir = to_array_record.convert(
    "imagenet2012", str(tiny_imagenet["tfrecord"]), str(tmp_path / "converted")
  )
  assert sorted(p.name for p in version_dir.iterdir() if ".array_record-" in p.name) == [
    "imagenet2012-train.array_record-00000-of-00001",
    "imagenet2012-validation.array_record-00000-of-00001",
  ]
  converted = input_pipeline.TfdsSource.open("imagenet2012", str(tmp_path / "converted"))
  prepared = input_pipeline.TfdsSource.open("imagenet2012", str(tiny_imagenet["array_record"]))
  assert converted.random_access
  common = dict(global_batch_size=4, image_size=32, seed=1, process_index=0, process_count=1)
  _assert_same_batches(
    _take(converted.train_batches(5, **common), 3), _take(prepared.train_batches(5, **common), 3)
  )
  with pytest.raises(data.DataError, match="no TFRecord-prepared imagenet2012"):
    to_array_record.convert("imagenet2012", str(tmp_path / "converted"), str(tmp_path / "again"))
