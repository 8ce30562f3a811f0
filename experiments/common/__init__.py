"""What the experiments share: one ``Run`` per training run, and their command lines.

    from experiments import common

    with common.Run.open(workdir, config, num_train_steps=N, checkpoint_every=K) as run:
      state = run.restore_or(initial_state)
      for step in ...:
        state = train_step(state, batch)
        run.log(step, {"train_loss": ...})
        run.maybe_save(step, state)
        run.stop_if_requested(step)

    # __main__.py: one line per error (exit status 1, 75 after a preemption, 77 when
    # another run took the workdir over), never a traceback or a hang
    common.cli.define_config_flag(configs.DEFAULT, "Training configuration.")
    app.run(lambda argv: common.cli.exit_on_error(train_and_evaluate, FLAGS.config, FLAGS.workdir),
            flags_parser=common.cli.parse_flags)

A workdir, a local folder or ``gs://BUCKET/PATH``, holds::

    .lock               the lock (local) or lease (gs://) of the run using it (lock.py)
    config.json         the config and the JAX settings that change the numbers
    metrics.jsonl       one JSON object per row, appended
    events.out.tfevents.*   TensorBoard scalars (the ImageNet experiment)
    checkpoints/<step>/ orbax's step: ``state`` and our ``record`` (its fingerprint)

``run.py`` says which library does what and what is ours (``files.py``: writes a
kill cannot tear and appends that do not grow with the run; ``lock.py``: one run
per workdir); ``cli.py``: the command lines; ``idx.py``: the MNIST-format reader.
"""

from experiments.common import cli as cli
from experiments.common.errors import LEASE_LOST_EXIT_STATUS as LEASE_LOST_EXIT_STATUS
from experiments.common.errors import PREEMPTED_EXIT_STATUS as PREEMPTED_EXIT_STATUS
from experiments.common.errors import CheckpointError as CheckpointError
from experiments.common.errors import ConfigError as ConfigError
from experiments.common.errors import DataError as DataError
from experiments.common.errors import LeaseLost as LeaseLost
from experiments.common.errors import NonFiniteError as NonFiniteError
from experiments.common.errors import Preempted as Preempted
from experiments.common.errors import RunError as RunError
from experiments.common.errors import WorkdirError as WorkdirError
from experiments.common.errors import non_finite_loss as non_finite_loss
from experiments.common.errors import warn as warn
from experiments.common.files import read_metrics as read_metrics
from experiments.common.files import workdir_path as workdir_path
from experiments.common.files import write_atomic as write_atomic
from experiments.common.run import Run as Run
from experiments.common.run import check_config as check_config
from experiments.common.run import locked as locked
from experiments.common.run import runtime_settings as runtime_settings
