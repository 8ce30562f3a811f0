"""Test data, references and command lines for the MNIST experiment's tests, and
their fixtures (registered for the whole suite by ``tests/conftest.py``).

* ``make_idx_folder``: ``striped_images`` (random images whose class a bright
  stripe shows) written as the four IDX files of the MNIST format.
* ``small_config``: the default config on such a folder, 300 steps.
* ``numpy_forward`` and ``random_variables``: Section 4.1's network in float64
  NumPy, and random variables for it (nothing compiled).
* ``mnist_command``: the ``python -m experiments.mnist`` command line.
* Fixtures: ``fashion_mnist_dir`` (Debian's real Fashion-MNIST files) and
  ``trained_run`` (one ``small_config`` run, for the tests that resume it).
"""

import functools
import gzip
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Steps, evaluations and checkpoints of ``small_config``'s run (seconds on a CPU).
SMALL_RUN = {"num_train_steps": 300, "eval_every": 100, "checkpoint_every": 150}
# A run long enough to be still alive when a test kills it or launches a second one.
LONG_RUN = {"num_train_steps": 20000, "eval_every": 1000, "checkpoint_every": 2000}


def config_flags(**fields):
  """``--config.FIELD=VALUE`` flags: ``config_flags(**SMALL_RUN)``."""
  return [f"--config.{name}={value}" for name, value in fields.items()]


def mnist_command(workdir, data_dir, *flags, module="experiments.mnist", python=(sys.executable,)):
  """The command line of ``python -m experiments.mnist`` (or of ``module``) on
  ``workdir``: on the IDX folder ``data_dir`` as Fashion-MNIST, or without data
  flags if it is None; then ``flags``. ``python``: what runs the module (a wrapper
  may come first: ``("python", "-c", code)``)."""
  data = (
    [] if data_dir is None else ["--config.dataset=fashion_mnist", f"--config.data_dir={data_dir}"]
  )
  return [*python, "-m", module, f"--workdir={workdir}", *data, *flags]


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
  """The default config on the IDX folder ``data_dir``, for ``SMALL_RUN``'s steps."""
  from experiments.mnist.configs import default

  config = default.get_config()
  config.dataset, config.data_dir = "fashion_mnist", str(data_dir)
  config.update(SMALL_RUN)
  config.update(overrides)
  return config


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


def copy_run(trained_run, destination):
  """A copy of ``trained_run``'s workdir at ``destination``: (data_dir, destination)."""
  data_dir, workdir, _ = trained_run
  shutil.copytree(workdir, destination)
  return data_dir, destination


@pytest.fixture(scope="module")
def fashion_mnist_dir():
  """Debian's dataset-fashion-mnist; .ci/run installs it and requires it."""
  if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
    message = "Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
    if os.environ.get("BNJAX_REQUIRE_FASHION_MNIST"):
      pytest.fail(message)
    pytest.skip(message)
  return FASHION_MNIST


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """One run of ``small_config`` (300 steps on striped IDX images), for the slow tests
  that resume, extend or refuse a finished run: (data_dir, workdir, final state).
  A test copies the workdir (``copy_run``) before changing it."""
  from experiments.mnist import train

  assert not jax.config.jax_enable_x64  # the tests that use it rely on a float32 run
  folder = tmp_path_factory.mktemp("mnist_run")
  data_dir = make_idx_folder(folder / "data")
  state = train.train_and_evaluate(small_config(data_dir), folder / "run")
  return data_dir, folder / "run", state
