"""Subprocesses of the tests: a free port for a coordinator or a server, a Python
module started from the repository's root, and its end awaited with a time limit."""

import socket
import subprocess
import sys

import pytest

from tests import ROOT


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
