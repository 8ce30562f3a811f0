"""gs:// workdirs against a real Cloud Storage emulator (fake-gcs-server, see
tests/gcs_emulator.py): the bookkeeping's units, the lease, checkpoints and their
integrity, TensorBoard events, bad input; then whole MNIST runs on gs:// (killed
with SIGKILL, preempted with SIGTERM, launched twice), two jax.distributed
ImageNet processes on one gs:// workdir, and Figures 1 and 3 drawn into a bucket.
Nothing about storage is mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.common import files, lock
from tests import ROOT, gcs_emulator
from tests.mnist_testing import LONG_RUN, config_flags, make_idx_folder, mnist_command, small_config
from tests.processes import child_env, finish, free_port, start_module


@pytest.fixture
def workdir(gcs_bucket):
  return f"gs://{gcs_bucket}/runs/a"


# ---- the Run on a bucket -----------------------------------------------------------------

CONFIG = {"learning_rate": 0.01, "seed": 0}


def _open(workdir, **options):
  options = {"num_train_steps": 10, "checkpoint_every": 1, "max_to_keep": 3, **options}
  return common.Run.open(workdir, CONFIG, **options)


def _state(value):
  # Random, so that compression cannot make the array's file smaller than the metadata.
  w = np.random.default_rng(value).standard_normal((64, 64)).astype(np.float32)
  return {"w": jnp.asarray(w), "step": jnp.int32(value)}


def _blob(path):
  blob = files.gcs_blob(path)
  blob.reload()
  return blob


def test_a_run_in_a_bucket_its_rows_events_and_a_damaged_checkpoint(
  workdir, gcs_emulator, gcs_bucket, tmp_path, capsys
):
  """config.json, rows (appended, in the bucket once flushed), TensorBoard events,
  checkpoints; a resume cuts the rows back to its step and sets a damaged step aside."""
  from tensorboard.backend.event_processing import event_accumulator

  with _open(workdir, hparams={"learning_rate": 0.01}) as run:
    run.restore_or(_state(0))
    for step in (1, 2, 3):
      run.log(step, {"loss": 1.0 / step})
      run.maybe_save(step, _state(step))
      run.flush()  # as another machine reads it:
      assert [r["step"] for r in common.read_metrics(workdir)][-1] == step
  names = gcs_emulator.objects(gcs_bucket)
  assert {"runs/a/config.json", "runs/a/checkpoints/3/commit_success.txt"} <= set(names)
  (events,) = [n for n in names if n.startswith("runs/a/events.out.tfevents.")]
  local = tmp_path / events.split("/")[-1]  # TensorBoard knows the file by its name
  local.write_bytes(_blob(f"gs://{gcs_bucket}/{events}").download_as_bytes())
  accumulator = event_accumulator.EventAccumulator(str(local))
  accumulator.Reload()  # TensorBoard's own reader
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
    (1, 1.0),
    (2, pytest.approx(0.5)),
    (3, pytest.approx(1 / 3)),
  ]
  # Flip a bit in step 3's largest object (the array's data).
  step3 = [n for n in names if n.startswith("runs/a/checkpoints/3/")]
  largest = max(step3, key=lambda n: _blob(f"gs://{gcs_bucket}/{n}").size)
  blob = _blob(f"gs://{gcs_bucket}/{largest}")
  raw = bytearray(blob.download_as_bytes())
  raw[len(raw) // 2] ^= 0x10
  blob.upload_from_string(bytes(raw))
  with _open(workdir) as run:
    np.testing.assert_array_equal(run.restore_or(_state(0))["w"], _state(2)["w"])
  assert f"warning: checkpoint {workdir}/checkpoints/3 is not intact" in capsys.readouterr().err
  assert [r["step"] for r in common.read_metrics(workdir)] == [1, 2]
  names = gcs_emulator.objects(gcs_bucket)
  assert any(n.startswith("runs/a/checkpoints/3.corrupt/") for n in names)
  assert not any(n.startswith("runs/a/checkpoints/3/") for n in names)
  assert "runs/a/.lock" not in names


def test_rows_cost_the_same_bytes_however_long_the_file(workdir, monkeypatch):
  """Each row uploads itself, not the file: the bytes sent for the last 100 of 300
  rows are those of the first 100 (benchmarks/metrics.py measures 10,000)."""
  import requests

  sent = []
  request = requests.Session.request

  def counting(self, method, url, *args, data=None, **kwargs):
    sent.append(len(data) if isinstance(data, bytes) else 0)
    return request(self, method, url, *args, data=data, **kwargs)

  monkeypatch.setattr(requests.Session, "request", counting)
  appender = files.Appender(common.workdir_path(workdir) / "metrics.jsonl")
  per_row = []
  for step in range(300):
    before = sum(sent)
    appender.write(json.dumps({"step": step, "loss": 0.5}).encode() + b"\n")
    per_row.append(sum(sent) - before)
  assert len(common.read_metrics(workdir)) == 300
  assert sum(per_row[200:]) <= 1.05 * sum(per_row[:100]) + 2000, per_row


def test_the_lease_refuses_a_second_run_is_released_and_a_dead_one_is_taken(workdir):
  with _open(workdir):
    holder = json.loads(_blob(f"{workdir}/.lock").download_as_bytes())
    assert holder["holder"] == f"{os.getpid()} {socket.gethostname()}"
    with pytest.raises(
      common.WorkdirError,
      match=rf"the workdir {workdir} is in use by another run \(pid "
      rf"{os.getpid()} on {socket.gethostname()}, lease refreshed",
    ):
      _open(workdir)
  assert not common.workdir_path(workdir).joinpath(".lock").exists()
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  record = json.dumps({"holder": f"{int(dead.stdout)} {socket.gethostname()}"}).encode()
  files.gcs_blob(f"{workdir}/.lock").upload_from_string(record)  # as left by kill -9
  _open(workdir).close()  # its process is gone: taken at once


def test_the_lease_is_refreshed_and_a_stale_one_taken_over(workdir, capsys):
  path = common.workdir_path(workdir)
  other = lock.GcsLease(path, refresh_seconds=0.2)
  other.record = json.dumps({"holder": "12345 another-host"}).encode()  # at its next refresh
  first = _blob(f"{workdir}/.lock").generation
  deadline = time.monotonic() + 5
  while _blob(f"{workdir}/.lock").generation == first and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _blob(f"{workdir}/.lock").generation != first  # refreshed
  with pytest.raises(common.WorkdirError, match="in use by another run"):
    lock.GcsLease(path)
  other._stop.set()  # the other run hangs: no more refreshes
  other._thread.join()
  time.sleep(1.5)
  mine = lock.GcsLease(path, stale_after_seconds=1)
  assert "took over the stale lease" in capsys.readouterr().err
  assert _blob(f"{workdir}/.lock").download_as_bytes() == mine.record
  mine.release()
  assert not path.joinpath(".lock").exists()


def test_a_lease_taken_over_mid_run_stops_the_run_before_its_next_write(workdir, gcs_emulator):
  with _open(workdir, lease={"refresh_seconds": 0.2}) as run:
    run.restore_or(_state(0))
    run.log(1, {"loss": 1.0})
    files.gcs_blob(f"{workdir}/.lock").upload_from_string(b'{"holder": "1 elsewhere"}')
    time.sleep(1.0)  # the next refresh finds it taken
    with pytest.raises(common.LeaseLost, match=f"^another run took over {workdir}; stopping$"):
      run.log(2, {"loss": 1.0})
    with pytest.raises(common.LeaseLost):
      run.maybe_save(2, _state(2))
  assert [r["step"] for r in common.read_metrics(workdir)] == [1]
  assert not any("checkpoints/2" in n for n in gcs_emulator.objects(workdir.split("/")[2]))
  assert _blob(f"{workdir}/.lock").download_as_bytes() == b'{"holder": "1 elsewhere"}'


# ---- bad input: one line, nothing left behind -------------------------------------------


def test_gs_without_a_bucket_other_schemes_and_a_missing_bucket(
  gcs_emulator, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  for workdir, line in [
    ("gs://", r"'gs://' names no bucket: write gs://BUCKET/PATH"),
    ("s3://bucket/run", r"the scheme s3:// is not supported; use a local folder or gs://"),
    ("gs://no-such-x/run", r"the bucket gs://no-such-x does not exist \(create it with `gcloud"),
  ]:
    with pytest.raises(common.WorkdirError, match=line):
      _open(workdir)
  assert list(tmp_path.iterdir()) == []  # no folder named gs: or s3:


@pytest.mark.slow
def test_no_credentials_against_real_cloud_storage(tmp_path):
  env = child_env(
    HOME=str(tmp_path),
    CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
    NO_GCE_CHECK="True",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
  )
  for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
    env.pop(name, None)
  result = subprocess.run(
    mnist_command(
      "gs://some-bucket/run", make_idx_folder(tmp_path / "data"), "--config.num_train_steps=10"
    ),
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    "error: no Google Cloud credentials for gs:// paths; "
    "run `gcloud auth application-default login` (a TPU VM uses its service account)"
  )
  assert "Traceback" not in result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no gs: folder, nothing else


# ---- whole runs on gs:// (MNIST, in subprocesses) ---------------------------------------


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory):
  return make_idx_folder(tmp_path_factory.mktemp("gcs_mnist") / "data", num_train=2000)


@pytest.fixture(scope="module")
def mnist_reference(mnist_data, tmp_path_factory):
  """The uninterrupted run, on local disk: its metrics.jsonl bytes."""
  from experiments.mnist import train

  workdir = tmp_path_factory.mktemp("gcs_reference") / "run"
  train.train_and_evaluate(small_config(mnist_data, **LONG_RUN), workdir)
  return (workdir / "metrics.jsonl").read_bytes()


def _env(tmp_path):
  # The suite's optimization level stays (child_env): mnist_reference runs in this
  # process, and the resumed runs must round as it does, bit for bit.
  return child_env(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax-gcs-tests"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )


def _object(workdir, name):
  try:
    return (common.workdir_path(workdir) / name).read_bytes()
  except FileNotFoundError:
    return None


def _wait_for(condition, process, what, timeout=180):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"the run ended before {what}"
    assert time.monotonic() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_run_on_gs_resumes_exactly_and_a_second_launch_is_refused(
  workdir, mnist_data, mnist_reference, tmp_path, gcs_emulator, gcs_bucket
):
  command = mnist_command(workdir, mnist_data, *config_flags(**LONG_RUN))
  env = _env(tmp_path)
  run = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    _wait_for(
      lambda: _object(workdir, "checkpoints/2000/commit_success.txt") is not None, run, "checkpoint"
    )
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.poll() is None, "the run finished before the second launch"
    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(
      f"error: the workdir {workdir} is in use by another run (pid {run.pid} on "
      f"{socket.gethostname()}, lease refreshed"
    ), last
    run.send_signal(signal.SIGKILL)
    run.wait()
  finally:
    run.kill()
    run.wait()
  cut = common.read_metrics(workdir)
  assert cut and max(r["step"] for r in cut) < 20000, "the run finished before it was killed"
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed gs://" in resumed.stdout
  assert _object(workdir, "metrics.jsonl") == mnist_reference  # every row once, the same numbers
  names = gcs_emulator.objects(gcs_bucket)
  assert "runs/a/config.json" in names and "runs/a/.lock" not in names
  assert not (ROOT / "gs:").exists()


@pytest.mark.slow
def test_sigterm_saves_at_the_step_reached_and_the_resume_is_exact(
  workdir, mnist_data, mnist_reference, tmp_path
):
  command = mnist_command(workdir, mnist_data, *config_flags(**LONG_RUN))
  env = _env(tmp_path)
  run = subprocess.Popen(
    command,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for(lambda: _object(workdir, "metrics.jsonl"), run, "metrics row")
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
  finally:
    run.kill()
  assert run.returncode == common.PREEMPTED_EXIT_STATUS == 75, err[-3000:]
  match = re.fullmatch(
    r"preempted at step (\d+); checkpoint saved; run the same command to continue",
    err.strip().splitlines()[-1],
  )
  assert match, err[-2000:]
  step = int(match.group(1))
  assert 1000 <= step < 20000
  assert _object(workdir, f"checkpoints/{step}/commit_success.txt") is not None
  assert max(r["step"] for r in common.read_metrics(workdir)) == step
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"from its checkpoint of step {step}" in resumed.stdout
  assert _object(workdir, "metrics.jsonl") == mnist_reference


# ---- several hosts (ImageNet, two jax.distributed processes, gloo) -------------------------

TINY_FLAGS = [
  "--config=experiments/imagenet/configs/tiny.py",
  "--config.batch_size=8",
  "--config.eval_batch_size=8",
  "--config.log_every=1",
  "--config.lr_schedule=constant",
  "--config.warmup_epochs=0",
  "--config.base_learning_rate=0.5",
]


def _imagenet(workdir, flags, devices, *extra, env):
  env = {**env, "IMAGENET_RUNNER_DEVICES": str(devices), "IMAGENET_RUNNER_MICRO": "1"}
  return start_module("tests.imagenet_runner", [f"--workdir={workdir}", *flags, *extra], env)


def _two_processes(workdir, flags, env):
  port = free_port()
  return [
    _imagenet(
      workdir,
      flags,
      2,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      env=env,
    )
    for i in range(2)
  ]


def _losses(workdir):
  from experiments.imagenet import train

  rows = train.read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), steps  # each step once
  return {r["step"]: r["train_loss"] for r in rows}


LONG_FLAGS = [
  *TINY_FLAGS,
  "--config.num_train_steps=60",
  "--config.eval_every=60",
  "--config.checkpoint_every=60",
]


@pytest.fixture(scope="module")
def two_process_run(gcs_emulator, tmp_path_factory):
  """An uninterrupted run of two processes on a gs:// workdir, and one process
  with 4 devices on local disk: (gs workdir, bucket, local workdir)."""
  bucket = gcs_emulator.make_bucket()
  workdir, local = f"gs://{bucket}/runs/a", tmp_path_factory.mktemp("gcs_imagenet") / "one"
  env = _env(local)
  single = _imagenet(local, LONG_FLAGS, 4, env=env)
  workers = _two_processes(workdir, LONG_FLAGS, env)
  try:
    outputs = [finish(w) for w in workers]
    finish(single)
  finally:
    for p in [single, *workers]:
      p.kill()
  assert "4 devices on 2 hosts" in outputs[0][0]
  return workdir, bucket, local


@pytest.mark.slow
def test_two_processes_on_one_gs_workdir_train_as_one_local_process(two_process_run, gcs_emulator):
  """And TensorBoard events, config.json and metrics.jsonl (process 0's) in the bucket."""
  workdir, bucket, local = two_process_run
  one, two = _losses(local), _losses(workdir)
  assert sorted(one) == sorted(two) == list(range(1, 61)) and len(set(one.values())) > 50
  # gloo's and one process's sums differ in rounding, which SGD at rate 0.5 grows: on
  # an AVX-512 machine 1e-7 up to step 29, 1.5e-6 at step 52, 1.1e-4 at step 59.
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-6 if step <= 20 else 1e-3), step
  names = gcs_emulator.objects(bucket)
  assert {
    "runs/a/config.json",
    "runs/a/metrics.jsonl",
    "runs/a/checkpoints/60/commit_success.txt",
  } <= set(names)
  assert "runs/a/.lock" not in names
  events = [n for n in names if n.startswith("runs/a/events.out.tfevents.")]
  assert len(events) == 1, names  # process 0's only
  assert not (ROOT / "gs:").exists()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(two_process_run, workdir, tmp_path):
  """JAX's preemption service: both processes save the same step and exit 75; the
  resume writes the rows of the uninterrupted two-process run, byte for byte (the
  row after the restart too: its loss sum is in the checkpoint)."""
  env = _env(tmp_path)
  workers = _two_processes(workdir, LONG_FLAGS, env)
  try:
    _wait_for(lambda: len(_object(workdir, "metrics.jsonl") or b"") > 0, workers[0], "metrics row")
    workers[1].send_signal(signal.SIGTERM)
    results = [finish(w, status=75) for w in workers]
  finally:
    for w in workers:
      w.kill()
  lines = [err.strip().splitlines()[-1] for _, err in results]
  match = re.fullmatch(
    r"preempted at step (\d+); checkpoint saved; run the same command to continue", lines[0]
  )
  assert match and lines[1] == lines[0], lines
  step = int(match.group(1))
  assert 0 < step < 60 and _object(workdir, f"checkpoints/{step}/commit_success.txt") is not None
  assert max(_losses(workdir)) == step
  resumed = _two_processes(workdir, LONG_FLAGS, env)
  out = [finish(w) for w in resumed][0][0]
  assert f"from its checkpoint of step {step}" in out
  assert _object(workdir, "metrics.jsonl") == _object(two_process_run[0], "metrics.jsonl")


@pytest.mark.slow
def test_figure1_on_gs(workdir, tmp_path, gcs_emulator, gcs_bucket):
  from experiments.mnist import figure1

  config = small_config(
    make_idx_folder(tmp_path / "data"), num_train_steps=200, eval_every=100, checkpoint_every=200
  )
  path = figure1.run_figure1(config, workdir)
  assert str(path) == f"{workdir}/figure1.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  names = gcs_emulator.objects(gcs_bucket)
  assert {"runs/a/bn/metrics.jsonl", "runs/a/baseline/metrics.jsonl", "runs/a/figure1.png"} <= set(
    names
  )
  assert not any(n.endswith(".lock") for n in names)


@pytest.mark.slow
def test_figure3_on_gs(workdir, tmp_path, gcs_emulator, gcs_bucket, fashion_mnist_dir):
  """The figure command on a gs:// workdir: each variant's run, the table and the
  figure in the bucket, and a second launch finds every run finished there."""
  from experiments.imagenet import figure3

  command = [
    sys.executable,
    "-m",
    "tests.figure3_runner",  # the figure command, with a micro network
    f"--workdir={workdir}",
    f"--config.data_dir={fashion_mnist_dir}",
    "--config.batch_size=16",
    "--config.eval_batch_size=1024",
    "--config.num_train_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
  ]
  runs = [
    subprocess.run(
      command, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    for _ in range(2)
  ]
  for run in runs:
    assert run.returncode == 0, run.stderr[-3000:]
  names = set(gcs_emulator.objects(gcs_bucket))
  assert {"runs/a/figure3.png", "runs/a/figure3.md"} <= names
  for name in figure3.VARIANTS:
    assert {
      f"runs/a/{name}/metrics.jsonl",
      f"runs/a/{name}/checkpoints/2/commit_success.txt",
    } <= names
    assert f"{name}: finished, not trained again" in runs[1].stderr
  assert _object(workdir, "figure3.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"| {figure3.VARIANTS['bn_x5']} |" in _object(workdir, "figure3.md").decode()
  assert not any(n.endswith(".lock") for n in names)
  assert not (ROOT / "gs:").exists()


# ---- no process-wide side effects -----------------------------------------------------

# Each group in its own process: the commands define absl flags of the same names.
_MODULE_GROUPS = [
  [
    "experiments.common",
    "experiments.mnist.train",
    "experiments.imagenet.train",
    "experiments.imagenet.figure3",
    "experiments.imagenet.input_pipeline",
    "experiments.mnist.__main__",
  ],
  ["experiments.mnist.figure1"],
  ["experiments.imagenet.__main__"],
]


# What the experiments import, first: some of these set variables of their own on import.
_THIRD_PARTY = [
  "jax",
  "flax.linen",
  "optax",
  "orbax.checkpoint",
  "etils.epath",
  "tensorflow",
  "tensorflow_datasets",
  "matplotlib.pyplot",
  "ml_collections",
  "google.cloud.storage",
]


def _python_without_test_wiring(code: str) -> str:
  """The output of ``python -c code`` in this environment without the emulator's
  variables (tests/gcs_emulator.py): as a user runs it."""
  wiring = gcs_emulator.environment("http://unused")
  env = {k: v for k, v in os.environ.items() if k not in wiring}
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("modules", _MODULE_GROUPS, ids=["library", "figure1", "imagenet"])
def test_importing_an_experiment_module_changes_no_environment_variable(modules):
  code = (
    "import importlib, os, pkgutil, sys\n"
    f"for name in {_THIRD_PARTY!r}:  # their own variables (TF2_BEHAVIOR, ...) are theirs\n"
    "  importlib.import_module(name)\n"
    "import experiments\n"
    "before = dict(os.environ)\n"
    f"for name in {modules!r}:\n"
    "  importlib.import_module(name)\n"
    "if 'experiments.common' in sys.modules:  # and every module below it\n"
    "  for info in pkgutil.walk_packages(experiments.__path__, 'experiments.'):\n"
    "    if not info.name.endswith(('__main__', 'figure1')):\n"
    "      importlib.import_module(info.name)\n"
    "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
    "print(sorted(changed))\n"
  )
  assert _python_without_test_wiring(code).splitlines()[-1] == "[]"


@pytest.mark.slow
def test_a_gs_data_dir_is_handed_to_tensorflow_without_gcsfs():
  """The single-VM recipe: `pip install -e ".[imagenet]"` (no gcsfs), a local workdir,
  `--config.tfds_data_dir=gs://...`. TFDS's reads of the bucket must reach
  TensorFlow's file system, whatever the experiment imported first. No network here:
  TensorFlow's gfile calls are recorded, and answer "not found"."""
  code = """
import sys
sys.modules["gcsfs"] = None  # not installed: `import gcsfs` raises ImportError
import tensorflow as tf

asked = []
def refuse(name):
  def call(path, *args, **kwargs):
    asked.append(str(path))
    if name in ("exists", "isdir"):
      return False
    raise tf.errors.NotFoundError(None, None, f"{path} (recorded by the test)")
  return call
for name in ("exists", "isdir", "glob", "listdir", "stat", "GFile", "walk"):
  setattr(tf.io.gfile, name, refuse(name))

from experiments.common import cli  # everything the command imports
from experiments.imagenet import sources, train
from experiments.imagenet.configs import tiny
config = tiny.get_config()
config.fake_data = False
config.tfds_data_dir = "gs://some-bucket/tensorflow_datasets"
try:
  sources.open_source(config)
except Exception as e:
  print("error:", type(e).__name__, str(e).splitlines()[0][:300])
print("asked:", sorted({a for a in asked if a.startswith("gs://")})[:3])
"""
  out = _python_without_test_wiring(code)
  assert "gcsfs" not in out and "gs://some-bucket/tensorflow_datasets" in out.splitlines()[-1], out
