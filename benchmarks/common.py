"""The trainer's own step on one batch of random images, for the benchmarks in this folder.

Every benchmark measures what `jaxscale-train` runs: `jaxscale.build.build` wires the model,
task, optimizer and runner from a config, here on random images already in memory.
"""
from __future__ import annotations

import numpy as np

from jaxscale import build, config as config_lib, data


def random_pieces(model: str, *, image_size: int, global_batch: int, channels: int = 3,
                  num_classes: int = 1000, devices=None, overrides=()):
  """(pieces, device batch): `model` on `global_batch` random uint8 images, built by
  `jaxscale.build.build` with SGD-Nesterov (weight decay 5e-4) and `overrides` (key=value)."""
  config = config_lib.defaults()
  for override in (f"model={model}", f"global_batch_size={global_batch}",
                   f"eval_batch_size={global_batch}", "optimizer.weight_decay=5e-4",
                   "progress_bar=off", *overrides):
    config_lib.apply_override(config, override)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (global_batch, image_size, image_size, channels), np.uint8)
  labels = rng.integers(0, num_classes, global_batch).astype(np.int32)
  dataset = data.from_arrays(train=(images, labels), num_classes=num_classes,
                             mean=(127.5,) * channels, std=(64.0,) * channels)
  pieces = build.build(config, dataset=dataset, devices=devices)
  return pieces, pieces.runner.put_batch({"image": images, "label": labels})
