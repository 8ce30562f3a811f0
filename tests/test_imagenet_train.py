"""The ImageNet experiment's training (in this process, 8 CPU devices): jit and pmap
take the same step; BN statistics per device, per group and over all devices are
those of the global batch's rows; each model family trains through the real input
pipeline on mock imagenet2012; evaluation scores every example once; bad input
fails before any compile and writes nothing."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import linen as nn

from experiments import common
from experiments.common import run as common_run
from experiments.imagenet import data, input_pipeline, parallel, train
from tests.imagenet_testing import (
  micro_net,
  prepare_tiny_imagenet,
  tiny_config,
  write_mock_metadata,
)

BATCH = 16  # 2 examples on each of the 8 devices


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
  return prepare_tiny_imagenet(
    tmp_path_factory.mktemp("tiny_imagenet"), train_per_class=8, num_val=13
  )


@pytest.fixture(scope="module")
def micro_state():
  """MicroNet's initial state for ``tiny_config(batch_size=BATCH)``, on the host. Its
  variables do not depend on how statistics are grouped, their momentum or the
  layout, so every test below starts from this one (one init compile)."""
  exp = train.prepare(tiny_config(batch_size=BATCH), create_model=micro_net)
  return parallel.host_copy(train.make_initial_state(exp))


def _one_step(parallelism: str, config, host_state, batch):
  exp = train.prepare(_with(config, parallelism=parallelism), create_model=micro_net)
  layout = exp.layout
  state = (
    parallel.to_pmap_replicated(layout, host_state)
    if parallelism == "pmap"
    else parallel.to_global_replicated(layout, host_state)
  )
  new_state, metrics = train.make_train_step(exp)(state, parallel.to_device_batch(layout, batch))
  if parallelism == "pmap":
    new_state = parallel.from_pmap_replicated(layout, new_state)
  return parallel.host_copy(new_state), jax.device_get(metrics)


def _with(config, **fields):
  config = config.copy_and_resolve_references()
  config.update(fields)
  return config


def _fake_batch(seed: int = 0) -> dict:
  return _fake_batches(seed)[0]


def _fake_batches(seed: int) -> list[dict]:
  """The fake source's distinct training batches (it cycles them)."""
  batches = data.FakeSource(num_eval_examples=0).train_batches(
    global_batch_size=BATCH, image_size=32, seed=seed, process_index=0, process_count=1
  )
  return [next(batches) for _ in range(data.FAKE_BATCHES)]


def _network_input(images: np.ndarray) -> np.ndarray:
  """uint8 images as the steps hand them to the network: normalized float32."""
  return data.normalize(images, data.IMAGENET_PIXELS)


# Groups of 2 devices: slow (compiling both steps takes seconds); their forward
# statistics are checked fast below, in both layouts.
@pytest.mark.parametrize("group_size", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_pmap_and_jit_take_the_same_step(micro_state, group_size):
  config = tiny_config(batch_size=BATCH, bn_group_size=group_size, bn_momentum=0.5)
  host_state = micro_state
  batch = _fake_batch()
  jit_state, jit_metrics = _one_step("jit", config, host_state, batch)
  pmap_state, pmap_metrics = _one_step("pmap", config, host_state, batch)

  np.testing.assert_allclose(pmap_metrics["loss"], np.full(8, jit_metrics["loss"]), rtol=1e-5)
  assert int(jit_state.step) == int(pmap_state.step) == 1
  for name, tree in (("params", 0), ("batch_stats", 1)):
    want, got = (
      jax.tree.leaves((jit_state.params, jit_state.batch_stats)[tree]),
      jax.tree.leaves((pmap_state.params, pmap_state.batch_stats)[tree]),
    )
    assert len(want) == len(got) > 0
    for w, g in zip(want, got, strict=True):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=name)
  # The step moved the parameters and statistics (the comparison is not vacuous).
  moved = [
    np.abs(a - b).max()
    for a, b in zip(
      jax.tree.leaves(jit_state.params), jax.tree.leaves(host_state.params), strict=True
    )
  ]
  assert min(moved) > 1e-5
  assert np.abs(jit_state.batch_stats["bn1"]["mean"]).max() > 1e-3


def _bn1_input_output_and_state(model, variables, images):
  """The first BN layer's input and output and its new running statistics."""
  captured = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == "bn1":
      captured["x"], captured["y"] = args[0], out
    return out

  with nn.intercept_methods(record):
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return captured["x"], captured["y"], updates["batch_stats"]["bn1"]


# The fast set keeps groups of devices (each device moves by its group's statistics
# under pmap) and groups with virtual batches within them (the mean over all groups);
# the other groupings are slow (each case compiles its own program: issue 19, the
# fast set under 90 s).
@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
@pytest.mark.parametrize(
  "group_size, virtual_batch_size, num_groups",
  [
    pytest.param(0, 0, 1, marks=pytest.mark.slow),
    pytest.param(1, 0, 8, marks=pytest.mark.slow),
    (4, 0, 2),
    pytest.param(0, 2, 8, marks=pytest.mark.slow),
    pytest.param(0, 4, 4, marks=pytest.mark.slow),
    (4, 1, 16),
  ],
  ids=["all", "per_device", "groups_of_4", "virtual_2", "virtual_4", "groups_of_4_virtual_1"],
)
def test_batch_norm_statistics_are_those_of_the_global_batch(
  micro_state, parallelism, group_size, virtual_batch_size, num_groups
):
  momentum = 0.5
  config = tiny_config(
    batch_size=BATCH,
    bn_group_size=group_size,
    bn_virtual_batch_size=virtual_batch_size,
    bn_momentum=momentum,
    parallelism=parallelism,
  )
  exp = train.prepare(config, create_model=micro_net)
  variables = {"params": micro_state.params, "batch_stats": micro_state.batch_stats}
  batch = {"image": _network_input(_fake_batch(seed=3)["image"])}
  run = functools.partial(_bn1_input_output_and_state, exp.model)
  if parallelism == "jit":
    x, y, stats = jax.jit(run)(
      parallel.to_global_replicated(exp.layout, variables),
      parallel.to_device_batch(exp.layout, batch)["image"],
    )
  else:
    x, y, stats = jax.pmap(run, axis_name=parallel.AXIS)(
      parallel.to_pmap_replicated(exp.layout, variables),
      parallel.to_device_batch(exp.layout, batch)["image"],
    )
  x, y, stats = jax.device_get((x, y, stats))
  x, y = (np.asarray(a, np.float64).reshape((BATCH,) + a.shape[-3:]) for a in (x, y))

  # Reference: each group of BATCH / num_groups consecutive rows of the global batch
  # (the rows of consecutive devices), normalized with its own statistics, in float64.
  groups = x.reshape((num_groups, -1) + x.shape[1:])
  mean = groups.mean(axis=(1, 2, 3), keepdims=True)
  var = groups.var(axis=(1, 2, 3), keepdims=True)
  want_y = ((groups - mean) / np.sqrt(var + config.bn_epsilon)).reshape(y.shape)
  np.testing.assert_allclose(y, want_y, atol=2e-5)
  assert (
    np.abs(var.squeeze() - var.squeeze().mean(0)).max() > 1e-4 or num_groups == 1
  )  # the groups differ

  group_means, group_vars = mean.reshape(num_groups, -1), var.reshape(num_groups, -1)
  if parallelism == "jit":  # the running statistics move by the mean of the groups'
    np.testing.assert_allclose(stats["mean"], (1 - momentum) * group_means.mean(0), atol=1e-5)
    np.testing.assert_allclose(
      stats["var"], momentum + (1 - momentum) * group_vars.mean(0), atol=1e-5
    )
  elif num_groups <= 8 and exp.bn_setup.average_statistics:
    # Groups of devices: each device moves by its group's (train_step then averages
    # them across devices).
    device_group = np.arange(8) // (8 // num_groups)
    np.testing.assert_allclose(stats["mean"], (1 - momentum) * group_means[device_group], atol=1e-5)
    np.testing.assert_allclose(
      stats["var"], momentum + (1 - momentum) * group_vars[device_group], atol=1e-5
    )
  else:  # groups within devices, or one group: the mean over all groups, on every device
    np.testing.assert_allclose(
      stats["mean"],
      np.broadcast_to((1 - momentum) * group_means.mean(0), stats["mean"].shape),
      atol=1e-5,
    )
    np.testing.assert_allclose(
      stats["var"],
      np.broadcast_to(momentum + (1 - momentum) * group_vars.mean(0), stats["var"].shape),
      atol=1e-5,
    )


@pytest.mark.slow
@pytest.mark.parametrize("model, parallelism", [("inception_tiny", "jit"), ("resnet_tiny", "pmap")])
def test_each_model_family_trains_on_mock_imagenet(tmp_path, model, parallelism):
  if model.startswith("inception") and not _average_pool_is_differentiable():
    pytest.xfail(
      "models.average_pool cannot be differentiated under jit (its reduce_window init value "
      "jnp.zeros((), dtype) is a tracer there, so lax picks the generic, non-differentiable "
      "reduce_window; np.zeros((), dtype) fixes it): a bug in models.py, reported"
    )
  num_examples = 40  # validation: 2.5 batches of 16
  data_dir = write_mock_metadata(tmp_path / "data", num_examples)
  config = tiny_config(
    model=model,
    parallelism=parallelism,
    fake_data=False,
    tfds_data_dir=str(data_dir),
    batch_size=BATCH,
    eval_batch_size=BATCH,
    num_train_steps=2,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    shuffle_buffer=8,
    photometric_distortion=0.5,
  )
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
    state = train.train_and_evaluate(config, str(workdir))
  rows = train.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["train_loss"]) and r["fake_data"] is False for r in rows)
  assert rows[1]["eval_examples"] == num_examples
  assert 0 <= rows[1]["top1"] <= rows[1]["top5"] <= 1
  assert rows[1]["bn_statistics"] == "running"
  assert int(parallel.host_copy(state.step)) == 2
  assert (workdir / "checkpoints" / "2").is_dir()
  assert json.loads((workdir / "config.json").read_text())["config"]["model"] == model
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard summaries"


def test_recomputed_statistics_are_algorithm_2_over_training_batches(micro_state):
  num_batches = 3
  config = tiny_config(batch_size=BATCH, recompute_bn_batches=num_batches)
  exp = train.prepare(config, create_model=micro_net)
  state = parallel.to_global_replicated(exp.layout, micro_state)
  stats = jax.device_get(train.recompute_statistics(exp, state.params, state.batch_stats))

  # Reference: the first BN layer's inputs on the same batches (the fake stream with
  # seed + 2, cycled), Algorithm 2 in float64: the mean of the batch means and
  # m / (m - 1) times the mean of the batch variances, m values per feature and batch.
  host = micro_state
  fake = _fake_batches(config.seed + 2)
  bn1_input_output_and_state = jax.jit(
    functools.partial(_bn1_input_output_and_state, exp.eval_model)
  )
  means, variances = [], []
  for k in range(num_batches):
    x, _, _ = bn1_input_output_and_state(
      {"params": host.params, "batch_stats": host.batch_stats},
      _network_input(fake[k % len(fake)]["image"]),
    )
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    means.append(x.mean(0))
    variances.append(x.var(0) * x.shape[0] / (x.shape[0] - 1))
  np.testing.assert_allclose(stats["bn1"]["mean"], np.mean(means, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn1"]["var"], np.mean(variances, 0), rtol=1e-5)
  assert not np.allclose(stats["bn1"]["var"], host.batch_stats["bn1"]["var"])  # they were replaced


def _average_pool_is_differentiable() -> bool:
  from experiments.imagenet import models

  try:
    jax.jit(jax.grad(lambda x: jnp.sum(models.average_pool(x, (3, 3), (1, 1)))))(
      jnp.ones((1, 4, 4, 2))
    )
  except ValueError:
    return False
  return True


def _image_key(image: np.ndarray) -> bytes:
  return np.round(image, 3).tobytes()


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_evaluation_batches_hold_every_example_once(tiny_imagenet, process_count):
  builder = input_pipeline.builder_for("imagenet2012", str(tiny_imagenet))
  reference = builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
  want = sorted(
    _image_key(e["image"])
    for e in reference.map(
      functools.partial(input_pipeline.preprocess_eval, image_size=32)
    ).as_numpy_iterator()
  )
  assert len(want) == 13
  got, num_batches = [], set()
  for process_index in range(process_count):
    plan, host_batches = input_pipeline.TfdsSource(builder).eval_batches(
      global_batch_size=2 * process_count,
      image_size=32,
      process_index=process_index,
      process_count=process_count,
    )
    batches = list(host_batches)
    num_batches.add(len(batches))
    assert len(batches) == plan.num_batches
    for batch in batches:
      assert batch["image"].shape == (2, 32, 32, 3)
      got += [
        _image_key(image)
        for image, valid in zip(batch["image"], batch["mask"], strict=True)
        if valid
      ]
      assert not batch["image"][~batch["mask"]].any()  # padding is zeros
  assert len(num_batches) == 1  # every host runs the same number of evaluation steps
  assert sorted(got) == want


def test_evaluate_counts_every_example_once_with_a_batch_that_does_not_divide(
  tiny_imagenet, micro_state
):
  config = tiny_config(
    fake_data=False, tfds_data_dir=str(tiny_imagenet), batch_size=BATCH, eval_batch_size=8
  )
  exp = train.prepare(config, create_model=micro_net)
  state = parallel.to_global_replicated(exp.layout, micro_state)
  metrics = train.evaluate(exp, state.params, state.batch_stats)
  assert metrics["eval_examples"] == 13

  # Reference: all 13 images in one batch on one device, no padding.
  builder = input_pipeline.builder_for("imagenet2012", str(tiny_imagenet))
  examples = list(
    builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
    .map(functools.partial(input_pipeline.preprocess_eval, image_size=32))
    .as_numpy_iterator()
  )
  images = _network_input(np.stack([e["image"] for e in examples]))
  labels = np.array([e["label"] for e in examples])
  host = micro_state
  logits = np.asarray(
    jax.jit(functools.partial(exp.eval_model.apply, train=False))(
      {"params": host.params, "batch_stats": host.batch_stats}, images
    ),
    np.float64,
  )
  top5 = np.argsort(-logits, axis=1)[:, :5]
  log_probs = (
    logits
    - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    - logits.max(1, keepdims=True)
  )
  assert metrics["top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
  assert metrics["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
  assert metrics["eval_loss"] == pytest.approx(-np.mean(log_probs[np.arange(13), labels]), rel=1e-5)


# ---- bad input: one clear error before any compile, nothing written -------------------------


@pytest.fixture
def compile_counter():
  events = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize(
  "fields, error, words",
  [
    ({"batch_size": 12}, train.ConfigError, ["batch_size=12", "8 devices"]),
    ({"eval_batch_size": 20}, train.ConfigError, ["eval_batch_size=20"]),
    ({"image_size": 48}, train.ConfigError, ["image_size", "multiple of 32"]),
    ({"model": "resnet_huge"}, train.ConfigError, ["resnet_huge"]),
    ({"parallelism": "pjit"}, train.ConfigError, ["parallelism"]),
    ({"bn_group_size": 3}, train.ConfigError, ["bn_group_size=3"]),
    ({"fake_data": False}, data.DataError, ["ILSVRC2012_img_train.tar", "download_and_prepare"]),
  ],
  ids=["batch", "eval_batch", "image_size", "model", "parallelism", "group", "missing_data"],
)
def test_bad_input_fails_before_any_compile_and_writes_nothing(
  tmp_path, compile_counter, fields, error, words
):
  config = tiny_config(
    **{"batch_size": BATCH, "tfds_data_dir": str(tmp_path / "no_data"), **fields}
  )
  workdir = tmp_path / "run"
  with pytest.raises(error) as raised:
    train.train_and_evaluate(config, str(workdir))
  message = str(raised.value)
  assert "\n" not in message and all(w in message for w in words), message
  assert not workdir.exists()
  assert compile_counter == []


def test_resume_refuses_another_config(tmp_path):
  config = tiny_config(batch_size=BATCH)
  common.Run.open(tmp_path, config, num_train_steps=1, checkpoint_every=1).close()
  with pytest.raises(common.ConfigError, match="model: 'resnet_tiny' -> 'inception_tiny'"):
    common_run.check_config(
      tmp_path,
      tiny_config(batch_size=BATCH, model="inception_tiny"),
      may_change=train.RESTART_MAY_CHANGE,
    )
  # How often to log, evaluate and save may change.
  common_run.check_config(
    tmp_path,
    tiny_config(batch_size=BATCH, log_every=7, eval_every=3),
    may_change=train.RESTART_MAY_CHANGE,
  )
