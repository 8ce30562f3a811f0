"""The run's bookkeeping: its workdir (a local folder or ``gs://BUCKET/PATH``) locked,
its checkpoints, metrics, config and summaries, and its preemption handling.

Every use of ``experiments.common`` by the ImageNet experiment is here: process 0
writes ``config.json``, ``metrics.jsonl`` and the summaries; every process saves
its part of the checkpoints and takes part in the preemption's agreement on a step.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import ml_collections

from experiments import common
from experiments.imagenet import parallel, progress


class Run(NamedTuple):
  """The open workdir of a run: where its checkpoints, rows and summaries go."""

  workdir: pathlib.Path
  primary: bool  # process 0: writes config.json, metrics.jsonl and summaries
  checkpoints: common.Checkpoints
  preemption: common.Preemption  # SIGTERM (all hosts agree on a step), Ctrl-C: save, exit 75
  metrics_log: common.MetricsLog
  writer: Any  # clu's metric writer, or None without clu/TensorFlow

  def write_row(self, row: dict) -> None:
    if self.primary:
      self.metrics_log.append(row)
    if self.writer is not None:
      self.writer.write_scalars(row["step"], {k: v for k, v in row.items() if isinstance(v, float)})

  def written(self) -> str:
    """What this run wrote, for the closing line."""
    summaries = ", TensorBoard summaries" if self.writer is not None else ""
    return (
      f"config.json, metrics.jsonl{summaries} and checkpoints/ (newest: step "
      f"{self.checkpoints.latest_step})"
    )


@contextlib.contextmanager
def open_run(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  num_train_steps: int,
  may_change: tuple[str, ...],
) -> Iterator[Run]:
  """The workdir locked (process 0), its checkpoints open, its config checked
  against a resumed run's (up to the fields ``may_change``) and written; closed
  (summaries flushed) on the way out.

  Raises:
    ConfigError: the workdir's run has another config, or is past ``num_train_steps``.
    WorkdirError: another run holds the workdir, or it cannot be written.
  """
  workdir = common.workdir_path(workdir)
  primary = jax.process_index() == 0
  with common.WorkdirLock(workdir) if primary else contextlib.nullcontext():
    with (
      common.Checkpoints(workdir / "checkpoints", max_to_keep=2) as checkpoints,
      common.Preemption() as preemption,
    ):
      latest = checkpoints.latest_step
      common.check_config(workdir, config, resuming=latest is not None, may_change=may_change)
      common.check_not_past_the_end(latest, num_train_steps)
      if primary:
        common.write_config(workdir, config)
      writer = progress.tensorboard_writer(workdir, primary=primary)
      try:
        yield Run(
          workdir,
          primary,
          checkpoints,
          preemption,
          common.MetricsLog(workdir / "metrics.jsonl"),
          writer,
        )
      finally:
        if writer is not None:
          writer.flush()
          writer.close()


def resume(run: Run, initial_state, config: ml_collections.ConfigDict):
  """The canonical state to start from: ``initial_state``, or the run's newest
  checkpoint restored into its structure. The metrics log is cut back to that
  step (rows a killed run wrote after its last checkpoint go), and a fresh run
  writes the config as TensorBoard hyper-parameters."""
  state = initial_state
  if run.checkpoints.latest_step is not None:
    state = run.checkpoints.restore(state)
    progress.say(
      f"Resumed {run.workdir} from its checkpoint of step {run.checkpoints.latest_step}."
    )
  start = int(parallel.host_copy(state.step))
  if run.primary:
    run.metrics_log.keep_up_to(start)
  if start == 0 and run.writer is not None:
    run.writer.write_hparams(
      {
        k: v
        for k, v in json.loads(config.to_json_best_effort()).items()
        if isinstance(v, (int, float, str, bool))
      }
    )
  return state
