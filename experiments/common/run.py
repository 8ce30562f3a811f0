"""``Run``: one training run in its workdir, opened by every host, read top to bottom.

    with Run.open(workdir, config, num_train_steps=N, checkpoint_every=K) as run:
      state = run.restore_or(initial_state)      # the newest intact checkpoint, or the start
      for step in range(int(state.step) + 1, N + 1):
        state, scalars = train_step(state, next(batches))
        print(run.log(step, scalars))             # a row of metrics.jsonl (and TensorBoard)
        run.maybe_save(step, state)               # every K steps, the last, a stop's step
        run.stop_if_requested(step)               # preempted: Preempted, exit status 75

orbax's ``CheckpointManager`` makes steps atomic (``commit_success.txt`` on Cloud
Storage), saves asynchronously, keeps the last ``max_to_keep``, lists the steps on
process 0 for all, and gives every host the step to stop at after SIGTERM (JAX's
preemption sync point); epath is every path, ``multihost_utils`` the agreement.
What no library does is here (and in ``lock.py``, ``files.py``):

* Process 0 takes the lock or lease, checks the config against the run's own (but
  ``may_change``) and the JAX settings that change its numbers, and writes
  ``config.json``; every host learns each outcome before touching the workdir.
  A lease lost to another run stops the run before its next write (exit 77).
* Integrity off the critical path: orbax keeps no checksum of array data (a flipped
  bit restores silently). Beside its ``state`` each step holds a ``record``,
  committed with it: tree, shapes, dtypes and a fingerprint of the state's bits,
  computed on the devices as it is saved. A restore recomputes it; a damaged step
  is set aside (``<step>.corrupt``, a warning) and the one before tried, every
  host's verdict counted: hosts that see different storage errors agree on a step.
* Without ``jax.distributed``, SIGTERM and Ctrl-C (a second one interrupts) set the
  stop flag (handlers installed while the run is open, in the main thread).
* Rows: appended by process 0 on a background thread, written before each
  checkpoint, cut back to the restored step. What a row averages over belongs in
  the state: then a resumed run writes the uninterrupted run's rows.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from experiments.common import errors, files, lock
from experiments.common.errors import CheckpointError, ConfigError


def runtime_settings() -> dict:
  """Settings outside the config that change a run's numbers: under
  ``JAX_ENABLE_X64=1`` (or another PRNG) the same seed samples other batches."""
  return {
    name: getattr(jax.config, name)
    for name in ("jax_enable_x64", "jax_default_prng_impl", "jax_threefry_partitionable")
  }


def _plain(config: Any) -> dict:
  text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else None
  return json.loads(text or json.dumps(dict(config)))


def _changes(saved: Mapping, now: Mapping, ignore: Iterable[str] = ()) -> list[str]:
  keys = sorted((set(saved) | set(now)) - set(ignore))
  return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_config(workdir: epath.Path, config: Any, *, may_change: Iterable[str] = ()) -> None:
  """Raises ``ConfigError`` naming the fields (but ``may_change``) or ``runtime_settings``
  that differ from the config of the run in ``workdir``, or if that is unknown."""
  path = workdir / "config.json"
  try:
    saved = json.loads(path.read_text())
    assert isinstance(saved["config"], dict) and isinstance(saved["runtime"], dict)
  except Exception as e:  # noqa: BLE001 - missing, empty, garbage: all say the same
    why = "is missing" if isinstance(e, FileNotFoundError) else "is not a config this code wrote"
    raise ConfigError(
      f"{workdir} holds checkpoints but {path} {why}, so the config they were trained with "
      "is unknown; put the run's config.json back, or give a new --workdir"
    ) from None
  changed = _changes(saved["config"], _plain(config), may_change)
  changed += [f"runtime {c}" for c in _changes(saved["runtime"], runtime_settings())]
  if changed:
    raise ConfigError(
      f"the workdir {workdir} holds a run with another config or settings ({'; '.join(changed)}); "
      "resume it with its own, or give a new --workdir"
    )


def _broadcast(text: str | None, *, source: bool) -> str | None:
  """``text`` of the ``source`` host (exactly one), on every host."""
  if jax.process_count() == 1:
    return text
  data = np.zeros(4096, np.uint8)
  raw = np.frombuffer((text or "").encode()[: data.size - 1], np.uint8)
  data[0], data[1 : raw.size + 1] = text is not None, raw
  data = np.asarray(multihost_utils.broadcast_one_to_all(data, is_source=source))
  return bytes(data[1:]).rstrip(b"\0").decode(errors="replace") if data[0] else None


def _agree(problem: str | None) -> str | None:
  """The first host's ``problem`` if any host has one (None: none), on every host."""
  if jax.process_count() == 1:
    return problem
  failing = np.asarray(multihost_utils.process_allgather(np.int32([problem is not None])))
  if not failing.any():
    return None
  return _broadcast(problem, source=jax.process_index() == int(np.argmax(failing.ravel())))


def _on_primary(fn, *args) -> Any:
  """``fn(*args)`` on process 0 (its result; None elsewhere); its ``RunError`` or
  ``OSError`` raised on every host."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn(*args)
    except (errors.RunError, OSError) as e:
      name = type(e).__name__ if isinstance(e, errors.RunError) else "WorkdirError"
      error = f"{name}\n{e.strerror if isinstance(e, OSError) and e.strerror else e}"
  error = _broadcast(error, source=jax.process_index() == 0)
  if error is not None:
    name, _, message = error.partition("\n")
    raise getattr(errors, name, errors.RunError)(message)
  return result


@jax.jit
def _fingerprint(tree) -> list[jax.Array]:
  """One uint32 per leaf: the sum of its words ``w[i]`` (its bits, 32 at a time, or
  8 or 16 for narrower dtypes) times ``2i + 1``, modulo 2**32. Any change confined
  to one word changes it (an odd weight is invertible modulo 2**32)."""

  def leaf(x):
    x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    w = jax.lax.bitcast_convert_type(x, unsigned).ravel().astype(jnp.uint32)
    return jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)

  return [leaf(x) for x in jax.tree.leaves(tree)]


def _record(state, *, fingerprint: bool = True) -> dict:
  """What a checkpoint's ``record`` holds (module docstring)."""
  leaves = [[list(np.shape(x)), str(jnp.result_type(x))] for x in jax.tree.leaves(state)]
  record = {"tree": str(jax.tree.structure(state)), "leaves": leaves}
  if fingerprint:
    record["fingerprint"] = [int(np.asarray(v.addressable_data(0))) for v in _fingerprint(state)]
  return record


class Run:
  """A workdir opened for training (the module docstring); ``Run.open`` opens one."""

  def __init__(
    self,
    workdir: str | epath.PathLike,
    config: Any,
    *,
    num_train_steps: int,
    checkpoint_every: int,
    may_change: Iterable[str] = (),
    hparams: Mapping[str, Any] | None = None,
    max_to_keep: int = 2,
    lease: Mapping[str, float] | None = None,
  ):
    """Opens ``workdir`` (a folder or ``gs://BUCKET/PATH``) for ``config``'s run.

    Args:
      num_train_steps: the last step (always saved; a workdir past it is refused).
      checkpoint_every: save every that many steps.
      may_change: config fields a resumed run may change.
      hparams: write TensorBoard events too (the ``tensorboard`` package), these first.
      max_to_keep: checkpoints kept.
      lease: ``lock.GcsLease``'s ``refresh_seconds``, ``stale_after_seconds`` (tests).

    Raises:
      WorkdirError: another run holds the workdir, or it cannot be used.
      ConfigError: it holds a run of another config, or one past ``num_train_steps``.
      CheckpointError: the checkpoints folder cannot be written.
    """
    self.workdir, self.num_train_steps = files.workdir_path(workdir), num_train_steps
    self.primary, checkpoints = jax.process_index() == 0, self.workdir / "checkpoints"
    self._checkpoints = checkpoints if files.is_gcs(checkpoints) else checkpoints.absolute()
    self._lock = _on_primary(_acquire, self.workdir, lease)
    self._stopping, self._stop_step, self._handlers, self._writes = False, None, {}, []
    self._writer = concurrent.futures.ThreadPoolExecutor(1, "bnjax-rows")
    self._rows, self._clock = files.Appender(self.workdir / "metrics.jsonl"), None
    self._events = self._manager = None
    self.summaries = False
    try:
      _on_primary(_check_writable, self._checkpoints)
      self._manager = ocp.CheckpointManager(
        self._checkpoints,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          should_save_fn=lambda step, _: step % checkpoint_every == 0 or step == num_train_steps,
          single_host_load_and_broadcast=True,
          cleanup_tmp_directories=True,
        ),
      )
      _on_primary(self._check_and_write_config, config, self.latest_step, tuple(may_change))
      if hparams is not None and self.primary:
        try:
          self._events = files.EventFile(self.workdir)
          self._write(self._events.hparams, hparams)
          self.summaries = True  # TensorBoard events are written
        except ImportError as e:
          print(f"no TensorBoard summaries ({e}: pip install tensorboard); metrics.jsonl has all")
    except BaseException:
      self.close(failed=True)
      raise
    if threading.current_thread() is threading.main_thread():
      distributed = jax.distributed.is_initialized()  # then JAX's service handles SIGTERM
      for number in [signal.SIGINT] if distributed else [signal.SIGTERM, signal.SIGINT]:
        self._handlers[number] = signal.signal(number, self._notice)

  @classmethod
  def open(cls, workdir: str | epath.PathLike, config: Any, **options) -> Run:
    """``Run(workdir, config, **options)``: see ``__init__``."""
    return cls(workdir, config, **options)

  def _check_and_write_config(self, config, latest: int | None, may_change) -> None:
    if latest is not None:
      check_config(self.workdir, config, may_change=may_change)
      if latest > self.num_train_steps:
        raise ConfigError(
          f"the workdir holds a run already at step {latest}, past "
          f"config.num_train_steps={self.num_train_steps}; give a new --workdir"
        )
    document = {"config": _plain(config), "runtime": runtime_settings()}
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    files.write_atomic(self.workdir / "config.json", text.encode())

  def restore_or(self, initial: Any) -> Any:
    """The state of the newest intact checkpoint in ``initial``'s structure, dtypes
    and shardings, or ``initial`` if there is none. Damaged steps are set aside (the
    module docstring); the rows of later steps leave ``metrics.jsonl``.

    Raises:
      CheckpointError: a checkpoint of another structure (another network or state).
    """
    state, step = initial, 0
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      restored = self._restore(candidate, initial)
      if restored is not None:
        state, step = restored, candidate
        if self.primary:
          print(f"Resumed {self.workdir} from its checkpoint of step {step}.", flush=True)
        break
    if self.primary:
      files.keep_rows_up_to(self._rows.path, step)
    self._clock = (step, None)
    return state

  def _restore(self, step: int, initial: Any) -> Any | None:
    """Step ``step`` restored, or None once set aside; the same on every host. Through
    orbax's handlers: its manager's restore ends in a barrier, which a host whose
    read failed would never reach (the others would wait there)."""
    path, state, problem, other = self._checkpoints / str(step), None, None, False
    try:
      record = ocp.JsonCheckpointHandler().restore(path / "record")
      other = {k: record[k] for k in ("tree", "leaves")} != _record(initial, fingerprint=False)
      if not other:
        args = ocp.args.StandardRestore(initial)
        state = ocp.StandardCheckpointHandler().restore(path / "state", args=args)
        if _record(state)["fingerprint"] != record["fingerprint"]:
          problem = "its arrays differ from those saved: its files were damaged"
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "unreadable"
      problem = f"it cannot be read ({errors.first_line(e)})"
    if (problem := _agree(problem)) is None and other:
      raise CheckpointError(
        f"checkpoint {path} cannot be restored into this run's state (it holds "
        f"{len(record['leaves'])} arrays of another structure; give a new --workdir)"
      )
    if problem is None:
      return state
    _on_primary(_set_aside, path, problem)
    self._manager.reload()
    return None

  def log(self, step: int, row: Mapping[str, Any]) -> str:
    """Appends ``{"step": step, **row}`` to ``metrics.jsonl`` (its numbers to
    TensorBoard) on process 0, in the background; returns it as a progress line.

    Raises:
      NonFiniteError: a NaN or infinite value (nothing is written).
      LeaseLost: another run took the workdir over.
      WorkdirError: an earlier row could not be written.
    """
    if bad := [f"{k} = {v}" for k, v in row.items() if type(v) is float and not math.isfinite(v)]:
      where = f"not written to {self._rows.path}"
      raise errors.NonFiniteError(f"at step {step}, {', '.join(bad)} is not finite; {where}")
    self._check_lease()
    numbers = {k: v for k, v in row.items() if type(v) in (int, float)}
    if self.primary:
      self._write(self._rows.write, (json.dumps({"step": step, **row}) + "\n").encode())
      self._write(self._events and self._events.scalars, step, numbers)
    text = "  ".join(f"{k} {v:.4g}" if type(v) is float else f"{k} {v}" for k, v in numbers.items())
    (last_step, last_time), now = self._clock or (step, None), time.perf_counter()
    self._clock = (step, now)
    if last_time is None or step == last_step:  # the first row since the start compiled
      return f"step {step}/{self.num_train_steps}  {text}"
    rate = (step - last_step) / (now - last_time)
    eta = int((self.num_train_steps - step) / rate)
    return (
      f"step {step}/{self.num_train_steps}  {text}  ({rate:.3g} steps/s, "
      f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d})"
    )

  def _write(self, fn, *args) -> None:
    for done in [w for w in self._writes if w.done()]:
      self._writes.remove(done)
      done.result()  # a failed write: raise its error now
    if fn is not None:
      self._writes.append(self._writer.submit(fn, *args))

  def flush(self) -> None:
    """Returns once every row logged so far is written."""
    writes, self._writes = self._writes, []
    for w in writes:
      w.result()

  def maybe_save(self, step: int, state: Any) -> bool:
    """Saves ``state`` (or ``state()``, called only to save) as ``step`` at every
    ``checkpoint_every``-th step, the last and the one to stop at, the rows logged
    so far written first; call it after every step (or chunk) on every host. Returns
    whether it saved (asynchronously: its files are still being written). Raises
    ``LeaseLost`` (nothing written) or ``CheckpointError``."""
    stopping = self._stopping or self._manager.reached_preemption(step)
    self._stop_step = step if stopping else None
    if self.latest_step == step or not (stopping or self._manager.should_save(step)):
      return False
    self._check_lease()
    self.flush()
    state = state() if callable(state) else state
    record = ocp.args.JsonSave(_record(state))
    try:
      args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=record)
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds
      path = self._checkpoints / str(step)
      raise CheckpointError(f"cannot write checkpoint {path} ({errors.first_line(e)})") from e
    return True

  def stop_if_requested(self, step: int) -> None:
    """Raises ``Preempted(step)`` at the step a preemption stops at (the same on every
    host), once its checkpoint (saved by ``maybe_save``) and the rows are written."""
    if self._stop_step == step:
      self.flush()
      self.wait_until_saved()
      raise errors.Preempted(step)

  def _check_lease(self) -> None:
    lost = self.primary and self._lock.lost
    if jax.process_count() > 1:
      lost = _broadcast("lost" if lost else None, source=self.primary) is not None
    if lost:
      raise errors.LeaseLost(f"another run took over {self.workdir}; stopping")

  def _notice(self, number, frame) -> None:
    if number == signal.SIGINT and (self._stopping or jax.distributed.is_initialized()):
      raise KeyboardInterrupt  # a second Ctrl-C, or one of several hosts: stop now
    self._stopping = True

  def wait_until_saved(self) -> None:
    """Returns once the last checkpoint is written whole."""
    self._manager.wait_until_finished()

  @property
  def latest_step(self) -> int | None:
    """The newest checkpoint's step (None: none)."""
    return self._manager.latest_step()

  def close(self, *, failed: bool = False) -> None:
    """Writes what is pending (rows, the last checkpoint), then releases the workdir;
    after a failure, as much as can be written (the first error is the one reported)."""
    try:
      with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
        self.flush()
        if self._manager is not None:
          self._manager.wait_until_finished()
    finally:
      if self._manager is not None:
        self._manager.close()
      for number, handler in self._handlers.items():
        signal.signal(number, handler)
      self._writer.shutdown()
      if self._lock is not None:
        self._lock.release(failed=failed)

  def __enter__(self) -> Run:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(failed=exc_type is not None)


def _acquire(workdir: epath.Path, lease: Mapping[str, float] | None):
  if lease and files.is_gcs(workdir):
    return lock.GcsLease(workdir, **lease)
  return lock.acquire(workdir)


def _check_writable(folder: epath.Path) -> None:
  """A local folder orbax could not write: one line now, not a failure in its
  background thread at the first save (on gs://, the lease was written)."""
  try:
    if not files.is_gcs(folder):
      folder.mkdir(parents=True, exist_ok=True)
      (probe := folder / f".write-test-{uuid.uuid4().hex}").write_bytes(b"")
      probe.unlink()
  except FileExistsError:
    raise CheckpointError(f"cannot keep checkpoints in {folder}: a file is in the way") from None
  except OSError as e:
    raise CheckpointError(f"cannot write to the checkpoints folder {folder}: {e.strerror}") from e


def _set_aside(path: epath.Path, problem: str) -> None:
  aside, n = path.with_name(f"{path.name}.corrupt"), 1
  while aside.exists():
    aside, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
  path.rename(aside)
  errors.warn(
    f"checkpoint {path} is not intact ({problem}): moved to {aside.name}; trying an older step"
  )
