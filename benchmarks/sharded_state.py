"""Sharded training state: per-device memory, compiled step memory, collectives and step time
per `state_sharding` mode, against `replicated`, in one process on the same devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharded_state.py

For each model (ResNet-50 with LARS, ViT-B/16 with LAMB; two moments per parameter) and mode:
the bytes of parameters and optimizer state on one device (its addressable shards), XLA's
memory analysis of the compiled train step, the elements each kind of collective moves, and
the median step time over interleaved rounds, as a ratio to `replicated`. Small images and 2
images per device keep it CPU-sized and put the weight update's share of the step where the
records ran (16-40 images per GPU); the step-time ratio on CPU devices that share 2 cores says
little about a GPU, where `benchmarks/scaling_model.py` predicts it. A bigger run: `--models`,
`--image-size 224 --per-device-batch 32` on a GPU machine.
"""
from __future__ import annotations

import argparse
import datetime
import re
import statistics
import time

import jax
import numpy as np

from common import random_pieces

MODELS = {"resnet50": ("lars", 1000), "vit_b16": ("lamb", 1000)}
MODES = ("replicated", "optimizer", "fsdp")


def device_bytes(tree) -> int:
  """Bytes of `tree` held by device 0."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def collective_elements(hlo: str) -> dict[str, int]:
  """Elements moved per kind of collective in a compiled module's text."""
  out = {"all-reduce": 0, "reduce-scatter": 0, "all-gather": 0}
  for line in hlo.splitlines():
    match = re.search(r" (all-reduce|reduce-scatter|all-gather)(-start)?\(", line)
    if match and " = " in line:
      result_type = line[line.index(" = ") + 3:match.start()]
      for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result_type):
        out[match.group(1)] += int(np.prod([int(n) for n in dims.split(",") if n] or [1]))
  return out


def measure(model: str, args) -> list[dict]:
  optimizer, classes = MODELS[model]
  runs = {}
  for mode in args.modes:
    pieces, batch = random_pieces(
        model, image_size=args.image_size, num_classes=classes,
        global_batch=args.per_device_batch * jax.device_count(),
        overrides=[f"state_sharding={mode}", f"optimizer.name={optimizer}", "stem=imagenet"])
    state = pieces.init_state()
    compiled = pieces.runner.train_step.lower(state, batch, 0.1).compile()
    memory = compiled.memory_analysis()
    row = {"model": model, "optimizer": optimizer, "mode": mode,
           "params_mib": device_bytes(state.params) / 2**20,
           "opt_state_mib": device_bytes(state.opt_state) / 2**20,
           "temp_mib": memory.temp_size_in_bytes / 2**20,
           "args_mib": memory.argument_size_in_bytes / 2**20,
           **collective_elements(compiled.as_text())}
    for _ in range(args.warmup):
      state, metrics = pieces.runner.train_step(state, batch, 0.1)
    jax.block_until_ready(metrics)
    runs[mode] = [pieces.runner, state, batch, [], row]
    print(f"  {model} {mode}: compiled", flush=True)
  for _ in range(args.rounds):  # interleaved: the machine's load hits every mode alike
    for mode, run in runs.items():
      runner, state, batch, times, _ = run
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = runner.train_step(state, batch, 0.1)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - start) / args.steps)
      run[1] = state
  rows = []
  for mode, run in runs.items():
    row = run[4]
    row["step_ms"] = statistics.median(run[3]) * 1e3
    row["vs_replicated"] = row["step_ms"] / (statistics.median(runs["replicated"][3]) * 1e3)
    rows.append(row)
  del runs
  return rows


def table(rows: list[dict], args) -> str:
  n = jax.device_count()
  lines = [f"{n} x {jax.devices()[0].device_kind} devices, {args.image_size}x{args.image_size} "
           f"images, {args.per_device_batch} per device; jax {jax.__version__}, "
           f"{datetime.date.today()}; step time: median of {args.rounds} rounds of "
           f"{args.steps} steps, modes interleaved. Per-device MiB from the addressable shards; "
           f"temp: XLA's scratch for the compiled step; collectives: elements each device's "
           f"program moves per kind.", "",
           "| model | mode | params MiB | opt state MiB | vs replicated (params + opt) | "
           "step temp MiB | all-reduce | reduce-scatter | all-gather | step ms | vs replicated |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  full = {r["model"]: r["params_mib"] + r["opt_state_mib"] for r in rows
          if r["mode"] == "replicated"}
  for r in rows:
    state = r["params_mib"] + r["opt_state_mib"]
    lines.append(
        f"| {r['model']} ({r['optimizer']}) | {r['mode']} | {r['params_mib']:.1f} | "
        f"{r['opt_state_mib']:.1f} | {state / full[r['model']]:.3f} (1/{n} = {1 / n:.3f}) | "
        f"{r['temp_mib']:.0f} | {r['all-reduce']:,} | {r['reduce-scatter']:,} | "
        f"{r['all-gather']:,} | {r['step_ms']:.0f} | {r['vs_replicated']:.2f}x |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet50,vit_b16")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--per-device-batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()
  args.modes = args.modes.split(",")
  if args.modes[0] != "replicated":
    parser.error("--modes must start with replicated, the reference")
  rows = []
  for model in args.models.split(","):
    if model not in MODELS:
      parser.error(f"--models: unknown {model!r}; known: {', '.join(MODELS)}")
    rows += measure(model, args)
  print(table(rows, args))


if __name__ == "__main__":
  main()
