"""Folding inference-mode batch norm into the layer before it (Section 3.1).

In inference, batch norm is a fixed affine map per feature,
``y = a * z + b`` with ``a = scale / sqrt(var + epsilon)`` and
``b = bias - a * mean``. When ``z = x @ kernel + layer_bias`` (a Dense layer, or a
convolution: features on the kernel's last axis, as Flax stores them), the two
compose into one layer: ``kernel * a`` and ``(layer_bias - mean) * a + bias``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.batch_norm import BatchNormParams, BatchNormState
from bnjax import validation


def fold(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: BatchNormParams | None,
    state: BatchNormState,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  """The kernel and bias of a layer followed by inference-mode BN, as one layer.

  Args:
    kernel: ``[..., C]`` the layer's kernel, output features last.
    bias: ``[C]`` the layer's bias, or None (no bias, as before BN).
    params: the BN's ``BatchNormParams`` (fields may be None), or None.
    state: the BN's ``BatchNormState``.
    epsilon: the BN's epsilon.

  Returns:
    ``(kernel, bias)`` of the folded layer, in the kernel's dtype (the bias in
    the wider of the two dtypes).

  Raises:
    TypeError: the kernel, bias, parameters or state are not floating.
    ValueError: the kernel's last axis is not the BN's number of features.

  >>> import bnjax
  >>> params, state = bnjax.init(2)
  >>> state = bnjax.BatchNormState(mean=jnp.array([1.0, 2.0]), var=jnp.array([4.0, 1.0]))
  >>> k, b = fold(jnp.ones((3, 2)), None, params, state, epsilon=1e-12)
  >>> k[0].tolist(), b.tolist()
  ([0.5, 1.0], [-0.5, -2.0])
  """
  validation.check_epsilon(epsilon)
  validation.check_floating("kernel", kernel)  # an integer kernel cannot hold the scaled one
  validation.check_floating_fields("layer", [("bias", bias)])
  validation.check_floating_fields("state", [("mean", state.mean), ("var", state.var)])
  if params is not None:
    validation.check_floating_fields("params", [("scale", params.scale), ("bias", params.bias)])
  features = jnp.shape(kernel)[-1:]
  for name, value in [("state.mean", state.mean), ("state.var", state.var),
                      ("params.scale", None if params is None else params.scale),
                      ("params.bias", None if params is None else params.bias), ("bias", bias)]:
    if value is not None and jnp.shape(value) != features:
      raise ValueError(
          f"{name} has shape {jnp.shape(value)} but the kernel of shape {jnp.shape(kernel)} has "
          f"{features[0]} output features (its last axis)"
      )
  multiplier = lax.rsqrt(state.var.astype(jnp.float32) + epsilon)
  if params is not None and params.scale is not None:
    multiplier = multiplier * params.scale.astype(jnp.float32)
  shifted = -state.mean.astype(jnp.float32) if bias is None else bias.astype(jnp.float32) - state.mean
  new_bias = shifted * multiplier
  if params is not None and params.bias is not None:
    new_bias = new_bias + params.bias.astype(jnp.float32)
  bias_dtype = kernel.dtype if bias is None else jnp.promote_types(kernel.dtype, bias.dtype)
  new_kernel = kernel.astype(jnp.float32) * multiplier.reshape((1,) * (kernel.ndim - 1) + features)
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def _get(tree: Mapping, path: str) -> Any:
  for name in path.split("/"):
    if name not in tree:
      raise KeyError(f"no '{name}' on the path '{path}'; have {sorted(tree)}")
    tree = tree[name]
  return tree


def _without(tree: Mapping, path: str) -> dict:
  head, _, rest = path.partition("/")
  tree = dict(tree)
  if rest:
    tree[head] = _without(tree[head], rest)
  else:
    del tree[head]
  return tree


def _with(tree: Mapping, path: str, value) -> dict:
  head, _, rest = path.partition("/")
  tree = dict(tree)
  tree[head] = _with(tree.get(head, {}), rest, value) if rest else value
  return tree


def fold_variables(
    variables: Mapping[str, Any], pairs: Iterable[tuple[str, str]], *, epsilon: float = 1e-5
) -> dict[str, Any]:
  """Folds every ``(layer, batch_norm)`` pair of a Flax variable dict.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a model with BN.
    pairs: ``(layer_path, bn_path)`` with '/'-separated module paths, e.g.
      ``[("Conv_0", "BatchNorm_0"), ("block/Dense_0", "block/BatchNorm_0")]``:
      each BN directly follows its layer (a Dense or a Conv, with or without bias).
    epsilon: the BNs' epsilon.

  Returns:
    ``{"params": ...}`` for the same model without those BNs, each layer with
    the folded kernel and a bias, the BN entries removed, and ``batch_stats``
    dropped once empty. Meant for a model whose layers have ``use_bias=True``
    where a BN followed them. Kernels keep their ``[..., C]`` shape and dtype;
    each folded bias is ``[C]``.

  Raises:
    KeyError: ``variables`` has no ``params``, or a path names no module of
      ``params`` (or, for a BN, of ``batch_stats``); the message lists the names
      there are.
    TypeError, ValueError: as ``fold`` (non-floating arrays, a kernel whose last
      axis is not the BN's number of features, ``epsilon`` not positive).

  >>> import bnjax
  >>> params, state = bnjax.init(2)
  >>> variables = {
  ...     "params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
  ...                "BatchNorm_0": {"scale": params.scale, "bias": params.bias + 1.0}},
  ...     "batch_stats": {"BatchNorm_0": {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([4.0, 1.0])}}}
  >>> folded = fold_variables(variables, [("Dense_0", "BatchNorm_0")], epsilon=1e-12)
  >>> list(folded), list(folded["params"])  # the BN is gone
  (['params'], ['Dense_0'])
  >>> folded["params"]["Dense_0"]["kernel"][0].tolist(), folded["params"]["Dense_0"]["bias"].tolist()
  ([0.5, 1.0], [0.5, -1.0])
  """
  params = dict(variables["params"])
  batch_stats = dict(variables.get("batch_stats", {}))
  for layer_path, bn_path in pairs:
    layer = _get(params, layer_path)
    bn_params = _get(params, bn_path)
    bn_stats = _get(batch_stats, bn_path)
    kernel, bias = fold(
        layer["kernel"], layer.get("bias"),
        BatchNormParams(bn_params.get("scale"), bn_params.get("bias")),
        BatchNormState(bn_stats["mean"], bn_stats["var"]), epsilon=epsilon,
    )
    params = _with(params, layer_path, {**layer, "kernel": kernel, "bias": bias})
    params = _without(params, bn_path)
    batch_stats = _without(batch_stats, bn_path)
  folded = {"params": params}
  if jax.tree.leaves(batch_stats):
    folded["batch_stats"] = batch_stats
  return folded
