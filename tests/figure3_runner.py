"""The figure command with a micro network, for subprocess tests (test_figure3.py).

Usage: python -m tests.figure3_runner [flags of python -m experiments.imagenet.figure3]

Every variant trains ``tests.imagenet_testing.MicroNet`` (compiles in seconds), on
2 CPU devices. Environment (optional): ``FIGURE3_RUNNER_STOP_AT=NAME:K``: after the
run ``NAME`` saved checkpoint ``K``, print "stopped at NAME K" and wait (to be killed).
"""

import functools
import os
import sys


def main():
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)  # before anything initializes JAX's backends

  from absl import app

  from experiments import config_flags
  from experiments.imagenet import figure3, train
  from tests.imagenet_testing import micro_net, stop_after_saving

  train.train_and_evaluate = functools.partial(train.train_and_evaluate, create_model=micro_net)
  stop_at = os.environ.get("FIGURE3_RUNNER_STOP_AT")
  if stop_at:
    name, step_text = stop_at.split(":")

    def announce(run, step):
      if run.workdir.name == name and step == int(step_text):
        return f"stopped at {name} {step}"
      return None

    stop_after_saving(announce)
  figure3.define_flags()
  app.run(figure3.main, argv=sys.argv, flags_parser=config_flags.parse_flags)


if __name__ == "__main__":
  main()
