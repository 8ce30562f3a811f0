"""Configurations of the MNIST experiment, as ``get_config()`` files."""

import pathlib

DEFAULT = str(pathlib.Path(__file__).parent / "default.py")
# Fields renamed to the ImageNet experiment's (and Flax's) words: {old: new}. The old
# spelling on a command line still works, with a warning.
RENAMED = {"num_steps": "num_train_steps"}
