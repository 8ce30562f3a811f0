"""Steering XLA:CPU's fusion where it matters to batch norm's memory traffic (private).

Batch norm is memory-bound: its cost is the number of times it reads and writes
``x``-sized arrays. XLA's CPU backend fuses an elementwise computation (a cast,
``x - shift``) into a reduction that consumes it only if no other operation shares
it; shared, it is written out in full and read back by each consumer. So on CPU
each consumer gets a copy of its own operands, from an optimization barrier
(measured on CPU only: tests/test_fusion.py checks the temporaries it saves).

Every other backend gets the operands untouched: no barrier in the program that
TPU or GPU compiles, and XLA fuses there as it chooses (GPU and TPU fuse sibling
reductions of one shared operand into one pass). The accelerator benchmark
(``python -m benchmarks.accelerator``) times both choices on a device.
"""

from __future__ import annotations

from typing import TypeVar

from jax import lax

from bnjax import collectives

_Operands = TypeVar("_Operands")


def unshared_on_cpu(operands: _Operands, copies: int = 1) -> tuple[_Operands, ...]:
  """``copies`` copies of ``operands`` (a pytree) that XLA's CPU backend computes
  with separately: it merges neither them nor their uses with one another or with
  other uses of the same arrays. Elsewhere, ``operands`` itself as every copy.

  On CPU the copies come from an optimization barrier: no data is copied, but XLA
  neither looks through nor merges its results, so a computation on one copy is
  not shared with the same computation on another. Two calls on the very same
  operands can still be merged into one: give each call a different pytree
  (another leaf alongside).

  Under ``shard_map`` a barrier's results all vary over every manual axis that
  any of its operands varies over (JAX casts the others to match), and
  ``lax.platform_dependent`` needs the same types from every platform's branch.
  So the operands are cast to those types first, on every backend: a cast to
  "varying" changes the type only, and lowers to nothing.
  """
  operands = collectives.varying_alike(operands)
  return lax.platform_dependent(
    operands,
    cpu=lambda operands: lax.optimization_barrier((operands,) * copies),
    default=lambda operands: (operands,) * copies,
  )
