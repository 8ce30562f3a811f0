"""Figure 1 of the paper: the MNIST network trained with and without BN.

    python -m experiments.mnist.figure1 --workdir=W [--config.FIELD=VALUE ...]

Trains both networks from the same seed, on the same batches in the same order,
into ``W/bn`` and ``W/baseline`` (each resumes from its checkpoints if restarted),
then draws ``W/figure1.png``: (a) test accuracy against training steps; (b, c) the
15th, 50th and 85th percentiles of the input to one fixed sigmoid of the last hidden
layer over the test set, against steps, without (b) and with (c) BN.
"""

from __future__ import annotations

import io
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import common, config_flags  # noqa: E402
from experiments.common import cli  # noqa: E402
from experiments.mnist import configs, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for bn/, baseline/ and figure1.png.")
config_flags.define_config_flag(
  configs.DEFAULT,
  "Configuration of both networks (config.batch_norm is set for each).",
  aliases=configs.RENAMED,
)

RUNS = {"bn": True, "baseline": False}  # subfolder -> config.batch_norm
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def make_figure1(bn_metrics: list[dict], baseline_metrics: list[dict], *, title: str) -> plt.Figure:
  """The paper's three panels from two runs' metrics (lists of evaluations)."""
  fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
  for metrics, label, style in (
    (bn_metrics, "With BN", "-"),
    (baseline_metrics, "Without BN", "--"),
  ):
    steps = [m["step"] for m in metrics]
    axes[0].plot(steps, [m["test_accuracy"] for m in metrics], style, label=label)
  axes[0].set(title="(a) Test accuracy", xlabel="training steps", ylabel="test accuracy")
  axes[0].legend(loc="lower right")
  axes[0].grid(alpha=0.3)
  for ax, metrics, name in (
    (axes[1], baseline_metrics, "(b) Without BN"),
    (axes[2], bn_metrics, "(c) With BN"),
  ):
    steps = [m["step"] for m in metrics]
    for p in train.PERCENTILES:
      ax.plot(steps, [m[f"sigmoid_input_p{p}"] for m in metrics], label=f"{p}th percentile")
    ax.set(title=f"{name}: input to one sigmoid", xlabel="training steps", ylabel="sigmoid input")
    ax.grid(alpha=0.3)
  low = min(m[f"sigmoid_input_p{train.PERCENTILES[0]}"] for m in bn_metrics + baseline_metrics)
  high = max(m[f"sigmoid_input_p{train.PERCENTILES[-1]}"] for m in bn_metrics + baseline_metrics)
  for ax in axes[1:]:
    ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
  # One legend for (b) and (c), below them: inside a panel it would hide a curve.
  fig.legend(
    *axes[2].get_legend_handles_labels(),
    loc="lower center",
    ncol=len(train.PERCENTILES),
    bbox_to_anchor=(0.67, 0.0),
    frameon=False,
    title="over the test set, at each evaluation:",
    title_fontsize="small",
  )
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  return fig


def draw_figure1(bn_metrics: list[dict], baseline_metrics: list[dict], path, *, title: str) -> None:
  """Writes the figure to ``path`` (a PNG) atomically: a kill leaves the old one."""
  fig = make_figure1(bn_metrics, baseline_metrics, title=title)
  png = io.BytesIO()
  try:
    fig.savefig(png, format="png", dpi=120)
  finally:
    plt.close(fig)
  common.write_atomic(path, png.getvalue())  # a local folder or gs://


def run_figure1(config, workdir) -> pathlib.Path:
  """Trains (or resumes) both networks and draws the figure; returns its path."""
  train.validate_config(config)
  workdir = common.workdir_path(workdir)
  with common.lock.acquire(workdir):
    for name, batch_norm in RUNS.items():
      run_config = config.copy_and_resolve_references()
      run_config.batch_norm = batch_norm
      train.train_and_evaluate(run_config, workdir / name)
    path = workdir / "figure1.png"
    dataset = DATASET_NAMES.get(config.dataset, config.dataset)
    draw_figure1(
      train.read_metrics(workdir / "bn"),
      train.read_metrics(workdir / "baseline"),
      path,
      title=f"Figure 1 on {dataset}: {len(config.hidden_sizes)} sigmoid layers of "
      f"{config.hidden_sizes[0]}, batch {config.batch_size}, SGD lr {config.learning_rate}, "
      f"unit {config.tracked_unit} of the last hidden layer",
    )
  return path


def main(argv):
  cli.check_command_line(argv, FLAGS.workdir)
  path = cli.exit_on_error(run_figure1, FLAGS.config, FLAGS.workdir)
  for name in RUNS:
    final = train.read_metrics(f"{FLAGS.workdir}/{name}")[-1]
    print(
      f"{name:>8}: test accuracy {final['test_accuracy']:.4f} after {final['step']} steps",
      file=sys.stderr,
    )
  print(f"Figure written to {path}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags.parse_flags)
