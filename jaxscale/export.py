"""Export a checkpoint's parameters and BatchNorm statistics as one file for inference.

    python -m jaxscale.export --workdir=DIR [--step=N] [--output=FILE]   (or: jaxscale-export)

writes FILE (default DIR/export/model_<step>.msgpack), a flax msgpack of
  {"variables": {"params": ..., "batch_stats": ...}, "model": {name, task, options,
   input_shape, mean, std, ...}, "step": int, "config": the run's resolved config as JSON}.
`--best` takes the checkpoint of the best eval accuracy (`checkpoint_keep_best`). Load it back
into the model with `load`:

    exported = jaxscale.export.load("model_1000.msgpack")
    logits = exported.logits(images)  # images as in training (uint8 or float), normalized
    # or: exported.model.apply(exported.variables, model_input, train=False)

A zoo model or one named by import path is rebuilt from its name; a model that was passed to
`jaxscale.train.run` as a Python object is not importable by name: pass the same object,
`load(path, model=MyModel)`.
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

from jaxscale import checkpoint, models, tasks
from jaxscale.errors import JaxscaleError


def export(workdir: str, step: int | None = None, output: str | None = None, *,
           best: bool = False) -> str:
  """Writes checkpoint `step` (default: the latest complete one; `best`: the one of the best
  eval accuracy) of `workdir`; returns the path."""
  if best:
    step_dir = checkpoint.best_step_dir(workdir)
  elif step is None:
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
  """An exported model: the model (`jaxscale.models.Model`), its variables, its input."""
  model: models.Model
  variables: dict
  input_shape: tuple[int, ...]
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  step: int
  config: dict

  def logits(self, images: np.ndarray) -> jax.Array:
    """Class logits for a batch of images as the run's data had them (uint8 or float),
    normalized as in training."""
    return _logits(self.model, self.variables, images, self.mean, self.std)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _logits(model, variables, images, mean, std):
  return model.apply(variables, tasks.normalize(images, mean, std), train=False)[0]


def load(path: str, model: Any = None) -> Exported:
  """Reads a file written by `export` and rebuilds its model (or uses `model`, the object the
  run was given: a model passed as a Python object has no name to rebuild it from)."""
  with open(path, "rb") as f:
    record = flax.serialization.msgpack_restore(f.read())
  info = record["model"]
  name = info["name"]
  if model is None and name not in models.MODELS and ":" not in name:
    raise JaxscaleError(f"{path}: model {name!r} was passed to the run as a Python object; "
                        f"load it with export.load(path, model=<that object>)")
  built = models.build(model if model is not None else name, dict(info.get("options", {})),
                       name=name)
  mean, std = info.get("mean"), info.get("std")
  return Exported(model=built, variables=record["variables"],
                  input_shape=tuple(int(n) for n in info["input_shape"]),
                  mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                  step=int(record["step"]), config=json.loads(record["config"]))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="jaxscale-export",
      description="Write a checkpoint's parameters and BatchNorm statistics as one msgpack file "
                  "for inference (load it with jaxscale.export.load).")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint step (default: the latest complete one)")
  parser.add_argument("--best", action="store_true",
                      help="the checkpoint of the best eval accuracy (checkpoint_keep_best)")
  parser.add_argument("--output", default=None,
                      help="the file to write (default: WORKDIR/export/model_<step>.msgpack)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    path = export(args.workdir, args.step, args.output, best=args.best)
  except JaxscaleError as e:
    print(f"jaxscale-export: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == "__main__":
  main()
