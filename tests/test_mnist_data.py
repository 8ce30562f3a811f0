"""The MNIST experiment's data: IDX files read and checked, and the TFDS path."""

import gzip

import numpy as np
import pytest

from experiments.mnist import input_pipeline
from tests.mnist_testing import make_idx_folder, striped_images, write_idx


def test_idx_folder_round_trip_in_both_spellings(tmp_path):
  make_idx_folder(tmp_path / "a", seed=1)
  make_idx_folder(
    tmp_path / "b",
    seed=1,
    names={"train": "train-{}.idx{}-ubyte.gz", "test": "t10k-{}.idx{}-ubyte.gz"},
  )
  a, b = (
    input_pipeline.load_idx_folder(tmp_path / "a"),
    input_pipeline.load_idx_folder(tmp_path / "b"),
  )
  assert a.train_images.dtype == np.uint8 and a.test_labels.dtype == np.int32
  written = striped_images(seed=1)
  want = (*written["train"], *written["test"])  # train images, labels, test images, labels
  for got in (a, b):
    assert len(got) == len(want) == 4
    for x, y in zip(got, want, strict=True):
      np.testing.assert_array_equal(x, y)
      assert x.shape == y.shape


def test_read_idx_uncompressed(tmp_path):
  write_idx(tmp_path / "x-idx1-ubyte", np.arange(7), gz=False)
  np.testing.assert_array_equal(
    input_pipeline.read_idx(tmp_path / "x-idx1-ubyte", expected_magic=2049), np.arange(7)
  )


@pytest.mark.parametrize(
  "corrupt, match",
  [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], r"magic number 0x00000801, expected 0x00000803"),
    (lambda raw: raw[:-10], r"header says shape \(600, 28, 28\).*truncated"),
    (lambda raw: raw + b"\x00", "too long"),
    (lambda raw: raw[:6], "truncated inside the header"),
  ],
)
def test_corrupted_idx_files_name_the_file(tmp_path, corrupt, match):
  folder = make_idx_folder(tmp_path)
  path = folder / "train-images-idx3-ubyte.gz"
  raw = gzip.open(path).read()
  with gzip.open(path, "wb") as f:
    f.write(corrupt(raw))
  with pytest.raises(input_pipeline.DataError, match=f"train-images-idx3-ubyte.gz: .*{match}"):
    input_pipeline.load_idx_folder(folder)


def test_labels_validated(tmp_path):
  folder = make_idx_folder(tmp_path)
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(200, 12))
  with pytest.raises(input_pipeline.DataError, match="label 12 outside 0..9"):
    input_pipeline.load_idx_folder(folder)
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(150))
  with pytest.raises(input_pipeline.DataError, match="150 labels for 200 images"):
    input_pipeline.load_idx_folder(folder)


def test_missing_file_says_how_to_get_the_data(tmp_path):
  folder = make_idx_folder(tmp_path)
  (folder / "t10k-images-idx3-ubyte.gz").unlink()
  with pytest.raises(
    input_pipeline.DataError, match="no test images file .*apt-get install dataset-fashion-mnist"
  ):
    input_pipeline.load_idx_folder(folder)


def test_tfds_pipeline_with_mock_data(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(input_pipeline, "internet_reachable", lambda: True)
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    data = input_pipeline.load_dataset("mnist", tfds_data_dir=str(tmp_path))
    # Reference: the same (deterministic) mock examples read through tfds.load itself.
    examples = {
      split: list(tfds.as_numpy(tfds.load("mnist", split=split, data_dir=str(tmp_path))))
      for split in ("train", "test")
    }
  assert data.train_images.dtype == np.uint8 and data.test_labels.dtype == np.int32
  for split, images, labels in (
    ("train", data.train_images, data.train_labels),
    ("test", data.test_images, data.test_labels),
  ):
    np.testing.assert_array_equal(images, np.stack([e["image"][..., 0] for e in examples[split]]))
    np.testing.assert_array_equal(labels, [e["label"] for e in examples[split]])
    assert images.shape == (24, 28, 28) and images.std() > 10  # random pixels, not a blank
  assert data.train_labels.min() >= 0 and data.train_labels.max() <= 9


def test_tfds_offline_fails_fast_with_the_alternative(monkeypatch, tmp_path):
  monkeypatch.setattr(input_pipeline, "internet_reachable", lambda: False)
  with pytest.raises(input_pipeline.DataError, match="no internet connection.*--config.data_dir"):
    input_pipeline.load_dataset("mnist", tfds_data_dir=str(tmp_path))


def test_corrupt_gzip_and_empty_files_are_data_errors(tmp_path):
  folder = make_idx_folder(tmp_path)
  path = folder / "train-images-idx3-ubyte.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[:20] + bytes(b ^ 0xFF for b in raw[20:200]) + raw[200:])
  with pytest.raises(input_pipeline.DataError, match="train-images-idx3-ubyte.gz: cannot be read"):
    input_pipeline.load_idx_folder(folder)
  folder = make_idx_folder(tmp_path / "empty", num_test=0)
  with pytest.raises(input_pipeline.DataError, match="t10k-images-idx3-ubyte.gz: holds no images"):
    input_pipeline.load_idx_folder(folder)
