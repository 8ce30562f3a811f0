"""Commands that end in one line saying what to change, never a traceback or a hang.

    def main(argv):  # an experiment's __main__.py
      cli.check_command_line(argv, FLAGS.workdir)
      cli.exit_on_error(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)

(``experiments/config_flags.py`` gives the ``--config`` flag's errors one line too.)
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from experiments.common.errors import LeaseLost, Preempted, RunError


def fail(message: str, status: int = 1, *, prefix: str = "error: ") -> NoReturn:
  """Prints ``error: message`` (one line) on stderr and exits with ``status``; with
  ``os._exit`` if a library's thread that is no daemon (orbax has some) would keep
  the process alive."""
  sys.stdout.flush()
  sys.stderr.write(f"{prefix}{' '.join(message.split())}\n")
  sys.stderr.flush()
  threads = threading.enumerate()
  if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threads):
    os._exit(status)
  raise SystemExit(status)


def check_command_line(argv: list[str], workdir: str | None) -> None:
  """What every command does first: no positional arguments and a ``--workdir``;
  orbax's INFO log of every save silenced; and, as a program (never on import),
  TensorFlow quieted before it loads (unless the user set these variables)."""
  from absl import app, logging

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def exit_on_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)``; a ``RunError`` or ``OSError`` ends the program with its
  one line and status (1; 75 after a preemption, 77 when another run took the
  workdir over), Ctrl-C with 130 and how to resume."""
  try:
    return fn(*args, **kwargs)
  except RunError as e:
    jax = sys.modules.get("jax")
    if isinstance(e, Preempted | LeaseLost) and jax and jax.distributed.is_initialized():
      jax.distributed.shutdown()  # every process stops here together: leave in order
    fail(str(e), e.exit_status, prefix="" if isinstance(e, Preempted) else "error: ")
  except OSError as e:
    fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
  except KeyboardInterrupt:
    fail("interrupted; the same command resumes from the last checkpoint", 130)
