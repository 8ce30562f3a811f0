"""Trains one MNIST network (Section 4.1 of the paper).

    python -m experiments.mnist --workdir=W [--config=experiments/mnist/configs/default.py] [--config.FIELD=VALUE ...]
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.mnist import configs, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for metrics.jsonl, config.json and checkpoints.")
config_flags.DEFINE_config_file("config", configs.DEFAULT, "Training configuration.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  train.exit_on_bad_input(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
