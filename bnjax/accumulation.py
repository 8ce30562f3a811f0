"""Batch norm under gradient accumulation: the running statistics move once per
optimizer step, with the exact statistics of all its micro-batches.

When a batch does not fit, its gradient is accumulated over ``k`` micro-batches
(a ``lax.scan`` over them, or ``optax.MultiSteps``) and the optimizer steps once.
Plain batch norm then moves its running statistics ``k`` times per optimizer step,
each time towards one micro-batch. Here, each micro-batch's call instead merges
that micro-batch's moments (count, mean and sum of squared deviations, per
feature; of every device of ``axis_name``; over the valid entries of ``mask``)
into a ``PendingUpdate`` (Chan, Golub & LeVeque, 1979: exact, not a mean of
variances), which also holds the running statistics after one update with the
merged moments. ``apply_pending`` installs those once, when the optimizer steps:

    pending = init_pending(state)
    for x in micro_batches:                       # inside the loss, under grad
      y, pending = accumulate_batch_norm(x, params, state, pending)
    state, pending = apply_pending(state, pending)  # where the optimizer stepped

so the running statistics after the step are those of one update with the
whole batch's exact statistics, as if it had fitted (the state passed in, the
one from before the step, is never modified).

Normalization within a micro-batch uses that micro-batch's statistics (of every
device of ``axis_name``): the forward and backward passes are those of ghost batch
norm with ``virtual_batch_size`` equal to the micro-batch size
(``bnjax.batch_norm``), each micro-batch one group (across devices, the union of
the devices' shares, where ghost batch norm's groups stay on their device).
Full-batch normalization is not to be had in one pass: each layer needs the whole
batch's statistics of its input before the next layer can run, so a network of L
layers would need L passes over all micro-batches per forward pass (and the
backward pass as many again), keeping or recomputing every layer's activations of
every micro-batch: the memory that accumulation saves.

The one accumulator bnjax had, ``PopulationStatistics`` (the paper's Algorithm 2),
sums the batches' means and variances: the expected batch variance, which drops
the spread between batch means. Accumulation needs the variance of the union,
which includes that spread; ``merge_moments`` gives it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _engine, stats, validation
from bnjax.batch_norm import BatchNormParams, BatchNormState
from bnjax.stats import Moments


class PendingUpdate(NamedTuple):
  """The update of the running statistics that waits for the optimizer step.

  A pytree of ``[*F]`` arrays (``F`` the feature shape): the merged moments of
  this optimizer step's micro-batches so far, and the running statistics one
  update with them gives. ``init_pending`` starts it, ``accumulate_batch_norm``
  adds a micro-batch, ``apply_pending`` installs ``next_state`` and starts the
  next step's. Constructing one checks nothing.

  >>> import bnjax
  >>> _, state = bnjax.init(2)
  >>> pending = init_pending(state)
  >>> pending.moments.count.tolist(), pending.next_state.var.tolist()
  ([0.0, 0.0], [1.0, 1.0])
  """

  moments: Moments  #: The micro-batches' merged ``Moments``, ``[*F]``; count 0 before the first.
  next_state: BatchNormState  #: The running statistics one update with ``moments`` gives.


def init_pending(state: BatchNormState) -> PendingUpdate:
  """No micro-batch yet: count 0, and ``next_state`` the running statistics as they are.

  Args:
    state: the running statistics (a ``BatchNormState`` of ``[*F]`` arrays).

  Returns:
    A ``PendingUpdate`` whose moments are zeros in the state's dtypes, at least
    float32 (the mean complex if the state's is), and whose ``next_state`` is
    ``state``.

  Raises:
    TypeError: a field of ``state`` not floating.

  >>> import bnjax
  >>> _, state = bnjax.init(3)
  >>> init_pending(state).moments.mean.dtype
  dtype('float32')
  """
  validation.check_floating_fields("state", [("mean", state.mean), ("var", state.var)])
  shape = jnp.shape(state.var)
  real = stats.statistics_dtype(state.var.dtype)
  moments = Moments(
    count=jnp.zeros(shape, real),
    mean=jnp.zeros(shape, stats.statistics_dtype(state.mean.dtype)),
    var=jnp.zeros(shape, real),
  )
  return PendingUpdate(moments=moments, next_state=state)


def merge_moments(a: Moments, b: Moments) -> Moments:
  """The moments of the union of two disjoint sets of values, exactly.

  Chan, Golub & LeVeque (1979), as ``bnjax.stats.combine_moments`` combines
  devices' moments: the variance of the union includes the spread between the
  two means (a mean of the two variances would drop it). Either may be empty
  (count 0). The result is in ``a``'s dtypes (an accumulator keeps its dtypes
  from one micro-batch to the next), its mean complex if either mean is.

  Exact up to the rounding of the two means to their dtype: the spread term's
  relative error is about ``eps * |mean| / std`` (float32: 1e-6 at a mean of 10
  standard deviations, 1e-4 at 1000), where one batch's own variance is exact at
  any offset (``bnjax.stats``).

  Args:
    a: ``Moments`` of ``[*F]`` arrays (the accumulator).
    b: ``Moments`` of the same shape (one more micro-batch).

  Returns:
    ``Moments`` of ``[*F]`` arrays: the counts added, the mean and the biased
    variance of all the values together.

  Raises:
    ValueError: ``a`` and ``b`` of shapes that differ.

  >>> zero_two = Moments(count=jnp.array([2.0]), mean=jnp.array([1.0]), var=jnp.array([1.0]))
  >>> four = Moments(count=jnp.array([1.0]), mean=jnp.array([4.0]), var=jnp.array([0.0]))
  >>> m = merge_moments(zero_two, four)  # the values 0, 2 and 4
  >>> m.count.tolist(), m.mean.tolist(), m.m2.tolist()
  ([3.0], [2.0], [8.0])
  """
  shapes = {jnp.shape(field) for field in (*a, *b)}
  if len(shapes) != 1:
    raise ValueError(f"merge_moments needs moments of one shape, got shapes {sorted(shapes)}")
  mean_dtype = a.mean.dtype
  if jnp.iscomplexobj(b.mean) and not jnp.iscomplexobj(a.mean):
    mean_dtype = stats.statistics_dtype(mean_dtype, jnp.complex64)
  dtypes = Moments(count=a.count.dtype, mean=mean_dtype, var=a.var.dtype)
  stacked = jax.tree.map(
    lambda u, v, dtype: jnp.stack([u.astype(dtype), v.astype(dtype)]), a, b, dtypes
  )
  return stats.combine_moments(stacked)


def accumulate_batch_norm(
  x: jax.Array,
  params: BatchNormParams | None,
  state: BatchNormState,
  pending: PendingUpdate,
  *,
  axis: int | Sequence[int] = -1,
  momentum: float | jax.Array = 0.99,
  epsilon: float = 1e-5,
  axis_name: Hashable | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  mask: jax.Array | None = None,
  unbiased_variance: bool = False,
  dtype: Any = None,
) -> tuple[jax.Array, PendingUpdate]:
  """Training-mode batch norm of one micro-batch; its moments join the pending update.

  ``y`` is ``bnjax.batch_norm``'s in training mode: ``x`` normalized with its own
  statistics (those of every device of ``axis_name`` together), with the same
  derivative. The running statistics ``state`` are not moved: the micro-batch's
  moments are merged into ``pending.moments`` (``merge_moments``), and
  ``pending.next_state`` becomes ``state`` after one update with all of them,
  ``momentum * state + (1 - momentum) * merged`` (mean, and biased or unbiased
  variance), so that ``apply_pending`` can install it when the optimizer steps.
  ``state`` must be the running statistics from before the optimizer step, the
  same for every micro-batch of the step. The pending update carries no gradient.

  Args:
    x: ``[..., *F, ...]`` floating or complex micro-batch.
    params: ``BatchNormParams`` of shape ``[*F]``, or None for no affine transform.
    state: ``BatchNormState`` of shape ``[*F]``: the running statistics before
      this optimizer step.
    pending: the ``PendingUpdate`` of this step's earlier micro-batches
      (``init_pending(state)`` before the first).
    axis: the feature axis or axes of ``x``.
    momentum: weight of the old running statistics, in [0, 1]; may be traced.
    epsilon: added to the variance before the square root; positive.
    axis_name: named axis (``pmap``/``shard_map``) whose devices' micro-batches
      together form the micro-batch.
    axis_index_groups: optional groups of indices along ``axis_name``, as
      ``bnjax.batch_norm``.
    mask: optional boolean, True for valid entries, broadcastable to ``x`` as
      ``bnjax.batch_norm`` reads it; only valid entries enter the moments.
    unbiased_variance: move the running variance towards the unbiased variance of
      all the merged values, ``n / (n - 1) * var``.
    dtype: dtype of ``y``; default ``x.dtype``.

  Returns:
    ``(y, pending)``: ``y`` of ``x``'s shape, and the ``PendingUpdate`` with this
    micro-batch merged in. A statistic that no micro-batch so far defines (every
    value masked out; for ``unbiased_variance``, fewer than two) stays in
    ``next_state`` as it is in ``state``.

  Raises:
    TypeError, ValueError, NameError, NotImplementedError: as ``bnjax.batch_norm``
      in training mode; ``ValueError`` also for ``pending``'s fields not of the
      feature shape of ``x``.

  >>> import bnjax
  >>> params, state = bnjax.init(1)
  >>> pending = init_pending(state)
  >>> for x in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):  # micro-batches
  ...   y, pending = accumulate_batch_norm(x, params, state, pending, momentum=0.0)
  >>> y.round(3).tolist()  # the second micro-batch, normalized with its own statistics
  [[-1.0], [1.0]]
  >>> pending.next_state.mean.tolist(), pending.next_state.var.tolist()  # of 0, 2, 4, 6
  ([3.0], [5.0])
  >>> state.mean.tolist()  # moved only by apply_pending
  [0.0]
  """
  validation.check_bool("unbiased_variance", unbiased_variance)
  inputs = _engine.prepare(
    x,
    params,
    state,
    training=True,
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    mask=mask,
    dtype=dtype,
  )
  feature_shape = tuple(inputs.x.shape[a] for a in inputs.features)
  for name, field in [
    *((f"pending.moments.{k}", v) for k, v in pending.moments._asdict().items()),
    *((f"pending.next_state.{k}", v) for k, v in pending.next_state._asdict().items()),
  ]:
    validation.check_feature_shape(name, field, feature_shape, inputs.x.shape, axis)
  config = _engine.training_config(
    inputs, epsilon, axis_name, axis_index_groups, unbiased_variance=unbiased_variance
  )
  y, moments, _ = _engine.normalize_training(config, inputs)
  merged = merge_moments(pending.moments, lax.stop_gradient(moments))
  next_state = _engine.updated_state(config, _engine.state_update(state, momentum), merged)
  return y, PendingUpdate(moments=merged, next_state=lax.stop_gradient(next_state))


def apply_pending(
  state: Any, pending: PendingUpdate, *, where: bool | jax.Array = True
) -> tuple[Any, PendingUpdate]:
  """Ends the optimizer step: installs ``pending.next_state`` and empties the moments.

  Call it once per optimizer step, after its last micro-batch: unconditionally
  after a ``lax.scan`` over the micro-batches, or with ``where`` the (traced)
  condition that the optimizer stepped, e.g. ``new.gradient_step >
  old.gradient_step`` of ``optax.MultiSteps``' states, as ``MultiSteps`` keeps
  its inner optimizer's state: computed at every micro-batch, kept where it
  steps.

  Args:
    state: the running statistics (a ``BatchNormState``, or any pytree of
      arrays of ``pending.next_state``'s structure, as the drop-ins keep).
    pending: this step's ``PendingUpdate``.
    where: a boolean scalar, possibly traced: whether the optimizer step ends
      here. Where False, both are returned as they are.

  Returns:
    ``(state, pending)``: the new running statistics (``pending.next_state``, in
    its dtypes) and the pending update of the next step (moments 0, the same
    ``next_state``); where ``where`` is False, ``state`` and ``pending``.

  Raises:
    ValueError: ``where`` not a scalar; ``state`` not of ``next_state``'s structure.
    TypeError: ``where`` not boolean.

  >>> import bnjax
  >>> params, state = bnjax.init(1)
  >>> _, pending = accumulate_batch_norm(jnp.array([[1.0], [3.0]]), params, state,
  ...                                    init_pending(state), momentum=0.5)
  >>> state, pending = apply_pending(state, pending)
  >>> state.mean.tolist(), pending.moments.count.tolist()  # 0.5 * 0 + 0.5 * 2
  ([1.0], [0.0])
  """
  where = jnp.asarray(where)
  if where.shape != ():
    raise ValueError(f"where must be a boolean scalar, got shape {where.shape}")
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean scalar, got dtype {where.dtype}")

  def installed(old, new):
    old = jnp.asarray(old)  # cast only where the dtypes differ: a weak type stays weak
    return jnp.where(where, new, old if old.dtype == new.dtype else old.astype(new.dtype))

  new_state = jax.tree.map(installed, state, pending.next_state)
  moments = jax.tree.map(lambda m: jnp.where(where, jnp.zeros_like(m), m), pending.moments)
  return new_state, PendingUpdate(moments=moments, next_state=pending.next_state)
