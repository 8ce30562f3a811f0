"""The MNIST experiment's network: Section 4.1's 784-100-100-100-10 sigmoid MLP,
against a float64 NumPy transcription, and its parameters counted by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.mnist.model import MLP
from tests.mnist_testing import numpy_forward, random_variables


@pytest.mark.parametrize("batch_norm, training", [(True, True), (True, False), (False, False)])
def test_model_forward_matches_numpy(batch_norm, training):
  images = np.random.default_rng(1).uniform(size=(8, 28, 28)).astype(np.float32)
  model = MLP(batch_norm=batch_norm)
  variables = random_variables(model)
  apply = jax.jit(functools.partial(model.apply, train=training, mutable=["batch_stats"]))
  (logits, sigmoid_inputs), _ = apply(variables, images)
  want_logits, want_inputs = numpy_forward(variables, images, batch_norm=batch_norm, train=training)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sigmoid_inputs, want_inputs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "batch_norm, count",
  [
    # 784-100-100-100-10 counted by hand: weights, plus per hidden unit BN's gamma
    # and beta (Section 3.2: BN's beta replaces the bias) or one bias; the head's bias.
    (True, 784 * 100 + 2 * 100 * 100 + 3 * 100 * 2 + 100 * 10 + 10),  # 100,010
    (False, 784 * 100 + 2 * 100 * 100 + 3 * 100 + 100 * 10 + 10),  # 99,710
  ],
)
def test_parameters_are_section_4_1s_network(batch_norm, count):
  variables = jax.eval_shape(
    functools.partial(MLP(batch_norm=batch_norm).init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((2, 28, 28), jnp.float32),
  )
  shapes = {
    jax.tree_util.keystr(path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
  }
  assert sum(int(np.prod(s)) for s in shapes.values()) == count
  assert [shapes[f"['Dense_{i}']['kernel']"] for i in range(4)] == [
    (784, 100),
    (100, 100),
    (100, 100),
    (100, 10),
  ]
  assert shapes["['Dense_3']['bias']"] == (10,)
  for i in range(3):  # the hidden layers have no bias with batch norm: BN's bias replaces it
    assert (f"['Dense_{i}']['bias']" in shapes) == (not batch_norm)
    assert shapes.get(f"['BatchNorm_{i}']['bias']") == ((100,) if batch_norm else None)
  assert set(variables) == ({"params", "batch_stats"} if batch_norm else {"params"})
