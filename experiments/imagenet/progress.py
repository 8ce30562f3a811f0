"""What a training run says while it runs: one line per event, on process 0.

The lines, in order: the FAKE DATA warning (fake data only; every row after it also
ends with ``[FAKE DATA]``), what is trained on what, a line before the first
step's compilation and one with the time it took, a row every ``log_every`` steps
(loss, rate, one speed, ETA), a row per evaluation (with its time: the first one
compiles the evaluation step), and a closing line naming what was written where.
"""

from __future__ import annotations

import time

import jax

FAKE_DATA_WARNING = (
  "FAKE DATA: config.fake_data=True trains and evaluates on synthetic random "
  "images; losses and accuracies say nothing about the network"
)


def say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def plural(count: int, noun: str) -> str:
  """``1 device``, ``4 devices``."""
  return f"{count} {noun}{'' if count == 1 else 's'}"


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Throughput:
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


def speed_and_eta(images_per_sec: float | None, steps_left: int, batch_size: int) -> str:
  if images_per_sec is None:
    return ""
  eta = format_duration(steps_left * batch_size / images_per_sec)
  return f"  {images_per_sec:,.0f} images/s  ETA {eta}"


def fake_tag(config) -> str:
  return "  [FAKE DATA]" if config.fake_data else ""


def announce(config, *, num_params: int, num_devices: int, parallelism: str, schedule) -> None:
  """The FAKE DATA warning (fake data only), then what is trained on what."""
  if config.fake_data:
    say(f"WARNING: {FAKE_DATA_WARNING}")
  say(
    f"{config.model}: {num_params:,} parameters; {plural(num_devices, 'device')} on "
    f"{plural(jax.process_count(), 'host')}, {parallelism}; "
    f"{schedule.num_train_steps} steps of {config.batch_size} images "
    f"({schedule.steps_per_epoch} steps per epoch)"
  )


def training_line(config, schedule, step: int, row: dict) -> None:
  """The row of the ``log_every`` steps ending at ``step``: loss, rate, speed, ETA."""
  speed = speed_and_eta(row["images_per_sec"], schedule.num_train_steps - step, config.batch_size)
  say(
    f"step {step}/{schedule.num_train_steps}  loss {row['train_loss']:.4f}  "
    f"lr {row['learning_rate']:.4g}{speed}{fake_tag(config)}"
  )


def evaluation_line(config, step: int, row: dict, seconds: float) -> None:
  say(
    f"step {step}: top-1 {row['top1']:.4f}  top-5 {row['top5']:.4f}  "
    f"({row['eval_examples']} images, {seconds:.1f} s){fake_tag(config)}"
  )


def tensorboard_writer(workdir, *, primary: bool):
  """The run's writer of TensorBoard summaries in ``workdir`` (local or gs://, see
  ``experiments.common.summary_writer``), or None, with one line saying why, when
  clu or TensorFlow is not installed."""
  from experiments import common
  from experiments.imagenet import data

  try:
    return common.summary_writer(workdir, primary=primary)
  except ImportError as e:
    say(
      f"no TensorBoard summaries ({e}): they need {data.TFDS_INSTALL}; metrics.jsonl has every row"
    )
    return None
