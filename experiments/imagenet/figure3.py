"""Figures 2 and 3 of the paper in miniature: the six ImageNet variants on Fashion-MNIST.

    python -m experiments.imagenet.figure3 --workdir=W --config.dataset=fashion_mnist \\
        --config.data_dir=/usr/share/datasets/fashion-mnist [--config.FIELD=VALUE ...]

Trains ``inception``, ``bn_baseline``, ``bn_x5``, ``bn_x30``, ``bn_x5_sigmoid`` and
``inception_sigmoid``, each built from its own config with the miniature's fields
of ``figure3_config.py`` set on it (the learning rate: the miniature's Inception
rate times the paper's ratio), each an ordinary run of the experiment in
``W/<name>/`` (``metrics.jsonl``, checkpoints; ``python -m experiments.imagenet``
trains the same run). Then draws ``W/figure3.png``: (a) test accuracy against
training steps (the paper's Figure 2); (b) the table of the paper's Figure 3 (steps
to reach the Inception's best accuracy, and each variant's best), also written as
``W/figure3.md``. Killed and restarted, it goes on where it stopped: a finished run
is not trained again, an unfinished one resumes from its checkpoint. A run whose
loss becomes NaN or infinite is recorded as diverged (``W/<name>/diverged.txt``) and
drawn as far as it went.
"""

from __future__ import annotations

import importlib
import io
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import common, config_flags  # noqa: E402
from experiments.common import cli  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "figure3_config.py")

# The paper's Figure 3, in its order; name -> label.
VARIANTS = {
  "inception": "Inception",
  "bn_baseline": "BN-Baseline",
  "bn_x5": "BN-x5",
  "bn_x30": "BN-x30",
  "bn_x5_sigmoid": "BN-x5-Sigmoid",
  "inception_sigmoid": "Inception-Sigmoid",
}
REFERENCE = "inception"
DIVERGED = "diverged.txt"


def variant_config(name: str, miniature):
  """The config of variant ``name``: its own file's, with every field of
  ``miniature`` set on it, the rate ``miniature.base_learning_rate`` times the
  paper's ratio of the variant's rate to the Inception's."""
  config = importlib.import_module(f"experiments.imagenet.configs.{name}").get_config()
  inception = importlib.import_module("experiments.imagenet.configs.inception").get_config()
  ratio = config.base_learning_rate / inception.base_learning_rate
  for field, value in miniature.items():
    if field not in config:
      raise common.ConfigError(f"config.{field} is not a field of the experiment's configs")
    config[field] = value
  config.base_learning_rate = miniature.base_learning_rate * round(ratio, 6)
  return config


def is_finished(workdir, num_train_steps: int) -> bool:
  """Whether the run in ``workdir`` evaluated its last step, or diverged."""
  if (workdir / DIVERGED).exists():
    return True
  return any(r["step"] == num_train_steps and "top1" in r for r in common.read_metrics(workdir))


def evaluations(workdir) -> list[tuple[int, float]]:
  """``(step, top1)`` of each evaluation in ``workdir/metrics.jsonl``."""
  return [(r["step"], r["top1"]) for r in common.read_metrics(workdir) if "top1" in r]


def table(
  curves: dict[str, list[tuple[int, float]]], rates: dict[str, float], diverged: dict[str, bool]
) -> list[dict]:
  """The rows of Figure 3's table: for each variant, the first evaluated step at
  which it reached the Inception's best accuracy (None if never), its best
  accuracy and the step of that."""
  target = max((a for _, a in curves[REFERENCE]), default=float("nan"))
  rows = []
  for name, curve in curves.items():
    reached = next((s for s, a in curve if a >= target), None)
    best_step, best = max(curve, key=lambda sa: (sa[1], -sa[0]), default=(None, None))
    rows.append(
      {
        "name": name,
        "label": VARIANTS[name],
        "learning_rate": rates[name],
        "steps_to_target": reached,
        "best_top1": best,
        "best_step": best_step,
        "diverged": diverged[name],
        "target": target,
      }
    )
  return rows


def format_table(rows: list[dict]) -> list[list[str]]:
  """Header and rows of text, as drawn and as written to figure3.md."""
  target = rows[0]["target"]
  header = ["Model", "Learning rate", f"Steps to {target:.1%}", "Max accuracy (at step)"]
  lines = [header]
  for r in rows:
    steps = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:,}"
    best = "-" if r["best_top1"] is None else f"{r['best_top1']:.1%} ({r['best_step']:,})"
    lines.append(
      [
        r["label"] + (" (diverged)" if r["diverged"] else ""),
        f"{r['learning_rate']:g}",
        steps,
        best,
      ]
    )
  return lines


def draw(curves: dict, rows: list[dict], path: pathlib.Path, *, title: str) -> None:
  """Writes the two panels to ``path`` (PNG) atomically."""
  fig, (ax, tab) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.1, 1]})
  styles = {
    "inception": "k-",
    "bn_baseline": "C0-",
    "bn_x5": "C1-",
    "bn_x30": "C2-",
    "bn_x5_sigmoid": "C3--",
    "inception_sigmoid": "k--",
  }
  for name, curve in curves.items():
    if curve:
      ax.plot(
        [s for s, _ in curve], [a for _, a in curve], styles[name], marker=".", label=VARIANTS[name]
      )
  target = rows[0]["target"]
  if target == target:  # not NaN
    ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"Inception's best ({target:.1%})")
  ax.set(
    title="(a) Test accuracy (10,000 test images)",
    xlabel="training steps (batches of 32)",
    ylabel="top-1 accuracy",
  )
  ax.grid(alpha=0.3)
  ax.set_ylim(0.0, None)
  ax.legend(
    loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize="small"
  )  # below: hides no curve
  tab.axis("off")
  text = format_table(rows)
  cells = tab.table(cellText=text[1:], colLabels=text[0], loc="center", cellLoc="center")
  cells.auto_set_font_size(False)
  cells.set_fontsize(9)
  cells.scale(1, 1.6)
  tab.set_title("(b) Steps to reach the Inception's best accuracy, and each one's best")
  fig.suptitle(title)
  fig.tight_layout()
  png = io.BytesIO()
  try:
    fig.savefig(png, format="png", dpi=110)
  finally:
    plt.close(fig)
  common.write_atomic(path, png.getvalue())


def run_figure3(miniature, workdir) -> pathlib.Path:
  """Trains (or resumes, or skips when finished) each variant, then draws the figure."""
  from experiments.imagenet import train

  configs = {name: variant_config(name, miniature) for name in VARIANTS}
  workdir = common.workdir_path(workdir)
  with common.lock.acquire(workdir):
    for name, config in configs.items():
      run_dir = workdir / name
      if is_finished(run_dir, config.num_train_steps):
        print(f"{name}: finished, not trained again", file=sys.stderr, flush=True)
        continue
      start = time.perf_counter()
      print(f"{name}: learning rate {config.learning_rate:g}", file=sys.stderr, flush=True)
      try:
        train.train_and_evaluate(config, str(run_dir))
      except common.NonFiniteError as e:
        common.write_atomic(run_dir / DIVERGED, f"{e}\n".encode())
        print(f"{name}: diverged: {e}", file=sys.stderr, flush=True)
      print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    curves = {name: evaluations(workdir / name) for name in VARIANTS}
    rows = table(
      curves,
      {n: c.learning_rate for n, c in configs.items()},
      {n: (workdir / n / DIVERGED).exists() for n in VARIANTS},
    )
    text = format_table(rows)
    markdown = ["| " + " | ".join(text[0]) + " |", "|" + "---|" * len(text[0])]
    markdown += ["| " + " | ".join(line) + " |" for line in text[1:]]
    common.write_atomic(workdir / "figure3.md", ("\n".join(markdown) + "\n").encode())
    path = workdir / "figure3.png"
    draw(
      curves,
      rows,
      path,
      title=(
        f"Figure 3 in miniature: {miniature.model} at "
        f"{miniature.image_size}x{miniature.image_size}, "
        f"{miniature.dataset}, {miniature.num_train_steps} steps of {miniature.batch_size}, "
        f"Inception rate {miniature.base_learning_rate:g}"
      ),
    )
  return path


def define_flags() -> None:
  """--workdir and --config (at run time, not import: other commands use these names)."""
  flags.DEFINE_string(
    "workdir", None, "Folder for one run per variant (W/<name>/) and figure3.png."
  )
  config_flags.define_config_flag(
    DEFAULT_CONFIG, "The miniature's fields, set on every variant's config."
  )


def main(argv):
  cli.check_command_line(argv, FLAGS.workdir)
  path = cli.exit_on_error(run_figure3, FLAGS.config, FLAGS.workdir)
  print((path.parent / "figure3.md").read_text(), file=sys.stderr)
  print(f"Figure written to {path}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
