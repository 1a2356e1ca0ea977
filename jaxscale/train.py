"""The trainer: `python -m jaxscale.train --config=configs/X.py --workdir=DIR [--config.key=value]`.

Read top to bottom, one run is: config -> mesh -> input -> model and optimizer -> update
(the compiled step) -> training loop -> eval -> summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from jaxscale import batching, checkpoint, config as config_lib
from jaxscale import data, models, optim, precision, step as step_lib
from jaxscale import distributed, xla_flags
from jaxscale.config import ConfigError
from jaxscale.mesh import create_mesh, data_axes
from jaxscale.metrics import MetricsWriter, Progress, log


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """`--config` and `--workdir`, plus any number of `--config.key=value` overrides."""
  parser = argparse.ArgumentParser(
      prog="jaxscale-train", description="Train a Flax model data-parallel over all devices.",
      epilog="Rerunning with the same workdir resumes from its latest checkpoint. Exit status: "
             "0 done; 1 too many non-finite steps in a row; 2 bad config or checkpoint; "
             f"{distributed.EXIT_UNREACHABLE} coordinator unreachable; "
             f"{checkpoint.EXIT_PREEMPTED} preempted by SIGTERM/SIGINT after saving a checkpoint "
             "(rerun the same command to resume).")
  parser.add_argument("--config", required=True, help="a Python file with get_config()")
  parser.add_argument("--workdir", required=True, help="where metrics and checkpoints go")
  args, rest = parser.parse_known_args(argv)
  overrides, i = [], 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith("--config."):
      parser.error(f"unrecognized argument {arg!r}; overrides look like --config.key=value")
    if "=" not in arg:  # --config.key value
      if i + 1 == len(rest):
        parser.error(f"{arg} needs a value")
      arg, i = f"{arg}={rest[i + 1]}", i + 1
    overrides.append(arg[len("--config."):])
    i += 1
  return args, overrides


def prepare_workdir(workdir: str, config_json: str) -> None:
  """Creates the workdir and its config.json; refuses one that holds a different config."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = config_lib.changed_keys(old, json.loads(config_json))
    if changed:
      raise ConfigError(f"workdir {workdir!r} holds a run of a different config (keys differ: "
                        f"{', '.join(changed)}); use another --workdir")
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config_json + "\n")
    os.replace(path + ".tmp", path)  # atomic: another process never reads half a file


def learning_rate_for(config, global_batch_size: int) -> float:
  """The base learning rate scaled to the global batch by `config.lr_scaling`."""
  return optim.scale_learning_rate(config.learning_rate, global_batch_size,
                                   config.reference_batch_size, config.lr_scaling)


def bn_momentum_for(config, steps_per_epoch: float) -> float:
  """`bn_momentum`, lowered by `bn_momentum_epochs` > 0 to a time constant of that many epochs.

  A running average of momentum m forgets with time constant 1 / (1 - m) steps: 100 steps at
  0.99, six epochs at 16 steps per epoch, far behind weights that change every step.
  """
  if not config.bn_momentum_epochs:
    return config.bn_momentum
  return max(0.0, min(config.bn_momentum,
                      1 - 1 / (config.bn_momentum_epochs * steps_per_epoch)))


def run(config, workdir: str) -> dict:
  """Trains and evaluates as `config` says; returns the final eval metrics."""
  start_time = time.time()

  # Mesh: every global device, 1-D or (hosts x local).
  mesh = create_mesh(config.mesh)
  axes = data_axes(mesh)
  num_devices = mesh.size
  config_lib.validate(config, num_devices)
  if config.parallelism == "pmap" and jax.process_count() > 1:  # its reductions stay in-process
    raise ConfigError("config key 'parallelism': 'pmap' runs on one process only; use shard_map")

  # Input: this process's shard of every global batch.
  dataset = data.load_dataset(config)
  prepare_workdir(workdir, config_lib.to_json(config))
  is_main = jax.process_index() == 0
  crop_size = 0 if dataset.name == "synthetic" else config.image_size
  train_transform = data.TrainTransform(image_size=crop_size, random_flip=config.random_flip,
                                        channels=dataset.image_shape[-1])
  loader = data.TrainLoader(dataset.train, seed=config.seed, workers=config.data_workers,
                            prefetch=config.prefetch_batches, transform=train_transform)
  # Batch sizes: constant, stages or adaptive (jaxscale/batching.py). Progress is counted in
  # examples, so epochs, the learning rate and the batch size agree whatever the sizes are.
  batches = batching.create(config, loader.num_examples, num_devices)
  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
    total_examples = total_steps * config.global_batch_size  # the schedule's length
  else:
    total_examples = round(config.num_epochs * loader.num_examples)
    total_steps = batches.num_steps(0, total_examples)

  # Model and optimizer: float32 master parameters, compute in the policy's dtype.
  policy = precision.parse_policy(config.precision)
  stem = config.stem
  if stem == "auto":
    stem = models.auto_stem(dataset.image_shape)
  group = config.bn_group_size
  groups = None
  if group and group < num_devices:
    groups = [list(range(i, i + group)) for i in range(0, num_devices, group)]
  # From the initial batch: the model, and so a resumed run, is the same whatever the schedule.
  initial_steps_per_epoch = loader.num_examples / batches.initial
  bn_momentum = bn_momentum_for(config, initial_steps_per_epoch)
  model = models.create_model(
      config.model, num_classes=dataset.num_classes, stem=stem, bn_momentum=bn_momentum,
      bn_axis_name=axes if len(axes) > 1 else axes[0], bn_axis_index_groups=groups,
      zero_init_last_bn=config.zero_init_last_bn, dtype=policy.compute_dtype,
      param_dtype=policy.param_dtype)
  # The schedule's shape over examples seen (peak 1), times the rate for the batch in force.
  lr_shape = optim.build_schedule(config.lr_schedule, base_learning_rate=1.0,
                                  steps_per_epoch=loader.num_examples, total_steps=total_examples)

  def make_optimizer(learning_rate):
    return optim.build_optimizer(config.optimizer, learning_rate)

  # Update: the per-device step under shard_map or pmap.
  spec = step_lib.StepSpec(model=model, make_optimizer=make_optimizer, axes=axes,
                           mean=dataset.mean, std=dataset.std,
                           label_smoothing=config.label_smoothing,
                           sync_batch_stats=groups is not None,
                           compute_dtype=policy.compute_dtype, output_dtype=policy.output_dtype,
                           grad_allreduce_dtype=precision.parse_dtype(
                               config.grad_allreduce_dtype, "grad_allreduce_dtype"),
                           allreduce=config.allreduce,
                           loss_scale=precision.loss_scale_config(config),
                           grad_accum_steps=config.grad_accum_steps,
                           max_per_device_batch=config.max_per_device_batch)
  runner = step_lib.RUNNERS[config.parallelism](
      spec, mesh,
      lambda rng: step_lib.create_train_state(model, make_optimizer, rng, dataset.image_shape,
                                              spec.loss_scale))
  state = runner.init_state(jax.random.key(config.seed))
  # Accumulation: the step splits each device's batch into micro-batches (k per batch size).
  per_device = batches.size_at(0) // num_devices
  accum = spec.accum_steps(per_device)
  micro = f" ({accum} micro-batches of {per_device // accum} per device)" if accum > 1 else ""
  if is_main:
    log(f"{config.model} on {dataset.name}: {num_devices} devices ({jax.process_count()} "
        f"processes), mesh {dict(mesh.shape)}, {config.parallelism}, {policy}, global batch "
        f"{batches.size_at(0)}{micro}, {total_steps} steps "
        f"({total_examples / loader.num_examples:.2f} epochs)")
    if accum > 1 and jax.default_backend() == "cpu":
      log("note: XLA:CPU runs convolutions inside the accumulation loop about 20x slower "
          "(jax-ml/jax#12868); on CPU prefer more devices to micro-batches")
    if bn_momentum != config.bn_momentum:
      log(f"BatchNorm momentum {bn_momentum:.4f}: a time constant of {config.bn_momentum_epochs} "
          f"epochs of {initial_steps_per_epoch:.1f} steps (bn_momentum_epochs)")

  # Checkpoints: resume from the latest complete one, if any (docs/checkpoints.md).
  checkpoints = checkpoint.Checkpoints(
      os.path.join(workdir, "checkpoints"), config_lib.to_json(config),
      every_steps=config.checkpoint_every_steps, keep=config.checkpoint_keep,
      keep_every_steps=config.checkpoint_keep_every_steps, async_save=config.checkpoint_async)
  steps_done = 0
  noise_scale = batching.NoiseScale()
  restored = checkpoints.restore_latest(runner.global_state(state))
  if restored:
    state, steps_done = runner.from_global_state(restored[0]), restored[1]["step"]
    loader.set_state(restored[1]["data"])
    batches.restore(restored[1].get("batch_schedule", {}))
    noise_scale = batching.NoiseScale(**restored[1].get("noise_scale", {}))
    if config.num_train_steps <= 0:  # an adaptive schedule may have grown the batch
      total_steps = steps_done + batches.num_steps(loader.position, total_examples)
    if is_main:
      log(f"resumed from {checkpoints.path(steps_done)} (epoch {loader.epoch:.2f})")

  model_info = {"name": config.model, "num_classes": dataset.num_classes, "stem": stem,
                "image_shape": list(dataset.image_shape), "mean": list(dataset.mean),
                "std": list(dataset.std)}  # what jaxscale.export needs to rebuild the model

  def host_state():  # what a checkpoint holds besides the TrainState
    return {"data": loader.get_state(), "seed": config.seed, "model": model_info,
            "global_batch_size": batches.size_at(loader.position),
            "batch_schedule": batches.state(), "noise_scale": dataclasses.asdict(noise_scale)}

  def precise_bn(state):
    """Precise BN (`precise_bn_batches`): the statistics recomputed with the final weights.

    From a stream of its own (seed + 1) at the batch size in force, so the training stream's
    position, and with it exact resume, is untouched.
    """
    if not jax.tree.leaves(state.batch_stats):
      if is_main:
        log(f"precise BN: {config.model} has no BatchNorm; nothing to recompute")
      return state
    size = batches.size_at(loader.position)
    bn_loader = data.TrainLoader(dataset.train, seed=config.seed + 1,
                                 workers=config.data_workers, prefetch=config.prefetch_batches,
                                 transform=train_transform)
    state = step_lib.precise_batch_stats(
        runner, state, (bn_loader.next_batch(size) for _ in range(config.precise_bn_batches)))
    if is_main:
      log(f"precise BN: statistics from {config.precise_bn_batches} batches of {size}")
    return state

  # Training loop.
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = Progress(total_steps, config.progress_bar, enabled=is_main, start_step=steps_done)
  preemption = checkpoint.PreemptionWatch(mesh)
  guard = precision.NonFiniteGuard(config.max_nonfinite_steps)
  profile_start, profile_stop = config_lib.profile_range(config.profile_steps)
  interval_start, interval_examples = time.time(), 0
  step, size = steps_done, None
  while step < total_steps:
    if step == profile_start:
      jax.profiler.start_trace(os.path.join(workdir, "profile"))
    size, previous_size = batches.size_at(loader.position), size
    learning_rate = learning_rate_for(config, size) * float(lr_shape(loader.position))
    batch = runner.put_batch(loader.next_batch(size))
    state, metrics = runner.train_step(state, batch, learning_rate)
    step += 1
    if not guard.observe(step, metrics["finite"]):  # reads the previous step's flag
      break  # too many non-finite steps in a row: stop before anything else is saved
    interval_examples += size
    if (step % config.log_every_steps == 0 or step == total_steps
        or size != (previous_size or size)):  # also the first step of every new batch size
      metrics = jax.device_get(metrics)  # waits for the step: the interval's time is real
      now = time.time()
      event = {"step": step, "epoch": loader.epoch, "split": "train",
               "loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
               "global_batch_size": size, "learning_rate": learning_rate,
               "examples_per_sec": interval_examples / (now - interval_start),
               "wall_time": now - start_time, "loss_scale": float(metrics["loss_scale"]),
               "skipped_steps": int(metrics["skipped_steps"])}
      # B_simple from per-device against all-reduced gradient norms; a skipped (non-finite)
      # step's norms would poison the running averages for good.
      if num_devices > 1 and metrics["finite"]:
        event["noise_scale"] = noise_scale.update(*batching.noise_scale_terms(
            float(metrics["grad_sq_norm_local"]), float(metrics["grad_sq_norm_global"]),
            size // num_devices, size))
        if batches.observe_noise_scale(noise_scale.value) and config.num_train_steps <= 0:
          total_steps = step + batches.num_steps(loader.position, total_examples)
      writer.write(event)
      progress.update(step, event)
      interval_start, interval_examples = now, 0
    steps_done = step
    if step == profile_stop:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      if is_main:
        log(f"profile of steps {profile_start + 1}-{profile_stop} in {workdir}/profile")
    if step == total_steps and config.precise_bn_batches:
      # Here, not after the loop: a step already saved (periodically, or on preemption) is not
      # saved again, so this must come before any save of the last step. The final checkpoint,
      # the export and the eval then hold the same statistics. A run stopped earlier never
      # gets here; one that resumes and finishes does; one resumed at the last step restores
      # them.
      state = precise_bn(state)
    if checkpoints.is_due(steps_done):
      if not guard.flush():
        break
      checkpoints.save(steps_done, runner.global_state(state), host_state())
    if preemption.stop_requested():
      break
  progress.close()
  if not guard.flush():  # the last good checkpoint stays the latest one
    checkpoints.wait()
    preemption.close()
    writer.close()
    raise guard.error
  # The final save, or the one a preemption asked for: wait until it is committed.
  checkpoints.save(steps_done, runner.global_state(state), host_state(), wait=True)
  preempted = preemption.stop_requested(now=True)
  preemption.close()
  if preempted:
    writer.close()
    raise checkpoint.Preempted(steps_done, checkpoints.path(steps_done))

  # Eval: every example of the eval split exactly once.
  eval_start = time.time()
  sums = None
  for batch in data.eval_batches(dataset.eval, config.eval_batch_size,
                                 transform=data.EvalTransform(crop_size, dataset.image_shape[-1]),
                                 workers=config.data_workers, prefetch=config.prefetch_batches):
    out = jax.device_get(runner.eval_step(state, runner.put_batch(batch)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
  count = int(sums["count"])
  now = time.time()
  result = {"step": total_steps, "epoch": loader.epoch, "split": "eval",
            "loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count,
            "num_examples": count, "global_batch_size": config.eval_batch_size,
            "learning_rate": learning_rate_for(config, batches.size_at(loader.position)) *
                             float(lr_shape(loader.position)),
            "examples_per_sec": count / (now - eval_start), "wall_time": now - start_time}
  writer.write(result)
  writer.close()
  checkpoints.close()
  train_images = loader.position
  if is_main:
    log(f"done: eval accuracy {result['accuracy']:.4f} (loss {result['loss']:.4f}, {count} "
        f"examples), wall time {now - start_time:.0f} s, "
        f"{train_images / (now - start_time):.0f} train images/s overall")
  return {"state": runner.global_state(state), **result}


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    distributed.initialize()  # first: a multi-process run is joined before anything uses JAX
    config = config_lib.load(args.config, overrides)
    # Before JAX starts its backend: XLA reads these flags once.
    gpu_flags = xla_flags.apply_gpu_overlap_flags() if config.xla_gpu_overlap else []
    if gpu_flags:
      log(f"XLA flags for all-reduce overlap on GPU: {' '.join(gpu_flags)}")
    if config.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.expanduser(config.compilation_cache_dir))
    run(config, args.workdir)
  except precision.NonFiniteError as e:
    print(f"jaxscale-train: error: {e}", file=sys.stderr)
    sys.exit(1)
  except checkpoint.Preempted as e:
    print(f"jaxscale-train: {e}", file=sys.stderr)
    sys.exit(checkpoint.EXIT_PREEMPTED)
  except (ConfigError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f"jaxscale-train: error: {e}", file=sys.stderr)
    sys.exit(2)
  except distributed.DistributedError as e:
    print(f"jaxscale-train: error: {e}", file=sys.stderr)
    sys.exit(distributed.EXIT_UNREACHABLE)
  except Exception as e:
    distributed.exit_after_error(e)  # multi-process: exit now, so the other processes stop too
    raise


if __name__ == "__main__":
  main()
