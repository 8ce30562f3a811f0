"""The paper's MNIST experiment (Section 4.1, Figure 1): one network.

    python -m experiments.mnist --workdir=/tmp/mnist_bn
    python -m experiments.mnist --workdir=/tmp/mnist_baseline --config.batch_norm=False

Time per network (50,000 steps, 100 evaluations of the 10,000 test images), on
this project's 2-core x86-64 CPU machine: 30 s when idle, 1.5 min when shared
with other work (load average 8.6); half of Figure 1's measured 59 s and 3 min 1 s.

Set by the paper: 3 hidden layers of 100 sigmoid units, weights from small random
Gaussians, batches of 60, 50,000 steps, BN on each hidden pre-activation.

Not given by the paper, chosen here:
* Plain SGD (no momentum, no decay) with learning rate 0.01, the same for both
  networks. Figure 1 is about how fast each network trains at a given learning
  rate; at 0.01 (a common default for plain SGD) the sigmoid network without BN
  trains slowly while the BN network does not, as in the figure. At large rates
  the baseline catches up on a task this easy within 50,000 steps. Measured on
  Fashion-MNIST (the offline dataset here; MNIST itself could not be downloaded),
  test accuracy of BN / baseline, seed 0, init N(0, 0.1^2):

      learning rate   after 2,500 steps   after 10,000      after 50,000
      0.01            0.784 / 0.199       0.833 / 0.611     0.869 / 0.802
      0.05            0.831 / 0.633       0.854 / 0.799     0.869 / 0.875
      0.2             0.837 / 0.783       0.862 / 0.859     0.880 / 0.888
      1.0             0.839 / 0.839       0.868 / 0.874     0.883 / 0.890

* Initial weights N(0, 0.1^2), biases 0: first-layer pre-activations start with
  a standard deviation near 1, within the sigmoid's working range. With
  N(0, 0.01^2) the baseline did not leave chance level (0.10) in 50,000 steps at
  learning rate 0.01, a degenerate comparison.
* Batches drawn uniformly with replacement, from a key that depends only on
  ``seed`` and the step: runs with the same seed see the same data in the same
  order, with or without BN, and after a restart.
* Running statistics with momentum 0.99 (Flax's default); inference uses them.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data: TFDS by default; a folder of the four IDX .gz files if data_dir is set.
  config.dataset = "mnist"  # or "fashion_mnist"
  # e.g. /usr/share/datasets/fashion-mnist (Debian): the IDX files of config.dataset; None = TFDS
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS's default
  # Model.
  config.batch_norm = True
  config.hidden_sizes = (100, 100, 100)
  config.init_stddev = 0.1
  config.bn_momentum = 0.99
  config.tracked_unit = 0  # the last-layer sigmoid whose input Figure 1(b, c) follows
  # Training.
  config.num_train_steps = 50_000  # (before: num_steps, still accepted)
  config.batch_size = 60
  config.learning_rate = 0.01
  config.seed = 0
  # Bookkeeping.
  config.eval_every = 500
  config.checkpoint_every = 5_000
  return config
