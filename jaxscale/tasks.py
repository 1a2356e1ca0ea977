"""Tasks: what a model is trained to do. A task maps a batch to the model's input, and the
model's output and the batch to a per-example loss and per-example metrics.

`config.task` is `classification` (default), `language_model`, or an import path
`package.module:Name` naming a `Task` (an instance, or a class or function called with no
arguments). Metrics are per example so that jaxscale can sum them exactly across devices and
processes: a training step reports their mean over the global batch, an eval their mean over
every example of the eval split (padding masked out).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxscale.errors import ConfigError
from jaxscale.imports import import_object

TOP5_MIN_CLASSES = 100  # classification reports top-5 accuracy from this many classes on


class Task(Protocol):
  """The interface jaxscale trains through; `Classification` is the reference implementation.

  `loss` returns `(per_example_loss [batch], {name: per-example values [batch]})`; `train` is
  True in training steps (label smoothing applies there only). `check_output` raises ValueError
  with one line when the model's output cannot serve the task. `model_options` are the
  constructor options jaxscale passes to models that accept them (e.g. `num_classes`).
  """
  name: str

  def model_input(self, batch: dict[str, jax.Array], dtype: Any) -> jax.Array: ...

  def loss(self, output: jax.Array, batch: dict[str, jax.Array], *, train: bool
           ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  def check_output(self, output: jax.ShapeDtypeStruct, batch_size: int) -> None: ...

  def model_options(self) -> dict[str, Any]: ...


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy in float32 over the last axis, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def normalize(images: jax.Array, mean, std, dtype: Any = jnp.float32) -> jax.Array:
  """(images - mean) / std per channel, in float32, then cast to `dtype`. uint8 images travel
  to the devices as they are (a quarter of float32's bytes) and are normalized there."""
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Classification:
  """Images (or any feature arrays) -> `num_classes` logits; softmax cross-entropy.

  The model input is `batch["image"]` normalized by `mean` and `std` (per channel, in the
  images' own units). Metrics: accuracy (top-1) and, from 100 classes, top-5 accuracy.
  """
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  label_smoothing: float = 0.0
  name: str = "classification"

  def model_input(self, batch, dtype):
    return normalize(batch["image"], self.mean, self.std, dtype)

  def loss(self, output, batch, *, train):
    labels = batch["label"]
    per_example = cross_entropy(output, labels, self.label_smoothing if train else 0.0)
    metrics = {"accuracy": (jnp.argmax(output, -1) == labels).astype(jnp.float32)}
    if self.num_classes >= TOP5_MIN_CLASSES:
      top5 = jax.lax.top_k(output, 5)[1]
      metrics["top5_accuracy"] = jnp.any(top5 == labels[:, None], -1).astype(jnp.float32)
    return per_example, metrics

  def check_output(self, output, batch_size):
    if tuple(output.shape) != (batch_size, self.num_classes):
      raise ValueError(f"returns shape {tuple(output.shape)}; task 'classification' needs "
                       f"(batch, num_classes) = {(batch_size, self.num_classes)}")
    _check_float(output)

  def model_options(self):
    return {"num_classes": self.num_classes}


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """Next-token prediction: position t of `batch["tokens"][:, :-1]` predicts token t + 1.

  Metrics: accuracy (of the next token) and bits per token, `loss / ln 2`: bits per byte for a
  byte-level model, the unit of compression benchmarks (uniform bytes: 8).
  """
  vocab_size: int
  max_length: int
  name: str = "language_model"

  def model_input(self, batch, dtype):
    del dtype  # token ids stay integers; the embedding computes in the model's dtype
    return batch["tokens"][:, :-1].astype(jnp.int32)

  def loss(self, output, batch, *, train):
    del train
    targets = batch["tokens"][:, 1:].astype(jnp.int32)
    per_token = cross_entropy(output, targets)
    per_example = per_token.mean(-1)
    accuracy = (jnp.argmax(output, -1) == targets).astype(jnp.float32).mean(-1)
    return per_example, {"accuracy": accuracy, "bits_per_byte": per_example / math.log(2)}

  def check_output(self, output, batch_size):
    want = (batch_size, self.max_length, self.vocab_size)
    if tuple(output.shape) != want:
      raise ValueError(f"returns shape {tuple(output.shape)}; task 'language_model' needs "
                       f"(batch, length, vocab_size) = {want}")
    _check_float(output)

  def model_options(self):
    return {"vocab_size": self.vocab_size, "max_length": self.max_length}


def _check_float(output) -> None:
  if not jnp.issubdtype(output.dtype, jnp.floating):
    raise ValueError(f"returns {output.dtype}; the task needs floating-point logits")


TASKS = ("classification", "language_model")  # config key `task`, besides import paths


def create(task: Any, *, num_classes: int | None, example: dict[str, Any],
           mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
           label_smoothing: float = 0.0) -> Task:
  """The task `config.task` names (or a Task object as it is), for a dataset whose transformed
  records look like `example` ({field: array or ShapeDtypeStruct})."""
  if not isinstance(task, str):
    return task
  if task == "classification":
    if "image" not in example or "label" not in example:
      raise ConfigError(f"config key 'task': 'classification' needs records with 'image' and "
                        f"'label'; the dataset's have {sorted(example)}")
    return Classification(num_classes, tuple(mean), tuple(std), label_smoothing)
  if task == "language_model":
    if "tokens" not in example:
      raise ConfigError(f"config key 'task': 'language_model' needs records with 'tokens' "
                        f"(e.g. dataset='text'); the dataset's have {sorted(example)}")
    return LanguageModel(num_classes, example["tokens"].shape[0] - 1)
  if ":" in task:
    obj = import_object(task, "task")
    return obj() if isinstance(obj, type) or not hasattr(obj, "loss") else obj
  raise ConfigError(f"config key 'task': unknown task {task!r}; known: {', '.join(TASKS)}, or "
                    f"an import path 'package.module:Name'")
