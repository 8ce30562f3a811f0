"""BN-x30: as BN-x5, with 30x the Inception's learning rate (Section 4.2.2).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/bn_x30.py

Paper (Figure 3): 72.2% after 2.7M steps of 32, 74.8% after 6M; initial rate 0.045.
"""

import ml_collections

from experiments.imagenet.configs import bn_x5


def get_config() -> ml_collections.ConfigDict:
  config = bn_x5.get_config()
  config.base_learning_rate = 0.0015 * 30  # Figure 3: 0.045
  return config
