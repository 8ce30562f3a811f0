"""A run's files, in a local folder or in ``gs://BUCKET/PATH``, through ``etils.epath``.

epath (orbax's path library) reads, lists, renames and writes whole files on both,
for gs:// through TensorFlow's file system or gcsfs (``EPATH_USE_TF`` chooses;
nothing here sets it). What no library here does:

* ``write_atomic``: a kill leaves the old file or the new one (locally a temporary
  file, ``fsync``, ``os.replace``; a Cloud Storage upload is atomic by itself).
* ``Appender``: a file that grows without being rewritten. An object cannot grow,
  and TensorFlow's file system uploads the whole file again at each flush, which a
  TensorBoard writer does at every row: quadratic in the run's length. So each
  append uploads its bytes alone and ``compose``s them onto the object (server
  side, its generation as precondition): bounded work per row. google-cloud-storage
  does this, and the lease's conditional writes (``lock.py``): epath has no word.
* ``EventFile``: TensorBoard's format (tensorboard's ``RecordWriter`` and protocol
  buffers) on an ``Appender``. clu's writers send it through TensorFlow's file
  system, and importing any of them imports TensorFlow.
* ``metrics.jsonl``: one JSON object per row; a last line cut short by a kill
  during an append is left out, a damaged line elsewhere named.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from etils import epath

from experiments.common.errors import WorkdirError, first_line, warn

LOGIN_HINT = "run `gcloud auth application-default login` (a TPU VM uses its service account)"


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``epath.Path``: a local folder or ``gs://BUCKET/PATH``.

  Raises:
    WorkdirError: ``gs://`` without a bucket, or another scheme (``s3://`` would
      otherwise become a local folder named ``s3:``).
  """
  text = os.fspath(workdir)
  scheme, separator, rest = text.partition("://")
  if separator and scheme == "gs" and not rest.split("/")[0]:
    raise WorkdirError(f"{text!r} names no bucket: write gs://BUCKET/PATH")
  if separator and scheme.isidentifier() and scheme != "gs":
    raise WorkdirError(
      f"{text!r}: the scheme {scheme}:// is not supported; use a local folder or gs://BUCKET/PATH"
    )
  return epath.Path(text)


def is_gcs(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith("gs://")


@functools.cache
def _client():
  try:
    from google.cloud import storage
  except ImportError:
    raise WorkdirError(
      "a gs:// workdir needs google-cloud-storage: pip install -e '.[gcs]'"
    ) from None
  import google.auth.exceptions

  try:
    return storage.Client()  # an emulator's if STORAGE_EMULATOR_HOST is set
  except google.auth.exceptions.DefaultCredentialsError:
    raise WorkdirError(f"no Google Cloud credentials for gs:// paths; {LOGIN_HINT}") from None


def gcs_blob(path: str | os.PathLike):
  """The ``google.cloud.storage.Blob`` of ``gs://BUCKET/KEY``."""
  bucket, _, key = os.fspath(path).removeprefix("gs://").partition("/")
  return _client().bucket(bucket).blob(key)


def _write_durably(path, mode: str, data: bytes) -> None:
  with open(path, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def write_atomic(path: epath.Path, data: bytes) -> None:
  """Replaces ``path``'s content by ``data``: a reader or a kill sees the old content
  or the new, never a mix.

  Raises:
    WorkdirError: naming the path and why it cannot be written.
  """
  if is_gcs(path):
    return path.write_bytes(data)
  temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    _write_durably(temporary, "wb", data)  # mode 0666 & ~umask, as any new file
    os.replace(temporary, path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e


class Appender:
  """``path``, grown by ``write(data)``, each write durable when it returns: an
  ``fsync``'ed append locally, an upload and a ``compose`` on Cloud Storage."""

  def __init__(self, path: epath.Path):
    self.path, self._generation = path, None  # gs://: the object's, once known

  def write(self, data: bytes) -> None:
    if is_gcs(self.path):
      return self._compose(data)
    try:
      _write_durably(self.path, "ab", data)
    except OSError as e:
      raise WorkdirError(f"cannot append to {self.path}: {e.strerror or e}") from e

  def _compose(self, data: bytes) -> None:
    from google.api_core import exceptions as api

    target, piece = gcs_blob(self.path), gcs_blob(f"{self.path}.append-{uuid.uuid4().hex}")
    try:
      if self._generation is None:
        target.reload()
      piece.upload_from_string(data)
      try:
        target.compose([target, piece], if_generation_match=self._generation or target.generation)
      finally:
        piece.delete()
    except api.NotFound:  # the first row
      target.upload_from_string(data, if_generation_match=0)
    except api.PreconditionFailed:
      raise WorkdirError(f"{self.path} was changed by another run; stopping") from None
    except api.GoogleAPIError as e:
      raise WorkdirError(f"cannot append to {self.path}: {first_line(e)}") from e
    self._generation = target.generation

  def flush(self) -> None:  # tensorboard's RecordWriter calls these; each write is durable
    pass

  close = flush


class EventFile:
  """A TensorBoard event file ``events.out.tfevents.<time>.<host>.<pid>`` in ``logdir``,
  a record appended per call (see the module docstring)."""

  def __init__(self, logdir: epath.Path):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    name = f"events.out.tfevents.{int(time.time())}.{os.uname().nodename}.{os.getpid()}"
    self._event, self._records = event_pb2.Event, RecordWriter(Appender(logdir / name))
    self._add(self._event(file_version="brain.Event:2"))

  def _add(self, event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._add(self._event(step=step, summary=Summary(value=values)))

  def hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2

    self._add(self._event(step=0, summary=summary_v2.hparams_pb(dict(hparams))))


def _rows(path: epath.Path) -> tuple[list[dict], bool]:
  """The rows of a ``metrics.jsonl``, and whether a truncated last line was left out."""
  try:
    lines = path.read_text().split("\n")
  except FileNotFoundError:
    return [], False
  rows = []
  for number, line in enumerate(lines[:-1], start=1):
    try:
      rows.append(json.loads(line))
      assert isinstance(rows[-1]["step"], int)
    except Exception:  # noqa: BLE001 - not JSON, not an object, no integer step: all damage
      raise WorkdirError(
        f'{path}, line {number}: not a JSON object with an integer "step" ({line[:80]!r}); '
        "repair or delete that line"
      ) from None
  return rows, lines[-1] != ""  # a complete file ends with a newline


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl``, oldest first (a truncated last line left out)."""
  return _rows(workdir_path(workdir) / "metrics.jsonl")[0]


def keep_rows_up_to(path: epath.Path, step: int) -> None:
  """Keeps the rows of ``path`` up to ``step`` (a resumed run writes the later ones
  again) and drops a truncated last line, replacing the file atomically if it changes."""
  rows, truncated = _rows(path)
  kept = [row for row in rows if row["step"] <= step]
  if truncated:
    warn(f"{path}: dropped a truncated last line (a run was killed while writing it)")
  if truncated or len(kept) < len(rows):
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept).encode())
