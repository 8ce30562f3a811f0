"""Where a run's files live: a local folder, or a Cloud Storage bucket (``gs://``).

``as_path(workdir)`` gives the path object the bookkeeping uses: a ``pathlib.Path``
for a local folder (everything behaves as it always did) or a ``GcsPath`` for
``gs://BUCKET/PATH``, which offers the same small part of pathlib's API
(``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``,
``rglob("*")``, ``open("rb")``, ``read_bytes``, ``read_text``, ``unlink``,
``relative_to``). The operations that differ in kind go through functions here:
``write_bytes`` (local: temporary file, ``fsync``, ``os.replace``; GCS: one upload,
which creates the object whole or not at all), ``append_text``, ``rename_tree``,
``remove_tree``, ``lexists``.

Which client does what on ``gs://``:

* The bookkeeping (config, metrics, lease, checksums, summaries):
  ``google-cloud-storage``.
* orbax: ``etils.epath`` for its metadata files (through TensorFlow's file system
  when TensorFlow is installed, else gcsfs; ``EPATH_USE_TF`` chooses, and nothing
  here sets it) and tensorstore for its arrays.

Each client finds an emulator through its own variables (``STORAGE_EMULATOR_HOST``
for google-cloud-storage and gcsfs, ``TENSORSTORE_GCS_HTTP_URL`` for tensorstore):
the tests' fixtures set them (tests/gcs_emulator.py); this module sets none.

Against real Cloud Storage the credentials are Application Default Credentials:
a TPU VM's service account, or ``gcloud auth application-default login``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import posixpath
import shutil
import tempfile
from typing import Any

from experiments.common.errors import WorkdirError

GCS_SCHEME = "gs://"
LOGIN_HINT = "run `gcloud auth application-default login` (a TPU VM uses its service account)"


@functools.cache
def _client(emulator: str | None):
  """One ``google.cloud.storage.Client`` per emulator setting (None: real GCS); the
  client itself reads ``STORAGE_EMULATOR_HOST`` and then needs no credentials."""
  del emulator  # the cache key: a test may start an emulator after a first client
  try:
    from google.cloud import storage
  except ImportError:
    raise WorkdirError(
      "a gs:// workdir needs google-cloud-storage and gcsfs: pip install -e '.[gcs]'"
    ) from None
  import google.auth.exceptions

  try:
    return storage.Client()
  except google.auth.exceptions.DefaultCredentialsError:
    raise WorkdirError(f"no Google Cloud credentials for gs:// paths; {LOGIN_HINT}") from None
  except OSError as e:  # e.g. a project lookup failing
    raise WorkdirError(f"cannot reach Cloud Storage ({e}); {LOGIN_HINT}") from None


def gcs_client():
  """The Cloud Storage client of this process (the emulator's when
  ``STORAGE_EMULATOR_HOST`` is set)."""
  return _client(os.environ.get("STORAGE_EMULATOR_HOST") or None)


def gcs_error(path: Any, e: Exception, doing: str) -> WorkdirError:
  """One line for a failed Cloud Storage request: a missing bucket, no access, or
  no credentials, each with what to do."""
  from google.api_core import exceptions as api

  bucket = str(path).split("/")[2] if str(path).startswith(GCS_SCHEME) else "?"
  if isinstance(e, api.NotFound):
    return WorkdirError(
      f"cannot {doing} {path}: the bucket gs://{bucket} does not exist (create it with "
      f"`gcloud storage buckets create gs://{bucket}`, or fix the path)"
    )
  if isinstance(e, (api.Forbidden, api.Unauthorized)):
    return WorkdirError(
      f"cannot {doing} {path}: access denied ({e.code}); {LOGIN_HINT}, with an account "
      f"that may write to gs://{bucket}"
    )
  import google.auth.exceptions

  if isinstance(e, google.auth.exceptions.GoogleAuthError):
    return WorkdirError(f"cannot {doing} {path}: no usable Google Cloud credentials; {LOGIN_HINT}")
  first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
  return WorkdirError(f"cannot {doing} {path}: {first}")


class GcsPath:
  """``gs://bucket/key``: a Cloud Storage "folder" or object, with pathlib's names.

  Folders do not exist in Cloud Storage: a folder is every object whose name
  starts with ``key/``; ``mkdir`` does nothing.
  """

  def __init__(self, bucket: str, key: str = ""):
    self.bucket, self.key = bucket, key.strip("/")

  # -- names ---------------------------------------------------------------------------
  def __str__(self) -> str:
    return f"{GCS_SCHEME}{self.bucket}/{self.key}" if self.key else f"{GCS_SCHEME}{self.bucket}"

  __fspath__ = __str__

  def __repr__(self) -> str:
    return f"GcsPath({str(self)!r})"

  def __eq__(self, other) -> bool:
    return isinstance(other, GcsPath) and (self.bucket, self.key) == (other.bucket, other.key)

  def __hash__(self) -> int:
    return hash((self.bucket, self.key))

  def __lt__(self, other: GcsPath) -> bool:
    return (self.bucket, self.key) < (other.bucket, other.key)

  def __truediv__(self, name: str | os.PathLike) -> GcsPath:
    return GcsPath(
      self.bucket, posixpath.join(self.key, os.fspath(name)) if self.key else os.fspath(name)
    )

  @property
  def name(self) -> str:
    return posixpath.basename(self.key)

  @property
  def parent(self) -> GcsPath:
    return GcsPath(self.bucket, posixpath.dirname(self.key))

  def with_name(self, name: str) -> GcsPath:
    return self.parent / name

  def absolute(self) -> GcsPath:
    return self

  def relative_to(self, other: GcsPath) -> pathlib.PurePosixPath:
    return pathlib.PurePosixPath(self.key).relative_to(other.key)

  # -- the bucket ----------------------------------------------------------------------
  def _bucket(self):
    return gcs_client().bucket(self.bucket)

  def blob(self):
    return self._bucket().blob(self.key)

  def _call(self, doing: str, fn, *args, **kwargs):
    import google.auth.exceptions
    from google.api_core import exceptions as api

    try:
      return fn(*args, **kwargs)
    except (api.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as e:
      if isinstance(e, api.NotFound) and self._bucket_exists():
        raise FileNotFoundError(str(self)) from None
      raise gcs_error(self, e, doing) from e

  def _bucket_exists(self) -> bool:
    from google.api_core import exceptions as api

    try:
      return self._bucket().exists()
    except api.GoogleAPIError:
      return True  # cannot tell (no storage.buckets.get permission): the object is missing

  def _list(self, *, delimiter: str | None, max_results: int | None = None):
    prefix = f"{self.key}/" if self.key else ""
    return self._bucket().list_blobs(prefix=prefix, delimiter=delimiter, max_results=max_results)

  # -- queries -------------------------------------------------------------------------
  def is_file(self) -> bool:
    return bool(self.key) and self._call("read", self.blob().exists)

  def is_dir(self) -> bool:
    return self._call("list", lambda: any(True for _ in self._list(delimiter=None, max_results=1)))

  def exists(self) -> bool:
    return self.is_file() or self.is_dir()

  def iterdir(self):
    """The objects and "folders" directly below this one."""

    def listing():
      pages = self._list(delimiter="/")
      names = [b.name for b in pages]
      return names, sorted(pages.prefixes)

    names, prefixes = self._call("list", listing)
    for name in names:
      yield GcsPath(self.bucket, name)
    for prefix in prefixes:
      yield GcsPath(self.bucket, prefix)

  def rglob(self, pattern: str):
    """Every object below this folder (``pattern`` must be ``"*"``)."""
    assert pattern == "*", pattern
    names = self._call("list", lambda: [b.name for b in self._list(delimiter=None)])
    return [GcsPath(self.bucket, name) for name in names]

  # -- contents ------------------------------------------------------------------------
  def open(self, mode: str = "rb"):
    assert mode == "rb", mode
    self._call("read", self.blob().reload)  # a missing object: FileNotFoundError now
    return self.blob().open("rb")

  def read_bytes(self) -> bytes:
    return self._call("read", self.blob().download_as_bytes)

  def read_text(self, encoding: str = "utf-8") -> str:
    return self.read_bytes().decode(encoding)

  def write_bytes(self, data: bytes, **preconditions) -> int:
    """Uploads ``data`` as this object (whole or not at all); returns its generation."""
    blob = self.blob()
    self._call("write", blob.upload_from_string, data, **preconditions)
    return blob.generation

  def unlink(self, missing_ok: bool = False) -> None:
    try:
      self._call("delete", self.blob().delete)
    except FileNotFoundError:
      if not missing_ok:
        raise

  def mkdir(self, parents: bool = False, exist_ok: bool = False, mode: int = 0o777) -> None:
    del parents, exist_ok, mode  # a folder is its objects' common prefix


AnyPath = pathlib.Path | GcsPath


def as_path(path: str | os.PathLike | GcsPath) -> AnyPath:
  """``gs://BUCKET/PATH`` as a ``GcsPath``, a local path as a ``pathlib.Path``.

  Raises:
    WorkdirError: a ``gs://`` path without a bucket, or a scheme other than
      ``gs://`` (``s3://``, ``file://``, ...), which would otherwise become a local
      folder named ``s3:``.
  """
  if isinstance(path, (GcsPath, pathlib.Path)):
    return path
  text = os.fspath(path)
  if text.startswith(GCS_SCHEME):
    bucket, _, key = text[len(GCS_SCHEME) :].partition("/")
    if not bucket:
      raise WorkdirError(f"{text!r} names no bucket: write gs://BUCKET/PATH")
    return GcsPath(bucket, key)
  scheme, separator, _ = text.partition("://")
  if separator and scheme.isidentifier():
    raise WorkdirError(
      f"{text!r}: the scheme {scheme}:// is not supported; use a local folder or gs://BUCKET/PATH"
    )
  return pathlib.Path(text)


def is_gcs(path: Any) -> bool:
  return isinstance(path, GcsPath)


def _fsync_folder(folder: pathlib.Path) -> None:
  """Makes a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_bytes(path: AnyPath, data: bytes) -> None:
  """Replaces ``path``'s content by ``data`` atomically: a reader or a kill sees the
  old content or the new, never a mix. Local: a temporary file beside it,
  ``fsync``, ``os.replace``, mode ``0o666 & ~umask`` (0644 with the usual umask),
  as a file opened for writing gets. GCS: one upload.

  Raises:
    WorkdirError: if it cannot be written (naming the path and why).
  """
  if is_gcs(path):
    path.write_bytes(data)
    return
  try:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException as e:
    pathlib.Path(temporary).unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e
    raise
  _fsync_folder(path.parent)


def append_text(path: AnyPath, text: str, *, whole: str | None = None) -> None:
  """Adds ``text`` at the end of ``path`` durably. Local: an ``fsync``'ed append.
  GCS objects cannot grow: the object is replaced by ``whole`` (its full new
  content, which the caller keeps) in one upload.

  Raises:
    WorkdirError: if it cannot be written.
  """
  if is_gcs(path):
    path.write_bytes((whole if whole is not None else _read_or_empty(path) + text).encode("utf-8"))
    return
  try:
    with path.open("a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(f"cannot append to {path}: {e.strerror or e}") from e


def _read_or_empty(path: GcsPath) -> str:
  try:
    return path.read_text()
  except FileNotFoundError:
    return ""


def lexists(path: AnyPath) -> bool:
  return path.exists() if is_gcs(path) else os.path.lexists(path)


def rename_tree(source: AnyPath, destination: AnyPath) -> None:
  """Moves a file or folder. GCS: each object copied, then deleted (not atomic:
  used only to set a damaged checkpoint aside)."""
  if not is_gcs(source):
    os.replace(source, destination)
    return
  bucket = source._bucket()
  for obj in source.rglob("*") or ([source] if source.is_file() else []):
    target = destination / obj.relative_to(source).as_posix() if obj != source else destination
    source._call("move", bucket.copy_blob, obj.blob(), bucket, target.key)
    obj.unlink(missing_ok=True)


def remove_tree(path: AnyPath) -> None:
  """Deletes a folder and everything below it (errors ignored)."""
  if not is_gcs(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  try:
    for obj in path.rglob("*"):
      obj.unlink(missing_ok=True)
  except (OSError, WorkdirError):
    pass
