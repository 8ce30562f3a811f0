"""Training and evaluation of the MNIST network: pure steps, run on the device.

How the state flows. Everything that changes during training lives in one
``TrainState`` pytree: the step, the parameters, the batch-norm running statistics,
the optimizer state, and the running sum of training losses. ``train_step`` maps a
state and a batch to the next state and touches nothing else; ``train_steps`` runs
it many times inside one compiled loop, sampling each batch on the device from a key
that depends only on the seed and the step; ``evaluate`` reads a state. Saving the
state is the whole checkpoint, so a restarted run continues bit for bit.
"""

from __future__ import annotations

import functools
import math
import numbers
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm import tqdm

from experiments import common
from experiments.common import ConfigError as ConfigError
from experiments.mnist import configs, input_pipeline
from experiments.mnist.model import MLP

PERCENTILES = (15, 50, 85)


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""

  step: jax.Array  # [], int32: steps taken so far
  params: Any  # the model's parameters
  batch_stats: Any  # BN running statistics (empty without BN)
  opt_state: optax.OptState
  loss_sum: jax.Array  # [], float32: training losses summed since the last evaluation
  loss_count: jax.Array  # [], int32: steps in loss_sum


class DeviceData(NamedTuple):
  """The dataset on the device: uint8 images ``[N, 28, 28]``, int32 labels ``[N]``."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array


def make_model(config: ml_collections.ConfigDict) -> MLP:
  return MLP(
    hidden_sizes=tuple(config.hidden_sizes),
    batch_norm=config.batch_norm,
    init_stddev=config.init_stddev,
    momentum=config.bn_momentum,
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate)


def initial_state(model: MLP, optimizer, key: jax.Array) -> TrainState:
  variables = model.init(key, jnp.zeros((1, 28, 28), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=optimizer.init(params),
    loss_sum=jnp.zeros((), jnp.float32),
    loss_count=jnp.zeros((), jnp.int32),
  )


def to_inputs(images: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def sample_batch(data: DeviceData, data_key: jax.Array, step: jax.Array, batch_size: int):
  """The batch of ``step``: uniform with replacement, a function of (key, step) only."""
  indices = jax.random.randint(
    jax.random.fold_in(data_key, step), (batch_size,), 0, data.train_labels.shape[0]
  )
  return to_inputs(data.train_images[indices]), data.train_labels[indices]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, images, labels, *, model: MLP, optimizer) -> TrainState:
  """One SGD step on one batch: ``state`` in, next ``state`` out."""

  def loss_fn(params):
    (logits, _), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    return cross_entropy(logits, labels), updates.get("batch_stats", {})

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
    loss_sum=state.loss_sum + loss,
    loss_count=state.loss_count + 1,
  )


def train_steps(
  state: TrainState,
  data: DeviceData,
  data_key: jax.Array,
  num_steps: jax.Array,
  *,
  model: MLP,
  optimizer,
  batch_size: int,
) -> TrainState:
  """Up to ``num_steps`` training steps in one on-device loop (``num_steps`` may be
  traced). Stops after the first step whose loss is not finite: ``state.loss_sum``
  is then NaN or infinite and ``state.step`` that step's number."""

  def keep_going(carry):
    i, state = carry
    return (i < num_steps) & jnp.isfinite(state.loss_sum)

  def body(carry):
    i, state = carry
    images, labels = sample_batch(data, data_key, state.step, batch_size)
    return i + 1, train_step(state, images, labels, model=model, optimizer=optimizer)

  return jax.lax.while_loop(keep_going, body, (jnp.zeros_like(num_steps), state))[1]


def evaluate(state: TrainState, data: DeviceData, *, model: MLP, tracked_unit: int) -> dict:
  """Test loss and accuracy with the running statistics, the tracked sigmoid's
  input percentiles over the test set, and the mean training loss since the last
  evaluation."""
  logits, sigmoid_inputs = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats},
    to_inputs(data.test_images),
    train=False,
  )
  percentiles = jnp.percentile(sigmoid_inputs[:, tracked_unit], jnp.array(PERCENTILES, jnp.float32))
  metrics = {
    "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == data.test_labels),
    "test_loss": cross_entropy(logits, data.test_labels),
    "train_loss": state.loss_sum / jnp.maximum(state.loss_count, 1).astype(jnp.float32),
  }
  for p, value in zip(PERCENTILES, percentiles, strict=True):
    metrics[f"sigmoid_input_p{p}"] = value
  return metrics


def _refuse_renamed_fields(config: ml_collections.ConfigDict) -> None:
  """An old field name set in Python (not through the command line, which renames
  it) would be a new field that nothing reads: refuse it."""
  for old, new in configs.RENAMED.items():
    if old in config:
      raise ConfigError(f"config.{old} is now config.{new}; set config.{new}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Bad values fail before any work, with the field's name."""
  _refuse_renamed_fields(config)
  if config.dataset not in input_pipeline.DATASETS:
    raise ConfigError(
      f"config.dataset must be one of {input_pipeline.DATASETS}, got {config.dataset!r}"
    )
  for field in ("num_train_steps", "batch_size", "eval_every", "checkpoint_every"):
    value = config[field]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")
  for field in ("learning_rate", "init_stddev"):
    if not (
      isinstance(config[field], numbers.Real) and math.isfinite(config[field]) and config[field] > 0
    ):
      raise ConfigError(f"config.{field} must be a positive finite number, got {config[field]!r}")
  if not 0 <= config.bn_momentum <= 1:
    raise ConfigError(f"config.bn_momentum must be in [0, 1], got {config.bn_momentum!r}")
  sizes = tuple(config.hidden_sizes) if isinstance(config.hidden_sizes, (tuple, list)) else ()
  if not sizes or not all(
    isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in sizes
  ):
    raise ConfigError(
      f"config.hidden_sizes must be a non-empty tuple of positive integers, got "
      f"{config.hidden_sizes!r}"
    )
  if not 0 <= config.tracked_unit < sizes[-1]:
    raise ConfigError(
      f"config.tracked_unit must index the last hidden layer (0..{sizes[-1] - 1}), "
      f"got {config.tracked_unit}"
    )


# Fields a restarted run may change: how far to go, and how often to checkpoint.
RESTART_MAY_CHANGE = ("num_train_steps", "checkpoint_every")


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The evaluations of the run in ``workdir``, oldest first."""
  return common.read_metrics(workdir)


def _next_stop(step: int, config) -> int:
  """The next step at which to evaluate or checkpoint."""
  stops = [config.num_train_steps]
  for every in (config.eval_every, config.checkpoint_every):
    stops.append((step // every + 1) * every)
  return min(stops)


def compile_steps(
  state: TrainState,
  data: DeviceData,
  data_key: jax.Array,
  *,
  model: MLP,
  optimizer,
  config: ml_collections.ConfigDict,
):
  """The compiled training loop ``(state, data, data_key, num_steps) -> state`` and
  evaluation ``(state, data) -> metrics``. The data are arguments, not constants
  closed over: XLA would otherwise fold 55 MB of images into the program (a slow
  compile and ``slow_operation_alarm`` messages)."""
  run_steps = jax.jit(
    functools.partial(train_steps, model=model, optimizer=optimizer, batch_size=config.batch_size),
    donate_argnums=0,
  )
  run_evaluation = jax.jit(
    functools.partial(evaluate, model=model, tracked_unit=config.tracked_unit)
  )
  return (
    run_steps.lower(state, data, data_key, jnp.int32(1)).compile(),
    run_evaluation.lower(state, data).compile(),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> TrainState:
  """Trains one network as ``config`` says, into ``workdir``; resumes if possible.

  Writes ``workdir/config.json`` (the config and the JAX settings that change the
  numbers), ``workdir/metrics.jsonl`` (one JSON object per evaluation) and orbax
  checkpoints in ``workdir/checkpoints`` (``experiments.common.Run``). Returns the
  final state. A workdir with checkpoints resumes from the newest intact one, with
  the same config and settings only (``num_train_steps`` may grow,
  ``checkpoint_every`` change); an extended run keeps the evaluation it made at its
  old last step.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: what to change, in one
      line; a config or data error leaves no new workdir behind.
    NonFiniteError: at the first step with a NaN or infinite training loss; the
      checkpoints written before it are kept.
    Preempted: after SIGTERM or Ctrl-C, at the next evaluation or checkpoint,
      once that step's checkpoint is saved.
  """
  validate_config(config)
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir, config.tfds_data_dir)
  with common.Run.open(
    workdir,
    config,
    num_train_steps=config.num_train_steps,
    checkpoint_every=config.checkpoint_every,
    may_change=RESTART_MAY_CHANGE,
  ) as run:
    state = _train(config, run, dataset)
    run.wait_until_saved()
    tqdm.write(
      f"done: step {int(state.step)}/{config.num_train_steps}; wrote config.json, "
      f"metrics.jsonl and checkpoints/ (newest: step {run.latest_step}) in {run.workdir}"
    )
    return state


def _train(config, run: common.Run, dataset) -> TrainState:
  data = DeviceData(*(jax.device_put(a) for a in dataset))
  model, optimizer = make_model(config), make_optimizer(config)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = run.restore_or(initial_state(model, optimizer, init_key))
  step = int(state.step)
  if step == config.num_train_steps:
    return state

  tqdm.write("Compiling the training loop and the evaluation (10-30 s on a CPU)...")
  started = time.perf_counter()
  run_steps, run_evaluation = compile_steps(
    state, data, data_key, model=model, optimizer=optimizer, config=config
  )
  tqdm.write(f"Compiled in {time.perf_counter() - started:.1f} s.")
  label = "BN" if config.batch_norm else "baseline"
  with tqdm(
    total=config.num_train_steps,
    initial=step,
    unit="step",
    desc=f"{config.dataset} {label}",
    dynamic_ncols=True,
    mininterval=0.5,
  ) as progress:
    while step < config.num_train_steps:
      stop = _next_stop(step, config)
      state = run_steps(state, data, data_key, jnp.int32(stop - step))
      if not math.isfinite(float(state.loss_sum)):
        raise common.non_finite_loss(
          float(state.loss_sum),
          int(state.step),
          latest_checkpoint=run.latest_step,
          rate=f"config.learning_rate (now {config.learning_rate})",
        )
      step = stop
      if step % config.eval_every == 0 or step == config.num_train_steps:
        metrics = {k: float(v) for k, v in run_evaluation(state, data).items()}
        run.log(step, metrics)
        state = state._replace(
          loss_sum=jnp.zeros_like(state.loss_sum), loss_count=jnp.zeros_like(state.loss_count)
        )
        progress.set_postfix({"test_acc": f"{metrics['test_accuracy']:.4f}"})  # tqdm: the speed
      run.maybe_save(step, state)
      progress.update(stop - progress.n)
      run.stop_if_requested(step)
  return state
