"""Subprocesses of the tests: their environment, a free port for a coordinator or a
server, a Python module started from the repository's root, and its end awaited with a
time limit."""

import os
import socket
import subprocess
import sys

import pytest

from tests import ROOT

# XLA's flag for its back end's optimization level: tests/conftest.py sets it to 0.
XLA_LEVEL_FLAG = "--xla_backend_optimization_level"


def xla_level_flags(xla_flags: str) -> list[str]:
  """The optimization-level flags among ``xla_flags`` (an ``XLA_FLAGS`` string)."""
  return [flag for flag in xla_flags.split() if flag.startswith(XLA_LEVEL_FLAG)]


def child_env(*xla_flags: str, **variables: str) -> dict[str, str]:
  """This process's environment for a child, with ``variables`` set. Its ``XLA_FLAGS``
  holds the suite's optimization level and ``xla_flags``, and not the suite's device
  count: the child compiles as this process does and sees its own devices."""
  level = xla_level_flags(os.environ.get("XLA_FLAGS", ""))
  return {**os.environ, **variables, "XLA_FLAGS": " ".join([*level, *xla_flags])}


def free_port() -> int:
  """A TCP port on 127.0.0.1 that no process listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_module(module: str, args, env: dict) -> subprocess.Popen:
  """``python -m module *args`` from the repository's root, its output piped as text."""
  return subprocess.Popen(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(process: subprocess.Popen, status: int = 0, timeout: float = 300) -> tuple[str, str]:
  """(stdout, stderr) of ``process`` once it ends, which it must within ``timeout``
  seconds and with exit ``status`` (the test fails otherwise, with its stderr's end)."""
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    pytest.fail(f"{process.args} did not finish within {timeout} s")
  assert process.returncode == status, err[-3000:]
  return out, err
