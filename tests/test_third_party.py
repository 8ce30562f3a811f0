"""bnjax inside models someone else wrote (issue 31): each framework's hook
(``bnjax.haiku.replace_batch_norm``, ``bnjax.linen.replace_batch_norm``,
``bnjax.nnx.replace_batch_norm``, ``bnjax.equinox.replace_batch_norm``) and each
model's own ``norm`` argument, against the same model with the framework's own
batch norm, in float64: the same parameter and state trees, and after two SGD steps
the same outputs, gradients, running statistics and evaluation outputs.

The models are small, written as their authors would (a layer class hard-coded, or
taken as an argument), apart from Haiku's own ``hk.nets.ResNet18`` (slow: a real
network compiled twice in float64). Flax's and Haiku's batch norms compute the
variance as ``E[x^2] - E[x]^2``, inexact by far less than the tolerances here in
float64 at these offsets.
"""

from __future__ import annotations

import functools

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import bnjax.equinox
import bnjax.haiku
import bnjax.linen
import bnjax.nnx
from tests.samples import normal

STEPS, N, C = 2, 6, 3
MOMENTUM = 0.875  # a binary fraction: exact in float32 and float64
BATCHES = normal(41, (STEPS, N, C), loc=[1.0, -2.0, 3.0], scale=[1.0, 2.0, 0.5], dtype=np.float64)
WEIGHTS = normal(42, (N, 2), dtype=np.float64)  # the loss is sum(y * WEIGHTS)


@pytest.fixture(autouse=True)
def _float64(x64):
  """Every model runs in float64."""


# Flax's and Haiku's own layers mix dtypes implicitly, which the suite's strict mode forbids.
pytestmark = pytest.mark.usefixtures("standard_promotion")


def train(apply, evaluate, params, state, batches=BATCHES, weights=WEIGHTS, learning_rate=0.1):
  """``STEPS`` SGD steps of ``apply(params, state, x) -> (y, state)`` on ``batches``,
  in one program: each step's outputs and gradients, the final params and state,
  and ``evaluate(params, state, batches[0])`` after training."""

  def run(params, state, batches, weights):
    def step(carry, x):
      params, state = carry

      def loss(params, state):  # the state an argument: nnx merges Variables of this trace
        y, new_state = apply(params, state, x)
        return jnp.sum(y * weights), (y, new_state)

      grads, (y, state) = jax.grad(loss, has_aux=True)(params, state)
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return (params, state), (y, grads)

    (params, state), (outputs, grads) = jax.lax.scan(step, (params, state), batches)
    evaluation = evaluate(params, state, batches[0])
    return {
      "outputs": outputs,
      "gradients": grads,
      "state": state,
      "evaluation": evaluation,
      "params": params,
    }

  return jax.jit(run)(params, state, jnp.asarray(batches), jnp.asarray(weights))


def rtol(tree) -> float:
  """1e-9 where every leaf is float64 (or an int32 counter); 1e-5 where a float32
  one (nnx's BatchStats, Flax's and bnjax's alike) holds digits back."""
  dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)}
  return 1e-9 if dtypes <= {jnp.dtype(jnp.float64), jnp.dtype(jnp.int32)} else 1e-5


def assert_same(ours, theirs, what: str, tolerance: float | None = None):
  """The same leaves at the same paths (the classes along them may differ: a
  module replaced), of the same shapes, with values to ``rtol`` of ``ours``'s
  dtypes (or ``tolerance``), relative to the largest value of the tree (a gradient
  that is 0 in exact arithmetic, such as a bias's before batch norm, is rounding)."""
  ours, theirs = (
    {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    for tree in (ours, theirs)
  )
  assert list(ours) == list(theirs), what
  assert {k: jnp.shape(v) for k, v in ours.items()} == {k: jnp.shape(v) for k, v in theirs.items()}
  tolerance = tolerance or rtol(ours)
  scale = max(np.abs(np.asarray(b, np.float64)).max() for b in theirs.values())
  for path, leaf in ours.items():
    np.testing.assert_allclose(
      np.asarray(leaf, np.float64),
      np.asarray(theirs[path], np.float64),
      rtol=0,
      atol=tolerance * scale,
      err_msg=f"{what}: {path}",
    )


def assert_same_training(ours, theirs):
  """Outputs and gradients to 1e-9; the state and the evaluation as the state's dtype allows."""
  for what in ("outputs", "gradients"):
    assert_same(ours[what], theirs[what], what)
  assert_same(ours["state"], theirs["state"], "state")
  assert_same(ours["evaluation"], theirs["evaluation"], "evaluation", rtol(ours["state"]))


# Haiku: the hook intercepts every hk.BatchNorm call -----------------------------------


def haiku_trained(network, replaced: bool, batches=BATCHES, weights=WEIGHTS, learning_rate=0.1):
  """``network()`` (a Haiku module of ``(x, is_training)``), with ``hk.BatchNorm`` or,
  ``replaced``, bnjax; its initial params and state, and ``train``'s results."""

  def forward(x, is_training):
    if not replaced:
      return network()(x, is_training)
    with bnjax.haiku.replace_batch_norm():
      return network()(x, is_training)

  model = hk.transform_with_state(forward)
  params, state = jax.jit(functools.partial(model.init, is_training=True))(
    jax.random.key(0), jnp.asarray(batches[0])
  )
  results = train(
    lambda p, s, x: model.apply(p, s, None, x, True),
    lambda p, s, x: model.apply(p, s, None, x, False)[0],
    params,
    state,
    batches,
    weights,
    learning_rate,
  )
  return (params, state), results


class HaikuMLP(hk.Module):
  """A small model that hard-codes ``hk.BatchNorm`` (one of them channels-first
  over a ``[N, C, L]`` input, one without an offset)."""

  def __call__(self, x, is_training):
    x = hk.Linear(4)(x)
    x = hk.BatchNorm(True, True, MOMENTUM)(x, is_training)
    x = jax.nn.relu(x).reshape(x.shape[0], 2, 2)
    x = hk.BatchNorm(True, False, MOMENTUM, data_format="channels_first")(x, is_training)
    return hk.Linear(2)(x.reshape(x.shape[0], 4))


def test_haiku_hook_runs_bnjax_in_a_model_that_hard_codes_hk_batch_norm():
  (init, ours), (their_init, theirs) = (haiku_trained(HaikuMLP, r) for r in (True, False))
  assert_same(init, their_init, "init")  # the same names and shapes; init moved the averages
  assert_same_training(ours, theirs)
  assert sorted(ours["state"]) == [
    "haiku_mlp/batch_norm/~/mean_ema",
    "haiku_mlp/batch_norm/~/var_ema",
    "haiku_mlp/batch_norm_1/~/mean_ema",
    "haiku_mlp/batch_norm_1/~/var_ema",
  ]


def test_haiku_hook_decorates_the_function_to_transform():
  @bnjax.haiku.replace_batch_norm()
  def forward(x):
    return hk.BatchNorm(True, True, MOMENTUM, name="bn")(x, is_training=True)

  model = hk.transform_with_state(forward)
  x = BATCHES[0]
  params, state = model.init(None, jnp.asarray(x))
  # bnjax's variance: exact where Haiku's E[x^2] - E[x]^2 loses every digit at 1e9.
  y, _ = jax.jit(model.apply)(params, state, None, jnp.asarray(1e9 + x))
  want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ResNet-18 compiled twice in float64: a minute or more on 2 cores
def test_haiku_hook_in_hk_nets_resnet18():
  # One step: batches of two examples leave the last layers two values per statistic,
  # and a second step amplifies Haiku's E[x^2] - E[x]^2 rounding past any tolerance.
  batches = normal(43, (1, 2, 16, 16, 3), loc=1.0, dtype=np.float64)
  weights = normal(44, (2, 4), dtype=np.float64)
  network = functools.partial(hk.nets.ResNet18, 4, bn_config={"decay_rate": MOMENTUM})
  # A step small against the gradients (1e6: the last layers normalize two values).
  (init, ours), (their_init, theirs) = (
    haiku_trained(network, r, batches, weights, 1e-6) for r in (True, False)
  )
  assert_same(init, their_init, "init", 1e-5)
  for what in ("outputs", "gradients"):  # 20 layers of Haiku's E[x^2] - E[x]^2: 1e-8
    assert_same(ours[what], theirs[what], what, 1e-7)
  assert_same(ours["state"], theirs["state"], "state", 1e-5)
  assert_same(ours["evaluation"], theirs["evaluation"], "evaluation", 1e-5)


# flax.linen: a norm argument takes bnjax's class; the hook intercepts the rest ------


def linen_trained(module):
  """``train``'s results for a linen ``module(x, train)`` with ``batch_stats``, and its
  initial variables."""
  variables = jax.jit(functools.partial(module.init, train=False))(
    jax.random.key(0), jnp.asarray(BATCHES[0])
  )
  # float32 at first, as Flax's; float64 after a step on float64 inputs (as Flax's):
  # the training loop's carry needs the one dtype.
  variables["batch_stats"] = jax.tree.map(lambda a: a.astype(jnp.float64), variables["batch_stats"])

  def apply(params, batch_stats, x):
    y, updates = module.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return y, updates["batch_stats"]

  def evaluate(params, batch_stats, x):
    return module.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  return variables, train(apply, evaluate, variables["params"], variables["batch_stats"])


class LinenWithNorm(nn.Module):
  """A model that takes its normalization class, as Flax's examples and
  jax-resnet do (``norm=functools.partial(nn.BatchNorm, ...)``)."""

  norm: type = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(self.norm, use_running_average=not train, momentum=MOMENTUM)
    x = nn.relu(norm()(nn.Dense(4)(x)))
    x = norm(use_bias=False)(nn.Dense(4)(x))
    return nn.Dense(2)(x)


class LinenHardCoded(nn.Module):
  """A model that hard-codes ``nn.BatchNorm`` (in a submodule, and in ``setup``)."""

  def setup(self):
    self.dense = nn.Dense(4)
    self.norm = nn.BatchNorm(momentum=MOMENTUM, axis=1)
    self.head = LinenWithNorm()

  def __call__(self, x, train: bool):
    x = self.norm(self.dense(x).reshape(-1, 2, 2), use_running_average=not train)
    return self.head(nn.relu(x).reshape(-1, 4), train)


def test_linen_model_with_a_norm_argument_takes_bnjax():
  (init, ours), (their_init, theirs) = (
    linen_trained(LinenWithNorm(norm)) for norm in (bnjax.linen.BatchNorm, nn.BatchNorm)
  )
  assert_same(init, their_init, "init", 1e-15)
  assert_same_training(ours, theirs)


def test_linen_hook_runs_bnjax_in_a_model_that_hard_codes_nn_batch_norm():
  theirs_init, theirs = linen_trained(LinenHardCoded())
  with bnjax.linen.replace_batch_norm():
    init, ours = linen_trained(LinenHardCoded())
  assert_same(init, theirs_init, "init", 1e-15)
  assert_same_training(ours, theirs)
  # bnjax's variance, exact where Flax's E[x^2] - E[x]^2 loses every digit at 1e9.
  layer = nn.BatchNorm(use_running_average=False)
  x = BATCHES[0]
  with bnjax.linen.replace_batch_norm():
    y, _ = jax.jit(lambda x: layer.apply(layer.init(jax.random.key(0), x), x, mutable=True))(
      jnp.asarray(1e9 + x)
    )
  np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-6, atol=1e-6)


def test_linen_hook_decorates_a_step_and_passes_bnjax_options():
  layer = nn.BatchNorm(use_running_average=False, momentum=0.0)

  @jax.jit
  @bnjax.linen.replace_batch_norm(unbiased_variance=True)
  def step(x):
    return layer.apply(layer.init(jax.random.key(0), x), x, mutable=True)[1]["batch_stats"]

  np.testing.assert_allclose(step(jnp.asarray(BATCHES[0]))["var"], BATCHES[0].var(0, ddof=1))
  with pytest.raises(TypeError, match="takes bnjax.s own options"):
    bnjax.linen.replace_batch_norm(momentum=0.5)


# flax.nnx: graph surgery on the model ----------------------------------------------


def nnx_trained(model):
  """``train``'s results for an nnx ``model`` (``.train()``/``.eval()`` modes), and
  its initial state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)  # Variables of this trace
    y = model(x)
    return y, nnx.split(model, nnx.Param, ...)[2]

  def evaluate(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return model(x)

  return (params, rest), train(apply, evaluate, params, rest)


class NnxHardCoded(nnx.Module):
  """A model that hard-codes ``nnx.BatchNorm``: in an ``nnx.List``, and one layer
  shared by two paths."""

  def __init__(self, rngs):
    self.layers = nnx.List(
      [nnx.Linear(C, 4, rngs=rngs), nnx.BatchNorm(4, momentum=MOMENTUM, rngs=rngs)]
    )
    self.shared = self.layers[1]
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.layers[1](self.layers[0](x)))
    return self.head(x)


class NnxWithNorm(nnx.Module):
  """A model that takes its normalization class (``norm=``)."""

  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(C, 4, rngs=rngs)
    self.norm = norm(4, momentum=MOMENTUM, use_scale=False, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.linear(x))))


# Flax's nnx.BatchNorm stores float64 statistics into its float32 BatchStats.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_nnx_model_with_a_norm_argument_takes_bnjax():
  (init, ours), (their_init, theirs) = (
    nnx_trained(NnxWithNorm(norm, nnx.Rngs(0))) for norm in (bnjax.nnx.BatchNorm, nnx.BatchNorm)
  )
  assert_same(init, their_init, "init", 1e-15)
  assert_same_training(ours, theirs)


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_nnx_replace_batch_norm_swaps_every_layer_in_place():
  model = NnxHardCoded(nnx.Rngs(0))
  their_init, theirs = nnx_trained(NnxHardCoded(nnx.Rngs(0)))
  mean = model.layers[1].mean
  assert bnjax.nnx.replace_batch_norm(model) is model
  assert not [n for _, n in nnx.iter_graph(model) if type(n) is nnx.BatchNorm]
  assert type(model.layers[1]) is bnjax.nnx.BatchNorm and model.shared is model.layers[1]
  assert model.layers[1].mean is mean and model.layers[1].momentum == MOMENTUM  # its Variables
  init, ours = nnx_trained(model)
  assert_same(init, their_init, "init", 1e-15)
  assert_same_training(ours, theirs)


def test_nnx_replace_batch_norm_of_a_layer_and_its_refusals():
  layer = nnx.BatchNorm(2, use_scale=False, rngs=nnx.Rngs(0))
  replaced = bnjax.nnx.replace_batch_norm(layer, virtual_batch_size=3)
  assert replaced.scale is None and replaced.bias is layer.bias
  assert replaced.virtual_batch_size == 3
  with pytest.raises(TypeError, match="takes bnjax.s own options"):
    bnjax.nnx.replace_batch_norm(layer, momentum=0.5)

  class InTuple(nnx.Module):
    def __init__(self):
      self.layers = nnx.data((nnx.BatchNorm(2, rngs=nnx.Rngs(0)),))

  with pytest.raises(TypeError, match=r"at layers/0: it sits in a tuple.*nnx.List"):
    bnjax.nnx.replace_batch_norm(InTuple())


# Equinox: eqx.tree_at swaps the layer and keeps its state's keys --------------------


class EqxHardCoded(eqx.Module):
  """Equinox's stateful example, as written: ``eqx.nn.BatchNorm`` hard-coded, and
  a ``SpectralNorm`` whose state must come through."""

  linear: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  spectral: eqx.nn.SpectralNorm
  head: eqx.nn.Linear

  def __init__(self, mode):
    keys = jax.random.split(jax.random.key(0), 4)
    self.linear = eqx.nn.Linear(C, 4, key=keys[0])
    self.norm = eqx.nn.BatchNorm(4, "batch", momentum=MOMENTUM, mode=mode)
    self.spectral = eqx.nn.SpectralNorm(eqx.nn.Linear(4, 4, key=keys[1]), "weight", key=keys[2])
    self.head = eqx.nn.Linear(4, 2, key=keys[3])

  def __call__(self, x, state):
    x, state = self.norm(self.linear(x), state)
    x, state = self.spectral(jax.nn.relu(x), state)
    return self.head(x), state


def eqx_trained(model, state, batches=BATCHES):
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def apply(params, state, x):
    model = eqx.combine(params, static)
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

  def evaluate(params, state, x):
    model = eqx.nn.inference_mode(eqx.combine(params, static))
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)[0]

  return train(apply, evaluate, params, state, batches)


def eqx_statistics(layer, state):
  """The running statistics a layer normalizes with in inference."""
  if type(layer) is bnjax.equinox.BatchNorm or layer.mode == "ema":
    index = layer.ema_state_index if layer.mode == "ema" else layer.batch_state_index
    return state.get(index)
  steps, (mean, var) = state.get(layer.batch_counter), state.get(layer.batch_state_index)
  debias = 1 - MOMENTUM**steps  # Equinox's inference divides its hidden state so
  return mean / debias, var / debias


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_replace_batch_norm_in_a_model_that_hard_codes_it(mode):
  model, state = eqx.nn.make_with_state(EqxHardCoded)(mode)
  ours_model, ours_state = bnjax.equinox.replace_batch_norm(
    *eqx.nn.make_with_state(EqxHardCoded)(mode)
  )
  assert type(ours_model.norm) is bnjax.equinox.BatchNorm
  assert ours_model.norm.batch_state_index == model.norm.batch_state_index  # the same keys
  theirs = eqx_trained(model, state)
  ours = eqx_trained(ours_model, ours_state)
  for what in ("outputs", "gradients"):
    assert_same(ours[what], theirs[what], what)
  ours_mean, ours_var = eqx_statistics(ours_model.norm, ours["state"])
  their_mean, their_var = eqx_statistics(model.norm, theirs["state"])
  assert_same(ours_mean, their_mean, "running mean")
  assert_same(
    ours["state"].get(model.spectral.uv_index), theirs["state"].get(model.spectral.uv_index), "u, v"
  )
  if mode == "ema":  # in "batch" mode bnjax's variance is exact where Equinox's starts biased
    assert_same(ours_var, their_var, "running var")
    assert_same(ours["evaluation"], theirs["evaluation"], "evaluation")


def test_equinox_replace_batch_norm_of_a_trained_model_keeps_its_inference():
  """In "batch" mode the state becomes Equinox's inference statistics: the model
  evaluates the same at once, and after more training steps still does."""
  model, state = eqx.nn.make_with_state(EqxHardCoded)("batch")
  trained = eqx_trained(model, state)
  static = eqx.partition(model, eqx.is_inexact_array)[1]
  model = eqx.combine(trained["params"], static)
  state = trained["state"]
  copy = jax.tree.map(lambda leaf: leaf, state)  # replace_batch_norm uses its state up
  ours_model, ours_state = bnjax.equinox.replace_batch_norm(model, copy)
  evaluate = eqx.filter_jit(
    lambda model, state, x: jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None))(x, state)[0]
  )
  x = jnp.asarray(BATCHES[0])
  assert_same(evaluate(ours_model, ours_state, x), evaluate(model, state, x), "evaluation")
  more = BATCHES[::-1] * 2.0 + 1.0
  ours, theirs = eqx_trained(ours_model, ours_state, more), eqx_trained(model, state, more)
  for what in ("outputs", "gradients", "evaluation"):
    assert_same(ours[what], theirs[what], what)
  for ours_statistic, their_statistic in zip(
    eqx_statistics(ours_model.norm, ours["state"]),
    eqx_statistics(model.norm, theirs["state"]),
    strict=True,
  ):
    assert_same(ours_statistic, their_statistic, "inference statistics")
