"""The ImageNet throughput benchmark runs (a micro network, one round) and reports
both BatchNorms side by side; timings are not asserted, only that they exist."""

import jax
import pytest

from benchmarks import imagenet_throughput
from tests.imagenet_testing import micro_net


@pytest.mark.slow
def test_throughput_benchmark_compares_both_batch_norms_in_both_modes():
  with jax.numpy_dtype_promotion("standard"):  # Flax's BatchNorm relies on implicit promotion
    results = imagenet_throughput.measure(
      ["resnet50"],
      ["jit", "pmap"],
      image_size=32,
      batch_size=16,
      width_multiplier=0.25,
      rounds=1,
      repeats=1,
      create_model=micro_net,
    )
  assert [(r["network"], r["parallelism"]) for r in results] == [
    ("resnet50", "jit"),
    ("resnet50", "pmap"),
  ]
  for r in results:
    assert set(r["images_per_sec"]) == {"bnjax", "flax"} and min(r["images_per_sec"].values()) > 0
    assert r["bnjax_over_flax_images_per_sec"]["median"] > 0
  table = imagenet_throughput.markdown(
    {
      "machine": imagenet_throughput.machine(),
      "throughput": results,
      "settings": {
        "image_size": 32,
        "batch_size": 16,
        "width_multiplier": 0.25,
        "rounds": 1,
        "repeats": 1,
      },
    }
  )
  assert table.count("| resnet50 |") == 2
