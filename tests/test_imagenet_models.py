"""The ImageNet models and configs: shapes, parameter counts against the paper's table
counted by hand, BN placement, modes, precision, bad input.

Full-size networks are only traced (``jax.eval_shape``, ``jax.make_jaxpr``); the
ones that run are the tiny variants at 32x32, at half their depth (RUN_DEPTH)."""

import functools
import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax
from experiments.imagenet import models
from experiments.imagenet.configs import default

CONFIG_DIR = pathlib.Path(models.__file__).parent / "configs"


def make_config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


def init_shapes(model, image_size, batch=2):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), images
  ), images


def module_outputs(model, image_size, module_type, train=False):
  """Outputs (shape and dtype) of every ``module_type`` call in one traced apply, by module name."""
  variables, images = init_shapes(model, image_size)
  outputs = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      outputs[context.module.name] = out
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(
      functools.partial(
        model.apply, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
      ),
      variables,
      images,
    )
  return outputs


# ---- shapes -----------------------------------------------------------------------------


def traced(name, image_size, num_classes=1000, batch_norm=True, pool_projection_4cd=96):
  """``create_model``'s network and its variables' shapes for a batch of 3 images,
  traced once per module (a full-size network takes a second or two)."""
  return _traced(
    name, image_size, num_classes, batch_norm, pool_projection_4cd
  )  # one cache key per network


@functools.cache
def _traced(name, image_size, num_classes, batch_norm, pool_projection_4cd):
  model = models.create_model(
    make_config(
      model=name,
      batch_norm=batch_norm,
      num_classes=num_classes,
      image_size=image_size,
      pool_projection_4cd=pool_projection_4cd,
    )
  )
  variables, images = init_shapes(model, image_size, batch=3)
  return model, variables, images


def param_count(variables) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


# The fast set keeps one network of each kind of block (the Inception, ResNet-18's
# basic blocks, ResNet-50's bottlenecks) and each tiny network at 32 and 224; the
# deeper ResNets (more of the same blocks) and the sizes between are slow: tracing a
# full-size network takes about a second (issue 19: the fast set under 90 s).
_SLOW_SHAPES = {("resnet34", 64), ("resnet101", 64), ("resnet152", 64)} | {
  (name, size) for name in ("inception_tiny", "resnet_tiny") for size in (96, 160)
}
SHAPE_CASES = [
  pytest.param(name, size, classes, marks=pytest.mark.slow if (name, size) in _SLOW_SHAPES else ())
  for name, size, classes in (
    [(name, 64, 1000) for name in models.MODEL_NAMES if "tiny" not in name]  # full size: at 64
    + [(name, size, 7) for name in ("inception_tiny", "resnet_tiny") for size in (32, 96, 160, 224)]
  )
]


@pytest.mark.parametrize("name, image_size, num_classes", SHAPE_CASES)
def test_every_model_gives_logits_at_every_multiple_of_32(name, image_size, num_classes):
  # The variables do not depend on the image size
  # (test_count_params_does_not_depend_on_the_image_size).
  model, variables, _ = traced(name, 64 if image_size == 64 else 32, num_classes)
  images = jax.ShapeDtypeStruct((3, image_size, image_size, 3), jnp.float32)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert logits.shape == (3, num_classes) and logits.dtype == jnp.float32


def test_inception_feature_maps_follow_the_table():
  """At 224x224 the modules give the table's channels and 28/14/7 maps (the table lists
  3c and 4e at their input's size, 28 and 14; their stride 2 halves it)."""
  out = module_outputs(models.Inception(), 224, models.InceptionModule)
  expected = {
    "3a": (28, 256),
    "3b": (28, 320),
    "3c": (14, 576),
    "4a": (14, 576),
    "4b": (14, 576),
    "4c": (14, 576),
    "4d": (14, 576),
    "4e": (7, 1024),
    "5a": (7, 1024),
    "5b": (7, 1024),
  }
  assert {k: (v.shape[1], v.shape[3]) for k, v in out.items()} == {
    f"inception_{k}": v for k, v in expected.items()
  }
  assert all(v.shape[1] == v.shape[2] for v in out.values())


def test_pool_projection_128_gives_608_channels_in_4c_and_4d():
  out = module_outputs(models.Inception(pool_projection_4cd=128), 32, models.InceptionModule)
  assert [out[f"inception_{m}"].shape[-1] for m in ("4b", "4c", "4d", "4e", "5a")] == [
    576,
    608,
    608,
    1056,
    1024,
  ]
  config = make_config(pool_projection_4cd=128)
  assert models.create_model(config).pool_projection_4cd == 128


# ---- parameter counts -------------------------------------------------------------------


def table_count(pool_projection_4cd, batch_norm, num_classes=1000, width=1.0):
  """Parameters of the paper's table, counted by hand: k*k*in*out per convolution plus,
  per convolution that feeds a nonlinearity, 2*out (BN's gamma, beta) or out (bias).
  ``width`` multiplies every channel count (rounded, at least 1); the stem's depth
  multiplier is then tf-slim's min(8, max(1, stem channels // 3))."""
  per_unit = 2 if batch_norm else 1

  def w(channels):
    return max(1, round(channels * width)) if channels else 0

  def conv(k, cin, cout):
    return k * k * cin * cout + per_unit * cout

  depthwise = 3 * min(8, max(1, w(64) // 3))  # 24 channels at full width
  total = 7 * 7 * 1 * depthwise  # depthwise 7x7, no bias
  total += conv(1, depthwise, w(64)) + conv(1, w(64), w(64)) + conv(3, w(64), w(192))
  rows = [  # #1x1, #3x3 reduce, #3x3, double reduce, double #3x3, pool proj (0 = pass through)
    (64, 64, 64, 64, 96, 32),
    (64, 64, 96, 64, 96, 64),
    (0, 128, 160, 64, 96, 0),
    (224, 64, 96, 96, 128, 128),
    (192, 96, 128, 96, 128, 128),
    (160, 128, 160, 128, 160, pool_projection_4cd),
    (96, 128, 192, 160, 192, pool_projection_4cd),
    (0, 128, 192, 192, 256, 0),
    (352, 192, 320, 160, 224, 128),
    (352, 192, 320, 192, 224, 128),
  ]
  cin = w(192)
  for row in rows:
    ones, r3, o3, rd, od, proj = map(w, row)
    total += (conv(1, cin, ones) if ones else 0) + conv(1, cin, r3) + conv(3, r3, o3)
    total += (
      conv(1, cin, rd) + conv(3, rd, od) + conv(3, od, od) + (conv(1, cin, proj) if proj else 0)
    )
    cin = ones + o3 + od + (proj or cin)
  assert width != 1.0 or cin == 1024
  return total + cin * num_classes + num_classes


@pytest.mark.parametrize("projection", [96, 128])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_inception_parameter_count_is_the_tables(projection, batch_norm):
  count = param_count(
    traced("inception", 64, batch_norm=batch_norm, pool_projection_4cd=projection)[1]
  )
  assert count == table_count(projection, batch_norm)
  documented = {
    (96, True): 11_188_288,
    (128, True): 11_278_528,
    (96, False): 11_178_336,
    (128, False): 11_268_512,
  }
  assert count == documented[projection, batch_norm]


def test_count_params_does_not_depend_on_the_image_size():
  """Global pooling, no fully connected layer before it: the same count at any size."""
  model, variables, _ = traced("inception", 64)
  assert (
    models.count_params(model, 224)
    == models.count_params(model, 32)
    == param_count(variables)
    == 11_188_288
  )


@pytest.mark.parametrize(
  "name, expected",
  [
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
  ],
)
def test_resnet_parameter_counts_are_the_standard_ones(name, expected):
  """torchvision's published counts (weights + BN gamma/beta, 1000 classes)."""
  assert param_count(traced(name, 64)[1]) == expected


def test_width_multiplier_scales_every_channel_count():
  """Half width: every channel count of the table halved (all even: no rounding), the
  stem's depth multiplier still 8 (32 // 3 > 8); about a quarter of the parameters."""
  config = make_config(batch_norm=True, num_classes=10, width_multiplier=0.5)
  half = models.count_params(models.create_model(config), 32)
  assert half == table_count(96, True, num_classes=10, width=0.5)
  assert 0.2 < half / table_count(96, True, num_classes=10) < 0.3


# ---- BN placement, activations ----------------------------------------------------------


def trace_units(model, image_size=32, variables=None):
  """Traces a training-mode apply; returns (BN outputs, nonlinearity inputs, conv outputs)."""
  bn_outputs, conv_outputs, activation_inputs = [], [], []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, bnjax.linen.BatchNorm):
      bn_outputs.append(out)
    if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
      conv_outputs.append(out)
    return out

  def relu(x):
    activation_inputs.append(x)
    return nn.relu(x)

  model = model.clone(activation=relu)
  if variables is None:
    variables, _ = init_shapes(model, image_size)
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  activation_inputs.clear()  # init ran the activations too
  with nn.intercept_methods(record):
    jax.eval_shape(
      functools.partial(
        model.apply, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
      ),
      variables,
      images,
    )
  return bn_outputs, activation_inputs, conv_outputs


def test_bn_is_on_the_input_of_every_nonlinearity():
  model, variables, _ = traced("inception", 64)  # the paper's network, its variables traced once
  bn_outputs, activation_inputs, conv_outputs = trace_units(model, 64, variables)
  # 69 units: the stem's pointwise, 1x1 and 3x3, and 7 or 5 per module.
  assert len(activation_inputs) == len(bn_outputs) == 69
  assert all(any(a is b for b in bn_outputs) for a in activation_inputs)
  assert len(conv_outputs) == 70  # plus the depthwise half of the stem, which feeds no nonlinearity


def test_without_bn_each_nonlinearity_takes_a_biased_convolution():
  model = models.create_model(make_config(model="inception_tiny", batch_norm=False))
  bn_outputs, activation_inputs, conv_outputs = trace_units(model)
  # 27 units: the stem's 3, 3a's 7, 3c's 5, 4e's 5, 5b's 7.
  assert not bn_outputs and len(activation_inputs) == 27
  assert all(any(a is c for c in conv_outputs) for a in activation_inputs)
  variables, _ = init_shapes(model, 32)
  assert set(variables) == {"params"}
  convs = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    if jax.tree_util.keystr(path).endswith("['conv']['bias']")
  ]
  assert len(convs) == 27


@pytest.mark.parametrize("activation, logistic_count", [("relu", 0), ("sigmoid", 27)])
def test_sigmoid_variant_uses_sigmoid_at_every_unit(activation, logistic_count):
  model = models.create_model(
    make_config(model="inception_tiny", batch_norm=True, activation=activation)
  )
  variables, images = init_shapes(model, 32)
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
  primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert primitives.count("logistic") == logistic_count
  assert (primitives.count("custom_jvp_call") == 27) == (activation == "relu")  # jax.nn.relu


def test_lrn_matches_the_formula_in_float64_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 3, 7)) * 30
  squares = np.pad(x**2, [(0, 0)] * 3 + [(2, 2)])
  expected = x / (1 + 1e-4 / 5 * sum(squares[..., i : i + 7] for i in range(5))) ** 0.75
  got = models.local_response_normalization(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---- running the tiny models -------------------------------------------------------------


def drawn_variables(model, images, seed=0):
  """``model``'s variables drawn in NumPy: kernels He-normal (as the networks'), head
  included (the Inception's starts at zero, below; random here, so that the logits
  show what the network computes), biases 0, BN's gamma 1 and beta 0; running means
  N(0, 0.1^2) and variances U(0.5, 1.5), off their initial 0 and 1. Compiling the
  real init of a 27-convolution network takes XLA on CPU 10-20 s."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      value = rng.normal(
        0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape
      )  # fan in: all but the last axis
    elif name.endswith("['mean']"):
      value = rng.normal(0, 0.1, leaf.shape)
    elif name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = np.full(leaf.shape, float(name.endswith("['scale']")))
    return jax.device_put(np.asarray(value, leaf.dtype))  # jnp.asarray compiles per shape

  return jax.tree_util.tree_map_with_path(draw, shapes)


# The networks that run are the tiny ones cut to half their depth: the Inception's
# stem and first two modules (3a: average pool and projection; 3c: stride 2, max
# pool passed through), the ResNet's stem and first two stages (a stride-1 and a
# stride-2 bottleneck, both with a projection shortcut). Every unit's BN is wired
# alike (test_every_batch_norm_takes_the_configs_momentum_and_epsilon counts them
# all); training-mode BN dominates the compile time, which halves.
RUN_DEPTH = {"inception_tiny": {"modules": ("3a", "3c")}, "resnet_tiny": {"stage_sizes": (1, 1)}}


def running_model(name, **fields):
  model = models.create_model(
    make_config(
      model=name, batch_norm=True, dropout_rate=0.0, num_classes=10, image_size=32, **fields
    )
  )
  return model.clone(**RUN_DEPTH[name])


@pytest.fixture(scope="module")
def tiny_runs():
  """Tiny Inception (BN, LRN) and ResNet, at ``RUN_DEPTH``: variables, and the jitted
  train/eval apply."""
  images = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (4, 32, 32, 3)).astype(np.float32))
  runs = {}
  for name in ("inception_tiny", "resnet_tiny"):
    model = running_model(name)
    apply = jax.jit(
      functools.partial(model.apply, mutable=["batch_stats"]), static_argnames="train"
    )
    runs[name] = drawn_variables(model, images), apply
  return images, runs


def test_inception_starts_at_uniform_predictions():
  """Zero softmax layer: the first loss is ln(num_classes) whatever the input."""
  model = models.create_model(make_config(model="inception_tiny", num_classes=10, image_size=32))
  images = jnp.ones((2, 32, 32, 3))
  # Only the softmax layer's initial values are returned: XLA prunes the rest of init.
  head = jax.jit(lambda key: model.init(key, images, train=False)["params"]["logits"])(
    jax.random.key(0)
  )
  assert head["kernel"].shape == (128, 10) and head["bias"].shape == (10,)
  assert not np.any(head["kernel"]) and not np.any(head["bias"])


@pytest.mark.parametrize("name", ["inception_tiny", "resnet_tiny"])
def test_batch_stats_change_in_training_only(tiny_runs, name):
  images, runs = tiny_runs
  variables, apply = runs[name]
  logits, eval_updates = apply(variables, images, train=False)
  _, train_updates = apply(variables, images, train=True)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32 and np.isfinite(logits).all()
  jax.tree.map(np.testing.assert_array_equal, eval_updates["batch_stats"], variables["batch_stats"])
  changed = jax.tree.leaves(
    jax.tree.map(  # compared in NumPy: a jnp comparison would compile per leaf shape
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      train_updates["batch_stats"],
      variables["batch_stats"],
    )
  )
  assert changed and all(changed)
  # Changing the last example changes the others' logits in training (batch
  # statistics), not in evaluation (running statistics).
  other = np.array(images)
  other[-1] *= 3.0
  other_logits, _ = apply(variables, other, train=False)
  np.testing.assert_allclose(other_logits[:-1], logits[:-1], rtol=1e-5, atol=1e-6)
  train_logits, _ = apply(variables, images, train=True)
  other_train_logits, _ = apply(variables, other, train=True)
  assert not np.allclose(other_train_logits[:-1], train_logits[:-1], rtol=1e-3)


def test_bfloat16_computes_in_bfloat16_and_returns_float32_logits(tiny_runs):
  images, runs = tiny_runs
  variables, apply32 = runs["inception_tiny"]
  model = running_model("inception_tiny", half_precision=True)
  conv_dtypes = {out.dtype for out in module_outputs(model, 32, nn.Conv).values()}
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
  params_and_stats = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), images
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(params_and_stats)} == {jnp.dtype(jnp.float32)}
  train_logits, updates = jax.eval_shape(
    functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, images
  )
  assert train_logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  # Values: evaluation mode, against float32 (measured: 0.7% relative error in norm;
  # training mode on 4 examples at 1x1 resolution amplifies rounding through the
  # batch variances, 10%, so it is not compared).
  logits16 = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  logits32, _ = apply32(variables, images, train=False)
  assert logits16.dtype == jnp.float32
  assert np.linalg.norm(logits16 - logits32) < 0.03 * np.linalg.norm(logits32)


def test_dropout_needs_a_dropout_rng_in_training_only():
  model = models.create_model(
    make_config(model="inception_tiny", batch_norm=False, dropout_rate=0.4)
  )
  variables, images = init_shapes(model, 32)
  jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, images)
  jax.eval_shape(
    functools.partial(model.apply, train=True, rngs={"dropout": jax.random.key(0)}),
    variables,
    images,
  )


@pytest.mark.parametrize("name", ["inception_tiny", "resnet_tiny"])
def test_every_batch_norm_takes_the_configs_momentum_and_epsilon(name):
  model = models.create_model(
    make_config(model=name, batch_norm=True, bn_momentum=0.7, bn_epsilon=0.02, dropout_rate=0.0)
  )
  variables, images = init_shapes(model, 32)
  layers = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, bnjax.linen.BatchNorm) and context.method_name == "__call__":
      module = context.module
      layers[module.scope.path] = (module.momentum, module.epsilon, module.use_running_average)
    return next_fun(*args, **kwargs)

  for train in (True, False):
    layers.clear()
    with nn.intercept_methods(record):
      jax.eval_shape(
        functools.partial(model.apply, train=train, mutable=["batch_stats"]), variables, images
      )
    num_states = len(jax.tree.leaves(variables["batch_stats"])) // 2  # a mean and a var per layer
    # 27: the Inception's units; 17: the ResNet's stem and 4 bottlenecks' 3 + shortcut.
    assert len(layers) == num_states == {"inception_tiny": 27, "resnet_tiny": 17}[name]
    assert set(layers.values()) == {(0.7, 0.02, not train)}


def test_norm_argument_is_used():
  """The training code passes its own BatchNorm constructor (here flax's)."""
  model = models.create_model(
    make_config(model="inception_tiny", batch_norm=True),
    norm=functools.partial(nn.BatchNorm, momentum=0.5),
  )
  assert len(module_outputs(model, 32, nn.BatchNorm)) > 0
  assert not module_outputs(model, 32, bnjax.linen.BatchNorm)


# ---- bad input ----------------------------------------------------------------------------


def test_unknown_model_lists_the_valid_names():
  with pytest.raises(ValueError, match="unknown model 'inceptoin'.*inception.*resnet50"):
    models.create_model(make_config(model="inceptoin"))


@pytest.mark.parametrize("image_size", [0, 16, 48, 100, 224.0, True])
def test_bad_image_size_is_refused(image_size):
  with pytest.raises(ValueError, match="multiple of 32"):
    models.check_image_size(image_size)
  with pytest.raises(ValueError, match="multiple of 32"):
    models.count_params(models.ResNetTiny(), image_size)
  if isinstance(image_size, int) and not isinstance(
    image_size, bool
  ):  # the config refuses other types
    with pytest.raises(ValueError, match="multiple of 32"):
      models.create_model(make_config(image_size=image_size))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("pool_projection_4cd", 100, "pool_projection_4cd must be 96"),
    ("activation", "tanh", "activation must be one of relu, sigmoid"),
    ("dropout_rate", 1.0, "dropout_rate"),
    ("width_multiplier", 0.0, "width_multiplier"),
  ],
)
def test_bad_inception_options_are_refused(field, value, message):
  config = make_config()
  config.unlock()[field] = value
  with pytest.raises(ValueError, match=message):
    models.create_model(config)


def test_resnet_without_batch_norm_is_refused():
  with pytest.raises(ValueError, match="always has batch norm"):
    models.create_model(make_config(model="resnet50", batch_norm=False))


# ---- configs ----------------------------------------------------------------------------


def load_config(name):
  """Loads a config file by path, as ml_collections' config_flags does."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")
REQUIRED_FIELDS = """model fake_data dataset tfds_data_dir data_dir num_train_steps num_epochs
batch_size image_size learning_rate parallelism bn_group_size half_precision eval_every
checkpoint_every log_every recompute_bn_batches bn_momentum bn_epsilon dropout_rate
width_multiplier num_classes seed eval_batch_size shuffle_buffer momentum weight_decay
lr_schedule warmup_epochs label_smoothing""".split()


def test_all_configs_exist():
  assert set(CONFIG_NAMES) >= {
    "default",
    "inception",
    "bn_baseline",
    "bn_x5",
    "bn_x30",
    "bn_x5_sigmoid",
    "inception_sigmoid",
    "resnet50",
    "tiny",
  }


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_builds_its_model(name):
  config = load_config(name)
  assert not set(REQUIRED_FIELDS) - set(config.keys())
  assert config.parallelism in ("jit", "pmap") and config.dataset == "imagenet2012"
  assert config.num_train_steps == -1 or name == "tiny"
  assert isinstance(models.create_model(config), nn.Module)


def test_learning_rates_stand_in_the_papers_ratios():
  rate = {name: load_config(name).learning_rate for name in CONFIG_NAMES}
  inception = rate["inception"]
  for name, factor in [
    ("bn_baseline", 1),
    ("inception_sigmoid", 1),
    ("bn_x5", 5),
    ("bn_x30", 30),
    ("bn_x5_sigmoid", 5),
  ]:
    assert rate[name] == pytest.approx(factor * inception, rel=1e-12), name
  assert load_config("bn_x30").base_learning_rate == pytest.approx(0.045)  # Figure 3


def test_bn_variants_carry_section_4_2_1():
  base, baseline = load_config("inception"), load_config("bn_baseline")
  assert not base.batch_norm and baseline.batch_norm
  assert base.dropout_rate == baseline.dropout_rate == 0.4 and base.lrn and baseline.lrn
  for name in ("bn_x5", "bn_x30", "bn_x5_sigmoid"):
    config = load_config(name)
    assert config.batch_norm and config.dropout_rate == 0 and not config.lrn
    assert config.weight_decay == pytest.approx(baseline.weight_decay / 5)
    assert config.lr_decay_epochs == pytest.approx(baseline.lr_decay_epochs / 6)
    assert config.shuffle_buffer > baseline.shuffle_buffer
    assert config.photometric_distortion < baseline.photometric_distortion
  assert (
    load_config("bn_x5_sigmoid").activation
    == load_config("inception_sigmoid").activation
    == "sigmoid"
  )


def test_learning_rate_follows_the_batch_size():
  config = load_config("resnet50")
  assert config.learning_rate == pytest.approx(0.4)  # 0.1 x 1024 / 256
  config.batch_size = 512
  assert config.learning_rate == pytest.approx(0.2)
  assert config.nesterov and config.lr_schedule == "cosine" and config.num_epochs == 90
