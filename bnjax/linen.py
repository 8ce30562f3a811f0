"""``bnjax.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Swap the import and keep everything else, checkpoints included::

    from bnjax import linen as bn   # instead of: from flax import linen as nn
    x = bn.BatchNorm(use_running_average=not train, momentum=0.9)(x)

Same fields, defaults, call signature and variables (``params/{scale,bias}``,
``batch_stats/{mean,var}``) as Flax's module; the math is ``bnjax.batch_norm``:
exact statistics in one pass, one collective per direction when synchronized.

The module is a thin shell: it declares the variables, hands them to the pure
function, and writes the returned state back into ``batch_stats``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from flax.typing import Dtype, Initializer

from bnjax import validation
from bnjax.batch_norm import BatchNormParams, BatchNormState, batch_norm


class BatchNorm(nn.Module):
  """Batch normalization with Flax's interface and bnjax's core.

  Attributes (as ``flax.linen.BatchNorm``):
    use_running_average: if True, normalize with the stored ``batch_stats``
      (inference); if False, with the batch's statistics (training), updating
      ``batch_stats`` when that collection is mutable.
    axis: the feature axis or axes of the input.
    momentum: weight of the old running statistics (Flax's convention).
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: promoted from input and parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias`` (beta).
    use_scale: if True, multiply by the learned ``scale`` (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis (``pmap``/``shard_map``) to synchronize statistics over;
      under ``jit`` with a sharded batch leave it None (statistics are global).
    axis_index_groups: groups of device indices along ``axis_name``.
    use_fast_variance: accepted for compatibility and ignored: bnjax's variance
      is always exact, at the speed of Flax's fast (inexact) one.
    force_float32_reductions: statistics are always reduced in at least float32
      in bnjax; if False, ``batch_stats`` are stored in ``param_dtype`` (as Flax).
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Hashable | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` (``[..., C]`` for ``axis=-1``).

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean, True for entries that enter the statistics.

    Returns:
      The normalized input, of ``x``'s shape.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    validation.check_floating("x", x)
    features = validation.feature_axes(jnp.ndim(x), self.axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in features)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    mean = self.variable(
        "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    )
    var = self.variable(
        "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
    )
    scale = (
        self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_scale
        else None
    )
    bias = (
        self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        if self.use_bias
        else None
    )
    initializing = self.is_initializing()
    with jax.numpy_dtype_promotion("standard"):  # Flax's rule, also in strict mode
      out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = batch_norm(
        x,
        BatchNormParams(scale=scale, bias=bias),
        BatchNormState(mean=mean.value, var=var.value),
        training=not use_running_average,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        # During init the named axis may not exist yet, and the statistics are
        # not updated (as Flax).
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask,
        dtype=out_dtype,
    )
    if not use_running_average and not initializing:
      mean.value, var.value = new_state.mean, new_state.var
    return y
