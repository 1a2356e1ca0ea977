"""The per-device train, eval and BatchNorm-statistics steps (`runners.py` runs them on a mesh).

Each step computes on this device's part of the global batch and reduces explicitly over the
data axes (`lax.pmean` / `lax.psum`); docs/step.md says why the runners need `check_vma=False`
and what gradient accumulation does to BatchNorm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxscale import allreduce, batching, precision, sharding
from jaxscale.models import BatchNorm, Model
from jaxscale.tasks import Task


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; float32 master parameters."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: precision.LossScale  # scale 1 and static unless the policy computes in float16


def create_train_state(model: Model, make_optimizer: Callable[[Any], optax.GradientTransformation],
                       rng: jax.Array, example_input: jax.Array,
                       loss_scale: precision.LossScaleConfig = precision.NO_LOSS_SCALE
                       ) -> TrainState:
  """Initializes parameters from `rng` alone, so every process computes the same state.

  `example_input` is a batch of model inputs (its values are not used, only its shape).
  """
  variables = model.init(rng, example_input)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=make_optimizer(0.0).init(params),
                    loss_scale=precision.init_loss_scale(loss_scale))


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the per-device steps need besides the state and the batch (`build.build` makes it).

  `grad_accum_steps` and `max_per_device_batch` give the number of micro-batches k of each
  device's batch (`batching.accum_steps`), resolved per batch size when the step is traced.
  """
  model: Model
  task: Task
  make_optimizer: Callable[[Any], optax.GradientTransformation]  # learning rate -> optimizer
  axes: tuple[str, ...]  # mesh axes the batch is split over
  batch_norm: BatchNorm = BatchNorm()  # statistics over `axes` (or groups of them)
  sync_batch_stats: bool = False  # BN groups: average running statistics over all devices
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32  # the model's output; the loss is float32 whatever this is
  grad_allreduce_dtype: Any = jnp.float32  # gradients cross the devices in this dtype
  allreduce: str = "flat"  # or "hierarchical" on a (hosts x local) mesh (jaxscale/allreduce.py)
  loss_scale: precision.LossScaleConfig = precision.NO_LOSS_SCALE
  grad_accum_steps: int = 1  # micro-batches per device's batch; 1: none
  max_per_device_batch: int = 0  # > 0: the fewest micro-batches of at most this many examples
  seed: int = 0  # dropout keys are drawn from (seed, step, device, micro-batch)
  layout: sharding.Layout = sharding.REPLICATED  # how params and optimizer state lie

  def accum_steps(self, per_device_batch: int) -> int:
    """k, the micro-batches of a device's batch of this size (`batching.accum_steps`)."""
    return batching.accum_steps(per_device_batch, self.grad_accum_steps,
                                self.max_per_device_batch)


def _batch_size(batch: dict) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def train_step(spec: StepSpec, state: TrainState, batch: dict, learning_rate: jax.Array):
  """One optimizer step on this device's part of the global batch. Returns (state, metrics).

  A step whose loss or gradients are non-finite on any device leaves params, opt_state and
  batch_stats as they were on every device (a select on the decision of `all_finite`, taken
  after the reduction) and backs the loss scale off. Metrics are means over the global batch:
  "loss", the task's metrics, and the gradient norms the noise scale needs.
  """
  scale, layout = state.loss_scale.scale, spec.layout
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed), state.step),
                           lax.axis_index(spec.axes))
  whole_params = layout.whole_params(state.params)  # fsdp: gathered for this step

  def gradients(micro: dict, rng: jax.Array):
    """The scaled gradients, and (loss, metrics, batch_stats), of one (micro-)batch."""
    x = spec.task.model_input(micro, spec.compute_dtype)

    def loss_fn(params):
      output, batch_stats = spec.model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          batch_norm=spec.batch_norm, rng=rng)
      per_example, metrics = spec.task.loss(output.astype(spec.output_dtype), micro, train=True)
      loss = per_example.mean()
      return loss * scale, (loss, {k: v.mean() for k, v in metrics.items()}, batch_stats)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(whole_params)
    return grads, aux

  k = spec.accum_steps(_batch_size(batch))
  if k == 1:
    grads, (loss, metrics, batch_stats) = gradients(batch, key)
  else:
    grads, (loss, metrics, batch_stats) = _accumulate(gradients, batch, k, whole_params, key)
  # Local mean gradient -> global mean gradient (sharded: this device's slice of it), still
  # scaled so that small gradients survive a float16 exchange. Squared norms of the local and
  # the reduced gradient: the gradient noise scale's inputs.
  local_sq_norm = optax.tree_utils.tree_norm(grads, squared=True) / (scale * scale)
  if layout.sharded:
    grads = layout.mean_gradients(grads, spec.grad_allreduce_dtype)
    at_rest = layout.mode == "fsdp"
    params = layout.slices(state.params, layout.params, at_rest)
    opt_state = layout.slices(state.opt_state, layout.opt_state, True)
  else:
    grads = allreduce.mean_gradients(grads, spec.axes, spec.allreduce, spec.grad_allreduce_dtype)
    params, opt_state = state.params, state.opt_state
  grads = precision.unscale(grads, scale)
  finite = precision.all_finite((grads, loss), spec.axes)
  if spec.sync_batch_stats:
    batch_stats = lax.pmean(batch_stats, spec.axes)
  tx = spec.make_optimizer(learning_rate)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  params, opt_state, batch_stats = precision.select_tree(
      finite, (optax.apply_updates(params, updates), new_opt_state, batch_stats),
      (params, opt_state, state.batch_stats))
  grad_sq_norm = optax.tree_utils.tree_norm(grads, squared=True)
  if layout.sharded:
    params = layout.unslice(params, layout.params, state.params, layout.mode == "fsdp")
    opt_state = layout.unslice(opt_state, layout.opt_state, state.opt_state, True)
    grad_sq_norm = layout.sum_over_shards(grad_sq_norm)
  loss_scale = precision.update_loss_scale(state.loss_scale, finite, spec.loss_scale)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, loss_scale=loss_scale)
  metrics = lax.pmean({"loss": loss, **metrics, "grad_sq_norm_local": local_sq_norm}, spec.axes)
  metrics["grad_sq_norm_global"] = grad_sq_norm
  # Already the same on every device: no reduction needed.
  metrics.update(finite=finite, loss_scale=loss_scale.scale,
                 skipped_steps=loss_scale.skipped_steps, learning_rate=learning_rate)
  return new_state, metrics


def _accumulate(gradients: Callable, batch: dict, k: int, params: Any, key: jax.Array):
  """`gradients` over k micro-batches of `batch`, one at a time: the mean gradient and the
  means of (loss, metrics, batch_stats). Only one micro-batch's activations are live."""
  def add(total, inputs):
    micro_batch, i = inputs
    grads, aux = gradients(micro_batch, jax.random.fold_in(key, i))
    return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), aux

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, aux = lax.scan(add, zeros, (_micro_batches(batch, k), jnp.arange(k)))
  grads = jax.tree.map(lambda t, p: (t / k).astype(p.dtype), total, params)
  return grads, jax.tree.map(lambda x: x.mean(axis=0), aux)


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B / k, ...]: micro-batch i is rows [i B/k, (i+1) B/k)."""
  return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)


def eval_step(spec: StepSpec, state: TrainState, batch: dict) -> dict[str, jax.Array]:
  """Masked sums over the global batch: "loss", the task's metrics and "count" (padding
  examples, mask 0, count for nothing)."""
  x = spec.task.model_input(batch, spec.compute_dtype)
  output, _ = spec.model.apply({"params": spec.layout.whole_params(state.params),
                                "batch_stats": state.batch_stats}, x,
                               train=False, batch_norm=spec.batch_norm)
  per_example, metrics = spec.task.loss(output.astype(spec.output_dtype), batch, train=False)
  mask = batch["mask"]
  sums = {"loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
  sums.update({k: jnp.sum(v * mask) for k, v in metrics.items()})
  return lax.psum(sums, spec.axes)


def batch_stats_step(spec: StepSpec, state: TrainState, batch: dict) -> Any:
  """This global batch's BatchNorm statistics: each BN layer's batch mean and variance.

  They are what a train step normalizes with: over the global batch, or over each BN group and
  then averaged over all devices (`sync_batch_stats`), in float32; with gradient accumulation,
  the mean over the k micro-batches' statistics. Parameters and running statistics are left
  as they are; the result has the structure of `state.batch_stats` and is the same on every
  device.
  """
  # With momentum 0 the stored running statistic is the batch statistic exactly (0 * running
  # and 1 * batch are exact), where solving the trained momentum's update for it would lose
  # digits to cancellation.
  batch_norm = dataclasses.replace(spec.batch_norm, momentum_cap=0.0)
  params = spec.layout.whole_params(state.params)

  def statistics(micro: dict):
    x = spec.task.model_input(micro, spec.compute_dtype)
    _, stats = spec.model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                train=True, batch_norm=batch_norm)
    return stats

  # With gradient accumulation, the micro-batches training normalizes with (ghost batches), one
  # at a time: the memory bound that made accumulation necessary holds here too.
  k = spec.accum_steps(_batch_size(batch))
  if k == 1:
    stats = statistics(batch)
  else:
    stats = jax.tree.map(lambda x: x.mean(axis=0), lax.map(statistics, _micro_batches(batch, k)))
  if spec.sync_batch_stats:
    stats = lax.pmean(stats, spec.axes)
  return stats
