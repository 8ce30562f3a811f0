# Excerpt of Equinox's tests/test_nn.py at v0.13.8 (patrick-kidger/equinox), the tests
# that construct eqx.nn.BatchNorm: test_sequential, test_nested_sequential, test_batch_norm, test_batch_norm_zero_training_steps. Copyright Patrick Kidger
# and the Equinox contributors, Apache-2.0 (LICENSE in this folder). Unchanged;
# written by vendor_equinox_tests.py. conftest.py puts bnjax.equinox.BatchNorm
# in place of eqx.nn.BatchNorm.

import warnings
import equinox as eqx
import jax
import jax.nn as jnn
import jax.numpy as jnp
import jax.random as jrandom
import pytest
from jax._src.dtypes import TypePromotionError


def test_sequential(getkey):
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=getkey()),
            eqx.nn.Linear(4, 1, key=getkey()),
            eqx.nn.BatchNorm(1, axis_name="batch", mode="ema"),
            eqx.nn.Linear(1, 3, key=getkey()),
        ]
    )
    x = jrandom.normal(getkey(), (1, 2))
    batch_seq = jax.vmap(seq, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    state = eqx.nn.State(seq)

    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    # Test indexing
    assert isinstance(seq[0], eqx.nn.Linear)
    assert isinstance(seq[1:], eqx.nn.Sequential)

    x = jrandom.normal(getkey(), (1, 4))
    batch_seq = jax.vmap(
        seq[1:],
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    assert len(seq) == 4
    assert eqx.nn.Sequential(list(seq)) == seq


@pytest.mark.parametrize("inner_stateful", (False, True))
@pytest.mark.parametrize("outer_stateful", (False, True))
def test_nested_sequential(inner_stateful, outer_stateful, getkey):
    def make():
        inner_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(2, 4, key=getkey()),
                eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")
                if inner_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(4, 3, key=getkey()),
            ]
        )
        outer_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(5, 2, key=getkey()),
                inner_seq,
                eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")
                if outer_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(3, 6, key=getkey()),
            ]
        )
        return outer_seq

    x = jrandom.normal(getkey(), (1, 5))
    if inner_stateful or outer_stateful:
        model, state = eqx.nn.make_with_state(make)()
        out, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        assert isinstance(state, eqx.nn.State)
    else:
        model = make()
        out = jax.vmap(model, axis_name="batch")(x)
    assert isinstance(out, jax.Array)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm(getkey, mode):
    x0 = jrandom.uniform(getkey(), (5,))
    x1 = jrandom.uniform(getkey(), (10, 5))
    x2 = jrandom.uniform(getkey(), (10, 5, 6))
    x3 = jrandom.uniform(getkey(), (10, 5, 7, 8))

    # Test that it works with a single vmap'd axis_name

    bn = eqx.nn.BatchNorm(5, "batch", mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    for x in (x1, x2, x3):
        out, state = vbn(x, state)
        assert out.shape == x.shape
        if mode == "ema":
            assert bn.ema_state_index is not None
            running_mean, running_var = state.get(bn.ema_state_index)
        else:
            assert bn.batch_state_index is not None
            running_mean, running_var = state.get(bn.batch_state_index)
        assert running_mean.shape == (5,)
        assert running_var.shape == (5,)

    # Test that it fails without any vmap'd axis_name

    with pytest.raises(NameError):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
    state = eqx.nn.State(bn)

    with pytest.raises(NameError):
        bn(x0, state)
    state = eqx.nn.State(bn)

    # Test that it vmaps with other vmaps without axis_name

    out, state = jax.vmap(
        jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None)),
        in_axes=(0, None),
    )(x2, state)
    assert out.shape == x2.shape
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean, running_var = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean, running_var = state.get(bn.batch_state_index)
    assert running_mean.shape == (10, 5)
    assert running_var.shape == (10, 5)

    # Test that it handles multiple axis_names

    vvbn = eqx.nn.BatchNorm(6, ("batch1", "batch2"), mode=mode)
    vvstate = eqx.nn.State(vvbn)
    for axis_name in ("batch1", "batch2"):
        vvbn = jax.vmap(
            vvbn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
        )
    out, out_vvstate = vvbn(x2, vvstate)
    assert out.shape == x2.shape
    if mode == "ema":
        assert vvbn.ema_state_index is not None
        running_mean, running_var = out_vvstate.get(vvbn.ema_state_index)
    else:
        assert vvbn.batch_state_index is not None
        running_mean, running_var = out_vvstate.get(vvbn.batch_state_index)
    assert running_mean.shape == (6,)
    assert running_var.shape == (6,)

    # Test that it normalises

    x1alt = jrandom.normal(jrandom.PRNGKey(5678), (10, 5))  # avoid flakey test
    bn = eqx.nn.BatchNorm(5, "batch", channelwise_affine=False, mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vbn(x1alt, state)
    true_out = (x1alt - jnp.mean(x1alt, axis=0, keepdims=True)) / jnp.sqrt(
        jnp.var(x1alt, axis=0, keepdims=True) + 1e-5
    )
    assert jnp.allclose(out, true_out)

    # Test that the statistics update during training
    out, state = vbn(x1, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean, running_var = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean, running_var = state.get(bn.batch_state_index)
    out, state = vbn(3 * x1 + 10, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean2, running_var2 = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean2, running_var2 = state.get(bn.batch_state_index)
    assert not jnp.allclose(running_mean, running_mean2)
    assert not jnp.allclose(running_var, running_var2)

    # Test that the statistics don't update at inference

    ibn = eqx.nn.inference_mode(bn, value=True)
    vibn = jax.vmap(ibn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vibn(4 * x1 + 20, state)
    if mode == "ema":
        assert bn.ema_state_index is not None
        running_mean3, running_var3 = state.get(bn.ema_state_index)
    else:
        assert bn.batch_state_index is not None
        running_mean3, running_var3 = state.get(bn.batch_state_index)
    assert jnp.array_equal(running_mean2, running_mean3)
    assert jnp.array_equal(running_var2, running_var3)

    # Test that we can differentiate through it

    @jax.grad
    def f(x):
        out, _ = vbn(x, state)
        return jnp.sum(out)

    f(jrandom.normal(getkey(), (1, 5)))


# https://github.com/patrick-kidger/equinox/issues/1010
def test_batch_norm_zero_training_steps(getkey):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        input_size=3, axis_name="foo", mode="batch", inference=True
    )
    x = jrandom.normal(getkey(), (5, 3))
    out, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
    assert jnp.allclose(x, out)
