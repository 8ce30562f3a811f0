"""The ImageNet models of Section 4.2, in Flax linen, NHWC, with a pluggable batch norm.

* ``Inception``: the paper's GoogLeNet variant (its appendix table, Figure 5), with or
  without BN, ReLU or sigmoid. The 6 networks of Section 4.2.2 are configurations
  of this one class (``configs/``).
* ``ResNet``: He et al. (2016), ``ResNet18`` ... ``ResNet152`` as ``partial``s of it;
  ResNet-50 is the Flax ImageNet example's reference run.

``create_model(config)`` builds either from an experiment config; ``count_params``
counts parameters with ``jax.eval_shape`` (nothing is allocated).

Every convolution is followed by batch norm and has no bias: BN goes on the input
of each nonlinearity and its beta replaces the bias (Section 3.2). Without BN
(Inception with ``norm=None``) the convolutions have biases. ``norm`` is the
BatchNorm class (``bnjax.linen.BatchNorm`` by default, ``flax.linen.BatchNorm`` to
compare), called as ``norm(use_running_average=..., dtype=...)``: bind
``momentum``, ``epsilon``, ``axis_name``, ``axis_index_groups`` or
``virtual_batch_size`` with ``functools.partial`` before passing it.

Parameter counts at 1000 classes, 224x224 (``count_params``; the tests check them):

  ==========================================  ==========
  model                                       parameters
  ==========================================  ==========
  Inception with BN, 4c/4d projection 96      11,188,288  (19,904 of them BN's gamma, beta)
  Inception with BN, 4c/4d projection 128     11,278,528
  Inception without BN, 96 / 128              11,178,336 / 11,268,512  (9,952 conv biases)
  ResNet-18 / 34 / 50                         11,689,512 / 21,797,672 / 25,557,032
  ResNet-101 / 152                            44,549,160 / 60,192,808
  ==========================================  ==========

The paper gives 13.6M parameters for its Inception; its own table gives about
11.2M, as above (tf-slim's ``inception_v2``, with BN's beta but no gamma, has
11,178,336: our count less the 9,952 gammas). Nothing in the paper accounts for
the 2.4M difference: not an auxiliary classifier (GoogLeNet's are about 3.2M
each at 1000 classes), and the paper says there is no fully connected layer
but the softmax's. We build the table; its choices and departures are listed in
``Inception``'s docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bnjax import linen as bn

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# He et al. (2015) initialization (tf-slim's Inception arg scope uses the same
# variance_scaling_initializer): keeps ReLU activations from shrinking with depth
# in the network without BN.
_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def check_image_size(image_size: int) -> None:
  """Raises ValueError unless ``image_size`` is a multiple of 32, at least 32.

  Both networks halve the resolution five times (total stride 32), so that the
  last feature map has a whole number of cells; 224 gives 7x7, 32 gives 1x1.
  """
  if (
    isinstance(image_size, bool)
    or not isinstance(image_size, int)
    or image_size < 32
    or image_size % 32
  ):
    raise ValueError(
      "image_size must be a multiple of 32, at least 32 (the networks' total stride), "
      f"got {image_size!r}; "
      "e.g. 224 as the paper, or 32 / 64 for a quick CPU run"
    )


def _scaled(channels: int, width_multiplier: float) -> int:
  """A channel count scaled by the width multiplier, at least 1."""
  return max(1, int(round(channels * width_multiplier)))


# ---- Inception (the paper's Section 4.2 network) ----------------------------------------


class InceptionModuleSpec(NamedTuple):
  """One row of the paper's table: output channels of each branch (0 = no branch)."""

  name: str
  ones: int  # #1x1
  reduce3: int  # #3x3 reduce
  out3: int  # #3x3
  reduce_double3: int  # double #3x3 reduce
  out_double3: int  # double #3x3 (both convolutions)
  pool: str  # "avg" or "max"
  pool_projection: int | None  # 1x1 projection after the pool; 0 = pass through; None: 4c/4d option
  strides: int


# The table of the paper's appendix (Figure 5), modules 3a to 5b. ``None`` marks the
# pool projections of 4c and 4d, set by ``Inception.pool_projection_4cd``.
INCEPTION_MODULES = (
  InceptionModuleSpec("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
  InceptionModuleSpec("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
  InceptionModuleSpec("3c", 0, 128, 160, 64, 96, "max", 0, 2),
  InceptionModuleSpec("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
  InceptionModuleSpec("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
  InceptionModuleSpec("4c", 160, 128, 160, 128, 160, "avg", None, 1),
  InceptionModuleSpec("4d", 96, 128, 192, 160, 192, "avg", None, 1),
  InceptionModuleSpec("4e", 0, 128, 192, 192, 256, "max", 0, 2),
  InceptionModuleSpec("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
  InceptionModuleSpec("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


class ConvUnit(nn.Module):
  """Convolution -> BN -> nonlinearity; without ``norm``, convolution (+ bias) -> nonlinearity.

  Attributes:
    features: output channels.
    kernel_size: (height, width) of the kernel.
    strides: stride in both spatial dimensions.
    norm: the bound BatchNorm constructor (``use_running_average`` and ``dtype``
      already set), or None for no BN.
    activation: the nonlinearity.
    dtype: computation dtype.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  norm: ModuleDef | None = None
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: [N, H, W, C] -> [N, H / strides, W / strides, features]."""
    x = nn.Conv(
      self.features,
      self.kernel_size,
      (self.strides, self.strides),
      padding="SAME",
      use_bias=self.norm is None,
      kernel_init=_he_normal,
      dtype=self.dtype,
      name="conv",
    )(x)
    if self.norm is not None:
      x = self.norm(name="bn")(x)
    return self.activation(x)


class InceptionModule(nn.Module):
  """One Inception module: 1x1, 3x3, double 3x3 and pool branches, concatenated.

  Stride-2 modules (3c, 4e) stride the last convolution of each branch and the
  pool, and pass the pooled input through unprojected, as the table lists.

  Attributes:
    spec: the module's row of the table, channels already scaled.
    unit: ``ConvUnit`` with norm, activation and dtype bound.
  """

  spec: InceptionModuleSpec
  unit: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: [N, H, W, C] -> [N, H / strides, W / strides, sum of the branch widths]."""
    s, unit = self.spec, self.unit
    branches = []
    if s.ones:
      branches.append(unit(s.ones, (1, 1), name="1x1")(x))
    y = unit(s.reduce3, (1, 1), name="3x3_reduce")(x)
    branches.append(unit(s.out3, (3, 3), s.strides, name="3x3")(y))
    y = unit(s.reduce_double3, (1, 1), name="double_3x3_reduce")(x)
    y = unit(s.out_double3, (3, 3), name="double_3x3_a")(y)
    branches.append(unit(s.out_double3, (3, 3), s.strides, name="double_3x3_b")(y))
    window, strides = (3, 3), (s.strides, s.strides)
    if s.pool == "avg":
      y = average_pool(x, window, strides)
    else:
      y = nn.max_pool(x, window, strides, padding="SAME")
    if s.pool_projection:
      y = unit(s.pool_projection, (1, 1), name="pool_projection")(y)
    branches.append(y)
    return jnp.concatenate(branches, axis=-1)


def average_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """Average pooling with "SAME" padding, the padding left out of each average
  (as TensorFlow's; our choice, the paper does not say), in the input's dtype.

  Args:
    x: [N, H, W, C].

  Returns:
    [N, ceil(H / strides[0]), ceil(W / strides[1]), C], same dtype.

  >>> average_pool(jnp.arange(4.0).reshape(1, 1, 4, 1), (1, 3), (1, 1))[0, 0, :, 0]
  Array([0.5, 1. , 2. , 2.5], dtype=float32)
  """
  # A NumPy zero: a concrete init value lets lax.reduce_window recognize a sum,
  # which has a gradient (a traced jnp.zeros under jit made it a generic reduction
  # that cannot be differentiated: the Inception could not be trained).
  zero = np.zeros((), x.dtype)
  sums = nn.pool(x, zero, jax.lax.add, window, strides, "SAME")
  counts = nn.pool(
    np.ones((1, *x.shape[1:3], 1), x.dtype), zero, jax.lax.add, window, strides, "SAME"
  )
  return sums / counts


def local_response_normalization(
  x: jax.Array, *, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0
) -> jax.Array:
  """Across-channel LRN as GoogLeNet's (Caffe's): x / (bias + alpha / size * sum x^2)^beta.

  The sum runs over ``size`` neighbouring channels centred on each one, zero
  padded. Computed in float32, returned in the input's dtype.

  Args:
    x: [..., C] activations.

  Returns:
    [..., C], same dtype.

  Three channels of 10, window 3: the middle one is 10 / (1 + 0.1 * 300)^0.75,
  the edges (one zero neighbour) 10 / (1 + 0.1 * 200)^0.75.

  >>> local_response_normalization(jnp.full((1, 3), 10.0), size=3, alpha=0.3)[0].tolist()
  [1.0194, 0.7612, 1.0194]
  """
  x32 = x.astype(jnp.float32)
  padding = [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)]
  window = (1,) * (x.ndim - 1) + (size,)
  sums = jax.lax.reduce_window(x32 * x32, 0.0, jax.lax.add, window, (1,) * x.ndim, padding)
  return (x32 / (bias + alpha / size * sums) ** beta).astype(x.dtype)


class Inception(nn.Module):
  """The paper's Inception (Section 4.2, appendix table), for ``[N, H, W, 3]`` images.

  Layer by layer, as the table: a separable 7x7/2 convolution to 64 channels
  (depthwise with multiplier 8: 3 -> 24 channels, then 1x1 to 64); max pool 3x3/2;
  1x1 conv to 64 and 3x3 conv to 192; max pool 3x3/2; Inception modules 3a-3c,
  4a-4e, 5a-5b (``INCEPTION_MODULES``: 5x5 convolutions replaced by two 3x3, average
  or max pooling as listed, stride 2 in 3c and 4e with a pass-through pool);
  global average pooling; dropout (if any); the softmax's fully connected layer.
  At 224x224 the feature maps are 112, 56, 28, 14 and 7 wide, as listed; any
  multiple of 32 works (global pooling).

  Choices where the table leaves room, and departures from it:

  * Modules 4c and 4d: the table lists 576 output channels, but its branches add
    to 608 with a pool projection of 128. We use 96 by default (576 channels):
    then the output column holds throughout (4c, 4d: 576; 4e: 192 + 256 + 576 =
    1024, as listed; with 128, 4e would output 1056) and it is what Google's own
    BN-Inception, tf-slim's ``inception_v2.py``, does. ``pool_projection_4cd=128``
    builds the other reading (as Caffe-derived ports do).
  * BN is applied after every convolution that feeds a nonlinearity, i.e. all but
    the depthwise half of the separable stem (no nonlinearity follows it; the BN
    and the nonlinearity come after its pointwise half, as tf-slim). No BN on the
    logits. BN has both gamma and beta (Algorithm 1; tf-slim drops gamma).
  * ``lrn``: GoogLeNet's local response normalization after the first max pool and
    after the 3x3 conv of the stem (Szegedy et al., 2014). Section 4.2.1 removes it
    for the BN variants, so the baseline Inception had it; the table does not show it.
  * The separable stem's depth multiplier is ``min(8, max(1, stem_channels // 3))``,
    tf-slim's rule: 8 at full width, smaller when a width multiplier shrinks the stem.
  * Stride-2 modules stride the last convolution of each branch (as tf-slim); the
    table does not say which. Its rows for 3c and 4e list the spatial size of the
    module's input (28x28, 14x14); the outputs are 14x14 and 7x7, as the next rows.
  * Average pools leave the padding out of each average (TensorFlow's "SAME").
  * Initialization (not in the paper): convolutions He et al. (2015) truncated
    normal, as tf-slim's; the softmax layer's kernel zeros (big_vision's
    ``head_zeroinit``), so every network starts at loss ln(num_classes) (without it
    the network without BN starts with logits of standard deviation about 4).

  Attributes:
    num_classes: size of the softmax layer.
    width_multiplier: every channel count of the table is multiplied by it
      (rounded, at least 1); 1.0 is the paper's network.
    norm: the BatchNorm constructor (with momentum, epsilon, axis_name ... bound),
      or None for the network without BN (convolutions get biases instead).
    activation: the nonlinearity, ``nn.relu`` or ``nn.sigmoid`` for the sigmoid
      variants.
    lrn: local response normalization in the stem (see above).
    dropout_rate: dropout before the softmax layer (GoogLeNet: 0.4); needs an rng
      named "dropout" in training when > 0.
    pool_projection_4cd: pool projection of modules 4c and 4d, 96 or 128 (above).
    modules: names of the table's modules to build, in order (None: all ten, the
      paper's network). The tiny variant keeps one of each kind to compile fast.
    dtype: computation dtype (bfloat16 for mixed precision); parameters, BN
      statistics and logits stay float32.
  """

  num_classes: int = 1000
  width_multiplier: float = 1.0
  norm: ModuleDef | None = functools.partial(bn.BatchNorm, momentum=0.99, epsilon=1e-3)
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  lrn: bool = False
  dropout_rate: float = 0.0
  pool_projection_4cd: int = 96
  modules: tuple[str, ...] | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """``images``: [N, H, W, 3], H and W multiples of 32 -> logits [N, num_classes] float32."""
    width = functools.partial(_scaled, width_multiplier=self.width_multiplier)
    norm = None
    if self.norm is not None:
      norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    unit = functools.partial(ConvUnit, norm=norm, activation=self.activation, dtype=self.dtype)

    x = images.astype(self.dtype)
    stem = width(64)
    depth_multiplier = min(8, max(1, stem // 3))
    x = nn.Conv(
      3 * depth_multiplier,
      (7, 7),
      (2, 2),
      padding="SAME",
      feature_group_count=3,
      use_bias=False,
      kernel_init=_he_normal,
      dtype=self.dtype,
      name="conv1_depthwise",
    )(x)
    x = unit(stem, (1, 1), name="conv1_pointwise")(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    if self.lrn:
      x = local_response_normalization(x)
    x = unit(width(64), (1, 1), name="conv2_reduce")(x)
    x = unit(width(192), (3, 3), name="conv2")(x)
    if self.lrn:
      x = local_response_normalization(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")

    for spec in inception_modules(self.pool_projection_4cd, self.modules):
      scaled = spec._replace(
        **{
          field: width(getattr(spec, field)) if getattr(spec, field) else 0
          for field in (
            "ones",
            "reduce3",
            "out3",
            "reduce_double3",
            "out_double3",
            "pool_projection",
          )
        }
      )
      x = InceptionModule(scaled, unit, name=f"inception_{spec.name}")(x)

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(
      self.num_classes, dtype=jnp.float32, kernel_init=nn.initializers.zeros, name="logits"
    )(x)


def inception_modules(
  pool_projection_4cd: int = 96, names: Sequence[str] | None = None
) -> tuple[InceptionModuleSpec, ...]:
  """The table's modules (those named, in the table's order; all if None), with the pool
  projection of 4c and 4d set to ``pool_projection_4cd`` (96 or 128)."""
  if pool_projection_4cd not in (96, 128):
    raise ValueError(
      f"pool_projection_4cd must be 96 (576 channels out of 4c and 4d, tf-slim) or 128 (608, the "
      f"table's pool projection column), got {pool_projection_4cd!r}"
    )
  known = [s.name for s in INCEPTION_MODULES]
  if names is not None and (not names or set(names) - set(known)):
    raise ValueError(
      f"modules must name some of the table's modules {', '.join(known)}; got {names!r}"
    )
  return tuple(
    s._replace(pool_projection=pool_projection_4cd) if s.pool_projection is None else s
    for s in INCEPTION_MODULES
    if names is None or s.name in names
  )


# ---- ResNet ----------------------------------------------------------------------------


class Bottleneck(nn.Module):
  """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand x4), plus the shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.act(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.features, (3, 3), self.strides)(y)))
    # Zero-initialized last scale: each block starts as the identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros)(
      self.conv(self.expansion * self.features, (1, 1))(y)
    )
    if residual.shape != y.shape:
      residual = self.norm()(
        self.conv(self.expansion * self.features, (1, 1), self.strides, name="shortcut")(residual)
      )
    return self.act(y + residual)


class BasicBlock(nn.Module):
  """3x3 (stride) -> 3x3, plus the shortcut (ResNet-18 and -34)."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.act(self.norm()(self.conv(self.features, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (3, 3))(y))
    if residual.shape != y.shape:
      residual = self.norm()(
        self.conv(self.features, (1, 1), self.strides, name="shortcut")(residual)
      )
    return self.act(y + residual)


class ResNet(nn.Module):
  """ResNet for ``[N, H, W, 3]`` images.

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) with ``Bottleneck`` is ResNet-50.
    block_cls: ``Bottleneck`` or ``BasicBlock``.
    num_classes: size of the output layer.
    num_filters: width of the first stage (x2 per stage, x4 inside bottlenecks).
    dtype: computation dtype (bfloat16 for mixed precision); parameters, BN
      statistics and logits stay float32.
    norm: the BatchNorm constructor (momentum, epsilon, axis_name ... bound); by
      default the Flax ImageNet example's momentum 0.9 and epsilon 1e-5.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef = Bottleneck
  num_classes: int = 1000
  num_filters: int = 64
  dtype: Dtype = jnp.float32
  norm: ModuleDef = functools.partial(bn.BatchNorm, momentum=0.9, epsilon=1e-5)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """``images``: [N, H, W, 3] -> logits [N, num_classes] float32."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), name="stem")(images.astype(self.dtype))
    x = nn.relu(norm(name="stem_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = self.block_cls(self.num_filters * 2**stage, strides, conv, norm, nn.relu)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
# For tests and CPU runs: four stages (total stride 32, as the real ones), width 8.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), num_filters=8, num_classes=10)


# ---- Building from a config ------------------------------------------------------------

_RESNETS = {
  "resnet18": ResNet18,
  "resnet34": ResNet34,
  "resnet50": ResNet50,
  "resnet101": ResNet101,
  "resnet152": ResNet152,
  "resnet_tiny": ResNetTiny,
}
_ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid}
# Tiny variants, for tests and CPU smoke runs: 1/8 of the width (times the config's);
# the tiny Inception keeps one module of each kind of the table (avg pool +
# projection, stride 2, max pool + projection), with the full network's total stride
# 32: its 27 convolutions compile 2-3x faster than the full 70.
_TINY_WIDTH = 1 / 8
_TINY_INCEPTION_MODULES = ("3a", "3c", "4e", "5b")
MODEL_NAMES = ("inception", "inception_tiny", *_RESNETS)


def create_model(config, *, norm: ModuleDef | None = None) -> nn.Module:
  """The network ``config.model`` names, as a Flax linen module.

  Apply it as ``model.apply(variables, images, train=..., mutable=...)`` with
  ``images`` [N, image_size, image_size, 3] float; it returns logits
  [N, num_classes] float32. ``variables`` holds ``params`` and, for networks with
  BN, ``batch_stats`` (train with ``mutable=["batch_stats"]``); the Inception
  without BN (``config.batch_norm=False``) has no ``batch_stats``. When
  ``config.dropout_rate > 0`` (Inception), training needs an rng named "dropout":
  ``rngs={"dropout": key}``.

  Args:
    config: an experiment config (``configs/default.py``); reads ``model``,
      ``num_classes``, ``width_multiplier``, ``half_precision`` (bfloat16
      computation), ``image_size`` (checked), ``bn_momentum`` and ``bn_epsilon``
      (when ``norm`` is None) and, for the Inception, ``batch_norm``,
      ``activation`` ("relu" or "sigmoid"), ``lrn``, ``dropout_rate`` and
      ``pool_projection_4cd`` (96 or 128).
    norm: the BatchNorm constructor, with momentum, epsilon and the device
      options (``axis_name``, ``axis_index_groups``, ``virtual_batch_size``)
      bound; the model sets ``use_running_average`` and ``dtype``. Default:
      ``bnjax.linen.BatchNorm`` with ``config.bn_momentum`` and ``config.bn_epsilon``.

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown model name, bad image size, activation or option.
  """
  name = config.model
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  check_image_size(config.image_size)
  if not config.width_multiplier > 0:
    raise ValueError(f"width_multiplier must be > 0, got {config.width_multiplier!r}")
  if norm is None:
    norm = functools.partial(bn.BatchNorm, momentum=config.bn_momentum, epsilon=config.bn_epsilon)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32

  if name in _RESNETS:
    if not config.get("batch_norm", True):
      raise ValueError(f"{name} always has batch norm; batch_norm=False is for the Inception only")
    base = 8 if name == "resnet_tiny" else 64
    return _RESNETS[name](
      num_classes=config.num_classes,
      num_filters=_scaled(base, config.width_multiplier),
      dtype=dtype,
      norm=norm,
    )

  if config.activation not in _ACTIVATIONS:
    raise ValueError(
      f"activation must be one of {', '.join(_ACTIVATIONS)}, got {config.activation!r}"
    )
  if not 0.0 <= config.dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {config.dropout_rate!r}")
  inception_modules(config.pool_projection_4cd)  # validates it
  width = config.width_multiplier * (_TINY_WIDTH if name == "inception_tiny" else 1.0)
  return Inception(
    num_classes=config.num_classes,
    width_multiplier=width,
    norm=norm if config.batch_norm else None,
    activation=_ACTIVATIONS[config.activation],
    lrn=config.lrn,
    dropout_rate=config.dropout_rate,
    pool_projection_4cd=config.pool_projection_4cd,
    modules=_TINY_INCEPTION_MODULES if name == "inception_tiny" else None,
    dtype=dtype,
  )


def count_params(model: nn.Module, image_size: int = 224) -> int:
  """Number of parameters (the ``params`` collection; not BN's running statistics).

  Shapes only, via ``jax.eval_shape``: nothing is allocated, so full-size models
  count in a fraction of a second.

  >>> count_params(ResNet50(), 224)
  25557032
  """
  check_image_size(image_size)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
