# Copyright 2024 The Flax Authors.

# bnjax: an excerpt of google/flax tests/nnx/module_test.py at commit 18f8f311:
# the tests that exercise BatchNorm, with the module-level code and test-class
# members they use, unchanged;
# written by tests/third_party/flax/vendor_flax_tests.py. conftest.py puts bnjax's
# BatchNorm in place of Flax's.
from copy import deepcopy
import dataclasses
import pickle
import tempfile
from typing import TypeVar
from absl.testing import absltest
from absl.testing import parameterized
import cloudpickle
from flax import errors, nnx
import jax
import jax.numpy as jnp
import numpy as np
import flax
A = TypeVar('A')
from contextlib import contextmanager


class TestModule(parameterized.TestCase):
  def test_set_attributes(self):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))
    assert block.dropout.deterministic == False
    assert block.batch_norm.use_running_average == False

    block.set_attributes(deterministic=True, use_running_average=True)
    assert block.dropout.deterministic == True
    assert block.batch_norm.use_running_average == True

    block = Block(2, 5, rngs=nnx.Rngs(0))
    block.set_attributes(nnx.Dropout, deterministic=True)
    # Only the dropout will be modified
    assert block.dropout.deterministic == True
    assert block.batch_norm.use_running_average == False

  def test_set_attribute_error(self):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))

    with self.assertRaisesRegex(
        ValueError,
        (
            'Could not find at least one instance of the following attributes:'
            " \\['unknown'\\]"
        ),
    ):
      block.set_attributes(
        deterministic=True, use_running_average=True, unknown=True
      )

    block.set_attributes(
      deterministic=True,
      use_running_average=True,
      unknown=True,
      raise_if_not_found=False,
    )

  @parameterized.parameters(True, False)
  def test_view(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))
    assert block.dropout.deterministic == False
    assert block.batch_norm.use_running_average == False

    new_block = nnx.view(block, deterministic=True, use_running_average=True, graph=graph)
    assert new_block.dropout.deterministic == True
    assert new_block.batch_norm.use_running_average == True
    assert new_block.linear.kernel is block.linear.kernel

    block = Block(2, 5, rngs=nnx.Rngs(0))
    new_block = nnx.view(block, only=nnx.Dropout, deterministic=True, graph=graph)
    assert new_block.dropout.deterministic == True
    assert new_block.batch_norm.use_running_average == False

  @parameterized.parameters(True, False)
  def test_with_attributes(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))
    assert block.dropout.deterministic == False
    assert block.batch_norm.use_running_average == False

    new_block = nnx.with_attributes(
      block, deterministic=True, use_running_average=True, graph=graph
    )
    assert new_block.dropout.deterministic == True
    assert new_block.batch_norm.use_running_average == True
    assert new_block.linear.kernel is block.linear.kernel
    assert block.dropout.deterministic == False
    assert block.batch_norm.use_running_average == False

  @parameterized.parameters(True, False)
  def test_with_attributes_filter(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))
    new_block = nnx.with_attributes(
      block, only=nnx.Dropout, deterministic=True, graph=graph
    )
    assert new_block.dropout.deterministic == True
    assert new_block.batch_norm.use_running_average == False

  @parameterized.parameters(True, False)
  def test_with_attributes_error(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )

    block = Block(2, 5, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(
        ValueError,
        (
            'Could not find at least one instance of the following attributes:'
            " \\['unknown'\\]"
        ),
    ):
      nnx.with_attributes(
        block, deterministic=True, use_running_average=True,
        unknown=True, graph=graph,
      )

    new_block = nnx.with_attributes(
      block, deterministic=True, use_running_average=True,
      unknown=True, raise_if_not_found=False, graph=graph,
    )
    assert new_block.dropout.deterministic == True
    assert new_block.batch_norm.use_running_average == True

  @parameterized.parameters(True, False)
  def test_view_error(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.batch_norm = nnx.BatchNorm(
          10, use_running_average=False, rngs=rngs
        )
    block = Block(2, 5, rngs=nnx.Rngs(0))

    with self.assertRaisesRegex(
        ValueError,
        (
            "Unused keys found in nnx.view: \\['unknown'\\]"
        ),
    ):
      nnx.view(block, deterministic=True, use_running_average=True, unknown=True, graph=graph)

  def test_cloud_pickle(self):
    import platform
    if platform.python_version().startswith('3.11'):
      self.skipTest("Cloudpickle cannot pickle PRNGKeyArray on python 3.11")
    class Model(nnx.Module):
      def __init__(self, din, dmid, dout, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dmid, rngs=rngs)
        self.bn = nnx.BatchNorm(dmid, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear_out = nnx.Linear(dmid, dout, rngs=rngs)

      def __call__(self, x):
        x = nnx.relu(self.dropout(self.bn(self.linear(x))))
        return self.linear_out(x)

    model = Model(2, 64, 3, rngs=nnx.Rngs(0))  # eager initialization
    model.eval()

    y1 = model(jnp.ones((5, 2)))
    with tempfile.TemporaryDirectory() as tmpdir:
      path = f'{tmpdir}/model.pkl'
      with open(path, 'wb') as f:
        cloudpickle.dump(model, f)
        del model
      with open(path, 'rb') as f:
        model = pickle.load(f)

    self.assertIsInstance(model, Model)
    y2 = model(jnp.ones((5, 2)))
    np.testing.assert_allclose(y1, y2)

  def test_repr(self):
    class Block(nnx.Module):
      def __init__(self, din, dout, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    class Foo(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.block1 = Block(32, 128, rngs=rngs)
        self.block2 = Block(128, 10, rngs=rngs)

      def __call__(self, x):
        return self.block2(self.block1(x))

    obj = Foo(nnx.Rngs(0))

    leaves = nnx.to_flat_state(nnx.state(obj)).leaves

    expected_total = sum(int(np.prod(x.shape)) for x in leaves)
    expected_total_params = sum(
      int(np.prod(x.shape)) for x in leaves if isinstance(x, nnx.Param)
    )
    expected_total_batch_stats = sum(
      int(np.prod(x.shape)) for x in leaves if isinstance(x, nnx.BatchStat)
    )
    expected_total_rng_states = sum(
      int(np.prod(x.shape)) for x in leaves if isinstance(x, nnx.RngState)
    )

    foo_repr = repr(obj).replace(',', '').splitlines()

    self.assertIn(str(expected_total), foo_repr[0])
    self.assertIn(str(expected_total_params), foo_repr[0])
    self.assertIn(str(expected_total_batch_stats), foo_repr[0])
    self.assertIn(str(expected_total_rng_states), foo_repr[0])

  @parameterized.parameters(True, False)
  def test_view_info(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    class Foo(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.block1 = Block(32, 128, rngs=rngs)
        self.block2 = Block(128, 10, rngs=rngs)

      def __call__(self, x):
        return self.block2(self.block1(x))

    obj = Foo(rngs=nnx.Rngs(0))
    info_str = nnx.view_info(obj, graph=graph)
    self.assertEqual(info_str.count("BatchNorm:"), 1)
    self.assertEqual(info_str.count("Dropout:"), 1)

  @parameterized.parameters(True, False)
  def test_view_info_with_filter(self, graph):
    class Block(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    obj = Block(4, 8, rngs=nnx.Rngs(0))
    info_str = nnx.view_info(obj, only=nnx.Dropout, graph=graph)
    self.assertIn("Dropout:", info_str)
    self.assertNotIn("BatchNorm:", info_str)

    info_str = nnx.view_info(obj, only=nnx.MultiHeadAttention, graph=graph)
    self.assertEmpty(info_str)


if __name__ == '__main__':
  absltest.main()
