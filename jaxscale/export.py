"""Export a checkpoint's parameters and BatchNorm statistics as one file for inference.

    python -m jaxscale.export --workdir=DIR [--step=N] [--output=FILE]   (or: jaxscale-export)

writes FILE (default DIR/export/model_<step>.msgpack), a flax msgpack of
  {"variables": {"params": ..., "batch_stats": ...}, "model": {name, num_classes, stem,
   image_shape, mean, std}, "step": int, "config": the run's resolved config as JSON}.
Load it back into the model with `load`:

    exported = jaxscale.export.load("model_1000.msgpack")
    logits = exported.logits(images)  # uint8 NHWC images, normalized as in training
    # or: exported.model.apply(exported.variables, normalized_images, train=False)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import flax
import jax
import numpy as np

from jaxscale import checkpoint, models, step as step_lib


def export(workdir: str, step: int | None = None, output: str | None = None) -> str:
  """Writes checkpoint `step` (default: the latest complete one) of `workdir`; returns the path."""
  if step is None:
    step_dir = checkpoint.latest_step_dir(workdir)
  else:
    step_dir = os.path.join(workdir, "checkpoints", str(step))
  state, meta = checkpoint.read(step_dir)
  if "model" not in meta:
    raise checkpoint.CheckpointError(f"checkpoint {step_dir} has no model description in meta")
  record = {"variables": {"params": state["params"], "batch_stats": state.get("batch_stats", {})},
            "model": meta["model"], "step": int(meta["step"]),
            "config": json.dumps(meta.get("config", {}), sort_keys=True)}
  output = output or os.path.join(workdir, "export", f"model_{meta['step']}.msgpack")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".tmp"
  with open(tmp, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(record))
  os.replace(tmp, output)  # never leave a half-written export under the final name
  return output


@dataclasses.dataclass(frozen=True)
class Exported:
  """An exported model: the Flax module, its variables and its input normalization."""
  model: Any
  variables: dict
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  step: int
  config: dict

  def logits(self, images: np.ndarray) -> jax.Array:
    """Class logits for a batch of uint8 (or [0, 255] float) images of `image_shape`."""
    return _logits(self.model, self.variables, images, self.mean, self.std)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _logits(model, variables, images, mean, std):
  return model.apply(variables, step_lib.normalize(images, mean, std), train=False)


def load(path: str) -> Exported:
  """Reads a file written by `export` and rebuilds its model."""
  with open(path, "rb") as f:
    record = flax.serialization.msgpack_restore(f.read())
  info = record["model"]
  model = models.create_model(info["name"], num_classes=int(info["num_classes"]),
                              stem=info["stem"])
  return Exported(model=model, variables=record["variables"],
                  image_shape=tuple(int(n) for n in info["image_shape"]),
                  mean=tuple(info["mean"]), std=tuple(info["std"]), step=int(record["step"]),
                  config=json.loads(record["config"]))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="jaxscale-export",
      description="Write a checkpoint's parameters and BatchNorm statistics as one msgpack file "
                  "for inference (load it with jaxscale.export.load).")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint step (default: the latest complete one)")
  parser.add_argument("--output", default=None,
                      help="the file to write (default: WORKDIR/export/model_<step>.msgpack)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    path = export(args.workdir, args.step, args.output)
  except checkpoint.CheckpointError as e:
    print(f"jaxscale-export: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == "__main__":
  main()
