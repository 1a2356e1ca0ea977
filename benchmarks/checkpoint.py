"""Training wall time with a checkpoint every K steps, async and sync, against no checkpoints.

The loop is the trainer's: put the batch, run the step, save when due (`jaxscale.checkpoint`),
check for preemption. Four variants share one process and one train state:
  none     no saves, no preemption check (the reference)
  watch    the preemption check at every step boundary, no saves
  async    the check and an async save every K steps (the trainer's default)
  sync     the check and a sync save every K steps
The unit of time is one save period: K steps, the save after the first of them (an async write
overlaps the other K - 1), timed until the write is committed and the state is ready. Periods of
the four variants alternate, in a rotating order, over many rounds, so that the load of a shared
machine falls on all of them alike; the script prints each one's median time per step and its
ratio to `none` (with the quartiles, to show the noise), and the same for each one's best
period, the one least disturbed by other load; then each one's CPU time per step (all threads)
and how long a save() call blocks the loop; last, what the checksums that every save writes
(`jaxscale.integrity`) cost, against a save period and a sync save.
Goal: async <= 1.05.

  python benchmarks/checkpoint.py                   # resnet18 small stem, 32x32x3, batch 8, K=5
  python benchmarks/checkpoint.py --model resnet20 --global-batch 128
  python benchmarks/checkpoint.py --model resnet50 --image-size 224 --num-classes 1000 \
      --global-batch 256 --precision bf16 --every 50 --rounds 4        # one GPU
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from common import random_pieces
from jaxscale import checkpoint, integrity, mesh as mesh_lib, preemption
from jaxscale.config import defaults, to_json
VARIANTS = ("none", "watch", "async", "sync")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--global-batch", type=int, default=8)
  parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--every", type=int, default=5, help="K: save every K steps")
  parser.add_argument("--rounds", type=int, default=16, help="save periods per variant")
  args = parser.parse_args()

  devices = jax.devices()[:args.devices]
  mesh = mesh_lib.create_mesh("data", devices)
  pieces, _ = random_pieces(args.model, image_size=args.image_size, global_batch=args.global_batch,
                            num_classes=args.num_classes, devices=devices,
                            overrides=[f"precision={args.precision}"])
  runner = pieces.runner
  rng = np.random.default_rng(0)
  shape = (args.image_size, args.image_size, 3)
  batches = [{"image": rng.integers(0, 256, (args.global_batch, *shape), dtype=np.uint8),
              "label": rng.integers(0, args.num_classes, args.global_batch).astype(np.int32)}
             for _ in range(4)]
  state = [pieces.init_state()]
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state[0])) / 2**20
  root = tempfile.mkdtemp(prefix="jaxscale_ckpt_bench_")
  config_json = to_json(defaults())

  watch = preemption.PreemptionWatch(mesh)
  ckpts = {v: checkpoint.Checkpoints(os.path.join(root, v), config_json, every_steps=args.every,
                                     keep=3, async_save=v == "async") for v in ("async", "sync")}
  steps_done = {v: 0 for v in VARIANTS}
  save_calls = {v: [] for v in ckpts}  # seconds each save() call blocked the loop

  def period(variant: str) -> tuple[float, float]:
    """(wall, CPU) seconds per step over one save period of `variant`, its write committed."""
    jax.block_until_ready(state[0])
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(args.every):
      step = steps_done[variant] = steps_done[variant] + 1
      state[0], _ = runner.train_step(state[0], runner.put_batch(batches[step % len(batches)]),
                                      0.01)
      if variant in ckpts and i == 0:
        call = time.perf_counter()
        ckpts[variant].save(step, runner.global_state(state[0]), {"data": {"position": step}})
        save_calls[variant].append(time.perf_counter() - call)
      if variant != "none" and watch.stop_requested():
        raise RuntimeError("preempted during the benchmark")
    if variant in ckpts:
      ckpts[variant].wait()
    jax.block_until_ready(state[0])
    return ((time.perf_counter() - start) / args.every,
            (time.process_time() - start_cpu) / args.every)

  for variant in VARIANTS:  # compile, warm up, first saves
    period(variant)
  for calls in save_calls.values():
    calls.clear()
  times, cpu = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
  for r in range(args.rounds):
    for variant in VARIANTS[r % 4:] + VARIANTS[:r % 4]:  # rotate: no variant always goes first
      wall_s, cpu_s = period(variant)
      times[variant].append(wall_s)
      cpu[variant].append(cpu_s)
  checksum_s = []  # what a save spends on its checksums: one pass on the devices, then fetched
  for _ in range(args.rounds + 1):  # the first one compiles
    jax.block_until_ready(state[0])
    start = time.perf_counter()
    jax.device_get(integrity.checksums(runner.global_state(state[0])))
    checksum_s.append(time.perf_counter() - start)
  checksum_s = statistics.median(checksum_s[1:])
  for c in ckpts.values():
    c.close()
  watch.close()
  shutil.rmtree(root, ignore_errors=True)

  median = {v: statistics.median(t) for v, t in times.items()}
  quartiles = {v: statistics.quantiles(t, n=4) for v, t in times.items()}
  best = {v: min(t) for v, t in times.items()}  # the period least disturbed by other load
  print(f"{datetime.date.today()} {platform.node() or 'host'}: {os.cpu_count()} CPUs, "
        f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}")
  print(f"{args.model} {shape} {args.precision} global batch {args.global_batch}, state {state_mb:.1f} MiB, "
        f"a save every {args.every} steps, median of {args.rounds} periods per variant")
  for variant in VARIANTS:
    q1, _, q3 = quartiles[variant]
    print(f"{variant:6s} median {median[variant] * 1e3:7.1f} ms/step (quartiles {q1 * 1e3:.1f}, "
          f"{q3 * 1e3:.1f}), ratio to none {median[variant] / median['none']:.3f}; "
          f"best {best[variant] * 1e3:7.1f} ms/step, ratio {best[variant] / best['none']:.3f}")
  print(f"goal: async <= 1.05 (median ratio {median['async'] / median['none']:.3f}, best-period "
        f"ratio {best['async'] / best['none']:.3f})")
  for variant in VARIANTS:
    extra = (f", save() blocks {statistics.median(save_calls[variant]) * 1e3:.1f} ms (median)"
             if variant in save_calls else "")
    print(f"{variant:6s} CPU time of the process {statistics.median(cpu[variant]) * 1e3:7.1f} "
          f"ms/step (median){extra}")
  print(f"checksums of the state (part of every save above): {checksum_s * 1e3:.1f} ms (median), "
        f"{checksum_s / (median['none'] * args.every):.2%} of a save period of {args.every} steps, "
        f"{checksum_s / statistics.median(save_calls['sync']):.1%} of a sync save() call")


if __name__ == "__main__":
  main()
