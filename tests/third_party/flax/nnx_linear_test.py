# Copyright 2024 The Flax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

# bnjax: adapted from google/flax tests/nnx/nn/linear_test.py at commit 18f8f311:
# the two tests whose parameter lists hold nnx.BatchNorm, each list cut to its
# BatchNorm entry. The parameters are evaluated when this file is imported, before
# conftest.py swaps the class, so the entry names the class ("BatchNorm") and the
# test reads it from nnx when it runs (the two lines marked "bnjax:"); the rest is
# Flax's code, unchanged.

import jax
from absl.testing import absltest
from absl.testing import parameterized

from flax import nnx


class TestLayersSameGraph(parameterized.TestCase):

  @parameterized.product(
      module_args_kwargs_initargs=[
          ("BatchNorm", (3,), ("scale_init", "bias_init")),
      ],
  )
  def test(self, module_args_kwargs_initargs):
    module_cls, args, init_argnames = module_args_kwargs_initargs
    module_cls = getattr(nnx, module_cls)  # bnjax: the class in nnx now
    kwargs = {"rngs": nnx.Rngs(0)}
    init_zeros = nnx.initializers.zeros
    init_ones = nnx.initializers.ones
    init1_kwargs = {k: init_zeros for k in init_argnames}
    init2_kwargs = {k: init_ones for k in init_argnames}
    mod1 = module_cls(*args, **init1_kwargs, **kwargs)
    mod2 = module_cls(*args, **init2_kwargs, **kwargs)
    g1, g2 = nnx.graphdef(mod1), nnx.graphdef(mod2)
    assert g1 == g2


class TestLayersParamsMetadata(parameterized.TestCase):

  @parameterized.product(
      module_args_kwargs_initargs=[
          ("BatchNorm", (3,), (("scale", 1, ()), ("bias", 1, ()))),
      ],
  )
  def test(self, module_args_kwargs_initargs):
    module_cls, args, metadata_argnames = module_args_kwargs_initargs
    module_cls = getattr(nnx, module_cls)  # bnjax: the class in nnx now
    kwargs = {"rngs": nnx.Rngs(0)}
    out_sharding = ("din", "dout")
    metadata_kwargs = {
      f"{key}_metadata": {"out_sharding": out_sharding[:le]}
      for key, le, _ in metadata_argnames
    }

    mesh = jax.make_mesh(
      (1, 1),
      out_sharding,
      axis_types=(jax.sharding.AxisType.Auto,) * len(out_sharding),
    )
    with jax.set_mesh(mesh):
      module = module_cls(*args, **metadata_kwargs, **kwargs)

    for key, le, attrs in metadata_argnames:
      attrs = attrs if attrs else ((None, key), )
      for attr_name, param_name in attrs:
        attr = getattr(module, attr_name) if attr_name is not None else module
        param = getattr(attr, param_name)
        self.assertIsNotNone(param.out_sharding)
        self.assertEqual(param.out_sharding, out_sharding[:le])


if __name__ == '__main__':
  absltest.main()
