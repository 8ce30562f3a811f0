"""The network of Section 4.1: 784-100-100-100-10, sigmoid, with or without BN."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from bnjax import linen as bn


class MLP(nn.Module):
  """Fully connected sigmoid network; BN on each hidden layer's pre-activation.

  With ``batch_norm``, each hidden layer is ``sigmoid(BN(W u))``: BN's learned bias
  replaces the layer's (Section 3.2). Without, ``sigmoid(W u + b)``. Weights start
  from small Gaussians (``init_stddev``), biases from 0.

  Returns ``(logits, sigmoid_inputs)``: ``[N, 10]`` and ``[N, hidden_sizes[-1]]``,
  the inputs to the last hidden layer's sigmoids, whose distribution over
  training Figure 1(b, c) shows.
  """

  hidden_sizes: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  batch_norm: bool = True
  init_stddev: float = 0.1
  momentum: float = 0.99

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    x = images.reshape((images.shape[0], -1))
    kernel_init = nn.initializers.normal(self.init_stddev)
    for size in self.hidden_sizes:
      x = nn.Dense(size, use_bias=not self.batch_norm, kernel_init=kernel_init)(x)
      if self.batch_norm:
        x = bn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
      sigmoid_inputs = x
      x = nn.sigmoid(x)
    logits = nn.Dense(self.num_classes, kernel_init=kernel_init)(x)
    return logits, sigmoid_inputs
