"""Mixed precision: dtype policies, jaxscale's dynamic loss scaler, and the step's safety net.

A policy names three dtypes: the parameters' (the float32 master copy the optimizer updates),
the compute dtype (convs, matmuls, activations) and the model's output (logits). The loss and
the softmax cross-entropy are always float32, and so are BatchNorm's statistics.

float16 has five exponent bits: gradients under 2**-24 flush to zero and activations over 65504
overflow. The loss scaler multiplies the loss by `scale` before differentiation and divides the
gradients after the all-reduce, and adapts `scale`: a step with a non-finite gradient is
skipped (state unchanged) and backs the scale off; `growth_interval_steps` finite steps in a row
grow it. Unlike `flax.training.dynamic_scale.DynamicScale`, the initial scale is inside float16's
range and the scale is bounded above and below.

Every decision that changes the state is the same on all devices: the finite check is a `pmin`
over the mesh axes, taken after the gradient all-reduce.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from jaxscale.errors import EXIT_NONFINITE, JaxscaleError

DTYPES = {name: jnp.dtype(name) for name in ("float32", "bfloat16", "float16")}
_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Policy:
  """The dtypes of one precision policy."""
  param_dtype: jnp.dtype = DTYPES["float32"]
  compute_dtype: jnp.dtype = DTYPES["float32"]
  output_dtype: jnp.dtype = DTYPES["float32"]

  @property
  def needs_loss_scale(self) -> bool:
    """float16 anywhere in the forward pass needs loss scaling to keep small gradients."""
    return DTYPES["float16"] in (self.param_dtype, self.compute_dtype, self.output_dtype)

  def __str__(self) -> str:
    return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name}")


POLICIES = {
    "fp32": Policy(),
    "bf16": Policy(compute_dtype=DTYPES["bfloat16"]),
    "fp16": Policy(compute_dtype=DTYPES["float16"]),
}
_POLICY_KEYS = {"params": "param_dtype", "compute": "compute_dtype", "output": "output_dtype"}


def parse_dtype(name: str, key: str) -> jnp.dtype:
  """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16) -> dtype; ValueError naming `key`."""
  dtype = DTYPES.get(_SHORT_NAMES.get(name, name))
  if dtype is None:
    raise ValueError(f"config key {key!r}: unknown dtype {name!r}; "
                     f"known: {', '.join(DTYPES)}")
  return dtype


def parse_policy(text: str) -> Policy:
  """`fp32`, `bf16`, `fp16`, or `params=D,compute=D,output=D` (an omitted field is float32)."""
  if text in POLICIES:
    return POLICIES[text]
  fields = {}
  for part in text.split(","):
    key, sep, value = (s.strip() for s in part.partition("="))
    if not sep or key not in _POLICY_KEYS or key in fields:
      raise ValueError(
          f"config key 'precision': cannot read {text!r}; use {', '.join(POLICIES)} or a policy "
          f"such as 'params=float32,compute=bfloat16,output=float32' (each field at most once)")
    fields[key] = parse_dtype(value, "precision")
  return Policy(**{_POLICY_KEYS[k]: v for k, v in fields.items()})


# --- The dynamic loss scaler. -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
  """How the loss scale moves. Defaults: start at 2**15 (float16's max is 65504), double after
  2000 finite steps in a row, halve on a non-finite step, stay within [1, 2**24]; 2**24 maps
  float16's smallest subnormal (2**-24) to 1, so a larger scale cannot help and only overflows.
  `min == max` is a static scale; `NO_LOSS_SCALE` (1, static) is what float32 and bfloat16 use.
  """
  initial: float = 2.0**15
  growth_factor: float = 2.0
  growth_interval_steps: int = 2000
  backoff_factor: float = 0.5
  min: float = 1.0
  max: float = 2.0**24

  def __post_init__(self):
    if not 0 < self.min <= self.initial <= self.max < math.inf:
      raise ValueError(f"config key 'loss_scale': need 0 < min <= initial <= max < inf, got "
                       f"min={self.min}, initial={self.initial}, max={self.max}")
    if self.growth_factor < 1:
      raise ValueError(f"config key 'loss_scale.growth_factor' must be >= 1, "
                       f"got {self.growth_factor}")
    if not 0 < self.backoff_factor <= 1:
      raise ValueError(f"config key 'loss_scale.backoff_factor' must be in (0, 1], "
                       f"got {self.backoff_factor}")
    if self.growth_interval_steps < 1:
      raise ValueError(f"config key 'loss_scale.growth_interval_steps' must be >= 1, "
                       f"got {self.growth_interval_steps}")

  def backoff_steps(self) -> int:
    """Non-finite steps in a row that take the scale from `initial` down to `min`."""
    if self.backoff_factor == 1 or self.initial == self.min:
      return 0
    return math.ceil(math.log(self.min / self.initial) / math.log(self.backoff_factor) - 1e-9)


NO_LOSS_SCALE = LossScaleConfig(initial=1.0, growth_factor=1.0, backoff_factor=1.0, min=1.0,
                                max=1.0)


class LossScale(flax.struct.PyTreeNode):
  """The scaler's state: replicated scalars, checkpointed with the rest of the TrainState."""
  scale: jax.Array  # float32: the loss is multiplied by this before differentiation
  finite_steps: jax.Array  # int32: finite steps in a row since the scale last changed
  skipped_steps: jax.Array  # int32: non-finite (skipped) steps since the start of training


def init_loss_scale(config: LossScaleConfig = NO_LOSS_SCALE) -> LossScale:
  """The scaler's state at step 0: `config.initial`, no finite or skipped steps yet."""
  return LossScale(scale=jnp.asarray(config.initial, jnp.float32),
                   finite_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


def update_loss_scale(state: LossScale, finite: jax.Array, config: LossScaleConfig) -> LossScale:
  """The scale after a step: grows after `growth_interval_steps` finite steps, backs off after a
  non-finite one, clipped to [min, max]; counts skipped steps."""
  grow = finite & (state.finite_steps + 1 >= config.growth_interval_steps)
  scale = jnp.where(finite,
                    jnp.where(grow, state.scale * config.growth_factor, state.scale),
                    state.scale * config.backoff_factor)
  return LossScale(
      scale=jnp.clip(scale, config.min, config.max).astype(jnp.float32),
      finite_steps=jnp.where(finite & ~grow, state.finite_steps + 1, 0).astype(jnp.int32),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))


def unscale(grads: Any, scale: jax.Array) -> Any:
  """Gradients of `loss * scale` -> gradients of `loss`, divided in float32."""
  return jax.tree.map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)


# --- Cross-device pieces of the step. -----------------------------------------------------------

def all_finite(tree: Any, axes: tuple[str, ...]) -> jax.Array:
  """True on every device iff every leaf is finite on every device: a `pmin` over `axes`."""
  local = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]).all()
  return lax.pmin(local.astype(jnp.int32), axes) == 1


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """`on_true` where the scalar `pred` holds, else `on_false`, leaf by leaf (bit-exact)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# --- The host-side guard. -----------------------------------------------------------------------

class NonFiniteError(JaxscaleError, RuntimeError):
  """Training stopped: too many non-finite steps in a row."""
  exit_status = EXIT_NONFINITE


class NonFiniteGuard:
  """Stops a run after `max_steps` non-finite steps in a row, in every precision.

  Each step's finite flag is read one step late, when the next step is already queued, so the
  host never stalls the device. `flush()` checks the latest step: call it before saving a
  checkpoint and after the loop, so that a run that must stop stops before its state is saved.
  Once tripped, `error` holds the NonFiniteError to raise and every check returns False.
  """

  def __init__(self, max_steps: int):
    self.max_steps = max_steps
    self.streak = 0  # non-finite steps in a row, up to the last step checked
    self.error: NonFiniteError | None = None
    self._pending = None  # (step number, device flag) not yet checked

  def observe(self, step: int, finite: jax.Array) -> bool:
    """Records `step`'s flag and checks the previous step's. False: the run must stop."""
    pending, self._pending = self._pending, (step, finite)
    return self._check(pending)

  def flush(self) -> bool:
    """Checks the step recorded last. False: the run must stop."""
    pending, self._pending = self._pending, None
    return self._check(pending)

  def _check(self, pending) -> bool:
    if pending is None or self.error is not None:
      return self.error is None
    step, finite = pending
    self.streak = 0 if bool(jax.device_get(finite)) else self.streak + 1
    if self.streak >= self.max_steps:
      self.error = NonFiniteError(
          f"the loss or gradients were non-finite for {self.streak} steps in a row (steps "
          f"{step - self.streak + 1}-{step}; config key 'max_nonfinite_steps' is "
          f"{self.max_steps}); stopped before saving, the last checkpoint is the last good "
          f"state (lower the learning rate, or check the data)")
    return self.error is None


# --- From the run's config. ---------------------------------------------------------------------

def loss_scale_config(config) -> LossScaleConfig:
  """`config.loss_scale` where float16 computes or carries the gradients, else no scaling."""
  configured = _configured_loss_scale(config)  # checked in every precision
  wire = parse_dtype(config.grad_allreduce_dtype, "grad_allreduce_dtype")
  float16 = parse_policy(config.precision).needs_loss_scale or wire == DTYPES["float16"]
  return configured if float16 else NO_LOSS_SCALE


def _configured_loss_scale(config) -> LossScaleConfig:
  c = config.loss_scale
  return LossScaleConfig(initial=c.initial, growth_factor=c.growth_factor,
                         growth_interval_steps=c.growth_interval_steps,
                         backoff_factor=c.backoff_factor, min=c.min, max=c.max)


def check_config(config) -> None:
  """Raises ValueError naming the key for a bad `precision`, `grad_allreduce_dtype`,
  `loss_scale.*` or `max_nonfinite_steps`."""
  parse_dtype(config.grad_allreduce_dtype, "grad_allreduce_dtype")
  scaler = loss_scale_config(config)  # parses the policy, checks the loss_scale values
  if config.max_nonfinite_steps < 1:
    raise ValueError(f"config key 'max_nonfinite_steps' must be >= 1, "
                     f"got {config.max_nonfinite_steps}")
  if config.max_nonfinite_steps <= scaler.backoff_steps():
    raise ValueError(
        f"config key 'max_nonfinite_steps': {config.max_nonfinite_steps} would stop the run "
        f"before the loss scale can back off from loss_scale.initial={scaler.initial:g} to "
        f"loss_scale.min={scaler.min:g} ({scaler.backoff_steps()} steps); raise it")
