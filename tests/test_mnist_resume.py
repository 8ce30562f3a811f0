"""The MNIST experiment's runs lose nothing (issue 12): a killed run resumes bit
identically, a resume refuses another config, a full disk or a damaged checkpoint
loses no history, an unwritable checkpoint folder stops the command at once."""

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from experiments import common
from experiments.mnist import train
from tests import ROOT
from tests.mnist_testing import (
  LONG_RUN,
  SMALL_RUN,
  config_flags,
  copy_run,
  make_idx_folder,
  mnist_command,
  small_config,
)
from tests.processes import child_env


def _long_run(workdir, data_dir):
  return mnist_command(workdir, data_dir, *config_flags(**LONG_RUN))


def _assert_same_states(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _final_state(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute()) as manager:
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return manager.restore(manager.latest_step(), args=args).state


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data", num_train=2000)
  env = child_env(
    JAX_PLATFORMS="cpu",  # the resumed run reuses the others' programs
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  # The uninterrupted run trains beside the one to be killed (two cores, half the wait).
  whole_log = (tmp_path / "whole.log").open("w")  # a file: a full pipe would stall the run
  whole = subprocess.Popen(
    _long_run(tmp_path / "whole", data_dir),
    cwd=ROOT,
    env=env,
    stdout=whole_log,
    stderr=subprocess.STDOUT,
  )
  interrupted = subprocess.Popen(
    _long_run(tmp_path / "cut", data_dir),
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    checkpoints = tmp_path / "cut" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
      assert interrupted.poll() is None and time.monotonic() < deadline, (
        "no checkpoint before the kill"
      )
      time.sleep(0.05)
    # A second process on the same workdir refuses at once, naming the first.
    second = subprocess.run(
      _long_run(tmp_path / "cut", data_dir),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert interrupted.poll() is None, "the run finished before the second one started"
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
      f"error: the workdir {tmp_path / 'cut'} is in use by another run (pid {interrupted.pid} on "
      f"{socket.gethostname()}); wait for it to end, or give another --workdir"
    )
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    steps_done = max(m["step"] for m in train.read_metrics(tmp_path / "cut"))
    assert steps_done < 20000, "the run finished before it could be killed"
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
  finally:
    for process in (whole, interrupted):
      process.kill()
      process.wait()
    whole_log.close()

  subprocess.run(
    _long_run(tmp_path / "cut", data_dir), cwd=ROOT, env=env, check=True, capture_output=True
  )
  assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == (
    tmp_path / "whole" / "metrics.jsonl"
  ).read_bytes()
  _assert_same_states(_final_state(tmp_path / "whole"), _final_state(tmp_path / "cut"))


@pytest.mark.slow
def test_restart_with_another_config_is_refused(trained_run, tmp_path):
  data_dir, workdir = copy_run(trained_run, tmp_path / "run")
  saved = (workdir / "config.json").read_text()
  with pytest.raises(
    train.ConfigError, match=r"another config or settings \(learning_rate: 0.01 -> 0.5\)"
  ):
    train.train_and_evaluate(small_config(data_dir, learning_rate=0.5), workdir)
  with pytest.raises(
    train.ConfigError, match=r"another config or settings \(batch_norm: True -> False\)"
  ):
    train.train_and_evaluate(small_config(data_dir, batch_norm=False), workdir)
  with pytest.raises(
    train.ConfigError, match="already at step 300, past config.num_train_steps=200"
  ):
    train.train_and_evaluate(small_config(data_dir, num_train_steps=200), workdir)
  assert (workdir / "config.json").read_text() == saved  # untouched by the refusals
  train.train_and_evaluate(
    small_config(data_dir, num_train_steps=400), workdir
  )  # extending is fine
  assert [m["step"] for m in train.read_metrics(workdir)] == [100, 200, 300, 400]


@pytest.mark.slow
def test_a_full_disk_during_a_resume_loses_no_history(trained_run, tmp_path):
  """config.json and metrics.jsonl are replaced atomically: a write that fails half
  way (here: the file-size limit, as a full disk) leaves them whole."""
  data_dir, workdir = copy_run(trained_run, tmp_path / "run")
  # Killed after evaluating 300, before its checkpoint.
  shutil.rmtree(workdir / "checkpoints" / "300")
  before = {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl")}

  # Then run the command; a write past the limit fails (EFBIG), as on a full disk.
  limit_file_size = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
  )
  result = subprocess.run(
    mnist_command(
      workdir,
      data_dir,
      *config_flags(**SMALL_RUN),
      python=(sys.executable, "-c", limit_file_size),
    ),
    cwd=ROOT,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr
  assert re.search(r"error: cannot write .*config.json: File too large", result.stderr), (
    result.stderr
  )
  assert {name: (workdir / name).read_bytes() for name in before} == before
  # Without the limit, the same command resumes from step 150 and redoes 200 and 300.
  train.train_and_evaluate(small_config(data_dir), workdir)
  assert [m["step"] for m in train.read_metrics(workdir)] == [100, 200, 300]


@pytest.mark.slow
@pytest.mark.parametrize("obstacle", ["a file", "a read-only folder"])
def test_an_unwritable_checkpoint_folder_exits_at_once(tmp_path, obstacle):
  base = pathlib.Path(tempfile.mkdtemp())  # outside pytest's private folder: open to the user below
  base.chmod(0o755)
  try:
    _check_unwritable_checkpoint_folder(base, obstacle)
  finally:
    shutil.rmtree(base, ignore_errors=True)


def _check_unwritable_checkpoint_folder(base, obstacle):
  data_dir = make_idx_folder(base / "data")
  workdir = base / "run"
  workdir.mkdir(mode=0o777)
  workdir.chmod(0o777)
  if obstacle == "a file":
    (workdir / "checkpoints").write_text("")
    expected = f"error: cannot keep checkpoints in {workdir / 'checkpoints'}: a file is in the way"
  else:
    (workdir / "checkpoints").mkdir(mode=0o555)
    expected = (
      f"error: cannot write to the checkpoints folder {workdir / 'checkpoints'}: Permission denied"
    )
  as_user = []
  if (
    os.geteuid() == 0 and obstacle == "a read-only folder"
  ):  # root may write anywhere: run as nobody
    if not shutil.which("setpriv"):
      pytest.skip("running as root without setpriv (util-linux) to drop privileges")
    if not all(os.stat(folder).st_mode & 0o001 for folder in (ROOT, *ROOT.parents)):
      pytest.skip(
        f"running as root in {ROOT}, which other users cannot enter (a folder "
        "on its path lacks o+x), so the unprivileged run could not import the code"
      )
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
  started = time.monotonic()
  result = subprocess.run(
    [*as_user, *mnist_command(workdir, data_dir, "--config.num_train_steps=300")],
    cwd=ROOT,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (1, expected), result.stderr
  assert "Traceback" not in result.stderr
  assert time.monotonic() - started < 200


def _flip_a_bit_in_the_largest_file(folder):
  path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_not_restored(trained_run, tmp_path, capsys):
  data_dir, _ = copy_run(trained_run, tmp_path / "run")
  whole = train.train_and_evaluate(small_config(data_dir, num_train_steps=450), tmp_path / "whole")
  capsys.readouterr()
  _flip_a_bit_in_the_largest_file(tmp_path / "run" / "checkpoints" / "300")
  with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 400, "test_acc')  # and a last line cut short by a kill
  resumed = train.train_and_evaluate(small_config(data_dir, num_train_steps=450), tmp_path / "run")
  err = capsys.readouterr().err
  assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / '300'} is not intact" in err
  assert "its arrays differ from those saved" in err and "trying an older step" in err
  assert "dropped a truncated last line" in err
  _assert_same_states(whole, resumed)  # resumed from 150: the same run
  assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (
    tmp_path / "whole" / "metrics.jsonl"
  ).read_bytes()
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
    "300.corrupt",
    "450",
  ] or sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
    "300",
    "300.corrupt",
    "450",
  ]


@pytest.mark.slow
def test_a_resume_without_config_json_is_refused(trained_run, tmp_path):
  data_dir, _ = copy_run(trained_run, tmp_path / "run")
  (tmp_path / "run" / "config.json").unlink()
  with pytest.raises(common.ConfigError, match=r"holds checkpoints but .*config.json is missing"):
    train.train_and_evaluate(
      small_config(data_dir, learning_rate=0.5, num_train_steps=400), tmp_path / "run"
    )
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_a_float32_run_is_not_resumed_under_x64(trained_run, tmp_path, x64):
  data_dir, _ = copy_run(trained_run, tmp_path / "run")  # trained without x64
  with pytest.raises(common.ConfigError, match=r"runtime jax_enable_x64: False -> True"):
    train.train_and_evaluate(small_config(data_dir, num_train_steps=400), tmp_path / "run")
