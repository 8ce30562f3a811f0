"""One run per workdir: a lock on a local folder, a lease on a bucket.

No library here keeps two launches of a command off one workdir: orbax assumes a
single writer, and a second run on the same folder would interleave checkpoints
and metric rows with the first's.

* Local folder (``LocalLock``): ``fcntl.flock`` on ``workdir/.lock``, which the
  kernel releases when its process ends however it ends (``kill -9`` included). A
  second process is refused, naming the first one's PID. If the run fails and the
  lock created the workdir, which holds no file but the lock, the folders it made
  are removed: a config or data error leaves no new workdir behind. POSIX only;
  a file system with working ``flock`` (not every NFS).
* Cloud Storage (``GcsLease``): a bucket has no ``flock``. The object
  ``workdir/.lock`` holds ``{"holder": "<pid> <host>", "token": ...}``; it is created
  only if absent (``ifGenerationMatch=0``: of two launches one wins), rewritten every
  ``REFRESH_SECONDS`` with its generation as precondition, and deleted at the end.
  A lease not refreshed for ``STALE_AFTER_SECONDS`` by Cloud Storage's clock (its
  ``updated`` time against that of an object written just now), or held by a dead
  process of this host, is taken over, again with its generation as precondition.
  A refresh that finds the lease taken sets ``lost``: another run judged this one
  dead (stopped for over a minute); ``Run`` then stops before its next write.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import threading

from etils import epath

from experiments.common import files
from experiments.common.errors import WorkdirError, warn

LOCK_FILE = ".lock"
REFRESH_SECONDS = 15.0
STALE_AFTER_SECONDS = 60.0
HOLDER = f"{os.getpid()} {socket.gethostname()}"


def _in_use(workdir, holder: str, detail: str = "") -> WorkdirError:
  return WorkdirError(
    f"the workdir {workdir} is in use by another run (pid {holder.replace(' ', ' on ', 1)}"
    f"{detail}); wait for it to end, or give another --workdir"
  )


class LocalLock:
  """The ``flock`` on ``workdir/.lock`` (module docstring); ``release`` ends it."""

  lost = False  # the kernel keeps a lock for its process's life

  def __init__(self, workdir: epath.Path):
    self.workdir, missing, folder = workdir, [], os.path.abspath(workdir)
    while not os.path.lexists(folder):
      missing, folder = [*missing, folder], os.path.dirname(folder)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e
    self._created = missing[-1] if missing else None  # the topmost folder this lock made
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
      lock = os.path.join(os.path.abspath(self.workdir), LOCK_FILE)
      left = [os.path.join(d, f) for d, _, names in os.walk(self._created) for f in names]
      if left == [lock]:
        shutil.rmtree(self._created, ignore_errors=True)


class GcsLease:
  """The lease ``workdir/.lock`` on Cloud Storage (module docstring), held from
  construction to ``release``; ``refresh_seconds``, ``stale_after_seconds``: tests
  shorten them."""

  def __init__(
    self,
    workdir: epath.Path,
    *,
    refresh_seconds: float = REFRESH_SECONDS,
    stale_after_seconds: float = STALE_AFTER_SECONDS,
  ):
    self.workdir, self.path = workdir, f"{workdir}/{LOCK_FILE}"
    self.record = json.dumps({"holder": HOLDER, "token": secrets.token_hex(8)}).encode()
    self.lost, self._stop = False, threading.Event()
    self._generation = self._take(stale_after_seconds)
    self._thread = threading.Thread(target=self._refresh, args=(refresh_seconds,), daemon=True)
    self._thread.start()

  def _write(self, generation: int) -> int:
    blob = files.gcs_blob(self.path)
    files.gcs_call(
      self.path, "write", blob.upload_from_string, self.record, if_generation_match=generation
    )
    return blob.generation

  def _take(self, stale_after: float) -> int:
    from google.api_core import exceptions as api

    try:
      return self._write(0)
    except api.PreconditionFailed:
      pass
    blob = files.gcs_blob(self.path)
    try:
      files.gcs_call(self.path, "read", blob.reload)
      data = files.gcs_call(
        self.path, "read", blob.download_as_bytes, if_generation_match=blob.generation
      )
    except (api.NotFound, api.PreconditionFailed):  # released or replaced meanwhile: once more
      return self._write(0)
    holder = str(json.loads(data).get("holder", "unknown")) if data.startswith(b"{") else "unknown"
    clock = files.gcs_blob(f"{self.path}.clock-{os.getpid()}")  # Cloud Storage's time, now
    files.gcs_call(self.path, "write", clock.upload_from_string, b"")
    files.gcs_call(self.path, "delete", clock.delete)
    age = (clock.updated - blob.updated).total_seconds()
    pid, _, host = holder.partition(" ")
    dead_here = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
    if age <= stale_after and not dead_here:
      raise _in_use(
        self.workdir,
        holder,
        f", lease refreshed {max(age, 0):.0f} s ago; one not refreshed "
        f"for {stale_after:.0f} s is taken over",
      )
    try:
      generation = self._write(blob.generation)
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
        warn(f"the lease {self.path} was taken over by another run")
        return
      except Exception as e:  # noqa: BLE001 - a network error: try again at the next refresh
        warn(f"could not refresh the lease {self.path} ({str(e).splitlines()[0][:200]}); retrying")

  def release(self, *, failed: bool = False) -> None:
    """Stops refreshing and deletes the lease if it is still this run's."""
    del failed  # a bucket keeps no empty folder
    self._stop.set()
    self._thread.join()
    if not self.lost:
      try:
        files.gcs_blob(self.path).delete(if_generation_match=self._generation)
      except Exception:  # noqa: BLE001 - taken or gone: nothing of this run's to delete
        pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def acquire(workdir: epath.Path) -> LocalLock | GcsLease:
  """The workdir's lock (local folder) or lease (gs://).

  Raises:
    WorkdirError: another run holds it, or the workdir cannot be created or written.
  """
  return GcsLease(workdir) if files.is_gcs(workdir) else LocalLock(workdir)
