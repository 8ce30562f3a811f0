"""One run per ``gs://`` workdir: a lease object, since a bucket has no ``flock``.

The lease is the object ``workdir/.lock``, a JSON record of its holder::

    {"holder": "<pid> <host>", "token": "<random>", "refreshed": <unix time>}

* Taking it: the object is created with the precondition ``ifGenerationMatch=0``
  (create only if absent), so of two launches exactly one succeeds.
* Holding it: a daemon thread rewrites it every ``REFRESH_SECONDS`` (15 s), each
  time with ``ifGenerationMatch=<the generation it last wrote>``.
* Releasing it: deleted (again with its generation) when the run ends, however
  it ends short of ``kill -9`` or a lost machine; a preempted run releases it.
* A lease left by a run that died without releasing it is *stale* when it was
  last refreshed more than ``STALE_AFTER_SECONDS`` (60 s, four missed refreshes)
  ago by Cloud Storage's clock (the object's ``updated`` time), or at once when
  its holder ran on this machine and that process is gone. A stale lease is
  taken over with ``ifGenerationMatch=<its generation>``, so two launches cannot
  both take it over.
* If a refresh finds the lease taken (another launch judged it stale: this
  process was stopped for over a minute), the run is told with a warning and
  ``lost`` is set; it is not killed.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import threading
import time

from experiments.common import storage
from experiments.common.errors import WorkdirError, warn

REFRESH_SECONDS = 15.0
STALE_AFTER_SECONDS = 60.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class GcsLease:
  """The lease on ``path`` (a ``GcsPath``), held from ``acquire`` to ``release``.

  Args:
    path: the lease object, ``workdir/.lock``.
    workdir: named in the error message.
    refresh_seconds, stale_after_seconds: the times above (tests shorten them).
  """

  def __init__(
    self,
    path: storage.GcsPath,
    workdir,
    *,
    refresh_seconds: float = REFRESH_SECONDS,
    stale_after_seconds: float = STALE_AFTER_SECONDS,
  ):
    self.path, self.workdir = path, workdir
    self.refresh_seconds, self.stale_after_seconds = refresh_seconds, stale_after_seconds
    self.holder = f"{os.getpid()} {socket.gethostname()}"
    self.token = secrets.token_hex(8)
    self.lost = False
    self._generation: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()

  def _record(self) -> bytes:
    return json.dumps(
      {"holder": self.holder, "token": self.token, "refreshed": time.time()}
    ).encode()

  def acquire(self) -> None:
    """Takes the lease, or raises ``WorkdirError`` naming its live holder."""
    from google.api_core import exceptions as api

    try:
      self._generation = self.path.write_bytes(self._record(), if_generation_match=0)
    except WorkdirError as e:
      if not isinstance(e.__cause__, api.PreconditionFailed):
        raise
      self._take_over_if_stale()
    self._thread = threading.Thread(target=self._refresh_loop, name="bnjax-lease", daemon=True)
    self._thread.start()

  def _take_over_if_stale(self) -> None:
    from google.api_core import exceptions as api

    blob = self.path.blob()
    try:
      self.path._call("read", blob.reload)
      data = self.path._call("read", blob.download_as_bytes, if_generation_match=blob.generation)
    except (FileNotFoundError, WorkdirError):  # released (or replaced) meanwhile: try once more
      self._generation = self.path.write_bytes(self._record(), if_generation_match=0)
      return
    try:
      holder = str(json.loads(data).get("holder", "unknown"))
    except ValueError:
      holder = "unknown"
    age = (datetime.datetime.now(datetime.UTC) - blob.updated).total_seconds()
    pid, _, host = holder.partition(" ")
    dead_here = host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
    if age <= self.stale_after_seconds and not dead_here:
      raise WorkdirError(
        f"the workdir {self.workdir} is in use by another run "
        f"(pid {holder.replace(' ', ' on ', 1)}, lease refreshed {max(age, 0):.0f} s ago); "
        "wait for it to end, or give another --workdir "
        f"(a lease not refreshed for {self.stale_after_seconds:.0f} s is taken over)"
      )
    try:
      self._generation = self.path.write_bytes(self._record(), if_generation_match=blob.generation)
    except WorkdirError as e:
      if isinstance(e.__cause__, api.PreconditionFailed):
        raise WorkdirError(
          f"the workdir {self.workdir} was just taken by another run; give another --workdir"
        ) from None
      raise
    warn(f"took over the stale lease {self.path} of pid {holder} (last refreshed {age:.0f} s ago)")

  def _refresh_loop(self) -> None:
    while not self._stop.wait(self.refresh_seconds):
      with self._lock:
        if self._stop.is_set():
          return
        try:
          self._generation = self.path.write_bytes(
            self._record(), if_generation_match=self._generation
          )
        except WorkdirError as e:
          from google.api_core import exceptions as api

          if isinstance(e.__cause__, api.PreconditionFailed):
            self.lost = True
            warn(
              f"the lease {self.path} was taken over by another run; this run no longer owns "
              f"{self.workdir}"
            )
            return
          warn(f"could not refresh the lease {self.path} ({e}); retrying")
        except Exception as e:  # noqa: BLE001 - a network error: try again next time
          warn(f"could not refresh the lease {self.path} ({type(e).__name__}); retrying")

  def release(self) -> None:
    """Stops refreshing and deletes the lease (if still ours)."""
    self._stop.set()
    with self._lock:
      if self._thread is not None:
        self._thread.join(timeout=1)
      if self._generation is not None and not self.lost:
        try:
          self.path._call("delete", self.path.blob().delete, if_generation_match=self._generation)
        except Exception:  # noqa: BLE001 - already gone or taken: nothing of ours to delete
          pass
      self._generation = None
