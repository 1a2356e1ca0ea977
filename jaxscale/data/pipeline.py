"""Batches from a random-access source through grain: the training stream and exact eval.

Training reads an endless stream of epochs. Epoch e is a permutation of the source drawn from
(seed, e) by grain's index shuffle, and the stream position (examples consumed so far, globally)
is the whole iterator state. A global batch of B examples takes the next B stream positions, so
every example is used exactly once per epoch whatever the batch sizes are, and a batch may span
an epoch boundary. Process p of P reads only its contiguous slice of B/P positions.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import grain
import jax
import numpy as np


def random_flip(images: np.ndarray, positions: np.ndarray, seed: int) -> np.ndarray:
  """Flips each image horizontally with probability 1/2, drawn from (seed, stream position)."""
  flip = np.array([np.random.default_rng((seed, int(p))).random() < 0.5 for p in positions])
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def read(source: Sequence[dict], indices: list[int]) -> dict[str, np.ndarray]:
  """Reads records as one batch; array_record sources read a whole batch in parallel."""
  getitems = getattr(source, "__getitems__", None)
  records = getitems(indices) if getitems else [source[i] for i in indices]
  return {"image": np.stack([r["image"] for r in records]),
          "label": np.asarray([r["label"] for r in records], np.int32)}


class TrainLoader:
  """Deterministic, checkpointable global-batch iterator over the training stream."""

  def __init__(self, source: Sequence[dict], *, seed: int, random_flip: bool = False,
               process_index: int | None = None, process_count: int | None = None):
    self.num_examples = len(source)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self._source, self._seed, self._random_flip = source, seed, random_flip
    # grain's index shuffle: position p maps to a permutation drawn for epoch p // len(source).
    self._order = grain.MapDataset.range(self.num_examples).shuffle(seed=seed)
    self.position = 0  # global stream position: examples consumed by all processes

  @property
  def epoch(self) -> float:
    """Fractional epochs consumed so far."""
    return self.position / self.num_examples

  def next_batch(self, global_batch_size: int) -> dict[str, np.ndarray]:
    """This process's slice of the next global batch, and advances the stream."""
    local = global_batch_size // self.process_count
    start = self.position + self.process_index * local
    positions = np.arange(start, start + local)
    batch = read(self._source, [self._order[int(p)] for p in positions])
    if self._random_flip:
      batch["image"] = random_flip(batch["image"], positions, self._seed)
    self.position += global_batch_size
    return batch

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.position = int(state["position"])


def eval_batches(source: Sequence[dict], global_batch_size: int, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `source` exactly once, in order, in padded global batches.

  Each batch carries a `mask` (1 for a real example, 0 for padding) so that metrics summed with
  the mask count each example once, whatever the process and device counts.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = global_batch_size // process_count
  n = len(source)
  for start in range(0, n, global_batch_size):
    positions = start + process_index * local + np.arange(local)
    mask = positions < n
    batch = read(source, np.where(mask, positions, 0).tolist())
    batch["mask"] = mask.astype(np.float32)
    yield batch


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return -(-num_examples // global_batch_size)
