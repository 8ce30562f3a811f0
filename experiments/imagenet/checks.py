"""The ImageNet config, checked in one place before any work: errors name the field.

``validate_config`` runs a table of small checks, each raising ``ConfigError`` with
one line; ``train.prepare`` calls it first.
"""

from __future__ import annotations

import math
import numbers

import ml_collections

from experiments import common
from experiments.imagenet import models, parallel

ConfigError = common.ConfigError
OPTIMIZERS = ("momentum", "sgd")
SCHEDULES = ("constant", "exponential", "cosine")


def _positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _non_negative_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _positive_real(value) -> bool:
  return isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def _check_choices(config, num_devices: int, process_count: int) -> None:
  for field, choices in (
    ("parallelism", parallel.PARALLELISMS),
    ("optimizer", OPTIMIZERS),
    ("lr_schedule", SCHEDULES),
  ):
    if config[field] not in choices:
      raise ConfigError(f"config.{field} must be one of {choices}, got {config[field]!r}")


def _check_batches(config, num_devices: int, process_count: int) -> None:
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if not _positive_int(value) or value % num_devices:
      raise ConfigError(
        f"config.{field}={value!r} must be a positive multiple of the {num_devices} "
        f"devices (of {process_count} host(s)): each device takes an equal share "
        "of the global batch"
      )


def _check_image_size(config, num_devices: int, process_count: int) -> None:
  try:
    models.check_image_size(config.image_size)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


def _check_counts(config, num_devices: int, process_count: int) -> None:
  if not _positive_int(config.log_every):
    raise ConfigError(f"config.log_every must be a positive integer, got {config.log_every!r}")
  for field in ("num_train_steps", "eval_every", "checkpoint_every"):
    if not (config[field] == -1 or _positive_int(config[field])):
      raise ConfigError(f"config.{field} must be -1 or a positive integer, got {config[field]!r}")
  if config.num_train_steps == -1 and not (
    isinstance(config.num_epochs, numbers.Real) and config.num_epochs > 0
  ):
    raise ConfigError(
      f"config.num_epochs must be positive when num_train_steps=-1, got {config.num_epochs!r}"
    )
  for field in ("bn_group_size", "bn_virtual_batch_size", "recompute_bn_batches", "shuffle_buffer"):
    if not _non_negative_int(config[field]):
      raise ConfigError(f"config.{field} must be a non-negative integer, got {config[field]!r}")


def _check_rates(config, num_devices: int, process_count: int) -> None:
  if not _positive_real(config.learning_rate):
    raise ConfigError(
      f"config.learning_rate must be a positive finite number, got {config.learning_rate!r}"
    )
  if not 0 < config.eval_crop_fraction <= 1:
    raise ConfigError(
      f"config.eval_crop_fraction must be in (0, 1], got {config.eval_crop_fraction!r}"
    )


def _check_statistics_groups(config, num_devices: int, process_count: int) -> None:
  per_device = config.batch_size // num_devices
  group, virtual = config.bn_group_size, config.bn_virtual_batch_size
  if group and num_devices % group:
    raise ConfigError(f"config.bn_group_size={group} must divide the {num_devices} devices")
  group_batch = (group or num_devices) * per_device
  if virtual and (
    group_batch % virtual or not (per_device % virtual == 0 or virtual % per_device == 0)
  ):
    raise ConfigError(
      f"config.bn_virtual_batch_size={virtual} must divide the batch of each statistics group "
      f"({group_batch} examples) and divide, or be a multiple of, the {per_device} examples "
      "per device"
    )
  if config.recompute_bn_batches and not config.get("batch_norm", True):
    raise ConfigError(
      "config.recompute_bn_batches > 0 needs a network with batch norm (batch_norm=True)"
    )


# In the order a reader meets the fields (the first failing check names its field).
CHECKS = (
  _check_choices,
  _check_batches,
  _check_image_size,
  _check_counts,
  _check_rates,
  _check_statistics_groups,
)


def validate_config(
  config: ml_collections.ConfigDict, *, num_devices: int, process_count: int
) -> None:
  """Every field the experiment reads, checked before any work; errors name the field.

  Raises:
    ConfigError: the first bad field, in one line.
  """
  for check in CHECKS:
    check(config, num_devices, process_count)
