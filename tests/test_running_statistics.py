"""Running-statistics options (issue 31 part 5), in the core and the four drop-ins:
the cumulative average (PyTorch's ``momentum=None``), the zero-debiased average
(Haiku's), ``update_stats`` apart from the normalizing statistics, freezing by path,
and a traced momentum. Against float64 NumPy transcriptions of each average, and
against hk.BatchNorm (its debiased averages) and eqx.nn.BatchNorm where they have
the option.

Each test runs its computation under one ``jax.jit`` (eager Flax, Haiku and Equinox
calls compile op by op)."""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.equinox
import bnjax.haiku
import bnjax.linen
import bnjax.nnx
from tests import reference
from tests.samples import normal

pytestmark = pytest.mark.usefixtures("standard_promotion")  # Flax, Haiku, Equinox mix dtypes

STEPS = 5
MOMENTUM = 0.9


def _batches(dtype=np.float32, steps=STEPS):
  """``[steps, 8, 2]``: batches whose statistics drift from step to step."""
  loc = np.arange(steps)[:, None, None] * np.array([1.0, -2.0])
  return normal(0, (steps, 8, 2), loc=loc + [3.0, 0.5], scale=[1.0, 2.0], dtype=dtype)


def _batch_statistics(batches):
  """Each batch's mean and biased variance, float64 ``[steps, C]`` each."""
  stats = [reference.batch_mean_var(np.asarray(b, np.float64), (0,)) for b in batches]
  return np.stack([m.ravel() for m, _ in stats]), np.stack([v.ravel() for _, v in stats])


def cumulative_average(values):
  """The plain mean of the values, ``[steps, C] -> [C]``."""
  return np.mean(values, axis=0)


def debiased_average(values, momentum):
  """Haiku's zero-debiased exponential average: ``hidden = m * hidden + (1 - m) * v``
  from 0, divided by ``1 - m**steps``."""
  hidden = np.zeros(values.shape[1:])
  for value in values:
    hidden = momentum * hidden + (1 - momentum) * value
  return hidden / (1 - momentum ** len(values))


def _core_run(batches, momentum_at):
  """The core over the batches in a ``lax.scan``, the momentum of step ``k`` (a
  traced count) given by ``momentum_at(k)``; from mean 0 and variance 1."""

  def step(state, kx):
    k, x = kx
    _, state = bnjax.batch_norm(x, None, state, training=True, momentum=momentum_at(k))
    return state, None

  state = bnjax.BatchNormState(*(jnp.full(2, v, batches.dtype) for v in (0.0, 1.0)))
  state, _ = jax.lax.scan(step, state, (jnp.arange(len(batches)), batches))
  return state


# --- the weights ------------------------------------------------------------------


def test_the_weights_are_each_rounded_once():
  counts = np.arange(0, 3000, 11)
  cumulative, debiased = jax.jit(
    lambda c: (bnjax.cumulative_momentum(c), bnjax.debiased_momentum(0.999, c))
  )(counts)
  k = counts.astype(np.float64)
  np.testing.assert_allclose(cumulative.old, k / (k + 1), rtol=6e-8)
  np.testing.assert_allclose(cumulative.new, 1 / (k + 1), rtol=6e-8)
  bias_then, bias_now = 1 - 0.999**k, 1 - 0.999 ** (k + 1)
  np.testing.assert_allclose(debiased.old, 0.999 * bias_then / bias_now, rtol=5e-7, atol=1e-30)
  np.testing.assert_allclose(debiased.new, 0.001 / bias_now, rtol=5e-7)
  assert debiased.new[0] == 1 and debiased.old[0] == 0  # the first update replaces


@pytest.mark.parametrize(
  "momentum, error, message",
  [
    (jnp.float32(0.9), TypeError, "needs momentum as a Python number"),
    (1.5, ValueError, r"momentum must be in \[0, 1\]"),
  ],
)
def test_debiased_momentum_refuses_what_it_cannot_debias(momentum, error, message):
  with pytest.raises(error, match=message):
    bnjax.debiased_momentum(momentum, 3)


def test_the_limits_of_debiasing():
  """Momentum 1 is the cumulative average (the limit), momentum 0 the last value."""
  one, cumulative = bnjax.debiased_momentum(1.0, 4), bnjax.cumulative_momentum(4)
  assert (
    (one.old, one.new) == (cumulative.old, cumulative.new) == (np.float32(0.8), np.float32(0.2))
  )
  assert bnjax.debiased_momentum(0.0, 4) == (0.0, 1.0)


# --- the core ---------------------------------------------------------------------


def test_cumulative_momentum_gives_the_mean_of_every_batch():
  batches = _batches()
  state = jax.jit(lambda b: _core_run(b, bnjax.cumulative_momentum))(batches)
  means, variances = _batch_statistics(batches)
  np.testing.assert_allclose(state.mean, cumulative_average(means), rtol=1e-6)
  np.testing.assert_allclose(state.var, cumulative_average(variances), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_debiased_momentum_gives_haikus_averages(request, dtype):
  """The core with ``debiased_momentum`` keeps the debiased average itself; Haiku
  keeps the biased one and divides on reading: the same numbers, float64's to 1e-13."""
  if dtype == np.float64:
    request.getfixturevalue("x64")
  batches = _batches(dtype)

  @jax.jit
  def run(batches):
    state = _core_run(batches, lambda k: bnjax.debiased_momentum(MOMENTUM, k))
    haiku_bn = hk.transform_with_state(lambda x: hk.BatchNorm(False, False, MOMENTUM)(x, True))
    params, haiku_state = haiku_bn.init(None, batches[0])
    for x in batches:
      _, haiku_state = haiku_bn.apply(params, haiku_state, None, x)
    return state, [haiku_state[f"batch_norm/~/{n}_ema"]["average"].ravel() for n in ("mean", "var")]

  state, (haiku_mean, haiku_var) = run(jnp.asarray(batches))
  means, variances = _batch_statistics(batches)
  rtol = 1e-13 if dtype == np.float64 else 1e-6
  np.testing.assert_allclose(state.mean, debiased_average(means, MOMENTUM), rtol=rtol)
  np.testing.assert_allclose(state.var, debiased_average(variances, MOMENTUM), rtol=rtol)
  if dtype == np.float64:  # Haiku's float32 debiasing cancels (test_haiku.py)
    np.testing.assert_allclose(state.mean, haiku_mean, rtol=rtol)
    np.testing.assert_allclose(state.var, haiku_var, rtol=rtol)


def test_a_traced_momentum_compiles_once():
  """A momentum passed as an argument of a jitted step is traced: new values run
  the same program, and each is used as given."""
  x = jnp.asarray(_batches()[0])
  params, state = bnjax.init(2)
  step = jax.jit(lambda x, m: bnjax.batch_norm(x, params, state, training=True, momentum=m)[1])
  (mu,), (var,) = _batch_statistics([x])
  for momentum in (0.5, 0.9, 0.999):
    new = step(x, jnp.float32(momentum))
    m = np.float64(np.float32(momentum))
    np.testing.assert_allclose(new.mean, (1 - m) * mu, rtol=2e-7)
    np.testing.assert_allclose(new.var, m + (1 - m) * var, rtol=2e-7)
  assert step._cache_size() == 1


VARIANTS = {
  "plain": lambda x, state, **kw: bnjax.batch_norm(x, None, state, **kw),
  "ghost": lambda x, state, **kw: bnjax.batch_norm(x, None, state, virtual_batch_size=4, **kw),
  "renorm": lambda x, state, **kw: bnjax.batch_renorm(x, None, state, r_max=2.0, d_max=1.0, **kw),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_stats_separates_updating_from_normalizing(variant):
  """``training`` picks the statistics that normalize, ``update_stats`` whether the
  state moves: each combination against the two ordinary calls."""
  run = VARIANTS[variant]
  x = jnp.asarray(_batches()[0])
  state = bnjax.BatchNormState(jnp.array([1.0, -1.0]), jnp.array([2.0, 0.5]))

  @jax.jit
  def every_combination(x):
    return {
      (training, update): run(x, state, training=training, update_stats=update, momentum=0.8)
      for training in (True, False)
      for update in (True, False)
    }

  results = every_combination(x)
  trained_y, trained_state = results[True, True]
  evaluated_y, _ = results[False, False]
  y, kept = results[True, False]  # the batch's statistics normalize; the state stays
  np.testing.assert_array_equal(y, trained_y)
  jax.tree.map(np.testing.assert_array_equal, kept, state)
  y, moved = results[False, True]  # the state normalizes, and moves
  np.testing.assert_array_equal(y, evaluated_y)
  jax.tree.map(np.testing.assert_array_equal, moved, trained_state)
  assert not np.allclose(moved.mean, state.mean)


def test_update_stats_must_be_a_bool():
  params, state = bnjax.init(2)
  with pytest.raises(TypeError, match="update_stats must be a Python bool"):
    bnjax.batch_norm(jnp.ones((3, 2)), params, state, training=True, update_stats=1)
  with pytest.raises(ValueError, match="has size 0"):  # update_stats needs a batch too
    bnjax.batch_norm(jnp.ones((0, 2)), params, state, training=False, update_stats=True)


# --- the drop-ins -----------------------------------------------------------------


def _linen_run(batches, training=True, update_stats=None, **options):
  """``bnjax.linen.BatchNorm`` over the batches: the last output and ``batch_stats``."""
  options = {"momentum": MOMENTUM, **options}
  layer = bnjax.linen.BatchNorm(
    use_running_average=not training, update_stats=update_stats, **options
  )
  variables = layer.init(jax.random.key(0), batches[0])
  for x in batches:
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return y, dict(variables["batch_stats"])


def _nnx_run(batches, training=True, update_stats=None, **options):
  options = {"momentum": MOMENTUM, **options}
  layer = bnjax.nnx.BatchNorm(2, update_stats=update_stats, rngs=nnx.Rngs(0), **options)
  layer.train() if training else layer.eval()
  for x in batches:
    y = layer(x)
  stats = {"mean": layer.mean[...], "var": layer.var[...]}
  if layer.count is not None:
    stats["count"] = layer.count[...]
  return y, stats


def _haiku_run(batches, training=True, update_stats=None, **options):
  options = {"decay_rate": MOMENTUM, **options}
  bn = bnjax.haiku.BatchNorm  # Haiku's evaluation needs an average: init in training
  layer = hk.transform_with_state(
    lambda x, training: bn(False, False, update_stats=update_stats, **options)(x, training)
  )
  params, state = layer.init(None, batches[0], True)
  for x in batches:
    y, state = layer.apply(params, state, None, x, training)
  stats = {n: state[f"batch_norm/~/{n}_ema"]["average"].ravel() for n in ("mean", "var")}
  return y, {**stats, "count": state["batch_norm/~/mean_ema"]["counter"]}


def _equinox_run(batches, training=True, update_stats=None, **options):
  options = {"momentum": MOMENTUM, **options}
  layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    2, "batch", mode="batch", inference=not training, update_stats=update_stats, **options
  )
  for x in batches:
    y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
  mean, var = state.get(layer.batch_state_index)
  return y, {"mean": mean, "var": var, "count": state.get(layer.batch_counter)}


RUNS = {"linen": _linen_run, "nnx": _nnx_run, "haiku": _haiku_run, "equinox": _equinox_run}
CUMULATIVE = {  # each framework's spelling of the cumulative average
  "linen": dict(momentum=None),
  "nnx": dict(momentum=None),
  "haiku": dict(decay_rate=None),
  "equinox": dict(momentum=None),
}


@pytest.mark.parametrize("framework", RUNS)
def test_each_drop_in_keeps_the_cumulative_average(framework):
  batches = _batches()
  _, stats = jax.jit(lambda b: RUNS[framework](b, **CUMULATIVE[framework]))(jnp.asarray(batches))
  means, variances = _batch_statistics(batches)
  np.testing.assert_allclose(stats["mean"], cumulative_average(means), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], cumulative_average(variances), rtol=1e-6)
  assert stats["count"] == STEPS


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_flax_drop_ins_keep_the_debiased_average(framework):
  """``debias=True``: Haiku's averages (test_debiased_momentum_gives_haikus_averages
  checks the core's against hk.BatchNorm), here against the float64 transcription."""
  batches = _batches()
  _, stats = jax.jit(lambda b: RUNS[framework](b, debias=True))(jnp.asarray(batches))
  means, variances = _batch_statistics(batches)
  np.testing.assert_allclose(stats["mean"], debiased_average(means, MOMENTUM), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], debiased_average(variances, MOMENTUM), rtol=1e-6)
  assert stats["count"] == STEPS


def test_linen_debiased_float64_statistics_are_haikus(x64):
  batches = jnp.asarray(_batches(np.float64))

  @jax.jit
  def run(batches):
    _, stats = _linen_run(batches, debias=True)
    haiku_bn = hk.transform_with_state(lambda x: hk.BatchNorm(False, False, MOMENTUM)(x, True))
    params, state = haiku_bn.init(None, batches[0])
    for x in batches:
      _, state = haiku_bn.apply(params, state, None, x)
    return stats, state["batch_norm/~/mean_ema"]["average"].ravel()

  stats, haiku_mean = run(batches)
  assert stats["mean"].dtype == jnp.float64
  np.testing.assert_allclose(stats["mean"], haiku_mean, rtol=1e-13)


def test_flax_checkpoints_stay_flaxs_without_a_count():
  """The count exists only where an option needs it (shapes traced, not run)."""
  x = jnp.ones((2, 3))

  def variables(**options):
    layer = bnjax.linen.BatchNorm(use_running_average=False, **options)
    return jax.eval_shape(layer.init, jax.random.key(0), x)

  plain, counted = variables(), variables(momentum=None)
  assert set(plain["batch_stats"]) == {"mean", "var"}
  assert set(counted["batch_stats"]) == {"mean", "var", "count"}
  assert set(nnx.state(bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchStat)) == {"mean", "var"}
  with pytest.raises(ValueError, match="momentum=None is the cumulative average"):
    bnjax.nnx.BatchNorm(3, momentum=None, debias=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="only mode='batch' does"):
    bnjax.equinox.BatchNorm(3, "batch", momentum=None, mode="ema")


@pytest.mark.parametrize("framework", RUNS)
def test_each_drop_in_separates_updating_from_normalizing(framework):
  """Over two batches, against the ordinary training run and the float64 reference:
  ``update_stats=False`` in training keeps the state as initialized while the last
  batch is normalized by its own statistics; ``update_stats=True`` in evaluation
  moves the state as training does while the last batch is normalized by the
  statistics the first batch left."""
  batches = jnp.asarray(_batches(steps=2))
  run = RUNS[framework]

  @jax.jit
  def runs(batches):
    return {
      "trained": run(batches),
      "after_one": run(batches[:1]),
      "initial": run(batches, training=False),
      "training_without_update": run(batches, update_stats=False),
      "evaluation_with_update": run(batches, training=False, update_stats=True),
    }

  results = runs(batches)
  last = np.asarray(batches[-1], np.float64)
  y, kept = results["training_without_update"]
  jax.tree.map(np.testing.assert_array_equal, kept, results["initial"][1])
  want, _, _ = reference.forward(last, 1.0, 0.0, 1e-5, (0,))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y, moved = results["evaluation_with_update"]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), moved, results["trained"][1]
  )
  first = {k: np.asarray(v, np.float64) for k, v in results["after_one"][1].items()}
  want = (last - first["mean"]) / np.sqrt(first["var"] + 1e-5)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# --- freezing by path -------------------------------------------------------------


class _Backbone(nnx.Module):
  def __init__(self):
    self.bn = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))


class _NnxModel(nnx.Module):
  """A pretrained ``backbone`` and a new ``head``, each with a BN layer."""

  def __init__(self):
    self.backbone = _Backbone()
    self.head = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.head(self.backbone.bn(x) * 2.0 + 1.0)


def test_freeze_statistics_keeps_the_backbones_in_each_framework():
  """A training step, then the frozen paths put back: the backbone's statistics are
  those before the step, the head's those after it, in a linen ``batch_stats``
  dict, an ``nnx.State`` and a Haiku state (each by its own path names)."""
  x = jnp.asarray(_batches()[0])

  class LinenModel(bnjax.linen.nn.Module):
    @bnjax.linen.nn.compact
    def __call__(self, x):
      x = bnjax.linen.BatchNorm(use_running_average=False, name="backbone")(x)
      return bnjax.linen.BatchNorm(use_running_average=False, name="head")(x * 2.0 + 1.0)

  def haiku_forward(x):
    x = bnjax.haiku.BatchNorm(False, False, 0.9, name="backbone")(x, True)
    return bnjax.haiku.BatchNorm(False, False, 0.9, name="head")(x * 2.0 + 1.0, True)

  @jax.jit
  def steps(x):
    variables = LinenModel().init(jax.random.key(0), x)
    _, updates = LinenModel().apply(variables, x, mutable=["batch_stats"])
    linen = (variables["batch_stats"], updates["batch_stats"])
    model = _NnxModel()
    before = nnx.clone(nnx.state(model, nnx.BatchStat))  # a copy: the call updates in place
    model(x)
    nnx_states = (before, nnx.state(model, nnx.BatchStat))
    haiku = hk.transform_with_state(haiku_forward)
    params, state = haiku.init(None, x)
    _, new_state = haiku.apply(params, state, None, x)
    return linen, nnx_states, (state, new_state)

  for before, after in steps(x):
    kept = _by_path(bnjax.freeze_statistics(after, before, "backbone"))
    before, after = _by_path(before), _by_path(after)
    moved = {path.split("/")[0] for path in kept if not np.array_equal(before[path], after[path])}
    assert moved == {"backbone", "head"}  # the step moved both
    for path, leaf in kept.items():
      want = before[path] if path.startswith("backbone/") else after[path]
      np.testing.assert_array_equal(leaf, want, err_msg=path)


def _by_path(tree) -> dict:
  """``{path_string: leaf}`` of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {bnjax.freeze.path_string(path): leaf for path, leaf in leaves}


def test_freeze_statistics_by_predicate_and_its_errors():
  before = {"a": {"mean": jnp.zeros(1)}, "ab": {"mean": jnp.zeros(1)}}
  after = {"a": {"mean": jnp.ones(1)}, "ab": {"mean": jnp.ones(1)}}
  kept = bnjax.freeze_statistics(after, before, ["a"])  # whole names: not "ab"
  assert (kept["a"]["mean"].tolist(), kept["ab"]["mean"].tolist()) == ([0.0], [1.0])
  kept = bnjax.freeze_statistics(after, before, lambda path: path.endswith("mean"))
  assert kept["ab"]["mean"].tolist() == [0.0]
  with pytest.raises(
    ValueError, match=r"no running statistic under the path 'b'; the tree has \['a', 'ab'\]"
  ):
    bnjax.freeze_statistics(after, before, "b")
  with pytest.raises(ValueError, match="of one structure"):
    bnjax.freeze_statistics(after, {"a": before["a"]}, "a")


def test_linen_takes_a_traced_momentum():
  """A field set inside a compact module may be traced: one program for every
  momentum of a schedule."""

  class Model(bnjax.linen.nn.Module):
    @bnjax.linen.nn.compact
    def __call__(self, x, momentum):
      return bnjax.linen.BatchNorm(use_running_average=False, momentum=momentum)(x)

  x = jnp.asarray(_batches()[0])
  variables = jax.jit(Model().init)(jax.random.key(0), x, 0.5)
  step = jax.jit(lambda v, x, m: Model().apply(v, x, m, mutable=["batch_stats"])[1])
  (mu,), _ = _batch_statistics([x])
  for momentum in (0.5, 0.99):
    stats = step(variables, x, jnp.float32(momentum))["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(
      stats["mean"], (1 - np.float64(np.float32(momentum))) * mu, rtol=2e-7
    )
  assert step._cache_size() == 1


def _micro_batch_steps(batches, micro_batches=2):
  """``[steps, micro_batches * 8, 2]`` batches as ``[steps, micro_batches, 8, 2]``."""
  return batches.reshape(len(batches), micro_batches, -1, batches.shape[-1])


@pytest.mark.parametrize("option", ["cumulative", "debias"])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_counted_averages_under_gradient_accumulation(framework, option):
  """With ``init_pending``, the Flax drop-ins count optimizer steps, not
  micro-batches: after ``STEPS`` steps of two micro-batches each, the averages are
  those of the steps' merged statistics, and ``count`` is ``STEPS``."""
  options = dict(momentum=None) if option == "cumulative" else dict(debias=True)
  steps = _micro_batch_steps(_batches())

  @jax.jit
  def run(steps):
    if framework == "linen":
      layer = bnjax.linen.BatchNorm(use_running_average=False, **{"momentum": MOMENTUM, **options})
      variables = layer.init(jax.random.key(0), steps[0, 0])
      batch_stats = variables["batch_stats"]
      for micro_batches in steps:
        pending = bnjax.linen.init_pending(batch_stats)
        for x in micro_batches:
          _, updates = layer.apply(
            {**variables, "batch_stats": batch_stats, "pending_stats": pending},
            x,
            mutable=["pending_stats"],
          )
          pending = updates["pending_stats"]
        batch_stats, _ = bnjax.linen.apply_pending(batch_stats, pending)
      return dict(batch_stats)
    layer = bnjax.nnx.init_pending(
      bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0), **{"momentum": MOMENTUM, **options})
    )
    for micro_batches in steps:
      for x in micro_batches:
        layer(x)
      bnjax.nnx.apply_pending(layer)
    return {"mean": layer.mean[...], "var": layer.var[...], "count": layer.count[...]}

  stats = run(jnp.asarray(steps))
  means, variances = _batch_statistics(steps.reshape(len(steps), -1, 2))  # each step whole
  average = cumulative_average if option == "cumulative" else debiased_average
  args = () if option == "cumulative" else (MOMENTUM,)
  np.testing.assert_allclose(stats["mean"], average(means, *args), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], average(variances, *args), rtol=1e-6)
  assert stats["count"] == STEPS
