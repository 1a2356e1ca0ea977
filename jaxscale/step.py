"""The per-device train and eval steps, and the two ways to run them over a mesh.

One per-device step function serves both transforms. It computes the local loss and gradient,
then reduces explicitly: `lax.pmean` of the gradients and metrics over the data axes. Under
`jax.shard_map` this needs `check_vma=False`: with `check_vma=True` JAX already sums the
gradient of a replicated parameter over the axis, and the pmean would then leave an update N
times too large. `jax.pmap` (legacy) runs the same function with a replicated state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxscale import allreduce, batching, mesh as mesh_lib, precision


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; float32 master parameters."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: precision.LossScale  # scale 1 and static unless the policy computes in float16


def create_train_state(model, make_optimizer: Callable[[Any], optax.GradientTransformation],
                       rng: jax.Array, image_shape: tuple[int, ...],
                       loss_scale: precision.LossScaleConfig = precision.NO_LOSS_SCALE
                       ) -> TrainState:
  """Initializes parameters from `rng` alone, so every process computes the same state."""
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=make_optimizer(0.0).init(params),
                    loss_scale=precision.init_loss_scale(loss_scale))


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 images -> normalized floats, on the device (a quarter of float32's bytes to move)."""
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the per-device steps need besides the state and the batch.

  `grad_accum_steps` and `max_per_device_batch` give the number of micro-batches k of each
  device's batch (`batching.accum_steps`), resolved per batch size when the step is traced;
  `train_step` says what accumulation does to BatchNorm.
  """
  model: Any
  make_optimizer: Callable[[Any], optax.GradientTransformation]  # learning rate -> optimizer
  axes: tuple[str, ...]  # mesh axes the batch is split over
  mean: tuple[float, ...]
  std: tuple[float, ...]
  label_smoothing: float = 0.0
  sync_batch_stats: bool = False  # BN groups: average running statistics over all devices
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32  # logits; the loss is float32 whatever this is
  grad_allreduce_dtype: Any = jnp.float32  # gradients cross the devices in this dtype
  allreduce: str = "flat"  # or "hierarchical" on a (hosts x local) mesh (jaxscale/allreduce.py)
  loss_scale: precision.LossScaleConfig = precision.NO_LOSS_SCALE
  grad_accum_steps: int = 1  # micro-batches per device's batch; 1: none
  max_per_device_batch: int = 0  # > 0: the fewest micro-batches of at most this many examples

  def accum_steps(self, per_device_batch: int) -> int:
    """k, the micro-batches of a device's batch of this size (`batching.accum_steps`)."""
    return batching.accum_steps(per_device_batch, self.grad_accum_steps,
                                self.max_per_device_batch)


def train_step(spec: StepSpec, state: TrainState, batch: dict, learning_rate: jax.Array):
  """One optimizer step on this device's part of the global batch. Returns (state, metrics).

  A step whose loss or gradients are non-finite on any device leaves params, opt_state and
  batch_stats as they were on every device (a select on the decision of `all_finite`, taken
  after the reduction) and backs the loss scale off.

  Gradient accumulation (k > 1 micro-batches, see StepSpec): micro-batch i is rows
  [i B/k, (i+1) B/k) of the device's B examples; a `lax.scan` runs one micro-batch's forward
  and backward at a time and sums the gradients in float32, and their mean (the local batch's
  gradient) goes through everything after (all-reduce, finite check, update) once. BatchNorm
  sees ghost batches: micro-batch i is normalized with the statistics of micro-batch i over the
  devices of its BN group, every micro-batch starts from the step's incoming batch_stats, and
  the new running statistics are the mean of the k returned ones (flax's update is linear:
  momentum * old + (1 - momentum) * the mean of the micro-batch statistics). The update is that
  of one step on k times as many devices, with BN groups as large as this run's and the
  running statistics averaged over all devices, where the devices of group i hold this run's
  micro-batches i. The loss and accuracy are means over the micro-batches.
  """
  scale = state.loss_scale.scale

  def gradients(micro: dict):
    """The scaled gradients, and (loss, accuracy, batch_stats), of one (micro-)batch."""
    images = normalize(micro["image"], spec.mean, spec.std, spec.compute_dtype)
    labels = micro["label"]

    def loss_fn(params):
      logits, new_vars = spec.model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = cross_entropy(logits.astype(spec.output_dtype), labels, spec.label_smoothing).mean()
      return loss * scale, (loss, logits, new_vars.get("batch_stats", {}))

    (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return grads, (loss, accuracy, batch_stats)

  k = spec.accum_steps(batch["label"].shape[0])
  if k == 1:
    grads, (loss, accuracy, batch_stats) = gradients(batch)
  else:
    grads, (loss, accuracy, batch_stats) = _accumulate(gradients, batch, k, state.params)
  # Local mean gradient -> global mean gradient (see the module docstring), still scaled so
  # that small gradients survive a float16 exchange.
  # Squared norms of the local and the all-reduced gradient: the gradient noise scale's inputs.
  local_sq_norm = optax.tree_utils.tree_norm(grads, squared=True) / (scale * scale)
  grads = allreduce.mean_gradients(grads, spec.axes, spec.allreduce, spec.grad_allreduce_dtype)
  grads = precision.unscale(grads, scale)
  finite = precision.all_finite((grads, loss), spec.axes)
  if spec.sync_batch_stats:
    batch_stats = lax.pmean(batch_stats, spec.axes)
  tx = spec.make_optimizer(learning_rate)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params, opt_state, batch_stats = precision.select_tree(
      finite, (optax.apply_updates(state.params, updates), opt_state, batch_stats),
      (state.params, state.opt_state, state.batch_stats))
  loss_scale = precision.update_loss_scale(state.loss_scale, finite, spec.loss_scale)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, loss_scale=loss_scale)
  metrics = lax.pmean({"loss": loss, "accuracy": accuracy,
                       "grad_sq_norm_local": local_sq_norm}, spec.axes)
  metrics["grad_sq_norm_global"] = optax.tree_utils.tree_norm(grads, squared=True)
  # Already the same on every device: no reduction needed.
  metrics.update(finite=finite, loss_scale=loss_scale.scale,
                 skipped_steps=loss_scale.skipped_steps)
  return new_state, metrics


def _accumulate(gradients: Callable, batch: dict, k: int, params: Any):
  """`gradients` over k micro-batches of `batch`, one at a time: the mean gradient and the
  means of (loss, accuracy, batch_stats). Only one micro-batch's activations are live."""
  def add(total, micro_batch):
    grads, aux = gradients(micro_batch)
    return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), aux

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, aux = lax.scan(add, zeros, _micro_batches(batch, k))
  grads = jax.tree.map(lambda t, p: (t / k).astype(p.dtype), total, params)
  return grads, jax.tree.map(lambda x: x.mean(axis=0), aux)


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B / k, ...]: micro-batch i is rows [i B/k, (i+1) B/k)."""
  return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)


def eval_step(spec: StepSpec, state: TrainState, batch: dict) -> dict[str, jax.Array]:
  """Masked sums over the global batch: padding examples (mask 0) count for nothing."""
  images = normalize(batch["image"], spec.mean, spec.std, spec.compute_dtype)
  logits = spec.model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                            train=False).astype(spec.output_dtype)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  sums = {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
  return lax.psum(sums, spec.axes)


def batch_stats_step(spec: StepSpec, state: TrainState, batch: dict) -> Any:
  """This global batch's BatchNorm statistics: each BN layer's batch mean and variance.

  They are what a train step normalizes with: over the global batch through the model's BN
  axis_name, or over each BN group and then averaged over all devices (`sync_batch_stats`),
  in float32; with gradient accumulation, the mean over the k micro-batches' statistics.
  Parameters and running statistics are left as they are; the result has the structure of
  `state.batch_stats` and is the same on every device.
  """
  def statistics(micro: dict):
    images = normalize(micro["image"], spec.mean, spec.std, spec.compute_dtype)
    # flax stores `momentum * running + (1 - momentum) * batch`; with momentum 0 that is the
    # batch statistic exactly (0 * running and 1 * batch are exact in floating point), where
    # solving the trained momentum's update for it would lose digits to cancellation. Every
    # model with BatchNorm in the zoo (the ResNets) has the `bn_momentum` field.
    _, new_vars = spec.model.clone(bn_momentum=0.0).apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    return new_vars["batch_stats"]

  # With gradient accumulation, the micro-batches training normalizes with (ghost batches), one
  # at a time: the memory bound that made accumulation necessary holds here too.
  k = spec.accum_steps(batch["label"].shape[0])
  if k == 1:
    stats = statistics(batch)
  else:
    stats = jax.tree.map(lambda x: x.mean(axis=0), lax.map(statistics, _micro_batches(batch, k)))
  if spec.sync_batch_stats:
    stats = lax.pmean(stats, spec.axes)
  return stats


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
  """`jax.jit` of `jax.shard_map`: the state replicated, the batch split over the data axes."""
  batch_spec, replicated = P(spec.axes), mesh_lib.replicated(mesh)
  train = jax.shard_map(functools.partial(train_step, spec), mesh=mesh,
                        in_specs=(P(), batch_spec, P()), out_specs=(P(), P()), check_vma=False)
  evaluate = jax.shard_map(functools.partial(eval_step, spec), mesh=mesh,
                           in_specs=(P(), batch_spec), out_specs=P(), check_vma=False)
  stats = jax.shard_map(functools.partial(batch_stats_step, spec), mesh=mesh,
                        in_specs=(P(), batch_spec), out_specs=P(), check_vma=False)
  sharding = mesh_lib.batch_sharding(mesh)

  def put_batch(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

  return Runner(
      init_state=jax.jit(create_state, out_shardings=replicated),
      put_batch=put_batch,
      train_step=jax.jit(train, donate_argnums=0),
      eval_step=jax.jit(evaluate),
      batch_stats_step=jax.jit(stats),
      global_state=lambda state: state,
      from_global_state=lambda state: jax.device_put(state, replicated))


def pmap_runner(spec: StepSpec, mesh: Mesh, create_state: Callable) -> Runner:
  """Legacy `jax.pmap` over this process's devices, with a replicated copy of the state each."""
  if spec.axes != ("data",):
    raise ValueError("config key 'mesh': parallelism='pmap' supports only mesh='data'")
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


RUNNERS = {"shard_map": shard_map_runner, "pmap": pmap_runner}


_add_trees = jax.jit(functools.partial(jax.tree.map, jnp.add))


def precise_batch_stats(runner: Runner, state: Any, batches: Iterable[dict]) -> Any:
  """PreciseBN (Wu & Johnson 2021, arXiv 2105.07576): population statistics, weights fixed.

  Replaces every BatchNorm layer's running mean by the mean of its per-batch means over
  `batches` (this process's numpy parts of global batches), and its running variance by the
  mean of the per-batch variances, as the paper's PreciseBN does. Unlike the running averages
  of training, these come from the final weights alone, however few steps an epoch has.

  Args:
    runner: the runner that trained `state`.
    state: the state in the runner's device layout.
    batches: at least one batch.

  Returns:
    `state` with the new statistics, in the runner's device layout.
  """
  total, count = None, 0
  for batch in batches:
    stats = runner.batch_stats_step(state, runner.put_batch(batch))
    total = stats if total is None else _add_trees(total, stats)
    count += 1
  if not count:
    raise ValueError("precise_batch_stats needs at least one batch")
  averaged = jax.tree.map(lambda x: x / count, total)
  return runner.from_global_state(runner.global_state(state).replace(batch_stats=averaged))
