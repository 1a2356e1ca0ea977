"""jaxscale's train step against a minimal hand-written `jax.jit` step, same model, batch, devices.

The reference is what a user would write without jaxscale: `jax.jit` over the global batch
(sharded over the same devices, parameters replicated), BatchNorm over the whole batch, SGD with
Nesterov momentum and weight decay. Both run in this process, interleaved, and the script
prints the ratio of median step times (jaxscale / reference). Goal: <= 1.05.

  python benchmarks/step_overhead.py                        # 1 device, resnet8, 28x28, batch 128
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step_overhead.py --devices 8
  python benchmarks/step_overhead.py --model resnet50 --image-size 224 --channels 3 \
      --num-classes 1000 --global-batch 256 --precision bf16     # one GPU
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscale import mesh as mesh_lib, optim, precision

from common import random_pieces

MEAN, STD = 127.5, 64.0  # common.random_pieces normalizes with these


def reference_step(model, tx, compute_dtype):
  """The hand-written step: plain jit, no shard_map, no explicit reductions."""
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, batch_stats, opt_state, images, labels):
    x = ((images.astype(jnp.float32) - MEAN) / STD).astype(compute_dtype)

    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
      return loss, new["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss
  return train_step


def time_steps(fn, steps: int) -> float:
  """Median seconds per step over `steps` calls of fn(), each one waited for."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet8")
  parser.add_argument("--image-size", type=int, default=28)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--global-batch", type=int, default=128)
  parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                      help="fp16 would need loss scaling in the reference too")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  args = parser.parse_args()

  devices = jax.devices()[:args.devices]
  mesh = mesh_lib.create_mesh("data", devices)
  shape = (args.image_size, args.image_size, args.channels)
  dtype = precision.parse_policy(args.precision).compute_dtype
  lr = 0.1

  # jaxscale: the trainer's own runner.
  pieces, batch = random_pieces(args.model, image_size=args.image_size, channels=args.channels,
                                num_classes=args.num_classes, global_batch=args.global_batch,
                                devices=devices, overrides=[f"precision={args.precision}"])
  runner = pieces.runner
  state = [pieces.init_state()]
  images, labels = (np.asarray(x) for x in jax.device_get((batch["image"], batch["label"])))

  def jaxscale_step():
    state[0], metrics = runner.train_step(state[0], batch, lr)
    return metrics

  # Reference: the same model without cross-replica BN (jit sees the global batch anyway).
  plain_model = pieces.model.module
  tx = optim.build_optimizer(pieces.config.optimizer, lr)
  variables = plain_model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
  replicated = mesh_lib.replicated(mesh)
  ref = [jax.device_put(variables["params"], replicated),
         jax.device_put(variables["batch_stats"], replicated),
         jax.device_put(tx.init(variables["params"]), replicated)]
  sharding = mesh_lib.batch_sharding(mesh)
  ref_images, ref_labels = jax.device_put(images, sharding), jax.device_put(labels, sharding)
  plain_step = reference_step(plain_model, tx, dtype)

  def reference():
    params, batch_stats, opt_state, loss = plain_step(*ref, ref_images, ref_labels)
    ref[:] = [params, batch_stats, opt_state]
    return loss

  for fn in (jaxscale_step, reference):  # compile and warm up
    time_steps(fn, 3)
  ours, theirs = [], []
  for _ in range(args.rounds):
    ours.append(time_steps(jaxscale_step, args.steps))
    theirs.append(time_steps(reference, args.steps))
  ours_s, ref_s = statistics.median(ours), statistics.median(theirs)
  print(f"{args.model} {shape} {args.precision} global batch {args.global_batch} on "
        f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}")
  print(f"jaxscale step   {ours_s * 1e3:8.2f} ms (median of {args.rounds} rounds x {args.steps})")
  print(f"reference step  {ref_s * 1e3:8.2f} ms")
  print(f"ratio jaxscale / reference: {ours_s / ref_s:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
  main()
