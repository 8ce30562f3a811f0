"""ResNets (He et al., 2016) with a pluggable batch norm, in Flax linen.

Every convolution is followed by batch norm and has no bias (BN's bias replaces
it, Section 3.2 of the BN paper). ``norm`` is the BatchNorm class:
``bnjax.linen.BatchNorm`` by default, ``flax.linen.BatchNorm`` to compare.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bnjax import linen as bn

Dtype = Any


class Bottleneck(nn.Module):
  """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand x4), plus the shortcut."""

  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  act: Callable[[jax.Array], jax.Array]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.act(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.features, (3, 3), self.strides)(y)))
    # Zero-initialized last scale: each block starts as the identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(4 * self.features, (1, 1))(y))
    if residual.shape != y.shape:
      residual = self.norm()(self.conv(4 * self.features, (1, 1), self.strides, name="shortcut")(residual))
    return self.act(y + residual)


class ResNet(nn.Module):
  """ResNet with bottleneck blocks for ``[N, H, W, 3]`` images.

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    num_classes: size of the output layer.
    num_filters: width of the first stage (x2 per stage, x4 inside blocks).
    dtype: computation dtype (bfloat16 for mixed precision); parameters and BN
      statistics stay float32.
    norm: the BatchNorm module class.
    axis_name: named axis to synchronize BN statistics over (``pmap``).
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  num_filters: int = 64
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = bn.BatchNorm
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
    norm = functools.partial(
        self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype, axis_name=self.axis_name,
    )
    x = conv(self.num_filters, (7, 7), (2, 2), name="stem")(images.astype(self.dtype))
    x = nn.relu(norm(name="stem_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.num_filters * 2**stage, strides, conv, norm, nn.relu)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), num_filters=8, num_classes=10)
