"""tests.derivatives.check_derivatives, the suite's finite-difference check, fails
where a derivative is wrong: in either mode, and at second order only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.derivatives import check_derivatives


def _sin_with_derivative(derivative):
  @jax.custom_jvp
  def f(x):
    return jnp.sin(x)

  f.defjvp(lambda primals, tangents: (f(*primals), derivative(*primals) * tangents[0]))
  return f


def _sin_with_cotangent_rule(pull_back):
  @jax.custom_vjp
  def f(x):
    return jnp.sin(x)

  f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (pull_back(x, g),))
  return f


X = (np.linspace(-1.0, 1.0, 5),)


def test_passes_for_right_derivatives(x64):
  check_derivatives(_sin_with_derivative(jnp.cos), X, order=2, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_a_wrong_first_derivative_fails(x64, mode):
  with pytest.raises(AssertionError, match="JVP" if mode == "fwd" else "VJP"):
    check_derivatives(
      _sin_with_derivative(lambda x: 1.01 * jnp.cos(x)),
      X,
      order=1,
      modes=[mode],
      atol=1e-7,
      rtol=1e-7,
    )


def test_a_wrong_reverse_rule_fails():
  with pytest.raises(AssertionError, match="VJP"):
    check_derivatives(
      _sin_with_cotangent_rule(lambda x, g: -g * jnp.cos(x)),
      X,
      order=1,
      modes=["rev"],
      atol=1e-5,
      rtol=1e-5,
    )


def test_a_wrong_second_derivative_fails_at_order_2_only(x64):
  # cos(x) rewritten as a function whose value is right but whose derivative is not.
  @jax.custom_jvp
  def cos(x):
    return jnp.cos(x)

  cos.defjvp(lambda primals, tangents: (cos(*primals), jnp.zeros_like(tangents[0])))
  f = _sin_with_derivative(cos)
  check_derivatives(f, X, order=1, atol=1e-7, rtol=1e-7)
  with pytest.raises(AssertionError, match="JVP of JVP"):
    check_derivatives(f, X, order=2, modes=["fwd"], atol=1e-7, rtol=1e-7)
