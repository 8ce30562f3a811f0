"""Orbax checkpoints that are verified before they are restored.

Orbax keeps no checksum of the arrays it writes: a flipped bit in a checkpoint
restores silently. So each step folder gets a ``SHA256SUMS`` file of our own
(``sha256sum -c SHA256SUMS`` checks it by hand), written atomically once orbax has
finished the step. On opening, the newest step folders are verified from the
newest down; one that fails (a changed, truncated or missing file, no
``SHA256SUMS`` because the run died while saving, an empty stray folder) is moved
aside to ``<step>.corrupt`` with a warning naming it, and the newest intact step is
the one restored. Orbax then never sees the damaged ones, so its ``max_to_keep``
never deletes the last intact checkpoint to make room.

Saving is asynchronous by default (orbax's async save): ``save`` returns once the
arrays are copied off the devices, and the files are written while training goes
on. A background thread waits for orbax to finish the step and then writes its
``SHA256SUMS``; until that record is complete the step counts as damaged (a run
killed meanwhile resumes from the step before). The next ``save``,
``wait_until_finished`` and ``close`` wait for the pending record, and report a
failed write as a ``CheckpointError``. ``asynchronous=False`` saves as before:
``save`` returns when the step and its record are written.

The folder may be local or ``gs://`` (``experiments.common.storage``): orbax writes
there through etils/gcsfs and tensorstore, and the checksums are read back from
the bucket.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

from experiments.common import storage
from experiments.common.errors import CheckpointError, RunError, warn
from experiments.common.files import write_text_atomic
from experiments.common.storage import AnyPath

CHECKSUMS_FILE = "SHA256SUMS"
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")  # orbax's default step folder names


def sha256_of_file(path: AnyPath) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(step_dir: AnyPath) -> None:
  """Writes ``step_dir/SHA256SUMS``: the sha256 of every file below it, in
  ``sha256sum`` format, paths relative to ``step_dir``."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
  write_text_atomic(
    step_dir / CHECKSUMS_FILE,
    "".join(f"{sha256_of_file(p)}  {p.relative_to(step_dir).as_posix()}\n" for p in files),
  )


def verify_checksums(step_dir: AnyPath) -> str | None:
  """Why ``step_dir`` cannot be trusted (one phrase), or None if it is intact."""
  if not step_dir.is_dir():
    return "not a folder"
  if not any(step_dir.iterdir()):
    return "an empty folder"
  try:
    listing = (step_dir / CHECKSUMS_FILE).read_text(encoding="utf-8")
  except FileNotFoundError:
    return f"no {CHECKSUMS_FILE} (the run ended while saving it)"
  except (OSError, UnicodeDecodeError) as e:
    return f"{CHECKSUMS_FILE} unreadable ({e})"
  entries = [line.split("  ", 1) for line in listing.splitlines() if line]
  if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
    return f"{CHECKSUMS_FILE} is malformed"
  for expected, name in entries:
    path = step_dir / name
    if not path.is_file():
      return f"{name} is missing"
    try:
      actual = sha256_of_file(path)
    except OSError as e:
      return f"{name} unreadable ({e.strerror or e})"
    if actual != expected:
      return f"{name} does not match its checksum (damaged or truncated)"
  return None


def _check_writable(directory: AnyPath) -> None:
  if storage.is_gcs(directory):
    probe = directory / f".write-test-{uuid.uuid4().hex}"
    try:
      probe.write_bytes(b"")
      probe.unlink(missing_ok=True)
    except RunError as e:
      raise CheckpointError(str(e)) from None
    return
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise CheckpointError(f"cannot keep checkpoints in {directory}: a file is in the way") from None
  except OSError as e:
    raise CheckpointError(
      f"cannot create the checkpoints folder {directory}: {e.strerror or e}"
    ) from e
  if not directory.is_dir():
    raise CheckpointError(f"cannot keep checkpoints in {directory}: not a folder")
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise CheckpointError(
      f"cannot write to the checkpoints folder {directory}: {e.strerror or e}"
    ) from e


class Checkpoints:
  """One pytree per step in ``directory``, verified by checksum when opened.

  Opening checks that ``directory`` is writable (``CheckpointError`` at once if
  not, before orbax starts) and sets aside damaged newest steps (see the module
  docstring); ``latest_step`` is then the newest intact step, or None.

  Example::

    with Checkpoints(workdir / "checkpoints", max_to_keep=2) as checkpoints:
      if checkpoints.latest_step is not None:
        state = checkpoints.restore(state)   # ``state`` gives structure, dtypes, shardings
      ...
      checkpoints.save(step, state)

  Multi-host: every process verifies (the folder must be shared); only process 0
  writes ``SHA256SUMS`` and moves damaged steps aside, and the others wait for it
  (a barrier) before orbax lists the steps.
  """

  def __init__(
    self,
    directory: str | os.PathLike | storage.GcsPath,
    *,
    max_to_keep: int = 2,
    asynchronous: bool = True,
  ):
    self.directory = storage.as_path(directory).absolute()
    self.asynchronous = asynchronous
    _check_writable(self.directory)
    self.latest_step = self._newest_intact_step()
    # Process 0 may still be moving a damaged step aside (on Cloud Storage, object by
    # object) while another process lists the steps for orbax's manager: wait for it.
    ocp.multihost.sync_global_processes("bnjax-checkpoints-verified")
    self._manager = ocp.CheckpointManager(
      str(self.directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=False,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
      ),
    )
    self._sealing: threading.Thread | None = None  # waits for orbax, then writes SHA256SUMS
    self._sealing_error: BaseException | None = None

  def _newest_intact_step(self) -> int | None:
    steps = sorted(
      (int(p.name) for p in self.directory.iterdir() if _STEP_NAME.match(p.name)), reverse=True
    )
    for step in steps:
      path = self.directory / str(step)
      problem = verify_checksums(path)
      if problem is None:
        return step
      aside = self._set_aside(path)
      older = next((s for s in steps if s < step), None)
      warn(
        f"checkpoint {path} is not intact ({problem}): moved to {aside.name}; "
        + (f"trying the older step {older}" if older is not None else "no older checkpoint")
      )
    return None

  def _set_aside(self, path: AnyPath) -> AnyPath:
    aside, n = path.with_name(f"{path.name}.corrupt"), 1
    while storage.lexists(aside):
      aside, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
    if jax.process_index() == 0:
      try:
        storage.rename_tree(path, aside)
      except OSError as e:
        raise CheckpointError(
          f"checkpoint {path} is not intact and cannot be moved aside: {e.strerror or e}"
        ) from e
    return aside

  def restore(self, target: Any) -> Any:
    """The newest intact step's pytree, with ``target``'s structure and dtypes."""
    if self.latest_step is None:
      raise CheckpointError(f"no intact checkpoint in {self.directory}")
    path = self.directory / str(self.latest_step)
    try:
      return self._manager.restore(self.latest_step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax raises many kinds; all mean "cannot use it"
      raise CheckpointError(
        f"checkpoint {path} cannot be restored into this run's state "
        f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
      ) from e

  def save(self, step: int, state: Any) -> None:
    """Writes ``state`` as ``step``, then its checksums. Synchronous: returns when
    both are written. Asynchronous: returns once the arrays are off the devices;
    the step becomes intact when its ``SHA256SUMS`` is written in the background
    (after the previous step's record: ``save`` first waits for that)."""
    self.wait_until_finished()
    path = self.directory / str(step)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:
      raise _save_error(path, e) from e
    self.latest_step = step
    if self.asynchronous:
      self._sealing = threading.Thread(
        target=self._seal, args=(step,), name=f"bnjax-seal-{step}", daemon=True
      )
      self._sealing.start()
    else:
      self._seal(step)
      self.wait_until_finished()

  def _seal(self, step: int) -> None:
    """Waits for orbax to finish ``step``, then writes its ``SHA256SUMS`` (process 0)."""
    try:
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        write_checksums(self.directory / str(step))
    except BaseException as e:  # noqa: BLE001 - reported by the next wait_until_finished
      self._sealing_error = _save_error(self.directory / str(step), e)

  def wait_until_finished(self) -> None:
    """Returns when the last saved step and its ``SHA256SUMS`` are written.

    Raises:
      CheckpointError: if that save failed.
    """
    if self._sealing is not None:
      self._sealing.join()
      self._sealing = None
    error, self._sealing_error = self._sealing_error, None
    if error is not None:
      raise error

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _save_error(path: AnyPath, e: BaseException) -> BaseException:
  if isinstance(e, CheckpointError) or not isinstance(e, Exception):
    return e
  return CheckpointError(
    f"cannot write checkpoint {path} ({type(e).__name__}: "
    f"{str(e).splitlines()[0][:300] if str(e) else ''})"
  )
