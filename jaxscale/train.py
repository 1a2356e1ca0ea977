"""The trainer: `jaxscale-train --config=configs/X.py --workdir=DIR [--config.key=value]`.

Read top to bottom, one run is: build the pieces (mesh, input, task, model, step: `build.py`)
-> claim the workdir -> restore -> the training loop (log, profile, eval, precise BN,
checkpoint, preemption) -> final eval -> summary. From Python:

    jaxscale.train.run(config, workdir, model=MyModel, train=(x, y), eval=(x_test, y_test))
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import jaxscale
from jaxscale import checkpoint, config as config_lib, data, distributed, errors, evaluation
from jaxscale import precise_bn, precision, workdir as workdir_lib, xla_flags
from jaxscale.build import Pieces, build
from jaxscale.errors import ConfigError
from jaxscale.metrics import MetricsWriter, Progress, log
from jaxscale.noise_scale import NoiseScale, noise_scale_terms
from jaxscale.preemption import Preempted, PreemptionWatch


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """`--config` and `--workdir`, plus any number of `--config.key=value` overrides."""
  statuses = "; ".join(f"{code} {meaning}" for code, meaning in errors.EXIT_STATUSES.items())
  parser = argparse.ArgumentParser(
      prog="jaxscale-train", description="Train a Flax model data-parallel over all devices.",
      epilog=f"Rerunning with the same workdir resumes from its latest checkpoint. Exit status: "
             f"{statuses}.")
  parser.add_argument("--config", required=True, help="a Python file with get_config()")
  parser.add_argument("--workdir", required=True, help="where metrics and checkpoints go")
  parser.add_argument("--debug", action="store_true",
                      help="print the traceback of an error (also: JAXSCALE_DEBUG=1)")
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


def run(config, workdir: str, *, model: Any = None, dataset: data.Dataset | None = None,
        task: Any = None, train: Any = None, eval: Any = None) -> dict:  # noqa: A002
  """Trains and evaluates as `config` says; returns the final eval metrics and "state".

  Args:
    config: from `jaxscale.config.load`, or `jaxscale.config.defaults()` with changes.
    workdir: where metrics and checkpoints go; rerunning on it resumes.
    model: replaces `config.model`: a Linen module (instance, class or factory) or an NNX
      module class (see `jaxscale.models.contract`).
    dataset: replaces `config.dataset`: a `jaxscale.data.Dataset`.
    task: replaces `config.task`: a `jaxscale.tasks.Task`.
    train, eval: NumPy arrays `(x, y)` or random-access sources, instead of `dataset`.
  """
  clock = evaluation.Clock(start=jaxscale.PROCESS_START)
  if train is not None:
    if dataset is not None:
      raise ConfigError("run: pass either dataset or train/eval data, not both")
    dataset = data.from_arrays(train, eval)
  pieces = build(config, model=model, dataset=dataset, task=task)
  config_json = config_lib.to_json(config)
  workdir_lib.check(workdir, config_json)  # nothing is written before every check has passed
  lock = workdir_lib.Lock(workdir)
  claimed = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.JaxscaleError as e:
      claimed = e
  if jax.process_count() > 1:  # every process learns whether process 0 holds the workdir
    if multihost_utils.broadcast_one_to_all(np.int32(claimed is not None)):
      claimed = claimed or errors.WorkdirInUse(f"workdir {workdir!r} is in use by another run")
  if claimed:
    raise claimed
  try:
    return _train(pieces, workdir, config_json, clock)
  finally:
    lock.release()


def _train(pieces: Pieces, workdir: str, config_json: str, clock: evaluation.Clock) -> dict:
  config, runner, loader, batches = pieces.config, pieces.runner, pieces.loader, pieces.batches
  is_main = jax.process_index() == 0
  _log_plan(pieces, is_main)

  # Checkpoints: resume from the latest complete one, if any (docs/checkpoints.md).
  checkpoints = checkpoint.Checkpoints(
      os.path.join(workdir, "checkpoints"), config_json,
      every_steps=config.checkpoint_every_steps, keep=config.checkpoint_keep,
      keep_every_steps=config.checkpoint_keep_every_steps,
      keep_best=config.checkpoint_keep_best, async_save=config.checkpoint_async,
      skip_damaged=config.checkpoint_skip_damaged)
  state = pieces.init_state()
  total_steps, step = pieces.total_steps, 0
  noise = NoiseScale()
  evals = evaluation.from_config(config, loader.num_examples, pieces.dataset.eval is not None)
  restored = checkpoints.restore_latest(runner.global_state(state))
  if restored:
    state, meta = runner.from_global_state(restored[0]), restored[1]
    step = meta["step"]
    loader.set_state(meta["data"])
    batches.restore(meta.get("batch_schedule", {}))
    noise = NoiseScale(**meta.get("noise_scale", {}))
    clock.restore(meta.get("clock", {}))
    evals.restore(meta.get("evals", {}))
    if config.num_train_steps <= 0:  # an adaptive schedule may have grown the batch
      total_steps = step + batches.num_steps(loader.position, pieces.total_examples)
    if is_main:
      log(f"resumed from {checkpoints.path(step)} (epoch {loader.epoch:.2f})")
  if is_main:  # the run passed every check, the checkpoint's included: now it may write
    workdir_lib.write_config(workdir, config_json)

  def host_state() -> dict:  # what a checkpoint holds besides the TrainState
    return {"data": loader.get_state(), "seed": config.seed, "model": pieces.model_info,
            "global_batch_size": batches.size_at(loader.position),
            "batch_schedule": batches.state(), "noise_scale": dataclasses.asdict(noise),
            "clock": clock.state(), "evals": evals.state()}

  def evaluate(step: int, size: int, learning_rate: float) -> dict | None:
    """The eval event at `step` (whose global batch and rate were `size` and `learning_rate`),
    or None when a preemption signal cut it short."""
    start, sums = time.time(), None
    evaluated = state
    if config.precise_bn_batches and step != total_steps:  # the last step has them already
      evaluated = precise_bn.from_stream(pieces, state)  # for this eval only
    for batch in pieces.eval_batches():
      out = runner.eval_step(evaluated, runner.put_batch(batch))
      if preemption.stop_requested():
        return None
      out = jax.device_get(out)
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    count, now = int(sums.pop("count")), time.time()
    clock.eval_time += now - start
    event = {"step": step, "epoch": loader.epoch, "split": "eval",
             **{k: float(v) / count for k, v in sums.items()}, "num_examples": count,
             "global_batch_size": size, "learning_rate": learning_rate,
             "examples_per_sec": count / (now - start), "wall_time": clock.wall_time(),
             "eval_time": clock.eval_time}
    event = evals.record(step, loader.epoch, event, clock)
    writer.write(event)
    if is_main:
      log(f"eval at step {step} (epoch {loader.epoch:.2f}): "
          + " ".join(f"{k} {v:.4f}" for k, v in event.items() if k in pieces.metric_names))
    return event

  # Training loop.
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = Progress(total_steps, config.progress_bar, enabled=is_main, start_step=step)
  preemption = PreemptionWatch(pieces.mesh)
  guard = precision.NonFiniteGuard(config.max_nonfinite_steps)
  profile_start, profile_stop = config_lib.profile_range(config.profile_steps)
  interval_start, interval_examples, size = time.time(), 0, None
  try:
    while step < total_steps and not evals.target:
      if step == profile_start:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      size, previous_size = batches.size_at(loader.position), size
      previous_position = loader.position
      learning_rate = pieces.learning_rate(loader.position)
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
        event = {"step": step, "epoch": loader.epoch, "split": "train", "global_batch_size": size,
                 **{k: float(metrics[k]) for k in ("loss", *pieces.metric_names)},
                 "learning_rate": learning_rate,
                 "examples_per_sec": interval_examples / (now - interval_start),
                 "wall_time": clock.wall_time(), "loss_scale": float(metrics["loss_scale"]),
                 "skipped_steps": int(metrics["skipped_steps"])}
        # B_simple from per-device against all-reduced gradient norms; a skipped (non-finite)
        # step's norms would poison the running averages for good.
        if pieces.num_devices > 1 and metrics["finite"]:
          event["noise_scale"] = noise.update(*noise_scale_terms(
              float(metrics["grad_sq_norm_local"]), float(metrics["grad_sq_norm_global"]),
              size // pieces.num_devices, size))
          if batches.observe_noise_scale(noise.value) and config.num_train_steps <= 0:
            total_steps = step + batches.num_steps(loader.position, pieces.total_examples)
        writer.write(event)
        progress.update(step, event)
        interval_start, interval_examples = now, 0
      if step == profile_stop:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        if is_main:
          log(f"profile of steps {profile_start + 1}-{profile_stop} in {workdir}/profile")
      if step == total_steps and config.precise_bn_batches:
        # Before any save of the last step, so that its checkpoint, export and eval agree.
        state = precise_bn.from_stream(pieces, state)
      result = None
      if evals.due(step, loader.position, previous_position, step == total_steps):
        if not guard.flush():
          break
        result = evaluate(step, size, learning_rate)
        interval_start = time.time()  # the eval's time is not training throughput
      if checkpoints.is_due(step) or (result and (config.checkpoint_keep_best or evals.target)):
        if not guard.flush():
          break
        checkpoints.save(step, runner.global_state(state), host_state(),
                         metrics=result and {"accuracy": result.get("accuracy", 0.0)})
      if preemption.stop_requested():
        break
    progress.close()
    if not guard.flush():  # the last good checkpoint stays the latest one
      raise guard.error
    # The final save, or the one a preemption asked for: wait until it is committed.
    checkpoints.save(step, runner.global_state(state), host_state(), wait=True)
    then = "evaluate" if step == total_steps and evals.last_step != step else "resume"
    if preemption.stop_requested(now=True):
      raise Preempted(step, checkpoints.path(step), then)
    # Final eval: every example of the eval split once (done already if the loop's last step
    # evaluated, or if an earlier run of this workdir finished).
    if evals.last_step != step and pieces.dataset.eval is not None:
      last = max(loader.position - 1, 0)  # a resumed run: the last step's batch and rate
      if evaluate(step, size or batches.size_at(last), pieces.learning_rate(last)) is None:
        raise Preempted(step, checkpoints.path(step), "evaluate")
  finally:
    preemption.close()
    writer.close()
    checkpoints.close()
  result = evals.last_result or {}
  if is_main:
    summary = " ".join(f"{k} {result[k]:.4f}" for k in ("accuracy", "loss") if k in result)
    log(f"done at step {step}: eval {summary or 'not run (no eval split)'}, wall time "
        f"{clock.wall_time():.0f} s{evals.summary()}")
  return {"state": runner.global_state(state), **result}


def _log_plan(pieces: Pieces, is_main: bool) -> None:
  if not is_main:
    return
  config, batches = pieces.config, pieces.batches
  per_device = batches.size_at(0) // pieces.num_devices
  accum = pieces.spec.accum_steps(per_device)
  micro = f" ({accum} micro-batches of {per_device // accum} per device)" if accum > 1 else ""
  log(f"{pieces.model.name} ({pieces.task.name}) on {pieces.dataset.name}: "
      f"{pieces.num_devices} devices ({jax.process_count()} processes), mesh "
      f"{dict(pieces.mesh.shape)}, {config.parallelism}, {pieces.policy}, global batch "
      f"{batches.size_at(0)}{micro}, {pieces.total_steps} steps "
      f"({pieces.total_examples / pieces.loader.num_examples:.2f} epochs)")
  if "dtype" not in pieces.model.accepted and pieces.policy.compute_dtype != np.float32:
    log(f"note: model {pieces.model.name} takes no 'dtype' option: it computes in its own "
        f"dtypes; precision={config.precision} casts only its input")
  if accum > 1 and jax.default_backend() == "cpu":
    log("note: XLA:CPU runs convolutions inside the accumulation loop about 20x slower "
        "(jax-ml/jax#12868); on CPU prefer more devices to micro-batches")
  if pieces.bn_momentum != config.bn_momentum:
    log(f"BatchNorm momentum {pieces.bn_momentum:.4f}: a time constant of "
        f"{config.bn_momentum_epochs} epochs (bn_momentum_epochs)")


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  debug = args.debug or os.environ.get("JAXSCALE_DEBUG", "") not in ("", "0")
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
  except errors.JaxscaleError as e:
    if debug:
      traceback.print_exc()
    prefix = "jaxscale-train: " if isinstance(e, Preempted) else "jaxscale-train: error: "
    print(prefix + str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except OSError as e:  # a write outside the checkpoints (metrics, profile): full disk, ...
    if debug:
      traceback.print_exc()
    print(f"jaxscale-train: error: {errors.first_line(e)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_IO)
  except Exception as e:
    distributed.exit_after_error(e)  # multi-process: exit now, so the other processes stop too
    raise


if __name__ == "__main__":
  main()
