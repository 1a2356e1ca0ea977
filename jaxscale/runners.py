"""The two ways to run the per-device steps over a mesh: `jax.shard_map` and legacy `jax.pmap`.

Under `jax.shard_map` the steps need `check_vma=False`: with `check_vma=True` JAX already sums
the gradient of a replicated parameter over the axis, and the step's explicit `pmean` would then
leave an update N times too large (docs/step.md). `jax.pmap` runs the same functions with a
replicated copy of the state per device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxscale import mesh as mesh_lib
from jaxscale.errors import ConfigError
from jaxscale.step import StepSpec, TrainState, batch_stats_step, eval_step, train_step


@dataclasses.dataclass(frozen=True)
class Runner:
  """The steps compiled for one parallelism, and how state and batches reach the devices."""
  init_state: Callable[[jax.Array], TrainState]  # rng -> state on the devices
  put_batch: Callable[[dict], Any]  # this process's numpy batch -> device input
  train_step: Callable  # (state, batch, learning_rate) -> (state, metrics)
  eval_step: Callable  # (state, batch) -> metric sums
  batch_stats_step: Callable  # (state, batch) -> BN statistics as replicated jax.Arrays
  global_state: Callable[[Any], TrainState]  # device state -> state as replicated jax.Arrays
  from_global_state: Callable[[TrainState], Any]  # the inverse (after a checkpoint restore)


def shard_map_runner(spec: StepSpec, mesh: Mesh, create_state: Callable) -> Runner:
  """`jax.jit` of `jax.shard_map`: the batch split over the data axes, the state replicated or
  sharded as `spec.layout` says (`jaxscale/sharding.py`)."""
  batch_spec = P(spec.axes)
  state_spec = spec.layout.specs(jax.eval_shape(create_state, jax.random.key(0)))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_spec)
  train = jax.shard_map(functools.partial(train_step, spec), mesh=mesh,
                        in_specs=(state_spec, batch_spec, P()), out_specs=(state_spec, P()),
                        check_vma=False)
  evaluate = jax.shard_map(functools.partial(eval_step, spec), mesh=mesh,
                           in_specs=(state_spec, batch_spec), out_specs=P(), check_vma=False)
  stats = jax.shard_map(functools.partial(batch_stats_step, spec), mesh=mesh,
                        in_specs=(state_spec, batch_spec), out_specs=P(), check_vma=False)
  sharding = mesh_lib.batch_sharding(mesh)

  def put_batch(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

  return Runner(
      init_state=jax.jit(create_state, out_shardings=shardings),
      put_batch=put_batch,
      train_step=jax.jit(train, donate_argnums=0),
      eval_step=jax.jit(evaluate),
      batch_stats_step=jax.jit(stats),
      global_state=lambda state: state,
      from_global_state=lambda state: jax.device_put(state, shardings))


def pmap_runner(spec: StepSpec, mesh: Mesh, create_state: Callable) -> Runner:
  """Legacy `jax.pmap` over this process's devices, with a replicated copy of the state each."""
  if spec.axes != ("data",):
    raise ConfigError("config key 'mesh': parallelism='pmap' supports only mesh='data'")
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  train = jax.pmap(functools.partial(train_step, spec), axis_name="data", in_axes=(0, 0, None),
                   donate_argnums=0, devices=devices)
  evaluate = jax.pmap(functools.partial(eval_step, spec), axis_name="data", devices=devices)
  stats = jax.pmap(functools.partial(batch_stats_step, spec), axis_name="data", devices=devices)

  stacked = jax.sharding.NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))

  def init_state(rng):
    state = jax.jit(create_state)(rng)
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *x.shape)), state)
    return jax.device_put(copies, stacked)

  def put_batch(local: dict) -> dict:
    return {k: v.reshape(len(devices), -1, *v.shape[1:]) for k, v in local.items()}

  def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)

  # Stacked copies <-> arrays replicated over the global mesh, without a trip through the host.
  replicated = mesh_lib.replicated(mesh)

  def global_state(state):
    return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
        x.shape[1:], replicated, [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]),
        state)

  def from_global_state(state):
    return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
        (len(devices), *x.shape), stacked, [s.data[None] for s in x.addressable_shards]), state)

  return Runner(
      init_state=init_state,
      put_batch=put_batch,
      train_step=lambda state, batch, lr: (lambda s, m: (s, unreplicate(m)))(
          *train(state, batch, np.float32(lr))),
      eval_step=lambda state, batch: unreplicate(evaluate(state, batch)),
      batch_stats_step=lambda state, batch: global_state(stats(state, batch)),
      global_state=global_state,
      from_global_state=from_global_state)


RUNNERS = {"shard_map": shard_map_runner, "pmap": pmap_runner}  # config key `parallelism`


def check_config(config) -> None:
  """Raises ConfigError for an unknown `parallelism` or one the mesh cannot run."""
  if config.parallelism not in RUNNERS:
    raise ConfigError(f"config key 'parallelism': unknown {config.parallelism!r}; "
                      f"known: {', '.join(RUNNERS)}")
  if config.parallelism == "pmap" and config.mesh != "data":
    raise ConfigError("config key 'mesh': parallelism='pmap' supports only mesh='data'")
  if config.parallelism == "pmap" and jax.process_count() > 1:  # its reductions stay in-process
    raise ConfigError("config key 'parallelism': 'pmap' runs on one process only; use shard_map")
