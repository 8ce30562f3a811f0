"""What ``bnjax.describe`` sees of each batch-norm call while it traces (private).

The public normalization functions carry ``@recorded(kind)``, and
``bnjax.sync_state`` ``@recorded_sync``. Outside
``bnjax.describe`` that costs one list check per trace; inside it, each call
appends a ``Call`` (its arguments, and what the trace knows of its input: the
shape on one device, the device axes in scope) and runs inside a named scope of
its own, ``SCOPE.format(index)``, which every operation it lowers to carries in
the jaxpr (backward passes included), so that ``describe`` finds the collectives
each layer emits.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
from jax import lax

from bnjax import validation

SCOPE = "bnjax_statistics_{}"
_active: list[Trace] = []


class Call(NamedTuple):
  """One normalization call, as traced."""

  index: int  # its place among the calls of the trace
  kind: str  # "batch_norm" or "batch_renorm"
  shape: tuple[int, ...]  # the input's shape (on one device inside pmap/shard_map)
  dtype: str  # the input's dtype
  features: tuple[int, ...]  # its feature axes
  reduced: tuple[int, ...]  # the other axes
  training: bool
  momentum: float | None  # None: traced (or not a number)
  axis_names: tuple[Hashable, ...]  # axis_name as a tuple, () for None
  axis_sizes: dict[Hashable, int]  # each named axis's size
  groups: tuple[tuple[int, ...], ...] | None  # axis_index_groups
  virtual_batch_size: int | None
  masked: bool
  mesh_axes: dict[str, int]  # manual (pmap, shard_map) mesh axes in scope and their sizes
  varying: frozenset | None  # the manual axes the input varies along, where JAX tracks it
  batch_axes: dict[str, int]  # mesh axes splitting the input's axis 0 (explicit sharding), sizes


class Trace(NamedTuple):
  """What ``recording`` collects from one trace."""

  calls: list[Call]  # the normalization calls, in order
  synchronized: list[tuple[Hashable, ...]]  # the axes of each bnjax.sync_state call


def _number(value) -> float | None:
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _named(axis_name) -> tuple[Hashable, ...]:
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _mesh(x) -> tuple[dict[str, int], dict[str, int]]:
  """The manual mesh axes in scope, and the mesh axes splitting ``x``'s axis 0, with
  their sizes."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
  if mesh is None or not mesh.axis_names:
    return {}, {}
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  manual = {
    name: sizes[name]
    for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if kind == jax.sharding.AxisType.Manual
  }
  leading = spec[0] if spec is not None and len(spec) else None
  batch = () if leading is None else (leading if isinstance(leading, tuple) else (leading,))
  return manual, {name: sizes[name] for name in batch}


def _varying(x) -> frozenset | None:
  """The manual mesh axes along which ``x`` differs between devices, as shard_map's
  type checking (``check_vma``) tracks them; None where they are not tracked
  (``pmap``, ``check_vma=False``: there JAX records none)."""
  varying = getattr(getattr(jax.typeof(x), "mat", None), "varying", None)
  return frozenset(varying) if varying else None


def _call(kind: str, arguments: dict[str, Any]) -> Call:
  x = arguments["x"]
  axes = validation.input_axes(jax.numpy.shape(x), arguments["axis"])
  names = _named(arguments["axis_name"])
  mesh_axes, batch_axes = _mesh(x)
  groups = arguments["axis_index_groups"]
  return Call(
    index=len(_active[-1].calls),
    kind=kind,
    shape=tuple(jax.numpy.shape(x)),
    dtype=str(jax.numpy.result_type(x)),
    features=axes.features,
    reduced=axes.reduction,
    training=bool(arguments["training"]),
    momentum=_number(arguments["momentum"]),
    axis_names=names,
    axis_sizes={name: lax.axis_size(name) for name in names},
    groups=None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
    virtual_batch_size=arguments.get("virtual_batch_size"),
    masked=arguments["mask"] is not None,
    mesh_axes=mesh_axes,
    varying=_varying(x),
    batch_axes=batch_axes,
  )


def recorded(kind: str):
  """Decorates a normalization function so that ``bnjax.describe`` sees its calls."""

  def decorate(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
      if not _active:
        return function(*args, **kwargs)
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      try:
        call = _call(kind, bound.arguments)
      except (TypeError, ValueError, NameError):  # a bad call: the function says what is wrong
        return function(*args, **kwargs)
      _active[-1].calls.append(call)
      with jax.named_scope(SCOPE.format(call.index)):
        return function(*args, **kwargs)

    return wrapper

  return decorate


def recorded_sync(function):
  """Decorates ``bnjax.sync_state``: ``describe`` sees which axes it averages over."""

  @functools.wraps(function)
  def wrapper(state, axis_name):
    if _active:
      _active[-1].synchronized.append(_named(axis_name))
    return function(state, axis_name)

  return wrapper


@contextlib.contextmanager
def recording():
  """Collects a ``Trace`` of every decorated call traced inside it, in order."""
  trace = Trace(calls=[], synchronized=[])
  _active.append(trace)
  try:
    yield trace
  finally:
    _active.pop()
