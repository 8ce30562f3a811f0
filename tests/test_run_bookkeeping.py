"""experiments.common.Run on a local folder: rows, the lock, the config check,
checkpoints verified at restore, a stop on SIGTERM, and one-line command-line errors.
(The same on gs://, and whole runs: test_gcs.py, test_mnist_resume.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.common import lock
from tests import ROOT

CONFIG = {"learning_rate": 0.01, "num_steps": 100, "seed": 0}


def _open(workdir, config=CONFIG, **options):
  options = {"num_train_steps": 10, "checkpoint_every": 1, "max_to_keep": 5, **options}
  return common.Run.open(workdir, config, **options)


def _state(value):
  # Random, so that compression cannot make the array's file smaller than the metadata.
  w = np.random.default_rng(value).standard_normal((64, 64)).astype(np.float32)
  return {"w": jnp.asarray(w), "step": jnp.int32(value)}


# ---- files and rows ----------------------------------------------------------------------


def test_an_atomic_write_keeps_the_old_content_when_it_fails(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  common.write_atomic(path, b"old")

  def no_space(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(common.WorkdirError, match=r"cannot write .*config.json: No space left"):
    common.write_atomic(path, b"new")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_rows_are_appended_and_a_resume_keeps_those_up_to_its_step(tmp_path, capsys):
  with _open(tmp_path) as run:
    run.restore_or(_state(0))
    for step in (1, 2, 3):
      assert run.log(step, {"loss": step / 10}).startswith(f"step {step}/10  loss 0.")
      if step == 2:
        run.maybe_save(step, _state(step))
  assert [r["step"] for r in common.read_metrics(tmp_path)] == [1, 2, 3]
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "lo')  # a kill during an append
  assert [r["step"] for r in common.read_metrics(tmp_path)] == [1, 2, 3]
  with _open(tmp_path) as run:
    run.restore_or(_state(0))  # the checkpoint of step 2: rows 3 and 4 are written again
  assert common.read_metrics(tmp_path) == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
  assert "dropped a truncated last line" in capsys.readouterr().err


def test_a_damaged_row_is_named_and_non_finite_values_are_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
  with pytest.raises(common.WorkdirError, match=r"metrics.jsonl, line 2: not a JSON object"):
    common.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").unlink()
  with _open(tmp_path) as run:
    run.restore_or(_state(0))
    run.log(1, {"loss": 0.5})
    for value in (float("nan"), float("inf")):
      with pytest.raises(common.NonFiniteError, match=r"at step 2, loss = (nan|inf) is not finite"):
        run.log(2, {"loss": value, "accuracy": 0.5})
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


# ---- one run per workdir -------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from etils import epath
from experiments.common import lock
lock.acquire(epath.Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_killed_one_releases_the_lock(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(
      common.WorkdirError, match=rf"{workdir} is in use by another run \(pid {holder.pid} "
    ):
      _open(workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with _open(workdir):  # the kernel released the killed process's lock
    assert (workdir / ".lock").read_text().split()[0] == str(os.getpid())


def test_a_failed_start_leaves_no_new_workdir_behind(tmp_path):
  for workdir, keep in ((tmp_path / "a" / "b", False), (tmp_path / "c", True)):
    held = lock.acquire(workdir)
    (workdir / "checkpoints").mkdir()  # empty folders do not count
    if keep:
      (workdir / "metrics.jsonl").write_text("")  # a file does
    held.release(failed=True)
  assert not (tmp_path / "a").exists() and (tmp_path / "c" / "metrics.jsonl").exists()


# ---- the config a run resumes with ---------------------------------------------------------


def test_a_resume_must_have_the_config_and_settings_it_started_with(tmp_path, x64):
  jax.config.update("jax_enable_x64", False)  # the run starts without (the fixture restores it)
  with _open(tmp_path) as run:
    run.maybe_save(1, _state(1))
  longer = {**CONFIG, "num_steps": 200}
  _open(tmp_path, longer, may_change=("num_steps",)).close()  # config.json now says 200
  with pytest.raises(
    common.ConfigError,
    match=r"another config or settings \(learning_rate: 0.01 -> 0.5; seed: 0 -> 1\)",
  ):
    _open(tmp_path, {**longer, "learning_rate": 0.5, "seed": 1})
  with pytest.raises(common.ConfigError, match=r"already at step 1, past config.num_train_steps=0"):
    _open(tmp_path, longer, num_train_steps=0)
  jax.config.update("jax_enable_x64", True)
  with pytest.raises(common.ConfigError, match=r"runtime jax_enable_x64: False -> True"):
    _open(tmp_path, longer)
  jax.config.update("jax_enable_x64", False)
  for content, why in ((None, "is missing"), ("", "is not a config"), ('{"seed": 0}', "is not a")):
    (tmp_path / "config.json").unlink(missing_ok=True)
    if content is not None:
      (tmp_path / "config.json").write_text(content)
    with pytest.raises(common.ConfigError, match=rf"holds checkpoints but .*config.json {why}"):
      _open(tmp_path, longer)


def test_config_json_is_readable_by_others(tmp_path):
  _open(tmp_path).close()
  mask = os.umask(0)
  os.umask(mask)
  assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask
  assert json.loads((tmp_path / "config.json").read_text())["config"] == CONFIG


# ---- checkpoints ---------------------------------------------------------------------------


def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bit(path):
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  path.write_bytes(bytes(raw))


DAMAGES = {  # orbax itself notices none but the missing file: the fingerprint does
  "flipped bit": lambda step_dir: _flip_bit(_largest_file(step_dir)),
  "truncated": lambda step_dir: (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))(
    _largest_file(step_dir)
  ),
  "missing file": lambda step_dir: _largest_file(step_dir).unlink(),
  "empty folder": lambda step_dir: [p.unlink() for p in step_dir.rglob("*") if p.is_file()],
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, failing
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, capsys, damage):
  with _open(tmp_path) as run:
    for step in (1, 2):
      run.maybe_save(step, _state(step))
  DAMAGES[damage](tmp_path / "checkpoints" / "2")
  with _open(tmp_path) as run:
    restored = run.restore_or(_state(0))
    assert run.latest_step == 1
    run.maybe_save(2, _state(2))  # the run redoes step 2
  np.testing.assert_array_equal(restored["w"], _state(1)["w"])
  err = capsys.readouterr().err
  assert f"warning: checkpoint {tmp_path / 'checkpoints' / '2'} is not intact" in err
  assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()
  with _open(tmp_path) as run:
    np.testing.assert_array_equal(run.restore_or(_state(0))["w"], _state(2)["w"])


def test_a_relative_workdir(tmp_path, monkeypatch):
  """orbax takes absolute paths only; the README's command gives a relative one."""
  monkeypatch.chdir(tmp_path)
  with _open("runs/a") as run:
    run.maybe_save(1, _state(1))
  with _open("runs/a") as run:
    np.testing.assert_array_equal(run.restore_or(_state(0))["w"], _state(1)["w"])


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path):
  with _open(tmp_path) as run:
    run.maybe_save(1, _state(1))
  DAMAGES["flipped bit"](tmp_path / "checkpoints" / "1")
  with _open(tmp_path) as run:
    assert run.restore_or(_state(0)) is not None and run.latest_step is None


def test_a_checkpoint_of_another_structure_is_an_error_not_damage(tmp_path):
  with _open(tmp_path) as run:
    run.maybe_save(1, _state(1))
  with pytest.raises(common.CheckpointError, match=r"checkpoint .*1 cannot be restored into this"):
    with _open(tmp_path) as run:
      run.restore_or({"other": jnp.zeros(3)})
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_an_unwritable_checkpoint_folder_is_a_prompt_error(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "checkpoints").write_text("a file in the way")
  with pytest.raises(common.CheckpointError, match="a file is in the way"):
    _open(tmp_path / "a")
  if os.geteuid() != 0:  # root writes anywhere
    (tmp_path / "b" / "checkpoints").mkdir(parents=True, mode=0o555)
    with pytest.raises(common.CheckpointError, match="cannot write to .*: Permission denied"):
      _open(tmp_path / "b")


def test_sigterm_stops_at_the_next_step_with_its_checkpoint(tmp_path):
  with pytest.raises(common.Preempted, match=r"^preempted at step 3; checkpoint saved; run the"):
    with _open(tmp_path, checkpoint_every=100) as run:
      run.restore_or(_state(0))
      for step in range(1, 10):
        if step == 3:
          os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        run.log(step, {"loss": 1.0})
        run.maybe_save(step, _state(step))
        run.stop_if_requested(step)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored on closing
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
  assert [r["step"] for r in common.read_metrics(tmp_path)] == [1, 2, 3]


# ---- command line --------------------------------------------------------------------------

_FAIL_WITH_A_THREAD = """
import threading, time
from experiments.common import cli, CheckpointError
threading.Thread(target=time.sleep, args=(600,)).start()  # a library's non-daemon thread
def run():
  raise CheckpointError("cannot write checkpoint 5")
cli.exit_on_error(run)
"""


@pytest.mark.slow
def test_an_error_exits_at_once_even_with_a_thread_left():
  started = time.monotonic()
  result = subprocess.run(
    [sys.executable, "-c", _FAIL_WITH_A_THREAD],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert (result.returncode, result.stderr) == (1, "error: cannot write checkpoint 5\n")
  assert time.monotonic() - started < 100


@pytest.mark.parametrize(
  "error, status, line",
  [
    (common.Preempted(7), 75, "preempted at step 7; checkpoint saved; run the same command to"),
    (common.LeaseLost("another run took over gs://b/r; stopping"), 77, "error: another run took"),
    (common.non_finite_loss(float("nan"), 7, latest_checkpoint=5, rate="r"), 1, "error: the train"),
  ],
)
def test_each_stop_is_one_line_and_its_exit_status(error, status, line, capsys, monkeypatch):
  def fail():
    raise error

  def exit_in_process(status):  # not the worker: a thread an earlier test left makes
    raise SystemExit(status)  # cli.fail choose os._exit (tested in a subprocess above)

  monkeypatch.setattr(common.cli.os, "_exit", exit_in_process)

  with pytest.raises(SystemExit) as exited:
    common.cli.exit_on_error(fail)
  assert exited.value.code == status
  assert capsys.readouterr().err.startswith(line)


def test_a_non_finite_loss_says_what_is_kept_and_what_to_try():
  error = common.non_finite_loss(
    float("nan"), 7, latest_checkpoint=5, rate="config.learning_rate (now 0.1)"
  )
  assert str(error) == (
    "the training loss is nan at step 7; stopped there. The last checkpoint, of step 5, "
    "is kept. Try a smaller config.learning_rate (now 0.1) in a new --workdir"
  )
  fresh = common.non_finite_loss(float("inf"), 3, latest_checkpoint=None, rate="r")
  assert "inf at step 3; stopped there. No checkpoint was written. Try a smaller r" in str(fresh)
