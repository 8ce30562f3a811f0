"""ResNet-50 with the Flax ImageNet example's recipe (not in the paper: a reference run).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/resnet50.py

The Flax example reports 76.4-76.7% top-1 after 90 epochs (4.4 h on a TPU v3-8,
bfloat16; 13.2 h on 8 V100 in float32). Every value here is the example's
(google/flax examples/imagenet), not the BN paper's, except where marked.
"""

import ml_collections

from experiments.imagenet.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = "resnet50"
  config.batch_norm = True  # every ResNet has BN
  config.lrn = False  # not used by ResNets
  config.dropout_rate = 0.0  # not used by ResNets
  config.bn_momentum = 0.9
  config.bn_epsilon = 1e-5
  config.optimizer = "momentum"
  config.momentum = 0.9
  config.nesterov = True
  config.batch_size = 1024
  config.base_batch_size = 256  # lr = 0.1 x batch / 256
  config.base_learning_rate = 0.1
  config.lr_schedule = "cosine"  # cosine decay to 0 after the warm-up
  config.warmup_epochs = 5.0
  config.weight_decay = 1e-4  # on kernels, lambda / 2 * ||w||^2 in the loss, as the example
  config.num_epochs = 90.0
  config.shuffle_buffer = 16 * 1024  # the example's 16 x batch size
  config.photometric_distortion = 0.0  # the example: random crop and flip only
  config.eval_crop_fraction = 0.875  # the example: central 224 of 256
  return config
