r"""Trains one MNIST network (Section 4.1 of the paper).

    python -m experiments.mnist --workdir=W [--config=experiments/mnist/configs/default.py] \
        [--config.FIELD=VALUE ...]

The config fields, their defaults and what each means: experiments/mnist/configs/default.py
(`--help` lists them too). Killed and restarted with the same command, a run
continues from its last intact checkpoint.
"""

from absl import app, flags

from experiments import config_flags
from experiments.common import cli
from experiments.mnist import configs, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for metrics.jsonl, config.json and checkpoints.")
config_flags.define_config_flag(configs.DEFAULT, "Training configuration.", aliases=configs.RENAMED)


def main(argv):
  cli.check_command_line(argv, FLAGS.workdir)
  cli.exit_on_error(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags.parse_flags)
