"""Run outputs: metrics.jsonl, TensorBoard events, and a progress bar or plain log lines.

Only process 0 writes; every other process gets a writer that does nothing, so callers need
no `if process_index == 0` of their own.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import tqdm

TRAIN_FIELDS = ("step", "epoch", "split", "loss", "accuracy", "global_batch_size",
                "learning_rate", "examples_per_sec", "wall_time")


def _plain(value: Any) -> Any:
  """JSON-safe Python scalars (NaN and infinities as strings)."""
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends one JSON object per event to `workdir/metrics.jsonl` and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # TensorBoard events without TensorFlow
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, event: dict[str, Any]) -> None:
    if not self.enabled:
      return
    event = {k: _plain(v) for k, v in event.items()}
    self._jsonl.write(json.dumps(event) + "\n")
    for key, value in event.items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{event['split']}/{key}", value, event["step"])

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar with throughput and ETA on a terminal; plain log lines otherwise."""

  def __init__(self, total_steps: int, mode: str = "auto", enabled: bool = True,
               start_step: int = 0):
    self.enabled = enabled
    use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
    self._bar = None
    if enabled and use_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
    self._last = start_step

  def update(self, step: int, event: dict[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self._last)
      if event:
        self._bar.set_postfix(loss=f"{event['loss']:.4f}", img_s=f"{event['examples_per_sec']:.0f}")
    elif event:
      accuracy = f"accuracy {event['accuracy']:.4f} " if "accuracy" in event else ""
      log(f"step {step} epoch {event['epoch']:.2f} loss {event['loss']:.4f} {accuracy}"
          f"lr {event['learning_rate']:.4g} {event['examples_per_sec']:.0f} examples/s")
    self._last = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def log(message: str) -> None:
  print(f"[jaxscale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
