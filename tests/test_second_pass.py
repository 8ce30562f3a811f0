"""benchmarks/second_pass.py: the float64 predicate on hand-made cases, the observed BN
calls against the layer's input computed apart, and the quick mode's files."""

import json
import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from benchmarks import second_pass
from bnjax import linen as bn
from tests import ROOT


def _ratio(x, shift, mask=None):
  return second_pass.shift_ratio(*second_pass.feature_moments(x, (-1,), mask), np.asarray(shift))


def test_a_feature_far_from_the_shift_needs_the_second_pass():
  # Feature 0: values 4 and 6 (mean 5, std 1); feature 1: -1 and 1 (mean 0, std 1).
  x = np.array([[4.0, -1.0], [6.0, 1.0], [4.0, 1.0], [6.0, -1.0]])
  assert _ratio(x, [0.0, 0.0]) == 25.0  # (5 - 0)^2 / 1
  assert second_pass.needs_second_pass(_ratio(x, [0.0, 0.0]))
  assert _ratio(x, [5.0, 0.0]) == 0.0
  assert not second_pass.needs_second_pass(_ratio(x, [5.0, 0.0]))
  # Exactly at the threshold (|mean - K| = 2 std) one pass is kept; just past it, not.
  assert not second_pass.needs_second_pass(_ratio(x, [3.0, 0.0]))
  assert second_pass.needs_second_pass(_ratio(x, [5.0, 2.001]))


def test_masked_constant_and_overflowing_features():
  x = np.array([[4.0, 7.0], [6.0, 7.0], [1e30, 7.0]])
  mask = np.array([[True, True], [True, True], [False, True]])
  count, mean, var = second_pass.feature_moments(x, (-1,), mask)
  np.testing.assert_array_equal(count, [2.0, 3.0])
  np.testing.assert_array_equal(mean, [np.mean([4.0, 6.0]), 7.0])
  np.testing.assert_array_equal(var, [np.var([4.0, 6.0]), 0.0])
  # A constant feature: one pass only around its own value.
  assert _ratio(x, [5.0, 7.0], mask) == 0.0
  assert _ratio(x, [5.0, 0.0], mask) == np.inf
  # Sums of squares past float32's range: not finite, so the second pass.
  big = np.array([[1e20], [-1e20], [1e20], [-1e20]])
  assert _ratio(big, [0.0]) == np.inf
  assert not second_pass.needs_second_pass(_ratio(big / 1e10, [0.0]))
  np.testing.assert_array_equal(
    second_pass.feature_moments(np.ones((2, 3, 4)), (1,))[0], [8.0, 8.0, 8.0]
  )


class _State(NamedTuple):
  step: jax.Array  # [], int32
  params: Any
  batch_stats: Any
  opt_state: Any


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    h = nn.Dense(3)(x)
    return bn.BatchNorm(use_running_average=not train, momentum=0.5)(h), h


def test_the_recorder_sees_each_training_call_with_the_running_mean_before_its_update():
  net, optimizer = _Net(), optax.sgd(0.1)
  inputs = jax.random.normal(jax.random.key(0), (4, 6, 5)) + 3.0  # 4 steps of batches of 6
  variables = net.init(jax.random.key(1), inputs[0], train=False)

  def train_step(state, x):
    def loss_fn(params):
      (y, _), updates = net.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.sum(y**2), updates["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return _State(state.step + 1, optax.apply_updates(state.params, updates), stats, opt_state)

  recorder = second_pass.Recorder()
  step = jax.jit(second_pass.observed(train_step, recorder, every=2))
  params = variables["params"]
  state = _State(jnp.zeros((), jnp.int32), params, variables["batch_stats"], optimizer.init(params))
  expected = []
  for x in inputs:
    # The layer's input and running mean, computed apart from the recorder.
    _, h = net.apply({**variables, "params": state.params}, x, train=False)
    if int(state.step) % 2 == 0:
      mean = np.asarray(state.batch_stats["BatchNorm_0"]["mean"])
      expected.append((int(state.step), _ratio(np.asarray(h), mean), _ratio(np.asarray(h), 0)))
    state = step(state, x)
  jax.effects_barrier()
  assert expected[1][1] != expected[1][2]  # the running mean moved by step 2
  got = [(c["step"], c["running_mean"], c["zero"]) for c in recorder.calls]
  assert [c["layer"] for c in recorder.calls] == ["BatchNorm_0"] * 2
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow
def test_quick_mode_writes_rates(tmp_path, fashion_mnist_dir):
  # A process of its own with one device: the suite's eight would shard the ImageNet
  # step, where the host callbacks stall its all-reduces (second_pass.run_imagenet).
  runs = ["mnist_bn", "imagenet_tiny_resnet_fake"]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["PYTHONPATH"] = str(ROOT)
  command = [sys.executable, "-m", "benchmarks.second_pass", "--quick"]
  command += ["--output-dir", str(tmp_path), "--data-dir", str(fashion_mnist_dir)]
  subprocess.run([*command, "--runs", ",".join(runs)], check=True, cwd=ROOT, env=env, timeout=900)
  written = json.loads((tmp_path / "second_pass.json").read_text())
  assert written["settings"]["quick"] is True
  assert [r["name"] for r in written["runs"]] == runs
  for run, layers in zip(written["runs"], (3, 17), strict=True):
    assert run["bn_layers"] == layers
    assert run["overall"]["calls"] == layers * run["steps_measured"]["count"] > 0
    for entry in [run["overall"], *run["windows"], *run["layers"]]:
      for shift in second_pass.SHIFTS:
        assert 0 <= entry[shift]["rate"] <= 1
  markdown = (tmp_path / "second_pass.md").read_text()
  assert "SYNTHETIC IMAGES, NOT IMAGENET" in markdown and "FASHION-MNIST" in markdown
