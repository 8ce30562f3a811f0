"""What each batch-norm layer's statistics cover, read from a trace: ``describe``.

"It's very easy to implement SyncBN incorrectly" (tensorflow #18222), and the
mistakes are silent: examples that synchronize nothing (flax #319), an
``axis_name`` that no device axis backs (flax #2606), per-device statistics of
which device 0's copy is saved (timm #45), a move from ``pmap`` to ``jit`` that
turns per-device statistics into global ones (algorithmic-efficiency #848).
``describe(fn, *args)`` traces ``fn`` once (``jax.make_jaxpr``: nothing runs on a
device, nothing compiles) and lists, for every ``bnjax`` normalization it calls
(the core, ``batch_renorm`` and the four drop-ins, which call the core), what its
statistics are taken over and what they cost.

How each field is found. Each call records its arguments and what the trace knows
of its input (its shape on one device, the ``pmap``/``shard_map`` axes in scope,
an explicit sharding of its batch axis), and runs inside a named scope of its own
while ``describe`` traces. The bytes are read from the operations the trace holds
in that scope, forward and backward: the collectives' operands under
``pmap``/``shard_map``; under ``jit`` with a sharded batch, the per-feature sums
over the batch axis, which XLA turns into all-reduces of their results. Only what
XLA keeps counts (operations whose results are used, on values that derive from
``fn``'s arguments), and a ``lax.cond`` costs its cheapest branch, the rest
counting as conditional. So the report follows the code, whatever the exchange
looks like; ``tests/test_describe.py`` checks it against the compiled programs.

No library does this: Flax's ``tabulate`` lists parameters and shapes, and nothing
reads which devices a normalization's statistics span.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

import jax
import jax.extend
import numpy as np

from bnjax import _recording

# A value JAX's caches are keyed on: each describe traces afresh, even a function
# already traced (its Python then runs again, and the calls are seen).
_FRESH_TRACE = jax.make_user_context(default_value=None)
_TRACES = itertools.count()

_COLLECTIVES = {
  "psum",
  "psum_invariant",
  "pmax",
  "pmin",
  "all_gather",
  "all_gather_invariant",
  "all_to_all",
  "ppermute",
  "psum_scatter",
  "reduce_scatter",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"}
_SCOPE = re.compile(_recording.SCOPE.format(r"(\d+)"))
_TRANSFORM = re.compile(r"[\w.]+\(|\)")  # the "jvp(" and ")" of jvp(M), transpose(jvp(M)), ...


class StatisticsScopeWarning(UserWarning):
  """A layer whose statistics change scope between ``pmap`` and ``jit``.

  Issued by ``bnjax.describe(..., warn=True)`` for a layer without ``axis_name``:
  under ``jit`` with a sharded batch its statistics are the global batch's, where
  under ``pmap`` the same layer took each device's (or the reverse).

  Args:
    *args: the message, as for any warning.
    **kwargs: as for any warning (none are read).

  >>> issubclass(StatisticsScopeWarning, UserWarning)
  True
  """


class LayerStatistics(NamedTuple):
  """What one normalization call's statistics cover (a row of ``describe``'s report).

  ``device_axes`` are ``axis_name``'s axes (``pmap``, ``shard_map`` or ``vmap``) or,
  under ``jit``, the mesh axes splitting the batch. ``running_statistics`` is
  ``"replicated"`` (every device returns the same), ``"per device (axis: n)"``
  (device axes in scope that the statistics do not span, where each device
  returns its own), ``"per group of k"`` (``axis_index_groups``), ``"replicated
  (sync_state)"`` (per device or group, then averaged by a ``bnjax.sync_state``
  over those axes in the same trace) or ``"not updated"`` (evaluation).

  >>> row = LayerStatistics("bn", "batch_norm", (8, 4), "float32", (1,), (0,), (), 1, 8,
  ...                       8, "replicated", 0.9, 0, 0, 0, ())
  >>> row.examples, row.running_statistics
  (8, 'replicated')
  """

  name: str  #: Module path from the trace's name stack (e.g. Flax's), else ``#<index>``.
  kind: str  #: ``"batch_norm"`` or ``"batch_renorm"`` (the drop-ins call ``batch_norm``).
  input_shape: tuple[int, ...]  #: The input's shape: on one device under pmap/shard_map.
  dtype: str  #: The input's dtype.
  feature_axes: tuple[int, ...]  #: Axes of the input kept (one statistic per entry).
  reduced_axes: tuple[int, ...]  #: Axes of the input reduced over.
  device_axes: tuple[Hashable, ...]  #: Named (or, under jit, mesh) axes the statistics span.
  devices: int  #: Devices (or vmap lanes) whose values make one statistic.
  examples: int  #: Examples per statistic: rows of axis 0 (1 if it is kept) times devices.
  values: int  #: Values per statistic: examples times the other reduced axes' sizes.
  running_statistics: str  #: ``replicated``, ``per device (...)``, ``per group of k``, ...
  momentum: float | None  #: The running average's momentum; None: traced or not updated.
  forward_bytes: int  #: Bytes each device sends into the training forward's exchange.
  backward_bytes: int  #: The same for the backward pass (0 when not differentiated).
  conditional_bytes: int  #: More, in the costlier branches of a ``lax.cond`` (a second pass).
  collectives: tuple[str, ...]  #: The exchange's operations, as the trace holds them.


class StatisticsReport(tuple):
  """``describe``'s report: a tuple of ``LayerStatistics``, printed as a table.

  Args:
    layers: ``LayerStatistics``, one per normalization call, in trace order.

  >>> import bnjax
  >>> params, state = bnjax.init(3)
  >>> forward = lambda x: bnjax.batch_norm(x, params, state, training=True)
  >>> report = describe(forward, jax.numpy.ones((4, 3)))
  >>> len(report), report[0].examples, report[0].running_statistics
  (1, 4, 'replicated')
  """

  def __init__(self, layers: Iterable[LayerStatistics] = ()):
    """A report of ``layers`` (``tuple.__new__`` stores them)."""
    super().__init__()

  def __str__(self) -> str:
    return _format_table(self)

  def summary(self) -> str:
    """The report in a few lines, one per distinct coverage (for a run's log).

    Layers whose statistics span the same axes, devices and examples, with the
    same running statistics and momentum, share a line, which adds up their
    exchange. Evaluation-mode layers share one line.

    Returns:
      The lines, joined by newlines ("" for no layer).
    """
    groups: dict[tuple, list[LayerStatistics]] = {}
    for layer in self:
      key = (layer.running_statistics == "not updated", layer.device_axes, layer.devices)
      key += (layer.examples, layer.running_statistics, layer.momentum)
      groups.setdefault(key, []).append(layer)
    return "\n".join(_summary_line(layers) for layers in groups.values())


def _module_path(stack: str, scope: str) -> str:
  """The names before the layer's ``scope`` in a name stack, transforms removed:
  ``transpose(jvp(M))/BatchNorm_0/jvp(M)/BatchNorm_0/<scope>`` is ``M/BatchNorm_0``."""
  names = [n for n in _TRANSFORM.sub("", stack).split("/") if n]
  return "/".join(dict.fromkeys(names[: names.index(scope)] if scope in names else []))


class _Operation(NamedTuple):
  primitive: str
  axes: tuple  # the collective's named axes, or the reduction's positional axes
  operand_shapes: tuple[tuple[int, ...], ...]
  operand_bytes: int
  result_bytes: int
  backward: bool  # in a transposed (reverse-mode) pass
  branches: tuple[tuple[int, int, int], ...]  # (cond, branch, branches) of each cond it is in
  manual: bool  # inside shard_map (or pmap)
  from_arguments: bool  # its operand derives from fn's arguments (not a constant)


def _is_var(atom) -> bool:
  return isinstance(atom, jax.extend.core.Var)


def _live(jaxpr, used: list[bool] | None = None) -> tuple[set[int], set]:
  """``(equations, variables)`` of ``jaxpr`` that are live: the ``id``s of the
  equations whose results its outputs (``used`` of them; all by default) need or
  that have effects, and the variables they read. The rest is dead code, which
  XLA removes with whatever exchange it would have made."""
  used = [True] * len(jaxpr.outvars) if used is None else used
  live_vars = {v for v, u in zip(jaxpr.outvars, used, strict=True) if u and _is_var(v)}
  live = set()
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live_vars for v in eqn.outvars):
      live.add(id(eqn))
      live_vars.update(v for v in eqn.invars if _is_var(v))
  return live, live_vars


def _used_outputs(eqn, live_vars_of_parent: set | None) -> list[bool] | None:
  """Which outputs of a sub-jaxpr of ``eqn`` are used: those of ``eqn``'s own
  outputs that are, where they correspond one to one (cond branches, jit,
  shard_map, custom_jvp); else all (None)."""
  return None if live_vars_of_parent is None else [v in live_vars_of_parent for v in eqn.outvars]


class _Context(NamedTuple):
  """Where a (sub-)jaxpr sits in the traced function."""

  stack: str = ""  # the name stack of the equation that holds it
  branches: tuple[tuple[int, int, int], ...] = ()  # (cond, branch, branches) around it
  manual: bool = False  # inside shard_map (or pmap)
  used: list[bool] | None = None  # which of its outputs are used (None: all)
  data: list[bool] | None = None  # which of its inputs derive from fn's arguments (None: all)


def _operations(jaxpr, context: _Context | None = None):
  """``(layer index, name stack, _Operation or None)`` for every live operation in
  a layer's scope (an ``_Operation`` for collectives and reductions)."""
  context = context or _Context()
  live, live_vars = _live(jaxpr, context.used)
  flags = context.data or [True] * len(jaxpr.invars)
  data = {v for v, d in zip(jaxpr.invars, flags, strict=True) if d}
  for eqn in jaxpr.eqns:
    if any(v in data for v in eqn.invars if _is_var(v)):
      data.update(eqn.outvars)
    if id(eqn) not in live:
      continue
    full = f"{context.stack}/{eqn.source_info.name_stack}"
    matches = list(_SCOPE.finditer(full))
    if matches:
      index, scope = int(matches[-1].group(1)), matches[-1].group(0)
      counted = eqn.primitive.name in _COLLECTIVES or eqn.primitive.name in _REDUCTIONS
      operation = _operation(eqn, full, context, data) if counted else None
      yield index, _module_path(full, scope), operation
    yield from _inner_operations(eqn, context._replace(stack=full), live_vars, data)


def _inner_operations(eqn, context: _Context, live_vars, data):
  """``_operations`` of the jaxprs inside ``eqn``."""
  name = eqn.primitive.name
  manual = context.manual or name in ("shard_map", "xla_pmap")
  operands = eqn.invars[1:] if name == "cond" else eqn.invars  # a cond's first is its index
  one_to_one = name in ("cond", "jit", "pjit", "shard_map", "custom_jvp_call")
  used = [v in live_vars for v in eqn.outvars] if one_to_one else None
  flags = [_is_var(v) and v in data for v in operands]
  if name == "cond":  # each branch apart: one of them runs
    count = len(eqn.params["branches"])
    for i, branch in enumerate(eqn.params["branches"]):
      where = (*context.branches, (id(eqn), i, count))
      inner = context._replace(branches=where, manual=manual, used=used, data=flags)
      yield from _operations(branch.jaxpr, inner)
    return
  for sub in _subjaxprs(eqn):
    fits = one_to_one and len(sub.outvars) == len(used) and len(sub.invars) == len(flags)
    everything = [any(flags)] * len(sub.invars)
    inner = context._replace(
      manual=manual, used=used if fits else None, data=flags if fits else everything
    )
    yield from _operations(sub, inner)


def _operation(eqn, full, context: _Context, data) -> _Operation:
  shapes = tuple(tuple(v.aval.shape) for v in eqn.invars if hasattr(v.aval, "shape"))
  axes = eqn.params.get("axes", ())
  return _Operation(
    primitive=eqn.primitive.name,
    axes=tuple(axes) if isinstance(axes, (tuple, list)) else (axes,),
    operand_shapes=shapes,
    operand_bytes=sum(_nbytes(v.aval) for v in eqn.invars if hasattr(v.aval, "shape")),
    result_bytes=sum(_nbytes(v.aval) for v in eqn.outvars),
    backward="transpose(" in full,
    branches=context.branches,
    manual=context.manual,
    from_arguments=bool(eqn.invars) and _is_var(eqn.invars[0]) and eqn.invars[0] in data,
  )


def _cost(counted: list[tuple[_Operation, int]], depth: int = 0) -> tuple[int, int]:
  """``(always, conditional)`` bytes of ``counted`` operations: outside any
  ``lax.cond`` always, and for each cond its cheapest branch always (one branch
  runs), the rest of its costliest branch conditionally."""
  always = sum(b for op, b in counted if len(op.branches) == depth)
  conditional = 0
  conds: dict[int, dict[int, list]] = {}
  sizes: dict[int, int] = {}
  for op, b in counted:
    if len(op.branches) > depth:
      cond, branch, count = op.branches[depth]
      conds.setdefault(cond, {}).setdefault(branch, []).append((op, b))
      sizes[cond] = count
  for cond, by_branch in conds.items():
    costs = [_cost(by_branch.get(i, []), depth + 1) for i in range(sizes[cond])]
    cheapest = min(a for a, _ in costs)
    always += cheapest
    conditional += max(a + c for a, c in costs) - cheapest
  return always, conditional


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


class _BatchSharding(NamedTuple):
  """How ``describe``'s arguments split their batch axis under ``jit``."""

  axes: tuple[str, ...]  # mesh axes
  devices: int
  size: int  # the global batch: the arguments' axis 0


def _batch_shardings(args) -> list[_BatchSharding]:
  """The mesh axes splitting axis 0 of ``args``' arrays (``NamedSharding`` only)."""
  found = []
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not len(spec) or spec[0] is None or not np.ndim(leaf):
      continue
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    devices = math.prod(mesh.shape[a] for a in axes)
    found.append(_BatchSharding(tuple(axes), devices, np.shape(leaf)[0]))
  return found


def _like(shape, expected) -> bool:
  """``shape`` is ``expected`` up to size-1 axes (a statistic kept broadcastable)."""
  if len(shape) != len(expected):
    return False
  return all(a in (b, 1) for a, b in zip(shape, expected, strict=True))


def _split_factors(shape, call: _recording.Call, split: _BatchSharding) -> dict[int, int]:
  """How many ways each axis of an operand of the layer is split over devices,
  where it holds the batch as ``jit`` splits it: ``x`` itself (axis 0 over every
  device), and under ghost batch norm ``x`` grouped ``[G, V, ...]`` and per-group
  statistics ``[G, ...]`` (the groups over as many devices as divide them, the
  rest of the devices within each group, outermost first as XLA propagates them)."""
  rows, devices = call.shape[0], split.devices
  if shape and shape[0] == rows and _like(shape, call.shape):
    return {0: devices}
  virtual = call.virtual_batch_size if call.training else None
  if not virtual or not shape or shape[0] != rows // virtual:
    return {}
  across = math.gcd(devices, rows // virtual)
  grouped = (rows // virtual, virtual, *call.shape[1:])
  features = (rows // virtual, *(call.shape[a] for a in call.features))
  if _like(shape, grouped):
    return {0: across, 1: devices // across} if shape[1] == virtual else {0: across}
  return {0: across} if tuple(shape) == features else {}


def _jit_split(call: _recording.Call, shardings) -> _BatchSharding | None:
  """Under ``jit``: how the call's batch axis is split over devices, if it is."""
  if call.mesh_axes or 0 not in call.reduced:
    return None
  if call.batch_axes:  # explicit sharding: the input's type says
    return _BatchSharding(
      tuple(call.batch_axes), math.prod(call.batch_axes.values()), call.shape[0]
    )
  matching = [s for s in shardings if s.size == call.shape[0] and s.devices > 1]
  return matching[0] if matching else None


def _exchange(call, operations, split: _BatchSharding | None):
  """``(forward, backward, conditional bytes, collectives)`` of one layer."""
  counted = []
  for op in operations:
    if op.primitive in _COLLECTIVES:
      if not set(op.axes) & set(call.mesh_axes):  # over vmap lanes: no device exchange
        continue
      counted.append((op, op.operand_bytes, f"{op.primitive}{list(op.axes)} {op.operand_shapes}"))
    elif split is not None and not op.manual and op.operand_shapes and op.from_arguments:
      shape = op.operand_shapes[0]
      factors = _split_factors(shape, call, split)
      if set(factors) & set(op.axes):  # reduced across devices: an all-reduce of the result
        kept = math.prod(f for axis, f in factors.items() if axis not in op.axes)
        counted.append((op, op.result_bytes // kept, f"all-reduce of {op.primitive} {shape}"))
  forward, forward_extra = _cost([(op, b) for op, b, _ in counted if not op.backward])
  backward, backward_extra = _cost([(op, b) for op, b, _ in counted if op.backward])
  texts = tuple(dict.fromkeys(text for *_, text in counted))
  return forward, backward, forward_extra + backward_extra, texts


class _Coverage(NamedTuple):
  axes: tuple[Hashable, ...]
  devices: int
  examples: int
  values: int


def _coverage(call: _recording.Call, split: _BatchSharding | None) -> _Coverage:
  """What one statistic spans: its device axes, devices, examples and values."""
  rows = call.shape[0] if 0 in call.reduced else 1
  values = math.prod(call.shape[a] for a in call.reduced)
  virtual = call.virtual_batch_size if call.training else None
  if split is not None:  # jit: the shape is the global batch's
    if virtual:
      devices = max(1, virtual * split.devices // rows)
      return _Coverage(split.axes, devices, virtual, values // rows * virtual)
    return _Coverage(split.axes, split.devices, rows, values)
  if virtual:
    return _Coverage((), 1, virtual, values // rows * virtual)
  size = math.prod(call.axis_sizes.values())
  if call.groups is not None:
    size = max(len(g) for g in call.groups)
  return _Coverage(call.axis_names, size, rows * size, values * size)


def _running(call: _recording.Call, devices: int, split, synchronized: set) -> str:
  """Whether the running statistics ``fn`` returns agree across devices; axes that
  a ``bnjax.sync_state`` in the trace averages over count as synchronized."""
  if not call.training:
    return "not updated"
  if split is not None:
    return "replicated"
  differing = call.mesh_axes if call.varying is None else call.varying
  apart = [a for a in call.mesh_axes if a in differing and a not in call.axis_names]
  grouped = call.groups is not None and len(call.groups) > 1 and not call.virtual_batch_size
  if (apart or grouped) and set(apart) | set(call.axis_names if grouped else ()) <= synchronized:
    return "replicated (sync_state)"
  if apart:
    return "per device (" + ", ".join(f"{a}: {call.mesh_axes[a]}" for a in apart) + ")"
  return f"per group of {devices}" if grouped else "replicated"


def _layer(call: _recording.Call, operations, path, shardings, synchronized) -> LayerStatistics:
  split = _jit_split(call, shardings)
  coverage = _coverage(call, split)
  forward, backward, conditional, collectives = _exchange(call, operations, split)
  return LayerStatistics(
    name=path or f"#{call.index}",
    kind=call.kind,
    input_shape=call.shape,
    dtype=call.dtype,
    feature_axes=call.features,
    reduced_axes=call.reduced,
    device_axes=coverage.axes,
    devices=coverage.devices,
    examples=coverage.examples,
    values=coverage.values,
    running_statistics=_running(call, coverage.devices, split, synchronized),
    momentum=call.momentum if call.training else None,
    forward_bytes=forward,
    backward_bytes=backward,
    conditional_bytes=conditional,
    collectives=collectives,
  )


def describe(fn: Callable[..., Any], *args, warn: bool = False, **kwargs) -> StatisticsReport:
  """What each batch-norm layer ``fn`` calls takes its statistics over, from one trace.

  ``fn(*args, **kwargs)`` is traced with ``jax.make_jaxpr`` (nothing runs, nothing
  compiles): a training step, a model's ``apply``, a ``pmap``-ed or ``jit``-ed
  function, with real arrays or ``jax.ShapeDtypeStruct`` s. Every call of
  ``bnjax.batch_norm`` and ``bnjax.batch_renorm`` in it, from the drop-ins too,
  becomes a row: which input axes are reduced and across which device (or vmap)
  axes, how many devices and examples make one statistic, whether the running
  statistics stay replicated or differ per device, the momentum, and the bytes the
  layer's exchange moves, read from the operations it traced to (see the module).

  Under ``jit`` with the batch sharded and no ``axis_name``, the statistics are
  those of the global batch: a layer's batch counts as split the way the
  arguments' axis 0 of the same size is split (``NamedSharding``), or as its
  input's explicit sharding says. Under ``pmap``/``shard_map``, over the named
  axes of ``axis_name`` (and its groups); the other device axes in scope keep
  their statistics apart ("per device").

  Args:
    fn: the function to trace, e.g. a training step.
    *args: its arguments (arrays, or ``jax.ShapeDtypeStruct`` with their
      ``sharding`` for ``jit``).
    warn: issue a ``StatisticsScopeWarning`` for each layer whose statistics
      would change scope between ``pmap`` and ``jit`` (no ``axis_name``: per
      device under ``pmap``, global under ``jit`` with a sharded batch).
    **kwargs: its keyword arguments.

  Returns:
    A ``StatisticsReport``, one ``LayerStatistics`` per call in trace order;
    ``print`` shows it as a table.

  Raises:
    Whatever tracing ``fn`` raises.

  >>> import bnjax
  >>> params, state = bnjax.init(3)
  >>> forward = lambda x: bnjax.batch_norm(x, params, state, training=True, axis_name="batch")
  >>> devices = jax.devices()[:1]  # on 8 devices: 8 and 32 below
  >>> step = jax.pmap(forward, axis_name="batch", devices=devices)
  >>> row, = describe(step, jax.numpy.ones((len(devices), 4, 3)))  # 4 examples a device
  >>> row.device_axes, row.devices, row.examples, row.running_statistics
  (('batch',), 1, 4, 'replicated')
  """
  with _recording.recording() as trace, _FRESH_TRACE(next(_TRACES)):
    closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
  calls, synchronized = trace.calls, {a for axes in trace.synchronized for a in axes}
  operations: dict[int, list[_Operation]] = {call.index: [] for call in calls}
  paths: dict[int, str] = {}
  for index, path, operation in _operations(closed.jaxpr):
    paths.setdefault(index, path)
    if operation is not None:
      operations.setdefault(index, []).append(operation)
  shardings = _batch_shardings(args)
  report = StatisticsReport(
    _layer(c, operations[c.index], paths.get(c.index, ""), shardings, synchronized) for c in calls
  )
  if warn:
    for layer, call in zip(report, calls, strict=True):
      _warn_scope(layer, call)
  return report


def _warn_scope(layer: LayerStatistics, call: _recording.Call) -> None:
  if not call.training or call.axis_names or call.virtual_batch_size or not layer.examples:
    return
  if call.mesh_axes:  # pmap/shard_map, no axis_name: each device's statistics
    devices = math.prod(call.mesh_axes.values())
    warnings.warn(
      f"{layer.name}: statistics of each device's {layer.examples} examples (no axis_name); "
      f"under jit with this batch sharded over the {devices} devices they would be the global "
      f"batch's ({layer.examples * devices} examples). To keep them per device under jit: "
      f"virtual_batch_size={layer.examples}; to make them global here: axis_name=...",
      StatisticsScopeWarning,
      stacklevel=3,
    )
  elif layer.devices > 1:  # jit, batch sharded: the global batch's
    per_device = layer.examples // layer.devices
    warnings.warn(
      f"{layer.name}: statistics of the global batch ({layer.examples} examples on "
      f"{layer.devices} devices); under pmap without axis_name this layer took each device's "
      f"({per_device} examples). To keep per-device statistics under jit: "
      f"virtual_batch_size={per_device}",
      StatisticsScopeWarning,
      stacklevel=3,
    )


def _summary_line(layers: list[LayerStatistics]) -> str:
  first, count = layers[0], f"{len(layers)} layer{'s' * (len(layers) != 1)}"
  if first.running_statistics == "not updated":
    return f"{count} in evaluation mode: normalized with the running statistics"
  axes = ",".join(map(str, first.device_axes))
  if not axes:
    axes = "each device's batch" if first.running_statistics != "replicated" else "the batch"
  momentum = "traced" if first.momentum is None else f"{first.momentum:g}"
  forward = sum(layer.forward_bytes for layer in layers)
  backward = sum(layer.backward_bytes for layer in layers)
  return (
    f"{count}: statistics over {axes} ({first.devices} device{'s' * (first.devices != 1)}, "
    f"{first.examples} examples), running statistics {first.running_statistics}, momentum "
    f"{momentum}; exchange {_bytes(forward)} + {_bytes(backward)} (forward + backward)"
  )


def _bytes(count: int) -> str:
  return f"{count:,} B"


def _row(layer: LayerStatistics) -> list[str]:
  dtype = {"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16"}
  reduced = ",".join(map(str, layer.reduced_axes)) or "-"
  if not layer.momentum and layer.running_statistics == "not updated":
    return [
      layer.name,
      f"{dtype.get(layer.dtype, layer.dtype)}[{','.join(map(str, layer.input_shape))}]",
      "running statistics (evaluation)",
    ]
  exchange = f"{_bytes(layer.forward_bytes)} + {_bytes(layer.backward_bytes)}"
  if layer.conditional_bytes:
    exchange += f" (+{_bytes(layer.conditional_bytes)} in branches)"
  return [
    layer.name,
    f"{dtype.get(layer.dtype, layer.dtype)}[{','.join(map(str, layer.input_shape))}]",
    reduced,
    ",".join(map(str, layer.device_axes)) or "-",
    str(layer.devices),
    str(layer.examples),
    layer.running_statistics,
    "traced" if layer.momentum is None else f"{layer.momentum:g}",
    exchange,
  ]


_HEADER = [
  "layer",
  "input",
  "reduced axes",
  "device axes",
  "devices",
  "examples",
  "running statistics",
  "momentum",
  "exchange (fwd + bwd)",
]


def _format_table(layers) -> str:
  """``layers`` (``LayerStatistics``) as an aligned text table, one line each."""
  rows = [_HEADER] + [_row(layer) for layer in layers]
  widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(_HEADER))]
  lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
  return "\n".join(lines)
