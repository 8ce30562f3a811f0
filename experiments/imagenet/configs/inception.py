"""The paper's Inception without batch norm (Section 4.2.2, Figure 3's "Inception").

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/inception.py

Paper: 72.2% top-1 (single crop) after 31.0M steps of 32; initial rate 0.0015.
All values and their sources: ``default.py``.
"""

import ml_collections

from experiments.imagenet.configs import default


def get_config() -> ml_collections.ConfigDict:
  return default.get_config()
