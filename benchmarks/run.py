"""bnjax's benchmarks: one command, results to JSON and a Markdown table.

    python -m benchmarks.run                 # the full run (about 10 minutes on 2 CPU cores)
    python -m benchmarks.run --quick         # tiny shapes, to check it runs (tests do)

The full run writes ``benchmarks/results.json`` and ``BENCHMARKS.md`` (the committed
results), or into ``--output-dir``. A quick run never overwrites them: it writes into
``--output-dir``, by default a folder in the system's temporary directory.
Every comparison is measured side by side: compiled with ``jax.jit``, synchronized
with ``block_until_ready``, candidates interleaved round by round, medians kept, and
the whole measurement repeated to report the spread of each ratio.

1. Batch norm alone, training forward and forward + backward: bnjax, Flax's
   ``BatchNorm`` (fast default and exact mode), a naive two-pass ``jnp`` version.
2. The streaming floor: reading x and dy and writing two tensors of their size.
3. Collectives per synchronized layer in compiled ``pmap``/``shard_map`` steps.
4. Temporary memory of forward + backward from XLA's memory analysis.
5. A ResNet-50 training step with bnjax's and Flax's BatchNorm, on one device and
   synchronized over 2.
6. The MNIST experiment's on-device training loop against a per-step Python loop.

BENCHMARKS.md ends with the section "Pod scale", the tables of
``python -m benchmarks.pod_scale`` (compiled HLO at up to 1024 simulated devices),
put back from the committed ``benchmarks/pod_scale.json`` each time this rewrites it.
"""

from __future__ import annotations

if __name__ == "__main__":  # 8 CPU devices for the collective counts, before jax starts
  import jax

  jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
from benchmarks import implementations as impls  # noqa: E402
from benchmarks import pod_scale  # noqa: E402
from benchmarks.hlo import count_collectives  # noqa: E402
from benchmarks.report import machine, ratio_text, write_results  # noqa: E402
from benchmarks.timing import ratio_summary, repeated, time_call  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


# ---- 1, 2, 4: batch norm alone ----------------------------------------------------------


def batch_norm_cases(quick: bool):
  if quick:
    return [
      ("(4, 8, 8, 16) float32", (4, 8, 8, 16), jnp.float32),
      ("(16, 32) float32", (16, 32), jnp.float32),
      ("(4, 8, 8, 16) bfloat16", (4, 8, 8, 16), jnp.bfloat16),
    ]
  return [
    ("(32, 56, 56, 64) float32", (32, 56, 56, 64), jnp.float32),
    ("(256, 4096) float32", (256, 4096), jnp.float32),
    ("(32, 56, 56, 64) bfloat16", (32, 56, 56, 64), jnp.bfloat16),
  ]


def temp_bytes(jitted, *args) -> int | None:
  analysis = jitted.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def bench_batch_norm(quick: bool, rounds: int, repeats: int) -> list[dict]:
  results = []
  for label, shape, dtype in batch_norm_cases(quick):
    keys = jax.random.split(jax.random.key(0), 2)
    x = (jax.random.normal(keys[0], shape) * 2 + 1).astype(dtype)
    dy = jax.random.normal(keys[1], shape).astype(dtype)
    scale, bias = jnp.full(shape[-1], 1.5), jnp.full(shape[-1], 0.1)
    forwards = {name: impls.forward(f) for name, f in impls.IMPLEMENTATIONS.items()}
    backwards = {name: impls.forward_backward(f) for name, f in impls.IMPLEMENTATIONS.items()}
    forward_times = repeated(
      {name: functools.partial(f, x, scale, bias) for name, f in forwards.items()},
      rounds=rounds,
      repeats=repeats,
    )
    backward_candidates = {
      name: functools.partial(f, x, scale, bias, dy) for name, f in backwards.items()
    }
    backward_candidates["streaming_floor"] = functools.partial(impls.streaming_floor, x, dy)
    backward_times = repeated(backward_candidates, rounds=rounds, repeats=repeats)
    floor = backward_times.pop("streaming_floor")
    case = {
      "case": label,
      "bytes": int(x.nbytes),
      "forward_s": {},
      "forward_backward_s": {},
      "streaming_floor_s": statistics.median(floor),
      "temp_bytes_forward_backward": {},
      "ratios": {},
    }
    for name in impls.IMPLEMENTATIONS:
      case["forward_s"][name] = statistics.median(forward_times[name])
      case["forward_backward_s"][name] = statistics.median(backward_times[name])
      case["temp_bytes_forward_backward"][name] = temp_bytes(backwards[name], x, scale, bias, dy)
      case["ratios"][name] = {
        "forward_backward_vs_flax_fast": ratio_summary(
          backward_times[name], backward_times["flax_fast"]
        ),
        "forward_backward_vs_flax_exact": ratio_summary(
          backward_times[name], backward_times["flax_exact"]
        ),
        "forward_vs_flax_fast": ratio_summary(forward_times[name], forward_times["flax_fast"]),
        "forward_backward_vs_streaming_floor": ratio_summary(backward_times[name], floor),
      }
    results.append(case)
    print(
      f"batch norm {label}: "
      + ", ".join(
        f"{n} {1e3 * case['forward_backward_s'][n]:.2f} ms" for n in impls.IMPLEMENTATIONS
      )
      + f", floor {1e3 * case['streaming_floor_s']:.2f} ms",
      flush=True,
    )
  return results


# ---- 3: collectives -------------------------------------------------------------------


def bench_collectives(quick: bool) -> dict:
  devices = jax.devices("cpu")[:8]
  n = len(devices)
  shape = (4, 8, 8, 16) if quick else (8, 14, 14, 64)
  x = jax.random.normal(jax.random.key(0), (n,) + shape)
  dy = jax.random.normal(jax.random.key(1), (n,) + shape)
  scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  results = {}
  for name in ("bnjax", "flax_fast", "flax_exact"):
    f = functools.partial(impls.IMPLEMENTATIONS[name], axis_name="batch")

    def step(x, scale, bias, dy, f=f):
      _, vjp, stats = jax.vjp(f, x, scale, bias, has_aux=True)
      return vjp(dy), stats

    pmap_forward = jax.pmap(f, axis_name="batch", in_axes=(0, None, None), devices=devices)
    pmap_step = jax.pmap(step, axis_name="batch", in_axes=(0, None, None, 0), devices=devices)
    shard_map_step = jax.jit(
      jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P("batch"), P(), P(), P("batch")),
        out_specs=((P("batch"), P(), P()), P()),
      )
    )
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    batch_sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    sm_args = (
      jax.device_put(flat(x), batch_sharding),
      jax.device_put(scale, replicated),
      jax.device_put(bias, replicated),
      jax.device_put(flat(dy), batch_sharding),
    )
    # jit with the batch sharded (no axis name): XLA's SPMD partitioner decides.
    jit_step = jax.jit(functools.partial(step, f=impls.IMPLEMENTATIONS[name]))
    programs = {
      "pmap_forward": pmap_forward.lower(x, scale, bias),
      "pmap_forward_backward": pmap_step.lower(x, scale, bias, dy),
      "shard_map_forward_backward": shard_map_step.lower(*sm_args),
      "jit_sharded_forward_backward": jit_step.lower(*sm_args),
    }
    texts = {key: lowered.compile().as_text() for key, lowered in programs.items()}
    results[name] = {key: count_collectives(text) for key, text in texts.items()}
    results[name]["run_on_every_call"] = {
      key: count_collectives(text, outside_branches=True) for key, text in texts.items()
    }
  print("collectives:", json.dumps(results), flush=True)
  return results


# ---- 5: ResNet-50 training step --------------------------------------------------------


def bench_resnet(quick: bool, rounds: int, repeats: int) -> dict:
  """ResNet-50's training step with bnjax's and Flax's BatchNorm, interleaved: under
  ``jax.jit`` on one device (statistics of the local batch), and under ``shard_map``
  over 2 CPU devices with ``axis_name`` (statistics synchronized: the exchange of
  ``bnjax.stats.synchronized_moments`` against Flax's ``pmean``), the same global batch."""
  from experiments.imagenet import models

  if quick:
    make, batch, size, label = models.ResNetTiny, 4, 16, "ResNetTiny, batch 4 of 16x16"
  else:
    make, batch, size, label = models.ResNet50, 8, 64, "ResNet-50, batch 8 of 64x64 (CPU-sized)"
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  labels = jnp.arange(batch) % 10
  optimizer = optax.sgd(0.1, momentum=0.9)
  mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("batch",))
  batch_sharding = NamedSharding(mesh, P("batch"))
  sharded = (jax.device_put(images, batch_sharding), jax.device_put(labels, batch_sharding))
  steps = {}
  for name, norm in (("bnjax", bnjax.linen.BatchNorm), ("flax", nn.BatchNorm)):
    model = make(norm=norm)
    variables = model.init(jax.random.key(1), images, train=False)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    local_step = resnet_train_step(make(norm=norm), optimizer)
    synchronized_step = jax.shard_map(
      resnet_train_step(make(norm=functools.partial(norm, axis_name="batch")), optimizer),
      mesh=mesh,
      in_specs=(P(), P("batch"), P("batch")),
      out_specs=P(),
    )
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    steps[f"{name} jit"] = functools.partial(jax.jit(local_step), state, images, labels)
    steps[f"{name} shard_map"] = functools.partial(jax.jit(synchronized_step), replicated, *sharded)
  times = repeated(steps, rounds=rounds, repeats=repeats)
  result = {
    "model": label,
    "step_s": {n: statistics.median(times[f"{n} jit"]) for n in ("bnjax", "flax")},
    "bnjax_vs_flax": ratio_summary(times["bnjax jit"], times["flax jit"]),
    "synchronized": {
      "devices": 2,
      "step_s": {n: statistics.median(times[f"{n} shard_map"]) for n in ("bnjax", "flax")},
      "bnjax_vs_flax": ratio_summary(times["bnjax shard_map"], times["flax shard_map"]),
    },
  }
  print(f"resnet: {json.dumps(result)}", flush=True)
  return result


def resnet_train_step(model, optimizer):
  """One SGD step of ``model`` on (params, batch_stats, opt_state): the new state."""

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state

  return train_step


# ---- 6: the MNIST training loop ------------------------------------------------------------


def bench_mnist_loop(quick: bool, rounds: int, repeats: int) -> dict:
  from experiments.mnist import input_pipeline, train
  from experiments.mnist.configs import default

  config = default.get_config()
  fashion = pathlib.Path("/usr/share/datasets/fashion-mnist")
  if fashion.is_dir():
    dataset, source = input_pipeline.load_idx_folder(fashion), "Fashion-MNIST (Debian)"
  else:  # Throughput only: the pixels do not matter to the speed.
    rng = np.random.default_rng(0)
    dataset = input_pipeline.Dataset(
      rng.integers(0, 256, (60000, 28, 28), np.uint8),
      rng.integers(0, 10, 60000, np.int32),
      rng.integers(0, 256, (10000, 28, 28), np.uint8),
      rng.integers(0, 10, 10000, np.int32),
    )
    source = "SYNTHETIC random pixels (throughput only)"
  data = train.DeviceData(*(jax.device_put(a) for a in dataset))
  model, optimizer = train.make_model(config), train.make_optimizer(config)
  data_key = jax.random.key(1)
  state = train.initial_state(model, optimizer, jax.random.key(0))
  chunk = 200 if quick else 5000
  on_device, one_step = mnist_loops(config, model, optimizer)

  def on_device_loop(num_steps=chunk):
    return on_device(fresh_copy(state), data, data_key, jnp.int32(num_steps))

  def python_loop():
    current = fresh_copy(state)  # each step donates its input state
    for _ in range(chunk):
      current = one_step(current, data, data_key)
    return current

  plain_params, plain_steps = plain_jax_mnist_params(config), plain_jax_mnist_steps(config)
  times = repeated(
    {
      "on_device_loop": on_device_loop,
      "python_loop": python_loop,
      "plain_jax_on_device_loop": lambda: plain_steps(
        plain_params, data.train_images, data.train_labels, jnp.int32(chunk)
      ),
    },
    rounds=max(2, rounds // 10),
    repeats=repeats,
    warmup=1,
  )
  result = {
    "data": source,
    "steps_per_chunk": chunk,
    "steps_per_s": {n: chunk / statistics.median(t) for n, t in times.items()},
    "python_loop_time_vs_on_device": ratio_summary(times["python_loop"], times["on_device_loop"]),
    "on_device_vs_plain_jax": ratio_summary(
      times["on_device_loop"], times["plain_jax_on_device_loop"]
    ),
  }
  if not quick:
    result["network_50k_training_loop_s"] = time_call(
      lambda: on_device_loop(config.num_train_steps)
    )
    if fashion.is_dir():
      import contextlib
      import io
      import tempfile

      with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stderr(io.StringIO()):
        config.dataset, config.data_dir = "fashion_mnist", str(fashion)
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        result["network_50k_with_100_evaluations_s"] = time.perf_counter() - start
  print(f"mnist loop: {json.dumps(result)}", flush=True)
  return result


def fresh_copy(tree):
  """New buffers holding ``tree``'s values, for a call that donates its input."""
  return jax.tree.map(jnp.copy, tree)


def mnist_loops(config, model, optimizer):
  """The MNIST experiment's training loop, ``(state, data, data_key, num_steps) ->
  state`` with ``num_steps`` traced, and one step of it, ``(state, data, data_key)
  -> state``, each compiled once. The data are arguments, as in the experiment
  (``train.compile_steps``): closed over, XLA would fold the 55 MB of images into the
  program as constants (a slower compile, and a program that is not the
  experiment's). The state is donated, as the experiment's loop does."""
  from experiments.mnist import train

  loop = functools.partial(
    train.train_steps, model=model, optimizer=optimizer, batch_size=config.batch_size
  )
  on_device = jax.jit(loop, donate_argnums=0)
  one_step = jax.jit(lambda state, data, data_key: loop(state, data, data_key, 1), donate_argnums=0)
  return on_device, one_step


def plain_jax_mnist_params(config):
  """Initial parameters of the same network in plain JAX (see ``plain_jax_mnist_steps``)."""
  keys = jax.random.split(jax.random.key(0), 4)
  sizes = [(784, 100), (100, 100), (100, 100)]
  return {
    "kernels": [
      config.init_stddev * jax.random.normal(k, s) for k, s in zip(keys[:3], sizes, strict=True)
    ],
    "scales": [jnp.ones(100)] * 3,
    "biases": [jnp.zeros(100)] * 3,
    "head": config.init_stddev * jax.random.normal(keys[3], (100, 10)),
    "head_bias": jnp.zeros(10),
  }


def plain_jax_mnist_steps(config):
  """The same network and loop in a few lines of plain JAX (two-pass BN, autodiff,
  no Flax): the reference for what the machine does with this workload.
  ``steps(params, train_images, train_labels, num_steps) -> params``, the data
  arguments, as above."""

  def loss(params, images, labels):
    h = images.reshape(images.shape[0], -1)
    for kernel, scale, bias in zip(
      params["kernels"], params["scales"], params["biases"], strict=True
    ):
      h = h @ kernel
      mean = jnp.mean(h, 0, keepdims=True)
      var = jnp.mean(jnp.square(h - mean), 0, keepdims=True)
      h = jax.nn.sigmoid((h - mean) * jax.lax.rsqrt(var + 1e-5) * scale[None] + bias[None])
    logits = h @ params["head"] + params["head_bias"][None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def steps(params, train_images, train_labels, n):
    def body(step, params):
      indices = jax.random.randint(
        jax.random.fold_in(jax.random.key(1), step), (config.batch_size,), 0, train_labels.shape[0]
      )
      images = train_images[indices].astype(jnp.float32) / 255.0
      grads = jax.grad(loss)(params, images, train_labels[indices])
      return jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)

    return jax.lax.fori_loop(0, n, body, params)

  return steps


# ---- report ---------------------------------------------------------------------------------


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [
    f"## {m['device']} ({m['backend']}), {m['date']}",
    "",
    f"jax {m['jax']}, bnjax {m['bnjax']}, Python {m['python']}, {m['cpu_count']} CPUs, "
    f"{m['platform']}.",
    f"Medians of {results['settings']['rounds']} interleaved rounds, repeated "
    f"{results['settings']['repeats']} times;"
    " ratios are medians over the repeats, (min-max) across them. Lower is faster.",
    "",
  ]
  lines += [
    "### 1, 2. Batch norm alone (training mode), milliseconds",
    "",
    "| case | | bnjax | Flax fast | Flax exact | naive two-pass | streaming floor |",
    "|---|---|---|---|---|---|---|",
  ]
  for case in results["batch_norm"]:
    fwd, fb = case["forward_s"], case["forward_backward_s"]
    lines.append(
      f"| {case['case']} | forward | "
      + " | ".join(f"{1e3 * fwd[n]:.2f}" for n in impls.IMPLEMENTATIONS)
      + " | |"
    )
    lines.append(
      "| | forward + backward | "
      + " | ".join(f"{1e3 * fb[n]:.2f}" for n in impls.IMPLEMENTATIONS)
      + f" | {1e3 * case['streaming_floor_s']:.2f} |"
    )
  lines += [
    "",
    "Time ratios (bnjax / other; below 1 means bnjax is faster), training forward alone and"
    " forward + backward:",
    "",
    "| case | forward vs Flax fast | forward + backward vs Flax fast | vs Flax exact | vs naive |"
    " bnjax / streaming floor | Flax fast / floor |",
    "|---|---|---|---|---|---|---|",
  ]
  for case in results["batch_norm"]:
    r = case["ratios"]["bnjax"]
    naive = ratio_summary(
      [case["forward_backward_s"]["bnjax"]], [case["forward_backward_s"]["naive_two_pass"]]
    )
    lines.append(
      f"| {case['case']} | {ratio_text(r['forward_vs_flax_fast'])} | "
      f"{ratio_text(r['forward_backward_vs_flax_fast'])} | "
      f"{ratio_text(r['forward_backward_vs_flax_exact'])} | {naive['median']:.2f} | "
      f"{ratio_text(r['forward_backward_vs_streaming_floor'])} | "
      f"{ratio_text(case['ratios']['flax_fast']['forward_backward_vs_streaming_floor'])} |"
    )
  lines += [
    "",
    "### 3. Collectives per synchronized layer (compiled HLO, 8 CPU devices)",
    "",
    "Those that run on every call; in brackets, all in the program where branches of a"
    " `lax.cond` (bnjax's second pass, for large offsets or overflow) hold more.",
    "",
    "| implementation | pmap forward | pmap forward + backward | shard_map forward + backward "
    "| jit, sharded batch, forward + backward |",
    "|---|---|---|---|---|",
  ]
  programs = (
    "pmap_forward",
    "pmap_forward_backward",
    "shard_map_forward_backward",
    "jit_sharded_forward_backward",
  )
  for name, c in results["collectives"].items():
    fmt = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "0"  # noqa: E731

    def cell(key, c=c, fmt=fmt):
      run = c.get("run_on_every_call", {}).get(key, c[key])
      return fmt(run) + ("" if run == c[key] else f" ({fmt(c[key])} in the program)")

    lines.append(f"| {name} | " + " | ".join(cell(key) for key in programs) + " |")
  lines += [
    "",
    "### 4. Temporary memory of forward + backward (XLA memory analysis), bytes",
    "",
    "| case | " + " | ".join(impls.IMPLEMENTATIONS) + " |",
    "|---|" + "---|" * len(impls.IMPLEMENTATIONS),
  ]
  for case in results["batch_norm"]:
    lines.append(
      f"| {case['case']} | "
      + " | ".join(str(case["temp_bytes_forward_backward"][n]) for n in impls.IMPLEMENTATIONS)
      + " |"
    )
  r = results["resnet"]
  lines += [
    "",
    f"### 5. Training step of {r['model']}",
    "",
    f"bnjax.linen.BatchNorm {1e3 * r['step_s']['bnjax']:.1f} ms, flax.linen.BatchNorm "
    f"{1e3 * r['step_s']['flax']:.1f} ms: ratio {ratio_text(r['bnjax_vs_flax'])}.",
  ]
  if "synchronized" in r:
    sync = r["synchronized"]
    lines += [
      "",
      f"The same global batch under `shard_map` over {sync['devices']} CPU devices, statistics "
      f"synchronized (`axis_name`): bnjax {1e3 * sync['step_s']['bnjax']:.1f} ms, Flax "
      f"{1e3 * sync['step_s']['flax']:.1f} ms: ratio {ratio_text(sync['bnjax_vs_flax'])}.",
    ]
  mn = results["mnist_loop"]
  lines += [
    "",
    "### 6. MNIST training loop (784-100-100-100-10 with BN, batch 60)",
    "",
    f"Data: {mn['data']}. On-device loop {mn['steps_per_s']['on_device_loop']:.0f} steps/s, "
    f"per-step Python loop {mn['steps_per_s']['python_loop']:.0f} steps/s (chunks of "
    f"{mn['steps_per_chunk']} steps): "
    f"the Python loop takes {ratio_text(mn['python_loop_time_vs_on_device'])} times as long. "
    f"The same network in plain JAX (hand-written two-pass BN, no Flax) runs at "
    f"{mn['steps_per_s']['plain_jax_on_device_loop']:.0f} steps/s: bnjax + Flax take "
    f"{ratio_text(mn['on_device_vs_plain_jax'])} times its time.",
  ]
  if "network_50k_training_loop_s" in mn:
    lines.append(
      f"One 50,000-step network: {mn['network_50k_training_loop_s']:.1f} s of training loop"
      + (
        f"; {mn['network_50k_with_100_evaluations_s']:.1f} s for the whole run with 100 "
        "evaluations "
        "of the 10,000 test images and checkpoints"
        if "network_50k_with_100_evaluations_s" in mn
        else ""
      )
      + "."
    )
  return "\n".join(lines) + "\n"


COMMITTED_RESULTS = (
  HERE / "results.json",
  HERE.parent / "BENCHMARKS.md",
)  # a full run's, in the repository


def output_paths(*, quick: bool, output_dir: str | None) -> tuple[pathlib.Path, pathlib.Path]:
  """Where ``results.json`` and ``BENCHMARKS.md`` go: the committed files for a full
  run, a temporary folder for a quick one, or ``output_dir``."""
  if output_dir:
    return pathlib.Path(output_dir) / "results.json", pathlib.Path(output_dir) / "BENCHMARKS.md"
  if quick:
    folder = pathlib.Path(tempfile.gettempdir()) / "bnjax-benchmarks-quick"
    return folder / "results.json", folder / "BENCHMARKS.md"
  return COMMITTED_RESULTS


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes and few rounds")
  parser.add_argument(  # --output_dir works too, as in the experiments' flags
    "--output-dir",
    "--output_dir",
    dest="output_dir",
    default=None,
    help="where results.json and BENCHMARKS.md go",
  )
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  json_path, markdown_path = output_paths(quick=args.quick, output_dir=args.output_dir)
  if args.quick and {json_path.resolve(), markdown_path.resolve()} & set(COMMITTED_RESULTS):
    parser.error(
      f"--quick would overwrite the full run's results in {args.output_dir}; "
      "give another --output-dir"
    )
  rounds = args.rounds or (2 if args.quick else 30)
  repeats = args.repeats or (1 if args.quick else 3)
  results = {
    "machine": machine(),
    "settings": {"quick": args.quick, "rounds": rounds, "repeats": repeats},
  }
  results["batch_norm"] = bench_batch_norm(args.quick, rounds, repeats)
  results["collectives"] = bench_collectives(args.quick)
  results["resnet"] = bench_resnet(args.quick, max(2, rounds // 3), repeats)
  results["mnist_loop"] = bench_mnist_loop(args.quick, rounds, repeats)
  header = (
    "# Benchmarks\n\n"
    "Written by `python -m benchmarks.run`; see `benchmarks/run.py` for the method.\n\n"
  )
  document = header + markdown(results)
  section = pod_scale.committed_section()  # the pod-scale tables, from their own run
  if section:
    document = pod_scale.with_section(document, section)
  write_results(json_path, markdown_path, results, document)
  return results


if __name__ == "__main__":
  main()
