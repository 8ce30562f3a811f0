"""How often the synchronized exchange's fallback (a second pass) runs in real training.

    python -m benchmarks.second_pass            # about 8 minutes on 2 CPU cores
    python -m benchmarks.second_pass --quick    # a few steps of each run, to check it runs

Writes ``benchmarks/second_pass.json`` and ``benchmarks/second_pass.md`` (the committed
results), or into ``--output-dir``.

The exchange (issue 28): each device sums, per feature, ``s1 = sum(x - K)`` and ``s2 =
sum((x - K)^2)`` around a shift ``K`` every device holds; one ``psum`` combines them, and
the result is kept only where every feature of the layer has ``(mean - K)^2 <= 4 var``
(the global batch's mean and biased variance) and the sums are finite; otherwise a
second exchange, around the first one's mean, runs for that layer in that step. ``K``
is the layer's running mean before the step's update where every device provably holds
the same one, else 0 (``bnjax.stats.local_moments`` decides with ``K = 0`` already).

What is measured: the experiments' own training steps (their models, optimizers,
batch sizes, learning rates and data), unchanged, with every training-mode
``bnjax.linen.BatchNorm`` call observed through ``flax.linen.intercept_methods``: a
``jax.debug.callback`` hands the layer's input ``x`` (float32, as the layer receives
it) and its ``batch_stats/mean`` before the update to the host, where NumPy computes
each feature's mean and biased variance in float64 and decides, for ``K = running
mean`` and for ``K = 0``, whether the layer would need the second exchange. The
decision is made independently of bnjax's code; bnjax decides on float32 sums, so the
two can differ only where a ratio ``(mean - K)^2 / var`` is within float32 rounding of
4: the report counts those calls ("borderline").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import io_callback

from benchmarks.report import machine, write_results
from bnjax import linen as bn

HERE = pathlib.Path(__file__).resolve().parent
# The exchange keeps one pass where every feature has (mean - K)^2 <= this many variances.
MEAN_SQUARED_PER_VARIANCE = 4.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A ratio within this relative distance of the threshold could be decided either way by
# float32 sums (their rounding error is a few float32 epsilons of s2).
BORDERLINE = 1e-4
SHIFTS = ("running_mean", "zero")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


# ---- the predicate, in float64 -----------------------------------------------------------------


def feature_moments(
  x: np.ndarray, feature_axes: tuple[int, ...] = (-1,), mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(count, mean, biased variance)`` of each feature of ``x`` in float64.

  Args:
    x: ``[...]`` values; ``feature_axes`` index its features, the other axes are reduced.
    mask: optional boolean of ``x``'s shape, True for the values that count.

  Returns:
    Three float64 arrays of the features' shape (mean and variance 0 where count is 0).

  >>> count, mean, var = feature_moments(np.array([[4.0], [6.0]]))
  >>> count.tolist(), mean.tolist(), var.tolist()
  ([2.0], [5.0], [1.0])
  """
  x = np.asarray(x, np.float64)
  features = tuple(a % x.ndim for a in feature_axes)
  axes = tuple(a for a in range(x.ndim) if a not in features)
  valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  count = valid.sum(axis=axes).astype(np.float64)
  safe = np.maximum(count, 1)
  mean = np.where(valid, x, 0).sum(axis=axes) / safe
  centred = np.where(valid, x - np.expand_dims(mean, axes), 0)
  return count, mean, (centred * centred).sum(axis=axes) / safe


def shift_ratio(count: np.ndarray, mean: np.ndarray, var: np.ndarray, shift: np.ndarray) -> float:
  """The largest ``(mean - K)^2 / var`` over the features, for the shift ``K``.

  ``inf`` where a feature's variance is 0 and its mean is not ``K``, or where the sum
  of squares around ``K`` (``count * (var + (mean - K)^2)``) would not be finite in
  float32; 0 for a feature with variance 0 at ``K`` itself.

  >>> shift_ratio(np.array([8.0]), np.array([5.0]), np.array([1.0]), np.array([0.0]))
  25.0
  """
  distance = np.square(mean - np.asarray(shift, np.float64))
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(var > 0, distance / var, np.where(distance == 0, 0.0, np.inf))
  s2 = count * (var + distance)
  ratio = np.where(np.isfinite(s2) & (s2 <= FLOAT32_MAX), ratio, np.inf)
  return float(np.max(ratio, initial=0.0))


def needs_second_pass(ratio: float) -> bool:
  """Whether a layer whose largest ratio is ``ratio`` needs the second exchange."""
  return not ratio <= MEAN_SQUARED_PER_VARIANCE  # NaN: not finite, so needed


# ---- observing the layers ----------------------------------------------------------------------


@dataclasses.dataclass
class Recorder:
  """Each observed call: its step, layer and the largest ratio for each shift."""

  calls: list[dict] = dataclasses.field(default_factory=list)

  def record(self, layer: str, feature_axes, every: int, step, x, running_mean, mask=None) -> None:
    if int(step) % every:
      return
    count, mean, var = feature_moments(x, feature_axes, mask)
    self.calls.append(
      {
        "step": int(step),
        "layer": layer,
        "running_mean": shift_ratio(count, mean, var, running_mean),
        "zero": shift_ratio(count, mean, var, np.zeros_like(mean)),
      }
    )

  def interceptor(self, step: jax.Array, every: int) -> Callable:
    """An ``nn.intercept_methods`` interceptor recording each training-mode BN call of
    step ``step`` (traced) when ``step % every == 0``."""

    def observe(next_fun, args, kwargs, context):
      module = context.module
      if _is_training_call(context, args, kwargs):
        x = jax.lax.stop_gradient(args[0])
        axes = tuple(np.atleast_1d(module.axis).tolist())
        mean = module.get_variable("batch_stats", "mean")
        operands = (step, x, mean)
        if kwargs.get("mask") is not None:
          operands += (jnp.broadcast_to(kwargs["mask"], x.shape),)
        # Every step calls back (the host skips the steps not measured): a callback under
        # lax.cond costs as much. io_callback hands the host NumPy arrays.
        callback = functools.partial(self.record, "/".join(module.path), axes, every)
        io_callback(callback, None, *operands)
      return next_fun(*args, **kwargs)

    return observe


def _is_training_call(context, args, kwargs) -> bool:
  """A ``bnjax.linen.BatchNorm.__call__`` that normalizes with the batch's statistics."""
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, bn.BatchNorm):
    return False
  if module.is_initializing():
    return False
  if module.virtual_batch_size is not None:
    raise NotImplementedError("ghost batch norm (virtual_batch_size) is not measured")
  call_mode = args[1] if len(args) > 1 else kwargs.get("use_running_average")
  return not nn.merge_param("use_running_average", module.use_running_average, call_mode)


def observed(step_fn: Callable, recorder: Recorder, every: int) -> Callable:
  """``step_fn(state, ...)`` with its BN calls recorded (``state.step`` is the step)."""

  @functools.wraps(step_fn)
  def step(state, *args):
    with nn.intercept_methods(recorder.interceptor(state.step, every)):
      return step_fn(state, *args)

  return step


# ---- the runs ------------------------------------------------------------------------------


def run_mnist(num_steps: int, every: int, data_dir: str = FASHION_MNIST) -> dict:
  """The MNIST experiment's BN network (``configs/default.py``: its model, plain SGD,
  batches of 60), ``num_steps`` steps on the Fashion-MNIST IDX files of ``data_dir``."""
  from experiments.mnist import input_pipeline, train
  from experiments.mnist.configs import default

  config = default.get_config()
  config.dataset, config.data_dir = "fashion_mnist", data_dir
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir)
  data = train.DeviceData(*(jax.device_put(a) for a in dataset))
  model, optimizer = train.make_model(config), train.make_optimizer(config)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = train.initial_state(model, optimizer, init_key)
  recorder = Recorder()

  def one_step(state, data, data_key):
    images, labels = train.sample_batch(data, data_key, state.step, config.batch_size)
    return train.train_step(state, images, labels, model=model, optimizer=optimizer)

  step = observed(one_step, recorder, every)
  run_steps = jax.jit(
    lambda state, data, key, n: jax.lax.fori_loop(0, n, lambda _, s: step(s, data, key), state)
  )
  started = time.perf_counter()
  state = jax.block_until_ready(run_steps(state, data, data_key, num_steps))
  return {
    "name": "mnist_bn",
    "experiment": "experiments/mnist, configs/default.py (batch_norm=True)",
    "command": "python -m experiments.mnist --workdir=W --config.dataset=fashion_mnist "
    f"--config.data_dir={data_dir} --config.num_train_steps={num_steps}",
    "data": f"Fashion-MNIST IDX files ({data_dir}), NOT MNIST: the MNIST command's "
    "default reads MNIST through TFDS, which cannot be downloaded here; this run uses "
    "the experiment's own IDX loader (--config.dataset=fashion_mnist --config.data_dir)",
    "synthetic": False,
    "model": f"MLP 784-{'-'.join(map(str, config.hidden_sizes))}-10, sigmoid, BN momentum "
    f"{config.bn_momentum}",
    "optimizer": f"SGD, learning rate {config.learning_rate}",
    "batch_size": config.batch_size,
    "num_steps": num_steps,
    "measure_every": every,
    "final_train_loss": float(state.loss_sum) / max(int(state.loss_count), 1),
    "wall_s": time.perf_counter() - started,
    "calls": recorder.calls,
  }


def imagenet_config(name: str, num_steps: int, data_dir: str = FASHION_MNIST):
  """The ImageNet experiment's config of run ``name`` (``IMAGENET_RUNS``), ``num_steps``
  long; the runs on real images read the Fashion-MNIST IDX files of ``data_dir``."""
  from experiments.imagenet import figure3, figure3_config
  from experiments.imagenet.configs import tiny

  if name.endswith("_fake"):
    config = tiny.get_config()
  else:
    config = figure3.variant_config("bn_x5", figure3_config.get_config())
    config.data_dir = data_dir
  config.model = "resnet_tiny" if "resnet" in name else "inception_tiny"
  config.num_train_steps = num_steps
  return config


# name: (what it is, the command that trains it).
IMAGENET_RUNS = {
  "imagenet_tiny_inception_fake": (
    "configs/tiny.py as it is: BN-x5 on inception_tiny, 32x32, batches of 16, fake data",
    "python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/tiny.py",
  ),
  "imagenet_tiny_resnet_fake": (
    "configs/tiny.py with model=resnet_tiny (the override its docstring names)",
    "python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/tiny.py "
    "--config.model=resnet_tiny",
  ),
  "imagenet_figure3_bn_x5_inception_fashion": (
    "BN-x5 of Figure 3's miniature (figure3_config.py): inception_tiny, 32x32, batches of "
    "32, Fashion-MNIST through the ImageNet experiment's IDX source",
    "python -m experiments.imagenet.figure3 --workdir=W (its bn_x5 run)",
  ),
  "imagenet_figure3_bn_x5_resnet_fashion": (
    "the same miniature with model=resnet_tiny",
    "python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/bn_x5.py "
    "(fields of figure3_config.py) --config.model=resnet_tiny",
  ),
}
SYNTHETIC_WARNING = "SYNTHETIC IMAGES, NOT IMAGENET"


def _imagenet_data(config) -> str:
  if config.fake_data:
    return (
      f"{SYNTHETIC_WARNING}: the tiny config's fake data (experiments/imagenet/data.py "
      "FakeSource: uniform random pixels and labels, 2 batches cycled)"
    )
  return f"Fashion-MNIST IDX files ({config.data_dir}) through experiments/imagenet/idx_data.py"


def run_imagenet(name: str, num_steps: int, every: int, data_dir: str = FASHION_MNIST) -> dict:
  """Run ``name`` of ``IMAGENET_RUNS``: the experiment's training step
  (``make_train_step``: its model, optimizer and schedule), batches and data source,
  ``num_steps`` steps under ``jit``."""
  from experiments.imagenet import train

  if jax.device_count() > 1:
    # Host callbacks in a jit sharded over simulated CPU devices stall its all-reduces
    # past XLA's 40 s rendezvous limit (measured: the process aborts).
    raise RuntimeError(
      f"the ImageNet runs are measured on one device, and JAX sees {jax.device_count()}: "
      "unset XLA_FLAGS' --xla_force_host_platform_device_count (the statistics are the "
      "global batch's whatever the device count)"
    )
  config = imagenet_config(name, num_steps, data_dir)
  exp = train.prepare(config)
  recorder = Recorder()
  # The experiment's jitted step, traced (inlined) inside this one with the BN calls observed.
  step = train.make_train_step(exp)
  run_step = jax.jit(observed(step, recorder, every))
  state, batches = train.make_initial_state(exp), train.train_batches(exp, 0)
  started = time.perf_counter()
  losses = []
  for i in range(num_steps):
    state, metrics = run_step(state, next(batches))
    losses.append(metrics["loss"])
    if i == 0:
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - started
  jax.block_until_ready(state)
  description, command = IMAGENET_RUNS[name]
  rates = [float(exp.learning_rate_fn(s)) for s in (0, num_steps - 1)]
  return {
    "name": name,
    "experiment": f"experiments/imagenet: {description}",
    "command": f"{command} --config.num_train_steps={num_steps}",
    "data": _imagenet_data(config),
    "synthetic": bool(config.fake_data),
    "model": f"{config.model}, BN momentum {config.bn_momentum}",
    "optimizer": f"{config.optimizer} {config.momentum}, learning rate {rates[0]:.3g} at the "
    f"first step, {rates[1]:.3g} at the last (warm-up {config.warmup_epochs} epochs of "
    f"{exp.schedule.steps_per_epoch} steps)",
    "batch_size": config.batch_size,
    "num_steps": num_steps,
    "measure_every": every,
    "final_train_loss": float(np.mean([float(v) for v in losses[-10:]])),
    "wall_s": time.perf_counter() - started,
    "compile_and_first_step_s": first_step_s,
    "calls": recorder.calls,
  }


# ---- the report ----------------------------------------------------------------------------


def rates(calls: list[dict]) -> dict:
  """For each shift: the fraction of ``calls`` needing the second exchange, the median
  of their largest ratios, and how many were within ``BORDERLINE`` of the threshold."""
  out = {"calls": len(calls)}
  for shift in SHIFTS:
    ratios = [c[shift] for c in calls]
    near = [abs(r / MEAN_SQUARED_PER_VARIANCE - 1) < BORDERLINE for r in ratios]
    out[shift] = {
      "rate": sum(map(needs_second_pass, ratios)) / max(len(ratios), 1),
      "median_ratio": statistics.median(ratios) if ratios else None,
      "borderline": sum(near),
    }
  return out


def windows(num_steps: int) -> list[tuple[int, int]]:
  """Step ranges ``[start, stop)``: the first 1%, then up to 10%, then the rest."""
  bounds = sorted({0, max(1, num_steps // 100), max(1, num_steps // 10), num_steps})
  return list(zip(bounds, bounds[1:], strict=False))


def summarize(run: dict) -> dict:
  """``run`` without its raw calls, with their rates: overall, per window of steps, per layer."""
  calls = run["calls"]
  steps = sorted({c["step"] for c in calls})
  layers = list(dict.fromkeys(c["layer"] for c in calls))
  summary = {k: v for k, v in run.items() if k != "calls"}
  summary["steps_measured"] = {
    "count": len(steps),
    "first": steps[0] if steps else None,
    "last": steps[-1] if steps else None,
  }
  summary["bn_layers"] = len(layers)
  summary["overall"] = rates(calls)
  summary["windows"] = [
    {"steps": [a, b], **rates([c for c in calls if a <= c["step"] < b])}
    for a, b in windows(run["num_steps"])
  ]
  summary["layers"] = [
    {"layer": layer, **rates([c for c in calls if c["layer"] == layer])} for layer in layers
  ]
  return summary


def _rate_cells(entry: dict) -> str:
  return " | ".join(
    f"{entry[s]['rate']:.3f} ({entry[s]['median_ratio']:.3g})"
    if entry[s]["median_ratio"] is not None
    else "-"
    for s in SHIFTS
  )


def _compile_text(run: dict) -> str:
  if "compile_and_first_step_s" in run:
    return f"compiling and the first step: {run['compile_and_first_step_s']:.0f} s"
  return "compiling included"


def _every_text(every: int) -> str:
  return "every step" if every == 1 else f"every {every}th step"


def _run_section(run: dict) -> list[str]:
  warning = f"**{SYNTHETIC_WARNING}.** " if run["synthetic"] else ""
  lines = [
    f"### {run['name']}",
    "",
    f"{warning}{run['experiment']}. Data: {run['data']}. Model: {run['model']}. "
    f"Optimizer: {run['optimizer']}. Batch {run['batch_size']}, {run['num_steps']} steps, "
    f"{_every_text(run['measure_every'])} measured; mean training loss at the end "
    f"{run['final_train_loss']:.3f}. Wall time {run['wall_s']:.0f} s ({_compile_text(run)}).",
    "",
    f"Command (the same training): `{run['command']}`",
    "",
    "| steps | calls | K = running mean | K = 0 |",
    "|---|---|---|---|",
  ]
  for w in run["windows"]:
    lines.append(f"| {w['steps'][0]}-{w['steps'][1] - 1} | {w['calls']} | {_rate_cells(w)} |")
  lines += ["", "| layer | calls | K = running mean | K = 0 |", "|---|---|---|---|"]
  for layer in run["layers"]:
    lines.append(f"| {layer['layer']} | {layer['calls']} | {_rate_cells(layer)} |")
  return lines + [""]


def markdown(results: dict) -> str:
  """The report: the overall rate of each run, then each run's windows and layers."""
  lines = [
    "# How often the synchronized exchange needs its second pass",
    "",
    "`python -m benchmarks.second_pass` "
    f"({'quick' if results['settings']['quick'] else 'full'} mode; "
    f"{results['machine']['date']}, {results['machine']['cpu_count']} CPUs, "
    f"jax {results['machine']['jax']}). A (step, BN layer) call needs the second "
    f"exchange when some feature has (mean - K)^2 > {MEAN_SQUARED_PER_VARIANCE:g} var "
    "(or a sum is not finite); mean and biased variance of the layer's input over the "
    "batch, in float64 NumPy from the float32 values the layer received. K = the "
    "layer's running mean before the step's update, or K = 0. Cells: the fraction of "
    "calls needing it (the median over calls of the largest (mean - K)^2 / var). "
    "Borderline calls (ratio within 1e-4 relative of the threshold, which float32 "
    f"sums could decide either way): {results['borderline']}.",
    "",
  ]
  lines += [f"**{w}**" for w in results["warnings"]] + [""]
  lines += [
    "| run | data | BN layers | steps measured | calls | K = running mean | K = 0 | wall s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for run in results["runs"]:
    data = "SYNTHETIC" if run["synthetic"] else "Fashion-MNIST"
    lines.append(
      f"| {run['name']} | {data} | {run['bn_layers']} | {run['steps_measured']['count']} | "
      f"{run['overall']['calls']} | {_rate_cells(run['overall'])} | {run['wall_s']:.0f} |"
    )
  lines.append("")
  for run in results["runs"]:
    lines += _run_section(run)
  return "\n".join(lines)


def warnings(runs: list[dict]) -> list[str]:
  """The loud lines: the MNIST run is on Fashion-MNIST, and fake data are not ImageNet."""
  out = []
  if any(r["name"].startswith("mnist") for r in runs):
    out.append(
      "The MNIST experiment ran on FASHION-MNIST (Debian's IDX files, the experiment's "
      "own IDX loader), not MNIST: its default reads MNIST through TFDS, which is not "
      "available offline."
    )
  if any(r["synthetic"] for r in runs):
    out.append(
      f"Runs marked SYNTHETIC train on {SYNTHETIC_WARNING}: the tiny config's "
      "random pixels (two batches cycled) during its warm-up, where the learning rate is "
      "near 0: they show the layers' statistics at initialization, not trained ones."
    )
  out.append(
    "No ImageNet data here: the ImageNet experiment's real-image runs use Fashion-MNIST "
    "at 32x32 through its IDX source (Figure 3's miniature)."
  )
  return out


# (mnist steps, imagenet steps, measure every k-th step) of each mode.
MODES = {"quick": (20, 3, 1), "full": (50_000, 300, 1)}


def measure(quick: bool, names: list[str], data_dir: str) -> list[dict]:
  """Each run of ``names`` (``RUNS``), summarized, the steps of ``MODES``."""
  mnist_steps, imagenet_steps, every = MODES["quick" if quick else "full"]
  runs = []
  for name in names:
    print(f"{name}...", flush=True)
    if name == "mnist_bn":
      run = run_mnist(mnist_steps, every, data_dir)
    else:
      run = run_imagenet(name, imagenet_steps, every, data_dir)
    runs.append(summarize(run))
  return runs


RUNS = ("mnist_bn", *IMAGENET_RUNS)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps of each run")
  parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None)
  parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {RUNS}")
  parser.add_argument(
    "--data-dir", "--data_dir", dest="data_dir", default=FASHION_MNIST, help="Fashion-MNIST IDX"
  )
  args = parser.parse_args(argv)
  names = [n for n in args.runs.split(",") if n]
  if unknown := sorted(set(names) - set(RUNS)):
    parser.error(f"unknown runs {unknown}; valid: {', '.join(RUNS)}")
  if args.output_dir:
    output = pathlib.Path(args.output_dir)
  else:
    output = pathlib.Path(tempfile.gettempdir()) / "bnjax-second-pass-quick" if args.quick else HERE
  if args.quick and output.resolve() == HERE:
    parser.error("--quick would overwrite the full run's results; give another --output-dir")
  runs = measure(args.quick, names, args.data_dir)
  results = {
    "machine": machine(),
    "settings": {
      "quick": args.quick,
      "mean_squared_per_variance": MEAN_SQUARED_PER_VARIANCE,
      "shifts": list(SHIFTS),
    },
    "warnings": warnings(runs),
    "borderline": sum(r["overall"][s]["borderline"] for r in runs for s in SHIFTS),
    "runs": runs,
  }
  write_results(output / "second_pass.json", output / "second_pass.md", results, markdown(results))
  return results


if __name__ == "__main__":
  main()
