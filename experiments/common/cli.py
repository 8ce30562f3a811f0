"""Command lines that end with one line saying what to change, never a traceback.

# in an experiment's __main__.py
flags.DEFINE_string("workdir", None, "...")
cli.define_config_flag(configs.DEFAULT, "Training configuration.")

def main(argv):
  cli.exit_on_error(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_flags

from experiments.common.errors import LeaseLost, Preempted, RunError

_ROOT = pathlib.Path(__file__).resolve().parents[2]
flags.disclaim_key_flags()  # flags defined here belong to the caller: --help lists them
_CONFIG_FLAGS: dict[str, str] = {}  # flag name -> default config file
_ALIASES: dict[str, dict[str, str]] = {}  # flag name -> {old field name: new field name}


def fail(message: str, status: int = 1, *, prefix: str = "error: ") -> NoReturn:
  """Prints ``error: message`` on stderr and exits with ``status``.

  If a library thread that is not a daemon is still alive (orbax runs some), it
  would keep the process from ending after an error; then the process ends with
  ``os._exit`` after flushing its output, so an error never turns into a hang.
  """
  sys.stdout.flush()
  message = " ".join(message.split())  # one line, whatever a library put in it
  sys.stderr.write(f"{prefix}{message}\n")
  sys.stderr.flush()
  if any(
    t.is_alive() and not t.daemon and t is not threading.main_thread()
    for t in threading.enumerate()
  ):
    os._exit(status)
  raise SystemExit(status)


def check_command_line(argv: list[str], workdir: str | None) -> None:
  """What every experiment command does first: checks that there are no positional
  arguments and a ``--workdir``; silences orbax's INFO log of every save; and, as a
  program (never on import), quiets TensorFlow before it loads: no oneDNN banner and
  C++ INFO lines before the command's output (unless the user set these variables)."""
  from absl import app, logging

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _leave_distributed() -> None:
  """``jax.distributed.shutdown()`` if this process joined one (else a process
  ending with ``os._exit`` makes the others' shutdown barrier abort)."""
  jax = sys.modules.get("jax")
  if jax is None:
    return
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def exit_on_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Runs ``fn(*args, **kwargs)``; a ``RunError`` (config, data, workdir, checkpoint,
  non-finite loss, lease lost) or an ``OSError`` ends the program with its one-line
  message and its exit status (1; 77 for a lost lease); Ctrl-C with status 130 and
  how to resume (a second Ctrl-C, when the run handles the first as a preemption). A
  ``Preempted`` run prints ``preempted at step N; checkpoint saved; run the same
  command to continue`` and exits with ``PREEMPTED_EXIT_STATUS`` (75)."""
  try:
    return fn(*args, **kwargs)
  except RunError as e:
    if isinstance(e, Preempted | LeaseLost):
      _leave_distributed()  # every process stops here together: leave jax.distributed in order
    fail(str(e), e.exit_status, prefix="" if isinstance(e, Preempted) else "error: ")
  except OSError as e:
    fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
  except KeyboardInterrupt:
    fail("interrupted; the same command resumes from the last checkpoint", 130)


def _display_path(path: str) -> str:
  try:
    return str(pathlib.Path(path).resolve().relative_to(_ROOT))
  except ValueError:
    return path


def load_config_file(path: str) -> Any:
  """``get_config()`` of the config file at ``path``."""
  spec = importlib.util.spec_from_file_location("_config_for_help", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_fields(config: Any, prefix: str = "") -> list[str]:
  """Dotted names of the leaf fields of a ``ConfigDict``."""
  names = []
  for key, value in config.items():
    if hasattr(value, "items"):
      names += config_fields(value, f"{prefix}{key}.")
    else:
      names.append(f"{prefix}{key}")
  return sorted(names)


def _has_field(config: Any, dotted: str) -> bool:
  for part in dotted.split("."):
    if not (hasattr(config, "keys") and part in config.keys()):
      return False
    config = config[part]
  return True


def _config_files_given(name: str, argv: list[str]) -> list[str]:
  return [a.split("=", 1)[1] for a in argv if re.match(rf"^--?{name}=", a)]


def _config_error(name: str, default_file: str, argv: list[str], error: Exception) -> NoReturn:
  """One line for a config flag that cannot be parsed: an unknown field is named,
  with the valid fields and the file that documents them."""
  given = _config_files_given(name, argv)
  path = given[-1] if given else default_file
  try:
    config = load_config_file(path)
  except Exception:  # The file itself is the problem: say what the parser said.
    fail(f"--{name}={path}: {str(error).strip() or type(error).__name__}")
  overrides = [m.group(2) for a in argv if (m := re.match(rf"^--?(no)?{name}\.([^=]+)", a))]
  unknown = [o for o in overrides if not _has_field(config, o)]
  if unknown:
    fail(
      f"--{name}.{unknown[0]}: no such config field; the fields of {_display_path(path)} are: "
      + ", ".join(config_fields(config))
    )
  fail(f"--{name}: {str(error).strip() or type(error).__name__}")


def renamed_fields(argv: list[str], aliases: dict[str, str], *, name: str = "config") -> list[str]:
  """``argv`` with each ``--NAME.OLD=...`` of a renamed field spelled ``--NAME.NEW=...``,
  and one warning line on stderr per old spelling used: command lines written before
  a field was renamed go on working.

  >>> renamed_fields(["prog", "--config.num_steps=5"], {"num_steps": "num_train_steps"})[1]
  '--config.num_train_steps=5'
  """
  out = []
  for arg in argv:
    match = re.match(rf"^(--?(?:no)?{name}\.)([^=]+)(.*)$", arg, re.DOTALL)
    new = aliases.get(match.group(2)) if match else None
    if new is None:
      out.append(arg)
      continue
    sys.stderr.write(
      f"warning: --{name}.{match.group(2)} is now --{name}.{new}; the old name "
      "still works for now\n"
    )
    out.append(f"{match.group(1)}{new}{match.group(3)}")
  return out


def define_config_flag(
  default_file: str, help: str, *, name: str = "config", aliases: dict[str, str] | None = None
) -> None:
  """``config_flags.DEFINE_config_file`` (locked: no new fields) with ``--help``
  naming the config file and its fields, and a one-line error for an unknown field
  (ml_collections raises it while defining the flag, so it cannot wait for
  ``parse_flags``).

  ``aliases``: ``{old field name: new field name}`` of renamed fields; an old
  spelling on the command line sets the new field, with a warning (``renamed_fields``).
  """
  if aliases:
    _ALIASES[name] = dict(aliases)
    sys.argv[:] = renamed_fields(sys.argv, aliases, name=name)  # DEFINE parses sys.argv's overrides
  fields = ", ".join(config_fields(load_config_file(default_file)))
  help = (
    f"{help} A file defining get_config(); the default, {_display_path(default_file)}, documents "
    f"each field. Override a field with --{name}.FIELD=VALUE; the fields are: {fields}."
  )
  try:
    config_flags.DEFINE_config_file(name, default_file, help, lock_config=True)
  except Exception as e:  # Only overrides on sys.argv are parsed here.
    _config_error(name, default_file, sys.argv, e)
  _CONFIG_FLAGS[name] = default_file


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s ``flags_parser``: absl's parsing, with one-line errors."""
  for name, aliases in _ALIASES.items():  # (sys.argv itself was renamed by define_config_flag)
    argv = renamed_fields(argv, aliases, name=name)
  for name in _CONFIG_FLAGS:
    for path in _config_files_given(name, argv):
      if not pathlib.Path(path.split(":", 1)[0]).is_file():
        fail(f"--{name}={path}: no such file")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (--help lists the flags)")
  except Exception as e:  # ml_collections raises KeyError/AttributeError/IOError
    for name, default_file in _CONFIG_FLAGS.items():
      if any(re.match(rf"^--?(no)?{name}[.=]", a) for a in argv):
        _config_error(name, default_file, argv, e)
    raise
