"""The ``--config`` flag of the experiments' commands (ml_collections' config files),
with one-line errors: an unknown field named with the valid ones and the file that
documents them, a missing file, a bad value; and renamed fields that still work.

    config_flags.define_config_flag(configs.DEFAULT, "Training configuration.")
    app.run(main, flags_parser=config_flags.parse_flags)
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_flags as ml_config_flags

from experiments.common.cli import fail

_ROOT = pathlib.Path(__file__).resolve().parents[1]
flags.disclaim_key_flags()  # flags defined here belong to the caller: --help lists them
_CONFIG_FLAGS: dict[str, str] = {}  # flag name -> default config file
_ALIASES: dict[str, dict[str, str]] = {}  # flag name -> {old field name: new field name}


def _display_path(path: str) -> str:
  resolved = pathlib.Path(path).resolve()
  return str(resolved.relative_to(_ROOT)) if resolved.is_relative_to(_ROOT) else path


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
    names += config_fields(value, f"{prefix}{key}.") if hasattr(value, "items") else [prefix + key]
  return sorted(names)


def _config_files_given(name: str, argv: list[str]) -> list[str]:
  return [a.split("=", 1)[1] for a in argv if re.match(rf"^--?{name}=", a)]


def _config_error(name: str, default_file: str, argv: list[str], error: Exception) -> NoReturn:
  """One line for a config flag that cannot be parsed: an unknown field is named,
  with the valid fields and the file that documents them."""
  path = ([default_file] + _config_files_given(name, argv))[-1]
  said = str(error).strip() or type(error).__name__
  try:
    fields = config_fields(load_config_file(path))
  except Exception:  # the file itself is the problem: say what the parser said
    fail(f"--{name}={path}: {said}")
  overrides = [m.group(2) for a in argv if (m := re.match(rf"^--?(no)?{name}\.([^=]+)", a))]
  for field in overrides:
    if field not in fields:
      fail(
        f"--{name}.{field}: no such config field; the fields of {_display_path(path)} are: "
        + ", ".join(fields)
      )
  fail(f"--{name}: {said}")


def renamed_fields(argv: list[str], aliases: dict[str, str], *, name: str = "config") -> list[str]:
  """``argv`` with each ``--NAME.OLD=...`` of a renamed field spelled ``--NAME.NEW=...``,
  with a warning line per old spelling: older command lines go on working.

  >>> renamed_fields(["prog", "--config.num_steps=5"], {"num_steps": "num_train_steps"})[1]
  '--config.num_train_steps=5'
  """
  out = []
  for arg in argv:
    match = re.match(rf"^(--?(?:no)?{name}\.)([^=]+)(.*)$", arg, re.DOTALL)
    new = aliases.get(match.group(2)) if match else None
    if new is not None:
      sys.stderr.write(
        f"warning: --{name}.{match.group(2)} is now --{name}.{new}; the old name still works "
        "for now\n"
      )
      arg = f"{match.group(1)}{new}{match.group(3)}"
    out.append(arg)
  return out


def define_config_flag(
  default_file: str, help: str, *, name: str = "config", aliases: dict[str, str] | None = None
) -> None:
  """ml_collections' ``DEFINE_config_file`` (locked: no new fields), with ``--help``
  naming the file and its fields, and one line for an unknown field (ml_collections
  raises it here, parsing ``sys.argv``'s overrides). ``aliases``: ``{old field: new
  field}`` of renamed fields (``renamed_fields``)."""
  if aliases:
    _ALIASES[name] = dict(aliases)
    sys.argv[:] = renamed_fields(sys.argv, aliases, name=name)
  fields = ", ".join(config_fields(load_config_file(default_file)))
  help = (
    f"{help} A file defining get_config(); the default, {_display_path(default_file)}, documents "
    f"each field. Override a field with --{name}.FIELD=VALUE; the fields are: {fields}."
  )
  try:
    ml_config_flags.DEFINE_config_file(name, default_file, help, lock_config=True)
  except Exception as e:
    _config_error(name, default_file, sys.argv, e)
  _CONFIG_FLAGS[name] = default_file


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s ``flags_parser``: absl's parsing, with one-line errors."""
  for name, aliases in _ALIASES.items():
    argv = renamed_fields(argv, aliases, name=name)
  for name in _CONFIG_FLAGS:
    for path in _config_files_given(name, argv):
      if not pathlib.Path(path.split(":", 1)[0]).is_file():
        fail(f"--{name}={path}: no such file")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (--help lists the flags)")
  except Exception as e:  # ml_collections raises KeyError, AttributeError, IOError
    for name, default_file in _CONFIG_FLAGS.items():
      if any(re.match(rf"^--?(no)?{name}[.=]", a) for a in argv):
        _config_error(name, default_file, argv, e)
    raise
