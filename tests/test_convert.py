"""bnjax.convert against the source frameworks' own numbers.

PyTorch: its BatchNorm{1,2,3}d and SyncBatchNorm outputs and state_dicts over a few
training steps and an evaluation, recorded once in tests/fixtures/torch_batch_norm.npz
by tests/fixtures/make_torch_batch_norm.py (torch 2.13.0), so the suite needs no
PyTorch. Keras: its BatchNormalization on the JAX backend, in a subprocess
(tests/keras_reference.py; Keras's backend is chosen at its first import). Haiku:
hk.BatchNorm in this process. Float64 cases are compared to 1e-12 (the momentum
0.25 and 0 of those cases are exact in float32 as well), float32 cases to a few
float32 roundings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import convert
from tests import ROOT
from tests.processes import child_env

FIXTURE = np.load(ROOT / "tests" / "fixtures" / "torch_batch_norm.npz")
TORCH_CASES = sorted({k.split("/")[0] for k in FIXTURE.files if "/" in k})
TRAINED_CASES = [c for c in TORCH_CASES if f"{c}/x0" in FIXTURE.files]


def torch_case(case: str) -> dict:
  return {k.split("/", 1)[1]: FIXTURE[k] for k in FIXTURE.files if k.startswith(case + "/")}


def torch_entries(data: dict, step: str) -> dict:
  return {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(step + "/")}


def tolerance(dtype) -> dict:
  return {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 3e-6, "atol": 3e-6}


def settings(data: dict) -> dict:
  momentum = float(data["momentum"])
  return {"momentum": None if np.isnan(momentum) else momentum, "eps": float(data["eps"])}


def test_the_fixture_says_which_torch_made_it():
  assert str(FIXTURE["torch_version"]).startswith("2.13.0")
  assert set(TORCH_CASES) - set(TRAINED_CASES) == {"sync_eval_float32"}


@pytest.mark.parametrize("case", TRAINED_CASES)
def test_training_steps_and_evaluation_match_pytorch(case, x64):
  data = torch_case(case)
  dtype = data["x0"].dtype
  params, state, options = convert.from_torch(torch_entries(data, "initial"), **settings(data))
  assert options["unbiased_variance"] and options["axis"] == 1
  tracked = int(data["initial/num_batches_tracked"])
  step = jax.jit(
    lambda x, p, s, m: bnjax.batch_norm(x, p, s, training=True, **{**options, "momentum": m})
  )
  for i in range(3):
    momentum = convert.torch_momentum(settings(data)["momentum"], tracked + i)
    y, state = step(data[f"x{i}"], params, state, momentum)
    expected = torch_entries(data, f"step{i}")
    np.testing.assert_allclose(y, data[f"y{i}"], **tolerance(dtype))
    np.testing.assert_allclose(state.mean, expected["running_mean"], **tolerance(dtype))
    np.testing.assert_allclose(state.var, expected["running_var"], **tolerance(dtype))
    assert state.mean.dtype == dtype
  y, _ = bnjax.batch_norm(data["eval_x"], params, state, training=False, **options)
  np.testing.assert_allclose(y, data["eval_y"], **tolerance(dtype))


def test_a_state_dict_goes_back_unchanged(x64):
  for case in TORCH_CASES:
    data = torch_case(case)
    for step in ("initial", "step2") if f"{case}/x0" in FIXTURE.files else ("initial",):
      entries = {f"model.bn.{k}": v for k, v in torch_entries(data, step).items()}
      params, state, _ = convert.from_torch(entries, "model.bn.", **settings(data))
      tracked = int(entries["model.bn.num_batches_tracked"])
      back, torch_settings = convert.to_torch(
        params,
        state,
        "model.bn.",
        momentum=convert.torch_momentum(settings(data)["momentum"] or 0.1),
        epsilon=settings(data)["eps"],
        num_batches_tracked=tracked,
      )
      assert back.keys() == entries.keys(), case
      for name, value in entries.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value)
      assert torch_settings["eps"] == settings(data)["eps"]
      assert torch_settings["momentum"] == pytest.approx(settings(data)["momentum"] or 0.1)


def test_sync_batch_norm_entries_are_batch_norms():
  data = torch_case("sync_eval_float32")
  params, state, options = convert.from_torch(torch_entries(data, "initial"), **settings(data))
  y, _ = bnjax.batch_norm(data["eval_x"], params, state, training=False, **options)
  np.testing.assert_allclose(y, data["eval_y"], **tolerance(np.float32))


def test_the_options_fit_the_flax_drop_ins():
  """A PyTorch NCHW layer in bnjax.linen: Flax's variable names are the fields'."""
  from bnjax import linen as bn

  data = torch_case("sync_eval_float32")
  params, state, options = convert.from_torch(torch_entries(data, "initial"), **settings(data))
  layer = bn.BatchNorm(use_running_average=True, **options)
  variables = {"params": params._asdict(), "batch_stats": state._asdict()}
  np.testing.assert_allclose(
    layer.apply(variables, data["eval_x"]), data["eval_y"], **tolerance(np.float32)
  )


class _Tensor:
  """What convert reads of a torch.Tensor: detach(), cpu(), numpy()."""

  def __init__(self, array):
    self.array = array

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.array


def test_tensors_are_read_as_state_dict_values_are():
  entries = torch_entries(torch_case("bn1d_float32"), "initial")
  as_tensors = {k: _Tensor(v) if v.ndim else v for k, v in entries.items()}
  expected = convert.from_torch(entries)
  got = convert.from_torch(as_tensors)
  assert jax.tree.all(jax.tree.map(np.array_equal, got.state, expected.state))
  assert jax.tree.all(jax.tree.map(np.array_equal, got.params, expected.params))


def test_the_cumulative_momentum_may_be_traced():
  counts = jnp.arange(4)
  momenta = jax.jit(jax.vmap(lambda k: convert.torch_momentum(None, k)))(counts)
  np.testing.assert_allclose(momenta, [0.0, 1 / 2, 2 / 3, 3 / 4], rtol=1e-7)
  assert convert.torch_momentum(0.0) == 1.0  # PyTorch's 0: no update


@pytest.mark.parametrize(
  "call, error, message",
  [
    (lambda e: convert.from_torch({"weight": e["weight"], "bias": e["bias"]}), KeyError, "track"),
    (lambda e: convert.from_torch({**e, "bias": e["bias"][:2]}), ValueError, "length"),
    (lambda e: convert.from_torch({k: v for k, v in e.items() if k != "bias"}), KeyError, "bias"),
    (lambda e: convert.from_torch(e, momentum=1.5), ValueError, "momentum"),
    (lambda e: convert.from_torch(e, eps=0.0), ValueError, "eps"),
    (lambda e: convert.torch_momentum(None, -1), ValueError, "num_batches_tracked"),
  ],
)
def test_bad_entries_are_refused_by_name(call, error, message):
  entries = torch_entries(torch_case("bn1d_float32"), "initial")
  with pytest.raises(error, match=message):
    call(entries)


def test_to_torch_refuses_half_an_affine_transform():
  params, state = bnjax.init(3)
  with pytest.raises(ValueError, match="weight and a bias"):
    convert.to_torch(params._replace(bias=None), state)
  entries, _ = convert.to_torch(None, state)
  assert sorted(entries) == ["num_batches_tracked", "running_mean", "running_var"]


# ---- Keras ----------------------------------------------------------------------------


# Keras computes in float32, with its own (exact) variance: a few float32 roundings.
KERAS_TOLERANCE = {"rtol": 3e-6, "atol": 1e-6}


def keras_reference(cases: dict, tmp_path) -> dict:
  """Keras's outputs for ``cases`` (see tests/keras_reference.py), in a subprocess."""
  source, target = tmp_path / "in.npz", tmp_path / "out.npz"
  np.savez(source, **cases)
  result = subprocess.run(
    [sys.executable, "-m", "tests.keras_reference", str(source), str(target)],
    cwd=ROOT,
    env=child_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(target))


def keras_case(rng, name: str, shape, layer_settings: dict, weights: list, steps: int = 3) -> dict:
  offsets = rng.normal(size=shape[layer_settings.get("axis", -1)]) * 3
  axis = layer_settings.get("axis", -1) % len(shape)
  broadcast = [1] * len(shape)
  broadcast[axis] = -1

  scales = rng.uniform(0.5, 2, shape[axis]).reshape(broadcast)

  def batch():
    return (rng.normal(size=shape) * scales + offsets.reshape(broadcast)).astype(np.float32)

  case = {f"{name}/settings": np.array(json.dumps(layer_settings))}
  case |= {f"{name}/weight{j}": w.astype(np.float32) for j, w in enumerate(weights)}
  case |= {f"{name}/x{i}": batch() for i in range(steps)}
  return case | {f"{name}/eval_x": batch()}


@pytest.mark.slow  # a subprocess importing Keras: about 10 s
def test_keras_both_ways(tmp_path):
  rng = np.random.default_rng(3)
  weights = [rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(1, 3, 4)]
  layer_settings = {"axis": 1, "momentum": 0.9, "epsilon": 1e-3}  # NCHW, Keras's epsilon
  cases = keras_case(rng, "from_nchw", (6, 4, 3, 3), layer_settings, weights)
  no_scale = {"momentum": 0.75, "scale": False, "center": True}
  cases |= keras_case(rng, "from_no_gamma", (16, 4), no_scale, weights[1:])
  params = bnjax.BatchNormParams(jnp.asarray(weights[0]), jnp.asarray(weights[1]))
  state = bnjax.BatchNormState(jnp.asarray(weights[2]), jnp.asarray(weights[3]))
  to_weights, to_settings = convert.to_keras(params, state, momentum=0.9)
  cases |= keras_case(rng, "to", (8, 4), to_settings, to_weights, steps=1)
  keras = keras_reference(cases, tmp_path)

  for name, spec in [("from_nchw", layer_settings), ("from_no_gamma", no_scale)]:
    weights_in = [cases[k] for k in sorted(cases) if k.startswith(f"{name}/weight")]
    params, state, options = convert.from_keras(weights_in, **spec)
    assert options["unbiased_variance"] is False
    moving = len(weights_in) - 2  # moving_mean's index in Keras's list
    for i in range(3):
      y, state = bnjax.batch_norm(cases[f"{name}/x{i}"], params, state, training=True, **options)
      np.testing.assert_allclose(y, keras[f"{name}/y{i}"], **KERAS_TOLERANCE)
      np.testing.assert_allclose(
        state.mean, keras[f"{name}/step{i}/weight{moving}"], **KERAS_TOLERANCE
      )
      np.testing.assert_allclose(
        state.var, keras[f"{name}/step{i}/weight{moving + 1}"], **KERAS_TOLERANCE
      )
    y, _ = bnjax.batch_norm(cases[f"{name}/eval_x"], params, state, training=False, **options)
    np.testing.assert_allclose(y, keras[f"{name}/eval_y"], **KERAS_TOLERANCE)

  # bnjax -> Keras: the layer built from to_keras's settings computes what bnjax does.
  bn_params = bnjax.BatchNormParams(jnp.asarray(weights[0]), jnp.asarray(weights[1]))
  bn_state = bnjax.BatchNormState(jnp.asarray(weights[2]), jnp.asarray(weights[3]))
  assert to_settings["epsilon"] == 1e-5  # bnjax's, not Keras's default 1e-3
  y, moved = bnjax.batch_norm(cases["to/x0"], bn_params, bn_state, training=True, momentum=0.9)
  np.testing.assert_allclose(y, keras["to/y0"], **KERAS_TOLERANCE)
  np.testing.assert_allclose(moved.mean, keras["to/step0/weight2"], **KERAS_TOLERANCE)
  np.testing.assert_allclose(moved.var, keras["to/step0/weight3"], **KERAS_TOLERANCE)
  y, _ = bnjax.batch_norm(cases["to/eval_x"], bn_params, moved, training=False)
  np.testing.assert_allclose(y, keras["to/eval_y"], **KERAS_TOLERANCE)


# ---- Haiku ----------------------------------------------------------------------------


def haiku_layer(data_format: str):
  import haiku as hk

  def forward(x, is_training):
    layer = hk.BatchNorm(True, True, 0.9, data_format=data_format, name="bn")
    return layer(x, is_training=is_training)

  return hk.without_apply_rng(hk.transform_with_state(forward))


def haiku_batches(rng, shape, count):
  offsets = rng.normal(size=(1, shape[1], 1, 1)) * 3
  return [(rng.normal(size=shape) + offsets).astype(np.float32) for _ in range(count)]


# Haiku's training variance is E[x^2] - E[x]^2 in float32, bnjax's the exact one.
HAIKU_TOLERANCE = {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.usefixtures("standard_promotion")  # Haiku mixes dtypes
def test_haiku_debiased_averages_continue_in_bnjax():
  model = haiku_layer("channels_first")  # NCHW
  batches = haiku_batches(np.random.default_rng(5), (8, 3, 2, 2), 4)
  hk_params, hk_state = model.init(None, batches[0], is_training=True)
  hk_params = {"bn": {"scale": hk_params["bn"]["scale"] * 1.5, "offset": hk_params["bn"]["offset"]}}
  layer = {"decay_rate": 0.9, "data_format": "channels_first"}
  params, state, options = convert.from_haiku(hk_params, hk_state, "bn", **layer)
  assert options["axis"] == 1 and options["momentum"] == 0.0  # the first average is the batch's
  for i, x in enumerate(batches[:3]):
    y_haiku, hk_state = model.apply(hk_params, hk_state, x, is_training=True)
    momentum = convert.haiku_momentum(0.9, i)
    y, state = bnjax.batch_norm(
      x, params, state, training=True, **{**options, "momentum": momentum}
    )
    np.testing.assert_allclose(y, y_haiku, **HAIKU_TOLERANCE)
    for value, ema in zip(state, ("mean_ema", "var_ema"), strict=True):
      np.testing.assert_allclose(value, hk_state[f"bn/~/{ema}"]["average"].ravel(), rtol=2e-5)
  converted = convert.from_haiku(hk_params, hk_state, "bn", **layer)
  assert converted.options["momentum"] == convert.haiku_momentum(0.9, 3)
  y_haiku, _ = model.apply(hk_params, hk_state, batches[3], is_training=False)
  y, _ = bnjax.batch_norm(batches[3], converted.params, converted.state, training=False, **options)
  np.testing.assert_allclose(y, y_haiku, rtol=1e-6, atol=1e-6)  # evaluation: the same formula


@pytest.mark.usefixtures("standard_promotion")
def test_a_bnjax_state_continues_in_haiku():
  model = haiku_layer("channels_last")
  rng = np.random.default_rng(6)
  batches = [b.transpose(0, 2, 3, 1) for b in haiku_batches(rng, (8, 3, 2, 2), 3)]  # NHWC
  params = bnjax.BatchNormParams(jnp.asarray([1.5, 0.5, 2.0]), jnp.asarray([0.1, -0.2, 0.3]))
  state = bnjax.BatchNormState(jnp.asarray([1.0, -2.0, 3.0]), jnp.asarray([2.0, 0.5, 4.0]))
  hk_params, hk_state = convert.to_haiku(params, state, "bn", shape=(1, 1, 1, 3), decay_rate=0.9)
  y_haiku, _ = model.apply(hk_params, hk_state, batches[0], is_training=False)
  y, _ = bnjax.batch_norm(batches[0], params, state, training=False)
  np.testing.assert_allclose(y, y_haiku, rtol=1e-6, atol=1e-6)
  for x in batches[1:]:  # the counter past debiasing: Haiku's average is bnjax's plain one
    y_haiku, hk_state = model.apply(hk_params, hk_state, x, is_training=True)
    y, state = bnjax.batch_norm(x, params, state, training=True, momentum=0.9)
    np.testing.assert_allclose(y, y_haiku, **HAIKU_TOLERANCE)
    np.testing.assert_allclose(state.var, hk_state["bn/~/var_ema"]["average"].ravel(), rtol=2e-6)
  back = convert.from_haiku(hk_params, hk_state, "bn", decay_rate=0.9)
  np.testing.assert_allclose(back.state.mean, state.mean, rtol=2e-6)
  assert back.options["momentum"] == pytest.approx(0.9, abs=1e-15)


def test_haiku_layers_are_found_by_name():
  params, state = bnjax.init(2)
  _, hk_state = convert.to_haiku(params, state, "net/~/bn_1", shape=(1, 2), decay_rate=0.99)
  with pytest.raises(KeyError, match=r"\['net/~/bn_1'\]"):
    convert.from_haiku({}, hk_state, "bn", decay_rate=0.99)
  with pytest.raises(ValueError, match="shape"):
    convert.to_haiku(params, state, "bn", shape=(1, 3), decay_rate=0.99)
  with pytest.raises(ValueError, match="decay_rate"):
    convert.haiku_momentum(1.0)
  with pytest.raises(ValueError, match="data_format"):
    convert.from_haiku({}, hk_state, "net/~/bn_1", decay_rate=0.99, data_format="NCHW")
  converted = convert.from_haiku({}, hk_state, "net/~/bn_1", decay_rate=0.99)
  assert converted.params == bnjax.BatchNormParams(None, None)
