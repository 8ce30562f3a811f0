"""Writes the excerpts of Flax's tests that exercise BatchNorm into this folder.

Usage (from the repository root, with a clone of google/flax)::

    python -m tests.third_party.flax.vendor_flax_tests /path/to/flax 18f8f311

For each file of ``SOURCES`` at that commit it keeps the license header, every
module-level statement that is not a definition, the module-level definitions
the kept tests use, and of each test class the members that are not tests plus
the tests whose source (decorators included) or helpers name ``BatchNorm`` or
``batch_norm``. The code kept is Flax's, unchanged, in its original order.
``nnx_linear_test.py`` is a hand-made adaptation instead: see its header.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

# Flax test file -> the name of its excerpt here.
SOURCES = {
  "tests/linen/linen_module_test.py": "linen_module_test.py",
  "tests/linen/linen_test.py": "linen_test.py",
  "tests/linen/linen_transforms_test.py": "linen_transforms_test.py",
  "tests/linen/summary_test.py": "linen_summary_test.py",
  "tests/nnx/bridge/wrappers_test.py": "nnx_bridge_wrappers_test.py",
  "tests/nnx/graph_utils_test.py": "nnx_graph_utils_test.py",
  "tests/nnx/helpers_test.py": "nnx_helpers_test.py",
  "tests/nnx/integration_test.py": "nnx_integration_test.py",
  "tests/nnx/module_test.py": "nnx_module_test.py",
  "tests/nnx/nn/normalization_test.py": "nnx_normalization_test.py",
  "tests/nnx/summary_test.py": "nnx_summary_test.py",
  "tests/nnx/transforms_test.py": "nnx_transforms_test.py",
}
_SCAN_VARIANT = (
  "the Block of the kept TestScan tests (Linear, BatchNorm, Dropout) in nnx.scan "
  "again, in a further combination of view / functional / decorator / broadcast "
  "dropout: left out to keep these tests within their time budget"
)
_SUMMARY_OPTION = (
  "the CNN (with BatchNorm) of the kept test_tabulate and test_module_summary, "
  "through another option of tabulate: left out for the time budget"
)
# Tests that name BatchNorm but are not copied, with the reason (listed in the excerpt).
LEFT_OUT = {
  "tests/nnx/transforms_test.py": dict.fromkeys(
    [
      "test_complex_view_functional",
      "test_complex_broadcast_dropout_functional",
      "test_complex_broadcast_dropout_view",
      "test_complex_broadcast_dropout_view_functional",
      "test_complex_decorator_functional",
      "test_complex_decorator_view",
      "test_complex_decorator_view_functional",
    ],
    _SCAN_VARIANT,
  ),
  "tests/linen/summary_test.py": dict.fromkeys(
    [
      "test_module_summary_with_depth",
      "test_tabulate_with_sow",
      "test_tabulate_with_method",
      "test_tabulate_function",
    ],
    _SUMMARY_OPTION,
  ),
}
MENTIONS_BATCH_NORM = re.compile(r"BatchNorm|batch_norm")


def _names(node: ast.AST) -> set[str]:
  return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_test(node: ast.AST) -> bool:
  return isinstance(node, ast.FunctionDef) and node.name.startswith("test")


def _is_test_class(node: ast.AST) -> bool:
  return isinstance(node, ast.ClassDef) and any(_is_test(m) for m in node.body)


def _is_helper(node: ast.AST) -> bool:
  """A module-level definition that is not a test class."""
  return isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not _is_test_class(node)


def _first_line(node: ast.AST) -> int:
  """The 1-based line where ``node`` starts, its decorators included."""
  return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _closure(seeds: set[str], definitions: dict[str, ast.AST]) -> set[str]:
  """The definitions that ``seeds`` name, and those they name in turn."""
  needed, frontier = set(), set(seeds)
  while frontier:
    name = frontier.pop()
    if name in definitions and name not in needed:
      needed.add(name)
      frontier |= _names(definitions[name])
  return needed


class _Excerpt:
  """One Flax test file, read: its lines, its helpers and the tests kept of it."""

  def __init__(self, source: str, left_out: dict[str, str]):
    self.lines = source.splitlines()
    self.tree = ast.parse(source)
    self.left_out = left_out
    definitions = {n.name: n for n in self.tree.body if _is_helper(n)}
    self.with_bn = self._helpers_with_batch_norm(definitions)
    kept_tests = [m for n in self.tree.body if _is_test_class(n) for m in n.body if self.kept(m)]
    if not kept_tests:
      raise ValueError("no test mentions BatchNorm")
    self.needed = _closure(set().union(*(_names(m) for m in kept_tests)), definitions)

  def text(self, node: ast.AST) -> str:
    return "\n".join(self.lines[_first_line(node) - 1 : node.end_lineno])

  def _helpers_with_batch_norm(self, definitions: dict[str, ast.AST]) -> set[str]:
    """Module-level helpers that build a BatchNorm, directly or through another helper."""
    with_bn = {name for name, n in definitions.items() if MENTIONS_BATCH_NORM.search(self.text(n))}
    while grown := {
      name for name, n in definitions.items() if name not in with_bn and _names(n) & with_bn
    }:
      with_bn |= grown
    return with_bn

  def kept(self, member: ast.AST) -> bool:
    return (
      _is_test(member)
      and member.name not in self.left_out
      and bool(MENTIONS_BATCH_NORM.search(self.text(member)) or _names(member) & self.with_bn)
    )

  def sets_environment(self, node: ast.AST) -> bool:
    """Whether ``node`` is a module-level assignment to ``os.environ`` (XLA_FLAGS)."""
    return isinstance(node, ast.Assign) and "os.environ" in self.text(node)

  def header(self, origin: str) -> list[str]:
    """Flax's license header, then where the excerpt comes from and what it leaves out."""
    header_end = next(i for i, line in enumerate(self.lines) if not line.startswith("#"))
    sets_device_flags = any(self.sets_environment(node) for node in self.tree.body)
    out = self.lines[:header_end] + [
      "",
      f"# bnjax: an excerpt of google/flax {origin}:",
      "# the tests that exercise BatchNorm, with the module-level code and test-class",
      "# members they use, "
      + (
        "unchanged but for a module-level XLA_FLAGS assignment (below);"
        if sets_device_flags
        else "unchanged;"
      ),
      "# written by tests/third_party/flax/vendor_flax_tests.py. conftest.py puts bnjax's",
      "# BatchNorm in place of Flax's.",
    ]
    if self.left_out:
      out.append("# Tests that use BatchNorm but are not copied here:")
      for reason in dict.fromkeys(self.left_out.values()):
        names = ", ".join(name for name, why in self.left_out.items() if why == reason)
        out += textwrap.wrap(
          f"{names}: {reason}.", 84, initial_indent="#   ", subsequent_indent="#     "
        )
    return out

  def test_class(self, node: ast.ClassDef) -> list[str]:
    """The class's lines up to its first member, its non-test members and its kept tests;
    nothing if it keeps no test."""
    members = [m for m in node.body if self.kept(m) or not _is_test(m)]
    if not any(self.kept(m) for m in members):
      return []
    out = ["", ""] + self.lines[_first_line(node) - 1 : _first_line(node.body[0]) - 1]
    for member in members:
      out += [self.text(member), ""]
    return out

  def statement(self, node: ast.AST) -> list[str]:
    """The excerpt's lines for one module-level statement."""
    if _is_test_class(node):
      return self.test_class(node)
    if _is_helper(node) and node.name not in self.needed:
      return []
    if self.sets_environment(node):
      # The suite's 8 simulated devices (tests/conftest.py) must stay as they are.
      return [
        f"# bnjax: dropped, the suite sets its device count (tests/conftest.py): {self.text(node)}"
      ]
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.If)):
      return ["", self.text(node)]
    return [self.text(node)]


def excerpt(source: str, origin: str, left_out: dict[str, str]) -> str:
  """The license header, a provenance note and the BatchNorm tests of ``source``
  but those in ``left_out`` (test name -> reason)."""
  try:
    read = _Excerpt(source, left_out)
  except ValueError as error:
    raise ValueError(f"{origin}: {error}") from None
  out = read.header(origin)
  for node in read.tree.body:
    out += read.statement(node)
  return "\n".join(out).rstrip() + "\n"


def main(flax_repo: str, commit: str) -> None:
  here = Path(__file__).parent
  for origin, name in SOURCES.items():
    source = subprocess.run(
      ["git", "-C", flax_repo, "show", f"{commit}:{origin}"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    (here / name).write_text(
      excerpt(source, f"{origin} at commit {commit}", LEFT_OUT.get(origin, {}))
    )


if __name__ == "__main__":
  main(*sys.argv[1:])
