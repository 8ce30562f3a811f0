"""Test data and small networks for the ImageNet experiment's tests.

* ``prepare_tiny_imagenet``: a real TFDS ``imagenet2012`` prepared by TFDS itself
  from tiny archives laid out as ImageNet's (the files the missing-data error
  asks for), as TFRecord or ArrayRecord: real JPEGs, real split slicing per host.
* ``write_mock_metadata``: the recipe of ``shared/NOTES.md`` for
  ``tfds.testing.mock_data``, whose imagenet2012 builder has no splits otherwise.
* ``MicroNet``: two convolutions with BN, for tests about devices and state where
  the network's size does not matter (it compiles in seconds).
* ``stop_after_saving``: for the runners (``tests.imagenet_runner``,
  ``tests.figure3_runner``), a run that stops at a checkpoint, to be killed there.
"""

from __future__ import annotations

import io
import pathlib
import tarfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

SYNSETS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2 of imagenet2012


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  import tensorflow as tf

  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(tf.constant(pixels)).numpy()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def write_imagenet_archives(
  manual_dir: pathlib.Path,
  *,
  train_per_class: int,
  num_val: int,
  seed: int = 0,
  sides: tuple[int, int] = (24, 80),
) -> None:
  """ILSVRC2012_img_train.tar (one tar per synset inside) and ILSVRC2012_img_val.tar,
  with random JPEGs of varying sizes (height and width drawn from ``[*sides)``)."""
  rng = np.random.default_rng(seed)

  def jpeg() -> bytes:
    return _jpeg(rng, int(rng.integers(*sides)), int(rng.integers(*sides)))

  manual_dir.mkdir(parents=True, exist_ok=True)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset in SYNSETS:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for k in range(train_per_class):
          _add(inner, f"{synset}_{k}.JPEG", jpeg())
      _add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as archive:
    for k in range(1, num_val + 1):
      _add(archive, f"ILSVRC2012_val_{k:08d}.JPEG", jpeg())


def prepare_tiny_imagenet(
  data_dir: pathlib.Path,
  *,
  train_per_class: int = 8,
  num_val: int = 13,
  file_format: str = "tfrecord",
  sides: tuple[int, int] = (24, 80),
) -> pathlib.Path:
  """``data_dir`` with imagenet2012 prepared by TFDS from tiny archives, in
  ``file_format`` ("tfrecord" or "array_record"; the same archives either way)."""
  import tensorflow_datasets as tfds

  manual = data_dir / "downloads" / "manual"
  write_imagenet_archives(manual, train_per_class=train_per_class, num_val=num_val, sides=sides)
  tfds.builder("imagenet2012", data_dir=str(data_dir)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)), file_format=file_format
  )
  return data_dir


def write_mock_metadata(data_dir: pathlib.Path, num_examples: int) -> pathlib.Path:
  """imagenet2012 metadata with ``num_examples`` in each split, for
  ``tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir)``."""
  import tensorflow_datasets as tfds

  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0)
        for name in ("train", "validation")
      ]
    )
  )
  version_dir = pathlib.Path(data_dir) / "imagenet2012" / str(builder.version)
  version_dir.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(str(version_dir))
  return pathlib.Path(data_dir)


class MicroNet(nn.Module):
  """conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU -> mean -> dense."""

  norm: Callable[..., nn.Module]
  num_classes: int = 1000

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(4, (3, 3), (2, 2), use_bias=False)(images)
    x = nn.relu(self.norm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(6, (3, 3), use_bias=False)(x)
    x = nn.relu(self.norm(use_running_average=not train, name="bn2")(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def micro_net(config, *, norm) -> MicroNet:
  """A ``create_model`` for ``train.prepare``."""
  return MicroNet(norm=norm, num_classes=config.num_classes)


def tiny_config(**overrides):
  """``configs/tiny.py`` with a constant learning rate and the fields given."""
  from experiments.imagenet.configs import tiny

  config = tiny.get_config()
  config.unlock()
  config.model = "resnet_tiny"
  config.base_batch_size = config.batch_size
  config.base_learning_rate = 0.1
  config.lr_schedule = "constant"
  config.warmup_epochs = 0.0
  config.update(overrides)
  return config


def stop_after_saving(announce: Callable[[object, int], str | None]) -> None:
  """Makes every ``experiments.common.Run.maybe_save`` stop the process where
  ``announce(run, step)`` gives a line: once that checkpoint is written whole, print
  the line and wait an hour, for the test to kill the process (an interrupted run)."""
  from experiments import common

  maybe_save = common.Run.maybe_save

  def save_then_wait(self, step, state):
    saved = maybe_save(self, step, state)
    line = announce(self, step) if saved else None
    if line is not None:
      self.wait_until_saved()
      print(line, flush=True)
      time.sleep(3600)
    return saved

  common.Run.maybe_save = save_then_wait
