"""Datasets by name: TFDS array_record, offline Fashion-MNIST, synthetic, text, or a user's.

A dataset is two random-access sources of records (dicts of arrays): `{"image": HWC array or
encoded bytes, "label": int}` for classification, `{"tokens": int array}` for language models,
or whatever a user's task reads. `config.dataset` is a TFDS name (the catalog's, or a builder
prepared in `data_dir` whose code is not imported), `synthetic`, `text` (a local file, byte
level), or an import path `package.module:Name` to a function returning a `Dataset`. Nothing here
imports TensorFlow: TFDS array_record data sources are read through `tfds.data_source`.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import inspect
import os
import socket
from typing import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from jaxscale.data import fashion_mnist
from jaxscale.errors import ConfigError, DataError, first_line
from jaxscale.imports import import_object

# Per-channel mean and std of the pixels in [0, 255]; images are normalized on the device.
IMAGENET_MEAN_STD = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
MEAN_STD = {
    "fashion_mnist": ((0.286 * 255,), (0.353 * 255,)),
    "mnist": ((0.131 * 255,), (0.308 * 255,)),
    "cifar10": ((0.491 * 255, 0.482 * 255, 0.447 * 255), (0.247 * 255, 0.243 * 255, 0.262 * 255)),
    "imagenet2012": IMAGENET_MEAN_STD,
    "synthetic": IMAGENET_MEAN_STD,
}
BUILTIN = ("synthetic", "text")  # config key `dataset`, besides TFDS names and import paths


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's train and eval sources and what the model and task need to know about them.

  Attributes:
    name: for logs and checkpoints.
    train: a random-access sequence of records (`__len__`, `__getitem__`; grain data sources,
      TFDS data sources and lists all qualify).
    eval: the same for evaluation; None: the run evaluates nothing.
    num_classes: classes of "label", or the vocabulary of "tokens"; None if neither applies.
    mean, std: per-channel normalization of "image", in the images' own units; None: computed
      from the training data (`config.mean` / `config.std` override both).
    varying_size: images differ in size, so `image_size` must be set.
    channels: the channels encoded images decode to (1 grey, 3 RGB; 0: as each file has it).
  """
  name: str
  train: Sequence[dict]
  eval: Sequence[dict] | None
  num_classes: int | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  varying_size: bool = False
  channels: int = 0


class SyntheticSource(Sequence):
  """Deterministic random images and labels: record i depends only on (seed, i)."""

  def __init__(self, num_examples: int, image_shape: tuple[int, int, int], num_classes: int,
               seed: int):
    self._n, self._shape, self._classes, self._seed = num_examples, image_shape, num_classes, seed

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._n:
      raise IndexError(index)
    rng = np.random.default_rng((self._seed, index))
    return {"image": rng.integers(0, 256, self._shape, dtype=np.uint8),
            "label": int(rng.integers(self._classes))}


def default_data_dir(data_dir: str) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@functools.cache
def _catalog() -> frozenset[str]:
  return frozenset(tfds.list_builders(with_community_datasets=False))


def _prepared_dir(name: str, data_dir: str) -> str | None:
  """The newest prepared version of TFDS dataset `name` in `data_dir` (its dataset_info.json's
  directory), for builders whose code is not imported; None if there is none."""
  infos = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")) + glob.glob(
      os.path.join(data_dir, name, "*", "*", "dataset_info.json"))
  return os.path.dirname(max(infos)) if infos else None


def check_config(config) -> None:
  """Raises ConfigError for a `dataset` name jaxscale cannot find, or bad `text_*` keys."""
  name = config.dataset
  if name in BUILTIN or ":" in name or name in _catalog():
    pass
  elif not _prepared_dir(name, default_data_dir(config.data_dir)):
    raise ConfigError(f"config key 'dataset': unknown dataset {name!r}; use 'synthetic', 'text', "
                      f"a TFDS name (catalog, or prepared in data_dir) or an import path "
                      f"'package.module:Name'")
  if name == "text":
    if not config.text_file:
      raise ConfigError("config key 'text_file' must name a text file when dataset='text'")
    if not 0 < config.text_eval_fraction < 1:
      raise ConfigError(f"config key 'text_eval_fraction' must be in (0, 1), "
                        f"got {config.text_eval_fraction}")
  if config.sequence_length < 1:
    raise ConfigError(f"config key 'sequence_length' must be >= 1, got {config.sequence_length}")
  if name == "synthetic":
    for key in ("synthetic_num_classes", "synthetic_num_train_examples",
                "synthetic_num_eval_examples"):
      if config[key] <= 0:
        raise ConfigError(f"config key {key!r} must be positive, got {config[key]}")


def load_dataset(config) -> Dataset:
  """The dataset named by `config.dataset`, as random-access train and eval sources."""
  if config.dataset == "synthetic":
    size = config.image_size or 32
    shape = (size, size, 3)
    classes = config.synthetic_num_classes
    return Dataset("synthetic",
                   SyntheticSource(config.synthetic_num_train_examples, shape, classes, 0),
                   SyntheticSource(config.synthetic_num_eval_examples, shape, classes, 1),
                   classes, *MEAN_STD["synthetic"])
  if config.dataset == "text":
    from jaxscale.data import text
    return text.load(config.text_file, config.sequence_length, config.text_eval_fraction)
  if ":" in config.dataset:
    return _from_import_path(config)
  return _load_tfds(config)


def _from_import_path(config) -> Dataset:
  make = import_object(config.dataset, "dataset")
  try:
    takes_config = bool(inspect.signature(make).parameters)
  except (TypeError, ValueError):
    takes_config = False
  try:
    dataset = make(config) if takes_config else make()
  except (ConfigError, DataError):
    raise
  except Exception as e:  # noqa: BLE001 - a user's function
    raise ConfigError(f"config key 'dataset': {config.dataset} failed: {first_line(e)}") from None
  if not isinstance(dataset, Dataset):
    raise ConfigError(f"config key 'dataset': {config.dataset} returned a "
                      f"{type(dataset).__name__}, not a jaxscale.data.Dataset (see "
                      f"jaxscale.data.from_arrays)")
  return dataset


def _load_tfds(config) -> Dataset:
  data_dir = default_data_dir(config.data_dir)
  if config.dataset == "fashion_mnist":
    builder = _fashion_mnist_builder(data_dir, config.fashion_mnist_idx_dir)
  elif config.dataset in _catalog():
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  else:  # a user's builder, prepared in data_dir: read without its code
    builder = tfds.builder_from_directory(_prepared_dir(config.dataset, data_dir))
  splits = builder.info.splits
  eval_split = config.eval_split or ("validation" if "validation" in splits else "test")
  if splits and eval_split not in splits:
    raise ConfigError(f"config key 'eval_split': dataset {config.dataset!r} has no split "
                      f"{eval_split!r}; it has {', '.join(sorted(splits))}")
  try:
    train, evaluation = (_open_split(builder, split) for split in ("train", eval_split))
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not there"
    raise DataError(
        f"dataset {config.dataset!r} (splits train, {eval_split}) is not prepared in array_record "
        f"format in {data_dir} (config key data_dir): {first_line(e)} (see README: Data)"
    ) from None
  features = builder.info.features
  shape = tuple(features["image"].shape) if "image" in features else ()
  mean, std = MEAN_STD.get(config.dataset, (None, None))
  if mean is not None and shape and len(mean) != shape[-1]:
    mean, std = mean[:1] * shape[-1], std[:1] * shape[-1]
  label = features["label"] if "label" in features else None
  return Dataset(config.dataset, train, evaluation, getattr(label, "num_classes", None),
                 mean, std, varying_size=None in shape, channels=shape[-1] if shape else 0)


def _open_split(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
  """A split as a random-access source; Image features stay encoded for our decoder."""
  source = builder.as_data_source(split=split)
  if type(getattr(source, "data_source", None)).__module__ == "unittest.mock":
    # tfds.testing.mock_data: random images, already decoded, and no working batch read.
    return [source[i] for i in range(len(source))]
  features = builder.info.features
  if "image" in features and isinstance(features["image"], tfds.features.Image):
    # JPEG bytes go to transforms.TrainTransform, which decodes only what the crop needs.
    source = builder.as_data_source(split=split,
                                    decoders={"image": tfds.decode.SkipDecoding()})
  return source


def network_reachable(host: str = "storage.googleapis.com", port: int = 443,
                      timeout_s: float = 3.0) -> bool:
  """Whether a TCP connection to the TFDS download host opens within `timeout_s`."""
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except OSError:
    return False


def _fashion_mnist_builder(data_dir: str, idx_dir: str) -> tfds.core.DatasetBuilder:
  """Prepared TFDS fashion_mnist if present, else the IDX files converted once, else download."""
  catalog = tfds.builder("fashion_mnist", data_dir=data_dir)
  if catalog.is_prepared() and catalog.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return catalog
  if fashion_mnist.has_idx_files(idx_dir):
    # One process converts; the others wait, then open what it wrote.
    if jax.process_index() == 0:
      builder = fashion_mnist.prepare(idx_dir, data_dir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxscale:fashion_mnist_prepared")
    return fashion_mnist.prepare(idx_dir, data_dir) if jax.process_index() else builder
  missing = (f"no prepared TFDS fashion_mnist (array_record) in {data_dir} (config key "
             f"data_dir), no IDX files in {idx_dir} (config key fashion_mnist_idx_dir; apt-get "
             f"install dataset-fashion-mnist)")
  if not network_reachable():  # TFDS would retry its download for minutes
    raise DataError(f"Fashion-MNIST not found: {missing}, and no network to download it")
  try:
    return fashion_mnist.prepare_once(lambda: tfds.builder("fashion_mnist", data_dir=data_dir),
                                      file_format="array_record")
  except Exception as e:  # noqa: BLE001 - any failure here means "no way to get the data"
    raise DataError(f"Fashion-MNIST not found: {missing}, and the TFDS download failed "
                    f"({first_line(e)})") from None
