"""Fashion-MNIST offline: Debian's IDX files converted once into a TFDS array_record dataset.

TFDS's own `fashion_mnist` builder stores PNG-encoded images, and encoding `tfds.features.Image`
needs TensorFlow. This builder stores the same pixels as a uint8 `Tensor` feature, which TFDS
writes and reads without TensorFlow, so the conversion and the training process stay TF-free.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from jaxscale.errors import DataError, first_line

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file of unsigned bytes into an array.

  Raises DataError, naming the file, for one that is damaged (bad magic, truncated, a broken
  gzip stream) or unreadable.
  """
  def damaged(why: str) -> DataError:
    return DataError(f"Fashion-MNIST file {path} is damaged: {why} (config key "
                     f"fashion_mnist_idx_dir; apt-get install --reinstall dataset-fashion-mnist)")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated or not gzip
    raise damaged(f"broken gzip stream ({first_line(e)})") from None
  except OSError as e:
    raise DataError(f"Fashion-MNIST file {path} cannot be read ({first_line(e)})") from None
  magic = int.from_bytes(raw[:4], "big")
  if len(raw) < 4 or magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 4:  # 0x08: unsigned bytes
    raise damaged(f"not an IDX file of unsigned bytes (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=min(4 + 4 * ndim, len(raw)))
  if data.size != int(np.prod(shape)):
    raise damaged(f"{data.size} bytes of data for shape {shape}")
  return data.reshape(shape)


def idx_paths(idx_dir: str, split: str) -> tuple[str, str]:
  """The (images, labels) files of a split, accepting gzipped or plain names."""
  paths = []
  for name in _FILES[split]:
    path = os.path.join(idx_dir, name)
    if not os.path.exists(path) and os.path.exists(path[:-3]):
      path = path[:-3]
    paths.append(path)
  return tuple(paths)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al., arXiv 1708.07747) built from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, idx_dir: str = DEFAULT_IDX_DIR, **kwargs):
    # The default lets a pickled data source (sent to grain's workers) rebuild the builder.
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST from IDX files, images as a uint8 Tensor feature.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(split) for split in _FILES}

  def _generate_examples(self, split):
    images, labels = read_split(self._idx_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}


def read_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a split; DataError naming the file if one is damaged."""
  images_path, labels_path = idx_paths(idx_dir, split)
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise DataError(f"Fashion-MNIST files {images_path} ({images.shape}) and {labels_path} "
                    f"({labels.shape}) do not match (config key fashion_mnist_idx_dir)")
  return images, labels


def has_idx_files(idx_dir: str) -> bool:
  return all(os.path.exists(p) for split in _FILES for p in idx_paths(idx_dir, split))


def prepare(idx_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Converts the IDX files once (a no-op when already done) and returns the builder."""
  def make_builder():
    return FashionMnistIdx(idx_dir=idx_dir, data_dir=data_dir, file_format="array_record")
  if not make_builder().is_prepared():
    for split in _FILES:  # a damaged file is one line here, not a traceback from inside TFDS
      read_split(idx_dir, split)
  return prepare_once(make_builder, download_config=tfds.download.DownloadConfig(verify_ssl=False))


def prepare_once(make_builder: Callable[[], tfds.core.DatasetBuilder],
                 **prepare_kwargs) -> tfds.core.DatasetBuilder:
  """`make_builder()` with its dataset prepared, reusing what another run finished first.

  Two runs sharing data_dir can both find the dataset unprepared; the slower one's final
  rename then fails with FileExistsError, and a fresh builder opens the faster one's copy.
  """
  builder = make_builder()
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(**prepare_kwargs)
  except FileExistsError:
    builder = make_builder()
    if not builder.is_prepared():
      raise
  return builder
