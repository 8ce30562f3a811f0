r"""A quick run of the MNIST experiment, to check the set-up: 11 s of CPU time,
mostly compiling (49 s on this project's 2-core machine at load average 8).

    python -m experiments.mnist --workdir=/tmp/mnist_quick \
        --config=experiments/mnist/configs/quick.py
"""

from experiments.mnist.configs import default


def get_config():
  config = default.get_config()
  config.num_train_steps = 600
  config.eval_every = 200
  config.checkpoint_every = 300
  return config
