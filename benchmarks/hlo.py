"""Counting cross-device collectives in compiled XLA programs."""

import collections
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An instruction: `%name = type op-name(`; async pairs count once, by their -start.
_INSTRUCTION = re.compile(r"=\s*\S.*?\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


_BRANCHES = re.compile(
  r"branch_computations=\{([^}]*)\}|true_computation=(%[\w.\-]+), false_computation=(%[\w.\-]+)"
)


def count_collectives(compiled_text: str, *, outside_branches: bool = False) -> dict[str, int]:
  """Number of each collective instruction in the text of a compiled program.

  ``outside_branches``: only those outside the branches of conditionals, which
  run on every call (a ``lax.cond``'s branches run only when taken).

  >>> count_collectives("%a = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add")
  {'all-reduce': 1}
  >>> program = '''%taken_rarely (p: f32[4]) -> f32[4] {
  ...   ROOT %r = f32[4]{0} all-reduce(f32[4]{0} %p), to_apply=%add
  ... }
  ...
  ... ENTRY %main (x: f32[4], q: s32[]) -> f32[4] {
  ...   %a = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add
  ...   ROOT %c = f32[4]{0} conditional(%q, %a, %a), branch_computations={%other, %taken_rarely}
  ... }'''
  >>> count_collectives(program), count_collectives(program, outside_branches=True)
  ({'all-reduce': 2}, {'all-reduce': 1})
  """
  if outside_branches:
    compiled_text = _without_branches(compiled_text)
  counts = collections.Counter(m.group(1) for m in _INSTRUCTION.finditer(compiled_text))
  return dict(counts)


def _without_branches(compiled_text: str) -> str:
  """The program's text less the computations that are branches of conditionals
  (nested ones included: their conditionals name them too)."""
  branches = set()
  for match in _BRANCHES.finditer(compiled_text):
    names = match.group(1).split(",") if match.group(1) else match.group(2, 3)
    branches.update(name.strip() for name in names)
  blocks = compiled_text.split("\n\n")
  return "\n\n".join(b for b in blocks if b.lstrip().split(" ", 1)[0] not in branches)


def total_collectives(compiled_text: str) -> int:
  """All collective instructions in a compiled program, of every kind."""
  return sum(count_collectives(compiled_text).values())
