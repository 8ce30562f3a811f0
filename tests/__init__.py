"""bnjax's test suite. ``ROOT``: the repository's root (the working directory of
the suite's subprocesses)."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
