"""A run's files, in a local folder or in ``gs://BUCKET/PATH``, through ``etils.epath``.

epath (orbax's own path library) reads, lists, renames and writes whole files on
both, through TensorFlow's file system or gcsfs for gs:// (``EPATH_USE_TF`` chooses;
nothing here sets it). What it cannot do, and no library here does, is in this file:

* ``write_atomic``: a kill leaves the old file or the new one. Locally a temporary
  file, ``fsync``, ``os.replace``; on Cloud Storage an upload is atomic by itself.
* ``Appender``: appending without rewriting. A Cloud Storage object cannot grow, and
  TensorFlow's file system re-uploads a whole file at each flush (quadratic in the
  run's length; TensorBoard writers flush at every row). So each append uploads the
  new bytes alone and composes them onto the object (``compose``, server side, with
  the object's generation as precondition): bounded work per row.
* ``EventFile``: TensorBoard's event format (tensorboard's ``RecordWriter`` and
  protocol buffers) over an ``Appender``. clu's writers would send the file through
  TensorFlow's file system (above), and importing any of them imports TensorFlow.
* ``read_metrics`` / ``keep_rows_up_to``: ``metrics.jsonl``, one JSON object per row.

google-cloud-storage does the two gs:// operations epath has no word for
(``compose``, and the lease's conditional writes in ``lock.py``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from etils import epath

from experiments.common.errors import NonFiniteError, WorkdirError, warn

GCS = "gs://"
LOGIN_HINT = "run `gcloud auth application-default login` (a TPU VM uses its service account)"


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``epath.Path``: a local folder or ``gs://BUCKET/PATH``.

  Raises:
    WorkdirError: ``gs://`` without a bucket, or another scheme (``s3://`` would
      otherwise become a local folder named ``s3:``).
  """
  text = os.fspath(workdir)
  if text.startswith(GCS) and not text[len(GCS) :].split("/")[0]:
    raise WorkdirError(f"{text!r} names no bucket: write gs://BUCKET/PATH")
  scheme, separator, _ = text.partition("://")
  if separator and scheme.isidentifier() and scheme != "gs":
    raise WorkdirError(
      f"{text!r}: the scheme {scheme}:// is not supported; use a local folder or gs://BUCKET/PATH"
    )
  return epath.Path(text)


def is_gcs(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(GCS)


@functools.cache
def _client(emulator: str | None):
  del emulator  # a cache key: the client reads STORAGE_EMULATOR_HOST when it is made
  try:
    from google.cloud import storage
  except ImportError:
    raise WorkdirError(
      "a gs:// workdir needs google-cloud-storage: pip install -e '.[gcs]'"
    ) from None
  import google.auth.exceptions

  try:
    return storage.Client()
  except google.auth.exceptions.DefaultCredentialsError:
    raise WorkdirError(f"no Google Cloud credentials for gs:// paths; {LOGIN_HINT}") from None


def gcs_blob(path: str | os.PathLike):
  """The ``google.cloud.storage.Blob`` of ``gs://BUCKET/KEY``."""
  bucket, _, key = os.fspath(path)[len(GCS) :].partition("/")
  return _client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(bucket).blob(key)


def gcs_call(path, doing: str, fn, *args, **kwargs):
  """``fn(*args, **kwargs)``, a Cloud Storage request about ``path``; its failure as
  one line saying what to do (a missing bucket, no access, no credentials).
  ``PreconditionFailed`` and a missing object (``NotFound``) pass through."""
  import google.auth.exceptions
  from google.api_core import exceptions as api

  try:
    return fn(*args, **kwargs)
  except api.PreconditionFailed:
    raise
  except api.NotFound as e:
    bucket = gcs_blob(path).bucket
    if _exists(bucket):
      raise
    raise WorkdirError(
      f"cannot {doing} {path}: the bucket gs://{bucket.name} does not exist (create it with "
      f"`gcloud storage buckets create gs://{bucket.name}`, or fix the path)"
    ) from e
  except (api.Forbidden, api.Unauthorized) as e:
    raise WorkdirError(f"cannot {doing} {path}: access denied ({e.code}); {LOGIN_HINT}") from e
  except google.auth.exceptions.GoogleAuthError as e:
    raise WorkdirError(f"cannot {doing} {path}: no usable credentials; {LOGIN_HINT}") from e
  except api.GoogleAPIError as e:
    raise WorkdirError(f"cannot {doing} {path}: {str(e).splitlines()[0][:300]}") from e


def _exists(bucket) -> bool:
  from google.api_core import exceptions as api

  try:
    return bucket.exists()
  except api.GoogleAPIError:
    return True  # cannot tell (no storage.buckets.get permission): the object is missing


def write_atomic(path: epath.Path, data: bytes) -> None:
  """Replaces ``path``'s content by ``data``: a reader or a kill sees the old content
  or the new, never a mix (see the module docstring).

  Raises:
    WorkdirError: naming the path and why it cannot be written.
  """
  if is_gcs(path):
    path.write_bytes(data)
    return
  temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(temporary, "wb") as f:  # mode 0666 & ~umask, as any new file
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e


def to_json(value: Any, **kwargs) -> str:
  """``json.dumps`` that refuses NaN and infinities (standard JSON has none)."""
  return json.dumps(value, allow_nan=False, **kwargs)


class Appender:
  """A file that grows by ``write(data)``, each write durable when it returns: an
  ``fsync``'ed append locally, an upload and a ``compose`` on Cloud Storage (the
  module docstring). The file-like object tensorboard's ``RecordWriter`` takes."""

  def __init__(self, path: epath.Path):
    self.path, self._generation = path, None  # gs://: the object's, once known

  def write(self, data: bytes) -> None:
    if is_gcs(self.path):
      self._compose(data)
      return
    try:
      with open(self.path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise WorkdirError(f"cannot append to {self.path}: {e.strerror or e}") from e

  def _compose(self, data: bytes) -> None:
    from google.api_core import exceptions as api

    target = gcs_blob(self.path)
    if self._generation is None:
      try:
        gcs_call(self.path, "read", target.reload)
        self._generation = target.generation
      except api.NotFound:
        gcs_call(self.path, "write", target.upload_from_string, data, if_generation_match=0)
        self._generation = target.generation
        return
    piece = gcs_blob(f"{self.path}.append-{uuid.uuid4().hex}")
    gcs_call(self.path, "write", piece.upload_from_string, data)
    try:
      gcs_call(
        self.path,
        "append to",
        target.compose,
        [target, piece],
        if_generation_match=self._generation,
      )
    except api.PreconditionFailed:
      raise WorkdirError(f"{self.path} was changed by another run; stopping") from None
    finally:
      gcs_call(self.path, "delete", piece.delete)
    self._generation = target.generation

  def flush(self) -> None:  # each write is durable already
    pass

  def close(self) -> None:
    pass


class EventFile:
  """A TensorBoard event file ``events.out.tfevents.<time>.<host>.<pid>`` in ``logdir``,
  one record appended per call (see the module docstring)."""

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
    from tensorboard.compat.proto import summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._add(self._event(step=step, summary=summary_pb2.Summary(value=values)))

  def hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2

    self._add(self._event(step=0, summary=summary_v2.hparams_pb(dict(hparams))))


def non_finite_error(step: int, row: Mapping[str, Any], where: str) -> NonFiniteError | None:
  """The ``NonFiniteError`` of a row holding NaN or infinite floats, or None."""
  bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
  if not bad:
    return None
  values = ", ".join(f"{k} = {row[k]}" for k in bad)
  return NonFiniteError(f"at step {step}, {values} is not finite; not written to {where}")


def _rows(path: epath.Path) -> tuple[list[dict], bool]:
  """The rows of a ``metrics.jsonl``, and whether a last line cut short by a kill
  during an append was left out (a complete file ends with a newline)."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return [], False
  lines = text.split("\n")
  rows = []
  for number, line in enumerate(lines[:-1], start=1):
    try:
      row = json.loads(line) if line.strip() else {"step": None}
    except ValueError:
      row = None
    if line.strip() and not (isinstance(row, dict) and isinstance(row.get("step"), int)):
      raise WorkdirError(
        f'{path}, line {number}: not a JSON object with an integer "step" ({line[:80]!r}); '
        "repair or delete that line"
      )
    rows += [row] if line.strip() else []
  return rows, lines[-1] != ""


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
    write_atomic(path, "".join(to_json(row) + "\n" for row in kept).encode())
