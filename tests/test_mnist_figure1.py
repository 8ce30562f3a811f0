"""The MNIST experiment's Figure 1: both runs drawn to a PNG, legends clear of the curves."""

import json

import numpy as np
import pytest

from experiments.mnist import figure1, train
from tests.mnist_testing import make_idx_folder, small_config


@pytest.mark.slow
def test_figure1_draws_a_png_from_both_runs(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data")
  config = small_config(data_dir)
  path = figure1.run_figure1(config, tmp_path / "fig")
  assert path == tmp_path / "fig" / "figure1.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
  assert (
    len(train.read_metrics(tmp_path / "fig" / "bn"))
    == len(train.read_metrics(tmp_path / "fig" / "baseline"))
    == 3
  )
  assert (
    json.loads((tmp_path / "fig" / "baseline" / "config.json").read_text())["config"]["batch_norm"]
    is False
  )
  assert (
    json.loads((tmp_path / "fig" / "bn" / "config.json").read_text())["config"]["batch_norm"]
    is True
  )


def test_figure1_legends_hide_no_curve():
  """Panel (c)'s legend once sat on its 15th-percentile curve, which runs low to the right."""
  steps = range(500, 50_001, 500)
  noise = np.random.default_rng(0).normal(0, 0.1, (len(steps), 3))

  def run(levels, first_accuracy, last_accuracy):  # shaped as in docs/figure1.png
    return [
      {
        "step": s,
        "test_accuracy": last_accuracy - (last_accuracy - first_accuracy) * np.exp(-s / 8000),
        **{
          f"sigmoid_input_p{p}": level + n
          for p, level, n in zip(train.PERCENTILES, levels, noise[i], strict=True)
        },
      }
      for i, s in enumerate(steps)
    ]

  fig = figure1.make_figure1(
    run((-1.4, 0.0, 1.5), 0.7, 0.87), run((-0.7, -0.3, 0.2), 0.1, 0.8), title="test"
  )
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
  assert len(legends) == 2  # (a)'s, and one for the percentiles
  for legend in legends:
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
      for line in ax.get_lines():
        points = ax.transData.transform(line.get_xydata())
        inside = (
          (box.x0 <= points[:, 0])
          & (points[:, 0] <= box.x1)
          & (box.y0 <= points[:, 1])
          & (points[:, 1] <= box.y1)
        )
        assert not inside.any(), (line.get_label(), ax.get_title())
  import matplotlib.pyplot as plt

  plt.close(fig)
