"""Every JAX transform over batch norm, in the core and the four drop-ins (issue 31).

``CELLS`` is the matrix: one cell per framework and transform, each a function that
trains one step of batch norm under that transform, in float64, and checks it
against an independent reference: the full batch in float64 NumPy
(``tests.reference``: Algorithm 1's outputs and statistics, Section 3's chain rule
for the gradients) or, for a scan over layers, the same layers unrolled. A cell's
outcome is "works" (nothing to change), "fixed" (bnjax changed for it) or
"refused" (the framework cannot express it: the cell checks the one-line error that
says what to do instead). docs/guide/transforms.md shows the same table, and
``test_the_guide_shows_the_matrix`` keeps the two equal.

Statistics are taken over every mapped example together (an ``axis_name`` for each
``vmap`` and ``shard_map`` axis), so every cell's numbers are the full batch's.
``MOMENTUM`` is a binary fraction, exact in float32 and float64 alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import flax.errors
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
from tests import ROOT, reference
from tests.samples import normal

N, C = 8, 3  # examples, features
MOMENTUM = 0.875
EPSILON = 1e-5
X = normal(31, (N, C), [1.0, -2.0, 3.0], [1.0, 2.0, 0.5], dtype=np.float64)
DY = normal(32, (N, C), dtype=np.float64)  # the loss is sum(y * DY): dL/dy = DY


@dataclasses.dataclass(frozen=True)
class Cell:
  """One framework under one transform, and what happens there."""

  framework: str  # core, linen, nnx, equinox, haiku
  transform: str  # the transform, as a user writes it
  outcome: str  # works, fixed, refused
  note: str  # what is checked, the form that works, or the error
  check: Callable[[], None]

  @property
  def row(self) -> str:
    return f"| {self.framework} | {self.transform} | {self.outcome} | {self.note} |"


CELLS: list[Cell] = []


def cell(framework: str, transform: str, note: str, outcome: str = "works"):
  """Registers the decorated function as the cell ``(framework, transform)``."""

  def register(check):
    CELLS.append(Cell(framework, transform, outcome, note, check))
    return check

  return register


def full_batch(x=X, dy=DY):
  """Algorithm 1 on the whole batch in float64: ``(y, mean, var, dx, dscale, dbias)``,
  scale 1 and bias 0, with the gradients of ``sum(y * dy)``."""
  y, mean, var = reference.forward(x, 1.0, 0.0, EPSILON, (0,))
  dx, dscale, dbias = reference.backward(x, 1.0, dy, EPSILON, (0,))
  return y, mean.ravel(), var.ravel(), dx, dscale, dbias


def moved(mean, var):
  """Flax's running statistics after one step from (0, 1)."""
  return (1 - MOMENTUM) * mean, MOMENTUM + (1 - MOMENTUM) * var


def tolerance(array) -> float:
  """Relative tolerance for a result of ``array``'s dtype: float64 results agree
  with the reference to 1e-10; float32 ones (bnjax.nnx's running statistics, kept
  in float32 as Flax keeps them) to 1e-6."""
  return 1e-10 if jnp.result_type(array) == jnp.float64 else 1e-6


def assert_close(got, want, what: str):
  np.testing.assert_allclose(
    np.asarray(got, np.float64), want, rtol=tolerance(got), atol=tolerance(got), err_msg=what
  )


def check_step(forward, params, scale_bias, *, state="moved"):
  """One training step, its output, new state and gradients, against Algorithm 1.

  Args:
    forward: ``(params, x: [N, C]) -> (y: [N, C], mean: [C], var: [C])``, the
      transform under test; ``mean`` and ``var`` the new running statistics.
    params: what ``forward`` differentiates (the framework's parameter tree).
    scale_bias: ``grads -> (dscale, dbias)``, each of ``C`` values.
    state: "moved" (Flax's running statistics, from mean 0 and var 1) or "batch"
      (Haiku's debiased and Equinox's averages: the batch's statistics after one step).
  """

  def loss(params, x):
    y, mean, var = forward(params, x)
    return jnp.sum(y * DY), (y, mean, var)

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (grads, dx), (y, mean, var) = step(params, jnp.asarray(X))
  assert_step(y, mean, var, dx, *scale_bias(grads), state=state)


def assert_step(y, mean, var, dx, dscale, dbias, *, state="moved"):
  """A training step's results against Algorithm 1 on the full batch (``check_step``)."""
  want_y, want_mean, want_var, want_dx, want_dscale, want_dbias = full_batch()
  if state == "moved":
    want_mean, want_var = moved(want_mean, want_var)
  for got, want, what in [
    (y, want_y, "y"),
    (mean, want_mean, "running mean"),
    (var, want_var, "running var"),
    (dx, want_dx, "dx"),
    (np.ravel(dscale), want_dscale, "dscale"),
    (np.ravel(dbias), want_dbias, "dbias"),
  ]:
    assert_close(got, want, what)


def check_same(forward, unrolled, params):
  """``forward`` and ``unrolled`` (``(params, x) -> (y, state)``) give the same
  output, state, and gradients of ``sum(y * DY)``."""

  def run(f):
    def loss(params, x):
      y, state = f(params, x)
      return jnp.sum(y * DY), (y, state)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(X))

  got, want = run(forward), run(unrolled)
  jax.tree.map(
    lambda a, b: assert_close(a, np.asarray(b, np.float64), "scan vs unrolled"), got, want
  )


def core_scale_bias(params: bnjax.BatchNormParams):
  return params.scale, params.bias


def mesh(size: int = 4, name: str = "data") -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()[:size]), (name,))


def vmapped(f, first, axis_name="batch"):
  """``f(x) -> (a, b)`` over the examples of ``x``: ``a`` mapped (where ``first``), ``b`` not."""
  return jax.vmap(f, out_axes=(0 if first else None, None), axis_name=axis_name)


def sharded_vmapped(f, first):
  """``vmapped`` on each of 4 devices' share of ``x`` (``jax.shard_map`` axis "data").
  JAX's check of varying values refuses a psum over a shard_map axis and a vmap axis
  together (``check_vma=True``); the values are right without it."""
  return jax.shard_map(
    vmapped(f, first),
    mesh=mesh(),
    in_specs=P("data"),
    out_specs=(P("data") if first else P(), P()),
    check_vma=False,
  )


MEMBERS = 2


def assert_members(y, mean, var, dx, dscale, dbias):
  """Each of ``MEMBERS`` models trained on its own share of the batch (``[MEMBERS,
  N // MEMBERS, ...]`` and ``[MEMBERS, C]`` results), against Algorithm 1 on that share."""
  shares = X.reshape(MEMBERS, N // MEMBERS, C), DY.reshape(MEMBERS, N // MEMBERS, C)
  for k, (x, dy) in enumerate(zip(*shares, strict=True)):
    want_y, want_mean, want_var, want_dx, want_dscale, want_dbias = full_batch(x, dy)
    want_mean, want_var = moved(want_mean, want_var)
    for got, want, what in [
      (y[k], want_y, "y"),
      (mean[k], want_mean, "running mean"),
      (var[k], want_var, "running var"),
      (dx[k], want_dx, "dx"),
      (dscale[k], want_dscale, "dscale"),
      (dbias[k], want_dbias, "dbias"),
    ]:
      assert_close(got, want, f"member {k}: {what}")


# The core: bnjax.batch_norm --------------------------------------------------------


def core_layer(params, x, **options):
  """``(y, mean, var)`` of one training call from the initial state."""
  _, state = bnjax.init(C, dtype=jnp.float64)
  y, new_state = bnjax.batch_norm(x, params, state, training=True, momentum=MOMENTUM, **options)
  return y, new_state.mean, new_state.var


def core_params():
  return bnjax.init(C, dtype=jnp.float64)[0]


def core_over_examples(params, x):
  """One example per lane of a vmap, statistics over the named axis."""
  one = functools.partial(core_layer, params, axis_name="batch")
  return jax.vmap(one, axis_name="batch", out_axes=(0, None, None))(x)


@cell("core", "jax.jit", "the full batch")
def core_jit():
  check_step(core_layer, core_params(), core_scale_bias)


@cell("core", "jax.vmap(axis_name)", "one example per lane, axis_name='batch'")
def core_vmap():
  check_step(core_over_examples, core_params(), core_scale_bias)


@cell("core", "nested jax.vmap", "axis_name=('outer', 'inner'): both vmaps' names")
def core_nested_vmap():
  def forward(params, x):
    one = functools.partial(core_layer, params, axis_name=("outer", "inner"))
    inner = jax.vmap(one, axis_name="inner", out_axes=(0, None, None))
    y, mean, var = jax.vmap(inner, axis_name="outer", out_axes=(0, None, None))(
      x.reshape(2, N // 2, C)
    )
    return y.reshape(N, C), mean, var

  check_step(forward, core_params(), core_scale_bias)


@cell("core", "jax.vmap inside jax.shard_map", "axis_name=('data', 'batch'); check_vma=False")
def core_shard_map_vmap():
  def per_device(params, x):
    one = functools.partial(core_layer, params, axis_name=("data", "batch"))
    return jax.vmap(one, axis_name="batch", out_axes=(0, None, None))(x)

  # JAX's check of varying values refuses a psum over a shard_map axis and a vmap
  # axis together (check_vma=True); the values are right without it.
  forward = jax.shard_map(
    per_device,
    mesh=mesh(),
    in_specs=(P(), P("data")),
    out_specs=(P("data"), P(), P()),
    check_vma=False,
  )
  check_step(forward, core_params(), core_scale_bias)


@cell(
  "core",
  "jax.checkpoint around jax.vmap(axis_name)",
  "'unbound axis name' before: JAX traces the vmapped custom derivative without the vmap's "
  "axis sizes; bnjax now reads them before it",
  "fixed",
)
def core_checkpoint_around_vmap():
  check_step(jax.checkpoint(core_over_examples), core_params(), core_scale_bias)


@cell(
  "core",
  "jax.grad outside jax.jit(jax.vmap(axis_name))",
  "'unbound axis name' before, as above; also lax.scan and lax.cond around the vmap",
  "fixed",
)
def core_grad_outside_jit():
  jitted = jax.jit(core_over_examples)
  params, x, dy = core_params(), jnp.asarray(X), jnp.asarray(DY)
  y, mean, var = jitted(params, x)
  dparams, dx = jax.grad(lambda p, x: jnp.sum(jitted(p, x)[0] * dy), argnums=(0, 1))(params, x)
  assert_step(y, mean, var, dx, *core_scale_bias(dparams))


LAYERS = 3


def stacked_kernels():
  """``[L, C, C]`` kernels near the identity, so that every layer's input varies."""
  return jnp.asarray(np.eye(C) + 0.3 * normal(33, (LAYERS, C, C), dtype=np.float64))


def core_stacked():
  params, state = jax.vmap(lambda _: bnjax.init(C, dtype=jnp.float64))(jnp.arange(LAYERS))
  return (stacked_kernels(), params), state


def core_block(h, kernel, params, state):
  y, state = bnjax.batch_norm(h @ kernel, params, state, training=True, momentum=MOMENTUM)
  return jnp.tanh(y), state


@cell("core", "jax.lax.scan over layers", "params and state stacked [L, C]; = unrolled")
def core_scan_layers():
  weights, state = core_stacked()

  def scanned(weights, x):
    def body(h, layer):
      kernel, params, state = layer
      return core_block(h, kernel, params, state)

    return jax.lax.scan(body, x, (*weights, state))

  def unrolled(weights, x):
    kernels, params = weights
    states = []
    for i in range(LAYERS):
      layer = jax.tree.map(lambda a, i=i: a[i], (params, state))
      x, new_state = core_block(x, kernels[i], *layer)
      states.append(new_state)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *states)

  check_same(scanned, unrolled, weights)


@cell("core", "jax.checkpoint", "the layer rematerialized: state moved once, exact gradients")
def core_checkpoint():
  check_step(jax.checkpoint(core_layer), core_params(), core_scale_bias)


# Equinox: bnjax.equinox.BatchNorm, on one example inside a vmap ---------------------


def equinox_layer(axis_name, **options):
  """A fresh layer and its state, in "batch" mode."""
  import bnjax.equinox

  make = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)
  return make(C, axis_name, momentum=MOMENTUM, mode="batch", **options)


def equinox_step(forward_layer, axis_name="batch"):
  """``check_step`` for ``forward_layer(layer, state, x) -> (y, state)``: the layer's
  arrays are the parameters."""
  layer, state = equinox_layer(axis_name)
  arrays, static = eqx.partition(layer, eqx.is_array)

  def forward(arrays, x):
    layer = eqx.combine(arrays, static)
    y, new_state = forward_layer(layer, state, x)
    return y, *new_state.get(layer.batch_state_index)

  check_step(forward, arrays, lambda grads: (grads.weight, grads.bias), state="batch")


def over_examples(layer, state, x, axis_name="batch", vmap=jax.vmap):
  """The layer on each example of ``x``, statistics over all of them."""
  return vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(x, state)


@cell("equinox", "eqx.filter_jit + jax.vmap(axis_name)", "the layer's own form")
def equinox_vmap():
  equinox_step(over_examples)


@cell("equinox", "eqx.filter_vmap(axis_name)", "as jax.vmap")
def equinox_filter_vmap():
  equinox_step(functools.partial(over_examples, vmap=eqx.filter_vmap))


@cell("equinox", "nested jax.vmap", "axis_name=('outer', 'inner') (equinox#707, #935)")
def equinox_nested_vmap():
  def forward(layer, state, x):
    inner = lambda x, state: over_examples(layer, state, x, "inner")  # noqa: E731
    y, state = over_examples(inner, state, x.reshape(2, N // 2, C), "outer")
    return y.reshape(N, C), state

  equinox_step(forward, axis_name=("outer", "inner"))


@cell("equinox", "jax.vmap inside jax.shard_map", "axis_name=('data', 'batch'); check_vma=False")
def equinox_shard_map_vmap():
  def forward(layer, state, x):
    return jax.shard_map(
      functools.partial(over_examples, layer),
      mesh=mesh(),
      in_specs=(P(), P("data")),
      out_specs=(P("data"), P()),
      check_vma=False,
    )(state, x)

  equinox_step(forward, axis_name=("data", "batch"))


@cell("equinox", "eqx.filter_checkpoint", "inside the vmap: jax.vmap(eqx.filter_checkpoint(layer))")
def equinox_checkpoint():
  equinox_step(lambda layer, state, x: over_examples(eqx.filter_checkpoint(layer), state, x))


@cell(
  "equinox",
  "eqx.filter_checkpoint around the vmap",
  "'unbound axis name' before, as in the core",
  "fixed",
)
def equinox_checkpoint_around_vmap():
  equinox_step(eqx.filter_checkpoint(over_examples))


@cell("equinox", "jax.lax.scan over layers", "layers made by eqx.filter_vmap; = unrolled")
def equinox_scan_layers():
  layers, states = eqx.filter_vmap(lambda _: equinox_layer("batch"), axis_size=LAYERS)(None)
  arrays, static = eqx.partition(layers, eqx.is_array)

  def block(h, kernel, arrays, state):
    y, state = over_examples(eqx.combine(arrays, static), state, h @ kernel)
    return jnp.tanh(y), state

  def scanned(weights, x):
    return jax.lax.scan(lambda h, layer: block(h, *layer), x, (*weights, states))

  def unrolled(weights, x):
    new_states = []
    for i in range(LAYERS):
      x, state = block(x, *jax.tree.map(lambda a, i=i: a[i], (*weights, states)))
      new_states.append(state)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *new_states)

  check_same(scanned, unrolled, (stacked_kernels(), arrays))


@cell("equinox", "higher-rank examples", "x: [C, H, W] per example (equinox#592)")
def equinox_higher_rank():
  layer, state = equinox_layer("batch")
  images = jnp.asarray(X.T.reshape(C, 2, 2, 2).transpose(1, 0, 2, 3))  # [2, C, 2, 2]: X's values
  y, state = eqx.filter_jit(over_examples)(layer, state, images)
  want_y, want_mean, want_var, *_ = full_batch()
  assert_close(jnp.transpose(y, (1, 0, 2, 3)).reshape(C, N).T, want_y, "y")
  assert_close(state.get(layer.batch_state_index)[0], want_mean, "running mean")
  assert_close(state.get(layer.batch_state_index)[1], want_var, "running var")


@cell(
  "equinox",
  "nested jax.vmap, one name",
  "JAX: 'vmap has mapped output (axis_name=outer) but out_axes is None'; give the layer both "
  "names, axis_name=('outer', 'inner') (equinox#707)",
  "refused",
)
def equinox_nested_vmap_one_name():
  layer, state = equinox_layer("inner")
  inner = lambda x, state: over_examples(layer, state, x, "inner")  # noqa: E731
  with pytest.raises(ValueError, match=r"vmap has mapped output \(axis_name=outer\)"):
    eqx.filter_jit(over_examples)(inner, state, jnp.asarray(X).reshape(2, N // 2, C), "outer")


# Haiku: bnjax.haiku.BatchNorm in a transformed function -----------------------------


def haiku_model(cross_replica_axis=None, vmap=None):
  """``hk.transform_with_state`` of one training-mode layer (``vmap``: a Haiku
  transform to map it with, e.g. ``hk.vmap``)."""
  import bnjax.haiku

  def forward(x):
    layer = bnjax.haiku.BatchNorm(
      True, True, MOMENTUM, EPSILON, cross_replica_axis=cross_replica_axis, name="bn"
    )
    call = lambda x: layer(x, is_training=True)  # noqa: E731
    return call(x) if vmap is None else vmap(call)(x)

  return hk.transform_with_state(forward)


def haiku_step(model, mapped=lambda f, first: f):
  """``check_step`` for ``model`` under ``mapped(f, first) -> g``, a transform of
  ``f(x) -> (a, b)`` (``a`` mapped like ``x`` where ``first``, ``b`` not) that
  both ``init`` and ``apply`` run under. The state's debiased averages are the
  batch's statistics after one step."""
  x = jnp.asarray(X)
  params, state = jax.jit(mapped(lambda x: model.init(None, x), False))(x)

  def forward(params, x):
    y, new_state = mapped(lambda x: model.apply(params, state, None, x), True)(x)
    return y, *(jnp.ravel(new_state[f"bn/~/{name}"]["average"]) for name in ("mean_ema", "var_ema"))

  check_step(
    forward, params, lambda grads: (grads["bn"]["scale"], grads["bn"]["offset"]), state="batch"
  )


@cell("haiku", "jax.jit", "the full batch")
def haiku_jit():
  haiku_step(haiku_model())


@cell("haiku", "jax.vmap + cross_replica_axis", "one example per lane (dm-haiku#786, #788, #790)")
def haiku_vmap():
  haiku_step(haiku_model("batch"), vmapped)


@cell("haiku", "hk.vmap + cross_replica_axis", "inside the transformed function, split_rng=False")
def haiku_hk_vmap():
  haiku_step(haiku_model("batch", functools.partial(hk.vmap, axis_name="batch", split_rng=False)))


@cell("haiku", "nested jax.vmap", "cross_replica_axis=('outer', 'inner')")
def haiku_nested_vmap():
  def mapped(f, first):
    def g(x):
      inner = vmapped(f, first, "inner")
      a, b = vmapped(inner, first, "outer")(x.reshape(2, N // 2, C))
      return (a.reshape(N, C) if first else a), b

    return g

  haiku_step(haiku_model(("outer", "inner")), mapped)


@cell(
  "haiku", "jax.vmap inside jax.shard_map", "cross_replica_axis=('data', 'batch'); check_vma=False"
)
def haiku_shard_map_vmap():
  haiku_step(haiku_model(("data", "batch")), sharded_vmapped)


@cell("haiku", "hk.remat", "the layer rematerialized: state moved once, exact gradients")
def haiku_remat():
  haiku_step(haiku_model(vmap=hk.remat))


def haiku_block(h):
  import bnjax.haiku

  h = hk.Linear(C, with_bias=False, w_init=hk.initializers.RandomNormal(), name="dense")(h)
  return jnp.tanh(bnjax.haiku.BatchNorm(True, True, MOMENTUM, EPSILON, name="bn")(h, True))


@cell("haiku", "hk.layer_stack over layers", "params and state stacked by Haiku; = unrolled")
def haiku_scan_layers():
  stacked = hk.transform_with_state(lambda x: hk.layer_stack(LAYERS)(haiku_block)(x))
  one = hk.transform_with_state(haiku_block)
  params, state = jax.jit(stacked.init)(jax.random.key(0), jnp.asarray(X))
  prefix = "__layer_stack_no_per_layer/"

  def unrolled(params, x):
    layers = [{k.removeprefix(prefix): v for k, v in tree.items()} for tree in (params, state)]
    states = []
    for i in range(LAYERS):
      x, new_state = one.apply(*jax.tree.map(lambda a, i=i: a[i], layers), None, x)
      states.append({prefix + k: v for k, v in new_state.items()})
    return x, jax.tree.map(lambda *a: jnp.stack(a), *states)

  check_same(lambda params, x: stacked.apply(params, state, None, x), unrolled, params)


# flax.linen: bnjax.linen.BatchNorm ------------------------------------------------


def linen_layer(axis_name=None):
  """A training-mode layer in float64 (a class, for Flax's lifted transforms): its
  ``batch_stats`` too, which otherwise start in float32, as Flax's, and become
  float64 at the first step (a carry of ``nn.scan`` may not change dtype)."""
  import bnjax.linen

  return functools.partial(
    bnjax.linen.BatchNorm,
    use_running_average=False,
    momentum=MOMENTUM,
    epsilon=EPSILON,
    axis_name=axis_name,
    param_dtype=jnp.float64,
    force_float32_reductions=False,
  )


def linen_step(module, mapped=lambda f, first: f):
  """``check_step`` for ``module`` (its ``params`` and ``batch_stats`` at the top
  level) under ``mapped``, as ``haiku_step``."""
  x = jnp.asarray(X)
  init = jax.jit(mapped(lambda x: (module.init(jax.random.key(0), x), None), False))
  variables, _ = init(x)

  def forward(params, x):
    def apply(x):
      return module.apply({**variables, "params": params}, x, mutable=["batch_stats"])

    y, updates = mapped(apply, True)(x)
    return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

  check_step(forward, variables["params"], lambda grads: (grads["scale"], grads["bias"]))


@cell("linen", "jax.jit", "the full batch")
def linen_jit():
  linen_step(linen_layer()())


@cell("linen", "jax.vmap(axis_name)", "one example per lane, variables broadcast")
def linen_vmap():
  linen_step(linen_layer("batch")(), vmapped)


def linen_broadcast_vmap(module, axis_name):
  """``nn.vmap`` of ``module`` (a class) over examples, its variables shared."""
  return nn.vmap(
    module,
    variable_axes={"params": None, "batch_stats": None},
    split_rngs={"params": False},
    axis_name=axis_name,
  )


@cell("linen", "nn.vmap, variable_axes None", "variables broadcast, axis_name='batch'")
def linen_nn_vmap():
  linen_step(linen_broadcast_vmap(linen_layer("batch"), "batch")())


@cell("linen", "nested nn.vmap", "axis_name=('outer', 'inner') (flax#3319)")
def linen_nested_nn_vmap():
  inner = linen_broadcast_vmap(linen_layer(("outer", "inner")), "inner")
  module = linen_broadcast_vmap(inner, "outer")()

  def mapped(f, first):
    def g(x):
      a, b = f(x.reshape(2, N // 2, C))
      return (a.reshape(N, C) if first else a), b

    return g

  linen_step(module, mapped)


@cell(
  "linen",
  "nested nn.vmap, one name",
  "JAX: 'vmap has mapped output (axis_name=outer) but out_axes is None'; name both axes, "
  "axis_name=('outer', 'inner') (flax#3319)",
  "refused",
)
def linen_nested_nn_vmap_one_name():
  inner = linen_broadcast_vmap(linen_layer("inner"), "inner")
  module = linen_broadcast_vmap(inner, "outer")()
  x = jnp.asarray(X).reshape(2, N // 2, C)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"vmap has mapped output \(axis_name=outer\)"):
    jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))(variables, x)


@cell("linen", "jax.vmap inside jax.shard_map", "axis_name=('data', 'batch'); check_vma=False")
def linen_shard_map_vmap():
  linen_step(linen_layer(("data", "batch"))(), sharded_vmapped)


@cell("linen", "nn.remat", "the layer rematerialized: state moved once, exact gradients")
def linen_remat():
  linen_step(nn.remat(linen_layer())())


@cell("linen", "nn.vmap, variable_axes 0 (ensemble)", "each model its own batch and statistics")
def linen_ensemble():
  module = nn.vmap(
    linen_layer(),
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True},
  )()
  shares = jnp.asarray(X.reshape(MEMBERS, N // MEMBERS, C))
  variables = jax.jit(module.init)(jax.random.key(0), shares)

  def loss(params, x):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(y * DY.reshape(x.shape)), (y, updates["batch_stats"])

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (grads, dx), (y, stats) = step(variables["params"], shares)
  assert_members(y, stats["mean"], stats["var"], dx, grads["scale"], grads["bias"])


class LinenBlock(nn.Module):
  """Dense -> BN -> tanh, as a scan body ``(h, _) -> (h, None)``."""

  @nn.compact
  def __call__(self, h, _):
    h = nn.Dense(C, use_bias=False, param_dtype=jnp.float64)(h)
    return jnp.tanh(linen_layer()()(h)), None


@cell("linen", "nn.scan over layers", "variable_axes={'params': 0, 'batch_stats': 0}; = unrolled")
def linen_scan_layers():
  stack = nn.scan(
    LinenBlock,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True},
    length=LAYERS,
  )()
  variables = jax.jit(lambda x: stack.init(jax.random.key(0), x, None))(jnp.asarray(X))
  block = LinenBlock()

  def scanned(params, x):
    (y, _), updates = stack.apply({**variables, "params": params}, x, None, mutable=["batch_stats"])
    return y, updates

  def unrolled(params, x):
    layers = {**variables, "params": params}
    states = []
    for i in range(LAYERS):
      (x, _), updates = block.apply(
        jax.tree.map(lambda a, i=i: a[i], layers), x, None, mutable=["batch_stats"]
      )
      states.append(updates)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *states)

  check_same(scanned, unrolled, variables["params"])


class LinenStep(nn.Module):
  """One step over a sequence, ``(c, x) -> (c, y)``: the same BN at every step."""

  train: bool = True

  @nn.compact
  def __call__(self, c, x):
    module = linen_layer()(use_running_average=not self.train)
    return c, module(x)


def linen_over_time(train: bool):
  return nn.scan(
    LinenStep,
    variable_carry="batch_stats",
    variable_broadcast="params",
    split_rngs={"params": False},
  )(train)


def sequence():
  return jnp.asarray(X).reshape(2, N // 2, C)  # two steps of four examples


@cell(
  "linen",
  "nn.scan, variable_carry='batch_stats'",
  "one layer over a sequence: create the carried batch_stats before the scan, with the "
  "unscanned layer (flax#2052); = unrolled",
)
def linen_scan_carry():
  variables = jax.jit(LinenStep().init)(jax.random.key(0), (), sequence()[0])

  def scanned(params, xs):
    (_, ys), updates = linen_over_time(True).apply(
      {**variables, "params": params}, (), xs, mutable=["batch_stats"]
    )
    return ys, updates

  def unrolled(params, xs):
    layer = {**variables, "params": params}
    ys = []
    for x in xs:
      (_, y), updates = LinenStep().apply(layer, (), x, mutable=["batch_stats"])
      layer = {**layer, **updates}
      ys.append(y)
    return jnp.stack(ys), {"batch_stats": layer["batch_stats"]}

  def over_steps(f):
    def g(params, x):
      ys, state = f(params, x.reshape(2, N // 2, C))
      return ys.reshape(N, C), state

    return g

  check_same(over_steps(scanned), over_steps(unrolled), variables["params"])


@cell(
  "linen",
  "nn.scan, variable_carry, evaluating",
  "Flax: 'scan body function carry input and carry output must have the same pytree "
  "structure'; evaluate with mutable=['batch_stats'] (flax#3602)",
  "refused",
)
def linen_scan_carry_evaluation():
  variables = jax.jit(LinenStep().init)(jax.random.key(0), (), sequence()[0])
  evaluate = linen_over_time(False)
  with pytest.raises(TypeError, match="carry input and carry output must have the same pytree"):
    jax.jit(evaluate.apply)(variables, (), sequence())
  (_, ys), _ = jax.jit(lambda v, xs: evaluate.apply(v, (), xs, mutable=["batch_stats"]))(
    variables, sequence()
  )
  assert_close(ys, X.reshape(2, N // 2, C) / np.sqrt(1 + EPSILON), "evaluation with (0, 1)")


# flax.nnx: bnjax.nnx.BatchNorm ---------------------------------------------------


def nnx_layer(axis_name=None, rngs=None):
  import bnjax.nnx

  return bnjax.nnx.BatchNorm(
    C,
    momentum=MOMENTUM,
    epsilon=EPSILON,
    axis_name=axis_name,
    param_dtype=jnp.float64,
    rngs=rngs or nnx.Rngs(0),
  )


def nnx_train(model, run, x=X, dy=DY):
  """One step, the nnx way: ``nnx.jit`` and ``nnx.value_and_grad`` of
  ``sum(run(model, x) * dy)``, the model's statistics updated in place. Returns
  ``(y, grads of the model's Params, dx)``."""

  @nnx.jit
  def step(model, x, dy):
    def loss(model, x):
      y = run(model, x)
      return jnp.sum(y * dy), y

    (_, y), (grads, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, grads, dx

  return step(model, jnp.asarray(x), jnp.asarray(dy))


def nnx_step(run, axis_name=None):
  """``assert_step`` for a fresh layer under ``run(model, x: [N, C]) -> y``."""
  model = nnx_layer(axis_name)
  y, grads, dx = nnx_train(model, run)
  assert_step(y, model.mean[...], model.var[...], dx, grads["scale"][...], grads["bias"][...])
  return model


def nnx_call(model, x):
  return model(x)


def nnx_over_examples(axis_name="batch"):
  """``nnx.vmap`` over examples, the model passed in and broadcast."""
  return nnx.vmap(nnx_call, in_axes=(None, 0), axis_name=axis_name)


@cell("nnx", "nnx.jit", "the full batch")
def nnx_jit():
  nnx_step(nnx_call)


@cell(
  "nnx",
  "nnx.vmap, model broadcast",
  "the model an argument, in_axes=(None, 0), axis_name='batch'; calls after the first too "
  "(flax#4760, #4061)",
)
def nnx_vmap():
  model = nnx_step(nnx_over_examples(), "batch")
  first_mean, first_var = np.asarray(model.mean[...]), np.asarray(model.var[...])
  nnx_train(model, nnx_over_examples())  # the second call
  _, mean, var, *_ = full_batch()
  assert_close(model.mean[...], MOMENTUM * first_mean + (1 - MOMENTUM) * mean, "second mean")
  assert_close(model.var[...], MOMENTUM * first_var + (1 - MOMENTUM) * var, "second var")


@cell("nnx", "nested nnx.vmap", "axis_name=('outer', 'inner')")
def nnx_nested_vmap():
  inner = nnx_over_examples("inner")
  outer = nnx.vmap(inner, in_axes=(None, 0), axis_name="outer")
  nnx_step(lambda m, x: outer(m, x.reshape(2, N // 2, C)).reshape(N, C), ("outer", "inner"))


@cell("nnx", "nnx.vmap inside nnx.shard_map", "axis_name=('data', 'batch'); check_vma=False")
def nnx_shard_map_vmap():
  run = nnx.shard_map(
    nnx_over_examples(),
    mesh=mesh(),
    in_specs=(P(), P("data")),
    out_specs=P("data"),
    check_vma=False,
  )
  nnx_step(run, ("data", "batch"))


@cell("nnx", "nnx.remat", "state moved once, exact gradients")
def nnx_remat():
  nnx_step(nnx.remat(nnx_call))


@cell("nnx", "nnx.vmap, StateAxes (ensemble)", "each model its own batch and statistics")
def nnx_ensemble():
  models = nnx.vmap(lambda _: nnx_layer(), in_axes=0, out_axes=0)(jnp.arange(MEMBERS))
  run = nnx.vmap(nnx_call, in_axes=(nnx.StateAxes({...: 0}), 0))
  shares = X.reshape(MEMBERS, N // MEMBERS, C), DY.reshape(MEMBERS, N // MEMBERS, C)
  y, grads, dx = nnx_train(models, run, *shares)
  assert_members(y, models.mean[...], models.var[...], dx, grads["scale"][...], grads["bias"][...])


class NnxBlock(nnx.Module):
  """Dense (``kernel``) -> BN -> tanh."""

  def __init__(self, kernel, axis_name=None):
    self.kernel = nnx.Param(kernel)
    self.norm = nnx_layer(axis_name)

  def __call__(self, h):
    return jnp.tanh(self.norm(h @ self.kernel[...]))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def nnx_scan_blocks(h, block):
  return block(h)


@cell("nnx", "nnx.scan over layers", "layers made by nnx.vmap, in_axes=(nnx.Carry, 0); = unrolled")
def nnx_scan_layers():
  stack = nnx.vmap(NnxBlock, in_axes=0, out_axes=0)(stacked_kernels())
  graphdef, state = nnx.split(stack)

  def scanned(state, x):
    stack = nnx.merge(graphdef, state)
    y = nnx_scan_blocks(x, stack)
    return y, nnx.to_pure_dict(nnx.state(stack, nnx.BatchStat))

  def unrolled(state, x):
    states = []
    for i in range(LAYERS):
      block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
      x = block(x)
      states.append(nnx.to_pure_dict(nnx.state(block, nnx.BatchStat)))
    return x, jax.tree.map(lambda *a: jnp.stack(a), *states)

  check_same(scanned, unrolled, state)


@cell(
  "nnx",
  "nnx.vmap of a closure",
  "nnx.vmap(model): 'bnjax.nnx.BatchNorm cannot update its mean and var inside this "
  "transform: ... pass the module as an argument instead: nnx.vmap(lambda model, x: model(x), "
  "in_axes=(None, 0), axis_name='batch')(model, x) ...' (flax#4760; Flax's own: 'Cannot "
  "mutate BatchStat from a different trace level')",
  "fixed",
)
def nnx_vmap_closure():
  model = NnxBlock(stacked_kernels()[0], axis_name="batch")
  with pytest.raises(flax.errors.TraceContextError, match="pass the module as an argument"):
    nnx.vmap(model, axis_name="batch")(jnp.asarray(X))


@cell(
  "nnx",
  "nnx.vmap, model broadcast, no axis_name",
  "JAX: 'got axis spec None but output was batched on axis 0' (each lane's statistics differ); "
  "name the axis on both, or map the state: nnx.StateAxes({nnx.BatchStat: 0, ...: None})",
  "refused",
)
def nnx_vmap_without_axis_name():
  run = nnx.vmap(nnx_call, in_axes=(None, 0))
  with pytest.raises(ValueError, match="got axis spec None but output was batched on axis 0"):
    nnx.jit(run)(nnx_layer(), jnp.asarray(X).reshape(MEMBERS, N // MEMBERS, C))


# The matrix ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _float64(x64):
  """Every cell runs in float64."""


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.framework}-{c.transform}" for c in CELLS])
def test_cell(cell):
  cell.check()


FRAMEWORKS = ("core", "linen", "nnx", "equinox", "haiku")  # the table's order
HEADER = "| framework | transform | outcome | what is checked; the form that works; the error |"


def test_the_guide_shows_the_matrix():
  """docs/guide/transforms.md's table is ``CELLS``, framework by framework."""
  page = (ROOT / "docs" / "guide" / "transforms.md").read_text()
  want = [HEADER, *(c.row for c in sorted(CELLS, key=lambda c: FRAMEWORKS.index(c.framework)))]
  shown = [line for line in page.splitlines() if line.startswith("| ")]
  table = "\n".join([want[0], "|---|---|---|---|", *want[1:]])
  assert shown == want, f"docs/guide/transforms.md's table should read:\n{table}"
