"""Flax's own docstring examples that use BatchNorm, run with bnjax's classes.

They are read from the installed flax (the pinned version) when this file is
imported, before ``conftest.py`` puts bnjax's classes in place of Flax's for each
test, so ``flax.nnx.BatchNorm``'s and ``flax.linen.BatchNorm``'s own examples are
among them. Each must print what Flax's documentation says it prints.
"""

import doctest
import importlib

import pytest

MODULES = [
  "flax.linen.module",
  "flax.linen.normalization",
  "flax.nnx.graphlib",
  "flax.nnx.module",
  "flax.nnx.nn.normalization",
  "flax.nnx.statelib",
  "flax.nnx.summary",
]


def _batch_norm_examples() -> list[doctest.DocTest]:
  finder = doctest.DocTestFinder()
  return [
    test
    for name in MODULES
    for test in finder.find(importlib.import_module(name))
    if "BatchNorm" in "".join(example.source for example in test.examples)
  ]


EXAMPLES = _batch_norm_examples()


def test_the_examples_include_the_batch_norm_classes_own():
  names = {test.name for test in EXAMPLES}
  assert {
    "flax.nnx.nn.normalization.BatchNorm",
    "flax.linen.normalization.BatchNorm",
    "flax.nnx.module.view_info",
  } <= names
  assert len(EXAMPLES) >= 15


@pytest.mark.parametrize("test", EXAMPLES, ids=lambda test: test.name)
def test_flax_docstring_example(test):
  report = []
  result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).run(
    test, out=report.append
  )
  assert result.attempted > 0
  assert result.failed == 0, "".join(report)
