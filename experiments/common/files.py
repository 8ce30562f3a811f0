"""Files a kill cannot leave half-written: atomic replacement, an append-only log.

A file is replaced by writing a temporary file beside it, ``fsync``-ing it, and
``os.replace``-ing it over the old one (atomic on POSIX file systems): a reader, or
a run killed at any instant, sees the old content or the new, never a mix.
``metrics.jsonl`` grows by appending one line per evaluation; a kill in the middle
of an append can only truncate the last line, which ``MetricsLog`` drops on reading.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

from experiments.common.errors import NonFiniteError, WorkdirError, warn


def _fsync_folder(folder: pathlib.Path) -> None:
  """Makes a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Replaces ``path``'s content by ``text``, atomically and durably.

  Raises:
    WorkdirError: if the folder cannot be written (naming the path and why).
  """
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Replaces ``path``'s content by ``data``, atomically and durably (as ``write_text_atomic``)."""
  path = pathlib.Path(path)
  try:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException as e:
    pathlib.Path(temporary).unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e
    raise
  _fsync_folder(path.parent)


def to_json(value: Any, **kwargs) -> str:
  """``json.dumps`` that refuses NaN and infinities (standard JSON has none)."""
  return json.dumps(value, allow_nan=False, **kwargs)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
  """Writes ``value`` as indented, key-sorted standard JSON, atomically."""
  write_text_atomic(path, to_json(value, indent=2, sort_keys=True) + "\n")


def non_finite_entries(row: Mapping[str, Any]) -> list[str]:
  """The keys of ``row`` whose values are NaN or infinite floats."""
  return [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]


class MetricsLog:
  """A JSON-lines file of evaluations, each a flat object with an integer ``"step"``.

  Appending writes one line and ``fsync``s it; other lines are never rewritten in
  place. ``keep_up_to`` (for a resumed run) replaces the file atomically.

  Example::

    log = MetricsLog(workdir / "metrics.jsonl")
    log.keep_up_to(restored_step)        # drop rows the lost steps had written
    log.append({"step": 500, "test_accuracy": 0.91})
    rows = log.read()
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)

  def _lines(self) -> tuple[list[dict], bool]:
    """The rows, and whether a truncated last line was dropped."""
    try:
      text = self.path.read_text(encoding="utf-8")
    except FileNotFoundError:
      return [], False
    except (OSError, UnicodeDecodeError) as e:
      raise WorkdirError(f"cannot read {self.path}: {e}") from e
    lines = text.split("\n")
    # A complete file ends with "\n", so its last piece is "". Anything else is a
    # last line cut short by a kill during an append: it carries no evaluation.
    dropped = lines[-1] != ""
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
        raise WorkdirError(
            f"{self.path}, line {number}: not a JSON object with an integer \"step\" "
            f"({line[:80]!r}); repair or delete that line"
        )
      rows.append(row)
    return rows, dropped

  def read(self) -> list[dict]:
    """All complete rows, in file order; a truncated last line is left out."""
    return self._lines()[0]

  def keep_up_to(self, step: int) -> None:
    """Keeps the rows with ``row["step"] <= step`` (the evaluations a resumed run
    has already made) and drops a truncated last line, replacing the file
    atomically; does not touch a file that needs no change."""
    rows, dropped = self._lines()
    kept = [row for row in rows if row["step"] <= step]
    if dropped:
      warn(f"{self.path}: dropped a truncated last line (a run was killed while writing it)")
    if dropped or len(kept) < len(rows):
      write_text_atomic(self.path, "".join(to_json(row) + "\n" for row in kept))

  def append(self, row: Mapping[str, Any]) -> None:
    """Appends one evaluation and makes it durable.

    Raises:
      NonFiniteError: naming the entries that are NaN or infinite (nothing is
        written: JSON has no NaN).
    """
    bad = non_finite_entries(row)
    if bad:
      raise NonFiniteError(
          f"at step {row.get('step')}, " + ", ".join(f"{k} = {row[k]}" for k in bad)
          + " is not finite; not written to " + str(self.path)
      )
    line = to_json(dict(row)) + "\n"
    try:
      with self.path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise WorkdirError(f"cannot append to {self.path}: {e.strerror or e}") from e
