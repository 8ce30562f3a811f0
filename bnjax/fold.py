"""Folding inference-mode batch norm into the layer before it (Section 3.1).

In inference, batch norm is a fixed affine map per feature,
``y = a * z + b`` with ``a = scale / sqrt(var + epsilon)`` and
``b = bias - a * mean``. When ``z = x @ kernel + layer_bias`` (a Dense layer, or a
convolution: features on the kernel's last axis, as Flax stores them), the two
compose into one layer: ``kernel * a`` and ``(layer_bias - mean) * a + bias``.
``bnjax.linen.fold_variables`` applies it to a Flax model's variables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import moving_average, validation
from bnjax.batch_norm import BatchNormParams, BatchNormState


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
  for name, value in [
    ("state.mean", state.mean),
    ("state.var", state.var),
    ("params.scale", None if params is None else params.scale),
    ("params.bias", None if params is None else params.bias),
    ("bias", bias),
  ]:
    if value is not None and jnp.shape(value) != features:
      raise ValueError(
        f"{name} has shape {jnp.shape(value)} but the kernel of shape {jnp.shape(kernel)} has "
        f"{features[0]} output features (its last axis)"
      )
  # In at least float32, and in float64 where anything is (x64): the digits of a
  # float64 model are kept.
  arrays = [kernel, bias, state.mean, state.var, *(() if params is None else params)]
  dtype = moving_average.widest_real(*(a.dtype for a in arrays if a is not None))
  multiplier = lax.rsqrt(state.var.astype(dtype) + epsilon)
  if params is not None and params.scale is not None:
    multiplier = multiplier * params.scale.astype(dtype)
  mean = state.mean.astype(dtype)
  shifted = -mean if bias is None else bias.astype(dtype) - mean
  new_bias = shifted * multiplier
  if params is not None and params.bias is not None:
    new_bias = new_bias + params.bias.astype(dtype)
  bias_dtype = kernel.dtype
  if bias is not None:  # the wider of the two, whatever the promotion mode
    with jax.numpy_dtype_promotion("standard"):
      bias_dtype = jnp.promote_types(kernel.dtype, bias.dtype)
  new_kernel = kernel.astype(dtype) * multiplier.reshape((1,) * (kernel.ndim - 1) + features)
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)
