"""A run's configuration: defaults, loading, command-line overrides and validation.

Every key a run may set is in `defaults()`; a config file's `get_config()` returns a ConfigDict
whose keys must all exist there. Validation happens before anything compiles or is written,
and each problem is one `ConfigError` whose message names the key.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from jaxscale import optim


class ConfigError(ValueError):
  """A bad configuration value; the message names the key."""


def defaults() -> ml_collections.ConfigDict:
  """Every config key with its default value. Units are in the names (`*_steps`, `*_epochs`)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "fashion_mnist"  # a TFDS catalog name, or "synthetic"
  c.data_dir = ""  # TFDS data dir; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.eval_split = ""  # "" means "validation" if the dataset has one, else "test"
  c.fashion_mnist_idx_dir = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
  # Image side fed to the model. 0: the dataset's own (fixed) size. > 0: Inception random-resized
  # crop for training, resize + center crop for eval (ImageNet: 224); synthetic images are
  # generated at this size (0 means 32).
  c.image_size = 0
  c.synthetic_num_classes = 10
  c.synthetic_num_train_examples = 4096
  c.synthetic_num_eval_examples = 1024
  c.random_flip = True
  c.data_workers = 0  # grain worker processes per host for decoding; 0: one background thread
  c.prefetch_batches = 2  # batches prepared ahead of the step that needs them
  # Model.
  c.model = "resnet8"
  c.stem = "auto"  # "imagenet", "small", or "auto" (small for images of at most 64 pixels)
  c.bn_momentum = 0.9
  c.bn_group_size = 0  # devices per BatchNorm group; 0 means all devices (global batch statistics)
  # > 0: lower bn_momentum so that the running averages' time constant 1 / (1 - momentum) is at
  # most this many epochs of steps at the initial global batch (few steps per epoch); 0: off.
  c.bn_momentum_epochs = 0.0
  # > 0: after training, recompute the BatchNorm statistics from this many training batches with
  # the weights fixed ("precise BN"); the final checkpoint, export and eval use them. 0: off.
  c.precise_bn_batches = 0
  c.zero_init_last_bn = False
  # Optimization.
  c.num_epochs = 4.0
  c.num_train_steps = -1  # when > 0, overrides num_epochs
  c.global_batch_size = 128
  # Batch growth (jaxscale/batching.py): "" (constant), stages "start_epoch:global_batch_size,..."
  # (e.g. "0:34816,30:69632"), or "adaptive" (double while the gradient noise scale exceeds it).
  c.batch_schedule = ""
  c.batch_ramp = False  # stages: grow linearly between the points instead of jumping
  c.max_global_batch_size = 0  # adaptive: the largest global batch
  # Gradient accumulation: each device's batch runs as k micro-batches (BatchNorm normalizes
  # each on its own: ghost batches, README). k = grad_accum_steps, or automatic: the smallest k
  # with micro-batches of at most max_per_device_batch examples (0: no limit). Set one of them.
  c.grad_accum_steps = 1
  c.max_per_device_batch = 0
  c.eval_batch_size = 1000  # global; the last eval batch is padded and the padding masked
  c.learning_rate = 0.1  # base rate at reference_batch_size
  c.lr_scaling = "none"  # "linear", "sqrt" or "none": how the rate follows the global batch
  c.reference_batch_size = 256
  c.lr_schedule = optim.default_schedule_config()
  c.optimizer = optim.default_optimizer_config()
  c.label_smoothing = 0.0
  # Parallelism.
  c.parallelism = "shard_map"  # or "pmap" (legacy, replicated state)
  c.mesh = "data"  # "data" (1-D), "hosts" (processes x local devices) or "RxC", e.g. "2x4"
  c.allreduce = "flat"  # gradient all-reduce: "flat", or "hierarchical" on a 2-D mesh
  c.xla_gpu_overlap = True  # on GPU, XLA flags that overlap and combine all-reduces
  # Precision (docs/precision.md).
  c.precision = "fp32"  # "fp32", "bf16", "fp16" or "params=float32,compute=bfloat16,output=float32"
  c.grad_allreduce_dtype = "float32"  # gradients cross devices in this: float32, bfloat16, float16
  c.loss_scale = ml_collections.ConfigDict(dict(  # dynamic loss scaling; used only with float16
      initial=2.0**15,  # starting scale (float16's max is 65504)
      growth_factor=2.0,  # multiply the scale by this after growth_interval_steps finite steps
      growth_interval_steps=2000,  # finite steps in a row before the scale grows
      backoff_factor=0.5,  # multiply the scale by this after a non-finite (skipped) step
      min=1.0, max=2.0**24))  # the scale always stays within [min, max]
  c.max_nonfinite_steps = 20  # stop with an error after this many non-finite steps in a row
  # Run.
  c.seed = 0
  c.log_every_steps = 50
  c.progress_bar = "auto"  # "auto" (only on a terminal), "on" or "off"
  # XLA's persistent compilation cache: a rerun, a resume or a returning batch size skips
  # compiling; "" turns it off.
  c.compilation_cache_dir = "~/.cache/jaxscale/xla"
  c.profile_steps = ""  # "A:B": a JAX profiler trace of steps A+1..B in workdir/profile
  # Checkpoints in workdir/checkpoints (docs/checkpoints.md); the final step is always saved.
  c.checkpoint_every_steps = 1000  # 0: only the final save (and one on preemption)
  c.checkpoint_keep = 3  # keep the last N checkpoints; 0 keeps all
  c.checkpoint_keep_every_steps = 0  # also keep those whose step is a multiple; 0: none
  c.checkpoint_async = True  # write in the background while training goes on
  return c


PARALLELISMS = ("shard_map", "pmap")


def load(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python file, applies `key=value` overrides, checks the keys."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_jaxscale_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function")
  config = merge(defaults(), module.get_config(), source=path)
  for override in overrides:
    apply_override(config, override)
  return config


def merge(base: ml_collections.ConfigDict, update: Any, source: str, prefix: str = ""):
  """Copies `update`'s values into a copy of `base`, rejecting keys that `base` does not have."""
  merged = ml_collections.ConfigDict(base.to_dict())
  for key, value in dict(update.items()).items():
    name = prefix + key
    if key not in merged:
      raise ConfigError(f"unknown config key {name!r} in {source}")
    if isinstance(merged[key], ml_collections.ConfigDict):
      merged[key] = merge(merged[key], value, source, prefix=name + ".")
    else:
      _assign(merged, key, _coerce(name, value, merged[key]), name)
  return merged


def _assign(node: ml_collections.ConfigDict, key: str, value: Any, name: str) -> None:
  try:
    node[key] = value
  except TypeError:  # ml_collections' own type check (e.g. a float field that defaults to None)
    raise ConfigError(f"config key {name!r}: {value!r} has the wrong type") from None


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `a.b=value` override; the value is a Python literal or a bare string."""
  key, sep, text = override.partition("=")
  if not sep:
    raise ConfigError(f"override {override!r} is not of the form key=value")
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"unknown config key {key!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  default = defaults()
  for part in key.split("."):
    default = default[part]
  # Coerce to the default's type, not the current value's: None-default keys take any type.
  _assign(node, leaf, _coerce(key, value, default), key)


def _coerce(name: str, value: Any, default: Any) -> Any:
  """Checks `value` against the default's type; ints are accepted where floats are expected."""
  if default is None or value is None:
    return value
  if isinstance(default, bool) or isinstance(value, bool):
    if isinstance(default, bool) and isinstance(value, bool):
      return value
  elif isinstance(default, float) and isinstance(value, (int, float)):
    return float(value)
  elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(default)(value)
  elif isinstance(value, type(default)):
    return value
  raise ConfigError(
      f"config key {name!r} must be of type {type(default).__name__}, got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Rejects bad values before anything compiles. Raises ConfigError naming the key."""
  from jaxscale import batching, data, models, precision  # deferred: heavy, or import this

  def positive(key):
    if not config[key] > 0:
      raise ConfigError(f"config key {key!r} must be positive, got {config[key]!r}")

  for key in ("global_batch_size", "eval_batch_size", "log_every_steps",
              "reference_batch_size", "learning_rate"):
    positive(key)
  if config.num_train_steps <= 0:
    positive("num_epochs")
  if config.model not in models.MODELS:
    raise ConfigError(f"config key 'model': unknown model {config.model!r}; "
                      f"known: {', '.join(sorted(models.MODELS))}")
  data.check_dataset_name(config.dataset)
  if config.parallelism not in PARALLELISMS:
    raise ConfigError(f"config key 'parallelism': unknown {config.parallelism!r}; "
                      f"known: {', '.join(PARALLELISMS)}")
  if config.lr_scaling not in optim.LR_SCALING_RULES:
    raise ConfigError(f"config key 'lr_scaling': unknown {config.lr_scaling!r}; "
                      f"known: {', '.join(optim.LR_SCALING_RULES)}")
  if config.allreduce not in ("flat", "hierarchical"):
    raise ConfigError(f"config key 'allreduce': unknown {config.allreduce!r}; known: flat, "
                      f"hierarchical")
  if config.parallelism == "pmap" and config.mesh != "data":
    raise ConfigError("config key 'mesh': parallelism='pmap' supports only mesh='data'")
  if config.allreduce == "hierarchical" and (config.mesh == "data" or
                                             config.parallelism == "pmap"):
    raise ConfigError("config key 'allreduce': 'hierarchical' needs a 2-D mesh (mesh='hosts' "
                      "or 'RxC') under parallelism='shard_map'")
  if config.stem not in ("auto", "imagenet", "small"):
    raise ConfigError(f"config key 'stem': must be auto, imagenet or small, got {config.stem!r}")
  if config.progress_bar not in ("auto", "on", "off"):
    raise ConfigError(f"config key 'progress_bar': must be auto, on or off, "
                      f"got {config.progress_bar!r}")
  for key in ("global_batch_size", "eval_batch_size"):
    if config[key] % num_devices:
      raise ConfigError(f"config key {key!r}: {config[key]} is not divisible by the "
                        f"{num_devices} data-parallel devices")
  group = config.bn_group_size
  if group < 0 or (group and num_devices % group):
    raise ConfigError(f"config key 'bn_group_size': {group} must be 0 (all devices) or "
                      f"divide the {num_devices} devices")
  try:
    optim.build_optimizer(config.optimizer, 0.1)
    optim.build_schedule(config.lr_schedule, base_learning_rate=0.1, steps_per_epoch=1.0,
                         total_steps=10)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.dataset == "synthetic":
    for key in ("synthetic_num_classes", "synthetic_num_train_examples",
                "synthetic_num_eval_examples"):
      positive(key)
  for key in ("image_size", "data_workers", "checkpoint_every_steps", "checkpoint_keep",
              "checkpoint_keep_every_steps", "bn_momentum_epochs", "precise_bn_batches"):
    if config[key] < 0:
      raise ConfigError(f"config key {key!r} must be >= 0, got {config[key]}")
  positive("prefetch_batches")
  # Raises for a bad batch schedule or accumulation key.
  batching.create(config, num_examples=1, num_devices=num_devices)
  profile_range(config.profile_steps)
  try:
    precision.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def profile_range(text: str) -> tuple[int, int]:
  """`profile_steps` "A:B" -> (A, B), the trace covering steps A+1..B; "" -> (-1, -1)."""
  if not text:
    return -1, -1
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise ConfigError(f"config key 'profile_steps': {text!r} is not 'A:B' with 0 <= A < B")
  return start, stop


def changed_keys(old: dict, new: dict) -> list[str]:
  """The dotted keys whose values differ between two configs loaded from `to_json`.

  A key that `old` lacks and `new` holds at its default value counts as unchanged, so a workdir
  or checkpoint written before jaxscale added that key still resumes.
  """
  default = _flatten(json.loads(to_json(defaults())))
  old, new = _flatten(old), _flatten(new)
  return sorted(k for k in old.keys() | new.keys()
                if old.get(k, default.get(k)) != new.get(k))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as stable JSON (sorted keys), as written to `workdir/config.json`."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  return json.dumps(clean(config.to_dict()), indent=2, sort_keys=True)
