"""Evaluation during training: when to evaluate, the best result so far, and time to target.

Evals cover the whole eval split, read by an iterator of their own, so they change nothing in
training: the same parameters, the same data stream. They are due every `eval_every_steps`
steps, or whenever the data stream crosses a multiple of `eval_every_epochs` epochs (examples,
so that it agrees with batch growth), and always after the last step. With
`target_accuracy`, training stops at the first eval that reaches it, as MLPerf times a run.
Everything here is host state, saved in each checkpoint's meta, so a resumed run knows which
evals it has done and whether its target is already reached.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass
class Clock:
  """A run's wall time, summed over every process that worked on it (resumes included).

  `wall_time` counts from the start of the first process to now, less the time lost between
  a run's last checkpoint and its end; `eval_time` is the part spent in evals.
  """
  start: float = dataclasses.field(default_factory=time.time)  # this process
  before: float = 0.0  # wall time of the earlier processes, up to their last checkpoint
  eval_time: float = 0.0

  def wall_time(self) -> float:
    return self.before + time.time() - self.start

  def state(self) -> dict[str, float]:
    return {"wall_time": self.wall_time(), "eval_time": self.eval_time}

  def restore(self, state: dict[str, float]) -> None:
    self.before, self.eval_time = state.get("wall_time", 0.0), state.get("eval_time", 0.0)


@dataclasses.dataclass
class Evals:
  """The eval cadence and what the evals found so far."""
  enabled: bool = True  # False: the dataset has no eval split
  every_steps: int = 0
  every_examples: float = 0.0  # eval_every_epochs x examples per epoch
  target_accuracy: float = 0.0
  last_step: int = -1  # the step of the latest eval
  last_result: dict[str, Any] | None = None  # its event
  best: dict[str, Any] | None = None  # {"step", "accuracy"} of the best eval
  target: dict[str, Any] | None = None  # the time-to-target record once reached

  def due(self, step: int, position: int, previous_position: int, final: bool) -> bool:
    """Whether the step that moved the stream from `previous_position` to `position` ends
    with an eval (`final`: it is the last step of training)."""
    if step == self.last_step or not self.enabled:
      return False
    if final or (self.every_steps and step % self.every_steps == 0):
      return True
    return bool(self.every_examples) and (
        position // self.every_examples > previous_position // self.every_examples)

  def record(self, step: int, epoch: float, result: dict[str, Any], clock: Clock
             ) -> dict[str, Any]:
    """Notes an eval's event `result`; adds the time-to-target fields when it reaches the
    target first, and returns it."""
    self.last_step, self.last_result = step, result
    accuracy = result.get("accuracy")
    if accuracy is not None and (self.best is None or accuracy > self.best["accuracy"]):
      self.best = {"step": step, "accuracy": accuracy}
    if (self.target is None and self.target_accuracy and accuracy is not None
        and accuracy >= self.target_accuracy):
      wall = clock.wall_time()
      self.target = {"time_to_target": wall, "time_to_target_without_eval": wall - clock.eval_time,
                     "epochs_to_target": epoch, "steps_to_target": step, "accuracy": accuracy}
      result.update(self.target)
    if self.target_accuracy:
      result["target_reached"] = self.target is not None
    return result

  def state(self) -> dict[str, Any]:
    return {"last_step": self.last_step, "last_result": self.last_result, "best": self.best,
            "target": self.target}

  def restore(self, state: dict[str, Any]) -> None:
    self.last_step, self.last_result = state.get("last_step", -1), state.get("last_result")
    self.best, self.target = state.get("best"), state.get("target")

  def summary(self) -> str:
    """The target part of the run's closing line ('' without a target)."""
    if not self.target_accuracy:
      return ""
    if self.target:
      t = self.target
      return (f"; target {self.target_accuracy:g} reached at step {t['steps_to_target']} (epoch "
              f"{t['epochs_to_target']:.2f}) after {t['time_to_target']:.0f} s "
              f"({t['time_to_target_without_eval']:.0f} s without eval)")
    best = (f", best {self.best['accuracy']:.4f} at step {self.best['step']}" if self.best
            else "")
    return f"; target {self.target_accuracy:g} not reached{best}"


def from_config(config, num_train_examples: int, has_eval_split: bool = True) -> Evals:
  return Evals(enabled=has_eval_split, every_steps=config.eval_every_steps,
               every_examples=config.eval_every_epochs * num_train_examples,
               target_accuracy=config.target_accuracy)
