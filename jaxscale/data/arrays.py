"""Datasets from NumPy arrays or from any random-access source, and normalization statistics.

    dataset = jaxscale.data.from_arrays(train=(x_train, y_train), eval=(x_test, y_test))
    jaxscale.train.run(config, workdir, model=MyModel, dataset=dataset)

`x` is images `[N, H, W]` or `[N, H, W, C]` (uint8, or float in any range: normalization is
computed from the data unless given) or feature vectors `[N, D]`; `y` integer labels `[N]`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxscale.data.pipeline import prepare
from jaxscale.data.sources import Dataset
from jaxscale.errors import ConfigError

MEAN_STD_EXAMPLES = 2048  # examples read to compute the mean and std of a dataset's images


class ArraySource(Sequence):
  """Records `{name: array[i]}` from equally long arrays; a grain random-access source."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
      raise ConfigError(f"arrays of different lengths: "
                        f"{ {k: len(v) for k, v in arrays.items()} }")
    self._arrays, self._n = arrays, lengths.pop()

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._n:
      raise IndexError(index)
    return {k: v[index] for k, v in self._arrays.items()}


def _source(data: Any, split: str) -> Sequence[dict]:
  """(x, y) arrays, a dict of arrays, or a random-access sequence of records."""
  if isinstance(data, tuple) and len(data) == 2:
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.dtype.kind not in "uif" or x.ndim not in (2, 3, 4):
      raise ConfigError(f"{split} images: shape {x.shape} {x.dtype} cannot be used; need "
                        f"[N, H, W], [N, H, W, C] or [N, D] features, integer or float")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
      raise ConfigError(f"{split} labels: shape {y.shape} {y.dtype}; need [N] integers with "
                        f"N = {len(x)}")
    return ArraySource({"image": x, "label": y.astype(np.int32)})
  if isinstance(data, dict):
    return ArraySource({k: np.asarray(v) for k, v in data.items()})
  if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
    return data
  raise ConfigError(f"{split} data: a {type(data).__name__}; need (x, y) arrays, a dict of "
                    f"arrays or a random-access source of records")


def from_arrays(train: Any, eval: Any = None, *, name: str = "arrays",  # noqa: A002
                num_classes: int | None = None, mean=None, std=None) -> Dataset:
  """A `Dataset` from NumPy arrays or random-access sources.

  Args:
    train: (x, y) arrays, a dict of equally long arrays (one record field each), or a
      random-access source of records (a grain data source, a list of dicts, ...).
    eval: the same for evaluation, or None (no eval).
    name: the dataset's name in logs and checkpoints.
    num_classes: defaults to the largest training label + 1 for (x, y) arrays.
    mean, std: per-channel normalization in the images' units; None: computed from `train`.
  """
  train_source = _source(train, "train")
  eval_source = None if eval is None else _source(eval, "eval")
  if num_classes is None and isinstance(train, tuple):
    num_classes = int(np.max(train[1])) + 1
  if (mean is None) != (std is None):
    raise ConfigError("from_arrays: give both mean and std, or neither")
  return Dataset(name, train_source, eval_source, num_classes,
                 None if mean is None else tuple(np.ravel(mean).tolist()),
                 None if std is None else tuple(np.ravel(std).tolist()))


def mean_std(source: Sequence[dict], transform: Callable | None,
             max_examples: int = MEAN_STD_EXAMPLES) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of "image" over up to `max_examples` evenly spaced records
  (after `transform`), in float64: a pure function of the data, the same on every process."""
  count = min(len(source), max_examples)
  indices = np.linspace(0, len(source) - 1, count).round().astype(int)
  total = total_sq = 0.0
  pixels = 0
  for i in indices:
    image = prepare(source[int(i)], transform, None)["image"].astype(np.float64)
    image = image.reshape(-1, image.shape[-1]) if image.ndim > 1 else image[None]
    total, total_sq = total + image.sum(0), total_sq + np.square(image).sum(0)
    pixels += image.shape[0]
  mean = total / pixels
  std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
  std = np.where(std > 0, std, 1.0)  # a constant channel is left unscaled
  return tuple(mean.tolist()), tuple(std.tolist())
