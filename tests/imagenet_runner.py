"""The ImageNet command line, for subprocess tests (see test_imagenet_cli.py).

Usage: python -m tests.imagenet_runner [CLI flags of python -m experiments.imagenet]

Environment (all optional):
  IMAGENET_RUNNER_DEVICES=N       N CPU devices (jax_num_cpu_devices; default: XLA's).
  IMAGENET_RUNNER_MOCK=N:DIR      run inside tfds.testing.mock_data(num_examples=N,
                                  data_dir=DIR): imagenet2012 of N random images per split
                                  (checkpoints saved synchronously: see below).
  IMAGENET_RUNNER_STOP_AFTER=K    after checkpoint K is saved, print "saved K" and
                                  wait (to be killed: an interrupted run).
  IMAGENET_RUNNER_MICRO=1         train tests.imagenet_testing.MicroNet instead of
                                  config.model (compiles in seconds).
  IMAGENET_RUNNER_UNREADABLE=K    this process cannot read checkpoint K (a storage
                                  error of its host alone).
"""

import contextlib
import functools
import os
import sys


def main():
  devices = os.environ.get("IMAGENET_RUNNER_DEVICES")
  if devices:  # before anything initializes JAX's backends
    import jax

    jax.config.update("jax_num_cpu_devices", int(devices))

  from absl import app

  from experiments import config_flags
  from experiments.imagenet import __main__ as imagenet_main
  from experiments.imagenet import train
  from tests.imagenet_testing import micro_net, stop_after_saving

  if os.environ.get("IMAGENET_RUNNER_MICRO"):
    train.train_and_evaluate = functools.partial(train.train_and_evaluate, create_model=micro_net)

  stop_after = os.environ.get("IMAGENET_RUNNER_STOP_AFTER")
  if stop_after:
    stop_after_saving(lambda run, step: f"saved {step}" if step == int(stop_after) else None)
  unreadable = os.environ.get("IMAGENET_RUNNER_UNREADABLE")
  if unreadable:
    import orbax.checkpoint as ocp

    restore = ocp.StandardCheckpointHandler.restore

    def restore_or_fail(self, directory, *args, **kwargs):
      if directory.parent.name == unreadable:
        raise OSError(f"simulated storage error reading {directory}")
      return restore(self, directory, *args, **kwargs)

    ocp.StandardCheckpointHandler.restore = restore_or_fail
  mock = os.environ.get("IMAGENET_RUNNER_MOCK")
  context = contextlib.nullcontext()
  if mock:
    # tfds.testing.mock_data redirects file writes into a folder of its own, which
    # orbax's background writer then misses: save synchronously inside the mock.
    # Real data have no such redirection.
    import orbax.checkpoint as ocp
    import tensorflow_datasets as tfds

    ocp.CheckpointManagerOptions.__init__ = functools.partialmethod(
      ocp.CheckpointManagerOptions.__init__, enable_async_checkpointing=False
    )

    num_examples, data_dir = mock.split(":", 1)
    context = tfds.testing.mock_data(num_examples=int(num_examples), data_dir=data_dir)
  with context:
    app.run(imagenet_main.main, argv=sys.argv, flags_parser=config_flags.parse_flags)


if __name__ == "__main__":
  main()
