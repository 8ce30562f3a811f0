"""The benchmark runs (tiny, quick mode) so that it cannot rot; timings are not
asserted here, only that every section produced its figures."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import forward, run


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
  # Flax's BatchNorm, one of the candidates, relies on implicit promotion.
  with jax.numpy_dtype_promotion("standard"):
    results = run.main(["--quick", "--output-dir", str(tmp_path)])
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["settings"]["quick"] is True
  assert len(written["batch_norm"]) == 3
  for case in written["batch_norm"]:
    assert set(case["forward_backward_s"]) == {"bnjax", "flax_fast", "flax_exact", "naive_two_pass"}
    assert all(t > 0 for t in case["forward_backward_s"].values())
  # Structural facts, not timings: one collective per direction on every call, and
  # two more in the forward's rarely taken branches (bnjax.stats.synchronized_moments).
  every_call = results["collectives"]["bnjax"]["run_on_every_call"]
  assert every_call["pmap_forward"] == {"all-reduce": 1}
  assert every_call["pmap_forward_backward"] == {"all-reduce": 2}
  assert results["collectives"]["bnjax"]["pmap_forward_backward"] == {"all-reduce": 4}
  for setting in (written["resnet"], written["resnet"]["synchronized"]):
    assert min(setting["step_s"].values()) > 0
  markdown = (tmp_path / "BENCHMARKS.md").read_text()
  assert "under `shard_map` over 2 CPU devices, statistics synchronized" in markdown
  for heading in ("### 1, 2.", "### 3.", "### 4.", "### 5.", "### 6."):
    assert heading in markdown


@pytest.mark.slow
def test_quick_forward_benchmark_writes_results(tmp_path):
  results = forward.main(["--quick", "--output-dir", str(tmp_path)])
  written = json.loads((tmp_path / "forward.json").read_text())
  assert written == json.loads(json.dumps(results))
  (case,) = written["cases"]
  assert set(case["seconds"]) == set(forward.CANDIDATES)
  assert all(t > 0 for t in case["seconds"].values())
  assert case["vs_flax_fast"]["flax_fast"]["median"] == 1
  assert case["case"] in (tmp_path / "forward.md").read_text()


@pytest.mark.slow
def test_small_accelerator_benchmark_fills_every_table(tmp_path):
  """``benchmarks.accelerator --small`` on the suite's 8 CPU devices: every section
  holds positive timings (or counts); another backend's results (here, a run whose
  time budget let no section start, renamed) stay, and are reported as skipped."""
  from benchmarks import accelerator

  results_path = tmp_path / "accelerator_results.json"
  accelerator.main(["--small", "--output-dir", str(tmp_path), "--budget-s", "-1"])
  ((_, skipped),) = json.loads(results_path.read_text())["backends"].items()
  assert skipped["skipped"] == ["batch_norm", "steering", "collectives", "training_steps"]
  results_path.write_text(json.dumps({"backends": {"tpu: TPU v9": skipped}}))
  with jax.numpy_dtype_promotion("standard"):  # Flax's BatchNorm relies on implicit promotion
    accelerator.main(["--small", "--output-dir", str(tmp_path)])
  backends = json.loads(results_path.read_text())["backends"]
  assert backends["tpu: TPU v9"] == skipped
  (key,) = set(backends) - {"tpu: TPU v9"}
  assert key.startswith("cpu: ") and "small mode" in key
  run = backends[key]
  assert run["skipped"] == [] and run["settings"]["small"] is True
  timings = [t for case in run["batch_norm"] for t in case["forward_backward_s"].values()]
  timings += [t for case in run["batch_norm"] for t in case["forward_s"].values()]
  timings += [t for case in run["steering"] for t in case["forward_backward_s"].values()]
  timings += [t for step in run["training_steps"] for t in step["step_s"].values()]
  assert len(timings) == 2 * 3 + 2 * 3 + 2 * 2 + 2 * 2 and min(timings) > 0
  for case in run["steering"]:  # the forcing reached the program, both ways
    assert case["programs"]["barriers"]["stablehlo_barriers"] > 0
    assert case["programs"]["no_barriers"]["stablehlo_barriers"] == 0
  assert run["collectives"]["devices"] == len(jax.local_devices()) == 8
  assert run["collectives"]["bnjax"]["pmap_forward"]["every_call"] == {"all-reduce": 1}
  markdown = (tmp_path / "accelerator_results.md").read_text()
  for heading in (f"## {key}", "## tpu: TPU v9", "### 1.", "### 2.", "### 3.", "### 4."):
    assert heading in markdown
  assert markdown.count("Skipped: over the time budget.") == 4


def _constant_sizes(lowered_text: str) -> list[int]:
  """Element counts of the constants in a lowered (StableHLO) program."""
  shapes = re.findall(r"stablehlo\.constant dense<.*?> : tensor<((?:\d+x)*)\w+>", lowered_text)
  return [int(np.prod([int(d) for d in shape.split("x") if d])) for shape in shapes]


def test_mnist_loop_benchmark_takes_the_data_as_arguments():
  """Closed over, the images would be folded into the programs as constants (and the
  timing would be of another program than the experiment's). Lowered only: shapes."""
  from experiments.mnist import train
  from experiments.mnist.configs import default

  config = default.get_config()
  model, optimizer = train.make_model(config), train.make_optimizer(config)
  data = train.DeviceData(
    jax.ShapeDtypeStruct((500, 28, 28), jnp.uint8),
    jax.ShapeDtypeStruct((500,), jnp.int32),
    jax.ShapeDtypeStruct((300, 28, 28), jnp.uint8),
    jax.ShapeDtypeStruct((300,), jnp.int32),
  )
  state = jax.eval_shape(
    functools.partial(train.initial_state, model, optimizer), jax.random.key(0)
  )
  data_key = jax.eval_shape(lambda: jax.random.key(1))
  on_device, one_step = run.mnist_loops(config, model, optimizer)
  plain_params = jax.eval_shape(functools.partial(run.plain_jax_mnist_params, config))
  plain_steps = run.plain_jax_mnist_steps(config)
  programs = {
    "on_device": on_device.lower(state, data, data_key, jnp.int32(1)),
    "one_step": one_step.lower(state, data, data_key),
    "plain_jax": plain_steps.lower(
      plain_params, data.train_images, data.train_labels, jnp.int32(1)
    ),
  }
  for name, lowered in programs.items():
    sizes = _constant_sizes(lowered.as_text())
    assert sizes and max(sizes) < 1000, (
      name,
      sorted(sizes)[-3:],
    )  # the images: 500 x 784 = 392,000
    donated = [arg for arg in jax.tree.leaves(lowered.args_info) if arg.donated]
    assert len(donated) == (0 if name == "plain_jax" else len(jax.tree.leaves(state))), name
  # The check sees images that are closed over.
  images = jnp.zeros((500, 28, 28), jnp.uint8)
  closed_over = jax.jit(lambda i: images[i].astype(jnp.float32).sum()).lower(jnp.int32(0))
  assert max(_constant_sizes(closed_over.as_text())) == 500 * 28 * 28


@pytest.mark.slow
def test_quick_resume_benchmark_writes_results(tmp_path):
  from benchmarks import resume

  resume.main(["--quick", "--output_dir", str(tmp_path), "--data_dir", str(tmp_path / "data")])
  written = json.loads((tmp_path / "resume_results.json").read_text())
  assert [c["reader"] for c in written["cases"]] == ["TFRecord (tf.data)", "ArrayRecord (grain)"]
  for case in written["cases"]:
    assert len(case["first_batch_s"]) == len(resume.POSITIONS)
    assert all(t > 0 for times in case["first_batch_s"] for t in times)
    assert case["image_bytes_float32"] == 4 * case["image_bytes_uint8"] > 0
  assert "start at 99% of the epoch" in (tmp_path / "resume_results.md").read_text()


def test_resume_extrapolation_scales_the_skipping_cost_and_says_when_there_is_none():
  """A quick run's first batches can come as fast at the last position as at the
  first (timing noise): the report says so instead of dividing by zero."""
  from benchmarks import resume

  def results(first_s, last_s):
    case = {
      "reader": "TFRecord (tf.data)",
      "first_batch_s": [[first_s], [last_s]],
      "starts": [0, 100],
      "bytes_per_example": 50_000,
    }
    return {"cases": [case], "settings": {"batch_size": 10}}

  (measured,) = resume._extrapolation(results(0.5, 1.5))  # 1 ms per skipped example
  assert "1000 us per example" in measured and "50 MB/s" in measured
  for last_s in (0.5, 0.4):
    (none,) = resume._extrapolation(results(0.5, last_s))
    assert "no measurable time" in none
