# Excerpt of Equinox's tests/test_serialisation.py at v0.13.8 (patrick-kidger/equinox), the tests
# that construct eqx.nn.BatchNorm: test_stateful. Copyright Patrick Kidger
# and the Equinox contributors, Apache-2.0 (LICENSE in this folder). Unchanged;
# written by vendor_equinox_tests.py. conftest.py puts bnjax.equinox.BatchNorm
# in place of eqx.nn.BatchNorm.

import os
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.dtypes import bfloat16


# Deserialisation and seralisation work despite both `model` and `model2` having
# different objects as the markers in their `StateIndex`s.
# This is because we iterate over `model` and `model2` in the same order when
# creating `State(model)` and `State(model2)`. Thus the entries in `state` and `state2`
# are stored in the same order (as Python dictionaries are ordered). So standard
# de/serialisation just matches things up automatically.
def test_stateful(tmp_path):
    class Model(eqx.Module):
        norm1: eqx.nn.BatchNorm
        norm2: eqx.nn.BatchNorm

    model = Model(
        eqx.nn.BatchNorm(3, "hi", mode="ema"), eqx.nn.BatchNorm(4, "bye", mode="ema")
    )
    state = eqx.nn.State(model)

    eqx.tree_serialise_leaves(tmp_path, (model, state))

    model2 = Model(
        eqx.nn.BatchNorm(3, "hi", mode="ema"), eqx.nn.BatchNorm(4, "bye", mode="ema")
    )
    state2 = eqx.nn.State(model2)

    eqx.tree_deserialise_leaves(tmp_path, (model2, state2))
