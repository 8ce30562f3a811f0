"""Training and evaluation of the ImageNet networks (Section 4.2 of the paper).

How the state flows. Everything that changes during training is one ``TrainState``
pytree: the step, the parameters, the BN running statistics and the optimizer
state. ``train_step`` maps a state and a batch to the next state (and the step's
loss and learning rate) and touches nothing else; ``eval_step`` reads the
variables and returns sums of correct predictions over a batch's unmasked
examples. Both run under ``jax.jit`` over a mesh of all devices, or under
``jax.pmap`` (``parallel.py`` places data and state for either).

Between steps the state is "canonical": global arrays replicated over the mesh.
That is what checkpoints hold, evaluation reads and ``train_and_evaluate``
returns; under ``pmap`` the loop keeps a per-device copy and converts back when
it evaluates or saves. Since the input pipeline's batches are a function of the
seed and the step, a run restarted from a checkpoint continues exactly as it
would have without the interruption.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import bnjax
from bnjax import linen as bn
from experiments import common
from experiments.imagenet import input_pipeline, models, parallel
from experiments.imagenet.configs import default as default_config

IMAGENET_TRAIN_IMAGES = default_config.IMAGENET_TRAIN_IMAGES
FAKE_DATA_WARNING = ("FAKE DATA: config.fake_data=True trains and evaluates on synthetic random images; "
                     "losses and accuracies say nothing about the network")
OPTIMIZERS = ("momentum", "sgd")
SCHEDULES = ("constant", "exponential", "cosine")


ConfigError = common.ConfigError  # a config field the experiment cannot run with (one line)


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""

  step: jax.Array  # [], int32: steps taken so far
  params: Any  # the network's parameters
  batch_stats: Any  # BN running statistics ({} without BN)
  opt_state: optax.OptState


def variables_of(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


# ---- the config ------------------------------------------------------------------------


def _positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
  """Every field this module reads, checked before any work; errors name the field."""
  if config.parallelism not in parallel.PARALLELISMS:
    raise ConfigError(f"config.parallelism must be one of {parallel.PARALLELISMS}, got {config.parallelism!r}")
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if not _positive_int(value) or value % num_devices:
      raise ConfigError(f"config.{field}={value!r} must be a positive multiple of the {num_devices} devices "
                        f"(of {process_count} host(s)): each device takes an equal share of the global batch")
  try:
    models.check_image_size(config.image_size)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  for field in ("log_every",):
    if not _positive_int(config[field]):
      raise ConfigError(f"config.{field} must be a positive integer, got {config[field]!r}")
  for field in ("num_train_steps", "eval_every", "checkpoint_every"):
    value = config[field]
    if not (value == -1 or _positive_int(value)):
      raise ConfigError(f"config.{field} must be -1 or a positive integer, got {value!r}")
  if config.num_train_steps == -1 and not (isinstance(config.num_epochs, numbers.Real) and config.num_epochs > 0):
    raise ConfigError(f"config.num_epochs must be positive when num_train_steps=-1, got {config.num_epochs!r}")
  if not (isinstance(config.learning_rate, numbers.Real) and math.isfinite(config.learning_rate)
          and config.learning_rate > 0):
    raise ConfigError(f"config.learning_rate must be a positive finite number, got {config.learning_rate!r}")
  if config.optimizer not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
  if config.lr_schedule not in SCHEDULES:
    raise ConfigError(f"config.lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}")
  for field in ("bn_group_size", "bn_virtual_batch_size", "recompute_bn_batches", "shuffle_buffer"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
      raise ConfigError(f"config.{field} must be a non-negative integer, got {value!r}")
  _validate_statistics_groups(config, num_devices)
  if config.recompute_bn_batches and not config.get("batch_norm", True):
    raise ConfigError("config.recompute_bn_batches > 0 needs a network with batch norm (batch_norm=True)")
  if not 0 < config.eval_crop_fraction <= 1:
    raise ConfigError(f"config.eval_crop_fraction must be in (0, 1], got {config.eval_crop_fraction!r}")


def _validate_statistics_groups(config, num_devices: int) -> None:
  per_device = config.batch_size // num_devices
  group, virtual = config.bn_group_size, config.bn_virtual_batch_size
  if group and num_devices % group:
    raise ConfigError(f"config.bn_group_size={group} must divide the {num_devices} devices")
  if virtual:
    group_batch = (group or num_devices) * per_device
    if group_batch % virtual or not (per_device % virtual == 0 or virtual % per_device == 0):
      raise ConfigError(
          f"config.bn_virtual_batch_size={virtual} must divide the batch of each statistics group "
          f"({group_batch} examples) and divide, or be a multiple of, the {per_device} examples per device")


class Schedule(NamedTuple):
  """The run's length and rhythm, in steps."""

  steps_per_epoch: int
  num_train_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int


def make_schedule(config, steps_per_epoch: int) -> Schedule:
  """``-1`` fields resolved: steps from ``num_epochs``; evaluate and save once per epoch."""
  total = config.num_train_steps if config.num_train_steps > 0 else max(
      1, math.ceil(config.num_epochs * steps_per_epoch))
  every = lambda value: value if value > 0 else steps_per_epoch  # noqa: E731
  return Schedule(steps_per_epoch, total, config.log_every, every(config.eval_every), every(config.checkpoint_every))


def make_learning_rate_fn(config, schedule: Schedule) -> optax.Schedule:
  """Linear warm-up over ``warmup_epochs``, then the config's decay.

  ``exponential``: ``lr * lr_decay_rate ** (steps / (lr_decay_epochs * steps_per_epoch))``
  (staircase if ``lr_staircase``); ``cosine``: to 0 at the last step.
  """
  lr = config.learning_rate
  warmup = int(config.warmup_epochs * schedule.steps_per_epoch)
  if config.lr_schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif config.lr_schedule == "exponential":
    decay = optax.exponential_decay(lr, transition_steps=max(1, int(config.lr_decay_epochs * schedule.steps_per_epoch)),
                                    decay_rate=config.lr_decay_rate, staircase=config.lr_staircase)
  else:
    decay = optax.cosine_decay_schedule(lr, decay_steps=max(1, schedule.num_train_steps - warmup))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, or plain SGD; weight decay is in the loss."""
  if config.optimizer == "momentum":
    return optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov)
  return optax.sgd(learning_rate_fn)


# ---- the steps ---------------------------------------------------------------------------


def initial_state(model, optimizer, config, key: jax.Array) -> TrainState:
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = model.init({"params": key}, images, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=optimizer.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """Per-example cross-entropy ``[N]`` of float32 logits ``[N, C]`` and int labels ``[N]``."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def l2_penalty(params) -> jax.Array:
  """``1/2 * sum of squares`` of the kernels (parameters of rank > 1), as the Flax example."""
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params) if p.ndim > 1)


class StepConfig(NamedTuple):
  """The hyper-parameters ``train_step`` reads (static)."""

  num_classes: int
  label_smoothing: float
  weight_decay: float
  dropout_seed: int
  axis_name: str | None = None  # pmap's axis
  average_statistics: bool = False  # pmap with axis_index_groups: average running statistics


def train_step(state: TrainState, batch: dict, *, model, optimizer, learning_rate_fn,
               step_config: StepConfig) -> tuple[TrainState, dict]:
  """One SGD step on one batch: ``state`` in, next ``state`` and its metrics out.

  Args:
    state: the current state (under ``pmap``: this device's copy).
    batch: ``image`` float32 ``[N, S, S, 3]``, ``label`` int32 ``[N]`` (the global
      batch under ``jit``; this device's part under ``pmap``).

  Returns:
    ``(new_state, {"loss": [] float32, "learning_rate": [] float32})``; the loss is
    the mean cross-entropy over the global batch (without the weight penalty).
  """
  axis = step_config.axis_name
  dropout_key = jax.random.fold_in(jax.random.key(step_config.dropout_seed), state.step)
  if axis is not None:
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis))

  def loss_fn(params):
    logits, updates = model.apply(variables_of(params, state.batch_stats), batch["image"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = jnp.mean(cross_entropy(logits, batch["label"], step_config.num_classes, step_config.label_smoothing))
    return loss + step_config.weight_decay * l2_penalty(params), (loss, updates.get("batch_stats", {}))

  (_, (loss, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis)
    if step_config.average_statistics:
      batch_stats = bnjax.sync_state(batch_stats, axis)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"loss": loss, "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32)}


def eval_step(params, batch_stats, batch: dict, *, model, num_classes: int) -> dict:
  """Sums over the batch's unmasked examples: ``top1``, ``top5`` (correct, int32),
  ``loss`` (cross-entropy, float32) and ``count``.

  Args:
    batch: ``image`` float32 ``[N, S, S, 3]``, ``label`` int32 ``[N]``, ``mask``
      bool ``[N]`` (False for padding).
  """
  logits = model.apply(variables_of(params, batch_stats), batch["image"], train=False)
  labels, mask = batch["label"], batch["mask"]
  top = jax.lax.top_k(logits, min(5, num_classes))[1]
  hits = top == labels[:, None]
  zero = jnp.zeros((), jnp.int32)
  return {
      "top1": jnp.sum(jnp.where(mask, hits[:, 0], False), dtype=jnp.int32),
      "top5": jnp.sum(jnp.where(mask, jnp.any(hits, axis=1), False), dtype=jnp.int32),
      "loss": jnp.sum(jnp.where(mask, cross_entropy(logits, labels, num_classes, 0.0), 0.0)),
      "count": jnp.sum(mask, dtype=jnp.int32) + zero,
  }


# ---- the experiment, assembled -----------------------------------------------------------


class Experiment(NamedTuple):
  """What a run is made of, built from a config with no side effect."""

  config: ml_collections.ConfigDict
  layout: parallel.Layout
  model: Any  # flax.linen.Module for training (BN options bound for the layout)
  eval_model: Any  # the same network, for evaluation and recomputed statistics under jit
  bn_setup: parallel.BatchNormSetup
  builder: Any  # the TFDS builder; None with fake data
  num_classes: int
  schedule: Schedule
  learning_rate_fn: optax.Schedule
  optimizer: optax.GradientTransformation
  eval_step: Callable[..., dict]  # jitted eval_step: (params, batch_stats, batch) -> sums
  num_params: int


def prepare(config: ml_collections.ConfigDict, *, create_model=models.create_model,
            norm_class=bn.BatchNorm) -> Experiment:
  """Checks the config and the data and builds the run's parts; writes nothing,
  compiles nothing.

  ``create_model(config, norm=...)`` builds the network (tests pass smaller ones);
  ``norm_class`` is its BatchNorm (``flax.linen.BatchNorm`` to compare; it has no
  ``virtual_batch_size``, so only with ``bn_group_size=0`` under ``jit``).

  Raises:
    ConfigError: a bad field (its name in the message).
    input_pipeline.DataError: missing data.
  """
  layout_devices, process_count = jax.device_count(), jax.process_count()
  validate_config(config, num_devices=layout_devices, process_count=process_count)
  layout = parallel.make_layout(config.parallelism)
  bn_setup = parallel.batch_norm_setup(config, layout, norm_class=norm_class)
  try:
    model = create_model(config, norm=bn_setup.norm)
    eval_model = create_model(config, norm=parallel.batch_norm_setup(
        config, layout._replace(parallelism="jit"), norm_class=norm_class).norm)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.fake_data:
    builder, num_classes = None, input_pipeline.FAKE_NUM_CLASSES
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // config.batch_size)
  else:
    builder = input_pipeline.builder_for(config.dataset, config.tfds_data_dir, idx_dir=config.get("data_dir"))
    num_classes = input_pipeline.num_classes(builder)
    steps_per_epoch = input_pipeline.split_plan(
        builder, input_pipeline.TRAIN_SPLIT, global_batch_size=config.batch_size, process_count=process_count,
        train=True).num_batches
  if config.num_classes != num_classes:
    raise ConfigError(f"config.num_classes={config.num_classes} but the data has {num_classes} classes")
  schedule = make_schedule(config, steps_per_epoch)
  learning_rate_fn = make_learning_rate_fn(config, schedule)
  return Experiment(
      config=config, layout=layout, model=model, eval_model=eval_model, bn_setup=bn_setup, builder=builder,
      num_classes=num_classes, schedule=schedule, learning_rate_fn=learning_rate_fn,
      optimizer=make_optimizer(config, learning_rate_fn),
      eval_step=jax.jit(functools.partial(eval_step, model=eval_model, num_classes=num_classes),
                        out_shardings=parallel.replicated(layout)),
      num_params=models.count_params(eval_model, config.image_size),
  )


def _step_config(exp: Experiment) -> StepConfig:
  config = exp.config
  return StepConfig(num_classes=exp.num_classes, label_smoothing=float(config.label_smoothing),
                    weight_decay=float(config.weight_decay), dropout_seed=int(config.seed) + 1,
                    axis_name=exp.bn_setup.axis_name, average_statistics=exp.bn_setup.average_statistics)


def make_train_step(exp: Experiment) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The compiled step for the layout: ``jit`` (state replicated, batch sharded) or
  ``pmap`` (state and batch with a leading local-device axis); the state is donated."""
  step = functools.partial(train_step, model=exp.model, optimizer=exp.optimizer,
                           learning_rate_fn=exp.learning_rate_fn, step_config=_step_config(exp))
  if exp.layout.parallelism == "pmap":
    return jax.pmap(step, axis_name=parallel.AXIS, donate_argnums=0)
  replicated = parallel.replicated(exp.layout)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def make_initial_state(exp: Experiment) -> TrainState:
  """The canonical initial state (replicated over the mesh), from ``config.seed``.

  The parameters are drawn with the ``rbg`` PRNG (XLA's RngBitGenerator): measured
  here, the tiny Inception's initialization compiled 3-4x faster than with the
  default threefry, whose hash XLA compiles anew for every parameter's shape.
  """
  init = functools.partial(initial_state, exp.eval_model, exp.optimizer, exp.config)
  key = jax.random.key(exp.config.seed, impl="rbg")
  return jax.jit(init, out_shardings=parallel.replicated(exp.layout))(key)


def train_batches(exp: Experiment, start_step: int):
  """Device batches from step ``start_step`` on, prefetched."""
  config, layout = exp.config, exp.layout
  common = dict(global_batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.fake_data:
    fixed = [parallel.to_device_batch(layout, b) for b in input_pipeline.fake_train_batches(**common)]
    return (fixed[s % len(fixed)] for s in _count_from(start_step))
  host_batches = input_pipeline.train_batches(
      exp.builder, start_step=start_step, shuffle_buffer_size=config.shuffle_buffer,
      photometric_distortion=float(config.photometric_distortion), **common)
  return parallel.prefetch(parallel.to_device_batch(layout, b) for b in host_batches)


def _count_from(start: int):
  while True:
    yield start
    start += 1


def evaluate(exp: Experiment, params, batch_stats) -> dict:
  """Top-1, top-5 and loss over every validation example exactly once (canonical
  variables, under ``jit`` in both modes). Returns Python numbers."""
  config, layout = exp.config, exp.layout
  common = dict(global_batch_size=config.eval_batch_size, image_size=config.image_size,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.fake_data:
    # 2.5 batches of synthetic "validation images": the last batch padded, as a real split's.
    num_examples = config.eval_batch_size * 5 // 2
    plan, dataset = input_pipeline.fake_eval_batches(num_examples=num_examples, seed=config.seed, **common)
  else:
    plan, dataset = input_pipeline.eval_batches(exp.builder, crop_fraction=config.eval_crop_fraction, **common)
  step = exp.eval_step
  sums = {"top1": 0, "top5": 0, "loss": 0.0, "count": 0}
  jit_layout = layout._replace(parallelism="jit")
  for batch in parallel.prefetch(parallel.to_device_batch(jit_layout, b) for b in dataset.as_numpy_iterator()):
    out = jax.device_get(step(params, batch_stats, batch))
    for k in sums:
      sums[k] += out[k].item()
  expected = sum(plan.examples_per_host)
  if sums["count"] != expected:
    raise input_pipeline.DataError(f"evaluation scored {sums['count']} examples but the split has {expected}")
  count = max(sums["count"], 1)
  return {"top1": sums["top1"] / count, "top5": sums["top5"] / count, "eval_loss": sums["loss"] / count,
          "eval_examples": sums["count"]}


def recompute_statistics(exp: Experiment, params, batch_stats):
  """Algorithm 2's population statistics over ``config.recompute_bn_batches``
  training batches (a stream of its own, seed + 2; the global batch's statistics
  per batch), via ``bnjax.linen.recompute_batch_stats`` under ``jit``."""
  config = exp.config
  common = dict(global_batch_size=config.batch_size, image_size=config.image_size, seed=config.seed + 2,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.fake_data:
    fake = input_pipeline.fake_train_batches(**common)
    host_batches = (fake[k % len(fake)] for k in range(config.recompute_bn_batches))
  else:
    source = input_pipeline.train_batches(exp.builder, shuffle_buffer_size=config.shuffle_buffer,
                                          photometric_distortion=float(config.photometric_distortion), **common)
    host_batches = (next(source) for _ in range(config.recompute_bn_batches))
  jit_layout = exp.layout._replace(parallelism="jit")
  images = (parallel.to_device_batch(jit_layout, b)["image"] for b in host_batches)
  apply = lambda v, x: exp.eval_model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
  return bn.recompute_batch_stats(apply, variables_of(params, batch_stats), images)["batch_stats"]


# ---- bookkeeping (experiments.common; process 0 writes, every process saves checkpoints) ------


# Fields a resumed run may change: how often to log, evaluate and save, where the
# data lives, and how evaluation batches and statistics are made.
RESTART_MAY_CHANGE = ("log_every", "eval_every", "checkpoint_every", "tfds_data_dir", "data_dir", "eval_batch_size",
                      "recompute_bn_batches")


def read_metrics(workdir) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl``, oldest first."""
  return common.MetricsLog(common.workdir_path(workdir) / "metrics.jsonl").read()


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class _Throughput:
  """Images per second over the steps since the last ``restart``."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def exclude(self, seconds: float) -> None:
    self.start += seconds

  def rate(self) -> float | None:
    """None before any timed step (the first step after a start compiles)."""
    elapsed = time.perf_counter() - self.start
    return self.steps * self.batch_size / elapsed if self.steps and elapsed > 0 else None


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- the loop -------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       create_model=models.create_model) -> TrainState:
  """Trains ``config``'s network into ``workdir``; resumes from its newest intact checkpoint.

  Writes (process 0) ``workdir/config.json``, ``workdir/metrics.jsonl`` (rows with
  ``step``, ``train_loss``, ``learning_rate``, ``images_per_sec`` every
  ``log_every`` steps, ``top1``, ``top5``, ``eval_loss`` at each evaluation, and
  ``fake_data`` in every row) and TensorBoard summaries; every process writes its
  part of the checksummed orbax checkpoints in ``workdir/checkpoints`` (see
  ``experiments.common``; on several hosts the workdir must be a folder they all
  see). Everything is checked (``prepare``) before the first write. A resumed run
  must have the config it started with, up to ``RESTART_MAY_CHANGE``.
  ``create_model``: as ``prepare``'s.

  Returns:
    The final canonical state.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: what to change, in one
      line; a config or data error leaves nothing in the workdir.
    NonFiniteError: at the first logged NaN or infinite training loss.
  """
  exp = prepare(config, create_model=create_model)
  workdir = common.workdir_path(workdir)  # a local folder or gs://BUCKET/PATH
  primary = jax.process_index() == 0
  with common.WorkdirLock(workdir) if primary else contextlib.nullcontext():
    with common.Checkpoints(workdir / "checkpoints", max_to_keep=2) as checkpoints, \
         common.Preemption() as preemption:  # SIGTERM (all hosts agree on a step), Ctrl-C: save, exit 75
      latest = checkpoints.latest_step
      common.check_config(workdir, config, resuming=latest is not None, may_change=RESTART_MAY_CHANGE)
      if latest is not None and latest > exp.schedule.num_train_steps:
        raise ConfigError(f"the workdir holds a run already at step {latest}, past the "
                          f"{exp.schedule.num_train_steps} steps of this config; give a new --workdir")
      if primary:
        common.write_config(workdir, config)
      return _train(exp, workdir, checkpoints, preemption)


def _train(exp: Experiment, workdir: pathlib.Path, checkpoints: common.Checkpoints,
           preemption: common.Preemption) -> TrainState:
  config, schedule, layout = exp.config, exp.schedule, exp.layout
  primary = jax.process_index() == 0
  if config.fake_data:
    logging.warning(FAKE_DATA_WARNING)
    _say(f"WARNING: {FAKE_DATA_WARNING}")
  _say(f"{config.model}: {exp.num_params:,} parameters; {layout.num_devices} devices on {jax.process_count()} "
       f"host(s), {layout.parallelism}; {schedule.num_train_steps} steps of {config.batch_size} images "
       f"({schedule.steps_per_epoch} per epoch)")
  state = make_initial_state(exp)
  if checkpoints.latest_step is not None:
    state = checkpoints.restore(state)
    _say(f"Resumed {workdir} from its checkpoint of step {checkpoints.latest_step}.")
  start = int(parallel.host_copy(state.step))
  metrics_log = common.MetricsLog(workdir / "metrics.jsonl")
  if primary:
    metrics_log.keep_up_to(start)
  writer = common.summary_writer(workdir, primary=primary)  # TensorBoard (clu locally; gs:// too)
  if start == 0:
    writer.write_hparams({k: v for k, v in json.loads(config.to_json_best_effort()).items()
                          if isinstance(v, (int, float, str, bool))})

  run_step = make_train_step(exp)
  pmap = layout.parallelism == "pmap"
  device_state = parallel.to_pmap_replicated(layout, parallel.host_copy(state)) if pmap else state
  del state

  def canonical():
    return parallel.from_pmap_replicated(layout, device_state) if pmap else device_state

  batches = train_batches(exp, start)
  pending: list[dict] = []
  timer = _Throughput(config.batch_size)
  step = start
  while step < schedule.num_train_steps:
    device_state, step_metrics = run_step(device_state, next(batches))
    pending.append(step_metrics)
    step += 1
    if step == start + 1:  # the first step compiles: time from its end
      jax.block_until_ready(step_metrics)
      timer.restart()
    else:
      timer.steps += 1
    row = {}
    if step % schedule.log_every == 0 or step == schedule.num_train_steps:
      fetched = jax.device_get(pending)
      train_loss = float(np.mean([np.mean(m["loss"]) for m in fetched]))
      if not math.isfinite(train_loss):
        last = checkpoints.latest_step
        raise common.NonFiniteError(
            f"the training loss is {train_loss} at step {step}; stopped there. "
            + (f"The last checkpoint, of step {last}, is kept" if last is not None else "No checkpoint was written")
            + f". Try a smaller config.base_learning_rate (the rate is now {config.learning_rate}) in a new --workdir")
      images_per_sec = timer.rate()
      row.update(train_loss=train_loss, learning_rate=float(np.mean(fetched[-1]["learning_rate"])),
                 images_per_sec=images_per_sec)
      eta = ("" if images_per_sec is None else
             f"  {images_per_sec:,.0f} images/s  ETA "
             f"{_format_duration((schedule.num_train_steps - step) * config.batch_size / images_per_sec)}")
      _say(f"step {step}/{schedule.num_train_steps}  loss {train_loss:.4f}  lr {row['learning_rate']:.4g}{eta}"
           + ("  [FAKE DATA]" if config.fake_data else ""))
      pending = []
      timer.restart()
    pause = time.perf_counter()
    if step % schedule.eval_every == 0 or step == schedule.num_train_steps:
      current = canonical()
      batch_stats = current.batch_stats
      if config.recompute_bn_batches:
        batch_stats = recompute_statistics(exp, current.params, batch_stats)
      row.update(evaluate(exp, current.params, batch_stats))
      row["bn_statistics"] = "recomputed" if config.recompute_bn_batches else "running"
      _say(f"step {step}: top-1 {row['top1']:.4f}  top-5 {row['top5']:.4f}  ({row['eval_examples']} images)"
           + ("  [FAKE DATA]" if config.fake_data else ""))
    if row:
      row = {"step": step, **row, "fake_data": bool(config.fake_data)}
      if primary:
        metrics_log.append(row)
      writer.write_scalars(step, {k: v for k, v in row.items() if isinstance(v, float)})
    if step % schedule.checkpoint_every == 0 or step == schedule.num_train_steps:
      checkpoints.save(step, canonical())
    preemption.check(step, checkpoints, canonical)  # every step, on every host
    timer.exclude(time.perf_counter() - pause)  # evaluation and saving are not training
  writer.flush()
  writer.close()
  return canonical()
