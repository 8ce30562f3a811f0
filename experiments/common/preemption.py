"""Stopping at a step all hosts agree on, with a checkpoint, when the machine is taken.

A Cloud TPU VM gets SIGTERM before maintenance or a spot/preemptible reclaim.
``Preemption`` turns that notice into a clean stop::

    with common.Preemption() as preemption:
      for step in ...:
        state = train_step(state, batch)
        preemption.check(step, checkpoints, lambda: state)   # raises Preempted at the agreed step

* One process: SIGTERM, and Ctrl-C (SIGINT; a second Ctrl-C interrupts at
  once), set a flag that ``check`` reads at the next step boundary.
* Several processes (``jax.distributed``): JAX's preemption service
  (``multihost_utils.reached_preemption_sync_point``, started by
  ``jax.distributed.initialize``; it catches SIGTERM itself) makes every process
  stop at the same step, however many of them got the signal. ``check`` must then
  be called at every step on every process.

At that step ``check`` saves a checkpoint (unless one of that step was just
saved), waits until it and its integrity record are written, and raises
``Preempted``; ``cli.exit_on_error`` prints one line,
``preempted at step N; checkpoint saved; run the same command to continue``, and
exits with ``PREEMPTED_EXIT_STATUS`` (75, ``EX_TEMPFAIL`` of sysexits.h: "try
again later"), which a restart loop tests for.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import jax

from experiments.common.errors import RunError

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL


class Preempted(RunError):
  """The run stopped at ``step`` after a preemption notice; its checkpoint is saved."""

  def __init__(self, step: int):
    super().__init__(
      f"preempted at step {step}; checkpoint saved; run the same command to continue"
    )
    self.step = step


class Preemption:
  """Whether a preemption notice (SIGTERM, or Ctrl-C on one machine) has come,
  and at which step to stop (see the module docstring). A context manager: the
  signal handlers are installed on entry (main thread only) and restored on exit."""

  def __init__(self):
    self.requested = False
    self._previous: dict[int, Any] = {}

  @staticmethod
  def _distributed() -> bool:
    from jax._src import distributed

    return jax.process_count() > 1 and distributed.global_state.client is not None

  def __enter__(self) -> Preemption:
    if threading.current_thread() is not threading.main_thread():
      return self
    signals = [signal.SIGINT] if self._distributed() else [signal.SIGTERM, signal.SIGINT]
    for number in signals:  # under jax.distributed, JAX's service handles SIGTERM
      self._previous[number] = signal.signal(number, self._notice)
    return self

  def __exit__(self, *exc_info) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()

  def _notice(self, number, frame) -> None:
    if number == signal.SIGINT and (self.requested or self._distributed()):
      raise KeyboardInterrupt  # a second Ctrl-C, or one host of several: stop now
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to stop at ``step`` (every process gets the same answer)."""
    if self._distributed():
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step) or self.requested
    return self.requested

  def check(
    self,
    step: int,
    checkpoints,
    state: Callable[[], Any],
    *,
    save: Callable[[int, Any], None] | None = None,
  ) -> None:
    """At the agreed step: save ``state()`` as ``step`` (unless ``checkpoints``
    already holds it), wait for the write, raise ``Preempted(step)``.

    Args:
      step: the number of steps taken.
      checkpoints: the run's ``Checkpoints``.
      state: returns the state to save (called only when saving).
      save: how to save (default ``checkpoints.save``).
    """
    if not self.reached(step):
      return
    if checkpoints.latest_step != step:
      (save or checkpoints.save)(step, state())
    checkpoints.wait_until_finished()
    raise Preempted(step)
