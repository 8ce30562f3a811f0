"""A CPU smoke run: BN-x5 on a tiny Inception at 32x32 with fake data.

    python -m experiments.imagenet --workdir=/tmp/tiny --config=experiments/imagenet/configs/tiny.py

Not a result: random pixels and labels, a few steps, to see that everything runs.
Any field can be overridden, e.g. ``--config.model=resnet_tiny``.
"""

import ml_collections

from experiments.imagenet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.batch_norm = True  # BN-x5 (bn_x5.py) ...
  default.with_section_4_2_1(config, learning_rate_factor=5)
  # ... made tiny:
  config.model = "inception_tiny"
  config.fake_data = True
  config.image_size = 32
  config.num_classes = 1000
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 150.0  # as BN-x5 (unused: num_train_steps is set)
  config.num_train_steps = 10
  config.shuffle_buffer = 64
  config.log_every = 1
  config.eval_every = 5
  config.checkpoint_every = 5
  return config
