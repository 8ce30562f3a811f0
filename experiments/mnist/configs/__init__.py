"""Configurations of the MNIST experiment, as ``get_config()`` files."""

import pathlib

DEFAULT = str(pathlib.Path(__file__).parent / "default.py")
