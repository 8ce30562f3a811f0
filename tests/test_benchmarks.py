"""The benchmark runs (tiny, quick mode) so that it cannot rot; timings are not
asserted here, only that every section produced its figures."""

import json

import jax
import pytest

from benchmarks import run


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
  # Flax's BatchNorm, one of the candidates, relies on implicit promotion.
  with jax.numpy_dtype_promotion("standard"):
    results = run.main(["--quick", "--output-dir", str(tmp_path)])
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["settings"]["quick"] is True
  assert len(written["batch_norm"]) == 3
  for case in written["batch_norm"]:
    assert set(case["forward_backward_s"]) == {"bnjax", "flax_fast", "flax_exact", "naive_two_pass"}
    assert all(t > 0 for t in case["forward_backward_s"].values())
  # Structural facts, not timings: one collective per direction.
  assert results["collectives"]["bnjax"]["pmap_forward"] == {"all-reduce": 1}
  assert results["collectives"]["bnjax"]["pmap_forward_backward"] == {"all-reduce": 2}
  markdown = (tmp_path / "BENCHMARKS.md").read_text()
  for heading in ("### 1, 2.", "### 3.", "### 4.", "### 5.", "### 6."):
    assert heading in markdown
