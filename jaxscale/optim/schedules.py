"""Learning-rate schedules with linear warmup, and batch-size scaling rules.

Every schedule is an optax schedule: a function `step -> learning rate` that
works on traced step counters under `jax.jit` (with `jax.numpy`) and on Python
or NumPy numbers (with NumPy, on the host: the trainer evaluates its schedule
there every step without waiting for a device), and returns float32. Step 0 is
the first update.

Warmup is the gradual warmup of Goyal et al. 2017 (arXiv 1706.02677, sec. 2.2):
the rate goes linearly from `init_value` at step 0 to `peak_value` at step
`warmup_steps`, after which the decay phase starts from `peak_value`. (Goyal et
al. start from the unscaled base rate, i.e. `init_value=base_lr`; MLPerf and
most later recipes start from 0, the default here.) With `warmup_steps=0` the
schedule starts at `peak_value`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LR_SCALING_RULES",
    "constant",
    "scale_learning_rate",
    "warmup_constant",
    "warmup_cosine",
    "warmup_piecewise",
    "warmup_polynomial",
]

LR_SCALING_RULES = ("linear", "none", "sqrt")


def _check_steps(**steps: int) -> None:
  for name, value in steps.items():
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")


def _numpy_for(step):
  """NumPy for host numbers, jax.numpy for JAX arrays and tracers."""
  return np if isinstance(step, (int, float, np.ndarray, np.number)) else jnp


def _with_warmup(decayed, init_value: float, peak_value: float, warmup_steps: int):
  """Wraps `decayed(t, xp)` (t: float32 step, xp: np or jnp) with a linear warmup."""

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    xp = _numpy_for(step)
    t = xp.asarray(step, xp.float32)
    ramp = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
    return xp.where(t < warmup_steps, ramp, decayed(t, xp)).astype(xp.float32)

  return schedule


def _decay_fraction(t, warmup_steps: int, total_steps: int, xp):
  """0 at the end of warmup, 1 at `total_steps` and after."""
  decay_steps = total_steps - warmup_steps
  if decay_steps <= 0:
    return xp.ones_like(t)
  return xp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)


def constant(value: float) -> optax.Schedule:
  """`lr(t) = value`."""
  return lambda step: _numpy_for(step).full(np.shape(step), value, np.float32)


def warmup_constant(peak_value: float, warmup_steps: int, *,
                    init_value: float = 0.0) -> optax.Schedule:
  """Linear warmup from `init_value` to `peak_value`, then constant `peak_value`."""
  _check_steps(warmup_steps=warmup_steps)
  return _with_warmup(lambda t, xp: xp.full_like(t, peak_value), init_value, peak_value,
                      warmup_steps)


def warmup_polynomial(peak_value: float, warmup_steps: int, total_steps: int, *,
                      power: float = 2.0, end_value: float = 0.0,
                      init_value: float = 0.0) -> optax.Schedule:
  """Linear warmup, then polynomial decay to `end_value` (the MLPerf LARS schedule).

  For `warmup_steps <= t`, with `f = min((t - warmup_steps) / (total_steps -
  warmup_steps), 1)`::

    lr(t) = end_value + (peak_value - end_value) * (1 - f) ** power

  so `lr(warmup_steps) = peak_value` and `lr(t) = end_value` for
  `t >= total_steps`. You et al. (arXiv 1708.03888) use `power=2`; the MLPerf
  ResNet-50 LARS recipe uses `power=2` with a small `end_value`. If
  `total_steps <= warmup_steps` there is no decay phase: `end_value` after warmup.

  Args:
    peak_value: The rate at the end of warmup.
    warmup_steps: Length of the linear warmup, in steps.
    total_steps: The step at which the rate reaches `end_value`.
    power: Exponent of the decay.
    end_value: The final rate.
    init_value: The rate at step 0.

  Returns:
    An optax schedule.
  """
  _check_steps(warmup_steps=warmup_steps, total_steps=total_steps)

  def decayed(t, xp):
    f = _decay_fraction(t, warmup_steps, total_steps, xp)
    return end_value + (peak_value - end_value) * (1.0 - f) ** power

  return _with_warmup(decayed, init_value, peak_value, warmup_steps)


def warmup_cosine(peak_value: float, warmup_steps: int, total_steps: int, *,
                  end_value: float = 0.0, init_value: float = 0.0) -> optax.Schedule:
  """Linear warmup, then cosine decay to `end_value` (Loshchilov & Hutter, arXiv 1608.03983).

  For `warmup_steps <= t`, with `f` as in `warmup_polynomial`::

    lr(t) = end_value + (peak_value - end_value) * (1 + cos(pi * f)) / 2

  Args:
    peak_value: The rate at the end of warmup.
    warmup_steps: Length of the linear warmup, in steps.
    total_steps: The step at which the rate reaches `end_value`.
    end_value: The final rate.
    init_value: The rate at step 0.

  Returns:
    An optax schedule.
  """
  _check_steps(warmup_steps=warmup_steps, total_steps=total_steps)

  def decayed(t, xp):
    f = _decay_fraction(t, warmup_steps, total_steps, xp)
    return end_value + (peak_value - end_value) * 0.5 * (1.0 + xp.cos(math.pi * f))

  return _with_warmup(decayed, init_value, peak_value, warmup_steps)


def warmup_piecewise(peak_value: float, warmup_steps: int,
                     boundaries_steps: Sequence[int], factor: float = 0.1, *,
                     init_value: float = 0.0) -> optax.Schedule:
  """Linear warmup, then step decay (Goyal et al., arXiv 1706.02677: x0.1 at epochs 30, 60, 80).

  For `warmup_steps <= t`::

    lr(t) = peak_value * factor ** (number of boundaries b with b <= t)

  Boundaries are absolute step numbers (counted from step 0, not from the end
  of warmup); the rate changes *at* each boundary.

  Args:
    peak_value: The rate at the end of warmup.
    warmup_steps: Length of the linear warmup, in steps.
    boundaries_steps: The steps at which the rate is multiplied by `factor`.
    factor: The multiplier applied at each boundary.
    init_value: The rate at step 0.

  Returns:
    An optax schedule.
  """
  _check_steps(warmup_steps=warmup_steps,
               **{f"boundaries_steps[{i}]": b for i, b in enumerate(boundaries_steps)})
  bounds = np.asarray(list(boundaries_steps), np.float32)

  def decayed(t, xp):
    count = xp.sum(t[..., None] >= bounds, axis=-1)
    return peak_value * xp.power(xp.float32(factor), count)

  return _with_warmup(decayed, init_value, peak_value, warmup_steps)


def scale_learning_rate(base_lr: float, batch_size: int, reference_batch_size: int,
                        rule: str) -> float:
  """The learning rate for `batch_size`, given `base_lr` at `reference_batch_size`.

  Rules: `"linear"`: `base_lr * B / B_ref` (Goyal et al., arXiv 1706.02677,
  sec. 2.1); `"sqrt"`: `base_lr * sqrt(B / B_ref)` (Krizhevsky, arXiv 1404.5997;
  often used with LAMB/Adam); `"none"`: `base_lr`.

  Raises:
    ValueError: for an unknown rule, or non-positive batch sizes.
  """
  if rule not in LR_SCALING_RULES:
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}; "
                     f"known: {', '.join(LR_SCALING_RULES)}")
  if batch_size <= 0 or reference_batch_size <= 0:
    raise ValueError(f"batch sizes must be positive, got batch_size={batch_size}, "
                     f"reference_batch_size={reference_batch_size}")
  ratio = batch_size / reference_batch_size
  if rule == "linear":
    return base_lr * ratio
  if rule == "sqrt":
    return base_lr * math.sqrt(ratio)
  return base_lr
