"""Run bookkeeping shared by the experiments: runs that lose nothing when killed.

A training run owns one workdir, a local folder or ``gs://BUCKET/PATH``
(``storage.py``: one path abstraction, so no call site tests which)::

    workdir/.lock            local: held (fcntl.flock) while a process uses the workdir;
                             gs://: a lease object (lease.py: refreshed every 15 s,
                             stale after 60 s)
    workdir/config.json      {"config": {...}, "runtime": {...}}, replaced atomically
    workdir/metrics.jsonl    one JSON object per evaluation, appended and fsync'ed
                             (gs://: the object uploaded again at each row)
    workdir/checkpoints/N/   orbax step folders, each with our own SHA256SUMS
    workdir/events.out.tfevents.*   TensorBoard summaries (summaries.py)

The pieces, in the order a ``train_and_evaluate`` uses them::

    from experiments import common

    validate_config(config)                         # the experiment's checks: raise ConfigError
    workdir = common.workdir_path(workdir)          # pathlib.Path, or GcsPath for gs://
    with common.WorkdirLock(workdir):               # WorkdirError if another process has it
      data = load_data(config)                      # raise DataError: no new workdir is left
      with common.Checkpoints(workdir / "checkpoints", max_to_keep=2) as checkpoints, \
           common.Preemption() as preemption:       # SIGTERM / Ctrl-C handlers
        resuming = checkpoints.latest_step is not None   # newest *intact* step
        common.check_config(workdir, config, resuming=resuming, may_change=("num_train_steps",))
        common.check_not_past_the_end(checkpoints.latest_step, config.num_train_steps)
        common.write_config(workdir, config)
        state = checkpoints.restore(state) if resuming else state
        metrics = common.MetricsLog(workdir / "metrics.jsonl")
        metrics.keep_up_to(step)                    # drop rows of steps lost in a kill
        ...                                          # train; raise common.non_finite_loss(...)
        metrics.append({"step": step, ...})         # NonFiniteError rather than NaN in JSON
        checkpoints.save(step, state)               # async; CheckpointError if it cannot be written
        preemption.check(step, checkpoints, lambda: state)  # agreed step: save, raise Preempted

    # __main__.py: one line per error, exit status 1, never a hang
    common.cli.define_config_flag(configs.DEFAULT, "Training configuration.")
    app.run(lambda argv: common.cli.exit_on_error(train_and_evaluate, FLAGS.config, FLAGS.workdir),
            flags_parser=common.cli.parse_flags)

What each guards against:

* ``write_text_atomic`` / ``write_json_atomic``: temporary file, ``fsync``,
  ``os.replace``: a kill leaves the old file or the new one, never half of one.
* ``MetricsLog``: appends one fsync'ed line per row; ``read`` and ``keep_up_to``
  drop a last line truncated by a kill (with a warning), and refuse a damaged line
  elsewhere naming its number; ``keep_up_to`` rewrites atomically; ``append``
  refuses NaN and infinities (``NonFiniteError``): the file is always standard JSON.
* ``WorkdirLock``: a second process on the same workdir refuses, naming the first
  one's PID; the kernel releases the lock of a killed process.
* ``check_config`` / ``write_config``: a resume must use the config it started
  with (except ``may_change`` fields) and the same ``runtime_settings()``
  (``jax_enable_x64`` and the PRNG settings change the sampled batches and the
  dtypes); checkpoints beside a missing, empty or garbage ``config.json`` are
  refused, since their config is unknown.
* ``Checkpoints``: writability checked before orbax starts (a prompt
  ``CheckpointError``, not a hang); orbax's asynchronous saves, each step sealed
  by a ``SHA256SUMS`` written once orbax has finished it (a step without one is
  not intact); on opening, damaged or incomplete newest steps are moved aside to
  ``<step>.corrupt`` with a warning and the newest intact one is used.
* ``Preemption``: SIGTERM (a TPU VM's maintenance or spot notice), or Ctrl-C on one
  machine, stops the run at a step all processes agree on (JAX's preemption sync
  point under ``jax.distributed``), with a checkpoint of that step; ``cli`` then
  prints ``preempted at step N; checkpoint saved; run the same command to
  continue`` and exits with ``PREEMPTED_EXIT_STATUS`` = 75 (``EX_TEMPFAIL``).
* ``summary_writer``: clu's TensorBoard writer locally; on ``gs://`` the same event
  format uploaded through the storage layer (TensorFlow's file system ignores
  ``STORAGE_EMULATOR_HOST``).
* Bad workdirs end in one line and create nothing: ``gs://`` without a bucket, a
  bucket that does not exist, no credentials (``gcloud auth application-default
  login``), a scheme other than ``gs://``.
* ``cli``: ``exit_on_error`` turns every ``RunError`` into ``error: <one line>``
  and status 1 (``os._exit`` if a library thread would keep the process alive);
  ``define_config_flag`` / ``parse_flags`` turn an unknown ``--config.FIELD`` into
  one line listing the valid fields, and ``--help`` names the config file.
"""

from experiments.common import cli as cli
from experiments.common import storage as storage
from experiments.common.checkpoints import Checkpoints as Checkpoints
from experiments.common.errors import CheckpointError as CheckpointError
from experiments.common.errors import ConfigError as ConfigError
from experiments.common.errors import DataError as DataError
from experiments.common.errors import NonFiniteError as NonFiniteError
from experiments.common.errors import RunError as RunError
from experiments.common.errors import WorkdirError as WorkdirError
from experiments.common.errors import non_finite_loss as non_finite_loss
from experiments.common.errors import warn as warn
from experiments.common.files import MetricsLog as MetricsLog
from experiments.common.files import write_bytes_atomic as write_bytes_atomic
from experiments.common.files import write_json_atomic as write_json_atomic
from experiments.common.files import write_text_atomic as write_text_atomic
from experiments.common.preemption import PREEMPTED_EXIT_STATUS as PREEMPTED_EXIT_STATUS
from experiments.common.preemption import Preempted as Preempted
from experiments.common.preemption import Preemption as Preemption
from experiments.common.summaries import summary_writer as summary_writer
from experiments.common.workdir import WorkdirLock as WorkdirLock
from experiments.common.workdir import check_config as check_config
from experiments.common.workdir import check_not_past_the_end as check_not_past_the_end
from experiments.common.workdir import read_config as read_config
from experiments.common.workdir import runtime_settings as runtime_settings
from experiments.common.workdir import write_config as write_config

workdir_path = storage.as_path  # pathlib.Path, or GcsPath for gs://
