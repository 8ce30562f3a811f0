r"""Trains one ImageNet network (Section 4.2 of the paper).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/NAME.py \
        [--config.FIELD=VALUE ...]

The configs and what each field means: experiments/imagenet/configs/ (``--help``
lists the fields). Killed and restarted with the same command, a run continues
from its last intact checkpoint, exactly as it would have gone on.

Several hosts form one run through ``jax.distributed``: on a Cloud TPU pod slice,
the same command on every host with ``--multihost``; elsewhere, on each process,
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
"""

import pathlib

from absl import app, flags

from experiments import config_flags
from experiments.common import cli

FLAGS = flags.FLAGS
DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "default.py")
flags.DEFINE_string(
  "workdir",
  None,
  "Folder for config.json, metrics.jsonl, TensorBoard summaries and checkpoints "
  "(a local folder, or gs://BUCKET/PATH; on a pod slice, the bucket all hosts share).",
)
config_flags.define_config_flag(
  DEFAULT_CONFIG, "Training configuration, experiments/imagenet/configs/NAME.py."
)
flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() with no arguments (Cloud TPU pod "
  "slices; SLURM and Open MPI jobs also find their processes this way).",
)
flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0, for jax.distributed elsewhere."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer(
  "process_id", None, "This process's index, 0 .. num_processes - 1 (with --coordinator_address)."
)


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` as the flags say; before any other JAX call."""
  import jax

  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    jax.config.update(
      "jax_cpu_collectives_implementation", "gloo"
    )  # collectives between CPU processes
    jax.distributed.initialize(
      FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
    )
  elif FLAGS.multihost:
    jax.distributed.initialize()


def main(argv):
  cli.check_command_line(argv, FLAGS.workdir)
  initialize_distributed()
  from experiments.imagenet import train

  cli.exit_on_error(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags.parse_flags)
