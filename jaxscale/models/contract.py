"""The model contract: how jaxscale calls a model, whichever Flax API it is written in.

A model is a Flax Linen module (an instance, a class, or a function returning one) or a Flax NNX
module (an `nnx.Module` class, or a function that takes `rngs` and returns an instance). jaxscale
calls it on one batch of model inputs, as the task makes them from a data batch (classification:
normalized float NHWC images in the compute dtype; language modelling: int32 token ids
`[batch, length]`), and it returns the task's output (logits `[batch, num_classes]`, or
`[batch, length, vocab]`). A `train` argument of `__call__` is optional: when there is one,
jaxscale passes True in training steps and False otherwise.

jaxscale keeps a model's variables as two plain dicts, `params` and `batch_stats` (Linen's
collections; NNX's `nnx.Param` and `nnx.BatchStat` state as pure dicts), so checkpoints, the
optimizer and the sharded step treat both APIs alike. NNX modules run natively: `nnx.merge`
rebuilds the module from those dicts inside every compiled step and `nnx.state` reads the new
statistics back (docs: README, "Your own model and data").

BatchNorm belongs to jaxscale: every `nn.BatchNorm` (Linen) or `nnx.BatchNorm` (NNX) in a model
computes its statistics over the mesh axes jaxscale names (the global batch, or `bn_group_size`
groups), without the model knowing, by setting the layer's `axis_name` for the call (a Linen
method interceptor; an attribute on NNX's merged module). A model with batch statistics kept
anywhere else is refused, since jaxscale could not make them cross-replica.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.errors import ConfigError, first_line

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}, nested dicts of arrays


@dataclasses.dataclass(frozen=True)
class BatchNorm:
  """How every BatchNorm layer of a model behaves in one call.

  Attributes:
    axis_name: mesh axes the batch statistics are averaged over (None: this device's batch).
    axis_index_groups: BatchNorm groups of devices along those axes (None: all of them).
    momentum_cap: lowers each layer's running-average momentum to at most this value; 0 makes
      the new running statistics the batch statistics exactly (precise BN). None: as built.
  """
  axis_name: str | tuple[str, ...] | None = None
  axis_index_groups: Any = None
  momentum_cap: float | None = None


LOCAL_BATCHNORM = BatchNorm()


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model as jaxscale calls it. Build it with `wrap`.

  Attributes:
    name: the zoo name or import path (what export rebuilds it from), or the object's name.
    module: the Linen module, or the NNX module class / factory.
    takes_train: whether `__call__` has a `train` argument.
    accepted: the jaxscale options the model was built with (the ones its constructor accepts).
  """
  name: str
  module: Any
  takes_train: bool
  accepted: dict[str, Any]
  _nnx: Any = None  # (graphdef, params, batch_stats, rest) abstract NNX states; None for Linen

  def init(self, rng: jax.Array, x: jax.Array) -> Variables:
    """The variables for input `x`, drawn from `rng` alone (the same on every process)."""
    if self._nnx is not None:
      return _nnx_init(self.module, self.accepted, rng)
    variables = self.init_linen(rng, x)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def init_linen(self, rng: jax.Array, x: jax.Array) -> dict[str, Any]:
    """Every variable collection a Linen model creates (eval mode, BatchNorm controlled)."""
    with nn.intercept_methods(functools.partial(_control_batchnorm, LOCAL_BATCHNORM, False,
                                                not self.takes_train)):
      return self.module.init({"params": rng, "dropout": rng}, x, **self._train_kwargs(False))

  def apply(self, variables: Variables, x: jax.Array, *, train: bool,
            batch_norm: BatchNorm = LOCAL_BATCHNORM, rng: jax.Array | None = None
            ) -> tuple[jax.Array, Any]:
    """(output, new batch_stats). In training, BatchNorm uses and updates batch statistics;
    `rng` feeds dropout (Linen's "dropout" stream; every RNG stream of an NNX module)."""
    if self._nnx is not None:
      return _nnx_apply(self._nnx, variables, x, train, batch_norm, rng, self._train_kwargs(train))
    interceptor = functools.partial(_control_batchnorm, batch_norm, train,
                                    not self.takes_train)
    with nn.intercept_methods(interceptor):
      if not train:
        return self.module.apply(variables, x, **self._train_kwargs(False)), \
            variables["batch_stats"]
      rngs = {"dropout": rng} if rng is not None else {}
      out, new = self.module.apply(variables, x, rngs=rngs, mutable=["batch_stats"],
                                   **self._train_kwargs(True))
    return out, new.get("batch_stats", {})

  def _train_kwargs(self, train: bool) -> dict[str, bool]:
    return {"train": train} if self.takes_train else {}


def _control_batchnorm(batch_norm: BatchNorm, train: bool, set_mode: bool, next_fun, args,
                       kwargs, context):
  """Runs a Linen BatchNorm call with jaxscale's axis, groups and momentum cap."""
  module = context.module
  if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  overrides = {"axis_name": batch_norm.axis_name,
               "axis_index_groups": batch_norm.axis_index_groups}
  if batch_norm.momentum_cap is not None:
    overrides["momentum"] = min(module.momentum, batch_norm.momentum_cap)
  if set_mode and "use_running_average" not in kwargs and len(args) < 2:
    overrides["use_running_average"] = not train  # a model without `train` cannot say
  saved = {key: getattr(module, key) for key in overrides}
  try:
    for key, value in overrides.items():
      object.__setattr__(module, key, value)  # the bound copy of this apply only
    return next_fun(*args, **kwargs)
  finally:
    for key, value in saved.items():
      object.__setattr__(module, key, value)


# --- NNX ---------------------------------------------------------------------------------------

def _nnx_construct(factory, accepted: dict[str, Any], rng) -> nnx.Module:
  return factory(**accepted, rngs=nnx.Rngs(rng))


def _nnx_init(factory, accepted, rng) -> Variables:
  _, params, batch_stats, _ = nnx.split(_nnx_construct(factory, accepted, rng), nnx.Param,
                                        nnx.BatchStat, ...)
  return {"params": params.to_pure_dict(), "batch_stats": batch_stats.to_pure_dict()}


def _filled(template: nnx.State, pure: dict) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)  # a fresh copy: replace_by_pure_dict mutates
  state.replace_by_pure_dict(pure)
  return state


def _nnx_apply(states, variables, x, train, batch_norm, rng, call_kwargs):
  graphdef, params, batch_stats, rest = states
  # The rest of the state is RNG streams (checked in `wrap`): fresh keys from `rng` each call,
  # so dropout differs per step and device yet nothing random is carried in the TrainState.
  rng = jax.random.key(0) if rng is None else rng
  leaves, treedef = jax.tree.flatten(rest.to_pure_dict())
  fresh = [jax.random.fold_in(rng, i) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
           else jnp.zeros(leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)]
  module = nnx.merge(graphdef, _filled(params, variables["params"]),
                     _filled(batch_stats, variables["batch_stats"]),
                     _filled(rest, jax.tree.unflatten(treedef, fresh)))
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.BatchNorm):
      node.axis_name, node.axis_index_groups = batch_norm.axis_name, batch_norm.axis_index_groups
      node.use_running_average = not train
      if batch_norm.momentum_cap is not None:
        node.momentum = min(node.momentum, batch_norm.momentum_cap)
    elif isinstance(node, nnx.Dropout):
      node.deterministic = not train
  out = module(x, **call_kwargs)
  return out, nnx.state(module, nnx.BatchStat).to_pure_dict()


# --- Building and checking ---------------------------------------------------------------------

def _accepts(fn: Callable, name: str) -> bool:
  """Whether `fn` (a function, or a class: its __init__) takes a keyword argument `name`."""
  try:
    parameters = inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters
  except (TypeError, ValueError):
    return False
  return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _constructor_options(target: Any, options: dict[str, Any]) -> dict[str, Any]:
  """The options `target` (a Linen class or partial, an NNX class or a function) accepts."""
  if isinstance(target, functools.partial):
    fixed = set(target.keywords)
    return {k: v for k, v in _constructor_options(target.func, options).items() if k not in fixed}
  if isinstance(target, type) and issubclass(target, nn.Module):
    fields = {f.name for f in dataclasses.fields(target)}
    return {k: v for k, v in options.items() if k in fields}
  return {k: v for k, v in options.items() if _accepts(target, k)}


def wrap(obj: Any, name: str, options: dict[str, Any]) -> Model:
  """A `Model` from a Linen module (instance, class or factory) or an NNX class or factory.

  `options` are what jaxscale would set (num_classes, dtype, param_dtype, bn_momentum, ...):
  each is passed only where the constructor accepts it. Raises ConfigError naming the model.
  """
  if isinstance(obj, nn.Module):
    return Model(name, obj, _accepts(obj.__call__, "train"), {})
  if isinstance(obj, nnx.Module):
    raise ConfigError(f"model {name!r}: pass the nnx.Module class (or a function taking rngs), "
                      f"not an instance: jaxscale builds it from the seed on every process")
  if not callable(obj):
    raise ConfigError(f"model {name!r} is a {type(obj).__name__}, not a Flax module, module "
                      f"class or function returning one")
  accepted = _constructor_options(obj, options)
  is_nnx = isinstance(obj, type) and issubclass(obj, nnx.Module)
  if is_nnx or _accepts(obj, "rngs") and not (isinstance(obj, type) and issubclass(obj, nn.Module)):
    return _wrap_nnx(obj, name, accepted, must_be_nnx=is_nnx)
  try:
    module = obj(**accepted)
  except Exception as e:  # noqa: BLE001 - a user's constructor
    raise ConfigError(f"model {name!r} cannot be built with {sorted(accepted)}: "
                      f"{first_line(e)}") from None
  if not isinstance(module, nn.Module):
    raise ConfigError(f"model {name!r} returned a {type(module).__name__}, not a Flax module")
  return Model(name, module, _accepts(module.__call__, "train"), accepted)


def _wrap_nnx(factory, name: str, accepted: dict[str, Any], must_be_nnx: bool) -> Model:
  try:
    abstract = nnx.eval_shape(lambda: _nnx_construct(factory, accepted, jax.random.key(0)))
  except Exception as e:  # noqa: BLE001 - a user's constructor
    raise ConfigError(f"model {name!r} cannot be built with {sorted(accepted) + ['rngs']}: "
                      f"{first_line(e)}") from None
  if not isinstance(abstract, nnx.Module):
    kind = "an nnx.Module class" if must_be_nnx else "a function taking rngs"
    raise ConfigError(f"model {name!r} ({kind}) returned a {type(abstract).__name__}, "
                      f"not an nnx.Module")
  states = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
  other = {type(v).__name__ for v in jax.tree.leaves(states[3], is_leaf=_is_variable)
           if not isinstance(v, nnx.RngState)}
  if other:
    raise ConfigError(f"model {name!r} holds NNX state jaxscale does not train or carry: "
                      f"{', '.join(sorted(other))}; use nnx.Param, nnx.BatchStat and RNG streams")
  return Model(name, factory, _accepts(type(abstract).__call__, "train"), accepted, states)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def check(model: Model, example: jax.ShapeDtypeStruct) -> tuple[Variables, Any]:
  """Initializes and applies `model` abstractly on `example`; returns (variables, output).

  Nothing is computed or compiled. Raises a one-line ConfigError naming the model when it
  cannot be initialized or called, has no parameters, creates other variable collections, or
  keeps batch statistics outside BatchNorm layers (jaxscale could not make them cross-replica).
  """
  owners = set()  # Linen: the paths of the BatchNorm layers

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      owners.add(tuple(context.module.path))
    return next_fun(*args, **kwargs)

  try:
    if model._nnx is not None:
      variables = jax.eval_shape(model.init, jax.random.key(0), example)
    else:
      with nn.intercept_methods(record):
        collections = jax.eval_shape(model.init_linen, jax.random.key(0), example)
      variables = {"params": collections.get("params", {}),
                   "batch_stats": collections.get("batch_stats", {})}
  except Exception as e:  # noqa: BLE001 - a user's model
    raise ConfigError(f"model {model.name!r} cannot be initialized on an input of shape "
                      f"{tuple(example.shape)} {example.dtype}: {first_line(e)}") from None
  if model._nnx is None:
    extra = sorted(set(collections) - {"params", "batch_stats"})
    if extra:
      raise ConfigError(f"model {model.name!r} creates variable collections jaxscale does not "
                        f"train or carry: {', '.join(extra)}; use params and batch_stats")
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      if keys[:-1] not in owners:
        raise ConfigError(f"model {model.name!r} keeps batch statistics outside nn.BatchNorm "
                          f"({'/'.join(keys)}); jaxscale cannot make them cross-replica")
  if not jax.tree.leaves(variables["params"]):
    raise ConfigError(f"model {model.name!r} has no parameters")
  try:
    output, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, rng=jax.random.key(0)), variables, example)
  except Exception as e:  # noqa: BLE001 - a user's model
    raise ConfigError(f"model {model.name!r} fails in training mode on an input of shape "
                      f"{tuple(example.shape)} {example.dtype}: {first_line(e)}") from None
  return variables, output
