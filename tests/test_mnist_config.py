"""The MNIST experiment's config: the paper's set-up by default, bad values and
renamed fields refused in one line."""

import pathlib

import pytest

from experiments import common
from experiments.mnist import configs, train
from experiments.mnist.configs import default
from tests.mnist_testing import small_config


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("dataset", "cifar10", "config.dataset must be one of"),
    ("num_train_steps", -5, "config.num_train_steps must be a positive integer, got -5"),
    ("batch_size", 0, "config.batch_size must be a positive integer"),
    ("learning_rate", 0.0, "config.learning_rate must be a positive finite number"),
    ("tracked_unit", 100, "config.tracked_unit must index the last hidden layer"),
  ],
)
def test_bad_config_values(tmp_path, field, value, match):
  config = small_config(tmp_path)
  config[field] = value
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(config, tmp_path / "run")


def test_default_config_is_the_paper_setup():
  config = default.get_config()
  assert (config.num_train_steps, config.batch_size, tuple(config.hidden_sizes)) == (
    50_000,
    60,
    (100, 100, 100),
  )
  assert pathlib.Path(configs.DEFAULT).name == "default.py"


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("hidden_sizes", (), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("hidden_sizes", (100, 0), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("hidden_sizes", (100.5,), "hidden_sizes must be a non-empty tuple of positive integers"),
    ("learning_rate", float("inf"), "learning_rate must be a positive finite number"),
    ("init_stddev", float("nan"), "init_stddev must be a positive finite number"),
  ],
)
def test_more_bad_config_values(tmp_path, field, value, match):
  config = small_config(tmp_path)
  config[field] = value
  with pytest.raises(train.ConfigError, match=match):
    train.validate_config(config)


def test_a_renamed_field_set_in_python_is_refused_not_ignored(tmp_path):
  config = small_config(tmp_path, num_steps=5)  # the old name: it would train num_train_steps
  with pytest.raises(common.ConfigError, match=r"config.num_steps is now config.num_train_steps"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
