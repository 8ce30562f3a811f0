"""The run's length and rhythm in steps, its learning rate over them, and the optimizer."""

from __future__ import annotations

import math
from typing import NamedTuple

import optax


class Schedule(NamedTuple):
  """The run's length and rhythm, in steps."""

  steps_per_epoch: int
  num_train_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int


def make_schedule(config, steps_per_epoch: int) -> Schedule:
  """``-1`` fields resolved: steps from ``num_epochs``; evaluate and save once per epoch."""
  total = (
    config.num_train_steps
    if config.num_train_steps > 0
    else max(1, math.ceil(config.num_epochs * steps_per_epoch))
  )
  every = lambda value: value if value > 0 else steps_per_epoch  # noqa: E731
  return Schedule(
    steps_per_epoch,
    total,
    config.log_every,
    every(config.eval_every),
    every(config.checkpoint_every),
  )


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
    decay = optax.exponential_decay(
      lr,
      transition_steps=max(1, int(config.lr_decay_epochs * schedule.steps_per_epoch)),
      decay_rate=config.lr_decay_rate,
      staircase=config.lr_staircase,
    )
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
