"""Batches from a random-access source through grain: the training stream and exact eval.

Training reads an endless stream of epochs. Epoch e is a permutation of the source drawn from
(seed, e) by grain's index shuffle, and the stream position (examples consumed so far, globally)
is the whole iterator state. A global batch of B examples takes the next B stream positions, so
every example is used exactly once per epoch whatever the batch sizes are, and a batch may span
an epoch boundary. Process p of P reads only its contiguous slice of B/P positions.

The unit of work handed to grain is one step's local batch, a pure function of (position, size):
grain prefetches the next batches in a background thread, or in worker processes
(`workers > 0`), while the current step runs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from jaxscale.data.transforms import EvalTransform, TrainTransform

_ENDLESS = 2**40  # grain sources need a length; the training stream has none


def read(source: Sequence[dict], indices: list[int]) -> list[dict]:
  """Reads records as one batch; array_record sources read a whole batch in parallel."""
  getitems = getattr(source, "__getitems__", None)
  return list(getitems(indices)) if getitems else [source[i] for i in indices]


_HOST_TO_DEVICE = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
                   np.dtype(np.float64): np.float32}  # JAX computes in 32 bits by default


def prepare(record: dict, transform: Callable | None, rng: np.random.Generator | None
            ) -> dict[str, np.ndarray]:
  """One record as the step sees it: the image through `transform`, every other numeric field
  as an array; non-numeric fields (file names, ids as strings) stay on the host."""
  example = {}
  for key, value in record.items():
    if key == "image" and transform is not None:
      example[key] = transform(value, rng)
    else:
      value = np.asarray(value)
      if value.dtype.kind in "biuf":
        example[key] = value
  return example


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks the examples' fields into a batch (64-bit numbers become 32-bit)."""
  batch = {}
  for key in examples[0]:
    array = np.stack([e[key] for e in examples])
    batch[key] = array.astype(_HOST_TO_DEVICE.get(array.dtype, array.dtype), copy=False)
  return batch


@dataclasses.dataclass(frozen=True)
class _StepBatches:
  """Element k: this process's batch of the k-th step of `global_batch_size` after `start`."""
  source: Sequence[dict]
  order: grain.MapDataset  # stream position -> source index
  transform: Callable | None  # of the "image" field
  seed: int
  start: int
  global_batch_size: int
  process_index: int
  process_count: int

  def __len__(self) -> int:
    return _ENDLESS

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    local = self.global_batch_size // self.process_count
    first = self.start + step * self.global_batch_size + self.process_index * local
    positions = range(first, first + local)
    records = read(self.source, [self.order[p] for p in positions])
    return collate([prepare(r, self.transform, np.random.default_rng((self.seed, p)))
                    for r, p in zip(records, positions)])


@dataclasses.dataclass(frozen=True)
class _EvalBatches:
  """Element k: this process's slice of eval batch k, padded past the end, with a mask."""
  source: Sequence[dict]
  transform: Callable | None  # of the "image" field
  global_batch_size: int
  process_index: int
  process_count: int

  def __len__(self) -> int:
    return num_eval_batches(len(self.source), self.global_batch_size)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    local = self.global_batch_size // self.process_count
    positions = k * self.global_batch_size + self.process_index * local + np.arange(local)
    mask = positions < len(self.source)
    records = read(self.source, np.where(mask, positions, 0).tolist())
    batch = collate([prepare(r, self.transform, None) for r in records])
    batch["mask"] = mask.astype(np.float32)
    return batch


def _iterate(batches, workers: int, prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches in order, prepared ahead by a grain thread or by `workers` processes."""
  dataset = grain.MapDataset.source(batches).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if workers > 0:
    from absl import flags  # grain's worker processes read absl flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch))
  return iter(dataset)


class TrainLoader:
  """Deterministic, checkpointable global-batch iterator over the training stream."""

  def __init__(self, source: Sequence[dict], *, seed: int,
               transform: Callable | None = TrainTransform(random_flip=False), workers: int = 0,
               prefetch: int = 2, process_index: int | None = None,
               process_count: int | None = None):
    self.num_examples = len(source)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self._source, self._seed, self._transform = source, seed, transform
    self._workers, self._prefetch = workers, prefetch
    # grain's index shuffle: position p maps to a permutation drawn for epoch p // len(source).
    self._order = grain.MapDataset.range(self.num_examples).shuffle(seed=seed)
    self._iterator, self._iterator_key = None, None
    self.position = 0  # global stream position: examples consumed by all processes

  @property
  def epoch(self) -> float:
    """Fractional epochs consumed so far."""
    return self.position / self.num_examples

  def next_batch(self, global_batch_size: int) -> dict[str, np.ndarray]:
    """This process's slice of the next global batch, and advances the stream."""
    if self._iterator_key != (self.position, global_batch_size):
      # First call, a new batch size or a moved position: restart the prefetching iterator.
      self._iterator = _iterate(
          _StepBatches(self._source, self._order, self._transform, self._seed, self.position,
                       global_batch_size, self.process_index, self.process_count),
          self._workers, self._prefetch)
    batch = next(self._iterator)
    self.position += global_batch_size
    self._iterator_key = (self.position, global_batch_size)
    return batch

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.position = int(state["position"])


def eval_batches(source: Sequence[dict], global_batch_size: int, *,
                 transform: Callable | None = EvalTransform(), workers: int = 0, prefetch: int = 2,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `source` exactly once, in order, in padded global batches.

  Each batch carries a `mask` (1 for a real example, 0 for padding) so that metrics summed with
  the mask count each example once, whatever the process and device counts.
  """
  batches = _EvalBatches(source, transform, global_batch_size,
                         jax.process_index() if process_index is None else process_index,
                         jax.process_count() if process_count is None else process_count)
  return _iterate(batches, workers, prefetch)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return -(-num_examples // global_batch_size)
