"""``Run``: one training run in its workdir, opened by every host, read top to bottom.

    with Run.open(workdir, config, num_train_steps=N, checkpoint_every=K) as run:
      state = run.restore_or(initial_state)      # the newest intact checkpoint, or the start
      for step in range(int(state.step) + 1, N + 1):
        state, scalars = train_step(state, next(batches))
        print(run.log(step, scalars))             # a row of metrics.jsonl (and TensorBoard)
        run.maybe_save(step, state)               # every K steps, the last, and a stop's step
        run.stop_if_requested(step)               # preempted: exit 75 with that checkpoint

Which library does what:

* orbax's ``CheckpointManager``: atomic steps (a rename locally, ``commit_success.txt``
  on Cloud Storage), asynchronous saves, the last ``max_to_keep`` kept, the list of
  steps read once and broadcast (``single_host_load_and_broadcast``), and JAX's
  preemption sync point (``reached_preemption``): under ``jax.distributed`` every
  host stops, and saves, at the same step however many got SIGTERM.
* ``etils.epath`` for every path; google-cloud-storage where epath has no word
  (``files.py``, ``lock.py``); ``jax.experimental.multihost_utils`` for agreement.

What no library does, so it is here:

* The lock or lease (``lock.py``). Process 0 takes it; every host learns the
  outcome, and process 0's config check, before anyone touches the workdir. A
  lease lost to another run stops the run before its next write: ``LeaseLost``,
  exit status 77 (``LEASE_LOST_EXIT_STATUS``), one line.
* The config check on resume: the config a run started with (but ``may_change``)
  and the JAX settings that change its numbers (``runtime_settings``), kept in
  ``config.json``.
* Integrity without the critical path: orbax keeps no checksum of array data (a
  flipped bit restores silently). Each step also holds a ``record`` item, committed
  with it by orbax: the state's tree, shapes, dtypes and a fingerprint of its bytes
  computed on the devices as it is saved (no file is read back). At restore the
  fingerprint is recomputed: a step whose files were damaged since is set aside
  (``<step>.corrupt``, a warning) and the one before is tried; every host's verdict
  counts, so hosts with different storage errors agree on the step. A step orbax
  committed is never discarded for a missing record of ours: there is none.
* Exit status 75 (``PREEMPTED_EXIT_STATUS``) after a preemption, for restart loops;
  without ``jax.distributed``, SIGTERM and Ctrl-C (a second one interrupts) set the
  stop flag through handlers installed while the run is open (main thread only).
* Rows: ``metrics.jsonl`` and TensorBoard events written by process 0 on a
  background thread, appended (``files.Appender``), made durable before each
  checkpoint so a restored step never lacks its rows, and cut back to the restored
  step on resume. What a row averages over (a loss sum since the last row) belongs
  in the state, so a resumed run writes the uninterrupted run's rows, every one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
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
from experiments.common.errors import CheckpointError, ConfigError, RunError, WorkdirError, warn

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"


def runtime_settings() -> dict:
  """Settings outside the config that change a run's numbers: under
  ``JAX_ENABLE_X64=1`` (or another PRNG) the same seed samples other batches."""
  return {
    "jax_enable_x64": bool(jax.config.jax_enable_x64),
    "jax_default_prng_impl": str(jax.config.jax_default_prng_impl),
    "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
  }


def _plain(config: Any) -> dict:
  text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else None
  return json.loads(text or json.dumps(dict(config)))


def _differences(saved: Mapping, current: Mapping, ignore: Iterable[str] = ()) -> list[str]:
  keys = sorted((set(saved) | set(current)) - set(ignore))
  return [
    f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
  ]


def check_config(workdir: epath.Path, config: Any, *, may_change: Iterable[str] = ()) -> None:
  """Refuses to resume the run in ``workdir`` with another config (but the fields
  ``may_change``) or other ``runtime_settings``.

  Raises:
    ConfigError: naming the fields that differ, or saying that ``config.json`` is
      missing or not one this code wrote (the checkpoints' config is then unknown).
  """
  path = workdir / CONFIG_FILE
  try:
    saved = json.loads(path.read_text())
    assert isinstance(saved["config"], dict) and isinstance(saved["runtime"], dict)
  except Exception as e:  # noqa: BLE001 - missing, empty, garbage: all say the same
    why = "is missing" if isinstance(e, FileNotFoundError) else "is not a config this code wrote"
    raise ConfigError(
      f"{workdir} holds checkpoints but {path} {why}, so the config they were trained with "
      "is unknown; put the run's config.json back, or give a new --workdir"
    ) from None
  changed = _differences(saved["config"], _plain(config), may_change)
  changed += [f"runtime {d}" for d in _differences(saved["runtime"], runtime_settings())]
  if changed:
    raise ConfigError(
      f"the workdir {workdir} holds a run with another config or settings ({'; '.join(changed)}); "
      "resume it with its own, or give a new --workdir"
    )


# ---- agreement between hosts ----------------------------------------------------------------


def _broadcast_text(text: str | None, *, source: bool) -> str | None:
  """``text`` of the ``source`` host (exactly one), on every host."""
  if jax.process_count() == 1:
    return text
  data = np.zeros(4096, np.uint8)
  raw = (text or "").encode()[: data.size - 1]
  data[0], data[1 : len(raw) + 1] = text is not None, np.frombuffer(raw, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data, is_source=source))
  return bytes(data[1:]).rstrip(b"\0").decode(errors="replace") if data[0] else None


def agree(problem: str | None) -> str | None:
  """Every host's ``problem`` (None: none) counted: the first host's that has one,
  on every host, or None on every host."""
  if jax.process_count() == 1:
    return problem
  mine = np.array([problem is not None], np.int32)
  failing = np.asarray(multihost_utils.process_allgather(mine)).ravel()
  if not failing.any():
    return None
  return _broadcast_text(problem, source=jax.process_index() == int(np.argmax(failing)))


_ERRORS = {cls.__name__: cls for cls in (RunError, WorkdirError, ConfigError, CheckpointError)}


def on_primary(fn, *args) -> Any:
  """``fn(*args)`` on process 0; its ``RunError`` (or ``OSError``) raised on every host.
  Returns ``fn``'s result on process 0, None elsewhere."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn(*args)
    except (RunError, OSError) as e:
      name = type(e).__name__ if type(e).__name__ in _ERRORS else "RunError"
      error = f"{name}\n{e.strerror if isinstance(e, OSError) and e.strerror else e}"
  error = _broadcast_text(error, source=jax.process_index() == 0)
  if error is not None:
    name, _, message = error.partition("\n")
    raise _ERRORS[name](message)
  return result


# ---- what a checkpoint holds beside the state -----------------------------------------------


@jax.jit
def _fingerprint(tree) -> list[jax.Array]:
  """One uint32 per leaf: the sum of its words ``w[i]`` (its bits, 32 at a time, or
  8 or 16 for narrower dtypes) times ``2i + 1``, modulo 2**32. Any change confined
  to one word changes it (an odd weight is invertible modulo 2**32)."""

  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    w = jax.lax.bitcast_convert_type(x, unsigned).ravel().astype(jnp.uint32)
    return jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)

  return [leaf(x) for x in jax.tree.leaves(tree)]


def _shape_of(tree) -> dict:
  """The tree's structure, shapes and dtypes: what a restore needs to match."""
  leaves = [[list(np.shape(x)), str(jnp.result_type(x))] for x in jax.tree.leaves(tree)]
  return {"tree": str(jax.tree.structure(tree)), "leaves": leaves}


def _record(state) -> dict:
  values = [int(np.asarray(v.addressable_data(0))) for v in _fingerprint(state)]
  return {**_shape_of(state), "fingerprint": values}


def _numbers(row: Mapping[str, Any]) -> list[tuple[str, int | float]]:
  """The row's numbers (not its flags and words), for TensorBoard and the progress line."""
  return [(k, v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# ---- the run --------------------------------------------------------------------------------


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
    summaries: bool = False,
    max_to_keep: int = 2,
    lease: Mapping[str, float] | None = None,
  ):
    """Opens ``workdir`` (a folder or ``gs://BUCKET/PATH``) for the run of ``config``,
    on every host at once.

    Args:
      num_train_steps: the last step (always saved; a workdir past it is refused).
      checkpoint_every: save every that many steps.
      may_change: config fields a resumed run may change.
      summaries: also write TensorBoard events (needs the ``tensorboard`` package).
      max_to_keep: checkpoints kept.
      lease: ``GcsLease``'s ``refresh_seconds``/``stale_after_seconds`` (tests).

    Raises:
      WorkdirError: another run holds the workdir, or it cannot be used.
      ConfigError: it holds a run of another config, or one past ``num_train_steps``.
      CheckpointError: the checkpoints folder cannot be written.
    """
    self.workdir, self.num_train_steps = files.workdir_path(workdir), num_train_steps
    self.primary = jax.process_index() == 0
    self._lock = on_primary(_acquire, self.workdir, lease)
    self._signalled, self._stop_step, self._handlers, self._writes = False, None, {}, []
    self._writer = concurrent.futures.ThreadPoolExecutor(1, "bnjax-rows") if self.primary else None
    self._rows, self._events, self._clock = files.Appender(self.workdir / METRICS_FILE), None, None
    self._checkpoints, self._manager = self.workdir / "checkpoints", None
    try:
      on_primary(_check_writable, self._checkpoints)
      self._manager = ocp.CheckpointManager(
        self._checkpoints,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          should_save_fn=lambda step, _: step % checkpoint_every == 0 or step == num_train_steps,
          single_host_load_and_broadcast=True,
          cleanup_tmp_directories=True,
        ),
      )
      on_primary(self._check_and_write_config, config, self.latest_step, tuple(may_change))
      if summaries and self.primary:
        self._events = _event_file(self.workdir)
    except BaseException:
      if self._manager is not None:
        self._manager.close()
      self._release(failed=True)
      raise
    self._install_handlers()

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
    text = files.to_json(document, indent=2, sort_keys=True) + "\n"
    files.write_atomic(self.workdir / CONFIG_FILE, text.encode())

  # -- restoring ------------------------------------------------------------------------------

  def restore_or(self, initial: Any, *, hparams: Mapping[str, Any] | None = None) -> Any:
    """The state of the newest intact checkpoint, in ``initial``'s structure, dtypes
    and shardings; or ``initial`` in a fresh run (whose TensorBoard events then get
    ``hparams``). Damaged steps are set aside (the module docstring); rows written
    after the restored step are dropped from ``metrics.jsonl``.

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
      files.keep_rows_up_to(self.workdir / METRICS_FILE, step)
      if step == 0 and hparams and self._events is not None:
        self._write(self._events.hparams, hparams)
    self._clock = (step, None)
    return state

  def _restore(self, step: int, initial: Any) -> Any | None:
    """Step ``step`` restored, or None once it is set aside; the same on every host.
    Through orbax's handlers, which hold no barrier (its manager's restore ends in
    one, which a host whose read failed would never reach: the others would hang)."""
    path, state, record = self._checkpoints / str(step), None, None
    try:
      record = ocp.JsonCheckpointHandler().restore(path / "record")
      problem = None
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "unreadable"
      problem = f"its record is unreadable ({_short(e)})"
    problem = agree(problem)
    if problem is None:
      if {k: record[k] for k in ("tree", "leaves")} != _shape_of(initial):
        raise CheckpointError(
          f"checkpoint {path} cannot be restored into this run's state (it holds "
          f"{len(record['leaves'])} arrays of another structure; give a new --workdir)"
        )
      try:
        args = ocp.args.StandardRestore(initial)
        state = ocp.StandardCheckpointHandler().restore(path / "state", args=args)
        if _record(state)["fingerprint"] != record["fingerprint"]:
          problem = "its arrays differ from those saved: its files were damaged"
      except Exception as e:  # noqa: BLE001
        problem = f"it cannot be read ({_short(e)})"
      problem = agree(problem)
    if problem is None:
      return state
    on_primary(_set_aside, path, problem)
    self._manager.reload()
    return None

  # -- rows -----------------------------------------------------------------------------------

  def log(self, step: int, row: Mapping[str, Any]) -> str:
    """Appends ``{"step": step, **row}`` to ``metrics.jsonl`` (and its numbers to
    TensorBoard) on process 0, in the background; returns it as a progress line.

    Raises:
      NonFiniteError: a NaN or infinite value (nothing is written).
      LeaseLost: another run took the workdir over.
      WorkdirError: an earlier row could not be written.
    """
    error = files.non_finite_error(step, row, str(self.workdir / METRICS_FILE))
    if error is not None:
      raise error
    self._check_lease()
    if self.primary:
      line = files.to_json({"step": step, **row}) + "\n"
      self._write(self._rows.write, line.encode())
      if self._events is not None:
        self._write(self._events.scalars, step, {k: float(v) for k, v in _numbers(row)})
    return self._progress_line(step, row)

  def _write(self, fn, *args) -> None:
    for done in [w for w in self._writes if w.done()]:
      self._writes.remove(done)
      done.result()  # a failed write: raise its error now
    self._writes.append(self._writer.submit(fn, *args))

  def flush(self) -> None:
    """Returns once every row logged so far is written (process 0)."""
    writes, self._writes = self._writes, []
    for w in writes:
      w.result()

  def _progress_line(self, step: int, row: Mapping[str, Any]) -> str:
    text = "  ".join(
      f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in _numbers(row)
    )
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

  # -- checkpoints and stops ------------------------------------------------------------------

  def maybe_save(self, step: int, state: Any) -> bool:
    """Saves ``state`` (or ``state()``, if it is a function: called only to save)
    as ``step`` if it is a checkpoint step (every ``checkpoint_every``, the last) or
    the step to stop at (a preemption); call it after every step (or chunk of
    steps) on every host. The rows logged so far are written first. Returns whether
    it saved (asynchronously: the arrays are off the devices, the files still being
    written).

    Raises:
      LeaseLost: another run took the workdir over (nothing is written).
      CheckpointError: the checkpoint cannot be written.
    """
    stopping = self._signalled or self._manager.reached_preemption(step)
    self._stop_step = step if stopping else None
    if self._manager.latest_step() == step or not (stopping or self._manager.should_save(step)):
      return False
    self._check_lease()
    if self.primary:
      self.flush()
    state = state() if callable(state) else state
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(_record(state))
    )
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds
      raise CheckpointError(
        f"cannot write checkpoint {self._checkpoints / str(step)} ({_short(e)})"
      ) from e
    return True

  def wait_until_saved(self) -> None:
    """Returns once the last checkpoint is written whole."""
    self._manager.wait_until_finished()

  @property
  def summaries(self) -> bool:
    """Whether TensorBoard events are written (process 0)."""
    return self._events is not None

  @property
  def latest_step(self) -> int | None:
    """The newest checkpoint's step (None: none)."""
    return self._manager.latest_step()

  def stop_if_requested(self, step: int) -> None:
    """Raises ``Preempted(step)`` at the step a preemption stops at (the same on every
    host), once its checkpoint (saved by ``maybe_save``) and the rows are written."""
    if self._stop_step == step:
      if self.primary:
        self.flush()
      self.wait_until_saved()
      raise errors.Preempted(step)

  def _check_lease(self) -> None:
    lost = self.primary and self._lock.lost
    if jax.process_count() > 1:
      lost = _broadcast_text("lost" if lost else None, source=self.primary) is not None
    if lost:
      raise errors.LeaseLost(f"another run took over {self.workdir}; stopping")

  # -- signals and closing --------------------------------------------------------------------

  def _install_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    distributed = jax.distributed.is_initialized()  # then JAX's service handles SIGTERM
    for number in [signal.SIGINT] if distributed else [signal.SIGTERM, signal.SIGINT]:
      self._handlers[number] = signal.signal(number, self._notice)

  def _notice(self, number, frame) -> None:
    if number == signal.SIGINT and (self._signalled or jax.distributed.is_initialized()):
      raise KeyboardInterrupt  # a second Ctrl-C, or one of several hosts: stop now
    self._signalled = True

  def _release(self, *, failed: bool) -> None:
    if self._writer is not None:
      self._writer.shutdown()
    if self._lock is not None:
      self._lock.release(failed=failed)

  def close(self, *, failed: bool = False) -> None:
    """Writes what is pending (rows, the last checkpoint), then releases the workdir;
    after a failure, as much of it as can be (the first error is the one reported)."""
    try:
      with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
        if self.primary:
          self.flush()
        self._manager.wait_until_finished()
    finally:
      self._manager.close()
      for number, handler in self._handlers.items():
        signal.signal(number, handler)
      self._release(failed=failed)

  def __enter__(self) -> Run:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(failed=exc_type is not None)


def _acquire(workdir: epath.Path, lease: Mapping[str, float] | None):
  return (
    lock.GcsLease(workdir, **lease) if lease and files.is_gcs(workdir) else lock.acquire(workdir)
  )


def _check_writable(folder: epath.Path) -> None:
  """A local checkpoints folder that orbax could not write: one line now, not a
  failure in its background thread later."""
  if files.is_gcs(folder):
    return  # the lease was written there
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
  except FileExistsError:
    raise CheckpointError(f"cannot keep checkpoints in {folder}: a file is in the way") from None
  except OSError as e:
    raise CheckpointError(
      f"cannot write to the checkpoints folder {folder}: {e.strerror or e}"
    ) from e


def _set_aside(path: epath.Path, problem: str) -> None:
  aside, n = path.with_name(f"{path.name}.corrupt"), 1
  while aside.exists():
    aside, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
  path.rename(aside)
  warn(f"checkpoint {path} is not intact ({problem}): moved to {aside.name}; trying an older step")


def _event_file(workdir: epath.Path) -> files.EventFile | None:
  try:
    return files.EventFile(workdir)
  except ImportError as e:
    print(f"no TensorBoard summaries ({e}: pip install tensorboard); metrics.jsonl has every row")
    return None


@contextlib.contextmanager
def locked(workdir: str | epath.PathLike):
  """The lock or lease of ``workdir`` (every host learns the outcome), for commands
  that hold a folder of runs (the figure commands); yields its ``epath.Path``."""
  path = files.workdir_path(workdir)
  held = on_primary(_acquire, path, None)
  failed = True
  try:
    yield path
    failed = False
  finally:
    if held is not None:
      held.release(failed=failed)
