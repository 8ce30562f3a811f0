"""Figure 3 in miniature: the IDX source of the ImageNet experiment and the figure command.

The pipeline tests read Debian's real Fashion-MNIST files; the end-to-end ones train
``tests.imagenet_testing.MicroNet`` in place of the Inception (it compiles in
seconds; the networks themselves are tested in test_imagenet_models.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments.imagenet import data, figure3, figure3_config, idx_data, train
from tests import ROOT
from tests.imagenet_testing import micro_net
from tests.mnist_testing import FASHION_MNIST, write_idx


@pytest.fixture(scope="module")
def fashion_mnist(fashion_mnist_dir):
  """Debian's dataset-fashion-mnist, loaded as the ImageNet experiment's source."""
  return idx_data.open_idx_source("fashion_mnist", str(fashion_mnist_dir))


def test_evaluation_scores_each_test_image_once_on_every_host_count(fashion_mnist):
  """The hosts' batches, in host order, are the test split in order, each image once;
  compared batch by batch (the whole split is 123 MB at 32x32x3)."""
  for process_count in (1, 3):
    seen = 0
    for p in range(process_count):
      plan, batches = fashion_mnist.eval_batches(
        global_batch_size=3 * 1024, image_size=32, process_index=p, process_count=process_count
      )
      num_batches = 0
      for b in batches:
        num_batches += 1
        assert not b["image"][~b["mask"]].any()  # padding is zeros, masked out
        labels = b["label"][b["mask"]]
        expected = slice(seen, seen + len(labels))
        np.testing.assert_array_equal(labels, fashion_mnist.test_labels[expected])
        np.testing.assert_array_equal(
          b["image"][b["mask"]],
          idx_data.centred(fashion_mnist.test_images[expected], 32),
        )
        seen += len(labels)
      assert num_batches == plan.num_batches  # the same number of batches on every host
    assert seen == len(fashion_mnist.test_labels)


def test_geometry_padding_normalization_and_flips(fashion_mnist):
  pixels = idx_data.centred(fashion_mnist.test_images[:2], 32)
  assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])  # gray in all channels
  np.testing.assert_array_equal(pixels[:, 2:30, 2:30, 1], fashion_mnist.test_images[:2])
  image = data.normalize(pixels, fashion_mnist.pixel_moments)  # as the steps do
  background = -fashion_mnist.mean / fashion_mnist.std
  np.testing.assert_allclose(image[:, :2], background, rtol=1e-6)  # the 2-pixel black border
  inner = (
    fashion_mnist.test_images[:2].astype(np.float64) - fashion_mnist.mean
  ) / fashion_mnist.std
  np.testing.assert_allclose(image[:, 2:30, 2:30, 1], inner, rtol=1e-5, atol=1e-5)
  assert idx_data.centred(fashion_mnist.test_images[:2], 64).shape == (2, 64, 64, 3)
  # Training views are shifted windows of the padded item, mirrored or not:
  # Fashion-MNIST has both, MNIST (digits) never a mirror.
  padded = np.pad(fashion_mnist.test_images[:64].astype(np.float32), ((0, 0), (6, 6), (6, 6)))
  for name, mirrors in (("fashion_mnist", True), ("mnist", False)):
    source = fashion_mnist._replace(name=name)
    views = idx_data.augmented(source, fashion_mnist.test_images[:64], 32, np.random.default_rng(0))
    raw = views[..., 0].astype(np.float32)
    mirrored = []
    for i, view in enumerate(raw):
      windows = np.lib.stride_tricks.sliding_window_view(padded[i], (32, 32))
      plain = np.isclose(windows, view, atol=1e-3).all(axis=(2, 3)).any()
      flipped = np.isclose(windows, view[:, ::-1], atol=1e-3).all(axis=(2, 3)).any()
      assert plain or flipped
      mirrored.append(flipped and not plain)
    assert any(mirrored) == mirrors


def test_normalization_is_the_training_pixels_mean_and_std_in_float64(tmp_path):
  rng = np.random.default_rng(0)
  train_images = (rng.random((300, 28, 28)) ** 3 * 256).astype(np.uint8)  # skewed, every byte
  for prefix, images in (("train", train_images), ("t10k", train_images[:50] // 2)):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(len(images)) % 10)
  source = idx_data.open_idx_source("mnist", str(tmp_path))
  pixels = train_images.astype(np.float64)
  assert source.mean == pytest.approx(pixels.mean(), rel=1e-14)
  assert source.std == pytest.approx(pixels.std(), rel=1e-14)


def test_training_order_resumes_exactly(fashion_mnist):
  common = dict(global_batch_size=32, image_size=32, seed=3, process_index=1, process_count=2)
  from_start = fashion_mnist.train_batches(**common)
  batches = [next(from_start) for _ in range(5)]
  resumed = next(fashion_mnist.train_batches(start_step=3, **common))
  np.testing.assert_array_equal(resumed["image"], batches[3]["image"])
  np.testing.assert_array_equal(resumed["label"], batches[3]["label"])
  assert not np.array_equal(batches[0]["label"], batches[1]["label"])
  plan = fashion_mnist.split_plan("train", global_batch_size=32, process_count=2, train=True)
  assert plan.examples_per_host == (30_000, 30_000) and plan.num_batches == 30_000 // 16


def test_training_order_resumes_anywhere_and_hosts_cover_each_epoch(tmp_path):
  """250 training images, each of one gray value (1..250): a view's brightest pixel
  names its image whatever the crop and flip."""
  values = np.arange(1, 251)
  images = np.broadcast_to(values[:, None, None], (250, 28, 28)).astype(np.uint8)
  for prefix, part in (("train", images), ("t10k", images[:20])):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", part)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(len(part)) % 10)
  source = idx_data.open_idx_source("fashion_mnist", str(tmp_path))
  process_count, steps_per_epoch, num_steps = 2, 25, 60  # 125 images per host, 5 per batch
  hosts = [
    dict(global_batch_size=10, image_size=32, seed=4, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  uninterrupted = []
  for host in hosts:
    batches = source.train_batches(**host)
    uninterrupted.append([next(batches) for _ in range(num_steps)])
    for start in (1, 12, steps_per_epoch - 1, steps_per_epoch + 1):
      resumed = source.train_batches(start_step=start, **host)
      for want in uninterrupted[-1][start:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])

  def seen(epoch: int) -> np.ndarray:
    steps = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    views = np.concatenate([b["image"] for h in uninterrupted for b in h[steps]])
    return views.max(axis=(1, 2, 3))

  for epoch in (0, 1):  # the hosts' parts are disjoint and cover the split
    np.testing.assert_array_equal(np.sort(seen(epoch)), values)
  assert not np.array_equal(seen(0), seen(1))  # a new order every epoch


def test_missing_files_name_the_folder_and_the_package(tmp_path):
  with pytest.raises(
    data.DataError, match=f"{tmp_path}.*apt-get install dataset-fashion-mnist"
  ) as e:
    idx_data.open_idx_source("fashion_mnist", str(tmp_path))
  assert "\n" not in str(e.value)
  with pytest.raises(data.DataError, match="set --config.data_dir"):
    idx_data.open_idx_source("fashion_mnist", None)
  with pytest.raises(data.DataError, match="got config.dataset='imagenet2012'"):
    idx_data.open_idx_source("imagenet2012", str(tmp_path))


def _micro_config(data_dir, **overrides):
  miniature = figure3_config.get_config()
  miniature.update(
    data_dir=str(data_dir),
    batch_size=16,
    eval_batch_size=1024,
    num_train_steps=4,
    eval_every=2,
    checkpoint_every=2,
    log_every=1,
    **overrides,
  )
  return miniature


@pytest.mark.slow
def test_training_on_real_fashion_mnist_scores_the_test_split_once(fashion_mnist, tmp_path):
  config = figure3.variant_config("bn_x5", _micro_config(FASHION_MNIST))
  train.train_and_evaluate(config, str(tmp_path), create_model=micro_net)
  rows = train.read_metrics(tmp_path)
  evaluations = [r for r in rows if "top1" in r]
  assert [r["step"] for r in evaluations] == [2, 4]
  assert all(r["eval_examples"] == 10_000 and not r["fake_data"] for r in evaluations)
  assert all(0.0 <= r["top1"] <= 1.0 and np.isfinite(r["train_loss"]) for r in evaluations)


def test_variant_configs_keep_the_papers_rate_ratios():
  miniature = figure3_config.get_config()
  rates = {n: figure3.variant_config(n, miniature).learning_rate for n in figure3.VARIANTS}
  base = miniature.base_learning_rate
  assert rates == pytest.approx(
    {
      "inception": base,
      "bn_baseline": base,
      "bn_x5": 5 * base,
      "bn_x30": 30 * base,
      "bn_x5_sigmoid": 5 * base,
      "inception_sigmoid": base,
    }
  )
  for name in figure3.VARIANTS:
    config = figure3.variant_config(name, miniature)
    assert (config.model, config.image_size, config.num_train_steps) == ("inception_tiny", 32, 300)
  assert not figure3.variant_config("inception", miniature).batch_norm
  assert figure3.variant_config("bn_x5_sigmoid", miniature).activation == "sigmoid"


def test_table_counts_steps_to_the_inceptions_best():
  curves = {name: [(10, 0.5), (20, 0.6)] for name in figure3.VARIANTS}
  curves["bn_x5"] = [(10, 0.61), (20, 0.7)]
  curves["inception_sigmoid"] = [(10, 0.1), (20, 0.1)]
  rows = {
    r["name"]: r
    for r in figure3.table(
      curves, dict.fromkeys(figure3.VARIANTS, 1.0), dict.fromkeys(figure3.VARIANTS, False)
    )
  }
  assert rows["inception"]["steps_to_target"] == 20 and rows["bn_x5"]["steps_to_target"] == 10
  assert rows["inception_sigmoid"]["steps_to_target"] is None
  assert (rows["bn_x5"]["best_top1"], rows["bn_x5"]["best_step"]) == (0.7, 20)


def _figure_command(workdir, *flags):
  return [
    sys.executable,
    "-m",
    "tests.figure3_runner",
    f"--workdir={workdir}",
    f"--config.data_dir={FASHION_MNIST}",
    "--config.batch_size=16",
    "--config.eval_batch_size=1024",
    "--config.num_train_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=1",
    *flags,
  ]


@pytest.mark.slow
def test_figure_command_draws_the_table_and_resumes_after_a_kill(
  fashion_mnist, tmp_path_factory, tmp_path
):
  # Both commands share a compilation cache: the variants' MicroNet programs repeat.
  env = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }  # the runner sets its devices
  killed = subprocess.Popen(
    _figure_command(tmp_path),
    cwd=ROOT,
    env={**env, "FIGURE3_RUNNER_STOP_AT": "bn_x5:1"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    for line in killed.stdout:  # until bn_x5 saved its step-1 checkpoint
      if line.startswith("stopped at bn_x5 1"):
        break
    else:
      pytest.fail(f"the figure ended without reaching bn_x5's checkpoint: {killed.wait()}")
    os.kill(killed.pid, signal.SIGKILL)
  finally:
    killed.kill()
    killed.wait()
  assert not (tmp_path / "figure3.png").exists()
  finished = {
    n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in ("inception", "bn_baseline")
  }
  done = subprocess.run(
    _figure_command(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for name, mtime in finished.items():  # finished runs are not trained again
    assert f"{name}: finished, not trained again" in done.stderr
    assert (tmp_path / name / "metrics.jsonl").stat().st_mtime_ns == mtime
  assert "bn_x5: finished" not in done.stderr and "from its checkpoint of step 1" in done.stdout
  assert (tmp_path / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (tmp_path / "figure3.md").read_text()
  for name in figure3.VARIANTS:
    rows = train.read_metrics(tmp_path / name)
    assert [r["step"] for r in rows if "top1" in r] == [2], name
    best = max(r["top1"] for r in rows if "top1" in r)
    assert f"| {figure3.VARIANTS[name]} |" in table and f"{best:.1%}" in table
