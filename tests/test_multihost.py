"""Multi-host synchronization through jax.distributed: two processes on this
machine, two CPU devices each, gloo collectives (what a Cloud TPU pod does with
its hosts)."""

import json
import subprocess
import sys

import pytest

from tests import ROOT
from tests.processes import free_port

NUM_PROCESSES = 2


@pytest.mark.slow
def test_statistics_synchronized_across_processes():
  port = free_port()
  workers = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", str(i), str(NUM_PROCESSES), str(port)],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(NUM_PROCESSES)
  ]
  results = []
  try:
    for worker in workers:
      out, err = worker.communicate(timeout=180)
      assert worker.returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  except subprocess.TimeoutExpired:
    pytest.fail("multi-host workers did not finish within 180 s")
  finally:
    for worker in workers:
      worker.kill()
  for result in results:
    assert result["devices"] == 4  # both processes' devices form one axis
    assert result["var_relative_error"] < 1e-5 and result["mean_error"] < 2e-4, (
      result
    )  # mean 1e3: ~3 ulp
    assert result["dx_error"] < 1e-4, result
