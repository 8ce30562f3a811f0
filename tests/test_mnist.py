"""The MNIST experiment: data, model, training on real images, restarts, figure."""

import functools
import gzip
import json
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
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.mnist import configs, figure1, input_pipeline, train
from experiments.mnist.configs import default
from experiments.mnist.model import MLP

ROOT = pathlib.Path(__file__).resolve().parent.parent
FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fashion_mnist_dir():
  """Debian's dataset-fashion-mnist; .ci/run installs it and requires it."""
  if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
    message = "Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
    if os.environ.get("BNJAX_REQUIRE_FASHION_MNIST"):
      pytest.fail(message)
    pytest.skip(message)
  return FASHION_MNIST


def write_idx(path, array, *, gz=True):
  """An IDX file of uint8 data, written from the format's definition."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(header + array.tobytes())


def striped_images(num_train=600, num_test=200, seed=0):
  """Random images whose class is readable from a bright stripe:
  {split: (images [n, 28, 28], labels [n])} for "train" and "test"."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", num_train), ("test", num_test)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    images[np.arange(n), 2 * labels + 4, :] = 255
    arrays[split] = images, labels
  return arrays


def make_idx_folder(folder, num_train=600, num_test=200, seed=0, names=None):
  """``striped_images`` in IDX files."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  names = names or {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}
  for split, (images, labels) in striped_images(num_train, num_test, seed).items():
    write_idx(folder / names[split].format("images", 3), images)
    write_idx(folder / names[split].format("labels", 1), labels)
  return folder


def small_config(data_dir, **overrides):
  config = default.get_config()
  config.dataset, config.data_dir = "fashion_mnist", str(data_dir)
  config.num_train_steps, config.eval_every, config.checkpoint_every = 300, 100, 150
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """One run of ``small_config`` (300 steps on striped IDX images), for the slow tests
  that resume, extend or refuse a finished run: (data_dir, workdir, final state).
  A test copies the workdir (``copy_run``) before changing it."""
  assert not jax.config.jax_enable_x64  # the tests below rely on a float32 run
  folder = tmp_path_factory.mktemp("mnist_run")
  data_dir = make_idx_folder(folder / "data")
  state = train.train_and_evaluate(small_config(data_dir), folder / "run")
  return data_dir, folder / "run", state


def copy_run(trained_run, destination):
  data_dir, workdir, _ = trained_run
  shutil.copytree(workdir, destination)
  return data_dir, destination


# ---- data ------------------------------------------------------------------------


def test_idx_folder_round_trip_in_both_spellings(tmp_path):
  make_idx_folder(tmp_path / "a", seed=1)
  make_idx_folder(
    tmp_path / "b",
    seed=1,
    names={"train": "train-{}.idx{}-ubyte.gz", "test": "t10k-{}.idx{}-ubyte.gz"},
  )
  a, b = (
    input_pipeline.load_idx_folder(tmp_path / "a"),
    input_pipeline.load_idx_folder(tmp_path / "b"),
  )
  assert a.train_images.dtype == np.uint8 and a.test_labels.dtype == np.int32
  written = striped_images(seed=1)
  want = (*written["train"], *written["test"])  # train images, labels, test images, labels
  for got in (a, b):
    assert len(got) == len(want) == 4
    for x, y in zip(got, want, strict=True):
      np.testing.assert_array_equal(x, y)
      assert x.shape == y.shape


def test_read_idx_uncompressed(tmp_path):
  write_idx(tmp_path / "x-idx1-ubyte", np.arange(7), gz=False)
  np.testing.assert_array_equal(
    input_pipeline.read_idx(tmp_path / "x-idx1-ubyte", expected_magic=2049), np.arange(7)
  )


@pytest.mark.parametrize(
  "corrupt, match",
  [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], r"magic number 0x00000801, expected 0x00000803"),
    (lambda raw: raw[:-10], r"header says shape \(600, 28, 28\).*truncated"),
    (lambda raw: raw + b"\x00", "too long"),
    (lambda raw: raw[:6], "truncated inside the header"),
  ],
)
def test_corrupted_idx_files_name_the_file(tmp_path, corrupt, match):
  folder = make_idx_folder(tmp_path)
  path = folder / "train-images-idx3-ubyte.gz"
  raw = gzip.open(path).read()
  with gzip.open(path, "wb") as f:
    f.write(corrupt(raw))
  with pytest.raises(input_pipeline.DataError, match=f"train-images-idx3-ubyte.gz: .*{match}"):
    input_pipeline.load_idx_folder(folder)


def test_labels_validated(tmp_path):
  folder = make_idx_folder(tmp_path)
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(200, 12))
  with pytest.raises(input_pipeline.DataError, match="label 12 outside 0..9"):
    input_pipeline.load_idx_folder(folder)
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(150))
  with pytest.raises(input_pipeline.DataError, match="150 labels for 200 images"):
    input_pipeline.load_idx_folder(folder)


def test_missing_file_says_how_to_get_the_data(tmp_path):
  folder = make_idx_folder(tmp_path)
  (folder / "t10k-images-idx3-ubyte.gz").unlink()
  with pytest.raises(
    input_pipeline.DataError, match="no test images file .*apt-get install dataset-fashion-mnist"
  ):
    input_pipeline.load_idx_folder(folder)


def test_tfds_pipeline_with_mock_data(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(input_pipeline, "internet_reachable", lambda: True)
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    data = input_pipeline.load_dataset("mnist", tfds_data_dir=str(tmp_path))
    # Reference: the same (deterministic) mock examples read through tfds.load itself.
    examples = {
      split: list(tfds.as_numpy(tfds.load("mnist", split=split, data_dir=str(tmp_path))))
      for split in ("train", "test")
    }
  assert data.train_images.dtype == np.uint8 and data.test_labels.dtype == np.int32
  for split, images, labels in (
    ("train", data.train_images, data.train_labels),
    ("test", data.test_images, data.test_labels),
  ):
    np.testing.assert_array_equal(images, np.stack([e["image"][..., 0] for e in examples[split]]))
    np.testing.assert_array_equal(labels, [e["label"] for e in examples[split]])
    assert images.shape == (24, 28, 28) and images.std() > 10  # random pixels, not a blank
  assert data.train_labels.min() >= 0 and data.train_labels.max() <= 9


def test_tfds_offline_fails_fast_with_the_alternative(monkeypatch, tmp_path):
  monkeypatch.setattr(input_pipeline, "internet_reachable", lambda: False)
  with pytest.raises(input_pipeline.DataError, match="no internet connection.*--config.data_dir"):
    input_pipeline.load_dataset("mnist", tfds_data_dir=str(tmp_path))


# ---- model -------------------------------------------------------------------------


def numpy_forward(variables, images, *, batch_norm, train, eps=1e-5):
  """Section 4.1's network written out in float64 NumPy."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  for i in range(3):
    layer = params[f"Dense_{i}"]
    x = x @ layer["kernel"]
    if batch_norm:
      bn = params[f"BatchNorm_{i}"]
      if train:
        mean, var = x.mean(0), x.var(0)
      else:
        stats = variables["batch_stats"][f"BatchNorm_{i}"]
        mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
      x = bn["scale"] * (x - mean) / np.sqrt(var + eps) + bn["bias"]
    else:
      x = x + layer["bias"]
    sigmoid_inputs = x
    x = 1 / (1 + np.exp(-x))
  head = params["Dense_3"]
  return x @ head["kernel"] + head["bias"], sigmoid_inputs


def random_variables(model, seed=0):
  """Variables of ``model`` with random values (NumPy, nothing compiled): kernels
  N(0, 0.1^2), every other parameter and statistic its initial value (scale and
  var 1, bias and mean 0) plus U(0, 0.3), so that none is at its initial value."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 28, 28), jnp.float32),
  )

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      value = rng.normal(0, 0.1, leaf.shape)
    else:
      value = float(name.endswith(("['scale']", "['var']"))) + rng.uniform(0, 0.3, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("batch_norm, training", [(True, True), (True, False), (False, False)])
def test_model_forward_matches_numpy(batch_norm, training):
  images = np.random.default_rng(1).uniform(size=(8, 28, 28)).astype(np.float32)
  model = MLP(batch_norm=batch_norm)
  variables = random_variables(model)
  apply = jax.jit(functools.partial(model.apply, train=training, mutable=["batch_stats"]))
  (logits, sigmoid_inputs), _ = apply(variables, images)
  want_logits, want_inputs = numpy_forward(variables, images, batch_norm=batch_norm, train=training)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sigmoid_inputs, want_inputs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "batch_norm, count",
  [
    # 784-100-100-100-10 counted by hand: weights, plus per hidden unit BN's gamma
    # and beta (Section 3.2: BN's beta replaces the bias) or one bias; the head's bias.
    (True, 784 * 100 + 2 * 100 * 100 + 3 * 100 * 2 + 100 * 10 + 10),  # 100,010
    (False, 784 * 100 + 2 * 100 * 100 + 3 * 100 + 100 * 10 + 10),  # 99,710
  ],
)
def test_parameters_are_section_4_1s_network(batch_norm, count):
  variables = jax.eval_shape(
    functools.partial(MLP(batch_norm=batch_norm).init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((2, 28, 28), jnp.float32),
  )
  shapes = {
    jax.tree_util.keystr(path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
  }
  assert sum(int(np.prod(s)) for s in shapes.values()) == count
  assert [shapes[f"['Dense_{i}']['kernel']"] for i in range(4)] == [
    (784, 100),
    (100, 100),
    (100, 100),
    (100, 10),
  ]
  assert shapes["['Dense_3']['bias']"] == (10,)
  for i in range(3):  # the hidden layers have no bias with batch norm: BN's bias replaces it
    assert (f"['Dense_{i}']['bias']" in shapes) == (not batch_norm)
    assert shapes.get(f"['BatchNorm_{i}']['bias']") == ((100,) if batch_norm else None)
  assert set(variables) == ({"params", "batch_stats"} if batch_norm else {"params"})


# ---- training ----------------------------------------------------------------------


def test_data_order_depends_only_on_seed_and_step():
  images = (np.arange(50 * 784).reshape(50, 28, 28) % 251).astype(np.uint8)  # 50 different images
  labels = np.arange(50, dtype=np.int32) % 10
  data = train.DeviceData(
    *(
      jnp.asarray(a)
      for a in (images, labels, np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int32))
    )
  )
  sample = jax.jit(train.sample_batch, static_argnums=3)
  key = jax.random.key(3)
  a = sample(data, key, jnp.int32(17), 6)
  b = sample(data, key, jnp.int32(17), 6)
  c = sample(data, key, jnp.int32(18), 6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  # Each example is one training image scaled to [0, 1], with its own label.
  for batch_images, batch_labels in (a, c):
    assert batch_images.shape == (6, 28, 28) and batch_images.dtype == jnp.float32
    for image, label in zip(
      np.asarray(batch_images, np.float64), np.asarray(batch_labels), strict=True
    ):
      index = np.flatnonzero((np.abs(images / 255.0 - image) < 1e-6).all(axis=(1, 2)))
      assert len(index) == 1 and labels[index[0]] == label


@pytest.mark.slow
def test_batch_norm_trains_faster_on_real_fashion_mnist(fashion_mnist_dir, tmp_path):
  # Measured at 1,000 steps, learning rate 0.01, seeds 0-2: BN 0.73-0.74 test
  # accuracy, baseline 0.11-0.15 (margin >= 0.58). Asserted: half that margin.
  accuracy = {}
  for batch_norm in (True, False):
    config = small_config(
      fashion_mnist_dir,
      batch_norm=batch_norm,
      num_train_steps=1000,
      eval_every=1000,
      checkpoint_every=1000,
    )
    train.train_and_evaluate(config, tmp_path / str(batch_norm))
    accuracy[batch_norm] = train.read_metrics(tmp_path / str(batch_norm))[-1]["test_accuracy"]
  assert accuracy[True] > 0.6, accuracy
  assert accuracy[True] - accuracy[False] > 0.29, accuracy


@pytest.mark.slow
def test_metrics_and_config_are_written(trained_run):
  data_dir, workdir, state = trained_run
  metrics = train.read_metrics(workdir)
  assert [m["step"] for m in metrics] == [100, 200, 300]
  for m in metrics:
    assert set(m) == {
      "step",
      "test_accuracy",
      "test_loss",
      "train_loss",
      "sigmoid_input_p15",
      "sigmoid_input_p50",
      "sigmoid_input_p85",
    }
    assert m["sigmoid_input_p15"] <= m["sigmoid_input_p50"] <= m["sigmoid_input_p85"]
  assert metrics[-1]["test_accuracy"] > 0.5  # the stripes are easy to read
  assert json.loads((workdir / "config.json").read_text())["config"]["num_train_steps"] == 300
  # The last evaluation, recomputed in float64 NumPy from the final state (running statistics).
  assert int(state.step) == 300
  data = input_pipeline.load_idx_folder(data_dir)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits, sigmoid_inputs = numpy_forward(
    variables, data.test_images / 255.0, batch_norm=True, train=False
  )
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  last = metrics[-1]
  # Accuracy: a float32 logit may order two near-equal classes differently; allow one image.
  assert abs(last["test_accuracy"] - np.mean(logits.argmax(1) == data.test_labels)) <= 1 / 200
  assert last["test_loss"] == pytest.approx(
    -log_probs[np.arange(200), data.test_labels].mean(), rel=1e-4
  )
  want = np.percentile(sigmoid_inputs[:, 0], train.PERCENTILES)  # tracked_unit 0
  got = [last[f"sigmoid_input_p{p}"] for p in train.PERCENTILES]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("dataset", "cifar10", "config.dataset must be one of"),
    ("num_train_steps", -5, "config.num_train_steps must be a positive integer, got -5"),
    ("batch_size", 0, "config.batch_size must be a positive integer"),
    ("learning_rate", 0.0, "config.learning_rate must be a positive finite number"),
    ("tracked_unit", 100, "config.tracked_unit must index the last hidden layer"),
  ],
)
def test_bad_config_values(tmp_path, field, value, match):
  config = small_config(tmp_path)
  config[field] = value
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(config, tmp_path / "run")


def _run_cli(workdir, data_dir, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.mnist",
    f"--workdir={workdir}",
    "--config.dataset=fashion_mnist",
    f"--config.data_dir={data_dir}",
    "--config.num_train_steps=20000",
    "--config.eval_every=1000",
    "--config.checkpoint_every=2000",
    *extra,
  ]


def _final_state(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute()) as manager:
    return manager.restore(manager.latest_step())


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data", num_train=2000)
  env = {
    **os.environ,
    "XLA_FLAGS": "",
    "JAX_PLATFORMS": "cpu",  # the resumed run reuses the others' programs
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  # The uninterrupted run trains beside the one to be killed (two cores, half the wait).
  whole_log = (tmp_path / "whole.log").open("w")  # a file: a full pipe would stall the run
  whole = subprocess.Popen(
    _run_cli(tmp_path / "whole", data_dir),
    cwd=ROOT,
    env=env,
    stdout=whole_log,
    stderr=subprocess.STDOUT,
  )
  interrupted = subprocess.Popen(
    _run_cli(tmp_path / "cut", data_dir),
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
      _run_cli(tmp_path / "cut", data_dir),
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
    _run_cli(tmp_path / "cut", data_dir), cwd=ROOT, env=env, check=True, capture_output=True
  )
  assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == (
    tmp_path / "whole" / "metrics.jsonl"
  ).read_bytes()
  whole, cut = _final_state(tmp_path / "whole"), _final_state(tmp_path / "cut")
  assert jax.tree.structure(whole) == jax.tree.structure(cut)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(cut), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_figure1_draws_a_png_from_both_runs(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data")
  config = small_config(data_dir)
  path = figure1.run_figure1(config, tmp_path / "fig")
  assert path == tmp_path / "fig" / "figure1.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
  assert (
    len(train.read_metrics(tmp_path / "fig" / "bn"))
    == len(train.read_metrics(tmp_path / "fig" / "baseline"))
    == 3
  )
  assert (
    json.loads((tmp_path / "fig" / "baseline" / "config.json").read_text())["config"]["batch_norm"]
    is False
  )
  assert (
    json.loads((tmp_path / "fig" / "bn" / "config.json").read_text())["config"]["batch_norm"]
    is True
  )


def test_default_config_is_the_paper_setup():
  config = default.get_config()
  assert (config.num_train_steps, config.batch_size, tuple(config.hidden_sizes)) == (
    50_000,
    60,
    (100, 100, 100),
  )
  assert pathlib.Path(configs.DEFAULT).name == "default.py"


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


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("hidden_sizes", (), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("hidden_sizes", (100, 0), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("hidden_sizes", (100.5,), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("learning_rate", float("inf"), "learning_rate must be a positive finite number"),
    ("init_stddev", float("nan"), "init_stddev must be a positive finite number"),
  ],
)
def test_more_bad_config_values(tmp_path, field, value, match):
  config = small_config(tmp_path)
  config[field] = value
  with pytest.raises(train.ConfigError, match=match):
    train.validate_config(config)


def test_corrupt_gzip_and_empty_files_are_data_errors(tmp_path):
  folder = make_idx_folder(tmp_path)
  path = folder / "train-images-idx3-ubyte.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[:20] + bytes(b ^ 0xFF for b in raw[20:200]) + raw[200:])
  with pytest.raises(input_pipeline.DataError, match="train-images-idx3-ubyte.gz: cannot be read"):
    input_pipeline.load_idx_folder(folder)
  folder = make_idx_folder(tmp_path / "empty", num_test=0)
  with pytest.raises(input_pipeline.DataError, match="t10k-images-idx3-ubyte.gz: holds no images"):
    input_pipeline.load_idx_folder(folder)


# ---- runs that lose nothing (issue 12) ------------------------------------------


def _assert_same_states(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


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
    [
      sys.executable,
      "-c",
      limit_file_size,
      "-m",
      "experiments.mnist",
      f"--workdir={workdir}",
      "--config.dataset=fashion_mnist",
      f"--config.data_dir={data_dir}",
      "--config.num_train_steps=300",
      "--config.eval_every=100",
      "--config.checkpoint_every=150",
    ],
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": ""},
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
    [
      *as_user,
      sys.executable,
      "-m",
      "experiments.mnist",
      f"--workdir={workdir}",
      "--config.dataset=fashion_mnist",
      f"--config.data_dir={data_dir}",
      "--config.num_train_steps=300",
    ],
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": ""},
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
  assert "does not match its checksum" in err and "trying the older step 150" in err
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
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  data_dir = make_idx_folder(tmp_path / "data")
  train_step = train.train_step

  def diverging_step(state, images, labels, **kwargs):  # the loss of step 251 is NaN
    new = train_step(state, images, labels, **kwargs)
    nan = jnp.where(state.step == 250, jnp.float32(jnp.nan), jnp.float32(0))
    return new._replace(loss_sum=new.loss_sum + nan)

  monkeypatch.setattr(train, "train_step", diverging_step)
  with pytest.raises(
    common.NonFiniteError,
    match=r"training loss is nan at step 251; stopped there. The last "
    r"checkpoint, of step 150, is kept",
  ):
    train.train_and_evaluate(small_config(data_dir), tmp_path / "run")
  assert [m["step"] for m in train.read_metrics(tmp_path / "run")] == [100, 200]
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["150"]


@pytest.mark.slow
def test_a_huge_learning_rate_stops_with_a_clear_error(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data")
  with pytest.raises(
    common.NonFiniteError,
    match=r"training loss is (nan|inf) at step \d+; .*smaller "
    r"config.learning_rate \(now 1e\+30\)",
  ):
    train.train_and_evaluate(small_config(data_dir, learning_rate=1e30), tmp_path / "run")
  text = (
    (tmp_path / "run" / "metrics.jsonl").read_text()
    if (tmp_path / "run" / "metrics.jsonl").exists()
    else ""
  )
  assert "NaN" not in text and "Infinity" not in text


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


def test_evaluation_data_are_arguments_not_constants():
  """Closed-over images are folded into the program as constants: a slow compile."""
  rng = np.random.default_rng(0)
  data = train.DeviceData(
    *(
      jnp.asarray(a)
      for a in (
        rng.integers(0, 256, (500, 28, 28), np.uint8),
        rng.integers(0, 10, 500, np.int32),
        rng.integers(0, 256, (300, 28, 28), np.uint8),
        rng.integers(0, 10, 300, np.int32),
      )
    )
  )
  config = small_config("unused")
  model, optimizer = train.make_model(config), train.make_optimizer(config)
  variables = random_variables(model)  # train.initial_state's threefry init compiles for seconds
  state = train.TrainState(
    step=jnp.int32(0),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=optimizer.init(variables["params"]),
    loss_sum=jnp.float32(3.0),
    loss_count=jnp.int32(2),
  )
  data_key = jax.random.key(1)
  run_steps, run_evaluation = train.compile_steps(
    state, data, data_key, model=model, optimizer=optimizer, config=config
  )
  for compiled in (run_steps, run_evaluation):
    shapes = re.findall(r"= \w+\[([\d,]*)\]\S* constant\(", compiled.as_text())
    sizes = [int(np.prod([int(d) for d in shape.split(",") if d])) for shape in shapes]
    assert sizes and max(sizes) < 300, (
      sizes
    )  # closed over, the images became f32[300,784] constants
  got = run_evaluation(state, data)
  want = jax.jit(
    lambda state: train.evaluate(state, data, model=model, tracked_unit=config.tracked_unit)
  )(state)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_figure1_legends_hide_no_curve():
  """Panel (c)'s legend once sat on its 15th-percentile curve, which runs low to the right."""
  steps = range(500, 50_001, 500)
  noise = np.random.default_rng(0).normal(0, 0.1, (len(steps), 3))

  def run(levels, first_accuracy, last_accuracy):  # shaped as in docs/figure1.png
    return [
      {
        "step": s,
        "test_accuracy": last_accuracy - (last_accuracy - first_accuracy) * np.exp(-s / 8000),
        **{
          f"sigmoid_input_p{p}": level + n
          for p, level, n in zip(train.PERCENTILES, levels, noise[i], strict=True)
        },
      }
      for i, s in enumerate(steps)
    ]

  fig = figure1.make_figure1(
    run((-1.4, 0.0, 1.5), 0.7, 0.87), run((-0.7, -0.3, 0.2), 0.1, 0.8), title="test"
  )
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
  assert len(legends) == 2  # (a)'s, and one for the percentiles
  for legend in legends:
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
      for line in ax.get_lines():
        points = ax.transData.transform(line.get_xydata())
        inside = (
          (box.x0 <= points[:, 0])
          & (points[:, 0] <= box.x1)
          & (box.y0 <= points[:, 1])
          & (points[:, 1] <= box.y1)
        )
        assert not inside.any(), (line.get_label(), ax.get_title())
  import matplotlib.pyplot as plt

  plt.close(fig)


def test_a_renamed_field_set_in_python_is_refused_not_ignored(tmp_path):
  config = small_config(tmp_path, num_steps=5)  # the old name: it would train num_train_steps
  with pytest.raises(common.ConfigError, match=r"config.num_steps is now config.num_train_steps"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
