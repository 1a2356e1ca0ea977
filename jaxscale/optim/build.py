"""Optimizers and learning-rate schedules from `ml_collections` configs.

The trainer embeds `default_optimizer_config()` as `config.optimizer` and
`default_schedule_config()` as `config.lr_schedule`; error messages name those
keys. Every error is a one-line `ValueError`.
"""
from __future__ import annotations

import ml_collections
import optax

from jaxscale.optim import lars_lamb, masks, schedules

__all__ = [
    "DEFAULT_EPS",
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "build_schedule",
    "default_optimizer_config",
    "default_schedule_config",
]

OPTIMIZERS = ("adamw", "lamb", "lars", "sgd")
SCHEDULES = ("constant", "cosine", "poly", "steps")

DEFAULT_EPS = {"sgd": None, "lars": 0.0, "lamb": 1e-6, "adamw": 1e-8}
"""`optimizer.eps = None` means these: LARS's trust-ratio denominator (0 in You et
al.), LAMB's Adam epsilon (1e-6 in You et al. 2019 and optax.lamb), AdamW's (1e-8,
as optax.adamw). SGD has none."""


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The `optimizer` sub-config with its defaults.

  Keys: `name` (adamw | lamb | lars | sgd), `momentum` (sgd, lars), `nesterov`
  (sgd, lars), `weight_decay` (all; L2 added to the gradient for sgd and lars,
  decoupled for adamw and lamb; never applied to biases or normalization
  parameters), `trust_coefficient` (lars), `eps` (None: the optimizer's own
  default, see `DEFAULT_EPS`), `b1`, `b2` (adamw, lamb).
  """
  c = ml_collections.ConfigDict()
  c.name = "sgd"
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 0.0
  c.trust_coefficient = 0.001
  c.eps = ml_collections.FieldReference(None, field_type=float)
  c.b1 = 0.9
  c.b2 = 0.999
  return c


def default_schedule_config() -> ml_collections.ConfigDict:
  """The `lr_schedule` sub-config with its defaults.

  Keys: `name` (constant | cosine | poly | steps), `warmup_epochs` (linear
  warmup from 0, all schedules), `power` (poly), `end_value_factor` (cosine,
  poly: the final rate as a fraction of the peak), `boundaries_epochs` and
  `decay_factor` (steps: multiply by `decay_factor` at each boundary).
  """
  c = ml_collections.ConfigDict()
  c.name = "cosine"
  c.warmup_epochs = 1.0
  c.power = 2.0
  c.end_value_factor = 0.0
  c.boundaries_epochs = [30.0, 60.0, 80.0]
  c.decay_factor = 0.1
  return c


def _require(ok: bool, key: str, condition: str, value) -> None:
  if not ok:
    raise ValueError(f"config key {key} must be {condition}, got {value!r}")


def _sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float, nesterov: bool,
         weight_decay: float, mask: masks.MaskOrFn) -> optax.GradientTransformation:
  """`optax.sgd` on `g + weight_decay * w` (L2 regularization, masked)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
  )


def build_optimizer(opt: ml_collections.ConfigDict,
                    learning_rate: optax.ScalarOrSchedule, *,
                    mask: masks.MaskOrFn = masks.default_decay_mask,
                    axis_name: lars_lamb.AxisName = None,
                    ) -> optax.GradientTransformation:
  """The optimizer named by `opt.name`, with `learning_rate` (a float or schedule).

  * `sgd`: `w -= lr * trace(g + wd * w)` (`optax.sgd`, learning rate outside
    the momentum buffer), weight decay only on `mask`.
  * `lars`: `jaxscale.optim.lars` (trust ratio and decay only on `mask`).
  * `lamb`: `jaxscale.optim.lamb` (trust ratio and decay only on `mask`).
  * `adamw`: `optax.adamw` (decoupled decay `lr * wd * w`, only on `mask`).

  Args:
    opt: A config with the keys of `default_optimizer_config()`.
    learning_rate: A float or an optax schedule.
    mask: Leaves that get weight decay (and the trust ratio); see
      `jaxscale.optim.masks`. Default: kernels, not biases or norm parameters.
    axis_name: Mesh axes over which every leaf is sliced (the sharded weight update): LARS
      and LAMB sum their layer norms over them; the others are elementwise.

  Raises:
    ValueError: one line naming the offending `optimizer.*` key.
  """
  name = opt.name
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r} (config key optimizer.name); "
                     f"known: {', '.join(OPTIMIZERS)}")
  _require(opt.weight_decay >= 0, "optimizer.weight_decay", ">= 0", opt.weight_decay)
  eps = DEFAULT_EPS[name] if opt.eps is None else opt.eps
  if name in ("sgd", "lars"):
    _require(0 <= opt.momentum < 1, "optimizer.momentum", "in [0, 1)", opt.momentum)
  if name in ("lamb", "adamw"):
    _require(0 <= opt.b1 < 1, "optimizer.b1", "in [0, 1)", opt.b1)
    _require(0 <= opt.b2 < 1, "optimizer.b2", "in [0, 1)", opt.b2)
  if name != "sgd":
    _require(eps >= 0, "optimizer.eps", ">= 0 or None", opt.eps)

  if name == "sgd":
    return _sgd(learning_rate, momentum=opt.momentum, nesterov=opt.nesterov,
                weight_decay=opt.weight_decay, mask=mask)
  if name == "lars":
    _require(opt.trust_coefficient > 0, "optimizer.trust_coefficient", "> 0",
             opt.trust_coefficient)
    return lars_lamb.lars(learning_rate, momentum=opt.momentum, nesterov=opt.nesterov,
                          weight_decay=opt.weight_decay,
                          trust_coefficient=opt.trust_coefficient, eps=eps, mask=mask,
                          axis_name=axis_name)
  if name == "lamb":
    return lars_lamb.lamb(learning_rate, b1=opt.b1, b2=opt.b2, eps=eps,
                          weight_decay=opt.weight_decay, mask=mask, axis_name=axis_name)
  return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=eps,
                     weight_decay=opt.weight_decay, mask=mask)


def build_schedule(sched: ml_collections.ConfigDict, *, base_learning_rate: float,
                   steps_per_epoch: float, total_steps: int) -> optax.Schedule:
  """The schedule named by `sched.name`, peaking at `base_learning_rate`.

  Epoch quantities become steps as `round(epochs * steps_per_epoch)`.

  * `constant`: warmup, then `base_learning_rate`.
  * `cosine`: `warmup_cosine` to `end_value_factor * base_learning_rate` at
    `total_steps`.
  * `poly`: `warmup_polynomial` with `power`, same end value.
  * `steps`: `warmup_piecewise`, times `decay_factor` at each of
    `boundaries_epochs`.

  Args:
    sched: A config with the keys of `default_schedule_config()`.
    base_learning_rate: The peak rate (already scaled for the batch size).
    steps_per_epoch: Optimizer steps per epoch (may be fractional).
    total_steps: Length of training in steps.

  Raises:
    ValueError: one line naming the offending `lr_schedule.*` key.
  """
  name = sched.name
  if name not in SCHEDULES:
    raise ValueError(f"unknown learning-rate schedule {name!r} (config key "
                     f"lr_schedule.name); known: {', '.join(SCHEDULES)}")
  _require(sched.warmup_epochs >= 0, "lr_schedule.warmup_epochs", ">= 0",
           sched.warmup_epochs)
  warmup_steps = int(round(sched.warmup_epochs * steps_per_epoch))
  end_value = sched.end_value_factor * base_learning_rate
  if name == "constant":
    return schedules.warmup_constant(base_learning_rate, warmup_steps)
  if name == "cosine":
    return schedules.warmup_cosine(base_learning_rate, warmup_steps, total_steps,
                                   end_value=end_value)
  if name == "poly":
    _require(sched.power > 0, "lr_schedule.power", "> 0", sched.power)
    return schedules.warmup_polynomial(base_learning_rate, warmup_steps, total_steps,
                                       power=sched.power, end_value=end_value)
  bounds = list(sched.boundaries_epochs)
  _require(all(b >= 0 for b in bounds) and bounds == sorted(bounds),
           "lr_schedule.boundaries_epochs", "non-negative and increasing", bounds)
  _require(sched.decay_factor > 0, "lr_schedule.decay_factor", "> 0", sched.decay_factor)
  return schedules.warmup_piecewise(
      base_learning_rate, warmup_steps,
      [int(round(b * steps_per_epoch)) for b in bounds], sched.decay_factor)
