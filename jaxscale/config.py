"""A run's configuration: defaults, loading, command-line overrides and validation.

Every key a run may set is in `defaults()`; a config file's `get_config()` returns a ConfigDict
whose keys must all exist there. Validation happens before anything compiles or is written,
and each problem is one `ConfigError` whose message names the key. Each module checks its own
keys (`check_config`); `validate` calls them in turn.
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
from jaxscale.errors import ConfigError, first_line
from jaxscale.imports import add_search_path


def defaults() -> ml_collections.ConfigDict:
  """Every config key with its default value. Units are in the names (`*_steps`, `*_epochs`)."""
  c = ml_collections.ConfigDict()
  # Data.
  # A TFDS name (the catalog's, or a builder prepared in data_dir), "synthetic", "text" (a local
  # file, byte-level), or an import path "package.module:function" returning a Dataset.
  c.dataset = "fashion_mnist"
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
  # Normalization of "image", per channel in the images' units; () means the dataset's own
  # (known for TFDS catalog datasets), else computed once from the training data.
  c.mean = ()
  c.std = ()
  c.text_file = ""  # dataset="text": a local UTF-8 (any bytes) file
  c.text_eval_fraction = 0.05  # dataset="text": the file's last fraction is the eval split
  c.sequence_length = 128  # dataset="text": bytes the model reads per example
  c.data_workers = 0  # grain worker processes per host for decoding; 0: one background thread
  c.prefetch_batches = 2  # batches prepared ahead of the step that needs them
  # Model and task.
  c.model = "resnet8"  # a zoo name (jaxscale/models) or an import path "package.module:Name"
  c.task = "classification"  # or "language_model", or an import path "package.module:Name"
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
  # Periodic evaluation over the whole eval split (0: only after the last step). Epochs count
  # examples, so they agree with batch growth.
  c.eval_every_epochs = 0.0
  c.eval_every_steps = 0
  c.target_accuracy = 0.0  # > 0: stop at the first eval whose accuracy reaches it (MLPerf)
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
  # "replicated", "optimizer" (ZeRO-1: optimizer state sharded, the update too) or "fsdp"
  # (parameters sharded too, gathered each step in param_gather_dtype): jaxscale/sharding.py.
  c.state_sharding = "replicated"
  c.param_gather_dtype = "float32"
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
  c.checkpoint_keep_best = False  # also keep the checkpoint of the best eval accuracy
  # A checkpoint whose arrays fail their checksums stops the run (False), or is moved to
  # workdir/damaged/<step> and the previous one restored (True); nothing is deleted.
  c.checkpoint_skip_damaged = False
  return c


def load(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python file, applies `key=value` overrides, checks the keys.

  The file's directory goes on sys.path, so import paths in the config (`model`, `dataset`,
  `task`) find the user's files beside it.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  add_search_path(os.path.dirname(path))
  spec = importlib.util.spec_from_file_location("_jaxscale_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r}: syntax error at line {e.lineno}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - anything a config file's top level raises
    raise ConfigError(f"config file {path!r} failed to load: {first_line(e)}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function")
  try:
    loaded = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"config file {path!r}: get_config() failed: {first_line(e)}") from None
  if not isinstance(loaded, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config file {path!r}: get_config() returned a {type(loaded).__name__}, "
                      f"not an ml_collections.ConfigDict")
  config = merge(defaults(), loaded, source=path)
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


_NON_FINITE = ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _coerce(name: str, value: Any, default: Any) -> Any:
  """Checks `value` against the default's type; ints are accepted where floats are expected."""
  if default is None or value is None:
    return value
  if isinstance(default, bool) or isinstance(value, bool):
    if isinstance(default, bool) and isinstance(value, bool):
      return value
  elif isinstance(default, float) and isinstance(value, (int, float)):
    return float(value)
  elif isinstance(default, float) and isinstance(value, str) and value.lower() in _NON_FINITE:
    return float(value)  # then refused by name in validate(), as 1e999 is
  elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(default)(value)
  elif isinstance(value, type(default)):
    return value
  raise ConfigError(
      f"config key {name!r} must be of type {type(default).__name__}, got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Rejects bad values before anything compiles. Raises ConfigError naming the key."""
  # Deferred: these modules are heavy, and each checks its own keys.
  from jaxscale import allreduce, batching, data, models, precision, runners, sharding

  _check_finite(config.to_dict())

  def positive(key):
    if not config[key] > 0:
      raise ConfigError(f"config key {key!r} must be positive, got {config[key]!r}")

  for key in ("global_batch_size", "eval_batch_size", "log_every_steps",
              "reference_batch_size", "learning_rate", "prefetch_batches"):
    positive(key)
  if config.num_train_steps <= 0:
    positive("num_epochs")
  for key in ("image_size", "data_workers", "checkpoint_every_steps", "checkpoint_keep",
              "checkpoint_keep_every_steps", "bn_momentum_epochs", "precise_bn_batches",
              "eval_every_epochs", "eval_every_steps", "target_accuracy"):
    if config[key] < 0:
      raise ConfigError(f"config key {key!r} must be >= 0, got {config[key]}")
  if config.eval_every_epochs and config.eval_every_steps:
    raise ConfigError(f"config keys 'eval_every_epochs' ({config.eval_every_epochs}) and "
                      f"'eval_every_steps' ({config.eval_every_steps}): set one, not both")
  if config.target_accuracy > 1:
    raise ConfigError(f"config key 'target_accuracy' is a fraction in (0, 1], "
                      f"got {config.target_accuracy}")
  if len(config.mean) != len(config.std):
    raise ConfigError(f"config keys 'mean' and 'std' must have the same length, got "
                      f"{len(config.mean)} and {len(config.std)}")
  if any(not x > 0 for x in config.std):
    raise ConfigError(f"config key 'std' must be positive, got {list(config.std)}")
  for key, allowed in (("stem", models.STEMS), ("progress_bar", ("auto", "on", "off")),
                       ("lr_scaling", optim.LR_SCALING_RULES),
                       ("allreduce", allreduce.ALGORITHMS)):
    if config[key] not in allowed:
      raise ConfigError(f"config key {key!r}: unknown {config[key]!r}; known: "
                        f"{', '.join(allowed)}")
  if config.model not in models.MODELS and ":" not in config.model:
    models.resolve(config.model)  # raises the error that lists the zoo
  data.check_config(config)
  runners.check_config(config)
  allreduce.check_config(config)
  sharding.check_config(config)
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
    precision.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  # Raises for a bad batch schedule or accumulation key.
  batching.create(config, num_examples=1, num_devices=num_devices)
  profile_range(config.profile_steps)


def _check_finite(tree: dict, prefix: str = "") -> None:
  """inf or NaN anywhere in the config is a mistake (1e999 parses as inf)."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _check_finite(value, f"{prefix}{key}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config key {prefix + key!r} must be finite, got {value}")
    elif isinstance(value, (list, tuple)) and any(
        isinstance(x, float) and not math.isfinite(x) for x in value):
      raise ConfigError(f"config key {prefix + key!r} must be finite, got {list(value)}")


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


# Keys that choose how a run executes, not what it computes: a resumed run may change them
# (another sharding mode or mesh, the legacy runner, other logging) and go on from the same
# checkpoint; config.json keeps the first run's values.
EXECUTION_KEYS = frozenset({
    "state_sharding", "parallelism", "mesh", "allreduce", "xla_gpu_overlap", "data_workers",
    "prefetch_batches", "log_every_steps", "progress_bar", "compilation_cache_dir",
    "profile_steps", "checkpoint_async", "checkpoint_skip_damaged"})


def changed_keys(old: dict, new: dict) -> list[str]:
  """The dotted keys whose values differ between two configs loaded from `to_json`, besides
  EXECUTION_KEYS.

  A key that `old` lacks and `new` holds at its default value counts as unchanged, so a workdir
  or checkpoint written before jaxscale added that key still resumes.
  """
  default = _flatten(json.loads(to_json(defaults())))
  old, new = _flatten(old), _flatten(new)
  return sorted(k for k in (old.keys() | new.keys()) - EXECUTION_KEYS
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
