"""Byte-level text for language modelling: any local file, no tokenizer.

Record i of a split is `{"tokens": bytes[i L : i L + L + 1]}` (uint8) for sequence length L: the
model reads the first L bytes and predicts the last L. The eval split is the file's last
`eval_fraction`, so no eval window overlaps a training one.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jaxscale.data.sources import Dataset
from jaxscale.errors import DataError

VOCAB_SIZE = 256  # bytes


class ByteWindows(Sequence):
  """Non-overlapping windows of `length + 1` bytes (each shares its last byte with the next)."""

  def __init__(self, data: np.ndarray, length: int):
    self._data, self._length = data, length

  def __len__(self) -> int:
    return max(0, (len(self._data) - 1) // self._length)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    start = index * self._length
    return {"tokens": self._data[start:start + self._length + 1]}


def load(path: str, sequence_length: int, eval_fraction: float) -> Dataset:
  """The file's bytes as train and eval windows; DataError naming the file if it cannot serve."""
  try:
    data = np.fromfile(os.path.expanduser(path), np.uint8)
  except OSError as e:
    raise DataError(f"text file {path!r} (config key text_file) cannot be read: "
                    f"{e.strerror or e}") from None
  split = int(len(data) * (1 - eval_fraction))
  train, evaluation = ByteWindows(data[:split], sequence_length), ByteWindows(data[split:],
                                                                             sequence_length)
  if not len(train) or not len(evaluation):
    raise DataError(f"text file {path!r} (config key text_file) has {len(data)} bytes: too few "
                    f"for train and eval windows of sequence_length {sequence_length} + 1 "
                    f"(text_eval_fraction {eval_fraction})")
  return Dataset(f"text:{os.path.basename(path)}", train, evaluation, VOCAB_SIZE)
