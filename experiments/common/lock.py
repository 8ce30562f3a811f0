"""One run per workdir: a lock on a local folder, a lease on a bucket.

No library here keeps two launches of a command off one workdir (orbax assumes
one writer; two runs would interleave their checkpoints and rows).

* ``LocalLock``: ``fcntl.flock`` on ``workdir/.lock``, released by the kernel when
  its process ends however it ends (``kill -9`` too); a second process is refused,
  naming the first one's PID. A failed run whose lock created the workdir, which
  holds no file but the lock, removes it: a bad start leaves nothing behind.
  POSIX, on a file system with working ``flock`` (not every NFS).
* ``GcsLease``: a bucket has no ``flock``. The object ``workdir/.lock`` names its
  holder; it is created only if absent (``ifGenerationMatch=0``: of two launches
  one wins), rewritten every ``REFRESH_SECONDS`` with its generation as
  precondition, and deleted at the end. One not refreshed for
  ``STALE_AFTER_SECONDS`` by Cloud Storage's clock (its ``updated`` time against
  that of an object written just now), or held by a dead process of this host, is
  taken over (its generation as precondition). A refresh that finds the lease
  taken sets ``lost``: another run judged this one dead (stopped for over a
  minute), and ``Run`` stops before its next write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import threading

from etils import epath

from experiments.common import files
from experiments.common.errors import WorkdirError, first_line, warn

REFRESH_SECONDS, STALE_AFTER_SECONDS = 15.0, 60.0
HOLDER = f"{os.getpid()} {socket.gethostname()}"


class _Held:
  """A lock or lease as a context manager: released (``failed`` if the block raised)."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.release(failed=exc_type is not None)


def _in_use(workdir, holder: str, more: str = "") -> WorkdirError:
  return WorkdirError(
    f"the workdir {workdir} is in use by another run (pid {holder.replace(' ', ' on ', 1)}"
    f"{more}); wait for it to end, or give another --workdir"
  )


class LocalLock(_Held):
  """The ``flock`` on ``workdir/.lock`` (module docstring), until ``release``."""

  lost = False  # the kernel keeps a lock for its process's life

  def __init__(self, workdir: epath.Path):
    self.workdir, self._created, folder = workdir, None, os.path.abspath(workdir)
    while not os.path.lexists(folder):  # the topmost folder this lock makes
      self._created, folder = folder, os.path.dirname(folder)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
      os.close(self._fd)
      raise _in_use(workdir, holder) from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"{HOLDER}\n".encode(), 0)

  def release(self, *, failed: bool = False) -> None:
    os.close(self._fd)
    if failed and self._created:
      left = [os.path.join(d, f) for d, _, names in os.walk(self._created) for f in names]
      if left == [os.path.join(os.path.abspath(self.workdir), ".lock")]:
        shutil.rmtree(self._created, ignore_errors=True)


class GcsLease(_Held):
  """``workdir/.lock`` on Cloud Storage (module docstring), held until ``release``."""

  def __init__(
    self,
    workdir: epath.Path,
    *,
    refresh_seconds: float = REFRESH_SECONDS,
    stale_after_seconds: float = STALE_AFTER_SECONDS,
  ):
    self.workdir, self.path, self.lost = workdir, f"{workdir}/.lock", False
    self.record = json.dumps({"holder": HOLDER, "token": secrets.token_hex(8)}).encode()
    self._generation = self._take(stale_after_seconds)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh, args=(refresh_seconds,), daemon=True)
    self._thread.start()

  def _write(self, generation: int) -> int:
    blob = files.gcs_blob(self.path)
    blob.upload_from_string(self.record, if_generation_match=generation)
    return blob.generation

  def _create(self) -> int:
    """The lease, if absent (else ``PreconditionFailed``): the workdir's first request,
    whose errors say what to do."""
    import google.auth.exceptions
    from google.api_core import exceptions as api

    bucket = self.path.removeprefix("gs://").split("/")[0]
    try:
      return self._write(0)
    except api.PreconditionFailed:
      raise
    except api.NotFound:  # a write finds nothing only when there is no bucket
      why = f"the bucket gs://{bucket} does not exist (create it with `gcloud storage "
      why += f"buckets create gs://{bucket}`, or fix the path)"
    except (api.GoogleAPIError, google.auth.exceptions.GoogleAuthError) as e:
      why = f"{first_line(e)}; {files.LOGIN_HINT}"
    raise WorkdirError(f"cannot write {self.path}: {why}")

  def _take(self, stale_after: float) -> int:
    from google.api_core import exceptions as api

    try:
      return self._create()
    except api.PreconditionFailed:
      pass
    lease = files.gcs_blob(self.path)
    try:
      lease.reload()
      data = lease.download_as_bytes(if_generation_match=lease.generation)
    except (api.NotFound, api.PreconditionFailed):  # released or replaced meanwhile: once more
      return self._create()
    holder = str(json.loads(data).get("holder", "unknown")) if data.startswith(b"{") else "unknown"
    clock = files.gcs_blob(f"{self.path}.clock-{secrets.token_hex(4)}")  # Cloud Storage's "now"
    clock.upload_from_string(b"")
    clock.delete()
    age = (clock.updated - lease.updated).total_seconds()
    pid, _, host = holder.partition(" ")
    dead_here = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
    if age <= stale_after and not dead_here:
      refreshed = f", lease refreshed {max(age, 0):.0f} s ago; one not refreshed for"
      raise _in_use(self.workdir, holder, f"{refreshed} {stale_after:.0f} s is taken over")
    try:
      generation = self._write(lease.generation)
    except api.PreconditionFailed:
      raise _in_use(self.workdir, "unknown", ", taken just now") from None
    warn(f"took over the stale lease {self.path} of pid {holder} (last refreshed {age:.0f} s ago)")
    return generation

  def _refresh(self, seconds: float) -> None:
    from google.api_core import exceptions as api

    while not self._stop.wait(seconds):
      try:
        self._generation = self._write(self._generation)
      except api.PreconditionFailed:
        self.lost = True
        return warn(f"the lease {self.path} was taken over by another run")
      except Exception as e:  # noqa: BLE001 - a network error: try again at the next refresh
        warn(f"could not refresh the lease {self.path} ({first_line(e)}); retrying")

  def release(self, *, failed: bool = False) -> None:
    """Stops refreshing and deletes the lease if it is still this run's."""
    self._stop.set()
    self._thread.join()
    with contextlib.suppress(Exception):  # taken or gone: nothing of this run's to delete
      if not self.lost:
        files.gcs_blob(self.path).delete(if_generation_match=self._generation)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    pass
  return True


def acquire(workdir: epath.Path) -> LocalLock | GcsLease:
  """The workdir's lock (local folder) or lease (gs://), or a ``WorkdirError``."""
  return GcsLease(workdir) if files.is_gcs(workdir) else LocalLock(workdir)
