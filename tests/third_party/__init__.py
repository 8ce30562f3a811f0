"""Flax's, Haiku's and Equinox's own BatchNorm tests, run against bnjax's drop-ins.

Each folder is a compatibility suite: its tests are marked slow (they run in CI,
most of their time XLA compiling the libraries' eager calls), but for its
``test_replacement.py``, the fast check that the tests see bnjax's class."""

from __future__ import annotations

import pathlib

import pytest

FAST = "test_replacement.py"


def mark_slow(conftest_file: str, items: list[pytest.Item]) -> None:
  """Marks slow the tests of ``conftest_file``'s folder, but for ``FAST``'s."""
  folder = pathlib.Path(conftest_file).parent
  for item in items:
    if item.path.parent == folder and item.path.name != FAST:
      item.add_marker(pytest.mark.slow)
