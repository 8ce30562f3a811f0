"""Steering XLA's fusion where it matters to batch norm's memory traffic (private).

Batch norm is memory-bound: its cost is the number of times it reads and writes
``x``-sized arrays. XLA's CPU backend fuses an elementwise computation (a cast,
``x - shift``) into a reduction that consumes it only if no other operation shares
it; shared, it is written out in full and read back by each consumer. GPU and TPU
backends instead fuse sibling reductions of one shared operand into a single pass
over it. So on CPU each consumer gets a copy of its own operands, and elsewhere
they share one.
"""

from __future__ import annotations

from typing import TypeVar

from jax import lax

_Operands = TypeVar("_Operands")


def unshared_on_cpu(operands: _Operands, copies: int = 1) -> tuple[_Operands, ...]:
  """``copies`` copies of ``operands`` (a pytree) that XLA's CPU backend computes
  with separately: it merges neither them nor their uses with one another or with
  other uses of the same arrays. Elsewhere, one copy shared by all.

  The copies come from an optimization barrier: no data is copied, but XLA
  neither looks through nor merges its results, so a computation on one copy is
  not shared with the same computation on another. Two calls on the very same
  operands can still be merged into one: give each call a different pytree
  (another leaf alongside). Other backends get one barrier whose results serve as
  every copy, so that the types (which the barrier may change under ``shard_map``)
  are those of CPU's.
  """
  return lax.platform_dependent(
    operands,
    cpu=lambda operands: lax.optimization_barrier((operands,) * copies),
    default=lambda operands: (lax.optimization_barrier(operands),) * copies,
  )
