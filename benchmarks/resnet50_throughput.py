"""ResNet-50 train-step throughput per precision policy, on synthetic data already on the device.

Runs jaxscale's own train step (shard_map runner, SGD-Nesterov, cross-replica BatchNorm) and
reports images/s, step time and model FLOP utilization (FLOPs from XLA's cost analysis of the
compiled step when it gives them, else 24.5 GFLOP per 224x224 image scaled by pixel count),
for fp32, bf16 and fp16, with each half-precision policy as a ratio to fp32 measured in the
same run.

  python benchmarks/resnet50_throughput.py                         # CPU: 64x64, batch 8
  python benchmarks/resnet50_throughput.py --image-size 224 --per-device-batch 256  # one GPU

Reference on an NVIDIA H200 (shared reference figures): the Flax ImageNet example's step,
6,862 images/s in bf16 and 7,199 in fp16. Record GPU measurements in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from common import random_pieces
from jaxscale import precision

GFLOP_PER_IMAGE_224 = 24.5  # ResNet-50 training step: about 3x the 8.2 GFLOP forward pass
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


def build(policy_name: str, image_size: int, global_batch: int, num_classes: int = 1000):
  """The jaxscale runner, state and an on-device batch for one policy."""
  pieces, batch = random_pieces("resnet50", image_size=image_size, global_batch=global_batch,
                                num_classes=num_classes,
                                overrides=[f"precision={policy_name}", "stem=imagenet",
                                           "optimizer.weight_decay=0.0"])
  return pieces.runner, pieces.init_state(), batch


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
  """A bf16 n^3 matrix product's rate on device 0: the chip's practical ceiling, this run."""
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32),
                     jax.devices()[0]).astype(jax.numpy.bfloat16)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  jax.block_until_ready(out)
  return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def measure(policy_name: str, args) -> dict:
  global_batch = args.per_device_batch * jax.device_count()
  runner, state, batch = build(policy_name, args.image_size, global_batch)
  start = time.perf_counter()
  compiled = runner.train_step.lower(state, batch, 0.1).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float((cost or {}).get("flops", 0.0)) * jax.device_count()
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, 0.1)  # the step compiled once, above
  jax.block_until_ready((state, metrics))
  # Steps back to back, as in training (the host dispatches ahead), one wait per round.
  rounds = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch, 0.1)
    jax.block_until_ready((state, metrics))
    rounds.append((time.perf_counter() - start) / args.steps)
  step_s = statistics.median(rounds)
  model_flops = GFLOP_PER_IMAGE_224 * 1e9 * (args.image_size / 224) ** 2 * global_batch
  return {"policy": policy_name, "step_ms": step_s * 1e3, "images_per_sec": global_batch / step_s,
          "xla_tflops": flops / step_s / 1e12 if flops else None,
          "model_tflops": model_flops / step_s / 1e12, "compile_s": compile_s}


def policy_names(text: str) -> list[str]:
  """An argparse type: every policy in "fp32,bf16" checked before minutes of measuring."""
  names = text.split(",")
  for name in names:
    try:
      precision.parse_policy(name)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return names


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--per-device-batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--policies", type=policy_names, default="fp32,bf16,fp16")
  parser.add_argument("--matmul", action="store_true",
                      help="also measure a bf16 8192^3 matrix product (the practical ceiling)")
  args = parser.parse_args()

  device = jax.devices()[0]
  name = getattr(device, "device_kind", device.platform)
  peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
  print(f"ResNet-50, {args.image_size}x{args.image_size}, per-device batch "
        f"{args.per_device_batch}, {jax.device_count()} x {name}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
  ceiling = matmul_tflops() if args.matmul else None
  if ceiling:
    print(f"bf16 8192^3 matrix product: {ceiling:.3g} TFLOP/s (the practical ceiling)")
  print("| policy | images/s | step (ms) | vs first | TFLOP/s (model) | TFLOP/s (XLA) | MFU "
        "(datasheet peak) | compile (s) |")
  print("|---|---|---|---|---|---|---|---|")
  base = None
  for policy in args.policies:
    r = measure(policy, args)  # each row printed as soon as it is measured
    base = base or r["images_per_sec"]
    mfu = f"{r['model_tflops'] / peak:.1%}" if peak else "n/a (no peak known for this device)"
    xla = f"{r['xla_tflops']:.3g}" if r["xla_tflops"] else "n/a"
    print(f"| {r['policy']} | {r['images_per_sec']:.1f} | {r['step_ms']:.2f} | "
          f"{r['images_per_sec'] / base:.2f}x | {r['model_tflops']:.3g} | {xla} | {mfu} | "
          f"{r['compile_s']:.0f} |", flush=True)

if __name__ == "__main__":
  main()
