"""Counting cross-device collectives in compiled XLA programs."""

import collections
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An instruction: `%name = type op-name(`; async pairs count once, by their -start.
_INSTRUCTION = re.compile(r"=\s*\S.*?\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def count_collectives(compiled_text: str) -> dict[str, int]:
  """Number of each collective instruction in the text of a compiled program.

  >>> count_collectives("%a = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add")
  {'all-reduce': 1}
  """
  counts = collections.Counter(m.group(1) for m in _INSTRUCTION.finditer(compiled_text))
  return dict(counts)


def total_collectives(compiled_text: str) -> int:
  """All collective instructions in a compiled program, of every kind."""
  return sum(count_collectives(compiled_text).values())
