"""Keeping some layers' running statistics as they were: fine-tuning by path.

Fine-tuning often trains a new head on a pretrained backbone whose batch-norm
statistics should stay those of the pretraining data, while the head's own layers
keep learning theirs. A training step moves every layer's statistics; this takes
the step's result and puts the frozen layers' statistics back, selected by path as
``optax.transforms.freeze`` selects parameters by a mask:

    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    batch_stats = freeze_statistics(updates["batch_stats"], variables["batch_stats"],
                                    "backbone")

It works on any pytree of statistics: a ``flax.linen`` ``batch_stats`` collection,
an ``nnx.State`` of ``nnx.BatchStat`` variables, a Haiku state dict, or
``BatchNormState``s. (Within a model, a layer built with ``update_stats=False``
leaves its statistics alone in the first place.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

_Frozen = str | Sequence[str] | Callable[[str], bool]


def _key_name(key) -> str:
  for field in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """A ``jax.tree_util`` key path as ``'/'``-joined names (``'backbone/bn/mean'``).

  >>> path_string(jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0][1][0])
  'a/1/b'
  """
  return "/".join(_key_name(key) for key in path)


def _has_prefix(path: str, prefix: str) -> bool:
  names, wanted = path.split("/"), prefix.strip("/").split("/")
  return names[: len(wanted)] == wanted


def freeze_statistics(updated: Any, original: Any, frozen: _Frozen) -> Any:
  """``updated``, except under the paths ``frozen`` names: there ``original``'s.

  Args:
    updated: a pytree of running statistics after a training step.
    original: the same pytree before the step (the same structure).
    frozen: a path prefix of ``'/'``-separated names (``"backbone"``,
      ``"backbone/BatchNorm_0"``; whole names only: ``"backbone"`` does not match
      ``"backbone2"``), a sequence of them, or a predicate on each leaf's path
      (``path_string``: a linen ``"backbone/BatchNorm_0/mean"``, an nnx
      ``"backbone/bn/mean/value"``, a Haiku ``"backbone/~/batch_norm/~/mean_ema/hidden"``).

  Returns:
    A pytree of ``updated``'s structure, each leaf ``original``'s where its path is
    frozen and ``updated``'s elsewhere.

  Raises:
    ValueError: the two pytrees differ in structure, or a prefix matches no leaf
      (the message lists the top-level names there are).

  >>> import jax.numpy as jnp
  >>> before = {"backbone": {"mean": jnp.zeros(2)}, "head": {"mean": jnp.zeros(2)}}
  >>> after = {"backbone": {"mean": jnp.ones(2)}, "head": {"mean": jnp.ones(2)}}
  >>> kept = freeze_statistics(after, before, "backbone")
  >>> kept["backbone"]["mean"].tolist(), kept["head"]["mean"].tolist()
  ([0.0, 0.0], [1.0, 1.0])
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updated)
  original_leaves, original_treedef = jax.tree_util.tree_flatten(original)
  if original_treedef != treedef:
    raise ValueError(
      f"freeze_statistics needs updated and original of one structure, got {treedef} "
      f"and {original_treedef}"
    )
  paths = [path_string(path) for path, _ in leaves]
  if callable(frozen):
    is_frozen = [bool(frozen(path)) for path in paths]
  else:
    prefixes = [frozen] if isinstance(frozen, str) else list(frozen)
    for prefix in prefixes:
      if not any(_has_prefix(path, prefix) for path in paths):
        names = sorted({path.split("/")[0] for path in paths})
        raise ValueError(f"no running statistic under the path {prefix!r}; the tree has {names}")
    is_frozen = [any(_has_prefix(path, prefix) for prefix in prefixes) for path in paths]
  chosen = [
    old if keep else new
    for keep, (_, new), old in zip(is_frozen, leaves, original_leaves, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, chosen)
