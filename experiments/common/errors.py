"""The errors a run reports in one line (``cli.exit_on_error`` prints them), and the
exit statuses a restart loop tells apart."""

import sys

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h: "try again later"
LEASE_LOST_EXIT_STATUS = 77  # EX_NOPERM: the workdir is no longer this run's to write


class RunError(Exception):
  """A problem the user can fix; the message says what and how, in one line."""

  exit_status = 1


class ConfigError(RunError, ValueError):
  """A config field the run cannot use, or unlike that of the run being resumed."""


class DataError(RunError, ValueError):
  """The data is missing or malformed (the message names the file and why)."""


class WorkdirError(RunError):
  """The workdir cannot be used: another run's, unwritable, or unreadable."""


class CheckpointError(RunError):
  """A checkpoint cannot be written, or restored into this run's state."""


class NonFiniteError(RunError, FloatingPointError):
  """A training loss or an evaluation metric is NaN or infinite."""


class Preempted(RunError):
  """Stopped at ``step`` after a preemption notice, its checkpoint saved (status 75)."""

  exit_status = PREEMPTED_EXIT_STATUS

  def __init__(self, step: int):
    super().__init__(
      f"preempted at step {step}; checkpoint saved; run the same command to continue"
    )
    self.step = step


class LeaseLost(WorkdirError):
  """Another run took the lease over (this one stopped for longer than a lease
  lasts): stopped before its next write (status 77: a restart loop must not retry)."""

  exit_status = LEASE_LOST_EXIT_STATUS


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


def first_line(e: BaseException) -> str:
  """``Type: message``, its first line: a library's error, shown in one."""
  return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def warn(message: str) -> None:
  """Prints ``warning: message`` on stderr: something was repaired or skipped."""
  sys.stderr.write(f"warning: {message}\n")
  sys.stderr.flush()
