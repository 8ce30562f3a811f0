"""The errors a run reports in one line (``cli.exit_on_error`` prints them)."""

import sys


class RunError(Exception):
  """A problem the user can fix; the message says what and how, in one line."""


class ConfigError(RunError, ValueError):
  """A config field has a value the experiment cannot run with, or differs from the
  config of the run being resumed."""


class DataError(RunError, ValueError):
  """The data is missing or malformed; the message names the file and why."""


class WorkdirError(RunError):
  """The workdir cannot be used: in use by another process, unwritable, or holding
  files this code cannot read."""


class CheckpointError(RunError):
  """Checkpoints cannot be written, or none of those present can be restored."""


class NonFiniteError(RunError, FloatingPointError):
  """A training loss or an evaluation metric is NaN or infinite."""


def non_finite_loss(loss: float, step: int, *, latest_checkpoint: int | None, rate: str):
  """The ``NonFiniteError`` of a training loss that is not finite at ``step``: what is
  kept, and what to try (``rate``: the learning-rate field and its value)."""
  kept = (
    f"The last checkpoint, of step {latest_checkpoint}, is kept"
    if latest_checkpoint is not None
    else "No checkpoint was written"
  )
  return NonFiniteError(
    f"the training loss is {loss} at step {step}; stopped there. {kept}. "
    f"Try a smaller {rate} in a new --workdir"
  )


def warn(message: str) -> None:
  """Prints ``warning: message`` on stderr: something was repaired or skipped."""
  sys.stderr.write(f"warning: {message}\n")
  sys.stderr.flush()
