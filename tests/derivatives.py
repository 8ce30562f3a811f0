"""``jax.test_util.check_grads``'s checks, traced into one program.

``check_grads`` evaluates every derivative it checks as a program of its own: at
second order in both modes that is about 26 compiles for one function, most of a
test's time at the tiny sizes the suite uses. ``check_derivatives`` makes the same
checks (each in one random direction, against central differences, recursively to
``order``) but traces them all into a single ``jax.jit`` program, and compares the
results in NumPy afterwards.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _random_like(rng, tree):
  return jax.tree.map(lambda a: rng.standard_normal(jnp.shape(a)).astype(jnp.result_type(a)), tree)


def _central_difference(f, primals, tangents, eps):
  plus = f(*jax.tree.map(lambda p, t: p + eps * t, primals, tangents))
  minus = f(*jax.tree.map(lambda p, t: p - eps * t, primals, tangents))
  return jax.tree.map(lambda a, b: (a - b) * (0.5 / eps), plus, minus)


def _inner(xs, ys):
  products = jax.tree.map(lambda x, y: jnp.real(jnp.vdot(x, y)), xs, ys)
  return functools.reduce(jnp.add, jax.tree.leaves(products))


def _comparisons(f, args, order, modes, rng, eps, label):
  """``[(label, computed, expected)]`` of ``check_grads``'s recursion, traced."""
  comparisons = []
  if "fwd" in modes:
    name = f"JVP of {label}" if label else "JVP"
    tangents = _random_like(rng, args)
    _, computed = jax.jvp(f, args, tangents)
    comparisons.append((name, computed, _central_difference(f, args, tangents, eps)))
    if order > 1:
      jvp = functools.partial(jax.jvp, f)
      comparisons += _comparisons(jvp, (args, args), order - 1, modes, rng, eps, name)
  if "rev" in modes:
    name = f"VJP of {label}" if label else "VJP"
    tangents = _random_like(rng, args)
    outputs, pull_back = jax.vjp(f, *args)
    cotangents = _random_like(rng, outputs)
    # <J^T u, t> against <u, J t>, J t by central differences.
    computed = _inner(pull_back(cotangents), tangents)
    expected = _inner(cotangents, _central_difference(f, args, tangents, eps))
    comparisons.append((name, computed, expected))
    if order > 1:

      def vjp_of_outputs(*args):
        outputs, pull_back = jax.vjp(f, *args)
        return pull_back(outputs)

      comparisons += _comparisons(vjp_of_outputs, args, order - 1, modes, rng, eps, name)
  return comparisons


def check_derivatives(f, args, order, modes=("fwd", "rev"), *, atol, rtol, eps=1e-4, seed=0):
  """Checks ``f``'s derivatives to ``order`` against central differences.

  The checks are ``check_grads``'s (its default step ``eps``): forward mode
  against a central difference along a random tangent; reverse mode as
  ``<J^T u, t> == <u, J t>`` for random ``u`` and ``t``; and at ``order > 1`` the
  same checks of the derivative functions themselves. All of them are evaluated by
  one compiled program.

  Raises:
    AssertionError: naming the derivative (e.g. "VJP of JVP") that disagrees.
  """
  rng = np.random.default_rng(seed)
  labels = []

  @jax.jit
  def every_comparison(args):
    comparisons = _comparisons(f, tuple(args), order, modes, rng, eps, "")
    labels.extend(label for label, _, _ in comparisons)
    return [(computed, expected) for _, computed, expected in comparisons]

  results = every_comparison(tuple(args))
  for label, (computed, expected) in zip(labels, results, strict=True):
    for got, want in zip(jax.tree.leaves(computed), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=label)
