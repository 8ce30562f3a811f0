"""TensorBoard summaries of a run, in its workdir (local or ``gs://``).

``summary_writer(workdir, primary=...)`` gives an object with clu's writer methods
(``write_scalars(step, {name: value})``, ``write_hparams(dict)``, ``flush()``,
``close()``):

* local workdir: clu's ``create_default_writer`` (TensorFlow's event writer), as
  the Flax examples use;
* ``gs://`` workdir: ``EventFileWriter`` below, which writes the same TensorBoard
  event file format (TFRecord framing, ``Event`` protocol buffers from the
  ``tensorboard`` package) and uploads the whole file through
  ``experiments.common.storage`` at every ``flush`` (each ``write_scalars``
  flushes), so it needs neither TensorFlow's file system (which ignores
  ``STORAGE_EMULATOR_HOST``) nor local disk. ``tensorboard --logdir gs://BUCKET/PATH``
  reads it.
* not the primary process (``jax.process_index() > 0``): clu's logging writer
  (nothing is written to the workdir).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from experiments.common import storage


def _masked_crc32c(data: bytes) -> int:
  import google_crc32c

  crc = google_crc32c.value(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  length = struct.pack("<Q", len(data))
  return (
    length
    + struct.pack("<I", _masked_crc32c(length))
    + data
    + struct.pack("<I", _masked_crc32c(data))
  )


class EventFileWriter:
  """A TensorBoard event file at ``logdir/events.out.tfevents.<time>.<host>.<pid>``,
  written through the storage layer (see the module docstring)."""

  def __init__(self, logdir: storage.AnyPath):
    from tensorboard.compat.proto import event_pb2

    self._event_pb2 = event_pb2
    self.path = (
      logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.bnjax"
    )
    self._records = [
      tfrecord(
        event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
      )
    ]
    self._dirty = True

  def _add(self, step: int, summary) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._records.append(tfrecord(event.SerializeToString()))
    self._dirty = True

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    from tensorboard.compat.proto import summary_pb2

    self._add(
      step,
      summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
      ),
    )
    self.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2

    self._add(0, summary_v2.hparams_pb(dict(hparams)))
    self.flush()

  def flush(self) -> None:
    if self._dirty:
      storage.write_bytes(self.path, b"".join(self._records))
      self._dirty = False

  def close(self) -> None:
    self.flush()


def summary_writer(workdir, *, primary: bool):
  """The run's summary writer (see the module docstring)."""
  path = storage.as_path(workdir)
  if primary and storage.is_gcs(path):
    return EventFileWriter(path)
  from clu import metric_writers  # imports TensorFlow, as the Flax examples do

  return metric_writers.create_default_writer(str(path), just_logging=not primary)
