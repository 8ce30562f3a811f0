"""BN-Baseline: the Inception with batch norm before each nonlinearity (Section 4.2.2).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/bn_baseline.py

Paper (Figure 3): 72.2% after 13.3M steps (Inception: 31.0M), at most 72.7%;
the same training as the Inception (initial rate 0.0015, dropout, LRN, ...).
"""

import ml_collections

from experiments.imagenet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.batch_norm = True  # Section 4.2.2
  # Our choice: 13.3M steps of 32 (Figure 3, reaching 72.2%) = 332 epochs, and a
  # little more for its maximum of 72.7%.
  config.num_epochs = 350.0
  return config
