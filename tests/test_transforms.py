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
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bnjax
from tests import reference
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
  with the reference to 1e-10; float32 ones (a state kept in float32) to 1e-6."""
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
  "JAX lost the vmap's axis sizes in the custom derivative: bnjax asks for them before it",
  "fixed",
)
def core_checkpoint_around_vmap():
  check_step(jax.checkpoint(core_over_examples), core_params(), core_scale_bias)


@cell(
  "core",
  "jax.grad outside jax.jit(jax.vmap(axis_name))",
  "the same JAX behavior; also lax.scan and lax.cond around the vmap",
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


# The matrix ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _float64(x64):
  """Every cell runs in float64."""


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.framework}-{c.transform}" for c in CELLS])
def test_cell(cell):
  cell.check()
