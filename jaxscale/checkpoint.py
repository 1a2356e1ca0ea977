"""Checkpoints of a run in `workdir/checkpoints/<step>/`, written with orbax, and preemption.

A checkpoint holds two items:
  state  the whole TrainState pytree as global jax.Arrays. Every process writes the shards
         whose first replica it holds; for the replicated state of data parallelism that is
         process 0. (orbax's default on GPUs; on CPU and TPU it would split each replicated
         array over its replicas, which compiles a slicing program per array shape at a run's
         first save, seconds on CPU, and makes every save block longer.)
  meta   JSON: the step, the trainer's host-side state (data stream position, seed, global
         batch size), the resolved config, so that a checkpoint of another config is refused,
         and a checksum of every array (`integrity`), checked at restore and by `read`.
orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it on commit, so a step whose
write did not complete is never listed, let alone restored. Restoring takes a target state that
carries the shardings of the current mesh: a checkpoint written on one topology restores onto any.

Async saves in a single process return at once: `save` dispatches a device-side copy of the
state (one jitted program: the next step may donate the state, the copy stays valid) and hands
orbax's save of the copy to a background thread, so the loop waits neither for the step in flight
nor for orbax copying each array off the devices. Until orbax has copied it to the host, the copy
takes the device memory of one more state. `wait`, `close`, `latest_step`, `restore*` and the
next `save` first wait for that thread and raise its failure, if any. With several processes,
`save` runs orbax's blocking phase inline, as before: it synchronizes the processes with
`sync_global_devices`, a device collective, which must not be issued from a second thread, where
it could interleave with the step's collectives in different orders on different processes (a
deadlock).
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
import re
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxscale import integrity
from jaxscale.config import changed_keys
from jaxscale.errors import EXIT_IO, JaxscaleError
from jaxscale.metrics import log

# orbax's handlers for the leaf types a TrainState may hold; jax.Arrays written by one replica.
_TYPE_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
    (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (str, ocp.type_handlers.StringHandler()),
    (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))


class CheckpointError(JaxscaleError, ValueError):
  """A checkpoint that cannot be restored into this run; the message names its path."""


class CheckpointIOError(CheckpointError):
  """A checkpoint that could not be written or read back intact (full disk, damaged bytes)."""
  exit_status = EXIT_IO


class DamagedCheckpoint(CheckpointIOError):
  """A checkpoint whose arrays differ from the checksums written with it."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class Checkpoints:
  """The checkpoints of one run: periodic and final saves, retention, restore of the latest.

  Every process makes the same calls in the same order; orbax coordinates the writes.
  """

  def __init__(self, directory: str, config_json: str, *, every_steps: int = 0, keep: int = 0,
               keep_every_steps: int = 0, keep_best: bool = False, async_save: bool = True,
               skip_damaged: bool = False):
    """
    Args:
      directory: where the step directories go (created if missing).
      config_json: the resolved config (`config.to_json`), stored with every checkpoint.
      every_steps: `is_due` says yes for multiples of this; 0: never (the trainer then saves
        only the final step, or the step where it was preempted).
      keep: keep the last `keep` checkpoints; 0 keeps all.
      keep_every_steps: also keep every checkpoint whose step is a multiple of this; 0: none.
      keep_best: also keep the checkpoint saved with the highest eval accuracy (`save`'s
        `metrics`), besides the last ones.
      async_save: write in the background; `save` returns once a copy of the state is
        dispatched (single process) or copied off the devices (several processes).
      skip_damaged: `restore_latest` sets a damaged checkpoint aside and tries the previous.
    """
    self.directory = os.path.abspath(directory)
    self.skip_damaged = skip_damaged
    self.every_steps = every_steps
    self._config = json.loads(config_json)
    _quiet_orbax_echoes()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    # No zstd: float32 weights barely compress (random-looking mantissas), and compressing
    # costs host CPU time that the step and the input pipeline need (docs/checkpoints.md).
    state_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_TYPE_HANDLERS,
                                                use_compression=False)
    registry.add("state", ocp.args.PyTreeSave, state_handler)
    registry.add("state", ocp.args.PyTreeRestore, state_handler)
    registry.add("meta", ocp.args.JsonSave)
    registry.add("meta", ocp.args.JsonRestore)
    policies = [ocp.checkpoint_managers.LatestN(n=keep or None)]
    if keep_every_steps:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every_steps))
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics["accuracy"], n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._last_saved = self._manager.latest_step()
    # Only in one process: see the module docstring for why several processes save inline.
    self._thread = (concurrent.futures.ThreadPoolExecutor(1, "jaxscale-checkpoint")
                    if async_save and jax.process_count() == 1 else None)
    self._pending: tuple[int, concurrent.futures.Future] | None = None  # (step, orbax's save)
    self._committing: int | None = None  # the step orbax may still be committing

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    self._finish_pending()
    return self._manager.latest_step()

  def is_due(self, step: int) -> bool:
    """Whether `step` is a periodic save step (`every_steps`)."""
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, host_state: dict[str, Any], *,
           metrics: dict[str, float] | None = None, wait: bool = False) -> None:
    """Saves `state` (global arrays) and `host_state` (JSON-able) as checkpoint `step`.

    `metrics` (an eval's, with "accuracy") rank the checkpoint for `keep_best`. A step already
    saved is not written again. `wait` blocks until the write is committed. Raises the failure
    of the previous background save, if any, before starting this one.
    """
    self._finish_pending()
    if step != self._last_saved:
      meta = {"step": step, **copy.deepcopy(host_state), "config": self._config}
      if self._thread is None:
        self._write(step, state, meta, integrity.checksums(state), metrics)
      else:  # the next step may donate `state`; its device copy stays
        state = _device_copy(state)
        self._pending = step, self._thread.submit(self._write, step, state, meta,
                                                  integrity.checksums(state), metrics)
      self._last_saved = step
    if wait:
      self.wait()

  def _write(self, step: int, state: Any, meta: dict, checksums: dict, metrics) -> None:
    """orbax's save of `state` with `meta` and the (device) `checksums` fetched into it."""
    meta["checksums"] = {k: int(v) for k, v in jax.device_get(checksums).items()}
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    self._wait_committed()  # orbax would raise the previous write's failure in this save
    self._writing(step, lambda: self._manager.save(step, args=args, metrics=metrics,
                                                   force=True))
    self._committing = step

  def _wait_committed(self) -> None:
    """Waits for orbax's commit of the last write; raises its failure naming its step."""
    step, self._committing = self._committing, None
    if step is not None:
      self._writing(step, self._manager.wait_until_finished)

  def _writing(self, step: int, write) -> None:
    """write(), with a failure turned into one CheckpointIOError line naming the step."""
    try:
      write()
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      self._last_saved = None  # a retry of `step` writes it again
      previous = [s for s in self._manager.all_steps() if s != step]
      kept = (f"the latest complete checkpoint is step {max(previous)}" if previous
              else "no earlier checkpoint exists")
      raise CheckpointIOError(f"checkpoint {self.path(step)} could not be written "
                              f"({_brief(e)}); {kept}") from e

  def _finish_pending(self) -> None:
    """Waits for the background save, if any; raises its failure (once)."""
    if self._pending is None:
      return
    (step, future), self._pending = self._pending, None
    future.result()

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._finish_pending()
    self._wait_committed()

  def close(self) -> None:
    """Waits for the started saves (raising a failure), then stops orbax's threads."""
    try:
      self.wait()
    finally:
      if self._thread is not None:
        self._thread.shutdown()
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - orbax raises a failed save again: reported already
        pass

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """`restore(latest_step(), target)`, or None when there is no complete checkpoint.

    A damaged checkpoint raises DamagedCheckpoint, or with `skip_damaged` is moved to
    `<workdir>/damaged/<step>` (nothing is deleted) and the one before it is restored.
    """
    while (step := self.latest_step()) is not None:
      try:
        return self.restore(step, target)
      except DamagedCheckpoint as e:
        if not self.skip_damaged:
          raise
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: DamagedCheckpoint) -> None:
    damaged = os.path.join(os.path.dirname(self.directory), "damaged")
    destination = os.path.join(damaged, str(step))
    if jax.process_index() == 0:
      os.makedirs(damaged, exist_ok=True)
      suffix = 1
      while os.path.exists(destination):  # the same step damaged twice: keep both
        destination, suffix = os.path.join(damaged, f"{step}.{suffix}"), suffix + 1
      os.rename(self.path(step), destination)
      log(f"{error}: moved to {destination}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxscale:set_aside_{step}")
    self._manager.reload()
    self._last_saved = self._manager.latest_step()

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` onto the shardings of `target`; returns (state, meta).

    Raises CheckpointError, naming the path, for a checkpoint of another config, one whose
    arrays do not match `target` (another model or optimizer), or one that cannot be read.
    """
    self._finish_pending()
    path = self.path(step)
    meta = _reading(path, lambda: self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    changed = changed_keys(meta.get("config", {}), self._config)
    if changed:
      raise CheckpointError(f"checkpoint {path} was written by a different config (keys differ: "
                            f"{', '.join(changed)})")
    saved = _reading(path, lambda: self._manager.item_metadata(step)["state"])
    mismatch = _tree_mismatch(_leaf_specs(saved), _leaf_specs(target))
    if mismatch:
      raise CheckpointError(f"checkpoint {path} does not match this run's state: {mismatch}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restore = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    try:
      state = _reading(path, lambda: self._manager.restore(
          step, args=ocp.args.Composite(state=restore)).state)
      expected = meta.get("checksums")  # absent in checkpoints of jaxscale before 2026-12
      bad = expected and integrity.mismatches(expected,
                                              jax.device_get(integrity.checksums(state)))
      if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointIOError(
            f"checkpoint {path} is damaged: {len(bad)} of {len(expected)} arrays differ from the "
            f"checksums written at save ({', '.join(bad[:3])}{more})")
    except CheckpointIOError as e:
      earlier = [s for s in self._manager.all_steps() if s < step]
      hint = (f"; the previous complete checkpoint is step {max(earlier)}: rerun with "
              f"--config.checkpoint_skip_damaged=True to move this one aside and resume from it"
              if earlier else "; no earlier checkpoint: move it away to start over")
      raise DamagedCheckpoint(f"{e}{'' if self.skip_damaged else hint}", step) from e
    return state, meta


@jax.jit
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
  return [jnp.copy(x) for x in arrays]  # new buffers: XLA copies outputs that are inputs


def _device_copy(tree: Any) -> Any:
  """`tree` with its jax.Arrays copied on their devices, one program per device set."""
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[frozenset, list[int]] = {}
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array):
      groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
  for indices in groups.values():
    for i, x in zip(indices, _copy_arrays([leaves[i] for i in indices])):
      leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def _reading(path: str, read):
  """read(), with any failure turned into one CheckpointError line that names `path`."""
  _quiet_orbax_echoes()
  try:
    return read()
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    raise CheckpointIOError(f"checkpoint {path} cannot be read ({_brief(e)})") from e


def _brief(error: BaseException) -> str:
  """`Type: first line`, without tensorstore's spec dump and nesting: its root cause."""
  text = (str(error).strip().splitlines() or [""])[0]
  text = re.split(r" \[(?:tensorstore_spec|os_error_code|source locations)", text)[0]
  if len(text) > 200 and '": ' in text:  # tensorstore nests `what "path": why`
    text = f"{text.split(':')[0]}: ... {text.rsplit(chr(34) + ': ', 1)[1]}"
  return f"{type(error).__name__}: {text[:400]}"


def _quiet_orbax_echoes() -> None:
  """Silences the echoes of one failed write or read, and nothing else (installed once).

  When one array's write or read fails (a full disk, a damaged file), orbax logs the exception
  from each of its worker threads and tasks and closes its event loop while tensorstore finishes
  the other arrays, whose completion callbacks then raise "Event loop is closed". The failure itself
  reaches the caller, which reports it as one line; its echoes would bury that line under
  hundreds of lines of tracebacks (`--debug` prints the failure's own traceback).
  """
  if getattr(sys.excepthook, "jaxscale_quiet", False):
    return

  def closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

  def orbax_coroutine(thing) -> bool:  # one of orbax's writes, dropped at interpreter exit
    return "orbax" in getattr(getattr(thing, "cr_code", None), "co_filename", "")

  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable(info):
    if not (closed_loop(info.exc_value) or orbax_coroutine(info.object)):
      previous_unraisable(info)

  def excepthook(kind, value, tb):
    if not closed_loop(value):
      previous_except(kind, value, tb)

  excepthook.jaxscale_quiet = True
  sys.unraisablehook, sys.excepthook = unraisable, excepthook
  logging.getLogger("absl").addFilter(lambda record: not any(
      echo in record.getMessage() for echo in ("_SignalingThread.run() raised an exception",
                                               "in background save thread",
                                               "Save Finalize thread (save_finalize) failed")))
  logging.getLogger("asyncio").addFilter(lambda record: not (
      "exception was never retrieved" in record.getMessage() and "orbax" in record.getMessage()))
  # The writes that a failure cancelled, collected at exit ("coroutine ... was never awaited").
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/Conv_0/kernel': (shape, dtype)} for a state, abstract state or orbax metadata."""
  tree = getattr(tree, "tree", tree)  # orbax's TreeMetadata wraps the tree
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {integrity.path_name(path): (tuple(x.shape), str(np.dtype(x.dtype)))
          for path, x in leaves}


def _tree_mismatch(saved: dict, wanted: dict, limit: int = 3) -> str:
  """A one-line account of how two leaf-spec dicts differ; '' when they match."""
  def listed(label, items):
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{label} {', '.join(items[:limit])}{more}" if items else ""
  differ = [f"{k} (checkpoint {saved[k][0]} {saved[k][1]}, run {wanted[k][0]} {wanted[k][1]})"
            for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  parts = [listed("missing from the checkpoint:", wanted.keys() - saved.keys()),
           listed("not in this run:", saved.keys() - wanted.keys()),
           listed("differ:", differ)]
  return "; ".join(p for p in parts if p)


def read(step_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Checkpoint `step_dir` as (state as nested dicts of numpy arrays, meta), on the host.

  Needs no mesh and no model: for export, inspection and tests, whatever topology wrote it.
  """
  step_dir = os.path.abspath(step_dir)

  def read_all():
    state_dir = epath.Path(step_dir) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(state_dir,
                                             args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(epath.Path(step_dir) / "meta")
    return state, meta

  state, meta = _reading(step_dir, read_all)
  bad = meta.get("checksums") and integrity.mismatches(meta["checksums"],
                                                       integrity.numpy_checksums(state))
  if bad:
    raise CheckpointIOError(f"checkpoint {step_dir} is damaged: {len(bad)} arrays differ from "
                            f"the checksums written at save ({', '.join(bad[:3])})")
  return state, meta


def _complete_steps(directory: str) -> tuple[str, list[int]]:
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  directory = os.path.abspath(directory)
  steps = ocp.step.checkpoint_steps(directory) if os.path.isdir(directory) else []
  if not steps:  # finalized steps only
    raise CheckpointError(f"no complete checkpoint in {directory}")
  return directory, sorted(steps)


def latest_step_dir(directory: str) -> str:
  """The newest complete checkpoint in `directory` (a workdir or its checkpoints/)."""
  directory, steps = _complete_steps(directory)
  return os.path.join(directory, str(steps[-1]))


def best_step_dir(directory: str) -> str:
  """The complete checkpoint saved with the best eval accuracy (`checkpoint_keep_best`)."""
  directory, steps = _complete_steps(directory)
  scored = []
  for step in steps:
    meta = _reading(os.path.join(directory, str(step)), lambda s=step: ocp.Checkpointer(
        ocp.JsonCheckpointHandler()).restore(epath.Path(directory) / str(s) / "meta"))
    result = (meta.get("evals") or {}).get("last_result") or {}
    if result.get("step") == step and "accuracy" in result:
      scored.append((result["accuracy"], step))
  if not scored:
    raise CheckpointError(f"no checkpoint in {directory} was saved with an eval (set "
                          f"checkpoint_keep_best and an eval cadence)")
  return os.path.join(directory, str(max(scored)[1]))
