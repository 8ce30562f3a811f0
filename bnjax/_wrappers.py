"""What ``bnjax.linen`` and ``bnjax.nnx`` share, apart from Flax (private).

Paths into nested dicts (a ``'/'``-separated string or a tuple of names), the
entries of such a dict that are layers' (``entries``), the loop that sums each
layer's batch statistics over the batches of ``recompute_batch_stats``, the
momentum of a layer that counts its updates (``momentum=None``, ``debias=True``),
and the check of ``replace_batch_norm``'s options (``bnjax.haiku``'s too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from bnjax import moving_average, validation


def _names(path: str | tuple) -> tuple:
  return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def get_path(tree: Mapping, path: str | tuple[str, ...]) -> Any:
  """``tree[a][b]...`` for the path ``a/b/...``; a missing name is a ``KeyError``
  that lists the names there are.

  >>> get_path({"a": {"b": 1}}, "a/b")
  1
  """
  for name in _names(path):
    if name not in tree:
      shown = "/".join(map(str, _names(path)))
      raise KeyError(f"no '{name}' on the path '{shown}'; have {sorted(tree, key=str)}")
    tree = tree[name]
  return tree


def replace_at(tree: Mapping, path: str | tuple[str, ...], replace: Callable[[Any], Any]) -> dict:
  """A copy of ``tree`` with the entry at ``path`` replaced by ``replace(entry)``
  (``replace({})`` where there is none); the empty path is the root.

  >>> replace_at({"a": {"b": 1}}, ("a", "b"), lambda v: v + 1)
  {'a': {'b': 2}}
  """
  names = _names(path)
  if not names:
    return replace(tree)
  head, rest = names[0], names[1:]
  return {**tree, head: replace_at(tree.get(head, {}), rest, replace)}


def without(tree: Mapping, path: str | tuple[str, ...]) -> dict:
  """A copy of ``tree`` without the entry at ``path``.

  >>> without({"a": {"b": 1, "c": 2}}, "a/b")
  {'a': {'c': 2}}
  """
  *parents, last = _names(path)
  return replace_at(tree, tuple(parents), lambda node: {k: v for k, v in node.items() if k != last})


def entries(tree: Mapping, is_entry: Callable[[Mapping], bool]) -> list[tuple[tuple, Mapping]]:
  """``(path, node)`` for every dict ``node`` of ``tree`` (the root included) for
  which ``is_entry(node)``; the search does not go below such a node.

  >>> entries({"a": {"mean": 1}, "b": {"c": {"mean": 2}}}, lambda node: "mean" in node)
  [(('a',), {'mean': 1}), (('b', 'c'), {'mean': 2})]
  """
  if is_entry(tree):
    return [((), tree)]
  found = []
  for name, node in tree.items():
    if isinstance(node, Mapping):
      found.extend(((name, *path), entry) for path, entry in entries(node, is_entry))
  return found


def sum_over_batches(run: Callable[[Any], Any], batches: Iterable[Any]) -> Any:
  """The sum of the pytrees ``run(batch)`` over ``batches``; None for no batch.

  >>> sum_over_batches(lambda b: {"n": b}, [1, 2, 3])
  {'n': 6}
  """
  totals = None
  for batch in batches:
    values = run(batch)
    totals = values if totals is None else jax.tree.map(lambda a, b: a + b, totals, values)
  return totals


def counts_updates(momentum: float | None, debias: bool) -> bool:
  """Whether a layer keeps a count of its updates: the cumulative average
  (``momentum`` None) and the debiased one need it; checks the two options.

  >>> counts_updates(None, False), counts_updates(0.99, False)
  (True, False)
  """
  validation.check_bool("debias", debias)
  if momentum is None and debias:
    raise ValueError(
      "debias=True debiases an exponential average, and momentum=None is the cumulative "
      "average (unbiased already): pass a momentum, or debias=False"
    )
  return momentum is None or debias


def layer_momentum(momentum: float | None, debias: bool, count):
  """The momentum of a layer's next update, after ``count`` updates: ``momentum``;
  with ``debias``, ``bnjax.debiased_momentum(momentum, count)``; for ``momentum``
  None, ``bnjax.cumulative_momentum(count)``.

  >>> layer_momentum(None, False, 3).old.tolist()
  0.75
  """
  if momentum is None:
    return moving_average.cumulative_momentum(count)
  if debias:
    return moving_average.debiased_momentum(momentum, count)
  return momentum


def check_options(function: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
  """``options`` must be among ``allowed`` (the bnjax layer's own arguments, which
  the framework's layer lacks); the error lists them.

  >>> check_options("replace_batch_norm", {"momentum": 0.9}, ["debias"])
  Traceback (most recent call last):
  ...
  TypeError: replace_batch_norm takes bnjax's own options ['debias'], not ['momentum']
  """
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise TypeError(f"{function} takes bnjax's own options {sorted(allowed)}, not {unknown}")
