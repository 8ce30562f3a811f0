"""Training and evaluation of the ImageNet networks (Section 4.2 of the paper).

How the state flows. Everything that changes during training is one ``TrainState``
pytree: the step, the parameters, the BN running statistics and the optimizer
state. ``train_step`` maps a state and a batch to the next state (and the step's
loss and learning rate) and touches nothing else; ``eval_step`` reads the
variables and returns sums of correct predictions over a batch's unmasked
examples. Training runs under ``jax.jit`` over a mesh of all devices, or under
``jax.pmap`` (``parallel.py`` places data and state for either); evaluation and
recomputed statistics always run under ``jax.jit``, on a layout of their own.

Between steps the state is "canonical": global arrays replicated over the mesh.
That is what checkpoints hold, evaluation reads and ``train_and_evaluate``
returns; under ``pmap`` the loop keeps a per-device copy and converts back when
it evaluates or saves. Since the data source's batches are a function of the
seed and the step (``data.py``), a run restarted from a checkpoint continues
exactly as it would have without the interruption.

The file reads top to bottom as the Flax example's: the steps, ``prepare`` (the
run's parts, from the config, checked by ``checks.validate_config``), evaluation,
and the loop, whose workdir (checkpoints, rows, preemption) is an
``experiments.common.Run``. Beside it: the schedule and the optimizer in
``schedule.py``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

import bnjax
import experiments.imagenet.bn_report as bn_report
from bnjax import linen as bn
from experiments import common
from experiments.imagenet import data, models, parallel, sources
from experiments.imagenet.checks import ConfigError, validate_config
from experiments.imagenet.schedule import (
  Schedule,
  make_learning_rate_fn,
  make_optimizer,
  make_schedule,
)


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""

  step: jax.Array  # [], int32: steps taken so far
  params: Any  # the network's parameters
  batch_stats: Any  # BN running statistics ({} without BN)
  opt_state: optax.OptState
  loss_sum: jax.Array  # [], float32: training losses summed since the last row of metrics
  loss_count: jax.Array  # [], int32: steps in loss_sum (so a resumed run's rows are the same)


def variables_of(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


# ---- the steps ---------------------------------------------------------------------------


def initial_state(model, optimizer, config, key: jax.Array) -> TrainState:
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = model.init({"params": key}, images, train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=optimizer.init(params),
    loss_sum=jnp.zeros((), jnp.float32),
    loss_count=jnp.zeros((), jnp.int32),
  )


def cross_entropy(
  logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
) -> jax.Array:
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
  pixel_moments: data.PixelMoments  # the source's: the step normalizes the uint8 images
  log_every: int = 1  # a row of metrics every that many steps: loss_sum restarts after each
  axis_name: str | None = None  # pmap's axis
  average_statistics: bool = False  # pmap with axis_index_groups: average running statistics


def train_step(
  state: TrainState, batch: dict, *, model, optimizer, learning_rate_fn, step_config: StepConfig
) -> tuple[TrainState, dict]:
  """One SGD step on one batch: ``state`` in, next ``state`` and its metrics out.

  Args:
    state: the current state (under ``pmap``: this device's copy).
    batch: ``image`` uint8 ``[N, S, S, 3]`` (normalized here with
      ``step_config.pixel_moments``), ``label`` int32 ``[N]`` (the global batch under
      ``jit``; this device's part under ``pmap``).

  Returns:
    ``(new_state, {"loss": [] float32, "learning_rate": [] float32})``; the loss is
    the mean cross-entropy over the global batch (without the weight penalty), and
    is added to ``loss_sum``, which restarts at each multiple of ``log_every``.
  """
  axis = step_config.axis_name
  dropout_key = jax.random.fold_in(jax.random.key(step_config.dropout_seed), state.step)
  if axis is not None:
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis))

  images = data.normalize(batch["image"], step_config.pixel_moments)

  def loss_fn(params):
    logits, updates = model.apply(
      variables_of(params, state.batch_stats),
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": dropout_key},
    )
    loss = jnp.mean(
      cross_entropy(logits, batch["label"], step_config.num_classes, step_config.label_smoothing)
    )
    return loss + step_config.weight_decay * l2_penalty(params), (
      loss,
      updates.get("batch_stats", {}),
    )

  (_, (loss, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis)
    if step_config.average_statistics:
      batch_stats = bnjax.sync_state(batch_stats, axis)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_row = state.step % step_config.log_every == 0
  new_state = TrainState(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
    loss_sum=jnp.where(new_row, 0.0, state.loss_sum) + loss,
    loss_count=jnp.where(new_row, 0, state.loss_count) + 1,
  )
  return new_state, {
    "loss": loss,
    "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
  }


def eval_step(
  params, batch_stats, batch: dict, *, model, num_classes: int, pixel_moments: data.PixelMoments
) -> dict:
  """Sums over the batch's unmasked examples: ``top1``, ``top5`` (correct, int32),
  ``loss`` (cross-entropy, float32) and ``count``.

  Args:
    batch: ``image`` uint8 ``[N, S, S, 3]`` (normalized here with ``pixel_moments``),
      ``label`` int32 ``[N]``, ``mask`` bool ``[N]`` (False for padding).
  """
  images = data.normalize(batch["image"], pixel_moments)
  logits = model.apply(variables_of(params, batch_stats), images, train=False)
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
  layout: parallel.Layout  # training: config.parallelism
  eval_layout: parallel.Layout  # evaluation and recomputed statistics: always jit
  model: Any  # flax.linen.Module for training (BN options bound for the layout)
  eval_model: Any  # the same network, for evaluation and recomputed statistics under jit
  bn_setup: parallel.BatchNormSetup
  source: data.Source  # fake data, IDX files or TFDS (sources.open_source)
  num_classes: int
  schedule: Schedule
  learning_rate_fn: optax.Schedule
  optimizer: optax.GradientTransformation
  eval_step: Callable[..., dict]  # jitted eval_step: (params, batch_stats, batch) -> sums
  num_params: int


def create_models(
  config, layout: parallel.Layout, eval_layout: parallel.Layout, *, create_model, norm_class
):
  """``(bn_setup, model, eval_model)``: the network with BN bound for training's
  layout, and for evaluation's."""
  bn_setup = parallel.batch_norm_setup(config, layout, norm_class=norm_class)
  eval_norm = parallel.batch_norm_setup(config, eval_layout, norm_class=norm_class).norm
  try:
    return bn_setup, create_model(config, norm=bn_setup.norm), create_model(config, norm=eval_norm)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def prepare(
  config: ml_collections.ConfigDict, *, create_model=models.create_model, norm_class=bn.BatchNorm
) -> Experiment:
  """Checks the config and the data and builds the run's parts; writes nothing,
  compiles nothing.

  ``create_model(config, norm=...)`` builds the network (tests pass smaller ones);
  ``norm_class`` is its BatchNorm (``flax.linen.BatchNorm`` to compare; it has no
  ``virtual_batch_size``, so only with ``bn_group_size=0`` under ``jit``).

  Raises:
    ConfigError: a bad field (its name in the message).
    data.DataError: missing data.
  """
  validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
  layout, eval_layout = parallel.make_layout(config.parallelism), parallel.make_layout("jit")
  bn_setup, model, eval_model = create_models(
    config, layout, eval_layout, create_model=create_model, norm_class=norm_class
  )
  source = sources.open_source(config)
  if config.num_classes != source.num_classes:
    raise ConfigError(
      f"config.num_classes={config.num_classes} but the data has {source.num_classes} classes"
    )
  steps_per_epoch = source.split_plan(
    data.TRAIN_SPLIT,
    global_batch_size=config.batch_size,
    process_count=jax.process_count(),
    train=True,
  ).num_batches
  schedule = make_schedule(config, steps_per_epoch)
  learning_rate_fn = make_learning_rate_fn(config, schedule)
  return Experiment(
    config=config,
    layout=layout,
    eval_layout=eval_layout,
    model=model,
    eval_model=eval_model,
    bn_setup=bn_setup,
    source=source,
    num_classes=source.num_classes,
    schedule=schedule,
    learning_rate_fn=learning_rate_fn,
    optimizer=make_optimizer(config, learning_rate_fn),
    eval_step=jax.jit(
      functools.partial(
        eval_step,
        model=eval_model,
        num_classes=source.num_classes,
        pixel_moments=source.pixel_moments,
      ),
      out_shardings=parallel.replicated(eval_layout),
    ),
    num_params=models.count_params(eval_model, config.image_size),
  )


def _step_config(exp: Experiment) -> StepConfig:
  config = exp.config
  return StepConfig(
    num_classes=exp.num_classes,
    label_smoothing=float(config.label_smoothing),
    weight_decay=float(config.weight_decay),
    dropout_seed=int(config.seed) + 1,
    pixel_moments=exp.source.pixel_moments,
    log_every=exp.schedule.log_every,
    axis_name=exp.bn_setup.axis_name,
    average_statistics=exp.bn_setup.average_statistics,
  )


def make_train_step(exp: Experiment) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The compiled step for the layout: ``jit`` (state replicated, batch sharded) or
  ``pmap`` (state and batch with a leading local-device axis); the state is donated."""
  step = functools.partial(
    train_step,
    model=exp.model,
    optimizer=exp.optimizer,
    learning_rate_fn=exp.learning_rate_fn,
    step_config=_step_config(exp),
  )
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


def host_train_batches(exp: Experiment, start_step: int, seed: int) -> Iterator[dict]:
  """This host's training batches of ``exp.source`` from ``start_step`` on."""
  config = exp.config
  return exp.source.train_batches(
    start_step,
    global_batch_size=config.batch_size,
    image_size=config.image_size,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def train_batches(exp: Experiment, start_step: int) -> Iterator[dict]:
  """Device batches from step ``start_step`` on, prefetched."""
  host = host_train_batches(exp, start_step, exp.config.seed)
  return parallel.prefetch(parallel.to_device_batch(exp.layout, b) for b in host)


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(exp: Experiment, params, batch_stats) -> dict:
  """Top-1, top-5 and loss over every validation example exactly once (canonical
  variables, under ``jit`` in both modes). Returns Python numbers."""
  config = exp.config
  plan, host_batches = exp.source.eval_batches(
    global_batch_size=config.eval_batch_size,
    image_size=config.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  sums = {"top1": 0, "top5": 0, "loss": 0.0, "count": 0}
  for batch in parallel.prefetch(
    parallel.to_device_batch(exp.eval_layout, b) for b in host_batches
  ):
    out = jax.device_get(exp.eval_step(params, batch_stats, batch))
    for k in sums:
      sums[k] += out[k].item()
  expected = sum(plan.examples_per_host)
  if sums["count"] != expected:
    raise data.DataError(f"evaluation scored {sums['count']} examples but the split has {expected}")
  count = max(sums["count"], 1)
  return {
    "top1": sums["top1"] / count,
    "top5": sums["top5"] / count,
    "eval_loss": sums["loss"] / count,
    "eval_examples": sums["count"],
  }


def recompute_statistics(exp: Experiment, params, batch_stats):
  """Algorithm 2's population statistics over ``config.recompute_bn_batches``
  training batches (a stream of its own, seed + 2; the global batch's statistics
  per batch), via ``bnjax.linen.recompute_batch_stats`` under ``jit``."""
  config = exp.config
  host = host_train_batches(exp, 0, config.seed + 2)
  images = (
    parallel.to_device_batch(exp.eval_layout, next(host))["image"]
    for _ in range(config.recompute_bn_batches)
  )
  moments = exp.source.pixel_moments
  apply = lambda v, x: exp.eval_model.apply(  # noqa: E731
    v, data.normalize(x, moments), train=True, mutable=["batch_stats"]
  )
  return bn.recompute_batch_stats(apply, variables_of(params, batch_stats), images)["batch_stats"]


def evaluation_row(exp: Experiment, state: TrainState) -> dict:
  """The metrics of one evaluation of the canonical ``state`` (statistics recomputed
  first if the config says so)."""
  batch_stats = state.batch_stats
  if exp.config.recompute_bn_batches:
    batch_stats = recompute_statistics(exp, state.params, batch_stats)
  return {
    **evaluate(exp, state.params, batch_stats),
    "bn_statistics": "recomputed" if exp.config.recompute_bn_batches else "running",
  }


# Fields a resumed run may change: how often to log, evaluate and save, where the
# data lives, and how evaluation batches and statistics are made.
RESTART_MAY_CHANGE = (
  "log_every",
  "eval_every",
  "checkpoint_every",
  "tfds_data_dir",
  "data_dir",
  "eval_batch_size",
  "recompute_bn_batches",
)


read_metrics = common.read_metrics  # the rows of workdir/metrics.jsonl, oldest first


# ---- the loop -------------------------------------------------------------------------------


FAKE_DATA_WARNING = (
  "FAKE DATA: config.fake_data=True trains and evaluates on synthetic random "
  "images; losses and accuracies say nothing about the network"
)


def say(message: str) -> None:
  """Prints ``message`` on process 0 (the others run the same loop silently)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, create_model=models.create_model
) -> TrainState:
  """Trains ``config``'s network into ``workdir``; resumes from its newest intact checkpoint.

  Writes (process 0) ``workdir/config.json``, ``workdir/metrics.jsonl`` (rows with
  ``step``, ``train_loss`` (the mean over the steps since the last row) and
  ``learning_rate`` every ``log_every`` steps, ``top1``, ``top5``, ``eval_loss``,
  ``eval_examples`` and ``bn_statistics`` at each evaluation, and ``fake_data`` in
  every row) and TensorBoard events (with the ``tensorboard`` package); every
  process writes its part of the orbax checkpoints in ``workdir/checkpoints``
  (``experiments.common.Run``; on several hosts the workdir must be a folder they
  all see, or a bucket). Everything is checked (``prepare``) before the first
  write. A resumed run must have the config it started with, up to
  ``RESTART_MAY_CHANGE``, and writes the rows an uninterrupted run writes.
  ``create_model``: as ``prepare``'s.

  Returns:
    The final canonical state.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: what to change, in one
      line; a config or data error leaves nothing in the workdir.
    NonFiniteError: at the first logged NaN or infinite training loss.
    Preempted: at the step every host agreed on after a preemption notice, its
      checkpoint saved.
  """
  exp = prepare(config, create_model=create_model)
  with common.Run.open(
    workdir,
    config,
    num_train_steps=exp.schedule.num_train_steps,
    checkpoint_every=exp.schedule.checkpoint_every,
    may_change=RESTART_MAY_CHANGE,
    hparams={k: v for k, v in config.items() if isinstance(v, int | float | str | bool)},
  ) as run:
    state = _train(exp, run)
    run.wait_until_saved()
    summaries = ", TensorBoard summaries" if run.summaries else ""
    say(
      f"done: step {int(parallel.host_copy(state.step))}/{exp.schedule.num_train_steps}; "
      f"wrote config.json, metrics.jsonl{summaries} and checkpoints/ (newest: step "
      f"{run.latest_step}) in {run.workdir}"
    )
    return state


def _announce(exp: Experiment) -> None:
  """The FAKE DATA warning (fake data only), then what is trained on what."""
  config, schedule, devices = exp.config, exp.schedule, exp.layout.num_devices
  if config.fake_data:
    say(f"WARNING: {FAKE_DATA_WARNING}")
  hosts = jax.process_count()
  say(
    f"{config.model}: {exp.num_params:,} parameters; {devices} device{'s' * (devices > 1)} on "
    f"{hosts} host{'s' * (hosts > 1)}, {exp.layout.parallelism}; {schedule.num_train_steps} steps "
    f"of {config.batch_size} images ({schedule.steps_per_epoch} steps per epoch)"
  )


def _training_row(exp: Experiment, run: common.Run, state: TrainState, step: int) -> dict:
  """The mean training loss of the steps since the last row (carried in the state)
  and the learning rate of ``step``; stops at a non-finite loss."""
  loss_sum, loss_count = (float(x) for x in parallel.host_copy((state.loss_sum, state.loss_count)))
  train_loss = loss_sum / loss_count
  if not math.isfinite(train_loss):
    raise common.non_finite_loss(
      train_loss,
      step,
      latest_checkpoint=run.latest_step,
      rate=f"config.base_learning_rate (the rate is now {exp.config.learning_rate})",
    )
  return {"train_loss": train_loss, "learning_rate": float(exp.learning_rate_fn(step - 1))}


def _evaluation_row(exp: Experiment, state: TrainState, first: bool) -> dict:
  if first:
    say("evaluating (the first evaluation compiles the evaluation step)...")
  return evaluation_row(exp, state)


class _DeviceState:
  """The state as the training step takes it (per device under pmap), and its canonical form."""

  def __init__(self, layout: parallel.Layout, state: TrainState):
    self.layout, self.pmap = layout, layout.parallelism == "pmap"
    self.value = (
      parallel.to_pmap_replicated(layout, parallel.host_copy(state)) if self.pmap else state
    )

  def canonical(self) -> TrainState:
    return parallel.from_pmap_replicated(self.layout, self.value) if self.pmap else self.value


def _every(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _first_step(run_step, device: _DeviceState, batch: dict, start: int) -> None:
  """Step ``start + 1``, which compiles, with a line before and after."""
  say("compiling the training step (about a minute on a CPU for the small configs)...")
  started = time.perf_counter()
  device.value, metrics = run_step(device.value, batch)
  jax.block_until_ready(metrics)
  say(f"compiled and ran step {start + 1} in {time.perf_counter() - started:.1f} s")


def _train(exp: Experiment, run: common.Run) -> TrainState:
  config, schedule = exp.config, exp.schedule
  _announce(exp)
  device = _DeviceState(exp.layout, run.restore_or(make_initial_state(exp)))
  start = int(parallel.host_copy(device.canonical().step))
  run_step, batches = make_train_step(exp), train_batches(exp, start)
  batches = bn_report.announce(run_step, device.value, batches)  # what BN's statistics cover
  fake = "  [FAKE DATA]" if config.fake_data else ""
  evaluated = False
  for step in range(start + 1, schedule.num_train_steps + 1):
    if step == start + 1:
      _first_step(run_step, device, next(batches), start)
    else:
      device.value, _ = run_step(device.value, next(batches))
    row = {}
    if _every(step, schedule.log_every, schedule.num_train_steps):
      row.update(_training_row(exp, run, device.canonical(), step))
    if _every(step, schedule.eval_every, schedule.num_train_steps):
      row.update(_evaluation_row(exp, device.canonical(), first=not evaluated))
      evaluated = True
    if row:
      say(run.log(step, {**row, "fake_data": bool(config.fake_data)}) + fake)
    run.maybe_save(step, device.canonical)  # every step, on every host: a stop is agreed on
    run.stop_if_requested(step)
  return device.canonical()
