"""Trains one ImageNet network (Section 4.2 of the paper).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/NAME.py [--config.FIELD=VALUE ...]

Several hosts (a Cloud TPU pod slice: the same command on every host with
``--multihost``; elsewhere ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` on each process) form one run through ``jax.distributed``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder (or gs:// path) for config.json, metrics.jsonl, "
                    "TensorBoard summaries and checkpoints.")
config_flags.DEFINE_config_file("config", None, "Training configuration: experiments/imagenet/configs/NAME.py.",
                                lock_config=True)
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with no arguments (Cloud TPU pod "
                  "slices, SLURM, Open MPI discover the processes themselves).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed elsewhere.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (with --coordinator_address).")


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` as the flags say; before any other JAX call."""
  import jax

  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests, laptops)
    jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if FLAGS.config is None:
    raise app.UsageError("--config=experiments/imagenet/configs/NAME.py is required")
  initialize_distributed()
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from experiments.imagenet import input_pipeline, train

  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, input_pipeline.DataError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
