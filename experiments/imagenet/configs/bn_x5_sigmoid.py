"""BN-x5-Sigmoid: BN-x5 with sigmoid instead of ReLU (Section 4.2.2).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/bn_x5_sigmoid.py

Paper (Figure 3): never reaches 72.2%, at most 69.8%; initial rate 0.0075. The
same network without BN stays at chance (``inception_sigmoid.py``).
"""

import ml_collections

from experiments.imagenet.configs import bn_x5


def get_config() -> ml_collections.ConfigDict:
  config = bn_x5.get_config()
  config.activation = "sigmoid"  # Section 4.2.2
  return config
