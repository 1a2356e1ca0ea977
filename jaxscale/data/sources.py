"""Random-access data sources by dataset name: TFDS array_record, offline Fashion-MNIST, synthetic.

A source is a sequence of `{"image": uint8 HWC array, "label": int}` records. Nothing here
imports TensorFlow: TFDS array_record data sources are read through `tfds.data_source`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from jaxscale.config import ConfigError
from jaxscale.data import fashion_mnist

# Per-channel mean and std of the pixels in [0, 255]; images are normalized on the device.
IMAGENET_MEAN_STD = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
MEAN_STD = {
    "fashion_mnist": ((0.286 * 255,), (0.353 * 255,)),
    "mnist": ((0.131 * 255,), (0.308 * 255,)),
    "cifar10": ((0.491 * 255, 0.482 * 255, 0.447 * 255), (0.247 * 255, 0.243 * 255, 0.262 * 255)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's train and eval sources and what the model needs to know about them."""
  name: str
  train: Sequence[dict]
  eval: Sequence[dict]
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


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


def check_dataset_name(name: str) -> None:
  """Raises ConfigError for a name that is neither "synthetic" nor in the TFDS catalog."""
  if name != "synthetic" and name not in _catalog():
    raise ConfigError(f"config key 'dataset': unknown dataset {name!r}; use 'synthetic' or a "
                      f"TFDS catalog name such as fashion_mnist, cifar10, imagenet2012")


def load_dataset(config) -> Dataset:
  """The dataset named by `config.dataset`, as random-access train and eval sources."""
  if config.dataset == "synthetic":
    size = config.image_size or 32
    shape = (size, size, 3)
    classes = config.synthetic_num_classes
    return Dataset("synthetic",
                   SyntheticSource(config.synthetic_num_train_examples, shape, classes, 0),
                   SyntheticSource(config.synthetic_num_eval_examples, shape, classes, 1),
                   classes, shape, *IMAGENET_MEAN_STD)
  data_dir = default_data_dir(config.data_dir)
  if config.dataset == "fashion_mnist":
    builder = _fashion_mnist_builder(data_dir, config.fashion_mnist_idx_dir)
  else:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  features = builder.info.features
  eval_split = config.eval_split or (
      "validation" if "validation" in builder.info.splits else "test")
  try:
    train, evaluation = (_open_split(builder, split) for split in ("train", eval_split))
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not there"
    raise FileNotFoundError(
        f"dataset {config.dataset!r} (splits train, {eval_split}) is not prepared in array_record "
        f"format in {data_dir} (config key data_dir): {str(e).splitlines()[0]} "
        f"(see README: Datasets)") from None
  mean, std = MEAN_STD.get(config.dataset, IMAGENET_MEAN_STD)
  shape = tuple(features["image"].shape)
  if config.image_size:
    shape = (config.image_size, config.image_size, shape[-1])
  elif None in shape:
    raise ConfigError(f"config key 'image_size': {config.dataset} has images of varying size; "
                      f"set image_size (e.g. 224)")
  if len(mean) != shape[-1]:
    mean, std = mean[:1] * shape[-1], std[:1] * shape[-1]
  return Dataset(config.dataset, train, evaluation,
                 features["label"].num_classes, shape, mean, std)


def _open_split(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
  """A split as a random-access source; Image features stay encoded for our decoder."""
  source = builder.as_data_source(split=split)
  if type(getattr(source, "data_source", None)).__module__ == "unittest.mock":
    # tfds.testing.mock_data: random images, already decoded, and no working batch read.
    return [source[i] for i in range(len(source))]
  if isinstance(builder.info.features["image"], tfds.features.Image):
    # JPEG bytes go to transforms.TrainTransform, which decodes only what the crop needs.
    source = builder.as_data_source(split=split,
                                    decoders={"image": tfds.decode.SkipDecoding()})
  return source


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
  try:
    return fashion_mnist.prepare_once(lambda: tfds.builder("fashion_mnist", data_dir=data_dir),
                                      file_format="array_record")
  except Exception as e:  # noqa: BLE001 - any failure here means "no way to get the data"
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no prepared TFDS fashion_mnist (array_record) in {data_dir} "
        f"(config key data_dir), no IDX files in {idx_dir} (config key fashion_mnist_idx_dir; "
        f"apt-get install dataset-fashion-mnist), and the TFDS download failed "
        f"({type(e).__name__})") from None
