"""One run per workdir, resumed only with the config and settings it was started with."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from experiments.common import storage
from experiments.common.errors import ConfigError, WorkdirError
from experiments.common.files import write_json_atomic
from experiments.common.lease import GcsLease

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"


class WorkdirLock:
  """Creates ``workdir`` if needed and holds an exclusive lock on it.

  The lock is an ``fcntl.flock`` on ``workdir/.lock``: the kernel releases it when
  its process ends, however it ends (``kill -9`` included), so it never stays stuck.
  A second process refuses with a ``WorkdirError`` naming the holder's PID. If the
  ``with`` block raises and this lock created the workdir (or its parents) and
  no file but the lock file was written there, it removes them: a config or data
  error leaves no empty workdir behind. POSIX only (Linux, macOS); a local file
  system or one with working ``flock`` (not every NFS).

  On ``gs://BUCKET/PATH`` the lock is a lease object (``experiments.common.lease``:
  created with ``ifGenerationMatch=0``, refreshed every 15 s, taken over when not
  refreshed for 60 s); it is deleted when the ``with`` block ends.

  Example::

    with WorkdirLock(workdir):
      ...  # read, train, write
  """

  def __init__(self, workdir: str | os.PathLike | storage.GcsPath):
    self.workdir = storage.as_path(workdir)
    self._fd: int | None = None
    self._created: list[pathlib.Path] = []
    self._lease: GcsLease | None = None

  def __enter__(self) -> WorkdirLock:
    if storage.is_gcs(self.workdir):
      self._lease = GcsLease(self.workdir / LOCK_FILE, self.workdir)
      self._lease.acquire()
      return self
    missing, folder = [], self.workdir.absolute()
    while not os.path.lexists(folder):
      missing.append(folder)
      folder = folder.parent
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"cannot create the workdir {self.workdir}: {e.strerror or e}") from e
    self._created = missing  # deepest first
    path = self.workdir / LOCK_FILE
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      self._remove_if_unused()
      raise WorkdirError(f"cannot write to the workdir {self.workdir}: {e.strerror or e}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").split()
      os.close(fd)
      raise WorkdirError(
        f"the workdir {self.workdir} is in use by another run (pid "
        f"{' on '.join(holder) if holder else 'unknown'}); wait for it to end, "
        "or give another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if self._lease is not None:
      self._lease.release()  # a bucket keeps no empty folder: nothing else to remove
      self._lease = None
      return
    if exc_type is not None:
      self._remove_if_unused()
    if self._fd is not None:
      os.close(self._fd)  # releases the lock
      self._fd = None

  def _remove_if_unused(self) -> None:
    """Removes the folders this lock created if no file but the lock is in them."""
    if not self._created:
      return
    top = self._created[-1]
    try:
      if any(
        p.is_file() or p.is_symlink()
        for p in top.rglob("*")
        if p != self.workdir.absolute() / LOCK_FILE
      ):
        return
      shutil.rmtree(top)
    except OSError:
      pass


def as_dict(config: Any) -> dict:
  """A config (``ml_collections.ConfigDict`` or mapping) as plain JSON values."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config)))


def runtime_settings(**extra: Any) -> dict:
  """Settings outside the config that change a run's numbers: under
  ``JAX_ENABLE_X64=1`` (or another PRNG implementation) the same seed samples other
  batches, so a checkpoint cannot continue under them. ``extra`` adds an
  experiment's own (e.g. ``num_devices=8``)."""
  return {
    "jax_enable_x64": bool(jax.config.jax_enable_x64),
    "jax_default_prng_impl": str(jax.config.jax_default_prng_impl),
    "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    **extra,
  }


def read_config(workdir: str | os.PathLike) -> dict:
  """``workdir/config.json``: ``{"config": {...}, "runtime": {...}}``.

  Raises:
    WorkdirError: if it is missing, empty or not such an object (saying which).
  """
  path = storage.as_path(workdir) / CONFIG_FILE
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise WorkdirError(f"{path} is missing") from None
  except (OSError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path} cannot be read ({e})") from e
  try:
    saved = json.loads(text)
  except ValueError:
    saved = None
  if not (
    isinstance(saved, dict)
    and isinstance(saved.get("config"), dict)
    and isinstance(saved.get("runtime"), dict)
  ):
    raise WorkdirError(
      f"{path} is {'empty' if not text.strip() else 'not a config this code wrote'}"
    )
  return saved


def _differences(saved: Mapping, current: Mapping, ignore: Iterable[str] = ()) -> list[str]:
  ignore = set(ignore)
  return [
    f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
    for k in sorted(set(saved) | set(current))
    if k not in ignore and saved.get(k) != current.get(k)
  ]


def check_config(
  workdir: str | os.PathLike,
  config: Any,
  *,
  resuming: bool,
  may_change: Iterable[str] = (),
  runtime: Mapping | None = None,
) -> None:
  """Refuses to resume a run with another config or under other runtime settings.

  Args:
    workdir: the run's folder.
    config: the config about to run (``ConfigDict`` or mapping).
    resuming: whether a checkpoint will be restored. A fresh run checks nothing.
    may_change: config fields a resumed run may change (e.g. ``num_train_steps``).
    runtime: ``runtime_settings()`` (the default) or an experiment's own.

  Raises:
    ConfigError: one line naming the fields that differ, or saying that
      ``config.json`` is missing, empty or garbage beside checkpoints (the
      config they were trained with is then unknown).
  """
  if not resuming:
    return
  try:
    saved = read_config(workdir)
  except WorkdirError as e:
    raise ConfigError(
      f"{workdir} holds checkpoints but {e}, so the config they were trained with is "
      "unknown; put the run's config.json back, or give a new --workdir"
    ) from None
  changed = _differences(saved["config"], as_dict(config), may_change)
  changed += [
    f"runtime {d}" for d in _differences(saved["runtime"], dict(runtime or runtime_settings()))
  ]
  if changed:
    raise ConfigError(
      f"the workdir {workdir} holds a run with another config or settings ({'; '.join(changed)}); "
      "resume it with its own, or give a new --workdir"
    )


def check_not_past_the_end(latest_step: int | None, num_train_steps: int) -> None:
  """Refuses a workdir whose run is already past ``config.num_train_steps``.

  Raises:
    ConfigError: naming both steps (a shorter run would never save or evaluate).
  """
  if latest_step is not None and latest_step > num_train_steps:
    raise ConfigError(
      f"the workdir holds a run already at step {latest_step}, past "
      f"config.num_train_steps={num_train_steps}; give a new --workdir"
    )


def write_config(
  workdir: str | os.PathLike, config: Any, *, runtime: Mapping | None = None
) -> None:
  """Writes ``workdir/config.json`` atomically: the config and the runtime settings."""
  write_json_atomic(
    storage.as_path(workdir) / CONFIG_FILE,
    {"config": as_dict(config), "runtime": dict(runtime or runtime_settings())},
  )
