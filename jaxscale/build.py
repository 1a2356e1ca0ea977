"""A run's pieces, built from its config: mesh, data, task, model, optimizer, step and runner.

`build(config)` is the wiring that the trainer, the benchmarks and the tests share. It reads a
few records and traces the model abstractly, so a model, dataset or task that cannot work is
refused here with one line, but it compiles nothing and writes nothing.

    pieces = build(config, model=MyModel, dataset=data.from_arrays(train=(x, y)))
    state = pieces.init_state()
    state, metrics = pieces.runner.train_step(state, pieces.put_batch(...), learning_rate)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from jaxscale import batching, config as config_lib, data, models, optim, precision, sharding
from jaxscale import tasks
from jaxscale.data import pipeline, transforms
from jaxscale.errors import ConfigError
from jaxscale.mesh import create_mesh, data_axes
from jaxscale.runners import RUNNERS, Runner
from jaxscale.step import StepSpec, create_train_state

CHECK_BATCH = 2  # the batch size of the abstract call that checks the model's contract


@dataclasses.dataclass
class Pieces:
  """Everything one run is made of (see `build`)."""
  config: Any
  mesh: jax.sharding.Mesh
  dataset: data.Dataset
  task: tasks.Task
  model: models.Model
  policy: precision.Policy
  spec: StepSpec
  runner: Runner
  batches: batching.BatchSchedule  # the global batch size at each point of training
  loader: data.TrainLoader  # this process's part of every training batch
  train_transform: Any
  eval_transform: Any
  total_examples: int  # the training length, in examples (the schedules' unit)
  total_steps: int  # at the batch sizes known now (an adaptive schedule may shorten it)
  bn_momentum: float  # after `bn_momentum_epochs`
  has_batch_norm: bool
  metric_names: tuple[str, ...]  # the task's per-example metrics, besides "loss"
  model_info: dict[str, Any]  # what a checkpoint records to rebuild the model (export)
  lr_shape: Any  # examples seen -> the schedule's factor (peak 1), on the host
  init_input: jax.Array  # a batch of one model input, for initialization

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def init_state(self):
    """The initial TrainState on the devices, from `config.seed`."""
    return self.runner.init_state(jax.random.key(self.config.seed))

  def with_spec(self, **changes) -> Pieces:
    """A copy whose step has `changes` (StepSpec fields), with a runner compiled for it: for
    benchmarks and tests that vary one thing of the step."""
    spec = dataclasses.replace(self.spec, **changes)
    return dataclasses.replace(self, spec=spec, runner=_runner(self.config, spec, self.mesh,
                                                                self.init_input))

  def learning_rate(self, position: int) -> float:
    """The rate for the step that starts at stream `position`, computed on the host."""
    return optim.scale_learning_rate(
        self.config.learning_rate, self.batches.size_at(position),
        self.config.reference_batch_size, self.config.lr_scaling) * float(self.lr_shape(position))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every eval batch: the whole eval split once, padding masked."""
    return data.eval_batches(self.dataset.eval, self.config.eval_batch_size,
                             transform=self.eval_transform, workers=self.config.data_workers,
                             prefetch=self.config.prefetch_batches)

  def evaluate(self, state) -> dict[str, float]:
    """Means over the eval split of the loss and the task's metrics, and `num_examples`."""
    sums = None
    for batch in self.eval_batches():
      out = jax.device_get(self.runner.eval_step(state, self.runner.put_batch(batch)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    count = int(sums.pop("count"))
    return {**{k: float(v) / count for k, v in sums.items()}, "num_examples": count}


def _image_transforms(config, dataset: data.Dataset, record: dict):
  """(train, eval) transforms of the "image" field, or (None, None) where there is none."""
  image = record.get("image")
  if image is None:
    return None, None
  encoded = transforms.is_encoded(image)
  if not encoded and np.ndim(image) == 1:
    return None, None  # feature vectors: no image augmentation
  if not encoded and np.ndim(image) not in (2, 3):
    raise ConfigError(f"dataset {dataset.name!r}: image shape {np.shape(image)} cannot be used; "
                      f"need HW, HWC, an encoded file or a feature vector")
  if dataset.varying_size and not config.image_size:
    raise ConfigError(f"config key 'image_size': {dataset.name} has images of varying size; "
                      f"set image_size (e.g. 224)")
  size = 0 if dataset.name == "synthetic" else config.image_size  # generated at that size
  return (data.TrainTransform(size, config.random_flip, dataset.channels),
          data.EvalTransform(size, dataset.channels))


def _normalization(config, dataset: data.Dataset, example: dict, train_source, transform):
  """(mean, std) of "image": the config's, the dataset's, or computed from the training data."""
  if "image" not in example:
    return None, None
  channels = example["image"].shape[-1] if example["image"].ndim == 3 else 1
  if config.mean:
    mean, std = tuple(config.mean), tuple(config.std)
  elif dataset.mean is not None:
    mean, std = dataset.mean, dataset.std
  else:
    mean, std = data.mean_std(train_source, transform)
  if len(mean) == 1 and channels > 1:
    mean, std = mean * channels, std * channels
  if len(mean) != channels:
    raise ConfigError(f"config keys 'mean'/'std': {len(mean)} values for images of "
                      f"{channels} channels")
  return mean, std


def _model_options(config, task: tasks.Task, policy: precision.Policy, bn_momentum: float,
                   image_shape) -> dict[str, Any]:
  """What jaxscale sets on a model that accepts it (`models.contract.wrap`)."""
  task_options = getattr(task, "model_options", dict)()
  options = dict(task_options, dtype=policy.compute_dtype,
                 param_dtype=policy.param_dtype, bn_momentum=bn_momentum,
                 zero_init_last_bn=config.zero_init_last_bn)
  if image_shape is not None:
    options["stem"] = (models.auto_stem(image_shape) if config.stem == "auto" else config.stem)
  return options


def bn_momentum_for(config, steps_per_epoch: float) -> float:
  """`bn_momentum`, lowered by `bn_momentum_epochs` > 0 to a time constant of that many epochs.

  A running average of momentum m forgets with time constant 1 / (1 - m) steps: 100 steps at
  0.99, six epochs at 16 steps per epoch, far behind weights that change every step.
  """
  if not config.bn_momentum_epochs:
    return config.bn_momentum
  return max(0.0, min(config.bn_momentum,
                      1 - 1 / (config.bn_momentum_epochs * steps_per_epoch)))


def build(config, *, model: Any = None, dataset: data.Dataset | None = None,
          task: tasks.Task | None = None, devices: list | None = None) -> Pieces:
  """Builds a run's pieces from `config`; `model`, `dataset` and `task` replace the config's.

  Args:
    config: a config from `jaxscale.config.load` (or `defaults()` with changes).
    model: a zoo name, an import path, or a Linen / NNX object (see `models.contract`).
    dataset: a `jaxscale.data.Dataset` (e.g. `data.from_arrays(...)`).
    task: a `jaxscale.tasks.Task`.
    devices: the devices of the mesh (default: all).

  Raises:
    ConfigError (or DataError): one line naming the key, model, dataset or file at fault.
  """
  # Mesh: every global device, 1-D or (hosts x local).
  mesh = create_mesh(config.mesh, devices)
  axes, num_devices = data_axes(mesh), mesh.size
  config_lib.validate(config, num_devices)

  # Input: records, their transforms, and normalization.
  dataset = dataset or data.load_dataset(config)
  if not len(dataset.train):
    raise ConfigError(f"dataset {dataset.name!r} has no training examples")
  if dataset.eval is None:
    for key in ("eval_every_epochs", "eval_every_steps", "target_accuracy"):
      if config[key]:
        raise ConfigError(f"config key {key!r}: dataset {dataset.name!r} has no eval split")
  record = dataset.train[0]
  train_transform, eval_transform = _image_transforms(config, dataset, record)
  example = pipeline.prepare(record, eval_transform, None)
  if "image" in example and example["image"].dtype.kind not in "uif":
    raise ConfigError(f"dataset {dataset.name!r}: images of dtype {example['image'].dtype} "
                      f"cannot be used; need integers or floats")
  mean, std = _normalization(config, dataset, example, dataset.train, eval_transform)
  batches = batching.create(config, len(dataset.train), num_devices)
  largest = max(batches.distinct_sizes())
  if largest > len(dataset.train):
    raise ConfigError(f"config key 'global_batch_size': a batch of {largest} is larger than the "
                      f"{len(dataset.train)} training examples of {dataset.name!r}")
  if config.num_train_steps > 0:
    total_examples = config.num_train_steps * config.global_batch_size
    total_steps = config.num_train_steps
  else:
    total_examples = round(config.num_epochs * len(dataset.train))
    total_steps = batches.num_steps(0, total_examples)

  # Task and model, checked abstractly against each other.
  task = tasks.create(task or config.task, num_classes=dataset.num_classes, example=example,
                      mean=mean, std=std, label_smoothing=config.label_smoothing)
  policy = precision.parse_policy(config.precision)
  # From the initial batch: the model, and so a resumed run, is the same whatever the schedule.
  bn_momentum = bn_momentum_for(config, len(dataset.train) / batches.initial)
  image_shape = example["image"].shape if "image" in example else None
  options = _model_options(config, task, policy, bn_momentum, image_shape)
  model = models.build(model or config.model, options)
  dummy = {k: jax.ShapeDtypeStruct((CHECK_BATCH, *v.shape), v.dtype) for k, v in example.items()}
  model_input = jax.eval_shape(lambda b: task.model_input(b, policy.compute_dtype), dummy)
  variables, output = models.check(model, model_input)
  try:
    if hasattr(task, "check_output"):
      task.check_output(output, CHECK_BATCH)
    _, metrics = jax.eval_shape(lambda o, b: task.loss(o, b, train=False), output, dummy)
  except ValueError as e:
    raise ConfigError(f"model {model.name!r} {e}") from None
  if config.target_accuracy and "accuracy" not in metrics:
    raise ConfigError(f"config key 'target_accuracy': task {_task_name(task)!r} reports no "
                      f"accuracy (its metrics: {', '.join(metrics) or 'none'})")
  has_batch_norm = bool(jax.tree.leaves(variables["batch_stats"]))
  for key in ("precise_bn_batches", "bn_momentum_epochs"):
    if config[key] and not has_batch_norm:
      raise ConfigError(f"config key {key!r}: model {model.name!r} has no BatchNorm")

  # Update: the per-device step, compiled for the configured parallelism, with the state
  # replicated or sharded (jaxscale/sharding.py); the weight-decay mask from whole leaves.
  init_input = jax.numpy.zeros((1, *model_input.shape[1:]), model_input.dtype)
  loss_scale = precision.loss_scale_config(config)
  abstract = jax.eval_shape(lambda rng: create_train_state(
      model, lambda lr: optim.build_optimizer(config.optimizer, lr), rng, init_input,
      loss_scale), jax.random.key(0))
  mask = optim.default_decay_mask(abstract.params)
  layout = sharding.layout(config.state_sharding, abstract, axes, num_devices,
                           config.allreduce == "hierarchical",
                           precision.parse_dtype(config.param_gather_dtype, "param_gather_dtype"))
  axis_name = layout.axes if layout.sharded else None
  group = config.bn_group_size
  groups = ([list(range(i, i + group)) for i in range(0, num_devices, group)]
            if group and group < num_devices else None)
  spec = StepSpec(
      model=model, task=task,
      make_optimizer=lambda learning_rate: optim.build_optimizer(
          config.optimizer, learning_rate, mask=mask, axis_name=axis_name),
      axes=axes, batch_norm=models.BatchNorm(axes if len(axes) > 1 else axes[0], groups),
      sync_batch_stats=groups is not None, compute_dtype=policy.compute_dtype,
      output_dtype=policy.output_dtype,
      grad_allreduce_dtype=precision.parse_dtype(config.grad_allreduce_dtype,
                                                 "grad_allreduce_dtype"),
      allreduce=config.allreduce, loss_scale=loss_scale,
      grad_accum_steps=config.grad_accum_steps,
      max_per_device_batch=config.max_per_device_batch, seed=config.seed, layout=layout)
  runner = _runner(config, spec, mesh, init_input)
  loader = data.TrainLoader(dataset.train, seed=config.seed, workers=config.data_workers,
                            prefetch=config.prefetch_batches, transform=train_transform)
  # The schedule's shape over examples seen (peak 1), times the rate for the batch in force.
  lr_shape = optim.build_schedule(config.lr_schedule, base_learning_rate=1.0,
                                  steps_per_epoch=len(dataset.train),
                                  total_steps=total_examples)
  model_info = {"name": model.name, "task": _task_name(task), "num_classes": dataset.num_classes,
                "options": {k: v for k, v in model.accepted.items()
                            if isinstance(v, (int, float, str, bool))},
                "input_shape": list(model_input.shape[1:]), "input_dtype": str(model_input.dtype),
                "image_shape": list(image_shape) if image_shape is not None else None,
                "mean": list(mean) if mean else None, "std": list(std) if std else None}
  return Pieces(config, mesh, dataset, task, model, policy, spec, runner, batches, loader,
                train_transform, eval_transform, total_examples, total_steps, bn_momentum,
                has_batch_norm, tuple(metrics), model_info, lr_shape, init_input)


def _runner(config, spec: StepSpec, mesh, init_input) -> Runner:
  return RUNNERS[config.parallelism](
      spec, mesh, lambda rng: create_train_state(spec.model, spec.make_optimizer, rng,
                                                 init_input, spec.loss_scale))


def _task_name(task) -> str:
  return getattr(task, "name", type(task).__name__)
