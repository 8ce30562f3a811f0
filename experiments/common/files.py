"""Files a kill cannot leave half-written: atomic replacement, an append-only log.

A file is replaced by writing a temporary file beside it, ``fsync``-ing it, and
``os.replace``-ing it over the old one (atomic on POSIX file systems): a reader, or
a run killed at any instant, sees the old content or the new, never a mix.
``metrics.jsonl`` grows by appending one line per evaluation; a kill in the middle
of an append can only truncate the last line, which ``MetricsLog`` drops on reading.
On ``gs://`` (``experiments.common.storage``) a replacement is one upload, atomic
by itself, and an append re-uploads the whole file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from experiments.common import storage
from experiments.common.errors import NonFiniteError, WorkdirError, warn


def write_text_atomic(path: str | os.PathLike | storage.GcsPath, text: str) -> None:
  """Replaces ``path``'s content by ``text``, atomically and durably (local or ``gs://``).

  Raises:
    WorkdirError: if the folder cannot be written (naming the path and why).
  """
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike | storage.GcsPath, data: bytes) -> None:
  """Replaces ``path``'s content by ``data``, atomically and durably (as ``write_text_atomic``)."""
  storage.write_bytes(storage.as_path(path), data)


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
  place. ``keep_up_to`` (for a resumed run) replaces the file atomically. On
  ``gs://`` (objects cannot grow) each ``append`` uploads the whole file again, so
  the bucket holds every row as soon as it is appended.

  Example::

    log = MetricsLog(workdir / "metrics.jsonl")
    log.keep_up_to(restored_step)        # drop rows the lost steps had written
    log.append({"step": 500, "test_accuracy": 0.91})
    rows = log.read()
  """

  def __init__(self, path: str | os.PathLike | storage.GcsPath):
    self.path = storage.as_path(path)
    self._text: str | None = None  # gs://: the object's content, as last read or written

  def _lines(self) -> tuple[list[dict], bool]:
    """The rows, and whether a truncated last line was dropped."""
    try:
      text = self.path.read_text(encoding="utf-8")
    except FileNotFoundError:
      text = ""
    except (OSError, UnicodeDecodeError) as e:
      raise WorkdirError(f"cannot read {self.path}: {e}") from e
    self._text = text
    if not text:
      return [], False
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
          f'{self.path}, line {number}: not a JSON object with an integer "step" '
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
      self._text = "".join(to_json(row) + "\n" for row in kept)
      write_text_atomic(self.path, self._text)

  def append(self, row: Mapping[str, Any]) -> None:
    """Appends one evaluation and makes it durable.

    Raises:
      NonFiniteError: naming the entries that are NaN or infinite (nothing is
        written: JSON has no NaN).
    """
    bad = non_finite_entries(row)
    if bad:
      raise NonFiniteError(
        f"at step {row.get('step')}, "
        + ", ".join(f"{k} = {row[k]}" for k in bad)
        + " is not finite; not written to "
        + str(self.path)
      )
    line = to_json(dict(row)) + "\n"
    if storage.is_gcs(self.path) and self._text is None:
      self._lines()
    whole = None if self._text is None else self._text + line
    storage.append_text(self.path, line, whole=whole)
    self._text = whole
