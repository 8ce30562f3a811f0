"""Keras's own BatchNormalization numbers, for tests/test_convert.py (a subprocess).

Run as ``python -m tests.keras_reference IN.npz OUT.npz`` with ``KERAS_BACKEND=jax``
set in the child's environment (Keras reads it when first imported, so the suite's
own process never imports Keras). For each case of ``IN.npz`` (``<case>/settings``:
the layer's keyword arguments as JSON; ``<case>/weight<j>``: ``set_weights``'s
list; ``<case>/x<i>``: training batches; ``<case>/eval_x``), the layer takes a
training step on each batch, then evaluates ``eval_x``. ``OUT.npz`` holds each
step's output ``<case>/y<i>`` and weights ``<case>/step<i>/weight<j>``, and
``<case>/eval_y``.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run_case(keras, data, case: str) -> dict:
  settings = json.loads(str(data[f"{case}/settings"]))
  weights = [data[k] for k in sorted(k for k in data.files if k.startswith(f"{case}/weight"))]
  steps = sorted(k for k in data.files if k.startswith(f"{case}/x"))
  layer = keras.layers.BatchNormalization(**settings)
  layer.build(data[f"{case}/eval_x"].shape)
  layer.set_weights(weights)
  out = {}
  for i, key in enumerate(steps):
    out[f"{case}/y{i}"] = np.asarray(layer(data[key], training=True))
    for j, weight in enumerate(layer.get_weights()):
      out[f"{case}/step{i}/weight{j}"] = weight
  out[f"{case}/eval_y"] = np.asarray(layer(data[f"{case}/eval_x"], training=False))
  return out


def main(source: str, target: str) -> None:
  import keras  # only here: Keras's backend is chosen at its first import

  assert keras.config.backend() == "jax", keras.config.backend()
  data = np.load(source)
  cases = sorted({k.split("/")[0] for k in data.files})
  out = {"keras_version": np.array(keras.__version__)}
  for case in cases:
    out |= run_case(keras, data, case)
  np.savez(target, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
