"""Mixed precision, measured: quickstart convergence and ResNet-50 step throughput per policy.

1. Convergence: `jaxscale.train` on the quickstart recipe (configs/quickstart.py: resnet8,
   Fashion-MNIST) in fp32, bf16, fp16 and bf16 with a bfloat16 gradient all-reduce, each to the
   same number of epochs in its own process; final test accuracy and wall time.
2. Speed: the jaxscale train step of a ResNet-50 on synthetic data already on the devices, per
   policy, in this process, as images/s and as a ratio to fp32 measured in the same run
   (224x224 at 256 images per device on a GPU; 32x32 at 32 per device on a CPU).

Both tables are printed as markdown and written to --out.

  python benchmarks/precision.py --out benchmarks/results/precision.md       # the full run
  python benchmarks/precision.py --epochs 0.2 --steps 3 --out /tmp/p.md      # a quick check

On a CPU, XLA (jax 0.10) converts bfloat16/float16 convolutions to float32: the CPU ratios show
conversion and memory-traffic effects, not the tensor-core speed-up half precision is for.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
# name -> (precision, grad_allreduce_dtype)
VARIANTS = {
    "fp32": ("fp32", "float32"),
    "bf16": ("bf16", "float32"),
    "fp16": ("fp16", "float32"),
    "bf16 + bf16 all-reduce": ("bf16", "bfloat16"),
}


def prepare_data(overrides: list[str]) -> None:
  """Converts Fashion-MNIST once, before any run is timed."""
  from jaxscale import config as config_lib, data
  data.load_dataset(config_lib.load(QUICKSTART, [o[len("--config."):] for o in overrides]))


def train_quickstart(name: str, epochs: float, workdir: str, overrides: list[str],
                     env: dict[str, str], timeout: float) -> dict:
  """One quickstart run in its own process: its final eval event, its train events and the
  process's wall time."""
  policy, allreduce = VARIANTS[name]
  args = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}",
          f"--workdir={workdir}", f"--config.num_epochs={epochs}",
          f"--config.precision={policy}", f"--config.grad_allreduce_dtype={allreduce}",
          "--config.progress_bar=off", "--config.log_every_steps=10", *overrides]
  start = time.time()
  proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  wall = time.time() - start
  if proc.returncode:
    raise RuntimeError(f"{name}: jaxscale.train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  return {"eval": events[-1], "train": [e for e in events if e["split"] == "train"],
          "wall": wall}


def convergence_table(results: dict[str, dict], epochs: float, devices: str) -> str:
  ref = results["fp32"]
  def loop_time(r):  # from the first logged step to the last: no start-up, compile or eval
    return r["train"][-1]["wall_time"] - r["train"][0]["wall_time"]

  lines = [f"Quickstart (resnet8, Fashion-MNIST, global batch 128), {epochs:g} epochs, "
           f"{devices}, one process per run. Wall time: the whole process (start-up, compile, "
           f"training, eval); loop: from the first logged step to the last.", "",
           "| policy | test accuracy | vs fp32 | final train loss | skipped steps | "
           "final loss scale | wall time | loop | loop vs fp32 |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    acc, ref_acc, last = r["eval"]["accuracy"], ref["eval"]["accuracy"], r["train"][-1]
    lines.append(
        f"| {name} | {100 * acc:.2f}% | {100 * (acc - ref_acc):+.2f} pp | {last['loss']:.4f} | "
        f"{last['skipped_steps']} | {last['loss_scale']:g} | {r['wall']:.0f} s | "
        f"{loop_time(r):.0f} s | {loop_time(r) / loop_time(ref):.2f}x |")
  return "\n".join(lines)


def throughput(names: list[str], image_size: int, batch_per_device: int, steps: int,
               warmup: int, rounds: int) -> tuple[dict[str, float], str]:
  """Median images/s of the ResNet-50 train step per variant, rounds interleaved."""
  import jax

  from common import random_pieces

  runs = {}
  for name in names:
    policy_name, allreduce = VARIANTS[name]
    pieces, batch = random_pieces(
        "resnet50", image_size=image_size, global_batch=batch_per_device * jax.device_count(),
        overrides=[f"precision={policy_name}", f"grad_allreduce_dtype={allreduce}",
                   "stem=imagenet", "optimizer.weight_decay=0.0"])
    runner, state = pieces.runner, pieces.init_state()
    batch_size = batch_per_device * pieces.num_devices
    for _ in range(warmup):  # compiles, and lets the loss scale settle
      state, metrics = runner.train_step(state, batch, 0.1)
    jax.block_until_ready(metrics)
    runs[name] = [runner, state, batch, []]
    print(f"  compiled {name}", file=sys.stderr, flush=True)
  for _ in range(rounds):
    for name, run in runs.items():
      runner, state, batch, rates = run
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = runner.train_step(state, batch, 0.1)
      jax.block_until_ready((state, metrics))
      rates.append(steps * batch_size / (time.perf_counter() - start))
      run[1] = state
  device = jax.devices()[0]
  where = f"{jax.device_count()} x {device.device_kind} ({device.platform})"
  return {name: statistics.median(run[3]) for name, run in runs.items()}, where


def throughput_table(rates: dict[str, float], where: str, image_size: int, batch_per_device: int,
                     steps: int, rounds: int) -> str:
  lines = [f"ResNet-50 train step, synthetic data on the devices, {image_size}x{image_size}, "
           f"{batch_per_device} images per device, {where}; median of {rounds} rounds of "
           f"{steps} steps, policies interleaved.", "",
           "| policy | images/s | vs fp32 |", "|---|---|---|"]
  for name, rate in rates.items():
    lines.append(f"| {name} | {rate:,.1f} | {rate / rates['fp32']:.2f}x |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=float, default=4.0, help="quickstart epochs per run")
  parser.add_argument("--data-dir", default="", help="TFDS data dir (config key data_dir)")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="training runs on this many virtual CPU devices (0: the default)")
  parser.add_argument("--timeout", type=float, default=7200, help="seconds per training run")
  parser.add_argument("--skip-convergence", action="store_true")
  parser.add_argument("--skip-throughput", action="store_true")
  parser.add_argument("--image-size", type=int, default=0, help="0: 224 on GPU/TPU, 32 on CPU")
  parser.add_argument("--batch-per-device", type=int, default=0,
                      help="0: 256 on GPU/TPU, 32 on CPU")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default="", help="also write the markdown here")
  args = parser.parse_args()

  sections = []
  if not args.skip_convergence:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    devices = "the default devices"
    if args.cpu_devices:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
      devices = f"{args.cpu_devices} virtual CPU devices"
    overrides = [f"--config.data_dir={args.data_dir}"] if args.data_dir else []
    prepare_data(overrides)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
      for i, name in enumerate(VARIANTS):
        print(f"training {name} ({args.epochs:g} epochs)", file=sys.stderr, flush=True)
        results[name] = train_quickstart(name, args.epochs, os.path.join(tmp, str(i)), overrides,
                                         env, args.timeout)
    sections.append(convergence_table(results, args.epochs, devices))

  if not args.skip_throughput:
    import jax
    accelerator = jax.devices()[0].platform != "cpu"
    image_size = args.image_size or (224 if accelerator else 32)
    batch = args.batch_per_device or (256 if accelerator else 32)
    print(f"timing ResNet-50 steps ({image_size}x{image_size}, {batch} per device)",
          file=sys.stderr, flush=True)
    rates, where = throughput(list(VARIANTS), image_size, batch, args.steps, args.warmup,
                              args.rounds)
    sections.append(throughput_table(rates, where, image_size, batch, args.steps, args.rounds))
    if not accelerator:
      sections.append("On a CPU, XLA converts bfloat16/float16 convolutions to float32: these "
                      "ratios show conversion and memory-traffic effects, not the tensor-core "
                      "speed-up half precision is for (measure that on a GPU).")

  text = "\n\n".join(sections) + "\n"
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
