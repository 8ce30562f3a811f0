"""The paper's Inception without batch norm (Section 4.2.2, Figure 3's "Inception").

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/inception.py

Paper: 72.2% top-1 (single crop) after 31.0M steps of 32; initial rate 0.0015.
All values and their sources: ``default.py``.
"""

import ml_collections

from experiments.imagenet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  # default.py is this network; the fields that make it "the Inception" of Figure 3,
  # said here so that this page reads on its own (the BN variants change them):
  config.batch_norm = False  # Section 4.2.2
  config.activation = "relu"  # Section 4.2
  config.lrn = True  # GoogLeNet's; Section 4.2.1 removes it for the BN variants
  config.dropout_rate = 0.4  # Section 4.2.1: "the original used 40%"
  config.base_learning_rate = 0.0015  # Figure 3
  config.num_epochs = 775.0  # Figure 3: 72.2% after 31.0M steps of 32 = 774 epochs
  return config
