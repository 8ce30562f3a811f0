"""A TFRecord-prepared TFDS dataset copied as ArrayRecord, for resumes that read nothing
they skip (``input_pipeline.py``; ``benchmarks/resume_results.md``).

    python -m experiments.imagenet.to_array_record \\
        --from_dir=gs://BUCKET/tensorflow_datasets --to_dir=/mnt/disks/data/tensorflow_datasets

Every shard file of every split is copied record for record, in order (example
``i`` of a split is the same in both folders), and the metadata with its file
format set to ArrayRecord; then ``--config.tfds_data_dir=TO_DIR`` reads by index.
For ImageNet it reads and writes the prepared 150 GB once, nothing is decoded.

Why not TFDS's own ``tfds convert_format``: in TFDS 4.9.10 it imports apache-beam
even when it does not use Beam (and apache-beam holds protobuf below 7, which
tensorflow-metadata 1.21, and so TFDS, needs); converting in place records
ArrayRecord as an alternative format that TFDS's ``as_data_source`` then does not
offer; and converting into another folder fails its own shard count, which looks
for the new shards in the old folder. (Measured 2026-12: the Python call with
``fail_on_error=False`` and apache-beam importable does give a folder that reads.)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags
from array_record.python import array_record_module
from etils import epath

from experiments.imagenet import data

SHARDS_AT_ONCE = 8  # shard files copied in parallel


def convert(dataset: str, from_dir: str, to_dir: str) -> epath.Path:
  """Copies ``dataset`` prepared as TFRecord in ``from_dir`` into ``to_dir`` as ArrayRecord.

  Returns:
    The new version folder (``to_dir/<dataset>/<version>``).

  Raises:
    DataError: ``dataset`` is not prepared as TFRecord in ``from_dir``.
  """
  builder = tfds.builder(dataset, data_dir=from_dir)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD or not builder.info.splits:
    raise data.DataError(
      f"{from_dir} has no TFRecord-prepared {dataset} (its format: {builder.info.file_format}); "
      "prepare it first, or point --from_dir at the folder that holds it"
    )
  source = epath.Path(builder.data_dir)
  target = epath.Path(to_dir) / builder.info.full_name
  target.mkdir(parents=True, exist_ok=True)
  shards = [path for split in builder.info.splits.values() for path in split.filepaths]
  with concurrent.futures.ThreadPoolExecutor(SHARDS_AT_ONCE) as pool:
    list(pool.map(lambda path: _copy_shard(path, target), shards))
  for path in source.iterdir():  # the metadata: the info, the features, the label names
    if not path.name.startswith(f"{builder.name}-"):
      (target / path.name).write_bytes(path.read_bytes())
  info = json.loads((source / "dataset_info.json").read_text())
  info["fileFormat"] = tfds.core.FileFormat.ARRAY_RECORD.value
  info.pop("alternativeFileFormats", None)
  (target / "dataset_info.json").write_text(json.dumps(info, indent=2))
  return target


def _copy_shard(path: epath.Path, target: epath.Path) -> None:
  """One TFRecord shard's records, in order, into ``target`` as its ArrayRecord
  namesake (``-train.tfrecord-00000-of-01024`` -> ``-train.array_record-00000-of-01024``)."""
  name = path.name.replace(".tfrecord-", ".array_record-")
  writer = array_record_module.ArrayRecordWriter(os.fspath(target / name), "group_size:1")
  for record in tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator():
    writer.write(record)
  writer.close()


FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "imagenet2012", "the TFDS dataset")
flags.DEFINE_string("from_dir", None, "the TFDS data dir holding it as TFRecord", required=True)
flags.DEFINE_string("to_dir", None, "the TFDS data dir to write it into", required=True)


def main(argv) -> None:
  del argv
  try:
    target = convert(FLAGS.dataset, FLAGS.from_dir, FLAGS.to_dir)
  except data.DataError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {target}: pass --config.tfds_data_dir={FLAGS.to_dir}")


if __name__ == "__main__":
  app.run(main)
