"""Writes the excerpts of Equinox's tests that exercise BatchNorm into this folder.

Usage (from the repository root, with a clone of patrick-kidger/equinox)::

    python -m tests.third_party.equinox.vendor_equinox_tests /path/to/equinox v0.13.8

For each file of ``SOURCES`` at that revision it keeps the imports and the tests
named there (every test of Equinox's suite that constructs ``eqx.nn.BatchNorm``),
Equinox's code unchanged, in its original order, under a header naming the source.
Equinox is Apache-2.0 (``LICENSE`` in this folder is its license file).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

# Equinox test file -> the tests of it that construct eqx.nn.BatchNorm.
SOURCES = {
  "tests/test_nn.py": [
    "test_sequential",
    "test_nested_sequential",
    "test_batch_norm",
    "test_batch_norm_zero_training_steps",
  ],
  "tests/test_stateful.py": ["test_delete_init_state"],
  "tests/test_serialisation.py": ["test_stateful"],
}


def excerpt(source: str, names: list[str], path: str, revision: str) -> str:
  """The imports of ``source`` and its functions ``names``, verbatim."""
  tree = ast.parse(source)
  lines = source.splitlines()
  imports, kept = [], []
  for node in tree.body:
    if isinstance(node, ast.Import | ast.ImportFrom):
      imports.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    elif isinstance(node, ast.FunctionDef) and node.name in names:
      start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
      # Comments right above a test belong to it.
      while start > 1 and lines[start - 2].startswith("#"):
        start -= 1
      kept.append("\n".join(lines[start - 1 : node.end_lineno]))
  header = (
    f"# Excerpt of Equinox's {path} at {revision} (patrick-kidger/equinox), the tests\n"
    f"# that construct eqx.nn.BatchNorm: {', '.join(names)}. Copyright Patrick Kidger\n"
    "# and the Equinox contributors, Apache-2.0 (LICENSE in this folder). Unchanged;\n"
    "# written by vendor_equinox_tests.py. conftest.py puts bnjax.equinox.BatchNorm\n"
    "# in place of eqx.nn.BatchNorm.\n"
  )
  return header + "\n" + "\n".join(imports) + "\n\n\n" + "\n\n\n".join(kept) + "\n"


def main(clone: str, revision: str) -> None:
  here = Path(__file__).parent
  for path, names in SOURCES.items():
    source = subprocess.run(
      ["git", "-C", clone, "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    name = Path(path).name.removeprefix("test_").removesuffix(".py") + "_test.py"
    (here / name).write_text(excerpt(source, names, path, revision))


if __name__ == "__main__":
  main(*sys.argv[1:])
