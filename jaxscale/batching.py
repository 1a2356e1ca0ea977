"""How large each step's global batch is: constant, stages, a linear ramp, or adaptive growth.

Training progress is counted in examples (the data stream's position), not steps, so that
epochs, the learning-rate schedule and the batch schedule agree whatever the batch sizes are.

- `""`: every step uses `global_batch_size`.
- `"start_epoch:global_batch_size,..."`: stages, e.g. Sony's 34K -> 68K as "0:34816,30:69632"
  (Mikami et al., arXiv 1811.05233). With `batch_ramp=True` the size grows linearly from one
  point to the next instead of jumping.
- `"adaptive"`: start at `global_batch_size` and double whenever the measured gradient noise
  scale B_simple (`noise_scale.py`) exceeds the current batch, up to `max_global_batch_size`.

Gradient accumulation splits each device's batch into k micro-batches (`accum_steps`): k is
`grad_accum_steps`, or the smallest k that brings the per-device batch within
`max_per_device_batch`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxscale.errors import ConfigError


@dataclasses.dataclass
class BatchSchedule:
  """The global batch size in force at each point of training (examples consumed)."""
  num_examples: int  # examples per epoch
  multiple: int  # every size is a multiple of this (data-parallel devices x accumulation)
  stages: tuple[tuple[float, int], ...] = ()  # (start_epoch, size); empty: constant
  ramp: bool = False
  adaptive: bool = False
  initial: int = 0
  maximum: int = 0
  current: int = 0  # adaptive only: the size reached so far

  def size_at(self, position: int) -> int:
    """The global batch size for the step that starts at stream `position`."""
    if self.adaptive or not self.stages:
      return self.current or self.initial
    epoch = position / self.num_examples
    index = max(i for i, (start, _) in enumerate(self.stages) if start <= epoch)
    start, size = self.stages[index]
    if self.ramp and index + 1 < len(self.stages):
      next_start, next_size = self.stages[index + 1]
      size = size + (next_size - size) * (epoch - start) / (next_start - start)
      size = max(self.multiple, int(size) // self.multiple * self.multiple)
    return size

  def num_steps(self, position: int, total_examples: int) -> int:
    """Steps from `position` until `total_examples` are consumed, at the sizes known now."""
    steps = 0
    while position < total_examples:
      position += self.size_at(position)
      steps += 1
    return steps

  def observe_noise_scale(self, noise_scale: float) -> bool:
    """Adaptive growth: doubles the batch when B_simple exceeds it. True if it changed."""
    current = self.current or self.initial
    if not self.adaptive or not noise_scale > current or current * 2 > self.maximum:
      return False
    self.current = current * 2
    return True

  def distinct_sizes(self) -> list[int]:
    """Sizes known in advance (for compiling ahead); the adaptive ones are discovered."""
    if self.adaptive:
      sizes, size = [], self.initial
      while size <= self.maximum:
        sizes.append(size)
        size *= 2
      return sizes
    return sorted({size for _, size in self.stages} or {self.initial})

  def state(self) -> dict[str, int]:
    return {"current_global_batch_size": self.current}

  def restore(self, state: dict[str, Any]) -> None:
    self.current = int(state.get("current_global_batch_size", 0))


def accum_steps(per_device_batch: int, grad_accum_steps: int, max_per_device_batch: int) -> int:
  """How many micro-batches a device's batch of `per_device_batch` examples is split into.

  `grad_accum_steps` > 1 fixes k (it must divide the batch); else `max_per_device_batch` > 0
  gives the smallest k that divides the batch into micro-batches of at most that many examples;
  else 1. Raises a one-line ConfigError naming the key for a bad value, or both keys set.
  """
  _check_accum_keys(grad_accum_steps, max_per_device_batch)
  if grad_accum_steps > 1:
    if per_device_batch % grad_accum_steps:
      raise ConfigError(f"config key 'grad_accum_steps': {grad_accum_steps} does not divide "
                        f"the per-device batch of {per_device_batch}")
    return grad_accum_steps
  if max_per_device_batch:
    return next(k for k in range(1, per_device_batch + 1)
                if per_device_batch % k == 0 and per_device_batch // k <= max_per_device_batch)
  return 1


def _check_accum_keys(grad_accum_steps: int, max_per_device_batch: int) -> None:
  if grad_accum_steps < 1:
    raise ConfigError(f"config key 'grad_accum_steps' must be >= 1, got {grad_accum_steps}")
  if max_per_device_batch < 0:
    raise ConfigError(f"config key 'max_per_device_batch' must be >= 0 (0: no limit), "
                      f"got {max_per_device_batch}")
  if grad_accum_steps > 1 and max_per_device_batch:
    raise ConfigError(f"config keys 'grad_accum_steps' ({grad_accum_steps}) and "
                      f"'max_per_device_batch' ({max_per_device_batch}): set one, not both")


def create(config, num_examples: int, num_devices: int) -> BatchSchedule:
  """The schedule of `config.batch_schedule`, checked: one ConfigError naming the key.

  With `grad_accum_steps` = k > 1 every size must be a multiple of `num_devices` x k.
  """
  spec, initial = config.batch_schedule, config.global_batch_size
  key = "config key 'batch_schedule'"
  _check_accum_keys(config.grad_accum_steps, config.max_per_device_batch)
  multiple = num_devices * config.grad_accum_steps
  factors = f"({num_devices} data-parallel devices x grad_accum_steps {config.grad_accum_steps})"
  if spec in ("", "adaptive") and initial % multiple:
    raise ConfigError(f"config key 'global_batch_size': {initial} is not a multiple of "
                      f"{multiple} {factors}")
  if not spec:
    return BatchSchedule(num_examples, multiple, initial=initial)
  if spec == "adaptive":
    if num_devices < 2:
      raise ConfigError(f"{key}: 'adaptive' measures the gradient noise scale from per-device "
                        f"gradients and needs at least 2 data-parallel devices")
    maximum = config.max_global_batch_size
    if maximum < initial or maximum % multiple:
      raise ConfigError(f"config key 'max_global_batch_size': {maximum} must be >= "
                        f"global_batch_size ({initial}) and divisible by {multiple}")
    return BatchSchedule(num_examples, multiple, adaptive=True, initial=initial, maximum=maximum)
  stages = []
  for stage in spec.split(","):
    try:
      start, size = stage.split(":")
      start, size = float(start), int(size)
    except ValueError:
      raise ConfigError(f"{key}: stage {stage!r} is not start_epoch:global_batch_size; expected "
                        f"'', 'adaptive' or e.g. '0:34816,30:69632'") from None
    if size <= 0 or size % multiple:
      raise ConfigError(f"{key}: batch size {size} of stage {stage!r} is not a positive "
                        f"multiple of {multiple} {factors}")
    stages.append((start, size))
  if stages[0][0] != 0:
    raise ConfigError(f"{key}: the first stage must start at epoch 0, got {stages[0][0]}")
  starts = [start for start, _ in stages]
  if any(b <= a for a, b in zip(starts, starts[1:])):
    raise ConfigError(f"{key}: stage start epochs must increase, got {starts}")
  return BatchSchedule(num_examples, multiple, stages=tuple(stages), ramp=config.batch_ramp,
                       initial=stages[0][1])
