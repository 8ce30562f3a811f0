"""The ImageNet command line in subprocesses: two jax.distributed processes train as
one process does and, finding their newest checkpoint damaged, resume together
from the one before; a run killed with SIGKILL resumes and ends as an
uninterrupted one; bad input gives one line and leaves no workdir.

The training runs train ``tests.imagenet_testing.MicroNet`` (two convolutions with
BN; the real networks are trained in test_imagenet_train.py), through
``tests.imagenet_runner``, which runs the same ``main`` as ``python -m
experiments.imagenet``; they share a JAX compilation cache (a folder per test
module), so a program compiled by one run is reused by the next of the same shape.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import time
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.imagenet import train
from tests.imagenet_testing import write_mock_metadata
from tests.processes import child_env, finish, free_port, start_module

TINY = "experiments/imagenet/configs/tiny.py"
TIMEOUT = 300  # seconds, per run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(devices: int, cache: pathlib.Path | None = None, *, runner: bool = True, **extra) -> dict:
  """The children's environment: ``devices`` CPU devices, set by tests.imagenet_runner
  (jax_num_cpu_devices) or, for ``python -m experiments.imagenet``, by XLA_FLAGS."""
  if runner:
    env = child_env(JAX_PLATFORMS="cpu", IMAGENET_RUNNER_DEVICES=str(devices), **extra)
  else:
    device_count = f"--xla_force_host_platform_device_count={devices}"
    env = child_env(device_count, JAX_PLATFORMS="cpu", **extra)
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  return env


def _start(args: list[str], env: dict, module: str = "tests.imagenet_runner") -> subprocess.Popen:
  return start_module(module, args, env)


def _finish(process: subprocess.Popen) -> tuple[str, str]:
  return finish(process, timeout=TIMEOUT)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in train.read_metrics(workdir) if "train_loss" in r}


def _final_eval(workdir: pathlib.Path) -> dict:
  row = train.read_metrics(workdir)[-1]
  return {k: row[k] for k in ("step", "top1", "top5", "eval_loss", "eval_examples")}


def _start_two_processes(
  workdir: pathlib.Path, flags: list[str], process_1_env: dict | None = None
) -> list[subprocess.Popen]:
  """Two jax.distributed processes of 2 CPU devices each (gloo), one run in ``workdir``
  (``process_1_env``: more variables for process 1)."""
  port = free_port()
  return [
    _start(
      [
        f"--workdir={workdir}",
        *flags,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      _env(2, IMAGENET_RUNNER_MICRO="1", **((process_1_env or {}) if i else {})),
    )
    for i in range(2)
  ]


def test_two_processes_train_as_one(tmp_path, compilation_cache):
  """2 processes x 2 CPU devices (gloo) and 1 process x 4 devices, the same global
  batches of fake data: the same losses step by step, the same evaluation."""
  flags = [
    f"--config={TINY}",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.num_train_steps=3",
    "--config.log_every=1",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
    "--config.lr_schedule=constant",
    "--config.warmup_epochs=0",
    "--config.base_learning_rate=0.5",
  ]
  single = _start(
    [f"--workdir={tmp_path / 'one'}", *flags], _env(4, compilation_cache, IMAGENET_RUNNER_MICRO="1")
  )
  workers = _start_two_processes(tmp_path / "two", flags)
  try:
    outputs = [_finish(w) for w in workers]
    _finish(single)
  finally:
    for p in [single, *workers]:
      p.kill()
  assert "4 devices on 2 hosts" in outputs[0][0]
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == [1, 2, 3]
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
  assert len(set(one.values())) == 3  # the steps differ: the comparison is not vacuous
  eval_one, eval_two = _final_eval(tmp_path / "one"), _final_eval(tmp_path / "two")
  assert eval_two["eval_examples"] == eval_one["eval_examples"] == 20
  assert eval_two["eval_loss"] == pytest.approx(eval_one["eval_loss"], rel=1e-5)
  assert (eval_two["top1"], eval_two["top5"]) == (eval_one["top1"], eval_one["top5"])
  assert (tmp_path / "two" / "checkpoints" / "3").is_dir()


def test_hosts_that_see_different_storage_errors_agree_on_the_step(tmp_path):
  """Process 1 alone cannot read step 6 (a storage error on its host); both processes
  set it aside once and resume together from step 4 (their steps are collectives: a
  process on another step would hang them or change the losses), and the run ends
  with the losses of the first one."""
  flags = [
    f"--config={TINY}",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.log_every=1",
    "--config.eval_every=100",
    "--config.checkpoint_every=2",
    "--config.num_train_steps=6",
    "--config.lr_schedule=constant",
    "--config.warmup_epochs=0",
  ]

  def two_processes(**process_1_env):
    workers = _start_two_processes(tmp_path, flags, process_1_env)
    try:
      return [_finish(w) for w in workers]
    finally:
      for w in workers:
        w.kill()

  two_processes()
  losses = _losses(tmp_path)
  (out, err), _ = two_processes(IMAGENET_RUNNER_UNREADABLE="6")  # process 0 speaks for both
  checkpoints = tmp_path / "checkpoints"
  assert f"checkpoint {checkpoints / '6'} is not intact" in err and "simulated" in err, err
  assert "from its checkpoint of step 4" in out
  assert sorted(p.name for p in checkpoints.iterdir() if ".corrupt" in p.name) == ["6.corrupt"]
  resumed = _losses(tmp_path)
  assert sorted(resumed) == list(range(1, 7))
  for step in (5, 6):  # trained again from step 4's checkpoint, as the first time
    assert resumed[step] == pytest.approx(losses[step], rel=1e-6), step


def test_every_host_learns_that_the_workdir_is_busy(tmp_path):
  """Process 0 alone takes the lock; when another run holds it, both processes stop
  with that run's one line, and neither touches the workdir."""
  from etils import epath

  from experiments.common import lock

  flags = [f"--config={TINY}", "--config.batch_size=8", "--config.num_train_steps=2"]
  with lock.acquire(epath.Path(tmp_path)):  # held by this process
    workers = _start_two_processes(tmp_path, flags)
    try:
      results = [finish(w, status=1, timeout=TIMEOUT) for w in workers]
    finally:
      for w in workers:
        w.kill()
  lines = [err.strip().splitlines()[-1] for _, err in results]
  assert lines[0] == lines[1], lines
  assert lines[0].startswith(f"error: the workdir {tmp_path} is in use by another run (pid ")
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def _checkpoint_arrays(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  import jax

  with warnings.catch_warnings():  # "Sharding info not provided": restored as saved, on this host
    warnings.simplefilter("ignore", UserWarning)
    restored = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
  return [np.asarray(leaf) for leaf in jax.tree.leaves(restored)]


def test_killed_run_resumes_as_if_uninterrupted(tmp_path, compilation_cache):
  """The real input pipeline on mock imagenet2012 (an epoch boundary at step 5),
  killed with SIGKILL after its checkpoint of step 3, resumed by the same command:
  the same rows, byte for byte, the one whose steps span the restart included."""
  num_examples = 40
  data_dir = write_mock_metadata(tmp_path / "data", num_examples)
  flags = [
    f"--config={TINY}",
    "--config.fake_data=False",
    f"--config.tfds_data_dir={data_dir}",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
    "--config.num_train_steps=7",
    "--config.log_every=2",  # the row of step 4 averages steps 3 and 4: across the restart
    "--config.eval_every=7",
    "--config.checkpoint_every=3",
    "--config.shuffle_buffer=16",
  ]
  env = _env(
    2,
    compilation_cache,
    IMAGENET_RUNNER_MOCK=f"{num_examples}:{data_dir}",
    IMAGENET_RUNNER_MICRO="1",
  )
  _finish(_start([f"--workdir={tmp_path / 'straight'}", *flags], env))

  interrupted = _start(
    [f"--workdir={tmp_path / 'killed'}", *flags], {**env, "IMAGENET_RUNNER_STOP_AFTER": "3"}
  )
  try:
    deadline = time.monotonic() + TIMEOUT
    line = ""
    while (
      not line.startswith("saved 3") and time.monotonic() < deadline and interrupted.poll() is None
    ):
      line = interrupted.stdout.readline()
    assert line.startswith("saved 3"), interrupted.stderr.read()[-3000:]
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait(timeout=30)
  finally:
    interrupted.kill()
  assert interrupted.returncode == -signal.SIGKILL
  assert max(_losses(tmp_path / "killed")) == 2

  out, _ = _finish(_start([f"--workdir={tmp_path / 'killed'}", *flags], env))
  assert "from its checkpoint of step 3" in out
  assert sorted(_losses(tmp_path / "killed")) == [2, 4, 6, 7]
  assert (tmp_path / "killed" / "metrics.jsonl").read_bytes() == (
    tmp_path / "straight" / "metrics.jsonl"
  ).read_bytes()  # every row, its losses and evaluations
  for got, want in zip(
    _checkpoint_arrays(tmp_path / "killed", 7),
    _checkpoint_arrays(tmp_path / "straight", 7),
    strict=True,
  ):
    np.testing.assert_array_equal(got, want)


def test_a_run_says_what_it_does_without_noise(tmp_path, compilation_cache):
  """Fake data, 1 device, TensorFlow installed (TensorBoard summaries): the output a
  new user reads, line by line."""
  workdir = tmp_path / "run"
  out, err = _finish(
    _start(
      [
        f"--workdir={workdir}",
        f"--config={TINY}",
        "--config.num_train_steps=4",
        "--config.eval_every=2",
        "--config.log_every=1",
        "--config.batch_size=8",
        "--config.eval_batch_size=8",
      ],
      _env(1, compilation_cache, IMAGENET_RUNNER_MICRO="1"),
    )
  )
  lines = out.strip().splitlines()
  assert "oneDNN" not in err and "InitializeLog" not in err, err  # no TensorFlow noise
  assert (out + err).count("FAKE DATA: config.fake_data=True") == 1 and lines[0].startswith(
    "WARNING: FAKE DATA"
  )
  assert "1 device on 1 host, jit; 4 steps of 8 images (160145 steps per epoch)" in lines[1]
  rows = [line for line in lines if line.startswith("step ")]
  assert len(rows) == 4 and all(row.endswith("[FAKE DATA]") for row in rows)
  assert lines[
    2
  ] == (  # bnjax.describe's summary, before compiling (experiments/imagenet/bn_report.py)
    "batch norm: 2 layers: statistics over the batch (1 device, 8 examples), running statistics "
    "replicated, momentum 0.99; exchange 0 B + 0 B (forward + backward)"
  )
  assert lines[3].startswith("compiling the training step") and lines[4].startswith(
    "compiled and ran step 1 in "
  )
  assert lines.index(rows[0]) == 5 and rows[0].startswith("step 1/4  train_loss ")
  first_eval = next(i for i, line in enumerate(lines) if line.startswith("step 2/4"))
  assert lines[first_eval - 1].startswith("evaluating (the first evaluation compiles")
  assert "top1" in lines[first_eval] and "steps/s, ETA 0:00:0" in rows[-1]  # one speed, the ETA
  assert lines[-1] == (
    f"done: step 4/4; wrote config.json, metrics.jsonl, TensorBoard summaries and "
    f"checkpoints/ (newest: step 4) in {workdir}"
  )


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--config.no_such_field=1"], ["--config.no_such_field: no such config field", "batch_size"]),
    (["--config.batch_size=6"], ["config.batch_size=6", "multiple of the 4 devices"]),
    (["--config.image_size=100"], ["image_size", "multiple of 32"]),
  ],
  ids=["unknown_field", "batch", "image_size"],
)
def test_bad_input_is_one_line_and_no_workdir(tmp_path, flags, words):
  workdir = tmp_path / "run"
  process = _start(
    [f"--workdir={workdir}", f"--config={TINY}", *flags],
    _env(4, runner=False),
    module="experiments.imagenet",
  )
  out, err = process.communicate(timeout=TIMEOUT)
  assert process.returncode == 1, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and all(w in last for w in words), last
  assert "Traceback" not in err
  assert not workdir.exists()
