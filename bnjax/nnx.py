"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, attributes, state (``nnx.Param`` ``scale``/``bias``,
``nnx.BatchStat`` ``mean``/``var``) and modes (``.train()``/``.eval()``,
``use_running_average``, ``nnx.view``) as Flax's module; the math is
``bnjax.batch_norm``. The module holds the variables; each call reads them, runs the
pure function and writes the returned state back.
"""

from __future__ import annotations

import typing as tp
from collections.abc import Hashable, Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm


class BatchNorm(nnx.Module):
  """Batch normalization with ``flax.nnx.BatchNorm``'s interface and bnjax's core.

  Args (as ``flax.nnx.BatchNorm``):
    num_features: the number of features ``C``.
    use_running_average: if True, normalize with the stored statistics
      (``.eval()`` sets it); if False, with the batch's, updating them
      (``.train()`` sets it).
    axis: the feature axis of the input.
    momentum: weight of the old running statistics.
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: promoted from input and variables).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias``.
    use_scale: if True, multiply by the learned ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis to synchronize statistics over (``pmap``/``shard_map``).
    axis_index_groups: groups of device indices along ``axis_name``.
    use_fast_variance: accepted for compatibility and ignored: the variance is
      always exact.
    promote_dtype: function promoting ``(x, mean, var, scale, bias)`` to a
      common dtype, as Flax's.
    rngs: random number generators for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: Hashable | None = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale: nnx.Param[jax.Array] | None = (
        nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        if use_scale
        else nnx.data(None)
    )
    self.bias: nnx.Param[jax.Array] | None = (
        nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
        if use_bias
        else nnx.data(None)
    )
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training mode also updates ``mean`` and ``var``.

    Args:
      x: the input, ``[..., num_features]`` for ``axis=-1``.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics.

    Returns:
      The normalized input, of ``x``'s shape.
    """
    use_running_average = first_from(
        use_running_average,
        self.use_running_average,
        error_msg="No `use_running_average` argument was provided to BatchNorm: "
        "pass it to the constructor or the call, or use .train() / .eval().",
    )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    with jax.numpy_dtype_promotion("standard"):  # Flax's rule, also in strict mode
      x, _, _, scale, bias = self.promote_dtype(
          (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
      )
      out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = batch_norm(
        x,
        BatchNormParams(scale=scale, bias=bias),
        BatchNormState(mean=self.mean[...], var=self.var[...]),
        training=not use_running_average,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        mask=mask,
        dtype=out_dtype,
    )
    if not use_running_average:
      self.mean[...] = new_state.mean
      self.var[...] = new_state.var
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view`` to set the mode of a view of the model."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
