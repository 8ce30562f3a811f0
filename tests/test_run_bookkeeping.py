"""experiments.common: atomic files, the metrics log, the workdir lock, config checks,
verified checkpoints and one-line command-line errors."""

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
from tests import ROOT

# ---- files -------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  common.write_json_atomic(path, {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}

  def no_space(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(
    common.WorkdirError, match=r"cannot write .*config.json: No space left on device"
  ):
    common.write_json_atomic(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_json_has_no_nan(tmp_path):
  with pytest.raises(ValueError, match="Out of range float values are not JSON compliant: nan"):
    common.write_json_atomic(tmp_path / "x.json", {"loss": float("nan")})
  assert not (tmp_path / "x.json").exists()


def test_metrics_log_appends_reads_and_truncates(tmp_path, capsys):
  log = common.MetricsLog(tmp_path / "metrics.jsonl")
  assert log.read() == []
  for step in (100, 200, 300):
    log.append({"step": step, "loss": step / 1000})
  assert [r["step"] for r in log.read()] == [100, 200, 300]
  log.keep_up_to(200)
  assert log.read() == [{"step": 100, "loss": 0.1}, {"step": 200, "loss": 0.2}]
  mtime = log.path.stat().st_mtime_ns
  log.keep_up_to(200)  # nothing to drop: the file is not rewritten
  assert log.path.stat().st_mtime_ns == mtime
  assert capsys.readouterr().err == ""


def test_metrics_log_repairs_a_truncated_last_line(tmp_path, capsys):
  log = common.MetricsLog(tmp_path / "metrics.jsonl")
  log.path.write_text('{"step": 100, "loss": 0.5}\n{"step": 200, "lo')  # killed mid-append
  assert log.read() == [{"step": 100, "loss": 0.5}]
  log.keep_up_to(1000)
  assert "dropped a truncated last line" in capsys.readouterr().err
  assert log.path.read_text() == '{"step": 100, "loss": 0.5}\n'
  log.append({"step": 200, "loss": 0.25})
  assert [r["step"] for r in log.read()] == [100, 200]


def test_metrics_log_names_a_damaged_line(tmp_path):
  log = common.MetricsLog(tmp_path / "metrics.jsonl")
  log.path.write_text('{"step": 100}\ngarbage\n{"step": 300}\n')
  with pytest.raises(common.WorkdirError, match=r"metrics.jsonl, line 2: not a JSON object"):
    log.read()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_metrics_log_refuses_non_finite_values(tmp_path, value):
  log = common.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"step": 1, "loss": 0.5})
  with pytest.raises(common.NonFiniteError, match=r"at step 2, loss = .*(nan|inf) is not finite"):
    log.append({"step": 2, "loss": value, "accuracy": 0.5})
  assert log.path.read_text() == '{"step": 1, "loss": 0.5}\n'


# ---- workdir lock ------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from experiments.common import WorkdirLock
with WorkdirLock(sys.argv[1]):
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
      with common.WorkdirLock(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with common.WorkdirLock(workdir):  # the kernel released the killed process's lock
    assert (workdir / ".lock").read_text().split()[0] == str(os.getpid())


def test_an_error_leaves_no_empty_workdir_behind(tmp_path):
  workdir = tmp_path / "a" / "b"
  with pytest.raises(common.DataError, match="no data"):
    with common.WorkdirLock(workdir):
      (workdir / "checkpoints").mkdir()  # empty folders do not count
      raise common.DataError("no data")
  assert not (tmp_path / "a").exists()
  # A workdir that existed, or holds files, stays.
  workdir.mkdir(parents=True)
  with pytest.raises(common.DataError, match="no data"):
    with common.WorkdirLock(workdir):
      raise common.DataError("no data")
  assert workdir.is_dir()
  with pytest.raises(common.DataError, match="no data"):
    with common.WorkdirLock(tmp_path / "c"):
      (tmp_path / "c" / "metrics.jsonl").write_text("")
      raise common.DataError("no data")
  assert (tmp_path / "c" / "metrics.jsonl").exists()


# ---- config ------------------------------------------------------------------------


def test_check_config_names_the_fields_that_differ(tmp_path):
  config = {"learning_rate": 0.01, "num_steps": 100, "seed": 0}
  common.write_config(tmp_path, config)
  common.check_config(
    tmp_path, {**config, "num_steps": 200}, resuming=True, may_change=("num_steps",)
  )
  with pytest.raises(
    common.ConfigError,
    match=r"another config or settings \(learning_rate: 0.01 -> 0.5; "
    r"seed: 0 -> 1\)",
  ):
    common.check_config(tmp_path, {**config, "learning_rate": 0.5, "seed": 1}, resuming=True)
  common.check_config(tmp_path, {"other": 1}, resuming=False)  # a fresh run checks nothing


def test_check_config_refuses_other_runtime_settings(tmp_path, x64):
  jax.config.update("jax_enable_x64", False)
  common.write_config(tmp_path, {"seed": 0})
  jax.config.update("jax_enable_x64", True)
  with pytest.raises(common.ConfigError, match=r"runtime jax_enable_x64: False -> True"):
    common.check_config(tmp_path, {"seed": 0}, resuming=True)


@pytest.mark.parametrize(
  "content, why",
  [
    (None, "is missing"),
    ("", "is empty"),
    ("{not json", "is not a config"),
    ('{"seed": 0}', "is not a config"),
  ],
)
def test_checkpoints_without_a_readable_config_are_refused(tmp_path, content, why):
  if content is not None:
    (tmp_path / "config.json").write_text(content)
  with pytest.raises(
    common.ConfigError, match=rf"holds checkpoints but .*config.json {why}.*unknown"
  ):
    common.check_config(tmp_path, {"seed": 0}, resuming=True)


# ---- checkpoints -------------------------------------------------------------------


def _state(value):
  return {"w": jnp.full((64, 64), value, jnp.float32), "step": jnp.int32(value)}


def _save_steps(directory, steps):
  with common.Checkpoints(directory, max_to_keep=5) as checkpoints:
    for step in steps:
      checkpoints.save(step, _state(step))


def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bit(path, offset=None):
  raw = bytearray(path.read_bytes())
  offset = len(raw) // 2 if offset is None else offset
  raw[offset] ^= 0x10
  path.write_bytes(bytes(raw))


DAMAGES = {
  "flipped bit": lambda step_dir: _flip_bit(_largest_file(step_dir)),
  "truncated": lambda step_dir: (lambda p: p.write_bytes(p.read_bytes()[:-7]))(
    _largest_file(step_dir)
  ),
  "missing file": lambda step_dir: _largest_file(step_dir).unlink(),
  "no checksums (killed while saving)": lambda step_dir: (step_dir / "SHA256SUMS").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, capsys, damage):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  DAMAGES[damage](directory / "2")
  with common.Checkpoints(directory) as checkpoints:
    assert checkpoints.latest_step == 1
    restored = checkpoints.restore(_state(0))
    checkpoints.save(2, _state(2))  # the run redoes step 2
  np.testing.assert_array_equal(restored["w"], np.full((64, 64), 1, np.float32))
  err = capsys.readouterr().err
  assert (
    f"warning: checkpoint {directory / '2'} is not intact" in err
    and "trying the older step 1" in err
  )
  assert (directory / "2.corrupt").is_dir()
  with common.Checkpoints(directory) as checkpoints:
    assert checkpoints.latest_step == 2
    np.testing.assert_array_equal(
      checkpoints.restore(_state(0))["w"], np.full((64, 64), 2, np.float32)
    )


def test_stray_step_folders_and_files_are_set_aside(tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1])
  (directory / "5").mkdir()
  (directory / "7").write_text("")
  with common.Checkpoints(directory) as checkpoints:
    assert checkpoints.latest_step == 1
  err = capsys.readouterr().err
  assert "5 is not intact (an empty folder)" in err and "7 is not intact (not a folder)" in err


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1])
  DAMAGES["flipped bit"](directory / "1")
  with common.Checkpoints(directory) as checkpoints:
    assert checkpoints.latest_step is None
  assert "no older checkpoint" in capsys.readouterr().err


def test_unwritable_checkpoint_folder_is_a_prompt_error(tmp_path):
  (tmp_path / "checkpoints").write_text("a file in the way")
  with pytest.raises(common.CheckpointError, match="a file is in the way"):
    common.Checkpoints(tmp_path / "checkpoints")
  if os.geteuid() != 0:  # root writes anywhere
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(
      common.CheckpointError, match="cannot write to the checkpoints folder .*Permission denied"
    ):
      common.Checkpoints(tmp_path / "ro")


def test_restore_into_another_structure_is_a_checkpoint_error(tmp_path):
  _save_steps(tmp_path, [1])
  with common.Checkpoints(tmp_path) as checkpoints:
    with pytest.raises(
      common.CheckpointError, match=r"checkpoint .*1 cannot be restored into this run's state"
    ):
      checkpoints.restore({"other": jnp.zeros(3)})


# ---- command line ------------------------------------------------------------------

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


def test_a_run_past_the_end_is_refused_and_one_at_or_before_it_is_not():
  common.check_not_past_the_end(None, 100)
  common.check_not_past_the_end(100, 100)
  with pytest.raises(
    common.ConfigError, match=r"already at step 101, past config.num_train_steps=100; give a new"
  ):
    common.check_not_past_the_end(101, 100)


def test_a_non_finite_loss_says_what_is_kept_and_what_to_try():
  error = common.non_finite_loss(
    float("nan"), 7, latest_checkpoint=5, rate="config.learning_rate (now 0.1)"
  )
  assert isinstance(error, common.NonFiniteError)
  assert str(error) == (
    "the training loss is nan at step 7; stopped there. The last checkpoint, of step 5, "
    "is kept. Try a smaller config.learning_rate (now 0.1) in a new --workdir"
  )
  fresh = common.non_finite_loss(float("inf"), 3, latest_checkpoint=None, rate="r")
  assert "inf at step 3; stopped there. No checkpoint was written. Try a smaller r" in str(fresh)
