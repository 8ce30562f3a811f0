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
    compiled_text = without_branches(compiled_text)
  counts = collections.Counter(m.group(1) for m in _INSTRUCTION.finditer(compiled_text))
  return dict(counts)


def without_branches(compiled_text: str) -> str:
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


_BYTES_PER_ELEMENT = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES_PER_ELEMENT.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8})
_BYTES_PER_ELEMENT["c128"] = 16
# The result type(s) of a collective instruction: `%n = f32[2,4]{1,0} all-reduce(`,
# or a tuple `(f32[4]{0}, f32[4]{0}) all-reduce(`; async pairs count once, by their -start.
_RESULT = re.compile(r"=\s*(\(.*?\)|\S+)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collective_bytes(compiled_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective instruction in a compiled
  program: for an all-reduce, the size of the array every device sends and gets
  (what bandwidth models of a ring all-reduce take).

  >>> collective_bytes("%a = f32[3,1024]{1,0} all-reduce(f32[3,1024]{1,0} %x), to_apply=%add")
  {'all-reduce': 12288}
  >>> collective_bytes("%t = (f32[4]{0}, bf16[8]{0}) all-reduce(%x, %y), to_apply=%add")
  {'all-reduce': 32}
  """
  totals = collections.Counter()
  for match in _RESULT.finditer(compiled_text):
    for dtype, dims in _ARRAY.findall(match.group(1)):
      elements = 1
      for d in filter(None, dims.split(",")):
        elements *= int(d)
      totals[match.group(2)] += elements * _BYTES_PER_ELEMENT[dtype]
  return dict(totals)
