"""The running statistics' update inside the training pass (bnjax._engine).

``batch_norm`` and ``batch_renorm`` update the state inside the custom derivative
of the training pass, so that XLA fuses it with the statistics; the derivative
rule then gives the new state's tangent itself. Checked here: the differentiated
pass returns what the plain one does, the update is Algorithm 2's, and the new
state's derivatives (in the input, the old state and a traced momentum) match
finite differences in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests import reference
from tests.samples import normal

AXES = (0, 1)
MASK = np.arange(6)[:, None, None] < 4  # [N, 1, 1]: the last two examples padding


def _state(features, seed):
  return bnjax.BatchNormState(
    mean=jnp.asarray(normal(seed, (features,))),
    var=jnp.asarray(1 + normal(seed + 1, (features,)) ** 2),
  )


def _training(kind, unbiased, masked):
  """``(x, state, momentum) -> (y, new_state)`` in training mode."""

  def run(x, state, momentum):
    params = bnjax.BatchNormParams(jnp.full(x.shape[-1], 1.5, x.dtype), None)
    common = dict(training=True, momentum=momentum, mask=MASK if masked else None)
    if kind == "renorm":
      return bnjax.batch_renorm(x, params, state, r_max=1.5, d_max=0.5, **common)
    return bnjax.batch_norm(x, params, state, unbiased_variance=unbiased, **common)

  return run


CASES = pytest.mark.parametrize(
  "kind, unbiased, masked",
  [
    ("batch_norm", False, False),
    ("batch_norm", True, True),
    ("renorm", False, True),
  ],
)


@CASES
def test_differentiated_pass_returns_the_plain_passs_output_and_state(kind, unbiased, masked):
  run = _training(kind, unbiased, masked)
  x = jnp.asarray(normal(0, (6, 5, 3), loc=2.0))
  state, tangent = _state(3, 10), jnp.asarray(normal(1, x.shape))

  @jax.jit
  def every_way(x, state):
    plain = run(x, state, 0.9)
    jvp_primals, _ = jax.jvp(lambda x: run(x, state, 0.9), (x,), (tangent,))
    vjp_primals, _ = jax.vjp(lambda x: run(x, state, 0.9), x)
    return plain, jvp_primals, vjp_primals

  plain, *differentiated = every_way(x, state)
  for outputs in differentiated:
    # One program compiles all three: only fusion may round them differently.
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), outputs, plain
    )


@pytest.mark.parametrize("unbiased, masked", [(False, False), (True, False), (True, True)])
def test_the_running_statistics_move_as_algorithm_2_says(x64, unbiased, masked):
  x = normal(2, (6, 5, 3), loc=-3.0, dtype=np.float64)
  state = jax.tree.map(lambda a: a.astype(jnp.float64), _state(3, 20))
  _, new = jax.jit(_training("batch_norm", unbiased, masked))(jnp.asarray(x), state, 0.75)
  mu, var = reference.batch_mean_var(x, AXES, MASK if masked else None)
  m = (4 if masked else 6) * 5  # the valid values of each feature
  if unbiased:
    var = var * m / (m - 1)  # Algorithm 2, step 10
  np.testing.assert_allclose(new.mean, 0.75 * state.mean + 0.25 * mu.ravel(), rtol=1e-12)
  np.testing.assert_allclose(new.var, 0.75 * state.var + 0.25 * var.ravel(), rtol=1e-12)


@CASES
def test_the_new_states_derivatives_match_finite_differences(x64, kind, unbiased, masked):
  run = _training(kind, unbiased, masked)

  def new_state(x, state, momentum):
    return run(x, state, momentum)[1]

  x = normal(3, (6, 5, 3), loc=1.0, dtype=np.float64)
  state = bnjax.BatchNormState(*(np.asarray(a, np.float64) for a in _state(3, 30)))
  primals = (x, state, np.float64(0.8))
  tangents = (
    normal(4, x.shape, dtype=np.float64),
    bnjax.BatchNormState(*(normal(s, (3,), dtype=np.float64) for s in (7, 8))),
    np.float64(0.3),
  )
  cotangent = bnjax.BatchNormState(*(normal(s, (3,), dtype=np.float64) for s in (6, 9)))
  h = 1e-6

  @jax.jit  # one program for every derivative: compiling dominates at this size
  def derivatives(primals, tangents, cotangent):
    plus, minus = (
      new_state(*jax.tree.map(lambda p, t, sign=sign: p + sign * h * t, primals, tangents))
      for sign in (1, -1)
    )
    finite_difference = jax.tree.map(lambda a, b: (a - b) / (2 * h), plus, minus)
    _, forward_mode = jax.jvp(new_state, primals, tangents)
    _, vjp = jax.vjp(new_state, *primals)
    return finite_difference, forward_mode, vjp(cotangent)

  finite_difference, forward_mode, pulled_back = jax.tree.map(
    np.asarray, derivatives(primals, tangents, cotangent)
  )
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-7, atol=1e-9),
    forward_mode,
    finite_difference,
  )

  # Reverse mode transposes the same rule: <cotangent, J t> == <J^T cotangent, t>.
  def inner(a, b):
    return sum(np.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

  np.testing.assert_allclose(
    inner(cotangent, forward_mode), inner(pulled_back, tangents), rtol=1e-10
  )
