# Excerpt of Equinox's tests/test_stateful.py at v0.13.8 (patrick-kidger/equinox), the tests
# that construct eqx.nn.BatchNorm: test_delete_init_state. Copyright Patrick Kidger
# and the Equinox contributors, Apache-2.0 (LICENSE in this folder). Unchanged;
# written by vendor_equinox_tests.py. conftest.py puts bnjax.equinox.BatchNorm
# in place of eqx.nn.BatchNorm.

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest


def test_delete_init_state():
    model = eqx.nn.BatchNorm(3, "batch", mode="ema")
    eqx.nn.State(model)
    model2 = eqx.nn.delete_init_state(model)

    eqx.nn.State(model)
    with pytest.raises(ValueError):
        eqx.nn.State(model2)

    leaves = [x for x in jtu.tree_leaves(model) if eqx.is_array(x)]
    leaves2 = [x for x in jtu.tree_leaves(model2) if eqx.is_array(x)]
    assert len(leaves) == len(leaves2) + 3
