"""Counting cross-device collectives in compiled XLA programs, and the bytes they send.

A collective's bytes are those of its operands (shape times element size): for an
all-reduce the buffer each device contributes and receives reduced, for an
all-gather the shard each device contributes. Async pairs count once, by their
``-start``. "Outside branches" keeps the collectives that run on every call: those
of computations reachable from the entry without passing through a conditional's
branch (a ``lax.cond``'s branches run only when taken; nested conditionals, and the
computations a branch calls, are excluded with it).
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_NAME = r"%[\w.\-]+"
# A computation's first line: `%name (params) -> type {`, `ENTRY %name (...) -> ... {`.
_HEADER = re.compile(rf"^(ENTRY\s+)?({_NAME})\s*\(.*\{{\s*$")
# An instruction: `[ROOT] %name = type op-name(operands), attributes`.
_INSTRUCTION = re.compile(rf"^\s*(?:ROOT\s+)?({_NAME})\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OPERAND = re.compile(rf"(?:([a-z]+\d*\w*\[[\d,]*\](?:\{{[^}}]*\}})?)\s+)?({_NAME})")
_BRANCHES = re.compile(
  rf"branch_computations=\{{([^}}]*)\}}|true_computation=({_NAME}), false_computation=({_NAME})"
)
# Bytes per element of XLA's primitive types (sub-byte types rounded up to a byte).
DTYPE_BYTES = {
  "pred": 1,
  **{f"{kind}{bits}": max(1, bits // 8) for kind in "suf" for bits in (2, 4, 8, 16, 32, 64)},
  "bf16": 2,
  "c64": 8,
  "c128": 16,
}


class Collective(NamedTuple):
  """One collective instruction: its kind (``all-reduce``...), its operands' bytes,
  and whether it runs on every call (outside every conditional's branches)."""

  kind: str
  bytes: int
  every_call: bool


def type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO type: an array, or every array of a tuple.

  >>> type_bytes("f32[3,1024]{1,0}"), type_bytes("(bf16[8]{0}, s32[])"), type_bytes("f8e4m3fn[4]")
  (12288, 20, 4)
  """
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype.startswith("f8"):
      dtype = "f8"
    size = DTYPE_BYTES.get(dtype, 0)  # token[] and other non-data types: none
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(compiled_text: str) -> list[Collective]:
  """Every collective instruction in the text of a compiled program (``.as_text()``
  of ``jit(...).lower(...).compile()``), with its operands' bytes.

  Operand types are read where the text prints them beside the operand, else from
  the operand's own definition (compiled programs print only names).

  >>> program = '''%taken_rarely (p: f32[4]) -> f32[4] {
  ...   ROOT %r = f32[4]{0} all-reduce(f32[4]{0} %p), to_apply=%add
  ... }
  ...
  ... ENTRY %main (x: f32[3,1024], q: s32[]) -> f32[4] {
  ...   %x = f32[3,1024]{1,0} parameter(0)
  ...   %a = f32[3,1024]{1,0} all-reduce(%x), to_apply=%add
  ...   ROOT %c = f32[4]{0} conditional(%q, %a, %a), branch_computations={%other, %taken_rarely}
  ... }'''
  >>> collectives(program)  # doctest: +NORMALIZE_WHITESPACE
  [Collective(kind='all-reduce', bytes=12288, every_call=True),
   Collective(kind='all-reduce', bytes=16, every_call=False)]
  """
  computations = _computations(compiled_text)
  every_call = _reachable_without_branches(computations)
  types = _definitions(compiled_text)
  found = []
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      kind = match and _collective_kind(match.group(3))
      if kind:
        operand_bytes = sum(
          type_bytes(inline or types.get(operand, ""))
          for inline, operand in _OPERAND.findall(_operand_text(match.group(4)))
        )
        found.append(Collective(kind, operand_bytes, name in every_call))
  return found


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
  found = collectives(compiled_text)
  return dict(collections.Counter(c.kind for c in found if c.every_call or not outside_branches))


def collective_bytes(compiled_text: str, *, outside_branches: bool = False) -> int:
  """Total operand bytes of the collectives in a compiled program (``outside_branches``:
  of those that run on every call).

  >>> collective_bytes("%a = (f32[1024]{0}, f32[]) all-reduce(f32[1024]{0} %x, f32[] %y)")
  4100
  """
  return sum(c.bytes for c in collectives(compiled_text) if c.every_call or not outside_branches)


def total_collectives(compiled_text: str) -> int:
  """All collective instructions in a compiled program, of every kind."""
  return len(collectives(compiled_text))


def _collective_kind(op_name: str) -> str | None:
  """``all-reduce`` for ``all-reduce`` and ``all-reduce-start``; None for any other
  op (``-done`` halves included)."""
  base = op_name.removesuffix("-start")
  return base if base in COLLECTIVES else None


def _operand_text(rest: str) -> str:
  """The operand list of an instruction: ``rest`` (what follows ``op(``) up to the
  parenthesis that closes it."""
  depth = 1
  for index, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[:index]
  return rest


def _computations(compiled_text: str) -> dict[str, list[str]]:
  """Each computation's lines, by name; the entry's under ``"ENTRY"`` as well as its
  name. Text outside any computation (a bare instruction) belongs to the entry."""
  computations: dict[str, list[str]] = {"ENTRY": []}
  current = "ENTRY"
  for line in compiled_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = "ENTRY" if header.group(1) else header.group(2)
      computations.setdefault(current, [])
    else:
      computations[current].append(line)
  return computations


def _reachable_without_branches(computations: dict[str, list[str]]) -> set[str]:
  """Names of the computations that the entry reaches by calls other than a
  conditional's branches (``calls=``, ``to_apply=``, a while's ``body=`` ...)."""
  reachable, pending = {"ENTRY"}, ["ENTRY"]
  while pending:
    text = "\n".join(computations[pending.pop()])
    for callee in re.findall(_NAME, _BRANCHES.sub("", text)):
      if callee in computations and callee not in reachable:
        reachable.add(callee)
        pending.append(callee)
  return reachable


def _definitions(compiled_text: str) -> dict[str, str]:
  """The type of every instruction, by name (names are unique in an HLO module)."""
  types = {}
  for line in compiled_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      types[match.group(1)] = match.group(2)
  return types
